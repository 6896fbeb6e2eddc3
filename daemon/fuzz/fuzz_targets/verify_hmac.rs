//! `hmac`: the configured signature header (HMAC-SHA256/512, hex or base64, after a prefix). Input: one
//! fixed-size control block (`arbitrary`: algorithm, encoding, header, whether to sign and with which
//! secret), the prefix line, header lines, an empty line, the body. With `sign`, the request carries the
//! signature `HmacScheme::sign` makes, and must then verify.

#![no_main]

mod common;

use std::time::{Duration, SystemTime};

use arbitrary::{Arbitrary, Unstructured};
use hookbridge::config::SecretString;
use hookbridge::verify::{self, Early, HmacAlgorithm, HmacScheme, Locator, Scheme, SignatureEncoding, VerifyError};
use libfuzzer_sys::fuzz_target;

const SECRETS: [&str; 2] = ["hmac-secret-0123456789abcdef", "hmac-second-secret"];
const RETIRED: &str = "hmac-retired-secret";
/// Signature header names a config may give (`HmacScheme::new` lower-cases them).
const HEADERS: [&str; 4] = ["X-Hub-Signature-256", "clockify-webhook-signature", "x-signature", "Sig"];

#[derive(Arbitrary, Debug)]
struct Control {
    sha512: bool,
    base64: bool,
    header: u8,
    sign: bool,
    /// Which secret signs: 0, 1 usable, else the retired one.
    secret: u8,
}

fuzz_target!(|data: &[u8]| {
    const CONTROL: usize = 5;
    if data.len() < CONTROL {
        return;
    }
    let Ok(control) = Control::arbitrary(&mut Unstructured::new(&data[..CONTROL])) else { return };
    let (prefix, rest) = common::line(&data[CONTROL..]);
    let (mut headers, body) = common::message(rest);

    let now = SystemTime::now();
    let mut secrets: Vec<SecretString> = SECRETS.iter().map(|s| SecretString::new(*s)).collect();
    secrets.push(SecretString::new(RETIRED).with_window(None, Some(now - Duration::from_secs(3600))));
    let hmac = HmacScheme::new(
        HEADERS[usize::from(control.header) % HEADERS.len()],
        common::text(prefix),
        if control.base64 { SignatureEncoding::Base64 } else { SignatureEncoding::Hex },
        if control.sha512 { HmacAlgorithm::Sha512 } else { HmacAlgorithm::Sha256 },
        secrets.clone(),
        Locator::Header("x-github-event".into()),
        None,
    );
    let header = hmac.header.clone();
    let scheme = Scheme::Hmac(hmac.clone());

    let _ = check(&scheme, &headers, body);

    if control.sign {
        let i = usize::from(control.secret % 3);
        let value = hmac.sign(&secrets[i], body);
        // A prefix that is no header text cannot be sent at all.
        if !common::set(&mut headers, &header, &value) {
            return;
        }
        let got = check(&scheme, &headers, body);
        if !HmacScheme::valid_prefix(&hmac.prefix) {
            // The config refuses such a prefix: no header value can carry it.
            assert!(got.is_err(), "a prefix no header can carry matched: {:?}", hmac.prefix);
        } else if i < SECRETS.len() {
            assert_eq!(got, Ok(Some(i)), "a correctly signed request must verify (prefix {:?})", hmac.prefix);
        } else {
            assert_eq!(got, Err(VerifyError::BadSignature), "a retired secret must be refused");
        }
        if got.is_ok() && !body.is_empty() {
            let mut tampered = body.to_vec();
            tampered[0] ^= 1;
            assert_eq!(verify::verify(&scheme, &headers, &tampered), Err(VerifyError::BadSignature));
        }
    }
});

/// `verify_headers` and `verify` agree: a header-level refusal is final, and what verifies passed the
/// header check.
fn check(scheme: &Scheme, headers: &axum::http::HeaderMap, body: &[u8]) -> Result<Option<usize>, VerifyError> {
    let early = verify::verify_headers(scheme, headers);
    let full = verify::verify(scheme, headers, body);
    match early {
        Ok(Early::NeedsBody) => {}
        Ok(Early::Verified(_)) => panic!("hmac always needs the body"),
        Err(e) => assert_eq!(full, Err(e)),
    }
    if full.is_ok() {
        assert_eq!(early, Ok(Early::NeedsBody));
    }
    full
}
