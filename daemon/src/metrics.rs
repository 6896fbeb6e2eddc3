//! Telemetry: Prometheus metrics (names as constants, labels bounded to configured ids and fixed reasons)
//! and the log line that goes with each observable event, in one place.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::store::SpoolGauges;

/// `hookbridge_requests_total{source,status}`: webhook requests answered, by HTTP status.
pub const REQUESTS_TOTAL: &str = "hookbridge_requests_total";
/// `hookbridge_request_duration_seconds{source}`: time to answer a webhook request.
pub const REQUEST_DURATION: &str = "hookbridge_request_duration_seconds";
/// `hookbridge_rejections_total{source,reason}`: requests refused, by reason.
pub const REJECTIONS_TOTAL: &str = "hookbridge_rejections_total";
/// `hookbridge_events_routed_total{source}`: events accepted with at least one destination.
pub const ROUTED_TOTAL: &str = "hookbridge_events_routed_total";
/// `hookbridge_events_unrouted_total{source}`: events accepted that matched no route.
pub const UNROUTED_TOTAL: &str = "hookbridge_events_unrouted_total";
/// `hookbridge_duplicates_total{source}`: webhooks answered 200 as duplicates (not delivered again).
pub const DUPLICATES_TOTAL: &str = "hookbridge_duplicates_total";
/// `hookbridge_uncertain_answers_total{source}`: 2xx answers to webhooks the provider may not have seen
/// (the connection closed before the answer was written, or it was written after the source's
/// `provider_timeout`): a copy of such an event is a retry, answered as a duplicate.
pub const UNCERTAIN_ANSWERS_TOTAL: &str = "hookbridge_uncertain_answers_total";
/// `hookbridge_dead_letters{sink}`: dead letters waiting for an operator.
pub const DEAD_LETTERS: &str = "hookbridge_dead_letters";
/// `hookbridge_oldest_pending_age_seconds{sink}`: age of the oldest event with a pending delivery.
pub const OLDEST_PENDING_AGE: &str = "hookbridge_oldest_pending_age_seconds";
/// `hookbridge_sink_connected{sink}`: 1 while a broker sink (`kafka`, `amqp`) is connected, else 0.
pub const SINK_CONNECTED: &str = "hookbridge_sink_connected";
/// `hookbridge_plugin_invocations_total{plugin}`: plugin runs.
pub const PLUGIN_INVOCATIONS: &str = "hookbridge_plugin_invocations_total";
/// `hookbridge_plugin_failures_total{plugin,kind}`: failed runs by kind (`trap`, `timeout`, `memory`, `fuel`,
/// `retryable`, `permanent`, `instantiate`, ...).
pub const PLUGIN_FAILURES: &str = "hookbridge_plugin_failures_total";
/// `hookbridge_plugin_duration_seconds{plugin}`: time of one run, instantiation included.
pub const PLUGIN_DURATION: &str = "hookbridge_plugin_duration_seconds";
/// `hookbridge_plugin_fuel_used_total{plugin}`: fuel the runs used.
pub const PLUGIN_FUEL: &str = "hookbridge_plugin_fuel_used_total";
/// `hookbridge_config_reloads_total{result}`: configuration reloads, `ok` or `error` (the old config stays).
pub const RELOADS_TOTAL: &str = "hookbridge_config_reloads_total";
/// `hookbridge_secret_matches_total{source,secret}`: verified requests by which configured secret matched
/// (`secret` is its position in the source's `secrets`, from 0): shows when an old secret stops being used.
pub const SECRET_MATCHES_TOTAL: &str = "hookbridge_secret_matches_total";
/// `hookbridge_handshakes_total{source}`: Clockodo validation handshakes received.
pub const HANDSHAKES_TOTAL: &str = "hookbridge_handshakes_total";
/// `hookbridge_route_predicate_errors_total{route}`: `when` predicates that failed to evaluate.
pub const PREDICATE_ERRORS_TOTAL: &str = "hookbridge_route_predicate_errors_total";
/// `hookbridge_deliveries_total{sink,outcome}`: delivery attempts by outcome (`delivered`, `retry`, `dead`).
pub const DELIVERIES_TOTAL: &str = "hookbridge_deliveries_total";
/// `hookbridge_delivery_duration_seconds{sink}`: time of one delivery attempt.
pub const DELIVERY_DURATION: &str = "hookbridge_delivery_duration_seconds";
/// `hookbridge_event_latency_seconds{sink}`: from receiving a webhook to the sink's acknowledgement of its
/// first delivery (retries included, replays not).
pub const EVENT_LATENCY: &str = "hookbridge_event_latency_seconds";
/// `hookbridge_spool_pending_events`: events with unfinished deliveries.
pub const SPOOL_EVENTS: &str = "hookbridge_spool_pending_events";
/// `hookbridge_spool_pending_bytes`: body bytes of those events.
pub const SPOOL_BYTES: &str = "hookbridge_spool_pending_bytes";
/// `hookbridge_spool_pending_deliveries`: unfinished deliveries.
pub const SPOOL_DELIVERIES: &str = "hookbridge_spool_pending_deliveries";

