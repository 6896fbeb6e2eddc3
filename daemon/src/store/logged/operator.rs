//! The operator commands on the log engine's spool (`Operator`, in the CLI's process or the admin API): the
//! segments read-only (`log/inspect.rs`: a reader stops at the first frame that fails its checks, so a frame
//! being written is not read), merged with the cold tables. An event's deliveries are its sinks' progress
//! as the log last made it durable (at most one commit behind the daemon), overridden by what SQLite holds
//! of them (deferred: pending; dead letters), plus the deliveries of its replays (frames flagged REPLAY
//! carrying the same event id). Every command reads the whole log: the cost grows with what retention keeps.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rusqlite::{Connection, params};

use super::super::log::file::OsDisk;
use super::super::log::inspect::{self, Progress};
use super::super::log::sinks::SinkState;
use super::super::log::spool::public_seq;
use super::super::ops::{DeliveryInfo, EventDetail, EventFilter, EventSummary};
use super::super::{StoreError, log::frame::LoggedEvent};
use crate::event::{Event, now_ms};

/// One EVENT frame, without its body.
struct Frame {
    /// Public seq (the delivery id of its deliveries).
    seq: i64,
    replay: bool,
    sinks: Vec<String>,
    event: Event,
}

/// The log as an operator sees it.
struct View {
    /// Every EVENT frame in seq order (bodies dropped, except the wanted event's).
    frames: Vec<Frame>,
    /// Each sink's progress after the last durable commit.
    progress: BTreeMap<String, SinkState>,
}

/// The log's frames, then the event copies the log no longer (or never) held: the events of deliveries that
/// moved to SQLite before their segment was pruned, or that a spool taken over from the SQLite engine had
/// pending or dead. Such an event's sinks are those its cold rows name.
fn read_view(conn: &Connection, dir: &Path, body_of: Option<&str>) -> Result<View, StoreError> {
    let mut view = read_log(dir, body_of)?;
    let held: std::collections::HashSet<i64> = view.frames.iter().map(|f| f.seq).collect();
    let mut stmt = conn.prepare(
        "SELECT e.seq, e.id, e.source, e.event_type, e.received_at, e.headers, e.body, e.dedup_key, e.ordering_key,
                (SELECT group_concat(sink, char(10)) FROM (SELECT sink FROM deferred WHERE seq = e.seq
                   UNION SELECT sink FROM dead_letters WHERE seq = e.seq))
         FROM event_copies e ORDER BY e.seq",
    )?;
    let rows = stmt.query_map([], |r| {
        let sinks: Option<String> = r.get(9)?;
        Ok((r.get::<_, i64>(0)?, super::super::ops::event_from_row(r, 0)?, sinks))
    })?;
    for row in rows {
        let (seq, mut event, sinks) = row?;
        if held.contains(&seq) {
            continue;
        }
        if body_of != Some(event.id.as_str()) {
            event.body = bytes::Bytes::new();
        }
        let sinks = sinks.map(|s| s.lines().map(str::to_owned).collect()).unwrap_or_default();
        view.frames.push(Frame { seq, replay: false, sinks, event });
    }
    view.frames.sort_by_key(|f| f.seq);
    Ok(view)
}

fn read_log(dir: &Path, body_of: Option<&str>) -> Result<View, StoreError> {
    let mut view = View { frames: Vec::new(), progress: BTreeMap::new() };
    if !dir.is_dir() {
        return Ok(view);
    }
    let keep = |e: &LoggedEvent| body_of.is_some_and(|id| id == e.event.0.id);
    inspect::dump(&OsDisk, dir, |d| {
        match (d.event, d.progress) {
            (Some(logged), _) => {
                let mut event = logged.event.0.clone();
                if !keep(&logged) {
                    event.body = bytes::Bytes::new();
                }
                view.frames.push(Frame { seq: public_seq(d.seq), replay: logged.replay, sinks: logged.sinks, event });
            }
            (None, Some(Progress::State(state))) => view.progress = state,
            (None, Some(Progress::Checkpoint(name, state))) => {
                view.progress.insert(name, state);
            }
            (None, None) => {}
        }
        Ok::<(), std::convert::Infallible>(())
    })
    .map_err(|e| StoreError::Schema(format!("cannot read the spool log: {e}")))?
    .unwrap_or_else(|never| match never {});
    Ok(view)
}

