//! `clockify-addon`: Clockify Marketplace add-on requests carry an RS256 JWT signed by Clockify
//! (`clockify-signature` on webhooks, `X-Addon-Lifecycle-Token` on lifecycle calls). Only RS256 with the
//! configured public key is accepted (never `none`, never HS256 with the public key as a secret); `iss` must
//! be `clockify`, `sub` the add-on key, `type` `addon`; `exp` is checked only when present (webhook tokens do
//! not expire).

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::VerifyError;

/// Clockify's published public key for add-on tokens (PROTOCOLS.md, section 2).
pub const CLOCKIFY_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAubktufFNO/op+E5WBWL6
/Y9QRZGSGGCsV00FmPRl5A0mSfQu3yq2Yaq47IlN0zgFy9IUG8/JJfwiehsmbrKa
49t/xSkpG1u9w1GUyY0g4eKDUwofHKAt3IPw0St4qsWLK9mO+koUo56CGQOEpTui
5bMfmefVBBfShXTaZOtXPB349FdzSuYlU/5o3L12zVWMutNhiJCKyGfsuu2uXa9+
6uQnZBw1wO3/QEci7i4TbC+ZXqW1rCcbogSMORqHAP6qSAcTFRmrjFAEsOWiUUhZ
rLDg2QJ8VTDghFnUhYklNTJlGgfo80qEWe1NLIwvZj0h3bWRfrqZHsD/Yjh0duk6
yQIDAQAB
-----END PUBLIC KEY-----
";

/// Settings of a `clockify-addon` source.
#[derive(Clone)]
pub struct AddonScheme {
    /// The add-on key (manifest `key`, JWT `sub`).
    pub key: String,
    /// Manifest `name`.
    pub name: String,
    /// Public URL of the source's path (manifest `baseUrl`).
    pub base_url: String,
    /// Manifest `scopes`.
    pub scopes: Vec<String>,
    decoding: Arc<DecodingKey>,
}

impl std::fmt::Debug for AddonScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddonScheme").field("key", &self.key).field("base_url", &self.base_url).finish_non_exhaustive()
    }
}

/// The claims hookbridge reads from an add-on token.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct AddonClaims {
    /// Must be `addon`.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The workspace of the installation.
    #[serde(rename = "workspaceId", default)]
    pub workspace_id: Option<String>,
    /// The installation.
    #[serde(rename = "addonId", default)]
    pub addon_id: Option<String>,
}

impl AddonScheme {
    /// Builds the scheme; `public_key_pem` is an RSA public key (SubjectPublicKeyInfo PEM).
    pub fn new(
        key: String,
        name: String,
        base_url: String,
        scopes: Vec<String>,
        public_key_pem: &str,
    ) -> Result<Self, String> {
        let decoding = DecodingKey::from_rsa_pem(public_key_pem.as_bytes())
            .map_err(|e| format!("not an RSA public key in PEM form: {e}"))?;
        Ok(AddonScheme { key, name, base_url, scopes, decoding: Arc::new(decoding) })
    }

    /// Verifies a token and returns its claims.
    pub fn verify_token(&self, token: &str) -> Result<AddonClaims, VerifyError> {
        if token.is_empty() {
            return Err(VerifyError::MissingSignature);
        }
        let mut v = Validation::new(Algorithm::RS256);
        v.algorithms = vec![Algorithm::RS256];
        v.set_required_spec_claims(&["iss", "sub"]);
        v.set_issuer(&["clockify"]);
        v.sub = Some(self.key.clone());
        v.validate_exp = true; // only when the token has one
        v.validate_aud = false;
        v.leeway = 60;
        let data = jsonwebtoken::decode::<AddonClaims>(token, &self.decoding, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => VerifyError::MalformedSignature,
                K::ExpiredSignature => VerifyError::Expired,
                _ => VerifyError::BadSignature,
            }
        })?;
        if data.claims.kind.as_deref() != Some("addon") {
            return Err(VerifyError::BadSignature);
        }
        Ok(data.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_key_is_clockifys() {
        use sha2::{Digest, Sha256};
        let b64: String = CLOCKIFY_PUBLIC_KEY.lines().filter(|l| !l.starts_with("-----")).collect();
        use base64::Engine;
        let der = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(der)),
            "0cebc449014cf940ad0763e204b29b3a2263abfa1ccd298347c9bd2db2708b16"
        );
        assert!(AddonScheme::new("k".into(), "n".into(), "u".into(), vec![], CLOCKIFY_PUBLIC_KEY).is_ok());
    }
}
