//! Tags Clockify time entries: matches an entry's description (and, if configured, its project and task
//! names) against rules, then sets the matching tags on the entry through the Clockify API.
//!
//! ```toml
//! [plugins.auto-tag]
//! path = "auto_tag.wasm"
//! allowed_hosts = ["api.clockify.me"]
//! time_limit = "10s"                                     # a few API calls per event
//! secrets = { api_key = "${CLOCKIFY_API_KEY}" }
//! config = { rules = [
//!     { tag = "meeting", keywords = ["meeting", "standup"] },
//!     { tag = "bug-fix", patterns = ['\bbug\s*#?\d+'] },
//! ] }
//! ```
//!
//! Tags are looked up by name (`GET /workspaces/{ws}/tags?name=..&strict-name-search=true`), created when
//! missing (`POST /workspaces/{ws}/tags`), and their ids cached in the key-value store. The entry is updated
//! with `PUT /workspaces/{ws}/time-entries/{id}`, re-sending its other fields, only when a tag is missing: so
//! the `TIME_ENTRY_UPDATED` that the update itself fires changes nothing and makes no request (no loop).
//! A 429 or 5xx from Clockify fails the delivery as retryable (the daemon retries it later); other errors
//! are permanent.
//!
//! Auth: the `api_key` (sent as `X-Api-Key`, to `base_url`); without one, for events that came through a
//! `clockify-addon` source, the add-on's installation token (`X-Addon-Token`, to the installation's `apiUrl`).

use hookbridge_plugin::http::{Request, Response};
use hookbridge_plugin::serde_json::{Value, json};
use hookbridge_plugin::{Action, Error, Event, Plugin, addon, kv, log, parse_config};
use regex::{Regex, RegexBuilder};
use serde::Deserialize;

/// The plugin's `config`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Clockify API key (put it in the plugin's `secrets`, not in `config`); none: the add-on's token.
    api_key: Option<String>,
    /// API base URL with an API key; regional workspaces use e.g. `https://euc1.clockify.me/api/v1`.
    #[serde(default = "default_base_url")]
    base_url: String,
    /// Events to act on.
    #[serde(default = "default_events")]
    events: Vec<String>,
    /// Also match the project name, and the task name.
    #[serde(default)]
    match_project: bool,
    #[serde(default)]
    match_task: bool,
    rules: Vec<Rule>,
}

/// One rule: the tag to set when any keyword (a whole word) or pattern matches, case-insensitively.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    tag: String,
    #[serde(default)]
    keywords: Vec<String>,
    #[serde(default)]
    patterns: Vec<String>,
}

fn default_base_url() -> String {
    "https://api.clockify.me/api/v1".to_owned()
}

fn default_events() -> Vec<String> {
    ["NEW_TIME_ENTRY", "TIMER_STOPPED", "TIME_ENTRY_UPDATED"].map(String::from).to_vec()
}

/// The fields of a time entry that we read, and re-send in the update.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    id: String,
    workspace_id: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    tag_ids: Option<Vec<String>>,
    project_id: Option<String>,
    task_id: Option<String>,
    #[serde(default)]
    billable: bool,
    time_interval: Interval,
    project: Option<Named>,
    task: Option<Named>,
}

#[derive(Debug, Deserialize)]
struct Interval {
    start: String,
    end: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Named {
    name: Option<String>,
}

struct AutoTag {
    config: Config,
    /// One regex per rule: its keywords as whole words, and its patterns.
    matchers: Vec<(String, Regex)>,
}

/// Where and how to call Clockify for one event.
struct Api {
    base: String,
    auth: (&'static str, String),
}

impl Plugin for AutoTag {
    fn init(config: Value) -> Result<Self, Error> {
        let config: Config = parse_config(config)?;
        let mut matchers = Vec::new();
        for rule in &config.rules {
            let mut alternatives: Vec<String> =
                rule.keywords.iter().map(|k| format!(r"\b{}\b", regex::escape(k.trim()))).collect();
            alternatives.extend(rule.patterns.iter().cloned());
            if rule.tag.trim().is_empty() || alternatives.is_empty() {
                return Err(Error::invalid_config("every rule needs a `tag` and at least one keyword or pattern"));
            }
            let regex = RegexBuilder::new(&alternatives.join("|"))
                .case_insensitive(true)
                .build()
                .map_err(|e| Error::invalid_config(format!("rule for tag {:?}: {e}", rule.tag)))?;
            matchers.push((rule.tag.trim().to_owned(), regex));
        }
        Ok(AutoTag { config, matchers })
    }

