//! Ingress: the two routers. The webhook router (the internet-facing listener) serves webhook paths (one
//! per source), `/healthz` and a bare `/readyz`; the internal router serves `/metrics`, `/readyz` with
//! detail, `/dashboard` and `/live/<channel>`, behind `internal_token` when one is configured.
//!
//! A webhook's headers are checked first: a request that cannot be authentic is refused before its body is
//! read. Its body is then read with a size bound, a deadline and a minimum rate, holding a permit of
//! `max_concurrency` when the headers already proved it (Clockify, add-ons) or of the small
//! `max_unverified` budget while a body signature is still to be checked (hmac, Standard Webhooks,
//! Clockodo), so unsigned or slow clients never hold the capacity that verified webhooks need. Then it is
//! verified, classified, routed and committed to the spool before it is answered.
//!
//! Status codes: 200 accepted (or unrouted, or a Clockodo handshake); 400 bad JSON or event type; 401
//! verification failed; 404 unknown path; 405 not POST; 408 body not received in time or too slowly; 413
//! body too large; 431 request head too large (hyper, see `server`); 503 (with `Retry-After`) spool full,
//! store failure, too many requests in progress, shutting down.

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
use http_body_util::BodyExt;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::classify::{DedupKey, classify, visible_headers};
use crate::config::Source;
use crate::event::{Event, now_ms};
use crate::limits::{REPEATED_ERROR_LOG, RETRY_AFTER_SECS};
use crate::metrics::{Metrics, NO_SOURCE};
use crate::route::{RouteInput, RouteTable};
use crate::store::{Dedup, Inserted, Store};
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
    /// Verified webhook requests in progress (`max_concurrency`).
    pub concurrency: Arc<Semaphore>,
    /// Requests whose body is still to be verified (`max_unverified`).
    pub unverified: Semaphore,
    /// Token of the internal listener, when configured.
    pub internal_token: Option<crate::config::SecretString>,
    /// Per-sink gauges read from the spool by the housekeeping task, so that a scrape of `/metrics` costs
    /// the same whatever the spool holds.
    pub sink_stats: std::sync::Mutex<Vec<crate::store::SinkStats>>,
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
    /// Time to verify, store and answer once the body is in.
    pub request_timeout: Duration,
    /// Time for the body to arrive.
    pub body_timeout: Duration,
    /// Slowest body, bytes per second after the first second (0: no check).
    pub min_body_rate: u64,
    /// Configured sink ids (for per-sink gauges).
    pub sink_ids: Vec<String>,
    /// The routes as configured (for add-on manifests).
    pub route_configs: Vec<crate::config::types::RouteConfig>,
    /// Dedup window (`None`: dedup off).
    pub dedup_window: Option<Duration>,
    /// Spool bounds.
    pub spool: crate::store::SpoolLimits,
}

/// The webhook router: every source's path, `/healthz` and `/readyz` (status only); everything else is
/// 404. This is what faces the internet.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz_public))
        .fallback(webhook)
        .with_state(shared)
}

/// The internal router: `/metrics`, `/readyz` with spool counters and sink states, `/dashboard`,
/// `/live/<channel>`, and `/healthz`; every path but `/healthz` behind `internal_token` when one is set.
pub fn internal_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/live/{channel}", get(live))
        .route("/dashboard", get(dashboard))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&shared), internal_auth))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(shared)
}

/// `Authorization: Bearer <token>` (scheme case-insensitive), or `?token=<token>` for a browser's page and
/// its event stream, when `internal_token` is set.
async fn internal_auth(State(s): State<Arc<Shared>>, request: Request, next: axum::middleware::Next) -> Response {
    let Some(token) = &s.internal_token else { return next.run(request).await };
    let from_query = form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned());
    let presented = crate::admin::bearer_of(request.headers()).or(from_query.as_deref());
    if !crate::admin::token_matches(presented, token) {
        return crate::admin::unauthorized("token required");
    }
    next.run(request).await
}

