//! `hookbridge send`: sign a body exactly as the source's provider would and POST it (the operator's "test
//! webhook").

use std::time::Duration;

use bytes::Bytes;

use crate::config::{Config, Source};
use crate::verify::{Locator, Scheme};

/// What `send` did.
#[derive(Debug)]
pub struct SendResult {
    /// Where it was sent.
    pub url: String,
    /// HTTP status of the answer.
    pub status: u16,
    /// Body of the answer.
    pub body: String,
}

/// Why `send` could not send.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No such source.
    #[error("no source {0:?} in the config")]
    UnknownSource(String),
    /// The body file is unusable.
    #[error("{0}")]
    Body(String),
    /// The event type cannot be placed.
    #[error("{0}")]
    Event(String),
    /// The request failed.
    #[error("request to {url} failed: {source}")]
    Http {
        /// Target.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
}

/// A request as the provider would send it.
#[derive(Debug)]
pub struct SignedRequest {
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Bytes,
}

/// Signs `body` for `source` with its first secret, placing `event` where the scheme expects it.
pub fn sign(source: &Source, event: Option<&str>, body: &[u8]) -> Result<SignedRequest, SendError> {
    let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
    let need_event = || event.ok_or_else(|| SendError::Event(format!("source {} needs --event", source.id)));
    let body = match &source.scheme {
        Scheme::Clockify { secrets } => {
            headers.push(("clockify-signature".into(), first(secrets)?.expose().to_owned()));
            headers.push(("clockify-webhook-event-type".into(), need_event()?.to_owned()));
            headers.push(("user-agent".into(), "Vert.x-WebClient/4.2.5 (hookbridge send)".into()));
            Bytes::copy_from_slice(body)
        }
        Scheme::Clockodo { secrets } => {
            let mut v: serde_json::Value =
                serde_json::from_slice(body).map_err(|e| SendError::Body(format!("body is not JSON: {e}")))?;
            let obj = v.as_object_mut().ok_or_else(|| SendError::Body("a Clockodo body is a JSON object".into()))?;
            obj.insert("token".into(), first(secrets)?.expose().into());
            if let Some(e) = event {
                obj.insert("event_name".into(), e.into());
            } else if !obj.contains_key("event_name") {
                return Err(SendError::Event("the body has no event_name: pass --event".into()));
            }
            Bytes::from(serde_json::to_vec(&v).map_err(|e| SendError::Body(e.to_string()))?)
        }
        Scheme::Hmac(h) => {
            place_event(&h.event, event, body, &mut headers)?;
            let ts = h.timestamp.as_ref().map(|t| {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                (t.header.clone(), now.as_secs().to_string())
            });
            headers.push((h.header.clone(), h.sign_at(first(&h.secrets)?, ts.as_ref().map(|(_, v)| v.as_str()), body)));
            headers.extend(ts);
            Bytes::copy_from_slice(body)
        }
        Scheme::None { event: loc, .. } => {
            place_event(loc, event, body, &mut headers)?;
            Bytes::copy_from_slice(body)
        }
        Scheme::ClockifyAddon(_) => {
            return Err(SendError::Event("clockify-addon requests are sent by `send` with --private-key".into()));
        }
        Scheme::Standard(s) => {
            place_event(&s.event, event, body, &mut headers)?;
            let id = format!("msg_{}", uuid::Uuid::now_v7().simple());
            headers.extend(s.sign_headers(first(&s.secrets)?, &id, std::time::SystemTime::now(), body));
            Bytes::copy_from_slice(body)
        }
    };
    Ok(SignedRequest { headers, body })
}

/// The first secret that is usable now (a provider signs with its current secret).
fn first(secrets: &[crate::config::SecretString]) -> Result<&crate::config::SecretString, SendError> {
    let now = std::time::SystemTime::now();
    secrets
        .iter()
        .find(|s| s.usable_at(now))
        .ok_or_else(|| SendError::Event("the source has no secret usable now".into()))
}

