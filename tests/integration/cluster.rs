//! Cluster mode on PostgreSQL (`storage.backend = "postgres"`), with real daemons sharing one real database
//! (`HOOKBRIDGE_TEST_POSTGRES`, which `scripts/test` provides; each test makes a database of its own) behind a
//! real load balancer (HAProxy): a provider's retry that lands on another node is a duplicate, and when a
//! node is killed with SIGKILL under load, the others take its claimed deliveries over: every `2xx` is
//! delivered, in order per entity. Also: the database away, add-on installations and live channels.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

const SECRET: &str = "cluster-test-secret";

/// A database of its own on the test server, dropped by [`TestDatabase::drop_db`].
pub struct TestDatabase {
    pub name: String,
    /// The server's connection string (its maintenance database).
    pub server: String,
}

impl TestDatabase {
    pub async fn new(tag: &str) -> TestDatabase {
        let server = std::env::var("HOOKBRIDGE_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let name = format!("hb_test_{tag}_{}", uuid::Uuid::now_v7().simple());
        admin(&server).await.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        TestDatabase { name, server }
    }

    /// The database's connection string, in key-value form.
    pub fn url(&self) -> String {
        let cfg: tokio_postgres::Config = self.server.parse().unwrap();
        let host = match &cfg.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        };
        let mut s =
            format!("host={host} port={} dbname={}", cfg.get_ports().first().copied().unwrap_or(5432), self.name);
        if let Some(u) = cfg.get_user() {
            s.push_str(&format!(" user={u}"));
        }
        if let Some(p) = cfg.get_password() {
            s.push_str(&format!(" password={}", String::from_utf8_lossy(p)));
        }
        s
    }

    /// One value from the test database.
    pub async fn query_i64(&self, sql: &str) -> i64 {
        admin(&self.url()).await.query_one(sql, &[]).await.unwrap().get(0)
    }

    pub async fn drop_db(self) {
        let _ = admin(&self.server)
            .await
            .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
            .await;
    }
}

async fn admin(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("no PostgreSQL at HOOKBRIDGE_TEST_POSTGRES ({e}): scripts/test starts one"));
    tokio::spawn(conn);
    c
}

/// A node's config: its own port and folder, the shared database, a short lease.
fn node_config(port: u16, node: &str, db: &TestDatabase, receiver: &str) -> String {
    format!(
        "\n[server]\nlisten = \"127.0.0.1:{port}\"\ninternal_listen = \"127.0.0.1:0\"\nmin_body_rate = 0\n{}",
        to_receiver(&storage(db, node, &format!("data-{node}")), receiver)
    )
}

/// After `storage`: the Clockify source and an HTTP sink to `receiver` that every event is routed to, with
/// fast retries.
fn to_receiver(storage: &str, receiver: &str) -> String {
    format!(
        r#"{storage}[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
retry_window = "1h"
[sinks.out]
kind = "http"
url = "{receiver}"
max_in_flight = 16
timeout = "60s"
retry = {{ initial_backoff = "100ms", max_backoff = "500ms" }}
[[routes]]
name = "all"
to = ["out"]
"#
    )
}

/// The `[storage]` of a node of the cluster on `db`: its folder, its id, a short lease.
fn storage(db: &TestDatabase, node: &str, data_dir: &str) -> String {
    storage_at(&db.url(), node, data_dir)
}

/// The `[storage]` of a node of the cluster whose database is at `url`.
fn storage_at(url: &str, node: &str, data_dir: &str) -> String {
    format!(
        "[storage]\ndata_dir = \"{data_dir}\"\nbackend = \"postgres\"\n[storage.postgres]\nurl = \"{url}\"\n\
         node_id = \"{node}\"\nlease = \"2s\"\n"
    )
}

struct Node {
    base: String,
    child: std::process::Child,
}

/// A failing test must not leave its daemons polling the server (they would disturb every later test).
impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The load balancer's process, stopped however the test ends.
struct Lb(std::process::Child);

impl Drop for Lb {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_node(dir: &std::path::Path, node: &str, port: u16, db: &TestDatabase, receiver: &str, run: u32) -> Node {
    let config = dir.join(format!("{node}.toml"));
    std::fs::write(&config, node_config(port, node, db, receiver)).unwrap();
    let child = spawn_daemon(&config, &dir.join(format!("{node}-{run}.log")));
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&format!("{base}/healthz")).await;
    Node { base, child }
}

