//! The PostgreSQL backend (`storage.backend = "postgres"`, cluster mode): every node of a cluster accepts
//! webhooks into one database, and deliveries are claimed, not owned.
//!
//! - **Insert** is one statement (`INSERT` below): the dedup decision (an upsert on the unique
//!   `(source, dedup_key)` that succeeds only when the earlier event is outside the window, or, for content
//!   keys, certain and outside the retry window), the event and its deliveries. It commits before the
//!   webhook is answered, with the server's `synchronous_commit`. The node that took the webhook is woken
//!   to claim its deliveries; the others find them at their next poll (no `NOTIFY` per webhook: PostgreSQL
//!   serialises the commits of notifying transactions).
//! - **Claims**: a dispatcher's read of pending deliveries ([`Postgres::pending`]) claims them for this node
//!   with a lease (`FOR UPDATE SKIP LOCKED`): only the head of each ordering key (its lowest pending
//!   delivery for the sink) can be claimed, so one entity is worked on by one node at a time and in order
//!   across the cluster. Every recorded outcome ends the claim: a delivery to be retried goes back, stays
//!   its key's head (the key's next deliveries keep waiting) and is claimable again, by any node, once its
//!   next attempt is due. So a failing entity or workspace holds a slot only while an attempt runs, never
//!   through its backoff, and cannot take a sink's slots from the others. The node renews its leases every third of the lease; when it dies they lapse and
//!   any node's next poll takes the deliveries over. At start a node releases what it held before.
//! - The dispatchers know claims by **local ids**, increasing per sink in claim order (the dispatcher's
//!   cursor needs that), mapped here to the database's delivery ids.
//! - **Outcomes** are recorded by one task of their own: every outcome waiting when its last statement ended
//!   goes into the next one (group commit), so a sink that delivers one event at a time does not cost a
//!   round trip and a WAL flush per delivery. Each caller still learns which of its own rows changed.
//! - Gauges are the cluster's, counted every second; `max_pending_*` bound the cluster's spool.

mod kv;
pub(super) mod operator;
mod schema;
mod tls;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

pub use kv::SharedKv;
pub use tls::PgTls;

use super::ops::{AttemptInfo, DeliveryInfo, EventDetail, EventSummary};
use super::{Dedup, Feed, Inserted, Outcome, PendingDelivery, Record, SinkStats, SpoolGauges, StoreError};
use crate::config::SecretString;
use crate::event::{Event, now_ms};
use crate::limits::{HANDSHAKES_KEPT, REPEATED_ERROR_LOG, Throttle};

/// Deliveries claimed per read at most: a node takes a share of a backlog, not all of it.
const CLAIM_MAX: usize = 64;
/// How often the gauges are counted again.
const GAUGES_EVERY: Duration = Duration::from_secs(1);
/// The channel nodes tell each other about new deliveries on (payload: the sinks, comma-separated).
const CHANNEL: &str = "hookbridge_deliveries";
/// The channel an add-on installation's change is told on.
const INSTALLATIONS: &str = "hookbridge_installations";
/// The channel a live channel's new payload is told on (payload: the publishing node, a space, the channel).
const LIVE: &str = "hookbridge_live";
/// Live payloads waiting to be shared (a burst past it is dropped: live channels are best effort).
const LIVE_QUEUE: usize = 256;

static RENEW_FAILED: Throttle = Throttle::new(REPEATED_ERROR_LOG);
static LISTEN_FAILED: Throttle = Throttle::new(REPEATED_ERROR_LOG);

/// `[storage.postgres]`, resolved.
#[derive(Debug, Clone)]
pub struct PostgresSpec {
    /// Connection URL or key-value string (holds the password).
    pub url: SecretString,
    /// Connections at most.
    pub pool_size: usize,
    /// Server-side limit per statement.
    pub statement_timeout: Duration,
    /// Time allowed to connect or to wait for a connection.
    pub connect_timeout: Duration,
    /// A claim's life without renewal.
    pub lease: Duration,
    /// This node's name.
    pub node_id: String,
    /// TLS to the server.
    pub tls: PgTls,
}

impl PostgresSpec {
    /// Parses a connection string (URL or key-value), with an error that never repeats it.
    pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
        url.parse::<tokio_postgres::Config>().map_err(|e| {
            format!(
                "not a PostgreSQL connection string ({}): postgres://user:password@host:5432/db",
                strip(&e.to_string(), url)
            )
        })
    }

    /// The host name (this node's default id).
    pub fn default_node_id() -> String {
        rustix::system::uname().nodename().to_string_lossy().into_owned()
    }
}

/// `text` without any occurrence of `secret`.
fn strip(text: &str, secret: &str) -> String {
    if secret.is_empty() { text.to_owned() } else { text.replace(secret, "<url>") }
}

