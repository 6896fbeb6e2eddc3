//! The cluster database's schema (PostgreSQL schema `hookbridge`), versioned: each migration runs once, in
//! order, in one transaction that holds an advisory lock, so that nodes starting together apply it once and
//! a crash in the middle leaves the previous version whole (PostgreSQL's DDL is transactional).
//!
//! Tables:
//! - `events`: every stored event (seq from `event_seq`), `routed` false for an event that matched no
//!   route; written once (an update would rewrite the body: what is unfinished is told by `deliveries`);
//! - `dedup`: one row per (source, dedup key), the newest event stored under it; the insert decides
//!   duplicate or not with one `INSERT ... ON CONFLICT DO UPDATE ... WHERE` on this unique key, so two nodes
//!   receiving the same webhook cannot both store it;
//! - `deliveries`: one per event and sink (and per replay), with the claim (`lease_owner`, `lease_until` in
//!   ms of the server's clock) of the node working on it;
//! - `attempts`: the attempt log (a first attempt that delivered is implied, as on the log engine);
//! - `handshakes`, `installations`: as in the embedded spool;
//! - `nodes`: the nodes alive (their heartbeat), so that two daemons cannot run under one node id;
//! - `live` (version 2): each live channel's last payload, so that every node's clients see what a plugin
//!   published on any node;
//! - `plugin_kv` (version 3): the plugins' key-value store, shared by the nodes (`kv.rs`).

use deadpool_postgres::Client;

use super::pg_error;
use crate::store::StoreError;

/// Key of the advisory lock migrations hold (`hookbridge` in ASCII).
const MIGRATION_LOCK: i64 = 0x686f_6f6b_6272_6964;

/// The migrations, in order: version and SQL. Never edit one that has shipped: add the next.
const MIGRATIONS: &[(i32, &str)] = &[(1, V1), (2, V2), (3, V3)];

const V1: &str = "
CREATE FUNCTION hookbridge.now_ms() RETURNS bigint LANGUAGE sql STABLE
    AS $$ SELECT (extract(epoch FROM statement_timestamp()) * 1000)::bigint $$;
