//! The crate's error type, and how database errors map onto [`StoreError`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use es_core::StoreError;

/// Errors building a [`PgStore`](crate::PgStore): connecting, validating the configuration and
/// migrating the schema. Store operations return [`es_core::StoreError`] instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The schema name is not a plain identifier (see [`SchemaName`](crate::SchemaName)).
    #[error("invalid schema name {name:?}: {reason}")]
    InvalidSchemaName {
        /// The rejected name, shortened to at most 80 characters.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The database could not be reached, or the connection URL is invalid.
    #[error(
        "cannot connect to PostgreSQL{}: {source}",
        url.as_deref().map(|url| format!(" at {url}")).unwrap_or_default()
    )]
    Connect {
        /// The URL connected to, without its password (`postgres://app:***@db/app`); `None`
        /// when the store was given a pool.
        url: Option<String>,
        /// The connection error.
        #[source]
        source: sqlx::Error,
    },
    /// A role name cannot be used in the statements of [`grants_script`](crate::grants_script).
    #[error("invalid role name {name:?}: {reason}")]
    InvalidRoleName {
        /// The rejected name, shortened to at most 80 characters.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// [`require_tls`](crate::PgStoreBuilder::require_tls) is set and the connection may be, or
    /// is, unencrypted.
    #[error("TLS is required but {found}: use sslmode=verify-full (or require) with a server that has ssl=on")]
    TlsRequired {
        /// What allows or shows plaintext.
        found: String,
    },
    /// A builder setting is out of range or does not apply to how the store connects.
    #[error("invalid setting: {0}")]
    InvalidSetting(&'static str),
    /// A migration failed; its transaction was rolled back, so the schema is unchanged.
    #[error("migration {version} ({name}) of schema `{schema}` failed: {source}")]
    Migration {
        /// The schema being migrated.
        schema: String,
        /// The migration's version.
        version: i64,
        /// The migration's name.
        name: &'static str,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
    /// A migration recorded as applied differs from the one built into this crate.
    #[error(
        "migration {version} ({name}) recorded in schema `{schema}` differs from the one built \
         into es-postgres (checksum mismatch)"
    )]
    MigrationChanged {
        /// The schema.
        schema: String,
        /// The migration's version.
        version: i64,
        /// The migration's name.
        name: &'static str,
    },
    /// The schema was migrated by a newer es-postgres.
    #[error(
        "schema `{schema}` is at migration {found}, newer than this es-postgres knows ({supported})"
    )]
    SchemaTooNew {
        /// The schema.
        schema: String,
        /// Its latest applied migration.
        found: i64,
        /// The latest migration this crate knows.
        supported: i64,
    },
    /// Migrations are managed externally (`run_migrations(false)`) and the schema is missing or
    /// behind.
    #[error(
        "schema `{schema}` is not migrated to version {expected} (found {found:?}): apply \
         `es_postgres::migration_script` or build the store with `run_migrations(true)`"
    )]
    SchemaNotReady {
        /// The schema.
        schema: String,
        /// Its latest applied migration, if any.
        found: Option<i64>,
        /// The version this crate needs.
        expected: i64,
    },
    /// The schema records another partitioning than the builder's
    /// ([`PgStoreBuilder::partitioning`](crate::PgStoreBuilder::partitioning)): always a
    /// [`StoreError::InvalidPartitioning`] saying which. A schema's partitioning is fixed when it
    /// is first used.
    #[error("{0}")]
    Partitioning(#[source] StoreError),
    /// Any other database error while building the store.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// A [`PgEventArchive`](crate::PgEventArchive) belongs to another store than the one that
    /// claimed it (see [`EventArchive::claim`](es_core::contract::EventArchive::claim)): an
    /// archive holds the events of one store, whose positions and versions another store would
    /// collide with. Nothing was written. Give each store an archive schema of its own.
    #[error(
        "the event archive in schema `{schema}` belongs to {owner}, not to {claimant}: give each          store an archive schema of its own"
    )]
    ArchiveOwned {
        /// The archive's schema.
        schema: String,
        /// The store recorded as its owner.
        owner: String,
        /// The store that claimed it.
        claimant: String,
    },
}

impl Error {
    /// A connection error for `url`, which appears in the error without its password.
    pub(crate) fn connect(url: &str, source: sqlx::Error) -> Self {
        Error::Connect {
            url: Some(es_core::contract::redact_url(url)),
            source,
        }
    }

    /// A connection error of the pool the store was given.
    pub(crate) fn pool(source: sqlx::Error) -> Self {
        Error::Connect { url: None, source }
    }
}

/// The SQLSTATE of a database error, if `err` is one.
pub(crate) fn sqlstate(err: &sqlx::Error) -> Option<&str> {
    match err {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .map(sqlx::postgres::PgDatabaseError::code),
        _ => None,
    }
}

/// The constraint a database error names, if any.
pub(crate) fn constraint(err: &sqlx::Error) -> Option<&str> {
    match err {
        sqlx::Error::Database(db) => db.constraint(),
        _ => None,
    }
}

/// Whether `err` means the database is unreachable or the operation was cut off, so that the
/// outcome of a write in flight is unknown and retrying later may succeed.
pub(crate) fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(_) => sqlstate(err).is_some_and(|code| {
            // 08: connection exception; 53: insufficient resources; 57P: operator intervention
            // (admin/crash shutdown, cannot connect now); 57014: query cancelled (timeout);
            // 55P03: lock not available (lock_timeout); 25006: read-only (failover in progress).
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || matches!(code, "57014" | "55P03" | "25006")
                || is_retryable_code(code)
        }),
        _ => false,
    }
}

/// Serialization failures and deadlocks: the transaction was rolled back and can be retried as is.
pub(crate) fn is_retryable(err: &sqlx::Error) -> bool {
    sqlstate(err).is_some_and(is_retryable_code)
}

fn is_retryable_code(code: &str) -> bool {
    matches!(code, "40001" | "40P01")
}

/// Maps an error of a read or a snapshot operation.
pub(crate) fn store_error(err: sqlx::Error) -> StoreError {
    if is_unavailable(&err) {
        StoreError::unavailable(err)
    } else {
        StoreError::backend(err)
    }
}

/// Maps an error shared by several waiting appends (each gets its own [`StoreError`]).
pub(crate) fn shared_store_error(err: &Arc<sqlx::Error>) -> StoreError {
    if is_unavailable(err) {
        StoreError::unavailable(Arc::clone(err))
    } else {
        StoreError::backend(Arc::clone(err))
    }
}

/// Runs `op`, failing with [`StoreError::Unavailable`] if it has not finished after `limit`: the
/// client-side bound on every query but appends (which have their own, see `writer.rs`).
pub(crate) async fn timed<T>(
    limit: Duration,
    op: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, op).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::unavailable(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("PostgreSQL did not answer within {limit:?}"),
        ))),
    }
}
