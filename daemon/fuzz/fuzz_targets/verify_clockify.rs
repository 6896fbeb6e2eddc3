//! `clockify`: the `clockify-signature` header against fixed secrets (one of them retired). Input: header
//! lines, an empty line, the body.

#![no_main]

mod common;

use std::time::{Duration, SystemTime};

use hookbridge::config::SecretString;
use hookbridge::verify::{self, Early, Scheme};
use libfuzzer_sys::fuzz_target;

/// Usable secrets (the first is the one of the captured fixture).
const SECRETS: [&str; 2] = ["YC6Je9nBl50faeycgNIAqlztlAwpGAAi", "second-clockify-secret-0123456789"];
/// Valid until an hour ago: never accepted.
const RETIRED: &str = "retired-clockify-secret-012345678";

fuzz_target!(|data: &[u8]| {
    let (headers, body) = common::message(data);
    let now = SystemTime::now();
    let mut secrets: Vec<SecretString> = SECRETS.iter().map(|s| SecretString::new(*s)).collect();
    secrets.push(SecretString::new(RETIRED).with_window(None, Some(now - Duration::from_secs(3600))));
    let scheme = Scheme::Clockify { secrets };

    let early = verify::verify_headers(&scheme, &headers);
    let full = verify::verify(&scheme, &headers, body);
    // The credential is a header: what the headers prove is the whole answer.
    match early {
        Ok(Early::Verified(v)) => assert_eq!(full, Ok(v)),
        Ok(Early::NeedsBody) => panic!("clockify never needs the body"),
        Err(e) => assert_eq!(full, Err(e)),
    }
    // Accepted exactly when the (first) signature header is one of the usable secrets.
    let presented = headers.get("clockify-signature").map(|v| v.as_bytes());
    let expected = presented.and_then(|p| SECRETS.iter().position(|s| s.as_bytes() == p));
    assert_eq!(full.ok().flatten(), expected);
});
