//! The crate's construction error and the mapping of Redis errors to [`StoreError`].

use es_core::StoreError;
use redis::{ErrorKind, RedisError, ServerErrorKind};

/// Why a [`RedisStore`](crate::RedisStore) could not be built.
///
/// Store operations return [`StoreError`]; this type is only for construction.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The connection URL cannot be parsed.
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(#[source] RedisError),
    /// The key prefix is empty, too long or holds characters outside `[A-Za-z0-9_.:-]`.
    #[error("invalid key prefix {prefix:?}: {reason}")]
    InvalidPrefix {
        /// The rejected prefix (at most 80 characters of it).
        prefix: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A setting is out of range (a zero duration or page size).
    #[error("invalid setting: {0}")]
    InvalidSetting(&'static str),
    /// The server could not be reached, or refused the connection or the scripts.
    #[error("cannot connect to Redis: {0}")]
    Connect(#[source] RedisError),
}

/// Maps a Redis error to the store error a caller can act on.
///
/// Connection failures, timeouts and server states that pass (loading the AOF after a restart,
/// a failover in progress, a read-only replica) are [`StoreError::Unavailable`], which es-core's
/// repository and subscriptions retry. A key of the wrong type (`WRONGTYPE`, detected by the
/// error code) means data written behind the store's back: [`StoreError::Corrupt`]. Everything
/// else is [`StoreError::Backend`].
pub(crate) fn store_error(err: RedisError, location: impl FnOnce() -> String) -> StoreError {
    let transient = err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || matches!(
            err.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::ReadOnly
            )
        )
        || matches!(err.code(), Some("MISCONF" | "NOREPLICAS" | "BUSY"));
    if transient {
        StoreError::unavailable(err)
    } else if err.code() == Some("WRONGTYPE") {
        StoreError::Corrupt {
            location: location(),
            reason: format!("a key holds the wrong Redis type: {err}"),
        }
    } else {
        StoreError::backend(err)
    }
}
