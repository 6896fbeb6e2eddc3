//! Classification of a verified request: its event type (from the scheme's place), its parsed body, the
//! headers kept with it and its dedup key. Runs only after [`crate::verify`] accepted the request.

use std::collections::BTreeMap;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::limits::MAX_EVENT_TYPE_LEN;
use crate::verify::{ClockodoEnvelope, HmacScheme, Locator, Scheme, StandardScheme, text_header};

/// Headers stored with every event when present (besides the event-type and id headers of the scheme).
const KEPT_HEADERS: [&str; 6] =
    ["content-type", "user-agent", "clockify-webhook-event-type", "webhook-id", "x-request-id", "x-github-delivery"];

/// Why a verified request cannot become an event (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    /// The body is not valid JSON.
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    /// No event type where the scheme says it is.
    #[error("missing event type ({0})")]
    MissingEventType(&'static str),
    /// The event type is empty, too long or has odd characters.
    #[error("invalid event type")]
    InvalidEventType,
}

impl ClassifyError {
    /// Metric label value.
    pub fn reason(&self) -> &'static str {
        match self {
            ClassifyError::InvalidJson(_) => "invalid_json",
            ClassifyError::MissingEventType(_) => "missing_event_type",
            ClassifyError::InvalidEventType => "invalid_event_type",
        }
    }
}

/// A classified request.
#[derive(Debug)]
pub struct Classified {
    /// Event type.
    pub event_type: String,
    /// The parsed body, when classification had to parse it (a JSON pointer); otherwise the body was only
    /// validated, and predicates parse it on demand.
    pub body: Option<serde_json::Value>,
    /// Headers to store with the event.
    pub kept_headers: Vec<(String, String)>,
    /// Dedup key.
    pub dedup_key: String,
    /// Ordering key: the entity the event is about (`<source>:<id>`), when the body names one.
    pub ordering_key: Option<String>,
}

/// Every header that carries no credential, for predicates (lower-case names; values that are not text
/// are left out).
pub fn visible_headers(scheme: &Scheme, headers: &HeaderMap) -> BTreeMap<String, String> {
    headers
        .iter()
        .filter(|(name, _)| !scheme.is_secret_header(name.as_str()))
        .filter_map(|(name, value)| value.to_str().ok().map(|v| (name.as_str().to_owned(), v.to_owned())))
        .collect()
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    text_header(headers, name).map(str::to_owned)
}

fn invalid_json(e: serde_json::Error) -> ClassifyError {
    ClassifyError::InvalidJson(e.to_string())
}

/// Classifies a request that passed verification. The body is parsed only as far as the scheme needs:
/// validated for Clockify, decoded into the envelope for Clockodo, parsed for a JSON pointer.
pub fn classify(scheme: &Scheme, headers: &HeaderMap, raw: &[u8]) -> Result<Classified, ClassifyError> {
    let body_hash = || hex::encode(Sha256::digest(raw));
    /// Reads only the top-level `id` (the entity id in Clockify bodies), validating the rest.
    #[derive(serde::Deserialize)]
    struct TopId {
        #[serde(default)]
        id: Option<serde_json::Value>,
    }
    let id_text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let top_id = || -> Result<Option<String>, ClassifyError> {
        // A body that is JSON but not an object (an array, a number) is valid and has no id.
        match serde_json::from_slice::<TopId>(raw) {
            Ok(t) => Ok(t.id.as_ref().and_then(id_text)),
            Err(e) if e.is_data() => {
                serde_json::from_slice::<serde::de::IgnoredAny>(raw).map(|_| None).map_err(invalid_json)
            }
            Err(e) => Err(invalid_json(e)),
        }
    };
    let mut parsed = None;
    let entity: Option<String>;
    let (event_type, dedup_key, extra_kept): (Option<String>, String, Vec<&str>) = match scheme {
        Scheme::Clockify { .. } | Scheme::ClockifyAddon(_) => {
            entity = top_id()?;
            let ty = header(headers, "clockify-webhook-event-type");
            let mut h = Sha256::new();
            h.update(ty.as_deref().unwrap_or("").as_bytes());
            h.update([0]);
            h.update(raw);
            (ty, format!("clockify:{}", hex::encode(h.finalize())), vec![])
        }
        Scheme::Clockodo { .. } => {
            let env: ClockodoEnvelope = serde_json::from_slice(raw).map_err(invalid_json)?;
            entity = env
                .payload
                .as_ref()
                .and_then(|p| p.as_object())
                .and_then(|o| o.iter().next())
                .and_then(|(kind, v)| v.get("id").and_then(id_text).map(|id| format!("{kind}:{id}")));
            let entity_id = entity.clone().unwrap_or_default();
            let sub = env.subscription_id.as_ref().map(|s| s.to_string()).unwrap_or_default();
            let key = match &env.occurred_at {
                Some(at) => format!("clockodo:{sub}:{at}:{entity_id}"),
                None => format!("clockodo:body:{}", body_hash()),
            };
            (env.event_name, key, vec![])
        }
        Scheme::Hmac(HmacScheme { event, id, .. }) | Scheme::None { event, id } => {
            let needs_body = [Some(event), id.as_ref()].into_iter().flatten().any(|l| matches!(l, Locator::Pointer(_)));
            if needs_body {
                let v = serde_json::from_slice::<serde_json::Value>(raw).map_err(invalid_json)?;
                entity = v.get("id").and_then(id_text);
                parsed = Some(v);
            } else {
                entity = top_id()?;
            }
            let ty = locate(event, headers, parsed.as_ref());
            let key = id.as_ref().and_then(|l| locate(l, headers, parsed.as_ref())).unwrap_or_else(body_hash);
            (ty, format!("{}:{key}", scheme.kind()), locator_headers(event, id.as_ref()))
        }
        Scheme::Standard(StandardScheme { event, .. }) => {
            if matches!(event, Locator::Pointer(_)) {
                let v = serde_json::from_slice::<serde_json::Value>(raw).map_err(invalid_json)?;
                entity = v.get("id").and_then(id_text);
                parsed = Some(v);
            } else {
                entity = top_id()?;
            }
            let ty = locate(event, headers, parsed.as_ref());
            // `webhook-id` is the message id: the same on every retry of one message.
            let key = header(headers, "webhook-id").unwrap_or_else(body_hash);
            (ty, format!("standard-webhooks:{key}"), locator_headers(event, None))
        }
    };

    let event_type = event_type.ok_or(ClassifyError::MissingEventType(match scheme {
        Scheme::Clockify { .. } | Scheme::ClockifyAddon(_) => "header clockify-webhook-event-type",
        Scheme::Clockodo { .. } => "body field event_name",
        Scheme::Hmac(_) | Scheme::None { .. } | Scheme::Standard(_) => "configured event header or pointer",
    }))?;
    if event_type.is_empty() {
        return Err(ClassifyError::MissingEventType("empty"));
    }
    if event_type.len() > MAX_EVENT_TYPE_LEN
        || !event_type.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/'))
    {
        return Err(ClassifyError::InvalidEventType);
    }
    let mut kept_headers: Vec<(String, String)> = headers
        .iter()
        .filter(|(k, _)| KEPT_HEADERS.contains(&k.as_str()) || extra_kept.contains(&k.as_str()))
        .filter(|(k, _)| !scheme.is_secret_header(k.as_str()))
        .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_owned(), v.to_owned())))
        .collect();
    kept_headers.sort();
    let ordering_key = entity.map(|id| format!("{}:{id}", scheme.kind()));
    Ok(Classified { event_type, body: parsed, kept_headers, dedup_key, ordering_key })
}

