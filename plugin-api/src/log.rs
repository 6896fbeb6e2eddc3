//! Log lines, attributed to the plugin in the daemon's logs and in `hookbridge plugin test`.
//!
//! Every function takes anything that implements [`Display`]: a `&str`, a `String` or `format_args!(..)`.
//!
//! ```no_run
//! use hookbridge_plugin::log;
//!
//! log::info("started");
//! log::warn(format_args!("{} entries skipped", 3));
//! ```

use std::fmt::Display;

use crate::__private::bindings::hookbridge::plugin::log as host;

pub use host::Level;

/// Logs `message` at `level`.
pub fn log(level: Level, message: impl Display) {
    host::log(level, &message.to_string());
}

/// Logs `message` at level trace.
pub fn trace(message: impl Display) {
    log(Level::Trace, message);
}

/// Logs `message` at level debug.
pub fn debug(message: impl Display) {
    log(Level::Debug, message);
}

/// Logs `message` at level info.
pub fn info(message: impl Display) {
    log(Level::Info, message);
}

/// Logs `message` at level warn.
pub fn warn(message: impl Display) {
    log(Level::Warn, message);
}

/// Logs `message` at level error.
pub fn error(message: impl Display) {
    log(Level::Error, message);
}