CREATE SEQUENCE hookbridge.event_seq;
CREATE TABLE hookbridge.events (
    seq             bigint PRIMARY KEY,
    id              text NOT NULL UNIQUE,
    source          text NOT NULL,
    event_type      text NOT NULL,
    received_at     bigint NOT NULL,
    headers         text NOT NULL,
    body            bytea NOT NULL,
    body_len        bigint NOT NULL,
    dedup_key       text NOT NULL,
    ordering_key    text,
    routed          boolean NOT NULL,
    node            text NOT NULL
);
CREATE INDEX events_received_at ON hookbridge.events (received_at);
CREATE INDEX events_unrouted ON hookbridge.events (seq) WHERE NOT routed;
CREATE TABLE hookbridge.dedup (
    source      text NOT NULL,
    dedup_key   text NOT NULL,
    seq         bigint NOT NULL,
    event_id    text NOT NULL,
    received_at bigint NOT NULL,
    certain     boolean NOT NULL DEFAULT true,
    PRIMARY KEY (source, dedup_key)
);
CREATE INDEX dedup_seq ON hookbridge.dedup (seq);
CREATE INDEX dedup_received_at ON hookbridge.dedup (received_at);
CREATE TABLE hookbridge.deliveries (
    id              bigserial PRIMARY KEY,
    event_seq       bigint NOT NULL REFERENCES hookbridge.events (seq) ON DELETE CASCADE,
    sink            text NOT NULL,
    ordering_key    text,
    status          text NOT NULL CHECK (status IN ('pending', 'delivered', 'dead', 'retried', 'purged')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at bigint,
    last_error      text,
    last_status     integer,
    replay          boolean NOT NULL DEFAULT false,
    created_at      bigint NOT NULL,
    updated_at      bigint NOT NULL,
    lease_owner     text,
    lease_until     bigint
);
CREATE INDEX deliveries_event ON hookbridge.deliveries (event_seq);
CREATE INDEX deliveries_pending ON hookbridge.deliveries (event_seq) WHERE status = 'pending';
CREATE INDEX deliveries_key ON hookbridge.deliveries (sink, ordering_key, id)
    WHERE status = 'pending' AND ordering_key IS NOT NULL;
CREATE INDEX deliveries_unclaimed ON hookbridge.deliveries (sink, id) WHERE status = 'pending' AND lease_owner IS NULL;
CREATE INDEX deliveries_leased ON hookbridge.deliveries (sink, lease_until) WHERE status = 'pending' AND lease_owner IS NOT NULL;
CREATE INDEX deliveries_dead ON hookbridge.deliveries (sink, id) WHERE status = 'dead';
CREATE TABLE hookbridge.attempts (
    id          bigserial PRIMARY KEY,
    delivery_id bigint NOT NULL REFERENCES hookbridge.deliveries (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    started_at  bigint NOT NULL,
    duration_ms bigint NOT NULL,
    outcome     text NOT NULL,
    status      integer,
    error       text
);
CREATE INDEX attempts_delivery ON hookbridge.attempts (delivery_id);
CREATE TABLE hookbridge.handshakes (
    id          bigserial PRIMARY KEY,
    source      text NOT NULL,
    secret      text NOT NULL,
    received_at bigint NOT NULL
);
CREATE TABLE hookbridge.installations (
    source       text NOT NULL,
    workspace_id text NOT NULL,
    addon_id     text NOT NULL,
    record       text NOT NULL,
    updated_at   bigint NOT NULL,
    PRIMARY KEY (source, workspace_id, addon_id)
);
CREATE TABLE hookbridge.nodes (
    id           text PRIMARY KEY,
    started_at   bigint NOT NULL,
    heartbeat_at bigint NOT NULL
);
";

/// Live channels shared by the nodes: each channel's last payload and the node that published it.
const V2: &str = "
CREATE TABLE hookbridge.live (
    channel    text PRIMARY KEY,
    payload    text NOT NULL,
    origin     text NOT NULL,
    updated_at bigint NOT NULL
);
";

/// The plugins' key-value store: one namespace per plugin id; `expires_at_ms` on the server's clock.
const V3: &str = "
CREATE TABLE hookbridge.plugin_kv (
    plugin        text NOT NULL,
    key           text NOT NULL,
    value         bytea NOT NULL,
    expires_at_ms bigint,
    PRIMARY KEY (plugin, key)
);
CREATE INDEX plugin_kv_expiring ON hookbridge.plugin_kv (expires_at_ms) WHERE expires_at_ms IS NOT NULL;
";

/// The newest schema version this build knows.
pub(super) fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |(v, _)| *v)
}

/// Brings the database to [`latest`] (refusing one made by a newer hookbridge). Returns the version found.
pub(super) async fn migrate(client: &mut Client) -> Result<i32, StoreError> {
    let tx = client.transaction().await.map_err(pg_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg_error)?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS hookbridge;
         CREATE TABLE IF NOT EXISTS hookbridge.migrations (
             version    integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
    )
    .await
    .map_err(pg_error)?;
    let found: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM hookbridge.migrations", &[])
        .await
        .map_err(pg_error)?
        .get(0);
    if found > latest() {
        return Err(StoreError::Schema(format!(
            "the database's hookbridge schema is version {found}, made by a newer hookbridge (this one knows up to \
             {}): upgrade this node",
            latest()
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        tx.batch_execute(sql).await.map_err(pg_error)?;
        tx.execute("INSERT INTO hookbridge.migrations (version) VALUES ($1)", &[version]).await.map_err(pg_error)?;
        tracing::info!(version, "applied the cluster database's schema migration");
    }
    tx.commit().await.map_err(pg_error)?;
    Ok(found)
}
