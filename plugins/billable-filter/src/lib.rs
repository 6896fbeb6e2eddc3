//! Forwards billable Clockify time entries to a sink, reshaped for a billing system.
//!
//! Config: `{ sink = "billing" }`. On `NEW_TIME_ENTRY`, `TIME_ENTRY_UPDATED` and `TIMER_STOPPED` events whose
//! entry has `"billable": true`, it emits one event of type `billable.<original type>` to that sink; every other
//! event is done with no action. This is the example to copy when writing a plugin.

use hookbridge_plugin::serde_json::Value;
use hookbridge_plugin::{Action, Emit, Error, Event, Plugin, log, parse_config};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The Clockify events that carry a time entry.
const TIME_ENTRY_EVENTS: [&str; 3] = ["NEW_TIME_ENTRY", "TIME_ENTRY_UPDATED", "TIMER_STOPPED"];

/// The plugin, built from its config by `init` (the daemon does that for every event).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BillableFilter {
    /// The sink that receives billable entries.
    sink: String,
}

/// The part of Clockify's time entry that we read. Missing fields become `None`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TimeEntry {
    id: Option<String>,
    workspace_id: Option<String>,
    user_id: Option<String>,
    project_id: Option<String>,
    description: Option<String>,
    #[serde(default)]
    billable: bool,
    #[serde(default)]
    time_interval: TimeInterval,
}

/// When the entry started and, once stopped, ended (RFC 3339 timestamps).
#[derive(Debug, Default, Deserialize)]
struct TimeInterval {
    start: Option<String>,
    end: Option<String>,
}

/// What we send to the sink.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct BillableEntry<'a> {
    entry_id: &'a Option<String>,
    workspace_id: &'a Option<String>,
    user_id: &'a Option<String>,
    project_id: &'a Option<String>,
    description: &'a Option<String>,
    start: &'a Option<String>,
    end: &'a Option<String>,
    duration_seconds: Option<i64>,
    source_event: &'a str,
}

impl Plugin for BillableFilter {
    fn init(config: Value) -> Result<Self, Error> {
        // A missing or misspelt `sink` is an invalid-config error: the daemon refuses to load the plugin.
        let plugin: Self = parse_config(config)?;
        if plugin.sink.is_empty() {
            return Err(Error::invalid_config("`sink` must name a sink"));
        }
        Ok(plugin)
    }

    fn handle(&self, event: Event) -> Result<Vec<Action>, Error> {
        if !TIME_ENTRY_EVENTS.contains(&event.event_type.as_str()) {
            return Ok(vec![]);
        }
        // A body that is not a JSON object is a permanent error: the delivery becomes a dead letter.
        let entry: TimeEntry = event.body_json()?;
        if !entry.billable {
            return Ok(vec![]);
        }

        let interval = &entry.time_interval;
        let payload = BillableEntry {
            entry_id: &entry.id,
            workspace_id: &entry.workspace_id,
            user_id: &entry.user_id,
            project_id: &entry.project_id,
            description: &entry.description,
            start: &interval.start,
            end: &interval.end,
            duration_seconds: duration_seconds(interval)?,
            source_event: &event.id,
        };
        let emit = Emit::json(&self.sink, &payload)?.event_type(format!("billable.{}", event.event_type));

        log::info(format_args!(
            "billable entry {} ({}) -> sink {}",
            entry.id.as_deref().unwrap_or("without id"),
            event.event_type,
            self.sink
        ));
        Ok(vec![emit.into()])
    }
}

/// Seconds from start to end, or `None` while the timer runs (no end yet).
fn duration_seconds(interval: &TimeInterval) -> Result<Option<i64>, Error> {
    let (Some(start), Some(end)) = (&interval.start, &interval.end) else {
        return Ok(None);
    };
    let parse = |timestamp: &str| {
        OffsetDateTime::parse(timestamp, &Rfc3339)
            .map_err(|err| Error::permanent(format!("timeInterval: `{timestamp}` is not an RFC 3339 timestamp: {err}")))
    };
    Ok(Some((parse(end)? - parse(start)?).whole_seconds()))
}

hookbridge_plugin::export!(BillableFilter);
