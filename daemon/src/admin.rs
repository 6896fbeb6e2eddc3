//! The admin API: the operator commands over HTTP with JSON answers. Off unless `[admin]` is configured;
//! then it listens on its own address and every request needs `Authorization: Bearer <token>`.
//!
//! | method and path | does |
//! |---|---|
//! | `GET /api/v1/events?source=&event=&status=&since=&until=&limit=` | `events list` |
//! | `GET /api/v1/events/{id}` | `events show` |
//! | `POST /api/v1/events/{id}/replay?sink=` | `events replay ID` |
//! | `POST /api/v1/replay?since=&until=&sink=` | `events replay --since` |
//! | `GET /api/v1/dlq?sink=` | `dlq list` |
//! | `POST /api/v1/dlq/retry?id=` or `?all=true&sink=` | `dlq retry` |
//! | `POST /api/v1/dlq/purge?id=` or `?all=true&sink=` | `dlq purge` |

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::config::{Config, SecretString};
use crate::operator::{self, DeadSelection, OperatorError, ReplaySelection};
use crate::store::EventFilter;
use crate::verify::matches_any;

struct Admin {
    config: Config,
    token: SecretString,
}

/// The admin router for `config`, guarded by `token`.
pub fn router(config: Config, token: SecretString) -> Router {
    let state = Arc::new(Admin { config, token });
    Router::new()
        .route("/api/v1/events", get(list_events))
        .route("/api/v1/events/{id}", get(show_event))
        .route("/api/v1/events/{id}/replay", post(replay_one))
        .route("/api/v1/replay", post(replay_range))
        .route("/api/v1/dlq", get(dead_letters))
        .route("/api/v1/dlq/retry", post(retry_dead))
        .route("/api/v1/dlq/purge", post(purge_dead))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), auth))
        .with_state(state)
}

async fn auth(State(a): State<Arc<Admin>>, request: Request, next: Next) -> Response {
    if !token_matches(bearer_of(request.headers()), &a.token) {
        tracing::warn!(path = %request.uri().path(), "admin API request refused: bad or missing bearer token");
        return unauthorized("bearer token required");
    }
    next.run(request).await
}

/// The bearer token a request carries in `Authorization`, if any.
pub fn bearer_of(headers: &header::HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer)
}

/// Whether `presented` is `token` (compared in constant time; absent or empty never matches).
pub fn token_matches(presented: Option<&str>, token: &SecretString) -> bool {
    presented.is_some_and(|p| !p.is_empty() && matches_any(p.as_bytes(), std::slice::from_ref(token)))
}

/// `401` with `WWW-Authenticate: Bearer` and `{"error": message}`.
pub fn unauthorized(message: &str) -> Response {
    let mut r = (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": message}))).into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    r
}

/// The token of an `Authorization: Bearer <token>` value, the scheme matched case-insensitively (RFC 9110).
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Runs a blocking operator command and maps its errors to statuses.
async fn run<T: serde::Serialize + Send + 'static>(
    a: &Arc<Admin>,
    f: impl FnOnce(&Config) -> Result<T, OperatorError> + Send + 'static,
) -> Response {
    let a = Arc::clone(a);
    match tokio::task::spawn_blocking(move || f(&a.config)).await {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(OperatorError::Invalid(m))) => {
            (StatusCode::BAD_REQUEST, axum::Json(json!({"error": m}))).into_response()
        }
        Ok(Err(OperatorError::NotFound(m))) => (StatusCode::NOT_FOUND, axum::Json(json!({"error": m}))).into_response(),
        Ok(Err(OperatorError::Store(e))) => {
            tracing::error!(error = %e, "admin API: spool error");
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"error": "spool unavailable"}))).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "admin API: task failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    source: Option<String>,
    event: Option<String>,
    status: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
}

async fn list_events(State(a): State<Arc<Admin>>, Query(q): Query<ListQuery>) -> Response {
    run(&a, move |c| {
        let filter = EventFilter {
            source: q.source,
            event_type: q.event,
            status: q.status,
            since_ms: q.since.as_deref().map(operator::parse_time).transpose()?,
            until_ms: q.until.as_deref().map(operator::parse_time).transpose()?,
            limit: q.limit.unwrap_or(100).min(10_000),
        };
        operator::list_events(c, filter)
    })
    .await
}

async fn show_event(State(a): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    run(&a, move |c| operator::show_event(c, &id)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkQuery {
    sink: Option<String>,
}

async fn replay_one(State(a): State<Arc<Admin>>, Path(id): Path<String>, Query(q): Query<SinkQuery>) -> Response {
    run(&a, move |c| operator::replay(c, &ReplaySelection::One(id), q.sink.as_deref(), |_, _| {})).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeQuery {
    since: String,
    until: Option<String>,
    sink: Option<String>,
}

async fn replay_range(State(a): State<Arc<Admin>>, Query(q): Query<RangeQuery>) -> Response {
    run(&a, move |c| {
        let since_ms = operator::parse_time(&q.since)?;
        let until_ms = q.until.as_deref().map(operator::parse_time).transpose()?.unwrap_or(i64::MAX);
        operator::replay(c, &ReplaySelection::Range { since_ms, until_ms }, q.sink.as_deref(), |_, _| {})
    })
    .await
}

async fn dead_letters(State(a): State<Arc<Admin>>, Query(q): Query<SinkQuery>) -> Response {
    run(&a, move |c| operator::dead_letters(c, q.sink.as_deref())).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadQuery {
    id: Option<i64>,
    #[serde(default)]
    all: bool,
    sink: Option<String>,
}

fn selection(q: DeadQuery) -> Result<DeadSelection, OperatorError> {
    match (q.id, q.all) {
        (Some(id), false) if q.sink.is_none() => Ok(DeadSelection::One(id)),
        (None, true) => Ok(DeadSelection::All(q.sink)),
        _ => Err(OperatorError::Invalid("give either id=N, or all=true (with an optional sink=)".into())),
    }
}

async fn retry_dead(State(a): State<Arc<Admin>>, Query(q): Query<DeadQuery>) -> Response {
    run(&a, move |c| Ok(json!({"retried": operator::retry_dead(c, &selection(q)?)?}))).await
}

async fn purge_dead(State(a): State<Arc<Admin>>, Query(q): Query<DeadQuery>) -> Response {
    run(&a, move |c| Ok(json!({"purged": operator::purge_dead(c, &selection(q)?)?}))).await
}
