//! Counts events per type in the plugin's key-value store and publishes the counts: proves that the store
//! persists between instances and that `publish` reaches live channels.
//!
//! Config: `{ channel = "counter", fail_with = "retryable" | "permanent" }`, both optional. Each event increments
//! key `count/<event type>` (decimal text); then, without `fail_with`, it publishes the JSON snapshot
//! `{"<type>": n, ...}` of every count to `channel`; with `fail_with`, it returns that error after counting.

use std::collections::BTreeMap;

use hookbridge_plugin::serde_json::Value;
use hookbridge_plugin::{Action, Error, Event, Plugin, kv, parse_config};
use serde::Deserialize;

/// The key prefix of the counts.
const PREFIX: &str = "count/";

/// The plugin, built from its config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Counter {
    /// The live channel that receives the snapshot.
    #[serde(default = "default_channel")]
    channel: String,
    /// Fail this way after counting (for the daemon's tests).
    fail_with: Option<FailWith>,
}

/// The error to return after counting.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum FailWith {
    Retryable,
    Permanent,
}

fn default_channel() -> String {
    "counter".to_owned()
}

impl Plugin for Counter {
    fn init(config: Value) -> Result<Self, Error> {
        parse_config(config)
    }

    fn handle(&self, event: Event) -> Result<Vec<Action>, Error> {
        let key = format!("{PREFIX}{}", event.event_type);
        kv::set(&key, (count(&key)? + 1).to_string())?;

        match self.fail_with {
            Some(FailWith::Retryable) => return Err(Error::retryable("counted, then failed as configured")),
            Some(FailWith::Permanent) => return Err(Error::permanent("counted, then failed as configured")),
            None => {}
        }

        let mut snapshot = BTreeMap::new();
        for key in kv::list(PREFIX) {
            let event_type = key.strip_prefix(PREFIX).unwrap_or(&key).to_owned();
            snapshot.insert(event_type, count(&key)?);
        }
        Ok(vec![Action::publish_json(&self.channel, &snapshot)?])
    }
}

/// The count stored at `key` (0 when unset).
fn count(key: &str) -> Result<u64, Error> {
    let Some(value) = kv::get(key) else { return Ok(0) };
    std::str::from_utf8(&value)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| Error::permanent(format!("kv key `{key}` does not hold a decimal count")))
}

hookbridge_plugin::export!(Counter);