/// The connection settings `spec` makes: its URL with the statement timeouts, the connect timeout, TCP
/// keepalives and an application name carrying the node (and `role`, for a connection of another kind).
pub(super) fn connection_config(spec: &PostgresSpec, role: &str) -> Result<tokio_postgres::Config, StoreError> {
    let mut cfg = PostgresSpec::parse_url(spec.url.expose()).map_err(StoreError::Schema)?;
    let options = format!(
        "{} -c statement_timeout={} -c idle_in_transaction_session_timeout={}",
        cfg.get_options().unwrap_or_default(),
        spec.statement_timeout.as_millis(),
        spec.statement_timeout.as_millis().saturating_mul(2),
    );
    if matches!(spec.tls, PgTls::VerifyFull { .. }) {
        // Never a plain connection when TLS is asked for (the URL's `sslmode=prefer` default would allow one).
        cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
    }
    cfg.options(options.trim())
        .connect_timeout(spec.connect_timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .application_name(format!("hookbridge {}{role}", spec.node_id));
    Ok(cfg)
}

/// A PostgreSQL error as a store error (the server's message; never the connection string).
pub(super) fn pg_error(e: impl std::error::Error) -> StoreError {
    // tokio-postgres says only "db error" at the top; the server's message is its source.
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.ends_with(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    StoreError::Postgres(text)
}

/// The handle. Cheap to clone.
#[derive(Clone)]
pub(super) struct Postgres {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres").field("node", &self.inner.node).finish_non_exhaustive()
    }
}

struct Inner {
    pool: Pool,
    node: String,
    lease_ms: i64,
    gauges: SpoolGauges,
    sinks: Mutex<HashMap<String, SinkState>>,
    closed: AtomicBool,
    stop: CancellationToken,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Bumped when another node (or this one) changed an add-on installation, or notifications were missed.
    installs: tokio::sync::watch::Sender<u64>,
    /// This node's live payloads, to the task that shares them.
    live_out: mpsc::Sender<(String, Arc<str>)>,
    /// Other nodes' live payloads, to whoever asked for them ([`Postgres::live_from_others`]).
    live_in: Mutex<Option<mpsc::Sender<(String, String)>>>,
    /// Outcomes to record, to the task that records every one waiting in one statement.
    records: mpsc::UnboundedSender<Outcomes>,
}

/// One `record_all` call's rows (database ids), with where to answer: the ids the statement changed.
struct Outcomes {
    rows: Rows,
    reply: tokio::sync::oneshot::Sender<Result<Vec<i64>, StoreError>>,
}

/// The RECORD statement's columns.
#[derive(Default)]
struct Rows {
    ids: Vec<i64>,
    status: Vec<&'static str>,
    attempts: Vec<i32>,
    next: Vec<Option<i64>>,
    error: Vec<Option<String>>,
    st: Vec<Option<i32>>,
    started: Vec<i64>,
    duration: Vec<i64>,
    label: Vec<&'static str>,
}

impl Rows {
    fn append(&mut self, mut other: Rows) {
        self.ids.append(&mut other.ids);
        self.status.append(&mut other.status);
        self.attempts.append(&mut other.attempts);
        self.next.append(&mut other.next);
        self.error.append(&mut other.error);
        self.st.append(&mut other.st);
        self.started.append(&mut other.started);
        self.duration.append(&mut other.duration);
        self.label.append(&mut other.label);
    }
}

/// Outcomes recorded in one statement at most.
const RECORD_MAX: usize = 1024;

/// Records outcomes: every call waiting when the last statement ended goes into the next one (group commit:
/// one round trip and one WAL flush for all of them, where a sink that does not batch would make one each).
/// Ends when the node closes (a statement running then finishes first; outcomes still queued are answered
/// `Closed`).
async fn record(inner: std::sync::Weak<Inner>, stop: CancellationToken, mut rx: mpsc::UnboundedReceiver<Outcomes>) {
    loop {
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            job = rx.recv() => match job {
                Some(job) => job,
                None => return,
            },
        };
        let mut jobs = vec![first];
        let mut n = jobs[0].rows.ids.len();
        while n < RECORD_MAX {
            let Ok(more) = rx.try_recv() else { break };
            n += more.rows.ids.len();
            jobs.push(more);
        }
        let Some(inner) = inner.upgrade() else { return };
        let mut rows = Rows::default();
        let mut replies = Vec::with_capacity(jobs.len());
        for job in jobs {
            replies.push((job.rows.ids.clone(), job.reply));
            rows.append(job.rows);
        }
        let result = record_rows(&inner, &rows).await;
        drop(inner);
        for (ids, reply) in replies {
            let answer = match &result {
                Ok(changed) => Ok(ids.into_iter().filter(|id| changed.contains(id)).collect()),
                Err(StoreError::Closed) => Err(StoreError::Closed),
                Err(StoreError::Postgres(m)) => Err(StoreError::Postgres(m.clone())),
                Err(e) => Err(StoreError::Postgres(e.to_string())),
            };
            let _ = reply.send(answer);
        }
    }
}

async fn record_rows(inner: &Inner, r: &Rows) -> Result<std::collections::HashSet<i64>, StoreError> {
    if inner.closed.load(Ordering::Acquire) {
        return Err(StoreError::Closed);
    }
    let client = inner.pool.get().await.map_err(pg_error)?;
    let stmt = client.prepare_cached(RECORD).await.map_err(pg_error)?;
    let changed: Vec<i64> = client
        .query_one(
            &stmt,
            &[
                &r.ids,
                &r.status,
                &r.attempts,
                &r.next,
                &r.error,
                &r.st,
                &r.started,
                &r.duration,
                &r.label,
                &now_ms(),
                &inner.node,
            ],
        )
        .await
        .map_err(pg_error)?
        .get(0);
    Ok(changed.into_iter().collect())
}

/// One sink's dispatcher as this node knows it.
struct SinkState {
    wake: Arc<Notify>,
    /// Kept so that the dispatcher's feed never reads as closed (nothing is sent: claims come by reads).
    _tx: mpsc::Sender<PendingDelivery>,
    /// Subscribed again since the last read: what this node held for the sink is released first.
    fresh: bool,
    /// The last local id given out.
    last_local: i64,
    /// Local id -> database delivery id, for the deliveries this node holds.
    claims: HashMap<i64, i64>,
    /// Claimed, not yet handed to the dispatcher (in local id order).
    ready: Vec<PendingDelivery>,
    /// Held by the claim running for this sink.
    claiming: Arc<tokio::sync::Mutex<()>>,
}

impl SinkState {
    fn new(capacity: usize) -> (SinkState, Feed) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let wake = Arc::new(Notify::new());
        let feed = Feed { rx, lagged: Arc::new(AtomicBool::new(true)), wake: Arc::clone(&wake) };
        let state = SinkState {
            wake,
            _tx: tx,
            fresh: true,
            last_local: 0,
            claims: HashMap::new(),
            ready: Vec::new(),
            claiming: Arc::default(),
        };
        (state, feed)
    }
}

