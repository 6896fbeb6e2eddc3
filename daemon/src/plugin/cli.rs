//! `hookbridge plugin test`: run a plugin on one event without a daemon and show what it did, the plugin
//! author's inner loop. The run is the daemon's (same host, limits and capabilities), so what it prints is
//! what the daemon would do with the same event: the same actions, in the same order.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

use super::net::Exchanges;
use super::{Action, Failure, TestRun};
use crate::config::{PluginSpec, SecretString};
use crate::event::{Event, now_ms};

/// The command's arguments.
#[derive(Debug, Clone)]
pub struct TestArgs {
    /// Component file.
    pub plugin: PathBuf,
    /// Config as JSON.
    pub config: String,
    /// Event type.
    pub event: String,
    /// Source id.
    pub source: String,
    /// Allowed hosts.
    pub allow_hosts: Vec<String>,
    /// Wall time limit.
    pub time_limit: Duration,
    /// Memory limit, bytes.
    pub memory_limit: u64,
    /// Fuel limit.
    pub fuel: Option<u64>,
    /// Key-value folder to keep.
    pub data_dir: Option<PathBuf>,
    /// Answer outbound requests from the exchange files in this folder (no network).
    pub mock_http: Option<PathBuf>,
    /// Make outbound requests and write each exchange to this folder.
    pub record: Option<PathBuf>,
    /// JSON object of keys to seed the plugin's store with (string values).
    pub kv: Option<PathBuf>,
    /// JSON output.
    pub json: bool,
    /// Body file.
    pub body: PathBuf,
}

/// Runs the test; returns the report and whether the plugin succeeded.
pub fn test(args: &TestArgs) -> Result<(String, bool), String> {
    let config: serde_json::Value =
        serde_json::from_str(&args.config).map_err(|e| format!("--config is not JSON: {e}"))?;
    if !config.is_object() {
        return Err("--config must be a JSON object".into());
    }
    let body = std::fs::read(&args.body).map_err(|e| format!("cannot read {}: {e}", args.body.display()))?;
    let spec = PluginSpec {
        path: args.plugin.clone(),
        config: SecretString::new(config.to_string()),
        allowed_hosts: args.allow_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        memory_limit: args.memory_limit,
        time_limit: args.time_limit,
        fuel: args.fuel,
        http_timeout: Duration::from_secs(5),
        http_rate_limit: 20,
        env: Vec::new(),
        dirs: Vec::new(),
    };
    let event = Event {
        id: uuid::Uuid::now_v7().to_string(),
        source: args.source.clone(),
        event_type: args.event.clone(),
        received_at_ms: now_ms(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from(body),
        dedup_key: String::new(),
        ordering_key: None,
        body_is_json: false,
    };
    let exchanges = match (&args.mock_http, &args.record) {
        (Some(_), Some(_)) => return Err("--mock-http and --record exclude each other".into()),
        (Some(dir), None) => Exchanges::Mock(Exchanges::load(dir)?),
        (None, Some(dir)) => {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            Exchanges::Record(dir.clone())
        }
        (None, None) => Exchanges::Live,
    };
    let seed = match &args.kv {
        Some(path) => seed(path)?,
        None => Vec::new(),
    };
    let temp = std::env::temp_dir().join(format!("hookbridge-plugin-test-{}-{}", std::process::id(), now_ms()));
    let dir = args.data_dir.clone().unwrap_or_else(|| temp.clone());
    let result = super::run_once(&dir, &spec, &event, exchanges, &seed);
    if args.data_dir.is_none() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    let run = result?;
    let ok = run.invocation.outcome.is_ok();
    Ok((if args.json { report_json(&run) } else { report_text(&args.plugin, &event, &run) }, ok))
}

/// `--kv FILE`: a JSON object of keys and their values (strings; anything else is stored as its JSON text).
fn seed(path: &std::path::Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| format!("{}: not a JSON object of keys: {e}", path.display()))?;
    Ok(map
        .into_iter()
        .map(|(k, v)| {
            let value = match v {
                serde_json::Value::String(s) => s.into_bytes(),
                other => other.to_string().into_bytes(),
            };
            (k, value)
        })
        .collect())
}

