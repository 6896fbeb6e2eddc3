//! Clockify Marketplace add-ons: RS256 tokens (and every way to forge one), lifecycle calls kept durably,
//! per-webhook tokens, DELETED revoking them, and the manifest generated from the routes. The RSA keys are
//! made by the test (openssl) and thrown away.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

use crate::common::*;

pub fn keypair(dir: &Path, name: &str) -> (Vec<u8>, std::path::PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let ok = Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
        .arg(&key)
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok, "openssl genpkey");
    let ok =
        Command::new("openssl").args(["pkey", "-pubout", "-in"]).arg(&key).arg("-out").arg(&public).output().unwrap();
    assert!(ok.status.success(), "openssl pkey");
    (std::fs::read(&key).unwrap(), public)
}

pub fn claims(sub: &str, kind: &str, extra: Value) -> Value {
    let mut c = json!({"iss": "clockify", "sub": sub, "type": kind, "workspaceId": "ws1", "addonId": "inst1"});
    if let (Some(obj), Some(more)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in more {
            obj.insert(k.clone(), v.clone());
        }
    }
    c
}

pub fn rs256(key: &[u8], claims: &Value) -> String {
    encode(&Header::new(Algorithm::RS256), claims, &EncodingKey::from_rsa_pem(key).unwrap()).unwrap()
}