const INSERT: &str = "
WITH s AS (SELECT nextval('hookbridge.event_seq') AS seq),
d AS (
    INSERT INTO hookbridge.dedup AS old (source, dedup_key, seq, event_id, received_at)
    SELECT $2, $8, s.seq, $1, $4 FROM s WHERE $14 <> 0
    ON CONFLICT (source, dedup_key) DO UPDATE
        SET seq = EXCLUDED.seq, event_id = EXCLUDED.event_id, received_at = EXCLUDED.received_at, certain = true
        WHERE old.received_at < $11 OR ($14 = 2 AND old.certain AND old.received_at < $12)
    RETURNING seq
),
k AS (SELECT seq FROM d UNION ALL SELECT seq FROM s WHERE $14 = 0),
e AS (
    INSERT INTO hookbridge.events (seq, id, source, event_type, received_at, headers, body, body_len, dedup_key,
                                   ordering_key, routed, node)
    SELECT k.seq, $1, $2, $3, $4, $5, $6, $7, $8, $9, cardinality($10::text[]) > 0, $13
    FROM k
    RETURNING seq
),
x AS (
    INSERT INTO hookbridge.deliveries (event_seq, sink, ordering_key, status, created_at, updated_at)
    SELECT e.seq, u.sink, $9, 'pending', $4, $4 FROM e, unnest($10::text[]) AS u(sink)
    RETURNING id
)
SELECT (SELECT seq FROM e), (SELECT count(*) FROM x)";

// The candidates come from two small partial indexes (never claimed; claimed with a lapsed lease), not from
// every pending delivery: those this node and the others are working on would be read at every claim.
const CLAIM: &str = "
WITH free AS (
    SELECT id FROM (
        (SELECT id FROM hookbridge.deliveries
         WHERE sink = $1 AND status = 'pending' AND lease_owner IS NULL
           AND (next_attempt_at IS NULL OR next_attempt_at <= hookbridge.now_ms())
         ORDER BY id LIMIT $4)
        UNION ALL
        (SELECT id FROM hookbridge.deliveries
         WHERE sink = $1 AND status = 'pending' AND lease_owner IS NOT NULL AND lease_until < hookbridge.now_ms()
         ORDER BY lease_until LIMIT $4)
    ) f
),
c AS (
    SELECT d.id FROM hookbridge.deliveries d
    WHERE d.id IN (SELECT id FROM free) AND d.status = 'pending'
      AND (d.lease_owner IS NULL OR d.lease_until < hookbridge.now_ms())
      AND (d.ordering_key IS NULL OR NOT EXISTS (
          SELECT 1 FROM hookbridge.deliveries p
          WHERE p.sink = d.sink AND p.ordering_key = d.ordering_key AND p.status = 'pending' AND p.id < d.id))
    ORDER BY d.id
    LIMIT $4
    FOR UPDATE OF d SKIP LOCKED
)
UPDATE hookbridge.deliveries d SET lease_owner = $2, lease_until = hookbridge.now_ms() + $3
FROM c, hookbridge.events e
WHERE d.id = c.id AND e.seq = d.event_seq
RETURNING d.id, d.event_seq, d.attempts, d.replay, d.created_at, d.next_attempt_at,
          e.id, e.source, e.event_type, e.received_at, e.headers, e.body, e.dedup_key, e.ordering_key";

const RECORD: &str = "
WITH u AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::integer[], $4::bigint[], $5::text[], $6::integer[],
                         $7::bigint[], $8::bigint[], $9::text[])
        AS u(id, status, attempts, next_at, error, st, started_at, duration_ms, outcome)
),
d AS (
    UPDATE hookbridge.deliveries d
    SET status = u.status, attempts = u.attempts, next_attempt_at = u.next_at,
        last_error = coalesce(u.error, d.last_error), last_status = coalesce(u.st, d.last_status), updated_at = $10,
        lease_owner = NULL, lease_until = NULL
    FROM u
    WHERE d.id = u.id AND d.status = 'pending' AND d.lease_owner = $11
    RETURNING d.id, d.event_seq, d.status
),
a AS (
    INSERT INTO hookbridge.attempts (delivery_id, attempt, started_at, duration_ms, outcome, status, error)
    SELECT u.id, u.attempts, u.started_at, u.duration_ms, u.outcome, u.st, u.error FROM u JOIN d ON d.id = u.id
    WHERE NOT (u.attempts = 1 AND u.status = 'delivered')
)
SELECT coalesce(array_agg(id), '{}') FROM d";

const GAUGES: &str = "
WITH p AS (SELECT event_seq, count(*) AS n FROM hookbridge.deliveries WHERE status = 'pending' GROUP BY event_seq)
SELECT (SELECT count(*) FROM p),
       (SELECT coalesce(sum(e.body_len), 0)::bigint FROM p JOIN hookbridge.events e ON e.seq = p.event_seq),
       (SELECT coalesce(sum(n), 0)::bigint FROM p),
       (SELECT count(*) FROM hookbridge.events WHERE NOT routed),
       (SELECT coalesce(sum(body_len), 0)::bigint FROM hookbridge.events WHERE NOT routed)";

pub(super) const STATUS_SQL: &str = "CASE
    WHEN NOT e.routed THEN 'unrouted'
    WHEN EXISTS (SELECT 1 FROM hookbridge.deliveries d WHERE d.event_seq = e.seq AND d.status = 'pending') THEN 'pending'
    WHEN EXISTS (SELECT 1 FROM hookbridge.deliveries d WHERE d.event_seq = e.seq AND d.status = 'dead') THEN 'dead'
    WHEN EXISTS (SELECT 1 FROM hookbridge.deliveries d WHERE d.event_seq = e.seq AND d.status = 'purged') THEN 'purged'
    ELSE 'delivered' END";

