//! `hmac`: a configurable header holds HMAC-SHA256/512 of the raw body, hex or base64, after an optional
//! prefix. Covers GitHub-style `X-Hub-Signature-256: sha256=<hex>` and the community Clockify boilerplate's
//! `clockify-webhook-signature: sha256=<hex>`. Optionally the signature also covers a timestamp header
//! (Unix seconds), signed as `<before>{timestamp}<after>{body}` (Stripe-like `{timestamp}.{body}` by
//! default, Slack's `v0:{timestamp}:{body}`), which must be within a tolerance of now: a captured request
//! then replays only within that tolerance.

use std::time::SystemTime;

use axum::http::HeaderMap;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Sha256, Sha512};

use super::{HmacAlgorithm, Locator, SignatureEncoding, VerifyError};
use crate::config::SecretString;

/// Settings of an `hmac` source.
#[derive(Debug, Clone)]
pub struct HmacScheme {
    /// Signature header, lower case.
    pub header: String,
    /// Text before the signature, e.g. `sha256=`.
    pub prefix: String,
    /// Signature text encoding.
    pub encoding: SignatureEncoding,
    /// Hash function.
    pub algorithm: HmacAlgorithm,
    /// Keys.
    pub secrets: Vec<SecretString>,
    /// Where the event type is.
    pub event: Locator,
    /// Where a unique delivery id is, if anywhere.
    pub id: Option<Locator>,
    /// A signed timestamp, if the provider sends one.
    pub timestamp: Option<SignedTimestamp>,
}

/// A timestamp header that the signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedTimestamp {
    /// Header name, lower case.
    pub header: String,
    /// Largest accepted distance from now.
    pub tolerance: std::time::Duration,
    /// What is signed before the body: the text before and after `{timestamp}`.
    pub before: String,
    /// See `before`.
    pub after: String,
}

impl SignedTimestamp {
    /// From a `signed_payload` template: `{timestamp}` once, then `{body}` at the very end, nothing else
    /// in braces. `Err` says what is wrong.
    pub fn new(header: &str, tolerance: std::time::Duration, template: &str) -> Result<SignedTimestamp, String> {
        let head = template.strip_suffix("{body}").ok_or("must end with {body}")?;
        let (before, after) = head.split_once("{timestamp}").ok_or("must contain {timestamp} before {body}")?;
        if [before, after].iter().any(|p| p.contains(['{', '}'])) {
            return Err("only {timestamp} and {body} may appear in braces, each once".into());
        }
        Ok(SignedTimestamp {
            header: header.to_ascii_lowercase(),
            tolerance,
            before: before.to_owned(),
            after: after.to_owned(),
        })
    }

    /// The request's timestamp text, present, Unix seconds, within the tolerance of `now`.
    fn check<'a>(&self, headers: &'a HeaderMap, now: SystemTime) -> Result<&'a str, VerifyError> {
        let text = super::text_header(headers, &self.header).ok_or(VerifyError::MissingSignature)?;
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(VerifyError::MalformedSignature);
        }
        let ts: u64 = text.parse().map_err(|_| VerifyError::MalformedSignature)?;
        let now = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if now.abs_diff(ts) > self.tolerance.as_secs() {
            return Err(VerifyError::Expired);
        }
        Ok(text)
    }
}

impl HmacScheme {
    /// Builds the scheme; `header` is lower-cased.
    pub fn new(
        header: &str,
        prefix: String,
        encoding: SignatureEncoding,
        algorithm: HmacAlgorithm,
        secrets: Vec<SecretString>,
        event: Locator,
        id: Option<Locator>,
    ) -> Self {
        let header = header.to_ascii_lowercase();
        HmacScheme { header, prefix, encoding, algorithm, secrets, event, id, timestamp: None }
    }

    /// The same, with a signed timestamp.
    pub fn with_timestamp(self, timestamp: Option<SignedTimestamp>) -> Self {
        HmacScheme { timestamp, ..self }
    }

    /// What the signature covers before the body, for the timestamp `ts` (empty without one).
    fn signed_prefix(&self, ts: Option<&str>) -> Vec<u8> {
        match (&self.timestamp, ts) {
            (Some(t), Some(ts)) => [t.before.as_bytes(), ts.as_bytes(), t.after.as_bytes()].concat(),
            _ => Vec::new(),
        }
    }

    /// Whether a signature can start with `prefix` as the daemon reads header values: visible ASCII, spaces
    /// and tabs (what [`axum::http::HeaderValue::to_str`] accepts), and no space or tab first (HTTP trims
    /// those). No signature ever matches another prefix, so the config refuses it.
    pub fn valid_prefix(prefix: &str) -> bool {
        !prefix.starts_with([' ', '\t']) && prefix.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
    }

