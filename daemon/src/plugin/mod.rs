//! The WebAssembly plugin host (wasmtime, component model). The interface is the WIT package in
//! `plugin-api/wit/plugin.wit`; the host's bindings are generated from that same file.
//!
//! One [`Host`] per daemon: one engine (pooling allocator, epoch interruption driven by a ticker on a std
//! thread, fuel metering, compiled components cached on disk in `<data_dir>/plugin-cache`), one linker, the
//! plugins' key-value store. Loading a plugin compiles it (or takes it from the cache), checks the WIT
//! version it was built against, pre-instantiates it (imports resolved once) and runs its `init` once to
//! validate its config. Each event then runs in a fresh store from that template: no state leaks between
//! events, and a trap, a timeout or a memory exhaustion ends only that invocation.
//!
//! The sandbox: no WASI filesystem, sockets or environment unless the config grants them (`dirs`, `env`);
//! stdout and stderr go nowhere; HTTP only through the `http` import ([`net`]) or the standard
//! `wasi:http/outgoing-handler` under the same rules (`wasihttp.rs`); memory limited by a
//! per-store limiter; wall time by the epoch deadline (host calls count, and an HTTP call never outlives the
//! time left); fuel optional.

pub mod cli;
mod keyvalue;
pub mod kv;
pub mod net;
mod wasihttp;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

use crate::config::PluginSpec;
use crate::event::{Event, now_ms};
use crate::limits::PLUGIN_MAX_MEMORY;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../plugin-api/wit",
        world: "plugin",
        with: {
            "wasi:keyvalue/store.bucket": super::keyvalue::Bucket,
            "wasi:keyvalue/atomics.cas": super::keyvalue::Cas,
        },
    });
}

use bindings::hookbridge::plugin as wit;

/// The WIT package the host implements.
pub const WIT_PACKAGE: &str = "hookbridge:plugin";
/// Its version.
pub const WIT_VERSION: (u64, u64, u64) = (0, 1, 1);

/// Epoch ticker period: the resolution of time limits.
const TICK: Duration = Duration::from_millis(1);
/// Plugin instances alive at once across the daemon (the pooling allocator's slots).
const POOL_INSTANCES: u32 = 64;
/// Log lines kept per invocation, and bytes per line.
const MAX_LOG_LINES: usize = 200;
const MAX_LOG_LINE: usize = 4096;
/// Bytes of a plugin's stderr kept per invocation.
const MAX_STDERR: usize = 16 * 1024;

/// One daemon's plugin runtime.
#[derive(Clone)]
pub struct Host {
    engine: Engine,
    linker: Arc<Linker<State>>,
    kv: kv::Kv,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").finish_non_exhaustive()
    }
}

