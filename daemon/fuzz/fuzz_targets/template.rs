//! `Template::parse` and `render`, and `template::find`. Input: the template line, the `find` path line
//! (`.`-separated keys), the body (arbitrary bytes).

#![no_main]

mod common;

use hookbridge::event::Event;
use hookbridge::template::{Template, find};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn event(body: &[u8]) -> Event {
    Event {
        id: "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(),
        source: "clockify".into(),
        event_type: "NEW_TIME_ENTRY".into(),
        received_at_ms: 1_700_000_000_000,
        headers: vec![("content-type".into(), "application/json".into()), ("x-tenant".into(), "acme".into())],
        body: bytes::Bytes::copy_from_slice(body),
        dedup_key: "clockify:fuzz".into(),
        ordering_key: None,
        body_is_json: false,
    }
}

fuzz_target!(|data: &[u8]| {
    let (template, rest) = common::line(data);
    let (path, body) = common::line(rest);

    if let Ok(text) = std::str::from_utf8(template)
        && let Ok(t) = Template::parse(text)
    {
        assert_eq!(t.as_str(), text);
        let rendered = t.render(&event(body));
        // A template that does not read the body renders the same whatever the body.
        if !t.uses_body() {
            assert_eq!(rendered, t.render(&event(b"")));
        }
        // The parsed form is the text: parsing it again gives the same template.
        assert_eq!(Template::parse(t.as_str()).as_ref(), Ok(&t));
    }

    let keys: Vec<String> = common::text(path).split('.').map(str::to_owned).collect();
    let found = find(body, &keys);
    // Where the whole document parses, the one-pass lookup finds what a lookup in it finds.
    if let Ok(doc) = serde_json::from_slice::<Value>(body) {
        match found {
            Ok(found) => assert_eq!(found, lookup(&doc, &keys)),
            Err(e) => panic!("find refused a body that parses: {e}"),
        }
    }
});

/// The value at `keys` in a parsed document, or the depth where the path breaks off.
fn lookup(doc: &Value, keys: &[String]) -> Result<Value, usize> {
    let mut at = doc;
    for (depth, k) in keys.iter().enumerate() {
        at = match at {
            Value::Object(map) => map.get(k).ok_or(depth)?,
            Value::Array(list) => k.parse::<usize>().ok().and_then(|i| list.get(i)).ok_or(depth)?,
            _ => return Err(depth),
        };
    }
    Ok(at.clone())
}
