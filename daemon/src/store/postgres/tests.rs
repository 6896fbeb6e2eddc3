//! The cluster backend against a real PostgreSQL server (`HOOKBRIDGE_TEST_POSTGRES`, default the local
//! server with trust authentication; `scripts/test` starts one if none runs). Each test has a database of
//! its own, dropped at its end.

use std::time::Duration;

use super::*;
use crate::store::tests::event;
use crate::store::{Attempt, Store};
use tokio_postgres::NoTls;

/// The server tests connect to (any database on it: each test makes its own).
fn server_url() -> String {
    std::env::var("HOOKBRIDGE_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of its own for one test.
pub(crate) struct TestDb {
    name: String,
    admin: tokio_postgres::Client,
}

impl TestDb {
    pub(crate) async fn new(tag: &str) -> TestDb {
        let (admin, conn) = tokio_postgres::connect(&server_url(), NoTls)
            .await
            .unwrap_or_else(|e| panic!("no PostgreSQL at HOOKBRIDGE_TEST_POSTGRES ({e}): scripts/test starts one"));
        tokio::spawn(conn);
        let name = format!("hb_test_{tag}_{}", uuid::Uuid::now_v7().simple());
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        TestDb { name, admin }
    }

    /// A connection string to this database.
    pub(crate) fn url(&self) -> String {
        let mut cfg: tokio_postgres::Config = server_url().parse().unwrap();
        cfg.dbname(&self.name);
        // Back to key-value form, which tokio-postgres parses as well as a URL.
        let host = match &cfg.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        };
        let mut s =
            format!("host={host} port={} dbname={}", cfg.get_ports().first().copied().unwrap_or(5432), self.name);
        if let Some(u) = cfg.get_user() {
            s.push_str(&format!(" user={u}"));
        }
        if let Some(p) = cfg.get_password() {
            s.push_str(&format!(" password={}", String::from_utf8_lossy(p)));
        }
        s
    }

    pub(crate) fn spec(&self, node: &str, lease: Duration) -> PostgresSpec {
        PostgresSpec {
            url: SecretString::new(self.url()),
            pool_size: 4,
            statement_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            lease,
            node_id: node.into(),
            tls: PgTls::Off,
        }
    }

    pub(crate) async fn drop_db(self) {
        let _ = self.admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await;
    }
}

impl Postgres {
    /// Stops the node as SIGKILL would: no more renewals, nothing given back.
    fn kill(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.stop.cancel();
    }
}

fn pg(store: &Store) -> &Postgres {
    match &store.backend {
        super::super::Backend::Postgres(p) => p,
        _ => unreachable!(),
    }
}

fn keyed(id: &str, key: Option<&str>) -> Event {
    let mut e = event(id, "{}");
    e.ordering_key = key.map(str::to_owned);
    e
}

async fn insert(store: &Store, e: Event, sinks: &[&str]) -> i64 {
    match store.insert(e, sinks.iter().map(|s| s.to_string()).collect(), Dedup::Off).await.unwrap() {
        Inserted::New { seq } => seq,
        other => panic!("{other:?}"),
    }
}

fn ids(rows: &[PendingDelivery]) -> Vec<&str> {
    rows.iter().map(|r| r.event.id.as_str()).collect()
}

fn done(id: i64, outcome: Outcome) -> Record {
    Record {
        delivery_id: id,
        attempts: 1,
        outcome,
        attempt: Attempt { started_at_ms: now_ms(), duration_ms: 2, status: Some(200) },
        event: None,
    }
}

#[tokio::test]
async fn nodes_starting_together_migrate_once_and_a_newer_schema_is_refused() {
    let db = TestDb::new("migrate").await;
    let (spec_a, spec_b) = (db.spec("a", Duration::from_secs(30)), db.spec("b", Duration::from_secs(30)));
    let (a, b) = tokio::join!(Store::connect(&spec_a), Store::connect(&spec_b));
    let (a, b) = (a.unwrap(), b.unwrap());
    let versions = db.admin_query("SELECT count(*) FROM hookbridge.migrations").await;
    assert_eq!(versions, i64::from(schema::latest()), "each migration applied once");
    a.close().await;
    b.close().await;
    db.admin_exec("INSERT INTO hookbridge.migrations (version) VALUES (999)").await;
    let e = Store::connect(&db.spec("a", Duration::from_secs(30))).await.unwrap_err();
    assert!(e.to_string().contains("version 999, made by a newer hookbridge"), "{e}");
    db.drop_db().await;
}

impl TestDb {
    async fn on_db(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&self.url(), NoTls).await.unwrap();
        tokio::spawn(conn);
        c
    }

    async fn admin_query(&self, sql: &str) -> i64 {
        self.on_db().await.query_one(sql, &[]).await.unwrap().get(0)
    }

    async fn admin_exec(&self, sql: &str) {
        self.on_db().await.batch_execute(sql).await.unwrap();
    }
}

