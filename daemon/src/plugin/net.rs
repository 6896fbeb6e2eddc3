//! The plugins' outbound HTTP: performed by the host, only to allow-listed hosts, with a timeout (never
//! beyond what is left of the invocation's time limit), a per-plugin rate limit, no redirects (a redirect
//! could leave the allow-list) and a bounded response body.

use std::sync::Mutex;
use std::time::{Duration, Instant};

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
        Ok(Net { client, allowed, timeout, bucket: Mutex::new(Bucket { rate, tokens: rate, at: Instant::now() }) })
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
        let url = self.check(&request.url)?;
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
}