impl Host {
    /// Creates the engine (compiled components cached in `data_dir/plugin-cache`), the linker and the
    /// key-value store (`data_dir/plugins.db`), and starts the epoch ticker.
    pub fn new(data_dir: &Path) -> Result<Host, String> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true).epoch_interruption(true).consume_fuel(true);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(POOL_INSTANCES)
            .total_core_instances(POOL_INSTANCES * 8)
            .total_memories(POOL_INSTANCES * 2)
            .total_tables(POOL_INSTANCES * 4)
            .max_memory_size(PLUGIN_MAX_MEMORY as usize)
            // Reset the first pages of a slot's memory and tables by writing zeros rather than handing them
            // back to the kernel: every event gets a fresh instance, and page faults plus TLB shootdowns cost
            // more than a memset for a small plugin (see BENCHMARKS.md).
            .linear_memory_keep_resident(2 * 1024 * 1024)
            .table_keep_resident(64 * 1024);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let mut cache = wasmtime::CacheConfig::new();
        // The cache wants an absolute path; a data directory given relative to "." is one too.
        let cache_dir = std::path::absolute(data_dir.join("plugin-cache"))
            .map_err(|e| format!("plugin cache folder under {}: {e}", data_dir.display()))?;
        cache.with_directory(cache_dir);
        let cache = wasmtime::Cache::new(cache).map_err(|e| format!("plugin cache: {e}"))?;
        config.cache(Some(cache));
        let engine = Engine::new(&config).map_err(|e| format!("cannot create the WebAssembly engine: {e:#}"))?;
        let mut linker = Linker::<State>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| format!("WASI: {e:#}"))?;
        // The monotonic clock again, with subscriptions that end by the invocation's deadline: a plugin's only
        // way to block in WASI (no sockets, stdin empty) is to wait on one, and the epoch deadline stops wasm
        // code, not a thread parked in a host call.
        linker.allow_shadowing(true);
        wasmtime_wasi::p2::bindings::clocks::monotonic_clock::add_to_linker::<State, DeadlineClock>(
            &mut linker,
            deadline_clock,
        )
        .map_err(|e| format!("WASI clock: {e:#}"))?;
        linker.allow_shadowing(false);
        bindings::Plugin::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)
            .map_err(|e| format!("plugin interface: {e:#}"))?;
        // The standard outbound HTTP interface, under the `http` import's rules (`wasihttp.rs`).
        wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut linker).map_err(|e| format!("wasi:http: {e:#}"))?;
        // The ticker ends with the engine. It counts the ticks due since it started, not its wake-ups: a
        // sleep overshoots, and a ticker that counted wake-ups would let deadlines drift past the limit.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("hookbridge-epoch".into())
            .spawn(move || {
                let start = Instant::now();
                let mut ticks: u128 = 0;
                while let Some(engine) = weak.upgrade() {
                    let due = start.elapsed().as_nanos() / TICK.as_nanos();
                    while ticks < due {
                        engine.increment_epoch();
                        ticks += 1;
                    }
                    drop(engine);
                    std::thread::sleep(TICK);
                }
            })
            .map_err(|e| format!("cannot start the epoch ticker: {e}"))?;
        let kv = kv::Kv::open(data_dir)?;
        Ok(Host { engine, linker: Arc::new(linker), kv })
    }

    /// Keeps the plugins' keys in the cluster's store (before any plugin is loaded; on a runtime thread).
    pub fn share_kv(&mut self, shared: crate::store::SharedKv, timeout: Duration) {
        self.kv.share(shared, timeout);
    }

    /// The key-value store (for pruning expired keys).
    pub fn kv(&self) -> &kv::Kv {
        &self.kv
    }

    /// Loads a plugin: compile (or reuse the cached compilation), check its interface version, link it,
    /// and run `init` once with its config. Every error names the plugin and says what to do.
    pub fn load(&self, id: &str, spec: &PluginSpec) -> Result<Plugin, String> {
        let net = net::Net::new(spec.allowed_hosts.clone(), spec.http_timeout, spec.http_rate_limit)?;
        self.load_with(id, spec, net)
    }

    fn load_with(&self, id: &str, spec: &PluginSpec, net: net::Net) -> Result<Plugin, String> {
        let started = Instant::now();
        let bytes =
            std::fs::read(&spec.path).map_err(|e| format!("plugin {id}: cannot read {}: {e}", spec.path.display()))?;
        if bytes.get(4..8) == Some(&[1, 0, 0, 0]) {
            return Err(format!(
                "plugin {id}: {} is a core WebAssembly module, not a component; build it for wasm32-wasip2 with the hookbridge-plugin crate",
                spec.path.display()
            ));
        }
        let component = Component::new(&self.engine, &bytes)
            .map_err(|e| format!("plugin {id}: {} is not a valid component: {e:#}", spec.path.display()))?;
        check_version(id, &self.engine, &component)?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| format!("plugin {id}: cannot link it: {e:#}"))?;
        let pre = bindings::PluginPre::new(pre)
            .map_err(|e| format!("plugin {id}: it does not export this interface's `init` and `handle`: {e:#}"))?;
        let plugin = Plugin {
            inner: Arc::new(Inner {
                id: id.to_owned(),
                spec: spec.clone(),
                engine: self.engine.clone(),
                pre,
                kv: self.kv.clone(),
                net: Arc::new(net),
            }),
        };
        match plugin.run(None, None).outcome {
            Ok(_) => {}
            Err(Failure::InvalidConfig(m)) => return Err(format!("plugin {id}: its config is refused: {m}")),
            Err(e) => return Err(format!("plugin {id}: init failed: {e}")),
        }
        tracing::info!(plugin = id, path = %spec.path.display(), took = ?started.elapsed(), "plugin loaded");
        Ok(plugin)
    }
}

