//! The plugins' outbound HTTP: performed by the host, only to allow-listed hosts, with a timeout (never
//! beyond what is left of the invocation's time limit), a per-plugin rate limit, no redirects (a redirect
//! could leave the allow-list) and a bounded response body.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Largest response body handed to a plugin.
pub const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// Why a request was not made or did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetError {
    /// Not allowed (host, scheme, method).
    Denied(String),
    /// No answer in time.
    Timeout,
    /// Over the plugin's rate limit.
    RateLimited,
    /// Connection or protocol failure.
    Failed(String),
}

impl NetError {
    /// One line for a report.
    pub fn describe(&self) -> String {
        match self {
            NetError::Denied(m) => format!("denied: {m}"),
            NetError::Timeout => "timeout".to_owned(),
            NetError::RateLimited => "rate-limited".to_owned(),
            NetError::Failed(m) => m.clone(),
        }
    }
}

/// A request as the plugin gave it.
#[derive(Debug, Clone)]
pub struct Request {
    /// HTTP method.
    pub method: String,
    /// Absolute URL.
    pub url: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Option<Vec<u8>>,
}

/// The answer.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    /// Body (at most [`MAX_RESPONSE`] bytes).
    pub body: Vec<u8>,
}

/// One plugin's HTTP capability.
#[derive(Debug)]
pub struct Net {
    client: reqwest::Client,
    allowed: Vec<String>,
    timeout: Duration,
    bucket: Mutex<Bucket>,
    exchanges: Exchanges,
    /// What was asked, for `plugin test`'s report (`None` in the daemon: nothing is kept).
    log: Option<Mutex<Vec<Sent>>>,
}

/// Where requests go: the network, or (for `plugin test`) fixture files instead, or the network with each
/// exchange written to a folder.
#[derive(Debug, Clone, Default)]
pub enum Exchanges {
    /// The network.
    #[default]
    Live,
    /// Answered from these exchanges (first match by method, URL and, when given, body); no network at all.
    Mock(Vec<Exchange>),
    /// The network, each exchange also written to this folder (`NNN-METHOD-host.json`; the request's
    /// method and URL, and the response: any body matches when it is replayed).
    Record(PathBuf),
}

/// One request and its answer, as a fixture file holds it (`--mock-http`, `--record`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exchange {
    /// What the plugin asks.
    pub request: MockRequest,
    /// What it gets.
    pub response: MockResponse,
}

/// The request side of an [`Exchange`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockRequest {
    /// `GET`, `POST`, ... (any case).
    pub method: String,
    /// The whole URL, query included, as the plugin builds it.
    pub url: String,
    /// Headers the request must carry (lower-case names; others are not compared).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The body the request must carry (UTF-8); none: any body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// The response side of an [`Exchange`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockResponse {
    /// Status code.
    pub status: u16,
    /// Headers (lower-case names).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The body as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The body as JSON (instead of `body`; `content-type: application/json` is added).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<serde_json::Value>,
}

/// A request the plugin made, as `plugin test` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Sent {
    /// Method.
    pub method: String,
    /// URL.
    pub url: String,
    /// The answer's status; none: no answer (refused, no mock, failure).
    pub status: Option<u16>,
    /// `mock`, `recorded` or `network`.
    pub from: &'static str,
    /// Why there was no answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Exchanges {
    /// Every `*.json` exchange file in `dir`, in file-name order.
    pub fn load(dir: &std::path::Path) -> Result<Vec<Exchange>, String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
                serde_json::from_str(&text).map_err(|e| format!("{}: not an exchange: {e}", p.display()))
            })
            .collect()
    }
}

impl MockResponse {
    fn into_response(self) -> Response {
        let mut headers: Vec<(String, String)> = self.headers.into_iter().collect();
        let body = match (self.json, self.body) {
            (Some(json), _) => {
                if !headers.iter().any(|(k, _)| k == "content-type") {
                    headers.push(("content-type".into(), "application/json".into()));
                }
                json.to_string().into_bytes()
            }
            (None, body) => body.unwrap_or_default().into_bytes(),
        };
        Response { status: self.status, headers, body }
    }
}

