//! `clockodo`: the token inside the JSON envelope, and the validation handshake. Input: one fixed-size
//! control block (`arbitrary`), the query string line (empty: no query), header lines, an empty line, the
//! body. With `sign`, a JSON object body gets the right token put in, and must then verify.

#![no_main]

mod common;

use std::time::{Duration, SystemTime};

use arbitrary::{Arbitrary, Unstructured};
use hookbridge::config::SecretString;
use hookbridge::verify::{self, Early, Scheme, VerifyError};
use libfuzzer_sys::fuzz_target;

/// The first is the token of the fixtures in tests/fixtures/clockodo.
const TOKENS: [&str; 2] = ["My_Sup3r_T0k3n", "clockodo-token-second"];
const RETIRED: &str = "clockodo-token-retired";

#[derive(Arbitrary, Debug)]
struct Control {
    /// Put a token into a JSON object body.
    sign: bool,
    /// Which token: 0, 1 usable, else the retired one.
    token: u8,
}

fuzz_target!(|data: &[u8]| {
    const CONTROL: usize = 2;
    if data.len() < CONTROL {
        return;
    }
    let Ok(control) = Control::arbitrary(&mut Unstructured::new(&data[..CONTROL])) else { return };
    let (query, rest) = common::line(&data[CONTROL..]);
    let query = (!query.is_empty()).then(|| common::text(query));
    let (headers, body) = common::message(rest);

    let now = SystemTime::now();
    let mut secrets: Vec<SecretString> = TOKENS.iter().map(|s| SecretString::new(*s)).collect();
    secrets.push(SecretString::new(RETIRED).with_window(None, Some(now - Duration::from_secs(3600))));
    let scheme = Scheme::Clockodo { secrets };

    // The token is in the body: the headers alone never decide.
    assert_eq!(verify::verify_headers(&scheme, &headers), Ok(Early::NeedsBody));

    if let Some(secret) = handshake(query.as_deref(), body) {
        assert!(!secret.is_empty() && secret.len() <= 128, "implausible handshake secret {secret:?}");
        assert!(secret.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{secret:?}");
    }

    let full = verify::verify(&scheme, &headers, body);
    if let Ok(Some(i)) = full {
        assert!(i < TOKENS.len(), "the retired token was accepted");
    }

    if control.sign
        && let Ok(serde_json::Value::Object(mut envelope)) = serde_json::from_slice::<serde_json::Value>(body)
    {
        let i = usize::from(control.token % 3);
        let token = TOKENS.get(i).copied().unwrap_or(RETIRED);
        envelope.insert("token".into(), token.into());
        let signed = serde_json::Value::Object(envelope).to_string();
        let got = verify::verify(&scheme, &headers, signed.as_bytes());
        if i < TOKENS.len() {
            assert_eq!(got, Ok(Some(i)), "a body with the right token must verify");
        } else {
            assert_eq!(got, Err(VerifyError::BadSignature), "the retired token must be refused");
        }
        // A body with a token is never a handshake (unless the query has the secret).
        if query.is_none() {
            assert_eq!(handshake(None, signed.as_bytes()), None);
        }
    }
});

fn handshake(query: Option<&str>, body: &[u8]) -> Option<String> {
    verify::handshake_secret(query, body)
}
