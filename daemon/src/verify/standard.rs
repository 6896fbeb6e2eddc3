//! `standard-webhooks`: the Standard Webhooks scheme. `webhook-signature` holds one or more space-separated
//! `v1,<base64>` signatures (several during a key rotation) of `{webhook-id}.{webhook-timestamp}.{body}`,
//! HMAC-SHA256 with the base64 key after `whsec_`; `webhook-timestamp` (Unix seconds) must be within the
//! tolerance of now, so a captured request cannot be replayed later. Senders that deliver through Svix use
//! the same scheme under the names `svix-id`, `svix-timestamp` and `svix-signature`: accepted too (one family
//! per request: the `webhook-*` headers when `webhook-signature` is present, else the `svix-*` ones).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{Locator, VerifyError, text_header};
use crate::config::SecretString;

/// Settings of a `standard-webhooks` source.
#[derive(Debug, Clone)]
pub struct StandardScheme {
    /// Keys as configured (`whsec_<base64>`, or bare base64); checked at config load.
    pub secrets: Vec<SecretString>,
    /// Largest accepted distance between `webhook-timestamp` and now.
    pub tolerance: Duration,
    /// Where the event type is (default: the body's `/type`).
    pub event: Locator,
}

/// The key bytes of a `whsec_` secret, or `None` if it is not valid base64.
pub fn key_bytes(secret: &str) -> Option<Vec<u8>> {
    STANDARD.decode(secret.strip_prefix("whsec_").unwrap_or(secret)).ok().filter(|k| !k.is_empty())
}

fn sign(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> Option<Vec<u8>> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).ok()?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(mac.finalize().into_bytes().to_vec())
}

/// The request's `id`, `timestamp` or `signature` header, in the family it signs with (see the module doc).
pub fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    let family = if headers.contains_key("webhook-signature") || !headers.contains_key("svix-signature") {
        "webhook"
    } else {
        "svix"
    };
    text_header(headers, &format!("{family}-{name}"))
}

