//! The event store trait, the store bundles the runtime asks for, and the default subscription.
//!
//! # The default subscription
//!
//! [`EventStore::subscribe`] follows the feed, catching up and then going live, with nothing but
//! `read_all`, `partition_head` and `wait_for_partition`, one partition at a time; [`EventStore::subscribe_all`]
//! merges the subscriptions of every partition.
//!
//! The loop reads the global feed after the last delivered position with one `read_all` that
//! runs to the end of what is visible, yielding events as the backend streams them (so catching
//! up runs at the backend's read-all speed, with its own paging and prefetching). When that read
//! ends, the subscriber is caught up with everything visible when it started, and it waits for
//! the backend's wake-up (broadcast, LISTEN/NOTIFY, XREAD BLOCK) or its polling interval, then
//! reads again. Correctness rests on the store's never-skip contract; the wake-up only affects
//! latency.
//!
//! With a filter, the last delivered position can lag far behind the head; the loop then also
//! reads the head before each read and, once caught up, moves past it, so that it waits for
//! events after the head rather than rescanning.
//!
//! Before moving from one epoch into a later one (see [`position`](super::position)), the loop
//! asks the store whether the events after its position survived ([`verify_resume`]); if they did
//! not, it yields [`StoreError::LostTail`] and ends, instead of going on past the loss.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::append::{AppendRequest, AppendResult};
use super::archive::Archived;
use super::checkpoint::CheckpointStore;
use super::error::{StoreError, StoreFuture};
use super::lease::LeaseStore;
use super::outbox::OutboxStore;
use super::partition::{FeedPosition, Partitioning};
use super::position::{self, EpochStart};
use super::read::{
    failed_read, pages_of, EventFilter, EventPages, EventStream, ReadAll, ReadStream,
};
use super::snapshot::SnapshotStore;
use super::streams::{ListStreams, StreamPage};
use crate::event::RecordedEvent;
use crate::retry::{Backoff, Delays};
use crate::stream_id::StreamId;

