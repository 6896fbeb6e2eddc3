//! A full disk heals without a restart: the spool on a small tmpfs is filled (every `2xx` is stored, the
//! rest get `503`), the daemon is restarted on the full disk (it starts, and delivers its backlog), the tmpfs
//! is grown, and webhooks are accepted again; every acknowledged event is delivered. Mounting a tmpfs needs
//! root (CI runs as root); elsewhere the test says so and does nothing.

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

const SECRET: &str = "disk-secret";

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(at: &std::path::Path, size: &str) -> bool {
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .status()
        .is_ok_and(|s| s.success())
}

async fn post(port: u16, id: &str) -> u16 {
    let body = format!(r#"{{"id":"{id}","description":"{}"}}"#, "d".repeat(400));
    let mut req = client().post(format!("http://127.0.0.1:{port}/hooks/clockify")).body(body);
    for (k, v) in clockify_headers(SECRET, "NEW_TIME_ENTRY") {
        req = req.header(k, v);
    }
    req.send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

fn ids_in(file: &std::path::Path) -> HashSet<String> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["body"]["id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_spool_disk_gives_503_survives_a_restart_and_heals_when_space_returns() {
    if std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1).is_none_or(|u| u != "0"))
    {
        println!("SKIPPED: mounting a tmpfs needs root (CI runs the suite as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("spool");
    std::fs::create_dir(&mnt).unwrap();
    assert!(mount_tmpfs(&mnt, "4m"), "cannot mount a tmpfs at {}", mnt.display());
    let _mount = Mount(mnt.clone());
    let (port, internal) = (free_port(), free_port());
    let out = dir.path().join("out.jsonl");
    let config = dir.path().join("hookbridge.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
internal_listen = "127.0.0.1:{internal}"
[storage]
data_dir = "{data}"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[sinks.out]
kind = "file"
path = "{out}"
[[routes]]
name = "all"
to = ["out"]
"#,
            data = mnt.join("data").display(),
            out = out.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("run1.log");
    let mut child = spawn_daemon(&config, &log);
    wait_healthy(&format!("http://127.0.0.1:{internal}/healthz")).await;

    // Fill the disk: every 2xx is stored, the rest are 503.
    let mut acked = HashSet::new();
    let mut refused_in_a_row = 0;
    let mut n = 0;
    while refused_in_a_row < 30 {
        n += 1;
        assert!(n < 20_000, "the 4 MiB spool never filled");
        let id = format!("fill-{n}");
        match post(port, &id).await {
            200 => {
                acked.insert(id);
                refused_in_a_row = 0;
            }
            503 => refused_in_a_row += 1,
            other => panic!("webhook {n} answered {other}"),
        }
    }
    assert!(acked.len() > 30, "only {} events fit", acked.len());

    // A restart on the full disk works: the daemon starts, and new webhooks still get 503 (or 200 if a
    // little room was freed), never anything else.
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert!(status.success(), "exit on SIGTERM with a full disk: {status:?}");
    let mut child = spawn_daemon(&config, &dir.path().join("run2.log"));
    wait_healthy(&format!("http://127.0.0.1:{internal}/healthz")).await;
    let status = post(port, "while-full").await;
    assert!(matches!(status, 200 | 503), "answered {status} on a full disk");
    if status == 200 {
        acked.insert("while-full".to_owned());
    }

    // Space returns: webhooks are accepted again without a restart.
    let grown = Command::new("mount").args(["-o", "remount,size=64m"]).arg(&mnt).status().unwrap();
    assert!(grown.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut m = 0;
    loop {
        m += 1;
        let id = format!("after-{m}");
        if post(port, &id).await == 200 {
            acked.insert(id);
            break;
        }
        assert!(Instant::now() < deadline, "webhooks still refused after the disk grew");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for k in 0..20 {
        let id = format!("later-{k}");
        assert_eq!(post(port, &id).await, 200);
        acked.insert(id);
    }
    // Every acknowledged event is delivered.
    let delivered = poll_until(Duration::from_secs(60), || {
        let got = ids_in(&out);
        acked.is_subset(&got).then_some(())
    })
    .await;
    let missing: Vec<_> = acked.difference(&ids_in(&out)).take(5).cloned().collect();
    assert!(delivered.is_some(), "acknowledged events never delivered, e.g. {missing:?}");
    let _ = child.kill();
    let _ = child.wait();
}

/// A sync of the spool that fails (here: its WAL deleted under the running daemon, so the syncer cannot
/// reach it) is never acknowledged, and the daemon exits non-zero so that systemd restarts it; the restart
/// serves again and delivers what was acknowledged before. On the SQLite engine, whose sync a test can make
/// fail from outside; the log engine's failed `fdatasync` is tested on the simulated disk
/// (`store::log::tests`, `store::log::spool::tests`), and reaches the daemon through the same
/// `Store::failed`.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_sync_makes_the_daemon_exit_non_zero_and_a_restart_serves_again() {
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
engine = "sqlite"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[sinks.file]
kind = "file"
path = "out.jsonl"
[[routes]]
name = "all"
to = ["file"]
"#
        ),
    )
    .unwrap();
    let log = dir.path().join("run1.log");
    let mut child = spawn_daemon(&config, &log);
    wait_healthy(&format!("http://127.0.0.1:{port}/healthz")).await;
    assert_eq!(post(port, "before").await, 200);
    std::fs::remove_file(dir.path().join("data/spool.db-wal")).unwrap();
    assert_eq!(post(port, "after").await, 503, "a webhook whose sync failed must not be acknowledged");
    let status = wait_exit(&mut child, Duration::from_secs(20), "the daemon went on running after a failed sync").await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("failed sync"), "the log says why:\n{text}");

    let mut child = spawn_daemon(&config, &dir.path().join("run2.log"));
    wait_healthy(&format!("http://127.0.0.1:{port}/healthz")).await;
    assert_eq!(post(port, "restarted").await, 200);
    let out = dir.path().join("out.jsonl");
    let delivered = poll_until(Duration::from_secs(20), || {
        let ids = ids_in(&out);
        (ids.contains("before") && ids.contains("restarted")).then_some(ids)
    })
    .await;
    assert!(delivered.is_some(), "delivered: {:?}", ids_in(&out));
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30), "no exit after SIGTERM").await.success());
}
