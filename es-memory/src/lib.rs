//! The in-memory event store: the embedded default for examples, demos and unit tests.
//!
//! It keeps the whole contract of [`es_core::contract`]: optimistic concurrency, idempotent retries
//! by event id, atomic batches, a never-skip global feed in commit order, snapshots, and live
//! subscriptions. One mutex orders every append, so the global position order is the commit
//! order by construction; readers copy pages of events out under the lock (a load shares a
//! segment of the stream's events instead) and never hold it while the caller consumes them.
//!
//! Nothing is persisted: the data lives as long as the last clone of the store.
//!
//! ```
//! use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};
//! use es_memory::InMemoryStore;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let store = InMemoryStore::new();
//! let stream = StreamId::new("account", "42")?;
//! let event = NewEvent::new("AccountOpened", 1, r#"{"owner":"ada"}"#)?;
//! let result = store
//!     .append(AppendRequest::new(stream, ExpectedVersion::NoStream, vec![event]))
//!     .await?;
//! assert_eq!(result.stream_version, 1);
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use es_core::contract::{check_lease, Checkpoint, HeldLease, LeaseStore};
use es_core::contract::{classify_retry, failed_read, StoreFuture, StoredEventRef};
use es_core::contract::{classify_streams_retry, validate_streams};
use es_core::contract::{DeadLetter, Delivered, LastRejection, LeaseState, Rejection, RelayStatus};
use es_core::event::now_micros;
use es_core::projection::HandlerError;
use es_core::{
    AppendLimits, AppendRequest, AppendResult, CheckpointStore, Direction, EventFilter, EventPage,
    EventPages, EventStore, EventStream, ListStreams, OutboxRecord, OutboxStore, Partitioning,
    ReadAll, ReadStream, RecordedEvent, SnapshotRecord, SnapshotStore, StoreError, StreamId,
    StreamPage, StreamSummary,
};
use tokio::sync::watch;
use uuid::Uuid;

use stream::StreamEvents;

mod keys;
mod stream;
mod tenants;

pub use keys::InMemoryKeyStore;
pub use tenants::InMemoryTenants;

/// Events copied out of the store per lock acquisition while reading.
const PAGE: usize = 512;

/// The in-memory event and snapshot store. Cheap to clone; clones share the data.
#[derive(Clone)]
pub struct InMemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    partitioning: Partitioning,
    /// Per partition, the head position.
    heads: Vec<watch::Sender<u64>>,
    limits: AppendLimits,
    inline: Vec<(String, Box<InlineProjection>)>,
}

/// An inline projection: sees the events of each append before they are committed, under the
/// store's lock; an error rejects the whole append.
pub type InlineProjection = dyn Fn(&[RecordedEvent]) -> Result<(), HandlerError> + Send + Sync;

#[derive(Default)]
struct State {
    /// Per partition, its feed; the event at index `i` has position `i + 1`.
    logs: Vec<Vec<Arc<RecordedEvent>>>,
    /// Per stream, its events in version order (shared with its partition's log).
    streams: HashMap<StreamId, StreamEvents>,
    /// Event id to its partition and its index in that partition's log.
    ids: HashMap<Uuid, (u32, usize)>,
    /// Closed streams, each with its tombstone's version.
    closed: HashMap<StreamId, u64>,
    snapshots: HashMap<StreamId, SnapshotRecord>,
    /// Per archived stream, the lowest version not archived (see `archive_stream`).
    archived: HashMap<StreamId, u64>,
    last_recorded_at: Option<DateTime<Utc>>,
    /// Undelivered outbox records by outbox position.
    outbox: BTreeMap<u64, OutboxRecord>,
    /// Last outbox position assigned.
    outbox_position: u64,
    /// Projection checkpoints by name.
    checkpoints: HashMap<String, Checkpoint>,
    /// The relay lease: owner, generation and expiry (`None` once released).
    lease: Option<Lease>,
    /// The last generation handed out, kept across releases.
    lease_generation: u64,
    /// The leases of consumer groups, by group and lease name (kept after release, for the
    /// generation).
    group_leases: BTreeMap<String, BTreeMap<String, Lease>>,
    /// Parked outbox records by outbox position.
    dead_letters: BTreeMap<u64, DeadLetter>,
    /// The last dead-lettering.
    last_rejection: Option<LastRejection>,
}

