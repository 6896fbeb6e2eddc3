//! `clockify`: the `clockify-signature` header is a static token equal to the webhook's signing secret.

use axum::http::HeaderMap;

use super::{VerifyError, matches_any};
use crate::config::SecretString;

pub(super) fn verify(secrets: &[SecretString], headers: &HeaderMap) -> Result<(), VerifyError> {
    let presented = headers.get("clockify-signature").ok_or(VerifyError::MissingSignature)?;
    if presented.is_empty() {
        return Err(VerifyError::MissingSignature);
    }
    if matches_any(presented.as_bytes(), secrets) { Ok(()) } else { Err(VerifyError::BadSignature) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_secret_and_rejects_others() {
        let secrets = vec![SecretString::new("YC6Je9nBl50faeycgNIAqlztlAwpGAAi")];
        let mut h = HeaderMap::new();
        assert_eq!(verify(&secrets, &h), Err(VerifyError::MissingSignature));
        h.insert("clockify-signature", "YC6Je9nBl50faeycgNIAqlztlAwpGAAi".parse().unwrap());
        assert_eq!(verify(&secrets, &h), Ok(()));
        h.insert("clockify-signature", "YC6Je9nBl50faeycgNIAqlztlAwpGAAj".parse().unwrap());
        assert_eq!(verify(&secrets, &h), Err(VerifyError::BadSignature));
    }
}