/// An event store over serialized events. Implemented by every backend.
///
/// Handles are cheap to clone (an `Arc` inside) and shared between tasks.
pub trait EventStore: Clone + Send + Sync + 'static {
    /// Appends a batch atomically, honouring the expected version and event-id idempotency.
    fn append(&self, request: AppendRequest) -> impl StoreFuture<AppendResult>;

    /// Appends to several streams in one atomic step: all parts or none.
    ///
    /// Each part is an [`AppendRequest`] with its own expected version, events and outbox
    /// messages, and holds at least one event; no stream appears twice. The results come in the
    /// order of the parts. When a part's expected version does not match, nothing of any part is
    /// written and the error is the [`StoreError::Conflict`] of that part's stream. Re-sending
    /// the same call (same event ids) after a lost reply returns the first results, each marked
    /// `duplicate`, and writes nothing; a call of which some parts are stored and others are
    /// not is [`StoreError::DuplicateEvent`] and writes nothing. Malformed calls are refused
    /// before anything is written ([`validate_streams`](super::validate_streams)).
    ///
    /// Every part's events take consecutive stream versions and increasing positions of its
    /// stream's partition; readers of a partition see the call's events there all at once or
    /// not at all. The guarantees, the limits (a Redis store writes the streams of one call in
    /// one feed partition only) and the tests that try to break them are in
    /// `docs/15-multi-stream-appends.md`.
    ///
    /// There is no default: a store that cannot make the parts atomic together must not offer
    /// them one by one under this name.
    fn append_streams(&self, requests: Vec<AppendRequest>) -> impl StoreFuture<Vec<AppendResult>>;

    /// Moves the events of `stream` with versions below `before` out of hot storage into the
    /// archive the store owns (see [`Archived`](super::Archived), and
    /// [`EventArchive`](super::EventArchive) for a store whose archive is another system);
    /// events an earlier call moved stay where they are. Every read answers as before: the archived events are read from the
    /// archive (more slowly), at their versions and positions, by stream reads, historical
    /// loads, `read_all`, subscriptions and projection rebuilds.
    ///
    /// The last event stays in hot storage: `before` may be at most the stream's version, else
    /// [`StoreError::InvalidArchive`] and nothing moves. `before` 0 or 1 moves nothing and
    /// reports where the hot part begins. Safe to run while the stream is appended to and read.
    /// What each store's archive is, its limits and the tests that try to break it are in
    /// `docs/18-archiving.md`.
    fn archive_stream(&self, stream: &StreamId, before: u64) -> impl StoreFuture<Archived>;

    /// The stream's current version (0 if it has no events).
    fn stream_version(&self, stream: &StreamId) -> impl StoreFuture<u64>;

    /// One page of the streams that hold at least one event, in stream-id byte order, each with
    /// its version when listed (see [`ListStreams`]): for operators and tools, not the write
    /// path. A prefix outside the stream-id characters is [`StoreError::InvalidStreamId`]. A
    /// stream that gets its first event while the pages are read appears if it sorts after the
    /// page being read.
    fn list_streams(&self, list: ListStreams) -> impl StoreFuture<StreamPage>;

    /// Reads a stream lazily, in pages.
    fn read_stream(&self, stream: &StreamId, read: ReadStream) -> EventStream;

    /// Reads a stream lazily as pages of borrowed events: what the repository decodes when it
    /// loads an aggregate. The same events, in the same order, with the same errors as
    /// [`read_stream`](EventStore::read_stream) (whose [`RecordedEvent`](crate::RecordedEvent)s
    /// keep the stream id and metadata that a page may leave out).
    ///
    /// The default groups the events of `read_stream` into pages ([`pages_of`]); a backend
    /// overrides it to lend out events from the pages it fetched (rows as received, shared
    /// entries) instead of copying each into an owned envelope first.
    fn read_stream_pages(&self, stream: &StreamId, read: ReadStream) -> EventPages {
        pages_of(self.read_stream(stream, read))
    }

    /// Reads the global feed lazily, in pages, in position order: the partition the read names
    /// (see [`ReadAll::partition_in`]).
    fn read_all(&self, read: ReadAll) -> EventStream;

    /// How the store divides its streams among feed partitions (see
    /// [`partition`](super::partition)); fixed when the store was created. Default: one.
    fn partitioning(&self) -> Partitioning {
        Partitioning::single()
    }

    /// The highest position of `partition` visible to readers now (0 if it is empty). Every event
    /// of the partition at or below it that will ever be visible is visible now.
    fn partition_head(&self, partition: u32) -> impl StoreFuture<u64>;

    /// The highest global position visible to readers now (0 if the store is empty): the head of
    /// the single feed. [`StoreError::Partitioned`] on a store with several partitions.
    fn head_position(&self) -> impl StoreFuture<u64> {
        let single = self.partitioning().single_feed();
        async move { self.partition_head(single?).await }
    }

    /// Resolves when an event after `after` may have been appended to `partition`, or after the
    /// backend's polling interval at the latest. Spurious wake-ups are allowed; missed ones are
    /// not (beyond the polling interval).
    fn wait_for_partition(&self, partition: u32, after: u64) -> impl Future<Output = ()> + Send;

    /// [`wait_for_partition`](EventStore::wait_for_partition) on partition 0, the whole feed of
    /// a single-feed store.
    fn wait_for_append(&self, after: u64) -> impl Future<Output = ()> + Send {
        self.wait_for_partition(0, after)
    }

    /// The recorded epoch starts of `partition`, oldest first (see
    /// [`position`](super::position)). A store that cannot lose acknowledged events has none.
    fn partition_epochs(&self, partition: u32) -> impl StoreFuture<Vec<EpochStart>> {
        let checked = self.partitioning().check(partition);
        std::future::ready(checked.map(|()| Vec::new()))
    }

    /// The recorded epoch starts of the single feed.
    /// [`StoreError::Partitioned`] on a store with several partitions.
    fn epochs(&self) -> impl StoreFuture<Vec<EpochStart>> {
        let single = self.partitioning().single_feed();
        async move { self.partition_epochs(single?).await }
    }

    /// Follows the global feed from `after`: catches up, then delivers live appends as they commit.
    ///
    /// Transient failures (a dropped connection, a restarting server) are retried with backoff and
    /// the subscription resumes after the last delivered position. The stream ends only after
    /// yielding an error that retrying cannot fix. On a store with several partitions it yields
    /// [`StoreError::Partitioned`] and ends.
    fn subscribe(&self, after: u64, filter: EventFilter) -> EventStream {
        match self.partitioning().single_feed() {
            Ok(partition) => self.subscribe_partition(partition, after, filter),
            Err(err) => failed_read(err),
        }
    }

    /// Follows `partition` from `after`, as [`subscribe`](EventStore::subscribe) follows the
    /// single feed.
    fn subscribe_partition(&self, partition: u32, after: u64, filter: EventFilter) -> EventStream {
        match self.partitioning().check(partition) {
            Ok(()) => subscribe(self.clone(), partition, after, filter),
            Err(err) => failed_read(err),
        }
    }

    /// Follows every partition from `from`: each partition's events in its order, partitions
    /// interleaved as their events arrive (no order across partitions). A consumer advances its
    /// [`FeedPosition`] with each event's `partition` and `global_position`. The first error
    /// that retrying cannot fix, from any partition, is yielded and ends the stream. A position
    /// that does not have one entry per partition is [`StoreError::InvalidPartitioning`].
    fn subscribe_all(&self, from: &FeedPosition, filter: EventFilter) -> EventStream {
        let partitioning = self.partitioning();
        if let Err(err) = from.check(&partitioning) {
            return failed_read(err);
        }
        if partitioning.is_single() {
            return self.subscribe_partition(0, from.get(0), filter);
        }
        let feeds = partitioning
            .partitions()
            .map(|p| self.subscribe_partition(p, from.get(p), filter.clone()));
        until_first_error(futures::stream::select_all(feeds))
    }
}

