//! Write [hookbridge](https://github.com/hookbridge/hookbridge) plugins in Rust.
//!
//! A hookbridge plugin is a WebAssembly component that the daemon runs as the destination of a route: it
//! receives one [`Event`] at a time and answers with [`Action`]s (emit a new event to a sink, publish to a live
//! channel) or an [`Error`] that says whether a retry can help. Outside its own memory it can only reach what
//! the daemon offers: [`log`], its own key-value store ([`kv`]), allow-listed outbound [`http`] and the
//! [`clock`].
//!
//! This crate is the only dependency a plugin needs. Implement [`Plugin`] and register the type with
//! [`export!`]; the contract itself (`wit/plugin.wit`, package `hookbridge:plugin@0.1.1`,
//! with the standard `wasi:keyvalue` interfaces it imports in `wit/deps`) ships with the crate.
//!
//! # Write your first plugin
//!
//! ```toml
//! # Cargo.toml
//! [package]
//! name = "billable-filter"
//! version = "0.1.0"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! hookbridge-plugin = "0.1"
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! ```no_run
//! // src/lib.rs
//! use hookbridge_plugin::{Action, Emit, Error, Event, Plugin, log, parse_config, serde_json::Value};
//! use serde::Deserialize;
//!
//! /// The plugin's `config` table, e.g. `config = { sink = "billing" }`.
//! #[derive(Deserialize)]
//! struct BillableFilter {
//!     sink: String,
//! }
//!
//! impl Plugin for BillableFilter {
//!     fn init(config: Value) -> Result<Self, Error> {
//!         parse_config(config) // a config without `sink` is refused when the daemon loads the plugin
//!     }
//!
//!     fn handle(&self, event: Event) -> Result<Vec<Action>, Error> {
//!         let body: Value = event.json()?; // not JSON: a permanent error (dead letter)
//!         if body["billable"] != true {
//!             return Ok(vec![]);
//!         }
//!         log::info(format_args!("billable entry {}", body["id"]));
//!         let emit = Emit::json(&self.sink, &body)?.event_type(format!("billable.{}", event.event_type));
//!         Ok(vec![emit.into()])
//!     }
//! }
//!
//! hookbridge_plugin::export!(BillableFilter);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` (`rustup target add wasm32-wasip2` once) and
//! point a plugin in hookbridge's config at `target/wasm32-wasip2/release/billable_filter.wasm`.
//!
//! # How the daemon runs a plugin
//!
//! - Every event is handled in a **fresh instance**: the daemon calls [`Plugin::init`] with the config, then
//!   [`Plugin::handle`] on the value it returned. Nothing in memory survives from one event to the next; keep
//!   state that must last in [`kv`]. `init` also runs once when the daemon loads the plugin, to validate the
//!   config: return [`Error::invalid_config`] there and the daemon refuses to load the plugin, with your message.
//! - Time, memory and outbound requests are limited by the daemon's config. A plugin that runs too long or
//!   allocates too much is stopped, and so is one that panics (a panic is a WebAssembly trap): the delivery is
//!   then retried or dead-lettered like any failed delivery.
//! - Files, sockets and environment variables are not available unless the operator grants them.
//! - The host functions in [`log`], [`kv`], [`http`] and [`clock`] exist only inside hookbridge. The crate also
//!   compiles for native targets so that plugins can unit-test their pure logic, but calling a host function
//!   there panics.

mod action;
mod error;
mod event;

pub mod addon;
pub mod clock;
pub mod http;
pub mod kv;
pub mod log;

pub use action::{Action, Emit, Publish};
pub use error::Error;
pub use event::Event;
/// The JSON crate this SDK speaks, re-exported so that plugins do not have to keep versions in step.
pub use serde_json;

use serde::de::DeserializeOwned;
use serde_json::Value;

/// A hookbridge plugin: build it from its config, then let it handle one event.
///
/// Register the implementing type with [`export!`]. The daemon creates a fresh instance of the plugin for
/// every event and calls [`init`](Plugin::init) then [`handle`](Plugin::handle) in it, so the value returned
/// by `init` lives exactly as long as one event.
pub trait Plugin: Sized + 'static {
    /// Builds the plugin from the `config` table of its entry in hookbridge's config (JSON object; an empty
    /// object when the entry has no `config`). [`parse_config`] turns it into a `serde` type.
    ///
    /// Return [`Error::invalid_config`] when the config is not usable: the daemon also calls `init` when it
    /// loads the plugin, so a bad config is reported when the plugin is loaded instead of failing every event.
    fn init(config: Value) -> Result<Self, Error>;

    /// Handles one event and says what to do next: no actions (done), some [`Action`]s (the daemon performs
    /// them; emitted events are spooled durably), or an [`Error`]: [`Error::retryable`] to be retried by the
    /// route's retry policy, [`Error::permanent`] to become a dead letter.
    fn handle(&self, event: Event) -> Result<Vec<Action>, Error>;
}

/// Deserializes a plugin's config into `T`, answering [`Error::invalid_config`] (with serde's explanation,
/// e.g. ``missing field `sink` ``) when it does not fit.
///
/// # Errors
///
/// [`Error::InvalidConfig`] when `config` does not deserialize into `T`.
pub fn parse_config<T: DeserializeOwned>(config: Value) -> Result<T, Error> {
    serde_json::from_value(config).map_err(|err| Error::invalid_config(err.to_string()))
}

