//! The event as hookbridge keeps it: what arrived, verified and classified, plus its identity.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// One accepted webhook.
#[derive(Debug, Clone)]
pub struct Event {
    /// Unique id (UUIDv7, time-ordered), also sent as CloudEvents `id`.
    pub id: String,
    /// Source id.
    pub source: String,
    /// Event type, e.g. `NEW_TIME_ENTRY` or `entry.created`.
    pub event_type: String,
    /// When hookbridge received it, in milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// Headers worth keeping (lower-case names; credentials never kept).
    pub headers: Vec<(String, String)>,
    /// The raw body, byte for byte.
    pub body: Bytes,
    /// Key that identifies a provider retry of the same event (derived per scheme).
    pub dedup_key: String,
    /// Events with the same ordering key reach each sink in receive order (the entity they are about, e.g.
    /// `clockify:<time entry id>`); `None`: no constraint.
    pub ordering_key: Option<String>,
    /// The body was checked to be JSON when it arrived (classification refuses whatever `serde_json::Value`
    /// refuses), so a sink may embed it without parsing it again. `false` is always safe: the sink checks.
    pub body_is_json: bool,
}

impl Event {
    /// The `content-type` the provider sent, or `application/json`.
    pub fn content_type(&self) -> &str {
        self.headers.iter().find(|(k, _)| k == "content-type").map(|(_, v)| v.as_str()).unwrap_or("application/json")
    }

    /// Receive time as RFC 3339 with milliseconds (CloudEvents `time`).
    pub fn time_rfc3339(&self) -> String {
        let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(self.received_at_ms).unwrap_or(0));
        humantime::format_rfc3339_millis(t).to_string()
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