/// Ends `events` after the first error it yields.
fn until_first_error(
    events: impl futures::Stream<Item = Result<RecordedEvent, StoreError>> + Send + 'static,
) -> EventStream {
    Box::pin(
        events
            .scan(false, |failed, item| {
                let out = if *failed {
                    None
                } else {
                    *failed = item.is_err();
                    Some(item)
                };
                std::future::ready(out)
            })
            .fuse(),
    )
}

/// An event store that also keeps snapshots: what the repository runs on.
pub trait Store: EventStore + SnapshotStore {}
impl<T: EventStore + SnapshotStore> Store for T {}

/// A store with everything streaming out needs: the outbox, projection checkpoints and the
/// leases of consumer groups.
pub trait StreamingStore: Store + OutboxStore + CheckpointStore + LeaseStore {}
impl<T: Store + OutboxStore + CheckpointStore + LeaseStore> StreamingStore for T {}

impl<T: EventStore> EventStore for Arc<T> {
    fn append(&self, request: AppendRequest) -> impl StoreFuture<AppendResult> {
        (**self).append(request)
    }
    fn append_streams(&self, requests: Vec<AppendRequest>) -> impl StoreFuture<Vec<AppendResult>> {
        (**self).append_streams(requests)
    }
    fn archive_stream(&self, stream: &StreamId, before: u64) -> impl StoreFuture<Archived> {
        (**self).archive_stream(stream, before)
    }
    fn stream_version(&self, stream: &StreamId) -> impl StoreFuture<u64> {
        (**self).stream_version(stream)
    }
    fn list_streams(&self, list: ListStreams) -> impl StoreFuture<StreamPage> {
        (**self).list_streams(list)
    }
    fn read_stream(&self, stream: &StreamId, read: ReadStream) -> EventStream {
        (**self).read_stream(stream, read)
    }
    fn read_stream_pages(&self, stream: &StreamId, read: ReadStream) -> EventPages {
        (**self).read_stream_pages(stream, read)
    }
    fn read_all(&self, read: ReadAll) -> EventStream {
        (**self).read_all(read)
    }
    fn partitioning(&self) -> Partitioning {
        (**self).partitioning()
    }
    fn partition_head(&self, partition: u32) -> impl StoreFuture<u64> {
        (**self).partition_head(partition)
    }
    fn head_position(&self) -> impl StoreFuture<u64> {
        (**self).head_position()
    }
    fn wait_for_partition(&self, partition: u32, after: u64) -> impl Future<Output = ()> + Send {
        (**self).wait_for_partition(partition, after)
    }
    fn wait_for_append(&self, after: u64) -> impl Future<Output = ()> + Send {
        (**self).wait_for_append(after)
    }
    fn partition_epochs(&self, partition: u32) -> impl StoreFuture<Vec<EpochStart>> {
        (**self).partition_epochs(partition)
    }
    fn epochs(&self) -> impl StoreFuture<Vec<EpochStart>> {
        (**self).epochs()
    }
    fn subscribe(&self, after: u64, filter: EventFilter) -> EventStream {
        (**self).subscribe(after, filter)
    }
    fn subscribe_partition(&self, partition: u32, after: u64, filter: EventFilter) -> EventStream {
        (**self).subscribe_partition(partition, after, filter)
    }
    fn subscribe_all(&self, from: &FeedPosition, filter: EventFilter) -> EventStream {
        (**self).subscribe_all(from, filter)
    }
}

/// [`check_resume`](position::check_resume) against the current epoch history of `partition`
/// (one read of it, only when `next` is in a later epoch than `after`): a reader of the partition
/// that has seen everything up to `after` may go on to `next`, or gets [`StoreError::LostTail`].
pub async fn verify_resume<S: EventStore>(
    store: &S,
    partition: u32,
    after: u64,
    next: u64,
) -> Result<(), StoreError> {
    if after == 0 || position::epoch_of(next) <= position::epoch_of(after) {
        return Ok(());
    }
    let history = store.partition_epochs(partition).await?;
    position::check_resume(after, next, &history)
}

