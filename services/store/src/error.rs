use meridian_model::ModelError;
use thiserror::Error;

/// Everything the store can fail with. Backend-specific errors (fjall, redb, tikv-client's
/// tonic 0.10 types) are turned into strings inside their adapter so no backend type leaks
/// into the rest of Meridian.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Another transaction wrote what this one read. Re-read and re-decide; never replay the
    /// same writes blindly (the merge rules depend on deciding from fresh state).
    #[error("transaction conflict: {0}")]
    Conflict(String),
    #[error("storage backend failed: {0}")]
    Backend(String),
    #[error("corrupt record under key {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("invalid store url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl StoreError {
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict(_))
    }

    pub(crate) fn corrupt(key: &[u8], reason: impl std::fmt::Display) -> Self {
        StoreError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: reason.to_string(),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
