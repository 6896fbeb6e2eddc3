//! Test helpers: a recording HTTP receiver, a bridge started from TOML text, requests and polling.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Path of a fixture under `tests/fixtures`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)
}

pub fn read_fixture(rel: &str) -> Vec<u8> {
    std::fs::read(fixture(rel)).unwrap()
}

/// The `hookbridge` binary built for these tests.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_hookbridge")
}

/// One request the receiver saw.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// One request as it arrived, whatever it was answered.
#[derive(Debug, Clone)]
pub struct Hit {
    pub at: Instant,
    pub status: u16,
    pub body: Bytes,
}

/// Planned failures: answer `status` (with `Retry-After: retry_after`) to the next `times` requests whose
/// body contains `needle` (every request when `needle` is empty).
#[derive(Debug, Clone)]
struct Failure {
    needle: String,
    status: u16,
    retry_after: Option<u64>,
    times: usize,
    /// Answer only after this long (an attempt that stays in flight).
    stall: Option<Duration>,
}

#[derive(Clone)]
struct ReceiverState {
    seen: Arc<Mutex<Vec<Received>>>,
    hits: Arc<Mutex<Vec<Hit>>>,
    failures: Arc<Mutex<Vec<Failure>>>,
    status: Arc<Mutex<u16>>,
}

