use thiserror::Error;

/// Everything the bus can fail with. async-nats error types are turned into strings here so
/// callers match on what they can act on (retry later, fix config, give up) rather than on
/// client internals.
#[derive(Debug, Error)]
pub enum BusError {
    /// NATS could not be reached (or JetStream did not answer) within the configured
    /// `publish_timeout_s`. Retrying later, with the same event id, is safe.
    #[error("NATS unavailable: {0}")]
    Unavailable(String),
    /// A configuration value is out of range; `field` names it as it appears in the config.
    #[error("invalid bus config field `{field}`: {reason}")]
    Config { field: &'static str, reason: String },
    /// An event that cannot be published as given (e.g. its id is not 16 bytes).
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    /// The server refused this process's credentials (none, wrong, or another role's).
    #[error("NATS refused the login: {0}")]
    Unauthorized(String),
    /// NATS or JetStream refused a request for a reason retrying will not fix.
    #[error("NATS error: {0}")]
    Nats(String),
    /// The stream a consumer reads is gone, or is another instance than the one the
    /// consumer was opened on (deleted and recreated, or lost with the server's storage):
    /// its sequences start again, so the caller must decide anew where to resume and open a
    /// new consumer.
    #[error("stream {stream} was replaced or removed: {reason}")]
    StreamReplaced { stream: String, reason: String },
}

impl BusError {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        BusError::Config {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn nats(what: &str, e: impl std::fmt::Display) -> Self {
        BusError::Nats(format!("{what}: {e}"))
    }

    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, BusError::Unavailable(_))
    }
}