/// Loads every plugin of `config` in a throw-away host (nothing is written to the data directory), for
/// `hookbridge check`. Returns one message per plugin that does not load.
pub fn check_all(config: &crate::Config) -> Vec<String> {
    let plugins: Vec<(&String, &PluginSpec)> = config
        .sinks
        .iter()
        .filter_map(|(id, s)| match &s.kind {
            crate::config::SinkKind::Plugin(p) => Some((id, p)),
            _ => None,
        })
        .collect();
    if plugins.is_empty() {
        return Vec::new();
    }
    let dir = std::env::temp_dir().join(format!("hookbridge-check-{}-{}", std::process::id(), now_ms()));
    let errors = match Host::new(&dir) {
        Ok(host) => plugins.into_iter().filter_map(|(id, spec)| host.load(id, spec).err()).collect(),
        Err(e) => vec![e],
    };
    let _ = std::fs::remove_dir_all(&dir);
    errors
}

/// What [`run_once`] saw.
#[derive(Debug)]
pub struct TestRun {
    /// The invocation.
    pub invocation: Invocation,
    /// The time loading took.
    pub load: Duration,
    /// The requests the plugin made (`init` at load included), in order.
    pub requests: Vec<net::Sent>,
    /// The plugin's keys that the run changed.
    pub kv_changes: Vec<KvChange>,
}

/// A key a test run changed: the key, its value before and after (`None`: unset).
pub type KvChange = (String, Option<Vec<u8>>, Option<Vec<u8>>);

/// Runs a plugin once on one event, without a daemon: what `hookbridge plugin test` does. The key-value
/// store lives in `data_dir` (a fresh temporary folder unless the caller keeps one), seeded with `kv`;
/// outbound requests go where `exchanges` says.
pub fn run_once(
    data_dir: &Path,
    spec: &PluginSpec,
    event: &Event,
    exchanges: net::Exchanges,
    kv: &[(String, Vec<u8>)],
) -> Result<TestRun, String> {
    const ID: &str = "test";
    let host = Host::new(data_dir)?;
    for (key, value) in kv {
        host.kv.set(ID, key, value, None).map_err(|e| format!("--kv: {key}: {e}"))?;
    }
    let snapshot = |kv: &kv::Kv| -> Result<std::collections::BTreeMap<String, Vec<u8>>, String> {
        let keys = kv.keys(ID, "", None, usize::MAX)?;
        let values = kv.get_many(ID, &keys)?;
        Ok(keys.into_iter().zip(values).filter_map(|(k, v)| v.map(|v| (k, v))).collect())
    };
    let before = snapshot(&host.kv)?;
    let started = Instant::now();
    let net = net::Net::new(spec.allowed_hosts.clone(), spec.http_timeout, spec.http_rate_limit)?.for_test(exchanges);
    let plugin = host.load_with(ID, spec, net)?;
    let load = started.elapsed();
    let invocation = plugin.invoke(event, None);
    let after = snapshot(&host.kv)?;
    let mut kv_changes = Vec::new();
    for key in before.keys().chain(after.keys()).collect::<std::collections::BTreeSet<_>>() {
        let (was, now) = (before.get(key), after.get(key));
        if was != now {
            kv_changes.push((key.clone(), was.cloned(), now.cloned()));
        }
    }
    Ok(TestRun { invocation, load, requests: plugin.inner.net.sent(), kv_changes })
}

