//! Classification of a verified request: its event type (from the scheme's place), its parsed body, the
//! headers kept with it and its dedup key. Runs only after [`crate::verify`] accepted the request.

use std::collections::BTreeMap;

use axum::http::HeaderMap;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use sha2::{Digest, Sha256};

use crate::limits::MAX_EVENT_TYPE_LEN;
use crate::verify::{ClockodoEnvelope, HmacScheme, Locator, Scheme, StandardScheme, text_header};

/// Headers stored with every event when present (besides the event-type and id headers of the scheme).
const KEPT_HEADERS: [&str; 7] = [
    "content-type",
    "user-agent",
    "clockify-webhook-event-type",
    "webhook-id",
    "svix-id",
    "x-request-id",
    "x-github-delivery",
];

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
    /// What the dedup key is: a delivery id (the same on every retry of one delivery, different for every
    /// other) or the content (the same for a retry and for a distinct event with the same bytes).
    pub dedup: DedupKey,
    /// Ordering key: the entity the event is about (`<source>:<id>`), when the body names one.
    pub ordering_key: Option<String>,
}

/// What a dedup key identifies, which decides how it dedups (see [`crate::store::Dedup`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupKey {
    /// A delivery id the sender sets once per delivery and keeps on its retries (Standard Webhooks'
    /// `webhook-id`, a configured `id_pointer`): a copy within the dedup window is a retry.
    DeliveryId,
    /// A hash of what was sent (Clockify and its add-ons, Clockodo, `hmac` without an id): a copy is a retry
    /// only if the provider may not have seen the earlier copy's answer; otherwise it is a new event.
    Content,
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
    let id_text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    // Reads only the top-level `id` (the entity id in Clockify bodies), checking the rest. A body that is
    // JSON but not an object (an array, a number) is valid and has no id.
    let top_id = || -> Result<Option<String>, ClassifyError> {
        Ok(check_json(raw, true).map_err(invalid_json)?.as_ref().and_then(id_text))
    };
    let mut parsed = None;
    let entity: Option<String>;
    let mut dedup = DedupKey::Content;
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
            // The envelope skips the fields it does not read unchecked: check them first.
            check_json(raw, false).map_err(invalid_json)?;
            let env: ClockodoEnvelope = serde_json::from_slice(raw).map_err(invalid_json)?;
            entity = env
                .payload
                .as_ref()
                .and_then(|p| p.as_object())
                .and_then(|o| o.iter().next())
                .and_then(|(kind, v)| v.get("id").and_then(id_text).map(|id| format!("{kind}:{id}")));
            // The whole envelope: two envelopes that differ in any field are two events (a key made of
            // some fields made the second of two changes in the same second a duplicate).
            (env.event_name, format!("clockodo:{}", body_hash()), vec![])
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
            let key = match id.as_ref().and_then(|l| locate(l, headers, parsed.as_ref())) {
                Some(id) => {
                    dedup = DedupKey::DeliveryId;
                    id
                }
                None => body_hash(),
            };
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
            // `webhook-id` (`svix-id`) is the message id: the same on every retry of one message (and signed).
            let key = match crate::verify::standard::header(headers, "id") {
                Some(id) => {
                    dedup = DedupKey::DeliveryId;
                    id.to_owned()
                }
                None => body_hash(),
            };
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
    Ok(Classified { event_type, body: parsed, kept_headers, dedup_key, dedup, ordering_key })
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

/// Walks a JSON value as parsing it into a [`serde_json::Value`] would (strings are text, numbers in range,
/// nesting within serde_json's depth limit), keeping nothing but, at the top level (`keep_id`), the value of
/// the key `id` (the last one, as when the document is parsed whole).
#[derive(Clone, Copy)]
struct Check {
    keep_id: bool,
}

impl<'de> DeserializeSeed<'de> for Check {
    type Value = Option<serde_json::Value>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check {
    type Value = Option<serde_json::Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut id = None;
        while let Some(is_id) = map.next_key_seed(IsId(self.keep_id))? {
            if is_id {
                id = Some(map.next_value::<serde_json::Value>()?);
            } else {
                map.next_value_seed(Check { keep_id: false })?;
            }
        }
        Ok(id)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element_seed(Check { keep_id: false })?.is_some() {}
        Ok(None)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// An object key, checked like any string: whether it is the `id` [`Check`] keeps.
struct IsId(bool);

impl<'de> DeserializeSeed<'de> for IsId {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for IsId {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, v: &str) -> Result<bool, E> {
        Ok(self.0 && v == "id")
    }
}

/// Checks `raw` as [`Check`] does: the top-level `id`, or an error when `raw` is not JSON.
fn check_json(raw: &[u8], keep_id: bool) -> Result<Option<serde_json::Value>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(raw);
    let id = Check { keep_id }.deserialize(&mut de)?;
    de.end()?;
    Ok(id)
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
        assert_eq!(c.dedup, DedupKey::Content);
        assert_eq!(classify(&clockify(), &h, b"{nope").unwrap_err().reason(), "invalid_json");
        h.insert("clockify-webhook-event-type", "BAD TYPE".parse().unwrap());
        assert_eq!(classify(&clockify(), &h, b"{}").unwrap_err(), ClassifyError::InvalidEventType);
    }

