//! `RouteTable::compile` with arbitrary globs and a CEL `when` predicate, then `route`. Input lines: the
//! route's sources (tab-separated; empty: every source), its event globs (tab-separated; empty: `*`), its
//! predicate (empty: none), the event's source, its event type; then header lines, an empty line, the body
//! (given to predicates parsed; a body that is not JSON as a string).

#![no_main]

mod common;

use std::cell::Cell;
use std::collections::BTreeMap;

use hookbridge::config::types::RouteConfig;
use hookbridge::route::{RouteInput, RouteTable};
use libfuzzer_sys::fuzz_target;

fn list(line: &[u8]) -> Vec<String> {
    if line.is_empty() { Vec::new() } else { common::text(line).split('\t').map(str::to_owned).collect() }
}

fuzz_target!(|data: &[u8]| {
    let (sources, rest) = common::line(data);
    let (events, rest) = common::line(rest);
    let (when, rest) = common::line(rest);
    let (source, rest) = common::line(rest);
    let (event, rest) = common::line(rest);
    let (headers, body) = common::message(rest);

    let routes = [
        RouteConfig {
            name: "fuzzed".into(),
            sources: list(sources),
            events: list(events),
            when: (!when.is_empty()).then(|| common::text(when)),
            to: vec!["a".into(), "b".into()],
        },
        RouteConfig { name: "all".into(), sources: vec![], events: vec![], when: None, to: vec!["c".into()] },
    ];
    let Ok(table) = RouteTable::compile(&routes) else { return };
    assert_eq!(table.names().collect::<Vec<_>>(), ["fuzzed", "all"]);

    let calls = Cell::new(0u32);
    let details = || {
        calls.set(calls.get() + 1);
        let headers: BTreeMap<String, String> = headers
            .iter()
            .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_owned(), v.to_owned())))
            .collect();
        let body = serde_json::from_slice(body)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(body).into_owned()));
        (headers, body)
    };
    let source = common::text(source);
    let event = common::text(event);
    let decision = table.route(&RouteInput { source: &source, event: &event, details: &details });
    assert!(calls.get() <= 1, "details built {} times", calls.get());
    // "all" takes every event; the fuzzed route adds a and b, or nothing.
    let sinks: Vec<&str> = decision.sinks.iter().map(String::as_str).collect();
    assert!(matches!(sinks.as_slice(), ["c"] | ["a", "b", "c"]), "{sinks:?}");
    assert!(decision.predicate_errors.iter().all(|(route, _)| route == "fuzzed"));
});