/// Refuses a component built against another major version of the interface (for 0.x: another minor).
fn check_version(id: &str, engine: &Engine, component: &Component) -> Result<(), String> {
    let ours = format!("{}.{}.{}", WIT_VERSION.0, WIT_VERSION.1, WIT_VERSION.2);
    let ty = component.component_type();
    for (name, _) in ty.imports(engine) {
        let Some(rest) = name.strip_prefix(&format!("{WIT_PACKAGE}/")) else { continue };
        let Some((_, version)) = rest.split_once('@') else {
            return Err(format!(
                "plugin {id}: it imports {name} without a version; this hookbridge provides {WIT_PACKAGE}@{ours}"
            ));
        };
        let mut parts = version.split(['.', '-', '+']).map(|p| p.parse::<u64>().unwrap_or(u64::MAX));
        let (major, minor) = (parts.next().unwrap_or(u64::MAX), parts.next().unwrap_or(u64::MAX));
        let compatible = major == WIT_VERSION.0 && (major != 0 || minor == WIT_VERSION.1);
        if !compatible {
            return Err(format!(
                "plugin {id}: it was built against {WIT_PACKAGE}@{version}, but this hookbridge provides {WIT_PACKAGE}@{ours}; rebuild it with a hookbridge-plugin release for {ours}"
            ));
        }
    }
    Ok(())
}

/// A loaded plugin: a pre-linked template from which every event gets a fresh instance. Cheap to clone.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    spec: PluginSpec,
    engine: Engine,
    pre: bindings::PluginPre<State>,
    kv: kv::Kv,
    net: Arc<net::Net>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin").field("id", &self.inner.id).finish_non_exhaustive()
    }
}

/// What a plugin asked for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// A new event for a sink.
    Emit {
        /// Sink id.
        sink: String,
        /// Event type (none: the handled event's).
        event_type: Option<String>,
        /// Body.
        #[serde(serialize_with = "as_text")]
        payload: Vec<u8>,
        /// Extra headers.
        headers: Vec<(String, String)>,
    },
    /// A payload for a live channel.
    Publish {
        /// Channel name.
        channel: String,
        /// Payload.
        payload: String,
    },
}

fn as_text<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(bytes))
}

/// Why an invocation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The plugin asked to be retried.
    #[error("{0}")]
    Retryable(String),
    /// The plugin gave up on this event.
    #[error("{0}")]
    Permanent(String),
    /// `init` refused the config.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// The plugin trapped (a panic, an out-of-bounds access, ...).
    #[error("trapped: {0}")]
    Trap(String),
    /// It ran past its time limit (or its fuel) and was stopped.
    #[error("stopped after its time limit of {0:?}")]
    Timeout(Duration),
    /// It ran out of fuel.
    #[error("ran out of fuel ({0})")]
    Fuel(u64),
    /// It wanted more memory than its limit.
    #[error("refused more memory than its limit of {0} bytes")]
    Memory(u64),
    /// No instance could be made (the pool is full).
    #[error("cannot instantiate: {0}")]
    Instantiate(String),
}

impl Failure {
    /// Metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Retryable(_) => "retryable",
            Failure::Permanent(_) => "permanent",
            Failure::InvalidConfig(_) => "invalid_config",
            Failure::Trap(_) => "trap",
            Failure::Timeout(_) => "timeout",
            Failure::Fuel(_) => "fuel",
            Failure::Memory(_) => "memory",
            Failure::Instantiate(_) => "instantiate",
        }
    }
}

/// A log line a plugin wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogLine {
    /// `trace` .. `error`.
    pub level: &'static str,
    /// The text.
    pub message: String,
}

/// The result of running a plugin on one event, with what it cost.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// Actions, or why there are none.
    pub outcome: Result<Vec<Action>, Failure>,
    /// Its log lines, in order.
    pub logs: Vec<LogLine>,
    /// Wall time, instantiation included.
    pub duration: Duration,
    /// Most memory it had at once (all its linear memories together), in bytes.
    pub memory_peak: u64,
    /// Fuel it used.
    pub fuel_used: u64,
}

impl Plugin {
    /// The plugin's id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Runs the plugin on `event` in a fresh instance: `init(config)`, then `handle(event)`. Blocks the
    /// calling thread for at most about the time limit: call it on a blocking thread.
    pub fn invoke(&self, event: &Event, addons: Option<&crate::addon::Installations>) -> Invocation {
        self.run(Some(event), addons)
    }

