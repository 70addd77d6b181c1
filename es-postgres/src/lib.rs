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
//! # Schema
//!
//! Everything lives in one schema (default `es`, set with [`PgStoreBuilder::schema`]; the name is
//! validated by [`SchemaName`] and always double-quoted, never pasted unchecked):
//!
//! - `events`: `global_position bigint` (primary key), `stream_id text`, `category text`,
//!   `stream_version bigint`, `event_id uuid` (unique), `event_type text`,
//!   `schema_version bigint`, `payload jsonb`, `metadata jsonb`, `recorded_at timestamptz` (the
//!   database clock, microseconds). Unique `(stream_id, stream_version)` serves stream reads,
//!   stream versions and as-of loads (by version, position or time: `recorded_at` never
//!   decreases along a stream, so a load reads forward and stops at the bound); an index on
//!   `(category, global_position)` serves category reads and subscriptions; the primary key
//!   serves the global feed. Text columns use the `"C"` collation (stream ids are ASCII).
//! - `snapshots`: one row per stream, written upsert-if-newer.
//! - `outbox`: integration messages waiting for delivery, keyed by an outbox `position`; `payload`
//!   and `metadata` are `json` (checked by PostgreSQL, kept byte for byte).
//! - `outbox_dead_letters`: outbox records the relay parked because the broker can never accept
//!   them, with the error, the attempts and the time, keyed by their outbox position.
//! - `relay_leases`: the outbox relay's lease (owner, expiry on the database clock, and the
//!   generation that fences stale relays), and the last dead-lettering error.
//! - `checkpoints`: one row per projection, the global position it has handled up to and the
//!   generation (raised by every rebuild) that fences stale runners.
//! - `epochs`: one row per epoch (see below): the epoch, the head that survived when it began,
//!   the server incarnation that began it.
//! - sequences `positions`, `outbox_positions` and `clock` (allocation state, see below),
//!   `schema_migrations` (bookkeeping), and the functions `append_events`,
//!   `wait_for_predecessors`, `check_incarnation`, and for the relay and checkpoints
//!   `relay_mark_delivered`, `relay_dead_letter`, `relay_requeue` and `checkpoint_save`.
//!
//! A stream's version is its highest stored `stream_version`; there is no separate streams
//! table to update on every append.
//!
//! # Appends
//!
//! [`AppendRequest::validate`](es_core::AppendRequest::validate) runs first, in the caller's
//! task. Concurrent appends of one store are then *group-committed*: a writer task sends
//! everything queued (one append per stream per group) as arrays to one call of the PL/pgSQL
//! function `append_events`, one round trip and one commit for the group. Inside, each append
//! is decided on its own: expected version, idempotent retry (the stored copies of its event
//! ids, classified by [`es_core::contract::classify_retry`], so results match `es-memory`), or a
//! conflict. A failing append does not fail the others; a group that fails as a whole (for
//! example an event PostgreSQL rejects as invalid JSON) is re-run append by append, so the bad
//! append gets its typed error alone. Conditions are detected by data, SQLSTATE and constraint
//! name, never by message text. Events go in with one multi-row `INSERT .. SELECT FROM unnest(..)`.
//!
//! Per-stream concurrency across sessions and processes is a transaction-scoped advisory lock
//! per stream (taken in key order, so groups never deadlock), after which the stream's version
//! is read in a fresh snapshot.
//!
//! # Global order that never skips
//!
//! A plain sequence breaks the feed: positions are drawn at insert time but become visible at
//! commit, so a reader can pass a position whose transaction commits later (measured in the
//! project's research: a polling reader lost 17-28% of events). `es-postgres` allocates
//! positions in a short serialized section and commits in allocation order:
//!
//! 1. after its per-append checks, the group takes a session-level advisory lock (held for
//!    microseconds, released even on error), draws a block of consecutive positions, takes a
//!    transaction-level lock keyed by the block's *last* position, and releases the session lock;
//! 2. it inserts its events (groups insert in parallel) and queues a `NOTIFY` with the new head;
//! 3. as the very last step before commit (`wait_for_predecessors`) it waits until every
//!    allocation below its first position has ended: it waits for the lock of the position just
//!    below its own (the previous block's last one); if that row is visible, the previous block
//!    committed, and it committed only after everything before it had ended, so the wait is
//!    over. If not, the previous block rolled back, and the group waits, one by one, for the
//!    locks of every position between the highest committed one and its own, which covers every
//!    allocation that may still be open.
//!
//! So a transaction becomes visible only after every transaction with lower positions is visible
//! or gone, **whatever way those transactions end**: commit, rollback after allocating (an inline
//! projection that fails, an idempotent retry that meets the unique key, a deadlock victim, a
//! statement or lock time-out, a terminated backend, a client that vanished), in any process
//! sharing the schema. Once `read_all` has returned position `p`, nothing at or below `p` appears
//! later, and a later append to a stream always gets a higher position (per-stream order holds in
//! the feed). The order is the order of the commit records in the WAL, so a hot standby replaying
//! it makes the transactions visible in the same order. Positions are dense within an epoch
//! except where an append failed after its allocation. There is no time-out that skips: a reader
//! never moves past an open allocation. `head_position` is the highest visible position.
//! `recorded_at` is taken in the allocation section and never decreases, even if the server clock
//! steps back. Tested by `tests/commit_order.rs` (each way of ending after allocation, against
//! subscribers on other stores of the same schema) and by the chaos checker (`cargo xtask
//! chaos`), which kills, stalls, times out and terminates writers of several processes.
//!
//! **Stalls are bounded** by the append time-out ([`PgStoreBuilder::append_timeout`], default
//! [`DEFAULT_APPEND_TIMEOUT`]): an append's own lock waits give up after it (`lock_timeout`, set
//! locally), and an append with inline projections runs with `statement_timeout` and
//! `idle_in_transaction_session_timeout` set to it in its transaction, so a projection that hangs,
//! a paused client or a vanished host is aborted by PostgreSQL. An append that stalls after
//! drawing its positions holds later commits back for about the time-out, then rolls back, and the
//! commits behind it go on without a skip (`a_stalled_append_is_aborted_and_the_chain_moves_on`).
//! The wait for earlier allocations is exempt from the time-out, since each of those is bounded
//! the same way. What is not bounded: a COMMIT that waits for a synchronous standby or a full
//! disk, and a transaction of a client that does not use this store's append function. The
//! client gives up on a call after three times the time-out plus two seconds, closes its
//! connection and reports [`StoreError::Unavailable`].
//!
//! **Epochs.** Positions carry an epoch (see [`es_core::contract::position`]). Each session checks, once,
//! before its first allocation, whether the server is the incarnation that began the current
//! epoch (`pg_postmaster_start_time()`, recorded in the `epochs` table); if not (the schema's
//! first append, a restart, a restore from a backup, a promoted standby), it begins a new epoch
//! numbered from the clock, whose positions lie above anything handed out before, and records
//! the head that survived. A subscriber or a projection checkpoint that had passed that head gets
//! [`StoreError::LostTail`] instead of skipping the new events (`tests/epochs.rs`: a restart loses
//! nothing and nobody is told anything; a cold backup restored makes the reader that had read past
//! it fail with `LostTail`, while a reader behind the surviving head goes on; a dropped and
//! recreated schema is a lost tail for every old reader). Limits: two incarnations that begin
//! within the same second of the clock, the second restored from a backup taken before the
//! first began, would share an epoch; a transaction-mode pooler that does not keep session
//! settings makes every allocation fail (the check cannot stick to a session).
//!
//! Cost. Serializing commits costs 4-6x durable throughput when every append commits alone
//! (`research/non-rust-anchors.md` §4.1). Group commit wins it back: with 16 concurrent callers
//! the sixteen appends share one call and one commit, and only the allocation (microseconds) and
//! the commit order are serialized, not the inserts. The wait for earlier allocations costs one
//! lock and one index probe when the previous block committed; the walk past a rolled-back block
//! costs a lock per position it covers, and happens only after a rollback. `bench/src/postgres.rs`
//! compares against raw sqlx inserts into the same table shape with no ordering guarantee, in the
//! same run, durable settings; the README's benchmark table has the current figures.
//!
//! Measured alternatives: holding one global lock from position allocation to commit (the
//! classic approach) reached 0.6x at 16 tasks with single events even with group commit, and
//! 0.59x with 100-event appends, because the inserts of concurrent groups could not overlap; a
//! `streams` table with a version row per stream (lock, then update) cost about twice the server
//! CPU per append of the advisory-lock design used now.
//!
//! # Reads and subscriptions
//!
//! Reads are lazy streams paged by keyset (`stream_version >= $next`, `global_position > $after`)
//! with one short query per page, so a large stream never sits in memory and no transaction stays
//! open; the next page is fetched while the caller consumes the current one (stream reads, whose
//! pages start at known versions, keep two pages in flight). Pages grow from 512 rows to 10,000
//! rows or about 8 MiB of payload. `read_all` filters by category and event type in SQL. The
//! read benchmarks compare both reads with one unpaged raw SELECT decoded into the same
//! `RecordedEvent`s; the README's benchmark table has the current ratios.
//!
//! [`EventStore::subscribe`] is es-core's catch-up-then-live loop over `read_all`. Its wake-ups
//! come from a listener task: `LISTEN <schema>_events` on a connection of the pool, a
//! `tokio::sync::watch` of the head, re-read from the table after every (re)connection; the
//! store's own writers publish their commits directly. If notifications are lost the polling
//! interval ([`PgStoreBuilder::poll_interval`], default 1 s) bounds the delay. Dropped
//! connections and server restarts surface as [`StoreError::Unavailable`], which subscriptions
//! retry with backoff and resume after the last delivered position.
//!
//! # Durability
//!
//! An acknowledged append is committed with the server's `synchronous_commit` setting (on by
//! default: flushed to the WAL). If the connection drops mid-append the caller gets
//! [`StoreError::Unavailable`] and cannot know whether the group committed: retrying the same
//! request is safe, it returns the original result if the events were stored. No batch is ever
//! half-written. With `synchronous_commit = off` a crash may lose the last acknowledged appends
//! (never half of one, and never in a way that reorders the feed); the restart begins a new
//! epoch, so the lost positions are never handed out again and readers that had passed them get
//! [`StoreError::LostTail`].
//!
//! # Migrations
//!
//! [`PgStoreBuilder::build`] applies the embedded, versioned migrations (`migrations/*.sql`) in
//! one transaction under an advisory lock, so several processes may start at once; applied
//! migrations are recorded with a checksum in `<schema>.schema_migrations`. To manage the schema
//! yourself, render the SQL with [`migration_script`], apply it with your tool (in one
//! transaction), and build with [`run_migrations(false)`](PgStoreBuilder::run_migrations): the
//! store then only verifies that the schema is at the version it needs.
//!
//! # Connections
//!
//! Each writer task keeps one connection of the pool ([`PgStoreBuilder::writers`], default 4,
//! though small appends use one at a time), the listener keeps one, and reads take one per page.
//! Build pools with `test_before_acquire(false)`: sqlx otherwise pings before every checkout, a
//! round trip per query. [`PgStore::connect`] and [`PgStore::builder_from_url`] do, and set
//! the session settings of [`PgStore::connect_options`] (statement and idle-transaction time-outs of 60 s, a check every
//! second that the client of a running statement is still there, TCP keepalives); use those
//! options for a pool of your own. Appends set their own, tighter bounds (see above).
//!
//! Appends wait in a bounded queue ([`PgStoreBuilder::queue_capacity`]): when it is full,
//! `append` waits for room (backpressure) instead of letting memory grow, and an append whose
//! caller stopped waiting is dropped from the queue unsent.
//!
//! # Outbox and relay
//!
//! [`PgStore`] implements [`OutboxStore`](es_core::OutboxStore) and
//! [`CheckpointStore`](es_core::CheckpointStore), so it is an
//! [`es_core::StreamingStore`] for es-core's repository translators, [`Relay`](es_core::Relay)
//! and projection runner. The outbox messages of an [`AppendRequest`] are written by the same
//! `append_events` call as its events, so they commit together or not at all: a conflicting,
//! duplicate (idempotent retry) or failed append writes none. Their outbox positions are drawn in
//! the serialized allocation section together with the global positions, and commits follow
//! allocation order, so outbox order is commit order and a stream's messages are in stream
//! order. [`pending_outbox`](es_core::OutboxStore::pending_outbox) returns the oldest records;
//! [`mark_delivered`](es_core::OutboxStore::mark_delivered) deletes them (the events stay as the
//! audit trail). Delivery is at least once: a relay that dies after the broker acknowledged a
//! batch and before marking it makes the next relay publish that batch again, with the same
//! message ids.
//!
//! **The lease and its fencing token.** The relay lease is the `outbox` row of `relay_leases`,
//! taken (one `INSERT .. ON CONFLICT DO UPDATE`, which locks the row, so concurrent relays decide
//! one after the other) when it is free, released, expired or already held by the same owner,
//! with expiry on the database clock so relays on hosts with skewed clocks agree. Its
//! `generation` goes up whenever it changes hands (a renewal by the holder keeps it; a release
//! only ends the lease, so generations never go down). `relay_mark_delivered` and
//! `relay_dead_letter` check the caller's generation under a lock on the lease row: a relay
//! taking the lease over waits for a mark in progress to commit, and a mark or dead-lettering
//! sent after the takeover is refused with [`StoreError::Fenced`], writing nothing. es-core's
//! [`Relay`](es_core::Relay) also stops publishing before its lease ends (see
//! [`es_core::outbox`]). Tested on this store by the streaming conformance cases
//! `relay_lease_generations_fence_stale_owners` and
//! `two_relays_with_a_short_lease_never_publish_at_once` (two live relays, a 1 s lease, a
//! publisher taking three times the lease on every fourth call, one relay's mark stalled 2.5 s:
//! publish calls never overlap, every record is published, the stalled mark is refused).
//!
//! **Dead letters.** [`dead_letter`](es_core::OutboxStore::dead_letter) moves records from
//! `outbox` to `outbox_dead_letters` in one statement (a record is in one table or the other,
//! never both or neither) and records the last error in the lease row;
//! [`relay_status`](es_core::OutboxStore::relay_status) counts both tables and reports the lease
//! and the last error; [`requeue_dead_letters`](es_core::OutboxStore::requeue_dead_letters) moves
//! dead letters back into `outbox` with new positions from `outbox_positions` (so a re-queued
//! record comes after every record allocated before it: it is published late for its key, see
//! es-core's [outbox docs](es_core::outbox)). Tested by `dead_letters_are_parked_and_requeued`,
//! `relay_parks_poison_records_and_keeps_going`, and against a real Kafka-protocol broker by
//! `poison_records_are_dead_lettered` in `es-kafka/tests/postgres_outbox.rs`.
//!
//! # Projections
//!
//! [`PgStore`] keeps projection checkpoints in the `checkpoints` table, with the generation a
//! rebuild raises. For read models in the same database, [`ExactlyOnce`] runs a
//! [`PgProjection`] so that each batch's read-model writes and its checkpoint commit in one
//! transaction: after any crash every event has been applied exactly once, also when a rebuild
//! races a second runner (`tests/projections.rs`). Inline projections
//! ([`PgStoreBuilder::inline_projection`]) run inside the append's own transaction instead. How
//! to write and run each, with examples: the user guide, chapter 7 (`docs/07-projections.md`,
//! built as the `es-guide` crate's docs).
#![doc(test(attr(deny(warnings))))]

