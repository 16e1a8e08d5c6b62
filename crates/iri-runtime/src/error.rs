// SPDX-License-Identifier: Apache-2.0
//! The one error type of the toolkit, and the one place it becomes a gRPC status.
//!
//! Codes follow the contract's error matrix (iri-contract §2.0): NotFound is the only code
//! upstream clients branch on (Delete/Detach of something gone = success), so it must be exact;
//! InvalidArgument always names the offending field.

use tonic::{Code, Status};

/// Everything that can go wrong in a provider built on this toolkit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field of the request is missing or malformed. `field` is the path, e.g.
    /// `machine.spec.volumes[0].name`.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// Path of the offending field in the request.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The object (or a named part of it) does not exist.
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// What was looked for: `machine`, `volume`, `volume snapshot`, `bucket`, `volume attachment`...
        kind: &'static str,
        /// Its id or name.
        id: String,
    },
    /// The object (or a named part of it) exists already.
    #[error("{kind} {id:?} already exists")]
    AlreadyExists {
        /// What exists already.
        kind: &'static str,
        /// Its id or name.
        id: String,
    },
    /// A compare-and-swap lost against a concurrent writer.
    #[error("{kind} {id:?} was modified concurrently (expected revision {expected}, found {found})")]
    Conflict {
        /// Object kind.
        kind: &'static str,
        /// Object id.
        id: String,
        /// The revision the writer started from.
        expected: u64,
        /// The revision in the store.
        found: u64,
    },
    /// The request is valid but the object's state does not allow it now.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A bounded resource (capacity, exec sessions, ...) is used up.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The backend is temporarily unreachable; retrying may help.
    #[error("{0}")]
    Unavailable(String),
    /// The durable store failed.
    #[error("store: {0}")]
    Store(#[from] rusqlite::Error),
    /// Anything else that is our fault.
    #[error("{0}")]
    Internal(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::InvalidArgument`] for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::InvalidArgument`] for a required field that is missing or empty.
    pub fn required(field: impl Into<String>) -> Self {
        Error::invalid(field, "must be set")
    }

    /// An [`Error::NotFound`].
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        Error::NotFound { kind, id: id.into() }
    }

    /// An [`Error::Internal`] from anything printable.
    pub fn internal(err: impl std::fmt::Display) -> Self {
        Error::Internal(err.to_string())
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound { .. } => Code::NotFound,
            Error::AlreadyExists { .. } => Code::AlreadyExists,
            // A lost CAS is retried by the caller; if it escapes, the client should retry too.
            Error::Conflict { .. } => Code::Aborted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Store(_) | Error::Internal(_) => Code::Internal,
        }
    }

    /// Whether this is a [`Error::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }
}

/// A handler's result as tonic wants it: `wrap` builds the response message, and an error
/// becomes a status through the one mapping above.
pub fn reply<T, U>(
    result: Result<T>,
    wrap: impl FnOnce(T) -> U,
) -> std::result::Result<tonic::Response<U>, Status> {
    result
        .map(|t| tonic::Response::new(wrap(t)))
        .map_err(Status::from)
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        Status::new(err.code(), err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_to_contract_codes() {
        let status: Status = Error::not_found("machine", "abc").into();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "machine \"abc\" not found");

        let status: Status = Error::required("machine.metadata").into();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "invalid machine.metadata: must be set");

        let status: Status = Error::ResourceExhausted("too many exec sessions".into()).into();
        assert_eq!(status.code(), Code::ResourceExhausted);
    }
}
