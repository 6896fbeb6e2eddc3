//! Counts events per type in the plugin's key-value store and publishes the counts: proves that the store
//! persists between instances and that `publish` reaches live channels.
//!
//! Config: `{ channel = "counter", via = "increment" | "update", fail_with = "retryable" | "permanent" }`, all
//! optional. Each event increments key `count/<event type>` atomically, so that events handled at once, on one
//! node or on several, all count: with `wasi:keyvalue`'s `increment` (the default), or with a compare-and-swap
//! loop (`via = "update"`, the way to change a value that is not a number); then, without `fail_with`, it publishes the JSON snapshot `{"<type>": n, ...}` of every
//! count to `channel` (read with one batch call); with `fail_with`, it returns that error after counting.
//!
//! With several events in flight, snapshots can be published out of order: the last one published is exact
//! once no other event is being handled.

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
    /// How to count.
    #[serde(default)]
    via: Via,
    /// Fail this way after counting (for the daemon's tests).
    fail_with: Option<FailWith>,
}

/// The atomic operation that counts.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Via {
    /// `wasi:keyvalue/atomics.increment`.
    #[default]
    Increment,
    /// Compare-and-swap, retried while other events change the key.
    Update,
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
        match self.via {
            Via::Increment => {
                kv::increment(&key, 1)?;
            }
            Via::Update => {
                // A key that does not hold a count is counted from 0 again (it is the plugin's own key).
                kv::update(&key, |current| {
                    let n = count(&key, current).unwrap_or(0);
                    (n + 1).to_string().into_bytes()
                })?;
            }
        }

        match self.fail_with {
            Some(FailWith::Retryable) => return Err(Error::retryable("counted, then failed as configured")),
            Some(FailWith::Permanent) => return Err(Error::permanent("counted, then failed as configured")),
            None => {}
        }

        let keys = kv::list(PREFIX);
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut snapshot = BTreeMap::new();
        for (key, value) in kv::get_many(&keys)? {
            let event_type = key.strip_prefix(PREFIX).unwrap_or(&key).to_owned();
            snapshot.insert(event_type, count(&key, value.as_deref())?);
        }
        Ok(vec![Action::publish_json(&self.channel, &snapshot)?])
    }
}

/// The count stored at `key` (0 when unset).
fn count(key: &str, value: Option<&[u8]>) -> Result<u64, Error> {
    let Some(value) = value else { return Ok(0) };
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| Error::permanent(format!("kv key `{key}` does not hold a decimal count")))
}

hookbridge_plugin::export!(Counter);
