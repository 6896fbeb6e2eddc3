//! Verification: does this request come from the provider? A pure function of the source's scheme, the
//! headers and the **raw body bytes**, run before anything parses the body (Clockodo is the one exception:
//! its token travels inside the JSON envelope, so `clockodo` reads that one field). Constant-time throughout.

mod addon;
mod clockify;
mod clockodo;
mod hmac;
pub(crate) mod standard;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::SecretString;
pub use crate::config::types::{HmacAlgorithm, SignatureEncoding};
pub use addon::{AddonClaims, AddonScheme, CLOCKIFY_PUBLIC_KEY};
pub use hmac::{HmacScheme, SignedTimestamp};
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
    /// Clockify Marketplace add-on (RS256 JWTs, installations); handled by [`crate::addon`].
    ClockifyAddon(AddonScheme),
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
            Scheme::ClockifyAddon(_) => "clockify-addon",
            Scheme::None { .. } => "none",
        }
    }

    /// True for a header (lower-case name) that carries a credential under this scheme, or under any
    /// scheme in general (`authorization`, `cookie`): such headers are never stored nor shown to predicates.
    pub fn is_secret_header(&self, name: &str) -> bool {
        if matches!(
            name,
            "authorization" | "proxy-authorization" | "cookie" | "clockify-signature" | "x-addon-lifecycle-token"
        ) {
            return true;
        }
        match self {
            Scheme::Hmac(h) => name == h.header,
            Scheme::Standard(_) => name == "webhook-signature",
            Scheme::Clockify { .. } | Scheme::Clockodo { .. } | Scheme::None { .. } | Scheme::ClockifyAddon(_) => false,
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

/// Verifies one request. `Ok(Some(i))` means: authentic by the source's scheme, with its `i`-th secret
/// (counted in metrics, so an operator sees when an old secret stops being used); `Ok(None)`: `none`.
/// Secrets outside their `not_before` / `not_after` window are not tried.
pub fn verify(scheme: &Scheme, headers: &HeaderMap, body: &[u8]) -> Result<Option<usize>, VerifyError> {
    let now = std::time::SystemTime::now();
    match scheme {
        Scheme::Clockify { secrets } => clockify::verify(secrets, headers, now).map(Some),
        Scheme::Clockodo { secrets } => clockodo::verify(secrets, body, now).map(Some),
        Scheme::Hmac(h) => h.verify(headers, body, now).map(Some),
        Scheme::Standard(s) => s.verify(headers, body, now).map(Some),
        Scheme::None { .. } => Ok(None),
        // Add-on requests are verified with their installation by `crate::addon::check`, never here.
        Scheme::ClockifyAddon(_) => Err(VerifyError::MissingSignature),
    }
}

/// What a request's headers alone prove, before its body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Early {
    /// Verified: the credential is in a header (Clockify's `clockify-signature`), or the source verifies
    /// nothing (`none`). Carries what [`verify`] would return.
    Verified(Option<usize>),
    /// The headers are well-formed (signature present and decodable, timestamp within the tolerance), but the
    /// signature covers the body (hmac, Standard Webhooks) or the token is inside it (Clockodo): [`verify`]
    /// decides once the body is in.
    NeedsBody,
}

/// Checks what the headers alone can prove. An `Err` is final: the request fails verification whatever
/// its body. Add-on sources are checked by `crate::addon::check_headers` instead.
pub fn verify_headers(scheme: &Scheme, headers: &HeaderMap) -> Result<Early, VerifyError> {
    let now = std::time::SystemTime::now();
    match scheme {
        Scheme::Clockify { secrets } => clockify::verify(secrets, headers, now).map(|i| Early::Verified(Some(i))),
        Scheme::None { .. } => Ok(Early::Verified(None)),
        Scheme::Hmac(h) => h.check_headers(headers).map(|_| Early::NeedsBody),
        Scheme::Standard(s) => s.presented(headers, now).map(|_| Early::NeedsBody),
        Scheme::Clockodo { .. } => Ok(Early::NeedsBody),
        Scheme::ClockifyAddon(_) => Err(VerifyError::MissingSignature),
    }
}

/// A header's value as text, trimmed; `None` when absent, empty or not text.
pub fn text_header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}

/// Which of `secrets` (usable at `now`) `presented` equals, if any. Every usable secret is compared, each
/// comparison in constant time over fixed-length hashes, so timing says nothing about the secrets.
pub fn matching_secret(presented: &[u8], secrets: &[SecretString], now: std::time::SystemTime) -> Option<usize> {
    let presented = Sha256::digest(presented);
    let mut found = None;
    for (i, secret) in secrets.iter().enumerate() {
        let expected = Sha256::digest(secret.expose().as_bytes());
        let equal: bool = presented.ct_eq(&expected).into();
        if equal && secret.usable_at(now) && found.is_none() {
            found = Some(i);
        }
    }
    found
}

/// True when `presented` equals one of `secrets` (see [`matching_secret`]).
pub fn matches_any(presented: &[u8], secrets: &[SecretString]) -> bool {
    matching_secret(presented, secrets, std::time::SystemTime::now()).is_some()
}

pub use clockodo::{ClockodoEnvelope, handshake_secret};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_any_checks_every_secret() {
        let secrets = vec![SecretString::new("old"), SecretString::new("new")];
        let now = std::time::SystemTime::now();
        assert_eq!(matching_secret(b"new", &secrets, now), Some(1));
        let retired = vec![SecretString::new("old").with_window(None, Some(now - std::time::Duration::from_secs(60)))];
        assert_eq!(matching_secret(b"old", &retired, now), None);
        let future = vec![SecretString::new("old").with_window(Some(now + std::time::Duration::from_secs(60)), None)];
        assert_eq!(matching_secret(b"old", &future, now), None);
        assert!(matches_any(b"old", &secrets));
        assert!(matches_any(b"new", &secrets));
        assert!(!matches_any(b"ne", &secrets));
        assert!(!matches_any(b"", &secrets));
    }
}
