//! Every verification scheme end to end: valid requests reach the HTTP sink byte for byte with CloudEvents
//! headers; bad ones get the precise status and reach nothing.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::{Sha256, Sha512};

use crate::common::*;

const CLOCKIFY_SECRET: &str = "YC6Je9nBl50faeycgNIAqlztlAwpGAAi";

fn config(receiver: &Receiver) -> String {
    format!(
        r#"
[server]
max_body_size = "4KiB"
[storage]
data_dir = "{{dir}}/data"
[sources.clockify]
kind = "clockify"
secrets = ["old-secret-being-rotated-out", "{CLOCKIFY_SECRET}"]
[sources.clockodo]
kind = "clockodo"
path = "/clockodo/webhook"
secrets = ["My_Sup3r_T0k3n"]
[sources.github]
kind = "hmac"
header = "X-Hub-Signature-256"
prefix = "sha256="
secrets = ["gh-secret"]
event_header = "X-GitHub-Event"
[sources.community]
kind = "hmac"
header = "clockify-webhook-signature"
prefix = "sha256="
encoding = "base64"
algorithm = "sha512"
secrets = ["community-secret"]
event_pointer = "/event"
[sources.open]
kind = "none"
event_header = "x-event"
[sinks.out]
kind = "http"
url = "{url}"
timeout = "5s"
[[routes]]
name = "all"
to = ["out"]
"#,
        url = receiver.url()
    )
}

fn hmac256_hex(key: &str, body: &[u8]) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    m.update(body);
    hex::encode(m.finalize().into_bytes())
}

fn hmac512_b64(key: &str, body: &[u8]) -> String {
    use base64::Engine;
    let mut m = Hmac::<Sha512>::new_from_slice(key.as_bytes()).unwrap();
    m.update(body);
    base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes())
}

fn header<'a>(r: &'a Received, name: &str) -> &'a str {
    r.headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
}