fn place_event(
    loc: &Locator,
    event: Option<&str>,
    body: &[u8],
    headers: &mut Vec<(String, String)>,
) -> Result<(), SendError> {
    match loc {
        Locator::Header(h) => {
            let e = event.ok_or_else(|| SendError::Event(format!("pass --event (sent in header {h})")))?;
            headers.push((h.clone(), e.to_owned()));
        }
        Locator::Pointer(p) => {
            let v: serde_json::Value =
                serde_json::from_slice(body).map_err(|e| SendError::Body(format!("body is not JSON: {e}")))?;
            let found = v.pointer(p).and_then(|x| x.as_str()).map(str::to_owned);
            match (found, event) {
                (None, _) => {
                    return Err(SendError::Event(format!("the body has no event type at {p}")));
                }
                (Some(f), Some(e)) if f != e => {
                    return Err(SendError::Event(format!("--event {e} differs from the body's {f} at {p}")));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Plays Clockify for an add-on: an INSTALLED lifecycle call (workspace and installation `hookbridge-send`)
/// that registers a webhook token for `event`, then that webhook, both signed with `private_key` (the
/// counterpart of the source's configured public key). `base` is the source's URL.
async fn send_addon(
    client: &reqwest::Client,
    scheme: &crate::verify::AddonScheme,
    base: &str,
    event: &str,
    body: &[u8],
    private_key: &[u8],
) -> Result<SendResult, SendError> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let key = EncodingKey::from_rsa_pem(private_key).map_err(|e| SendError::Body(format!("--private-key: {e}")))?;
    let token = |purpose: &str| {
        let claims = serde_json::json!({
            "iss": "clockify", "sub": scheme.key, "type": "addon",
            "workspaceId": "hookbridge-send", "addonId": "hookbridge-send", "purpose": purpose,
            "nonce": uuid::Uuid::now_v7().to_string(),
        });
        encode(&Header::new(Algorithm::RS256), &claims, &key).map_err(|e| SendError::Body(format!("cannot sign: {e}")))
    };
    let webhook_token = token("webhook")?;
    let installed = serde_json::json!({
        "addonId": "hookbridge-send", "workspaceId": "hookbridge-send", "authToken": "hookbridge-send-installation",
        "asUser": "hookbridge-send", "apiUrl": "https://api.clockify.me/api",
        "webhooks": [{"path": format!("/webhook/{event}"), "webhookType": "ADDON", "authToken": webhook_token}],
    });
    let install_url = format!("{base}/lifecycle/installed");
    let r = client
        .post(&install_url)
        .header("x-addon-lifecycle-token", token("lifecycle")?)
        .header("content-type", "application/json")
        .body(installed.to_string())
        .send()
        .await
        .map_err(|e| SendError::Http { url: install_url.clone(), source: e })?;
    if !r.status().is_success() {
        let status = r.status().as_u16();
        return Ok(SendResult { url: install_url, status, body: r.text().await.unwrap_or_default() });
    }
    let url = format!("{base}/webhook/{event}");
    let response = client
        .post(&url)
        .header("clockify-signature", webhook_token)
        .header("clockify-webhook-event-type", event)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .map_err(|e| SendError::Http { url: url.clone(), source: e })?;
    let status = response.status().as_u16();
    Ok(SendResult { url, status, body: response.text().await.unwrap_or_default() })
}

/// The URL the daemon in `config` serves `source` at.
pub fn default_url(config: &Config, source: &Source) -> String {
    let mut addr = config.server.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{addr}{}", source.path)
}

/// Signs and sends a body to the daemon.
pub async fn send(
    config: &Config,
    source_id: &str,
    event: Option<&str>,
    body: &[u8],
    url: Option<&str>,
    private_key: Option<&[u8]>,
) -> Result<SendResult, SendError> {
    let source = config.sources.get(source_id).ok_or_else(|| SendError::UnknownSource(source_id.to_owned()))?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| SendError::Http { url: default_url(config, source), source: e })?;
    if let Scheme::ClockifyAddon(a) = &source.scheme {
        let key = private_key.ok_or_else(|| SendError::Event("a clockify-addon source needs --private-key".into()))?;
        let event = event.ok_or_else(|| SendError::Event(format!("source {} needs --event", source.id)))?;
        let base = url.map(str::to_owned).unwrap_or_else(|| default_url(config, source));
        return send_addon(&client, a, &base, event, body, key).await;
    }
    let signed = sign(source, event, body)?;
    let url = url.map(str::to_owned).unwrap_or_else(|| default_url(config, source));
    let mut request = client.post(&url).body(signed.body);
    for (k, v) in &signed.headers {
        request = request.header(k, v);
    }
    let response = request.send().await.map_err(|e| SendError::Http { url: url.clone(), source: e })?;
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    Ok(SendResult { url, status, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretString;
    use crate::verify::{HmacAlgorithm, HmacScheme, SignatureEncoding, verify};
    use axum::http::HeaderMap;

    fn source(scheme: Scheme) -> Source {
        Source {
            id: "s".into(),
            path: "/hooks/s".into(),
            scheme,
            dedup: Default::default(),
            metrics: Default::default(),
        }
    }

    fn headers(signed: &SignedRequest) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in &signed.headers {
            h.insert(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn what_send_signs_passes_verification() {
        let secrets = vec![SecretString::new("first"), SecretString::new("second")];
        let body = br#"{"id":"1","event":"TIME_ENTRY_CREATED"}"#;

        let clockify = source(Scheme::Clockify { secrets: secrets.clone() });
        let signed = sign(&clockify, Some("NEW_TIME_ENTRY"), body).unwrap();
        assert_eq!(verify(&clockify.scheme, &headers(&signed), &signed.body), Ok(Some(0)));
        assert_eq!(&signed.body[..], body);
        assert!(sign(&clockify, None, body).is_err(), "clockify needs --event");

        let clockodo = source(Scheme::Clockodo { secrets: secrets.clone() });
        let signed = sign(&clockodo, Some("entry.created"), b"{\"payload\":{}}").unwrap();
        assert_eq!(verify(&clockodo.scheme, &headers(&signed), &signed.body), Ok(Some(0)));
        let v: serde_json::Value = serde_json::from_slice(&signed.body).unwrap();
        assert_eq!(v["event_name"], "entry.created");
        assert!(sign(&clockodo, None, b"{}").is_err(), "no event_name anywhere");

        let hmac = source(Scheme::Hmac(HmacScheme::new(
            "x-sig",
            "sha256=".into(),
            SignatureEncoding::Hex,
            HmacAlgorithm::Sha256,
            secrets,
            Locator::Pointer("/event".into()),
            None,
        )));
        let signed = sign(&hmac, None, body).unwrap();
        assert_eq!(verify(&hmac.scheme, &headers(&signed), &signed.body), Ok(Some(0)));
        assert!(sign(&hmac, Some("OTHER"), body).is_err(), "--event must agree with the body");
    }
}