    fn run(&self, event: Option<&Event>, addons: Option<&crate::addon::Installations>) -> Invocation {
        let p = &self.inner;
        let started = Instant::now();
        let rt = tokio::runtime::Handle::try_current().ok();
        let mut wasi = WasiCtx::builder();
        // stderr is kept (bounded) so that a panic's message explains the trap; stdout goes nowhere.
        let stderr = wasmtime_wasi::p2::pipe::MemoryOutputPipe::new(MAX_STDERR);
        wasi.stderr(stderr.clone());
        for (k, v) in &p.spec.env {
            wasi.env(k, v.expose());
        }
        let mut grant_error = None;
        for (guest, host) in &p.spec.dirs {
            if let Err(e) = wasi.preopened_dir(host, guest, FsPerms::ReadOnly) {
                grant_error = Some(format!("cannot grant {}: {e:#}", host.display()));
            }
        }
        let state = State {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: Limiter::new(p.spec.memory_limit),
            plugin: p.id.clone(),
            kv: p.kv.clone(),
            net: Arc::clone(&p.net),
            http: wasmtime_wasi_http::WasiHttpCtx::new(),
            http_hooks: wasihttp::Hooks {
                net: Arc::clone(&p.net),
                deadline: started + p.spec.time_limit,
                plugin: p.id.clone(),
            },
            rt,
            deadline: started + p.spec.time_limit,
            overslept: false,
            logs: Vec::new(),
            source: event.map(|e| e.source.clone()).unwrap_or_default(),
            addons: addons.cloned(),
        };
        let mut store = Store::new(&p.engine, state);
        store.limiter(|s| &mut s.limiter);
        let fuel = p.spec.fuel.unwrap_or(u64::MAX);
        store.set_epoch_deadline(ticks_for(p.spec.time_limit) + 1);
        // At the deadline tick, the wall clock decides: the epoch only approximates it (its ticker can fall
        // behind on a busy machine, and catches up at once), so a run is never cut early nor let run late.
        store.epoch_deadline_callback(|ctx| {
            let left = ctx.data().deadline.saturating_duration_since(Instant::now());
            Ok(if left.is_zero() { UpdateDeadline::Interrupt } else { UpdateDeadline::Continue(ticks_for(left)) })
        });
        let outcome = match (store.set_fuel(fuel), grant_error) {
            (Err(e), _) => Err(Failure::Instantiate(format!("fuel: {e}"))),
            (_, Some(e)) => Err(Failure::Instantiate(e)),
            (Ok(()), None) => self.call(&mut store, event),
        };
        let fuel_used = fuel.saturating_sub(store.get_fuel().unwrap_or(fuel));
        let stderr = String::from_utf8_lossy(&stderr.contents()).into_owned();
        let outcome = match outcome {
            Err(Failure::Trap(m)) if !store.data().limiter.denied => {
                let lines: Vec<&str> = stderr.lines().collect();
                match lines.iter().position(|l| l.contains("panicked at")) {
                    Some(i) => {
                        let at = lines[i].split("panicked at").nth(1).unwrap_or_default().trim();
                        let message = lines.get(i + 1).map(|l| l.trim()).unwrap_or_default();
                        Err(Failure::Trap(format!("{m}: panicked at {at} {message}")))
                    }
                    None => Err(Failure::Trap(m)),
                }
            }
            other => other,
        };
        let outcome = match outcome {
            Err(Failure::Trap(_)) if store.data().limiter.denied => Err(Failure::Memory(p.spec.memory_limit)),
            // It waited in WASI up to the deadline: whatever it did after, it ran out of time. (A long
            // subscription it never waited on, with the deadline not reached, is no timeout.)
            _ if store.data().overslept && Instant::now() >= store.data().deadline => {
                Err(Failure::Timeout(p.spec.time_limit))
            }
            other => other,
        };
        let mut state = store.into_data();
        for line in stderr.lines().filter(|l| !l.trim().is_empty()).take(MAX_LOG_LINES) {
            if state.logs.len() < MAX_LOG_LINES {
                state.logs.push(LogLine { level: "stderr", message: line.chars().take(MAX_LOG_LINE).collect() });
            }
        }
        Invocation {
            outcome,
            logs: state.logs,
            duration: started.elapsed(),
            memory_peak: state.limiter.peak,
            fuel_used,
        }
    }

