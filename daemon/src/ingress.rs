//! Ingress: the axum router. Webhook paths (one per source), health, readiness and metrics. A webhook is
//! read with a size bound, verified, classified, routed and committed to the spool before it is answered.
//!
//! Status codes: 200 accepted (or unrouted, or a Clockodo handshake); 400 bad JSON or event type; 401
//! verification failed; 404 unknown path; 405 not POST; 408 body not received in time; 413 body too large;
//! 503 (with `Retry-After`) spool full, store failure, too many concurrent requests, shutting down.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::classify::{classify, visible_headers};
use crate::config::Source;
use crate::event::{Event, now_ms};
use crate::limits::RETRY_AFTER_SECS;
use crate::metrics::{Metrics, NO_SOURCE};
use crate::route::{RouteInput, RouteTable};
use crate::store::{Inserted, Store};
use crate::verify::{Scheme, handshake_secret, verify};

/// What the handlers share.
#[derive(Debug)]
pub struct Shared {
    /// What a config reload replaces, swapped atomically: a request uses one version from start to end.
    pub settings: ArcSwap<Settings>,
    /// The spool.
    pub store: Store,
    /// Clockify add-on installations.
    pub installations: crate::addon::Installations,
    /// Telemetry.
    pub metrics: Metrics,
    /// Webhook requests in progress.
    pub concurrency: Semaphore,
    /// Set once shutdown begins (readiness turns 503).
    pub shutting_down: AtomicBool,
    /// When readiness last proved the spool writable.
    pub last_ready: std::sync::Mutex<Option<Instant>>,
    /// Live channels that plugins publish to (`GET /live/<channel>`).
    pub live: crate::live::Live,
    /// Running sinks by id (for their connection state in `/readyz` and `/metrics`).
    pub sinks: std::sync::Mutex<std::collections::BTreeMap<String, Arc<dyn crate::sinks::Sink>>>,
}

impl Shared {
    /// Connection state of every sink that keeps a connection, by sink id.
    pub fn connections(&self) -> Vec<(String, crate::sinks::Connection)> {
        let sinks = self.sinks.lock().map(|s| s.clone()).unwrap_or_default();
        sinks.into_iter().filter_map(|(id, s)| s.connection().map(|c| (id, c))).collect()
    }
}

/// The reloadable part of the ingress.
#[derive(Debug)]
pub struct Settings {
    /// Sources by URL path.
    pub sources: HashMap<String, Source>,
    /// Compiled routes.
    pub routes: RouteTable,
    /// Largest body.
    pub max_body: u64,
    /// Per-request time limit.
    pub request_timeout: Duration,
    /// Configured sink ids (for per-sink gauges).
    pub sink_ids: Vec<String>,
    /// The routes as configured (for add-on manifests).
    pub route_configs: Vec<crate::config::types::RouteConfig>,
    /// Dedup window (`None`: dedup off).
    pub dedup_window: Option<Duration>,
    /// Spool bounds.
    pub max_pending_events: u64,
    /// Spool bounds.
    pub max_pending_bytes: u64,
}

/// The router: `/healthz`, `/readyz`, `/metrics`, and every source's path (everything else is 404).
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/live/{channel}", get(live))
        .route("/dashboard", get(dashboard))
        .fallback(webhook)
        .with_state(shared)
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    if s.shutting_down.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "shutting down"}))).into_response();
    }
    let (events, bytes, deliveries) = s.store.gauges().snapshot();
    // A probe makes a durable write, at most once a second however often it is called.
    let recent = !s.store.is_closed()
        && s.last_ready.lock().ok().and_then(|t| *t).is_some_and(|t| t.elapsed() < Duration::from_secs(1));
    let ping = async {
        if recent {
            return Ok(Ok(()));
        }
        let r = tokio::time::timeout(Duration::from_secs(2), s.store.ping()).await;
        if matches!(r, Ok(Ok(())))
            && let Ok(mut t) = s.last_ready.lock()
        {
            *t = Some(Instant::now());
        }
        r
    };
    match ping.await {
        // Ready means ready to accept webhooks: a broker that is away does not change that (events wait in
        // the spool), so connection states are reported, not judged.
        Ok(Ok(())) => axum::Json(json!({
            "status": "ready",
            "spool": {"pending_events": events, "pending_bytes": bytes, "pending_deliveries": deliveries},
            "sinks": s.connections().into_iter().map(|(id, c)| (id, json!(c))).collect::<serde_json::Map<_, _>>(),
        }))
        .into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "readiness: spool not writable");
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "spool not writable"}))).into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "spool too slow"}))).into_response(),
    }
}

/// The live dashboard page: static HTML that follows `/live/dashboard` (what the dashboard plugin publishes).
async fn dashboard() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")],
        include_str!("../assets/dashboard.html"),
    )
        .into_response()
}

