//! Dedup that never drops a distinct event: a copy of a content-keyed webhook (Clockify, Clockodo, hmac
//! without an id) is a provider's retry only while the provider may not have seen the first answer (cut,
//! or later than the source's `provider_timeout`); otherwise it is a new event and is delivered. Delivery
//! ids (Standard Webhooks' `webhook-id`) keep their window: see `schemes.rs`.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

const SECRET: &str = "dedup-secret";
const CLOCKODO_TOKEN: &str = "clockodo-dedup-token";

fn config(data_dir: &str, receiver: &str) -> String {
    format!(
        r#"
[server]
min_body_rate = 0
[storage]
data_dir = "{data_dir}"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
provider_timeout = "500ms"
[sources.clockodo]
kind = "clockodo"
secrets = ["{CLOCKODO_TOKEN}"]
[sinks.out]
kind = "http"
url = "{receiver}"
retry = {{ initial_backoff = "100ms", max_backoff = "400ms" }}
[[routes]]
name = "all"
to = ["out"]
"#
    )
}

async fn post(bridge: &TestBridge, path: &str, headers: &[(&str, &str)], body: &str) -> Value {
    let (status, text) = bridge.post(path, headers, body.to_owned()).await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

async fn clockify(bridge: &TestBridge, event: &str, body: &str) -> String {
    let v = post(bridge, "/hooks/clockify", &clockify_headers(SECRET, event), body).await;
    v["status"].as_str().unwrap().to_owned()
}

/// The raw HTTP/1.1 request a provider would send for a Clockify webhook.
fn request_head(addr: std::net::SocketAddr, event: &str, body: &str) -> String {
    format!(
        "POST /hooks/clockify HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\nclockify-signature: {SECRET}\r\nclockify-webhook-event-type: {event}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn distinct_events_with_the_same_bytes_are_all_delivered() {
    let receiver = Receiver::start().await;
    let bridge = TestBridge::start(&config("{dir}/data", &receiver.url())).await;
    // A tag renamed A -> B -> A: the third webhook has the bytes of the first.
    let tag = |name: &str| {
        format!(r#"{{"id":"6a1b2c3d4e5f60718293a4b5","name":"{name}","workspaceId":"ws1","archived":false}}"#)
    };
    for name in ["A", "B", "A"] {
        assert_eq!(clockify(&bridge, "TAG_UPDATED", &tag(name)).await, "accepted");
    }
    // Two identical balance adjustments, one after the other and two more at once.
    let balance = r#"{"id":"bal-1","userId":"u1","policyId":"p1","balance":2.0,"workspaceId":"ws1"}"#;
    assert_eq!(clockify(&bridge, "BALANCE_UPDATED", balance).await, "accepted");
    assert_eq!(clockify(&bridge, "BALANCE_UPDATED", balance).await, "accepted");
    let (a, b) =
        tokio::join!(clockify(&bridge, "BALANCE_UPDATED", balance), clockify(&bridge, "BALANCE_UPDATED", balance));
    assert_eq!((a.as_str(), b.as_str()), ("accepted", "accepted"));
    // Clockodo envelopes with the same subscription, time and entity that differ in another field.
    let envelope = |company: u32| {
        format!(
            r#"{{"subscription_id":42,"company_id":{company},"occurred_at":"2026-12-01T10:00:00Z","payload":{{"entry":{{"id":9001}}}},"event_name":"entry.updated","token":"{CLOCKODO_TOKEN}"}}"#
        )
    };
    for company in [1337, 1338] {
        let v = post(&bridge, "/hooks/clockodo", &[("content-type", "application/json")], &envelope(company)).await;
        assert_eq!(v["status"], "accepted", "{v}");
    }
    let got = receiver.wait_for(9, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.received().len(), 9);
    let names: Vec<String> = got
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.body).contains("6a1b2c3d4e5f60718293a4b5"))
        .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap()["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(names, ["A", "B", "A"], "every rename delivered, in order");
    let m = bridge.metrics().await;
    assert_eq!(metric(&m, r#"hookbridge_duplicates_total{source="clockify"}"#), 0.0, "{m}");
    bridge.stop().await;
    receiver.stop().await;
}

/// On the SQLite engine, where an operator's transaction can hold an insert back until the provider has
/// closed (the cut answer), and with a late answer.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_after_a_cut_or_late_answer_is_a_duplicate_across_a_restart() {
    a_retry_after_an_uncertain_answer_is_a_duplicate_across_a_restart_on("sqlite").await;
}

/// On the log engine, with a late answer (its inserts never wait for SQLite, so nothing holds one back until
/// the close; the cut answer's bookkeeping is the same from there on).
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_after_a_late_answer_is_a_duplicate_across_a_restart_on_the_log() {
    a_retry_after_an_uncertain_answer_is_a_duplicate_across_a_restart_on("log").await;
}

async fn a_retry_after_an_uncertain_answer_is_a_duplicate_across_a_restart_on(engine: &str) {
    let receiver = Receiver::start().await;
    let data = tempfile::tempdir().unwrap();
    let toml = config(&data.path().join("spool").display().to_string(), &receiver.url())
        .replace("[storage]\n", &format!("[storage]\nengine = \"{engine}\"\n"));
    assert!(toml.contains("engine = "));
    let bridge = TestBridge::start(&toml).await;
    let cut_too = engine == "sqlite";
    let uncertain = if cut_too { 1.0 } else { 0.0 };
    if cut_too {
        cut_answer_then_its_retry(&bridge, &data).await;
    }

    // A request answered later than the provider waits (provider_timeout 500 ms): its body comes 800 ms after
    // its head, so the provider has given up by the time the answer is written.
    let slow = r#"{"id":"entry-slow","description":"slow","workspaceId":"ws1"}"#;
    let mut conn = TcpStream::connect(bridge.addr).await.unwrap();
    conn.write_all(request_head(bridge.addr, "NEW_TIME_ENTRY", slow).as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    conn.write_all(slow.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = conn.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("accepted"), "{answer}");
    drop(conn);
    bridge.wait_metric_eq(r#"hookbridge_uncertain_answers_total{source="clockify"}"#, uncertain + 1.0).await;

    // What was uncertain stays uncertain across a restart.
    let _ = bridge.stop().await;
    let bridge = TestBridge::start(&toml).await;
    assert_eq!(clockify(&bridge, "NEW_TIME_ENTRY", slow).await, "duplicate");
    assert_eq!(clockify(&bridge, "NEW_TIME_ENTRY", slow).await, "accepted");

    // Delivered: (the cut one, the new event with its bytes,) the slow one, and the new event with its bytes.
    // Counted by event id: a delivery in flight at the graceful stop may be delivered again after the restart
    // (at least once), which is not a duplicate let through.
    let expected = if cut_too { 4 } else { 2 };
    receiver.wait_for(expected, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids: std::collections::BTreeSet<String> =
        receiver.received().iter().map(|r| r.headers["ce-id"].to_str().unwrap().to_owned()).collect();
    assert_eq!(ids.len(), expected, "{ids:?}");
    let m = bridge.metrics().await;
    assert_eq!(metric(&m, r#"hookbridge_duplicates_total{source="clockify"}"#), 1.0, "{m}");
    bridge.stop().await;
    receiver.stop().await;
}

/// The provider sends the whole request, then gives up on it (closes) before the answer is written. To be
/// sure the close comes first, an operator's transaction holds the SQLite engine's write lock meanwhile:
/// the insert waits for it, and commits once it ends, with nobody left to answer.
async fn cut_answer_then_its_retry(bridge: &TestBridge, data: &tempfile::TempDir) {
    let cut = r#"{"id":"entry-cut","description":"cut","workspaceId":"ws1"}"#;
    let db = rusqlite::Connection::open(data.path().join("spool/spool.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut conn = TcpStream::connect(bridge.addr).await.unwrap();
    conn.write_all(format!("{}{cut}", request_head(bridge.addr, "NEW_TIME_ENTRY", cut)).as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(conn);
    tokio::time::sleep(Duration::from_millis(100)).await;
    db.execute_batch("COMMIT").unwrap();
    drop(db);
    bridge.wait_metric_eq(r#"hookbridge_uncertain_answers_total{source="clockify"}"#, 1.0).await;
    // Its retry is a duplicate; once that answer is through, the same bytes again are a new event.
    assert_eq!(clockify(bridge, "NEW_TIME_ENTRY", cut).await, "duplicate");
    assert_eq!(clockify(bridge, "NEW_TIME_ENTRY", cut).await, "accepted");
}

#[tokio::test(flavor = "multi_thread")]
async fn copies_within_the_retry_window_are_retries_whatever_the_answer() {
    let receiver = Receiver::start().await;
    let toml = config("{dir}/data", &receiver.url()).replace("provider_timeout = \"500ms\"", "retry_window = \"1h\"");
    let bridge = TestBridge::start(&toml).await;
    let body = r#"{"id":"entry-window","description":"again","workspaceId":"ws1"}"#;
    assert_eq!(clockify(&bridge, "NEW_TIME_ENTRY", body).await, "accepted");
    assert_eq!(clockify(&bridge, "NEW_TIME_ENTRY", body).await, "duplicate");
    // Another event type with the same body is another event.
    assert_eq!(clockify(&bridge, "TIME_ENTRY_UPDATED", body).await, "accepted");
    receiver.wait_for(2, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.received().len(), 2);
    bridge.stop().await;
    receiver.stop().await;
}