impl StandardScheme {
    /// The id, timestamp and signatures a request presents, the timestamp within the tolerance. This much
    /// is checked before the body is read.
    pub(super) fn presented<'h>(
        &self,
        headers: &'h HeaderMap,
        at: SystemTime,
    ) -> Result<(&'h str, &'h str, Vec<Vec<u8>>), VerifyError> {
        let id = header(headers, "id").ok_or(VerifyError::MissingSignature)?;
        let timestamp = header(headers, "timestamp").ok_or(VerifyError::MissingSignature)?;
        let signatures = header(headers, "signature").ok_or(VerifyError::MissingSignature)?;
        let ts: u64 = timestamp.parse().map_err(|_| VerifyError::MalformedSignature)?;
        let now = at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if now.abs_diff(ts) > self.tolerance.as_secs() {
            return Err(VerifyError::Expired);
        }
        let presented: Vec<Vec<u8>> = signatures
            .split_whitespace()
            .filter_map(|s| s.strip_prefix("v1,"))
            .filter_map(|b64| STANDARD.decode(b64).ok())
            .collect();
        if presented.is_empty() {
            return Err(VerifyError::MalformedSignature);
        }
        Ok((id, timestamp, presented))
    }

    pub(super) fn verify(&self, headers: &HeaderMap, body: &[u8], at: SystemTime) -> Result<usize, VerifyError> {
        let (id, timestamp, presented) = self.presented(headers, at)?;
        let mut matched = None;
        for (i, secret) in self.secrets.iter().enumerate() {
            if !secret.usable_at(at) {
                continue;
            }
            let Some(key) = key_bytes(secret.expose()) else { continue };
            let Ok(mac) = Hmac::<Sha256>::new_from_slice(&key) else { continue };
            let mac = mac.chain_update(id.as_bytes()).chain_update(b".").chain_update(timestamp.as_bytes());
            let mac = mac.chain_update(b".").chain_update(body);
            for p in &presented {
                // `verify_slice` compares in constant time; every secret and signature is tried.
                if mac.clone().verify_slice(p).is_ok() {
                    matched = matched.or(Some(i));
                }
            }
        }
        matched.ok_or(VerifyError::BadSignature)
    }

    /// The headers a sender adds for `body` (used by `hookbridge send`): id, timestamp, signature.
    pub fn sign_headers(&self, secret: &SecretString, id: &str, now: SystemTime, body: &[u8]) -> Vec<(String, String)> {
        let ts = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0).to_string();
        let sig = key_bytes(secret.expose()).and_then(|k| sign(&k, id, &ts, body)).unwrap_or_default();
        vec![
            ("webhook-id".into(), id.to_owned()),
            ("webhook-timestamp".into(), ts),
            ("webhook-signature".into(), format!("v1,{}", STANDARD.encode(sig))),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example from the Standard Webhooks specification's reference tests.
    #[test]
    fn verifies_the_reference_example_and_rejects_tampering() {
        let scheme = StandardScheme {
            secrets: vec![SecretString::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")],
            tolerance: Duration::from_secs(300),
            event: Locator::Pointer("/type".into()),
        };
        let body = br#"{"test": 2432232314}"#;
        let mut h = HeaderMap::new();
        h.insert("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek".parse().unwrap());
        h.insert("webhook-timestamp", "1614265330".parse().unwrap());
        h.insert("webhook-signature", "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".parse().unwrap());
        let at = UNIX_EPOCH + Duration::from_secs(1614265330 + 10);
        assert_eq!(scheme.verify(&h, body, at), Ok(0));
        assert_eq!(scheme.verify(&h, b"{\"test\": 1}", at), Err(VerifyError::BadSignature));
        assert_eq!(scheme.verify(&h, body, at + Duration::from_secs(600)), Err(VerifyError::Expired));
        // A second signature (rotation): the valid one among them is enough.
        h.insert(
            "webhook-signature",
            "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
                .parse()
                .unwrap(),
        );
        assert_eq!(scheme.verify(&h, body, at), Ok(0));
        h.insert("webhook-signature", "v2,abc".parse().unwrap());
        assert_eq!(scheme.verify(&h, body, at), Err(VerifyError::MalformedSignature));
        h.remove("webhook-id");
        assert_eq!(scheme.verify(&h, body, at), Err(VerifyError::MissingSignature));
        // What `send` produces verifies.
        let signed = scheme.sign_headers(&scheme.secrets[0], "msg_1", at, body);
        let mut h = HeaderMap::new();
        for (k, v) in signed {
            h.insert(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        assert_eq!(scheme.verify(&h, body, at), Ok(0));
    }

    /// Svix's header names carry the same scheme; a request uses one family, not a mix.
    #[test]
    fn svix_header_names_are_the_same_scheme() {
        let scheme = StandardScheme {
            secrets: vec![SecretString::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")],
            tolerance: Duration::from_secs(300),
            event: Locator::Pointer("/type".into()),
        };
        let at = UNIX_EPOCH + Duration::from_secs(1614265330);
        let body = br#"{"test": 2432232314}"#;
        let mut h = HeaderMap::new();
        h.insert("svix-id", "msg_p5jXN8AQM9LWM0D4loKWxJek".parse().unwrap());
        h.insert("svix-timestamp", "1614265330".parse().unwrap());
        h.insert("svix-signature", "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".parse().unwrap());
        assert_eq!(scheme.verify(&h, body, at), Ok(0));
        assert_eq!(header(&h, "id"), Some("msg_p5jXN8AQM9LWM0D4loKWxJek"));
        // A `webhook-signature` makes the request a `webhook-*` one: its other headers must be there too.
        h.insert("webhook-signature", "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".parse().unwrap());
        assert_eq!(scheme.verify(&h, body, at), Err(VerifyError::MissingSignature));
        h.remove("webhook-signature");
        h.insert("svix-signature", "v1,AAAA".parse().unwrap());
        assert_eq!(scheme.verify(&h, body, at), Err(VerifyError::BadSignature));
    }
}
