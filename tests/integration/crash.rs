//! Crash safety against the real binary: under concurrent load the daemon is killed with SIGKILL and
//! started again; every request that got a 2xx is delivered at least once. Then SIGTERM stops it cleanly.

use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;

const SECRET: &str = "crash-test-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_event_survives_sigkill() {
    acknowledged_events_survive(Stop::Kill, "sqlite").await;
}

/// The same test on the log engine (`storage.engine = "log"`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_event_survives_sigkill_on_the_log() {
    acknowledged_events_survive(Stop::Kill, "log").await;
}

/// SIGTERM under load: the daemon exits within its shutdown deadline, and everything it acknowledged is
/// delivered (before it exits or after the restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_event_survives_sigterm_under_load() {
    acknowledged_events_survive(Stop::Term, "sqlite").await;
}

/// The same test on the log engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_event_survives_sigterm_under_load_on_the_log() {
    acknowledged_events_survive(Stop::Term, "log").await;
}

#[derive(Clone, Copy, PartialEq)]
enum Stop {
    Kill,
    Term,
}

async fn acknowledged_events_survive(stop: Stop, engine: &str) {
    let receiver = Receiver::start().await;
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
[storage]
data_dir = "data"
engine = "{engine}"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[sinks.out]
kind = "http"
url = "{url}"
max_in_flight = 16
retry = {{ initial_backoff = "50ms", max_backoff = "500ms" }}
[sinks.file]
kind = "file"
path = "out.jsonl"
[[routes]]
name = "all"
to = ["out", "file"]
"#,
            url = receiver.url()
        ),
    )
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn_daemon(&config, &dir.path().join("run1.log"));
    wait_healthy(&format!("{base}/healthz")).await;

    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let sent: Arc<Mutex<HashSet<String>>> = Arc::default();
    let template = String::from_utf8(read_fixture("clockify/NEW_TIME_ENTRY.json")).unwrap();
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let (acked, sent, base, template) = (acked.clone(), sent.clone(), base.clone(), template.clone());
        tasks.push(tokio::spawn(async move {
            let client = client();
            for i in 0..400 {
                let id = format!("w{worker}-{i}");
                let body = template.replacen("\"description\": \"Test\"", &format!("\"description\": \"{id}\""), 1);
                sent.lock().unwrap().insert(id.clone());
                let r = client
                    .post(format!("{base}/hooks/clockify"))
                    .header("clockify-signature", SECRET)
                    .header("clockify-webhook-event-type", "NEW_TIME_ENTRY")
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        acked.lock().unwrap().insert(id);
                    }
                    Ok(_) => {}
                    Err(_) => return, // the daemon is gone
                }
            }
        }));
    }
    // Kill it mid-load.
    poll_until(Duration::from_secs(60), || (acked.lock().unwrap().len() >= 300).then_some(()))
        .await
        .expect("load started");
    match stop {
        Stop::Kill => {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            // What a write cut short by the kill leaves: a torn last line. The restart must repair it.
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(dir.path().join("out.jsonl")).unwrap();
            f.write_all(br#"{"id":"torn","source":"clockify","body":{"descr"#).unwrap();
        }
        Stop::Term => {
            sigterm(&child);
            let status =
                wait_exit(&mut child, Duration::from_secs(35), "no exit within shutdown_timeout (30s) + margin").await;
            assert!(status.success(), "{status:?}");
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let sent = sent.lock().unwrap().clone();
    assert!(acked.len() >= 300);

    // Start again on the same spool: everything acknowledged arrives.
    let mut child = spawn_daemon(&config, &dir.path().join("run2.log"));
    wait_healthy(&format!("{base}/healthz")).await;
    let description = |r: &Received| -> String {
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["description"].as_str().unwrap().to_owned()
    };
    let delivered = poll_until(Duration::from_secs(90), || {
        let got: HashSet<String> = receiver.received().iter().map(description).collect();
        acked.is_subset(&got).then_some(got)
    })
    .await;
    let got: HashSet<String> = receiver.received().iter().map(description).collect();
    let missing: Vec<&String> = acked.difference(&got).take(10).collect();
    assert!(
        delivered.is_some(),
        "{} acknowledged events never delivered, e.g. {missing:?}",
        acked.difference(&got).count()
    );
    assert!(got.is_subset(&sent), "only events that were sent are delivered");
    // The file sink has every acknowledged event too, and every line of its file parses.
    let in_file = poll_until(Duration::from_secs(60), || {
        let text = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap_or_default();
        let lines: Option<HashSet<String>> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                Some(v["body"]["description"].as_str()?.to_owned())
            })
            .collect();
        lines.filter(|l| acked.is_subset(l))
    })
    .await;
    let text = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap();
    let bad = text.lines().find(|l| serde_json::from_str::<serde_json::Value>(l).is_err());
    assert!(bad.is_none(), "a line of the file sink does not parse: {bad:?}");
    assert!(in_file.is_some(), "acknowledged events missing from the file sink");

    // SIGTERM: a clean exit.
    sigterm(&child);
    let exit = wait_exit(&mut child, Duration::from_secs(30), "no exit after SIGTERM").await;
    assert!(exit.success(), "exit after SIGTERM: {exit:?}");
    let log = std::fs::read_to_string(dir.path().join("run2.log")).unwrap();
    assert!(!log.contains(SECRET), "a secret reached the log");
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_dead_letters_survive_sigkill() {
    retries_and_dead_letters_survive("sqlite").await;
}

/// The same on the log engine (retries and dead letters in its cold tables).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_dead_letters_survive_sigkill_on_the_log() {
    retries_and_dead_letters_survive("log").await;
}