/// `hookbridge_connections_open{listener}`: open connections per listener (`webhook`, `internal`, `admin`).
pub const CONNECTIONS_OPEN: &str = "hookbridge_connections_open";
/// `hookbridge_connection_errors_total{listener,reason}`: connections ended by an error (`header_timeout`,
/// `header_too_large`, `malformed_request`, `incomplete_request`, `tls_handshake`, `tls_handshake_timeout`,
/// `accept`, `io`).
pub const CONNECTION_ERRORS_TOTAL: &str = "hookbridge_connection_errors_total";
/// `hookbridge_connection_limit_waits_total{listener}`: times a listener stopped accepting because
/// `max_connections` were open.
pub const CONNECTION_LIMIT_TOTAL: &str = "hookbridge_connection_limit_waits_total";

/// Label used for requests that matched no source.
pub const NO_SOURCE: &str = "-";

/// The children of one source's webhook-path metrics, resolved at first use and then kept, so that an
/// accepted webhook does not look its labels up again (a lookup hashes the label values under a lock). Kept
/// in the source's settings, which belong to one daemon: a reload starts with an empty cache.
#[derive(Debug, Clone, Default)]
pub struct SourceMetrics {
    status_200: OnceLock<IntCounter>,
    status_202: OnceLock<IntCounter>,
    duration: OnceLock<Histogram>,
    routed: OnceLock<IntCounter>,
    first_secret: OnceLock<IntCounter>,
}

/// The children of one sink's delivery metrics, resolved at first use (see [`SourceMetrics`]).
#[derive(Debug, Clone, Default)]
pub struct SinkMetrics {
    delivered: OnceLock<IntCounter>,
    duration: OnceLock<Histogram>,
    latency: OnceLock<Histogram>,
}

