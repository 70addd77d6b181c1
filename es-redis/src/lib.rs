//! The Redis event store for `es-core`: one atomic Lua script per append (or per group of
//! concurrent appends), Redis streams for the per-stream logs, the global feed and the outbox,
//! `XREAD BLOCK` for live subscriptions.
//!
//! [`RedisStore`] implements [`EventStore`], [`SnapshotStore`], [`OutboxStore`] and
//! [`CheckpointStore`] with the same guarantees as `es-memory` and `es-postgres`, proven by the
//! same conformance suites: optimistic concurrency by [`ExpectedVersion`], all-or-nothing
//! batches, idempotent retries by event id, a global feed in commit order that never skips,
//! snapshots upserted if newer, outbox records written atomically with their events.
//!
//! ```no_run
//! use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};
//! use es_redis::RedisStore;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::builder("redis://127.0.0.1:6379")
//!     .prefix("shop")
//!     .build()
//!     .await?;
//! let stream = StreamId::new("order", "42")?;
//! let event = NewEvent::new("OrderPlaced", 1, r#"{"total":1299}"#)?;
//! let result = store
//!     .append(AppendRequest::new(stream, ExpectedVersion::NoStream, vec![event]))
//!     .await?;
//! assert_eq!(result.stream_version, 1);
//! # Ok(())
//! # }
//! # let _ = example;
//! ```
//!
//! # Key layout
//!
//! Every key starts with the store's prefix `<p>` (default `es`; 1 to 64 bytes of
//! `[A-Za-z0-9_.:-]`, see [`RedisStoreBuilder::prefix`]), so several stores can share one
//! database. [`Keys`] computes the names.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<p>:{<stream>}:events` | stream | the stream's events; entry id `<version>-0` |
//! | `<p>:{<stream>}:version` | string | the stream's version |
//! | `<p>:{<stream>}:snapshot` | hash | the latest snapshot: `version`, `schema`, `payload`, `recorded_at` |
//! | `<p>:{<p>:$all}:feed` | stream | the global feed; entry id `<position>-0` |
//! | `<p>:{<p>:$all}:index` | hash | the head: `position` (last assigned global position), `recorded_at` (last, in µs), `outbox` (last assigned outbox position); and the event-id index: event id (hyphenated) → its global position |
//! | `<p>:{<p>:$all}:outbox` | stream | the outbox records not yet delivered; entry id `<outbox position>-0` |
//! | `<p>:{<p>:$all}:relay` | hash | the relay lease: `owner`, `generation`, `expires` (ms, server clock), and the last dead-lettering (`last_error_position`, `last_error`, `last_error_at`) |
//! | `<p>:{<p>:$all}:dead-letters` | sorted set | the outbox's dead letters, scored by outbox position: the record's fields with the error, attempts and time |
//! | `<p>:{<p>:$all}:checkpoints` | hash | projection checkpoints: projection name → global position |
//! | `<p>:{<p>:$all}:checkpoint-generations` | hash | projection name → checkpoint generation (absent: 0) |
//!
//! A per-stream entry has the fields `event_id`, `type`, `schema`, `payload`, `metadata` (JSON),
//! `position` and `recorded_at` (µs since the Unix epoch). A feed entry has `stream` and
//! `version` instead of `position`, and otherwise the same fields: each event is stored twice, so
//! that both stream reads and feed reads are one `XRANGE` per page. Budget twice the payload size
//! in memory per event, plus the id index entry (about 100 bytes). An outbox entry has `stream`,
//! `message_id`, `source` (the source event id), `topic`, `key`, `type`, `schema`, `payload`,
//! `metadata` and `recorded_at`.
//!
//! Entry ids carry the version (per stream) and the position (feed, outbox), so reads from a
//! version or after a position are plain range queries, and the version key, not `XLEN`, is the
//! version: trimming a stream cannot corrupt it. Likewise the last outbox position is the
//! counter in the index hash, not the outbox's last entry, so deleting delivered records never
//! lets a position be assigned twice.
//!
//! Stream ids are validated by [`StreamId`]: they cannot hold `{`, `}`, spaces or non-ASCII
//! characters, so the stream id in braces is exactly the key's hash tag; the global keys' tag
//! holds a `$`, which no stream id can, so no stream shares it.
//!
//! # The append script
//!
//! One `EVALSHA` runs a whole group of appends (one append, unless [group
//! commit](#group-commit) gathered several) on the server, atomically: Redis runs scripts one at
//! a time and a script's writes become visible together. The script is loaded when the store is
//! built and transparently reloaded when the server answers `NOSCRIPT` (after a restart, a
//! failover or `SCRIPT FLUSH`); a `NOSCRIPT` reply means the script did not run, so resending is
//! safe.
//!
//! The script first reads, for the whole group, the head fields and every event id in the index
//! (one `HMGET`) and the streams' version keys (one `MGET`); if any append has events it checks
//! that the feed holds nothing beyond the head and takes the server clock (`TIME`,
//! microseconds, never earlier than the previous append's `recorded_at`); if any append has
//! outbox messages it checks that the outbox holds nothing beyond its counter (`XINFO STREAM`).
//! (Lists of ids and keys go to Redis in chunks of 500, so groups of any size stay within Lua's
//! stack.) Then it takes the appends in order, each against the state the earlier ones left:
//!
//! 1. if any of the append's event ids is stored (before this script, or by an earlier append of
//!    the group), the append writes nothing and the script returns where each of them is stored
//!    (its position, and the stream and version from its feed entry); the client then applies
//!    [`es_core::store::classify_retry`], the same rule as every backend: an exact retry
//!    returns the original result (versions and positions), anything else is
//!    [`StoreError::DuplicateEvent`];
//! 2. it checks the [`ExpectedVersion`] against the version key (or the version an earlier
//!    append of the group left); a mismatch returns the actual version, which the client reports
//!    as [`StoreError::Conflict`]. An append without events stops here with the version;
//! 3. it checks that nothing written behind the store's back sits where its entries will go: a
//!    version key that is not a number or not a string, a head that is not numbers, an entry in
//!    the feed beyond the head or in the outbox beyond its counter (checked above), an entry in
//!    the stream at or beyond the next version or an events key that is not a stream (detected
//!    by the append's first `XADD`, run guarded, which then fails without writing). Such data is
//!    reported as [`StoreError::Corrupt`] for this append only;
//! 4. and only then writes: per event one entry in the stream (`<version>-0`) and one in the
//!    feed (positions `head + 1 ..= head + n`), then one outbox entry per message (positions
//!    from the `outbox` counter + 1), all stamped with the same `recorded_at`.
//!
//! Once every append is done, the script writes the new head, the `outbox` counter and the new
//! ids' positions into the index (one `HSET`) and the changed version keys (one `MSET`), chunked
//! like the reads.
//!
//! The reply holds a structured outcome per append (a code and data), never an error message to
//! parse. Each append's checks precede its first write, and no write can fail after the checks
//! (every key written has been checked for its type and every entry id is above the key's last
//! id), so each append is stored whole or not at all, and an append that fails leaves the others
//! of its group untouched. The only refusal possible is out of memory (`maxmemory`): Redis
//! refuses a script's writes until its first write succeeded, and allows every write after it,
//! so an append whose first (guarded) write is refused fails with [`StoreError::Backend`],
//! having written nothing. A key of the wrong type where the script reads without a guard (the
//! index hash, the feed) makes the whole script fail before its first write (`WRONGTYPE`,
//! reported as [`StoreError::Corrupt`] to every append of the group). Size limits
//! ([`AppendLimits`]) and duplicate ids within one batch are checked by the client before the
//! script runs ([`AppendRequest::validate`]).
//!
//! # Group commit
//!
//! With [`RedisStoreBuilder::group_commit`] on (the default), concurrent appends through a store
//! and its clones share script calls:
//!
//! - An append goes out at once, as a call of its own, when nothing waits and either nothing is
//!   in flight or it has 64 events or more and fewer than 4 calls are in flight; so a lone
//!   writer pays no hand-off to another task. Appends of more than 1,000 events, and appends
//!   made outside a Tokio runtime, always go out on their own.
//! - Otherwise the append waits in a queue. A writer task (one per store, started when first
//!   needed, ending with the store) sends what waits as one group when the call in flight
//!   returns: up to 128 appends and 1,000 events per call, in arrival order. Small appends wait
//!   while any call is in flight; once 64 or more events wait, the writer sends them while
//!   others are in flight, up to 4 calls at once, so large batches are pipelined.
//! - After a call returns, the writer yields to the scheduler a few times (up to 4, while the
//!   queue keeps growing) before it sends the next group, so that the callers it just answered
//!   can queue their next appends and go out together instead of the first one alone.
//!
//! An append in a group has exactly the outcome it would have had alone, in the group's order
//! (see [the append script](#the-append-script)): it sees the versions and event ids of the
//! appends before it, and a conflict, duplicate or corrupt stream fails it alone. Positions
//! follow the group's order, so position order is still commit order.
//!
//! What a group shares is its fate on the wire: if the call fails (the connection drops, the
//! server restarts, the reply times out), every append of the group fails with
//! [`StoreError::Unavailable`], committed or not, exactly as a lone append whose reply was lost;
//! re-sending the same request (same event ids) returns the original result if it was
//! committed. A caller that stops waiting (drops its future) leaves its append's outcome
//! unknown, as a lost reply does: the writer skips abandoned appends at the head of the queue,
//! but one already sent, or queued behind appends still wanted, may be committed all the same.
//! If the writer task stops before answering (its runtime shut down), each waiting caller sends
//! its append again as a call of its own, which is safe by the same idempotency.
//!
//! The gain is fewer script calls, round trips and AOF writes per append under concurrency; the
//! cost is that Redis runs one larger script at a time (a group of 1,000 events holds the server
//! as long as one 1,000-event append does). Turn it off to make every append a call of its own.
//!
//! # Ordering
//!
//! Positions are assigned inside the script from the head counter, and Redis runs one script at a
//! time, so position order *is* commit order and positions are dense (1, 2, 3, ...). An event is
//! visible to readers exactly when its position is: once a read or a subscription has returned
//! position `p`, no event at or below `p` can appear later. Per-stream order in the feed matches
//! stream versions, and `recorded_at` never decreases along a stream or the feed (the script
//! keeps the last value and takes the maximum, so a server clock stepping back does not reorder
//! time). Outbox positions are dense and in commit order too, and an outbox record is visible
//! exactly when its events are.
//!
//! # Reads and subscriptions
//!
//! Stream reads page through `XRANGE`/`XREVRANGE` and feed reads through `XRANGE`, with `COUNT`
//! set by [`RedisStoreBuilder::read_page_size`]; nothing buffers more than one page.
//! Category and event-type filters are applied by the client while it pages through the feed, so
//! a filtered read costs as much as reading the feed.
//!
//! Subscriptions are es-core's catch-up-then-live loop over `read_all`. To learn of new events, a
//! store runs one background task (per store, shared by its clones and all their subscriptions)
//! that waits with `XREAD BLOCK` on a connection of its own and publishes the head; appends through
//! the same handle publish their positions directly. If that connection is down,
//! [`EventStore::wait_for_append`] still returns after the polling interval
//! ([`RedisStoreBuilder::poll_interval`]). Connection failures surface as
//! [`StoreError::Unavailable`]; subscriptions and the repository retry them with backoff, and
//! subscriptions resume after the last delivered position once the server is back.
//!
//! # Outbox, relay lease and checkpoints
//!
//! The repository's translator turns domain events into integration events
//! ([`es_core::OutboxMessage`]); the append script writes them to the outbox stream in the same
//! script as their events, so they are stored if and only if the events are. An append that
//! fails (conflict, duplicate, corrupt stream) writes no outbox record.
//!
//! - [`OutboxStore::pending_outbox`] reads the oldest records (`XRANGE - + COUNT n`), in outbox
//!   position order, which is commit order and hence per-stream order.
//! - [`OutboxStore::outbox_len`] is `XLEN` of the outbox.
//! - The relay lease is a hash: owner, generation, expiry (milliseconds of the server clock,
//!   `TIME`). A script takes it if it is free, released, expired or already held by the caller,
//!   and raises the generation unless the caller renews a lease it still holds; another ends it
//!   only for its owner in its generation, keeping the generation (so generations never go
//!   down). A relay that dies is taken over once the lease expires.
//! - [`OutboxStore::mark_delivered`] is a script that deletes the records (`XDEL`, 500 ids per
//!   command) only if the caller's generation is the lease's; otherwise it deletes nothing and
//!   the call fails with [`StoreError::Fenced`]. Redis runs one script at a time, so a mark is
//!   either before a takeover or refused. Marking a record twice is harmless.
//! - [`OutboxStore::dead_letter`] is a script that, under the same generation check, moves each
//!   record from the outbox stream into the `dead-letters` sorted set (scored by its outbox
//!   position; the member holds the entry's fields and the error, attempts and time, each as
//!   `<length>:<bytes>`) and records the last error in the lease hash: a record is in one or the
//!   other, never both or neither. [`OutboxStore::requeue_dead_letters`] moves dead letters back
//!   to the end of the outbox with new positions from the `outbox` counter, like an append.
//!   Outbox positions are scores (doubles), exact below 2^53, which the append script keeps them
//!   under.
//! - Checkpoints ([`CheckpointStore`]) live in one hash, projection name → position, with their
//!   generations in another. A script raises a checkpoint only (it compares the decimal strings,
//!   exact over the whole `u64` range) and only in the stored generation (otherwise
//!   [`StoreError::Fenced`], nothing written); a reset sets the position to 0 and raises the
//!   generation. Projections on Redis are at-least-once: the checkpoint is saved after the
//!   handler ran, so handlers must be idempotent; a runner fenced by a rebuild reloads its
//!   checkpoint.
//!
//! Delivery is at least once: a relay that dies between the broker's acknowledgement and its
//! `XDEL`, or a server that loses the `XDEL` in a crash, makes the relay publish those records
//! again, with the same message ids, for consumers to drop. The guarantees of es-core's
//! [`Relay`](es_core::Relay) (one relay publishing at a time, poison records parked, re-queue)
//! and of projection rebuilds racing another runner are tested on this store by the streaming
//! conformance cases `relay_lease_generations_fence_stale_owners`,
//! `two_relays_with_a_short_lease_never_publish_at_once`, `dead_letters_are_parked_and_requeued`,
//! `relay_parks_poison_records_and_keeps_going`, `checkpoint_generations_fence_stale_saves` and
//! `projection_rebuild_racing_a_second_runner`, and against a real Kafka-protocol broker by
//! `poison_records_are_dead_lettered` in `tests/kafka.rs`.
//!
//! # Durability
//!
//! An append is acknowledged once Redis has executed the script; what survives a crash depends
//! on the server's persistence settings, not on this crate:
//!
//! - `appendonly yes` with `appendfsync always`: Redis writes and fsyncs the script's effects to
//!   the AOF before it replies, so **every acknowledged append survives** a crash of the server
//!   or the machine. Redis fsyncs once per event-loop iteration for all the commands of that
//!   iteration, and a group (see [group commit](#group-commit)) is one script, so appends share
//!   fsyncs; still, the fsync caps throughput (on the reference machine, one-event appends
//!   without group commit reach about 15k/s, 49k/s pipelined).
//! - `appendonly yes` with `appendfsync everysec` (Redis' default when the AOF is on): the AOF is
//!   fsynced once a second, so a crash of the **machine** (power, kernel) may lose the appends
//!   acknowledged in the last second or two; a crash of only the Redis process loses nothing
//!   acknowledged, as the data was already written to the kernel.
//! - `appendfsync no`: the kernel decides when to flush (typically within 30 s); a machine crash
//!   may lose that much. A process crash loses nothing acknowledged.
//! - No AOF (RDB snapshots only, or no persistence): everything since the last snapshot is lost
//!   on any restart.
//!
//! In every mode a group is never half-stored: the AOF records a script's effects as one
//! `MULTI`/`EXEC` block, and a block cut short by a crash is dropped when the AOF is loaded
//! (`aof-load-truncated yes`, the default). The same holds for the outbox, its `XDEL` marks, the
//! relay lease and checkpoints: what the mode loses, it loses for them too (a lost delivery mark
//! means a record is published again; a lost checkpoint means a projection handles some events
//! again). Replicas receive writes asynchronously: a failover can lose acknowledged appends
//! unless the application also waits for replicas (`WAIT`), which this crate does not do. For
//! an event store of record, run `appendonly yes` with `appendfsync always`, or accept the
//! window of `everysec` knowingly.
//!
//! # Redis Cluster
//!
//! The key layout is Cluster-shaped: all keys of one stream share the hash tag `{<stream>}`, and
//! all global keys share the tag `{<p>:$all}`. But an append must update one stream's keys *and*
//! the global keys atomically, and those live in two different hash slots (a group, in many).
//! Redis Cluster refuses scripts whose keys span slots (`CROSSSLOT`), so **today this crate
//! supports standalone Redis (with replicas and Sentinel failover), not Cluster**; on a Cluster
//! the append fails with a [`StoreError::Backend`] error rather than doing anything unsafe.
//!
//! The global slot is also the scaling limit: every append writes to the feed, so one Redis
//! primary (one core) bounds write throughput whatever the number of nodes. The plan for Cluster
//! is per-category slots: tag a stream's keys with its category (`{<p>:<category>}`) and keep a
//! feed, head counter, id index and outbox per category in that slot, with positions per
//! category. Appends then touch one slot, group commit gathers appends per slot, categories
//! spread over the nodes, and order within a category is still commit order (so is per-stream
//! outbox order, which is all the relay promises; there would be one relay lease per category).
//! What is lost is a single total order across categories: `read_all`, subscriptions and
//! checkpoints would take a position per category (a vector checkpoint) or merge the category
//! feeds by `recorded_at`, which is a change to the es-core contract (the `u64` global
//! position), and event-id uniqueness would be enforced per category. Until then, Cluster users
//! can run a store on a single-shard Cluster or a standalone primary.
//!
//! # Bad data
//!
//! Entries that the store did not write (missing or unknown fields, bad JSON metadata, ids that
//! are not numbers, keys of the wrong type) are reported as [`StoreError::Corrupt`] naming the
//! stream and version, the global position or the outbox position; nothing is skipped silently
//! and the other events stay readable.
//!
//! [`ExpectedVersion`]: es_core::ExpectedVersion
//! [`OutboxStore`]: es_core::OutboxStore
//! [`OutboxStore::pending_outbox`]: es_core::OutboxStore::pending_outbox
//! [`OutboxStore::mark_delivered`]: es_core::OutboxStore::mark_delivered
//! [`OutboxStore::dead_letter`]: es_core::OutboxStore::dead_letter
//! [`OutboxStore::requeue_dead_letters`]: es_core::OutboxStore::requeue_dead_letters
//! [`OutboxStore::outbox_len`]: es_core::OutboxStore::outbox_len
//! [`CheckpointStore`]: es_core::CheckpointStore
#![doc(test(attr(deny(warnings))))]

