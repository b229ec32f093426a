use thiserror::Error;

/// Input that does not validate. Every variant names the field at fault so the gateway can
/// turn it into a precise 400.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ModelError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl ModelError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ModelError::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// The field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            ModelError::Invalid { field, .. } => field,
        }
    }
}
