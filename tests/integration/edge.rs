//! The internet-facing edge: connection limits and timeouts, permits only for what is verified, oversized
//! heads, the internal listener apart from the webhook one, `/metrics` whose cost does not grow with the
//! spool, bounded unrouted events, and TLS with certificate reload. The connection tests run the real binary
//! and count its descriptors in `/proc`.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

const SECRET: &str = "edge-secret";

/// Open file descriptors of process `pid`.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Threads of process `pid`.
fn threads(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

/// A child daemon on free ports, killed when dropped.
struct Daemon {
    child: std::process::Child,
    port: u16,
    internal: u16,
    _dir: tempfile::TempDir,
    log: std::path::PathBuf,
}

impl Daemon {
    /// Starts `hookbridge run` with `[server]` lines `server` and the rest of the config `rest`
    /// (`{dir}` is the daemon's folder).
    async fn start(server: &str, rest: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let (port, internal) = (free_port(), free_port());
        let config = dir.path().join("hookbridge.toml");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ninternal_listen = \"127.0.0.1:{internal}\"\n{server}\n{rest}"
        )
        .replace("{dir}", &dir.path().display().to_string());
        std::fs::write(&config, text).unwrap();
        let log = dir.path().join("daemon.log");
        let child = spawn_daemon(&config, &log);
        wait_healthy(&format!("http://127.0.0.1:{internal}/readyz")).await;
        Daemon { child, port, internal, _dir: dir, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn internal_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.internal)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn metrics(&self) -> String {
        client().get(self.internal_url("/metrics")).send().await.unwrap().text().await.unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const CLOCKIFY_TO_FILE: &str = r#"
[storage]
data_dir = "{dir}/data"
[sources.clockify]
kind = "clockify"
secrets = ["edge-secret"]
[sinks.out]
kind = "file"
path = "{dir}/out.jsonl"
[[routes]]
name = "all"
to = ["out"]
"#;

/// Posts a signed Clockify webhook with a distinct body; returns the status and how long it took.
async fn signed(url: &str, n: usize) -> (u16, Duration) {
    let started = Instant::now();
    let body = format!(r#"{{"id":"entry-{n}","description":"edge"}}"#);
    let mut req = client().post(url).body(body);
    for (k, v) in clockify_headers(SECRET, "NEW_TIME_ENTRY") {
        req = req.header(k, v);
    }
    let status = req.send().await.map(|r| r.status().as_u16()).unwrap_or(0);
    (status, started.elapsed())
}

/// True once the peer closed `stream` (a read gives end of file or an error).
async fn closed_by_peer(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // An answer (e.g. 408 or 431) before the close: keep reading.
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_and_half_sent_connections_are_closed_while_signed_webhooks_keep_getting_200() {
    let d = Daemon::start("header_timeout = \"3s\"\nmax_connections = 100", CLOCKIFY_TO_FILE).await;
    let baseline = descriptors(d.pid());
    // 150 connections that send nothing and 150 that send half a request line and stop: three times the cap.
    let mut idle = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect(("127.0.0.1", d.port)).await.unwrap();
        if i % 2 == 1 {
            s.write_all(b"POST /hooks/clockify HTT").await.unwrap();
        }
        idle.push(s);
    }
    // The daemon holds at most max_connections of them; the rest wait in the listen backlog.
    let held = descriptors(d.pid());
    assert!(held <= baseline + 100 + 8, "descriptors went from {baseline} to {held} with max_connections = 100");
    // Signed webhooks still get 200 (they wait at most one header timeout for a slot).
    let mut worst = Duration::ZERO;
    for n in 0..20 {
        let (status, took) = signed(&d.url("/hooks/clockify"), n).await;
        assert_eq!(status, 200, "signed webhook {n} while 300 idle connections are open");
        worst = worst.max(took);
    }
    println!("worst signed webhook latency with 300 idle connections: {worst:?}");
    // Every idle or half-sent connection is closed by the daemon within a few header timeouts (those in the
    // backlog are accepted as slots free, then time out in turn).
    for (i, s) in idle.iter_mut().enumerate() {
        assert!(closed_by_peer(s, Duration::from_secs(15)).await, "connection {i} was never closed");
    }
    let after = poll_until(Duration::from_secs(10), || {
        let n = descriptors(d.pid());
        (n <= baseline + 4).then_some(n)
    })
    .await;
    assert!(after.is_some(), "descriptors stayed at {} (baseline {baseline})", descriptors(d.pid()));
    let m = d.metrics().await;
    assert!(
        metric(&m, r#"hookbridge_connection_errors_total{listener="webhook",reason="header_timeout"}"#) >= 100.0,
        "{m}"
    );
    assert!(metric(&m, r#"hookbridge_connection_limit_waits_total{listener="webhook"}"#) >= 1.0, "{m}");
    assert!(d.log().contains("connection limit reached"), "no log line for the limit:\n{}", d.log());
    assert!(!d.log().contains("panicked"), "{}", d.log());
}

const MIXED_SOURCES: &str = r#"
[storage]
data_dir = "{dir}/data"
[sources.clockify]
kind = "clockify"
secrets = ["edge-secret"]
[sources.github]
kind = "hmac"
header = "X-Hub-Signature-256"
prefix = "sha256="
secrets = ["gh-secret"]
event_header = "X-GitHub-Event"
[sinks.out]
kind = "file"
path = "{dir}/out.jsonl"
[[routes]]
name = "all"
to = ["out"]
"#;

/// Sends the head of a POST promising `len` body bytes and `sent` of them, then stalls.
async fn stalled_post(port: u16, path: &str, headers: &str, len: usize, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n{headers}\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b' '; sent]).await.unwrap();
    s
}

/// The status line's code of what the peer answered on `s`, if it answers within `within`.
async fn answered(s: &mut TcpStream, within: Duration) -> Option<u16> {
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(within, s.read(&mut buf)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&buf[..n]);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_unverified_bodies_never_hold_the_permits_that_signed_webhooks_need() {
    let d = Daemon::start("max_concurrency = 8\nmax_unverified = 4\nbody_timeout = \"20s\"", MIXED_SOURCES).await;
    // Unsigned slow bodies to the Clockify source are refused from their headers, before the body: 401 at
    // once, no permit taken.
    let mut unsigned = Vec::new();
    for _ in 0..50 {
        unsigned.push(stalled_post(d.port, "/hooks/clockify", "", 100_000, 10).await);
    }
    for s in &mut unsigned {
        assert_eq!(answered(s, Duration::from_secs(5)).await, Some(401));
    }
    // Wrongly signed slow bodies to the hmac source fill the small unverified budget; the rest get 503 at once.
    let fake = format!("X-Hub-Signature-256: sha256={}\r\nX-GitHub-Event: push\r\n", "ab".repeat(32));
    let mut slow = Vec::new();
    for _ in 0..30 {
        slow.push(stalled_post(d.port, "/hooks/github", &fake, 100_000, 10).await);
    }
    // Meanwhile every signed Clockify webhook gets 200: verified requests have permits of their own.
    for n in 0..20 {
        assert_eq!(signed(&d.url("/hooks/clockify"), n).await.0, 200, "signed webhook {n}");
    }
    // The slow bodies are cut by the minimum body rate (408), never left to hold their permits for the
    // 20 s body timeout; those over the budget got 503.
    let (mut timed_out, mut refused) = (0, 0);
    for s in &mut slow {
        match answered(s, Duration::from_secs(10)).await {
            Some(408) => timed_out += 1,
            Some(503) => refused += 1,
            other => panic!("a stalled hmac body was answered {other:?}"),
        }
    }
    assert_eq!(timed_out, 4, "the unverified budget is 4");
    assert_eq!(refused, 26);
    let m = d.metrics().await;
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="body_too_slow",source="github"}"#), 4.0, "{m}");
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="missing_signature",source="clockify"}"#), 50.0, "{m}");
    // With the budget free again, a correctly signed hmac webhook is accepted.
    let body = br#"{"ref":"main"}"#;
    let scheme = hookbridge::verify::HmacScheme::new(
        "X-Hub-Signature-256",
        "sha256=".into(),
        hookbridge::verify::SignatureEncoding::Hex,
        hookbridge::verify::HmacAlgorithm::Sha256,
        vec![],
        hookbridge::verify::Locator::Header("x-github-event".into()),
        None,
    );
    let signature = scheme.sign(&hookbridge::config::SecretString::new("gh-secret"), body);
    let r = client()
        .post(d.url("/hooks/github"))
        .header("X-Hub-Signature-256", signature)
        .header("X-GitHub-Event", "push")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_head_gets_431_and_nothing_is_stored() {
    let bridge = TestBridge::start(CLOCKIFY_TO_FILE).await;
    for size in [20 * 1024, 200 * 1024] {
        let mut s = TcpStream::connect(bridge.addr).await.unwrap();
        let big = "a".repeat(size);
        let head = format!(
            "POST /hooks/clockify HTTP/1.1\r\nHost: x\r\nclockify-signature: {SECRET}\r\n\
             clockify-webhook-event-type: NEW_TIME_ENTRY\r\nx-padding: {big}\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        // The daemon may answer and close before it has read everything; a failed write is fine.
        let _ = s.write_all(head.as_bytes()).await;
        assert_eq!(answered(&mut s, Duration::from_secs(5)).await, Some(431), "a {size}-byte header");
    }
    // A head just under the limit is served.
    let padding = "a".repeat(8 * 1024);
    let mut headers = clockify_headers(SECRET, "NEW_TIME_ENTRY");
    headers.push(("x-padding", &padding));
    let (status, _) = bridge.post("/hooks/clockify", &headers, "{}").await;
    assert_eq!(status, 200);
    let m = bridge.metrics().await;
    assert_eq!(metric(&m, r#"hookbridge_events_routed_total{source="clockify"}"#), 1.0, "only the small one: {m}");
    assert_eq!(metric(&m, r#"hookbridge_connection_errors_total{listener="webhook",reason="header_too_large"}"#), 2.0);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_dashboard_and_live_channels_are_only_on_the_internal_listener_behind_its_token() {
    let token = "internal-token-0123456789";
    let bridge = TestBridge::start(&format!(
        r#"
[server]
internal_token = "{token}"
[storage]
data_dir = "{{dir}}/data"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[plugins.dashboard]
path = "{wasm}"
[[routes]]
name = "dashboard"
to = ["dashboard"]
"#,
        wasm = crate::plugins::wasm("dashboard").display()
    ))
    .await;
    for path in ["/metrics", "/dashboard", "/live/dashboard", "/live/x1"] {
        let r = client().get(bridge.url(path)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 404, "{path} on the webhook listener");
    }
    assert_eq!(client().get(bridge.url("/healthz")).send().await.unwrap().status().as_u16(), 200);
    let ready = client().get(bridge.url("/readyz")).send().await.unwrap().text().await.unwrap();
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready, serde_json::json!({"status": "ready"}), "no detail on the webhook listener");
    // The internal listener wants the token, as a bearer (any case) or, for a browser, in the query.
    for path in ["/metrics", "/dashboard", "/readyz"] {
        let r = client().get(bridge.internal_url(path)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path} without the token");
        let r = client().get(bridge.internal_url(path)).bearer_auth("wrong-token-0123456789").send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path} with a wrong token");
        let r = client()
            .get(bridge.internal_url(path))
            .header("authorization", format!("bearer {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path} with the token");
    }
    let r = client().get(bridge.internal_url(&format!("/dashboard?token={token}"))).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(client().get(bridge.internal_url("/healthz")).send().await.unwrap().status().as_u16(), 200);
    // A flood of GETs for channels nobody publishes to creates none: the plugin's channel still works.
    let mut streams = Vec::new();
    for n in 0..300 {
        let r = client().get(bridge.internal_url(&format!("/live/x{n}?token={token}"))).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        streams.push(r);
    }
    let mut body = read_fixture("clockify/NEW_TIMER_STARTED.json");
    body.retain(|b| *b != b'\n');
    let (status, _) = bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIMER_STARTED"), body).await;
    assert_eq!(status, 200);
    let got = poll_live(&bridge, token).await;
    assert!(got.get("running").is_some(), "the dashboard plugin's snapshot: {got}");
    drop(streams);
    bridge.stop().await;
}

/// The dashboard channel's last payload, read with the internal token, within 20 seconds.
async fn poll_live(bridge: &TestBridge, token: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut r = client().get(bridge.internal_url(&format!("/live/dashboard?token={token}"))).send().await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), async {
            let mut text = String::new();
            while let Ok(Some(chunk)) = r.chunk().await {
                text.push_str(&String::from_utf8_lossy(&chunk));
                if let Some(line) = text.lines().find(|l| l.starts_with("data:")) {
                    return serde_json::from_str::<serde_json::Value>(line.trim_start_matches("data:").trim()).ok();
                }
            }
            None
        })
        .await;
        if let Ok(Some(v)) = got {
            return v;
        }
        assert!(Instant::now() < deadline, "no payload on /live/dashboard");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_unrouted_events_reaches_its_own_limit_gets_503_and_recovers() {
    let bridge = TestBridge::start(
        r#"
[storage]
data_dir = "{dir}/data"
max_unrouted_events = 20
retention = "3s"
dedup_window = "1s"
[sources.clockify]
kind = "clockify"
secrets = ["edge-secret"]
[sinks.out]
kind = "file"
path = "{dir}/out.jsonl"
[[routes]]
name = "entries"
events = ["NEW_TIME_ENTRY"]
to = ["out"]
"#,
    )
    .await;
    let post = |event: &'static str, n: usize| {
        let body = format!(r#"{{"id":"u-{n}"}}"#);
        let url = bridge.url("/hooks/clockify");
        async move {
            let mut req = client().post(url).body(body);
            for (k, v) in clockify_headers(SECRET, event) {
                req = req.header(k, v);
            }
            let r = req.send().await.unwrap();
            let retry_after = r.headers().get("retry-after").is_some();
            (r.status().as_u16(), retry_after, r.text().await.unwrap())
        }
    };
    for n in 0..20 {
        let (status, _, text) = post("TAG_CREATED", n).await;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("unrouted"), "{text}");
    }
    let (status, retry_after, _) = post("TAG_CREATED", 20).await;
    assert_eq!((status, retry_after), (503, true), "the 21st unrouted event");
    // Routed events have their own budget and are still accepted.
    let (status, _, text) = post("NEW_TIME_ENTRY", 21).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("accepted"));
    let m = bridge.metrics().await;
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="unrouted_full",source="clockify"}"#), 1.0);
    // Once retention prunes the unrouted events, they are accepted again, without a restart.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 100;
    loop {
        let (status, _, _) = post("TAG_CREATED", n).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(Instant::now() < deadline, "unrouted events were never accepted again");
        tokio::time::sleep(Duration::from_millis(200)).await;
        n += 1;
    }
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scrapes_of_metrics_cost_the_same_with_100k_pending_deliveries() {
    // A spool holding 100k pending deliveries to a sink that never answers, written before the daemon starts.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let store = hookbridge::store::Store::open(&data).unwrap();
        let mut batch = Vec::new();
        for n in 0..100_000u32 {
            let event = hookbridge::event::Event {
                id: uuid::Uuid::now_v7().to_string(),
                source: "clockify".into(),
                event_type: "NEW_TIME_ENTRY".into(),
                received_at_ms: hookbridge::event::now_ms(),
                headers: Vec::new(),
                body: bytes::Bytes::from(format!(r#"{{"id":"{n}"}}"#)),
                dedup_key: format!("k{n}"),
                ordering_key: None,
                body_is_json: false,
            };
            batch.push(store.insert(event, vec!["down".into()], hookbridge::store::Dedup::Off));
            if batch.len() == 2000 {
                for r in futures_util::future::join_all(std::mem::take(&mut batch)).await {
                    r.unwrap();
                }
            }
        }
        store.close().await;
    }
    let (_down, addr) = hung_receiver().await;
    let rest = format!(
        r#"
[storage]
data_dir = "{}"
max_pending_events = 200000
[sources.clockify]
kind = "clockify"
secrets = ["edge-secret"]
[sinks.down]
kind = "http"
url = "http://{addr}/in"
timeout = "1s"
max_in_flight = 1
[sinks.out]
kind = "file"
path = "{{dir}}/out.jsonl"
[[routes]]
name = "all"
events = ["NEW_TAG"]
to = ["out"]
"#,
        data.display()
    );
    let d = Daemon::start("max_connections = 64", &rest).await;
    let m = d.metrics().await;
    assert!(metric(&m, "hookbridge_spool_pending_deliveries") >= 100_000.0, "{m}");
    let (fds, tasks) = (descriptors(d.pid()), threads(d.pid()));
    let base_latency = latency_of_webhooks(&d, 0).await;
    // 400 concurrent scrapes while webhooks are sent.
    let scrapes: Vec<_> = (0..400)
        .map(|_| {
            let url = d.internal_url("/metrics");
            tokio::spawn(async move { client().get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0) })
        })
        .collect();
    let loaded_latency = latency_of_webhooks(&d, 100).await;
    let during = (descriptors(d.pid()), threads(d.pid()));
    for s in scrapes {
        assert_eq!(s.await.unwrap(), 200);
    }
    println!("webhook latency: {base_latency:?} alone, {loaded_latency:?} during 400 scrapes");
    // Scrapes read a snapshot: no spool reads, so no blocking threads or read connections pile up; the
    // internal listener holds at most its 64 connections.
    assert!(during.0 <= fds + 64 + 8, "descriptors {fds} -> {}", during.0);
    assert!(during.1 <= tasks + 4, "threads {tasks} -> {}", during.1);
    assert!(loaded_latency < Duration::from_secs(2), "webhooks slowed to {loaded_latency:?}");
}

/// The median time of 20 signed webhooks (routed to the file sink).
async fn latency_of_webhooks(d: &Daemon, offset: usize) -> Duration {
    let mut took = Vec::new();
    for n in 0..20 {
        let started = Instant::now();
        let body = format!(r#"{{"id":"tag-{}"}}"#, n + offset);
        let mut req = client().post(d.url("/hooks/clockify")).body(body);
        for (k, v) in clockify_headers(SECRET, "NEW_TAG") {
            req = req.header(k, v);
        }
        assert_eq!(req.send().await.unwrap().status().as_u16(), 200);
        took.push(started.elapsed());
    }
    took.sort();
    took[took.len() / 2]
}

/// A throw-away CA and a certificate for 127.0.0.1 signed by it, made with `openssl`, as
/// `<name>.crt`/`<name>.key` in `dir`; returns the certificate's DER.
pub fn make_cert(dir: &Path, name: &str, ca: &str) -> Vec<u8> {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    if !dir.join(format!("{ca}.crt")).exists() {
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=hookbridge test CA",
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.crt"),
        ]);
    }
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &format!("{name}.key"),
        "-out",
        &format!("{name}.csr"),
    ]);
    std::fs::write(dir.join(format!("{name}.ext")), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &format!("{name}.csr"),
        "-CA",
        &format!("{ca}.crt"),
        "-CAkey",
        &format!("{ca}.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &format!("{name}.ext"),
        "-out",
        &format!("{name}.crt"),
    ]);
    let pem = std::fs::read(dir.join(format!("{name}.crt"))).unwrap();
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap().to_vec()
}

/// A TLS client that trusts the test CA in `dir`, presenting `<client>.crt` when given.
fn tls_connector(dir: &Path, client: Option<&str>) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(dir.join("ca.crt")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(name) => {
            let chain = rustls::pki_types::CertificateDer::pem_file_iter(dir.join(format!("{name}.crt")))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(dir: &Path, port: u16) -> Tls {
    try_tls_connect(dir, port, None).await.unwrap()
}

async fn try_tls_connect(dir: &Path, port: u16, client: Option<&str>) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tls_connector(dir, client).connect(name, tcp).await
}

/// `GET path` on `stream`; the answer's status (0 when the peer closed or refused).
async fn tls_get(stream: &mut Tls, path: &str) -> u16 {
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return 0;
    }
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0),
        _ => 0,
    }
}

/// Sends one signed webhook on `stream` (kept alive) and returns the answer's status.
async fn tls_webhook(stream: &mut Tls, n: usize) -> u16 {
    let body = format!(r#"{{"id":"tls-{n}"}}"#);
    let request = format!(
        "POST /hooks/clockify HTTP/1.1\r\nHost: 127.0.0.1\r\nclockify-signature: {SECRET}\r\n\
         clockify-webhook-event-type: NEW_TIME_ENTRY\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await.unwrap().unwrap();
    String::from_utf8_lossy(&buf[..n]).get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn presented(stream: &Tls) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_over_tls_and_a_renewed_certificate_is_served_after_a_reload_without_dropping_connections() {
    let certs = tempfile::tempdir().unwrap();
    let first = make_cert(certs.path(), "first", "ca");
    std::fs::copy(certs.path().join("first.crt"), certs.path().join("live.crt")).unwrap();
    std::fs::copy(certs.path().join("first.key"), certs.path().join("live.key")).unwrap();
    let server = format!(
        "tls = {{ cert = \"{0}/live.crt\", key = \"{0}/live.key\" }}\nheader_timeout = \"30s\"",
        certs.path().display()
    );
    let d = Daemon::start(&server, CLOCKIFY_TO_FILE).await;
    let mut kept = tls_connect(certs.path(), d.port).await;
    assert_eq!(presented(&kept), first);
    assert_eq!(tls_webhook(&mut kept, 0).await, 200);
    // Plain HTTP on the TLS port is not served.
    assert!(client().get(d.url("/healthz")).send().await.is_err());
    // Renew: the files are replaced (as certbot does), then the daemon is told with SIGHUP.
    let second = make_cert(certs.path(), "second", "ca");
    assert_ne!(first, second);
    std::fs::copy(certs.path().join("second.key"), certs.path().join("live.key.new")).unwrap();
    std::fs::copy(certs.path().join("second.crt"), certs.path().join("live.crt.new")).unwrap();
    std::fs::rename(certs.path().join("live.key.new"), certs.path().join("live.key")).unwrap();
    std::fs::rename(certs.path().join("live.crt.new"), certs.path().join("live.crt")).unwrap();
    let status = std::process::Command::new("kill").args(["-HUP", &d.pid().to_string()]).status().unwrap();
    assert!(status.success());
    let renewed = poll_until_async(Duration::from_secs(15), || async {
        let s = tls_connect(certs.path(), d.port).await;
        (presented(&s) == second).then_some(s)
    })
    .await;
    let mut renewed = renewed.expect("new connections never saw the renewed certificate");
    assert_eq!(tls_webhook(&mut renewed, 1).await, 200);
    // The connection opened before the reload still works, with its certificate.
    assert_eq!(tls_webhook(&mut kept, 2).await, 200);
    assert_eq!(presented(&kept), first);
    // A renewal without SIGHUP: the daemon sees the files change by itself.
    let third = make_cert(certs.path(), "third", "ca");
    std::fs::copy(certs.path().join("third.key"), certs.path().join("live.key.new")).unwrap();
    std::fs::copy(certs.path().join("third.crt"), certs.path().join("live.crt.new")).unwrap();
    std::fs::rename(certs.path().join("live.key.new"), certs.path().join("live.key")).unwrap();
    std::fs::rename(certs.path().join("live.crt.new"), certs.path().join("live.crt")).unwrap();
    let watched = poll_until_async(Duration::from_secs(20), || async {
        let s = tls_connect(certs.path(), d.port).await;
        (presented(&s) == third).then_some(s)
    })
    .await;
    assert!(watched.is_some(), "the changed files were never picked up without a reload");
    // A broken file (a key that does not match) keeps the current certificate, with an error in the log.
    std::fs::copy(certs.path().join("first.key"), certs.path().join("live.key")).unwrap();
    let status = std::process::Command::new("kill").args(["-HUP", &d.pid().to_string()]).status().unwrap();
    assert!(status.success());
    let logged = poll_until(Duration::from_secs(15), || d.log().contains("reload failed").then_some(())).await;
    assert!(logged.is_some(), "no error for a key that does not match:\n{}", d.log());
    let mut s = tls_connect(certs.path(), d.port).await;
    assert_eq!(presented(&s), third);
    assert_eq!(tls_webhook(&mut s, 3).await, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_internal_listener_can_require_client_certificates() {
    let certs = tempfile::tempdir().unwrap();
    make_cert(certs.path(), "server", "ca");
    make_cert(certs.path(), "client", "ca");
    // A client certificate from another CA.
    make_cert(certs.path(), "stranger", "other-ca");
    let bridge = TestBridge::start(&format!(
        r#"
[server]
internal_tls = {{ cert = "{0}/server.crt", key = "{0}/server.key", client_ca = "{0}/ca.crt" }}
{CLOCKIFY_TO_FILE}"#,
        certs.path().display()
    ))
    .await;
    let port = bridge.internal.port();
    let mut trusted = try_tls_connect(certs.path(), port, Some("client")).await.unwrap();
    assert_eq!(tls_get(&mut trusted, "/metrics").await, 200);
    // Without a certificate, or with one the CA did not sign, nothing is served (TLS 1.3 may finish the
    // handshake on the client's side before the server refuses it: then the request gets no answer).
    for client in [None, Some("stranger")] {
        if let Ok(mut s) = try_tls_connect(certs.path(), port, client).await {
            assert_eq!(tls_get(&mut s, "/metrics").await, 0, "client certificate {client:?}");
        }
    }
    // The webhook listener is unaffected.
    let (status, _) = bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), "{}").await;
    assert_eq!(status, 200);
    bridge.stop().await;
}

/// Like `poll_until`, for an async probe.
async fn poll_until_async<T, F: std::future::Future<Output = Option<T>>>(
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
