//! The live dashboard: the dashboard plugin's snapshots on `/live/dashboard` (running timers, today's totals
//! counted once per entry), and the page at `/dashboard` in a real browser (Debian's Chromium driven by
//! `tests/browser/dashboard.mjs`), which updates without a reload. The test command builds the plugins
//! (`scripts/build-plugins`) and installs the browser test's dependencies (`npm ci --prefix tests/browser`).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::common::*;
use crate::plugins::wasm;

const SECRET: &str = "dashboard-secret";
const STARTED: &str = "clockify/NEW_TIMER_STARTED.json";
const STOPPED: &str = "captured/TIMER_STOPPED__jpweijers-odoo-clockify.json";

fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// A Clockify source whose time-entry events go to the dashboard plugin.
fn config() -> String {
    format!(
        r#"
[storage]
data_dir = "{{dir}}/data"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
# A copy within the hour is the provider's retry (the test sends one).
retry_window = "1h"
[plugins.dashboard]
path = "{wasm}"
[[routes]]
name = "dashboard"
events = ["NEW_TIMER_STARTED", "TIMER_STOPPED", "NEW_TIME_ENTRY", "TIME_ENTRY_UPDATED", "TIME_ENTRY_DELETED"]
to = ["dashboard"]
"#,
        wasm = wasm("dashboard").display()
    )
}

/// RFC 3339 timestamps (Clockify's format) on today's UTC date: about 2 hours ago, not before midnight, and
/// `minutes` after that.
fn today(minutes: u64) -> (String, String) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let start = (now - 2 * 3600).max(now - now % 86_400);
    let at = |secs| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string();
    (at(start), at(start + minutes * 60))
}

/// The NEW_TIMER_STARTED fixture, started today.
pub fn started() -> Value {
    let mut v: Value = serde_json::from_slice(&read_fixture(STARTED)).unwrap();
    v["timeInterval"] = json!({"start": today(0).0, "end": null, "duration": null});
    v
}

/// The TIMER_STOPPED fixture made the stop of `started`, after `minutes`.
fn stopped(started: &Value, minutes: u64) -> Value {
    let mut v: Value = serde_json::from_slice(&read_fixture(STOPPED)).unwrap();
    for key in ["id", "description", "userId", "user", "projectId", "project", "taskId", "task", "workspaceId"] {
        v[key] = started[key].clone();
    }
    let (start, end) = today(minutes);
    v["timeInterval"] = json!({"start": start, "end": end, "duration": format!("PT{minutes}M")});
    v
}

/// Posts a Clockify webhook, waits until the plugin handled the `delivered`-th one, returns the snapshot.
async fn send(bridge: &TestBridge, event: &str, body: &Value, delivered: f64) -> Value {
    let (status, text) = bridge.post("/hooks/clockify", &clockify_headers(SECRET, event), body.to_string()).await;
    assert_eq!(status, 200, "{event}: {text}");
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="dashboard"}"#, delivered).await;
    live(&bridge.internal_url(""), "dashboard").await.expect("no snapshot on /live/dashboard")
}