/// An HTTP server that records every POST and answers with a configurable status.
pub struct Receiver {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Received>>>,
    hits: Arc<Mutex<Vec<Hit>>>,
    failures: Arc<Mutex<Vec<Failure>>>,
    status: Arc<Mutex<u16>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap()).await
    }

    pub async fn start_on(listener: TcpListener) -> Receiver {
        let addr = listener.local_addr().unwrap();
        let state = ReceiverState {
            seen: Arc::default(),
            hits: Arc::default(),
            failures: Arc::default(),
            status: Arc::new(Mutex::new(200)),
        };
        let app = Router::new()
            .route(
                "/{*path}",
                post(|State(s): State<ReceiverState>, headers: HeaderMap, body: Bytes| async move {
                    let mut status = *s.status.lock().unwrap();
                    let mut retry_after = None;
                    let mut stall = None;
                    {
                        let mut failures = s.failures.lock().unwrap();
                        let text = String::from_utf8_lossy(&body).into_owned();
                        if let Some(f) = failures.iter_mut().find(|f| f.times > 0 && text.contains(&f.needle)) {
                            f.times -= 1;
                            status = f.status;
                            retry_after = f.retry_after;
                            stall = f.stall;
                        }
                    }
                    if let Some(stall) = stall {
                        tokio::time::sleep(stall).await;
                    }
                    s.hits.lock().unwrap().push(Hit { at: Instant::now(), status, body: body.clone() });
                    if (200..300).contains(&status) {
                        s.seen.lock().unwrap().push(Received { headers, body });
                    }
                    let mut r = axum::response::IntoResponse::into_response(StatusCode::from_u16(status).unwrap());
                    if let Some(secs) = retry_after {
                        r.headers_mut().insert("retry-after", secs.into());
                    }
                    r
                }),
            )
            .with_state(state.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Receiver {
            addr,
            seen: state.seen,
            hits: state.hits,
            failures: state.failures,
            status: state.status,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/in", self.addr)
    }

    /// Answer every later request with `status` (and record only 2xx ones).
    pub fn answer(&self, status: u16) {
        *self.status.lock().unwrap() = status;
    }

    /// Answer `status` to the next `times` requests whose body contains `needle`.
    pub fn fail(&self, needle: &str, status: u16, times: usize, retry_after: Option<u64>) {
        self.failures.lock().unwrap().push(Failure { needle: needle.into(), status, retry_after, times, stall: None });
    }

    /// Holds every later request whose body contains `needle` for `stall`, then answers `503` (until healed).
    pub fn stall(&self, needle: &str, stall: Duration) {
        let f =
            Failure { needle: needle.into(), status: 503, retry_after: None, times: usize::MAX, stall: Some(stall) };
        self.failures.lock().unwrap().push(f);
    }

    /// Stops failing the requests whose body contains `needle`.
    pub fn heal(&self, needle: &str) {
        self.failures.lock().unwrap().iter_mut().filter(|f| f.needle == needle).for_each(|f| f.times = 0);
    }

    /// Every request, in arrival order, with the status it got.
    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    pub fn received(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests arrived, or panics after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let got = poll_until(timeout, || {
            let seen = self.received();
            (seen.len() >= n).then_some(seen)
        })
        .await;
        got.unwrap_or_else(|| panic!("expected {n} deliveries, got {}", self.received().len()))
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// Polls `f` every 20 ms until it returns `Some`, or `None` after `timeout`.
pub async fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A bridge started in-process from TOML text, served on a loopback port.
pub struct TestBridge {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    /// The config text, `{dir}` filled in.
    pub text: String,
    /// The internal listener's address (metrics, detailed readiness, dashboard, live channels).
    pub internal: SocketAddr,
    /// The admin API's address, when the config has `[admin]`.
    pub admin: Option<SocketAddr>,
    /// The bridge's spool (to break it on purpose).
    pub store: hookbridge::store::Store,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestBridge {
    /// `toml` may use `{dir}` for the test's temporary folder.
    pub async fn start(toml: &str) -> TestBridge {
        let dir = tempfile::tempdir().unwrap();
        let text = toml.replace("{dir}", &dir.path().display().to_string());
        let config = hookbridge::Config::parse(&text, None, dir.path(), &hookbridge::config::ProcessEnv)
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let bridge = hookbridge::Bridge::start(config).await.unwrap();
        let store = bridge.store().clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let internal_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let internal = internal_listener.local_addr().unwrap();
        let mut admin = None;
        let mut admin_listener = None;
        if bridge.admin_router().is_some() {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            admin = Some(l.local_addr().unwrap());
            admin_listener = Some(l);
        }
        let sockets =
            hookbridge::bridge::Sockets { webhook: listener, internal: Some(internal_listener), admin: admin_listener };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            bridge
                .serve(sockets, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        TestBridge { addr, dir, text, internal, admin, store, stop: Some(stop), task: Some(task) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A URL on the internal listener.
    pub fn internal_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.internal)
    }

    pub async fn post(&self, path: &str, headers: &[(&str, &str)], body: impl Into<reqwest::Body>) -> (u16, String) {
        post_to(&self.url(path), headers, body).await
    }

    pub async fn metrics(&self) -> String {
        client().get(self.internal_url("/metrics")).send().await.unwrap().text().await.unwrap()
    }

    /// Writes the config to a file (for the CLI) and returns its path.
    pub fn config_file(&self) -> PathBuf {
        let path = self.dir.path().join("hookbridge.toml");
        std::fs::write(&path, &self.text).unwrap();
        path
    }

    /// Runs `hookbridge <args> --config <this config>`; returns stdout, failing the test on a non-zero exit.
    pub fn cli(&self, args: &[&str]) -> String {
        let out =
            std::process::Command::new(binary()).args(args).arg("--config").arg(self.config_file()).output().unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success(), "hookbridge {args:?} failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        stdout
    }

    /// Polls `/metrics` until `name_and_labels` is at least `at_least`; returns the metrics text.
    pub async fn wait_metric(&self, name_and_labels: &str, at_least: f64) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let m = self.metrics().await;
            if metric(&m, name_and_labels) >= at_least {
                return m;
            }
            assert!(Instant::now() < deadline, "{name_and_labels} never reached {at_least}:\n{m}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls `/metrics` until `name_and_labels` equals `value` (gauges read from the spool, such as dead
    /// letters, are refreshed every couple of seconds); returns the metrics text.
    pub async fn wait_metric_eq(&self, name_and_labels: &str, value: f64) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let m = self.metrics().await;
            if metric(&m, name_and_labels) == value {
                return m;
            }
            assert!(Instant::now() < deadline, "{name_and_labels} never became {value}:\n{m}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server and the bridge (graceful shutdown), waiting for it.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }
}

/// POSTs `body` with `headers` to `url` (a TestBridge or a child daemon): status and body text.
pub async fn post_to(url: &str, headers: &[(&str, &str)], body: impl Into<reqwest::Body>) -> (u16, String) {
    let mut req = client().post(url).body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

/// The value of a metric line `name{labels} value`, or 0 when absent.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

/// Clockify request headers for `event`, signed with `secret`.
pub fn clockify_headers<'a>(secret: &'a str, event: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("clockify-signature", secret),
        ("clockify-webhook-event-type", event),
        ("content-type", "application/json"),
        ("user-agent", "Vert.x-WebClient/4.2.5"),
    ]
}

/// A free loopback port for a child daemon, chosen outside the kernel's ephemeral range so that no test's
/// port-0 listener can take it between this check and the daemon's bind.
pub fn free_port() -> u16 {
    use rand::Rng;
    loop {
        let port = rand::rng().random_range(20_000..30_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A receiver that is down: it holds its port (so no other test can take it) and closes every connection
/// at once, before reading a request. `up()` hands the port back to serve a real `Receiver`.
pub struct DownPort {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<TcpListener>,
}

impl DownPort {
    pub async fn up(self) -> TcpListener {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

pub async fn hung_receiver() -> (DownPort, std::net::SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => return listener,
                conn = listener.accept() => drop(conn),
            }
        }
    });
    (DownPort { stop, task }, addr)
}

/// The last payload of live channel `channel` (`GET /live/<channel>`, Server-Sent Events): the first `data:`
/// line, if one comes within two seconds.
pub async fn live(base_url: &str, channel: &str) -> Option<serde_json::Value> {
    let mut r = client().get(format!("{base_url}/live/{channel}")).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    let got = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(Some(chunk)) = r.chunk().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if let Some(line) = text.lines().find(|l| l.starts_with("data:")) {
                return Some(serde_json::from_str(line.trim_start_matches("data:").trim()).unwrap());
            }
        }
        None
    })
    .await;
    got.ok().flatten()
}

/// Starts `hookbridge run --config <config>` as a child process, its stderr (at `RUST_LOG=warn`) in `log`.
pub fn spawn_daemon(config: &Path, log: &Path) -> std::process::Child {
    std::process::Command::new(binary())
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Waits until `url` answers 2xx (a child daemon is up), or panics after a minute.
pub async fn wait_healthy(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client().get(url).send().await.map(|r| r.status().is_success()).unwrap_or(false) {
        assert!(Instant::now() < deadline, "daemon did not become healthy at {url}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends SIGTERM to a child daemon.
pub fn sigterm(child: &std::process::Child) {
    let sent = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(sent.success(), "kill -TERM failed");
}

/// Waits for a child daemon to exit; panics with `what` once `timeout` has passed.
pub async fn wait_exit(child: &mut std::process::Child, timeout: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
