//! `clockodo`: the JSON envelope's `token` equals the configured token. Clockodo's validation handshake
//! (`{"secret": "<uuid>"}`, or `?secret=` in the URL) carries no token at all: it is recognised here, answered
//! by the ingress and never routed.

use serde::Deserialize;

use std::time::SystemTime;

use super::{VerifyError, matching_secret};
use crate::config::SecretString;

/// The fields of a Clockodo envelope that hookbridge reads.
#[derive(Debug, Deserialize)]
pub struct ClockodoEnvelope {
    /// The webhook's token (a credential).
    #[serde(default)]
    pub token: Option<String>,
    /// Event name, e.g. `entry.created`.
    #[serde(default)]
    pub event_name: Option<String>,
    /// Present only in the validation handshake.
    #[serde(default)]
    pub secret: Option<serde_json::Value>,
    /// `{ "<entity>": { "id": N } }` (the ordering key).
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
}

/// The one field verification reads: the other fields of an envelope are classification's to check (an
/// authentic request with an odd `event_name` is a 400, not a 401).
#[derive(Deserialize)]
struct TokenField {
    #[serde(default)]
    token: Option<String>,
}

pub(super) fn verify(secrets: &[SecretString], body: &[u8], now: SystemTime) -> Result<usize, VerifyError> {
    // The token is inside the body; a body that is not a JSON object has no token.
    let envelope: TokenField = serde_json::from_slice(body).map_err(|_| VerifyError::MissingSignature)?;
    let token = envelope.token.filter(|t| !t.is_empty()).ok_or(VerifyError::MissingSignature)?;
    matching_secret(token.as_bytes(), secrets, now).ok_or(VerifyError::BadSignature)
}

/// The handshake secret, if this request is Clockodo's validation handshake: a `secret` query parameter, or
/// a JSON object body with a string `secret` and neither `event_name` nor `token`.
pub fn handshake_secret(query: Option<&str>, body: &[u8]) -> Option<String> {
    if let Some(q) = query {
        let from_query = form_urlencoded::parse(q.as_bytes())
            .find(|(k, v)| k == "secret" && is_plausible_secret(v))
            .map(|(_, v)| v.into_owned());
        if from_query.is_some() {
            return from_query;
        }
    }
    let envelope: ClockodoEnvelope = serde_json::from_slice(body).ok()?;
    if envelope.event_name.is_some() || envelope.token.is_some() {
        return None;
    }
    match envelope.secret {
        Some(serde_json::Value::String(s)) if is_plausible_secret(&s) => Some(s),
        _ => None,
    }
}

/// Handshake secrets are UUIDs; anything long or odd is refused so the store cannot be stuffed.
fn is_plausible_secret(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_must_match() {
        let secrets = vec![SecretString::new("tok")];
        assert_eq!(verify(&secrets, br#"{"event_name":"entry.created","token":"tok"}"#, SystemTime::now()), Ok(0));
        assert_eq!(
            verify(&secrets, br#"{"event_name":"entry.created","token":"bad"}"#, SystemTime::now()),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            verify(&secrets, br#"{"event_name":"entry.created"}"#, SystemTime::now()),
            Err(VerifyError::MissingSignature)
        );
        assert_eq!(verify(&secrets, b"not json", SystemTime::now()), Err(VerifyError::MissingSignature));
    }

    /// Fuzzing (verify_clockodo target, minimised body `{"event_name":0}` given the right token): the whole
    /// envelope was decoded to read the token, so a field of another type than expected (here a number for
    /// `event_name`) made an authentic request "missing signature". Only the token decides now.
    #[test]
    fn only_the_token_decides() {
        let secrets = vec![SecretString::new("tok")];
        let now = SystemTime::now();
        for body in [
            br#"{"event_name"			:		0,"token":"tok"}"#.as_slice(),
            br#"{"token":"tok","occurred_at":[1],"secret":{},"payload":7}"#,
        ] {
            assert_eq!(verify(&secrets, body, now), Ok(0), "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(verify(&secrets, br#"{"event_name":0,"token":"bad"}"#, now), Err(VerifyError::BadSignature));
        assert_eq!(verify(&secrets, br#"{"token":7}"#, now), Err(VerifyError::MissingSignature));
    }

    #[test]
    fn recognises_handshakes() {
        let uuid = "2f1c5b9e-3f0a-4c55-9a3e-5b3f1e0c7d21";
        assert_eq!(handshake_secret(None, format!(r#"{{"secret":"{uuid}"}}"#).as_bytes()), Some(uuid.into()));
        assert_eq!(handshake_secret(Some(&format!("a=1&secret={uuid}")), b""), Some(uuid.into()));
        assert_eq!(handshake_secret(None, br#"{"secret":"x","event_name":"entry.created"}"#), None);
        assert_eq!(handshake_secret(None, br#"{"secret":"<script>"}"#), None);
        assert_eq!(handshake_secret(None, b"{}"), None);
    }
}
