//! Every default and limit in one place, so that the README's config reference and the code agree.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::config::units::{HumanDuration, HumanSize};

pub(crate) fn default_listen() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 8080))
}
pub(crate) fn default_admin_listen() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 8081))
}
pub(crate) fn default_internal_listen() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 8082))
}
pub(crate) fn default_body_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
pub(crate) fn default_min_body_rate() -> HumanSize {
    HumanSize(1024)
}
pub(crate) fn default_max_unverified() -> usize {
    64
}
pub(crate) fn default_max_connections() -> usize {
    1024
}
pub(crate) fn default_header_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
pub(crate) fn default_max_header_size() -> HumanSize {
    HumanSize(16 * 1024)
}
pub(crate) fn default_max_body_size() -> HumanSize {
    HumanSize(1 << 20)
}
pub(crate) fn default_request_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
pub(crate) fn default_max_concurrency() -> usize {
    512
}
pub(crate) fn default_shutdown_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
pub(crate) fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}
pub(crate) fn default_max_pending_events() -> u64 {
    100_000
}
pub(crate) fn default_max_pending_bytes() -> HumanSize {
    HumanSize(1 << 30)
}
pub(crate) fn default_max_unrouted_events() -> u64 {
    10_000
}
pub(crate) fn default_max_unrouted_bytes() -> HumanSize {
    HumanSize(64 << 20)
}
pub(crate) fn default_retention() -> HumanDuration {
    HumanDuration(Duration::from_secs(7 * 86_400))
}
pub(crate) fn default_initial_backoff() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
pub(crate) fn default_max_backoff() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}
/// How long a provider is assumed to wait for an answer (`provider_timeout`). Clockify publishes no figure
/// and asks for an answer within a few seconds; a longer assumption only makes a slow answer's retry a
/// second delivery, a shorter one could make a distinct event a duplicate.
pub const DEFAULT_PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `provider_timeout` accepted.
pub const MAX_PROVIDER_TIMEOUT: Duration = Duration::from_secs(3600);
pub(crate) fn default_standard_tolerance() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
pub(crate) fn default_max_age() -> HumanDuration {
    HumanDuration(Duration::from_secs(72 * 3600))
}
pub(crate) fn default_pg_pool_size() -> usize {
    8
}
pub(crate) fn default_pg_statement_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
pub(crate) fn default_pg_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
pub(crate) fn default_pg_lease() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
pub(crate) fn default_dedup_window() -> HumanDuration {
    HumanDuration(Duration::from_secs(73 * 3600))
}
pub(crate) fn default_broker_max_backoff() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
pub(crate) fn default_broker_in_flight() -> usize {
    256
}
pub(crate) fn default_kafka_message_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
pub(crate) fn default_kafka_queue_max_messages() -> u32 {
    100_000
}
pub(crate) fn default_kafka_linger() -> HumanDuration {
    HumanDuration(Duration::from_millis(5))
}
pub(crate) fn default_amqp_exchange_type() -> String {
    "topic".to_owned()
}
pub(crate) fn default_plugin_memory() -> HumanSize {
    HumanSize(64 * 1024 * 1024)
}
pub(crate) fn default_plugin_time() -> HumanDuration {
    HumanDuration(Duration::from_millis(100))
}
pub(crate) fn default_plugin_http_rate() -> u32 {
    20
}
pub(crate) fn default_plugin_in_flight() -> usize {
    4
}
/// Largest `memory_limit` a plugin may have (the pooling allocator reserves this much address space per slot).
pub const PLUGIN_MAX_MEMORY: u64 = 1024 * 1024 * 1024;
pub(crate) fn yes() -> bool {
    true
}
pub(crate) fn default_sink_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
pub(crate) fn default_max_in_flight() -> usize {
    8
}
pub(crate) fn default_file_in_flight() -> usize {
    64
}