    pub(super) fn verify(&self, headers: &HeaderMap, body: &[u8], now: SystemTime) -> Result<usize, VerifyError> {
        let presented = self.presented(headers)?;
        let ts = self.timestamp.as_ref().map(|t| t.check(headers, now)).transpose()?;
        let signed = self.signed_prefix(ts);
        let mut matched = None;
        for (i, secret) in self.secrets.iter().enumerate() {
            // `verify_slice` compares in constant time; every usable secret is tried.
            if secret.usable_at(now) && self.mac_matches(secret.expose().as_bytes(), &signed, body, &presented) {
                matched = matched.or(Some(i));
            }
        }
        matched.ok_or(VerifyError::BadSignature)
    }

    /// Checks what can be checked before the body is read: the signature is present, with the prefix,
    /// decodable, of the hash's length; the timestamp (if any) is present and within the tolerance.
    pub(super) fn check_headers(&self, headers: &HeaderMap) -> Result<(), VerifyError> {
        self.presented(headers)?;
        if let Some(t) = &self.timestamp {
            t.check(headers, SystemTime::now())?;
        }
        Ok(())
    }

    /// The signature bytes the request presents: present, with the prefix, decodable, of the hash's length.
    fn presented(&self, headers: &HeaderMap) -> Result<Vec<u8>, VerifyError> {
        let value = headers.get(self.header.as_str()).ok_or(VerifyError::MissingSignature)?;
        let value = value.to_str().map_err(|_| VerifyError::MalformedSignature)?.trim();
        if value.is_empty() {
            return Err(VerifyError::MissingSignature);
        }
        let encoded = value.strip_prefix(self.prefix.as_str()).ok_or(VerifyError::MalformedSignature)?;
        let presented = match self.encoding {
            SignatureEncoding::Hex => hex::decode(encoded),
            SignatureEncoding::Base64 => base64_decode(encoded).ok_or(hex::FromHexError::InvalidStringLength),
        }
        .map_err(|_| VerifyError::MalformedSignature)?;
        let expected_len = match self.algorithm {
            HmacAlgorithm::Sha256 => 32,
            HmacAlgorithm::Sha512 => 64,
        };
        if presented.len() != expected_len {
            return Err(VerifyError::MalformedSignature);
        }
        Ok(presented)
    }

    fn mac_matches(&self, key: &[u8], signed: &[u8], body: &[u8], presented: &[u8]) -> bool {
        match self.algorithm {
            HmacAlgorithm::Sha256 => Hmac::<Sha256>::new_from_slice(key)
                .map(|m| m.chain_update(signed).chain_update(body).verify_slice(presented).is_ok())
                .unwrap_or(false),
            HmacAlgorithm::Sha512 => Hmac::<Sha512>::new_from_slice(key)
                .map(|m| m.chain_update(signed).chain_update(body).verify_slice(presented).is_ok())
                .unwrap_or(false),
        }
    }

    /// The header value a provider would send for `body`, signed with `secret` (used by `hookbridge send`).
    /// With a signed timestamp, use [`HmacScheme::sign_at`].
    pub fn sign(&self, secret: &SecretString, body: &[u8]) -> String {
        self.sign_at(secret, None, body)
    }

