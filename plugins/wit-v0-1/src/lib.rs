//! A plugin built against `hookbridge:plugin@0.1.0` (its own copy of that release's WIT, `wit/plugin.wit`):
//! newer daemons must keep loading and running it. It counts events with the 0.1.0 `kv` interface (read, then
//! write: the daemon's tests send it one event at a time) and publishes `{"count": n}` to the live channel
//! `wit-v0-1`.

/// The generated bindings and the export of [`WitV01`].
#[allow(unsafe_code, missing_docs, missing_debug_implementations, clippy::all)]
mod bindings {
    use super::WitV01;

    wit_bindgen::generate!({ path: "wit/plugin.wit", world: "plugin" });

    export!(WitV01);
}

use bindings::hookbridge::plugin::kv;
use bindings::hookbridge::plugin::log::{Level, log};
use bindings::hookbridge::plugin::types::{Action, Error, Event, Publish};

/// The plugin; its state is in the key-value store.
#[derive(Debug)]
struct WitV01;

impl bindings::Guest for WitV01 {
    fn init(_config: String) -> Result<(), Error> {
        Ok(())
    }

    fn handle(event: Event) -> Result<Vec<Action>, Error> {
        let count = kv::get("count")
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|text| text.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        kv::set("count", count.to_string().as_bytes(), None).map_err(Error::Retryable)?;
        log(Level::Info, &format!("wit-v0-1 counted {} as {count}", event.id));
        Ok(vec![Action::Publish(Publish { channel: "wit-v0-1".to_owned(), payload: format!("{{\"count\":{count}}}") })])
    }
}