/// Seconds a client is told to wait (`Retry-After`) when the spool is full or the store fails.
pub const RETRY_AFTER_SECS: u64 = 15;
/// Operations the spool writer folds into one transaction (one fsync) at most.
pub const GROUP_COMMIT_MAX: usize = 512;
/// Under load, how long the spool writer waits for more operations to join a commit.
pub const GROUP_COMMIT_WINDOW: Duration = Duration::from_micros(500);
/// Capacity of the queue in front of the spool writer.
pub const WRITER_QUEUE: usize = 8192;
/// Committed batches waiting for the spool's WAL sync at most (the writer waits when the syncer is this far
/// behind).
pub const SYNC_QUEUE: usize = 64;
/// Deliveries a broker sink (kafka, amqp) takes in one batch at most: published together, their outcomes
/// recorded in one spool operation.
pub const BROKER_BATCH_MAX: usize = 64;
/// Lines the file sink writes per fsync at most.
pub const FILE_BATCH_MAX: usize = 512;
/// How long the file sink lets lines gather before it writes and fsyncs a batch that started alone.
pub const FILE_BATCH_WINDOW: Duration = Duration::from_millis(2);
/// Clockodo handshakes kept per source (they are unauthenticated, so the table is bounded).
pub const HANDSHAKES_KEPT: i64 = 20;
/// Longest accepted event type name.
pub const MAX_EVENT_TYPE_LEN: usize = 128;
/// Events pruned per writer transaction at most (pruning a long backlog never holds the writer for long).
pub const PRUNE_BATCH: usize = 2000;
/// How often finished events past retention are pruned.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(600);
/// How often a dispatcher reads the spool even when its feed is quiet (to pick up replays and dead-letter
/// retries made by an operator from another process), and how often the spool gauges are recounted.
pub const DISPATCH_POLL: Duration = Duration::from_secs(1);
/// How often at most the per-sink gauges of `/metrics` (dead letters, oldest pending) are read from the
/// spool (less often when the read is slow: it never takes more than a twentieth of the time).
pub const SINK_STATS_INTERVAL: Duration = Duration::from_secs(2);
/// Deliveries the spool writer can hand to one dispatcher ahead of it; past it the dispatcher reads the
/// spool instead. Memory per sink is bounded by (this + 256 + max_in_flight) bodies.
pub const FEED_CAPACITY: usize = 256;

/// How often at most a condition that repeats with every request (a full disk, a stopped spool) is logged.
pub const REPEATED_ERROR_LOG: Duration = Duration::from_secs(10);

/// Lets one log line through per interval for a condition that repeats (every webhook refused on a full
/// disk would otherwise be a line each, into a journal that may share that disk), and counts the others.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    /// When the last line went out, and how many were held back since.
    state: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
}

impl Throttle {
    /// One line per `every` at most.
    pub const fn new(every: Duration) -> Self {
        Throttle { every, state: std::sync::Mutex::new(None) }
    }

    /// Whether a line may go out at `now`: `Some(n)` with the `n` held back since the last one, `None` to
    /// hold this one back.
    pub fn due(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match *state {
            Some((last, ref mut held)) if now.duration_since(last) < self.every => {
                *held += 1;
                None
            }
            Some((_, held)) => {
                *state = Some((now, 0));
                Some(held)
            }
            None => {
                *state = Some((now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod throttle_tests {
    use super::*;
    use std::time::Instant;

    /// The first line goes out, the next ones within the interval are counted, and the first after it
    /// says how many were held back.
    #[test]
    fn a_repeated_line_goes_out_once_per_interval_with_the_count_of_the_others() {
        let t = Throttle::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(t.due(start), Some(0));
        assert_eq!(t.due(start + Duration::from_secs(1)), None);
        assert_eq!(t.due(start + Duration::from_secs(9)), None);
        assert_eq!(t.due(start + Duration::from_secs(10)), Some(2));
        assert_eq!(t.due(start + Duration::from_secs(11)), None);
        assert_eq!(t.due(start + Duration::from_secs(30)), Some(1));
    }
}
