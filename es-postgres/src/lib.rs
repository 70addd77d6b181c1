//! PostgreSQL backend for `es-core`: an event and snapshot store on [`sqlx`], with global
//! positions that never skip and group commit that keeps them near the raw insert rate.
//!
//! ```no_run
//! use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};
//! use es_postgres::PgStore;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! // Connects, creates or migrates schema `es`, starts the writer and listener tasks.
//! let store = PgStore::connect("postgres://app@localhost/app").await?;
//! let stream = StreamId::new("account", "42")?;
//! let event = NewEvent::new("AccountOpened", 1, r#"{"owner":"ada"}"#)?;
//! let result = store
//!     .append(AppendRequest::new(stream, ExpectedVersion::NoStream, vec![event]))
//!     .await?;
//! assert_eq!(result.stream_version, 1);
//! # Ok(())
//! # }
//! # fn main() { let _ = example(); }
//! ```
//!
//! Another schema, pool size or any other setting, from a URL alone (no `sqlx` in your
//! manifest needed; the crate re-exports [`sqlx`] for code that does use it):
//!
//! ```no_run
//! # use std::time::Duration;
//! # async fn example() -> Result<(), es_postgres::Error> {
//! let store = es_postgres::PgStore::builder_from_url("postgres://app@localhost/app")
//!     .schema("billing")
//!     .max_connections(32)
//!     .poll_interval(Duration::from_millis(500))
//!     .build()
//!     .await?;
//! # drop(store);
//! # Ok(())
//! # }
//! # fn main() { let _ = example(); }
//! ```
//!
//! Or on a pool of your own (built with [`PgStore::connect_options`] for the session settings
//! the store relies on), for example with externally managed migrations:
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use es_postgres::sqlx::postgres::PgPoolOptions;
//!
//! let pool = PgPoolOptions::new()
//!     .max_connections(32)
//!     .test_before_acquire(false) // no extra round trip per query
//!     .connect_with(es_postgres::PgStore::connect_options("postgres://app@localhost/app")?)
//!     .await?;
//! let store = es_postgres::PgStore::builder(pool)
//!     .schema("billing")
//!     .run_migrations(false) // `es_postgres::migration_script("billing")` was applied by a tool
//!     .build()
//!     .await?;
//! # drop(store);
//! # Ok(())
//! # }
//! # fn main() { let _ = example(); }
//! ```
//!
//! So there are two ways in, one builder: [`PgStore::builder_from_url`] (the store creates its
//! pool, sized with [`PgStoreBuilder::max_connections`] and
//! [`PgStoreBuilder::acquire_timeout`]) and [`PgStore::builder`] (the store uses the given pool;
//! those two settings are then refused). [`PgStore::connect`] is
//! `PgStore::builder_from_url(url).build()`. Connection URLs never appear with their password in
//! `Debug` output or error messages: `postgres://app:***@db.internal/app`.
//!
#![doc = include_str!("../DESIGN.md")]
#![doc(test(attr(deny(warnings))))]

mod archive;
mod codec;
mod error;
mod inline;
mod keys;
mod lease;
mod listener;
mod migrate;
mod outbox;
mod projection;
mod protocol;
mod read;
mod replica;
mod schema;
mod server;
mod tenants;
mod writer;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use es_core::contract::position::EpochStart;
use es_core::contract::{PartitionKey, Partitioning, StoreFuture};
use es_core::projection::HandlerError;
use es_core::{
    AppendLimits, AppendRequest, AppendResult, EventPages, EventStore, EventStream, ListStreams,
    ReadAll, ReadStream, RecordedEvent, SnapshotRecord, SnapshotStore, StoreError, StreamId,
    StreamPage, StreamSummary,
};
use futures::future::BoxFuture;
use futures::StreamExt as _;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use sqlx::{AssertSqlSafe, PgConnection, Row};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub use archive::PgEventArchive;
pub use error::Error;
pub use inline::InlineHandler;
pub use keys::PgKeyStore;
pub use migrate::{grants_script, migration_script};
pub use projection::{ExactlyOnce, PgProjection};
pub use replica::{ReplicaReads, DEFAULT_REPLICA_WAIT};
pub use schema::SchemaName;
pub use server::ServerSettings;
/// The `sqlx` this store is built on, for [`PgStore::builder`], [`PgStore::pool`], inline
/// projections and [`PgProjection`] handlers, without a `sqlx` dependency of your own.
pub use sqlx;
pub use tenants::PgTenants;

use codec::{jsonb_text, to_i64, to_u64, RawJsonb};
use error::{store_error, timed};
use schema::Sql;

/// The schema [`PgStore::connect`] and [`PgStore::builder`] use unless told otherwise.
pub const DEFAULT_SCHEMA: &str = "es";

/// The default polling interval of [`EventStore::wait_for_append`].
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The default number of group-commit writer tasks.
pub const DEFAULT_WRITERS: usize = 4;

/// The default append time-out: the longest an append may stall (a lock wait, an inline
/// projection's statement, an idle client between its statements) before PostgreSQL aborts it.
pub const DEFAULT_APPEND_TIMEOUT: Duration = Duration::from_secs(5);

/// The default number of appends that may wait for a writer before `append` waits for room.
pub const DEFAULT_QUEUE_CAPACITY: usize = 4096;

/// The default size of the pool [`PgStore::connect`] and [`PgStore::builder_from_url`] create.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16;

