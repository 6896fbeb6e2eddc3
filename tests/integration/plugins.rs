//! WebAssembly plugins against the real host: the example plugin's emits reach an HTTP sink (also across a
//! SIGKILL), the sandbox holds (time, memory, files, hosts, panics) while the daemon keeps serving, key-value
//! state persists and is private, an incompatible interface version is refused, and `plugin test` shows
//! what the daemon does. The components are built by `scripts/build-plugins` (the test command runs it).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

const SECRET: &str = "plugin-secret";

/// Path of a built example plugin.
pub fn wasm(name: &str) -> PathBuf {
    let path = repo_root().join("plugins/target/wasm32-wasip2/release").join(format!("{name}.wasm"));
    assert!(path.is_file(), "{} is missing: run scripts/build-plugins (scripts/test does)", path.display());
    path
}

fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn entry(id: &str, billable: bool) -> String {
    let body = String::from_utf8(read_fixture("clockify/NEW_TIME_ENTRY.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["id"] = serde_json::json!(id);
    v["billable"] = serde_json::json!(billable);
    v.to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_example_plugins_emit_reaches_an_http_sink_even_across_a_sigkill() {
    // The sink is down at first, so the emitted event is still pending when the daemon is killed.
    let (down, addr) = hung_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let internal = free_port();
    let config = dir.path().join("hookbridge.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
internal_listen = "127.0.0.1:{internal}"
[storage]
data_dir = "data"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[sinks.billing]
kind = "http"
url = "http://{addr}/in"
timeout = "300ms"
retry = {{ initial_backoff = "50ms", max_backoff = "200ms" }}
[plugins.billable]
path = "{wasm}"
config = {{ sink = "billing" }}
[[routes]]
name = "entries"
events = ["NEW_TIME_ENTRY"]
to = ["billable"]
"#,
            wasm = wasm("billable_filter").display()
        ),
    )
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let mut daemon = spawn_daemon(&config, &dir.path().join("daemon1.log"));
    wait_healthy(&format!("{base}/healthz")).await;
    let post = |body: String| {
        let url = format!("{base}/hooks/clockify");
        async move {
            let mut req = client().post(url).body(body);
            for (k, v) in clockify_headers(SECRET, "NEW_TIME_ENTRY") {
                req = req.header(k, v);
            }
            req.send().await.unwrap().status().as_u16()
        }
    };
    assert_eq!(post(entry("billable-1", true)).await, 200);
    assert_eq!(post(entry("not-billable", false)).await, 200);
    // The plugin ran (its emit is stored, waiting for the sink), then the daemon dies.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m =
            client().get(format!("http://127.0.0.1:{internal}/metrics")).send().await.unwrap().text().await.unwrap();
        if metric(&m, r#"hookbridge_plugin_invocations_total{plugin="billable"}"#) >= 2.0
            && metric(&m, r#"hookbridge_deliveries_total{outcome="retry",sink="billing"}"#) >= 1.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "the plugin never ran:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.kill().unwrap();
    daemon.wait().unwrap();

    let receiver = Receiver::start_on(down.up().await).await;
    let mut daemon = spawn_daemon(&config, &dir.path().join("daemon2.log"));
    wait_healthy(&format!("{base}/healthz")).await;
    let got = receiver.wait_for(1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 1, "one billable entry, emitted once");
    let r = &got[0];
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["entryId"], "billable-1");
    assert_eq!(body["durationSeconds"], 42480);
    assert_eq!(r.headers["ce-type"], "billable.NEW_TIME_ENTRY");
    assert_eq!(r.headers["ce-source"], "billable", "emitted events come from the plugin");
    assert_eq!(r.headers["content-type"], "application/json");
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}

/// The Clockify event type that routes to the sandbox plugin `id` (routes of Clockify sources name Clockify's
/// event types; which ones does not matter here).
fn sandbox_event(id: &str) -> &'static str {
    match id {
        "loop" => "NEW_PROJECT",
        "sleep" => "PROJECT_UPDATED",
        "alloc" => "PROJECT_DELETED",
        "file" => "NEW_CLIENT",
        "http" => "CLIENT_UPDATED",
        _ => "CLIENT_DELETED",
    }
}

/// One plugin per misbehaviour, each routed by its own event type; `good` counts events.
fn sandbox_config(receiver: &str) -> String {
    let sandbox = wasm("sandbox");
    let mut toml = format!(
        r#"
[storage]
data_dir = "{{dir}}/data"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[sinks.out]
kind = "http"
url = "{receiver}"
[plugins.good]
path = "{counter}"
config = {{ channel = "good" }}
[[routes]]
name = "good"
events = ["NEW_TAG"]
to = ["good"]
"#,
        counter = wasm("counter").display()
    );
    for (id, extra) in [
        ("loop", "time_limit = \"50ms\""),
        ("sleep", "time_limit = \"100ms\""),
        ("alloc", "memory_limit = \"16MiB\""),
        ("file", ""),
        ("http", "allowed_hosts = [\"api.clockify.me\"]"),
        ("panic", ""),
    ] {
        let url = if id == "http" { ", url = \"http://127.0.0.1:9/not-allowed\"" } else { "" };
        toml.push_str(&format!(
            r#"
[plugins.{id}]
path = "{path}"
config = {{ mode = "{id}"{url} }}
retry = {{ initial_backoff = "1s", max_backoff = "1s", max_attempts = 1 }}
{extra}
[[routes]]
name = "{id}"
events = ["{upper}"]
to = ["{id}"]
"#,
            path = sandbox.display(),
            upper = sandbox_event(id)
        ));
    }
    toml
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sandbox_stops_each_misbehaviour_and_the_daemon_keeps_serving() {
    let receiver = Receiver::start().await;
    let bridge = TestBridge::start(&sandbox_config(&receiver.url())).await;
    let send = |event: &'static str| {
        let b = &bridge;
        // A body of its own each time (the same body again would be a duplicate).
        let body = format!(r#"{{"id":"{}"}}"#, uuid::Uuid::now_v7());
        async move { b.post("/hooks/clockify", &clockify_headers(SECRET, event), body).await.0 }
    };
    let mut good = 0.0;
    for (event, plugin, kind) in [
        ("NEW_PROJECT", "loop", "timeout"),
        ("PROJECT_UPDATED", "sleep", "timeout"),
        ("PROJECT_DELETED", "alloc", "memory"),
        ("NEW_CLIENT", "file", "permanent"),
        ("CLIENT_UPDATED", "http", "permanent"),
        ("CLIENT_DELETED", "panic", "trap"),
    ] {
        assert_eq!(send(event).await, 200);
        bridge
            .wait_metric(&format!(r#"hookbridge_plugin_failures_total{{kind="{kind}",plugin="{plugin}"}}"#), 1.0)
            .await;
        // The daemon keeps serving, and the next event to a good plugin succeeds.
        assert_eq!(send("NEW_TAG").await, 200);
        good += 1.0;
        bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="good"}"#, good).await;
    }
    // Every misbehaving delivery ended as a dead letter (max_attempts = 1), with the reason.
    for plugin in ["loop", "sleep", "alloc", "file", "http", "panic"] {
        bridge.wait_metric(&format!(r#"hookbridge_dead_letters{{sink="{plugin}"}}"#), 1.0).await;
    }
    let dlq = bridge.cli(&["dlq", "list"]);
    for reason in [
        "stopped after its time limit of 50ms",
        "stopped after its time limit of 100ms",
        "refused more memory than its limit of 16777216 bytes",
        "No such file or directory",
        "environment variable not found",
        "is not in this plugin's allowed_hosts",
        "panicked at",
    ] {
        assert!(dlq.contains(reason), "dead letters should say {reason:?}:\n{dlq}");
    }
    // The infinite loop was stopped near its limit, not after it ran for long.
    let m = bridge.metrics().await;
    let slow = metric(&m, r#"hookbridge_plugin_duration_seconds_bucket{plugin="loop",le="0.25"}"#);
    assert_eq!(slow, 1.0, "the loop plugin ran for more than 250 ms:\n{m}");
    // So was the 60-second sleep, inside the WASI call that waited.
    let slept = metric(&m, r#"hookbridge_plugin_duration_seconds_bucket{plugin="sleep",le="0.25"}"#);
    assert_eq!(slept, 1.0, "the sleep plugin ran for more than 250 ms:\n{m}");
    assert!(live(&bridge.internal_url(""), "sandbox").await.is_none(), "a misbehaviour went through");
    assert_eq!(live(&bridge.internal_url(""), "good").await.unwrap()["NEW_TAG"], 6);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn key_value_state_survives_a_restart_and_is_private_to_each_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[storage]
data_dir = "{data}"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[plugins.a]
path = "{counter}"
config = {{ channel = "a" }}
[plugins.b]
path = "{counter}"
config = {{ channel = "b" }}
[[routes]]
name = "to-a"
events = ["NEW_TASK"]
to = ["a"]
[[routes]]
name = "to-b"
events = ["TASK_UPDATED"]
to = ["b"]
"#,
        data = dir.path().join("data").display(),
        counter = wasm("counter").display()
    );
    let bridge = TestBridge::start(&config).await;
    for event in ["NEW_TASK", "NEW_TASK", "TASK_UPDATED"] {
        assert_eq!(
            bridge
                .post(
                    "/hooks/clockify",
                    &clockify_headers(SECRET, event),
                    format!(r#"{{"n":"{}"}}"#, uuid::Uuid::now_v7())
                )
                .await
                .0,
            200
        );
    }
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="a"}"#, 2.0).await;
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="b"}"#, 1.0).await;
    assert_eq!(live(&bridge.internal_url(""), "a").await.unwrap(), serde_json::json!({"NEW_TASK": 2}));
    assert_eq!(
        live(&bridge.internal_url(""), "b").await.unwrap(),
        serde_json::json!({"TASK_UPDATED": 1}),
        "b sees only its keys"
    );
    bridge.stop().await;

    // A new daemon on the same data directory: the channels' last payloads are there at once, and the counts
    // go on.
    let bridge = TestBridge::start(&config).await;
    assert_eq!(
        live(&bridge.internal_url(""), "a").await.unwrap(),
        serde_json::json!({"NEW_TASK": 2}),
        "kept across the restart"
    );
    assert_eq!(bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TASK"), r#"{"n":"after"}"#).await.0, 200);
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="a"}"#, 1.0).await;
    assert_eq!(live(&bridge.internal_url(""), "a").await.unwrap(), serde_json::json!({"NEW_TASK": 3}));
    bridge.stop().await;
}

/// The counter counts atomically (`wasi:keyvalue`): events handled eight at a time (no entity id, so nothing
/// orders them) all count, through `increment` and through a compare-and-swap loop alike.
#[tokio::test(flavor = "multi_thread")]
async fn events_handled_at_once_all_count_through_increments_and_compare_and_swap() {
    let bridge = TestBridge::start(&counters_config("[storage]\ndata_dir = \"{dir}/data\"\n")).await;
    let sent = post_counted(&[bridge.url("")], 120).await;
    for sink in ["inc", "cas"] {
        bridge
            .wait_metric(&format!(r#"hookbridge_deliveries_total{{outcome="delivered",sink="{sink}"}}"#), 120.0)
            .await;
    }
    assert_eq!(final_counts(&bridge, sent).await, sent);
    bridge.stop().await;
}

/// Two counters, eight events at a time each: `inc` counts with `increment`, `cas` with compare-and-swap. A
/// retried invocation counts again (delivery is at least once: the counter is not idempotent), so the time
/// limit is generous: a loaded machine's slow round trips to the store must not turn into retries here,
/// where races are the subject.
pub fn counters_config(storage: &str) -> String {
    format!(
        r#"
{storage}[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[plugins.inc]
path = "{counter}"
max_in_flight = 8
time_limit = "10s"
config = {{ channel = "inc" }}
[plugins.cas]
path = "{counter}"
max_in_flight = 8
time_limit = "10s"
config = {{ channel = "cas", via = "update" }}
[[routes]]
name = "count"
events = ["BALANCE_UPDATED"]
to = ["inc", "cas"]
"#,
        counter = wasm("counter").display()
    )
}

/// Posts `n` events of type `BALANCE_UPDATED` (distinct bodies, no entity id), 16 at a time, spread over the nodes
/// at `bases` (webhook listener URLs); every one must be accepted. Returns `n`.
pub async fn post_counted(bases: &[String], n: usize) -> u64 {
    let mut sent = 0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(16) {
        let posts = chunk.iter().map(|i| {
            let url = format!("{}/hooks/clockify", bases[i % bases.len()]);
            async move { post_to(&url, &clockify_headers(SECRET, "BALANCE_UPDATED"), format!(r#"{{"n":{i}}}"#)).await }
        });
        for (status, text) in futures_util::future::join_all(posts).await {
            assert_eq!(status, 200, "{text}");
            sent += 1;
        }
    }
    sent
}

/// With the `n` counted events delivered, one more event: handled alone, its snapshot is the last one
/// published, and exact. Returns the count both counters then show, less that extra event.
async fn final_counts(bridge: &TestBridge, n: u64) -> u64 {
    let (status, text) = bridge
        .post("/hooks/clockify", &clockify_headers(SECRET, "BALANCE_UPDATED"), r#"{"n":"last"}"#.to_owned())
        .await;
    assert_eq!(status, 200, "{text}");
    for sink in ["inc", "cas"] {
        let delivered = format!(r#"hookbridge_deliveries_total{{outcome="delivered",sink="{sink}"}}"#);
        bridge.wait_metric(&delivered, n as f64 + 1.0).await;
    }
    let inc = live(&bridge.internal_url(""), "inc").await.unwrap()["BALANCE_UPDATED"].as_u64().unwrap();
    let cas = live(&bridge.internal_url(""), "cas").await.unwrap()["BALANCE_UPDATED"].as_u64().unwrap();
    assert_eq!(inc, cas, "increment and compare-and-swap disagree");
    inc - 1
}

/// A plugin that posts through the standard `wasi:http/outgoing-handler` (the notifier) is held to the same
/// rules as the `http` import: an allow-listed host gets the request, any other is refused (the delivery
/// becomes a dead letter that says so), and `plugin test` runs it the same way.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_posts_through_wasi_http_only_to_allowed_hosts() {
    let receiver = Receiver::start().await;
    let config = format!(
        r#"
[storage]
data_dir = "{{dir}}/data"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[plugins.chat]
path = "{wasm}"
allowed_hosts = ["127.0.0.1:{port}"]
config = {{ url = "{url}", prefix = "timesheet" }}
[plugins.elsewhere]
path = "{wasm}"
allowed_hosts = ["api.clockify.me"]
config = {{ url = "{url}" }}
retry = {{ initial_backoff = "1s", max_backoff = "1s", max_attempts = 1 }}
[plugins.slow]
path = "{wasm}"
allowed_hosts = ["127.0.0.1:{port}"]
time_limit = "300ms"
config = {{ url = "{url}" }}
retry = {{ initial_backoff = "1s", max_backoff = "1s", max_attempts = 1 }}
[[routes]]
name = "chat"
events = ["NEW_TIME_ENTRY"]
to = ["chat"]
[[routes]]
name = "elsewhere"
events = ["TIMER_STOPPED"]
to = ["elsewhere"]
[[routes]]
name = "slow"
events = ["NEW_TIMER_STARTED"]
to = ["slow"]
"#,
        wasm = wasm("notifier").display(),
        port = receiver.addr.port(),
        url = receiver.url()
    );
    let bridge = TestBridge::start(&config).await;
    let body = String::from_utf8(read_fixture("clockify/NEW_TIME_ENTRY.json")).unwrap();
    assert_eq!(bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), body.clone()).await.0, 200);
    let got = receiver.wait_for(1, Duration::from_secs(20)).await;
    let message: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    let text = message["text"].as_str().unwrap();
    assert!(text.starts_with("timesheet: NEW_TIME_ENTRY ") && text.ends_with(": Test"), "{text}");
    assert_eq!(got[0].headers["content-type"], "application/json");
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="chat"}"#, 1.0).await;

    assert_eq!(bridge.post("/hooks/clockify", &clockify_headers(SECRET, "TIMER_STOPPED"), body.clone()).await.0, 200);
    bridge.wait_metric(r#"hookbridge_dead_letters{sink="elsewhere"}"#, 1.0).await;
    let dlq = bridge.cli(&["dlq", "list"]);
    assert!(dlq.contains("refused the request: host not in allowed_hosts"), "{dlq}");
    assert_eq!(receiver.received().len(), 1, "the refused request never left");
    // A peer that does not answer: the request ends with the plugin's time limit, not the peer's whim.
    receiver.stall("NEW_TIMER_STARTED", Duration::from_secs(60));
    let started = Instant::now();
    assert_eq!(
        bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIMER_STARTED"), body.clone()).await.0,
        200
    );
    bridge.wait_metric(r#"hookbridge_dead_letters{sink="slow"}"#, 1.0).await;
    assert!(started.elapsed() < Duration::from_secs(5), "the stalled request took {:?}", started.elapsed());
    bridge.stop().await;

    // `plugin test`: the same plugin, allowed, then not.
    let body_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(body_file.path(), &body).unwrap();
    for (allow, expected) in [(Some(format!("127.0.0.1:{}", receiver.addr.port())), "ok"), (None, "permanent")] {
        let mut cmd = Command::new(binary());
        cmd.args(["plugin", "test", "--json", "--plugin"]).arg(wasm("notifier"));
        cmd.args(["--config", &format!(r#"{{"url":"{}"}}"#, receiver.url()), "--event", "NEW_TIME_ENTRY"]);
        if let Some(host) = &allow {
            cmd.args(["--allow-host", host]);
        }
        let out = cmd.arg(body_file.path()).output().unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(report["outcome"], expected, "{report}");
    }
    assert_eq!(receiver.received().len(), 2, "plugin test posted once, when allowed");
    receiver.stop().await;
}

/// `plugin test --mock-http`: the auto-tag plugin runs with no network at all, its Clockify API calls answered
/// from fixture files, and the report shows each request and the key-value change; `--kv` seeds the store (a
/// cached tag id: the plugin then skips the lookup). `--record` writes a real exchange (here the notifier's,
/// through `wasi:http`) that `--mock-http` then answers without the server.
#[tokio::test(flavor = "multi_thread")]
async fn plugin_test_answers_requests_from_mocks_records_them_and_seeds_the_store() {
    let fixtures = fixture("mock-http");
    let run = |plugin: &str, config: &str, extra: &[&str], body: &std::path::Path| {
        let out = Command::new(binary())
            .args(["plugin", "test", "--json", "--time-limit", "5s", "--plugin"])
            .arg(wasm(plugin))
            .args(["--config", config, "--event", "NEW_TIME_ENTRY"])
            .args(extra)
            .arg(body)
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    let auto_tag = r#"{"api_key":"k-123","rules":[{"tag":"meeting","keywords":["meeting"]}]}"#;
    let mocks = fixtures.join("auto-tag");
    let entry = fixtures.join("auto-tag-entry.json");
    let mock = ["--allow-host", "api.clockify.me", "--mock-http", mocks.to_str().unwrap()];
    let report = run("auto_tag", auto_tag, &mock, &entry);
    assert_eq!(report["outcome"], "ok", "{report}");
    let requests: Vec<(String, String, u64)> = report["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (r["method"].as_str().unwrap().into(), r["from"].as_str().unwrap().into(), r["status"].as_u64().unwrap())
        })
        .collect();
    let expected = [("GET", "mock", 200), ("POST", "mock", 201), ("PUT", "mock", 200)];
    assert_eq!(requests, expected.map(|(m, f, s)| (m.to_owned(), f.to_owned(), s)), "{report}");
    assert_eq!(
        report["kv_changes"],
        serde_json::json!([{"key": "tag/ws-1/meeting", "before": null, "after": "tag-meeting"}])
    );
    // A request no fixture answers fails the run and says which.
    let wrong_key = r#"{"api_key":"another","rules":[{"tag":"meeting","keywords":["meeting"]}]}"#;
    let report = run("auto_tag", wrong_key, &mock, &entry);
    assert_eq!(report["outcome"], "retryable", "{report}");
    assert!(report["requests"][0]["error"].as_str().unwrap().contains("no mock exchange for GET"), "{report}");
    // With the tag id cached in the seeded store, only the update is made.
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("kv.json");
    std::fs::write(&seed, r#"{"tag/ws-1/meeting": "tag-meeting"}"#).unwrap();
    let seeded: Vec<&str> = mock.iter().copied().chain(["--kv", seed.to_str().unwrap()]).collect();
    let report = run("auto_tag", auto_tag, &seeded, &entry);
    assert_eq!(report["outcome"], "ok", "{report}");
    assert_eq!(report["requests"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["requests"][0]["method"], "PUT");
    assert_eq!(report["kv_changes"], serde_json::json!([]));

    // Record the notifier's real exchange, then replay it with the server gone.
    let receiver = Receiver::start().await;
    let port = receiver.addr.port().to_string();
    let notifier = format!(r#"{{"url":"{}"}}"#, receiver.url());
    let recorded = dir.path().join("recorded");
    let record = ["--allow-host", &format!("127.0.0.1:{port}"), "--record", recorded.to_str().unwrap()];
    let body = fixture("clockify/NEW_TIME_ENTRY.json");
    let report = run("notifier", &notifier, &record, &body);
    assert_eq!((report["outcome"].as_str(), report["requests"][0]["from"].as_str()), (Some("ok"), Some("recorded")));
    assert_eq!(receiver.received().len(), 1);
    receiver.stop().await;
    let files: Vec<_> = std::fs::read_dir(&recorded).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let exchange: serde_json::Value =
        serde_json::from_slice(&std::fs::read(recorded.join(&files[0])).unwrap()).unwrap();
    assert_eq!(
        (exchange["request"]["method"].as_str(), exchange["response"]["status"].as_u64()),
        (Some("POST"), Some(200))
    );
    assert_eq!(exchange["request"]["url"].as_str(), notifier.split('"').nth(3), "{exchange}");
    let replay = ["--allow-host", &format!("127.0.0.1:{port}"), "--mock-http", recorded.to_str().unwrap()];
    let report = run("notifier", &notifier, &replay, &body);
    assert_eq!(
        (report["outcome"].as_str(), report["requests"][0]["from"].as_str()),
        (Some("ok"), Some("mock")),
        "{report}"
    );
}

/// A plugin built against the interface's first release (0.1.0, its own copy of that WIT) loads in this
/// daemon (0.1.1) and runs: its `kv` calls and its publish work as they did.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_built_against_0_1_0_still_loads_and_runs() {
    let config = format!(
        r#"
[storage]
data_dir = "{{dir}}/data"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[plugins.old]
path = "{wasm}"
max_in_flight = 1
[[routes]]
name = "old"
to = ["old"]
"#,
        wasm = wasm("wit_v0_1").display()
    );
    let bridge = TestBridge::start(&config).await;
    for n in 0..3 {
        let (status, text) = bridge
            .post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), format!(r#"{{"n":{n}}}"#))
            .await;
        assert_eq!(status, 200, "{text}");
    }
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="old"}"#, 3.0).await;
    assert_eq!(live(&bridge.internal_url(""), "wit-v0-1").await, Some(serde_json::json!({"count": 3})));
    bridge.stop().await;
}

#[test]
fn a_plugin_built_for_another_major_version_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hookbridge.toml");
    std::fs::write(
        &config,
        format!(
            "[sources.c]\nkind = \"clockify\"\nsecrets = [\"s\"]\n[plugins.old]\npath = \"{}\"\n[[routes]]\nname = \"r\"\nto = [\"old\"]\n",
            wasm("wit_v1").display()
        ),
    )
    .unwrap();
    let out = Command::new(binary()).args(["check", "--config"]).arg(&config).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("plugin old: it was built against hookbridge:plugin@1.0.0, but this hookbridge provides hookbridge:plugin@0.1.1"),
        "{stdout}"
    );
    // The daemon refuses to start with it, with the same message.
    let out = Command::new(binary()).args(["run", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("hookbridge:plugin@1.0.0"));
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_test_shows_what_the_daemon_does_with_the_same_event() {
    let body_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(body_file.path(), entry("same-entry", true)).unwrap();
    let out = Command::new(binary())
        .args(["plugin", "test", "--json", "--plugin"])
        .arg(wasm("billable_filter"))
        .args(["--config", r#"{"sink":"billing"}"#, "--event", "NEW_TIME_ENTRY"])
        .arg(body_file.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["outcome"], "ok");
    assert_eq!(report["actions"].as_array().unwrap().len(), 1);
    let action = &report["actions"][0];
    assert_eq!((action["action"].as_str(), action["sink"].as_str()), (Some("emit"), Some("billing")));
    assert_eq!(action["event_type"], "billable.NEW_TIME_ENTRY");
    assert!(report["logs"][0]["message"].as_str().unwrap().contains("same-entry"));
    assert!(report["duration_us"].as_u64().unwrap() > 0 && report["memory_bytes"].as_u64().unwrap() > 0);
    let mut expected: serde_json::Value = serde_json::from_str(action["payload"].as_str().unwrap()).unwrap();

    let receiver = Receiver::start().await;
    let toml = format!(
        r#"
[storage]
data_dir = "{{dir}}/data"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[sinks.billing]
kind = "http"
url = "{url}"
[plugins.billable]
path = "{wasm}"
config = {{ sink = "billing" }}
[[routes]]
name = "entries"
to = ["billable"]
"#,
        url = receiver.url(),
        wasm = wasm("billable_filter").display()
    );
    let bridge = TestBridge::start(&toml).await;
    let (s, _) =
        bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), entry("same-entry", true)).await;
    assert_eq!(s, 200);
    let got = receiver.wait_for(1, Duration::from_secs(20)).await;
    let mut actual: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(got[0].headers["ce-type"], "billable.NEW_TIME_ENTRY");
    // The only difference: the id of the event each was run on.
    assert_ne!(expected["sourceEvent"], actual["sourceEvent"]);
    expected["sourceEvent"] = serde_json::Value::Null;
    actual["sourceEvent"] = serde_json::Value::Null;
    assert_eq!(expected, actual);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_graceful_shutdown_ends_open_live_streams_instead_of_waiting_for_them() {
    let bridge = TestBridge::start(&format!(
        "[storage]\ndata_dir = \"{{dir}}/data\"\n[sources.clockify]\nkind = \"clockify\"\nsecrets = [\"{SECRET}\"]\n[sinks.out]\nkind = \"file\"\npath = \"{{dir}}/out.jsonl\"\n[[routes]]\nname = \"all\"\nto = [\"out\"]\n"
    ))
    .await;
    let mut stream = client().get(bridge.internal_url("/live/dashboard")).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    let stopped = tokio::time::timeout(Duration::from_secs(10), bridge.stop()).await;
    assert!(stopped.is_ok(), "shutdown waited for a dashboard that was still open");
    let ended =
        tokio::time::timeout(Duration::from_secs(5), async { while let Ok(Some(_)) = stream.chunk().await {} }).await;
    assert!(ended.is_ok(), "the live stream was not ended");
}

#[test]
fn plugin_test_reports_each_kind_of_sandbox_stop_with_its_cost() {
    let run = |config: &str, extra: &[&str]| {
        let body = fixture("clockify/NEW_TIME_ENTRY.json");
        let out = Command::new(binary())
            .args(["plugin", "test", "--json", "--plugin"])
            .arg(wasm("sandbox"))
            .args(["--config", config, "--event", "X"])
            .args(extra)
            .arg(body)
            .output()
            .unwrap();
        assert!(!out.status.success(), "a failed invocation exits non-zero");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let fuel = run(r#"{"mode":"loop"}"#, &["--fuel", "200000", "--time-limit", "5s"]);
    assert_eq!(fuel["outcome"], "fuel", "{fuel}");
    assert!(fuel["fuel_used"].as_u64().unwrap() >= 200_000, "{fuel}");
    let timeout = run(r#"{"mode":"loop"}"#, &["--time-limit", "30ms"]);
    assert_eq!(timeout["outcome"], "timeout", "{timeout}");
    assert!(timeout["duration_us"].as_u64().unwrap() < 1_000_000, "stopped near its limit: {timeout}");
    let slept = run(r#"{"mode":"sleep"}"#, &["--time-limit", "300ms"]);
    assert_eq!(slept["outcome"], "timeout", "{slept}");
    let us = slept["duration_us"].as_u64().unwrap();
    assert!((300_000..1_500_000).contains(&us), "a sleep in WASI is stopped at the limit: {slept}");
    let memory = run(r#"{"mode":"alloc"}"#, &["--memory-mib", "8"]);
    assert_eq!(memory["outcome"], "memory", "{memory}");
    assert!(memory["memory_bytes"].as_u64().unwrap() <= 8 * 1024 * 1024, "{memory}");
    let panic = run(r#"{"mode":"panic"}"#, &[]);
    assert_eq!(panic["outcome"], "trap", "{panic}");
    assert!(panic["error"].as_str().unwrap().contains("sandbox panic"), "the panic message explains the trap: {panic}");
}

/// A plugin that sleeps 60 s in a WASI call with a 2 s time limit: SIGTERM while it sleeps, and the daemon
/// exits within about the limit, not the sleep (a blocking thread parked in the host call used to hold the
/// runtime's shutdown for the whole sleep).
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_sleeping_in_wasi_does_not_delay_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("hookbridge.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
internal_listen = "127.0.0.1:0"
shutdown_timeout = "30s"
[storage]
data_dir = "data"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[plugins.sleep]
path = "{wasm}"
config = {{ mode = "sleep" }}
time_limit = "2s"
[[routes]]
name = "all"
to = ["sleep"]
"#,
            wasm = wasm("sandbox").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("daemon.log");
    let mut child = spawn_daemon(&config, &log);
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&format!("{base}/healthz")).await;
    let (status, text) =
        post_to(&format!("{base}/hooks/clockify"), &clockify_headers(SECRET, "NEW_TIME_ENTRY"), r#"{"id":"sleepy"}"#)
            .await;
    assert_eq!(status, 200, "{text}");
    // The plugin is asleep now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(20), "no exit 20 s after SIGTERM").await;
    let took = started.elapsed();
    assert!(status.success(), "{status:?}: {}", std::fs::read_to_string(&log).unwrap_or_default());
    assert!(took < Duration::from_secs(6), "shutdown took {took:?} with a plugin asleep (limit 2 s)");
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log.contains("time limit"), "the sleep was stopped by the time limit:\n{log}");
}
