//! `hmac`: a configurable header holds HMAC-SHA256/512 of the raw body, hex or base64, after an optional
//! prefix. Covers GitHub-style `X-Hub-Signature-256: sha256=<hex>` and the community Clockify boilerplate's
//! `clockify-webhook-signature: sha256=<hex>`.

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
        HmacScheme { header, prefix, encoding, algorithm, secrets, event, id }
    }

    /// Whether a signature can start with `prefix` as the daemon reads header values: visible ASCII, spaces
    /// and tabs (what [`axum::http::HeaderValue::to_str`] accepts), and no space or tab first (HTTP trims
    /// those). No signature ever matches another prefix, so the config refuses it.
    pub fn valid_prefix(prefix: &str) -> bool {
        !prefix.starts_with([' ', '\t']) && prefix.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
    }

    pub(super) fn verify(&self, headers: &HeaderMap, body: &[u8], now: SystemTime) -> Result<usize, VerifyError> {
        let presented = self.presented(headers)?;
        let mut matched = None;
        for (i, secret) in self.secrets.iter().enumerate() {
            // `verify_slice` compares in constant time; every usable secret is tried.
            if secret.usable_at(now) && self.mac_matches(secret.expose().as_bytes(), body, &presented) {
                matched = matched.or(Some(i));
            }
        }
        matched.ok_or(VerifyError::BadSignature)
    }

    /// The signature bytes the request presents: present, with the prefix, decodable, of the hash's length.
    /// This much is checked before the body is read.
    pub(super) fn presented(&self, headers: &HeaderMap) -> Result<Vec<u8>, VerifyError> {
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

    fn mac_matches(&self, key: &[u8], body: &[u8], presented: &[u8]) -> bool {
        match self.algorithm {
            HmacAlgorithm::Sha256 => Hmac::<Sha256>::new_from_slice(key)
                .map(|m| m.chain_update(body).verify_slice(presented).is_ok())
                .unwrap_or(false),
            HmacAlgorithm::Sha512 => Hmac::<Sha512>::new_from_slice(key)
                .map(|m| m.chain_update(body).verify_slice(presented).is_ok())
                .unwrap_or(false),
        }
    }

    /// The header value a provider would send for `body`, signed with `secret` (used by `hookbridge send`).
    pub fn sign(&self, secret: &SecretString, body: &[u8]) -> String {
        let mac = match self.algorithm {
            HmacAlgorithm::Sha256 => Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
                .map(|m| m.chain_update(body).finalize().into_bytes().to_vec()),
            HmacAlgorithm::Sha512 => Hmac::<Sha512>::new_from_slice(secret.expose().as_bytes())
                .map(|m| m.chain_update(body).finalize().into_bytes().to_vec()),
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
