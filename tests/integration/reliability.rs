//! Delivery you can trust and inspect: retries with backoff and `Retry-After`, dead letters and their
//! retry, the attempt log, replay, dedup, per-entity ordering, and all of it surviving `kill -9`.

use std::time::Duration;

use serde_json::Value;

use crate::common::*;

const SECRET: &str = "reliability-secret";

fn config(url: &str, extra_sink: &str) -> String {
    format!(
        r#"
[storage]
data_dir = "{{dir}}/data"
[admin]
listen = "127.0.0.1:18081"
token = "admin-token-0123456789"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[sinks.out]
kind = "http"
url = "{url}"
timeout = "2s"
max_in_flight = 8
retry = {{ initial_backoff = "100ms", max_backoff = "400ms" }}
{extra_sink}
[[routes]]
name = "all"
to = ["out"]
"#
    )
}

fn entry(id: &str, description: &str) -> String {
    format!(
        r#"{{"id":"{id}","description":"{description}","workspaceId":"ws1","timeInterval":{{"start":"2026-11-22T08:00:00Z","end":null,"duration":null}}}}"#
    )
}

async fn post(bridge: &TestBridge, event: &str, body: &str) -> Value {
    let (status, text) = bridge.post("/hooks/clockify", &clockify_headers(SECRET, event), body.to_owned()).await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// Deliveries as `id/description`, in arrival order.
fn arrival(got: &[Received]) -> Vec<String> {
    got.iter()
        .map(|r| {
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            format!("{}/{}", v["id"].as_str().unwrap(), v["description"].as_str().unwrap())
        })
        .collect()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff_and_retry_after_is_honoured() {
    let receiver = Receiver::start().await;
    receiver.fail("entry-500", 500, 2, None);
    receiver.fail("entry-429", 429, 1, Some(1));
    let bridge = TestBridge::start(&config(&receiver.url(), "")).await;
    let id =
        post(&bridge, "NEW_TIME_ENTRY", &entry("entry-500", "fails twice")).await["id"].as_str().unwrap().to_owned();
    post(&bridge, "NEW_TIME_ENTRY", &entry("entry-429", "rate limited once")).await;
    let got = receiver.wait_for(2, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 2);
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="out"}"#, 2.0).await;

    // Three attempts for the first, with backoff between them, all in the attempt log.
    let hits: Vec<Hit> =
        receiver.hits().into_iter().filter(|h| String::from_utf8_lossy(&h.body).contains("entry-500")).collect();
    assert_eq!(hits.iter().map(|h| h.status).collect::<Vec<_>>(), [500, 500, 200]);
    for pair in hits.windows(2) {
        assert!(pair[1].at - pair[0].at >= Duration::from_millis(10), "no backoff between attempts");
    }
    let shown = json(&bridge.cli(&["events", "show", &id, "--json"]));
    let attempts: Vec<(String, Value)> = shown["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["outcome"].as_str().unwrap().to_owned(), a["status"].clone()))
        .collect();
    assert_eq!(
        attempts,
        [
            ("retry".to_owned(), Value::from(500)),
            ("retry".to_owned(), Value::from(500)),
            ("delivered".to_owned(), Value::Null)
        ]
    );
    assert_eq!(shown["deliveries"][0]["status"], "delivered");
    assert_eq!(shown["deliveries"][0]["attempts"], 3);

    // 429 with Retry-After: 1 -> the next attempt waits at least that long (not the 100 ms backoff).
    let hits: Vec<Hit> =
        receiver.hits().into_iter().filter(|h| String::from_utf8_lossy(&h.body).contains("entry-429")).collect();
    assert_eq!(hits.iter().map(|h| h.status).collect::<Vec<_>>(), [429, 200]);
    assert!(
        hits[1].at - hits[0].at >= Duration::from_millis(950),
        "Retry-After ignored: {:?}",
        hits[1].at - hits[0].at
    );

    let m = bridge.metrics().await;
    assert_eq!(metric(&m, r#"hookbridge_deliveries_total{outcome="retry",sink="out"}"#), 3.0);
    assert_eq!(metric(&m, r#"hookbridge_deliveries_total{outcome="delivered",sink="out"}"#), 2.0);
    bridge.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn a_client_error_is_dead_lettered_at_once_and_delivered_after_dlq_retry() {
    let receiver = Receiver::start().await;
    receiver.fail("entry-400", 400, 1, None);
    let bridge = TestBridge::start(&config(&receiver.url(), "")).await;
    let id =
        post(&bridge, "NEW_TIME_ENTRY", &entry("entry-400", "bad request")).await["id"].as_str().unwrap().to_owned();
    bridge.wait_metric(r#"hookbridge_dead_letters{sink="out"}"#, 1.0).await;
    assert_eq!(receiver.hits().len(), 1, "a 400 is not retried");

    let list = json(&bridge.cli(&["dlq", "list", "--json"]));
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["event_id"], id.as_str());
    assert_eq!(list[0]["last_error"], "HTTP 400");
    assert_eq!(list[0]["last_status"], 400);
    let text = bridge.cli(&["dlq", "list"]);
    assert!(text.contains("HTTP 400") && text.contains(&id), "{text}");

    // The receiver is fixed (its one planned failure is spent); retry the dead letter from the CLI.
    let delivery = list[0]["delivery_id"].as_i64().unwrap().to_string();
    assert!(bridge.cli(&["dlq", "retry", &delivery]).contains("1 dead letter(s) queued"));
    let got = receiver.wait_for(1, Duration::from_secs(20)).await;
    assert!(String::from_utf8_lossy(&got[0].body).contains("entry-400"));
    // The receiver has it; the outcome is recorded right after.
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="out"}"#, 1.0).await;
    assert_eq!(json(&bridge.cli(&["dlq", "list", "--json"])), Value::Array(vec![]));
    let shown = json(&bridge.cli(&["events", "show", &id, "--json"]));
    let statuses: Vec<(&str, bool)> = shown["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["status"].as_str().unwrap(), d["replay"].as_bool().unwrap()))
        .collect();
    assert_eq!(statuses, [("retried", false), ("delivered", true)]);
    bridge.wait_metric_eq(r#"hookbridge_dead_letters{sink="out"}"#, 0.0).await;
    bridge.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn replay_one_event_and_a_time_range_marks_replays() {
    let receiver = Receiver::start().await;
    let bridge = TestBridge::start(&config(&receiver.url(), "")).await;
    let a = post(&bridge, "NEW_TIME_ENTRY", &entry("entry-a", "a")).await["id"].as_str().unwrap().to_owned();
    post(&bridge, "NEW_TIME_ENTRY", &entry("entry-b", "b")).await;
    receiver.wait_for(2, Duration::from_secs(20)).await;

    let report = json(&bridge.cli(&["events", "replay", &a, "--json"]));
    assert_eq!(report, serde_json::json!({"events": 1, "deliveries": 1}));
    let got = receiver.wait_for(3, Duration::from_secs(20)).await;
    assert!(String::from_utf8_lossy(&got[2].body).contains("entry-a"));

    let report = json(&bridge.cli(&["events", "replay", "--since", "1h", "--json"]));
    assert_eq!(report, serde_json::json!({"events": 2, "deliveries": 2}));
    receiver.wait_for(5, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.received().len(), 5, "original two, one replay, then both again");

    let shown = json(&bridge.cli(&["events", "show", &a, "--json"]));
    let replays: Vec<bool> =
        shown["deliveries"].as_array().unwrap().iter().map(|d| d["replay"].as_bool().unwrap()).collect();
    assert_eq!(replays, [false, true, true]);
    // Replay to an unknown sink is refused.
    let out = std::process::Command::new(binary())
        .args(["events", "replay", &a, "--sink", "nope", "--config"])
        .arg(bridge.config_file())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no sink or plugin \"nope\""));
    bridge.stop().await;
    receiver.stop().await;
}

/// Copies within a source's `retry_window` are one delivery retried, one after the other and at once (the
/// single spool writer sees the first in both cases). Copies outside it: see `dedup.rs`.
#[tokio::test]
async fn the_same_webhook_twice_and_concurrently_within_the_retry_window_is_delivered_once() {
    let receiver = Receiver::start().await;
    let toml = config(&receiver.url(), "").replacen(
        &format!("secrets = [\"{SECRET}\"]"),
        &format!("secrets = [\"{SECRET}\"]\nretry_window = \"1h\""),
        1,
    );
    let bridge = TestBridge::start(&toml).await;
    let body = entry("entry-dup", "sent again by the provider");
    let first = post(&bridge, "NEW_TIME_ENTRY", &body).await;
    assert_eq!(first["status"], "accepted");
    let again = post(&bridge, "NEW_TIME_ENTRY", &body).await;
    assert_eq!(again["status"], "duplicate");
    assert_eq!(again["id"], first["id"]);
    // Concurrently: a different body, four times at once.
    let body = entry("entry-dup2", "concurrent");
    let (a, b, c, d) = tokio::join!(
        post(&bridge, "NEW_TIME_ENTRY", &body),
        post(&bridge, "NEW_TIME_ENTRY", &body),
        post(&bridge, "NEW_TIME_ENTRY", &body),
        post(&bridge, "NEW_TIME_ENTRY", &body)
    );
    let statuses: Vec<&str> = [&a, &b, &c, &d].iter().map(|v| v["status"].as_str().unwrap()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == "accepted").count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == "duplicate").count(), 3, "{statuses:?}");
    // The same body as another event type is another event.
    assert_eq!(post(&bridge, "TIME_ENTRY_UPDATED", &body).await["status"], "accepted");

    receiver.wait_for(3, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 3);
    let m = bridge.metrics().await;
    assert_eq!(metric(&m, r#"hookbridge_duplicates_total{source="clockify"}"#), 4.0);
    bridge.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn events_of_one_entity_arrive_in_order_while_others_go_on() {
    let receiver = Receiver::start().await;
    receiver.fail("entry-slow", 503, 3, None);
    let bridge = TestBridge::start(&config(&receiver.url(), "")).await;
    post(&bridge, "NEW_TIME_ENTRY", &entry("entry-slow", "first")).await;
    post(&bridge, "TIME_ENTRY_UPDATED", &entry("entry-slow", "second")).await;
    post(&bridge, "NEW_TIME_ENTRY", &entry("entry-other", "unrelated")).await;
    let got = receiver.wait_for(3, Duration::from_secs(20)).await;
    assert_eq!(arrival(&got), ["entry-other/unrelated", "entry-slow/first", "entry-slow/second"]);
    // The second event for the entity waited: it was never sent before the first succeeded.
    let slow: Vec<(u16, String)> = receiver
        .hits()
        .into_iter()
        .filter(|h| String::from_utf8_lossy(&h.body).contains("entry-slow"))
        .map(|h| {
            (h.status, serde_json::from_slice::<Value>(&h.body).unwrap()["description"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(
        slow,
        [
            (503, "first".into()),
            (503, "first".into()),
            (503, "first".into()),
            (200, "first".into()),
            (200, "second".into())
        ]
    );
    bridge.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn the_admin_api_needs_its_token_and_serves_the_operator_commands() {
    let receiver = Receiver::start().await;
    receiver.fail("entry-bad", 422, 1, None);
    let bridge = TestBridge::start(&config(&receiver.url(), "")).await;
    let id = post(&bridge, "NEW_TIME_ENTRY", &entry("entry-bad", "x")).await["id"].as_str().unwrap().to_owned();
    bridge.wait_metric(r#"hookbridge_dead_letters{sink="out"}"#, 1.0).await;
    let admin = format!("http://{}", bridge.admin.unwrap());
    let c = client();
    let r = c.get(format!("{admin}/api/v1/dlq")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = c.get(format!("{admin}/api/v1/dlq")).bearer_auth("wrong-token-0123456789").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let auth = "admin-token-0123456789";
    let dlq: Value = c
        .get(format!("{admin}/api/v1/dlq"))
        .bearer_auth(auth)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .map(|t| json(&t))
        .unwrap();
    assert_eq!(dlq[0]["event_id"], id.as_str());
    let ev: Value = c
        .get(format!("{admin}/api/v1/events/{id}"))
        .bearer_auth(auth)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .map(|t| json(&t))
        .unwrap();
    assert_eq!(ev["status"], "dead");
    let r = c.get(format!("{admin}/api/v1/events/nope")).bearer_auth(auth).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let r = c.post(format!("{admin}/api/v1/dlq/retry")).bearer_auth(auth).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400, "retry needs id= or all=true");
    let r: Value = c
        .post(format!("{admin}/api/v1/dlq/retry?all=true"))
        .bearer_auth(auth)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .map(|t| json(&t))
        .unwrap();
    assert_eq!(r["retried"], 1);
    receiver.wait_for(1, Duration::from_secs(20)).await;
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="out"}"#, 1.0).await;
    let list: Value = c
        .get(format!("{admin}/api/v1/events?status=delivered"))
        .bearer_auth(auth)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .map(|t| json(&t))
        .unwrap();
    assert_eq!(list.as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect::<Vec<_>>(), [id.as_str()]);
    let r = c.get(format!("{admin}/api/v1/events?status=bogus")).bearer_auth(auth).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    bridge.stop().await;
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_waits_for_a_retry_s_due_time_instead_of_attempting_it_at_once() {
    // The first attempt is answered 503 with Retry-After: 5, so the retry is due 5 s later (the backoff's
    // jitter cannot make it earlier); every later request is answered 200.
    let receiver = Receiver::start().await;
    receiver.fail("", 503, 1, Some(5));
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[storage]
data_dir = "{data}"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[sinks.out]
kind = "http"
url = "{url}"
timeout = "2s"
retry = {{ initial_backoff = "1s", max_backoff = "1s", max_attempts = 3 }}
[[routes]]
name = "all"
to = ["out"]
"#,
        data = dir.path().join("data").display(),
        url = receiver.url()
    );
    let bridge = TestBridge::start(&config).await;
    let (status, _) = bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), "{}").await;
    assert_eq!(status, 200);
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="retry",sink="out"}"#, 1.0).await;
    bridge.stop().await;
    // Restarted at once, then again: neither start attempts the delivery before its due time, so the
    // restarts do not use up max_attempts (3) early. (On a loaded machine the restarts may outlast the 5 s:
    // an attempt at the due time during one of them is right.)
    for _ in 0..2 {
        let bridge = TestBridge::start(&config).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        bridge.stop().await;
    }
    let first = receiver.hits()[0].at;
    let early: Vec<Duration> =
        receiver.hits().iter().skip(1).map(|h| h.at - first).filter(|t| *t < Duration::from_millis(4900)).collect();
    assert!(early.is_empty(), "attempted before its due time (5 s after the first): {early:?}");
    let last_start = std::time::Instant::now();
    let bridge = TestBridge::start(&config).await;
    receiver.wait_for(1, Duration::from_secs(20)).await;
    let hits = receiver.hits();
    assert_eq!(hits.len(), 2, "one failed attempt, then the one at its due time");
    assert!(hits[1].at - hits[0].at >= Duration::from_millis(4900), "retried after {:?}", hits[1].at - hits[0].at);
    // This run counts the delivery unless one of the restarts above made it (a loaded machine).
    if hits[1].at >= last_start {
        bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="out"}"#, 1.0).await;
    }
    bridge.stop().await;
    receiver.stop().await;
}

/// The log engine (`storage.engine = "log"`) end to end: a delivery that fails goes through the cold path
/// and is retried while the next event of its entity waits, a refused one is a dead letter counted in the
/// metrics and delivered after a `dlq retry`, nothing is left pending, the events list as delivered, and
/// the log verifies and dumps.
#[tokio::test]
async fn the_log_engine_retries_through_the_cold_path_in_order_and_dead_letters() {
    let receiver = Receiver::start().await;
    receiver.fail("entry-slow", 503, 2, None);
    receiver.fail("entry-bad", 422, 1, None);
    let toml = config(&receiver.url(), "").replace("[storage]\n", "[storage]\nengine = \"log\"\n");
    let bridge = TestBridge::start(&toml).await;
    post(&bridge, "NEW_TIME_ENTRY", &entry("entry-slow", "first")).await;
    post(&bridge, "TIME_ENTRY_UPDATED", &entry("entry-slow", "second")).await;
    post(&bridge, "NEW_TIME_ENTRY", &entry("entry-bad", "refused")).await;
    post(&bridge, "NEW_TIME_ENTRY", &entry("entry-other", "unrelated")).await;
    let got = receiver.wait_for(3, Duration::from_secs(20)).await;
    assert_eq!(arrival(&got), ["entry-other/unrelated", "entry-slow/first", "entry-slow/second"]);
    let statuses: Vec<u16> = receiver
        .hits()
        .into_iter()
        .filter(|h| String::from_utf8_lossy(&h.body).contains("entry-slow"))
        .map(|h| h.status)
        .collect();
    assert_eq!(statuses, [503, 503, 200, 200], "the second waited for the first's retries");
    bridge.wait_metric(r#"hookbridge_dead_letters{sink="out"}"#, 1.0).await;
    bridge.wait_metric_eq("hookbridge_spool_pending_deliveries", 0.0).await;
    // The dead letter, listed and retried through the admin API: appended to the log again, delivered.
    let admin = format!("http://{}", bridge.admin.unwrap());
    let (c, auth) = (client(), "admin-token-0123456789");
    let dlq = json(&c.get(format!("{admin}/api/v1/dlq")).bearer_auth(auth).send().await.unwrap().text().await.unwrap());
    assert_eq!(dlq.as_array().unwrap().len(), 1, "{dlq}");
    assert_eq!(dlq[0]["last_status"], 422);
    let r = c.post(format!("{admin}/api/v1/dlq/retry?all=true")).bearer_auth(auth).send().await.unwrap();
    assert_eq!(json(&r.text().await.unwrap())["retried"], 1);
    let got = receiver.wait_for(4, Duration::from_secs(20)).await;
    assert!(String::from_utf8_lossy(&got[3].body).contains("entry-bad"));
    bridge.wait_metric_eq(r#"hookbridge_dead_letters{sink="out"}"#, 0.0).await;
    bridge.wait_metric_eq("hookbridge_spool_pending_deliveries", 0.0).await;
    // The events, as the log and the cold tables tell them.
    let list =
        json(&c.get(format!("{admin}/api/v1/events")).bearer_auth(auth).send().await.unwrap().text().await.unwrap());
    let statuses: Vec<(&str, &str)> =
        list.as_array().unwrap().iter().map(|e| (e["type"].as_str().unwrap(), e["status"].as_str().unwrap())).collect();
    assert_eq!(statuses.len(), 4, "{list}");
    assert!(statuses.iter().all(|(_, s)| *s == "delivered"), "{list}");
    // The log itself, read beside the running daemon.
    let verified = bridge.cli(&["spool", "verify"]);
    assert!(verified.contains(", 5 event(s), 0 lost"), "the four webhooks and the retry: {verified}");
    let dumped = bridge.cli(&["spool", "dump", "--bodies"]);
    let events: Vec<Value> = dumped.lines().map(json).filter(|f| f["kind"] == "Event").collect();
    assert_eq!(events.len(), 5, "{dumped}");
    assert!(events[2]["body"].as_str().unwrap().contains("entry-bad"), "{dumped}");
    assert!(!bridge.cli(&["spool", "dump"]).contains("\"body\""), "bodies only when asked for");
    bridge.stop().await;
    receiver.stop().await;
}