/// Ready to accept webhooks: not shutting down, and the spool proved writable by a small durable write (at
/// most once a second however often this is called).
async fn readiness(s: &Shared) -> Result<(), &'static str> {
    if s.shutting_down.load(Ordering::Relaxed) {
        return Err("shutting down");
    }
    let recent = !s.store.is_closed()
        && s.last_ready.lock().ok().and_then(|t| *t).is_some_and(|t| t.elapsed() < Duration::from_secs(1));
    if recent {
        return Ok(());
    }
    match tokio::time::timeout(Duration::from_secs(2), s.store.ping()).await {
        Ok(Ok(())) => {
            if let Ok(mut t) = s.last_ready.lock() {
                *t = Some(Instant::now());
            }
            Ok(())
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "readiness: spool not writable");
            Err("spool not writable")
        }
        Err(_) => Err("spool too slow"),
    }
}

/// `/readyz` on the webhook listener (for load balancers): the status alone.
async fn readyz_public(State(s): State<Arc<Shared>>) -> Response {
    match readiness(&s).await {
        Ok(()) => axum::Json(json!({"status": "ready"})).into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": why}))).into_response(),
    }
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    match readiness(&s).await {
        // Ready means ready to accept webhooks: a broker that is away does not change that (events wait in
        // the spool), so connection states are reported, not judged.
        Ok(()) => {
            let (events, bytes, deliveries) = s.store.gauges().snapshot();
            axum::Json(json!({
                "status": "ready",
                "spool": {"pending_events": events, "pending_bytes": bytes, "pending_deliveries": deliveries},
                "sinks": s.connections().into_iter().map(|(id, c)| (id, json!(c))).collect::<serde_json::Map<_, _>>(),
            }))
            .into_response()
        }
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": why}))).into_response(),
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
    if let Ok(stats) = s.sink_stats.lock() {
        for st in stats.iter() {
            if let Some(row) = sinks.iter_mut().find(|(id, _, _)| *id == st.sink) {
                *row = (st.sink.clone(), st.dead, st.oldest_pending_ms);
            }
        }
    }
    let body = s.metrics.render(&s.store.gauges(), &sinks, &s.connections());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"error": message}))).into_response()
}