#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Net {
    /// A capability for `allowed` hosts (`host`, `host:port`, `*.domain`; lower-case).
    pub fn new(allowed: Vec<String>, timeout: Duration, rate_per_sec: u32) -> Result<Net, String> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeout)
            .user_agent(concat!("hookbridge-plugin/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the plugins' HTTP client: {e}"))?;
        let rate = f64::from(rate_per_sec.max(1));
        Ok(Net {
            client,
            allowed,
            timeout,
            bucket: Mutex::new(Bucket { rate, tokens: rate, at: Instant::now() }),
            exchanges: Exchanges::Live,
            log: None,
        })
    }

    /// For `plugin test`: requests go where `exchanges` says, and every one is kept for the report.
    pub fn for_test(mut self, exchanges: Exchanges) -> Net {
        self.exchanges = exchanges;
        self.log = Some(Mutex::new(Vec::new()));
        self
    }

    /// Where requests go.
    pub fn exchanges(&self) -> &Exchanges {
        &self.exchanges
    }

    /// The requests made so far (only kept by [`Net::for_test`]).
    pub fn sent(&self) -> Vec<Sent> {
        self.log.as_ref().and_then(|l| l.lock().ok().map(|l| l.clone())).unwrap_or_default()
    }

    /// Keeps a request for the report (with `for_test`).
    pub fn note(&self, method: &str, url: &str, result: Result<u16, String>) {
        let Some(log) = &self.log else { return };
        let from = match self.exchanges {
            Exchanges::Live => "network",
            Exchanges::Mock(_) => "mock",
            Exchanges::Record(_) => "recorded",
        };
        let (status, error) = match result {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e)),
        };
        if let Ok(mut log) = log.lock() {
            log.push(Sent { method: method.to_ascii_uppercase(), url: url.to_owned(), status, from, error });
        }
    }

    /// The mock answer to a request, when mocking: `Some(Err)` when no exchange matches.
    pub fn mock(
        &self,
        method: &str,
        url: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Option<Result<Response, NetError>> {
        let Exchanges::Mock(all) = &self.exchanges else { return None };
        let found = all.iter().find(|x| {
            x.request.method.eq_ignore_ascii_case(method)
                && x.request.url == url
                && x.request.body.as_deref().is_none_or(|b| b.as_bytes() == body)
                && x.request
                    .headers
                    .iter()
                    .all(|(k, v)| headers.iter().any(|(hk, hv)| hk.eq_ignore_ascii_case(k) && hv == v))
        });
        Some(match found {
            Some(x) => Ok(x.response.clone().into_response()),
            None => Err(NetError::Failed(format!("no mock exchange for {} {url}", method.to_ascii_uppercase()))),
        })
    }

    /// Writes an exchange to the record folder, when recording.
    pub fn record(&self, method: &str, url: &str, response: &Response) {
        let Exchanges::Record(dir) = &self.exchanges else { return };
        let n = self.log.as_ref().and_then(|l| l.lock().ok().map(|l| l.len())).unwrap_or(0);
        let host = reqwest::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
        let exchange = Exchange {
            request: MockRequest {
                method: method.to_ascii_uppercase(),
                url: url.to_owned(),
                headers: BTreeMap::new(),
                // Not recorded: bodies usually carry ids and times that differ from run to run, so a replay
                // would never match. Add one by hand to match on it.
                body: None,
            },
            response: MockResponse {
                status: response.status,
                headers: response.headers.iter().filter(|(k, _)| k == "content-type").cloned().collect(),
                body: Some(String::from_utf8_lossy(&response.body).into_owned()),
                json: None,
            },
        };
        let path = dir.join(format!("{:03}-{}-{host}.json", n + 1, method.to_ascii_uppercase()));
        let text = serde_json::to_string_pretty(&exchange).unwrap_or_default();
        if let Err(e) = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, text)) {
            tracing::warn!(path = %path.display(), error = %e, "cannot record the exchange");
        }
    }

    /// Checks `url` against the allow-list; returns the parsed URL.
    pub fn check(&self, url: &str) -> Result<reqwest::Url, NetError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| NetError::Denied(format!("invalid URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(NetError::Denied(format!("scheme {:?} is not allowed (http and https only)", parsed.scheme())));
        }
        let host = parsed.host_str().unwrap_or_default().to_ascii_lowercase();
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = parsed.port_or_known_default().unwrap_or(0);
        let allowed = self.allowed.iter().any(|entry| {
            let (pattern, want_port) = match entry.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, p.parse::<u16>().ok()),
                _ => (entry.as_str(), None),
            };
            let host_ok = match pattern.strip_prefix("*.") {
                Some(domain) => host.len() > domain.len() && host.ends_with(&format!(".{domain}")),
                None => host == pattern,
            };
            host_ok && want_port.is_none_or(|p| p == port)
        });
        if allowed {
            Ok(parsed)
        } else {
            Err(NetError::Denied(format!("host {host}:{port} is not in this plugin's allowed_hosts")))
        }
    }

    /// Whether a request to `url` may be made now: allowed host, and a token of the rate limit (taken).
    pub fn admit(&self, url: &str) -> Result<(), NetError> {
        self.check(url)?;
        if self.take_token() { Ok(()) } else { Err(NetError::RateLimited) }
    }

    /// The plugin's `http_timeout`.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn take_token(&self) -> bool {
        let Ok(mut b) = self.bucket.lock() else { return false };
        let now = Instant::now();
        let refill = now.duration_since(b.at).as_secs_f64() * b.rate;
        b.tokens = (b.tokens + refill).min(b.rate);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Sends `request`, waiting at most the plugin's timeout and never past `deadline`. Blocks the calling
    /// thread (plugins run on blocking threads), driving the request on the tokio runtime `rt`.
    pub fn send(&self, rt: &tokio::runtime::Handle, request: Request, deadline: Instant) -> Result<Response, NetError> {
        let (method, url) = (request.method.clone(), request.url.clone());
        let result = self.send_inner(rt, request, deadline);
        if let Ok(r) = &result {
            self.record(&method, &url, r);
        }
        self.note(&method, &url, result.as_ref().map(|r| r.status).map_err(NetError::describe));
        result
    }

    fn send_inner(
        &self,
        rt: &tokio::runtime::Handle,
        request: Request,
        deadline: Instant,
    ) -> Result<Response, NetError> {
        let url = self.check(&request.url)?;
        if let Some(mocked) =
            self.mock(&request.method, &request.url, &request.headers, request.body.as_deref().unwrap_or_default())
        {
            return mocked;
        }
        let method = reqwest::Method::from_bytes(request.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| NetError::Denied(format!("invalid method {:?}", request.method)))?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(NetError::Timeout);
        }
        if !self.take_token() {
            return Err(NetError::RateLimited);
        }
        let mut builder = self.client.request(method, url).timeout(self.timeout.min(left));
        for (k, v) in &request.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        if let Some(body) = request.body {
            builder = builder.body(body);
        }
        rt.block_on(async move {
            let response = builder.send().await.map_err(|e| describe(&e))?;
            let status = response.status().as_u16();
            let headers = response
                .headers()
                .iter()
                .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_owned(), v.to_owned())))
                .collect();
            let mut body = Vec::new();
            let mut response = response;
            while let Some(chunk) = response.chunk().await.map_err(|e| describe(&e))? {
                if body.len() + chunk.len() > MAX_RESPONSE {
                    return Err(NetError::Failed(format!("response body larger than {MAX_RESPONSE} bytes")));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Response { status, headers, body })
        })
    }
}