impl State {
    /// Where the events of `request` are stored already, if anywhere.
    fn found(&self, request: &AppendRequest) -> Vec<Option<StoredEventRef>> {
        request
            .events
            .iter()
            .map(|e| {
                self.ids.get(&e.event_id).map(|&(p, i)| {
                    let stored = &self.logs[p as usize][i];
                    StoredEventRef {
                        event_id: stored.event_id,
                        stream_id: stored.stream_id.clone(),
                        stream_version: stored.stream_version,
                        global_position: stored.global_position,
                    }
                })
            })
            .collect()
    }

    /// The stream's current version.
    fn version(&self, stream: &StreamId) -> u64 {
        self.streams.get(stream).map_or(0, StreamEvents::len)
    }

    /// Refuses any append to a closed stream (checked under the lock that orders appends, after
    /// the retry rule and before the expected version).
    fn check_open(&self, stream: &StreamId) -> Result<(), StoreError> {
        match self.closed.get(stream) {
            Some(&version) => Err(StoreError::StreamClosed {
                stream_id: stream.clone(),
                version,
            }),
            None => Ok(()),
        }
    }
}

/// A lease (the relay's, or a group's) as held.
struct Lease {
    owner: String,
    generation: u64,
    /// `None`: released.
    expires: Option<Instant>,
}

impl Lease {
    fn held(&self, now: Instant) -> bool {
        self.expires.is_some_and(|e| e > now)
    }

    /// Takes or renews the lease in `slot` for `owner` until `now + ttl`: its generation if
    /// granted, `None` if another owner holds it. Taking a lease not held raises the generation.
    fn acquire(slot: &mut Option<Lease>, owner: &str, ttl: Duration, now: Instant) -> Option<u64> {
        match slot {
            Some(lease) if lease.held(now) && lease.owner == owner => {
                lease.expires = Some(now + ttl);
                Some(lease.generation)
            }
            Some(lease) if lease.held(now) => None,
            _ => {
                let generation = slot.as_ref().map_or(0, |l| l.generation) + 1;
                *slot = Some(Lease {
                    owner: owner.to_owned(),
                    generation,
                    expires: Some(now + ttl),
                });
                Some(generation)
            }
        }
    }

    /// Releases the lease if `owner` holds it in `generation`.
    fn release(&mut self, owner: &str, generation: u64) {
        if self.owner == owner && self.generation == generation {
            self.expires = None;
        }
    }
}

impl std::fmt::Debug for InMemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.inner.lock();
        f.debug_struct("InMemoryStore")
            .field("events", &state.logs.iter().map(Vec::len).sum::<usize>())
            .field("partitioning", &self.inner.partitioning)
            .field("streams", &state.streams.len())
            .field("snapshots", &state.snapshots.len())
            .finish()
    }
}

impl Default for InMemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryStore {
    /// An empty store with default limits.
    pub fn new() -> Self {
        Self::with_limits(AppendLimits::default())
    }

    /// An empty store enforcing `limits` on appends.
    pub fn with_limits(limits: AppendLimits) -> Self {
        Self::builder().limits(limits).build()
    }

    /// Configures a store: limits and inline projections.
    pub fn builder() -> InMemoryStoreBuilder {
        InMemoryStoreBuilder {
            limits: AppendLimits::default(),
            partitioning: Partitioning::single(),
            inline: Vec::new(),
        }
    }

    /// Number of stored events.
    pub fn len(&self) -> usize {
        self.inner.lock().logs.iter().map(Vec::len).sum()
    }

    /// Whether the store holds no events.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Configures an [`InMemoryStore`].
pub struct InMemoryStoreBuilder {
    limits: AppendLimits,
    partitioning: Partitioning,
    inline: Vec<(String, Box<InlineProjection>)>,
}

impl std::fmt::Debug for InMemoryStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.inline.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("InMemoryStoreBuilder")
            .field("limits", &self.limits)
            .field("partitioning", &self.partitioning)
            .field("inline", &names)
            .finish()
    }
}

