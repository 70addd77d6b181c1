//! The Redis event store for `es-core`: one atomic Lua function call per append (or per group of
//! concurrent appends), Redis streams for the per-stream logs, the global feed and the outbox,
//! `XREAD BLOCK` for live subscriptions. Needs Redis 7.0 or later.
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
//! The URL may carry a password (`redis://:password@host`, `redis://user:password@host`,
//! `redis+unix:///path?pass=password`); it never appears in `Debug` output or error messages,
//! which show `redis://:***@host`.
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
//! | `<p>:{<p>:$all}:index` | hash | the head: `position` (last assigned global position), `recorded_at` (last, in µs), `outbox` (last assigned outbox position), `run` (the `run_id` of the server process that wrote last); and the event-id index: event id (hyphenated) → its global position |
//! | `<p>:{<p>:$all}:outbox` | stream | the outbox records not yet delivered; entry id `<outbox position>-0` |
//! | `<p>:{<p>:$all}:relay` | hash | the relay lease: `owner`, `generation`, `expires` (ms, server clock), and the last dead-lettering (`last_error_position`, `last_error`, `last_error_at`) |
//! | `<p>:{<p>:$all}:dead-letters` | sorted set | the outbox's dead letters, scored by outbox position: the record's fields with the error, attempts and time |
//! | `<p>:{<p>:$all}:checkpoints` | hash | projection checkpoints: projection name → global position |
//! | `<p>:{<p>:$all}:checkpoint-generations` | hash | projection name → checkpoint generation (absent: 0) |
//! | `<p>:{<p>:$all}:epochs` | stream | the epochs begun after the server changed incarnation; entry id `<epoch>-0`, fields `previous_head`, `previous_outbox`, `run_id`, `previous_run_id`, `cause`, `recorded_at` (see [epochs](#epochs-and-lost-tails)) |
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
//! One `FCALL` runs a whole group of appends (one append, unless [group
//! commit](#group-commit) gathered several) on the server, atomically: Redis runs functions and
//! scripts one at a time and a call's writes become visible together. The append is a Redis
//! function (Redis 7) rather than an `EVAL` script because a function library can keep a value
//! between calls for the life of the server process, which the [epoch](#epochs-and-lost-tails)
//! check needs (the server's `run_id`). Its library, `es_append_<hash of its code>`, is loaded
//! when the store is built unless the server holds it; Redis keeps libraries with the data (AOF,
//! RDB) and replicates them, and if a call fails because the server does not hold it
//! (`FUNCTION FLUSH`, a restart that lost it with the data), the store loads it and sends the
//! call again (a call of a missing function did not run, so resending is safe). The other
//! scripts (snapshots, the relay lease, checkpoints) are `EVALSHA` scripts, reloaded likewise
//! on `NOSCRIPT`.
//!
//! The script first reads, for the whole group, the head fields and every event id in the index
//! (one `HMGET`) and the streams' version keys (one `MGET`); if any append has events it checks
//! that the feed holds nothing beyond the head, takes the server clock (`TIME`,
//! microseconds, never earlier than the previous append's `recorded_at`) and reads the server
//! process's `run_id` (`INFO server`), which decides whether this call starts a new
//! [epoch](#epochs-and-lost-tails); if any append has outbox messages it checks that the outbox
//! holds nothing beyond its counter (`XINFO STREAM`).
//! (Lists of ids and keys go to Redis in chunks of 500, so groups of any size stay within Lua's
//! stack.) Then it takes the appends in order, each against the state the earlier ones left:
//!
//! 1. if any of the append's event ids is stored (before this script, or by an earlier append of
//!    the group), the append writes nothing and the script returns where each of them is stored
//!    (its position, and the stream and version from its feed entry); the client then applies
//!    [`es_core::contract::classify_retry`], the same rule as every backend: an exact retry
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
//! 4. it checks that the server may not evict the store's keys (only on the first write of a
//!    new server incarnation, see [server settings](#server-settings); otherwise the append is
//!    refused with [`Error::EvictionPolicy`]) and that its positions stay below 2^53 (see
//!    [epochs](#epochs-and-lost-tails));
//! 5. and only then writes: per event one entry in the stream (`<version>-0`) and one in the
//!    feed (positions `head + 1 ..= head + n`), then one outbox entry per message (positions
//!    from the `outbox` counter + 1), all stamped with the same `recorded_at`.
//!
//! Once every append is done, the script writes the new head, the `outbox` counter, the server's
//! `run_id` and the new ids' positions into the index (one `HSET`), the changed version keys
//! (one `MSET`), chunked like the reads, and, if this call began an epoch, its entry in the
//! epoch history.
//!
//! The reply holds a structured outcome per append (a code and data), never an error message to
//! parse. Each append's checks precede its first write, and no write can fail after the checks
//! (every key written has been checked for its type and every entry id is above the key's last
//! id), so each append is stored whole or not at all, and an append that fails leaves the others
//! of its group untouched. The only refusal possible is out of memory (`maxmemory`): Redis
//! refuses the whole call before it runs while the server is over `maxmemory` (a function without
//! the `allow-oom` flag), so every append of the group fails with [`StoreError::Backend`],
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
//! time, so position order *is* commit order and positions are dense within an epoch: the first
//! write of each server incarnation (the store's first write, then the first after every
//! restart or failover) begins an epoch at its
//! [`first_of_epoch`](es_core::contract::position::first_of_epoch), and the positions after it follow one
//! by one (see [epochs and lost tails](#epochs-and-lost-tails)). An event is
//! visible to readers exactly when its position is: once a read or a subscription has returned
//! position `p`, no event at or below `p` can appear later. Per-stream order in the feed matches
//! stream versions, and `recorded_at` never decreases along a stream or the feed (the script
//! keeps the last value and takes the maximum, so a server clock stepping back does not reorder
//! time). Outbox positions are dense within an epoch and in commit order too, and an outbox
//! record is visible exactly when its events are.
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
//! # Time-outs
//!
//! No call the store makes waits for the server without a bound:
//!
//! - A command fails with [`StoreError::Unavailable`] when its reply has not arrived within
//!   [`RedisStoreBuilder::response_timeout`] (default 10 s).
//! - Each attempt to connect (TCP and the handshake) is bounded by
//!   [`RedisStoreBuilder::connect_timeout`] (default 2 s). The shared connection reconnects by
//!   itself; a command that finds it broken waits for at most 4 attempts with back-off (100 ms,
//!   200 ms, 400 ms, each plus up to as much again of jitter), so at most
//!   `4 × connect_timeout + 1.4 s`, then fails with [`StoreError::Unavailable`].
//! - The head watcher's `XREAD BLOCK` blocks for the poll interval; its connection's response
//!   time-out is the response time-out plus the poll interval, and it connects under the same
//!   connection time-out. [`EventStore::wait_for_append`] returns after the poll interval
//!   whatever the watcher does.
//! - The settings task (see [server settings](#server-settings)) uses a connection of its own
//!   with the same two time-outs.
//! - Every connection has TCP keepalive (first probe after 10 s idle, then every 5 s, dropped
//!   after 3 unanswered), so an idle connection to a host that vanished is noticed in about 25 s.
//!
//! Tested by `tests/faults.rs`: `a_stalled_server_times_calls_out_instead_of_hanging` freezes the
//! server with SIGSTOP (its socket still accepts bytes, so only a time-out ends a call): appends,
//! head reads and feed reads fail as `Unavailable`, `wait_for_append` returns, and after SIGCONT
//! the same handle works and the stuck append, retried, is stored once;
//! `server_down_is_unavailable_then_recovers` does the same with the server killed.
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
//! `poison_records_are_dead_lettered` in `es-kafka/tests/redis_outbox.rs`.
//!
//! # Server settings
//!
//! When it is built, the store reads the server's settings (`INFO` and `CONFIG GET appendfsync`,
//! `CONFIG GET save`), logs them in one `tracing::info!` line (for example `Redis store on Redis
//! 7.0.15 (run_id 5c0e…): appendonly yes, appendfsync always, RDB snapshots off,
//! maxmemory-policy noeviction, maxmemory 0`) and returns them from
//! [`RedisStore::server_settings`]. It refuses two kinds of server:
//!
//! - **One that can evict the store's keys**: `maxmemory-policy` `allkeys-lru`, `allkeys-lfu`,
//!   `allkeys-random`, or one this crate does not know. Under memory pressure such a server drops
//!   events, stream versions or the id index without an error (measured: about half of the
//!   acknowledged streams lost their events, then every append failed as corrupt once the index
//!   went). [`build`](RedisStoreBuilder::build) fails with [`Error::EvictionPolicy`], which names
//!   the policy and the fix; [`RedisStoreBuilder::allow_eviction`] opts out, for caches and
//!   throwaway data. `noeviction` (Redis' default) is accepted, and so are the `volatile-*`
//!   policies: they evict only keys with an expiry, and no key of the store has one (the relay
//!   lease keeps its end in a field, on the server's clock, rather than as a key expiry). So
//!   such a server can evict only other applications' keys, and with nothing evictable left it
//!   refuses writes as `noeviction` does (out of memory), which an append reports as
//!   [`StoreError::Backend`] having written nothing.
//! - **One that persists nothing** (`appendonly no` and `save ""`): every restart loses every
//!   event, the epoch history with them, so readers learn of the loss only through the clock
//!   rule (see [epochs](#epochs-and-lost-tails)), and an event store of record has nothing left.
//!   [`build`](RedisStoreBuilder::build) fails with [`Error::NoPersistence`];
//!   [`RedisStoreBuilder::allow_no_persistence`] opts out.
//!
//! The policy can change while the store runs (`CONFIG SET`), or come with a new server (a
//! restart with another configuration, a failover). So a background task (one per store, on a
//! connection of its own) reads the settings again every
//! [`server_check_interval`](RedisStoreBuilder::server_check_interval) (default 1 s) and after
//! each of its reconnections, and logs what changed. While the last settings read show an
//! evicting policy, appends fail with [`StoreError::Backend`] whose source is
//! [`Error::EvictionPolicy`], and write nothing; once they show `noeviction` or `volatile-*`
//! again, appends resume. In addition, the first write of every new server incarnation checks
//! the policy inside the append script (`INFO memory`), so a restart or failover onto an evicting
//! server is refused from its very first append. What remains unguarded is the window between a
//! `CONFIG SET` on a running server and the next reading, at most the check interval plus a round
//! trip, and the server evicts in it only if its memory is full then. A server that stops
//! persisting at runtime is logged as a warning; appends go on.
//!
//! Servers where `CONFIG` is renamed or refused (managed services): everything but
//! `appendfsync` and `save` comes from `INFO`, and those two are reported as unknown (`None`).
//! With the AOF off, whether RDB snapshots are on is then unknown, so `build` fails with
//! [`Error::SettingUnknown`] unless [`RedisStoreBuilder::allow_no_persistence`]. A server that
//! refuses `INFO` cannot run the append function either (it reads the `run_id`), and `build`
//! fails with [`Error::SettingUnknown`] whatever the opt-outs. A server older than Redis 7.0 has
//! no functions: `build` fails with [`Error::UnsupportedVersion`]. The store's Redis user
//! therefore needs `INFO` (also from functions), `FCALL`, `FUNCTION LOAD` and `FUNCTION LIST`,
//! `EVALSHA` and `SCRIPT LOAD`, the stream, hash and string commands, and preferably `CONFIG
//! GET`.
//!
//! Tested by `tests/durability.rs`: `an_evicting_server_is_refused_at_build_unless_allowed`
//! (`--maxmemory 2mb --maxmemory-policy allkeys-lru`; `volatile-lru` accepted, and no key the
//! store wrote, the relay lease included, has an expiry),
//! `switching_to_an_evicting_policy_at_runtime_refuses_appends_instead_of_losing_them`
//! (`CONFIG SET maxmemory-policy allkeys-lru` under a running store: appends are refused, typed,
//! within the check interval, 200 KiB appends that would push the server past `maxmemory` are
//! refused, nothing acknowledged is evicted, and appends resume after `noeviction`),
//! `a_server_that_persists_nothing_is_refused_unless_allowed`,
//! `server_settings_report_the_persistence_the_store_runs_under` and
//! `a_renamed_config_command_is_handled`; and by the unit test
//! `the_first_write_of_a_new_incarnation_checks_the_eviction_policy` (the script's own check).
//!
//! # Durability
//!
//! An append is acknowledged once Redis has executed the script; what survives a crash depends
//! on the server's persistence settings, which the store reads and reports
//! ([`RedisStore::server_settings`], and one log line when it is built), and refuses only when
//! there are none (see [server settings](#server-settings)):
//!
//! - `appendonly yes` with `appendfsync always`: Redis writes and fsyncs the script's effects to
//!   the AOF before it replies, so every acknowledged append survives a crash of the server
//!   or the machine, as far as the disk honours fsync. Redis fsyncs once per event-loop
//!   iteration for all the commands of that iteration, and a group (see [group
//!   commit](#group-commit)) is one script, so appends share fsyncs; still, the fsync caps
//!   throughput (on the reference machine, one-event appends without group commit reach about
//!   15k/s, 49k/s pipelined).
//! - `appendonly yes` with `appendfsync everysec` (Redis' default when the AOF is on): the AOF is
//!   fsynced once a second, so a crash of the **machine** (power, kernel) may lose the appends
//!   acknowledged in the last second or two; a crash of only the Redis process loses nothing
//!   acknowledged, as the data was already written to the kernel.
//! - `appendfsync no`: the kernel decides when to flush (typically within 30 s); a machine crash
//!   may lose that much. A process crash loses nothing acknowledged.
//! - No AOF, RDB snapshots only: everything since the last snapshot is lost on any restart.
//! - No persistence at all: everything is lost on any restart; refused unless
//!   [`RedisStoreBuilder::allow_no_persistence`].
//!
//! In every mode a group is never half-stored: the AOF records a script's effects as one
//! `MULTI`/`EXEC` block, and a block cut short by a crash is dropped when the AOF is loaded
//! (`aof-load-truncated yes`, the default). The same holds for the outbox, its `XDEL` marks, the
//! relay lease and checkpoints: what the mode loses, it loses for them too (a lost delivery mark
//! means a record is published again; a lost checkpoint means a projection handles some events
//! again). Replicas receive writes asynchronously: a failover can lose acknowledged appends
//! unless the application also waits for replicas (`WAIT`), which this crate does not do. For
//! an event store of record, run `appendonly yes` with `appendfsync always`, or accept the
//! window of `everysec` knowingly. Whatever a mode loses is no longer lost *silently*: the next
//! write starts an epoch, and readers past what survived get [`StoreError::LostTail`] (see
//! [epochs and lost tails](#epochs-and-lost-tails)).
//!
//! What is tested, and what a test can show. `tests/faults.rs`,
//! `kill9_during_appends_loses_no_acknowledged_append`, runs a server with `appendonly yes` and
//! `appendfsync always` (asserted through [`RedisStore::server_settings`]), kills it with
//! SIGKILL three times while eight tasks append 1 to 4 events with outbox messages (freezing it
//! with SIGSTOP just before, at an arbitrary point of its work, so that each kill hits appends
//! in flight; it counts them and asserts there were some), restarts it from its AOF each time
//! and once more at the end, and checks that every acknowledged append is stored exactly once,
//! whole, with the versions and positions it was acknowledged with, that the outbox holds exactly
//! their messages, that every restart's epoch began right after the last acknowledged position,
//! and that two subscribers that tailed through the crashes delivered exactly the feed. A kill of
//! the process cannot tell the fsync modes apart: Redis writes the AOF (`write(2)`) before it
//! replies in every mode, and the kernel keeps and flushes the page cache of a killed process,
//! so the same test passes with `appendfsync no`. It shows that acknowledged appends are in the
//! AOF and that a restart replays whole scripts; that they were on the disk at the
//! acknowledgement rests on Redis' documented `appendfsync always`, which only a machine crash
//! would test, and no test here crashes the machine.
//!
//! # Epochs and lost tails
//!
//! Redis can lose acknowledged appends (an RDB-only restart, a machine crash under `everysec` or
//! `no`, a failover to a replica that lagged, a restore of an older backup, a wiped database).
//! If the store then handed the lost positions out again, a subscriber or projection that had
//! read past them would skip the new events without a word. So positions carry an epoch
//! ([`es_core::contract::position`]): `epoch << 22 | sequence`, and every new incarnation of the server
//! begins a new epoch.
//!
//! *Detection.* Every append call that writes events knows the server process's `run_id` (Redis
//! draws a new random one in every process; the function library reads it with `INFO server` on
//! its first call in a process and keeps it, see [the append script](#the-append-script)) and
//! compares it with the index's `run` field, which the last write stored. A different (or
//! missing) `run_id` means this is the first write of a new server process: the store's first
//! write ever, a restart whatever it replayed, or a failover to another server whatever that
//! server had cached or loaded before. The script
//! also receives the highest position the calling handle has seen (acknowledged to it, or read
//! as the head by it or its head watcher): a stored head below it means the head moved back
//! under a live handle (the store's keys deleted or restored while the server ran on). Either
//! begins an epoch, in the same script as the first append that writes, atomically with it:
//!
//! - the epoch is [`next_epoch`](es_core::contract::position::next_epoch) with the server's clock: the
//!   seconds since 2024-01-01, but above the last recorded epoch and above the epoch of the
//!   stored head and of the handle's highest position; positions continue at its
//!   [`first_of_epoch`](es_core::contract::position::first_of_epoch);
//! - the outbox counter jumps to the same place (unless it is above it already), so new outbox
//!   records never reuse the position of a record that was lost, and a relay that marks a lost
//!   record delivered (`XDEL` by position) cannot delete a new one;
//! - an entry `<epoch>-0` in `<p>:{<p>:$all}:epochs` records `previous_head` (the head that
//!   survived; 0 for a new or wiped store), `previous_outbox`, the new and the previous
//!   `run_id`, the `cause` (`new`: the store's first write; `server`: a new server process;
//!   `head`: a head below what the handle saw; or `server,head`) and the time.
//!   [`EventStore::epochs`] returns them.
//!
//! es-core's subscriptions and projections check the history whenever they would move into a
//! later epoch ([`es_core::contract::verify_resume`]): a reader whose position is past the
//! epoch's `previous_head` gets [`StoreError::LostTail`] naming its position, the surviving
//! head and the epoch, and stops; one at or below it goes on and sees every event of the new
//! epoch once. Every restart begins an epoch, also one that lost nothing (the store cannot tell):
//! positions then jump ahead, `previous_head` is the whole head, and no reader is past it. A
//! reader past the surviving head learns of the loss on its first read after the new
//! incarnation's first write; until then it waits like any caught-up reader, and
//! [`EventStore::head_position`] returns the surviving head.
//!
//! Tested by `tests/durability.rs`: `a_restart_that_lost_the_tail_starts_an_epoch_and_readers_past_it_get_lost_tail`
//! (`appendonly no` with RDB: ten appends, `SAVE`, ten more, a subscriber at the head, one
//! stopped below the saved head, a live projection; kill -9 and restart: the new appends get the
//! positions of a new epoch, the outbox positions rise above every earlier one, the first
//! subscriber gets `LostTail` naming the saved head, the second delivers the rest of the saved
//! events and every new one once, the live projection and one started from a checkpoint past
//! the head stop with an error naming the loss) and
//! `a_head_that_moved_back_under_a_live_handle_starts_an_epoch` (every key deleted, the epoch
//! history too, under a handle that saw the head: the next append begins an epoch above it,
//! recorded with head 0, and a subscriber gets `LostTail`); by the unit test
//! `the_first_write_ever_begins_an_epoch_from_the_clock`; and by
//! `kill9_during_appends_loses_no_acknowledged_append` (one epoch per incarnation, each right
//! after the last acknowledged position).
//!
//! *Limits.*
//! - The clock rule is what protects a store whose epoch history was lost with its data (an RDB
//!   snapshot or a backup from before the last epoch began, a wiped database, a replica that
//!   never received the epoch's first write): its new epoch lies above the lost one as long as the
//!   server's clock has moved on by a second since the lost epoch began (and no epoch handed out
//!   more than 2^22 positions per second of its life, which Redis cannot reach). A restart or
//!   failover within the same second as a lost epoch's start, or onto a server whose clock is
//!   behind by more than the time since, can reuse that epoch's positions, unless the first write
//!   after it comes through a handle that had seen them (the handle's highest position keeps the
//!   epoch above).
//! - Lua numbers are doubles, exact below 2^53: positions and outbox positions stay at or below
//!   2^53 - 1, that is epochs up to [`MAX_EPOCH`](es_core::contract::position::MAX_EPOCH) (the year 2092 by
//!   the clock). An append that would go further is refused ([`StoreError::Backend`]) and writes
//!   nothing, and the script formats positions with `%.0f` where it builds strings (Lua's
//!   `tostring` switches to exponent notation above 10^14, which every clock epoch's positions
//!   are). Tested by the unit test `positions_stay_exact_up_to_two_to_the_53`.
//! - Knowing the `run_id` costs one `INFO server` per server process, because the append
//!   function's library keeps it. Reading it on every call instead was measured and rejected:
//!   `INFO server` takes 5.3 µs of server time per call by Redis' own command statistics, and
//!   in `redis-benchmark` runs of the append function with one-event appends (the reference
//!   machine, 2 cores, Redis 7.0.15 on loopback; server CPU time from `/proc`; interleaved
//!   rounds, medians of 10, on a machine busy with other builds, so single rounds varied by
//!   ±25%) it cut a single client's throughput by 11% and 22% in two runs and raised server CPU
//!   per call by 10-16%; at 16 clients the difference was within the noise. The kept `run_id`
//!   made no measurable difference against a function that never reads it. The other cheap
//!   alternative, checking only after a `NOSCRIPT` reply (the script cache is not persisted),
//!   misses a failover to a replica that already holds the script (any client that ever loaded
//!   it there), so it is not used either; the kept value cannot be stale, since a Lua state
//!   lives inside one server process and a process's `run_id` never changes.
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
mod protocol;
mod read;
mod script;
mod server;
mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::DateTime;
use es_core::contract::position::EpochStart;
use es_core::contract::StoreFuture;
use es_core::{
    AppendLimits, AppendRequest, AppendResult, EventStore, EventStream, ReadAll, ReadStream,
    SnapshotRecord, SnapshotStore, StoreError, StreamId,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::io::tcp::socket2::TcpKeepalive;
use redis::{IntoConnectionInfo, Value};

pub use error::Error;
pub use keys::{Keys, MAX_PREFIX_LEN};
/// The `redis` crate this store is built on, for [`RedisStore::connection`].
pub use redis;
pub use server::ServerSettings;

use append::{Appender, GroupCommit, GroupLimits};
use error::store_error;
use script::Lua;
use server::{MonitorConfig, Requirements, Server};
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
    server: Arc<Server>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.keys.prefix())
            .field("limits", &self.inner.limits)
            .field("poll_interval", &self.inner.poll_interval)
            .field("page_size", &self.inner.page_size)
            .field("group_commit", &self.inner.group.is_some())
            .field("server", &self.inner.server.settings().to_string())
            .finish_non_exhaustive()
    }
}

