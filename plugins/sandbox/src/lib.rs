//! Misbehaves on purpose, to prove that the daemon's sandbox holds. Config `{ mode = "..." }` picks how, at
//! `handle` time (`init` only validates, so loading the plugin is safe):
//!
//! - `loop`: runs forever (the daemon's deadline must stop it);
//! - `sleep`: sleeps 60 s in WASI (the deadline must stop it inside the host call, not after it);
//! - `alloc`: allocates and touches 1 GiB (the memory limit must stop it);
//! - `file`: reads `/etc/hostname` and `$HOME` (must fail: returns a permanent error starting with `file: `);
//! - `http`: GETs the config's `url` (returns a permanent error starting with `http: ` when the daemon refuses);
//! - `panic`: panics (a trap);
//! - `ok`: logs `ok` and succeeds with no action.
//!
//! When something that should have been stopped succeeds anyway, it publishes what it got to the live channel
//! `sandbox`, so that a test sees the breach.

use std::hint::black_box;

use hookbridge_plugin::http::{self, Request};
use hookbridge_plugin::serde_json::Value;
use hookbridge_plugin::{Action, Error, Event, Plugin, log, parse_config};
use serde::Deserialize;

/// The live channel that reports a breach.
const BREACH_CHANNEL: &str = "sandbox";

/// What to do on each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Loop,
    Sleep,
    Alloc,
    File,
    Http,
    Panic,
    Ok,
}

/// The plugin, built from its config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sandbox {
    mode: Mode,
    /// The URL to GET in `http` mode.
    url: Option<String>,
}

impl Plugin for Sandbox {
    fn init(config: Value) -> Result<Self, Error> {
        let plugin: Self = parse_config(config)?;
        if plugin.mode == Mode::Http && plugin.url.is_none() {
            return Err(Error::invalid_config("mode `http` needs a `url`"));
        }
        Ok(plugin)
    }

    fn handle(&self, _event: Event) -> Result<Vec<Action>, Error> {
        match self.mode {
            Mode::Loop => spin_forever(),
            Mode::Sleep => {
                let started = std::time::Instant::now();
                std::thread::sleep(std::time::Duration::from_secs(60));
                let slept = started.elapsed();
                Ok(vec![Action::publish(BREACH_CHANNEL, format!("sleep: slept {slept:?} and went on"))])
            }
            Mode::Alloc => allocate_a_gibibyte(),
            Mode::File => read_outside(),
            Mode::Http => {
                let url = self.url.as_deref().unwrap_or_default();
                match http::send(&Request::get(url)) {
                    Ok(response) => {
                        log::info(format_args!("http: {url} answered {}", response.status));
                        Ok(vec![])
                    }
                    Err(err) => Err(Error::permanent(format!("http: {err:?}"))),
                }
            }
            Mode::Panic => panic!("sandbox panic"),
            Mode::Ok => {
                log::info("ok");
                Ok(vec![])
            }
        }
    }
}

/// Never returns: `black_box` keeps the optimizer from proving the loop useless.
fn spin_forever() -> ! {
    let mut turns: u64 = 0;
    loop {
        turns = black_box(turns.wrapping_add(1));
    }
}

/// Allocates 1 GiB and writes to every page of it, so that the memory is really used.
fn allocate_a_gibibyte() -> Result<Vec<Action>, Error> {
    const SIZE: usize = 1 << 30;
    let mut memory: Vec<u8> = black_box(Vec::with_capacity(SIZE));
    memory.resize(SIZE, 0);
    for page in memory.chunks_mut(64 * 1024) {
        page[0] = 1;
    }
    let touched = black_box(memory).iter().step_by(64 * 1024).filter(|byte| **byte == 1).count();
    Ok(vec![Action::publish(BREACH_CHANNEL, format!("alloc: allocated 1 GiB and touched {touched} pages"))])
}

/// Tries the file system and the environment, neither of which the daemon grants.
fn read_outside() -> Result<Vec<Action>, Error> {
    match (std::fs::read_to_string("/etc/hostname"), std::env::var("HOME")) {
        (Err(file), Err(env)) => Err(Error::permanent(format!("file: /etc/hostname: {file}; env: HOME: {env}"))),
        (file, env) => {
            Ok(vec![Action::publish(BREACH_CHANNEL, format!("file: /etc/hostname: {file:?}; env: HOME: {env:?}"))])
        }
    }
}

hookbridge_plugin::export!(Sandbox);