impl InMemoryStoreBuilder {
    /// Enforces `limits` on appends.
    pub fn limits(mut self, limits: AppendLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Divides the streams among feed partitions (default: one feed). See
    /// [`es_core::contract::partition`].
    pub fn partitioning(mut self, partitioning: Partitioning) -> Self {
        self.partitioning = partitioning;
        self
    }

    /// Runs `projection` inside every append, under the store's lock, before the events are
    /// visible: it sees exactly the committed events, once, in commit order. If it fails, the
    /// append fails with [`StoreError::InlineProjection`] and nothing is written. Keep it fast.
    pub fn inline_projection<F>(mut self, name: &str, projection: F) -> Self
    where
        F: Fn(&[RecordedEvent]) -> Result<(), HandlerError> + Send + Sync + 'static,
    {
        self.inline.push((name.to_owned(), Box::new(projection)));
        self
    }

    /// Builds the store.
    pub fn build(self) -> InMemoryStore {
        InMemoryStore {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    logs: vec![Vec::new(); self.partitioning.count() as usize],
                    ..State::default()
                }),
                heads: self
                    .partitioning
                    .partitions()
                    .map(|_| watch::channel(0).0)
                    .collect(),
                partitioning: self.partitioning,
                limits: self.limits,
                inline: self.inline,
            }),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock with the state half-updated: every append
        // validates first and mutates only after all checks passed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn append(&self, request: &AppendRequest) -> Result<AppendResult, StoreError> {
        request.validate(&self.limits)?;
        let mut state = self.lock();
        let found = state.found(request);
        if let Some(original) = classify_retry(request, &found)? {
            return Ok(original);
        }
        state.check_open(&request.stream_id)?;
        let current = state.version(&request.stream_id);
        request.expected.check(&request.stream_id, current)?;
        if request.events.is_empty() {
            return Ok(AppendResult {
                stream_version: current,
                positions: Vec::new(),
                duplicate: false,
            });
        }
        let mut results = self.write(&mut state, std::slice::from_ref(request))?;
        Ok(results.remove(0))
    }

    /// The multi-stream append: every check of every part, then every write, under one
    /// acquisition of the lock.
    fn append_streams(&self, requests: &[AppendRequest]) -> Result<Vec<AppendResult>, StoreError> {
        validate_streams(requests, &self.limits)?;
        let mut state = self.lock();
        let found: Vec<_> = requests.iter().map(|r| state.found(r)).collect();
        if let Some(original) = classify_streams_retry(requests, &found)? {
            return Ok(original);
        }
        for request in requests {
            state.check_open(&request.stream_id)?;
            let current = state.version(&request.stream_id);
            request.expected.check(&request.stream_id, current)?;
        }
        self.write(&mut state, requests)
    }

    /// Writes `requests` (checked, each with at least one event, distinct streams): records the
    /// events, runs the inline projections on each part, and only when all of them accept,
    /// commits every part and publishes the heads of the partitions written.
    fn write(
        &self,
        state: &mut State,
        requests: &[AppendRequest],
    ) -> Result<Vec<AppendResult>, StoreError> {
        let recorded_at = match state.last_recorded_at {
            Some(last) => now_micros().max(last),
            None => now_micros(),
        };
        // The next index of each partition's log, as the parts before take theirs.
        let mut next: HashMap<u32, usize> = HashMap::new();
        let mut parts = Vec::with_capacity(requests.len());
        for request in requests {
            let current = state.version(&request.stream_id);
            let partition = self.partitioning.partition_of(&request.stream_id);
            let first_index = *next
                .entry(partition)
                .or_insert_with(|| state.logs[partition as usize].len());
            next.insert(partition, first_index + request.events.len());
            let recorded: Vec<RecordedEvent> = request
                .events
                .iter()
                .enumerate()
                .map(|(i, event)| RecordedEvent {
                    event_id: event.event_id,
                    stream_id: request.stream_id.clone(),
                    stream_version: current + i as u64 + 1,
                    global_position: (first_index + i) as u64 + 1,
                    partition,
                    event_type: event.event_type.clone(),
                    schema_version: event.schema_version,
                    payload: event.payload.clone(),
                    metadata: event.metadata.clone(),
                    recorded_at,
                })
                .collect();
            for (name, projection) in &self.inline {
                projection(&recorded).map_err(|e| StoreError::InlineProjection {
                    stream_id: request.stream_id.clone(),
                    projection: name.clone(),
                    reason: e.to_string(),
                })?;
            }
            parts.push((partition, first_index, current, recorded));
        }
        // Every check passed: commit.
        state.last_recorded_at = Some(recorded_at);
        let mut results = Vec::with_capacity(requests.len());
        for (request, (partition, first_index, current, recorded)) in requests.iter().zip(parts) {
            let positions: Vec<u64> = recorded.iter().map(|e| e.global_position).collect();
            let stream = state.streams.entry(request.stream_id.clone()).or_default();
            let log = &mut state.logs[partition as usize];
            for (i, event) in recorded.into_iter().enumerate() {
                state
                    .ids
                    .insert(event.event_id, (partition, first_index + i));
                let event = Arc::new(event);
                stream.push(Arc::clone(&event));
                log.push(event);
            }
            for message in &request.outbox {
                state.outbox_position += 1;
                let position = state.outbox_position;
                state.outbox.insert(
                    position,
                    OutboxRecord {
                        position,
                        stream_id: request.stream_id.clone(),
                        recorded_at,
                        message: message.clone(),
                    },
                );
            }
            if request.closes() {
                state.closed.insert(
                    request.stream_id.clone(),
                    current + request.events.len() as u64,
                );
            }
            results.push(AppendResult {
                stream_version: current + request.events.len() as u64,
                positions,
                duplicate: false,
            });
        }
        for partition in next.into_keys() {
            let head = state.logs[partition as usize].len() as u64;
            // Published under the lock, so the head only ever moves forward.
            self.heads[partition as usize].send_replace(head);
        }
        Ok(results)
    }

    /// Copies the next page of a stream read: up to `take` events from version `cursor` on in
    /// `direction`, moving `cursor` past them. Returns the page and whether the stream has
    /// nothing after it.
    fn stream_page(
        &self,
        stream: &StreamId,
        direction: Direction,
        cursor: &mut u64,
        take: usize,
    ) -> (Vec<RecordedEvent>, bool) {
        let state = self.lock();
        match state.streams.get(stream) {
            Some(events) => events.copy(direction, cursor, take, |e| RecordedEvent::clone(e)),
            None => (Vec::new(), true),
        }
    }

    /// Copies the next page of `partition`'s feed: up to `take` events after position `after`
    /// that pass `filter`, scanning at most [`SCAN`] entries. Returns the page, the position
    /// scanned up to, and whether that is the end of the feed.
    fn all_page(
        &self,
        partition: u32,
        after: u64,
        filter: &EventFilter,
        take: usize,
    ) -> (Vec<RecordedEvent>, u64, bool) {
        let state = self.lock();
        let log = &state.logs[partition as usize];
        let start = (after as usize).min(log.len());
        let entries = &log[start..];
        if filter.is_empty() {
            let entries = &entries[..entries.len().min(take)];
            let page: Vec<RecordedEvent> =
                entries.iter().map(|e| RecordedEvent::clone(e)).collect();
            let scanned = start + entries.len();
            return (page, scanned as u64, scanned == log.len());
        }
        let mut page = Vec::new();
        let mut scanned = start;
        for e in entries.iter().take(SCAN) {
            if page.len() == take {
                break;
            }
            scanned += 1;
            if filter.matches(e) {
                page.push(RecordedEvent::clone(e));
            }
        }
        (page, scanned as u64, scanned == log.len())
    }
}

