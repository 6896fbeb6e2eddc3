//! The operator commands (`events`, `dlq`, `installations`, `handshakes`, the admin API) on the cluster's
//! database: they see every node's events. `Operator` is synchronous (the CLI and the admin API's blocking
//! tasks call it), so this one owns a small runtime of its own and runs each query on a scoped thread, which
//! works from inside another runtime as well as outside any. Replays and dead-letter retries are new pending
//! deliveries, claimed like any other (a `NOTIFY` wakes the nodes' dispatchers).

use std::future::Future;

use super::{PostgresSpec, STATUS_SQL, connection_config, event_detail, pg_error, schema};
use crate::event::now_ms;
use crate::store::ops::{DeadLetter, EventDetail, EventFilter, EventSummary};
use crate::store::{Handshake, StoreError};

/// A connection for operator commands.
pub(in crate::store) struct PgOperator {
    rt: Option<tokio::runtime::Runtime>,
    client: tokio_postgres::Client,
}

impl std::fmt::Debug for PgOperator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOperator").finish_non_exhaustive()
    }
}

impl Drop for PgOperator {
    fn drop(&mut self) {
        // Dropping a runtime waits for its tasks, which a caller inside another runtime may not do.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs `f` to completion on `rt`, from any thread (inside another runtime too).
fn block<T: Send>(rt: &tokio::runtime::Runtime, f: impl Future<Output = T> + Send) -> T {
    std::thread::scope(|s| match s.spawn(|| rt.block_on(f)).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

impl PgOperator {
    /// Connects; the database must have been prepared by a daemon of this version.
    pub(in crate::store) fn connect(spec: &PostgresSpec) -> Result<PgOperator, StoreError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Join(e.to_string()))?;
        let cfg = match connection_config(spec, " (operator)") {
            Ok(cfg) => cfg,
            Err(e) => {
                rt.shutdown_background();
                return Err(e);
            }
        };
        let tls = match super::tls::Connector::new(&spec.tls) {
            Ok(tls) => tls,
            Err(e) => {
                rt.shutdown_background();
                return Err(e);
            }
        };
        let connected = block(&rt, async {
            let client = tls.connect(&cfg).await.map_err(pg_error)?;
            let prepared: bool = client
                .query_one("SELECT to_regclass('hookbridge.migrations') IS NOT NULL", &[])
                .await
                .map_err(pg_error)?
                .get(0);
            let found: Option<i32> = if prepared {
                client.query_one("SELECT max(version) FROM hookbridge.migrations", &[]).await.map_err(pg_error)?.get(0)
            } else {
                None
            };
            match found {
                Some(v) if v == schema::latest() => Ok(client),
                Some(v) => Err(StoreError::Schema(format!(
                    "the cluster database's schema is version {v}, this hookbridge's is {}: use the daemons' version",
                    schema::latest()
                ))),
                None => Err(StoreError::Schema(
                    "no hookbridge schema in the cluster database (has a daemon run with this config?)".into(),
                )),
            }
        });
        match connected {
            Ok(client) => Ok(PgOperator { rt: Some(rt), client }),
            Err(e) => {
                // (Dropped, a runtime would wait for its tasks, which a caller inside another may not do.)
                rt.shutdown_background();
                Err(e)
            }
        }
    }

    fn run<T: Send>(&self, f: impl Future<Output = Result<T, StoreError>> + Send) -> Result<T, StoreError> {
        match &self.rt {
            Some(rt) => block(rt, f),
            None => Err(StoreError::Closed),
        }
    }

    pub(in crate::store) fn events(&self, f: &EventFilter) -> Result<Vec<EventSummary>, StoreError> {
        let sql = format!(
            "SELECT id, source, event_type, received_at, status FROM (
                 SELECT e.id, e.source, e.event_type, e.received_at, {STATUS_SQL} AS status, e.seq
                 FROM hookbridge.events e
                 WHERE ($1::text IS NULL OR e.source = $1) AND ($2::text IS NULL OR e.event_type = $2)
                   AND ($3::bigint IS NULL OR e.received_at >= $3) AND ($4::bigint IS NULL OR e.received_at < $4)
             ) x
             WHERE ($5::text IS NULL OR status = $5) ORDER BY seq DESC LIMIT $6"
        );
        let limit = f.limit.max(1) as i64;
        self.run(async {
            let rows = self
                .client
                .query(&sql, &[&f.source, &f.event_type, &f.since_ms, &f.until_ms, &f.status, &limit])
                .await
                .map_err(pg_error)?;
            Ok(rows
                .iter()
                .map(|r| EventSummary {
                    id: r.get(0),
                    source: r.get(1),
                    event_type: r.get(2),
                    received_at_ms: r.get(3),
                    status: r.get(4),
                })
                .collect())
        })
    }

    pub(in crate::store) fn event(&self, id: &str) -> Result<Option<EventDetail>, StoreError> {
        self.run(event_detail(&self.client, id))
    }

    pub(in crate::store) fn replay_targets(
        &self,
        id: Option<&str>,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<i64>, StoreError> {
        self.run(async {
            let rows = match id {
                Some(id) => self.client.query("SELECT seq FROM hookbridge.events WHERE id = $1", &[&id]).await,
                None => self
                    .client
                    .query(
                        "SELECT seq FROM hookbridge.events WHERE received_at >= $1 AND received_at < $2 ORDER BY seq",
                        &[&since_ms, &until_ms],
                    )
                    .await,
            }
            .map_err(pg_error)?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    /// New pending deliveries (marked replay) of the events `seqs`, to `sink` or to the sinks each was routed
    /// to, in one statement. Returns how many.
    pub(in crate::store) fn replay(&self, seqs: &[i64], sink: Option<&str>) -> Result<usize, StoreError> {
        self.run(async {
            let n: i64 = self
                .client
                .query_one(
                    "WITH t AS (
                         SELECT e.seq, e.ordering_key, s.sink FROM hookbridge.events e,
                         LATERAL (SELECT $2::text AS sink WHERE $2::text IS NOT NULL
                                  UNION SELECT DISTINCT d.sink FROM hookbridge.deliveries d
                                        WHERE d.event_seq = e.seq AND $2::text IS NULL) s
                         WHERE e.seq = ANY($1)
                     ),
                     i AS (
                         INSERT INTO hookbridge.deliveries (event_seq, sink, ordering_key, status, replay, created_at,
                                                            updated_at)
                         SELECT seq, sink, ordering_key, 'pending', true, $3, $3 FROM t ORDER BY seq, sink
                         RETURNING event_seq, sink
                     ),
                     u AS (
                         UPDATE hookbridge.events e SET routed = true
                         FROM (SELECT DISTINCT event_seq FROM i) c WHERE e.seq = c.event_seq AND NOT e.routed
                     ),
                     n AS (SELECT pg_notify('hookbridge_deliveries', string_agg(DISTINCT sink, ',')) FROM i
                           HAVING count(*) > 0)
                     SELECT (SELECT count(*) FROM i), (SELECT count(*) FROM n)",
                    &[&seqs, &sink, &now_ms()],
                )
                .await
                .map_err(pg_error)?
                .get(0);
            Ok(usize::try_from(n).unwrap_or(0))
        })
    }

    pub(in crate::store) fn dead_letters(&self, sink: Option<&str>) -> Result<Vec<DeadLetter>, StoreError> {
        self.run(async {
            let rows = self
                .client
                .query(
                    "SELECT d.id, e.id, e.source, e.event_type, d.sink, d.attempts, d.last_error, d.last_status,
                            e.received_at, d.updated_at
                     FROM hookbridge.deliveries d JOIN hookbridge.events e ON e.seq = d.event_seq
                     WHERE d.status = 'dead' AND ($1::text IS NULL OR d.sink = $1) ORDER BY d.id",
                    &[&sink],
                )
                .await
                .map_err(pg_error)?;
            Ok(rows
                .iter()
                .map(|r| DeadLetter {
                    delivery_id: r.get(0),
                    event_id: r.get(1),
                    source: r.get(2),
                    event_type: r.get(3),
                    sink: r.get(4),
                    attempts: u32::try_from(r.get::<_, i32>(5)).unwrap_or(0),
                    last_error: r.get(6),
                    last_status: r.get::<_, Option<i32>>(7).and_then(|s| u16::try_from(s).ok()),
                    received_at_ms: r.get(8),
                    dead_at_ms: r.get(9),
                })
                .collect())
        })
    }

    /// Dead letters `ids` become `retried`, each with a new pending delivery (marked replay). Returns how
    /// many were dead letters.
    pub(in crate::store) fn retry_dead(&self, ids: &[i64]) -> Result<usize, StoreError> {
        self.run(async {
            let n: i64 = self
                .client
                .query_one(
                    "WITH r AS (
                         UPDATE hookbridge.deliveries SET status = 'retried', updated_at = $2
                         WHERE id = ANY($1) AND status = 'dead'
                         RETURNING event_seq, sink, ordering_key
                     ),
                     i AS (
                         INSERT INTO hookbridge.deliveries (event_seq, sink, ordering_key, status, replay, created_at,
                                                            updated_at)
                         SELECT event_seq, sink, ordering_key, 'pending', true, $2, $2 FROM r ORDER BY event_seq
                         RETURNING event_seq, sink
                     ),
                     n AS (SELECT pg_notify('hookbridge_deliveries', string_agg(DISTINCT sink, ',')) FROM i
                           HAVING count(*) > 0)
                     SELECT (SELECT count(*) FROM i), (SELECT count(*) FROM n)",
                    &[&ids, &now_ms()],
                )
                .await
                .map_err(pg_error)?
                .get(0);
            Ok(usize::try_from(n).unwrap_or(0))
        })
    }

    /// Dead letters `ids` become `purged`. Returns how many were dead letters.
    pub(in crate::store) fn purge_dead(&self, ids: &[i64]) -> Result<usize, StoreError> {
        self.run(async {
            let n = self
                .client
                .execute(
                    "UPDATE hookbridge.deliveries SET status = 'purged', updated_at = $2
                     WHERE id = ANY($1) AND status = 'dead'",
                    &[&ids, &now_ms()],
                )
                .await
                .map_err(pg_error)?;
            Ok(usize::try_from(n).unwrap_or(0))
        })
    }

    pub(in crate::store) fn installations(&self) -> Result<Vec<(String, String, String, String)>, StoreError> {
        self.run(super::installations(&self.client))
    }

    pub(in crate::store) fn handshakes(&self) -> Result<Vec<Handshake>, StoreError> {
        self.run(async {
            let rows = self
                .client
                .query(
                    "SELECT source, secret, received_at FROM hookbridge.handshakes ORDER BY received_at DESC, id DESC",
                    &[],
                )
                .await
                .map_err(pg_error)?;
            Ok(rows
                .iter()
                .map(|r| Handshake { source: r.get(0), secret: r.get(1), received_at_ms: r.get(2) })
                .collect())
        })
    }
}