impl Postgres {
    /// Connects, brings the schema up to date, registers this node (waiting for a crashed run's heartbeat
    /// to lapse, refusing a second live daemon with the same node id), releases the claims an earlier run
    /// of this node held, and starts the lease, gauge and notification tasks.
    pub(super) async fn open(spec: &PostgresSpec) -> Result<Postgres, StoreError> {
        let cfg = connection_config(spec, "")?;
        let tls = tls::Connector::new(&spec.tls)?;
        let manager = tls.manager(cfg.clone(), ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(spec.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(spec.connect_timeout))
            .create_timeout(Some(spec.connect_timeout))
            .recycle_timeout(Some(spec.connect_timeout))
            .build()
            .map_err(pg_error)?;
        let mut client = pool.get().await.map_err(pg_error)?;
        schema::migrate(&mut client).await?;
        let lease_ms = i64::try_from(spec.lease.as_millis()).unwrap_or(i64::MAX);
        register(&client, &spec.node_id, lease_ms).await?;
        let released = client
            .execute(
                "UPDATE hookbridge.deliveries SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
                &[&spec.node_id],
            )
            .await
            .map_err(pg_error)?;
        if released > 0 {
            tracing::info!(node = %spec.node_id, deliveries = released, "released the claims of this node's last run");
        }
        drop(client);
        let (live_out, live_rx) = mpsc::channel(LIVE_QUEUE);
        let (records_tx, records_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            pool,
            node: spec.node_id.clone(),
            lease_ms,
            gauges: SpoolGauges::default(),
            sinks: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            stop: CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
            installs: tokio::sync::watch::Sender::new(0),
            live_out,
            live_in: Mutex::new(None),
            records: records_tx,
        });
        let pg = Postgres { inner };
        pg.count_gauges().await?;
        let tasks = vec![
            tokio::spawn(renew(Arc::clone(&pg.inner), spec.lease / 3)),
            tokio::spawn(count(pg.clone())),
            tokio::spawn(listen(Arc::clone(&pg.inner), cfg, tls)),
            tokio::spawn(share_live(Arc::clone(&pg.inner), live_rx)),
            tokio::spawn(record(Arc::downgrade(&pg.inner), pg.inner.stop.clone(), records_rx)),
        ];
        *lock(&pg.inner.tasks) = tasks;
        tracing::info!(node = %spec.node_id, "cluster spool ready on PostgreSQL");
        Ok(pg)
    }

    /// Shares a live payload this node published with the other nodes (best effort: dropped when the
    /// queue is full or the database away).
    pub(super) fn share_live(&self, channel: &str, payload: Arc<str>) {
        let _ = self.inner.live_out.try_send((channel.to_owned(), payload));
    }

    /// The live channels' last payloads as the cluster has them, and a receiver of the other nodes' next ones
    /// (replacing an earlier receiver).
    pub(super) async fn live_from_others(&self) -> Result<super::LiveFromOthers, StoreError> {
        let (tx, rx) = mpsc::channel(LIVE_QUEUE);
        *lock(&self.inner.live_in) = Some(tx);
        let rows = self
            .client()
            .await?
            .query("SELECT channel, payload FROM hookbridge.live ORDER BY updated_at", &[])
            .await
            .map_err(pg_error)?;
        Ok((rows.iter().map(|r| (r.get(0), r.get(1))).collect(), rx))
    }

    /// The plugins' key-value store, shared by the cluster.
    pub(super) fn plugin_kv(&self) -> SharedKv {
        SharedKv::new(self.inner.pool.clone())
    }