async fn live(State(s): State<Arc<Shared>>, axum::extract::Path(channel): axum::extract::Path<String>) -> Response {
    if !crate::live::valid_channel(&channel) {
        return error(StatusCode::NOT_FOUND, "no such channel");
    }
    s.live.stream(&channel).into_response()
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let settings = s.settings.load_full();
    let mut sinks: Vec<(String, i64, Option<i64>)> = settings.sink_ids.iter().map(|id| (id.clone(), 0, None)).collect();
    match s.store.sink_stats().await {
        Ok(stats) => {
            for st in stats {
                if let Some(row) = sinks.iter_mut().find(|(id, _, _)| *id == st.sink) {
                    *row = (st.sink, st.dead, st.oldest_pending_ms);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read sink statistics for /metrics"),
    }
    let body = s.metrics.render(s.store.gauges(), &sinks, &s.connections());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"error": message}))).into_response()
}

fn unavailable(message: &str) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, message);
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    r
}

/// The source serving `path`: an exact path, or a path under a `clockify-addon` source's path (then with
/// the rest of the path, e.g. `/webhook/NEW_TIME_ENTRY`).
fn find_source<'a>(cfg: &'a Settings, path: &str) -> Option<(&'a Source, Option<String>)> {
    if let Some(source) = cfg.sources.get(path)
        && !matches!(source.scheme, Scheme::ClockifyAddon(_))
    {
        return Some((source, None));
    }
    cfg.sources.values().filter(|s| matches!(s.scheme, Scheme::ClockifyAddon(_))).find_map(|s| {
        let rest = path.strip_prefix(s.path.as_str())?;
        rest.starts_with('/').then(|| (s, Some(rest.to_owned())))
    })
}

async fn webhook(State(s): State<Arc<Shared>>, request: Request) -> Response {
    let started = Instant::now();
    let settings = s.settings.load_full();
    let Some((source, sub)) = find_source(&settings, request.uri().path()) else {
        s.metrics.request(NO_SOURCE, 404, started.elapsed().as_secs_f64());
        return error(StatusCode::NOT_FOUND, "no webhook source at this path");
    };
    let response = handle(&s, &settings, source, sub.as_deref(), request).await;
    s.metrics.request(&source.id, response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

async fn handle(s: &Shared, cfg: &Settings, source: &Source, sub: Option<&str>, request: Request) -> Response {
    if let (Scheme::ClockifyAddon(a), Some("/manifest")) = (&source.scheme, sub) {
        if request.method() != Method::GET {
            let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "the manifest is read with GET");
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
            return r;
        }
        return axum::Json(crate::addon::manifest(&source.id, a, &cfg.route_configs)).into_response();
    }
    if request.method() != Method::POST {
        let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "webhooks are POSTed");
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    if s.shutting_down.load(Ordering::Relaxed) {
        s.metrics.rejected(&source.id, "shutting_down");
        return unavailable("shutting down");
    }
    let Ok(_permit) = s.concurrency.try_acquire() else {
        s.metrics.rejected(&source.id, "overloaded");
        return unavailable("too many concurrent requests");
    };
    let (parts, body) = request.into_parts();
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cfg.max_body) {
        s.metrics.rejected(&source.id, "body_too_large");
        return error(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
    }
    let body = match tokio::time::timeout(cfg.request_timeout, read_body(body, cfg.max_body)).await {
        Ok(Ok(b)) => b,
        Ok(Err(BodyError::TooLarge)) => {
            s.metrics.rejected(&source.id, "body_too_large");
            return error(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
        }
        Ok(Err(BodyError::Io)) => {
            s.metrics.rejected(&source.id, "body_read_error");
            return error(StatusCode::BAD_REQUEST, "could not read the body");
        }
        Err(_) => {
            s.metrics.rejected(&source.id, "timeout");
            return error(StatusCode::REQUEST_TIMEOUT, "body not received in time");
        }
    };
    match tokio::time::timeout(
        cfg.request_timeout,
        accept(s, cfg, source, (parts.uri.path(), sub), &parts.headers, parts.uri.query(), body),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => {
            // The event may still be committed: the provider retries and gets a duplicate, never a loss.
            s.metrics.rejected(&source.id, "timeout");
            unavailable("timed out")
        }
    }
}

enum BodyError {
    TooLarge,
    Io,
}

async fn read_body(body: Body, limit: u64) -> Result<Bytes, BodyError> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Io),
    }
}

