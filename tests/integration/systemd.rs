//! Running under systemd, with the test playing systemd's part: the notify protocol (`READY=1` once
//! listening, `WATCHDOG=1` while healthy, `STOPPING=1` on SIGTERM), socket activation through
//! `systemd-socket-activate`, and `systemd-analyze verify` on the shipped unit files.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const SECRET: &str = "systemd-secret";

fn write_config(dir: &std::path::Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("hookbridge.toml");
    let admin = free_port();
    std::fs::write(
        &path,
        format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
internal_listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:{admin}"
token = "systemd-admin-token-0123"
[storage]
data_dir = "data"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[sinks.events]
kind = "file"
path = "events.jsonl"
[[routes]]
name = "all"
to = ["events"]
"#
        ),
    )
    .unwrap();
    path
}

/// Receives notify datagrams until `want` arrives (or panics after 30 s); returns all messages seen.
fn receive_until(socket: &UnixDatagram, want: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.lines().any(|l| l == want);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
    panic!("no {want} from the daemon; got {seen:?}");
}

#[tokio::test]
async fn tells_systemd_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port);
    let notify_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&notify_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut child = Command::new(binary())
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "300000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let seen = receive_until(&socket, "READY=1");
    assert!(seen.last().unwrap().contains("STATUS=accepting webhooks on 127.0.0.1:"), "{seen:?}");
    // READY means listening: a request succeeds at once, and the admin API is up on its own address.
    let r = client().get(format!("http://127.0.0.1:{port}/readyz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = std::fs::read_to_string(&config).unwrap();
    let admin_port =
        text.lines().filter_map(|l| l.strip_prefix("listen = \"127.0.0.1:")).nth(1).unwrap().trim_end_matches('"');
    let r = client()
        .get(format!("http://127.0.0.1:{admin_port}/api/v1/dlq"))
        .bearer_auth("systemd-admin-token-0123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "the daemon serves its admin API");
    // The watchdog is pinged repeatedly, with a status line.
    receive_until(&socket, "WATCHDOG=1");
    let seen = receive_until(&socket, "WATCHDOG=1");
    assert!(seen.last().unwrap().contains("STATUS=accepting webhooks;"), "{seen:?}");

    // SIGHUP reloads (the same file here) and does not stop it.
    assert!(Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
    receive_until(&socket, "WATCHDOG=1");
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP must not stop the daemon");

    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    receive_until(&socket, "STOPPING=1");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
}

#[tokio::test]
async fn serves_on_a_socket_passed_by_systemd() {
    let dir = tempfile::tempdir().unwrap();
    // The config names one port; systemd passes a socket on another: the passed one is used.
    let config = write_config(dir.path(), free_port());
    let activated = free_port();
    let mut child = Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{activated}"), "-E", "RUST_LOG=warn", binary(), "run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (from Debian's systemd package)");
    let url = format!("http://127.0.0.1:{activated}/hooks/clockify");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let r = client()
            .post(&url)
            .header("clockify-signature", SECRET)
            .header("clockify-webhook-event-type", "NEW_TIME_ENTRY")
            .body(r#"{"id":"activated"}"#)
            .send()
            .await;
        match r {
            Ok(r) => break r.status().as_u16(),
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("no answer on the activated socket: {e}"),
        }
    };
    assert_eq!(status, 200);
    let events = dir.path().join("events.jsonl");
    let line =
        poll_until(Duration::from_secs(20), || std::fs::read_to_string(&events).ok().filter(|t| !t.is_empty())).await;
    assert!(line.expect("delivered").contains("\"activated\""));
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    child.wait().unwrap();
}

#[test]
fn the_unit_files_pass_systemd_analyze_verify() {
    let repo = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart= binaries exist: point the units at the binary under test.
    for unit in ["hookbridge.service", "hookbridge.socket"] {
        let text = std::fs::read_to_string(repo.join("config").join(unit)).unwrap();
        assert!(unit.ends_with(".socket") || text.contains("/usr/bin/hookbridge"));
        std::fs::write(dir.path().join(unit), text.replace("/usr/bin/hookbridge", binary())).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("hookbridge.service"))
        .arg(dir.path().join("hookbridge.socket"))
        .output()
        .expect("systemd-analyze (from Debian's systemd package)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Lines about units that are not ours (the host's own unit files) are not our problem.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("hookbridge")).collect();
    assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify: {stderr}");
}

/// Writes `text` as the config and sends SIGHUP; waits until the reload counter for `result` moves (read
/// from the internal listener on `port`).
async fn reload(
    child: &std::process::Child,
    config: &std::path::Path,
    text: &str,
    port: u16,
    result: &str,
    times: f64,
) {
    std::fs::write(config, text).unwrap();
    assert!(Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
    let name = format!(r#"hookbridge_config_reloads_total{{result="{result}"}}"#);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = client().get(format!("http://127.0.0.1:{port}/metrics")).send().await.unwrap().text().await.unwrap();
        if metric(&m, &name) >= times {
            return;
        }
        assert!(Instant::now() < deadline, "no {name} >= {times}:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sighup_swaps_routes_keeps_old_deliveries_and_refuses_a_broken_config() {
    let (down, receiver_addr) = hung_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let internal = free_port();
    let config = dir.path().join("hookbridge.toml");
    let base = |routes_to: &str, old_sink: bool| {
        let old = if old_sink {
            format!(
                "[sinks.old]\nkind = \"http\"\nurl = \"http://{receiver_addr}/in\"\nretry = {{ initial_backoff = \"50ms\", max_backoff = \"200ms\" }}\n"
            )
        } else {
            String::new()
        };
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ninternal_listen = \"127.0.0.1:{internal}\"\n[storage]\ndata_dir = \"data\"\n[sources.clockify]\nkind = \"clockify\"\nsecrets = [\"{SECRET}\"]\n{old}[sinks.new]\nkind = \"file\"\npath = \"new.jsonl\"\n[[routes]]\nname = \"r\"\nto = [\"{routes_to}\"]\n"
        )
    };
    std::fs::write(&config, base("old", true)).unwrap();
    let mut child = Command::new(binary())
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/hooks/clockify");
    let deadline = Instant::now() + Duration::from_secs(30);
    while client().get(format!("http://127.0.0.1:{port}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "daemon not up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let post = |id: &'static str| {
        let url = url.clone();
        async move {
            let r = client()
                .post(&url)
                .header("clockify-signature", SECRET)
                .header("clockify-webhook-event-type", "NEW_TIME_ENTRY")
                .body(format!(r#"{{"id":"{id}"}}"#))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
        }
    };
    // Accepted under the old config, for a sink that is down.
    post("before-reload").await;

    // New config: the route goes to `new`, and `old` is gone from the config altogether.
    reload(&child, &config, &base("new", false), internal, "ok", 1.0).await;
    post("after-reload").await;
    let new_file = dir.path().join("new.jsonl");
    let text =
        poll_until(Duration::from_secs(20), || std::fs::read_to_string(&new_file).ok().filter(|t| !t.is_empty()))
            .await
            .expect("the new route delivers");
    assert!(text.contains("after-reload") && !text.contains("before-reload"), "{text}");

    // The event accepted before the reload still reaches its old sink once that is up.
    let receiver = Receiver::start_on(down.up().await).await;
    let got = receiver.wait_for(1, Duration::from_secs(20)).await;
    assert!(String::from_utf8_lossy(&got[0].body).contains("before-reload"));

    // A broken config is refused; the running one stays.
    reload(&child, &config, "[sources.clockify]\nkind = \"clockify\"\nsecrets = []\n", internal, "error", 1.0).await;
    post("after-broken-reload").await;
    poll_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&new_file).ok().filter(|t| t.contains("after-broken-reload"))
    })
    .await
    .expect("still routed by the last good config");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.received().len(), 1, "nothing else reached the removed sink");
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert!(child.wait().unwrap().success());
    receiver.stop().await;
}
