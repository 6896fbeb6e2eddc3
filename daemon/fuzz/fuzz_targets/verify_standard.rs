//! `standard-webhooks`: `webhook-id`, `webhook-timestamp` and `webhook-signature` (`v1,<base64>` list).
//! Input: one fixed-size control block (`arbitrary`: whether to sign, with which secret, the timestamp's
//! distance from now, extra signatures), header lines, an empty line, the body. With `sign`, the request
//! carries what `StandardScheme::sign_headers` makes (HMAC-SHA256 of `id.timestamp.body`), and must then
//! verify.

#![no_main]

mod common;

use std::time::{Duration, SystemTime};

use arbitrary::{Arbitrary, Unstructured};
use hookbridge::config::SecretString;
use hookbridge::verify::{self, Early, Locator, Scheme, StandardScheme, VerifyError};
use libfuzzer_sys::fuzz_target;

/// The first is the Standard Webhooks reference example's key.
const SECRETS: [&str; 2] = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_c2Vjb25kLXN0YW5kYXJkLWtleS0wMTIzNDU2Nzg="];
const RETIRED: &str = "whsec_cmV0aXJlZC1zdGFuZGFyZC1rZXk=";
const TOLERANCE: u64 = 300;

#[derive(Arbitrary, Debug)]
struct Control {
    sign: bool,
    /// Which secret signs: 0, 1 usable, else the retired one.
    secret: u8,
    /// Seconds from now of the signed timestamp (kept within the tolerance, less a margin).
    offset: i16,
    /// Put a bogus signature before the real one (a key rotation's list).
    extra: bool,
}

fuzz_target!(|data: &[u8]| {
    const CONTROL: usize = 5;
    if data.len() < CONTROL {
        return;
    }
    let Ok(control) = Control::arbitrary(&mut Unstructured::new(&data[..CONTROL])) else { return };
    let (mut headers, body) = common::message(&data[CONTROL..]);

    let now = SystemTime::now();
    let mut secrets: Vec<SecretString> = SECRETS.iter().map(|s| SecretString::new(*s)).collect();
    secrets.push(SecretString::new(RETIRED).with_window(None, Some(now - Duration::from_secs(3600))));
    let standard = StandardScheme {
        secrets: secrets.clone(),
        tolerance: Duration::from_secs(TOLERANCE),
        event: Locator::Pointer("/type".into()),
    };
    let scheme = Scheme::Standard(standard.clone());

    let _ = check(&scheme, &headers, body);

    if control.sign {
        let i = usize::from(control.secret % 3);
        // The id as it arrives: trimmed by the HTTP parser; a default when the input has none.
        let id = headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .unwrap_or("msg_fuzz")
            .to_owned();
        let offset = i64::from(control.offset) % (TOLERANCE as i64 - 10);
        let at = if offset >= 0 {
            now + Duration::from_secs(offset.unsigned_abs())
        } else {
            now - Duration::from_secs(offset.unsigned_abs())
        };
        for (name, mut value) in standard.sign_headers(&secrets[i], &id, at, body) {
            if name == "webhook-signature" && control.extra {
                value = format!("v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= v2,xyz {value}");
            }
            assert!(common::set(&mut headers, &name, &value), "sign_headers made an invalid header {name}");
        }
        let got = check(&scheme, &headers, body);
        if i < SECRETS.len() {
            assert_eq!(got, Ok(Some(i)), "a correctly signed request must verify (id {id:?})");
        } else {
            assert_eq!(got, Err(VerifyError::BadSignature), "a retired secret must be refused");
        }
        let mut tampered = body.to_vec();
        tampered.push(b' ');
        assert_eq!(verify::verify(&scheme, &headers, &tampered), Err(VerifyError::BadSignature));
    }
});

/// `verify_headers` and `verify` agree: a header-level refusal is final (the tolerance aside: a second may
/// pass between the two), and what verifies passed the header check.
fn check(scheme: &Scheme, headers: &axum::http::HeaderMap, body: &[u8]) -> Result<Option<usize>, VerifyError> {
    let early = verify::verify_headers(scheme, headers);
    let full = verify::verify(scheme, headers, body);
    match early {
        Ok(Early::NeedsBody) | Err(VerifyError::Expired) => {}
        Ok(Early::Verified(_)) => panic!("standard webhooks always need the body"),
        Err(e) => assert_eq!(full, Err(e)),
    }
    if full.is_ok() {
        assert!(matches!(early, Ok(Early::NeedsBody) | Err(VerifyError::Expired)));
    }
    full
}