    fn call(&self, store: &mut Store<State>, event: Option<&Event>) -> Result<Vec<Action>, Failure> {
        let p = &self.inner;
        let trap = |e: wasmtime::Error| match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => Failure::Timeout(p.spec.time_limit),
            Some(Trap::OutOfFuel) => Failure::Fuel(p.spec.fuel.unwrap_or(u64::MAX)),
            Some(t) => Failure::Trap(t.to_string()),
            None => Failure::Trap(first_line(&format!("{:#}", e.root_cause()))),
        };
        let instance = p.pre.instantiate(&mut *store).map_err(|e| match e.downcast_ref::<Trap>() {
            Some(_) => trap(e),
            None => Failure::Instantiate(format!("{e:#}")),
        })?;
        instance.call_init(&mut *store, p.spec.config.expose()).map_err(trap)?.map_err(from_wit)?;
        let Some(event) = event else { return Ok(Vec::new()) };
        let arg = wit::types::Event {
            id: event.id.clone(),
            source: event.source.clone(),
            event_type: event.event_type.clone(),
            received_at_ms: event.received_at_ms,
            headers: event.headers.clone(),
            body: event.body.to_vec(),
        };
        let actions = instance.call_handle(&mut *store, &arg).map_err(trap)?.map_err(from_wit)?;
        Ok(actions
            .into_iter()
            .map(|a| match a {
                wit::types::Action::Emit(e) => {
                    Action::Emit { sink: e.sink, event_type: e.event_type, payload: e.payload, headers: e.headers }
                }
                wit::types::Action::Publish(p) => Action::Publish { channel: p.channel, payload: p.payload },
            })
            .collect())
    }
}

/// Epoch ticks in `d`, at least one.
fn ticks_for(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(TICK.as_nanos())).unwrap_or(u64::MAX).max(1)
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().chars().take(500).collect()
}

fn from_wit(e: wit::types::Error) -> Failure {
    match e {
        wit::types::Error::Retryable(m) => Failure::Retryable(m),
        wit::types::Error::Permanent(m) => Failure::Permanent(m),
        wit::types::Error::InvalidConfig(m) => Failure::InvalidConfig(m),
    }
}

/// Per-invocation state: the WASI context (nothing granted unless configured) and the plugin's capabilities.
struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    plugin: String,
    kv: kv::Kv,
    net: Arc<net::Net>,
    /// `wasi:http`'s state and the hooks that hold it to the `http` import's rules.
    http: wasmtime_wasi_http::WasiHttpCtx,
    http_hooks: wasihttp::Hooks,
    rt: Option<tokio::runtime::Handle>,
    deadline: Instant,
    /// A clock subscription was cut at the deadline: the invocation has reached its time limit, even if
    /// the guest got to return before its epoch deadline trapped it.
    overslept: bool,
    logs: Vec<LogLine>,
    /// The source of the event being handled: the only add-on whose installations the plugin may use.
    source: String,
    addons: Option<crate::addon::Installations>,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl wasmtime_wasi_http::WasiHttpView for State {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        wasmtime_wasi_http::WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.http_hooks }
    }
}

/// `wasi:clocks/monotonic-clock` for one invocation: WASI's own, except that a subscription (what a
/// sleep or a poll with a timeout waits on) ends no later than the invocation's deadline. The guest then
/// resumes past its epoch deadline and traps with a timeout at once.
struct DeadlineClock;

impl wasmtime::component::HasData for DeadlineClock {
    type Data<'a> = BoundedClock<'a>;
}