#[tokio::test]
async fn a_retry_on_another_node_is_a_duplicate_by_the_unique_key() {
    let db = TestDb::new("dedup").await;
    let a = Store::connect(&db.spec("a", Duration::from_secs(30))).await.unwrap();
    let b = Store::connect(&db.spec("b", Duration::from_secs(30))).await.unwrap();
    let now = now_ms();
    let by_id = Dedup::DeliveryId { since_ms: now - 60_000 };
    let first = a.insert(event("e1", "{}"), vec!["s".into()], by_id).await.unwrap();
    let Inserted::New { seq } = first else { panic!("{first:?}") };
    let mut retry = event("e2", "{}");
    retry.dedup_key = "k-e1".into();
    assert_eq!(
        b.insert(retry.clone(), vec!["s".into()], by_id).await.unwrap(),
        Inserted::Duplicate { original: "e1".into(), seq }
    );
    // Outside the window the same key is a new event.
    let later = Dedup::DeliveryId { since_ms: now_ms() + 1 };
    assert!(matches!(b.insert(retry.clone(), vec!["s".into()], later).await.unwrap(), Inserted::New { .. }));

    // Content keys: a certain answer outside the retry window lets the same content in again; an uncertain
    // one makes it a duplicate.
    let content = |retry_since_ms| Dedup::Content { since_ms: now - 60_000, retry_since_ms };
    let mut c1 = event("c1", "{}");
    c1.dedup_key = "content".into();
    let Inserted::New { seq: c1_seq } = a.insert(c1, vec!["s".into()], content(now - 1)).await.unwrap() else {
        panic!()
    };
    let mut c2 = event("c2", "{}");
    c2.dedup_key = "content".into();
    assert!(
        matches!(
            b.insert(c2.clone(), vec!["s".into()], content(now - 60_000)).await.unwrap(),
            Inserted::Duplicate { .. }
        ),
        "within the retry window: a duplicate"
    );
    assert!(
        matches!(b.insert(c2.clone(), vec!["s".into()], content(now_ms() + 1)).await.unwrap(), Inserted::New { .. }),
        "a certain answer, past the retry window: new"
    );
    let mut c3 = event("c3", "{}");
    c3.dedup_key = "content".into();
    // c2 is now the key's newest event; its answer was cut.
    let c2_seq: i64 = db.admin_query("SELECT seq FROM hookbridge.events WHERE id = 'c2'").await;
    a.answered(c2_seq, 0, false);
    for _ in 0..50 {
        if db.admin_query("SELECT count(*) FROM hookbridge.dedup WHERE NOT certain").await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        a.insert(c3, vec!["s".into()], content(now_ms() + 1)).await.unwrap(),
        Inserted::Duplicate { original: "c2".into(), seq: c2_seq },
        "an uncertain answer: the provider may retry, so the copy is a duplicate"
    );
    assert!(c1_seq < c2_seq);
    a.close().await;
    b.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn only_the_head_of_an_ordering_key_is_claimed_across_nodes() {
    let db = TestDb::new("claims").await;
    let a = Store::connect(&db.spec("a", Duration::from_secs(30))).await.unwrap();
    let b = Store::connect(&db.spec("b", Duration::from_secs(30))).await.unwrap();
    let _fa = a.subscribe("s", 16);
    let _fb = b.subscribe("s", 16);
    insert(&a, keyed("k1", Some("K")), &["s"]).await;
    insert(&a, keyed("k2", Some("K")), &["s"]).await;
    insert(&b, keyed("l1", Some("L")), &["s"]).await;
    insert(&b, keyed("free", None), &["s"]).await;
    let got_b = b.pending("s", 0, 100).await.unwrap();
    assert_eq!(ids(&got_b), ["k1", "l1", "free"], "heads and unkeyed ones, in order; k2 waits for k1");
    assert!(got_b.windows(2).all(|w| w[0].id < w[1].id), "local ids grow in claim order");
    assert!(a.pending("s", 0, 100).await.unwrap().is_empty(), "everything claimable is claimed by b");
    // b's attempt at k1 fails: the retry goes back to the cluster (b keeps no slot for it). Nobody can claim
    // it before it is due, and k2 still waits behind it; once due, any node takes it, with its attempts.
    let due = now_ms() + 1000;
    b.record_all("s", vec![done(got_b[0].id, Outcome::Retry { next_attempt_ms: due, error: "503".into() })])
        .await
        .unwrap();
    assert_eq!(db.admin_query("SELECT count(*) FROM hookbridge.deliveries WHERE lease_owner IS NOT NULL").await, 2);
    assert!(a.pending("s", 0, 100).await.unwrap().is_empty(), "not before it is due, and k2 waits behind it");
    assert!(b.pending("s", 0, 100).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(u64::try_from(due - now_ms()).unwrap_or(0) + 50)).await;
    let retried = a.pending("s", 0, 100).await.unwrap();
    assert_eq!((ids(&retried), retried[0].attempts), (vec!["k1"], 1), "the other node takes the due retry");
    // An outcome from a node that no longer holds the delivery changes nothing.
    b.record_all("s", vec![done(got_b[0].id, Outcome::Delivered)]).await.unwrap();
    assert!(b.pending("s", 0, 100).await.unwrap().is_empty(), "k1 is a's now; k2 still waits");
    a.record_all("s", vec![Record { attempts: 2, ..done(retried[0].id, Outcome::Delivered) }]).await.unwrap();
    let got_a = a.pending("s", 0, 100).await.unwrap();
    assert_eq!(ids(&got_a), ["k2"]);
    assert_eq!(got_a[0].attempts, 0);
    b.record_all("s", vec![done(got_b[1].id + 100, Outcome::Delivered)]).await.unwrap();
    a.record_all("s", vec![done(got_a[0].id, Outcome::Dead("400 bad request".into()))]).await.unwrap();
    let detail = a.event("k1").await.unwrap().unwrap();
    assert_eq!(detail.summary.status, "delivered");
    assert_eq!(detail.attempts.iter().map(|x| x.outcome.as_str()).collect::<Vec<_>>(), ["retry", "delivered"]);
    assert_eq!(a.event("k2").await.unwrap().unwrap().summary.status, "dead");
    // A first attempt that delivered is implied, as on the log engine: no attempt row.
    let l1 = got_b.iter().find(|r| r.event.id == "l1").unwrap();
    b.record_all("s", vec![done(l1.id, Outcome::Delivered)]).await.unwrap();
    let detail = a.event("l1").await.unwrap().unwrap();
    assert_eq!((detail.summary.status.as_str(), detail.attempts.len()), ("delivered", 0));
    assert_eq!(detail.deliveries[0].attempts, 1);
    let stats = a.sink_stats().await.unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].dead, 1);
    assert!(stats[0].oldest_pending_ms.is_some(), "free is still pending");
    a.close().await;
    b.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_dead_nodes_claims_lapse_and_another_node_takes_them_over() {
    let db = TestDb::new("lease").await;
    let lease = Duration::from_millis(1500);
    let a = Store::connect(&db.spec("a", lease)).await.unwrap();
    let b = Store::connect(&db.spec("b", lease)).await.unwrap();
    let _fa = a.subscribe("s", 16);
    let _fb = b.subscribe("s", 16);
    insert(&a, keyed("k1", Some("K")), &["s"]).await;
    insert(&a, keyed("k2", Some("K")), &["s"]).await;
    let held = a.pending("s", 0, 100).await.unwrap();
    assert_eq!(ids(&held), ["k1"]);
    // A live node keeps its claims past the lease (renewed every third of it).
    tokio::time::sleep(lease * 2).await;
    assert!(b.pending("s", 0, 100).await.unwrap().is_empty(), "renewed claims are not taken over");
    pg(&a).kill();
    let started = std::time::Instant::now();
    let taken = loop {
        let got = b.pending("s", 0, 100).await.unwrap();
        if !got.is_empty() {
            break got;
        }
        assert!(started.elapsed() < lease * 3, "not taken over within the lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ids(&taken), ["k1"], "the dead node's delivery, still at the head of its key");
    b.record_all("s", vec![done(taken[0].id, Outcome::Delivered)]).await.unwrap();
    assert_eq!(ids(&b.pending("s", 0, 100).await.unwrap()), ["k2"]);
    b.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_node_id_is_one_daemons_and_a_clean_stop_gives_the_claims_back() {
    let db = TestDb::new("nodes").await;
    let lease = Duration::from_millis(1200);
    let a = Store::connect(&db.spec("same", lease)).await.unwrap();
    let _fa = a.subscribe("s", 16);
    insert(&a, keyed("e1", None), &["s"]).await;
    assert_eq!(a.pending("s", 0, 10).await.unwrap().len(), 1);
    let e = Store::connect(&db.spec("same", lease)).await.unwrap_err();
    assert!(e.to_string().contains("give each node its own node_id"), "{e}");
    a.close().await;
    // Closed: its id is free at once, and so is what it held.
    let again = Store::connect(&db.spec("same", lease)).await.unwrap();
    let b = Store::connect(&db.spec("other", lease)).await.unwrap();
    let _fb = b.subscribe("s", 16);
    assert_eq!(ids(&b.pending("s", 0, 10).await.unwrap()), ["e1"]);
    again.close().await;
    b.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn gauges_count_the_cluster_and_pruning_keeps_dead_letters() {
    let db = TestDb::new("prune").await;
    let a = Store::connect(&db.spec("a", Duration::from_secs(30))).await.unwrap();
    let b = Store::connect(&db.spec("b", Duration::from_secs(30))).await.unwrap();
    let _fa = a.subscribe("s", 16);
    insert(&a, keyed("ok", None), &["s"]).await;
    insert(&b, keyed("bad", None), &["s"]).await;
    insert(&b, keyed("lost", None), &[]).await;
    a.resync().await.unwrap();
    let (events, bytes, deliveries) = a.gauges().snapshot();
    assert_eq!((events, bytes, deliveries), (2, 4, 2), "both nodes' events");
    assert_eq!(a.gauges().unrouted(), (1, 2));
    let got = a.pending("s", 0, 10).await.unwrap();
    a.record_all("s", vec![done(got[0].id, Outcome::Delivered), done(got[1].id, Outcome::Dead("gone".into()))])
        .await
        .unwrap();
    b.resync().await.unwrap();
    assert_eq!(b.gauges().snapshot(), (0, 0, 0));
    assert_eq!(a.prune(now_ms() + 1, 100).await.unwrap(), 2, "the delivered and the unrouted event");
    assert!(a.event("ok").await.unwrap().is_none());
    assert_eq!(a.event("bad").await.unwrap().unwrap().summary.status, "dead", "dead letters stay");
    a.close().await;
    b.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn handshakes_and_installations_are_shared() {
    let db = TestDb::new("shared").await;
    let a = Store::connect(&db.spec("a", Duration::from_secs(30))).await.unwrap();
    let b = Store::connect(&db.spec("b", Duration::from_secs(30))).await.unwrap();
    a.save_installation("addon", "ws1", "a1", "{\"v\":1}".into()).await.unwrap();
    b.save_installation("addon", "ws1", "a1", "{\"v\":2}".into()).await.unwrap();
    assert_eq!(a.installations().await.unwrap(), [("addon".into(), "ws1".into(), "a1".into(), "{\"v\":2}".into())]);
    for i in 0..(HANDSHAKES_KEPT + 3) {
        a.record_handshake("clockodo", &format!("s{i}"), i).await.unwrap();
    }
    assert_eq!(db.admin_query("SELECT count(*) FROM hookbridge.handshakes").await, HANDSHAKES_KEPT);
    a.ping().await.unwrap();
    a.close().await;
    assert!(matches!(a.ping().await, Err(StoreError::Closed)));
    b.close().await;
    db.drop_db().await;
}

/// The plugins' keys are the cluster's: what one node's plugin host writes, another's reads, and increments
/// and compare-and-swaps racing from two nodes lose nothing (the same checks as on the embedded store).
#[tokio::test(flavor = "multi_thread")]
async fn plugin_keys_are_shared_and_their_atomics_hold_across_nodes() {
    let db = TestDb::new("kv").await;
    let a = Store::connect(&db.spec("a", Duration::from_secs(30))).await.unwrap();
    let b = Store::connect(&db.spec("b", Duration::from_secs(30))).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut on_a = crate::plugin::kv::Kv::open(&dir.path().join("a")).unwrap();
    on_a.share(a.plugin_kv().unwrap(), Duration::from_secs(5));
    let mut on_b = crate::plugin::kv::Kv::open(&dir.path().join("b")).unwrap();
    on_b.share(b.plugin_kv().unwrap(), Duration::from_secs(5));
    tokio::task::spawn_blocking(move || {
        on_a.set("shared", "from-a", b"1", None).unwrap();
        assert_eq!(on_b.get("shared", "from-a").unwrap().as_deref(), Some(&b"1"[..]));
        crate::plugin::kv::tests::atomics_hold(&on_a, &on_b);
        crate::plugin::kv::tests::keys_page(&on_b);
        assert!(on_a.prune().unwrap() >= 1, "the expired keys the checks left");
    })
    .await
    .unwrap();
    assert!(a.plugin_kv().is_some() && Store::open(dir.path()).unwrap().plugin_kv().is_none());
    a.close().await;
    b.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn an_unreachable_database_is_a_clear_error_in_bounded_time() {
    let spec = PostgresSpec {
        url: SecretString::new("postgres://hb:s3cret-pw@127.0.0.1:1/db"),
        pool_size: 1,
        statement_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        lease: Duration::from_secs(3),
        node_id: "n".into(),
        tls: PgTls::Off,
    };
    let started = std::time::Instant::now();
    let e = Store::connect(&spec).await.unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(5), "bounded by connect_timeout");
    assert!(e.starts_with("cluster database error"), "{e}");
    assert!(!e.contains("s3cret-pw"), "the password is never echoed: {e}");
    let bad = PostgresSpec::parse_url("postgres://u:s3cret-pw@h:notaport/db").unwrap_err();
    assert!(!bad.contains("s3cret-pw"), "{bad}");
}

#[tokio::test]
async fn operator_commands_see_the_cluster_and_their_replays_are_claimed() {
    use crate::store::{EventFilter, Operator};
    let db = TestDb::new("operator").await;
    let spec = db.spec("a", Duration::from_secs(30));
    let a = Store::connect(&spec).await.unwrap();
    let b = Store::connect(&db.spec("b", Duration::from_secs(30))).await.unwrap();
    let _fa = a.subscribe("s", 16);
    insert(&a, keyed("e1", Some("K")), &["s"]).await;
    insert(&b, keyed("e2", None), &["s"]).await;
    b.record_handshake("clockodo", "hs", 5).await.unwrap();
    let mut op = Operator::connect(&spec).unwrap();
    let listed = op.events(&EventFilter { limit: 10, ..Default::default() }).unwrap();
    assert_eq!(listed.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["e2", "e1"], "both nodes' events");
    assert!(listed.iter().all(|e| e.status == "pending"));
    assert_eq!(op.handshakes().unwrap()[0].secret, "hs");

    let got = a.pending("s", 0, 10).await.unwrap();
    a.record_all("s", vec![done(got[0].id, Outcome::Dead("410 gone".into())), done(got[1].id, Outcome::Delivered)])
        .await
        .unwrap();
    let dead = op.dead_letters(Some("s")).unwrap();
    assert_eq!(dead.iter().map(|d| d.event_id.as_str()).collect::<Vec<_>>(), ["e1"]);
    assert_eq!(dead[0].last_error.as_deref(), Some("410 gone"));
    assert_eq!(op.retry_dead(&[dead[0].delivery_id, 999_999]).unwrap(), 1, "only dead letters are retried");
    let seqs = op.replay_targets(Some("e2"), 0, 0).unwrap();
    assert_eq!(op.replay(&seqs, None).unwrap(), 1, "to the sinks it was routed to");
    // The retry and the replay are pending deliveries like any other, claimed by a node, marked replay.
    let again = a.pending("s", 0, 10).await.unwrap();
    assert_eq!(ids(&again), ["e1", "e2"]);
    assert!(again.iter().all(|r| r.replay));
    a.record_all("s", vec![done(again[0].id, Outcome::Dead("410 gone".into()))]).await.unwrap();
    let dead = op.dead_letters(None).unwrap();
    assert_eq!(op.purge_dead(&[dead[0].delivery_id]).unwrap(), 1);
    assert!(op.dead_letters(None).unwrap().is_empty());
    let shown = op.event("e1").unwrap().unwrap();
    assert_eq!(
        shown.deliveries.iter().map(|d| d.status.as_str()).collect::<Vec<_>>(),
        ["retried", "purged"],
        "the history stays"
    );
    drop(op);
    a.close().await;
    b.close().await;
    // A database no daemon prepared is refused with the reason.
    let empty = TestDb::new("empty").await;
    let e = Operator::connect(&empty.spec("x", Duration::from_secs(30))).unwrap_err();
    assert!(e.to_string().contains("has a daemon run with this config"), "{e}");
    empty.drop_db().await;
    db.drop_db().await;
}

/// Outcomes recorded at once go out together (one statement for those waiting) and each caller still learns
/// of its own: all recorded, and an outcome for a delivery another node took over is dropped alone.
#[tokio::test(flavor = "multi_thread")]
async fn outcomes_recorded_at_once_share_a_statement_and_keep_their_own_answers() {
    let db = TestDb::new("records").await;
    let a = Store::connect(&db.spec("a", Duration::from_secs(30))).await.unwrap();
    let _f = a.subscribe("s", 16);
    for i in 0..41 {
        insert(&a, keyed(&format!("r{i}"), None), &["s"]).await;
    }
    let mut rows = a.pending("s", 0, 64).await.unwrap();
    assert_eq!(rows.len(), 41);
    let held = rows.pop().unwrap();
    let stranger = held.id + 1000;
    let all = rows.iter().map(|r| a.record_all("s", vec![done(r.id, Outcome::Delivered)]));
    let stray = a.record_all("s", vec![done(stranger, Outcome::Delivered)]);
    let (results, stray) = tokio::join!(futures_util::future::join_all(all), stray);
    assert!(results.iter().all(Result::is_ok) && stray.is_ok());
    let delivered = "SELECT count(*) FROM hookbridge.deliveries WHERE status = 'delivered' AND lease_owner IS NULL";
    assert_eq!(db.admin_query(delivered).await, 40);
    a.close().await;
    assert!(matches!(
        a.record_all("s", vec![done(rows[0].id, Outcome::Delivered)]).await,
        Err(StoreError::Closed) | Ok(())
    ));
    db.drop_db().await;
}
