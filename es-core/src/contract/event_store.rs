//! The event store trait, the store bundles the runtime asks for, and the default subscription.
//!
//! # The default subscription
//!
//! [`EventStore::subscribe`] follows the feed, catching up and then going live, with nothing but
//! `read_all`, `head_position` and `wait_for_append`.
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
use super::checkpoint::CheckpointStore;
use super::error::{StoreError, StoreFuture};
use super::outbox::OutboxStore;
use super::position::{self, EpochStart};
use super::read::{pages_of, EventFilter, EventPages, EventStream, ReadAll, ReadStream};
use super::snapshot::SnapshotStore;
use crate::retry::{Backoff, Delays};
use crate::stream_id::StreamId;

/// An event store over serialized events. Implemented by every backend.
///
/// Handles are cheap to clone (an `Arc` inside) and shared between tasks.
pub trait EventStore: Clone + Send + Sync + 'static {
    /// Appends a batch atomically, honouring the expected version and event-id idempotency.
    fn append(&self, request: AppendRequest) -> impl StoreFuture<AppendResult>;

    /// The stream's current version (0 if it has no events).
    fn stream_version(&self, stream: &StreamId) -> impl StoreFuture<u64>;

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

    /// Reads the global feed lazily, in pages, in position order.
    fn read_all(&self, read: ReadAll) -> EventStream;

    /// The highest global position visible to readers now (0 if the store is empty). Every event at
    /// or below it that will ever be visible is visible now.
    fn head_position(&self) -> impl StoreFuture<u64>;

    /// Resolves when an event after `after` may have been appended, or after the backend's polling
    /// interval at the latest. Spurious wake-ups are allowed; missed ones are not (beyond the
    /// polling interval).
    fn wait_for_append(&self, after: u64) -> impl Future<Output = ()> + Send;

    /// The recorded epoch starts of this store, oldest first (see [`position`](super::position)). A store
    /// that cannot lose acknowledged events has none.
    fn epochs(&self) -> impl StoreFuture<Vec<EpochStart>> {
        std::future::ready(Ok(Vec::new()))
    }

    /// Follows the global feed from `after`: catches up, then delivers live appends as they commit.
    ///
    /// Transient failures (a dropped connection, a restarting server) are retried with backoff and
    /// the subscription resumes after the last delivered position. The stream ends only after
    /// yielding an error that retrying cannot fix.
    fn subscribe(&self, after: u64, filter: EventFilter) -> EventStream {
        subscribe(self.clone(), after, filter)
    }
}

/// An event store that also keeps snapshots: what the repository runs on.
pub trait Store: EventStore + SnapshotStore {}
impl<T: EventStore + SnapshotStore> Store for T {}

/// A store with everything streaming out needs: the outbox and projection checkpoints.
pub trait StreamingStore: Store + OutboxStore + CheckpointStore {}
impl<T: Store + OutboxStore + CheckpointStore> StreamingStore for T {}

impl<T: EventStore> EventStore for Arc<T> {
    fn append(&self, request: AppendRequest) -> impl StoreFuture<AppendResult> {
        (**self).append(request)
    }
    fn stream_version(&self, stream: &StreamId) -> impl StoreFuture<u64> {
        (**self).stream_version(stream)
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
    fn head_position(&self) -> impl StoreFuture<u64> {
        (**self).head_position()
    }
    fn wait_for_append(&self, after: u64) -> impl Future<Output = ()> + Send {
        (**self).wait_for_append(after)
    }
    fn epochs(&self) -> impl StoreFuture<Vec<EpochStart>> {
        (**self).epochs()
    }
    fn subscribe(&self, after: u64, filter: EventFilter) -> EventStream {
        (**self).subscribe(after, filter)
    }
}

/// [`check_resume`](position::check_resume) against the store's current epoch history (one read
/// of it, only when `next` is in a later epoch than `after`): a reader that has seen everything up
/// to `after` may go on to `next`, or gets [`StoreError::LostTail`].
pub async fn verify_resume<S: EventStore>(
    store: &S,
    after: u64,
    next: u64,
) -> Result<(), StoreError> {
    if after == 0 || position::epoch_of(next) <= position::epoch_of(after) {
        return Ok(());
    }
    let history = store.epochs().await?;
    position::check_resume(after, next, &history)
}

// ---------------------------------------------------------------------------------------------
// The default subscription (see the module docs)

/// Pauses between attempts after a transient failure.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));

struct State<S> {
    store: S,
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

fn subscribe<S: EventStore>(store: S, after: u64, filter: EventFilter) -> EventStream {
    let state = State {
        store,
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
                        match verify_resume(&st.store, st.after, event.global_position).await {
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
                            verify_resume(&st.store, st.after, head).await
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
                    st.store.wait_for_append(st.after).await;
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
            Some(self.store.head_position().await?)
        };
        let events = self
            .store
            .read_all(ReadAll::after(self.after).filter(self.filter.clone()));
        self.reading = Some(Reading {
            events,
            head_before,
        });
        Ok(())
    }
}

/// Waits until `watch` holds a value above `after`, or `poll` elapses.
///
/// A helper for backends that keep the latest known head position in a
/// [`tokio::sync::watch`] channel.
pub async fn wait_on_watch(watch: &tokio::sync::watch::Receiver<u64>, after: u64, poll: Duration) {
    let mut rx = watch.clone();
    let _ = tokio::time::timeout(poll, rx.wait_for(|head| *head > after)).await;
}