    /// Changes as installations change anywhere in the cluster.
    pub(super) fn installation_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.installs.subscribe()
    }

    /// This node's id.
    pub(super) fn node(&self) -> &str {
        &self.inner.node
    }

    pub(super) fn subscribe(&self, sink: &str, capacity: usize) -> Feed {
        let (state, feed) = SinkState::new(capacity);
        lock(&self.inner.sinks).insert(sink.to_owned(), state);
        feed
    }

    pub(super) fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    pub(super) fn gauges(&self, into: &SpoolGauges) {
        into.set_from(&self.inner.gauges);
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        if self.is_closed() {
            return Err(StoreError::Closed);
        }
        self.inner.pool.get().await.map_err(pg_error)
    }

    pub(super) async fn insert(&self, e: Event, sinks: Vec<String>, dedup: Dedup) -> Result<Inserted, StoreError> {
        let client = self.client().await?;
        let headers = serde_json::to_string(&e.headers).unwrap_or_else(|_| "[]".into());
        let (mode, since, retry_since): (i32, i64, i64) = match dedup {
            Dedup::Off => (0, 0, 0),
            Dedup::DeliveryId { since_ms } => (1, since_ms, 0),
            Dedup::Content { since_ms, retry_since_ms } => (2, since_ms, retry_since_ms),
        };
        let len = e.body.len() as i64;
        let stmt = client.prepare_cached(INSERT).await.map_err(pg_error)?;
        let row = client
            .query_one(
                &stmt,
                &[
                    &e.id,
                    &e.source,
                    &e.event_type,
                    &e.received_at_ms,
                    &headers,
                    &&e.body[..],
                    &len,
                    &e.dedup_key,
                    &e.ordering_key,
                    &sinks,
                    &since,
                    &retry_since,
                    &self.inner.node,
                    &mode,
                ],
            )
            .await
            .map_err(pg_error)?;
        let Some(seq) = row.get::<_, Option<i64>>(0) else {
            let found = client
                .query_opt(
                    "SELECT seq, event_id FROM hookbridge.dedup WHERE source = $1 AND dedup_key = $2",
                    &[&e.source, &e.dedup_key],
                )
                .await
                .map_err(pg_error)?;
            let (seq, original) = found.map(|r| (r.get(0), r.get(1))).unwrap_or((0, String::new()));
            return Ok(Inserted::Duplicate { original, seq });
        };
        let g = &self.inner.gauges;
        if sinks.is_empty() {
            g.unrouted_events.fetch_add(1, Ordering::Relaxed);
            g.unrouted_bytes.fetch_add(len as u64, Ordering::Relaxed);
        } else {
            g.pending_events.fetch_add(1, Ordering::Relaxed);
            g.pending_bytes.fetch_add(len as u64, Ordering::Relaxed);
            g.pending_deliveries.fetch_add(sinks.len() as u64, Ordering::Relaxed);
            self.wake(&sinks);
        }
        Ok(Inserted::New { seq })
    }

    /// Wakes this node's dispatchers of `sinks` (new work may be claimable).
    fn wake(&self, sinks: &[String]) {
        wake(&self.inner, sinks.iter().map(String::as_str));
    }

    pub(super) fn answered(&self, seq: i64, _hash: i64, certain: bool) {
        let this = self.clone();
        tokio::spawn(async move {
            let done = async {
                let client = this.client().await?;
                client
                    .execute(
                        "UPDATE hookbridge.dedup SET certain = $2 WHERE seq = $1 AND certain <> $2",
                        &[&seq, &certain],
                    )
                    .await
                    .map_err(pg_error)
            };
            if let Err(e) = done.await {
                tracing::warn!(seq, error = %e, "cannot record how the webhook was answered (its dedup stays as it was)");
            }
        });
    }

    /// Claims up to `limit` (at most [`CLAIM_MAX`]) deliveries of `sink` for this node. `after` is the
    /// dispatcher's cursor: local ids only grow, so everything returned is above it.
    ///
    /// Cancel-safe, although a claim is a write: the claim runs in a task of its own and leaves what it
    /// claimed in the sink's `ready` queue, so that a read dropped half-way (the dispatcher's `select!`)
    /// loses nothing: the next read hands it first.
    pub(super) async fn pending(
        &self,
        sink: &str,
        _after: i64,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        if let Some(rows) = self.take_ready(sink) {
            return Ok(rows);
        }
        let this = self.clone();
        let owned = sink.to_owned();
        tokio::spawn(async move { this.claim(&owned, limit).await })
            .await
            .map_err(|e| StoreError::Join(e.to_string()))??;
        Ok(self.take_ready(sink).unwrap_or_default())
    }

    /// What a claim left for the dispatcher, if anything.
    fn take_ready(&self, sink: &str) -> Option<Vec<PendingDelivery>> {
        let mut sinks = lock(&self.inner.sinks);
        let ready = &mut sinks.get_mut(sink)?.ready;
        (!ready.is_empty()).then(|| std::mem::take(ready))
    }

    /// One claim for `sink`, its rows queued in the sink's `ready` with new local ids (one claim at a time
    /// per sink).
    async fn claim(&self, sink: &str, limit: usize) -> Result<(), StoreError> {
        let one = {
            let mut sinks = lock(&self.inner.sinks);
            let state = sinks.entry(sink.to_owned()).or_insert_with(|| SinkState::new(1).0);
            Arc::clone(&state.claiming)
        };
        let _one = one.lock().await;
        let client = self.client().await?;
        let fresh = lock(&self.inner.sinks).get(sink).is_some_and(|s| s.fresh);
        if fresh {
            // A new dispatcher for the sink (start, reload): what an earlier one held is not in its memory.
            client
                .execute(
                    "UPDATE hookbridge.deliveries SET lease_owner = NULL, lease_until = NULL
                     WHERE lease_owner = $1 AND sink = $2 AND status = 'pending'",
                    &[&self.inner.node, &sink],
                )
                .await
                .map_err(pg_error)?;
            if let Some(s) = lock(&self.inner.sinks).get_mut(sink) {
                s.fresh = false;
            }
        }
        let limit = limit.clamp(1, CLAIM_MAX) as i64;
        let stmt = client.prepare_cached(CLAIM).await.map_err(pg_error)?;
        let mut rows =
            client.query(&stmt, &[&sink, &self.inner.node, &self.inner.lease_ms, &limit]).await.map_err(pg_error)?;
        rows.sort_by_key(|r| r.get::<_, i64>(0));
        let mut sinks = lock(&self.inner.sinks);
        let state = sinks.entry(sink.to_owned()).or_insert_with(|| SinkState::new(1).0);
        for r in rows {
            let headers: String = r.get(10);
            let event = Event {
                id: r.get(6),
                source: r.get(7),
                event_type: r.get(8),
                received_at_ms: r.get(9),
                headers: serde_json::from_str(&headers).unwrap_or_default(),
                body: Bytes::from(r.get::<_, Vec<u8>>(11)),
                dedup_key: r.get(12),
                ordering_key: r.get(13),
                body_is_json: false,
            };
            state.last_local += 1;
            state.claims.insert(state.last_local, r.get(0));
            state.ready.push(PendingDelivery {
                id: state.last_local,
                seq: r.get(1),
                attempts: u32::try_from(r.get::<_, i32>(2)).unwrap_or(0),
                replay: r.get(3),
                event: Arc::new(event),
                created_at_ms: r.get(4),
                next_attempt_ms: r.get(5),
            });
        }
        Ok(())
    }

    pub(super) async fn record_all(&self, sink: &str, records: Vec<Record>) -> Result<(), StoreError> {
        let mut rows = Rows::default();
        let mut finals = Vec::new();
        let mut due = 0;
        {
            let sinks = lock(&self.inner.sinks);
            let claims = sinks.get(sink).map(|s| &s.claims);
            for r in &records {
                let Some(&id) = claims.and_then(|c| c.get(&r.delivery_id)) else {
                    tracing::warn!(
                        sink,
                        delivery = r.delivery_id,
                        "an outcome for a delivery this node no longer holds"
                    );
                    continue;
                };
                let (s, n, err, l) = match &r.outcome {
                    Outcome::Delivered => ("delivered", None, None, "delivered"),
                    Outcome::Dead(e) => ("dead", None, Some(e.clone()), "dead"),
                    Outcome::Retry { next_attempt_ms, error } => {
                        ("pending", Some(*next_attempt_ms), Some(error.clone()), "retry")
                    }
                };
                // Every outcome ends this node's claim: a retry goes back to the cluster until it is due.
                finals.push(r.delivery_id);
                if let Outcome::Retry { next_attempt_ms, .. } = &r.outcome {
                    due = due.max(*next_attempt_ms);
                }
                rows.ids.push(id);
                rows.status.push(s);
                rows.attempts.push(i32::try_from(r.attempts).unwrap_or(i32::MAX));
                rows.next.push(n);
                rows.error.push(err);
                rows.st.push(r.attempt.status.map(i32::from));
                rows.started.push(r.attempt.started_at_ms);
                rows.duration.push(r.attempt.duration_ms);
                rows.label.push(l);
            }
        }
        if rows.ids.is_empty() {
            return Ok(());
        }
        if self.is_closed() {
            return Err(StoreError::Closed);
        }
        let asked = rows.ids.len();
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.inner.records.send(Outcomes { rows, reply }).map_err(|_| StoreError::Closed)?;
        let changed = answer.await.map_err(|_| StoreError::Closed)??.len();
        if changed < asked {
            tracing::warn!(
                sink,
                lost = asked - changed,
                "outcomes of deliveries another node took over (their leases had lapsed): it delivers them again"
            );
        }
        if !finals.is_empty()
            && let Some(s) = lock(&self.inner.sinks).get_mut(sink)
        {
            for local in &finals {
                s.claims.remove(local);
            }
            // The next delivery of each finished one's ordering key may be claimable now.
            s.wake.notify_one();
            // And the retries when they are due (unless another node, or the 1 s poll, takes them first).
            if due > 0 {
                let wake = Arc::clone(&s.wake);
                let wait = Duration::from_millis(u64::try_from(due - now_ms()).unwrap_or(0));
                let stop = self.inner.stop.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(wait) => wake.notify_one(),
                    }
                });
            }
        }
        Ok(())
    }

    pub(super) async fn record_handshake(&self, source: &str, secret: &str, at: i64) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.execute(
            "INSERT INTO hookbridge.handshakes (source, secret, received_at) VALUES ($1, $2, $3)",
            &[&source, &secret, &at],
        )
        .await
        .map_err(pg_error)?;
        tx.execute(
            "DELETE FROM hookbridge.handshakes WHERE source = $1 AND id NOT IN
               (SELECT id FROM hookbridge.handshakes WHERE source = $1 ORDER BY id DESC LIMIT $2)",
            &[&source, &HANDSHAKES_KEPT],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)
    }

    pub(super) async fn save_installation(
        &self,
        source: &str,
        workspace: &str,
        addon_id: &str,
        record: String,
    ) -> Result<(), StoreError> {
        // The other nodes reload their installations when told (in the same statement, so at its commit).
        self.client()
            .await?
            .query(
                "WITH u AS (
                     INSERT INTO hookbridge.installations (source, workspace_id, addon_id, record, updated_at)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (source, workspace_id, addon_id) DO UPDATE
                         SET record = EXCLUDED.record, updated_at = EXCLUDED.updated_at
                     RETURNING 1
                 )
                 SELECT pg_notify('hookbridge_installations', $1) FROM u",
                &[&source, &workspace, &addon_id, &record, &now_ms()],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    pub(super) async fn installations(&self) -> Result<Vec<(String, String, String, String)>, StoreError> {
        let client = self.client().await?;
        installations(&client).await
    }

    /// A small durable write: this node's heartbeat.
    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        heartbeat(&*self.client().await?, &self.inner.node).await
    }

    pub(super) async fn prune(&self, before_ms: i64, limit: usize) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let n: i64 = client
            .query_one(
                "WITH p AS (
                     SELECT e.seq FROM hookbridge.events e
                     WHERE e.received_at < $1
                       AND NOT EXISTS (SELECT 1 FROM hookbridge.deliveries d
                                       WHERE d.event_seq = e.seq AND d.status IN ('pending', 'dead'))
                     ORDER BY e.seq LIMIT $2
                     FOR UPDATE SKIP LOCKED
                 ), x AS (DELETE FROM hookbridge.events e USING p WHERE e.seq = p.seq RETURNING 1)
                 SELECT count(*) FROM x",
                &[&before_ms, &limit],
            )
            .await
            .map_err(pg_error)?
            .get(0);
        client
            .execute(
                "DELETE FROM hookbridge.dedup WHERE ctid IN
                   (SELECT ctid FROM hookbridge.dedup WHERE received_at < $1 LIMIT $2)",
                &[&before_ms, &limit],
            )
            .await
            .map_err(pg_error)?;
        drop(client);
        self.count_gauges().await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub(super) async fn resync(&self) -> Result<(), StoreError> {
        self.count_gauges().await
    }

    /// Counts the cluster's gauges.
    async fn count_gauges(&self) -> Result<(), StoreError> {
        let row = self.client().await?.query_one(GAUGES, &[]).await.map_err(pg_error)?;
        let g = &self.inner.gauges;
        let at = |i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
        g.pending_events.store(at(0), Ordering::Relaxed);
        g.pending_bytes.store(at(1), Ordering::Relaxed);
        g.pending_deliveries.store(at(2), Ordering::Relaxed);
        g.unrouted_events.store(at(3), Ordering::Relaxed);
        g.unrouted_bytes.store(at(4), Ordering::Relaxed);
        Ok(())
    }

    pub(super) async fn sink_stats(&self) -> Result<Vec<SinkStats>, StoreError> {
        let client = self.client().await?;
        let dead = client
            .query("SELECT sink, count(*) FROM hookbridge.deliveries WHERE status = 'dead' GROUP BY sink", &[])
            .await
            .map_err(pg_error)?;
        let oldest = client
            .query(
                "SELECT sink, min(created_at) FROM hookbridge.deliveries WHERE status = 'pending' GROUP BY sink",
                &[],
            )
            .await
            .map_err(pg_error)?;
        let mut stats: std::collections::BTreeMap<String, SinkStats> = std::collections::BTreeMap::new();
        for r in dead {
            let sink: String = r.get(0);
            stats.insert(sink.clone(), SinkStats { sink, dead: r.get(1), oldest_pending_ms: None });
        }
        for r in oldest {
            let sink: String = r.get(0);
            stats
                .entry(sink.clone())
                .or_insert(SinkStats { sink, dead: 0, oldest_pending_ms: None })
                .oldest_pending_ms = Some(r.get(1));
        }
        Ok(stats.into_values().collect())
    }

    pub(super) async fn event(&self, id: &str) -> Result<Option<EventDetail>, StoreError> {
        let client = self.client().await?;
        event_detail(&client, id).await
    }

    /// Stops the tasks, gives this node's claims back (another node, or this one restarted, takes them at
    /// once) and marks the node gone.
    pub(super) async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inner.stop.cancel();
        let tasks = std::mem::take(&mut *lock(&self.inner.tasks));
        for t in tasks {
            let _ = t.await;
        }
        let done = async {
            let client = self.inner.pool.get().await.map_err(pg_error)?;
            client
                .execute(
                    "UPDATE hookbridge.deliveries SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
                    &[&self.inner.node],
                )
                .await
                .map_err(pg_error)?;
            client
                .execute("UPDATE hookbridge.nodes SET heartbeat_at = 0 WHERE id = $1", &[&self.inner.node])
                .await
                .map_err(pg_error)
        };
        if let Err(e) = done.await {
            tracing::warn!(error = %e, "cannot give this node's claims back: other nodes take them over when they lapse");
        }
        self.inner.pool.close();
    }
}