/// Builds a [`RedisStore`]; see [`RedisStore::builder`].
///
/// Its `Debug` output shows the URL without its password (`redis://app:***@cache/0`).
#[derive(Clone)]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    limits: AppendLimits,
    poll_interval: Duration,
    response_timeout: Duration,
    connect_timeout: Duration,
    server_check_interval: Duration,
    page_size: u64,
    group_commit: bool,
    allow_eviction: bool,
    allow_no_persistence: bool,
}

impl std::fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("url", &es_core::contract::redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("limits", &self.limits)
            .field("poll_interval", &self.poll_interval)
            .field("response_timeout", &self.response_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("server_check_interval", &self.server_check_interval)
            .field("page_size", &self.page_size)
            .field("group_commit", &self.group_commit)
            .field("allow_eviction", &self.allow_eviction)
            .field("allow_no_persistence", &self.allow_no_persistence)
            .finish()
    }
}

/// How many times the connection is re-established before a command waiting for it fails
/// (after the first attempt), and the back-off between attempts: 100 ms, doubling, with up to
/// as much again of jitter, at most 1 s. Together with the connection time-out this bounds how
/// long a command can wait for a connection; see the crate docs, section "Time-outs".
const RECONNECT_RETRIES: usize = 3;
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// TCP keepalive on every connection: the first probe after 10 s of silence, then every 5 s,
/// and the connection is dropped after 3 unanswered probes. Idle connections to a vanished host
/// are noticed in about 25 s instead of the kernel's default of over two hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 3;

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
    /// more than the few milliseconds a small append takes. See the crate docs, section
    /// "Time-outs".
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long one attempt to connect (TCP, then the handshake) may take (default 2 s). See the
    /// crate docs, section "Time-outs".
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How often the store's background task reads the server's settings again (default 1 s);
    /// it also reads them after each of its reconnections. While the last settings read let the
    /// server evict the store's keys, appends fail with [`Error::EvictionPolicy`]. See the crate
    /// docs, section "Server settings".
    pub fn server_check_interval(mut self, interval: Duration) -> Self {
        self.server_check_interval = interval;
        self
    }

    /// Accept a server whose `maxmemory-policy` can evict keys without an expiry (`allkeys-*`),
    /// default `false`. Only for data you can afford to lose (a cache, a throwaway test): under
    /// memory pressure such a server drops events, versions or the id index without an error,
    /// and the store can neither prevent nor always detect it.
    pub fn allow_eviction(mut self, allow: bool) -> Self {
        self.allow_eviction = allow;
        self
    }

    /// Accept a server that persists nothing (`appendonly no` and `save ""`), default `false`.
    /// Such a server loses every event on a restart, including the head that lets the store
    /// tell its readers about the loss (see the crate docs, section "Epochs and lost tails").
    pub fn allow_no_persistence(mut self, allow: bool) -> Self {
        self.allow_no_persistence = allow;
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

    /// Connects, checks the server's settings (see the crate docs, section "Server settings"),
    /// loads the scripts and returns the store.
    pub async fn build(self) -> Result<RedisStore, Error> {
        let keys = Keys::new(&self.prefix)?;
        self.validate()?;
        let (client, mut conn) = self.connect().await?;
        let requirements = Requirements {
            allow_eviction: self.allow_eviction,
            allow_no_persistence: self.allow_no_persistence,
        };
        let settings = server::read_settings(&mut conn)
            .await
            .map_err(|err| err.at(&self.url))?;
        requirements.check(&settings)?;
        tracing::info!(
            prefix = keys.prefix(),
            version = %settings.version,
            run_id = %settings.run_id,
            appendonly = settings.appendonly,
            appendfsync = settings.appendfsync.as_deref().unwrap_or("unknown"),
            save = settings.save.as_deref().unwrap_or("unknown"),
            maxmemory_policy = %settings.maxmemory_policy,
            maxmemory = settings.maxmemory,
            "Redis store on {settings}"
        );
        if settings.major_version() < 7 {
            return Err(Error::UnsupportedVersion {
                version: settings.version.clone(),
            });
        }
        let append = script::append_library();
        append
            .load(&mut conn)
            .await
            .map_err(|source| Error::connect(&self.url, source))?;
        let save_snapshot = Lua::new(script::SAVE_SNAPSHOT);
        let delete_snapshot = Lua::new(script::DELETE_SNAPSHOT);
        let acquire_lease = Lua::new(script::ACQUIRE_LEASE);
        let release_lease = Lua::new(script::RELEASE_LEASE);
        let save_checkpoint = Lua::new(script::SAVE_CHECKPOINT);
        for script in [
            &save_snapshot,
            &delete_snapshot,
            &acquire_lease,
            &release_lease,
            &save_checkpoint,
        ] {
            script
                .load(&mut conn)
                .await
                .map_err(|source| Error::connect(&self.url, source))?;
        }
        let server = Arc::new(Server::new(settings, requirements));
        server.start_monitor(MonitorConfig {
            client: client.clone(),
            interval: self.server_check_interval,
            connect_timeout: self.connect_timeout,
            response_timeout: self.response_timeout,
            prefix: keys.prefix().into(),
        });
        let watch = WatchConfig {
            client,
            feed: keys.feed().into(),
            index: keys.index().into(),
            block: self.poll_interval,
            connect_timeout: self.connect_timeout,
            response_timeout: self.response_timeout,
        };
        let head = Arc::new(Head::new());
        let appender = Arc::new(Appender {
            conn: conn.clone(),
            keys: keys.clone(),
            script: append,
            head: Arc::clone(&head),
            server: Arc::clone(&server),
            allow_eviction: self.allow_eviction,
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
                server,
            }),
        })
    }
}

