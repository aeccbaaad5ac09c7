//! The store's error type. Engines turn their backend's errors into these and never
//! let a backend error type escape.

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A write's condition did not hold; nothing changed.
    #[error("condition failed (current revision: {current:?})")]
    Conflict {
        /// The key's current modification revision, if it exists.
        current: Option<crate::Revision>,
    },
    /// A put's [`crate::ValueGuard`] did not hold; nothing changed.
    #[error("the current value does not match the guard")]
    Mismatch,
    /// The lease does not exist or has expired.
    #[error("lease {0} not found or expired")]
    LeaseNotFound(crate::LeaseId),
    /// The change feed was asked for revisions that retention has dropped.
    #[error("revisions up to {compacted} have been compacted")]
    Compacted {
        /// The newest dropped revision.
        compacted: crate::Revision,
    },
    /// Too many writes are waiting; try again shortly.
    #[error("the store is overloaded: too many writes waiting")]
    Overloaded,
    /// The store is closed or its backend is unreachable.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be decoded.
    #[error("store corrupted: {0}")]
    Corrupted(String),
    /// An I/O error from the backend.
    #[error("store I/O error: {0}")]
    Io(String),
}