mod append;
mod decode;
mod error;
mod keys;
mod outbox;
mod read;
mod script;
mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::DateTime;
use es_core::store::StoreFuture;
use es_core::{
    AppendLimits, AppendRequest, AppendResult, EventStore, EventStream, ReadAll, ReadStream,
    SnapshotRecord, SnapshotStore, StoreError, StreamId,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Value;

pub use error::Error;
pub use keys::{Keys, MAX_PREFIX_LEN};
/// The `redis` crate this store is built on, for [`RedisStore::connection`].
pub use redis;

use append::{Appender, GroupCommit, GroupLimits};
use error::store_error;
use script::Lua;
use watch::{Head, WatchConfig};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "es";

/// The Redis event and snapshot store. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) conn: ConnectionManager,
    pub(crate) keys: Keys,
    pub(crate) page_size: u64,
    limits: AppendLimits,
    poll_interval: Duration,
    appender: Arc<Appender>,
    group: Option<GroupCommit>,
    save_snapshot: Lua,
    delete_snapshot: Lua,
    pub(crate) acquire_lease: Lua,
    pub(crate) release_lease: Lua,
    pub(crate) save_checkpoint: Lua,
    head: Arc<Head>,
    watch: WatchConfig,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.keys.prefix())
            .field("limits", &self.inner.limits)
            .field("poll_interval", &self.inner.poll_interval)
            .field("page_size", &self.inner.page_size)
            .field("group_commit", &self.inner.group.is_some())
            .finish_non_exhaustive()
    }
}