/// Most entries of the global feed a filtered read scans per lock acquisition.
const SCAN: usize = 16 * PAGE;

/// What a [`Pages`] stream reads.
enum Source {
    /// One stream; `cursor` is the next version to read.
    Stream {
        stream: StreamId,
        direction: Direction,
        cursor: u64,
    },
    /// A partition's feed after `after`; `follow` waits for appends at the end (a
    /// subscription) instead of ending.
    All {
        partition: u32,
        after: u64,
        filter: EventFilter,
        follow: bool,
    },
}

/// A read: copies pages of events out under the lock and hands them out one by one.
struct Pages {
    inner: Arc<Inner>,
    source: Source,
    /// Events still to return (the read's limit).
    remaining: u64,
    page: std::vec::IntoIter<RecordedEvent>,
    /// Nothing more to read.
    done: bool,
    /// A subscription at the end of the feed, waiting for the next append.
    waiting: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Pages {
    fn new(inner: Arc<Inner>, source: Source, limit: Option<u64>) -> Self {
        Self {
            inner,
            source,
            remaining: limit.unwrap_or(u64::MAX),
            page: Vec::new().into_iter(),
            done: false,
            waiting: None,
        }
    }

    /// Reads the next page into `self.page`, or marks the end, or starts waiting.
    fn fetch(&mut self) {
        if self.remaining == 0 {
            self.done = true;
            return;
        }
        let take = self.remaining.min(PAGE as u64) as usize;
        let page = match &mut self.source {
            Source::Stream {
                stream,
                direction,
                cursor,
            } => {
                let (page, end) = self.inner.stream_page(stream, *direction, cursor, take);
                self.done = end;
                page
            }
            Source::All {
                partition,
                after,
                filter,
                follow,
            } => {
                let (page, scanned, end) = self.inner.all_page(*partition, *after, filter, take);
                // Entries scanned but filtered out are passed too: nothing at or below a visible
                // position can appear later.
                *after = scanned;
                if end && !*follow {
                    self.done = true;
                } else if end && page.is_empty() {
                    // Caught up: wait for an append after `after` (spurious wake-ups just read
                    // an empty page and wait again).
                    let rx = self.inner.heads[*partition as usize].subscribe();
                    let after = *after;
                    self.waiting = Some(Box::pin(async move {
                        es_core::contract::wait_on_watch(&rx, after, Duration::from_secs(5)).await;
                    }));
                }
                page
            }
        };
        self.remaining -= page.len() as u64;
        self.page = page.into_iter();
    }
}

impl futures::Stream for Pages {
    type Item = Result<RecordedEvent, StoreError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.page.next() {
                return Poll::Ready(Some(Ok(event)));
            }
            if let Some(waiting) = &mut this.waiting {
                std::task::ready!(waiting.as_mut().poll(cx));
                this.waiting = None;
            }
            if this.done {
                return Poll::Ready(None);
            }
            this.fetch();
        }
    }
}

