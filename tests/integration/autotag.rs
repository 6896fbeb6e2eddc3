//! The auto-tag plugin against a test server implementing the Clockify endpoints it uses (tags lookup,
//! tag creation, time-entry update) and checking `X-Api-Key`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde_json::{Value, json};

use crate::common::*;
use crate::plugins::wasm;

const SECRET: &str = "autotag-secret";
/// The workspace of the NEW_TIME_ENTRY fixture.
const WORKSPACE: &str = "684446430300f917a02c198b";
const API_KEY: &str = "test-api-key-123";
const ADDON_TOKEN: &str = "installation-token-456";

#[derive(Default)]
struct Clockify {
    /// Tags by id.
    tags: Mutex<Vec<(String, String)>>,
    /// Every request: method and path with query.
    requests: Mutex<Vec<String>>,
    /// Time-entry updates received (after a 429, only the ones answered 200).
    updates: Mutex<Vec<Value>>,
    /// Answer the next N updates with 429.
    throttle: Mutex<usize>,
}

type Shared = Arc<Clockify>;

/// The API key, or the add-on installation's token.
fn authorised(h: &HeaderMap) -> bool {
    h.get("x-api-key").is_some_and(|v| v == API_KEY) || h.get("x-addon-token").is_some_and(|v| v == ADDON_TOKEN)
}

async fn find_tags(
    State(c): State<Shared>,
    Path(ws): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    h: HeaderMap,
) -> Response {
    c.requests.lock().unwrap().push(format!("GET tags?name={}", q.get("name").cloned().unwrap_or_default()));
    if !authorised(&h) {
        return (StatusCode::UNAUTHORIZED, axum::Json(json!({"message": "bad key", "code": 4003}))).into_response();
    }
    assert_eq!(q.get("strict-name-search").map(String::as_str), Some("true"));
    let name = q.get("name").cloned().unwrap_or_default();
    let found: Vec<Value> = c
        .tags
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, n)| n.eq_ignore_ascii_case(&name))
        .map(|(id, n)| json!({"id": id, "name": n, "workspaceId": ws, "archived": false}))
        .collect();
    axum::Json(found).into_response()
}

async fn create_tag(
    State(c): State<Shared>,
    Path(ws): Path<String>,
    h: HeaderMap,
    body: axum::Json<Value>,
) -> Response {
    let name = body["name"].as_str().unwrap().to_owned();
    c.requests.lock().unwrap().push(format!("POST tags {name}"));
    if !authorised(&h) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let id = format!("tag-{}", name.replace(' ', "-"));
    c.tags.lock().unwrap().push((id.clone(), name.clone()));
    (StatusCode::CREATED, axum::Json(json!({"id": id, "name": name, "workspaceId": ws, "archived": false})))
        .into_response()
}

async fn update_entry(
    State(c): State<Shared>,
    Path((_ws, id)): Path<(String, String)>,
    h: HeaderMap,
    body: axum::Json<Value>,
) -> Response {
    let auth = if h.contains_key("x-addon-token") { " (add-on token)" } else { "" };
    c.requests.lock().unwrap().push(format!("PUT time-entries/{id}{auth}"));
    if !authorised(&h) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    {
        let mut throttle = c.throttle.lock().unwrap();
        if *throttle > 0 {
            *throttle -= 1;
            return (StatusCode::TOO_MANY_REQUESTS, axum::Json(json!({"message": "slow down", "code": 429})))
                .into_response();
        }
    }
    c.updates.lock().unwrap().push(body.0.clone());
    let mut entry = body.0;
    entry["id"] = json!(id);
    axum::Json(entry).into_response()
}

async fn clockify() -> (Shared, std::net::SocketAddr) {
    let state: Shared = Arc::new(Clockify::default());
    state.tags.lock().unwrap().push(("tag-meeting".into(), "Meeting".into()));
    let app = Router::new()
        .route("/api/v1/workspaces/{ws}/tags", get(find_tags).post(create_tag))
        .route("/api/v1/workspaces/{ws}/time-entries/{id}", put(update_entry))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (state, addr)
}

fn config(base_url: &str, allowed: &str) -> String {
    format!(
        r#"
[storage]
data_dir = "{{dir}}/data"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
[plugins.auto-tag]
path = "{wasm}"
allowed_hosts = ["{allowed}"]
time_limit = "5s"
secrets = {{ api_key = "{API_KEY}" }}
retry = {{ initial_backoff = "100ms", max_backoff = "300ms", max_attempts = 5 }}
[plugins.auto-tag.config]
base_url = "{base_url}"
rules = [
    {{ tag = "meeting", keywords = ["meeting", "standup"] }},
    {{ tag = "bug-fix", patterns = ['\bbug\s*#?\d+'] }},
    {{ tag = "never", keywords = ["nothing-matches-this"] }},
]
[[routes]]
name = "tagging"
events = ["NEW_TIME_ENTRY", "TIMER_STOPPED", "TIME_ENTRY_UPDATED"]
to = ["auto-tag"]
"#,
        wasm = wasm("auto_tag").display()
    )
}