impl RedisStoreBuilder {
    fn validate(&self) -> Result<(), Error> {
        for (duration, what) in [
            (self.poll_interval, "the poll interval must not be zero"),
            (
                self.response_timeout,
                "the response timeout must not be zero",
            ),
            (self.connect_timeout, "the connect timeout must not be zero"),
            (
                self.server_check_interval,
                "the server check interval must not be zero",
            ),
        ] {
            if duration.is_zero() {
                return Err(Error::InvalidSetting(what));
            }
        }
        if self.page_size == 0 {
            return Err(Error::InvalidSetting("the read page size must not be zero"));
        }
        Ok(())
    }

    /// The client (with TCP keepalive on its connections) and the shared connection, with the
    /// time-outs and reconnection budget of the crate docs, section "Time-outs".
    async fn connect(&self) -> Result<(redis::Client, ConnectionManager), Error> {
        let info = self
            .url
            .as_str()
            .into_connection_info()
            .map_err(|source| Error::invalid_url(&self.url, source))?;
        let keepalive = TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES);
        let tcp = info.tcp_settings().clone().set_keepalive(keepalive);
        let client = redis::Client::open(info.set_tcp_settings(tcp))
            .map_err(|source| Error::invalid_url(&self.url, source))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_min_delay(RECONNECT_MIN_DELAY)
            .set_max_delay(RECONNECT_MAX_DELAY);
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|source| Error::connect(&self.url, source))?;
        Ok((client, conn))
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
            connect_timeout: Duration::from_secs(2),
            server_check_interval: Duration::from_secs(1),
            page_size: 512,
            group_commit: true,
            allow_eviction: false,
            allow_no_persistence: false,
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

    /// The server's version, persistence and eviction settings, as last read (when the store
    /// was built, then by its background task every
    /// [`server_check_interval`](RedisStoreBuilder::server_check_interval)). See the crate
    /// docs, section "Server settings".
    pub fn server_settings(&self) -> ServerSettings {
        self.inner.server.settings()
    }
}

