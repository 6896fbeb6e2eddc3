//! `clockify`: the `clockify-signature` header is a static token equal to the webhook's signing secret.

use axum::http::HeaderMap;

use std::time::SystemTime;

use super::{VerifyError, matching_secret};
use crate::config::SecretString;

pub(super) fn verify(secrets: &[SecretString], headers: &HeaderMap, now: SystemTime) -> Result<usize, VerifyError> {
    let presented = headers.get("clockify-signature").ok_or(VerifyError::MissingSignature)?;
    if presented.is_empty() {
        return Err(VerifyError::MissingSignature);
    }
    matching_secret(presented.as_bytes(), secrets, now).ok_or(VerifyError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_secret_and_rejects_others() {
        let secrets = vec![SecretString::new("YC6Je9nBl50faeycgNIAqlztlAwpGAAi")];
        let mut h = HeaderMap::new();
        let now = SystemTime::now();
        assert_eq!(verify(&secrets, &h, now), Err(VerifyError::MissingSignature));
        h.insert("clockify-signature", "YC6Je9nBl50faeycgNIAqlztlAwpGAAi".parse().unwrap());
        assert_eq!(verify(&secrets, &h, now), Ok(0));
        h.insert("clockify-signature", "YC6Je9nBl50faeycgNIAqlztlAwpGAAj".parse().unwrap());
        assert_eq!(verify(&secrets, &h, now), Err(VerifyError::BadSignature));
        // A secret past its not_after is refused.
        let retired = vec![
            SecretString::new("YC6Je9nBl50faeycgNIAqlztlAwpGAAj")
                .with_window(None, Some(now - std::time::Duration::from_secs(1))),
        ];
        assert_eq!(verify(&retired, &h, now), Err(VerifyError::BadSignature));
    }
}