async fn retries_and_dead_letters_survive(engine: &str) {
    let failing = Receiver::start().await;
    failing.answer(503);
    let refusing = Receiver::start().await;
    refusing.answer(400);
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
[storage]
data_dir = "data"
engine = "{engine}"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[sinks.failing]
kind = "http"
url = "{failing}"
retry = {{ initial_backoff = "50ms", max_backoff = "100ms" }}
[sinks.refusing]
kind = "http"
url = "{refusing}"
[[routes]]
name = "all"
to = ["failing", "refusing"]
"#,
            failing = failing.url(),
            refusing = refusing.url()
        ),
    )
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn_daemon(&config, &dir.path().join("run1.log"));
    wait_healthy(&format!("{base}/healthz")).await;
    let c = client();
    for i in 0..3 {
        let r = c
            .post(format!("{base}/hooks/clockify"))
            .header("clockify-signature", SECRET)
            .header("clockify-webhook-event-type", "NEW_TIME_ENTRY")
            .body(format!(r#"{{"id":"entry-{i}"}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    let cli = |args: &[&str]| -> serde_json::Value {
        let out = Command::new(binary()).args(args).arg("--json").arg("--config").arg(&config).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // Wait until all three are dead letters on one sink and have been retried a few times on the other.
    poll_until(Duration::from_secs(30), || {
        let dead = cli(&["dlq", "list"]).as_array().map(|a| a.len()).unwrap_or(0);
        let retried = failing.hits().len();
        (dead == 3 && retried >= 9).then_some(())
    })
    .await
    .expect("dead letters and retries before the kill");
    child.kill().unwrap(); // SIGKILL, in the middle of retries
    child.wait().unwrap();
    let hits_before = failing.hits().len();

    let mut child = spawn_daemon(&config, &dir.path().join("run2.log"));
    wait_healthy(&format!("{base}/healthz")).await;
    let dead = cli(&["dlq", "list"]);
    assert_eq!(dead.as_array().unwrap().len(), 3, "dead letters survive: {dead}");
    // Each event still has a pending delivery (and a dead one): pending wins in the event's status.
    let pending = cli(&["events", "list", "--status", "pending"]);
    assert_eq!(pending.as_array().unwrap().len(), 3);
    // The retries go on after the restart, with their attempt counts kept.
    poll_until(Duration::from_secs(30), || (failing.hits().len() >= hits_before + 3).then_some(()))
        .await
        .expect("retries resume");
    let id = dead[0]["event_id"].as_str().unwrap().to_owned();
    let shown = cli(&["events", "show", &id]);
    let failing_delivery =
        shown["deliveries"].as_array().unwrap().iter().find(|d| d["sink"] == "failing").unwrap().clone();
    assert_eq!(failing_delivery["status"], "pending");
    assert!(failing_delivery["attempts"].as_u64().unwrap() >= 3, "{failing_delivery}");
    failing.answer(200);
    failing.wait_for(3, Duration::from_secs(30)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    failing.stop().await;
    refusing.stop().await;
}