mod codec;
mod error;
mod inline;
mod listener;
mod migrate;
mod outbox;
mod projection;
mod protocol;
mod read;
mod schema;
mod writer;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use es_core::contract::position::EpochStart;
use es_core::contract::StoreFuture;
use es_core::projection::HandlerError;
use es_core::{
    AppendLimits, AppendRequest, AppendResult, EventStore, EventStream, ReadAll, ReadStream,
    RecordedEvent, SnapshotRecord, SnapshotStore, StoreError, StreamId,
};
use futures::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgConnection, Row};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub use error::Error;
pub use inline::InlineHandler;
pub use migrate::migration_script;
pub use projection::{ExactlyOnce, PgProjection};
pub use schema::SchemaName;
/// The `sqlx` this store is built on, for [`PgStore::builder`], [`PgStore::pool`], inline
/// projections and [`PgProjection`] handlers, without a `sqlx` dependency of your own.
pub use sqlx;

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
    head: Arc<watch::Sender<u64>>,
    listener: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Writers end by themselves once the job queue closes, after answering what they hold.
        self.listener.abort();
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("schema", &self.inner.schema.as_str())
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

    /// Validates the configuration, connects (for a builder from a URL), migrates (or verifies)
    /// the schema, and starts the store's writer and listener tasks.
    pub async fn build(self) -> Result<PgStore, Error> {
        let schema = SchemaName::new(&self.schema)?;
        let pool = match &self.source {
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
        };
        self.build_on(pool, schema).await
    }

    async fn build_on(self, pool: PgPool, schema: SchemaName) -> Result<PgStore, Error> {
        if self.run_migrations {
            migrate::run(&pool, &schema).await?;
        } else {
            migrate::verify(&pool, &schema).await?;
        }
        let sql = Arc::new(Sql::new(&schema));
        let head: i64 = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&sql.head)))
            .fetch_one(&pool)
            .await
            .map_err(Error::Database)?;
        let head = Arc::new(watch::channel(u64::try_from(head).unwrap_or(0)).0);
        let (jobs, queue) = mpsc::channel(self.queue_capacity);
        let shared = Arc::new(writer::Shared::new(
            queue,
            self.writers,
            self.append_timeout,
        ));
        let inline: Arc<[inline::InlineProjection]> = self.inline.into();
        for _ in 0..self.writers {
            let writer = writer::Writer {
                pool: pool.clone(),
                conn: None,
                sql: Arc::clone(&sql),
                head: Arc::clone(&head),
                shared: Arc::clone(&shared),
                inline: Arc::clone(&inline),
            };
            tokio::spawn(writer.run());
        }
        let listener = listener::Listener {
            pool: pool.clone(),
            channel: schema.channel(),
            head_sql: Arc::clone(&sql.head),
            head: Arc::clone(&head),
        };
        let listener = tokio::spawn(listener.run());
        Ok(PgStore {
            inner: Arc::new(Inner {
                pool,
                schema,
                sql,
                limits: self.limits,
                poll_interval: self.poll_interval,
                query_timeout: self.query_timeout,
                jobs,
                writers: shared,
                head,
                listener,
            }),
        })
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
        }
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
    fn append(&self, request: AppendRequest) -> impl StoreFuture<AppendResult> {
        let inner = Arc::clone(&self.inner);
        async move {
            request.validate(&inner.limits)?;
            let (reply, answer) = oneshot::channel();
            // Waits while the queue is full (backpressure); giving up here leaves nothing queued.
            let slot = inner
                .jobs
                .reserve()
                .await
                .map_err(|_| StoreError::backend("the store's writer tasks have stopped"))?;
            inner.writers.enqueued();
            slot.send(writer::Job { request, reply });
            answer
                .await
                .map_err(|_| StoreError::backend("the store's writer task stopped mid-append"))?
        }
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

    fn read_stream(&self, stream: &StreamId, read: ReadStream) -> EventStream {
        read::read_stream(
            self.inner.pool.clone(),
            Arc::clone(&self.inner.sql),
            self.inner.query_timeout,
            stream.clone(),
            read,
        )
    }

    fn read_all(&self, read: ReadAll) -> EventStream {
        read::read_all(
            self.inner.pool.clone(),
            Arc::clone(&self.inner.sql),
            self.inner.query_timeout,
            read,
        )
    }

    fn head_position(&self) -> impl StoreFuture<u64> {
        let inner = Arc::clone(&self.inner);
        timed(self.inner.query_timeout, async move {
            let head: i64 = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&inner.sql.head)))
                .fetch_one(&inner.pool)
                .await
                .map_err(store_error)?;
            to_u64(head, "the head row")
        })
    }

    fn epochs(&self) -> impl StoreFuture<Vec<EpochStart>> {
        let inner = Arc::clone(&self.inner);
        timed(self.inner.query_timeout, async move {
            let rows: Vec<(i64, i64)> =
                sqlx::query_as(AssertSqlSafe(Arc::clone(&inner.sql.epochs)))
                    .fetch_all(&inner.pool)
                    .await
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

    fn wait_for_append(&self, after: u64) -> impl Future<Output = ()> + Send {
        let rx = self.inner.head.subscribe();
        let poll = self.inner.poll_interval;
        async move { es_core::contract::wait_on_watch(&rx, after, poll).await }
    }
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
                .execute(&inner.pool)
                .await;
            match result {
                Ok(done) => Ok(done.rows_affected() == 1),
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
            let done = sqlx::query(AssertSqlSafe(Arc::clone(&inner.sql.delete_snapshot)))
                .bind(stream.as_str())
                .bind(to_i64(version))
                .execute(&inner.pool)
                .await
                .map_err(store_error)?;
            Ok(done.rows_affected() == 1)
        })
    }
}