/// Every add-on installation record: (source, workspace, add-on id, record).
pub(super) async fn installations(
    client: &tokio_postgres::Client,
) -> Result<Vec<(String, String, String, String)>, StoreError> {
    let rows = client
        .query(
            "SELECT source, workspace_id, addon_id, record FROM hookbridge.installations
             ORDER BY source, workspace_id, addon_id",
            &[],
        )
        .await
        .map_err(pg_error)?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect())
}

/// Everything about one event.
pub(super) async fn event_detail(client: &tokio_postgres::Client, id: &str) -> Result<Option<EventDetail>, StoreError> {
    let found = client
        .query_opt(
            &format!(
                "SELECT e.seq, e.id, e.source, e.event_type, e.received_at, e.headers, e.body, {STATUS_SQL}
                 FROM hookbridge.events e WHERE e.id = $1"
            ),
            &[&id],
        )
        .await
        .map_err(pg_error)?;
    let Some(e) = found else { return Ok(None) };
    let seq: i64 = e.get(0);
    let headers: String = e.get(5);
    let deliveries = client
        .query(
            "SELECT id, sink, status, attempts, last_error, last_status, replay, created_at, updated_at
             FROM hookbridge.deliveries WHERE event_seq = $1 ORDER BY id",
            &[&seq],
        )
        .await
        .map_err(pg_error)?
        .iter()
        .map(|r| DeliveryInfo {
            id: r.get(0),
            sink: r.get(1),
            status: r.get(2),
            attempts: u32::try_from(r.get::<_, i32>(3)).unwrap_or(0),
            last_error: r.get(4),
            last_status: r.get::<_, Option<i32>>(5).and_then(|s| u16::try_from(s).ok()),
            replay: r.get(6),
            created_at_ms: r.get(7),
            updated_at_ms: r.get(8),
        })
        .collect();
    let attempts = client
        .query(
            "SELECT a.delivery_id, d.sink, a.attempt, a.started_at, a.duration_ms, a.outcome, a.status, a.error
             FROM hookbridge.attempts a JOIN hookbridge.deliveries d ON d.id = a.delivery_id
             WHERE d.event_seq = $1 ORDER BY a.id",
            &[&seq],
        )
        .await
        .map_err(pg_error)?
        .iter()
        .map(|r| AttemptInfo {
            delivery_id: r.get(0),
            sink: r.get(1),
            attempt: u32::try_from(r.get::<_, i32>(2)).unwrap_or(0),
            started_at_ms: r.get(3),
            duration_ms: r.get(4),
            outcome: r.get(5),
            status: r.get::<_, Option<i32>>(6).and_then(|s| u16::try_from(s).ok()),
            error: r.get(7),
        })
        .collect();
    Ok(Some(EventDetail {
        summary: EventSummary {
            id: e.get(1),
            source: e.get(2),
            event_type: e.get(3),
            received_at_ms: e.get(4),
            status: e.get(7),
        },
        headers: serde_json::from_str(&headers).unwrap_or_default(),
        body: String::from_utf8_lossy(&e.get::<_, Vec<u8>>(6)).into_owned(),
        deliveries,
        attempts,
    }))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn wake<'a>(inner: &Inner, sinks: impl Iterator<Item = &'a str>) {
    let all = lock(&inner.sinks);
    for sink in sinks {
        if let Some(s) = all.get(sink) {
            s.wake.notify_one();
        }
    }
}