struct BoundedClock<'a> {
    clocks: wasmtime_wasi::clocks::WasiClocksCtxView<'a>,
    /// Time left until the invocation's deadline, in nanoseconds.
    left: u64,
    overslept: &'a mut bool,
}

/// How long past the deadline a cut subscription ends: a few epoch ticks, so that the epoch deadline has
/// passed when the guest resumes and its next call or loop traps.
const OVERSLEEP: Duration = Duration::from_millis(3);

fn deadline_clock(s: &mut State) -> BoundedClock<'_> {
    let left = u64::try_from(s.deadline.saturating_duration_since(Instant::now()).as_nanos()).unwrap_or(u64::MAX);
    BoundedClock {
        clocks: wasmtime_wasi::clocks::WasiClocksCtxView { ctx: s.wasi.clocks(), table: &mut s.table },
        left,
        overslept: &mut s.overslept,
    }
}

impl wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host for BoundedClock<'_> {
    fn now(&mut self) -> wasmtime::Result<u64> {
        wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host::now(&mut self.clocks)
    }

    fn resolution(&mut self) -> wasmtime::Result<u64> {
        wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host::resolution(&mut self.clocks)
    }

    fn subscribe_instant(
        &mut self,
        when: u64,
    ) -> wasmtime::Result<wasmtime::component::Resource<wasmtime_wasi::p2::DynPollable>> {
        let now = self.now()?;
        self.subscribe_duration(when.saturating_sub(now))
    }

    fn subscribe_duration(
        &mut self,
        duration: u64,
    ) -> wasmtime::Result<wasmtime::component::Resource<wasmtime_wasi::p2::DynPollable>> {
        let bounded = if duration > self.left {
            *self.overslept = true;
            self.left.saturating_add(OVERSLEEP.as_nanos() as u64)
        } else {
            duration
        };
        wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host::subscribe_duration(&mut self.clocks, bounded)
    }
}

/// Memory limit per invocation, over all its linear memories together (a component may have several),
/// remembering whether it refused a growth (to tell memory exhaustion from other traps) and the peak.
struct Limiter {
    limit: u64,
    /// Bytes of all memories now.
    total: u64,
    /// The last growth allowed, (current, desired): undone if the memory then fails to grow.
    allowed: Option<(u64, u64)>,
    peak: u64,
    denied: bool,
}

impl Limiter {
    fn new(limit: u64) -> Limiter {
        Limiter { limit, total: 0, allowed: None, peak: 0, denied: false }
    }
}

impl wasmtime::ResourceLimiter for Limiter {
    /// Called for every memory's creation (`current` 0) and growth, with that memory's sizes.
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.total.saturating_sub(current as u64).saturating_add(desired as u64);
        if total > self.limit {
            self.denied = true;
            return Ok(false);
        }
        self.total = total;
        self.allowed = Some((current as u64, desired as u64));
        self.peak = self.peak.max(total);
        Ok(true)
    }

    /// A growth this limiter allowed failed after all (the memory's own maximum, or the allocation).
    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        if let Some((current, desired)) = self.allowed.take() {
            self.total = self.total.saturating_sub(desired).saturating_add(current);
        }
        Ok(())
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl wit::types::Host for State {}

impl wit::log::Host for State {
    fn log(&mut self, level: wit::log::Level, message: String) {
        use wit::log::Level;
        let message: String = message.chars().take(MAX_LOG_LINE).collect();
        let plugin = self.plugin.as_str();
        let name = match level {
            Level::Trace => {
                tracing::trace!(plugin, "{message}");
                "trace"
            }
            Level::Debug => {
                tracing::debug!(plugin, "{message}");
                "debug"
            }
            Level::Info => {
                tracing::info!(plugin, "{message}");
                "info"
            }
            Level::Warn => {
                tracing::warn!(plugin, "{message}");
                "warn"
            }
            Level::Error => {
                tracing::error!(plugin, "{message}");
                "error"
            }
        };
        if self.logs.len() < MAX_LOG_LINES {
            self.logs.push(LogLine { level: name, message });
        }
    }
}