impl EventStore for InMemoryStore {
    fn append(&self, request: AppendRequest) -> impl StoreFuture<AppendResult> {
        futures::future::ready(self.inner.append(&request))
    }

    fn append_streams(&self, requests: Vec<AppendRequest>) -> impl StoreFuture<Vec<AppendResult>> {
        futures::future::ready(self.inner.append_streams(&requests))
    }

    /// The store has no colder storage than its memory: archiving records where the hot part of
    /// the stream begins and keeps serving every event from memory, so that code written for
    /// archiving runs unchanged on the embedded store (and the conformance suite checks the
    /// same rules here as on PostgreSQL and Redis).
    fn archive_stream(
        &self,
        stream: &StreamId,
        before: u64,
    ) -> impl StoreFuture<es_core::Archived> {
        let mut state = self.inner.lock();
        let version = state.version(stream);
        let archived = es_core::contract::check_archive(stream, before, version).map(|()| {
            let hot_from = state.archived.entry(stream.clone()).or_insert(1);
            let moved = before.saturating_sub(*hot_from);
            *hot_from = (*hot_from).max(before);
            es_core::Archived {
                moved,
                hot_from: *hot_from,
            }
        });
        futures::future::ready(archived)
    }

    fn stream_version(&self, stream: &StreamId) -> impl StoreFuture<u64> {
        let version = self
            .inner
            .lock()
            .streams
            .get(stream)
            .map_or(0, StreamEvents::len);
        futures::future::ready(Ok(version))
    }

    /// Looks at every stream under the lock (O(streams)) and sorts the matching ones after
    /// releasing it.
    fn list_streams(&self, list: ListStreams) -> impl StoreFuture<StreamPage> {
        let page = list.validate().map(|()| {
            let candidates: Vec<StreamSummary> = self
                .inner
                .lock()
                .streams
                .iter()
                .filter(|(stream, events)| events.len() > 0 && list.matches(stream))
                .map(|(stream, events)| StreamSummary {
                    stream_id: stream.clone(),
                    version: events.len(),
                })
                .collect();
            list.page_of(candidates)
        });
        futures::future::ready(page)
    }