/// Registers the node: a heartbeat fresher than a lease means another daemon runs under this id, or this
/// node's last run crashed a moment ago; its heartbeat is waited on for a lease and a renewal period.
async fn register(client: &deadpool_postgres::Object, node: &str, lease_ms: i64) -> Result<(), StoreError> {
    let deadline = std::time::Instant::now() + Duration::from_millis(lease_ms as u64 + lease_ms as u64 / 3 + 1000);
    let mut said = false;
    loop {
        let taken = client
            .query_opt(
                "INSERT INTO hookbridge.nodes AS n (id, started_at, heartbeat_at)
                 VALUES ($1, hookbridge.now_ms(), hookbridge.now_ms())
                 ON CONFLICT (id) DO UPDATE SET started_at = EXCLUDED.started_at, heartbeat_at = EXCLUDED.heartbeat_at
                 WHERE n.heartbeat_at < hookbridge.now_ms() - $2
                 RETURNING id",
                &[&node, &lease_ms],
            )
            .await
            .map_err(pg_error)?;
        if taken.is_some() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(StoreError::Schema(format!(
                "another hookbridge daemon runs with storage.postgres.node_id = {node:?} (its heartbeat is fresh): \
                 give each node its own node_id"
            )));
        }
        if !said {
            tracing::warn!(
                node,
                "node id in use: waiting for its heartbeat to lapse (a crashed run of this node, or another daemon \
                 with the same node_id)"
            );
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn heartbeat(client: &deadpool_postgres::ClientWrapper, node: &str) -> Result<(), StoreError> {
    client
        .execute("UPDATE hookbridge.nodes SET heartbeat_at = hookbridge.now_ms() WHERE id = $1", &[&node])
        .await
        .map_err(pg_error)?;
    Ok(())
}

/// Renews this node's leases and heartbeat every `every` until stopped.
async fn renew(inner: Arc<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Only the claims this node knows of: one it made but never heard back about (the connection broke
        // after the claim's commit) lapses, and is claimed again.
        let held: Vec<i64> = lock(&inner.sinks).values().flat_map(|s| s.claims.values().copied()).collect();
        let done = async {
            let client = inner.pool.get().await.map_err(pg_error)?;
            if !held.is_empty() {
                client
                    .execute(
                        "UPDATE hookbridge.deliveries SET lease_until = hookbridge.now_ms() + $2
                         WHERE id = ANY($3) AND lease_owner = $1 AND status = 'pending'",
                        &[&inner.node, &inner.lease_ms, &held],
                    )
                    .await
                    .map_err(pg_error)?;
            }
            heartbeat(&client, &inner.node).await
        };
        if let Err(e) = done.await
            && let Some(held) = RENEW_FAILED.due(std::time::Instant::now())
        {
            tracing::error!(
                error = %e,
                held_back = held,
                "cannot renew this node's claims: past the lease other nodes take its deliveries over"
            );
        }
    }
}

/// Writes this node's live payloads to the `live` table (the newest per channel, when they come faster than
/// the database takes them) and tells the other nodes, until stopped.
async fn share_live(inner: Arc<Inner>, mut rx: mpsc::Receiver<(String, Arc<str>)>) {
    loop {
        let first = tokio::select! {
            _ = inner.stop.cancelled() => return,
            got = rx.recv() => match got { Some(p) => p, None => return },
        };
        let mut latest = HashMap::from([first]);
        while let Ok((c, p)) = rx.try_recv() {
            latest.insert(c, p);
        }
        let done = async {
            let client = inner.pool.get().await.map_err(pg_error)?;
            for (channel, payload) in &latest {
                client
                    .query(
                        "WITH u AS (
                             INSERT INTO hookbridge.live (channel, payload, origin, updated_at)
                             VALUES ($1, $2, $3, hookbridge.now_ms())
                             ON CONFLICT (channel) DO UPDATE
                                 SET payload = EXCLUDED.payload, origin = EXCLUDED.origin, updated_at = EXCLUDED.updated_at
                             RETURNING 1
                         )
                         SELECT pg_notify('hookbridge_live', $3 || ' ' || $1) FROM u",
                        &[channel, &&**payload, &inner.node],
                    )
                    .await
                    .map_err(pg_error)?;
            }
            Ok::<_, StoreError>(())
        };
        if let Err(e) = done.await {
            tracing::debug!(error = %e, "cannot share a live payload with the other nodes");
        }
    }
}

/// Reads another node's new payload of `channel` and hands it to this node's live channels.
async fn fetch_live(inner: Arc<Inner>, channel: String) {
    let Some(tx) = lock(&inner.live_in).clone() else { return };
    let got = async {
        let client = inner.pool.get().await.map_err(pg_error)?;
        client.query_opt("SELECT payload FROM hookbridge.live WHERE channel = $1", &[&channel]).await.map_err(pg_error)
    };
    match got.await {
        Ok(Some(row)) => {
            let _ = tx.try_send((channel, row.get(0)));
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(channel, error = %e, "cannot read another node's live payload"),
    }
}

/// Counts the gauges every [`GAUGES_EVERY`] until stopped.
async fn count(pg: Postgres) {
    let mut tick = tokio::time::interval(GAUGES_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = pg.inner.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = pg.count_gauges().await {
            tracing::debug!(error = %e, "cannot count the spool's gauges");
        }
    }
}

/// Listens for other nodes' new deliveries and wakes this node's dispatchers of their sinks; reconnects
/// (waking every dispatcher, since notifications may have been missed) until stopped.
async fn listen(inner: Arc<Inner>, cfg: tokio_postgres::Config, tls: tls::Connector) {
    match tls {
        tls::Connector::Off => listen_with(inner, cfg, tokio_postgres::NoTls).await,
        tls::Connector::Verified(t) => listen_with(inner, cfg, t).await,
    }
}

async fn listen_with<T>(inner: Arc<Inner>, cfg: tokio_postgres::Config, tls: T)
where
    T: tls::MakeTls,
{
    use futures_util::StreamExt;
    loop {
        match cfg.connect(tls.clone()).await {
            Ok((client, mut conn)) => {
                let (tx, mut rx) = mpsc::unbounded_channel::<(String, String)>();
                let driver = tokio::spawn(async move {
                    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                    while let Some(m) = messages.next().await {
                        match m {
                            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                                if tx.send((n.channel().to_owned(), n.payload().to_owned())).is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::debug!(error = %e, "notification connection ended");
                                return;
                            }
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {INSTALLATIONS}; LISTEN {LIVE}")).await {
                    Ok(()) => {
                        // What was told while nobody listened is read again.
                        let all: Vec<String> = lock(&inner.sinks).keys().cloned().collect();
                        wake(&inner, all.iter().map(String::as_str));
                        inner.installs.send_modify(|n| *n += 1);
                        loop {
                            tokio::select! {
                                _ = inner.stop.cancelled() => {
                                    driver.abort();
                                    return;
                                }
                                msg = rx.recv() => match msg {
                                    Some((channel, _)) if channel == INSTALLATIONS => {
                                        inner.installs.send_modify(|n| *n += 1);
                                    }
                                    Some((channel, payload)) if channel == LIVE => {
                                        if let Some((origin, live)) = payload.split_once(' ')
                                            && origin != inner.node
                                        {
                                            tokio::spawn(fetch_live(Arc::clone(&inner), live.to_owned()));
                                        }
                                    }
                                    Some((_, payload)) => wake(&inner, payload.split(',')),
                                    None => break,
                                },
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot LISTEN"),
                }
                driver.abort();
            }
            Err(e) => {
                if let Some(held) = LISTEN_FAILED.due(std::time::Instant::now()) {
                    tracing::warn!(error = %e, held_back = held, "cannot connect for notifications; dispatchers poll meanwhile");
                }
            }
        }
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests;
