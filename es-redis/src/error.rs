//! The crate's construction error and the mapping of Redis errors to [`StoreError`].

use es_core::StoreError;
use redis::{ErrorKind, RedisError, ServerErrorKind};

/// Why a [`RedisStore`](crate::RedisStore) could not be built, or why the server's settings
/// refuse an append.
///
/// Store operations return [`StoreError`]; an append refused because the server can evict keys
/// is a [`StoreError::Backend`] whose source is [`Error::EvictionPolicy`] (find it with
/// `std::error::Error::source` and `downcast_ref::<es_redis::Error>()`). Every other variant
/// comes from [`RedisStoreBuilder::build`](crate::RedisStoreBuilder::build).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The connection URL cannot be parsed.
    #[error("invalid Redis URL {url}: {source}")]
    InvalidUrl {
        /// The URL, without its password (`redis://app:***@cache/0`; not shown at all if it does
        /// not parse as a URL).
        url: String,
        /// Why the `redis` crate refused it.
        #[source]
        source: RedisError,
    },
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
    #[error(
        "cannot connect to Redis{}: {source}",
        url.as_deref().map(|url| format!(" at {url}")).unwrap_or_default()
    )]
    Connect {
        /// The URL connected to, without its password (`redis://app:***@cache/0`); `None` for
        /// the store's background checks, which log their errors.
        url: Option<String>,
        /// The connection error.
        #[source]
        source: RedisError,
    },
    /// The server's `maxmemory-policy` lets it evict keys that have no expiry (`allkeys-lru`,
    /// `allkeys-lfu`, `allkeys-random`, or a policy this crate does not know): under memory
    /// pressure it would drop acknowledged events, stream versions or the id index without an
    /// error. Returned by `build`, and by appends (inside [`StoreError::Backend`]) while the
    /// server runs such a policy. `noeviction` and the `volatile-*` policies are accepted; see
    /// the crate docs, section "Server settings".
    #[error(
        "the Redis server runs `maxmemory-policy {policy}`, which can evict the store's keys and \
         lose acknowledged events without an error; set `maxmemory-policy noeviction` (`CONFIG \
         SET maxmemory-policy noeviction` and in redis.conf), or opt out with \
         `RedisStoreBuilder::allow_eviction(true)` for data you can afford to lose"
    )]
    EvictionPolicy {
        /// The server's policy (`unknown` if the server does not report one).
        policy: String,
    },
    /// The server is older than Redis 7.0, which the store needs (its append runs as a Redis
    /// function, `FCALL`).
    #[error("the Redis server is version {version}; the store needs Redis 7.0 or later")]
    UnsupportedVersion {
        /// The server's `redis_version`.
        version: String,
    },
    /// The server persists nothing: no append-only file (`appendonly no`) and no RDB snapshots
    /// (`save ""`). Every restart loses every event, including the store's head, so the store
    /// cannot even tell its readers that it lost them. See the crate docs, section "Server
    /// settings".
    #[error(
        "the Redis server persists nothing (`appendonly no` and `save \"\"`): a restart loses \
         every event, and with them the head that lets readers detect the loss; turn on the \
         append-only file (`appendonly yes`, with `appendfsync always` for an event store of \
         record) or RDB snapshots, or opt out with `RedisStoreBuilder::allow_no_persistence(true)`"
    )]
    NoPersistence,
    /// A server setting the store must check cannot be read: `INFO` refused (the append script
    /// needs it too), or `CONFIG GET` refused or renamed while what `INFO` shows does not settle
    /// the question. The opt-outs ([`allow_eviction`](crate::RedisStoreBuilder::allow_eviction),
    /// [`allow_no_persistence`](crate::RedisStoreBuilder::allow_no_persistence)) skip the
    /// corresponding check.
    #[error("cannot check the Redis server's `{setting}`: {reason}")]
    SettingUnknown {
        /// The setting or command.
        setting: &'static str,
        /// Why it cannot be read, and what to do.
        reason: String,
    },
}

impl Error {
    /// An invalid `url`, which appears in the error without its password.
    pub(crate) fn invalid_url(url: &str, source: RedisError) -> Self {
        Error::InvalidUrl {
            url: es_core::contract::redact_url(url),
            source,
        }
    }

    /// A connection error for `url`, which appears in the error without its password.
    pub(crate) fn connect(url: &str, source: RedisError) -> Self {
        Error::Connect {
            url: Some(es_core::contract::redact_url(url)),
            source,
        }
    }

    /// A connection error where the URL is not at hand (see [`Error::at`]).
    pub(crate) fn connection(source: RedisError) -> Self {
        Error::Connect { url: None, source }
    }

    /// This error, with `url` (without its password) in a connection error that has none.
    pub(crate) fn at(self, url: &str) -> Self {
        match self {
            Error::Connect { url: None, source } => Error::connect(url, source),
            other => other,
        }
    }
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