    fn handle(&self, event: Event) -> Result<Vec<Action>, Error> {
        if !self.config.events.contains(&event.event_type) {
            return Ok(vec![]);
        }
        let entry: Entry = event.body_json()?;
        let mut text = entry.description.clone();
        for (on, named) in [(self.config.match_project, &entry.project), (self.config.match_task, &entry.task)] {
            if let Some(name) = named.as_ref().and_then(|n| n.name.as_deref()).filter(|_| on) {
                text.push('\n');
                text.push_str(name);
            }
        }
        let wanted: Vec<&str> =
            self.matchers.iter().filter(|(_, re)| re.is_match(&text)).map(|(tag, _)| tag.as_str()).collect();
        if wanted.is_empty() {
            return Ok(vec![]);
        }
        let api = self.api(&entry.workspace_id)?;
        let mut tag_ids = entry.tag_ids.clone().unwrap_or_default();
        let before = tag_ids.len();
        for name in &wanted {
            let id = api.tag_id(&entry.workspace_id, name)?;
            if !tag_ids.contains(&id) {
                tag_ids.push(id);
            }
        }
        if tag_ids.len() == before {
            log::debug(format_args!("entry {} already has {wanted:?}", entry.id));
            return Ok(vec![]);
        }
        // The whole entry goes back: fields left out may be cleared. A running timer has no `end`, and
        // stays running.
        let mut update = json!({
            "start": entry.time_interval.start,
            "billable": entry.billable,
            "description": entry.description,
            "projectId": entry.project_id,
            "taskId": entry.task_id,
            "tagIds": tag_ids,
        });
        if let Some(end) = &entry.time_interval.end {
            update["end"] = json!(end);
        }
        let path = format!("/workspaces/{}/time-entries/{}", entry.workspace_id, entry.id);
        api.call(Request::put(api.url(&path)).json_body(&update)?)?;
        log::info(format_args!("tagged entry {} with {wanted:?}", entry.id));
        Ok(vec![])
    }
}

impl AutoTag {
    /// The API key and base URL, or else the add-on installation of the event's workspace.
    fn api(&self, workspace: &str) -> Result<Api, Error> {
        if let Some(key) = &self.config.api_key {
            return Ok(Api { base: self.config.base_url.clone(), auth: ("X-Api-Key", key.clone()) });
        }
        let install = addon::installation(workspace).ok_or_else(|| {
            Error::permanent(format!(
                "no api_key configured, and no active add-on installation in workspace {workspace}"
            ))
        })?;
        let api_url = install.api_url.as_deref().unwrap_or("https://api.clockify.me/api").trim_end_matches('/');
        Ok(Api { base: format!("{api_url}/v1"), auth: ("X-Addon-Token", install.token) })
    }
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base.trim_end_matches('/'))
    }

    /// Sends a request with the credentials; 429 and 5xx are retryable, other failures permanent.
    fn call(&self, request: Request) -> Result<Response, Error> {
        let response = request.header(self.auth.0, &self.auth.1).send()?;
        match response.status {
            200..=299 => Ok(response),
            429 => Err(Error::retryable("Clockify rate limit (429); retrying later")),
            s if s >= 500 => Err(Error::retryable(format!("Clockify answered {s}"))),
            s => Err(Error::permanent(format!("Clockify answered {s}: {}", response.text().unwrap_or_default()))),
        }
    }

    /// The id of tag `name` in workspace `ws`: from the cache, else looked up, else created.
    fn tag_id(&self, ws: &str, name: &str) -> Result<String, Error> {
        let key = format!("tag/{ws}/{}", name.to_lowercase());
        if let Some(id) = kv::get(&key).and_then(|v| String::from_utf8(v).ok()) {
            return Ok(id);
        }
        let query = format!("/workspaces/{ws}/tags?name={}&strict-name-search=true", encode(name));
        let found: Vec<Tag> = self.call(Request::get(self.url(&query)))?.json()?;
        let id = match found.into_iter().find(|t| t.name.eq_ignore_ascii_case(name)) {
            Some(tag) => tag.id,
            None => {
                let created: Tag = self
                    .call(
                        Request::post(self.url(&format!("/workspaces/{ws}/tags"))).json_body(&json!({"name": name}))?,
                    )?
                    .json()?;
                log::info(format_args!("created tag {name:?} in workspace {ws}"));
                created.id
            }
        };
        kv::set(&key, &id)?;
        Ok(id)
    }
}

#[derive(Debug, Deserialize)]
struct Tag {
    id: String,
    name: String,
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

hookbridge_plugin::export!(AutoTag);
