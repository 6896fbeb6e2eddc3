//! The ingress's limits and failure answers: a body that arrives too slowly (408), too many requests at
//! once (503), a spool that cannot be written (503, readiness down). Each is counted.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

const SECRET: &str = "limits-secret";

fn config(extra_server: &str) -> String {
    format!(
        r#"
[server]
request_timeout = "400ms"
body_timeout = "400ms"
min_body_rate = 0
{extra_server}
[storage]
data_dir = "{{dir}}/data"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[sinks.out]
kind = "file"
path = "{{dir}}/out.jsonl"
[[routes]]
name = "all"
to = ["out"]
"#
    )
}

/// Opens a connection and sends the head of a POST with `content-length: 100` and 10 body bytes, then waits.
async fn slow_request(bridge: &TestBridge) -> TcpStream {
    let mut stream = TcpStream::connect(bridge.addr).await.unwrap();
    let head = format!(
        "POST /hooks/clockify HTTP/1.1\r\nHost: x\r\nclockify-signature: {SECRET}\r\nclockify-webhook-event-type: NEW_TIME_ENTRY\r\ncontent-length: 100\r\n\r\n{{\"id\":\"1\",",
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

async fn status_of(mut stream: TcpStream) -> u16 {
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_gets_408() {
    let bridge = TestBridge::start(&config("")).await;
    let stream = slow_request(&bridge).await;
    assert_eq!(status_of(stream).await, 408);
    let m = bridge.metrics().await;
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="timeout",source="clockify"}"#), 1.0, "{m}");
    assert_eq!(metric(&m, r#"hookbridge_requests_total{source="clockify",status="408"}"#), 1.0);
    bridge.stop().await;
}

#[tokio::test]
async fn requests_beyond_max_concurrency_get_503() {
    let bridge = TestBridge::start(&config("max_concurrency = 1")).await;
    let slow = slow_request(&bridge).await;
    // As soon as the slow one holds the only slot (its body is being read), others are refused.
    let deadline = std::time::Instant::now() + Duration::from_millis(350);
    let r = loop {
        let r = client()
            .post(bridge.url("/hooks/clockify"))
            .header("clockify-signature", SECRET)
            .header("clockify-webhook-event-type", "NEW_TIME_ENTRY")
            .body(r#"{"id":"2"}"#)
            .send()
            .await
            .unwrap();
        if r.status().as_u16() != 200 || std::time::Instant::now() > deadline {
            break r;
        }
    };
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(status_of(slow).await, 408);
    // The slot is free again.
    let (s, _) = bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), r#"{"id":"3"}"#).await;
    assert_eq!(s, 200);
    let m = bridge.metrics().await;
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="overloaded",source="clockify"}"#), 1.0, "{m}");
    bridge.stop().await;
}

#[tokio::test]
async fn a_spool_that_cannot_be_written_answers_503_and_is_not_ready() {
    let bridge = TestBridge::start(&config("")).await;
    let ready = client().get(bridge.internal_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let body: serde_json::Value = serde_json::from_str(&ready.text().await.unwrap()).unwrap();
    assert_eq!(body["status"], "ready");

    bridge.store.close().await; // the spool writer is gone
    let r = client()
        .post(bridge.url("/hooks/clockify"))
        .header("clockify-signature", SECRET)
        .header("clockify-webhook-event-type", "NEW_TIME_ENTRY")
        .body(r#"{"id":"4"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "15");
    let ready = client().get(bridge.internal_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let healthy = client().get(bridge.url("/healthz")).send().await.unwrap();
    assert_eq!(healthy.status().as_u16(), 200, "alive, just not ready");
    let m = bridge.metrics().await;
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="store_error",source="clockify"}"#), 1.0, "{m}");
    bridge.stop().await;
}
