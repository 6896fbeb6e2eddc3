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

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
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

    /// True when the template reads the body.
    pub fn uses_body(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Body(_)))
    }

    /// Renders for `event`. A `{body.<path>}` placeholder reads its field straight from the body's bytes
    /// ([`find`]): nothing else of the body is kept, so a key template costs a scan of the body, not a parse.
    pub fn render(&self, event: &Event) -> Result<String, String> {
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
                    let v = match find(&event.body, path) {
                        Err(_) => return Err(format!("template {:?}: the body is not JSON", self.text)),
                        Ok(Err(depth)) => {
                            let key = path.get(depth).map(String::as_str).unwrap_or_default();
                            return Err(format!(
                                "template {:?}: the body has no field {shown:?} (missing {key:?})",
                                self.text
                            ));
                        }
                        Ok(Ok(v)) => v,
                    };
                    match &v {
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

/// The value at `path` in the JSON document `body` (keys of objects; a number indexes a list), found in one
/// pass that skips everything else without keeping it. `Ok(Err(depth))`: the document has no `path[depth]`
/// where the path needs it. `Err`: not JSON. With a key repeated in an object the last one counts, as when
/// the document is parsed whole.
pub fn find(body: &[u8], path: &[String]) -> Result<Result<Value, usize>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let found = Find { path, depth: 0 }.deserialize(&mut de)?;
    de.end()?;
    Ok(found)
}

/// [`find`]'s walk: the rest of the path from `depth` on.
#[derive(Clone, Copy)]
struct Find<'p> {
    path: &'p [String],
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Find<'_> {
    type Value = Result<Value, usize>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        if self.depth == self.path.len() {
            return Value::deserialize(d).map(Ok);
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Find<'_> {
    type Value = Result<Value, usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let key = self.path.get(self.depth).map(String::as_str).unwrap_or_default();
        let mut found = Err(self.depth);
        while let Some(matches) = map.next_key_seed(KeyIs(key))? {
            if matches {
                found = map.next_value_seed(Find { depth: self.depth + 1, ..self })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let index = self.path.get(self.depth).and_then(|k| k.parse::<usize>().ok());
        let mut found = Err(self.depth);
        let mut i = 0;
        loop {
            if Some(i) == index {
                match seq.next_element_seed(Find { depth: self.depth + 1, ..self })? {
                    Some(v) => found = v,
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            i += 1;
        }
        Ok(found)
    }

    // A scalar where the path goes on: that field is missing.
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Err(self.depth))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Err(self.depth))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Err(self.depth))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Err(self.depth))
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Err(self.depth))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Err(self.depth))
    }
}

/// An object key, compared with one name without being kept.
struct KeyIs<'k>(&'k str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
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
            body_is_json: false,
        }
    }

    fn render(t: &str, body: &str) -> Result<String, String> {
        let e = event(body);
        let t = Template::parse(t)?;
        t.render(&e)
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

    /// The one-pass lookup finds what a lookup in the whole parsed document finds, wherever the field is,
    /// whatever surrounds it (escapes, nesting, lists, repeated keys), and tells where a path breaks off.
    #[test]
    fn find_agrees_with_the_parsed_document() {
        let body = r#"{"a\"b":1,"ws":"x","nested":{"list":[10,{"k":"v"},[true]],"s":"\u00e9"},"ws":"last",
            "n":-1.5e3,"z":null}"#;
        let doc: Value = serde_json::from_str(body).unwrap();
        for path in
            ["ws", "a\"b", "nested.s", "nested.list.0", "nested.list.1.k", "nested.list.2.0", "n", "z", "nested"]
        {
            let keys: Vec<String> = path.split('.').map(str::to_owned).collect();
            let mut want = &doc;
            for k in &keys {
                want = match want {
                    Value::Array(a) => &a[k.parse::<usize>().unwrap()],
                    v => &v[k.as_str()],
                };
            }
            assert_eq!(find(body.as_bytes(), &keys).unwrap(), Ok(want.clone()), "{path}");
        }
        let missing = |path: &str| {
            let keys: Vec<String> = path.split('.').map(str::to_owned).collect();
            find(body.as_bytes(), &keys).unwrap().unwrap_err()
        };
        assert_eq!(missing("nope"), 0);
        assert_eq!(missing("nested.nope"), 1);
        assert_eq!(missing("nested.list.3"), 2);
        assert_eq!(missing("nested.list.x"), 2);
        assert_eq!(missing("ws.deeper"), 1);
        assert_eq!(missing("nested.list.0.k"), 3);
        assert!(find(b"{\"ws\": \"x\"} trailing", &["ws".to_owned()]).is_err());
        assert!(find(b"{\"ws\": \"x\", ", &["ws".to_owned()]).is_err());
        assert_eq!(find(b"[1, 2]", &["ws".to_owned()]).unwrap(), Err(0));
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