/// The default time [`PgStore::connect`]'s pool waits for a free connection before a query
/// fails with [`StoreError::Unavailable`].
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The least time a build waits for its read replica to replay the schema's migrations.
const REPLICA_SCHEMA_WAIT: Duration = Duration::from_secs(10);

/// The default client-side time-out of every other query (a page of a read, a snapshot, an outbox
/// or checkpoint statement).
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(75);

/// The PostgreSQL event and snapshot store. Cheap to clone; clones share one pool, one set of
/// writer tasks and one listener.
///
/// Must be built and used inside a Tokio runtime: it spawns its writer and listener tasks there.
/// The tasks end when the last clone is dropped.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    schema: SchemaName,
    sql: Arc<Sql>,
    limits: AppendLimits,
    poll_interval: Duration,
    /// The longest the client waits for a read, a snapshot or an outbox query.
    query_timeout: Duration,
    jobs: mpsc::Sender<writer::Job>,
    writers: Arc<writer::Shared>,
    partitioning: Partitioning,
    /// The latest known head of each partition.
    heads: Arc<[watch::Sender<u64>]>,
    /// Keeps `heads` current from other processes' notifications: started by the first wait
    /// for an append (a subscription), or at once with a read replica. A process that only
    /// appends never listens, so it does not receive every other process's notifications.
    listener: std::sync::OnceLock<JoinHandle<()>>,
    listen: listener::Listener,
    /// Sends the NOTIFY for this store's commits.
    notifier: JoinHandle<()>,
    server: ServerSettings,
    replica: Option<replica::Replica>,
    /// Runs multi-stream appends.
    streams: writer::streams::StreamsAppender,
}

impl Inner {
    /// Starts the listener unless it runs already.
    fn start_listening(&self) {
        self.listener
            .get_or_init(|| tokio::spawn(self.listen.clone().run()));
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Writers end by themselves once the job queue closes, after answering what they hold.
        if let Some(listener) = self.listener.get() {
            listener.abort();
        }
        self.notifier.abort();
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("schema", &self.inner.schema.as_str())
            .field("partitioning", &self.inner.partitioning)
            .field("limits", &self.inner.limits)
            .field("poll_interval", &self.inner.poll_interval)
            .finish_non_exhaustive()
    }
}

/// Configures and builds a [`PgStore`], on a URL ([`PgStore::builder_from_url`]) or on a pool
/// ([`PgStore::builder`]).
///
/// Its `Debug` output shows the URL without its password.
#[derive(Clone)]
#[must_use = "a builder does nothing until `build` is awaited"]
pub struct PgStoreBuilder {
    source: Source,
    max_connections: Option<u32>,
    acquire_timeout: Option<Duration>,
    schema: String,
    run_migrations: bool,
    limits: AppendLimits,
    poll_interval: Duration,
    writers: usize,
    append_timeout: Duration,
    queue_capacity: usize,
    query_timeout: Duration,
    inline: Vec<inline::InlineProjection>,
    require_tls: bool,
    replica: Option<Source>,
    replica_wait: Duration,
    partitioning: Partitioning,
}

/// Where a [`PgStoreBuilder`] gets its connections.
#[derive(Clone)]
enum Source {
    /// A pool the caller built.
    Pool(PgPool),
    /// A URL: `build` creates the pool.
    Url(String),
}

impl std::fmt::Debug for PgStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = f.debug_struct("PgStoreBuilder");
        match &self.source {
            Source::Pool(pool) => out.field("pool", pool),
            Source::Url(url) => out.field("url", &es_core::contract::redact_url(url)),
        };
        out.field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("schema", &self.schema)
            .field("run_migrations", &self.run_migrations)
            .field("limits", &self.limits)
            .field("poll_interval", &self.poll_interval)
            .field("writers", &self.writers)
            .field("append_timeout", &self.append_timeout)
            .field("queue_capacity", &self.queue_capacity)
            .field("query_timeout", &self.query_timeout)
            .field("inline", &self.inline)
            .field("require_tls", &self.require_tls)
            .field(
                "replica",
                &self.replica.as_ref().map(|source| match source {
                    Source::Pool(_) => "<pool>".to_owned(),
                    Source::Url(url) => es_core::contract::redact_url(url),
                }),
            )
            .field("replica_wait", &self.replica_wait)
            .field("partitioning", &self.partitioning)
            .finish()
    }
}

