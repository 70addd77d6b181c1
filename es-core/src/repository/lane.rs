//! Commands to one aggregate in this process, and the aggregates kept in memory between them.
//!
//! Every aggregate a repository runs commands on has a *lane*. A command takes the lane's lock,
//! decides against the lane's state, and, if it emits events, applies them to that state and
//! adds them to the lane's open *batch*; then it lets go of the lock and waits for the batch.
//! One batch per lane is in flight at a time: the next one fills while it is (each command
//! decided against the state the previous ones left), and is appended, once, with one expected
//! version, when its predecessor committed. So commands to one aggregate in one process never
//! conflict with each other, and a hot aggregate takes many commands per append. Conflicts come
//! only from other processes: the batch fails, the lane forgets its state, and its commands load
//! again and decide again (with the repository's backoff).
//!
//! Between commands a lane keeps its aggregate (the *cache*): the next command decides without
//! reading the stream. Nothing is lost by that if another process wrote meanwhile: the append
//! expects the cached version and fails with a conflict, which reloads. A command that emits
//! nothing (a domain error, or no events) joins a batch too, with no events: a batch with events
//! checks its members' state by its append; a batch without checks it by reading the stream's
//! version once its predecessor committed (a different version is a conflict). Either way the
//! state each answer was decided on is the stream's at a moment after the command began. Only a
//! state loaded by the command itself is answered from at once. Idle lanes beyond the
//! repository's `cache_capacity` are dropped, least recently used first.
//!
//! A batch that the store refuses for a reason other than a conflict (an inline projection, a
//! payload over the limit) may have been refused for one command's events only: each of its
//! commands then runs again alone, so that each gets the answer of its own events.

use std::any::{Any, TypeId};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hashlink::LruCache;
use tokio::sync::watch;
use uuid::Uuid;

use super::snapshot::SnapshotContext;
use super::{Executed, RepoResult, Repository, RepositoryError, Until};
use crate::aggregate::Aggregate;
use crate::contract::{AppendRequest, ExpectedVersion, OutboxMessage, Store, StoreError};
use crate::event::{Metadata, NewEvent};
use crate::stream_id::StreamId;

/// Most events one batch takes; a command whose events do not fit opens the next batch.
const MAX_BATCH_EVENTS: usize = 512;
/// Most payload bytes one batch takes (a command alone may exceed it).
const MAX_BATCH_BYTES: usize = 4 << 20;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A lane's key: the aggregate type and its stream.
type Key = (TypeId, StreamId);

/// The lanes of a repository, least recently used first.
pub(super) struct Lanes {
    capacity: usize,
    map: Mutex<LruCache<Key, Arc<dyn Any + Send + Sync>>>,
}