/// `{"status": <status>, "id": <id>}` for a stored event, formatted straight into the body: this is every
/// accepted webhook's answer.
fn stored_response(status: &'static str, id: &str) -> Response {
    let mut body = Vec::with_capacity(24 + status.len() + id.len());
    body.extend_from_slice(b"{\"status\":\"");
    body.extend_from_slice(status.as_bytes());
    body.extend_from_slice(b"\",\"id\":");
    // Ids are UUIDs; written as a JSON string whatever they hold.
    if serde_json::to_writer(&mut body, id).is_err() {
        body.extend_from_slice(b"null");
    }
    body.push(b'}');
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
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
    let response = handle(&s, &settings, source, sub.as_deref(), request, started).await;
    s.metrics.source_request(&source.metrics, &source.id, response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

/// What the request proved before its body was read.
struct Checked {
    /// Verified from the headers (else the body's signature is still to be checked).
    verified: bool,
    /// The add-on installation is INACTIVE: accept and store, do not route.
    paused: bool,
    /// An add-on lifecycle call (its token verified).
    lifecycle: bool,
    /// An add-on webhook's token claims (workspace, add-on), which its body must match.
    claims: Option<(String, String)>,
}

/// Checks the headers of a request to `source`; `Err` is the answer, given without reading the body.
fn check_headers(
    s: &Shared,
    source: &Source,
    path: &str,
    sub: Option<&str>,
    headers: &HeaderMap,
) -> Result<Checked, Box<Response>> {
    if let Scheme::ClockifyAddon(a) = &source.scheme {
        use crate::addon::{Early, Outcome};
        return match crate::addon::check_headers(a, &s.installations, (&source.id, path, sub.unwrap_or("")), headers) {
            Ok(Early::Webhook { paused, workspace, addon }) => {
                Ok(Checked { verified: true, paused, lifecycle: false, claims: Some((workspace, addon)) })
            }
            Ok(Early::Lifecycle) => Ok(Checked { verified: true, paused: false, lifecycle: true, claims: None }),
            Err(Outcome::Unauthorized(reason)) => {
                s.metrics.rejected(&source.id, reason);
                Err(Box::new(error(StatusCode::UNAUTHORIZED, "verification failed")))
            }
            Err(_) => Err(Box::new(error(StatusCode::NOT_FOUND, "no such add-on path"))),
        };
    }
    match crate::verify::verify_headers(&source.scheme, headers) {
        Ok(crate::verify::Early::Verified(secret)) => {
            if let Some(i) = secret {
                s.metrics.secret_matched(&source.metrics, &source.id, i);
            }
            Ok(Checked { verified: true, paused: false, lifecycle: false, claims: None })
        }
        Ok(crate::verify::Early::NeedsBody) => {
            Ok(Checked { verified: false, paused: false, lifecycle: false, claims: None })
        }
        Err(e) => {
            s.metrics.rejected(&source.id, e.reason());
            Err(Box::new(error(StatusCode::UNAUTHORIZED, "verification failed")))
        }
    }
}

async fn handle(
    s: &Arc<Shared>,
    cfg: &Arc<Settings>,
    source: &Source,
    sub: Option<&str>,
    request: Request,
    started: Instant,
) -> Response {
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
    let (parts, body) = request.into_parts();
    let mut checked = match check_headers(s, source, parts.uri.path(), sub, &parts.headers) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cfg.max_body) {
        s.metrics.rejected(&source.id, "body_too_large");
        return error(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
    }
    // Verified requests hold a permit of `max_concurrency` from here; the others one of the unverified
    // budget, until their body's signature is checked.
    let mut permit = None;
    let mut unverified_permit = None;
    if checked.verified {
        let Ok(p) = Arc::clone(&s.concurrency).try_acquire_owned() else {
            s.metrics.rejected(&source.id, "overloaded");
            return unavailable("too many concurrent requests");
        };
        permit = Some(p);
    } else {
        let Ok(p) = s.unverified.try_acquire() else {
            s.metrics.rejected(&source.id, "unverified_overloaded");
            return unavailable("too many requests waiting for verification");
        };
        unverified_permit = Some(p);
    }
    let body = match read_body(body, cfg.max_body, cfg.body_timeout, cfg.min_body_rate).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            s.metrics.rejected(&source.id, "body_too_large");
            return error(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
        }
        Err(BodyError::Io) => {
            s.metrics.rejected(&source.id, "body_read_error");
            return error(StatusCode::BAD_REQUEST, "could not read the body");
        }
        Err(BodyError::Timeout) => {
            s.metrics.rejected(&source.id, "timeout");
            return error(StatusCode::REQUEST_TIMEOUT, "body not received in time");
        }
        Err(BodyError::TooSlow) => {
            s.metrics.rejected(&source.id, "body_too_slow");
            return error(StatusCode::REQUEST_TIMEOUT, "body arriving too slowly");
        }
    };
    if !checked.verified {
        // Clockodo's validation handshake is unauthenticated by protocol; it is stored in a bounded table.
        if let Scheme::Clockodo { .. } = source.scheme
            && let Some(secret) = handshake_secret(parts.uri.query(), &body)
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
        match verify(&source.scheme, &parts.headers, &body) {
            Ok(Some(secret)) => s.metrics.secret_matched(&source.metrics, &source.id, secret),
            Ok(None) => {}
            Err(e) => {
                s.metrics.rejected(&source.id, e.reason());
                return error(StatusCode::UNAUTHORIZED, "verification failed");
            }
        }
        drop(unverified_permit.take());
        let Ok(p) = Arc::clone(&s.concurrency).try_acquire_owned() else {
            s.metrics.rejected(&source.id, "overloaded");
            return unavailable("too many concurrent requests");
        };
        permit = Some(p);
        checked.verified = true;
    }
    // The rest runs in a task of its own, which a closed connection or the request timeout does not cancel:
    // an event that reaches the spool always learns whether its answer was written (see `Answered`).
    let task = {
        let (s, cfg) = (Arc::clone(s), Arc::clone(cfg));
        let (path, sub) = (parts.uri.path().to_owned(), sub.map(str::to_owned));
        let headers = parts.headers;
        tokio::spawn(async move {
            let _permit = permit;
            let Some((source, _)) = find_source(&cfg, &path) else {
                return error(StatusCode::NOT_FOUND, "no webhook source at this path");
            };
            let (response, stored) = accept(&s, &cfg, source, &checked, (&path, sub.as_deref()), &headers, body).await;
            match stored {
                Some((seq, hash, duplicate)) => {
                    let deadline = started.checked_add(source.dedup.provider_timeout).unwrap_or(started);
                    let answered = Answered { shared: s, source: source.id.clone(), seq, hash, duplicate, deadline };
                    response.map(|body| Body::new(WatchedBody { inner: body, answered: Some(answered) }))
                }
                None => response,
            }
        })
    };
    match tokio::time::timeout(cfg.request_timeout, task).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::error!(source = %source.id, error = %e, "webhook task failed");
            s.metrics.rejected(&source.id, "internal_error");
            unavailable("internal error; retry later")
        }
        Err(_) => {
            // The event may still be committed: its answer is then uncertain, and the provider's retry gets a
            // duplicate, never a loss.
            s.metrics.rejected(&source.id, "timeout");
            unavailable("timed out")
        }
    }
}