    /// The signature header value for `body` with timestamp text `ts` (when the scheme signs one).
    pub fn sign_at(&self, secret: &SecretString, ts: Option<&str>, body: &[u8]) -> String {
        let signed = self.signed_prefix(ts);
        let mac = match self.algorithm {
            HmacAlgorithm::Sha256 => Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
                .map(|m| m.chain_update(&signed).chain_update(body).finalize().into_bytes().to_vec()),
            HmacAlgorithm::Sha512 => Hmac::<Sha512>::new_from_slice(secret.expose().as_bytes())
                .map(|m| m.chain_update(&signed).chain_update(body).finalize().into_bytes().to_vec()),
        }
        .unwrap_or_default();
        let encoded = match self.encoding {
            SignatureEncoding::Hex => hex::encode(mac),
            SignatureEncoding::Base64 => base64::engine::general_purpose::STANDARD.encode(mac),
        };
        format!("{}{}", self.prefix, encoded)
    }
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
    STANDARD.decode(s).or_else(|_| STANDARD_NO_PAD.decode(s)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheme(encoding: SignatureEncoding, algorithm: HmacAlgorithm, prefix: &str) -> HmacScheme {
        HmacScheme::new(
            "X-Hub-Signature-256",
            prefix.into(),
            encoding,
            algorithm,
            vec![SecretString::new("old"), SecretString::new("new")],
            Locator::Header("x-github-event".into()),
            None,
        )
    }

    #[test]
    fn github_style_signature() {
        let s = scheme(SignatureEncoding::Hex, HmacAlgorithm::Sha256, "sha256=");
        let body = br#"{"zen":"Keep it logically awesome."}"#;
        let mut h = HeaderMap::new();
        assert_eq!(s.verify(&h, body, SystemTime::now()), Err(VerifyError::MissingSignature));
        h.insert("x-hub-signature-256", s.sign(&SecretString::new("new"), body).parse().unwrap());
        assert_eq!(s.verify(&h, body, SystemTime::now()), Ok(1));
        assert_eq!(s.verify(&h, b"tampered", SystemTime::now()), Err(VerifyError::BadSignature));
        h.insert("x-hub-signature-256", "sha1=abc".parse().unwrap());
        assert_eq!(s.verify(&h, body, SystemTime::now()), Err(VerifyError::MalformedSignature));
        h.insert("x-hub-signature-256", "sha256=zz".parse().unwrap());
        assert_eq!(s.verify(&h, body, SystemTime::now()), Err(VerifyError::MalformedSignature));
    }

    #[test]
    fn known_vector_sha256_hex() {
        // RFC 4231 test case 2.
        let s = HmacScheme::new(
            "sig",
            String::new(),
            SignatureEncoding::Hex,
            HmacAlgorithm::Sha256,
            vec![SecretString::new("Jefe")],
            Locator::Pointer("/event".into()),
            None,
        );
        assert_eq!(
            s.sign(&SecretString::new("Jefe"), b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// Fuzzing (verify_hmac target, minimised input `ff ff ff ff ff ff`): with a prefix that is not header
    /// text (here U+FFFD), or that starts with a space, a correctly signed request could never verify.
    #[test]
    fn prefixes_a_header_cannot_carry_are_invalid() {
        for bad in ["\u{fffd}", " sha256=", "\tv1=", "sha256=\u{7f}"] {
            assert!(!HmacScheme::valid_prefix(bad), "{bad:?}");
            let s = scheme(SignatureEncoding::Base64, HmacAlgorithm::Sha512, bad);
            let mut h = HeaderMap::new();
            let signed = s.sign(&SecretString::new("old"), b"");
            if let Ok(v) = axum::http::HeaderValue::from_str(&signed) {
                h.insert("x-hub-signature-256", v);
            }
            assert!(s.verify(&h, b"", SystemTime::now()).is_err(), "{bad:?}");
        }
        for good in ["", "sha256=", "v1, ", "a\tb="] {
            assert!(HmacScheme::valid_prefix(good), "{good:?}");
        }
    }

    #[test]
    fn a_signed_timestamp_binds_the_signature_and_bounds_replays() {
        let five_minutes = std::time::Duration::from_secs(300);
        let ts = SignedTimestamp::new("X-Slack-Request-Timestamp", five_minutes, "v0:{timestamp}:{body}").unwrap();
        let s = scheme(SignatureEncoding::Hex, HmacAlgorithm::Sha256, "v0=").with_timestamp(Some(ts));
        let body = b"{}";
        let now = SystemTime::now();
        let secs = now.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let mut h = HeaderMap::new();
        h.insert(
            "x-hub-signature-256",
            s.sign_at(&SecretString::new("new"), Some(&secs.to_string()), body).parse().unwrap(),
        );
        assert_eq!(s.verify(&h, body, now), Err(VerifyError::MissingSignature), "no timestamp header");
        h.insert("x-slack-request-timestamp", secs.to_string().parse().unwrap());
        assert_eq!(s.verify(&h, body, now), Ok(1));
        // The signature covers the timestamp: a fresh timestamp on an old signature does not verify.
        h.insert("x-slack-request-timestamp", (secs + 1).to_string().parse().unwrap());
        assert_eq!(s.verify(&h, body, now), Err(VerifyError::BadSignature));
        // Ten minutes later, the captured request is refused.
        h.insert("x-slack-request-timestamp", secs.to_string().parse().unwrap());
        assert_eq!(s.verify(&h, body, now + 2 * five_minutes), Err(VerifyError::Expired));
        for bad in ["", "-1", "1e9", " 12", "99999999999999999999999"] {
            if let Ok(v) = bad.parse() {
                h.insert("x-slack-request-timestamp", v);
                assert!(s.verify(&h, body, now).is_err(), "{bad:?}");
            }
        }
        // Templates.
        let t = SignedTimestamp::new("t", five_minutes, "{timestamp}.{body}").unwrap();
        assert_eq!((t.before.as_str(), t.after.as_str()), ("", "."));
        for bad in ["{body}", "{timestamp}", "{body}{timestamp}", "{timestamp}{x}{body}", "{timestamp}.{body}."] {
            assert!(SignedTimestamp::new("t", five_minutes, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn base64_sha512() {
        let s = scheme(SignatureEncoding::Base64, HmacAlgorithm::Sha512, "");
        let body = b"{}";
        let mut h = HeaderMap::new();
        h.insert("x-hub-signature-256", s.sign(&SecretString::new("old"), body).parse().unwrap());
        assert_eq!(s.verify(&h, body, SystemTime::now()), Ok(0));
        h.insert("x-hub-signature-256", s.sign(&SecretString::new("other"), body).parse().unwrap());
        assert_eq!(s.verify(&h, body, SystemTime::now()), Err(VerifyError::BadSignature));
    }
}
