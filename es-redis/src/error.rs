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
    /// The store under this prefix was made with another key layout, number of feed
    /// partitions or partition key than the builder asks for (recorded in its meta key when it was first
    /// built; a store from before layouts were recorded is `classic/1`). Its keys would not be
    /// found under the other layout, so `build` refuses rather than starting an empty store
    /// beside it. Open it with the recorded layout, or copy it into a store of the new layout
    /// (see the crate docs, section "Redis Cluster").
    #[error(
        "the Redis store under prefix {prefix:?} has the key layout {recorded}, not the \
         {requested} this builder asks for; open it with its layout and partitioning \
         (`RedisStoreBuilder::key_layout`, `RedisStoreBuilder::partitioning`), or copy it into \
         a new store of the other layout"
    )]
    LayoutMismatch {
        /// The store's prefix.
        prefix: String,
        /// The layout recorded in the store (`classic/1`, `tagged/1`, `tagged/4`,
        /// `tagged/4/category`).
        recorded: String,
        /// The layout the builder asked for.
        requested: String,
    },
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
    /// The TLS handshake failed: the server's certificate is not signed by a trusted CA (the
    /// system's, or those given to `RedisStoreBuilder::tls_root_certificates`, feature `tls`),
    /// is not valid for the host name in the URL (with Sentinel: for the address the sentinels
    /// report for the primary, which `url` then shows), or has expired; or the server does not
    /// speak TLS. The store never falls back to plaintext.
    #[error("TLS to Redis at {url} failed (the server's certificate is not trusted or not valid for the host): {source}")]
    Tls {
        /// The URL connected to, without its password.
        url: String,
        /// The handshake error.
        #[source]
        source: RedisError,
    },
    /// With Sentinel, some of the URLs are `rediss://` and others `redis://` (the builder's URL,
    /// for the primary, and the sentinels'). The store talks TLS to all of them or to none: it
    /// never reaches a server in plaintext that the configuration reaches over TLS elsewhere.
    /// Returned by `build` before connecting anywhere.
    #[error(
        "TLS for some Redis endpoints and plaintext for others: TLS to {}, plaintext to {}; make \
         the builder's URL and every sentinel URL `rediss://` (or all `redis://`)",
        tls.join(", "),
        plaintext.join(", ")
    )]
    MixedTls {
        /// The `rediss://` URLs, without their passwords.
        tls: Vec<String>,
        /// The `redis://` URLs, without their passwords.
        plaintext: Vec<String>,
    },
    /// The server refused a command or key the store needs for its user (`NOPERM`, or a command
    /// its append function calls: Redis 7.0 reports that as `ERR The user executing the script
    /// can't run this command`). The user needs the commands and the key pattern of the
    /// `ACL SETUSER` line in the crate docs, section "Production: TLS, ACLs, failover". Returned
    /// by `build`, and by store operations inside [`StoreError::Backend`].
    #[error(
        "the Redis user{} lacks a permission the store needs: {source}; grant it the commands and \
         the key pattern `~<prefix>:*` of the documented `ACL SETUSER` line",
        url.as_deref().map(|url| format!(" at {url}")).unwrap_or_default()
    )]
    NoPermission {
        /// The URL connected to, without its password; `None` for store operations.
        url: Option<String>,
        /// The refusal.
        #[source]
        source: RedisError,
    },
    /// The store's append function library is not on the server, and the store's user may not
    /// load it (`FUNCTION LOAD`). An administrator installs it once per version of this crate:
    /// [`RedisStoreBuilder::install_functions`](crate::RedisStoreBuilder::install_functions) with
    /// an admin user's URL, for example as a deployment step.
    #[error(
        "the Redis function library `{library}` of this es-redis version is not installed, and \
         the store's user may not load it ({source}); install it with an admin user: \
         `RedisStore::builder(admin_url).install_functions()`"
    )]
    FunctionsNotInstalled {
        /// The library's name (`es_append_<hash>`).
        library: String,
        /// The refusal of `FUNCTION LOAD`.
        #[source]
        source: RedisError,
    },
    /// Fewer replicas than
    /// [`min_replicas_acked`](crate::RedisStoreBuilder::min_replicas_acked) asks for
    /// acknowledged an append within its time-out. The append is stored on the primary but not
    /// acknowledged: a failover could lose it. Appends return it inside
    /// [`StoreError::Unavailable`]; retrying the same request is idempotent and waits again.
    #[error(
        "{acked} of the {required} Redis replicas the store waits for acknowledged the append in \
         time; it is on the primary but not acknowledged (retry: appends are idempotent)"
    )]
    ReplicasNotAcked {
        /// The replicas asked for.
        required: usize,
        /// The replicas that acknowledged (`WAIT`'s reply).
        acked: i64,
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
    /// The event archive given to [`archive`](crate::RedisStoreBuilder::archive) refused the
    /// store when `build` claimed it (it belongs to another store: es-postgres'
    /// `Error::ArchiveOwned`), or could not be reached.
    #[error("the store's event archive cannot be used: {source}")]
    Archive {
        /// The archive's error.
        #[source]
        source: es_core::StoreError,
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

    /// A connection error for `url`, which appears in the error without its password: a
    /// permission refusal or a failed TLS handshake gets its own variant.
    pub(crate) fn connect(url: &str, source: RedisError) -> Self {
        Self::classify(Some(es_core::contract::redact_url(url)), source)
    }

    /// A connection error where the URL is not at hand (see [`Error::at`]).
    pub(crate) fn connection(source: RedisError) -> Self {
        Self::classify(None, source)
    }

    fn classify(url: Option<String>, source: RedisError) -> Self {
        if is_permission_error(&source) {
            Error::NoPermission { url, source }
        } else if is_tls_error(&source) {
            Error::Tls {
                url: url.unwrap_or_else(|| "<unknown>".to_owned()),
                source,
            }
        } else {
            Error::Connect { url, source }
        }
    }

    /// This error, with `url` (without its password) in a connection error that has none.
    pub(crate) fn at(self, url: &str) -> Self {
        match self {
            Error::Connect { url: None, source } => Error::connect(url, source),
            Error::NoPermission { url: None, source } => Error::NoPermission {
                url: Some(es_core::contract::redact_url(url)),
                source,
            },
            other => other,
        }
    }
}

/// Whether the server refused a command or key for the user: `NOPERM`, or the plain `ERR` Redis
/// 7.0 answers when a script or function calls a command the user may not run (it has no code
/// of its own, so this one case is told by its text).
pub(crate) fn is_permission_error(err: &RedisError) -> bool {
    match err.code() {
        Some("NOPERM") => true,
        Some("ERR") => err
            .detail()
            .is_some_and(|detail| detail.starts_with("The user executing the script can't run")),
        _ => false,
    }
}

/// The typed error for a refusal the append function caught (`redis.pcall`) and replied as
/// text, if it is a permission refusal.
pub(crate) fn refused_in_script(text: &str) -> Option<Error> {
    let denied = text.starts_with("NOPERM")
        || text.starts_with("ERR The user executing the script can't run");
    denied.then(|| Error::NoPermission {
        url: None,
        source: RedisError::from((
            ErrorKind::Server(ServerErrorKind::NoPerm),
            "the store's user may not run a command of its append function",
            text.to_owned(),
        )),
    })
}

/// Whether `err` is a failed TLS handshake (a rustls error somewhere in its chain of causes).
#[cfg(feature = "tls")]
pub(crate) fn is_tls_error(err: &RedisError) -> bool {
    use std::error::Error as _;
    use std::sync::Arc;

    fn holds_rustls(err: &(dyn std::error::Error + 'static)) -> bool {
        if err.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|inner| holds_rustls(inner)) {
                return true;
            }
        }
        if let Some(inner) = err.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>() {
            if holds_rustls(&**inner) {
                return true;
            }
        }
        err.source().is_some_and(holds_rustls)
    }
    err.source().is_some_and(holds_rustls)
}

#[cfg(not(feature = "tls"))]
pub(crate) fn is_tls_error(_: &RedisError) -> bool {
    false
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
    } else if is_permission_error(&err) {
        StoreError::backend(Error::NoPermission {
            url: None,
            source: err,
        })
    } else if err.code() == Some("WRONGTYPE") {
        StoreError::Corrupt {
            location: location(),
            reason: format!("a key holds the wrong Redis type: {err}"),
        }
    } else {
        StoreError::backend(err)
    }
}