/// An event stored for a webhook whose answer is on its way: reports to the spool whether the answer was
/// written whole before the source's `provider_timeout` (certain) or not (uncertain: the provider may
/// retry, and a copy is then a duplicate; see [`crate::store::Dedup::Content`]).
struct Answered {
    shared: Arc<Shared>,
    source: String,
    seq: i64,
    hash: i64,
    /// The request was a duplicate of event `seq`.
    duplicate: bool,
    deadline: Instant,
}

impl Answered {
    fn report(self, whole: bool) {
        let certain = whole && Instant::now() <= self.deadline;
        if !certain {
            self.shared.metrics.uncertain_answer(&self.source);
        }
        // A new event answered in time is what the spool assumes: nothing to report.
        if !certain || self.duplicate {
            self.shared.store.answered(self.seq, self.hash, certain);
        }
    }
}

/// A response body that tells [`Answered`] when the server has taken all of it for the connection, or
/// that it never will (dropped first: the connection closed, the request timed out).
struct WatchedBody {
    inner: Body,
    answered: Option<Answered>,
}

impl http_body::Body for WatchedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        let whole = match &polled {
            std::task::Poll::Ready(None) => Some(true),
            std::task::Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => Some(true),
            std::task::Poll::Ready(Some(Err(_))) => Some(false),
            _ => None,
        };
        if let (Some(whole), Some(a)) = (whole, this.answered.take()) {
            a.report(whole);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for WatchedBody {
    fn drop(&mut self) {
        if let Some(a) = self.answered.take() {
            // Never polled: whole only if there was nothing to send (hyper skips an empty body).
            a.report(http_body::Body::is_end_stream(&self.inner));
        }
    }
}

enum BodyError {
    TooLarge,
    Io,
    Timeout,
    TooSlow,
}

/// How long a body may take before its rate is judged.
const BODY_RATE_GRACE: Duration = Duration::from_secs(1);
/// How often a body's rate is judged while nothing arrives.
const BODY_RATE_CHECK: Duration = Duration::from_millis(250);

/// Reads a body of at most `limit` bytes within `timeout`, at `min_rate` bytes per second or faster on
/// average once [`BODY_RATE_GRACE`] has passed (`0`: any rate).
async fn read_body(body: Body, limit: u64, timeout: Duration, min_rate: u64) -> Result<Bytes, BodyError> {
    use futures_util::FutureExt;
    let mut body = body;
    let mut got = Collected { chunks: Vec::new(), len: 0, limit: usize::try_from(limit).unwrap_or(usize::MAX) };
    // A small body usually arrives with the head: what is already there is taken without arming a timer.
    let complete = loop {
        match body.frame().now_or_never() {
            Some(None) => break true,
            Some(Some(Ok(frame))) => got.push(frame)?,
            Some(Some(Err(_))) => return Err(BodyError::Io),
            None => break false,
        }
    };
    if !complete {
        read_rest(&mut body, &mut got, timeout, min_rate).await?;
    }
    let Collected { mut chunks, len, .. } = got;
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut all = bytes::BytesMut::with_capacity(len);
            for c in chunks {
                all.extend_from_slice(&c);
            }
            all.freeze()
        }
    })
}

