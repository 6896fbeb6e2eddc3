//! Per-event cost of a plugin in the daemon's host: load once (compile, link, pre-instantiate), then run it
//! on one event N times, each in a fresh instance from the template, exactly as a delivery does. Prints the
//! median and p99 of one invocation and of a baseline (the same work without the plugin: building the
//! event argument and a thread hop are not included in either).
//!
//! `cargo run --release -p hookbridge --example plugin_bench -- PLUGIN.wasm CONFIG_JSON BODY.json N`

#![allow(clippy::print_stdout, clippy::print_stderr, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use hookbridge::config::{PluginSpec, SecretString};
use hookbridge::event::Event;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [plugin, config, body, n] = args.as_slice() else {
        eprintln!("usage: plugin_bench PLUGIN.wasm CONFIG_JSON BODY.json N");
        std::process::exit(2);
    };
    let n: usize = n.parse().expect("N");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let _guard = rt.enter();
    let dir = std::env::temp_dir().join(format!("hookbridge-plugin-bench-{}", std::process::id()));
    let host = hookbridge::plugin::Host::new(&dir).expect("host");
    let spec = PluginSpec {
        path: plugin.into(),
        config: SecretString::new(config.as_str()),
        allowed_hosts: Vec::new(),
        memory_limit: 64 * 1024 * 1024,
        time_limit: Duration::from_millis(100),
        fuel: None,
        http_timeout: Duration::from_secs(5),
        http_rate_limit: 20,
        env: Vec::new(),
        dirs: Vec::new(),
    };
    let started = Instant::now();
    let loaded = host.load("bench", &spec).expect("load");
    let load = started.elapsed();
    let event = Event {
        id: "0190f1d2-0000-7000-8000-000000000000".into(),
        source: "clockify".into(),
        event_type: "NEW_TIME_ENTRY".into(),
        received_at_ms: 0,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from(std::fs::read(body).expect("body")),
        dedup_key: String::new(),
        ordering_key: None,
        body_is_json: false,
    };
    // Warm-up: the first instances fault in the pool's pages.
    for _ in 0..200 {
        assert!(loaded.invoke(&event, None).outcome.is_ok(), "the plugin must succeed on the event");
    }
    let mut times = Vec::with_capacity(n);
    let wall = Instant::now();
    for _ in 0..n {
        let inv = loaded.invoke(&event, None);
        times.push(inv.duration);
    }
    let wall = wall.elapsed();
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    println!(
        "RESULT invocations={n} load_ms={} median_us={:.1} p99_us={:.1} per_sec_one_thread={:.0}",
        load.as_millis(),
        pct(0.5).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6,
        n as f64 / wall.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
