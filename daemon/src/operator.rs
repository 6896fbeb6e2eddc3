//! Operator commands over a spool: list, show and replay events; list, retry and purge dead letters. One
//! implementation behind both the CLI (`hookbridge events ...`, `hookbridge dlq ...`) and the admin API.

use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use crate::config::Config;
use crate::event::now_ms;
use crate::store::{DeadLetter, EventDetail, EventFilter, EventSummary, Operator, StoreError};

/// Events replayed per transaction (and per progress step).
const REPLAY_CHUNK: usize = 500;

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The spool said no.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Bad arguments.
    #[error("{0}")]
    Invalid(String),
    /// No such event or dead letter.
    #[error("{0}")]
    NotFound(String),
}

/// A point in time given as RFC 3339 (`2026-11-22T10:00:00Z`) or as an age (`2h`: two hours ago).
pub fn parse_time(text: &str) -> Result<i64, OperatorError> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0));
    }
    if let Ok(age) = humantime::parse_duration(text) {
        return Ok(now_ms() - age.as_millis() as i64);
    }
    Err(OperatorError::Invalid(format!("{text:?} is neither a time (2026-11-22T10:00:00Z) nor an age (30m, 2h, 3d)")))
}

/// Formats ms since the epoch as RFC 3339.
pub fn format_time(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn open(config: &Config) -> Result<Operator, OperatorError> {
    Ok(Operator::open_configured(&config.storage, config.postgres.as_ref())?)
}

/// The add-on installations of the spool `config` names (JSON records holding credentials: show only what
/// is safe).
pub fn installations(config: &Config) -> Result<Vec<(String, String, String, String)>, OperatorError> {
    Ok(open(config)?.installations()?)
}

/// The Clockodo handshakes of the spool `config` names, newest first.
pub fn handshakes(config: &Config) -> Result<Vec<crate::store::Handshake>, OperatorError> {
    Ok(open(config)?.handshakes()?)
}

fn check_sink(config: &Config, sink: Option<&str>) -> Result<(), OperatorError> {
    match sink {
        Some(s) if !config.sinks.contains_key(s) => {
            Err(OperatorError::Invalid(format!("no sink or plugin {s:?} in the config")))
        }
        _ => Ok(()),
    }
}

const STATUSES: [&str; 5] = ["pending", "delivered", "dead", "purged", "unrouted"];

/// `events list`.
pub fn list_events(config: &Config, mut filter: EventFilter) -> Result<Vec<EventSummary>, OperatorError> {
    if let Some(s) = &filter.status
        && !STATUSES.contains(&s.as_str())
    {
        return Err(OperatorError::Invalid(format!("status {s:?}: use one of {}", STATUSES.join(", "))));
    }
    if filter.limit == 0 {
        filter.limit = 100;
    }
    Ok(open(config)?.events(&filter)?)
}

/// `events show ID`.
pub fn show_event(config: &Config, id: &str) -> Result<EventDetail, OperatorError> {
    open(config)?.event(id)?.ok_or_else(|| OperatorError::NotFound(format!("no event {id}")))
}

/// What a replay did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReplayReport {
    /// Events replayed.
    pub events: usize,
    /// Deliveries queued.
    pub deliveries: usize,
}

/// Which events to replay.
#[derive(Debug, Clone)]
pub enum ReplaySelection {
    /// One event by id.
    One(String),
    /// Events received in `[since, until)` (ms).
    Range {
        /// Start, inclusive.
        since_ms: i64,
        /// End, exclusive.
        until_ms: i64,
    },
}

/// `events replay`: queues new deliveries (marked replay) for the selected events, to `sink` or to the sinks
/// each event was routed to. `progress(done, total)` is called after each chunk.
pub fn replay(
    config: &Config,
    selection: &ReplaySelection,
    sink: Option<&str>,
    mut progress: impl FnMut(usize, usize),
) -> Result<ReplayReport, OperatorError> {
    check_sink(config, sink)?;
    let mut op = open(config)?;
    let seqs = match selection {
        ReplaySelection::One(id) => {
            let seqs = op.replay_targets(Some(id), 0, 0)?;
            if seqs.is_empty() {
                return Err(OperatorError::NotFound(format!("no event {id}")));
            }
            seqs
        }
        ReplaySelection::Range { since_ms, until_ms } => op.replay_targets(None, *since_ms, *until_ms)?,
    };
    let mut deliveries = 0;
    for (i, chunk) in seqs.chunks(REPLAY_CHUNK).enumerate() {
        deliveries += op.replay(chunk, sink)?;
        progress((i * REPLAY_CHUNK + chunk.len()).min(seqs.len()), seqs.len());
    }
    Ok(ReplayReport { events: seqs.len(), deliveries })
}

/// `dlq list`.
pub fn dead_letters(config: &Config, sink: Option<&str>) -> Result<Vec<DeadLetter>, OperatorError> {
    check_sink(config, sink)?;
    Ok(open(config)?.dead_letters(sink)?)
}

/// Which dead letters a `dlq retry` or `dlq purge` acts on.
#[derive(Debug, Clone)]
pub enum DeadSelection {
    /// One, by delivery id.
    One(i64),
    /// Every dead letter (of one sink, if given).
    All(Option<String>),
}

fn dead_ids(op: &Operator, selection: &DeadSelection) -> Result<Vec<i64>, OperatorError> {
    Ok(match selection {
        DeadSelection::One(id) => vec![*id],
        DeadSelection::All(sink) => op.dead_letters(sink.as_deref())?.iter().map(|d| d.delivery_id).collect(),
    })
}

/// `dlq retry`: each selected dead letter becomes a new pending delivery. Returns how many.
pub fn retry_dead(config: &Config, selection: &DeadSelection) -> Result<usize, OperatorError> {
    on_dead(config, selection, Operator::retry_dead)
}

/// `dlq purge`: gives the selected dead letters up for good. Returns how many.
pub fn purge_dead(config: &Config, selection: &DeadSelection) -> Result<usize, OperatorError> {
    on_dead(config, selection, Operator::purge_dead)
}

/// Applies `action` to the selected dead letters; one id that is not a dead letter is an error.
fn on_dead(
    config: &Config,
    selection: &DeadSelection,
    action: fn(&mut Operator, &[i64]) -> Result<usize, StoreError>,
) -> Result<usize, OperatorError> {
    if let DeadSelection::All(sink) = selection {
        check_sink(config, sink.as_deref())?;
    }
    let mut op = open(config)?;
    let ids = dead_ids(&op, selection)?;
    let n = action(&mut op, &ids)?;
    if let DeadSelection::One(id) = selection
        && n == 0
    {
        return Err(OperatorError::NotFound(format!("no dead letter with delivery id {id}")));
    }
    Ok(n)
}