impl Inner {
    async fn append(&self, request: AppendRequest) -> Result<AppendResult, StoreError> {
        request.validate(&self.limits)?;
        if let Some(refusal) = self.server.refusal() {
            return Err(StoreError::backend(refusal));
        }
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
        let head = Arc::clone(&self.inner.head);
        async move {
            let location = || "the global head".to_owned();
            let value = script::query(&mut conn, redis::cmd("HGET").arg(&key).arg("position"))
                .await
                .map_err(|e| store_error(e, location))?;
            let position = decode::counter(value, &location())?;
            head.saw(position);
            Ok(position)
        }
    }

    fn epochs(&self) -> impl StoreFuture<Vec<EpochStart>> {
        let mut conn = self.inner.conn.clone();
        let key = self.inner.keys.epochs().to_owned();
        async move {
            let location = || "the epoch history".to_owned();
            let reply = script::query(&mut conn, redis::cmd("XRANGE").arg(&key).arg("-").arg("+"))
                .await
                .map_err(|e| store_error(e, location))?;
            decode::epochs(reply)
        }
    }

    fn wait_for_append(&self, after: u64) -> impl Future<Output = ()> + Send {
        let inner = &self.inner;
        inner.head.ensure_watching(inner.watch.clone());
        let rx = inner.head.subscribe();
        let poll = inner.poll_interval;
        async move {
            es_core::contract::wait_on_watch(&rx, after, poll).await;
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
