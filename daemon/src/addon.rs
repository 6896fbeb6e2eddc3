//! Clockify Marketplace add-ons: installations (kept from the INSTALLED lifecycle call, durably), the
//! lifecycle endpoints, the per-webhook token check, and the manifest generated from the config.
//!
//! Paths under an add-on source's path `P`: `POST P/webhook/<EVENT>`, `POST P/lifecycle/installed`,
//! `.../deleted`, `.../status-changed`, `.../settings-updated`, and `GET P/manifest`.

use std::collections::HashMap;
use std::sync::RwLock;

use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::SecretString;
use crate::config::types::RouteConfig;
use crate::store::{Store, StoreError};
use crate::verify::{AddonScheme, VerifyError, matches_any, text_header};

/// Event names Clockify sends (PROTOCOLS.md); globs in routes are expanded against them for the manifest.
pub const CLOCKIFY_EVENTS: [&str; 50] = [
    "NEW_PROJECT",
    "PROJECT_UPDATED",
    "PROJECT_DELETED",
    "NEW_TASK",
    "TASK_UPDATED",
    "TASK_DELETED",
    "NEW_CLIENT",
    "CLIENT_UPDATED",
    "CLIENT_DELETED",
    "NEW_TAG",
    "TAG_UPDATED",
    "TAG_DELETED",
    "NEW_TIMER_STARTED",
    "TIMER_STOPPED",
    "NEW_TIME_ENTRY",
    "TIME_ENTRY_UPDATED",
    "TIME_ENTRY_DELETED",
    "TIME_ENTRY_SPLIT",
    "TIME_ENTRY_RESTORED",
    "NEW_INVOICE",
    "INVOICE_UPDATED",
    "USER_JOINED_WORKSPACE",
    "USER_DELETED_FROM_WORKSPACE",
    "USER_DEACTIVATED_ON_WORKSPACE",
    "USER_ACTIVATED_ON_WORKSPACE",
    "USER_EMAIL_CHANGED",
    "USER_UPDATED",
    "USERS_INVITED_TO_WORKSPACE",
    "LIMITED_USERS_ADDED_TO_WORKSPACE",
    "NEW_APPROVAL_REQUEST",
    "APPROVAL_REQUEST_STATUS_UPDATED",
    "TIME_OFF_REQUESTED",
    "TIME_OFF_REQUEST_UPDATED",
    "TIME_OFF_REQUEST_APPROVED",
    "TIME_OFF_REQUEST_REJECTED",
    "TIME_OFF_REQUEST_WITHDRAWN",
    "BALANCE_UPDATED",
    "USER_GROUP_CREATED",
    "USER_GROUP_UPDATED",
    "USER_GROUP_DELETED",
    "EXPENSE_CREATED",
    "EXPENSE_UPDATED",
    "EXPENSE_DELETED",
    "EXPENSE_RESTORED",
    "ASSIGNMENT_CREATED",
    "ASSIGNMENT_UPDATED",
    "ASSIGNMENT_DELETED",
    "ASSIGNMENT_PUBLISHED",
    "COST_RATE_UPDATED",
    "BILLABLE_RATE_UPDATED",
];

/// One webhook's token, from the INSTALLED call.
#[derive(Clone, Serialize, Deserialize)]
pub struct WebhookToken {
    /// The webhook's path as Clockify sent it (a full URL or the manifest path).
    pub path: String,
    /// Its token (a credential).
    #[serde(rename = "authToken")]
    pub auth_token: String,
}

/// An installation of the add-on in one workspace.
#[derive(Clone, Serialize, Deserialize)]
pub struct Installation {
    /// The installation id.
    pub addon_id: String,
    /// The workspace.
    pub workspace_id: String,
    /// The installation token for Clockify's API (a credential; never logged).
    pub auth_token: String,
    /// The API base URL for this installation.
    pub api_url: Option<String>,
    /// Per-webhook tokens.
    pub webhooks: Vec<WebhookToken>,
    /// `ACTIVE` or `INACTIVE` (STATUS_CHANGED); inactive installations' webhooks are not routed.
    pub status: String,
    /// The last SETTINGS_UPDATED settings (for plugins).
    pub settings: Option<serde_json::Value>,
    /// Set by DELETED: every token is invalid from then on.
    pub deleted: bool,
}