// ---------------------------------------------------------------------------------------------
// The default subscription (see the module docs)

/// Pauses between attempts after a transient failure.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));

struct State<S> {
    store: S,
    partition: u32,
    filter: EventFilter,
    /// Every event up to here has been delivered or filtered out.
    after: u64,
    /// The read in progress, if any.
    reading: Option<Reading>,
    caught_up: bool,
    backoff: Delays,
    done: bool,
}

/// One `read_all` to the end of the visible feed.
struct Reading {
    events: EventStream,
    /// The head read just before it started (filtered reads only): once the read ends, every
    /// event up to here that the filter lets through has been delivered.
    head_before: Option<u64>,
}

fn subscribe<S: EventStore>(
    store: S,
    partition: u32,
    after: u64,
    filter: EventFilter,
) -> EventStream {
    let state = State {
        store,
        partition,
        filter,
        after,
        reading: None,
        caught_up: false,
        backoff: BACKOFF.delays(),
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            let failure = if let Some(reading) = st.reading.as_mut() {
                match reading.events.next().await {
                    Some(Ok(event)) => {
                        st.backoff.reset();
                        // The store never returns positions at or below `after`; this guard
                        // keeps the subscription strictly increasing even if a backend
                        // re-delivers after a reconnect.
                        if event.global_position <= st.after {
                            continue;
                        }
                        // Into a later epoch only if nothing after `after` was lost.
                        match verify_resume(
                            &st.store,
                            st.partition,
                            st.after,
                            event.global_position,
                        )
                        .await
                        {
                            Ok(()) => {
                                st.after = event.global_position;
                                return Some((Ok(event), st));
                            }
                            Err(err) => err,
                        }
                    }
                    Some(Err(err)) => err,
                    None => {
                        // Everything visible before the read was scanned, and nothing at or
                        // below a visible position can appear later.
                        let head = reading.head_before.unwrap_or(0);
                        let checked = if head > st.after {
                            verify_resume(&st.store, st.partition, st.after, head).await
                        } else {
                            Ok(())
                        };
                        match checked {
                            Ok(()) => {
                                st.reading = None;
                                st.after = st.after.max(head);
                                st.caught_up = true;
                                continue;
                            }
                            Err(err) => err,
                        }
                    }
                }
            } else {
                if st.caught_up {
                    st.store.wait_for_partition(st.partition, st.after).await;
                    st.caught_up = false;
                }
                match st.start_reading().await {
                    Ok(()) => continue,
                    Err(err) => err,
                }
            };
            st.reading = None;
            if failure.is_transient() {
                tracing::warn!(error = %failure, after = st.after, "subscription read failed; retrying");
                st.backoff.sleep().await;
            } else {
                st.done = true;
                return Some((Err(failure), st));
            }
        }
    }))
}

impl<S: EventStore> State<S> {
    async fn start_reading(&mut self) -> Result<(), StoreError> {
        let head_before = if self.filter.is_empty() {
            None
        } else {
            Some(self.store.partition_head(self.partition).await?)
        };
        let events = self.store.read_all(
            ReadAll::after(self.after)
                .partition(self.partition)
                .filter(self.filter.clone()),
        );
        self.reading = Some(Reading {
            events,
            head_before,
        });
        Ok(())
    }
}

/// Resolves when any partition of `store` may have received an append after this call began, or
/// after the backend's polling interval at the latest: the heads are read first, then the wait
/// is for any partition to pass its head. If a head cannot be read (the store is down) it never
/// resolves: pair it with the caller's own polling interval.
pub async fn wait_for_any_append<S: EventStore>(store: &S) {
    let partitioning = store.partitioning();
    let mut waits = Vec::with_capacity(partitioning.count() as usize);
    for partition in partitioning.partitions() {
        let Ok(head) = store.partition_head(partition).await else {
            return std::future::pending().await;
        };
        waits.push(Box::pin(store.wait_for_partition(partition, head)));
    }
    futures::future::select_all(waits).await;
}

/// Waits until `watch` holds a value above `after`, or `poll` elapses.
///
/// A helper for backends that keep the latest known head position in a
/// [`tokio::sync::watch`] channel.
pub async fn wait_on_watch(watch: &tokio::sync::watch::Receiver<u64>, after: u64, poll: Duration) {
    let mut rx = watch.clone();
    let _ = tokio::time::timeout(poll, rx.wait_for(|head| *head > after)).await;
}