#[tokio::test]
async fn valid_requests_of_every_scheme_are_delivered_byte_for_byte() {
    let receiver = Receiver::start().await;
    let bridge = TestBridge::start(&config(&receiver)).await;

    // Clockify: the byte-exact captured TIMER_STOPPED request, signed with the second (rotated-in) secret.
    let captured = read_fixture("captured/TIMER_STOPPED__jpweijers-odoo-clockify.json");
    assert_eq!(captured.len(), 1317);
    let (status, body) =
        bridge.post("/hooks/clockify", &clockify_headers(CLOCKIFY_SECRET, "TIMER_STOPPED"), captured.clone()).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["status"], "accepted");
    let clockify_id = answer["id"].as_str().unwrap().to_owned();

    // Clockodo on its configured path.
    let clockodo = read_fixture("clockodo/entry.created.json");
    let (status, _) = bridge.post("/clockodo/webhook", &[("content-type", "application/json")], clockodo.clone()).await;
    assert_eq!(status, 200);

    // Generic HMAC, GitHub style (hex, SHA-256, event in a header).
    let gh_body = br#"{"action":"opened","number":42}"#.to_vec();
    let sig = format!("sha256={}", hmac256_hex("gh-secret", &gh_body));
    let (status, _) = bridge
        .post("/hooks/github", &[("x-hub-signature-256", &sig), ("x-github-event", "pull_request")], gh_body.clone())
        .await;
    assert_eq!(status, 200);

    // Generic HMAC, the community boilerplate's header with base64 SHA-512 and the event in the body.
    let community = br#"{"event":"TIME_ENTRY_CREATED","timeEntry":{"id":"abc"}}"#.to_vec();
    let sig = format!("sha256={}", hmac512_b64("community-secret", &community));
    let (status, _) = bridge.post("/hooks/community", &[("clockify-webhook-signature", &sig)], community.clone()).await;
    assert_eq!(status, 200);

    // none.
    let open = br#"{"hello":"world"}"#.to_vec();
    let (status, _) = bridge.post("/hooks/open", &[("x-event", "ping")], open.clone()).await;
    assert_eq!(status, 200);

    let got = receiver.wait_for(5, Duration::from_secs(20)).await;
    let find = |source: &str| {
        got.iter().find(|r| header(r, "ce-source") == source).unwrap_or_else(|| panic!("nothing from {source}"))
    };
    let c = find("clockify");
    assert_eq!(c.body.as_ref(), captured.as_slice(), "clockify body must be byte-identical");
    assert_eq!(header(c, "ce-type"), "TIMER_STOPPED");
    assert_eq!(header(c, "ce-id"), clockify_id);
    assert_eq!(header(c, "ce-specversion"), "1.0");
    assert_eq!(header(c, "content-type"), "application/json");
    assert!(header(c, "ce-time").ends_with('Z'));
    assert!(c.headers.get("clockify-signature").is_none(), "the signing secret must not be forwarded");
    let k = find("clockodo");
    assert_eq!(k.body.as_ref(), clockodo.as_slice());
    assert_eq!(header(k, "ce-type"), "entry.created");
    assert_eq!(find("github").body.as_ref(), gh_body.as_slice());
    assert_eq!(header(find("github"), "ce-type"), "pull_request");
    assert_eq!(header(find("community"), "ce-type"), "TIME_ENTRY_CREATED");
    assert_eq!(find("open").body.as_ref(), open.as_slice());
    // Exactly these five, nothing else.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.received().len(), 5);
    bridge.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn bad_requests_get_precise_statuses_and_deliver_nothing() {
    let receiver = Receiver::start().await;
    let bridge = TestBridge::start(&config(&receiver)).await;
    let body = read_fixture("clockify/NEW_TIME_ENTRY.json");

    // Wrong secret, missing signature, empty signature.
    let (s, text) = bridge.post("/hooks/clockify", &clockify_headers("wrong", "NEW_TIME_ENTRY"), body.clone()).await;
    assert_eq!(s, 401);
    assert!(!text.contains("wrong"), "the answer must not echo credentials");
    let (s, _) =
        bridge.post("/hooks/clockify", &[("clockify-webhook-event-type", "NEW_TIME_ENTRY")], body.clone()).await;
    assert_eq!(s, 401);
    // Missing event type, invalid JSON (both with a valid signature).
    let (s, text) = bridge.post("/hooks/clockify", &[("clockify-signature", CLOCKIFY_SECRET)], body.clone()).await;
    assert_eq!(s, 400);
    assert!(text.contains("missing event type"), "{text}");
    let (s, _) =
        bridge.post("/hooks/clockify", &clockify_headers(CLOCKIFY_SECRET, "NEW_TIME_ENTRY"), "{not json").await;
    assert_eq!(s, 400);
    // Oversize (declared and streamed without a length).
    let big = vec![b' '; 8 * 1024];
    let (s, _) =
        bridge.post("/hooks/clockify", &clockify_headers(CLOCKIFY_SECRET, "NEW_TIME_ENTRY"), big.clone()).await;
    assert_eq!(s, 413);
    let s =
        post_chunked(bridge.addr, "/hooks/clockify", &clockify_headers(CLOCKIFY_SECRET, "NEW_TIME_ENTRY"), &big).await;
    assert_eq!(s, 413);
    // Unknown source, wrong method.
    let (s, _) = bridge.post("/hooks/nope", &clockify_headers(CLOCKIFY_SECRET, "NEW_TIME_ENTRY"), body.clone()).await;
    assert_eq!(s, 404);
    let r = client().get(bridge.url("/hooks/clockify")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers()["allow"], "POST");

    // Clockodo: wrong token, no token, no event_name.
    let (s, _) = bridge.post("/clockodo/webhook", &[], r#"{"event_name":"entry.created","token":"nope"}"#).await;
    assert_eq!(s, 401);
    let (s, _) = bridge.post("/clockodo/webhook", &[], r#"{"event_name":"entry.created"}"#).await;
    assert_eq!(s, 401);
    let (s, _) = bridge.post("/clockodo/webhook", &[], r#"{"token":"My_Sup3r_T0k3n"}"#).await;
    assert_eq!(s, 400);
    // HMAC: signature over another body, malformed signature, wrong secret.
    let gh = br#"{"a":1}"#;
    let sig = format!("sha256={}", hmac256_hex("gh-secret", b"other"));
    let (s, _) =
        bridge.post("/hooks/github", &[("x-hub-signature-256", &sig), ("x-github-event", "push")], gh.to_vec()).await;
    assert_eq!(s, 401);
    let (s, _) = bridge
        .post("/hooks/github", &[("x-hub-signature-256", "sha1=00"), ("x-github-event", "push")], gh.to_vec())
        .await;
    assert_eq!(s, 401);
    let sig = format!("sha256={}", hmac256_hex("not-the-secret", gh));
    let (s, _) =
        bridge.post("/hooks/github", &[("x-hub-signature-256", &sig), ("x-github-event", "push")], gh.to_vec()).await;
    assert_eq!(s, 401);
    let (s, _) = bridge.post("/hooks/github", &[("x-github-event", "push")], gh.to_vec()).await;
    assert_eq!(s, 401);

    let m = bridge.metrics().await;
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="bad_signature",source="clockify"}"#), 1.0, "{m}");
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="missing_signature",source="clockify"}"#), 1.0);
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="missing_event_type",source="clockify"}"#), 1.0);
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="invalid_json",source="clockify"}"#), 1.0);
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="body_too_large",source="clockify"}"#), 2.0);
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="malformed_signature",source="github"}"#), 1.0);
    assert_eq!(metric(&m, r#"hookbridge_requests_total{source="-",status="404"}"#), 1.0);

    // Nothing reached the sink, nothing was stored for delivery.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.received().is_empty());
    assert_eq!(metric(&m, "hookbridge_spool_pending_deliveries"), 0.0);
    assert!(!m.contains("My_Sup3r_T0k3n") && !m.contains(CLOCKIFY_SECRET));
    bridge.stop().await;
    receiver.stop().await;
}

/// POSTs `body` with chunked transfer encoding (no content-length) over a raw connection; returns the status.
async fn post_chunked(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head =
        format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut wire = head.into_bytes();
    for chunk in body.chunks(1024) {
        wire.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        wire.extend_from_slice(chunk);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    // The server may answer (and close) before it has read everything: a failed write is fine.
    let _ = stream.write_all(&wire).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn clockodo_handshake_is_answered_stored_and_shown_by_the_cli() {
    let receiver = Receiver::start().await;
    let bridge = TestBridge::start(&config(&receiver)).await;
    let handshake = read_fixture("clockodo/validation_handshake.json");
    let (s, _) = bridge.post("/clockodo/webhook", &[("content-type", "application/json")], handshake).await;
    assert_eq!(s, 200);
    let (s, _) = bridge.post("/clockodo/webhook?secret=0b7e1a52-5d36-4c7e-9d61-3f2b8e9c1a10", &[], "").await;
    assert_eq!(s, 200);

    // The CLI reads the running daemon's store.
    let cfg_path = bridge.dir.path().join("hookbridge.toml");
    std::fs::write(&cfg_path, config(&receiver).replace("{dir}", &bridge.dir.path().display().to_string())).unwrap();
    let out = std::process::Command::new(binary()).args(["handshakes", "--config"]).arg(&cfg_path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].ends_with("\tclockodo\t0b7e1a52-5d36-4c7e-9d61-3f2b8e9c1a10"), "{stdout}");
    assert!(lines[1].ends_with("\tclockodo\tXXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX"), "{stdout}");

    let m = bridge.metrics().await;
    assert_eq!(metric(&m, r#"hookbridge_handshakes_total{source="clockodo"}"#), 2.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.received().is_empty(), "a handshake is never routed");
    bridge.stop().await;
    receiver.stop().await;
}

/// Standard Webhooks: `v1,` signatures over `id.timestamp.body`, a tolerance window, rotation, dedup by id,
/// under the `webhook-*` header names and Svix's `svix-*` ones.
#[tokio::test]
async fn standard_webhooks_verify_tolerate_rotate_and_dedup() {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    let receiver = Receiver::start().await;
    let key = b"a-test-key-for-standard-webhooks";
    let secret = format!("whsec_{}", STANDARD.encode(key));
    let toml = format!(
        r#"
[storage]
data_dir = "{{dir}}/data"
[sources.sw]
kind = "standard-webhooks"
secrets = ["{secret}"]
tolerance = "5m"
[sinks.out]
kind = "http"
url = "{url}"
[[routes]]
name = "all"
to = ["out"]
"#,
        url = receiver.url()
    );
    let bridge = TestBridge::start(&toml).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let sig = |id: &str, ts: u64, body: &str, key: &[u8]| {
        let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
        m.update(format!("{id}.{ts}.{body}").as_bytes());
        format!("v1,{}", STANDARD.encode(m.finalize().into_bytes()))
    };
    let send = |id: &'static str, ts: u64, body: &'static str, signature: String| {
        let bridge = &bridge;
        async move {
            let ts = ts.to_string();
            let headers =
                [("webhook-id", id), ("webhook-timestamp", ts.as_str()), ("webhook-signature", signature.as_str())];
            bridge.post("/hooks/sw", &headers, body).await
        }
    };
    let body = r#"{"type":"invoice.paid","timestamp":"2026-11-22T08:00:00Z","data":{"id":"inv_1"}}"#;
    let (s, text) = send("msg_1", now, body, sig("msg_1", now, body, key)).await;
    assert_eq!(s, 200, "{text}");
    // Outside the window (and a signature that is otherwise right).
    let old = now - 600;
    assert_eq!(send("msg_2", old, body, sig("msg_2", old, body, key)).await.0, 401);
    // Tampered body.
    let tampered = r#"{"type":"invoice.paid","timestamp":"2026-11-22T08:00:00Z","data":{"id":"inv_2"}}"#;
    assert_eq!(send("msg_3", now, tampered, sig("msg_3", now, body, key)).await.0, 401);
    // Rotation: an old key's signature first, the valid one second.
    let both = format!("{} {}", sig("msg_4", now, tampered, b"an-old-retired-key"), sig("msg_4", now, tampered, key));
    assert_eq!(send("msg_4", now, tampered, both).await.0, 200);
    // The provider retries msg_1: answered 200, not delivered again.
    let (s, text) = send("msg_1", now, body, sig("msg_1", now, body, key)).await;
    assert_eq!((s, text.contains("duplicate")), (200, true), "{text}");
    // A sender that delivers through Svix: the same scheme under `svix-*` names, and its retry a duplicate.
    let svix = |id: &'static str, signature: String| {
        let bridge = &bridge;
        async move {
            let ts = now.to_string();
            let headers = [("svix-id", id), ("svix-timestamp", ts.as_str()), ("svix-signature", signature.as_str())];
            bridge.post("/hooks/sw", &headers, body).await
        }
    };
    let (s, text) = svix("msg_svix", sig("msg_svix", now, body, key)).await;
    assert_eq!((s, text.contains("accepted")), (200, true), "{text}");
    assert_eq!(svix("msg_svix_bad", sig("msg_svix_bad", now, body, b"not-the-key")).await.0, 401);
    let (s, text) = svix("msg_svix", sig("msg_svix", now, body, key)).await;
    assert_eq!((s, text.contains("duplicate")), (200, true), "{text}");

    let got = receiver.wait_for(3, Duration::from_secs(20)).await;
    assert_eq!(got[0].headers["ce-type"], "invoice.paid");
    assert!(got[0].headers.get("webhook-signature").is_none());
    assert!(got.iter().all(|r| r.headers.get("svix-signature").is_none()), "signatures are not forwarded");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.received().len(), 3);
    let m = bridge.metrics().await;
    assert_eq!(
        metric(&m, r#"hookbridge_rejections_total{reason="timestamp_out_of_tolerance",source="sw"}"#),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="bad_signature",source="sw"}"#), 2.0);
    assert_eq!(metric(&m, r#"hookbridge_duplicates_total{source="sw"}"#), 2.0);
    bridge.stop().await;
    receiver.stop().await;
}

/// Rotation with validity windows: a secret past its `not_after` is refused; the matched-secret metric shows
/// which secret requests use.
#[tokio::test]
async fn secrets_past_their_window_are_refused_and_matches_are_counted() {
    let receiver = Receiver::start().await;
    let toml = format!(
        r#"
[storage]
data_dir = "{{dir}}/data"
[sources.clockify]
kind = "clockify"
secrets = [
  {{ value = "retired-secret", not_after = "2020-01-01T00:00:00Z" }},
  {{ value = "current-secret", not_before = "2020-01-01T00:00:00Z" }},
  {{ value = "future-secret", not_before = "2999-01-01T00:00:00Z" }},
]
[sinks.out]
kind = "http"
url = "{url}"
[[routes]]
name = "all"
to = ["out"]
"#,
        url = receiver.url()
    );
    let bridge = TestBridge::start(&toml).await;
    let body = read_fixture("clockify/NEW_TIME_ENTRY.json");
    assert_eq!(
        bridge.post("/hooks/clockify", &clockify_headers("retired-secret", "NEW_TIME_ENTRY"), body.clone()).await.0,
        401
    );
    assert_eq!(
        bridge.post("/hooks/clockify", &clockify_headers("future-secret", "NEW_TIME_ENTRY"), body.clone()).await.0,
        401
    );
    assert_eq!(
        bridge.post("/hooks/clockify", &clockify_headers("current-secret", "NEW_TIME_ENTRY"), body.clone()).await.0,
        200
    );
    let m = bridge.metrics().await;
    assert_eq!(metric(&m, r#"hookbridge_secret_matches_total{secret="1",source="clockify"}"#), 1.0, "{m}");
    assert_eq!(metric(&m, r#"hookbridge_secret_matches_total{secret="0",source="clockify"}"#), 0.0);
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="bad_signature",source="clockify"}"#), 2.0);
    receiver.wait_for(1, Duration::from_secs(20)).await;
    bridge.stop().await;
    receiver.stop().await;
}

/// An `hmac` source with a signed timestamp (Slack's `v0:{timestamp}:{body}`): the signature covers the
/// timestamp, and a captured request is refused once it is older than the tolerance. `hookbridge send` signs
/// it as the provider would.
#[tokio::test(flavor = "multi_thread")]
async fn hmac_with_a_signed_timestamp_refuses_stale_and_restamped_requests() {
    let receiver = Receiver::start().await;
    let bridge = TestBridge::start(&format!(
        r#"
[storage]
data_dir = "{{dir}}/data"
[sources.slack]
kind = "hmac"
header = "X-Slack-Signature"
prefix = "v0="
secrets = ["slack-signing-secret"]
event_pointer = "/type"
timestamp_header = "X-Slack-Request-Timestamp"
timestamp_tolerance = "5m"
signed_payload = "v0:{{timestamp}}:{{body}}"
[sinks.out]
kind = "http"
url = "{url}"
[[routes]]
name = "all"
to = ["out"]
"#,
        url = receiver.url()
    ))
    .await;
    let body = r#"{"type":"event_callback","event_id":"Ev1"}"#;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let signed = |ts: u64| format!("v0={}", hmac256_hex("slack-signing-secret", format!("v0:{ts}:{body}").as_bytes()));
    let post = |ts: u64, signature: String| {
        let bridge = &bridge;
        async move {
            let ts = ts.to_string();
            let headers = [("x-slack-request-timestamp", ts.as_str()), ("x-slack-signature", signature.as_str())];
            bridge.post("/hooks/slack", &headers, body).await.0
        }
    };
    assert_eq!(post(now, signed(now)).await, 200);
    // The same signature under a fresh timestamp: the signature covers the timestamp.
    assert_eq!(post(now + 1, signed(now)).await, 401);
    // Ten minutes old, correctly signed: outside the tolerance.
    assert_eq!(post(now - 600, signed(now - 600)).await, 401);
    // The body alone signed (no timestamp in the signed text).
    assert_eq!(post(now, format!("v0={}", hmac256_hex("slack-signing-secret", body.as_bytes()))).await, 401);
    // `hookbridge send` plays Slack.
    let file = bridge.dir.path().join("slack.json");
    std::fs::write(&file, r#"{"type":"event_callback","event_id":"Ev2"}"#).unwrap();
    let out = std::process::Command::new(binary())
        .args(["send", "--source", "slack", "--url", &bridge.url("/hooks/slack"), "--config"])
        .arg(bridge.config_file())
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = receiver.wait_for(2, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 2);
    let m = bridge.metrics().await;
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="bad_signature",source="slack"}"#), 2.0, "{m}");
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="timestamp_out_of_tolerance",source="slack"}"#), 1.0);
    bridge.stop().await;
    receiver.stop().await;
}
