//! Posts a chat message for each event, in the shape of Slack's incoming webhooks (`{"text": "..."}`; most
//! chat tools accept it), through the standard `wasi:http/outgoing-handler` rather than hookbridge's own
//! `http` import: the daemon holds both to the plugin's `allowed_hosts`, rate limit and time budget.
//!
//! Config: `{ url = "https://hooks.slack.com/services/...", prefix = "hookbridge" }` (`prefix` optional).
//! The message is `<prefix>: <event type> <id>` plus the body's `description`, when it has one. A `2xx` is
//! done; `429` and `5xx` are retried; any other status, or a host the daemon refuses, is a permanent error.

use hookbridge_plugin::serde_json::{self, Value};
use hookbridge_plugin::{Action, Error, Event, Plugin, parse_config};
use serde::Deserialize;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, Scheme};

/// The plugin, built from its config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Notifier {
    /// Where to post.
    url: String,
    /// The start of every message.
    #[serde(default = "default_prefix")]
    prefix: String,
}

fn default_prefix() -> String {
    "hookbridge".to_owned()
}

/// A URL split the way `wasi:http` takes it.
struct Target<'a> {
    scheme: Scheme,
    authority: &'a str,
    path: &'a str,
}

fn split(url: &str) -> Option<Target<'_>> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else {
        (Scheme::Http, url.strip_prefix("http://")?)
    };
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
    (!authority.is_empty()).then_some(Target { scheme, authority, path })
}

impl Plugin for Notifier {
    fn init(config: Value) -> Result<Self, Error> {
        let plugin: Self = parse_config(config)?;
        if split(&plugin.url).is_none() {
            return Err(Error::invalid_config(format!("`url` must be an http(s) URL, not {:?}", plugin.url)));
        }
        Ok(plugin)
    }

    fn handle(&self, event: Event) -> Result<Vec<Action>, Error> {
        let description = event
            .json()
            .ok()
            .and_then(|body: Value| body["description"].as_str().map(str::to_owned))
            .filter(|d| !d.is_empty());
        let mut text = format!("{}: {} {}", self.prefix, event.event_type, event.id);
        if let Some(d) = description {
            text.push_str(&format!(": {d}"));
        }
        let body = serde_json::to_vec(&serde_json::json!({ "text": text }))
            .map_err(|e| Error::permanent(format!("cannot encode the message: {e}")))?;
        let status = post(&self.url, &body)?;
        match status {
            200..=299 => Ok(vec![]),
            429 | 500..=599 => Err(Error::retryable(format!("the chat answered {status}"))),
            _ => Err(Error::permanent(format!("the chat answered {status}"))),
        }
    }
}

/// POSTs `body` as JSON to `url`; the response status.
fn post(url: &str, body: &[u8]) -> Result<u16, Error> {
    let target = split(url).ok_or_else(|| Error::permanent("bad url"))?;
    let headers = Fields::from_list(&[("content-type".to_owned(), b"application/json".to_vec())])
        .map_err(|e| Error::permanent(format!("headers: {e:?}")))?;
    let request = OutgoingRequest::new(headers);
    let set = request.set_method(&Method::Post).is_ok()
        && request.set_scheme(Some(&target.scheme)).is_ok()
        && request.set_authority(Some(target.authority)).is_ok()
        && request.set_path_with_query(Some(target.path)).is_ok();
    if !set {
        return Err(Error::permanent(format!("cannot make a request for {url}")));
    }
    let outgoing = request.body().map_err(|()| Error::permanent("request body taken twice"))?;
    {
        let stream = outgoing.write().map_err(|()| Error::permanent("request body stream taken twice"))?;
        for chunk in body.chunks(4096) {
            stream.blocking_write_and_flush(chunk).map_err(|e| Error::retryable(format!("sending the body: {e:?}")))?;
        }
    }
    OutgoingBody::finish(outgoing, None).map_err(|e| failed(&e))?;
    let future = outgoing_handler::handle(request, None).map_err(|e| failed(&e))?;
    let response = loop {
        if let Some(answer) = future.get() {
            break answer.map_err(|()| Error::retryable("the response was taken twice"))?.map_err(|e| failed(&e))?;
        }
        future.subscribe().block();
    };
    Ok(response.status())
}

/// The daemon's refusal is permanent (the allow-list will not change by itself); anything else may pass.
fn failed(e: &ErrorCode) -> Error {
    match e {
        ErrorCode::HttpRequestDenied => Error::permanent("the daemon refused the request: host not in allowed_hosts"),
        other => Error::retryable(format!("request failed: {other:?}")),
    }
}

hookbridge_plugin::export!(Notifier);
