//! Feeds the live dashboard (`GET /dashboard`): keeps Clockify's running timers and today's totals per user
//! and per project in the key-value store, and publishes a snapshot of them after every time-entry event.
//!
//! Config: `{ channel = "dashboard", utc_offset_minutes = 0 }`, both optional ("today" is the date at that
//! offset from UTC). Route `NEW_TIMER_STARTED`, `TIMER_STOPPED`, `NEW_TIME_ENTRY`, `TIME_ENTRY_UPDATED` and
//! `TIME_ENTRY_DELETED` to it; it ignores other events. The entry itself says what it is: without an `end` it
//! is a running timer, with one it is done and counts for the day of its `end`. Every recognised event
//! publishes one snapshot (even a retry that changed nothing: the page always shows the latest state).
//!
//! Key-value layout (each event runs in a fresh instance, so all state lives there):
//! - `running/<entry id>`: a running timer (JSON [`Summary`]), deleted when it stops;
//! - `day/<YYYY-MM-DD>/<entry id>`: a completed entry and the seconds it counts for that day (JSON [`Summary`]);
//! - `counted/<entry id>`: the day it is counted under, so an update replaces it rather than adding it again.
//!
//! Day keys expire after two days: yesterday's totals vanish by themselves and a new day starts from zero.

use std::collections::HashMap;
use std::time::Duration;

use hookbridge_plugin::serde_json::Value;
use hookbridge_plugin::{Action, Error, Event, Plugin, clock, kv, parse_config};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// How long the keys of a day's totals live.
const DAY_TTL: Duration = Duration::from_secs(2 * 24 * 3600);

/// The plugin, built from its `config` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Dashboard {
    /// The live channel that receives the snapshots (the page follows `dashboard`).
    #[serde(default = "default_channel")]
    channel: String,
    /// The time zone of "today", in minutes east of UTC.
    #[serde(default)]
    utc_offset_minutes: i32,
}

fn default_channel() -> String {
    "dashboard".to_owned()
}

/// The part of a Clockify time entry that we read; the nested objects may be absent.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TimeEntry {
    id: String,
    description: Option<String>,
    user_id: Option<String>,
    project_id: Option<String>,
    task_id: Option<String>,
    #[serde(default)]
    time_interval: TimeInterval,
    user: Option<Named>,
    project: Option<Named>,
    task: Option<Named>,
}

#[derive(Debug, Default, Deserialize)]
struct TimeInterval {
    start: Option<String>,
    end: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Named {
    name: Option<String>,
}

/// One time entry as the dashboard keeps it, as a running timer or as a completed entry of a day.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Summary {
    entry_id: String,
    user_id: String,
    user_name: String,
    project_id: String,
    project_name: String,
    task_name: Option<String>,
    description: Option<String>,
    start: String,
    /// Completed entries only: what the entry counts for its day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seconds: Option<i64>,
}

/// One bar of the totals: a user or a project.
#[derive(Debug, Serialize)]
struct Total {
    id: String,
    name: String,
    seconds: i64,
}

impl Plugin for Dashboard {
    fn init(config: Value) -> Result<Self, Error> {
        let plugin: Self = parse_config(config)?;
        if plugin.utc_offset_minutes.abs() >= 24 * 60 {
            return Err(Error::invalid_config("`utc_offset_minutes` must be between -1439 and 1439"));
        }
        Ok(plugin)
    }

    fn handle(&self, event: Event) -> Result<Vec<Action>, Error> {
        let deleted = match event.event_type.as_str() {
            "NEW_TIMER_STARTED" | "TIMER_STOPPED" | "NEW_TIME_ENTRY" | "TIME_ENTRY_UPDATED" => false,
            "TIME_ENTRY_DELETED" => true,
            _ => return Ok(vec![]),
        };
        let entry: TimeEntry = event.body_json()?; // not JSON, or no `id`: a permanent error
        let running_key = format!("running/{}", entry.id);
        uncount(&entry.id)?; // the latest event about an entry replaces whatever an earlier one counted
        match (deleted, &entry.time_interval.end) {
            (true, _) => kv::delete(&running_key)?,
            (false, None) => kv::set_json(&running_key, &entry.summary(None))?,
            (false, Some(end)) => {
                kv::delete(&running_key)?;
                self.count(&entry, end)?;
            }
        }
        Ok(vec![Action::publish_json(&self.channel, &self.snapshot()?)?])
    }
}