impl std::fmt::Debug for WebhookToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookToken").field("path", &self.path).field("auth_token", &"REDACTED").finish()
    }
}

impl std::fmt::Debug for Installation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installation")
            .field("addon_id", &self.addon_id)
            .field("workspace_id", &self.workspace_id)
            .field("auth_token", &"REDACTED")
            .field("status", &self.status)
            .field("deleted", &self.deleted)
            .finish_non_exhaustive()
    }
}

type Key = (String, String, String);

/// Installations by (source, workspace, add-on id): cached in memory, written through to the spool. Cheap to
/// clone (the clones share the cache).
#[derive(Default, Clone)]
pub struct Installations {
    map: std::sync::Arc<RwLock<HashMap<Key, Installation>>>,
}

impl std::fmt::Debug for Installations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.map.read().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("Installations").field("count", &n).finish()
    }
}

impl Installations {
    /// Loads every stored installation.
    pub async fn load(store: &Store) -> Result<Installations, StoreError> {
        let mut map = HashMap::new();
        for (source, workspace, addon, record) in store.installations().await? {
            match serde_json::from_str::<Installation>(&record) {
                Ok(i) => {
                    map.insert((source, workspace, addon), i);
                }
                Err(e) => tracing::error!(source, workspace, error = %e, "unreadable add-on installation record"),
            }
        }
        Ok(Installations { map: std::sync::Arc::new(RwLock::new(map)) })
    }

    /// Keeps the installations as the store has them when others change them (cluster mode: a lifecycle
    /// call taken by another node), until `cancel`.
    pub fn follow(&self, store: &Store, cancel: tokio_util::sync::CancellationToken) {
        let Some(mut changes) = store.installation_changes() else { return };
        let (store, map) = (store.clone(), std::sync::Arc::clone(&self.map));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
                // A failed read is tried again a second later (the database may be away).
                loop {
                    match Installations::load(&store).await {
                        Ok(fresh) => {
                            let fresh = fresh.map.read().map(|m| m.clone()).unwrap_or_default();
                            if let Ok(mut m) = map.write() {
                                *m = fresh;
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the add-on installations again; retrying");
                            tokio::select! {
                                _ = cancel.cancelled() => return,
                                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                            }
                        }
                    }
                }
            }
        });
    }

    /// The active (not inactive, not deleted) installation of `source`'s add-on in `workspace`.
    pub fn active(&self, source: &str, workspace: &str) -> Option<Installation> {
        let map = self.map.read().ok()?;
        map.iter()
            .find(|((s, w, _), i)| s == source && w == workspace && !i.deleted && i.status != "INACTIVE")
            .map(|(_, i)| i.clone())
    }

    fn get(&self, key: &Key) -> Option<Installation> {
        self.map.read().ok()?.get(key).cloned()
    }

    async fn put(&self, store: &Store, source: &str, i: Installation) -> Result<(), StoreError> {
        let record = serde_json::to_string(&i).map_err(|e| StoreError::Schema(e.to_string()))?;
        store.save_installation(source, &i.workspace_id, &i.addon_id, record).await?;
        if let Ok(mut m) = self.map.write() {
            m.insert((source.to_owned(), i.workspace_id.clone(), i.addon_id.clone()), i);
        }
        Ok(())
    }
}

