//! Clockify add-on installations: call Clockify's API as the add-on, for events that came through a
//! `clockify-addon` source.
//!
//! ```no_run
//! use hookbridge_plugin::addon;
//!
//! if let Some(install) = addon::installation("684446430300f917a02c198b") {
//!     let base = install.api_url.as_deref().unwrap_or("https://api.clockify.me/api");
//!     let _request = hookbridge_plugin::http::Request::get(format!("{base}/v1/user"))
//!         .header("X-Addon-Token", &install.token);
//! }
//! ```

use crate::__private::bindings::hookbridge::plugin::addon as host;

pub use host::Installation;

/// The active installation in `workspace_id` of the add-on whose source sent the event being handled; `None`
/// for events from other kinds of sources, and for unknown, inactive or deleted installations.
pub fn installation(workspace_id: &str) -> Option<Installation> {
    host::lookup(workspace_id)
}