impl PgStoreBuilder {
    /// The most connections of the pool the store creates (default
    /// [`DEFAULT_MAX_CONNECTIONS`]): each writer task keeps one, the listener one, and reads
    /// and the outbox take one per query. Only for a builder from
    /// [`PgStore::builder_from_url`]; with a pool of your own, size the pool instead (`build`
    /// fails with [`Error::InvalidSetting`]).
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = Some(max);
        self
    }

    /// How long a query waits for a free connection of the pool the store creates before it
    /// fails with [`StoreError::Unavailable`] (default [`DEFAULT_ACQUIRE_TIMEOUT`]). Only for a
    /// builder from [`PgStore::builder_from_url`], like
    /// [`max_connections`](Self::max_connections).
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = Some(timeout);
        self
    }

    /// The schema holding the store's tables (default [`DEFAULT_SCHEMA`]). Validated by
    /// [`SchemaName::new`] when the store is built.
    pub fn schema(mut self, name: impl Into<String>) -> Self {
        self.schema = name.into();
        self
    }

    /// Whether `build` applies pending migrations (default `true`). With `false` the schema must
    /// be managed externally (see [`migration_script`]); `build` then only checks that it is at
    /// the version this crate needs.
    pub fn run_migrations(mut self, run: bool) -> Self {
        self.run_migrations = run;
        self
    }

    /// The store's feed partitions (default [`Partitioning::single`]: one feed). Each partition
    /// is a feed of its own with its own commit chain, so appends to streams of different
    /// partitions commit in parallel, across processes too (see the crate docs, section
    /// "Partitions"). The first store built on a schema records its partitioning there; a store
    /// built later with another one fails with [`Error::Partitioning`]. A schema that already
    /// held events or had begun an epoch when it was migrated to partitions has one partition.
    pub fn partitioning(mut self, partitioning: Partitioning) -> Self {
        self.partitioning = partitioning;
        self
    }

    /// Size limits enforced on appends (default [`AppendLimits::default`]).
    pub fn limits(mut self, limits: AppendLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The longest [`EventStore::wait_for_append`] waits without a notification (default
    /// [`DEFAULT_POLL_INTERVAL`]): the bound on subscription latency if notifications are lost.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// The number of group-commit writer tasks (default [`DEFAULT_WRITERS`], at least 1). Each
    /// holds at most one pooled connection while its group runs; with two, one group gathers and
    /// checks while the other commits.
    pub fn writers(mut self, writers: usize) -> Self {
        self.writers = writers.max(1);
        self
    }

    /// The append time-out (default [`DEFAULT_APPEND_TIMEOUT`], at least 1 ms): every lock wait
    /// of an append's own work, every statement of an append with inline projections, and every
    /// pause of such an append's client between its statements is limited to it; PostgreSQL
    /// aborts the append when one runs over. An append that has drawn its positions and stalls
    /// therefore holds later commits back for about this long at most, and never makes a reader
    /// skip. The caller of an aborted append gets [`StoreError::Unavailable`] (nothing was
    /// written unless the error says the outcome is unknown; retrying is safe either way).
    ///
    /// The client gives up on an append call that has not answered after three times this plus
    /// two seconds, closes its connection and reports [`StoreError::Unavailable`].
    pub fn append_timeout(mut self, timeout: Duration) -> Self {
        self.append_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The client-side time-out of every query but appends (default [`DEFAULT_QUERY_TIMEOUT`]):
    /// a page of a read, `head_position`, `stream_version`, a snapshot, an outbox, lease or
    /// checkpoint statement that has not answered by then fails with
    /// [`StoreError::Unavailable`], so a server host that vanished (sqlx sets no TCP keepalive
    /// on the client side) cannot hang a caller. Keep it above the server's `statement_timeout`
    /// (60 s with [`PgStore::connect_options`]), which cancels the statement itself.
    pub fn query_timeout(mut self, timeout: Duration) -> Self {
        self.query_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How many appends may wait for a writer task (default [`DEFAULT_QUEUE_CAPACITY`], at least
    /// 1). When the queue is full, [`EventStore::append`] waits for room instead of queueing
    /// without bound; an append whose caller stops waiting is dropped from the queue unsent.
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity.max(1);
        self
    }

    /// Runs `handler` inside the transaction of every append that writes events, after the events
    /// are inserted and before the commit: it sees exactly the committed events, once, in commit
    /// order (across appends of the same stream; appends to different streams may run their
    /// projections concurrently). Several inline projections run in the order they were added.
    ///
    /// The handler gets the append's connection (its transaction; do not commit or roll back)
    /// and the appended events as stored (their positions, versions and `recorded_at`; the
    /// payloads are the appended bytes). If it fails, the append fails with
    /// [`StoreError::InlineProjection`] and nothing of it is written; other appends that shared
    /// its group commit run again without it. A database error that concerns the whole group (a
    /// dropped connection, a deadlock) is handled like one of the append itself.
    ///
    /// Every append then takes an explicit transaction (`BEGIN`, the append, the handlers, the
    /// wait for its turn to commit, `COMMIT`: several round trips instead of one) with the
    /// group's stream locks held while the handlers run: keep handlers short.
    ///
    /// ```no_run
    /// # async fn example(pool: sqlx::PgPool) -> Result<(), es_postgres::Error> {
    /// let store = es_postgres::PgStore::builder(pool)
    ///     .inline_projection("event_counts", |conn, events| {
    ///         Box::pin(async move {
    ///             for event in events {
    ///                 sqlx::query(
    ///                     "INSERT INTO event_counts (event_type, n) VALUES ($1, 1) \
    ///                      ON CONFLICT (event_type) DO UPDATE SET n = event_counts.n + 1",
    ///                 )
    ///                 .bind(&event.event_type)
    ///                 .execute(&mut *conn)
    ///                 .await?;
    ///             }
    ///             Ok(())
    ///         })
    ///     })
    ///     .build()
    ///     .await?;
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// # fn main() { let _ = example; }
    /// ```
    pub fn inline_projection<F>(mut self, name: &str, handler: F) -> Self
    where
        F: for<'c> Fn(
                &'c mut PgConnection,
                &'c [RecordedEvent],
            ) -> BoxFuture<'c, Result<(), HandlerError>>
            + Send
            + Sync
            + 'static,
    {
        self.inline.push(inline::InlineProjection {
            name: name.to_owned(),
            handler: Arc::new(handler),
        });
        self
    }

    /// Refuses to build the store unless its connections are encrypted (default: `false`).
    ///
    /// PostgreSQL clients default to `sslmode=prefer`, which runs in plaintext, without a word,
    /// when the server offers no TLS. With this set, a builder from a URL whose `sslmode` allows
    /// plaintext (`disable`, `allow`, `prefer`, or none given) fails with
    /// [`Error::TlsRequired`] before connecting, and any builder whose connection the server
    /// reports as unencrypted fails with it after connecting. Use `sslmode=verify-full` with
    /// `sslrootcert=<CA file>` in production (see the production recipe); TLS needs the crate's
    /// `tls` feature.
    pub fn require_tls(mut self, require: bool) -> Self {
        self.require_tls = require;
        self
    }

    /// Reads events (`read_stream`, `read_all`, and the subscriptions and projections on them)
    /// from a streaming-replication standby of the primary at `url`, with read-your-writes: a
    /// read waits until the standby has replayed past the head this store knows (its own appends
    /// included), at most [`replica_wait`](Self::replica_wait), then reads from the primary
    /// instead. Never-skip holds on the standby as on the primary (see the crate docs, section
    /// "Read replicas"). Appends, snapshots, the outbox and checkpoints stay on the primary. The
    /// replica's pool has the primary's size and time-outs; [`require_tls`](Self::require_tls)
    /// applies to it too.
    pub fn read_replica(mut self, url: impl Into<String>) -> Self {
        self.replica = Some(Source::Url(url.into()));
        self
    }

    /// [`read_replica`](Self::read_replica) on a pool of the caller's.
    pub fn read_replica_pool(mut self, pool: PgPool) -> Self {
        self.replica = Some(Source::Pool(pool));
        self
    }

    /// The longest a read waits for the replica to reach its target before it reads from the
    /// primary (default [`DEFAULT_REPLICA_WAIT`]). Zero sends every read the replica has not
    /// caught up with to the primary at once.
    pub fn replica_wait(mut self, wait: Duration) -> Self {
        self.replica_wait = wait;
        self
    }

    /// Validates the configuration, connects (for a builder from a URL), migrates (or verifies)
    /// the schema, and starts the store's writer and listener tasks.
    pub async fn build(self) -> Result<PgStore, Error> {
        let schema = SchemaName::new(&self.schema)?;
        for source in std::iter::once(&self.source).chain(&self.replica) {
            if let (true, Source::Url(url)) = (self.require_tls, source) {
                let mode = PgStore::connect_options(url)?.get_ssl_mode();
                if matches!(
                    mode,
                    PgSslMode::Disable | PgSslMode::Allow | PgSslMode::Prefer
                ) {
                    return Err(Error::TlsRequired {
                        found: format!("the URL's sslmode is {mode:?}, which allows plaintext"),
                    });
                }
            }
        }
        let pool = self.pool_of(&self.source).await?;
        self.build_on(pool, schema).await
    }

    /// The pool of `source`: the caller's, or one made from the URL with the builder's size.
    async fn pool_of(&self, source: &Source) -> Result<PgPool, Error> {
        Ok(match source {
            Source::Pool(pool) => {
                if self.max_connections.is_some() || self.acquire_timeout.is_some() {
                    return Err(Error::InvalidSetting(
                        "`max_connections` and `acquire_timeout` size the pool the store creates \
                         from a URL; this builder was given a pool: configure that pool instead",
                    ));
                }
                pool.clone()
            }
            Source::Url(url) => {
                let max = self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
                if max == 0 {
                    return Err(Error::InvalidSetting(
                        "`max_connections` must be at least 1",
                    ));
                }
                PgPoolOptions::new()
                    .max_connections(max)
                    .acquire_timeout(self.acquire_timeout.unwrap_or(DEFAULT_ACQUIRE_TIMEOUT))
                    .test_before_acquire(false)
                    .connect_with(PgStore::connect_options(url)?)
                    .await
                    .map_err(|source| Error::connect(url, source))?
            }
        })
    }

    async fn build_on(self, pool: PgPool, schema: SchemaName) -> Result<PgStore, Error> {
        let server = ServerSettings::read(&pool).await?;
        if self.require_tls && !server.tls {
            return Err(Error::TlsRequired {
                found: "the server reports the connection as unencrypted".to_owned(),
            });
        }
        if self.run_migrations {
            migrate::run(&pool, &schema).await?;
        } else {
            migrate::verify(&pool, &schema).await?;
        }
        let sql = Arc::new(Sql::new(&schema));
        claim_partitioning(&pool, &sql, &schema, self.partitioning).await?;
        let replica = match &self.replica {
            None => None,
            Some(source) => {
                let pool = self.pool_of(source).await?;
                let settings = ServerSettings::read(&pool).await?;
                if self.require_tls && !settings.tls {
                    return Err(Error::TlsRequired {
                        found: "the replica reports the connection as unencrypted".to_owned(),
                    });
                }
                // The replica must hold the schema at this version: it replays the primary's, so a
                // migration just made there may take a moment to arrive.
                let patience =
                    tokio::time::Instant::now() + self.replica_wait.max(REPLICA_SCHEMA_WAIT);
                while let Err(err) = migrate::verify(&pool, &schema).await {
                    if tokio::time::Instant::now() >= patience {
                        return Err(err);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Some(replica::Replica {
                    pool,
                    wait: self.replica_wait,
                    counts: Arc::default(),
                })
            }
        };
        let partitions = self.partitioning.count();
        let heads = read_heads(&pool, &sql, partitions).await?;
        let (jobs, queue) = mpsc::channel(self.queue_capacity);
        let shared = Arc::new(writer::Shared::new(
            queue,
            self.writers,
            self.append_timeout,
            partitions,
        ));
        let inline: Arc<[inline::InlineProjection]> = self.inline.into();
        let committed = Arc::new(listener::Committed::new(partitions));
        let streams = writer::streams::StreamsAppender {
            pool: pool.clone(),
            sql: Arc::clone(&sql),
            partitioning: self.partitioning,
            heads: Arc::clone(&heads),
            committed: Arc::clone(&committed),
            inline: Arc::clone(&inline),
            append_timeout: self.append_timeout,
        };
        streams.spawn_writers(self.writers, &shared);
        let notifier = tokio::spawn(
            listener::Notifier {
                pool: pool.clone(),
                channel: schema.channel(),
                committed,
            }
            .run(),
        );
        server.log(&schema);
        let store = PgStore {
            inner: Arc::new(Inner {
                listen: listener::Listener {
                    pool: pool.clone(),
                    channel: schema.channel(),
                    heads_sql: Arc::clone(&sql.heads),
                    heads: Arc::clone(&heads),
                },
                pool,
                schema,
                sql,
                limits: self.limits,
                poll_interval: self.poll_interval,
                query_timeout: self.query_timeout,
                jobs,
                writers: shared,
                partitioning: self.partitioning,
                heads,
                listener: std::sync::OnceLock::new(),
                notifier,
                server,
                replica,
                streams,
            }),
        };
        if store.inner.replica.is_some() {
            // Replica reads wait for the heads this process knows of, other processes' too.
            store.inner.start_listening();
        }
        Ok(store)
    }
}

impl PgStore {
    /// Connects to `url`, migrates schema [`DEFAULT_SCHEMA`], and starts the store.
    ///
    /// The pool holds up to [`DEFAULT_MAX_CONNECTIONS`] connections and gives up acquiring one
    /// after [`DEFAULT_ACQUIRE_TIMEOUT`] (appends and reads then fail with
    /// [`StoreError::Unavailable`]). For other settings use [`PgStore::builder_from_url`].
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::builder_from_url(url).build().await
    }

    /// A builder for a store on `url`: [`build`](PgStoreBuilder::build) creates the pool, with
    /// the session settings of [`PgStore::connect_options`],
    /// [`max_connections`](PgStoreBuilder::max_connections) (default
    /// [`DEFAULT_MAX_CONNECTIONS`]) and [`acquire_timeout`](PgStoreBuilder::acquire_timeout)
    /// (default [`DEFAULT_ACQUIRE_TIMEOUT`]), and without a ping before each checkout.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), es_postgres::Error> {
    /// let store = es_postgres::PgStore::builder_from_url("postgres://app:pw@db.internal/app")
    ///     .schema("billing")
    ///     .build()
    ///     .await?;
    /// assert_eq!(store.schema().as_str(), "billing");
    /// # Ok(())
    /// # }
    /// # fn main() { let _ = example(); }
    /// ```
    pub fn builder_from_url(url: impl Into<String>) -> PgStoreBuilder {
        Self::builder_on(Source::Url(url.into()))
    }

    /// Connection options for `url` with the session settings [`PgStore::connect`] uses, for
    /// building a pool of your own: no statement runs longer than 60 s and no transaction sits
    /// idle longer than 60 s (appends set tighter bounds of their own, see
    /// [`PgStoreBuilder::append_timeout`]); the server checks every second whether the client of
    /// a running statement is still there, and probes idle connections with TCP keepalives (after
    /// 30 s idle, every 10 s, 3 probes), so a vanished client host frees its locks.
    pub fn connect_options(url: &str) -> Result<PgConnectOptions, Error> {
        let options: PgConnectOptions =
            url.parse().map_err(|source| Error::connect(url, source))?;
        Ok(options.options([
            ("statement_timeout", "60000"),
            ("idle_in_transaction_session_timeout", "60000"),
            ("client_connection_check_interval", "1000"),
            ("tcp_keepalives_idle", "30"),
            ("tcp_keepalives_interval", "10"),
            ("tcp_keepalives_count", "3"),
        ]))
    }

    /// A builder for a store on `pool` (build it with [`PgStore::connect_options`] and
    /// `test_before_acquire(false)`, see the crate docs, section "Connections").
    pub fn builder(pool: PgPool) -> PgStoreBuilder {
        Self::builder_on(Source::Pool(pool))
    }

    fn builder_on(source: Source) -> PgStoreBuilder {
        PgStoreBuilder {
            source,
            max_connections: None,
            acquire_timeout: None,
            schema: DEFAULT_SCHEMA.to_owned(),
            run_migrations: true,
            limits: AppendLimits::default(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            writers: DEFAULT_WRITERS,
            append_timeout: DEFAULT_APPEND_TIMEOUT,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            query_timeout: DEFAULT_QUERY_TIMEOUT,
            inline: Vec::new(),
            require_tls: false,
            replica: None,
            replica_wait: DEFAULT_REPLICA_WAIT,
            partitioning: Partitioning::single(),
        }
    }

    /// What the server runs under, as read when the store was built: version, role, TLS,
    /// durability settings (also logged then, as one line).
    pub fn server(&self) -> &ServerSettings {
        &self.inner.server
    }

    /// The read replica's pool, if the store has one
    /// ([`read_replica`](PgStoreBuilder::read_replica)).
    pub fn replica_pool(&self) -> Option<&PgPool> {
        self.inner.replica.as_ref().map(|r| &r.pool)
    }

    /// Where the event reads of a store with a read replica went so far; `None` without one.
    pub fn replica_reads(&self) -> Option<ReplicaReads> {
        self.inner.replica.as_ref().map(|r| r.counts.get())
    }

    /// `read` on the pool for event reads of `partition`: the primary's, or, with a replica,
    /// the replica's once it has caught up with the partition's head this handle knows now (else
    /// the primary's).
    fn on_read_pool(
        &self,
        partition: u32,
        read: impl FnOnce(PgPool) -> EventStream + Send + 'static,
    ) -> EventStream {
        let Some(replica) = self.inner.replica.clone() else {
            return read(self.inner.pool.clone());
        };
        let target = self
            .inner
            .heads
            .get(partition as usize)
            .map_or(0, |head| *head.borrow());
        let inner = Arc::clone(&self.inner);
        Box::pin(
            futures::stream::once(async move {
                read(
                    replica
                        .pool_for(partition, target, &inner.sql.head, &inner.pool)
                        .await,
                )
            })
            .flatten(),
        )
    }

    /// The pool the store runs on.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The schema holding the store's tables.
    pub fn schema(&self) -> &SchemaName {
        &self.inner.schema
    }

    /// The append limits in force.
    pub fn limits(&self) -> AppendLimits {
        self.inner.limits
    }
}

impl EventStore for PgStore {
    /// One transaction on a connection of its own, outside group commit: see
    /// `docs/15-multi-stream-appends.md`.
    fn append_streams(&self, requests: Vec<AppendRequest>) -> impl StoreFuture<Vec<AppendResult>> {
        let inner = Arc::clone(&self.inner);
        async move {
            es_core::contract::validate_streams(&requests, &inner.limits)?;
            inner.streams.append(&requests).await
        }
    }

    fn append(&self, request: AppendRequest) -> impl StoreFuture<AppendResult> {
        let inner = Arc::clone(&self.inner);
        async move {
            request.validate(&inner.limits)?;
            let partition = inner.partitioning.partition_of(&request.stream_id);
            let (reply, answer) = oneshot::channel();
            // Waits while the queue is full (backpressure); giving up here leaves nothing queued.
            let slot = inner
                .jobs
                .reserve()
                .await
                .map_err(|_| StoreError::backend("the store's writer tasks have stopped"))?;
            inner.writers.enqueued();
            slot.send(writer::Job {
                request,
                partition,
                reply,
            });
            answer
                .await
                .map_err(|_| StoreError::backend("the store's writer task stopped mid-append"))?
        }
    }

    /// One statement moves the rows from `events` to `archived_events` (migration 13).
    fn archive_stream(
        &self,
        stream: &StreamId,
        before: u64,
    ) -> impl StoreFuture<es_core::Archived> {
        let inner = Arc::clone(&self.inner);
        let stream = stream.clone();
        timed(self.inner.query_timeout, async move {
            let (version, moved, hot_from): (i64, i64, i64) =
                sqlx::query_as(AssertSqlSafe(Arc::clone(&inner.sql.archive_stream)))
                    .bind(stream.as_str())
                    .bind(i64::try_from(before).unwrap_or(i64::MAX))
                    .fetch_one(&inner.pool)
                    .await
                    .map_err(store_error)?;
            let what = format!("stream `{stream}`");
            es_core::contract::check_archive(&stream, before, to_u64(version, &what)?)?;
            Ok(es_core::Archived {
                moved: to_u64(moved, &what)?,
                hot_from: to_u64(hot_from, &what)?,
            })
        })
    }

    fn stream_version(&self, stream: &StreamId) -> impl StoreFuture<u64> {
        let inner = Arc::clone(&self.inner);
        let stream = stream.clone();
        timed(self.inner.query_timeout, async move {
            let version: i64 =
                sqlx::query_scalar(AssertSqlSafe(Arc::clone(&inner.sql.stream_version)))
                    .bind(stream.as_str())
                    .fetch_one(&inner.pool)
                    .await
                    .map_err(store_error)?;
            to_u64(version, &format!("stream `{stream}`"))
        })
    }

    /// A skip scan of the `(stream_id, stream_version)` unique index: one index descent per
    /// stream listed, plus one for its version, whatever the number of events (a recursive
    /// query, so the cost grows with the page, not the table).
    fn list_streams(&self, list: ListStreams) -> impl StoreFuture<StreamPage> {
        let inner = Arc::clone(&self.inner);
        timed(self.inner.query_timeout, async move {
            list.validate()?;
            let limit = list.page_size();
            // The first id to consider: after the previous page, or from the prefix on.
            let (lower, inclusive) = match &list.after {
                Some(after) if after.as_str() >= list.prefix.as_str() => {
                    (after.as_str().to_owned(), false)
                }
                _ => (list.prefix.clone(), true),
            };
            let upper = list.upper_bound();
            let sql = list_streams_sql(&inner.schema, inclusive, upper.is_some());
            let mut query = sqlx::query_as(AssertSqlSafe(sql))
                .bind(lower)
                .bind(i64::try_from(limit + 1).unwrap_or(i64::MAX));
            if let Some(upper) = upper {
                query = query.bind(upper);
            }
            let rows: Vec<(String, i64)> =
                query.fetch_all(&inner.pool).await.map_err(store_error)?;
            let mut streams = Vec::with_capacity(rows.len());
            for (id, version) in rows {
                let location = format!("stream `{id}`");
                let stream_id = StreamId::parse(&id).map_err(|e| StoreError::Corrupt {
                    location: location.clone(),
                    reason: e.to_string(),
                })?;
                streams.push(StreamSummary {
                    stream_id,
                    version: to_u64(version, &location)?,
                });
            }
            Ok(StreamPage::cut(streams, limit))
        })
    }

    fn read_stream(&self, stream: &StreamId, read: ReadStream) -> EventStream {
        let (sql, timeout, stream) = (
            Arc::clone(&self.inner.sql),
            self.inner.query_timeout,
            stream.clone(),
        );
        let partition = self.inner.partitioning.partition_of(&stream);
        self.on_read_pool(partition, move |pool| {
            read::read_stream(pool, sql, timeout, stream, partition, read)
        })
    }

    /// Pages of rows as received, of the columns a load reads (no stream id, no metadata):
    /// each payload is decoded straight from its row.
    fn read_stream_pages(&self, stream: &StreamId, read: ReadStream) -> EventPages {
        read::read_stream_pages(
            self.inner.pool.clone(),
            Arc::clone(&self.inner.sql),
            self.inner.query_timeout,
            stream.clone(),
            read,
        )
    }

    fn read_all(&self, read: ReadAll) -> EventStream {
        let partition = match read.partition_in(&self.inner.partitioning) {
            Ok(partition) => partition,
            Err(err) => return es_core::contract::failed_read(err),
        };
        let (sql, timeout) = (Arc::clone(&self.inner.sql), self.inner.query_timeout);
        self.on_read_pool(partition, move |pool| {
            read::read_all(pool, sql, timeout, partition, read)
        })
    }

    fn partitioning(&self) -> Partitioning {
        self.inner.partitioning
    }

    fn partition_head(&self, partition: u32) -> impl StoreFuture<u64> {
        let checked = self.inner.partitioning.check(partition);
        let inner = Arc::clone(&self.inner);
        timed(self.inner.query_timeout, async move {
            checked?;
            let head: i64 = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&inner.sql.head)))
                .bind(read::partition_param(partition))
                .fetch_one(&inner.pool)
                .await
                .map_err(store_error)?;
            to_u64(head, "the head row")
        })
    }

    fn partition_epochs(&self, partition: u32) -> impl StoreFuture<Vec<EpochStart>> {
        let checked = self.inner.partitioning.check(partition);
        let inner = Arc::clone(&self.inner);
        timed(self.inner.query_timeout, async move {
            checked?;
            // Partition 0's surviving heads are in the epochs table itself.
            let rows: Vec<(i64, i64)> = if partition == 0 {
                sqlx::query_as(AssertSqlSafe(Arc::clone(&inner.sql.epochs)))
                    .fetch_all(&inner.pool)
                    .await
            } else {
                sqlx::query_as(AssertSqlSafe(Arc::clone(&inner.sql.partition_epochs)))
                    .bind(read::partition_param(partition))
                    .fetch_all(&inner.pool)
                    .await
            }
            .map_err(store_error)?;
            rows.into_iter()
                .map(|(epoch, previous_head)| {
                    Ok(EpochStart {
                        epoch: to_u64(epoch, "the epochs table")?,
                        previous_head: to_u64(previous_head, "the epochs table")?,
                    })
                })
                .collect()
        })
    }

    fn wait_for_partition(&self, partition: u32, after: u64) -> impl Future<Output = ()> + Send {
        self.inner.start_listening();
        // A partition the store does not have never moves: wait for the polling interval.
        let (rx, after) = match self.inner.heads.get(partition as usize) {
            Some(head) => (head.subscribe(), after),
            None => (self.inner.heads[0].subscribe(), u64::MAX),
        };
        let poll = self.inner.poll_interval;
        async move { es_core::contract::wait_on_watch(&rx, after, poll).await }
    }
}

/// A watch of the current head of each of `partitions` partitions.
async fn read_heads(
    pool: &PgPool,
    sql: &Sql,
    partitions: u32,
) -> Result<Arc<[watch::Sender<u64>]>, Error> {
    let mut known = vec![0_u64; partitions as usize];
    let rows: Vec<(i32, i64)> = sqlx::query_as(AssertSqlSafe(Arc::clone(&sql.heads)))
        .bind(read::partition_param(partitions))
        .fetch_all(pool)
        .await
        .map_err(Error::Database)?;
    for (partition, head) in rows {
        if let Some(slot) = usize::try_from(partition)
            .ok()
            .and_then(|p| known.get_mut(p))
        {
            *slot = u64::try_from(head).unwrap_or(0);
        }
    }
    Ok(known
        .into_iter()
        .map(|head| watch::channel(head).0)
        .collect())
}

/// The skip scan of [`EventStore::list_streams`]: distinct stream ids from `$1` (inclusive or
/// not) below `$3` (when `bounded`), at most `$2`, each with its version.
fn list_streams_sql(schema: &SchemaName, inclusive: bool, bounded: bool) -> String {
    let events = format!("{}.events", schema.quoted());
    let from = if inclusive { ">=" } else { ">" };
    let below = if bounded { " AND e.stream_id < $3" } else { "" };
    format!(
        "WITH RECURSIVE ids(stream_id) AS ( \
           (SELECT e.stream_id FROM {events} e \
             WHERE e.stream_id {from} $1{below} \
             ORDER BY e.stream_id LIMIT 1) \
           UNION ALL \
           SELECT (SELECT e.stream_id FROM {events} e \
                    WHERE e.stream_id > ids.stream_id{below} \
                    ORDER BY e.stream_id LIMIT 1) \
             FROM ids WHERE ids.stream_id IS NOT NULL \
         ) \
         SELECT ids.stream_id, \
                (SELECT max(e.stream_version) FROM {events} e WHERE e.stream_id = ids.stream_id) \
           FROM ids WHERE ids.stream_id IS NOT NULL LIMIT $2"
    )
}

/// Records `partitioning` in the schema unless one is recorded, and fails with
/// [`Error::Partitioning`] if the recorded one differs.
async fn claim_partitioning(
    pool: &PgPool,
    sql: &Sql,
    schema: &SchemaName,
    partitioning: Partitioning,
) -> Result<(), Error> {
    let key = |key: PartitionKey| match key {
        PartitionKey::Stream => "stream",
        PartitionKey::Category => "category",
    };
    let (count, recorded_key): (i32, String) =
        sqlx::query_as(AssertSqlSafe(Arc::clone(&sql.claim_partitioning)))
            .bind(read::partition_param(partitioning.count()))
            .bind(key(partitioning.key()))
            .fetch_one(pool)
            .await
            .map_err(Error::Database)?;
    if i64::from(count) == i64::from(partitioning.count())
        && recorded_key == key(partitioning.key())
    {
        return Ok(());
    }
    Err(Error::Partitioning(StoreError::InvalidPartitioning {
        reason: format!(
            "schema `{schema}` was created with {count} partition(s) by {recorded_key}; \
             this store was built with {partitioning}"
        ),
    }))
}

impl SnapshotStore for PgStore {
    fn load_snapshot(&self, stream: &StreamId) -> impl StoreFuture<Option<SnapshotRecord>> {
        let inner = Arc::clone(&self.inner);
        let stream = stream.clone();
        timed(self.inner.query_timeout, async move {
            let row = sqlx::query(AssertSqlSafe(Arc::clone(&inner.sql.load_snapshot)))
                .bind(stream.as_str())
                .fetch_optional(&inner.pool)
                .await
                .map_err(store_error)?;
            let Some(row) = row else { return Ok(None) };
            let location = || format!("snapshot of `{stream}`");
            let version: i64 = row.try_get("version").map_err(store_error)?;
            let schema_version: i64 = row.try_get("schema_version").map_err(store_error)?;
            let payload = row.try_get_raw("payload").map_err(store_error)?;
            let payload = jsonb_text(&payload).map_err(|reason| StoreError::Corrupt {
                location: location(),
                reason,
            })?;
            let recorded_at: DateTime<Utc> = row.try_get("recorded_at").map_err(store_error)?;
            let event_id: Option<uuid::Uuid> = row.try_get("event_id").map_err(store_error)?;
            Ok(Some(SnapshotRecord {
                event_id,
                version: to_u64(version, &location())?,
                schema_version: u32::try_from(schema_version).map_err(|_| StoreError::Corrupt {
                    location: location(),
                    reason: format!("schema version {schema_version} is out of range"),
                })?,
                payload: Bytes::copy_from_slice(payload),
                recorded_at,
                stream_id: stream,
            }))
        })
    }

    fn save_snapshot(&self, snapshot: SnapshotRecord) -> impl StoreFuture<bool> {
        let inner = Arc::clone(&self.inner);
        timed(self.inner.query_timeout, async move {
            snapshot.validate()?;
            let result = sqlx::query(AssertSqlSafe(Arc::clone(&inner.sql.save_snapshot)))
                .bind(snapshot.stream_id.as_str())
                .bind(to_i64(snapshot.version))
                .bind(i64::from(snapshot.schema_version))
                .bind(RawJsonb(&snapshot.payload))
                .bind(snapshot.recorded_at)
                .bind(snapshot.event_id)
                .fetch_one(&inner.pool)
                .await;
            match result {
                Ok(row) => row.try_get::<bool, _>(0).map_err(store_error),
                Err(err)
                    if error::sqlstate(&err)
                        .is_some_and(|c| c.starts_with("22") || c.starts_with("54")) =>
                {
                    Err(StoreError::InvalidRequest {
                        stream_id: snapshot.stream_id.clone(),
                        reason: format!("PostgreSQL rejected the snapshot: {err}"),
                    })
                }
                Err(err) => Err(store_error(err)),
            }
        })
    }

    fn delete_snapshot(&self, stream: &StreamId, version: u64) -> impl StoreFuture<bool> {
        let inner = Arc::clone(&self.inner);
        let stream = stream.clone();
        timed(self.inner.query_timeout, async move {
            sqlx::query_scalar(AssertSqlSafe(Arc::clone(&inner.sql.delete_snapshot)))
                .bind(stream.as_str())
                .bind(to_i64(version))
                .fetch_one(&inner.pool)
                .await
                .map_err(store_error)
        })
    }
}
