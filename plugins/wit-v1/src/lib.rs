//! A trivial plugin built against `hookbridge:plugin@1.0.0`, a major version of the interface that this daemon
//! does not speak: loading it must fail with a message naming both versions. It uses `wit-bindgen` directly
//! with its own copy of the WIT (`wit/plugin.wit`, identical to the SDK's except for the version).

/// The generated bindings and the export of [`WitV1`]: the only unsafe code of the plugins workspace.
#[allow(unsafe_code, missing_docs, missing_debug_implementations, clippy::all)]
mod bindings {
    use super::WitV1;

    wit_bindgen::generate!({ path: "wit/plugin.wit", world: "plugin" });

    export!(WitV1);
}

use bindings::hookbridge::plugin::log::{Level, log};
use bindings::hookbridge::plugin::types::{Action, Error, Event};

/// The plugin; it has no state.
#[derive(Debug)]
struct WitV1;

impl bindings::Guest for WitV1 {
    fn init(_config: String) -> Result<(), Error> {
        Ok(())
    }

    fn handle(event: Event) -> Result<Vec<Action>, Error> {
        // Uses an import too, so that the component's imports name the 1.0.0 interfaces, not only its types.
        log(Level::Info, &format!("wit-v1 handled {}", event.id));
        Ok(vec![])
    }
}
