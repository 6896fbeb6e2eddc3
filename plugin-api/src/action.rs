//! [`Action`]: what a plugin asks the daemon to do after handling an event, and builders for its variants.

use serde::Serialize;

use crate::Error;

pub use crate::__private::bindings::hookbridge::plugin::types::{Action, Emit, Publish};

impl Action {
    /// Sends `payload` to the sink `sink` (a sink id from hookbridge's config) as a new event with the type of
    /// the event being handled. Use [`Emit`] to set the type or headers.
    pub fn emit(sink: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Emit::new(sink, payload).into()
    }

    /// Sends `value`, serialized as JSON, to the sink `sink` as a new event (`content-type: application/json`).
    ///
    /// # Errors
    ///
    /// [`Error::Permanent`] when `value` cannot be serialized (e.g. a map with non-string keys).
    pub fn emit_json<T: Serialize + ?Sized>(sink: impl Into<String>, value: &T) -> Result<Self, Error> {
        Emit::json(sink, value).map(Self::from)
    }

    /// Pushes `payload` to the live channel `channel` (`GET /live/<channel>`, Server-Sent Events). Best effort:
    /// clients that are not connected miss it, but the last payload of each channel is replayed to new clients.
    pub fn publish(channel: impl Into<String>, payload: impl Into<String>) -> Self {
        Self::Publish(Publish { channel: channel.into(), payload: payload.into() })
    }

    /// Pushes `value`, serialized as JSON, to the live channel `channel` (see [`Action::publish`]).
    ///
    /// # Errors
    ///
    /// [`Error::Permanent`] when `value` cannot be serialized.
    pub fn publish_json<T: Serialize + ?Sized>(channel: impl Into<String>, value: &T) -> Result<Self, Error> {
        Ok(Self::publish(channel, to_json(value)?))
    }
}

impl Emit {
    /// A new event for the sink `sink` with the type of the event being handled and no extra headers.
    pub fn new(sink: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self { sink: sink.into(), event_type: None, payload: payload.into(), headers: Vec::new() }
    }

    /// A new event for the sink `sink` whose body is `value` serialized as JSON.
    ///
    /// # Errors
    ///
    /// [`Error::Permanent`] when `value` cannot be serialized.
    pub fn json<T: Serialize + ?Sized>(sink: impl Into<String>, value: &T) -> Result<Self, Error> {
        Ok(Self::new(sink, to_json(value)?))
    }

    /// Sets the type of the new event (by default, the type of the event being handled).
    #[must_use]
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    /// Adds a header to the new event (`content-type` defaults to `application/json`).
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

impl From<Emit> for Action {
    fn from(emit: Emit) -> Self {
        Self::Emit(emit)
    }
}

impl From<Publish> for Action {
    fn from(publish: Publish) -> Self {
        Self::Publish(publish)
    }
}

/// `value` as JSON text, or a permanent error saying why it cannot be.
fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String, Error> {
    serde_json::to_string(value).map_err(|err| Error::permanent(format!("cannot serialize the payload as JSON: {err}")))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;

    #[test]
    fn emit_builders_fill_every_field() {
        let Action::Emit(emit) = Action::emit("billing", "raw") else { panic!("not an emit") };
        assert_eq!((emit.sink.as_str(), emit.event_type, emit.payload.as_slice()), ("billing", None, &b"raw"[..]));

        let emit = Emit::json("billing", &json!({"a": 1})).unwrap().event_type("billable.X").header("x-k", "v");
        assert_eq!(emit.payload, br#"{"a":1}"#);
        assert_eq!(emit.event_type.as_deref(), Some("billable.X"));
        assert_eq!(emit.headers, vec![("x-k".to_owned(), "v".to_owned())]);

        let Action::Emit(emit) = Action::emit_json("billing", &[1, 2]).unwrap() else { panic!("not an emit") };
        assert_eq!(emit.payload, b"[1,2]");
    }

    #[test]
    fn publish_builders_carry_text() {
        let Action::Publish(publish) = Action::publish_json("counter", &json!({"n": 2})).unwrap() else {
            panic!("not a publish")
        };
        assert_eq!((publish.channel.as_str(), publish.payload.as_str()), ("counter", r#"{"n":2}"#));
    }

    #[test]
    fn unserializable_payloads_are_permanent_errors() {
        let map: BTreeMap<(u8, u8), u8> = BTreeMap::from([((1, 2), 3)]);
        let err = Action::emit_json("billing", &map).unwrap_err();
        assert!(matches!(err, Error::Permanent(_)), "{err:?}");
    }
}
