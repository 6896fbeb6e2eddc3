//! The README's quick start, as a new user runs it: the daemon on `config/quickstart.toml`, then
//! `hookbridge send` with a fixture, then the event in the file sink.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

#[tokio::test(flavor = "multi_thread")]
async fn quickstart_config_send_and_file_sink() {
    let repo = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("config");
    std::fs::create_dir(&config_dir).unwrap();
    let (port, internal) = (free_port(), free_port());
    let text = std::fs::read_to_string(repo.join("config/quickstart.toml")).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:8080\""));
    assert!(text.contains("internal_listen = \"127.0.0.1:8082\""));
    let text = text.replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
    let text = text.replace("127.0.0.1:8082", &format!("127.0.0.1:{internal}"));
    // The plugins are where scripts/build-plugins puts them in the repository.
    assert!(text.contains("\"../plugins/target/"));
    let text = text.replace("\"../plugins/target/", &format!("\"{}/plugins/target/", repo.display()));
    std::fs::write(config_dir.join("quickstart.toml"), text).unwrap();
    std::fs::copy(repo.join("config/quickstart.secret"), config_dir.join("quickstart.secret")).unwrap();
    let config = config_dir.join("quickstart.toml");

    let mut daemon = Command::new(binary())
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = client().get(format!("http://127.0.0.1:{port}/readyz")).send().await;
        if ready.map(|r| r.status().is_success()).unwrap_or(false) {
            break;
        }
        assert!(Instant::now() < deadline, "quick-start daemon not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let out = Command::new(binary())
        .args(["send", "--config"])
        .arg(&config)
        .args(["--source", "clockify", "--event", "NEW_TIME_ENTRY"])
        .arg(fixture("clockify/NEW_TIME_ENTRY.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "send failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("-> 200"), "{stdout}");

    let events = dir.path().join("data/quickstart/events.jsonl");
    let line =
        poll_until(Duration::from_secs(20), || std::fs::read_to_string(&events).ok().filter(|t| !t.is_empty())).await;
    let line = line.expect("the event reached the file sink");
    let v: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(v["type"], "NEW_TIME_ENTRY");
    assert_eq!(v["source"], "clockify");
    assert_eq!(v["body"]["id"], "68453d0cf0c88d522704ab76");
    assert_eq!(line.lines().count(), 1);

    // The dashboard moves: a timer started with `send` shows in the live snapshot the page follows.
    let page = client().get(format!("http://127.0.0.1:{internal}/dashboard")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("/live/dashboard"));
    let out = Command::new(binary())
        .args(["send", "--config"])
        .arg(&config)
        .args(["--source", "clockify", "--event", "NEW_TIMER_STARTED"])
        .arg(fixture("clockify/NEW_TIMER_STARTED.json"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let snapshot = live(&format!("http://127.0.0.1:{internal}"), "dashboard").await;
        if let Some(s) = snapshot
            && s["running"].as_array().is_some_and(|r| r.len() == 1)
        {
            assert_eq!(s["running"][0]["entryId"], "5f118c837db7a8637ffcaf36");
            break;
        }
        assert!(Instant::now() < deadline, "the started timer never reached the dashboard's channel");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A wrong secret is refused by the daemon, and `send` says so with a non-zero exit.
    let bad = config_dir.join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&config).unwrap().replace("{ file = \"quickstart.secret\" }", "\"wrong\""),
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["send", "--config"])
        .arg(&bad)
        .args(["--source", "clockify", "--event", "NEW_TIME_ENTRY"])
        .arg(fixture("clockify/NEW_TIME_ENTRY.json"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("-> 401"));

    daemon.kill().unwrap();
    daemon.wait().unwrap();
}