    fn read_stream(&self, stream: &StreamId, read: ReadStream) -> EventStream {
        let source = Source::Stream {
            stream: stream.clone(),
            direction: read.direction,
            cursor: read.from,
        };
        Box::pin(Pages::new(Arc::clone(&self.inner), source, read.limit))
    }

    /// Pages that share the stream's own segments of up to 512 events: a load decodes each
    /// event where it is stored, with no copy of its envelope.
    fn read_stream_pages(&self, stream: &StreamId, read: ReadStream) -> EventPages {
        let inner = Arc::clone(&self.inner);
        let stream = stream.clone();
        let mut cursor = read.from;
        let mut remaining = read.limit.unwrap_or(u64::MAX);
        let mut done = false;
        Box::pin(futures::stream::poll_fn(move |_| {
            if done || remaining == 0 {
                return Poll::Ready(None);
            }
            let take = remaining.min(PAGE as u64) as usize;
            let (page, end) = match inner.lock().streams.get(&stream) {
                Some(events) => events.page(read.direction, &mut cursor, take),
                None => (None, true),
            };
            done = end;
            let Some(page) = page else {
                return Poll::Ready(None);
            };
            remaining -= page.len() as u64;
            let page: Box<dyn EventPage> = Box::new(page);
            Poll::Ready(Some(Ok(page)))
        }))
    }

    fn read_all(&self, read: ReadAll) -> EventStream {
        let partition = match read.partition_in(&self.inner.partitioning) {
            Ok(partition) => partition,
            Err(err) => return failed_read(err),
        };
        let source = Source::All {
            partition,
            after: read.after,
            filter: read.filter,
            follow: false,
        };
        Box::pin(Pages::new(Arc::clone(&self.inner), source, read.limit))
    }

    fn partitioning(&self) -> Partitioning {
        self.inner.partitioning
    }

    fn subscribe_partition(&self, partition: u32, after: u64, filter: EventFilter) -> EventStream {
        if let Err(err) = self.inner.partitioning.check(partition) {
            return failed_read(err);
        }
        // Pages straight from the log, as `read_all` reads them: catching up copies each event
        // out once, and at the end of the feed the stream waits for the next append.
        let source = Source::All {
            partition,
            after,
            filter,
            follow: true,
        };
        Box::pin(Pages::new(Arc::clone(&self.inner), source, None))
    }

    fn partition_head(&self, partition: u32) -> impl StoreFuture<u64> {
        let head = self
            .inner
            .partitioning
            .check(partition)
            .map(|()| *self.inner.heads[partition as usize].borrow());
        futures::future::ready(head)
    }

    fn wait_for_partition(&self, partition: u32, after: u64) -> impl Future<Output = ()> + Send {
        // A partition that does not exist never moves: wait the polling interval.
        let rx = match self.inner.heads.get(partition as usize) {
            Some(head) => head.subscribe(),
            None => watch::channel(0).1,
        };
        async move {
            es_core::contract::wait_on_watch(&rx, after, Duration::from_secs(5)).await;
        }
    }
}

impl SnapshotStore for InMemoryStore {
    fn load_snapshot(&self, stream: &StreamId) -> impl StoreFuture<Option<SnapshotRecord>> {
        futures::future::ready(Ok(self.inner.lock().snapshots.get(stream).cloned()))
    }

    fn save_snapshot(&self, snapshot: SnapshotRecord) -> impl StoreFuture<bool> {
        if let Err(err) = snapshot.validate() {
            return futures::future::ready(Err(err));
        }
        let mut state = self.inner.lock();
        let newer = state
            .snapshots
            .get(&snapshot.stream_id)
            .is_none_or(|stored| stored.version < snapshot.version);
        if newer {
            state.snapshots.insert(snapshot.stream_id.clone(), snapshot);
        }
        futures::future::ready(Ok(newer))
    }

    fn delete_snapshot(&self, stream: &StreamId, version: u64) -> impl StoreFuture<bool> {
        let mut state = self.inner.lock();
        let matches = state
            .snapshots
            .get(stream)
            .is_some_and(|stored| stored.version == version);
        if matches {
            state.snapshots.remove(stream);
        }
        futures::future::ready(Ok(matches))
    }
}