/// Verify, classify, route, spool. Answers 2xx only after the spool commit.
async fn accept(
    s: &Shared,
    cfg: &Settings,
    source: &Source,
    (path, sub): (&str, Option<&str>),
    headers: &HeaderMap,
    query: Option<&str>,
    body: Bytes,
) -> Response {
    let mut paused = false;
    if let Scheme::ClockifyAddon(a) = &source.scheme {
        use crate::addon::Outcome;
        let req =
            crate::addon::Request { source: &source.id, scheme: a, path, sub: sub.unwrap_or(""), headers, body: &body };
        match crate::addon::check(&s.store, &s.installations, req).await {
            Outcome::Webhook { paused: p } => paused = p,
            Outcome::Lifecycle(what) => return axum::Json(json!({"status": what})).into_response(),
            Outcome::Unauthorized(reason) => {
                s.metrics.rejected(&source.id, reason);
                return error(StatusCode::UNAUTHORIZED, "verification failed");
            }
            Outcome::BadRequest(m) => {
                s.metrics.rejected(&source.id, "invalid_lifecycle_body");
                return error(StatusCode::BAD_REQUEST, &m);
            }
            Outcome::NotFound => return error(StatusCode::NOT_FOUND, "no such add-on path"),
            Outcome::Unavailable(e) => {
                tracing::error!(source = %source.id, error = %e, "cannot store the add-on installation");
                s.metrics.rejected(&source.id, "store_error");
                return unavailable("cannot store the installation; retry later");
            }
        }
    }
    if let Scheme::Clockodo { .. } = source.scheme
        && let Some(secret) = handshake_secret(query, &body)
    {
        return match s.store.record_handshake(&source.id, &secret, now_ms()).await {
            Ok(()) => {
                s.metrics.handshake(&source.id);
                axum::Json(json!({"status": "handshake received"})).into_response()
            }
            Err(e) => {
                tracing::error!(source = %source.id, error = %e, "cannot store Clockodo handshake");
                unavailable("cannot store the handshake")
            }
        };
    }
    if !matches!(source.scheme, Scheme::ClockifyAddon(_)) {
        match verify(&source.scheme, headers, &body) {
            Ok(Some(secret)) => s.metrics.secret_matched(&source.id, secret),
            Ok(None) => {}
            Err(e) => {
                s.metrics.rejected(&source.id, e.reason());
                return error(StatusCode::UNAUTHORIZED, "verification failed");
            }
        }
    }
    let classified = match classify(&source.scheme, headers, &body) {
        Ok(c) => c,
        Err(e) => {
            s.metrics.rejected(&source.id, e.reason());
            return error(StatusCode::BAD_REQUEST, &e.to_string());
        }
    };
    let details = || {
        let body = match &classified.body {
            Some(parsed) => parsed.clone(),
            // Valid JSON: classification checked it.
            None => serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        };
        (visible_headers(&source.scheme, headers), body)
    };
    let mut decision =
        cfg.routes.route(&RouteInput { source: &source.id, event: &classified.event_type, details: &details });
    for (route, err) in &decision.predicate_errors {
        s.metrics.predicate_error(route, err);
    }
    if paused {
        // The add-on is INACTIVE in this workspace: accepted and stored, not routed.
        decision.sinks.clear();
    }
    if !decision.sinks.is_empty() {
        let (events, bytes, _) = s.store.gauges().snapshot();
        if events >= cfg.max_pending_events || bytes.saturating_add(body.len() as u64) > cfg.max_pending_bytes {
            s.metrics.rejected(&source.id, "spool_full");
            return unavailable("spool is full; retry later");
        }
    }
    let event = Event {
        id: uuid::Uuid::now_v7().to_string(),
        source: source.id.clone(),
        event_type: classified.event_type,
        received_at_ms: now_ms(),
        headers: classified.kept_headers,
        body,
        dedup_key: classified.dedup_key,
        ordering_key: classified.ordering_key,
    };
    let id = event.id.clone();
    let event_type = event.event_type.clone();
    let dedup_since = cfg.dedup_window.map(|w| now_ms() - w.as_millis() as i64);
    match s.store.insert(event, decision.sinks.clone(), dedup_since).await {
        Ok(Inserted::Duplicate { original }) => {
            // The provider must stop retrying: 200, and nothing is delivered again.
            s.metrics.duplicate(&source.id, &event_type, &original);
            axum::Json(json!({"status": "duplicate", "id": original})).into_response()
        }
        Ok(Inserted::New { .. }) => {
            s.metrics.accepted(&source.id, &event_type, &id, &decision.sinks);
            let status = if decision.sinks.is_empty() { "unrouted" } else { "accepted" };
            axum::Json(json!({"status": status, "id": id})).into_response()
        }
        Err(e) => {
            tracing::error!(source = %source.id, error = %e, "cannot commit event to the spool");
            s.metrics.rejected(&source.id, "store_error");
            unavailable("cannot store the event; retry later")
        }
    }
}
