//! The wall clock, as the daemon reads it.

use crate::__private::bindings::hookbridge::plugin::clock as host;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    host::now_ms()
}
