//! [`Event`]: one webhook event, as the daemon verified and stored it, with helpers to read its body.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Error;

pub use crate::__private::bindings::hookbridge::plugin::types::Event;

impl Event {
    /// The body parsed as JSON into `T` (a `#[derive(Deserialize)]` struct, or [`Value`]).
    ///
    /// # Errors
    ///
    /// [`Error::Permanent`] when the body is not JSON or does not fit `T`: the same event would fail again.
    pub fn body_json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body).map_err(|err| {
            Error::permanent(format!(
                "the body of event {} ({}) is not the JSON expected: {err}",
                self.id, self.event_type
            ))
        })
    }

    /// The body parsed as a JSON [`Value`]; index it like `body["timeInterval"]["start"]`.
    ///
    /// # Errors
    ///
    /// [`Error::Permanent`] when the body is not JSON.
    pub fn json(&self) -> Result<Value, Error> {
        self.body_json()
    }

    /// The body as UTF-8 text.
    ///
    /// # Errors
    ///
    /// [`Error::Permanent`] when the body is not valid UTF-8.
    pub fn body_str(&self) -> Result<&str, Error> {
        std::str::from_utf8(&self.body)
            .map_err(|err| Error::permanent(format!("the body of event {} is not UTF-8 text: {err}", self.id)))
    }

    /// The value of the first header called `name` (case-insensitive; the daemon keeps names lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// The first value of header `name` in `headers`, compared case-insensitively.
pub(crate) fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    fn event(body: &[u8]) -> Event {
        Event {
            id: "0192f0c4-0000-7000-8000-000000000001".to_owned(),
            source: "clockify".to_owned(),
            event_type: "NEW_TIME_ENTRY".to_owned(),
            received_at_ms: 1_700_000_000_000,
            headers: vec![("content-type".to_owned(), "application/json".to_owned())],
            body: body.to_vec(),
        }
    }

    #[test]
    fn json_body_parses_into_values_and_structs() {
        #[derive(Deserialize)]
        struct Entry {
            billable: bool,
        }
        let event = event(br#"{"billable": true, "id": "e1"}"#);
        assert_eq!(event.json().unwrap()["id"], "e1");
        assert!(event.body_json::<Entry>().unwrap().billable);
        assert_eq!(event.body_str().unwrap(), r#"{"billable": true, "id": "e1"}"#);
    }

    #[test]
    fn a_body_that_is_not_json_is_a_permanent_error_naming_the_event() {
        let err = event(b"billable=true").json().unwrap_err();
        assert!(matches!(&err, Error::Permanent(_)), "{err:?}");
        assert!(err.message().contains("0192f0c4-0000-7000-8000-000000000001"), "{err}");
        assert!(err.message().contains("NEW_TIME_ENTRY"), "{err}");
    }

    #[test]
    fn headers_are_found_case_insensitively() {
        let event = event(b"{}");
        assert_eq!(event.header("Content-Type"), Some("application/json"));
        assert_eq!(event.header("x-missing"), None);
    }
}