impl wit::kv::Host for State {
    fn get(&mut self, key: String) -> Option<Vec<u8>> {
        self.kv.get(&self.plugin, &key).unwrap_or_else(|e| {
            tracing::error!(plugin = %self.plugin, error = %e, "key-value get failed");
            None
        })
    }

    fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> Result<(), String> {
        self.kv.set(&self.plugin, &key, &value, ttl_ms)
    }

    fn delete(&mut self, key: String) -> Result<(), String> {
        self.kv.delete(&self.plugin, &key)
    }

    fn list(&mut self, prefix: String) -> Vec<String> {
        self.kv.list(&self.plugin, &prefix).unwrap_or_else(|e| {
            tracing::error!(plugin = %self.plugin, error = %e, "key-value list failed");
            Vec::new()
        })
    }
}

impl wit::http::Host for State {
    fn send(&mut self, request: wit::http::Request) -> Result<wit::http::Response, wit::http::HttpError> {
        use wit::http::HttpError;
        let Some(rt) = self.rt.clone() else {
            return Err(HttpError::Failed("no runtime for outbound requests".into()));
        };
        let request =
            net::Request { method: request.method, url: request.url, headers: request.headers, body: request.body };
        let url = request.url.clone();
        let result = self.net.send(&rt, request, self.deadline);
        match &result {
            Ok(r) => {
                tracing::debug!(plugin = %self.plugin, url = %strip_query(&url), status = r.status, "plugin HTTP request")
            }
            Err(e) => {
                tracing::info!(plugin = %self.plugin, url = %strip_query(&url), error = ?e, "plugin HTTP request failed")
            }
        }
        result.map(|r| wit::http::Response { status: r.status, headers: r.headers, body: r.body }).map_err(
            |e| match e {
                net::NetError::Denied(m) => HttpError::Denied(m),
                net::NetError::Timeout => HttpError::Timeout,
                net::NetError::RateLimited => HttpError::RateLimited,
                net::NetError::Failed(m) => HttpError::Failed(m),
            },
        )
    }
}

/// A URL without its query (which may hold a token), for logs.
fn strip_query(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

impl wit::addon::Host for State {
    fn lookup(&mut self, workspace_id: String) -> Option<wit::addon::Installation> {
        let i = self.addons.as_ref()?.active(&self.source, &workspace_id)?;
        Some(wit::addon::Installation { workspace_id: i.workspace_id, api_url: i.api_url, token: i.auth_token })
    }
}

impl wit::clock::Host for State {
    fn now_ms(&mut self) -> i64 {
        now_ms()
    }
}

#[cfg(test)]
mod tests {
    use wasmtime::ResourceLimiter;

    use super::Limiter;

    #[test]
    fn the_memory_limit_counts_every_memory_of_an_invocation() {
        const MIB: usize = 1 << 20;
        let mut l = Limiter::new(64 * MIB as u64);
        assert!(l.memory_growing(0, 40 * MIB, None).unwrap(), "memory A created");
        assert!(!l.memory_growing(0, 40 * MIB, None).unwrap(), "memory B would make 80 MiB in all");
        assert!(l.denied);
        assert!(l.memory_growing(0, 20 * MIB, None).unwrap(), "memory B at 20 MiB: 60 in all");
        assert!(l.memory_growing(40 * MIB, 44 * MIB, None).unwrap(), "A grows to 44: 64 in all");
        assert!(!l.memory_growing(20 * MIB, 21 * MIB, None).unwrap(), "B cannot grow past the total");
        assert_eq!(l.peak, 64 * MIB as u64);
        // A growth allowed here that then fails (the memory's own maximum) is not counted.
        let mut l = Limiter::new(64 * MIB as u64);
        assert!(l.memory_growing(0, 40 * MIB, None).unwrap());
        assert!(l.memory_growing(40 * MIB, 60 * MIB, None).unwrap());
        l.memory_grow_failed(wasmtime::Error::msg("past the memory's maximum")).unwrap();
        assert!(l.memory_growing(40 * MIB, 64 * MIB, None).unwrap(), "still at 40 MiB, so 64 fits");
    }
}
