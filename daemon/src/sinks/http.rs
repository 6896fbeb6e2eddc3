//! `http` sink: POST the original body, unchanged, with CloudEvents binary-mode headers (`ce-id`, `ce-type`,
//! `ce-source`, `ce-time`, `ce-specversion`). 2xx = delivered; 408, 429, 5xx and network errors = retry;
//! any other status = permanent.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode};

use super::{BoxFuture, CE_SPECVERSION, Sink, SinkError};
use crate::config::HttpSinkSpec;
use crate::event::Event;

/// Delivers by HTTP POST.
#[derive(Debug)]
pub struct HttpSink {
    client: reqwest::Client,
    url: reqwest::Url,
    headers: HeaderMap,
}

impl HttpSink {
    /// Builds the client (no connection is made yet).
    pub fn new(spec: &HttpSinkSpec) -> Result<Self, String> {
        let mut headers = HeaderMap::new();
        for (name, value) in &spec.headers {
            let mut v = HeaderValue::from_str(value.expose()).map_err(|_| format!("header {name}: invalid value"))?;
            v.set_sensitive(true);
            headers.insert(name.clone(), v);
        }
        let client = reqwest::Client::builder()
            .timeout(spec.timeout)
            .connect_timeout(spec.timeout.min(Duration::from_secs(10)))
            // A redirect would turn a POST into a GET or resend the body elsewhere: treat 3xx as an answer.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("hookbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build HTTP client: {e}"))?;
        Ok(HttpSink { client, url: spec.url.clone(), headers })
    }

    async fn post(&self, event: &Event) -> Result<(), SinkError> {
        let request = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .header("content-type", event.content_type())
            .header("ce-id", &event.id)
            .header("ce-type", &event.event_type)
            .header("ce-source", &event.source)
            .header("ce-time", event.time_rfc3339())
            .header("ce-specversion", CE_SPECVERSION)
            .body(event.body.clone());
        let response = request.send().await.map_err(|e| SinkError::retryable(describe(&e)))?;
        classify(response.status(), response.headers())
    }
}

impl Sink for HttpSink {
    fn deliver<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(self.post(event))
    }
}

/// The outcome a status code means.
fn classify(status: StatusCode, headers: &HeaderMap) -> Result<(), SinkError> {
    if status.is_success() {
        return Ok(());
    }
    let code = status.as_u16();
    let message = format!("HTTP {code}");
    if status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        let retry_after = headers.get("retry-after").and_then(|v| v.to_str().ok()).and_then(retry_after);
        return Err(SinkError::Retryable { message, retry_after, status: Some(code) });
    }
    Err(SinkError::Permanent { message, status: Some(code) })
}

/// `Retry-After` as seconds or as an HTTP date.
fn retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or_default())
}

/// A network error in one line, without the URL's query (it may hold a token).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() { kind.to_owned() } else { format!("{kind}: {detail}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        let h = HeaderMap::new();
        assert_eq!(classify(StatusCode::OK, &h), Ok(()));
        assert_eq!(classify(StatusCode::NO_CONTENT, &h), Ok(()));
        for s in [408, 429, 500, 502, 503] {
            assert_eq!(classify(StatusCode::from_u16(s).unwrap(), &h).unwrap_err().class(), "retryable", "{s}");
        }
        for s in [301, 400, 401, 404, 410, 422] {
            assert_eq!(classify(StatusCode::from_u16(s).unwrap(), &h).unwrap_err().class(), "permanent", "{s}");
        }
        let mut h = HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, &h),
            Err(SinkError::Retryable {
                message: "HTTP 429".into(),
                retry_after: Some(Duration::from_secs(7)),
                status: Some(429)
            })
        );
        let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
        let d = retry_after(&later).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120), "{d:?}");
        assert_eq!(retry_after("soon"), None);
    }
}