/// How an add-on request was answered without going on to the spool.
#[derive(Debug)]
pub enum Outcome {
    /// A lifecycle call, handled: answer 200.
    Lifecycle(&'static str),
    /// Refused: 401, with a reason for logs and metrics.
    Unauthorized(&'static str),
    /// A malformed lifecycle body: 400.
    BadRequest(String),
    /// No such add-on path: 404.
    NotFound,
    /// The installation could not be stored: 503.
    Unavailable(StoreError),
}

fn claims_of(scheme: &AddonScheme, token: Option<&str>) -> Result<(String, String), &'static str> {
    let token = token.ok_or("missing_signature")?;
    let claims = scheme.verify_token(token).map_err(VerifyError::reason)?;
    match (claims.workspace_id, claims.addon_id) {
        (Some(w), Some(a)) => Ok((w, a)),
        _ => Err("bad_signature"),
    }
}

/// The URL path of a webhook path as Clockify sent it (a full URL or a manifest path).
fn path_part(p: &str) -> &str {
    match p.find("://") {
        Some(i) => p[i + 3..].find('/').map(|j| &p[i + 3 + j..]).unwrap_or("/"),
        None => p,
    }
}

/// A request to an add-on source.
#[derive(Debug)]
pub struct Request<'a> {
    /// Source id.
    pub source: &'a str,
    /// Its scheme.
    pub scheme: &'a AddonScheme,
    /// The whole request path.
    pub path: &'a str,
    /// The part after the source's path, e.g. `/webhook/NEW_TIME_ENTRY`.
    pub sub: &'a str,
    /// Headers.
    pub headers: &'a HeaderMap,
    /// Raw body.
    pub body: &'a [u8],
}

/// What the headers of an add-on request prove, before its body is read.
#[derive(Debug)]
pub enum Early {
    /// A webhook, verified against its installation; its body's `workspaceId` and `addonId`, where present,
    /// must still match these claims of its token ([`body_matches_claims`]).
    Webhook {
        /// Routing is paused for the workspace.
        paused: bool,
        /// The token's `workspaceId`.
        workspace: String,
        /// The token's `addonId`.
        addon: String,
    },
    /// A lifecycle call whose token is valid: [`lifecycle`] handles it once the body is in.
    Lifecycle,
}

/// Checks what can be checked from the headers alone: a webhook completely (its token is in a header), a
/// lifecycle call's token. `Err` is the answer to give without reading the body.
pub fn check_headers(
    scheme: &AddonScheme,
    installations: &Installations,
    (source, request_path, sub): (&str, &str, &str),
    headers: &HeaderMap,
) -> Result<Early, Outcome> {
    if let Some(event) = sub.strip_prefix("/webhook/") {
        let token = text_header(headers, "clockify-signature");
        let (workspace, addon) = claims_of(scheme, token).map_err(Outcome::Unauthorized)?;
        if text_header(headers, "clockify-webhook-event-type") != Some(event) {
            return Err(Outcome::Unauthorized("unexpected_event"));
        }
        let Some(inst) = installations.get(&(source.to_owned(), workspace.clone(), addon.clone())) else {
            return Err(Outcome::Unauthorized("not_installed"));
        };
        if inst.deleted {
            return Err(Outcome::Unauthorized("not_installed"));
        }
        let expected: Vec<SecretString> = inst
            .webhooks
            .iter()
            .filter(|w| {
                let p = path_part(&w.path);
                p.len() > 1 && (request_path.ends_with(p) || p.ends_with(sub))
            })
            .map(|w| SecretString::new(w.auth_token.clone()))
            .collect();
        if expected.is_empty() || !matches_any(token.unwrap_or("").as_bytes(), &expected) {
            return Err(Outcome::Unauthorized("token_mismatch"));
        }
        return Ok(Early::Webhook { paused: inst.status == "INACTIVE", workspace, addon });
    }
    let Some(kind) = sub.strip_prefix("/lifecycle/") else { return Err(Outcome::NotFound) };
    if !matches!(kind, "installed" | "deleted" | "status-changed" | "settings-updated") {
        return Err(Outcome::NotFound);
    }
    claims_of(scheme, text_header(headers, "x-addon-lifecycle-token")).map_err(Outcome::Unauthorized)?;
    Ok(Early::Lifecycle)
}