fn text(v: Option<&[u8]>) -> serde_json::Value {
    v.map_or(serde_json::Value::Null, |v| serde_json::Value::String(String::from_utf8_lossy(v).into_owned()))
}

fn report_json(run: &TestRun) -> String {
    let (inv, load) = (&run.invocation, run.load);
    let (outcome, error, actions) = match &inv.outcome {
        Ok(a) => ("ok", None, a.clone()),
        Err(f) => (f.kind(), Some(f.to_string()), Vec::new()),
    };
    let kv: Vec<serde_json::Value> = run
        .kv_changes
        .iter()
        .map(|(k, was, now)| json!({ "key": k, "before": text(was.as_deref()), "after": text(now.as_deref()) }))
        .collect();
    let mut s = json!({
        "outcome": outcome,
        "error": error,
        "actions": actions,
        "requests": run.requests,
        "kv_changes": kv,
        "logs": inv.logs,
        "duration_us": inv.duration.as_micros() as u64,
        "load_ms": load.as_millis() as u64,
        "memory_bytes": inv.memory_peak,
        "fuel_used": inv.fuel_used,
    })
    .to_string();
    s.push('\n');
    s
}

fn report_text(path: &std::path::Path, event: &Event, run: &TestRun) -> String {
    let (inv, load) = (&run.invocation, run.load);
    let mut out = format!(
        "plugin {} (loaded in {load:.1?})\nevent  {} from {} ({} bytes)\n",
        path.display(),
        event.event_type,
        event.source,
        event.body.len()
    );
    match &inv.outcome {
        Ok(actions) => {
            out.push_str(&format!("ok: {} action{}\n", actions.len(), if actions.len() == 1 { "" } else { "s" }));
            for a in actions {
                match a {
                    Action::Emit { sink, event_type, payload, headers } => {
                        out.push_str(&format!(
                            "  emit to {sink}{}{}: {}\n",
                            event_type.as_deref().map(|t| format!(" as {t}")).unwrap_or_default(),
                            if headers.is_empty() { String::new() } else { format!(" {headers:?}") },
                            String::from_utf8_lossy(payload)
                        ));
                    }
                    Action::Publish { channel, payload } => {
                        out.push_str(&format!("  publish to {channel}: {payload}\n"));
                    }
                }
            }
        }
        Err(f) => out.push_str(&format!("failed ({}): {f}\n  -> {}\n", f.kind(), consequence(f))),
    }
    if !run.requests.is_empty() {
        out.push_str("requests:\n");
        for r in &run.requests {
            let answer = r.status.map_or_else(|| r.error.clone().unwrap_or_default(), |s| s.to_string());
            out.push_str(&format!("  {} {} -> {answer} ({})\n", r.method, r.url, r.from));
        }
    }
    if !run.kv_changes.is_empty() {
        out.push_str("key-value changes:\n");
        for (k, was, now) in &run.kv_changes {
            let show = |v: &Option<Vec<u8>>| {
                v.as_deref().map_or("(unset)".to_owned(), |v| String::from_utf8_lossy(v).into_owned())
            };
            out.push_str(&format!("  {k}: {} -> {}\n", show(was), show(now)));
        }
    }
    if !inv.logs.is_empty() {
        out.push_str("logs:\n");
        for l in &inv.logs {
            out.push_str(&format!("  {:<5} {}\n", l.level, l.message));
        }
    }
    out.push_str(&format!(
        "took {:.1?}, memory {:.1} MiB, fuel {}\n",
        inv.duration,
        inv.memory_peak as f64 / (1024.0 * 1024.0),
        inv.fuel_used
    ));
    out
}

/// What the daemon would do with this failure.
fn consequence(f: &Failure) -> &'static str {
    match f {
        Failure::Permanent(_) | Failure::InvalidConfig(_) => "the daemon would dead-letter this delivery",
        _ => "the daemon would retry this delivery by the plugin's retry policy",
    }
}