/// What SQLite holds of deliveries that left the log: (sink, seq) -> the delivery as shown.
fn cold_deliveries(conn: &Connection) -> Result<HashMap<(String, i64), DeliveryInfo>, StoreError> {
    let mut out = HashMap::new();
    let mut stmt = conn
        .prepare("SELECT sink, seq, attempts, last_error, last_status, created_at, updated_at, replay FROM deferred")?;
    let rows = stmt.query_map([], |r| {
        let (sink, seq): (String, i64) = (r.get(0)?, r.get(1)?);
        Ok((
            (sink.clone(), seq),
            DeliveryInfo {
                id: seq,
                sink,
                status: "pending".into(),
                attempts: r.get(2)?,
                last_error: r.get(3)?,
                last_status: r.get(4)?,
                replay: r.get(7)?,
                created_at_ms: r.get(5)?,
                updated_at_ms: r.get(6)?,
            },
        ))
    })?;
    for row in rows {
        let (k, v) = row?;
        out.insert(k, v);
    }
    // A delivery dead-lettered, retried and dead again has several rows: the newest says.
    let mut stmt = conn.prepare(
        "SELECT l.id, l.sink, l.seq, l.status, l.attempts, l.last_error, l.last_status, l.dead_at, l.updated_at
         FROM dead_letters l ORDER BY l.id",
    )?;
    let rows = stmt.query_map([], |r| {
        let (sink, seq): (String, i64) = (r.get(1)?, r.get(2)?);
        Ok((
            (sink.clone(), seq),
            DeliveryInfo {
                id: r.get(0)?,
                sink,
                status: r.get(3)?,
                attempts: r.get(4)?,
                last_error: r.get(5)?,
                last_status: r.get(6)?,
                replay: false,
                created_at_ms: r.get(7)?,
                updated_at_ms: r.get(8)?,
            },
        ))
    })?;
    for row in rows {
        let (k, v) = row?;
        out.insert(k, v);
    }
    Ok(out)
}

/// The deliveries of one frame.
fn deliveries(frame: &Frame, view: &View, cold: &HashMap<(String, i64), DeliveryInfo>) -> Vec<DeliveryInfo> {
    frame
        .sinks
        .iter()
        .map(|sink| {
            if let Some(d) = cold.get(&(sink.clone(), frame.seq)) {
                return DeliveryInfo { replay: frame.replay || d.replay, ..d.clone() };
            }
            let log_seq = (frame.seq - 1) as u64;
            let done = view.progress.get(sink).is_some_and(|s| s.is_done(log_seq));
            DeliveryInfo {
                id: frame.seq,
                sink: sink.clone(),
                status: if done { "delivered" } else { "pending" }.into(),
                attempts: u32::from(done),
                last_error: None,
                last_status: None,
                replay: frame.replay,
                created_at_ms: frame.event.received_at_ms,
                updated_at_ms: frame.event.received_at_ms,
            }
        })
        .collect()
}

/// An event's status from its deliveries, as the SQLite engine tells it.
fn status(deliveries: &[DeliveryInfo]) -> &'static str {
    let any = |s: &str| deliveries.iter().any(|d| d.status == s);
    if deliveries.is_empty() {
        "unrouted"
    } else if any("pending") {
        "pending"
    } else if any("dead") {
        "dead"
    } else if any("purged") {
        "purged"
    } else {
        "delivered"
    }
}

/// Every event, by id: its first frame and the deliveries of all its frames.
fn events(view: &View, cold: &HashMap<(String, i64), DeliveryInfo>) -> Vec<(usize, Vec<DeliveryInfo>)> {
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    let mut out: Vec<(usize, Vec<DeliveryInfo>)> = Vec::new();
    for (i, f) in view.frames.iter().enumerate() {
        let d = deliveries(f, view, cold);
        match by_id.get(f.event.id.as_str()) {
            Some(&at) => out[at].1.extend(d),
            None => {
                by_id.insert(&f.event.id, out.len());
                out.push((i, d));
            }
        }
    }
    out
}

fn summary(e: &Event, deliveries: &[DeliveryInfo]) -> EventSummary {
    EventSummary {
        id: e.id.clone(),
        source: e.source.clone(),
        event_type: e.event_type.clone(),
        received_at_ms: e.received_at_ms,
        status: status(deliveries).into(),
    }
}