/// Whether a webhook body's top-level `workspaceId` and `addonId`, where present, are the ones its token
/// was issued for: a token of one installation must not carry another tenant's events. `Err` is the reason.
pub fn body_matches_claims(body: &[u8], workspace: &str, addon: &str) -> Result<(), &'static str> {
    for (field, claim, reason) in
        [("workspaceId", workspace, "workspace_mismatch"), ("addonId", addon, "addon_mismatch")]
    {
        // Not JSON, or no such field: classification decides about the body.
        if let Ok(Ok(serde_json::Value::String(v))) = crate::template::find(body, &[field.to_owned()])
            && v != claim
        {
            return Err(reason);
        }
    }
    Ok(())
}

/// Handles a lifecycle call (its headers passed [`check_headers`]): installs, updates or deletes the
/// installation.
///
/// Clockify's documented claims (`iss`, `sub`, `type`, `workspaceId`, `addonId`) are the same for lifecycle
/// and webhook tokens, so they cannot tell the two apart: a lifecycle token equal to a token Clockify gave this
/// installation (a per-webhook token, which never expires, or the installation token) is refused, so that
/// holding one webhook token does not let anyone pause, delete or re-install the installation.
pub async fn lifecycle(store: &Store, installations: &Installations, req: Request<'_>) -> Outcome {
    let Request { source, scheme, path: _, sub, headers, body } = req;
    let presented = text_header(headers, "x-addon-lifecycle-token").unwrap_or("");
    let Some(kind) = sub.strip_prefix("/lifecycle/") else { return Outcome::NotFound };
    if !matches!(kind, "installed" | "deleted" | "status-changed" | "settings-updated") {
        return Outcome::NotFound;
    }
    let (workspace, addon) = match claims_of(scheme, text_header(headers, "x-addon-lifecycle-token")) {
        Ok(c) => c,
        Err(reason) => return Outcome::Unauthorized(reason),
    };
    let body: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Outcome::BadRequest(format!("body is not valid JSON: {e}")),
    };
    let field = |name: &str| body.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    if field("workspaceId").is_some_and(|w| w != workspace) || field("addonId").is_some_and(|a| a != addon) {
        return Outcome::Unauthorized("claims_mismatch");
    }
    let key = (source.to_owned(), workspace.clone(), addon.clone());
    if let Some(inst) = installations.get(&key)
        && !inst.deleted
    {
        let issued: Vec<SecretString> = std::iter::once(inst.auth_token.clone())
            .chain(inst.webhooks.iter().map(|w| w.auth_token.clone()))
            .map(SecretString::new)
            .collect();
        if matches_any(presented.as_bytes(), &issued) {
            return Outcome::Unauthorized("not_a_lifecycle_token");
        }
    }
    let updated = match kind {
        "installed" => {
            #[derive(Deserialize)]
            struct Installed {
                #[serde(rename = "authToken")]
                auth_token: String,
                #[serde(rename = "apiUrl", default)]
                api_url: Option<String>,
                #[serde(default)]
                webhooks: Vec<WebhookToken>,
            }
            let i: Installed = match serde_json::from_value(body.clone()) {
                Ok(i) => i,
                Err(e) => return Outcome::BadRequest(format!("INSTALLED body: {e}")),
            };
            Installation {
                addon_id: addon,
                workspace_id: workspace,
                auth_token: i.auth_token,
                api_url: i.api_url,
                webhooks: i.webhooks,
                status: "ACTIVE".into(),
                settings: None,
                deleted: false,
            }
        }
        other => {
            let Some(mut inst) = installations.get(&key) else { return Outcome::Unauthorized("not_installed") };
            match other {
                "deleted" => inst.deleted = true,
                "status-changed" => match field("status").as_deref() {
                    Some(s @ ("ACTIVE" | "INACTIVE")) => inst.status = s.to_owned(),
                    _ => return Outcome::BadRequest("STATUS_CHANGED needs status ACTIVE or INACTIVE".into()),
                },
                _ => inst.settings = body.get("settings").cloned(),
            }
            inst
        }
    };
    match installations.put(store, source, updated).await {
        Ok(()) => {
            tracing::info!(source, workspace = %key.1, lifecycle = kind, "add-on lifecycle call applied");
            Outcome::Lifecycle(match kind {
                "installed" => "installed",
                "deleted" => "deleted",
                "status-changed" => "status changed",
                _ => "settings updated",
            })
        }
        Err(e) => Outcome::Unavailable(e),
    }
}

