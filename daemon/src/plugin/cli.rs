//! `hookbridge plugin test`: run a plugin on one event without a daemon and show what it did, the plugin
//! author's inner loop. The run is the daemon's (same host, limits and capabilities), so what it prints is
//! what the daemon would do with the same event: the same actions, in the same order.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

use super::{Action, Failure, Invocation};
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
    let temp = std::env::temp_dir().join(format!("hookbridge-plugin-test-{}-{}", std::process::id(), now_ms()));
    let dir = args.data_dir.clone().unwrap_or_else(|| temp.clone());
    let result = super::run_once(&dir, &spec, &event);
    if args.data_dir.is_none() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    let (inv, load) = result?;
    let ok = inv.outcome.is_ok();
    Ok((if args.json { report_json(&inv, load) } else { report_text(&args.plugin, &event, &inv, load) }, ok))
}

fn report_json(inv: &Invocation, load: Duration) -> String {
    let (outcome, error, actions) = match &inv.outcome {
        Ok(a) => ("ok", None, a.clone()),
        Err(f) => (f.kind(), Some(f.to_string()), Vec::new()),
    };
    let mut s = json!({
        "outcome": outcome,
        "error": error,
        "actions": actions,
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

fn report_text(path: &std::path::Path, event: &Event, inv: &Invocation, load: Duration) -> String {
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