/// HAProxy (Debian's package; `scripts/test` installs it) in front of `ports`, on `listen`, health-checking
/// each node's `/readyz` every 200 ms.
fn haproxy(dir: &std::path::Path, listen: u16, ports: &[u16]) -> Lb {
    let servers: String =
        ports.iter().enumerate().map(|(i, p)| format!("    server n{i} 127.0.0.1:{p} check\n")).collect();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n    maxconn 512\ndefaults\n    mode http\n    timeout connect 1s\n    timeout client 10s\n    \
             timeout server 10s\nfrontend hooks\n    bind 127.0.0.1:{listen}\n    default_backend nodes\n\
             backend nodes\n    balance roundrobin\n    option httpchk GET /readyz\n    \
             default-server inter 200ms fall 2 rise 2\n{servers}"
        ),
    )
    .unwrap();
    let bin = std::env::var("HOOKBRIDGE_HAPROXY").unwrap_or_else(|_| "haproxy".into());
    let child = std::process::Command::new(&bin)
        .args(["-db", "-f"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("haproxy.log")).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {bin} ({e}): scripts/test installs Debian's haproxy"));
    Lb(child)
}

async fn clockify(base: &str, body: &str) -> Result<(u16, String), reqwest::Error> {
    let r = client()
        .post(format!("{base}/hooks/clockify"))
        .header("clockify-signature", SECRET)
        .header("clockify-webhook-event-type", "NEW_TIME_ENTRY")
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await?;
    let status = r.status().as_u16();
    let v: serde_json::Value = serde_json::from_str(&r.text().await?).unwrap_or_default();
    Ok((status, v["status"].as_str().unwrap_or_default().to_owned()))
}