fn describe(e: &reqwest::Error) -> NetError {
    if e.is_timeout() {
        return NetError::Timeout;
    }
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    NetError::Failed(detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allow_listed_hosts_and_ports_pass() {
        let net = Net::new(
            vec!["api.clockify.me".into(), "*.example.com".into(), "127.0.0.1:8080".into()],
            Duration::from_secs(1),
            5,
        )
        .unwrap();
        for ok in [
            "https://api.clockify.me/api/v1/x",
            "http://a.example.com/",
            "https://a.b.example.com/",
            "http://127.0.0.1:8080/p",
        ] {
            assert!(net.check(ok).is_ok(), "{ok}");
        }
        for denied in [
            "https://evil.com/",
            "https://api.clockify.me.evil.com/",
            "https://example.com/",
            "http://127.0.0.1:8081/",
            "file:///etc/passwd",
            "ftp://api.clockify.me/",
            "not a url",
        ] {
            assert!(matches!(net.check(denied), Err(NetError::Denied(_))), "{denied}");
        }
    }

    #[test]
    fn the_rate_limit_allows_a_burst_then_refuses() {
        let net = Net::new(vec![], Duration::from_secs(1), 3).unwrap();
        assert!((0..3).all(|_| net.take_token()));
        assert!(!net.take_token());
    }

    #[test]
    fn a_mock_answers_the_first_exchange_whose_conditions_all_hold() {
        let exchange = |method: &str, body: Option<&str>, header: Option<(&str, &str)>, status: u16| Exchange {
            request: MockRequest {
                method: method.into(),
                url: "https://api.clockify.me/x?a=1".into(),
                headers: header.map(|(k, v)| (k.to_owned(), v.to_owned())).into_iter().collect(),
                body: body.map(str::to_owned),
            },
            response: MockResponse {
                status,
                headers: BTreeMap::new(),
                body: None,
                json: Some(serde_json::json!({"s": status})),
            },
        };
        let net = Net::new(vec!["api.clockify.me".into()], Duration::from_secs(1), 5).unwrap().for_test(
            Exchanges::Mock(vec![
                exchange("post", Some("{\"a\":1}"), None, 201),
                exchange("GET", None, Some(("x-api-key", "k")), 200),
                exchange("GET", None, None, 401),
            ]),
        );
        let url = "https://api.clockify.me/x?a=1";
        let key = [("X-Api-Key".to_owned(), "k".to_owned())];
        let status = |m: &str, h: &[(String, String)], b: &[u8]| net.mock(m, url, h, b).map(|r| r.map(|r| r.status));
        assert_eq!(status("POST", &[], b"{\"a\":1}"), Some(Ok(201)), "method in any case, body equal");
        assert!(
            matches!(status("POST", &[], b"{}"), Some(Err(NetError::Failed(m))) if m.contains("no mock exchange for POST"))
        );
        assert_eq!(status("GET", &key, b""), Some(Ok(200)), "header names in any case");
        assert_eq!(status("GET", &[], b""), Some(Ok(401)), "the next one when a header is missing");
        let answer = net.mock("GET", url, &key, b"").unwrap().unwrap();
        assert_eq!(
            (answer.body, answer.headers),
            (b"{\"s\":200}".to_vec(), vec![("content-type".into(), "application/json".into())])
        );
        assert!(
            net.mock("GET", "https://api.clockify.me/x", &key, b"").unwrap().is_err(),
            "the query is part of the URL"
        );
        assert!(
            Net::new(vec![], Duration::from_secs(1), 5).unwrap().mock("GET", url, &[], b"").is_none(),
            "not mocking"
        );
    }
}