/// A body's chunks so far.
struct Collected {
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
}

impl Collected {
    fn push(&mut self, frame: http_body::Frame<Bytes>) -> Result<(), BodyError> {
        if let Ok(data) = frame.into_data() {
            self.len = self.len.saturating_add(data.len());
            if self.len > self.limit {
                return Err(BodyError::TooLarge);
            }
            if !data.is_empty() {
                self.chunks.push(data);
            }
        }
        Ok(())
    }
}

/// The rest of a body that was not all there at once, within `timeout` and at `min_rate` (see [`read_body`]).
async fn read_rest(body: &mut Body, got: &mut Collected, timeout: Duration, min_rate: u64) -> Result<(), BodyError> {
    let started = tokio::time::Instant::now();
    let deadline = started + timeout;
    let mut check = tokio::time::interval_at(started + BODY_RATE_CHECK, BODY_RATE_CHECK);
    loop {
        tokio::select! {
            frame = body.frame() => match frame {
                None => return Ok(()),
                Some(Ok(frame)) => got.push(frame)?,
                Some(Err(_)) => return Err(BodyError::Io),
            },
            _ = tokio::time::sleep_until(deadline) => return Err(BodyError::Timeout),
            _ = check.tick() => {}
        }
        let elapsed = started.elapsed();
        if min_rate > 0 && elapsed > BODY_RATE_GRACE {
            let owed = min_rate as f64 * (elapsed - BODY_RATE_GRACE).as_secs_f64();
            if (got.len as f64) < owed {
                return Err(BodyError::TooSlow);
            }
        }
    }
}