/// Builds a [`RedisStore`]; see [`RedisStore::builder`].
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    limits: AppendLimits,
    poll_interval: Duration,
    response_timeout: Duration,
    page_size: u64,
    group_commit: bool,
}

impl RedisStoreBuilder {
    /// The key prefix (default [`DEFAULT_PREFIX`]): 1 to [`MAX_PREFIX_LEN`] bytes of ASCII
    /// letters, digits or `_-.:`. Checked by [`build`](Self::build).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Size limits on appends (default [`AppendLimits::default`]).
    pub fn limits(mut self, limits: AppendLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The longest [`EventStore::wait_for_append`] waits without a wake-up (default 1 s); also
    /// how long the head watcher blocks in one `XREAD BLOCK`.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long a command may wait for its reply before it fails as
    /// [`StoreError::Unavailable`] (default 10 s). Large batches under `appendfsync always` need
    /// more than the few milliseconds a small append takes.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Entries fetched per `XRANGE` page by reads (default 512).
    pub fn read_page_size(mut self, entries: u64) -> Self {
        self.page_size = entries;
        self
    }

    /// Whether concurrent appends through this store (and its clones) are committed in groups,
    /// several appends per script call (default `true`). See the crate docs, section "Group
    /// commit". Without it, every append is a script call of its own.
    pub fn group_commit(mut self, enabled: bool) -> Self {
        self.group_commit = enabled;
        self
    }

    /// Connects, loads the scripts and returns the store.
    pub async fn build(self) -> Result<RedisStore, Error> {
        let keys = Keys::new(&self.prefix)?;
        if self.poll_interval.is_zero() {
            return Err(Error::InvalidSetting("the poll interval must not be zero"));
        }
        if self.response_timeout.is_zero() {
            return Err(Error::InvalidSetting(
                "the response timeout must not be zero",
            ));
        }
        if self.page_size == 0 {
            return Err(Error::InvalidSetting("the read page size must not be zero"));
        }
        let client = redis::Client::open(self.url.as_str()).map_err(Error::InvalidUrl)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(self.response_timeout))
            .set_max_delay(Duration::from_secs(2));
        let mut conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(Error::Connect)?;
        let append = Lua::new(script::APPEND);
        let save_snapshot = Lua::new(script::SAVE_SNAPSHOT);
        let delete_snapshot = Lua::new(script::DELETE_SNAPSHOT);
        let acquire_lease = Lua::new(script::ACQUIRE_LEASE);
        let release_lease = Lua::new(script::RELEASE_LEASE);
        let save_checkpoint = Lua::new(script::SAVE_CHECKPOINT);
        for script in [
            &append,
            &save_snapshot,
            &delete_snapshot,
            &acquire_lease,
            &release_lease,
            &save_checkpoint,
        ] {
            script.load(&mut conn).await.map_err(Error::Connect)?;
        }
        let watch = WatchConfig {
            client,
            feed: keys.feed().into(),
            index: keys.index().into(),
            block: self.poll_interval,
        };
        let head = Arc::new(Head::new());
        let appender = Arc::new(Appender {
            conn: conn.clone(),
            keys: keys.clone(),
            script: append,
            head: Arc::clone(&head),
        });
        let group = self
            .group_commit
            .then(|| GroupCommit::new(Arc::clone(&appender), GroupLimits::DEFAULT));
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                keys,
                page_size: self.page_size,
                limits: self.limits,
                poll_interval: self.poll_interval,
                appender,
                group,
                save_snapshot,
                delete_snapshot,
                acquire_lease,
                release_lease,
                save_checkpoint,
                head,
                watch,
            }),
        })
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`) with the default prefix and settings.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::builder(url).build().await
    }

    /// A builder for a store at `url`, to set the prefix, limits and timings.
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            limits: AppendLimits::default(),
            poll_interval: Duration::from_secs(1),
            response_timeout: Duration::from_secs(10),
            page_size: 512,
            group_commit: true,
        }
    }

    /// The key names this store uses.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// The limits enforced on appends.
    pub fn limits(&self) -> AppendLimits {
        self.inner.limits
    }

    /// A handle to the store's connection (it reconnects by itself), for tools and tests that
    /// need to look at the keys directly.
    pub fn connection(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }
}

impl Inner {
    async fn append(&self, request: AppendRequest) -> Result<AppendResult, StoreError> {
        request.validate(&self.limits)?;
        match &self.group {
            Some(group) => group.append(request).await,
            None => self.appender.execute_one(&request).await,
        }
    }
}

impl EventStore for RedisStore {
    fn append(&self, request: AppendRequest) -> impl StoreFuture<AppendResult> {
        let inner = Arc::clone(&self.inner);
        async move { inner.append(request).await }
    }

    fn stream_version(&self, stream: &StreamId) -> impl StoreFuture<u64> {
        let mut conn = self.inner.conn.clone();
        let key = self.inner.keys.version(stream);
        let stream = stream.clone();
        async move {
            let location = || format!("stream `{stream}` version key");
            let value = script::query(&mut conn, redis::cmd("GET").arg(&key))
                .await
                .map_err(|e| store_error(e, location))?;
            decode::counter(value, &location())
        }
    }

    fn read_stream(&self, stream: &StreamId, read: ReadStream) -> EventStream {
        read::stream(Arc::clone(&self.inner), stream.clone(), read)
    }

    fn read_all(&self, read: ReadAll) -> EventStream {
        read::all(Arc::clone(&self.inner), read)
    }

    fn head_position(&self) -> impl StoreFuture<u64> {
        let mut conn = self.inner.conn.clone();
        let key = self.inner.keys.index().to_owned();
        async move {
            let location = || "the global head".to_owned();
            let value = script::query(&mut conn, redis::cmd("HGET").arg(&key).arg("position"))
                .await
                .map_err(|e| store_error(e, location))?;
            decode::counter(value, &location())
        }
    }

    fn wait_for_append(&self, after: u64) -> impl Future<Output = ()> + Send {
        let inner = &self.inner;
        inner.head.ensure_watching(inner.watch.clone());
        let rx = inner.head.subscribe();
        let poll = inner.poll_interval;
        async move {
            es_core::subscription::wait_on_watch(&rx, after, poll).await;
        }
    }
}

impl SnapshotStore for RedisStore {
    fn load_snapshot(&self, stream: &StreamId) -> impl StoreFuture<Option<SnapshotRecord>> {
        let mut conn = self.inner.conn.clone();
        let key = self.inner.keys.snapshot(stream);
        let stream = stream.clone();
        async move {
            let location = || format!("snapshot of `{stream}`");
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(&key)
                .arg("version")
                .arg("schema")
                .arg("payload")
                .arg("recorded_at")
                .arg("event_id");
            let reply = script::query(&mut conn, &cmd)
                .await
                .map_err(|e| store_error(e, location))?;
            decode_snapshot(stream.clone(), reply).map_err(|reason| StoreError::Corrupt {
                location: location(),
                reason,
            })
        }
    }

    fn save_snapshot(&self, snapshot: SnapshotRecord) -> impl StoreFuture<bool> {
        let inner = Arc::clone(&self.inner);
        async move {
            snapshot.validate()?;
            let key = inner.keys.snapshot(&snapshot.stream_id);
            let mut cmd = inner.save_snapshot.command(&[&key]);
            let mut buf = uuid::Uuid::encode_buffer();
            cmd.arg(snapshot.version)
                .arg(snapshot.schema_version)
                .arg(&snapshot.payload[..])
                .arg(snapshot.recorded_at.timestamp_micros())
                .arg(
                    snapshot
                        .event_id
                        .map_or("", |id| id.hyphenated().encode_lower(&mut buf)),
                );
            let mut conn = inner.conn.clone();
            let reply = inner
                .save_snapshot
                .invoke(&mut conn, &cmd)
                .await
                .map_err(|e| store_error(e, || format!("snapshot of `{}`", snapshot.stream_id)))?;
            match reply {
                Value::Int(written) => Ok(written == 1),
                other => Err(StoreError::backend(format!(
                    "unexpected reply from the snapshot script: {other:?}"
                ))),
            }
        }
    }

    fn delete_snapshot(&self, stream: &StreamId, version: u64) -> impl StoreFuture<bool> {
        let inner = Arc::clone(&self.inner);
        let stream = stream.clone();
        async move {
            let key = inner.keys.snapshot(&stream);
            let mut cmd = inner.delete_snapshot.command(&[&key]);
            cmd.arg(version);
            let mut conn = inner.conn.clone();
            let reply = inner
                .delete_snapshot
                .invoke(&mut conn, &cmd)
                .await
                .map_err(|e| store_error(e, || format!("snapshot of `{stream}`")))?;
            match reply {
                Value::Int(deleted) => Ok(deleted == 1),
                other => Err(StoreError::backend(format!(
                    "unexpected reply from the snapshot delete script: {other:?}"
                ))),
            }
        }
    }
}

fn decode_snapshot(stream: StreamId, reply: Value) -> Result<Option<SnapshotRecord>, String> {
    let Value::Array(fields) = reply else {
        return Err("HMGET returned no array".to_owned());
    };
    let mut fields = fields.into_iter();
    let mut next = || fields.next().unwrap_or(Value::Nil);
    let (version, schema, payload, recorded_at, event_id) =
        (next(), next(), next(), next(), next());
    if matches!(version, Value::Nil) {
        return Ok(None);
    }
    let num = |name: &str, v: Value| -> Result<i64, String> {
        match v {
            Value::BulkString(b) => std::str::from_utf8(&b)
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| format!("field `{name}` is not a number")),
            _ => Err(format!("field `{name}` is missing")),
        }
    };
    let version = u64::try_from(num("version", version)?).map_err(|_| "negative version")?;
    let schema_version =
        u32::try_from(num("schema", schema)?).map_err(|_| "schema version out of range")?;
    let Value::BulkString(payload) = payload else {
        return Err("field `payload` is missing".to_owned());
    };
    let recorded_at = DateTime::from_timestamp_micros(num("recorded_at", recorded_at)?)
        .ok_or("recorded_at out of range")?;
    let event_id = match event_id {
        Value::Nil => None,
        Value::BulkString(b) if b.is_empty() => None,
        Value::BulkString(b) => Some(
            std::str::from_utf8(&b)
                .ok()
                .and_then(|t| uuid::Uuid::parse_str(t).ok())
                .ok_or("field `event_id` is not a UUID")?,
        ),
        _ => return Err("field `event_id` is not a string".to_owned()),
    };
    Ok(Some(SnapshotRecord {
        stream_id: stream,
        version,
        schema_version,
        payload: Bytes::from(payload),
        recorded_at,
        event_id,
    }))
}
