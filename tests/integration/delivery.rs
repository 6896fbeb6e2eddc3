//! Delivery guarantees: a sink that is down gets its events once it is back, in receive order; a sink
//! that refuses for good does not block others; a full spool answers 503; deliveries survive a restart.

use std::time::Duration;

use crate::common::*;

const SECRET: &str = "delivery-secret";

fn toml(url: &str, extra: &str) -> String {
    format!(
        r#"
[server]
shutdown_timeout = "5s"
[storage]
data_dir = "{{dir}}/data"
{extra}
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[sinks.out]
kind = "http"
url = "{url}"
timeout = "300ms"
max_in_flight = 1
retry = {{ initial_backoff = "50ms", max_backoff = "200ms" }}
[[routes]]
name = "all"
to = ["out"]
"#
    )
}

fn body(n: usize) -> String {
    format!(r#"{{"id":"entry-{n}","description":"n{n}"}}"#)
}

#[tokio::test]
async fn events_wait_while_the_receiver_is_down_and_arrive_in_order_once_it_is_up() {
    // The receiver is down: every connection is closed before a request is read.
    let (down, addr) = hung_receiver().await;
    let bridge = TestBridge::start(&toml(&format!("http://{addr}/in"), "")).await;
    for n in 0..5 {
        let (s, _) = bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), body(n)).await;
        assert_eq!(s, 200);
    }
    // Retries are happening and the events are still pending.
    let m = bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="retry",sink="out"}"#, 2.0).await;
    assert_eq!(metric(&m, "hookbridge_spool_pending_deliveries"), 5.0);

    let receiver = Receiver::start_on(down.up().await).await;
    let got = receiver.wait_for(5, Duration::from_secs(20)).await;
    let ids: Vec<String> = got
        .iter()
        .map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, (0..5).map(|n| format!("entry-{n}")).collect::<Vec<_>>(), "receive order");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.received().len(), 5);
    let m = bridge.metrics().await;
    assert_eq!(metric(&m, "hookbridge_spool_pending_deliveries"), 0.0);
    bridge.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn permanent_failures_are_kept_dead_and_server_errors_are_retried() {
    let receiver = Receiver::start().await;
    let bridge = TestBridge::start(&toml(&receiver.url(), "")).await;
    receiver.answer(422);
    let (s, answer) = bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), body(1)).await;
    assert_eq!(s, 200);
    let dead_id = serde_json::from_str::<serde_json::Value>(&answer).unwrap()["id"].as_str().unwrap().to_owned();
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="dead",sink="out"}"#, 1.0).await;

    receiver.answer(503);
    assert_eq!(bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), body(2)).await.0, 200);
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="retry",sink="out"}"#, 2.0).await;
    receiver.answer(200);
    let got = receiver.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got[0].body.as_ref(), body(2).as_bytes());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.received().len(), 1, "the dead delivery is not retried");

    // The dead delivery is kept in the spool with its error.
    let dir = bridge.stop().await;
    let store = hookbridge::store::Store::open(&dir.path().join("data")).unwrap();
    let d = store.event(&dead_id).await.unwrap().unwrap().deliveries;
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].sink.as_str(), d[0].status.as_str(), d[0].attempts), ("out", "dead", 1));
    assert_eq!((d[0].last_error.as_deref(), d[0].last_status), (Some("HTTP 422"), Some(422)));
    store.close().await;
    receiver.stop().await;
}

#[tokio::test]
async fn a_full_spool_answers_503_with_retry_after_and_recovers_once_drained() {
    let (down, addr) = hung_receiver().await;
    let bridge = TestBridge::start(&toml(&format!("http://{addr}/in"), "max_pending_events = 2")).await;
    for n in 0..2 {
        let (status, text) = bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), body(n)).await;
        assert_eq!(status, 200, "{text}");
    }
    let r = client()
        .post(bridge.url("/hooks/clockify"))
        .header("clockify-signature", SECRET)
        .header("clockify-webhook-event-type", "NEW_TIME_ENTRY")
        .body(body(3))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "15");
    let m = bridge.metrics().await;
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="spool_full",source="clockify"}"#), 1.0);

    // The receiver comes back, the spool drains, and webhooks are accepted again.
    let receiver = Receiver::start_on(down.up().await).await;
    receiver.wait_for(2, Duration::from_secs(20)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metric(&bridge.metrics().await, "hookbridge_spool_pending_events") > 0.0 {
        assert!(std::time::Instant::now() < deadline, "spool never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), body(3)).await.0, 200);
    receiver.wait_for(3, Duration::from_secs(20)).await;
    bridge.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn pending_deliveries_survive_a_graceful_restart() {
    let (down, addr) = hung_receiver().await;
    let config = toml(&format!("http://{addr}/in"), "");
    let bridge = TestBridge::start(&config).await;
    for n in 0..3 {
        assert_eq!(bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), body(n)).await.0, 200);
    }
    let dir = bridge.stop().await;

    // Same data directory, receiver now up.
    let receiver = Receiver::start_on(down.up().await).await;
    let text = config.replace("{dir}", &dir.path().display().to_string());
    let cfg = hookbridge::Config::parse(&text, None, dir.path(), &hookbridge::config::ProcessEnv).unwrap();
    let bridge = hookbridge::Bridge::start(cfg).await.unwrap();
    let got = receiver.wait_for(3, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 3);
    bridge.shutdown().await;
    receiver.stop().await;
}