impl Lanes {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            map: Mutex::new(LruCache::new_unbounded()),
        }
    }

    /// The lane of `stream_id` for aggregate type `A`.
    pub(super) fn lane<A: Aggregate>(&self, stream_id: &StreamId) -> Arc<Lane<A>> {
        let key = (TypeId::of::<A>(), stream_id.clone());
        let mut map = lock(&self.map);
        if let Some(lane) = map.get(&key) {
            if let Ok(lane) = Arc::clone(lane).downcast::<Lane<A>>() {
                return lane;
            }
        }
        let lane = Arc::new(Lane::<A>::new());
        map.insert(key, Arc::clone(&lane) as _);
        Self::trim_locked(&mut map, self.capacity);
        lane
    }

    /// Drops idle lanes, least recently used first, until at most `capacity` remain (lanes in
    /// use stay).
    pub(super) fn trim(&self) {
        Self::trim_locked(&mut lock(&self.map), self.capacity);
    }

    fn trim_locked(map: &mut LruCache<Key, Arc<dyn Any + Send + Sync>>, capacity: usize) {
        let mut busy = Vec::new();
        while map.len() > capacity {
            let Some((key, lane)) = map.remove_lru() else {
                break;
            };
            if Arc::strong_count(&lane) > 1 {
                busy.push((key, lane));
            }
        }
        for (key, lane) in busy {
            map.insert(key, lane);
        }
    }

    /// Notes that the stored snapshot of `stream_id` was deleted: the lane of `A` there counts
    /// the next snapshot from none.
    pub(super) fn snapshot_deleted<A: Aggregate>(&self, stream_id: &StreamId) {
        let key = (TypeId::of::<A>(), stream_id.clone());
        if let Some(lane) = lock(&self.map).peek(&key) {
            if let Some(lane) = lane.downcast_ref::<Lane<A>>() {
                lane.snapshot_deleted.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Forgets the state the lane of `A` on `stream_id` keeps, if there is one: the stream was
    /// written outside the lane, and its next command loads it again.
    pub(super) async fn forget<A: Aggregate>(&self, stream_id: &StreamId) {
        let key = (TypeId::of::<A>(), stream_id.clone());
        let lane = lock(&self.map).peek(&key).cloned();
        if let Some(lane) = lane {
            if let Some(lane) = lane.downcast_ref::<Lane<A>>() {
                lane.forget().await;
            }
        }
    }

    /// Lanes held now.
    pub(super) fn len(&self) -> usize {
        lock(&self.map).len()
    }
}

/// One aggregate's commands in this process.
pub(super) struct Lane<A: Aggregate> {
    state: tokio::sync::Mutex<LaneState<A>>,
    /// The stream's snapshot was deleted (found not to match the stream) by a load outside the
    /// lane.
    snapshot_deleted: AtomicBool,
}

struct LaneState<A: Aggregate> {
    /// The aggregate after every event the lane knows of: the committed ones, then those of the
    /// batches not settled yet. `None`: load it.
    tip: Option<Tip<A>>,
    /// The batch commands join, until it is closed.
    open: Option<Arc<Batch<A>>>,
    /// The newest batch, which the next one waits for.
    last: Option<Arc<Batch<A>>>,
}

impl<A: Aggregate> LaneState<A> {
    /// Forgets the state and the batches not settled: the next command loads the aggregate and
    /// starts a new line of batches. Those in flight still settle; a batch decided on the
    /// forgotten state fails by its expected version, never commits on a state it was not
    /// decided on.
    fn forget(&mut self) {
        self.tip = None;
        self.open = None;
        self.last = None;
    }
}

struct Tip<A> {
    aggregate: A,
    version: u64,
    snapshot_version: Option<u64>,
    last_event_id: Option<Uuid>,
    /// The stream's last event is its tombstone: no command runs on it.
    closed: bool,
}

impl<A: Aggregate> Lane<A> {
    fn new() -> Self {
        Self {
            state: tokio::sync::Mutex::new(LaneState {
                tip: None,
                open: None,
                last: None,
            }),
            snapshot_deleted: AtomicBool::new(false),
        }
    }

    async fn forget(&self) {
        self.state.lock().await.forget();
    }
}

/// The events of several commands, appended together (or, if none has events, the check that
/// the stream is still at the version they were decided at).
struct Batch<A: Aggregate> {
    /// The stream version the batch expects.
    expected: u64,
    /// The batch before it on the lane, until this one's task took it to wait for it.
    previous: Mutex<Option<Arc<Batch<A>>>>,
    parts: Mutex<Parts<A>>,
    /// Set by the batch's task; closed (an error for waiters) if the task ends without setting it.
    outcome: watch::Receiver<Option<Arc<Outcome>>>,
}

struct Parts<A> {
    events: Vec<NewEvent>,
    outbox: Vec<OutboxMessage>,
    bytes: usize,
    /// Members with events.
    writers: usize,
    /// No more commands join: it is being sent, or it belongs to one command alone.
    closed: bool,
    /// The state to snapshot once committed, at its version, with the event id there.
    snapshot: Option<(A, u64, Option<Uuid>)>,
}

/// How a batch ended.
enum Outcome {
    /// Appended (or, without events, the stream was found at the expected version): the global
    /// position of each event.
    Committed {
        positions: Vec<u64>,
        snapshot_saved: bool,
    },
    /// Another writer moved the stream: the batch that conflicted expected `expected`, and the
    /// stream was at `actual`. A batch abandoned because the one before it conflicted reports
    /// that conflict, not its own expected version (which counted the events never written).
    Conflict { expected: u64, actual: u64 },
    /// The store refused the batch for another reason, and wrote nothing: with one writer, its
    /// error; with several, each runs again alone.
    Refused {
        error: Mutex<Option<StoreError>>,
        writers: usize,
    },
    /// The append failed and may or may not have been written: every command gets the error.
    Unknown(Arc<StoreError>),
    /// Never sent: the batch before it did not commit.
    Abandoned,
    /// The batch's task ended before it settled (it panicked, or its runtime shut down): whether
    /// the events were written is unknown.
    Lost,
}

impl<A: Aggregate> Batch<A> {
    /// A batch and the sender its task settles it with.
    fn new(
        expected: u64,
        previous: Option<Arc<Batch<A>>>,
        alone: bool,
    ) -> (Self, watch::Sender<Option<Arc<Outcome>>>) {
        let (tx, rx) = watch::channel(None);
        let batch = Self {
            expected,
            previous: Mutex::new(previous),
            parts: Mutex::new(Parts {
                events: Vec::new(),
                outbox: Vec::new(),
                bytes: 0,
                writers: 0,
                closed: alone,
                snapshot: None,
            }),
            outcome: rx,
        };
        (batch, tx)
    }

    fn settled(&self) -> bool {
        self.outcome.borrow().is_some()
    }

    /// Waits until the batch is settled.
    async fn wait(&self) -> Arc<Outcome> {
        let mut rx = self.outcome.clone();
        let outcome = match rx.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone(),
            Err(_) => None,
        };
        outcome.unwrap_or_else(|| Arc::new(Outcome::Lost))
    }
}

/// What one command's attempt came to.
pub(super) enum Attempt<A: Aggregate> {
    /// Done: the events were appended (or there were none).
    Done(Executed<A>),
    /// Run again: after a conflict (`Some((expected, actual))`) or a batch that failed for
    /// another command's sake; `alone`: without sharing a batch.
    Again {
        conflict: Option<(u64, u64)>,
        alone: bool,
    },
}

/// A command's part in a batch.
struct Member<A: Aggregate> {
    batch: Arc<Batch<A>>,
    /// Offset of its first event in the batch.
    offset: usize,
    /// The version it was decided at.
    decided_at: u64,
    events: Vec<A::Event>,
    event_ids: Vec<Uuid>,
    /// The aggregate after its events.
    aggregate: A,
}

/// A command's decision, before it joins a batch.
struct Decided<A: Aggregate> {
    events: Vec<A::Event>,
    new_events: Vec<NewEvent>,
    outbox: Vec<OutboxMessage>,
}

impl<S: Store> Repository<S> {
    /// One attempt of `command` on the lane of `stream_id`. `alone`: the command may not share
    /// its batch.
    pub(super) async fn attempt<A: Aggregate>(
        &self,
        lane: &Arc<Lane<A>>,
        stream_id: &StreamId,
        command: &A::Command,
        metadata: &Metadata,
        attempts: u32,
        alone: bool,
    ) -> RepoResult<Attempt<A>, A> {
        let mut state = lane.state.lock().await;
        if lane.snapshot_deleted.swap(false, Ordering::SeqCst) {
            if let Some(tip) = state.tip.as_mut() {
                tip.snapshot_version = None;
            }
        }
        let loaded_now = state.tip.is_none();
        let tip = self.tip(&mut state, stream_id).await?;
        let version = tip.version;
        if tip.closed {
            return Err(RepositoryError::Closed {
                stream_id: stream_id.clone(),
                version,
            });
        }
        let decided = match tip.aggregate.handle(command) {
            Ok(events) if !events.is_empty() => events,
            decided => {
                let answer = decided
                    .map(|events| Executed {
                        stream_id: stream_id.clone(),
                        aggregate: tip.aggregate.clone(),
                        version,
                        events,
                        event_ids: Vec::new(),
                        positions: Vec::new(),
                        attempts,
                        snapshot_saved: false,
                    })
                    .map_err(|source| RepositoryError::Domain {
                        stream_id: stream_id.clone(),
                        version,
                        source,
                    });
                return self
                    .answer_after_check(lane, state, stream_id, loaded_now, attempts, alone, answer)
                    .await;
            }
        };
        let new_events = super::command::encode_events::<A>(stream_id, &decided, metadata)?;
        let outbox = self.translate::<A>(stream_id, &decided, &new_events, metadata)?;
        let member = self.join(
            lane,
            &mut state,
            stream_id,
            Decided {
                events: decided,
                new_events,
                outbox,
            },
            alone,
        );
        drop(state);
        self.await_member(lane, member, stream_id, attempts).await
    }

    /// One attempt to close the stream of `lane` with `tombstone`: waits until no batch of the
    /// lane is in flight, then, holding the lane (so that no command joins a batch meanwhile),
    /// appends the tombstone expecting the version of the lane's state, loaded first if the lane
    /// has none. `Ok(Err((expected, actual)))`: the stream moved on (the lane forgot its state).
    pub(super) async fn close_attempt<A: Aggregate>(
        &self,
        lane: &Arc<Lane<A>>,
        stream_id: &StreamId,
        tombstone: &NewEvent,
    ) -> RepoResult<Result<crate::contract::AppendResult, (u64, u64)>, A> {
        let mut state = loop {
            let state = lane.state.lock().await;
            match state.last.as_ref().filter(|b| !b.settled()).cloned() {
                Some(pending) => {
                    drop(state);
                    pending.wait().await;
                }
                None => break state,
            }
        };
        if lane.snapshot_deleted.swap(false, Ordering::SeqCst) {
            if let Some(tip) = state.tip.as_mut() {
                tip.snapshot_version = None;
            }
        }
        let tip = self.tip(&mut state, stream_id).await?;
        let expected = tip.version;
        if tip.closed {
            return Err(RepositoryError::Closed {
                stream_id: stream_id.clone(),
                version: expected,
            });
        }
        let request = AppendRequest::new(
            stream_id.clone(),
            ExpectedVersion::Exact(expected),
            vec![tombstone.clone()],
        );
        match self.append(request).await {
            Ok(result) => {
                if let Some(tip) = state.tip.as_mut() {
                    tip.version = result.stream_version;
                    tip.last_event_id = Some(tombstone.event_id);
                    tip.closed = true;
                }
                Ok(Ok(result))
            }
            Err(error) => {
                state.forget();
                match error {
                    StoreError::Conflict { actual, .. } => Ok(Err((expected, actual))),
                    StoreError::StreamClosed { version, .. } => Err(RepositoryError::Closed {
                        stream_id: stream_id.clone(),
                        version,
                    }),
                    source => Err(RepositoryError::Store {
                        stream_id: stream_id.clone(),
                        version: expected,
                        source,
                    }),
                }
            }
        }
    }

    /// The lane's state, loaded first if the lane has none.
    async fn tip<'s, A: Aggregate>(
        &self,
        state: &'s mut LaneState<A>,
        stream_id: &StreamId,
    ) -> RepoResult<&'s Tip<A>, A> {
        if state.tip.is_none() {
            let loaded = self
                .load_stream::<A>(stream_id.clone(), Until::Latest)
                .await?;
            state.tip = Some(Tip {
                aggregate: loaded.aggregate,
                version: loaded.version,
                snapshot_version: loaded.snapshot_version,
                last_event_id: loaded.last_event_id,
                closed: loaded.closed,
            });
        }
        Ok(state
            .tip
            .as_ref()
            .unwrap_or_else(|| unreachable!("loaded above")))
    }

    /// Answers a command that emitted no events, decided on the lane's state: at once if the
    /// state was loaded by this attempt and no batch is pending (it is the stream's as read
    /// after the command began); else once a batch without events, joined now, found the stream
    /// at the version the command was decided at.
    #[allow(clippy::too_many_arguments)]
    async fn answer_after_check<A: Aggregate>(
        &self,
        lane: &Arc<Lane<A>>,
        mut state: tokio::sync::MutexGuard<'_, LaneState<A>>,
        stream_id: &StreamId,
        loaded_now: bool,
        attempts: u32,
        alone: bool,
        answer: RepoResult<Executed<A>, A>,
    ) -> RepoResult<Attempt<A>, A> {
        let pending = state.last.as_ref().is_some_and(|b| !b.settled());
        if loaded_now && !pending {
            return answer.map(Attempt::Done);
        }
        let member = self.join(
            lane,
            &mut state,
            stream_id,
            Decided {
                events: Vec::new(),
                new_events: Vec::new(),
                outbox: Vec::new(),
            },
            alone,
        );
        drop(state);
        match self.await_member(lane, member, stream_id, attempts).await? {
            Attempt::Done(_) => answer.map(Attempt::Done),
            again @ Attempt::Again { .. } => Ok(again),
        }
    }

    /// Adds a command's events (possibly none) to the lane's open batch, or to a new one, and
    /// applies them to the lane's state.
    fn join<A: Aggregate>(
        &self,
        lane: &Arc<Lane<A>>,
        state: &mut LaneState<A>,
        stream_id: &StreamId,
        decided: Decided<A>,
        alone: bool,
    ) -> Member<A> {
        let Decided {
            events,
            new_events,
            outbox,
        } = decided;
        let event_ids: Vec<Uuid> = new_events.iter().map(|e| e.event_id).collect();
        let bytes: usize = new_events.iter().map(|e| e.payload.len()).sum();
        let writes = !new_events.is_empty();
        let joinable = state.open.as_ref().filter(|batch| {
            let parts = lock(&batch.parts);
            !alone
                && !parts.closed
                && parts.events.len() + new_events.len() <= MAX_BATCH_EVENTS
                && parts.bytes + bytes <= MAX_BATCH_BYTES
        });
        let before = state
            .tip
            .as_ref()
            .unwrap_or_else(|| unreachable!("loaded"))
            .version;
        let batch = if let Some(batch) = joinable {
            Arc::clone(batch)
        } else {
            let (batch, settle) = Batch::new(before, state.last.take(), alone);
            let batch = Arc::new(batch);
            state.last = Some(Arc::clone(&batch));
            state.open = (!alone).then(|| Arc::clone(&batch));
            tokio::spawn(self.clone().send_batch(
                Arc::clone(lane),
                Arc::clone(&batch),
                settle,
                stream_id.clone(),
            ));
            batch
        };
        // Applying the events and asking the snapshot policy run user code: if it panics, the
        // lane forgets its state (and the batches built on it) rather than keep a state that
        // misses events it has queued.
        let applied = panic::catch_unwind(AssertUnwindSafe(|| {
            let tip = state.tip.as_mut().unwrap_or_else(|| unreachable!("loaded"));
            for event in &events {
                tip.aggregate.evolve(event);
            }
            tip.version += events.len() as u64;
            if writes {
                tip.last_event_id = event_ids.last().copied();
            }
            let ctx = SnapshotContext {
                stream_id,
                version: tip.version,
                previous_version: before,
                last_snapshot_version: tip.snapshot_version,
            };
            let snapshot = (writes && self.snapshot_policy::<A>().should_snapshot(&ctx))
                .then(|| (tip.aggregate.clone(), tip.version, tip.last_event_id));
            (tip.aggregate.clone(), snapshot)
        }));
        let (aggregate, snapshot) = match applied {
            Ok(applied) => applied,
            Err(panic) => {
                state.forget();
                lock(&batch.parts).closed = true;
                panic::resume_unwind(panic);
            }
        };
        let mut parts = lock(&batch.parts);
        let offset = parts.events.len();
        parts.events.extend(new_events);
        parts.outbox.extend(outbox);
        parts.bytes += bytes;
        parts.writers += usize::from(writes);
        if snapshot.is_some() {
            parts.snapshot = snapshot;
        }
        drop(parts);
        Member {
            batch,
            offset,
            decided_at: before,
            events,
            event_ids,
            aggregate,
        }
    }

    /// Waits for a member's batch and makes its answer.
    async fn await_member<A: Aggregate>(
        &self,
        lane: &Lane<A>,
        member: Member<A>,
        stream_id: &StreamId,
        attempts: u32,
    ) -> RepoResult<Attempt<A>, A> {
        let outcome = member.batch.wait().await;
        let again = |conflict, alone| Ok(Attempt::Again { conflict, alone });
        let store_error = |source| {
            Err(RepositoryError::Store {
                stream_id: stream_id.clone(),
                version: member.decided_at,
                source,
            })
        };
        match &*outcome {
            Outcome::Committed {
                positions,
                snapshot_saved,
            } => {
                let n = member.events.len();
                Ok(Attempt::Done(Executed {
                    stream_id: stream_id.clone(),
                    aggregate: member.aggregate,
                    version: member.decided_at + n as u64,
                    positions: positions[member.offset..member.offset + n].to_vec(),
                    events: member.events,
                    event_ids: member.event_ids,
                    attempts,
                    snapshot_saved: *snapshot_saved && n > 0,
                }))
            }
            Outcome::Conflict { expected, actual } => again(Some((*expected, *actual)), false),
            Outcome::Refused { writers, .. } if *writers > 1 || member.events.is_empty() => {
                again(None, true)
            }
            Outcome::Refused { error, .. } => {
                match lock(error).take().unwrap_or_else(|| {
                    StoreError::backend("the store refused the append (its error was taken)")
                }) {
                    // Closed by another process since this lane loaded it.
                    StoreError::StreamClosed { version, .. } => Err(RepositoryError::Closed {
                        stream_id: stream_id.clone(),
                        version,
                    }),
                    error => store_error(error),
                }
            }
            Outcome::Unknown(error) => store_error(shared(error)),
            Outcome::Abandoned => again(None, false),
            Outcome::Lost => {
                lane.forget().await;
                store_error(StoreError::unavailable(
                    "the task appending this command's batch ended before the append settled \
                     (it panicked, or its runtime shut down); whether the events were written \
                     is unknown",
                ))
            }
        }
    }

    /// Sends `batch` once the batch before it committed, and settles it.
    async fn send_batch<A: Aggregate>(
        self,
        lane: Arc<Lane<A>>,
        batch: Arc<Batch<A>>,
        settle: watch::Sender<Option<Arc<Outcome>>>,
        stream_id: StreamId,
    ) {
        let previous = lock(&batch.previous).take();
        if let Some(previous) = previous {
            let before = previous.wait().await;
            if !matches!(*before, Outcome::Committed { .. }) {
                // Decided on events that were not written (or may not have been): never sent.
                // A failed predecessor made the lane forget them; a lost one could not.
                if matches!(*before, Outcome::Lost) {
                    lane.forget().await;
                }
                close(&lane, &batch).await;
                settle.send_replace(Some(Arc::new(match *before {
                    Outcome::Conflict { expected, actual } => {
                        Outcome::Conflict { expected, actual }
                    }
                    _ => Outcome::Abandoned,
                })));
                return;
            }
        }
        close(&lane, &batch).await;
        let (events, outbox, writers, snapshot) = {
            let mut parts = lock(&batch.parts);
            (
                std::mem::take(&mut parts.events),
                std::mem::take(&mut parts.outbox),
                parts.writers,
                parts.snapshot.take(),
            )
        };
        let outcome = if events.is_empty() {
            self.check_version(&lane, &stream_id, batch.expected).await
        } else {
            let request = AppendRequest::new(
                stream_id.clone(),
                ExpectedVersion::Exact(batch.expected),
                events,
            )
            .with_outbox(outbox);
            match self.append(request).await {
                Ok(result) => {
                    let snapshot_saved = match snapshot {
                        Some((aggregate, version, event_id)) => {
                            self.save_and_note_snapshot(
                                &lane, &stream_id, &aggregate, version, event_id,
                            )
                            .await
                        }
                        None => false,
                    };
                    Outcome::Committed {
                        positions: result.positions,
                        snapshot_saved,
                    }
                }
                Err(error) => {
                    lane.forget().await;
                    match error {
                        StoreError::Conflict { actual, .. } => Outcome::Conflict {
                            expected: batch.expected,
                            actual,
                        },
                        error if nothing_written(&error) => Outcome::Refused {
                            error: Mutex::new(Some(error)),
                            writers,
                        },
                        error => Outcome::Unknown(Arc::new(error)),
                    }
                }
            }
        };
        settle.send_replace(Some(Arc::new(outcome)));
        drop((lane, batch));
        self.inner.lanes.trim();
    }

    /// The outcome of a batch without events: whether the stream is at `expected`.
    async fn check_version<A: Aggregate>(
        &self,
        lane: &Lane<A>,
        stream_id: &StreamId,
        expected: u64,
    ) -> Outcome {
        match self.inner.store.stream_version(stream_id).await {
            Ok(actual) if actual == expected => Outcome::Committed {
                positions: Vec::new(),
                snapshot_saved: false,
            },
            Ok(actual) => {
                lane.forget().await;
                Outcome::Conflict { expected, actual }
            }
            Err(error) => {
                lane.forget().await;
                Outcome::Unknown(Arc::new(error))
            }
        }
    }

    /// Saves a snapshot after a batch; the lane counts the next one from it.
    async fn save_and_note_snapshot<A: Aggregate>(
        &self,
        lane: &Lane<A>,
        stream_id: &StreamId,
        aggregate: &A,
        version: u64,
        event_id: Option<Uuid>,
    ) -> bool {
        let saved = self
            .save_snapshot(stream_id, aggregate, version, event_id)
            .await;
        if saved {
            let mut state = lane.state.lock().await;
            if let Some(tip) = state.tip.as_mut() {
                if tip.snapshot_version.is_none_or(|v| v < version) {
                    tip.snapshot_version = Some(version);
                }
            }
        }
        saved
    }
}