impl InMemoryStore {
    /// Copies of up to `limit` of `records`, allocated once: a batch is read with one
    /// allocation of its list rather than one per doubling of it.
    fn copied<'a>(
        state: &State,
        records: impl Iterator<Item = &'a OutboxRecord>,
        limit: u64,
    ) -> Vec<OutboxRecord> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let mut copies = Vec::with_capacity(limit.min(state.outbox.len()));
        copies.extend(records.take(limit).cloned());
        copies
    }

    /// Fails with [`StoreError::Fenced`] unless `generation` is the relay lease's generation.
    fn check_fence(state: &State, generation: u64) -> Result<(), StoreError> {
        if state.lease_generation == generation {
            return Ok(());
        }
        let holder = state.lease.as_ref().map_or("nobody", |l| l.owner.as_str());
        Err(StoreError::Fenced {
            resource: "the outbox relay lease".to_owned(),
            reason: format!(
                "generation {generation} is over; the lease is at generation {} (last taken by \
                 {holder})",
                state.lease_generation
            ),
        })
    }
}

impl OutboxStore for InMemoryStore {
    fn acquire_relay_lease(&self, owner: &str, ttl: Duration) -> impl StoreFuture<Option<u64>> {
        let mut state = self.inner.lock();
        let granted = Lease::acquire(&mut state.lease, owner, ttl, Instant::now());
        if let Some(generation) = granted {
            state.lease_generation = generation;
        }
        futures::future::ready(Ok(granted))
    }

    fn release_relay_lease(&self, owner: &str, generation: u64) -> impl StoreFuture<()> {
        if let Some(lease) = &mut self.inner.lock().lease {
            lease.release(owner, generation);
        }
        futures::future::ready(Ok(()))
    }

    fn pending_outbox(&self, limit: u64) -> impl StoreFuture<Vec<OutboxRecord>> {
        let state = self.inner.lock();
        let records = Self::copied(&state, state.outbox.values(), limit);
        futures::future::ready(Ok(records))
    }

    fn pending_outbox_after(&self, after: u64, limit: u64) -> impl StoreFuture<Vec<OutboxRecord>> {
        let state = self.inner.lock();
        let after = state.outbox.range(after.saturating_add(1)..);
        let records = Self::copied(&state, after.map(|(_, record)| record), limit);
        futures::future::ready(Ok(records))
    }

    fn mark_delivered(&self, generation: u64, delivered: &[Delivered]) -> impl StoreFuture<()> {
        use std::collections::btree_map::Entry;
        let mut state = self.inner.lock();
        let result = Self::check_fence(&state, generation).map(|()| {
            for d in delivered {
                if let Entry::Occupied(record) = state.outbox.entry(d.position) {
                    if record.get().message.message_id == d.message_id {
                        record.remove();
                    }
                }
            }
        });
        futures::future::ready(result)
    }

    fn dead_letter(&self, generation: u64, rejections: &[Rejection]) -> impl StoreFuture<()> {
        let mut state = self.inner.lock();
        let result = Self::check_fence(&state, generation).map(|()| {
            let dead_at = now_micros();
            for r in rejections {
                let holds = state
                    .outbox
                    .get(&r.position)
                    .is_some_and(|record| record.message.message_id == r.message_id);
                if let Some(record) = holds.then(|| state.outbox.remove(&r.position)).flatten() {
                    state.dead_letters.insert(
                        r.position,
                        DeadLetter {
                            record,
                            error: r.error.clone(),
                            attempts: r.attempts,
                            dead_at,
                        },
                    );
                    state.last_rejection = Some(LastRejection {
                        position: r.position,
                        error: r.error.clone(),
                        at: dead_at,
                    });
                }
            }
        });
        futures::future::ready(result)
    }

    fn dead_letters(&self, limit: u64) -> impl StoreFuture<Vec<DeadLetter>> {
        let state = self.inner.lock();
        let letters = state
            .dead_letters
            .values()
            .take(limit as usize)
            .cloned()
            .collect();
        futures::future::ready(Ok(letters))
    }