    /// Fuzzing (classify target, minimised body `{"":{"":"\xff"}}` under a `none` source with a header
    /// locator): bodies were checked by skipping them (`IgnoredAny`), which lets through strings that are not
    /// UTF-8, lone surrogates and nesting past serde_json's depth limit; the ingress then gave predicates
    /// `null` for such a body. Every scheme now refuses what `serde_json::Value` refuses.
    #[test]
    fn bodies_that_are_not_json_are_refused() {
        let none = Scheme::None { event: Locator::Header("x-event".into()), id: None };
        let clockodo = Scheme::Clockodo { secrets: vec![SecretString::new("t")] };
        let mut h = HeaderMap::new();
        h.insert("x-event", "U".parse().unwrap());
        h.insert("clockify-webhook-event-type", "NEW_TAG".parse().unwrap());
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let bodies: [&[u8]; 5] = [
            b"{\"\":{\"\":\"\xff\"}}",
            b"{\"\xff\":1}",
            br#"{"a":"\ud800"}"#,
            br#"{"event_name":"entry.created","x":["\udfff"]}"#,
            deep.as_bytes(),
        ];
        for body in bodies {
            for scheme in [&none, &clockify(), &clockodo] {
                let e = classify(scheme, &h, body).unwrap_err();
                assert_eq!(e.reason(), "invalid_json", "{}: {:?}", scheme.kind(), String::from_utf8_lossy(body));
                assert!(serde_json::from_slice::<serde_json::Value>(body).is_err());
            }
        }
        // What is JSON still passes, and the last top-level id counts, as in the parsed document.
        let c = classify(&clockify(), &h, br#"{"id":"a","x":{"id":"inner"},"s":"\u00e9\ud83d\ude00","id":7}"#).unwrap();
        assert_eq!(c.ordering_key.as_deref(), Some("clockify:7"));
        let c = classify(&clockify(), &h, b"[1, {\"id\": 2}]").unwrap();
        assert_eq!(c.ordering_key, None);
    }

    #[test]
    fn clockodo_dedup_key_is_the_whole_envelope() {
        let scheme = Scheme::Clockodo { secrets: vec![SecretString::new("t")] };
        let body = br#"{"subscription_id":42,"company_id":1337,"occurred_at":"2024-05-02T10:00:00Z","payload":{"entry":{"id":9001}},"event_name":"entry.created","token":"t"}"#;
        let c = classify(&scheme, &HeaderMap::new(), body).unwrap();
        assert_eq!(c.event_type, "entry.created");
        assert_eq!(c.dedup_key, format!("clockodo:{}", hex::encode(Sha256::digest(body))));
        assert_eq!(c.dedup, DedupKey::Content);
        assert_eq!(c.ordering_key.as_deref(), Some("clockodo:entry:9001"));
        // Same subscription, time and entity, another company: another event.
        let other = String::from_utf8_lossy(body).replace("1337", "1338");
        assert_ne!(classify(&scheme, &HeaderMap::new(), other.as_bytes()).unwrap().dedup_key, c.dedup_key);
    }

    #[test]
    fn generic_pointer_and_header() {
        let scheme =
            Scheme::None { event: Locator::Pointer("/event".into()), id: Some(Locator::Header("x-id".into())) };
        let mut h = HeaderMap::new();
        h.insert("x-id", "abc".parse().unwrap());
        let c = classify(&scheme, &h, br#"{"event":"TIME_ENTRY_CREATED"}"#).unwrap();
        assert_eq!((c.event_type.as_str(), c.dedup_key.as_str()), ("TIME_ENTRY_CREATED", "none:abc"));
        assert_eq!(c.dedup, DedupKey::DeliveryId);
        assert!(c.kept_headers.contains(&("x-id".into(), "abc".into())));
        assert!(matches!(classify(&scheme, &h, br#"{"other":1}"#), Err(ClassifyError::MissingEventType(_))));
        // Without its id the body is the key, a content key.
        h.remove("x-id");
        let c = classify(&scheme, &h, br#"{"event":"TIME_ENTRY_CREATED"}"#).unwrap();
        assert_eq!(c.dedup, DedupKey::Content);
    }
}