fn locator_headers<'a>(event: &'a Locator, id: Option<&'a Locator>) -> Vec<&'a str> {
    [Some(event), id]
        .into_iter()
        .flatten()
        .filter_map(|l| match l {
            Locator::Header(h) => Some(h.as_str()),
            Locator::Pointer(_) => None,
        })
        .collect()
}

/// The string at a locator: a header value, or a JSON string/number at a pointer.
fn locate(locator: &Locator, headers: &HeaderMap, body: Option<&serde_json::Value>) -> Option<String> {
    match locator {
        Locator::Header(h) => header(headers, h),
        Locator::Pointer(p) => match body?.pointer(p)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretString;

    fn clockify() -> Scheme {
        Scheme::Clockify { secrets: vec![SecretString::new("s")] }
    }

    #[test]
    fn clockify_event_type_from_header_and_signature_not_kept() {
        let mut h = HeaderMap::new();
        h.insert("clockify-signature", "s".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        assert_eq!(
            classify(&clockify(), &h, b"{}").unwrap_err(),
            ClassifyError::MissingEventType("header clockify-webhook-event-type")
        );
        h.insert("clockify-webhook-event-type", "NEW_TIME_ENTRY".parse().unwrap());
        let c = classify(&clockify(), &h, br#"{"id":"1"}"#).unwrap();
        assert_eq!(c.event_type, "NEW_TIME_ENTRY");
        assert!(!visible_headers(&clockify(), &h).contains_key("clockify-signature"));
        assert!(c.kept_headers.iter().all(|(k, _)| k != "clockify-signature"));
        assert!(c.dedup_key.starts_with("clockify:"));
        assert_eq!(classify(&clockify(), &h, b"{nope").unwrap_err().reason(), "invalid_json");
        h.insert("clockify-webhook-event-type", "BAD TYPE".parse().unwrap());
        assert_eq!(classify(&clockify(), &h, b"{}").unwrap_err(), ClassifyError::InvalidEventType);
    }

    #[test]
    fn clockodo_dedup_key_from_envelope() {
        let scheme = Scheme::Clockodo { secrets: vec![SecretString::new("t")] };
        let body = br#"{"subscription_id":42,"company_id":1337,"occurred_at":"2024-05-02T10:00:00Z","payload":{"entry":{"id":9001}},"event_name":"entry.created","token":"t"}"#;
        let c = classify(&scheme, &HeaderMap::new(), body).unwrap();
        assert_eq!(c.event_type, "entry.created");
        assert_eq!(c.dedup_key, "clockodo:42:2024-05-02T10:00:00Z:entry:9001");
    }

    #[test]
    fn generic_pointer_and_header() {
        let scheme =
            Scheme::None { event: Locator::Pointer("/event".into()), id: Some(Locator::Header("x-id".into())) };
        let mut h = HeaderMap::new();
        h.insert("x-id", "abc".parse().unwrap());
        let c = classify(&scheme, &h, br#"{"event":"TIME_ENTRY_CREATED"}"#).unwrap();
        assert_eq!((c.event_type.as_str(), c.dedup_key.as_str()), ("TIME_ENTRY_CREATED", "none:abc"));
        assert!(c.kept_headers.contains(&("x-id".into(), "abc".into())));
        assert!(matches!(classify(&scheme, &h, br#"{"other":1}"#), Err(ClassifyError::MissingEventType(_))));
    }
}
