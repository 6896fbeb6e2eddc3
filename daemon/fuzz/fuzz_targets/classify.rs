//! `classify` and `visible_headers` for every scheme kind. Input: the kind (first byte), the event locator
//! line and the id locator line (`/...`: a JSON pointer, else a header name; empty: the default / none),
//! header lines, an empty line, the body.

#![no_main]

mod common;

use std::sync::LazyLock;
use std::time::Duration;

use hookbridge::classify::{classify, visible_headers};
use hookbridge::config::SecretString;
use hookbridge::limits::MAX_EVENT_TYPE_LEN;
use hookbridge::verify::{AddonScheme, HmacAlgorithm, HmacScheme, Locator, Scheme, SignatureEncoding, StandardScheme};
use libfuzzer_sys::fuzz_target;

static ADDON: LazyLock<Option<AddonScheme>> = LazyLock::new(|| {
    AddonScheme::new(
        "fuzz-addon".into(),
        "Fuzz".into(),
        "https://h.example/a".into(),
        vec![],
        include_str!("../addon-public-key.pem"),
    )
    .ok()
});

fn locator(line: &[u8]) -> Option<Locator> {
    if line.is_empty() {
        return None;
    }
    let text = common::text(line);
    Some(if text.starts_with('/') { Locator::Pointer(text) } else { Locator::Header(text.to_ascii_lowercase()) })
}

fn scheme(kind: u8, event: Option<Locator>, id: Option<Locator>) -> Option<Scheme> {
    let secrets = || vec![SecretString::new("s")];
    let event_or = |default: Locator| event.clone().unwrap_or(default);
    Some(match kind % 6 {
        0 => Scheme::Clockify { secrets: secrets() },
        1 => Scheme::Clockodo { secrets: secrets() },
        2 => Scheme::Hmac(HmacScheme::new(
            "x-hub-signature-256",
            "sha256=".into(),
            SignatureEncoding::Hex,
            HmacAlgorithm::Sha256,
            secrets(),
            event_or(Locator::Header("x-github-event".into())),
            id,
        )),
        3 => Scheme::Standard(StandardScheme {
            secrets: vec![SecretString::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")],
            tolerance: Duration::from_secs(300),
            event: event_or(Locator::Pointer("/type".into())),
        }),
        4 => Scheme::None { event: event_or(Locator::Pointer("/event".into())), id },
        _ => Scheme::ClockifyAddon(ADDON.clone()?),
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else { return };
    let (event, rest) = common::line(rest);
    let (id, rest) = common::line(rest);
    let (headers, body) = common::message(rest);
    let Some(scheme) = scheme(kind, locator(event), locator(id)) else { panic!("the committed key must load") };

    let visible = visible_headers(&scheme, &headers);
    assert!(visible.keys().all(|k| !scheme.is_secret_header(k)), "a credential header is visible");

    if let Ok(c) = classify(&scheme, &headers, body) {
        assert!(!c.event_type.is_empty() && c.event_type.len() <= MAX_EVENT_TYPE_LEN);
        assert!(
            c.event_type.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '-' | '.' | ':' | '/')),
            "odd event type {:?}",
            c.event_type
        );
        assert!(c.kept_headers.iter().all(|(k, _)| !scheme.is_secret_header(k)), "a credential header is kept");
        assert!(c.kept_headers.windows(2).all(|w| w[0] <= w[1]), "kept headers unsorted");
        let prefix = match &scheme {
            Scheme::ClockifyAddon(_) => "clockify:",
            other => other.kind(),
        };
        assert!(c.dedup_key.starts_with(prefix), "dedup key {:?} for {}", c.dedup_key, scheme.kind());
        // What classification accepts is JSON: the ingress parses it again for predicates, trusting that.
        assert!(serde_json::from_slice::<serde_json::Value>(body).is_ok(), "accepted a body that is not JSON");
    }
});