/// The add-on manifest for `source`: key, name, base URL, scopes, lifecycle paths, and one webhook per
/// Clockify event that a route of this source takes (globs expanded against [`CLOCKIFY_EVENTS`]).
pub fn manifest(source: &str, scheme: &AddonScheme, routes: &[RouteConfig]) -> serde_json::Value {
    let mut events: Vec<&str> = Vec::new();
    for r in routes.iter().filter(|r| r.sources.is_empty() || r.sources.iter().any(|s| s == source)) {
        let patterns: Vec<&str> =
            if r.events.is_empty() { vec!["*"] } else { r.events.iter().map(String::as_str).collect() };
        for p in patterns {
            let Ok(glob) = globset::Glob::new(p).map(|g| g.compile_matcher()) else { continue };
            for e in CLOCKIFY_EVENTS.iter().filter(|e| glob.is_match(e)) {
                if !events.contains(e) {
                    events.push(e);
                }
            }
        }
    }
    json!({
        "schemaVersion": "1.3",
        "key": scheme.key,
        "name": scheme.name,
        "baseUrl": scheme.base_url,
        "scopes": scheme.scopes,
        "lifecycle": [
            {"type": "INSTALLED", "path": "/lifecycle/installed"},
            {"type": "DELETED", "path": "/lifecycle/deleted"},
            {"type": "STATUS_CHANGED", "path": "/lifecycle/status-changed"},
            {"type": "SETTINGS_UPDATED", "path": "/lifecycle/settings-updated"},
        ],
        "webhooks": events.iter().map(|e| json!({"event": e, "path": format!("/webhook/{e}")})).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn installations_survive_a_restart_without_tokens_in_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let installations = Installations::load(&store).await.unwrap();
        let inst = Installation {
            addon_id: "inst1".into(),
            workspace_id: "ws1".into(),
            auth_token: "installation-secret".into(),
            api_url: Some("https://api.clockify.me/api".into()),
            webhooks: vec![WebhookToken {
                path: "/webhook/NEW_TIME_ENTRY".into(),
                auth_token: "webhook-secret".into(),
            }],
            status: "ACTIVE".into(),
            settings: None,
            deleted: false,
        };
        assert!(!format!("{inst:?}").contains("secret"));
        installations.put(&store, "addon", inst).await.unwrap();
        store.close().await;
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        let again = Installations::load(&store).await.unwrap();
        let got = again.get(&("addon".into(), "ws1".into(), "inst1".into())).unwrap();
        assert_eq!(
            (got.auth_token.as_str(), got.webhooks[0].auth_token.as_str()),
            ("installation-secret", "webhook-secret")
        );
        assert_eq!((got.status.as_str(), got.deleted), ("ACTIVE", false));
        store.close().await;
    }

    #[test]
    fn webhook_paths_match_as_urls_or_manifest_paths() {
        assert_eq!(path_part("https://bridge.example/hooks/addon/webhook/X"), "/hooks/addon/webhook/X");
        assert_eq!(path_part("/webhook/X"), "/webhook/X");
        assert_eq!(path_part("https://bridge.example"), "/");
    }
}