// Multi-threaded: the test waits on `hookbridge send` (a blocking child process) that talks to the bridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addon_tokens_lifecycle_and_manifest() {
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = keypair(keys.path(), "clockify");
    let (other_private, _) = keypair(keys.path(), "other");
    let receiver = Receiver::start().await;
    let toml = format!(
        r#"
[storage]
data_dir = "{{dir}}/data"
[sources.addon]
kind = "clockify-addon"
addon_key = "hookbridge-test"
name = "hookbridge test"
base_url = "https://bridge.example/hooks/addon"
scopes = ["TIME_ENTRY_READ"]
public_key_file = "{public}"
[sinks.out]
kind = "http"
url = "{url}"
[[routes]]
name = "entries"
sources = ["addon"]
events = ["NEW_TIME_ENTRY", "TIME_ENTRY_*"]
to = ["out"]
"#,
        public = public.display(),
        url = receiver.url()
    );
    let bridge = TestBridge::start(&toml).await;

    // The manifest lists the routed events.
    let manifest: Value = serde_json::from_str(
        &client().get(bridge.url("/hooks/addon/manifest")).send().await.unwrap().text().await.unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["key"], "hookbridge-test");
    assert_eq!(manifest["baseUrl"], "https://bridge.example/hooks/addon");
    let events: Vec<&str> =
        manifest["webhooks"].as_array().unwrap().iter().map(|w| w["event"].as_str().unwrap()).collect();
    assert_eq!(
        events,
        ["NEW_TIME_ENTRY", "TIME_ENTRY_UPDATED", "TIME_ENTRY_DELETED", "TIME_ENTRY_SPLIT", "TIME_ENTRY_RESTORED"]
    );
    assert_eq!(manifest["webhooks"][0]["path"], "/webhook/NEW_TIME_ENTRY");
    assert_eq!(manifest["lifecycle"][0], json!({"type": "INSTALLED", "path": "/lifecycle/installed"}));

    // INSTALLED, as Clockify sends it.
    let webhook_token = rs256(&private, &claims("hookbridge-test", "addon", json!({"webhook": "NEW_TIME_ENTRY"})));
    let lifecycle = |body: Value| {
        let token = rs256(&private, &claims("hookbridge-test", "addon", json!({})));
        let bridge = &bridge;
        async move {
            let path = format!("/hooks/addon/lifecycle/{}", body["kind"].as_str().unwrap());
            bridge
                .post(
                    &path,
                    &[("x-addon-lifecycle-token", token.as_str()), ("content-type", "application/json")],
                    body.to_string(),
                )
                .await
        }
    };
    let installed = json!({
        "kind": "installed", "addonId": "inst1", "authToken": "installation-token", "workspaceId": "ws1",
        "asUser": "u1", "apiUrl": "https://api.clockify.me/api", "addonUserId": "au1",
        "webhooks": [{"path": "https://bridge.example/hooks/addon/webhook/NEW_TIME_ENTRY", "webhookType": "ADDON", "authToken": webhook_token}],
    });
    assert_eq!(lifecycle(installed).await.0, 200);

    // The fixture's body, in the workspace the tokens were issued for.
    let body = String::from_utf8(read_fixture("clockify/NEW_TIME_ENTRY.json"))
        .unwrap()
        .replace("684446430300f917a02c198b", "ws1")
        .into_bytes();
    let post = |token: String| {
        let bridge = &bridge;
        let body = body.clone();
        async move {
            let mut headers =
                vec![("clockify-webhook-event-type", "NEW_TIME_ENTRY"), ("content-type", "application/json")];
            if !token.is_empty() {
                headers.push(("clockify-signature", token.as_str()));
            }
            bridge.post("/hooks/addon/webhook/NEW_TIME_ENTRY", &headers, body).await.0
        }
    };
    assert_eq!(post(webhook_token.clone()).await, 200);
    let got = receiver.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got[0].body.as_ref(), body.as_slice());
    assert!(got[0].headers.get("clockify-signature").is_none());

    // A webhook token is not a lifecycle token: it cannot pause, delete or re-install the installation.
    let as_lifecycle = |kind: &str, body: Value| {
        let (bridge, token) = (&bridge, webhook_token.clone());
        let path = format!("/hooks/addon/lifecycle/{kind}");
        async move { bridge.post(&path, &[("x-addon-lifecycle-token", token.as_str())], body.to_string()).await.0 }
    };
    assert_eq!(
        as_lifecycle("status-changed", json!({"addonId": "inst1", "workspaceId": "ws1", "status": "INACTIVE"})).await,
        401
    );
    assert_eq!(as_lifecycle("deleted", json!({"addonId": "inst1", "workspaceId": "ws1"})).await, 401);
    let foreign = json!({
        "addonId": "inst1", "authToken": "attacker-token", "workspaceId": "ws1",
        "webhooks": [{"path": "/webhook/NEW_TIME_ENTRY", "webhookType": "ADDON", "authToken": "attacker-webhook"}],
    });
    assert_eq!(as_lifecycle("installed", foreign).await, 401, "re-install with foreign tokens");
    // Nothing changed: the webhook is still routed (not paused) and its token still works.
    let (s, text) = bridge
        .post(
            "/hooks/addon/webhook/NEW_TIME_ENTRY",
            &[("clockify-webhook-event-type", "NEW_TIME_ENTRY"), ("clockify-signature", webhook_token.as_str())],
            r#"{"id":"still-routed","workspaceId":"ws1"}"#,
        )
        .await;
    assert_eq!((s, text.contains("accepted")), (200, true), "{text}");
    receiver.wait_for(2, Duration::from_secs(20)).await;
    // A body for another workspace than its token's is refused.
    let (s, _) = bridge
        .post(
            "/hooks/addon/webhook/NEW_TIME_ENTRY",
            &[("clockify-webhook-event-type", "NEW_TIME_ENTRY"), ("clockify-signature", webhook_token.as_str())],
            r#"{"id":"other-tenant","workspaceId":"ws2"}"#,
        )
        .await;
    assert_eq!(s, 401);
    let m = bridge.metrics().await;
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="not_a_lifecycle_token",source="addon"}"#), 3.0, "{m}");
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="workspace_mismatch",source="addon"}"#), 1.0, "{m}");

    // Valid JWTs that are not the stored token, and every kind of forgery: 401 each.
    let other_valid = rs256(&private, &claims("hookbridge-test", "addon", json!({"webhook": "other"})));
    let header_none = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims("hookbridge-test", "addon", json!({})).to_string());
    let alg_none = format!("{header_none}.{payload}.");
    let public_pem = std::fs::read(&public).unwrap();
    let hs256 = encode(
        &Header::new(Algorithm::HS256),
        &claims("hookbridge-test", "addon", json!({})),
        &EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    let mut wrong_iss = claims("hookbridge-test", "addon", json!({}));
    wrong_iss["iss"] = "someone".into();
    let expired = claims("hookbridge-test", "addon", json!({"exp": 1_000_000_000}));
    for (what, token) in [
        ("another valid token", other_valid),
        ("alg none", alg_none),
        ("HS256 with the public key", hs256),
        ("wrong iss", rs256(&private, &wrong_iss)),
        ("wrong sub", rs256(&private, &claims("someone-else", "addon", json!({})))),
        ("wrong type", rs256(&private, &claims("hookbridge-test", "user", json!({})))),
        ("expired", rs256(&private, &expired)),
        ("another key", rs256(&other_private, &claims("hookbridge-test", "addon", json!({})))),
        ("malformed", "not.a.jwt".to_owned()),
        ("missing", String::new()),
    ] {
        assert_eq!(post(token).await, 401, "{what}");
    }
    // The right token for another event's path.
    let r = bridge
        .post(
            "/hooks/addon/webhook/TIME_ENTRY_UPDATED",
            &[("clockify-webhook-event-type", "TIME_ENTRY_UPDATED"), ("clockify-signature", webhook_token.as_str())],
            body.clone(),
        )
        .await;
    assert_eq!(r.0, 401);
    // Event header and path disagree.
    let r = bridge
        .post(
            "/hooks/addon/webhook/NEW_TIME_ENTRY",
            &[("clockify-webhook-event-type", "TIME_ENTRY_UPDATED"), ("clockify-signature", webhook_token.as_str())],
            body.clone(),
        )
        .await;
    assert_eq!(r.0, 401);

    // INACTIVE pauses routing; ACTIVE resumes it.
    assert_eq!(
        lifecycle(json!({"kind": "status-changed", "addonId": "inst1", "workspaceId": "ws1", "status": "INACTIVE"}))
            .await
            .0,
        200
    );
    let (s, text) = bridge
        .post(
            "/hooks/addon/webhook/NEW_TIME_ENTRY",
            &[("clockify-webhook-event-type", "NEW_TIME_ENTRY"), ("clockify-signature", webhook_token.as_str())],
            r#"{"id":"paused-entry"}"#,
        )
        .await;
    assert_eq!((s, text.contains("unrouted")), (200, true), "{text}");
    assert_eq!(
        lifecycle(json!({"kind": "settings-updated", "addonId": "inst1", "workspaceId": "ws1", "settings": []}))
            .await
            .0,
        200
    );

    // DELETED revokes every token.
    assert_eq!(
        lifecycle(json!({"kind": "deleted", "addonId": "inst1", "workspaceId": "ws1", "asUser": "u1"})).await.0,
        200
    );
    assert_eq!(post(webhook_token.clone()).await, 401);
    // A lifecycle call with a forged token is refused too.
    let forged = rs256(&other_private, &claims("hookbridge-test", "addon", json!({})));
    let r =
        bridge.post("/hooks/addon/lifecycle/installed", &[("x-addon-lifecycle-token", forged.as_str())], "{}").await;
    assert_eq!(r.0, 401);

    // `hookbridge send` plays Clockify with the private key: it installs, then sends the webhook.
    let key_file = keys.path().join("clockify.key");
    // (A body of its own: the fixture was delivered already, and a repeat would be answered as a duplicate.)
    let fixture_path = keys.path().join("entry.json");
    std::fs::write(&fixture_path, r#"{"id":"sent-by-hookbridge-send","description":"test webhook"}"#).unwrap();
    let out = Command::new(binary())
        .args([
            "send",
            "--source",
            "addon",
            "--event",
            "NEW_TIME_ENTRY",
            "--url",
            &bridge.url("/hooks/addon"),
            "--private-key",
        ])
        .arg(&key_file)
        .arg("--config")
        .arg(bridge.config_file())
        .arg(&fixture_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("/hooks/addon/webhook/NEW_TIME_ENTRY -> 200"), "{stdout}");
    receiver.wait_for(3, Duration::from_secs(20)).await;

    // The installations are listed by the CLI, without their tokens.
    let listed = bridge.cli(&["installations"]);
    assert!(listed.contains("addon\tworkspace ws1\tinstallation inst1\tDELETED"), "{listed}");
    assert!(listed.contains("workspace hookbridge-send\tinstallation hookbridge-send\tACTIVE"), "{listed}");
    assert!(!listed.contains("installation-token"));

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.received().len(), 3, "the valid webhooks and the one `send` made, nothing else");
    let m = bridge.metrics().await;
    assert_eq!(metric(&m, r#"hookbridge_rejections_total{reason="not_installed",source="addon"}"#), 1.0, "{m}");
    assert!(!m.contains("installation-token"));
    bridge.stop().await;
    receiver.stop().await;
}