/// Exports a [`Plugin`] implementation as the plugin of this WebAssembly component.
///
/// Use it exactly once, in the `cdylib` crate of the plugin:
///
/// ```no_run
/// use hookbridge_plugin::{Action, Error, Event, Plugin, serde_json::Value};
///
/// struct Noop;
///
/// impl Plugin for Noop {
///     fn init(_config: Value) -> Result<Self, Error> {
///         Ok(Noop)
///     }
///
///     fn handle(&self, _event: Event) -> Result<Vec<Action>, Error> {
///         Ok(vec![])
///     }
/// }
///
/// hookbridge_plugin::export!(Noop);
/// ```
#[macro_export]
macro_rules! export {
    ($plugin:ty) => {
        const _: () = {
            struct __HookbridgePluginExport;

            impl $crate::__private::bindings::Guest for __HookbridgePluginExport {
                fn init(config: ::std::string::String) -> ::core::result::Result<(), $crate::Error> {
                    $crate::__private::init::<$plugin>(&config)
                }

                fn handle(
                    event: $crate::Event,
                ) -> ::core::result::Result<::std::vec::Vec<$crate::Action>, $crate::Error> {
                    $crate::__private::handle::<$plugin>(event)
                }
            }

            $crate::__private::bindings::__export_plugin!(
                __HookbridgePluginExport with_types_in $crate::__private::bindings
            );
        };
    };
}

/// Support for [`export!`]; not part of the public API and exempt from semver.
#[doc(hidden)]
pub mod __private {
    use std::any::Any;
    use std::cell::RefCell;

    use serde_json::Value;

    use crate::{Action, Error, Event, Plugin};

    /// The bindings that `wit-bindgen` generates from `wit/`. The types are re-exported from
    /// friendlier places; the export plumbing is driven by [`crate::export!`].
    #[allow(unsafe_code, missing_docs, missing_debug_implementations, clippy::all)]
    pub mod bindings {
        wit_bindgen::generate!({
            // The folder, so that `wit/deps` (the standard `wasi:keyvalue` interfaces) resolves.
            path: "wit",
            world: "plugin",
            with: {
                "wasi:keyvalue/store@0.2.0-draft2": generate,
                "wasi:keyvalue/atomics@0.2.0-draft2": generate,
                "wasi:keyvalue/batch@0.2.0-draft2": generate,
            },
            // `export!` expands in the plugin's crate, so the generated export macro must be reachable there.
            pub_export_macro: true,
            export_macro_name: "__export_plugin",
            default_bindings_module: "hookbridge_plugin::__private::bindings",
        });
    }

    thread_local! {
        /// The value `init` returned in this instance. A component instance handles one event, on one thread.
        static INSTANCE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    }

    /// The `init` export: parses the JSON config and keeps the plugin for `handle`.
    pub fn init<P: Plugin>(config: &str) -> Result<(), Error> {
        INSTANCE.with_borrow_mut(|slot| *slot = None);
        let config = if config.trim().is_empty() {
            Value::Object(serde_json::Map::new())
        } else {
            serde_json::from_str(config)
                .map_err(|err| Error::invalid_config(format!("the config is not valid JSON: {err}")))?
        };
        let plugin = P::init(config)?;
        INSTANCE.with_borrow_mut(|slot| *slot = Some(Box::new(plugin)));
        Ok(())
    }

    /// The `handle` export: hands the event to the plugin that `init` built.
    pub fn handle<P: Plugin>(event: Event) -> Result<Vec<Action>, Error> {
        INSTANCE.with_borrow(|slot| match slot.as_ref().and_then(|plugin| plugin.downcast_ref::<P>()) {
            Some(plugin) => plugin.handle(event),
            None => Err(Error::permanent("the plugin was asked to handle an event without a successful `init`")),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    /// Emits every event to the configured sink, or fails on events of type `FAIL`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Forward {
        sink: String,
    }

    impl Plugin for Forward {
        fn init(config: Value) -> Result<Self, Error> {
            parse_config(config)
        }

        fn handle(&self, event: Event) -> Result<Vec<Action>, Error> {
            if event.event_type == "FAIL" {
                return Err(Error::retryable("asked to fail"));
            }
            Ok(vec![Action::emit(self.sink.clone(), event.body)])
        }
    }

    fn event(event_type: &str) -> Event {
        Event {
            id: "id".to_owned(),
            source: "test".to_owned(),
            event_type: event_type.to_owned(),
            received_at_ms: 0,
            headers: vec![],
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn handle_uses_the_plugin_that_init_built() {
        __private::init::<Forward>(r#"{"sink": "billing"}"#).unwrap();
        let actions = __private::handle::<Forward>(event("NEW_TIME_ENTRY")).unwrap();
        assert!(matches!(&actions[..], [Action::Emit(emit)] if emit.sink == "billing"));
        assert!(__private::handle::<Forward>(event("FAIL")).unwrap_err().is_retryable());
    }

    #[test]
    fn unusable_configs_are_invalid_config_errors() {
        for (config, expected) in [
            ("{", "not valid JSON"),
            ("{}", "missing field `sink`"),
            (r#"{"sink": "a", "extra": 1}"#, "unknown field `extra`"),
            ("", "missing field `sink`"),
        ] {
            match __private::init::<Forward>(config) {
                Err(Error::InvalidConfig(message)) => assert!(message.contains(expected), "{config}: {message}"),
                other => panic!("{config}: {other:?}"),
            }
        }
    }

    #[test]
    fn handle_after_a_failed_init_is_a_permanent_error() {
        __private::init::<Forward>(r#"{"sink": "billing"}"#).unwrap();
        assert!(__private::init::<Forward>("{}").is_err());
        let err = __private::handle::<Forward>(event("NEW_TIME_ENTRY")).unwrap_err();
        assert!(matches!(err, Error::Permanent(_)), "{err:?}");
    }
}