/// A NEW_TIME_ENTRY body (the fixture) with this id, description and tags.
fn entry(id: &str, description: &str, tag_ids: &[&str], end: Option<&str>) -> Value {
    let mut v: Value = serde_json::from_slice(&read_fixture("clockify/NEW_TIME_ENTRY.json")).unwrap();
    v["id"] = json!(id);
    v["description"] = json!(description);
    v["tagIds"] = json!(tag_ids);
    v["timeInterval"]["end"] = json!(end);
    v
}

async fn send(bridge: &TestBridge, event: &str, body: &Value) {
    let (s, _) = bridge.post("/hooks/clockify", &clockify_headers(SECRET, event), body.to_string()).await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_meeting_about_a_bug_gets_both_tags_and_the_update_does_not_loop() {
    let (c, addr) = clockify().await;
    let bridge = TestBridge::start(&config(&format!("http://{addr}/api/v1"), &addr.to_string())).await;
    let first = entry("entry-1", "Weekly meeting about bug 42", &["tag-existing"], Some("2025-06-16T18:53:00Z"));
    send(&bridge, "NEW_TIME_ENTRY", &first).await;
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="auto-tag"}"#, 1.0).await;

    let updates = c.updates.lock().unwrap().clone();
    assert_eq!(updates.len(), 1, "one update");
    let u = &updates[0];
    assert_eq!(u["tagIds"], json!(["tag-existing", "tag-meeting", "tag-bug-fix"]), "the union, existing first");
    // The entry's other fields go back unchanged.
    assert_eq!(u["start"], first["timeInterval"]["start"]);
    assert_eq!(u["end"], first["timeInterval"]["end"]);
    assert_eq!(u["billable"], first["billable"]);
    assert_eq!(u["description"], first["description"]);
    assert_eq!(u["projectId"], first["projectId"]);
    assert_eq!(u["taskId"], Value::Null, "the fixture has no task");
    assert_eq!(
        *c.requests.lock().unwrap(),
        ["GET tags?name=meeting", "GET tags?name=bug-fix", "POST tags bug-fix", "PUT time-entries/entry-1"],
        "the existing tag found, the missing one created"
    );

    // Its own update comes back as TIME_ENTRY_UPDATED with the tags set: no request at all.
    let mut echoed = first.clone();
    echoed["tagIds"] = u["tagIds"].clone();
    send(&bridge, "TIME_ENTRY_UPDATED", &echoed).await;
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="auto-tag"}"#, 2.0).await;
    assert_eq!(c.requests.lock().unwrap().len(), 4, "no request for an entry that already has its tags");

    // Another bug: the tag is not created again (nor looked up: its id is cached).
    let second = entry("entry-2", "Fix bug #7", &[], Some("2025-06-16T19:00:00Z"));
    send(&bridge, "NEW_TIME_ENTRY", &second).await;
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="auto-tag"}"#, 3.0).await;
    let requests = c.requests.lock().unwrap().clone();
    assert_eq!(requests[4..], ["PUT time-entries/entry-2"]);
    assert_eq!(requests.iter().filter(|r| r.starts_with("POST tags")).count(), 1, "created once");

    // A running timer (end: null) keeps running: the update has no `end`.
    let running = entry("entry-3", "standup", &[], None);
    send(&bridge, "TIMER_STOPPED", &running).await;
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="auto-tag"}"#, 4.0).await;
    let last = c.updates.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last["tagIds"], json!(["tag-meeting"]));
    assert!(last.get("end").is_none(), "{last}");

    // No rule matches: nothing happens.
    send(&bridge, "NEW_TIME_ENTRY", &entry("entry-4", "Reading", &[], Some("2025-06-16T20:00:00Z"))).await;
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="auto-tag"}"#, 5.0).await;
    assert_eq!(c.requests.lock().unwrap().len(), 6);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_from_clockify_is_retried_until_it_succeeds() {
    let (c, addr) = clockify().await;
    *c.throttle.lock().unwrap() = 1;
    let bridge = TestBridge::start(&config(&format!("http://{addr}/api/v1"), &addr.to_string())).await;
    send(&bridge, "NEW_TIME_ENTRY", &entry("entry-9", "Planning meeting", &[], Some("2025-06-16T18:53:00Z"))).await;
    let m = bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="auto-tag"}"#, 1.0).await;
    assert_eq!(metric(&m, r#"hookbridge_deliveries_total{outcome="retry",sink="auto-tag"}"#), 1.0);
    assert_eq!(metric(&m, r#"hookbridge_plugin_failures_total{kind="retryable",plugin="auto-tag"}"#), 1.0);
    let puts = c.requests.lock().unwrap().iter().filter(|r| r.starts_with("PUT")).count();
    assert_eq!(puts, 2, "refused once with 429, then accepted");
    assert_eq!(c.updates.lock().unwrap().len(), 1);
    assert_eq!(c.updates.lock().unwrap()[0]["tagIds"], json!(["tag-meeting"]));
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_that_is_not_allowed_is_refused_and_never_contacted() {
    let (c, addr) = clockify().await;
    // The API runs on `addr`, but only another host is allowed.
    let bridge = TestBridge::start(&config(&format!("http://{addr}/api/v1"), "api.clockify.me")).await;
    send(&bridge, "NEW_TIME_ENTRY", &entry("entry-5", "team meeting", &[], Some("2025-06-16T18:53:00Z"))).await;
    bridge.wait_metric(r#"hookbridge_dead_letters{sink="auto-tag"}"#, 1.0).await;
    let dlq = bridge.cli(&["dlq", "list"]);
    assert!(dlq.contains("is not in this plugin's allowed_hosts"), "{dlq}");
    assert!(c.requests.lock().unwrap().is_empty(), "the test server was never called");
    tokio::time::sleep(Duration::from_millis(100)).await;
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_an_api_key_an_addon_event_is_tagged_with_the_installation_token_and_api_url() {
    use crate::addon::{claims, keypair, rs256};
    let (c, addr) = clockify().await;
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = keypair(keys.path(), "clockify");
    let toml = format!(
        r#"
[storage]
data_dir = "{{dir}}/data"
[sources.addon]
kind = "clockify-addon"
addon_key = "hookbridge-test"
base_url = "https://bridge.example/hooks/addon"
public_key_file = "{public}"
[plugins.auto-tag]
path = "{wasm}"
allowed_hosts = ["{addr}"]
time_limit = "5s"
[plugins.auto-tag.config]
rules = [{{ tag = "meeting", keywords = ["meeting"] }}]
[[routes]]
name = "tagging"
sources = ["addon"]
events = ["NEW_TIME_ENTRY"]
to = ["auto-tag"]
"#,
        public = public.display(),
        wasm = wasm("auto_tag").display()
    );
    let bridge = TestBridge::start(&toml).await;
    // INSTALLED in the fixture's workspace, with the test server as the installation's API.
    let webhook_token = rs256(
        &private,
        &claims("hookbridge-test", "addon", json!({"webhook": "NEW_TIME_ENTRY", "workspaceId": WORKSPACE})),
    );
    let lifecycle_token = rs256(&private, &claims("hookbridge-test", "addon", json!({"workspaceId": WORKSPACE})));
    let installed = json!({
        "addonId": "inst1", "authToken": ADDON_TOKEN, "workspaceId": WORKSPACE, "asUser": "u1",
        "apiUrl": format!("http://{addr}/api"), "addonUserId": "au1",
        "webhooks": [{"path": "/webhook/NEW_TIME_ENTRY", "webhookType": "ADDON", "authToken": webhook_token}],
    });
    let headers = [("x-addon-lifecycle-token", lifecycle_token.as_str()), ("content-type", "application/json")];
    let (s, answer) = bridge.post("/hooks/addon/lifecycle/installed", &headers, installed.to_string()).await;
    assert_eq!(s, 200, "{answer}");

    let body = entry("entry-7", "Sprint meeting", &[], Some("2025-06-16T18:53:00Z"));
    let headers = [
        ("clockify-signature", webhook_token.as_str()),
        ("clockify-webhook-event-type", "NEW_TIME_ENTRY"),
        ("content-type", "application/json"),
    ];
    let (s, answer) = bridge.post("/hooks/addon/webhook/NEW_TIME_ENTRY", &headers, body.to_string()).await;
    assert_eq!(s, 200, "{answer}");
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="auto-tag"}"#, 1.0).await;
    assert_eq!(
        *c.requests.lock().unwrap(),
        ["GET tags?name=meeting", "PUT time-entries/entry-7 (add-on token)"],
        "called with the installation token, at the installation's API URL"
    );
    assert_eq!(c.updates.lock().unwrap()[0]["tagIds"], json!(["tag-meeting"]));
    bridge.stop().await;
}