/// The daemon's metrics (one registry per bridge, so embedders can run several).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    rejections: IntCounterVec,
    routed: IntCounterVec,
    unrouted: IntCounterVec,
    handshakes: IntCounterVec,
    reloads: IntCounterVec,
    secret_matches: IntCounterVec,
    duplicates: IntCounterVec,
    uncertain_answers: IntCounterVec,
    dead_letters: IntGaugeVec,
    oldest_pending: prometheus::GaugeVec,
    sink_connected: IntGaugeVec,
    plugin_invocations: IntCounterVec,
    plugin_failures: IntCounterVec,
    plugin_duration: HistogramVec,
    plugin_fuel: IntCounterVec,
    predicate_errors: IntCounterVec,
    deliveries: IntCounterVec,
    delivery_duration: HistogramVec,
    event_latency: HistogramVec,
    spool_events: IntGauge,
    spool_bytes: IntGauge,
    spool_deliveries: IntGauge,
    connections_open: IntGaugeVec,
    connection_errors: IntCounterVec,
    connection_limit: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<HistogramVec, prometheus::Error> {
    let buckets = vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let g = IntGauge::new(name, help)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        Ok(Metrics {
            requests: counter(
                &r,
                REQUESTS_TOTAL,
                "Webhook requests answered, by source and HTTP status.",
                &["source", "status"],
            )?,
            request_duration: histogram(&r, REQUEST_DURATION, "Time to answer a webhook request.", &["source"])?,
            rejections: counter(
                &r,
                REJECTIONS_TOTAL,
                "Webhook requests refused, by source and reason.",
                &["source", "reason"],
            )?,
            routed: counter(&r, ROUTED_TOTAL, "Events accepted and routed to at least one sink.", &["source"])?,
            unrouted: counter(&r, UNROUTED_TOTAL, "Events accepted that matched no route.", &["source"])?,
            handshakes: counter(&r, HANDSHAKES_TOTAL, "Clockodo validation handshakes received.", &["source"])?,
            secret_matches: counter(
                &r,
                SECRET_MATCHES_TOTAL,
                "Verified requests by the position of the secret that matched.",
                &["source", "secret"],
            )?,
            reloads: counter(&r, RELOADS_TOTAL, "Configuration reloads by result.", &["result"])?,
            duplicates: counter(
                &r,
                DUPLICATES_TOTAL,
                "Webhooks answered as duplicates and not delivered again.",
                &["source"],
            )?,
            uncertain_answers: counter(
                &r,
                UNCERTAIN_ANSWERS_TOTAL,
                "Webhook answers the provider may not have seen (cut, or later than provider_timeout).",
                &["source"],
            )?,
            dead_letters: {
                let g = IntGaugeVec::new(Opts::new(DEAD_LETTERS, "Dead letters waiting for an operator."), &["sink"])?;
                r.register(Box::new(g.clone()))?;
                g
            },
            oldest_pending: {
                let g = prometheus::GaugeVec::new(
                    Opts::new(OLDEST_PENDING_AGE, "Age of the oldest event with a pending delivery, per sink."),
                    &["sink"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            sink_connected: {
                let g = IntGaugeVec::new(
                    Opts::new(SINK_CONNECTED, "1 while a broker sink is connected to its broker, else 0."),
                    &["sink"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            plugin_invocations: counter(&r, PLUGIN_INVOCATIONS, "Plugin runs.", &["plugin"])?,
            plugin_failures: counter(&r, PLUGIN_FAILURES, "Failed plugin runs, by kind.", &["plugin", "kind"])?,
            plugin_duration: {
                let buckets = vec![
                    0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                ];
                let h = HistogramVec::new(
                    HistogramOpts::new(PLUGIN_DURATION, "Time of one plugin run, instantiation included.")
                        .buckets(buckets),
                    &["plugin"],
                )?;
                r.register(Box::new(h.clone()))?;
                h
            },
            plugin_fuel: counter(&r, PLUGIN_FUEL, "Fuel used by plugin runs.", &["plugin"])?,
            predicate_errors: counter(
                &r,
                PREDICATE_ERRORS_TOTAL,
                "Route predicates that failed to evaluate.",
                &["route"],
            )?,
            deliveries: counter(&r, DELIVERIES_TOTAL, "Delivery attempts, by sink and outcome.", &["sink", "outcome"])?,
            delivery_duration: histogram(&r, DELIVERY_DURATION, "Time of one delivery attempt.", &["sink"])?,
            event_latency: {
                let buckets = vec![
                    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0,
                    3600.0,
                ];
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        EVENT_LATENCY,
                        "From receiving a webhook to its first delivery's acknowledgement.",
                    )
                    .buckets(buckets),
                    &["sink"],
                )?;
                r.register(Box::new(h.clone()))?;
                h
            },
            spool_events: gauge(&r, SPOOL_EVENTS, "Events with unfinished deliveries.")?,
            spool_bytes: gauge(&r, SPOOL_BYTES, "Body bytes of events with unfinished deliveries.")?,
            spool_deliveries: gauge(&r, SPOOL_DELIVERIES, "Unfinished deliveries.")?,
            connections_open: {
                let g = IntGaugeVec::new(Opts::new(CONNECTIONS_OPEN, "Open connections per listener."), &["listener"])?;
                r.register(Box::new(g.clone()))?;
                g
            },
            connection_errors: counter(
                &r,
                CONNECTION_ERRORS_TOTAL,
                "Connections ended by an error, by listener and reason.",
                &["listener", "reason"],
            )?,
            connection_limit: counter(
                &r,
                CONNECTION_LIMIT_TOTAL,
                "Times a listener stopped accepting because max_connections were open.",
                &["listener"],
            )?,
            registry: r,
        })
    }

    /// Prometheus text exposition, with spool gauges read now. `sinks` lists every configured sink with its
    /// dead letters and oldest pending receive time (ms), so that a sink with none shows 0; `connections`
    /// the connection state of the sinks that keep one.
    pub fn render(
        &self,
        spool: &SpoolGauges,
        sinks: &[(String, i64, Option<i64>)],
        connections: &[(String, crate::sinks::Connection)],
    ) -> String {
        let now = crate::event::now_ms();
        for (sink, c) in connections {
            self.sink_connected.with_label_values(&[sink.as_str()]).set(i64::from(c.connected));
        }
        for (sink, dead, oldest) in sinks {
            self.dead_letters.with_label_values(&[sink.as_str()]).set(*dead);
            let age = oldest.map(|t| (now - t).max(0) as f64 / 1000.0).unwrap_or(0.0);
            self.oldest_pending.with_label_values(&[sink.as_str()]).set(age);
        }
        let (events, bytes, deliveries) = spool.snapshot();
        self.spool_events.set(events as i64);
        self.spool_bytes.set(bytes as i64);
        self.spool_deliveries.set(deliveries as i64);
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// A webhook request was answered (one that matched no source: those to a configured source go through
    /// [`Metrics::source_request`]).
    pub fn request(&self, source: &str, status: u16, seconds: f64) {
        self.requests.with_label_values(&[source, status_label(status)]).inc();
        self.request_duration.with_label_values(&[source]).observe(seconds);
    }

    /// A webhook request to a configured source was answered ([`Metrics::request`] through the source's
    /// cached children).
    pub fn source_request(&self, hot: &SourceMetrics, source: &str, status: u16, seconds: f64) {
        let requests = |cell: &OnceLock<IntCounter>, label| {
            cell.get_or_init(|| self.requests.with_label_values(&[source, label])).inc();
        };
        match status {
            200 => requests(&hot.status_200, "200"),
            202 => requests(&hot.status_202, "202"),
            _ => self.requests.with_label_values(&[source, status_label(status)]).inc(),
        }
        hot.duration.get_or_init(|| self.request_duration.with_label_values(&[source])).observe(seconds);
    }

    /// A webhook request was refused.
    pub fn rejected(&self, source: &str, reason: &str) {
        tracing::info!(source, reason, "webhook rejected");
        self.rejections.with_label_values(&[source, reason]).inc();
    }

    /// An event was accepted.
    pub fn accepted(&self, hot: &SourceMetrics, source: &str, event_type: &str, id: &str, sinks: &[String]) {
        if sinks.is_empty() {
            tracing::info!(source, event_type, id, "event accepted, unrouted");
            self.unrouted.with_label_values(&[source]).inc();
        } else {
            tracing::debug!(source, event_type, id, sinks = ?sinks, "event accepted");
            hot.routed.get_or_init(|| self.routed.with_label_values(&[source])).inc();
        }
    }

    /// A request was verified with the source's `index`-th secret.
    pub fn secret_matched(&self, hot: &SourceMetrics, source: &str, index: usize) {
        const LABELS: [&str; 8] = ["0", "1", "2", "3", "4", "5", "6", "7"];
        if index == 0 {
            hot.first_secret.get_or_init(|| self.secret_matches.with_label_values(&[source, "0"])).inc();
            return;
        }
        let label = LABELS.get(index).copied().unwrap_or("8+");
        self.secret_matches.with_label_values(&[source, label]).inc();
    }

    /// A configuration reload ended (`ok` or `error`); the caller logs the details.
    pub fn reload(&self, result: &str) {
        self.reloads.with_label_values(&[result]).inc();
    }

    /// A webhook was a duplicate of an event already stored.
    pub fn duplicate(&self, source: &str, event_type: &str, original: &str) {
        tracing::info!(source, event_type, original, "duplicate webhook acknowledged, not delivered again");
        self.duplicates.with_label_values(&[source]).inc();
    }

    /// The answer to a stored webhook was cut or late: the provider may retry it.
    pub fn uncertain_answer(&self, source: &str) {
        tracing::info!(
            source,
            "a webhook's answer may not have reached the provider: a retry of it will be a duplicate"
        );
        self.uncertain_answers.with_label_values(&[source]).inc();
    }

    /// A Clockodo handshake arrived (its secret is stored, never logged).
    pub fn handshake(&self, source: &str) {
        tracing::warn!(
            source,
            "Clockodo validation handshake received: run `hookbridge handshakes --config <file>` to read the secret and enter it in Clockodo"
        );
        self.handshakes.with_label_values(&[source]).inc();
    }

    /// A route predicate failed to evaluate.
    pub fn predicate_error(&self, route: &str, error: &str) {
        tracing::warn!(route, error, "route predicate failed; treated as no match");
        self.predicate_errors.with_label_values(&[route]).inc();
    }

    /// A plugin ran.
    pub fn plugin_invocation(&self, plugin: &str, seconds: f64, fuel: u64, failure: Option<&crate::plugin::Failure>) {
        self.plugin_invocations.with_label_values(&[plugin]).inc();
        self.plugin_duration.with_label_values(&[plugin]).observe(seconds);
        self.plugin_fuel.with_label_values(&[plugin]).inc_by(fuel);
        if let Some(f) = failure {
            self.plugin_failures.with_label_values(&[plugin, f.kind()]).inc();
        }
    }

    /// An event's first delivery to `sink` succeeded `seconds` after the webhook was received.
    pub fn event_latency(&self, hot: &SinkMetrics, sink: &str, seconds: f64) {
        hot.latency.get_or_init(|| self.event_latency.with_label_values(&[sink])).observe(seconds);
    }

    /// A delivery attempt ended.
    pub fn delivery(&self, hot: &SinkMetrics, sink: &str, outcome: &str, seconds: f64) {
        if outcome == "delivered" {
            hot.delivered.get_or_init(|| self.deliveries.with_label_values(&[sink, outcome])).inc();
        } else {
            self.deliveries.with_label_values(&[sink, outcome]).inc();
        }
        hot.duration.get_or_init(|| self.delivery_duration.with_label_values(&[sink])).observe(seconds);
    }
}

impl Metrics {
    /// A connection was accepted on `listener`.
    pub fn connection_opened(&self, listener: &str) {
        self.connections_open.with_label_values(&[listener]).inc();
    }

    /// A connection of `listener` closed.
    pub fn connection_closed(&self, listener: &str) {
        self.connections_open.with_label_values(&[listener]).dec();
    }

    /// A connection of `listener` ended with an error (the caller logs it at debug level: these come from
    /// clients, at any rate).
    pub fn connection_error(&self, listener: &str, reason: &str) {
        self.connection_errors.with_label_values(&[listener, reason]).inc();
    }

    /// `listener` has `max_connections` open and waits before accepting more.
    pub fn connection_limit_reached(&self, listener: &str) {
        self.connection_limit.with_label_values(&[listener]).inc();
    }
}

/// Status codes as static labels (bounded set).
fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        202 => "202",
        400 => "400",
        401 => "401",
        404 => "404",
        405 => "405",
        408 => "408",
        413 => "413",
        431 => "431",
        500 => "500",
        503 => "503",
        s if s < 300 => "2xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}
