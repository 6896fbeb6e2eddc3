//! Verification: does this request come from the provider? A pure function of the source's scheme, the
//! headers and the **raw body bytes**, run before anything parses the body (Clockodo is the one exception:
//! its token travels inside the JSON envelope, so `clockodo` reads that one field). Constant-time throughout.

mod clockify;
mod clockodo;
mod hmac;
mod standard;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::SecretString;
pub use crate::config::types::{HmacAlgorithm, SignatureEncoding};
pub use hmac::HmacScheme;
pub use standard::{StandardScheme, key_bytes as standard_key_bytes};

/// Where a generic source finds a value (event type or delivery id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locator {
    /// A request header (lower-case name).
    Header(String),
    /// A JSON pointer into the body (RFC 6901).
    Pointer(String),
}

/// A source's verification scheme and its settings, secrets resolved.
#[derive(Debug, Clone)]
pub enum Scheme {
    /// Clockify workspace webhooks: `clockify-signature` equals one of the secrets.
    Clockify {
        /// Accepted signing secrets.
        secrets: Vec<SecretString>,
    },
    /// Clockodo: the body's `token` equals one of the secrets.
    Clockodo {
        /// Accepted tokens.
        secrets: Vec<SecretString>,
    },
    /// Generic HMAC over the raw body.
    Hmac(HmacScheme),
    /// Standard Webhooks.
    Standard(StandardScheme),
    /// No verification (explicitly configured).
    None {
        /// Where the event type is.
        event: Locator,
        /// Where a unique delivery id is, if anywhere.
        id: Option<Locator>,
    },
}

impl Scheme {
    /// The scheme's name as written in `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Scheme::Clockify { .. } => "clockify",
            Scheme::Clockodo { .. } => "clockodo",
            Scheme::Hmac(_) => "hmac",
            Scheme::Standard(_) => "standard-webhooks",
            Scheme::None { .. } => "none",
        }
    }

    /// True for a header (lower-case name) that carries a credential under this scheme, or under any
    /// scheme in general (`authorization`, `cookie`): such headers are never stored nor shown to predicates.
    pub fn is_secret_header(&self, name: &str) -> bool {
        if matches!(name, "authorization" | "proxy-authorization" | "cookie" | "clockify-signature") {
            return true;
        }
        match self {
            Scheme::Hmac(h) => name == h.header,
            Scheme::Standard(_) => name == "webhook-signature",
            Scheme::Clockify { .. } | Scheme::Clockodo { .. } | Scheme::None { .. } => false,
        }
    }
}

/// Why a request failed verification (a metric label; never sent to the client in detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The signature header (or Clockodo token) is absent.
    #[error("missing signature")]
    MissingSignature,
    /// The signature is present but is not well-formed (bad prefix, bad encoding).
    #[error("malformed signature")]
    MalformedSignature,
    /// The signature matches none of the secrets.
    #[error("signature mismatch")]
    BadSignature,
    /// The signed timestamp is outside the tolerance window (a replay, or a clock far off).
    #[error("timestamp outside the tolerance")]
    Expired,
}

impl VerifyError {
    /// Metric label value.
    pub fn reason(self) -> &'static str {
        match self {
            VerifyError::MissingSignature => "missing_signature",
            VerifyError::MalformedSignature => "malformed_signature",
            VerifyError::BadSignature => "bad_signature",
            VerifyError::Expired => "timestamp_out_of_tolerance",
        }
    }
}

/// Verifies one request. `Ok(())` means: authentic by the source's scheme.
pub fn verify(scheme: &Scheme, headers: &HeaderMap, body: &[u8]) -> Result<(), VerifyError> {
    match scheme {
        Scheme::Clockify { secrets } => clockify::verify(secrets, headers),
        Scheme::Clockodo { secrets } => clockodo::verify(secrets, body),
        Scheme::Hmac(h) => h.verify(headers, body),
        Scheme::Standard(s) => s.verify(headers, body, std::time::SystemTime::now()),
        Scheme::None { .. } => Ok(()),
    }
}

/// True when `presented` equals one of `secrets`, in time independent of where they differ and of which
/// secret matched: both sides are hashed to a fixed length first, and every secret is compared.
pub fn matches_any(presented: &[u8], secrets: &[SecretString]) -> bool {
    let presented = Sha256::digest(presented);
    let mut found = subtle::Choice::from(0u8);
    for secret in secrets {
        let expected = Sha256::digest(secret.expose().as_bytes());
        found |= presented.ct_eq(&expected);
    }
    found.into()
}

pub use clockodo::{ClockodoEnvelope, handshake_secret};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_any_checks_every_secret() {
        let secrets = vec![SecretString::new("old"), SecretString::new("new")];
        assert!(matches_any(b"old", &secrets));
        assert!(matches_any(b"new", &secrets));
        assert!(!matches_any(b"ne", &secrets));
        assert!(!matches_any(b"", &secrets));
    }
}