/// The seconds of user `id` in a snapshot's totals (None: not listed).
fn user_seconds(snapshot: &Value, id: &Value) -> Option<i64> {
    let users = snapshot["today"]["users"].as_array().unwrap();
    users.iter().find(|u| u["id"] == *id).map(|u| u["seconds"].as_i64().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_plugin_publishes_running_timers_and_counts_each_entry_once() {
    let bridge = TestBridge::start(&config()).await;
    let started = started();
    let (entry, user) = (&started["id"], &started["userId"]);

    let snapshot = send(&bridge, "NEW_TIMER_STARTED", &started, 1.0).await;
    let running = snapshot["running"].as_array().unwrap();
    assert_eq!(running.len(), 1, "{snapshot}");
    assert_eq!(running[0]["entryId"], *entry);
    assert_eq!(running[0]["userName"], "User");
    assert_eq!((running[0]["projectName"].as_str(), running[0]["taskName"].as_str()), (Some("Project"), Some("Task")));
    assert_eq!(running[0]["description"], "Webhook Test Description");
    assert_eq!(running[0]["start"], started["timeInterval"]["start"]);
    assert_eq!(snapshot["today"]["users"], json!([]), "nothing completed yet");
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string()[..10].to_owned();
    assert_eq!(snapshot["today"]["date"], date);

    let stop = stopped(&started, 90);
    let snapshot = send(&bridge, "TIMER_STOPPED", &stop, 2.0).await;
    assert_eq!(snapshot["running"], json!([]), "{snapshot}");
    assert_eq!(user_seconds(&snapshot, user), Some(5400), "{snapshot}");
    assert_eq!(
        snapshot["today"]["projects"],
        json!([{"id": started["projectId"], "name": "Project", "seconds": 5400}])
    );

    // The provider's retry of the same request is a duplicate for the daemon; one with a different body
    // reaches the plugin, which counts the entry once.
    let (status, _) =
        bridge.post("/hooks/clockify", &clockify_headers(SECRET, "TIMER_STOPPED"), stop.to_string()).await;
    assert_eq!(status, 200);
    bridge.wait_metric(r#"hookbridge_duplicates_total{source="clockify"}"#, 1.0).await;
    let mut retry = stop.clone();
    retry["currentlyRunning"] = json!(null);
    let snapshot = send(&bridge, "TIMER_STOPPED", &retry, 3.0).await;
    assert_eq!(user_seconds(&snapshot, user), Some(5400), "counted once: {snapshot}");

    // An update replaces what the entry counted: 60 minutes now, not 90 + 60.
    let snapshot = send(&bridge, "TIME_ENTRY_UPDATED", &stopped(&started, 60), 4.0).await;
    assert_eq!(user_seconds(&snapshot, user), Some(3600), "replaced: {snapshot}");

    // A second user's manual entry ranks by seconds; deleting the first entry takes it out of the totals.
    let mut manual = stopped(&started, 120);
    manual["id"] = json!("manual-entry");
    manual["userId"] = json!("second-user");
    manual["user"] = json!(null);
    let snapshot = send(&bridge, "NEW_TIME_ENTRY", &manual, 5.0).await;
    let users = &snapshot["today"]["users"];
    assert_eq!(users[0], json!({"id": "second-user", "name": "second-user", "seconds": 7200}), "{snapshot}");
    assert_eq!(users[1]["seconds"], 3600);
    let snapshot = send(&bridge, "TIME_ENTRY_DELETED", &stopped(&started, 60), 6.0).await;
    assert_eq!(user_seconds(&snapshot, user), None, "subtracted: {snapshot}");
    assert_eq!(user_seconds(&snapshot, &json!("second-user")), Some(7200));
    bridge.stop().await;
}

#[test]
fn the_dashboard_plugin_ignores_other_events_and_dead_letters_bodies_that_are_not_json() {
    let body = tempfile::NamedTempFile::new().unwrap();
    let run = |event: &str, text: &str| -> Value {
        std::fs::write(body.path(), text).unwrap();
        let out = std::process::Command::new(binary())
            .args(["plugin", "test", "--json", "--plugin"])
            .arg(wasm("dashboard"))
            .args(["--event", event])
            .arg(body.path())
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    let report = run("NEW_PROJECT", r#"{"id": "p1", "name": "Project"}"#);
    assert_eq!((&report["outcome"], &report["actions"]), (&json!("ok"), &json!([])), "{report}");
    let report = run("NEW_TIMER_STARTED", "not json");
    assert_eq!(report["outcome"], "permanent", "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_page_shows_a_timer_start_and_stop_live_in_chromium() {
    let root = repo_root();
    let browser = root.join("tests/browser");
    assert!(
        browser.join("node_modules/playwright-core").is_dir(),
        "tests/browser/node_modules is missing: run scripts/test (it runs `npm ci --prefix tests/browser` and \
         installs Debian's chromium), or run that npm command yourself"
    );
    let out_dir = root.join("target/test-output");
    std::fs::create_dir_all(&out_dir).unwrap();
    let screenshot = out_dir.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);

    let bridge = TestBridge::start(&config()).await;
    let run = tokio::process::Command::new("node")
        .arg(browser.join("dashboard.mjs"))
        .arg("--base-url")
        .arg(bridge.internal_url(""))
        .arg("--webhook-url")
        .arg(bridge.url(""))
        .args(["--secret", SECRET, "--started"])
        .arg(fixture(STARTED))
        .arg("--stopped")
        .arg(fixture(STOPPED))
        .arg("--screenshot")
        .arg(&screenshot)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the browser test ran over 120 s")
        .expect("cannot run node (the test command installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "browser test failed ({}):\n{stdout}\n{stderr}", out.status);
    let result: Value = serde_json::from_str(stdout.trim().lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no JSON result ({e}):\n{stdout}\n{stderr}"));
    assert_eq!(result["ok"], true, "{result}");
    assert!(result["secondsAfter"].as_i64().unwrap() > result["secondsBefore"].as_i64().unwrap(), "{result}");

    let png = std::fs::read(&screenshot).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", screenshot.display()));
    assert!(png.len() > 1000 && png.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", screenshot.display());
    println!("dashboard screenshot: {}", screenshot.display());
    bridge.stop().await;
}