/// Classify, route, spool (the request is verified). Answers 2xx only after the spool commit; with the
/// stored event's seq and dedup hash when a copy of it dedups by its answer (a content key), and whether
/// this request was a duplicate of it.
async fn accept(
    s: &Shared,
    cfg: &Settings,
    source: &Source,
    checked: &Checked,
    (path, sub): (&str, Option<&str>),
    headers: &HeaderMap,
    body: Bytes,
) -> (Response, Option<(i64, i64, bool)>) {
    if let (true, Scheme::ClockifyAddon(a)) = (checked.lifecycle, &source.scheme) {
        use crate::addon::Outcome;
        let req =
            crate::addon::Request { source: &source.id, scheme: a, path, sub: sub.unwrap_or(""), headers, body: &body };
        let response = match crate::addon::lifecycle(&s.store, &s.installations, req).await {
            Outcome::Lifecycle(what) => axum::Json(json!({"status": what})).into_response(),
            Outcome::Unauthorized(reason) => {
                s.metrics.rejected(&source.id, reason);
                error(StatusCode::UNAUTHORIZED, "verification failed")
            }
            Outcome::BadRequest(m) => {
                s.metrics.rejected(&source.id, "invalid_lifecycle_body");
                error(StatusCode::BAD_REQUEST, &m)
            }
            Outcome::NotFound => error(StatusCode::NOT_FOUND, "no such add-on path"),
            Outcome::Unavailable(e) => {
                tracing::error!(source = %source.id, error = %e, "cannot store the add-on installation");
                s.metrics.rejected(&source.id, "store_error");
                unavailable("cannot store the installation; retry later")
            }
        };
        return (response, None);
    }
    if let Some((workspace, addon)) = &checked.claims
        && let Err(reason) = crate::addon::body_matches_claims(&body, workspace, addon)
    {
        tracing::warn!(source = %source.id, reason, "add-on webhook refused: its body is not for the workspace its token was issued for");
        s.metrics.rejected(&source.id, reason);
        return (error(StatusCode::UNAUTHORIZED, "verification failed"), None);
    }
    let classified = match classify(&source.scheme, headers, &body) {
        Ok(c) => c,
        Err(e) => {
            s.metrics.rejected(&source.id, e.reason());
            return (error(StatusCode::BAD_REQUEST, &e.to_string()), None);
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
    if checked.paused {
        // The add-on is INACTIVE in this workspace: accepted and stored, not routed.
        decision.sinks.clear();
    }
    if let Err(reason) = cfg.spool.room_for(&s.store.gauges(), decision.sinks.is_empty(), body.len() as u64) {
        s.metrics.rejected(&source.id, reason);
        return (unavailable("spool is full; retry later"), None);
    }
    let now = now_ms();
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let dedup = match (cfg.dedup_window, classified.dedup) {
        (None, _) => Dedup::Off,
        (Some(w), DedupKey::DeliveryId) => Dedup::DeliveryId { since_ms: now.saturating_sub(ms(w)) },
        (Some(w), DedupKey::Content) => Dedup::Content {
            since_ms: now.saturating_sub(ms(w)),
            retry_since_ms: match source.dedup.retry_window {
                w if w.is_zero() => i64::MAX,
                w => now.saturating_sub(ms(w)),
            },
        },
    };
    let watch = matches!(dedup, Dedup::Content { .. }).then(|| crate::store::dedup_hash(&classified.dedup_key));
    let event = Event {
        id: uuid::Uuid::now_v7().to_string(),
        source: source.id.clone(),
        event_type: classified.event_type,
        received_at_ms: now,
        headers: classified.kept_headers,
        body,
        dedup_key: classified.dedup_key,
        ordering_key: classified.ordering_key,
        body_is_json: true,
    };
    let id = event.id.clone();
    let event_type = event.event_type.clone();
    match s.store.insert(event, decision.sinks.clone(), dedup).await {
        Ok(Inserted::Duplicate { original, seq }) => {
            // The provider must stop retrying: 200, and nothing is delivered again. Once this answer is
            // through, the provider has seen one for that content, so its next copy is a new event.
            s.metrics.duplicate(&source.id, &event_type, &original);
            let response = stored_response("duplicate", &original);
            (response, watch.map(|hash| (seq, hash, true)))
        }
        Ok(Inserted::New { seq }) => {
            s.metrics.accepted(&source.metrics, &source.id, &event_type, &id, &decision.sinks);
            let status = if decision.sinks.is_empty() { "unrouted" } else { "accepted" };
            (stored_response(status, &id), watch.map(|hash| (seq, hash, false)))
        }
        Err(e) => {
            // Every webhook meets it while it lasts (a full disk): one line per interval, with the count.
            static STORE_ERRORS: crate::limits::Throttle = crate::limits::Throttle::new(REPEATED_ERROR_LOG);
            if let Some(held_back) = STORE_ERRORS.due(Instant::now()) {
                tracing::error!(source = %source.id, error = %e, held_back, "cannot commit event to the spool");
            }
            s.metrics.rejected(&source.id, "store_error");
            (unavailable("cannot store the event; retry later"), None)
        }
    }
}
