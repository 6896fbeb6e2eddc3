//! `clockify-addon`: RS256 tokens against a throw-away public key (`addon-public-key.pem`; its private
//! key was discarded after signing the seeds in `corpus/addon_jwt`). Input: the token.

#![no_main]

use std::sync::LazyLock;

use hookbridge::verify::AddonScheme;
use libfuzzer_sys::fuzz_target;

const PUBLIC_KEY: &str = include_str!("../addon-public-key.pem");

static SCHEME: LazyLock<Option<AddonScheme>> = LazyLock::new(|| {
    AddonScheme::new(
        "fuzz-addon".into(),
        "Fuzz add-on".into(),
        "https://hooks.example/addon".into(),
        vec!["TIME_ENTRY_READ".into()],
        PUBLIC_KEY,
    )
    .ok()
});

fuzz_target!(|data: &[u8]| {
    let Some(scheme) = SCHEME.as_ref() else { panic!("the committed key must load") };
    let Ok(token) = std::str::from_utf8(data) else { return };
    if let Ok(claims) = scheme.verify_token(token) {
        assert_eq!(claims.kind.as_deref(), Some("addon"));
    }
});