/// Closes `batch` to new commands.
async fn close<A: Aggregate>(lane: &Lane<A>, batch: &Arc<Batch<A>>) {
    let mut state = lane.state.lock().await;
    if state
        .open
        .as_ref()
        .is_some_and(|open| Arc::ptr_eq(open, batch))
    {
        state.open = None;
    }
    lock(&batch.parts).closed = true;
}

/// Whether the store says it wrote nothing of an append that failed with `error`.
fn nothing_written(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::DuplicateEvent { .. }
            | StoreError::StreamClosed { .. }
            | StoreError::ReservedEventType { .. }
            | StoreError::PayloadTooLarge { .. }
            | StoreError::InvalidRequest { .. }
            | StoreError::InlineProjection { .. }
            | StoreError::InvalidStreamId(_)
            | StoreError::Fenced { .. }
    )
}

/// A store error several commands share: the same kind (transient or not), with the original
/// as its source.
fn shared(error: &Arc<StoreError>) -> StoreError {
    let copy = Shared(Arc::clone(error));
    if error.is_transient() {
        StoreError::unavailable(copy)
    } else {
        StoreError::backend(copy)
    }
}

#[derive(Debug)]
struct Shared(Arc<StoreError>);

impl std::fmt::Display for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (the append of a batch of commands)", self.0)
    }
}

impl std::error::Error for Shared {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}
