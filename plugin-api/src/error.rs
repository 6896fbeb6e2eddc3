//! [`Error`]: why a plugin could not handle an event (or start), and whether a retry can help.

pub use crate::__private::bindings::hookbridge::plugin::types::Error;

impl Error {
    /// Worth trying again later, e.g. an API answered 429 or timed out. The route's retry policy decides when;
    /// when its attempts run out, the delivery becomes a dead letter.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Retryable(message.into())
    }

    /// Trying again will not help, e.g. the event is malformed: the delivery becomes a dead letter at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent(message.into())
    }

    /// The plugin's config is not usable (return it from [`Plugin::init`](crate::Plugin::init)): the daemon
    /// refuses to load the plugin and shows `message`.
    pub fn invalid_config(message: impl Into<String>) -> Self {
        Self::InvalidConfig(message.into())
    }

    /// Whether the daemon will try the delivery again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable(_))
    }

    /// The explanation, whatever the kind.
    pub fn message(&self) -> &str {
        match self {
            Self::Retryable(message) | Self::Permanent(message) | Self::InvalidConfig(message) => message,
        }
    }
}