/// The fixture with its own time entry id (the ordering key) and description.
fn entry(template: &str, entity: &str, description: &str) -> String {
    template.replacen("\"68453d0cf0c88d522704ab76\"", &format!("\"{entity}\""), 1).replacen(
        "\"description\": \"Test\"",
        &format!("\"description\": \"{description}\""),
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_behind_haproxy_lose_nothing_when_one_is_killed_under_load() {
    let db = TestDatabase::new("cluster").await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let template = String::from_utf8(read_fixture("clockify/NEW_TIME_ENTRY.json")).unwrap();
    // b first, alone: it claims one delivery that its receiver fails twice and then holds unanswered until b
    // is gone, so b surely holds a claim (an attempt in flight) when it is killed.
    let b = start_node(dir.path(), "b", ports[1], &db, &receiver.url(), 1).await;
    receiver.fail("entry-held", 503, 2, None);
    receiver.stall("entry-held", Duration::from_secs(120));
    assert_eq!(clockify(&b.base, &entry(&template, "entry-held", "held")).await.unwrap().1, "accepted");
    let held = "SELECT count(*) FROM hookbridge.deliveries WHERE lease_owner = 'b' AND attempts >= 2";
    let deadline = Instant::now() + Duration::from_secs(20);
    while db.query_i64(held).await == 0 {
        assert!(Instant::now() < deadline, "b never retried the held delivery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut a = start_node(dir.path(), "a", ports[0], &db, &receiver.url(), 1).await;
    let mut c = start_node(dir.path(), "c", ports[2], &db, &receiver.url(), 1).await;
    let lb_port = free_port();
    let lb = haproxy(dir.path(), lb_port, &ports);
    let lb_base = format!("http://127.0.0.1:{lb_port}");
    wait_healthy(&format!("{lb_base}/readyz")).await;

    // A provider's retry on another node.
    let first = entry(&template, "entry-dedup", "once");
    assert_eq!(clockify(&a.base, &first).await.unwrap(), (200, "accepted".into()));
    assert_eq!(clockify(&c.base, &first).await.unwrap(), (200, "duplicate".into()));

    // Load through the load balancer, each worker updating its own time entry in order and sending each
    // update again until it is acknowledged (as a provider retries); b is killed part-way.
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let (acked, template, lb_base) = (acked.clone(), template.clone(), lb_base.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..60 {
                let id = format!("w{worker}-{i:03}");
                let body = entry(&template, &format!("entry-{worker}"), &id);
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    if let Ok((200, _)) = clockify(&lb_base, &body).await {
                        acked.lock().unwrap().insert(id.clone());
                        break;
                    }
                    assert!(Instant::now() < deadline, "{id} never acknowledged");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    poll_until(Duration::from_secs(60), || (acked.lock().unwrap().len() >= 150).then_some(())).await.expect("load");
    let mut b = b;
    b.child.kill().unwrap(); // SIGKILL
    b.child.wait().unwrap();
    let killed_at = Instant::now();
    receiver.heal("entry-held");
    let taken_over = poll_until(Duration::from_secs(20), || {
        receiver.received().iter().any(|r| String::from_utf8_lossy(&r.body).contains("entry-held")).then(Instant::now)
    })
    .await
    .expect("the dead node's held delivery was never delivered");
    let after = taken_over - killed_at;
    assert!(after < Duration::from_secs(2) + Duration::from_secs(3), "taken over after {after:?}, the lease is 2s");
    assert!(
        db.query_i64(
            "SELECT max(attempts)::bigint FROM hookbridge.deliveries d JOIN hookbridge.events e ON e.seq = d.event_seq
             WHERE convert_from(e.body, 'UTF8') LIKE '%entry-held%'"
        )
        .await
            >= 3,
        "the attempts the dead node made are kept"
    );
    // b comes back under its id (once its heartbeat has lapsed) while the load goes on.
    let mut b = start_node(dir.path(), "b", ports[1], &db, &receiver.url(), 2).await;
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), 8 * 60);

    let description = |r: &Received| -> String {
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["description"].as_str().unwrap().to_owned()
    };
    let delivered = poll_until(Duration::from_secs(60), || {
        let got: HashSet<String> = receiver.received().iter().map(description).collect();
        acked.is_subset(&got).then_some(())
    })
    .await;
    let got: HashSet<String> = receiver.received().iter().map(description).collect();
    assert!(delivered.is_some(), "{} acknowledged events not delivered", acked.difference(&got).count());
    // In order per entity: each worker's updates arrive (first time) in the order they were acknowledged.
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let mut firsts = HashSet::new();
    for d in receiver.received().iter().map(description).filter(|d| d.starts_with('w')) {
        if firsts.insert(d.clone()) {
            seen.entry(d.split('-').next().unwrap().to_owned()).or_default().push(d);
        }
    }
    for (worker, order) in &seen {
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, &sorted, "{worker}'s updates out of order");
    }
    assert_eq!(
        receiver.received().iter().filter(|r| description(r) == "once").count(),
        1,
        "the retry on the other node was not delivered again"
    );

    // The operator commands see the whole cluster, from any node's config.
    let cli = |node: &str, args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(binary())
            .args(args)
            .arg("--json")
            .arg("--config")
            .arg(dir.path().join(format!("{node}.toml")))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let listed = cli("c", &["events", "list", "--status", "delivered", "--limit", "10000"]);
    assert_eq!(listed.as_array().unwrap().len(), acked.len() + 2, "every event, whichever node took it");
    assert!(cli("a", &["events", "list", "--status", "pending"]).as_array().unwrap().is_empty());

    drop(lb);
    for node in [&mut a.child, &mut b.child, &mut c.child] {
        sigterm(node);
        let exit = wait_exit(node, Duration::from_secs(30), "no exit after SIGTERM").await;
        assert!(exit.success(), "{exit:?}");
    }
    assert_eq!(db.query_i64("SELECT count(*) FROM hookbridge.deliveries WHERE lease_owner IS NOT NULL").await, 0);
    let log = std::fs::read_to_string(dir.path().join("a-1.log")).unwrap();
    assert!(!log.contains(SECRET), "a secret reached the log");
    receiver.stop().await;
    db.drop_db().await;
}

/// PostgreSQL away (the database refuses connections and the node's are cut, as in a restart): webhooks get
/// `503` and `/readyz` fails while it is away; the node recovers by itself, and every `2xx` is delivered.
#[tokio::test(flavor = "multi_thread")]
async fn webhooks_get_503_while_the_database_is_away_and_the_node_recovers() {
    let db = TestDatabase::new("outage").await;
    let receiver = Receiver::start().await;
    let toml = node_config(0, "solo", &db, &receiver.url())
        .replace("listen = \"127.0.0.1:0\"\ninternal_listen", "internal_listen")
        .replace("lease = \"2s\"", "lease = \"2s\"\nconnect_timeout = \"1s\"")
        .replace("data_dir = \"data-solo\"", "data_dir = \"{dir}/data\"");
    let bridge = TestBridge::start(&toml).await;
    let template = String::from_utf8(read_fixture("clockify/NEW_TIME_ENTRY.json")).unwrap();
    let base = bridge.url("");
    assert_eq!(clockify(&base, &entry(&template, "e1", "before")).await.unwrap(), (200, "accepted".into()));

    let server = admin(&db.server).await;
    let away = |allow: bool| {
        let name = db.name.clone();
        let server = &server;
        async move {
            server.batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS {allow}")).await.unwrap();
            if !allow {
                server
                    .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", &[&name])
                    .await
                    .unwrap();
            }
        }
    };
    away(false).await;
    let started = Instant::now();
    let (status, _) = clockify(&base, &entry(&template, "e2", "while away")).await.unwrap();
    assert_eq!(status, 503, "never a 2xx for what cannot be stored");
    assert!(started.elapsed() < Duration::from_secs(10), "bounded by connect_timeout: {:?}", started.elapsed());
    let ready = client().get(bridge.url("/readyz")).send().await.unwrap().status().as_u16();
    assert_eq!(ready, 503);

    away(true).await;
    let back = Instant::now() + Duration::from_secs(30);
    let mut accepted = false;
    while Instant::now() < back {
        if clockify(&base, &entry(&template, "e3", "after")).await.unwrap().0 == 200 {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(accepted, "the node did not recover by itself");
    let got = receiver.wait_for(2, Duration::from_secs(20)).await;
    let descriptions: Vec<String> = got
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["description"].as_str().unwrap().to_owned()
        })
        .collect();
    assert!(
        descriptions.contains(&"before".to_owned()) && descriptions.contains(&"after".to_owned()),
        "{descriptions:?}"
    );
    assert!(!descriptions.contains(&"while away".to_owned()), "a refused webhook is not delivered");
    bridge.stop().await;
    receiver.stop().await;
    db.drop_db().await;
}

/// An add-on installed through one node is accepted by the other; `DELETED` through one revokes everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_addon_installed_through_one_node_is_accepted_by_the_others() {
    use crate::addon::{claims, keypair, rs256};
    use serde_json::json;
    let db = TestDatabase::new("addon").await;
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = keypair(keys.path(), "clockify");
    let receiver = Receiver::start().await;
    let toml = |node: &str| {
        format!(
            r#"
{storage}[sources.addon]
kind = "clockify-addon"
addon_key = "hookbridge-test"
name = "hookbridge test"
base_url = "https://bridge.example/hooks/addon"
scopes = ["TIME_ENTRY_READ"]
public_key_file = "{public}"
[sinks.out]
kind = "http"
url = "{receiver}"
[[routes]]
name = "entries"
sources = ["addon"]
events = ["NEW_TIME_ENTRY"]
to = ["out"]
"#,
            storage = storage(&db, node, "{dir}/data"),
            public = public.display(),
            receiver = receiver.url()
        )
    };
    let a = TestBridge::start(&toml("a")).await;
    let b = TestBridge::start(&toml("b")).await;
    let webhook_token = rs256(&private, &claims("hookbridge-test", "addon", json!({"webhook": "NEW_TIME_ENTRY"})));
    let lifecycle = |bridge: &TestBridge, body: serde_json::Value| {
        let token = rs256(&private, &claims("hookbridge-test", "addon", json!({})));
        let url = bridge.url(&format!("/hooks/addon/lifecycle/{}", body["kind"].as_str().unwrap()));
        async move {
            post_to(
                &url,
                &[("x-addon-lifecycle-token", token.as_str()), ("content-type", "application/json")],
                body.to_string(),
            )
            .await
            .0
        }
    };
    let body = String::from_utf8(read_fixture("clockify/NEW_TIME_ENTRY.json"))
        .unwrap()
        .replace("684446430300f917a02c198b", "ws1");
    let webhook = |bridge: &TestBridge| {
        let url = bridge.url("/hooks/addon/webhook/NEW_TIME_ENTRY");
        let (token, body) = (webhook_token.clone(), body.clone());
        async move {
            let headers = [
                ("clockify-webhook-event-type", "NEW_TIME_ENTRY"),
                ("content-type", "application/json"),
                ("clockify-signature", token.as_str()),
            ];
            post_to(&url, &headers, body).await.0
        }
    };
    assert_eq!(webhook(&b).await, 401, "not installed yet");
    let installed = json!({
        "kind": "installed", "addonId": "inst1", "authToken": "installation-token", "workspaceId": "ws1",
        "asUser": "u1", "apiUrl": "https://api.clockify.me/api", "addonUserId": "au1",
        "webhooks": [{"path": "https://bridge.example/hooks/addon/webhook/NEW_TIME_ENTRY", "webhookType": "ADDON", "authToken": webhook_token}],
    });
    assert_eq!(lifecycle(&a, installed).await, 200);
    let until = |want: u16| {
        let webhook = &webhook;
        let b = &b;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let got = webhook(b).await;
                if got == want {
                    return;
                }
                assert!(Instant::now() < deadline, "node b still answers {got}, not {want}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    until(200).await;
    receiver.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(lifecycle(&a, json!({"kind": "deleted", "addonId": "inst1", "workspaceId": "ws1"})).await, 200);
    until(401).await;
    assert_eq!(webhook(&a).await, 401);
    a.stop().await;
    b.stop().await;
    receiver.stop().await;
    db.drop_db().await;
}

/// Live channels are the cluster's: the dashboard on node b shows what the plugin published on whichever
/// node took the delivery (claims are exclusive, so the plugin ran on one node), and a node started later
/// shows the last payload at once.
#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_on_every_node_shows_what_a_plugin_published_on_one() {
    let db = TestDatabase::new("live").await;
    let toml = |node: &str| {
        format!(
            r#"
{storage}[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[plugins.dashboard]
path = "{wasm}"
[[routes]]
name = "dashboard"
events = ["NEW_TIMER_STARTED"]
to = ["dashboard"]
"#,
            storage = storage(&db, node, "{dir}/data"),
            wasm = crate::plugins::wasm("dashboard").display()
        )
    };
    let a = TestBridge::start(&toml("a")).await;
    let b = TestBridge::start(&toml("b")).await;
    let started = crate::dashboard::started();
    let (status, text) =
        a.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIMER_STARTED"), started.to_string()).await;
    assert_eq!(status, 200, "{text}");
    let running = |snapshot: Option<serde_json::Value>| {
        snapshot
            .and_then(|s| s["running"].as_array().map(|r| r.iter().map(|t| t["entryId"].clone()).collect::<Vec<_>>()))
    };
    for node in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if running(live(&node.internal_url(""), "dashboard").await) == Some(vec![started["id"].clone()]) {
                break;
            }
            assert!(Instant::now() < deadline, "node at {} never showed the running timer", node.internal);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A node that joins later shows the cluster's last payload from the start.
    let c = TestBridge::start(&toml("c")).await;
    assert_eq!(running(live(&c.internal_url(""), "dashboard").await), Some(vec![started["id"].clone()]));
    for node in [a, b, c] {
        node.stop().await;
    }
    db.drop_db().await;
}

/// The plugins' key-value store is the cluster's, and its atomics hold across nodes: two counters (one
/// through `increment`, one through compare-and-swap), eight events at a time on each of three daemons
/// (processes of their own), end exact in the shared table.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_s_counter_incremented_from_three_nodes_ends_exact() {
    let db = TestDatabase::new("kv").await;
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        let (port, internal) = (free_port(), free_port());
        let data = dir.path().join(name);
        let storage = storage(&db, name, &data.display().to_string());
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ninternal_listen = \"127.0.0.1:{internal}\"\n{}",
            crate::plugins::counters_config(&storage)
        );
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let child = spawn_daemon(&path, &dir.path().join(format!("{name}.log")));
        let base = format!("http://127.0.0.1:{port}");
        wait_healthy(&format!("{base}/healthz")).await;
        nodes.push((Node { base, child }, format!("http://127.0.0.1:{internal}")));
    }
    let bases: Vec<String> = nodes.iter().map(|(n, _)| n.base.clone()).collect();
    let sent = crate::plugins::post_counted(&bases, 150).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let open = "SELECT count(*) FROM hookbridge.deliveries WHERE status <> 'delivered'";
    while db.query_i64(open).await > 0 {
        assert!(Instant::now() < deadline, "the counters' deliveries never all finished");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every node took a share (claims are spread by who took the webhook and who polls first).
    for (node, internal) in &nodes {
        let m = client().get(format!("{internal}/metrics")).send().await.unwrap().text().await.unwrap();
        let took = metric(&m, r#"hookbridge_deliveries_total{outcome="delivered",sink="inc"}"#);
        assert!(took > 0.0, "node {} counted nothing:\n{m}", node.base);
    }
    let retried = db.query_i64("SELECT count(*) FROM hookbridge.attempts WHERE error IS NOT NULL").await;
    assert_eq!(retried, 0, "invocations failed and were retried: their counts would count twice");
    for plugin in ["inc", "cas"] {
        let count = db
            .query_i64(&format!(
                "SELECT convert_from(value, 'UTF8')::bigint FROM hookbridge.plugin_kv \
                 WHERE plugin = '{plugin}' AND key = 'count/BALANCE_UPDATED'"
            ))
            .await;
        assert_eq!(count, sent as i64, "{plugin} lost or doubled counts");
    }
    drop(nodes);
    db.drop_db().await;
}

/// Fairness: entities whose deliveries keep failing hold a slot only while an attempt runs, not through their
/// backoff (a retry goes back to the cluster until due), so with every node's slots fewer than the failing
/// entities, other entities' deliveries still go through at once.
#[tokio::test(flavor = "multi_thread")]
async fn failing_entities_do_not_hold_a_sink_s_slots_through_their_backoff() {
    let db = TestDatabase::new("fair").await;
    let receiver = Receiver::start().await;
    let template = String::from_utf8(read_fixture("clockify/NEW_TIME_ENTRY.json")).unwrap();
    let toml = |node: &str| {
        format!(
            r#"
{storage}[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[sinks.out]
kind = "http"
url = "{url}"
max_in_flight = 2
retry = {{ initial_backoff = "3s", max_backoff = "3s" }}
[[routes]]
name = "all"
to = ["out"]
"#,
            storage = storage(&db, node, "{dir}/data"),
            url = receiver.url()
        )
    };
    let nodes = [TestBridge::start(&toml("a")).await, TestBridge::start(&toml("b")).await];
    // Six failing entities: three times the cluster's four slots' worth... of slots, were they held.
    for i in 0..6 {
        receiver.fail(&format!("stuck-{i}"), 503, usize::MAX, None);
        let (status, text) = nodes[i % 2]
            .post(
                "/hooks/clockify",
                &clockify_headers(SECRET, "NEW_TIME_ENTRY"),
                entry(&template, &format!("stuck-{i}"), "stuck"),
            )
            .await;
        assert_eq!(status, 200, "{text}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while db.query_i64("SELECT count(*) FROM hookbridge.deliveries WHERE attempts >= 1").await < 6 {
        assert!(Instant::now() < deadline, "the failing entities were never all attempted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = Instant::now();
    for i in 0..10 {
        let (status, text) = nodes[i % 2]
            .post(
                "/hooks/clockify",
                &clockify_headers(SECRET, "NEW_TIME_ENTRY"),
                entry(&template, &format!("ok-{i}"), "fine"),
            )
            .await;
        assert_eq!(status, 200, "{text}");
    }
    receiver.wait_for(10, Duration::from_secs(20)).await;
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "healthy entities waited {:?} behind failing ones",
        sent.elapsed()
    );
    // The failing ones are still being retried, by either node, their order kept (one head each).
    assert_eq!(db.query_i64("SELECT count(*) FROM hookbridge.deliveries WHERE status = 'pending'").await, 6);
    for node in nodes {
        node.stop().await;
    }
    receiver.stop().await;
    db.drop_db().await;
}

/// A PostgreSQL server of the test's own (stopped on drop), so that a test may restart it or make it take TLS
/// connections only (`hostssl` in `pg_hba.conf`, a certificate for 127.0.0.1 from a throw-away CA: `ca.crt`
/// in its folder) without disturbing the tests that share the machine's server. Made with the server
/// binaries of Debian's package (`scripts/test` installs it), run as the `postgres` user when the test runs
/// as root (the server refuses root).
struct OwnServer {
    port: u16,
    tls: bool,
    bin: std::path::PathBuf,
    dir: tempfile::TempDir,
    running: bool,
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        if self.running {
            self.running = false;
            let _ = self
                .as_server("pg_ctl")
                .args(["stop", "-m", "immediate", "-D"])
                .arg(self.dir.path().join("data"))
                .output();
        }
    }
}

impl OwnServer {
    fn start(tls: bool) -> OwnServer {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| {
                d.filter_map(Result::ok).map(|e| e.path().join("bin")).filter(|b| b.join("initdb").exists()).max()
            })
            .expect("no PostgreSQL server binaries in /usr/lib/postgresql: scripts/test installs Debian's postgresql");
        let dir = tempfile::tempdir().unwrap();
        let mut server = OwnServer { port: free_port(), tls, bin, dir, running: false };
        if tls {
            crate::edge::make_cert(server.dir.path(), "server", "ca");
            std::fs::set_permissions(
                server.dir.path().join("server.key"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
        }
        server.own();
        let out = server
            .as_server("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(server.dir.path().join("data"))
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let host = if tls { "hostssl" } else { "host" };
        std::fs::write(
            server.dir.path().join("data/pg_hba.conf"),
            format!("local all all trust\n{host} all all 127.0.0.1/32 trust\n"),
        )
        .unwrap();
        server.own();
        server.start_again();
        server
    }

    fn root() -> bool {
        rustix::process::geteuid().is_root()
    }

    /// Gives the folder to the server's user.
    fn own(&self) {
        if Self::root() {
            let ok =
                std::process::Command::new("chown").args(["-R", "postgres:"]).arg(self.dir.path()).status().unwrap();
            assert!(ok.success(), "chown the server's folder");
        }
    }

    fn as_server(&self, program: &str) -> std::process::Command {
        let program = self.bin.join(program);
        let mut c = if Self::root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            std::process::Command::new(program)
        };
        c.current_dir(self.dir.path());
        c
    }

    /// Starts the server (again, after [`OwnServer::stop`]) on its port with `pg_ctl`, which waits until it
    /// answers.
    fn start_again(&mut self) {
        let dir = self.dir.path();
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c fsync=off -c unix_socket_directories={}",
            self.port,
            dir.display()
        );
        if self.tls {
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                dir.join("server.crt").display(),
                dir.join("server.key").display()
            ));
        }
        let out = self
            .as_server("pg_ctl")
            .args(["start", "-w", "-t", "30", "-D"])
            .arg(dir.join("data"))
            .arg("-l")
            .arg(dir.join("server.log"))
            .args(["-o", &options])
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl start: {}{}", String::from_utf8_lossy(&out.stderr), self.log());
        self.running = true;
    }

    /// Stops the server as an operator's restart does (fast shutdown: sessions are cut), or at once.
    fn stop_with(&mut self, mode: &str) {
        if std::mem::take(&mut self.running) {
            let out = self
                .as_server("pg_ctl")
                .args(["stop", "-w", "-m", mode, "-D"])
                .arg(self.dir.path().join("data"))
                .output()
                .unwrap();
            assert!(out.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    fn stop(&mut self) {
        self.stop_with("fast");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    fn psql_command(&self, sql: &str) -> std::process::Command {
        let mode = if self.tls { "require" } else { "disable" };
        let mut c = std::process::Command::new("psql");
        c.arg(format!("{} sslmode={mode}", self.url())).args(["-tAc", sql]);
        c
    }

    /// `sql` through psql (over TLS on a TLS server; psql does not check the certificate: it only reads).
    fn psql(&self, sql: &str) -> String {
        let out = self.psql_command(sql).output().unwrap();
        assert!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// With `tls = "verify-full"` the nodes talk to PostgreSQL over TLS only, verifying the server against the
/// configured CA; a server the CA did not sign, or a plain-TCP config against a TLS-only server, is refused
/// at start with a message that says why.
#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_database_over_verified_tls() {
    let server = tokio::task::spawn_blocking(|| OwnServer::start(true)).await.unwrap();
    let ca = server.dir.path().join("ca.crt");
    let config = |tls: &str| {
        format!(
            r#"
[storage]
data_dir = "{{dir}}/data"
backend = "postgres"
[storage.postgres]
url = "host=127.0.0.1 port={port} user=postgres dbname=postgres"
node_id = "tls"
{tls}
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
"#,
            port = server.port
        )
    };
    let verified = format!("tls = \"verify-full\"\nca_file = \"{}\"", ca.display());
    let bridge = TestBridge::start(&config(&verified)).await;
    let (status, text) = bridge
        .post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), r#"{"id":"over-tls"}"#.to_owned())
        .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(server.psql("SELECT count(*) FROM hookbridge.events"), "1", "stored over TLS");
    let plain = "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.application_name LIKE 'hookbridge tls%' AND NOT s.ssl";
    let tls = "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
               WHERE a.application_name LIKE 'hookbridge tls%' AND s.ssl";
    assert_eq!(server.psql(plain), "0", "every connection of the node is TLS");
    assert_ne!(server.psql(tls), "0");
    bridge.stop().await;

    // The system's roots do not include the test CA; plain TCP is not in pg_hba.conf.
    for (tls, expected) in [("tls = \"verify-full\"", "certificate"), ("", "no encryption")] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hookbridge.toml");
        std::fs::write(&path, config(tls).replace("{dir}", &dir.path().display().to_string())).unwrap();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(binary()).args(["run", "--config"]).arg(&path).output().unwrap()
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(expected), "{tls}: {stderr}");
    }
}

/// PostgreSQL restarted under load (a fast shutdown, as `systemctl restart` does, then started again): while
/// it is down webhooks get `503` and `/readyz` fails; the node recovers by itself, and every webhook answered
/// `2xx`, before, during or after, is delivered.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarted_under_load_loses_nothing_acknowledged() {
    let mut server = tokio::task::spawn_blocking(|| OwnServer::start(false)).await.unwrap();
    let receiver = Receiver::start().await;
    let storage = storage_at(&server.url(), "restart", "{dir}/data") + "connect_timeout = \"1s\"\n";
    let toml = to_receiver(&storage, &receiver.url());
    let bridge = TestBridge::start(&toml).await;
    let template = String::from_utf8(read_fixture("clockify/NEW_TIME_ENTRY.json")).unwrap();
    let base = bridge.url("");
    // Four workers, each its own entity, send until stopped; a 2xx is remembered, a 503 counted.
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut workers = Vec::new();
    for worker in 0..4 {
        let (acked, refused, stop, template, base) =
            (acked.clone(), refused.clone(), stop.clone(), template.clone(), base.clone());
        workers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.is_cancelled() {
                let id = format!("r{worker}-{i:04}");
                match clockify(&base, &entry(&template, &format!("entity-{worker}"), &id)).await {
                    Ok((200, _)) => {
                        acked.lock().unwrap().insert(id);
                        i += 1;
                    }
                    Ok((503, _)) => {
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    other => panic!("{id}: {other:?}"),
                }
            }
        }));
    }
    poll_until(Duration::from_secs(30), || (acked.lock().unwrap().len() >= 100).then_some(())).await.expect("load");
    let mut server = tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
    .await
    .unwrap();
    poll_until(Duration::from_secs(20), || (refused.load(std::sync::atomic::Ordering::Relaxed) >= 3).then_some(()))
        .await
        .expect("webhooks were not refused while PostgreSQL was down");
    let ready = client().get(bridge.url("/readyz")).send().await.unwrap().status().as_u16();
    assert_eq!(ready, 503, "/readyz while PostgreSQL is down");
    let during = acked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let server = tokio::task::spawn_blocking(move || {
        server.start_again();
        server
    })
    .await
    .unwrap();
    poll_until(Duration::from_secs(30), || (acked.lock().unwrap().len() >= during + 100).then_some(()))
        .await
        .expect("the node did not recover by itself");
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let delivered: HashSet<String> = receiver
            .received()
            .iter()
            .map(|r| {
                serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["description"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        let missing: Vec<&String> = acked.iter().filter(|id| !delivered.contains(*id)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged webhooks never delivered, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bridge.stop().await;
    receiver.stop().await;
    drop(server);
}