impl Dashboard {
    /// Counts a completed entry into the totals of the day of its `end`.
    fn count(&self, entry: &TimeEntry, end: &str) -> Result<(), Error> {
        let end = parse_time(end)?;
        let start = parse_time(entry.time_interval.start.as_deref().unwrap_or_default())?;
        let day = self.day(end);
        let value = hookbridge_plugin::serde_json::to_vec(&entry.summary(Some((end - start).whole_seconds().max(0))))
            .map_err(|err| Error::permanent(err.to_string()))?;
        kv::set_with_ttl(&format!("day/{day}/{}", entry.id), value, DAY_TTL)?;
        kv::set_with_ttl(&format!("counted/{}", entry.id), day, DAY_TTL)?;
        Ok(())
    }

    /// The date of `at` at the configured offset, as `YYYY-MM-DD`.
    fn day(&self, at: OffsetDateTime) -> String {
        let offset = UtcOffset::from_whole_seconds(self.utc_offset_minutes * 60).unwrap_or(UtcOffset::UTC);
        let date = at.to_offset(offset).date();
        format!("{:04}-{:02}-{:02}", date.year(), u8::from(date.month()), date.day())
    }

    /// Everything the page shows: running timers by start, today's totals by seconds, most first.
    fn snapshot(&self) -> Result<Value, Error> {
        let now_ms = clock::now_ms();
        let now = OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_ms) * 1_000_000)
            .map_err(|err| Error::permanent(format!("the clock is out of range: {err}")))?;
        let today = self.day(now);

        let mut running = Vec::new();
        for key in kv::list("running/") {
            running.extend(kv::get_json::<Summary>(&key)?);
        }
        running.sort_by(|a, b| a.start.cmp(&b.start)); // Clockify's UTC timestamps sort as text

        let (mut users, mut projects) = (HashMap::new(), HashMap::new());
        for key in kv::list(&format!("day/{today}/")) {
            let Some(entry) = kv::get_json::<Summary>(&key)? else { continue };
            let seconds = entry.seconds.unwrap_or_default();
            add(&mut users, entry.user_id, entry.user_name, seconds);
            add(&mut projects, entry.project_id, entry.project_name, seconds);
        }
        Ok(hookbridge_plugin::serde_json::json!({
            "running": running,
            "today": {"date": today, "users": ranked(users), "projects": ranked(projects)},
            "updatedAt": now_ms,
        }))
    }
}

/// Takes a completed entry out of the totals it was counted into, if any.
fn uncount(entry_id: &str) -> Result<(), Error> {
    let key = format!("counted/{entry_id}");
    if let Some(day) = kv::get(&key) {
        kv::delete(&format!("day/{}/{entry_id}", String::from_utf8_lossy(&day)))?;
        kv::delete(&key)?;
    }
    Ok(())
}

impl TimeEntry {
    fn summary(&self, seconds: Option<i64>) -> Summary {
        Summary {
            entry_id: self.id.clone(),
            user_id: self.user_id.clone().unwrap_or_default(),
            user_name: name_or_id(&self.user, &self.user_id).unwrap_or_else(|| "Unknown user".to_owned()),
            project_id: self.project_id.clone().unwrap_or_default(),
            project_name: name_or_id(&self.project, &self.project_id).unwrap_or_else(|| "No project".to_owned()),
            task_name: name_or_id(&self.task, &self.task_id),
            description: self.description.clone().filter(|d| !d.is_empty()),
            start: self.time_interval.start.clone().unwrap_or_default(),
            seconds,
        }
    }
}

/// The nested object's name, else the id (Clockify sends `""` or `null` for "none").
fn name_or_id(named: &Option<Named>, id: &Option<String>) -> Option<String> {
    let name = named.as_ref().and_then(|n| n.name.clone());
    name.into_iter().chain(id.clone()).find(|s| !s.is_empty())
}

fn parse_time(timestamp: &str) -> Result<OffsetDateTime, Error> {
    OffsetDateTime::parse(timestamp, &Rfc3339)
        .map_err(|err| Error::permanent(format!("timeInterval: `{timestamp}` is not an RFC 3339 timestamp: {err}")))
}

fn add(totals: &mut HashMap<String, Total>, id: String, name: String, seconds: i64) {
    totals.entry(id.clone()).or_insert(Total { id, name, seconds: 0 }).seconds += seconds;
}

fn ranked(totals: HashMap<String, Total>) -> Vec<Total> {
    let mut totals: Vec<Total> = totals.into_values().collect();
    totals.sort_by(|a, b| b.seconds.cmp(&a.seconds).then_with(|| a.name.cmp(&b.name)));
    totals
}

hookbridge_plugin::export!(Dashboard);
