//! Templates: the one small syntax every sink uses for names made from an event (a Kafka topic and key, an
//! AMQP routing key).
//!
//! Literal text with placeholders in braces:
//!
//! | placeholder        | value                                                                  |
//! |--------------------|------------------------------------------------------------------------|
//! | `{event}`          | the event type, e.g. `NEW_TIME_ENTRY`                                  |
//! | `{source}`         | the source id                                                          |
//! | `{id}`             | hookbridge's event id (UUIDv7)                                         |
//! | `{body.<path>}`    | a field of the JSON body; `.`-separated keys, a number indexes a list  |
//! | `{header.<name>}`  | a kept request header (case-insensitive name)                          |
//!
//! `{{` and `}}` stand for literal braces. A template is checked when the config loads (unknown
//! placeholders, unbalanced braces). At run time a placeholder whose value is missing, `null`, an object or a
//! list fails the delivery permanently with a message naming it: an event never goes to an empty or wrong
//! name.

use std::fmt;

use serde_json::Value;

use crate::event::Event;

/// A parsed template.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Event,
    Source,
    Id,
    Body(Vec<String>),
    Header(String),
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Template({:?})", self.text)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Template {
    /// Parses `text`; the error says what is wrong and where.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().is_some_and(|(_, n)| *n == '{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().is_some_and(|(_, n)| *n == '}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => return Err(format!("unmatched '}}' at position {at} (write '}}}}' for a literal brace)")),
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for (_, c) in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    if !closed {
                        return Err(format!("unclosed '{{' at position {at}"));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(placeholder(name.trim())?);
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template { text: text.to_owned(), parts })
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when the template reads the body (so the caller parses it once).
    pub fn uses_body(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Body(_)))
    }

    /// Renders for `event`; `body` is the parsed body when [`Template::uses_body`] (see [`parse_body`]).
    pub fn render(&self, event: &Event, body: Option<&Value>) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Event => out.push_str(&event.event_type),
                Part::Source => out.push_str(&event.source),
                Part::Id => out.push_str(&event.id),
                Part::Header(name) => {
                    let value = event.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v);
                    match value {
                        Some(v) if !v.is_empty() => out.push_str(v),
                        _ => return Err(format!("template {:?}: the request has no header {name:?}", self.text)),
                    }
                }
                Part::Body(path) => {
                    let shown = path.join(".");
                    let Some(body) = body else {
                        return Err(format!("template {:?}: the body is not JSON", self.text));
                    };
                    let mut v = body;
                    for key in path {
                        let next = match v {
                            Value::Object(m) => m.get(key),
                            Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
                            _ => None,
                        };
                        v = next.ok_or_else(|| {
                            format!("template {:?}: the body has no field {shown:?} (missing {key:?})", self.text)
                        })?;
                    }
                    match v {
                        Value::String(s) if !s.is_empty() => out.push_str(s),
                        Value::Number(n) => out.push_str(&n.to_string()),
                        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                        Value::String(_) => {
                            return Err(format!("template {:?}: body field {shown:?} is empty", self.text));
                        }
                        other => {
                            let what = match other {
                                Value::Null => "null",
                                Value::Array(_) => "a list",
                                _ => "an object",
                            };
                            return Err(format!(
                                "template {:?}: body field {shown:?} is {what}, not a value",
                                self.text
                            ));
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Parses an event's body for [`Template::render`]: `None` when it is not JSON.
pub fn parse_body(event: &Event) -> Option<Value> {
    serde_json::from_slice(&event.body).ok()
}

fn placeholder(name: &str) -> Result<Part, String> {
    let bad = || {
        format!(
            "unknown placeholder {{{name}}} (expected {{event}}, {{source}}, {{id}}, {{body.<path>}} or {{header.<name>}})"
        )
    };
    Ok(match name {
        "event" => Part::Event,
        "source" => Part::Source,
        "id" => Part::Id,
        _ => {
            if let Some(path) = name.strip_prefix("body.") {
                let keys: Vec<String> = path.split('.').map(str::to_owned).collect();
                if keys.iter().any(String::is_empty) {
                    return Err(format!("placeholder {{{name}}}: empty key in the body path"));
                }
                Part::Body(keys)
            } else if let Some(header) = name.strip_prefix("header.") {
                if header.is_empty() || axum::http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                    return Err(format!("placeholder {{{name}}}: {header:?} is not a header name"));
                }
                Part::Header(header.to_ascii_lowercase())
            } else {
                return Err(bad());
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(body: &str) -> Event {
        Event {
            id: "0190-id".into(),
            source: "clockify".into(),
            event_type: "NEW_TIME_ENTRY".into(),
            received_at_ms: 0,
            headers: vec![("x-tenant".into(), "acme".into())],
            body: bytes::Bytes::from(body.to_owned()),
            dedup_key: String::new(),
            ordering_key: None,
        }
    }

    fn render(t: &str, body: &str) -> Result<String, String> {
        let e = event(body);
        let t = Template::parse(t)?;
        let v = parse_body(&e);
        t.render(&e, v.as_ref())
    }

    #[test]
    fn renders_every_placeholder() {
        let body = r#"{"workspaceId":"ws1","n":42,"ok":true,"tags":[{"name":"a"}]}"#;
        assert_eq!(render("clockify.{event}", body).unwrap(), "clockify.NEW_TIME_ENTRY");
        assert_eq!(render("{source}.{event}", body).unwrap(), "clockify.NEW_TIME_ENTRY");
        assert_eq!(render("{body.workspaceId}", body).unwrap(), "ws1");
        assert_eq!(render("{body.n}-{body.ok}-{body.tags.0.name}", body).unwrap(), "42-true-a");
        assert_eq!(render("{header.X-Tenant}/{id}", body).unwrap(), "acme/0190-id");
        assert_eq!(render("{{literal}}", body).unwrap(), "{literal}");
        assert_eq!(render("plain", body).unwrap(), "plain");
    }

    #[test]
    fn missing_values_are_errors_that_name_them() {
        let body = r#"{"user":{"id":null},"list":[],"obj":{},"empty":""}"#;
        let e = render("{body.workspaceId}", body).unwrap_err();
        assert!(e.contains("no field \"workspaceId\""), "{e}");
        assert!(render("{body.user.id}", body).unwrap_err().contains("is null"));
        assert!(render("{body.list}", body).unwrap_err().contains("a list"));
        assert!(render("{body.obj}", body).unwrap_err().contains("an object"));
        assert!(render("{body.list.3}", body).unwrap_err().contains("missing \"3\""));
        assert!(render("{body.empty}", body).unwrap_err().contains("is empty"));
        assert!(render("{body.x}", "not json").unwrap_err().contains("not JSON"));
        assert!(render("{header.x-missing}", body).unwrap_err().contains("no header \"x-missing\""));
    }

    #[test]
    fn bad_templates_are_refused_when_parsed() {
        for (t, why) in [
            ("{evnt}", "unknown placeholder {evnt}"),
            ("a.{event", "unclosed '{' at position 2"),
            ("a}", "unmatched '}'"),
            ("{body.}", "empty key"),
            ("{body..x}", "empty key"),
            ("{header.a b}", "not a header name"),
        ] {
            let e = Template::parse(t).unwrap_err();
            assert!(e.contains(why), "{t}: {e}");
        }
        assert!(!Template::parse("{event}").unwrap().uses_body());
        assert!(Template::parse("x{body.a}").unwrap().uses_body());
    }
}
