//! `wasi:http/outgoing-handler` for plugins: the standard interface, under the same rules as hookbridge's
//! own `http` import ([`super::net::Net`]): only allow-listed hosts (anything else is `HTTP-request-denied`),
//! the plugin's rate limit, timeouts no longer than the plugin's `http_timeout` nor than the time left of the
//! invocation (whatever the guest's request options ask), no redirects (`wasi:http` never follows one),
//! and a response body of at most [`super::net::MAX_RESPONSE`] bytes. The request itself is made by
//! wasmtime-wasi-http's client.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use super::net::{Exchanges, MAX_RESPONSE, Net, NetError, Response};

/// What `send_request` answers.
type Sent = Result<(axum::http::Response<WasiBody>, Box<dyn Future<Output = Result<(), Error>> + Send>), Error>;

/// One invocation's hooks.
pub(super) struct Hooks {
    pub net: Arc<Net>,
    pub deadline: Instant,
    pub plugin: String,
}

/// `wanted`, but no longer than `cap` (and a timeout where the guest set none).
fn clamp(wanted: Option<Duration>, cap: Duration) -> Option<Duration> {
    Some(wanted.map_or(cap, |w| w.min(cap)))
}

impl WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        request: axum::http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        drop(fut);
        let net = Arc::clone(&self.net);
        let (deadline, plugin) = (self.deadline, self.plugin.clone());
        Box::new(async move {
            let url = request.uri().to_string();
            if let Err(e) = net.admit(&url) {
                tracing::info!(plugin, url = %super::strip_query(&url), reason = ?e, "wasi:http request refused");
                return Err(match e {
                    NetError::RateLimited => Error::ConnectionLimitReached,
                    _ => Error::HttpRequestDenied,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::ConnectionTimeout);
            }
            let cap = net.timeout().min(left);
            let options = options.unwrap_or_default();
            let options = RequestOptions {
                connect_timeout: clamp(options.connect_timeout, cap),
                first_byte_timeout: clamp(options.first_byte_timeout, cap),
                between_bytes_timeout: clamp(options.between_bytes_timeout, cap),
            };
            let method = request.method().as_str().to_owned();
            if !matches!(net.exchanges(), Exchanges::Live) {
                return exchange(&net, &method, &url, request, options).await;
            }
            let sent = wasmtime_wasi_http::default_send_request(request, Some(options)).await;
            net.note(&method, &url, sent.as_ref().map(|(r, _)| r.status().as_u16()).map_err(|e| e.to_string()));
            let (response, io) = sent?;
            let response = response.map(|body| {
                http_body_util::Limited::new(body, MAX_RESPONSE)
                    .map_err(|e| match e.downcast::<Error>() {
                        Ok(e) => *e,
                        Err(_) => Error::HttpResponseBodySize(None),
                    })
                    .boxed_unsync()
            });
            Ok((response, Box::new(io) as Box<dyn Future<Output = Result<(), Error>> + Send>))
        })
    }
}

/// `plugin test`'s exchanges: answered from the mocks, or made and recorded; bodies whole in memory.
async fn exchange(
    net: &Net,
    method: &str,
    url: &str,
    request: axum::http::Request<WasiBody>,
    options: RequestOptions,
) -> Sent {
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_owned(), v.to_owned())))
        .collect();
    let body = request.into_body().collect().await?.to_bytes();
    let answer = match net.mock(method, url, &headers, &body) {
        Some(mocked) => mocked.map_err(|e| {
            net.note(method, url, Err(e.describe()));
            Error::DestinationNotFound
        })?,
        None => {
            let mut live = axum::http::Request::builder().method(method).uri(url);
            for (k, v) in &headers {
                live = live.header(k, v);
            }
            let live = live
                .body(http_body_util::Full::new(body.clone()).map_err(|never| match never {}).boxed_unsync())
                .map_err(|e| Error::InternalError(Some(e.to_string())))?;
            let (response, io) = wasmtime_wasi_http::default_send_request(live, Some(options)).await?;
            tokio::spawn(io);
            let status = response.status().as_u16();
            let headers = response
                .headers()
                .iter()
                .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_owned(), v.to_owned())))
                .collect();
            let answer_body = http_body_util::Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|_| Error::HttpResponseBodySize(None))?
                .to_bytes()
                .to_vec();
            let answer = Response { status, headers, body: answer_body };
            net.record(method, url, &answer);
            answer
        }
    };
    net.note(method, url, Ok(answer.status));
    let mut response = axum::http::Response::builder().status(answer.status);
    for (k, v) in &answer.headers {
        response = response.header(k, v);
    }
    let response = response
        .body(http_body_util::Full::new(bytes::Bytes::from(answer.body)).map_err(|never| match never {}).boxed_unsync())
        .map_err(|e| Error::InternalError(Some(e.to_string())))?;
    Ok((response, Box::new(async { Ok(()) })))
}
