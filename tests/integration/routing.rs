//! Routing end to end: globs, `when` predicates, fan-out, unrouted events.

use std::time::Duration;

use crate::common::*;

const SECRET: &str = "routing-secret";

#[tokio::test]
async fn globs_predicates_fan_out_and_unrouted() {
    let entries = Receiver::start().await;
    let billable = Receiver::start().await;
    let clockodo = Receiver::start().await;
    let toml = format!(
        r#"
[storage]
data_dir = "{{dir}}/data"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[sources.clockodo]
kind = "clockodo"
secrets = ["My_Sup3r_T0k3n"]
[sinks.entries]
kind = "http"
url = "{e}"
[sinks.billable]
kind = "http"
url = "{b}"
[sinks.clockodo]
kind = "http"
url = "{c}"
[sinks.log]
kind = "file"
path = "{{dir}}/all.jsonl"
[[routes]]
name = "time-entries"
sources = ["clockify"]
events = ["TIME_ENTRY_*", "NEW_TIME_ENTRY"]
to = ["entries", "log"]
[[routes]]
name = "billable"
sources = ["clockify"]
events = ["*"]
when = "has(body.billable) && body.billable == true && headers['user-agent'].startsWith('Vert.x')"
to = ["billable", "log"]
[[routes]]
name = "clockodo-entries"
sources = ["clockodo"]
events = ["entry.*"]
when = "body.payload.entry.id > 9000"
to = ["clockodo"]
"#,
        e = entries.url(),
        b = billable.url(),
        c = clockodo.url()
    );
    let bridge = TestBridge::start(&toml).await;
    let post = |event: &'static str, body: Vec<u8>| {
        let bridge = &bridge;
        async move { bridge.post("/hooks/clockify", &clockify_headers(SECRET, event), body).await }
    };

    // NEW_TIME_ENTRY, billable: fan-out to entries, billable and the file (once, though two routes name it).
    let new_entry = read_fixture("clockify/NEW_TIME_ENTRY.json");
    assert_eq!(post("NEW_TIME_ENTRY", new_entry.clone()).await.0, 200);
    // TIME_ENTRY_UPDATED matches the glob; made non-billable so that the predicate route skips it.
    let mut updated: serde_json::Value =
        serde_json::from_slice(&read_fixture("captured/TIME_ENTRY_UPDATED__pureworldnew-jamstack-netlify.json"))
            .unwrap();
    updated["billable"] = false.into();
    let updated = serde_json::to_vec(&updated).unwrap();
    assert_eq!(post("TIME_ENTRY_UPDATED", updated.clone()).await.0, 200);
    // NEW_TAG matches no route: 200, unrouted.
    let (s, body) = post("NEW_TAG", read_fixture("clockify/NEW_TAG.json")).await;
    assert_eq!(s, 200);
    assert!(body.contains("\"unrouted\""), "{body}");
    // Clockodo: entry.created with id 9001 passes the predicate; an entry with id 1 does not.
    let created = read_fixture("clockodo/entry.created.json");
    assert_eq!(bridge.post("/hooks/clockodo", &[], created.clone()).await.0, 200);
    // (Another occurrence: Clockodo's dedup key is subscription + occurred_at + entity id.)
    let small = String::from_utf8(created.clone()).unwrap().replace("9001", "1").replace("17:02:00Z", "17:03:00Z");
    assert_eq!(bridge.post("/hooks/clockodo", &[], small).await.0, 200);
    let deleted = read_fixture("clockodo/entry.deleted.json");
    assert_eq!(bridge.post("/hooks/clockodo", &[], deleted.clone()).await.0, 200);

    let got = entries.wait_for(2, Duration::from_secs(20)).await;
    let types: Vec<&str> = got.iter().map(|r| r.headers["ce-type"].to_str().unwrap()).collect();
    assert!(types.contains(&"NEW_TIME_ENTRY") && types.contains(&"TIME_ENTRY_UPDATED"), "{types:?}");
    let got = billable.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got[0].body.as_ref(), new_entry.as_slice());
    let got = clockodo.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got[0].body.as_ref(), created.as_slice());
    // The file sink got the union of its routes once per event: NEW_TIME_ENTRY and TIME_ENTRY_UPDATED.
    let path = bridge.dir.path().join("all.jsonl");
    let lines = poll_until(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&path).ok()?;
        (text.lines().count() >= 2).then_some(text)
    })
    .await
    .expect("file sink lines");

    // Nothing else anywhere.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(entries.received().len(), 2);
    assert_eq!(billable.received().len(), 1);
    assert_eq!(clockodo.received().len(), 1, "entry.deleted's id is not > 9000 or it is another entity");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 2, "{lines}");
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["source"], "clockify");
    assert_eq!(first["body"]["id"], serde_json::from_slice::<serde_json::Value>(&new_entry).unwrap()["id"]);

    let m = bridge.metrics().await;
    assert_eq!(metric(&m, r#"hookbridge_events_unrouted_total{source="clockify"}"#), 1.0, "{m}");
    assert_eq!(metric(&m, r#"hookbridge_events_routed_total{source="clockify"}"#), 2.0);
    assert_eq!(metric(&m, r#"hookbridge_events_unrouted_total{source="clockodo"}"#), 2.0);
    assert_eq!(metric(&m, r#"hookbridge_deliveries_total{outcome="delivered",sink="log"}"#), 2.0);
    bridge.stop().await;
    for r in [entries, billable, clockodo] {
        r.stop().await;
    }
}