/// Events matching `f`, newest first.
pub(in crate::store) fn list(conn: &Connection, dir: &Path, f: &EventFilter) -> Result<Vec<EventSummary>, StoreError> {
    let view = read_view(conn, dir, None)?;
    let cold = cold_deliveries(conn)?;
    let mut out = Vec::new();
    for (i, deliveries) in events(&view, &cold).into_iter().rev() {
        let e = &view.frames[i].event;
        let s = summary(e, &deliveries);
        let keep = f.source.as_ref().is_none_or(|x| *x == e.source)
            && f.event_type.as_ref().is_none_or(|x| *x == e.event_type)
            && f.since_ms.is_none_or(|t| e.received_at_ms >= t)
            && f.until_ms.is_none_or(|t| e.received_at_ms < t)
            && f.status.as_ref().is_none_or(|x| *x == s.status);
        if keep {
            out.push(s);
            if out.len() >= f.limit.max(1) {
                break;
            }
        }
    }
    Ok(out)
}

/// One event with its deliveries (its replays' too) and its attempt log (failed attempts and the success
/// after them: a first-attempt success is implied by `delivered`, `attempts: 1`).
pub(in crate::store) fn show(conn: &Connection, dir: &Path, id: &str) -> Result<Option<EventDetail>, StoreError> {
    let view = read_view(conn, dir, Some(id))?;
    let cold = cold_deliveries(conn)?;
    let Some((i, deliveries)) = events(&view, &cold).into_iter().find(|(i, _)| view.frames[*i].event.id == id) else {
        return Ok(None);
    };
    let seqs: Vec<i64> = view.frames.iter().filter(|f| f.event.id == id).map(|f| f.seq).collect();
    let mut attempts = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT seq, sink, attempt, started_at, duration_ms, outcome, status, error FROM failed_attempts
         WHERE seq = ?1 ORDER BY id",
    )?;
    for seq in &seqs {
        let rows = stmt.query_map([seq], super::super::ops::attempt_from_row)?;
        for a in rows {
            attempts.push(a?);
        }
    }
    // A delivery finished in the log after attempts in the cold path shows them, as the SQLite engine's
    // row would (its count, the last error and status).
    let mut deliveries = deliveries;
    for d in deliveries.iter_mut().filter(|d| d.status == "delivered") {
        for a in attempts.iter().filter(|a| a.sink == d.sink && a.delivery_id == d.id) {
            d.attempts = d.attempts.max(a.attempt);
            d.last_error = a.error.clone().or(d.last_error.take());
            d.last_status = a.status.or(d.last_status);
            d.updated_at_ms = d.updated_at_ms.max(a.started_at_ms + a.duration_ms);
        }
    }
    let e = &view.frames[i].event;
    Ok(Some(EventDetail {
        summary: summary(e, &deliveries),
        headers: e.headers.clone(),
        body: String::from_utf8_lossy(&e.body).into_owned(),
        deliveries,
        attempts,
    }))
}

/// The events a replay would touch (their first frames' seqs): one by id, or those received in
/// `[since_ms, until_ms)`.
pub(in crate::store) fn replay_targets(
    conn: &Connection,
    dir: &Path,
    id: Option<&str>,
    since_ms: i64,
    until_ms: i64,
) -> Result<Vec<i64>, StoreError> {
    let view = read_view(conn, dir, None)?;
    Ok(view
        .frames
        .iter()
        .filter(|f| !f.replay)
        .filter(|f| match id {
            Some(id) => f.event.id == id,
            None => f.event.received_at_ms >= since_ms && f.event.received_at_ms < until_ms,
        })
        .map(|f| f.seq)
        .collect())
}

/// Asks the daemon to replay these events (by seq) to `sink`, or to the sinks each was routed to: one
/// `replays` row per delivery, which the daemon appends to the log within a second. Returns how many.
pub(in crate::store) fn replay(
    tx: &Connection,
    dir: &Path,
    seqs: &[i64],
    sink: Option<&str>,
) -> Result<usize, StoreError> {
    let view = read_view(tx, dir, None)?;
    let now = now_ms();
    let mut stmt = tx.prepare(
        "INSERT INTO replays (seq, sink, origin, status, created_at, updated_at) VALUES (?1, ?2, 'replay', 'pending', ?3, ?3)",
    )?;
    let mut n = 0;
    for seq in seqs {
        let Some(f) = view.frames.iter().find(|f| f.seq == *seq) else { continue };
        let sinks: Vec<String> = match sink {
            Some(s) => vec![s.to_owned()],
            None => f.sinks.clone(),
        };
        for s in sinks {
            stmt.execute(params![seq, s, now])?;
            n += 1;
        }
    }
    Ok(n)
}