    fn requeue_dead_letters(&self, positions: &[u64]) -> impl StoreFuture<u64> {
        let mut state = self.inner.lock();
        let mut positions = positions.to_vec();
        positions.sort_unstable();
        positions.dedup();
        let mut requeued = 0;
        for old in positions {
            if let Some(letter) = state.dead_letters.remove(&old) {
                state.outbox_position += 1;
                let position = state.outbox_position;
                let mut record = letter.record;
                record.position = position;
                state.outbox.insert(position, record);
                requeued += 1;
            }
        }
        futures::future::ready(Ok(requeued))
    }

    fn outbox_len(&self) -> impl StoreFuture<u64> {
        futures::future::ready(Ok(self.inner.lock().outbox.len() as u64))
    }

    fn relay_status(&self) -> impl StoreFuture<RelayStatus> {
        let state = self.inner.lock();
        let now = Instant::now();
        let status = RelayStatus {
            pending: state.outbox.len() as u64,
            dead_letters: state.dead_letters.len() as u64,
            last_error: state.last_rejection.clone(),
            lease: state.lease.as_ref().map(|l| LeaseState {
                owner: l.owner.clone(),
                generation: l.generation,
                held: l.held(now),
            }),
        };
        futures::future::ready(Ok(status))
    }
}

impl CheckpointStore for InMemoryStore {
    fn load_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        let checkpoint = self
            .inner
            .lock()
            .checkpoints
            .get(name)
            .copied()
            .unwrap_or_default();
        futures::future::ready(Ok(checkpoint))
    }

    fn save_checkpoint(&self, name: &str, checkpoint: Checkpoint) -> impl StoreFuture<bool> {
        let mut state = self.inner.lock();
        let stored = state.checkpoints.entry(name.to_owned()).or_default();
        let result = if stored.generation == checkpoint.generation {
            let raised = checkpoint.position > stored.position;
            if raised {
                stored.position = checkpoint.position;
            }
            Ok(raised)
        } else {
            Err(StoreError::Fenced {
                resource: format!("the checkpoint of projection `{name}`"),
                reason: format!(
                    "generation {} is over; the projection was reset to generation {}",
                    checkpoint.generation, stored.generation
                ),
            })
        };
        futures::future::ready(result)
    }

    fn reset_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        let mut state = self.inner.lock();
        let stored = state.checkpoints.entry(name.to_owned()).or_default();
        *stored = Checkpoint {
            position: 0,
            generation: stored.generation + 1,
        };
        futures::future::ready(Ok(*stored))
    }

    fn fence_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        let mut state = self.inner.lock();
        let stored = state.checkpoints.entry(name.to_owned()).or_default();
        stored.generation += 1;
        futures::future::ready(Ok(*stored))
    }
}

impl LeaseStore for InMemoryStore {
    fn acquire_lease(
        &self,
        group: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> impl StoreFuture<Option<u64>> {
        let result = check_lease(group, name, owner, ttl).map(|_| {
            let mut state = self.inner.lock();
            let leases = state.group_leases.entry(group.to_owned()).or_default();
            let mut slot = leases.remove(name);
            let granted = Lease::acquire(&mut slot, owner, ttl, Instant::now());
            leases.extend(slot.map(|lease| (name.to_owned(), lease)));
            granted
        });
        futures::future::ready(result)
    }

    fn release_lease(
        &self,
        group: &str,
        name: &str,
        owner: &str,
        generation: u64,
    ) -> impl StoreFuture<()> {
        let mut state = self.inner.lock();
        if let Some(lease) = state
            .group_leases
            .get_mut(group)
            .and_then(|leases| leases.get_mut(name))
        {
            lease.release(owner, generation);
        }
        futures::future::ready(Ok(()))
    }

    fn held_leases(&self, group: &str) -> impl StoreFuture<Vec<HeldLease>> {
        let state = self.inner.lock();
        let now = Instant::now();
        let held = state
            .group_leases
            .get(group)
            .map_or_else(Vec::new, |leases| {
                leases
                    .iter()
                    .filter(|(_, lease)| lease.held(now))
                    .map(|(name, lease)| HeldLease {
                        name: name.clone(),
                        owner: lease.owner.clone(),
                        generation: lease.generation,
                    })
                    .collect()
            });
        futures::future::ready(Ok(held))
    }
}
