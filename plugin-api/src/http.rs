//! Outbound HTTP, performed by the daemon: only to hosts that the operator allow-listed for this plugin
//! (`allowed_hosts`), with a timeout and a per-plugin rate limit.
//!
//! ```no_run
//! use hookbridge_plugin::{Error, http::Request, serde_json::Value};
//!
//! fn project_name(project_id: &str) -> Result<String, Error> {
//!     let response = Request::get(format!("https://api.example.com/projects/{project_id}"))
//!         .header("accept", "application/json")
//!         .send()?; // denied: permanent error; timeout, rate limit, failure: retryable
//!     if !response.is_success() {
//!         return Err(Error::retryable(format!("projects API answered {}", response.status)));
//!     }
//!     let project: Value = response.json()?;
//!     Ok(project["name"].as_str().unwrap_or_default().to_owned())
//! }
//! ```

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::__private::bindings::hookbridge::plugin::http as host;
use crate::Error;

pub use host::{HttpError, Request, Response};

/// Sends `request` through the daemon and waits for the whole response.
///
/// # Errors
///
/// [`HttpError::Denied`] for a host that is not allow-listed (or a URL that is not http(s)),
/// [`HttpError::Timeout`], [`HttpError::RateLimited`], or [`HttpError::Failed`] for connection and protocol
/// failures. An HTTP error status is not an error here: check [`Response::status`].
pub fn send(request: &Request) -> Result<Response, HttpError> {
    host::send(request)
}

impl Request {
    /// A request with `method` (`GET`, `POST`, ...) to the absolute `http://` or `https://` URL `url`.
    pub fn new(method: impl Into<String>, url: impl Into<String>) -> Self {
        Self { method: method.into(), url: url.into(), headers: Vec::new(), body: None }
    }

    /// A `GET` request.
    pub fn get(url: impl Into<String>) -> Self {
        Self::new("GET", url)
    }

    /// A `POST` request.
    pub fn post(url: impl Into<String>) -> Self {
        Self::new("POST", url)
    }

    /// A `PUT` request.
    pub fn put(url: impl Into<String>) -> Self {
        Self::new("PUT", url)
    }

    /// A `PATCH` request.
    pub fn patch(url: impl Into<String>) -> Self {
        Self::new("PATCH", url)
    }

    /// A `DELETE` request.
    pub fn delete(url: impl Into<String>) -> Self {
        Self::new("DELETE", url)
    }

    /// Adds a header.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    #[must_use]
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Sets the body to `value` serialized as JSON, and `content-type: application/json` unless a
    /// `content-type` header is already set.
    ///
    /// # Errors
    ///
    /// [`Error::Permanent`] when `value` cannot be serialized.
    pub fn json_body<T: Serialize + ?Sized>(self, value: &T) -> Result<Self, Error> {
        let body = serde_json::to_vec(value)
            .map_err(|err| Error::permanent(format!("cannot serialize the request body as JSON: {err}")))?;
        let request = if crate::event::header(&self.headers, "content-type").is_some() {
            self
        } else {
            self.header("content-type", "application/json")
        };
        Ok(request.body(body))
    }

    /// Sends the request: see [`send`].
    ///
    /// # Errors
    ///
    /// As [`send`].
    pub fn send(&self) -> Result<Response, HttpError> {
        send(self)
    }
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The value of the first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::event::header(&self.headers, name)
    }

    /// The body as UTF-8 text.
    ///
    /// # Errors
    ///
    /// [`Error::Permanent`] when the body is not valid UTF-8.
    pub fn text(&self) -> Result<&str, Error> {
        std::str::from_utf8(&self.body)
            .map_err(|err| Error::permanent(format!("the HTTP response body is not UTF-8 text: {err}")))
    }

    /// The body parsed as JSON into `T`.
    ///
    /// # Errors
    ///
    /// [`Error::Permanent`] when the body is not JSON or does not fit `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body)
            .map_err(|err| Error::permanent(format!("the HTTP response body is not the JSON expected: {err}")))
    }
}

impl HttpError {
    /// Whether trying again later can help: everything but [`HttpError::Denied`].
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Denied(_))
    }
}

impl From<HttpError> for Error {
    /// A denied request is [permanent](Error::permanent) (the allow-list will not change by itself); a
    /// timeout, a rate limit or a failure is [retryable](Error::retryable).
    fn from(err: HttpError) -> Self {
        let message = match &err {
            HttpError::Denied(reason) => format!("HTTP request denied: {reason}"),
            HttpError::Timeout => "HTTP request timed out".to_owned(),
            HttpError::RateLimited => "HTTP request rate-limited by the daemon".to_owned(),
            HttpError::Failed(reason) => format!("HTTP request failed: {reason}"),
        };
        if err.is_retryable() { Error::retryable(message) } else { Error::permanent(message) }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn json_body_sets_the_content_type_once() {
        let request = Request::post("https://api.example.com/x").json_body(&json!({"a": 1})).unwrap();
        assert_eq!(request.method, "POST");
        assert_eq!(request.body.as_deref(), Some(&br#"{"a":1}"#[..]));
        assert_eq!(request.headers, vec![("content-type".to_owned(), "application/json".to_owned())]);

        let request = Request::put("https://api.example.com/x")
            .header("Content-Type", "application/merge-patch+json")
            .json_body(&json!({}))
            .unwrap();
        assert_eq!(request.headers.len(), 1);
    }

    #[test]
    fn responses_expose_status_headers_and_body() {
        let response = Response {
            status: 201,
            headers: vec![("location".to_owned(), "/x/1".to_owned())],
            body: br#"{"id": 1}"#.to_vec(),
        };
        assert!(response.is_success());
        assert_eq!(response.header("Location"), Some("/x/1"));
        assert_eq!(response.json::<serde_json::Value>().unwrap()["id"], 1);
        assert!(!Response { status: 429, headers: vec![], body: vec![] }.is_success());
    }

    #[test]
    fn only_denied_requests_become_permanent_errors() {
        assert!(matches!(Error::from(HttpError::Denied("not allowed".to_owned())), Error::Permanent(_)));
        for err in [HttpError::Timeout, HttpError::RateLimited, HttpError::Failed("reset".to_owned())] {
            assert!(Error::from(err).is_retryable());
        }
    }
}
