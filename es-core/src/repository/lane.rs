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
//! nothing (a domain error, or no events) has no append to check it, so on a cached state it
//! first reads the events after the cached version. Idle lanes beyond the repository's
//! `cache_capacity` are dropped, least recently used first.
//!
//! A batch that the store refuses for a reason other than a conflict (an inline projection, a
//! payload over the limit) may have been refused for one command's events only: each of its
//! commands then runs again alone, so that each gets the answer of its own events.

use std::any::Any;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::StreamExt;
use hashlink::LruCache;
use tokio::sync::watch;
use uuid::Uuid;

use super::snapshot::SnapshotContext;
use super::{RepoResult, Repository, RepositoryError};
use crate::aggregate::Aggregate;
use crate::contract::{
    AppendRequest, ExpectedVersion, OutboxMessage, ReadStream, Store, StoreError,
};
use crate::event::NewEvent;
use crate::stream_id::StreamId;

/// Most events one batch takes; a command whose events do not fit opens the next batch.
const MAX_BATCH_EVENTS: usize = 512;
/// Most payload bytes one batch takes (a command alone may exceed it).
const MAX_BATCH_BYTES: usize = 4 << 20;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The lanes of a repository, least recently used first.
pub(super) struct Lanes {
    capacity: usize,
    map: Mutex<LruCache<StreamId, Arc<dyn Any + Send + Sync>>>,
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
        let mut map = lock(&self.map);
        if let Some(lane) = map.get(stream_id) {
            if let Ok(lane) = Arc::clone(lane).downcast::<Lane<A>>() {
                return lane;
            }
        }
        let lane = Arc::new(Lane::<A>::new());
        map.insert(stream_id.clone(), Arc::clone(&lane) as _);
        lane
    }

    /// Drops idle lanes, least recently used first, until at most `capacity` remain (lanes in
    /// use stay).
    pub(super) fn trim(&self) {
        let mut map = lock(&self.map);
        let mut busy = Vec::new();
        while map.len() > self.capacity {
            let Some((stream_id, lane)) = map.remove_lru() else {
                break;
            };
            if Arc::strong_count(&lane) > 1 {
                busy.push((stream_id, lane));
            }
        }
        for (stream_id, lane) in busy {
            map.insert(stream_id, lane);
        }
    }

    /// Drops the lane of `stream_id` and the state it keeps: the next command loads it.
    pub(super) fn forget(&self, stream_id: &StreamId) {
        lock(&self.map).remove(stream_id);
    }

    /// Lanes held now.
    pub(super) fn len(&self) -> usize {
        lock(&self.map).len()
    }
}

/// One aggregate's commands in this process.
pub(super) struct Lane<A: Aggregate> {
    state: tokio::sync::Mutex<LaneState<A>>,
}

struct LaneState<A: Aggregate> {
    /// The aggregate after every event the lane knows of: the committed ones, then those of the
    /// batches not settled yet. `None`: load it.
    tip: Option<Tip<A>>,
    /// The batch commands join, until it is sealed.
    open: Option<Arc<Batch<A>>>,
    /// The newest batch, which the next one waits for.
    last: Option<Arc<Batch<A>>>,
}

struct Tip<A> {
    aggregate: A,
    version: u64,
    snapshot_version: Option<u64>,
    last_event_id: Option<Uuid>,
}

impl<A: Aggregate> Lane<A> {
    fn new() -> Self {
        Self {
            state: tokio::sync::Mutex::new(LaneState {
                tip: None,
                open: None,
                last: None,
            }),
        }
    }

    /// Forgets the state and every batch not settled: after a failed batch, commands load again.
    async fn reset(&self) {
        let mut state = self.state.lock().await;
        state.tip = None;
        state.open = None;
        state.last = None;
    }
}

/// Events of several commands, appended together.
struct Batch<A: Aggregate> {
    /// The stream version the batch expects.
    expected: u64,
    /// The batch before it on the lane; this one is sent once that one committed.
    previous: Option<Arc<Batch<A>>>,
    parts: Mutex<Parts<A>>,
    outcome: watch::Sender<Option<Arc<Outcome>>>,
}

struct Parts<A> {
    events: Vec<NewEvent>,
    outbox: Vec<OutboxMessage>,
    bytes: usize,
    members: usize,
    /// No more commands join: it is being sent, or it belongs to one command alone.
    closed: bool,
    /// The state to snapshot once committed, at its version, with the event id there.
    snapshot: Option<(A, u64, Option<Uuid>)>,
}

/// How a batch ended.
enum Outcome {
    /// Appended: the global position of each event.
    Committed {
        positions: Vec<u64>,
        snapshot_saved: bool,
    },
    /// Another writer moved the stream; `actual` is its version then.
    Conflict { actual: u64 },
    /// The store refused the batch for another reason, and wrote nothing: with one command, its
    /// error; with several, each runs again alone.
    Refused {
        error: Mutex<Option<StoreError>>,
        members: usize,
    },
    /// The append failed and may or may not have been written: every command gets the error.
    Unknown(Arc<StoreError>),
    /// Never sent: the batch before it failed, or its task ended early.
    Abandoned,
}

impl<A: Aggregate> Batch<A> {
    fn new(expected: u64, previous: Option<Arc<Batch<A>>>, alone: bool) -> Self {
        Self {
            expected,
            previous,
            parts: Mutex::new(Parts {
                events: Vec::new(),
                outbox: Vec::new(),
                bytes: 0,
                members: 0,
                closed: alone,
                snapshot: None,
            }),
            outcome: watch::channel(None).0,
        }
    }

    fn settle(&self, outcome: Outcome) {
        self.outcome.send_replace(Some(Arc::new(outcome)));
    }

    fn settled(&self) -> Option<Arc<Outcome>> {
        self.outcome.borrow().clone()
    }

    /// Waits until the batch is settled.
    async fn wait(&self) -> Arc<Outcome> {
        let mut rx = self.outcome.subscribe();
        let outcome = match rx.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone(),
            Err(_) => None,
        };
        outcome.unwrap_or_else(|| Arc::new(Outcome::Abandoned))
    }
}

/// What one command's attempt came to.
pub(super) enum Attempt<A: Aggregate> {
    /// Done: the events were appended (or there were none).
    Done(super::Executed<A>),
    /// Run again: after a conflict (`Some(actual)`) or a failure that wrote nothing.
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
    events: Vec<A::Event>,
    event_ids: Vec<Uuid>,
    /// The aggregate after its events.
    aggregate: A,
}

impl<S: Store> Repository<S> {
    /// One attempt of `command` on the lane of `stream_id`. `alone`: the command may not share
    /// its batch.
    pub(super) async fn attempt<A: Aggregate>(
        &self,
        lane: &Arc<Lane<A>>,
        stream_id: &StreamId,
        command: &A::Command,
        metadata: &crate::event::Metadata,
        attempts: u32,
        alone: bool,
    ) -> RepoResult<Attempt<A>, A> {
        let mut state = lane.state.lock().await;
        let mut cached = true;
        if state.tip.is_none() {
            let loaded = self
                .load_stream::<A>(stream_id.clone(), super::Until::Latest)
                .await?;
            state.tip = Some(Tip {
                aggregate: loaded.aggregate,
                version: loaded.version,
                snapshot_version: loaded.snapshot_version,
                last_event_id: loaded.last_event_id,
            });
            cached = false;
        }
        loop {
            let tip = state
                .tip
                .as_ref()
                .unwrap_or_else(|| unreachable!("loaded above"));
            let version = tip.version;
            let answer = match tip.aggregate.handle(command) {
                Ok(events) if !events.is_empty() => {
                    let member = self.join(lane, &mut state, stream_id, events, metadata, alone)?;
                    drop(state);
                    return self.await_member(member, stream_id, attempts).await;
                }
                Ok(events) => Ok(Attempt::Done(super::Executed {
                    stream_id: stream_id.clone(),
                    aggregate: tip.aggregate.clone(),
                    version,
                    events,
                    event_ids: Vec::new(),
                    positions: Vec::new(),
                    attempts,
                    snapshot_saved: false,
                })),
                Err(source) => Err(RepositoryError::Domain {
                    stream_id: stream_id.clone(),
                    version,
                    source,
                }),
            };
            // No append checks an answer without events: it stands once the state it was
            // decided on is known to be the stream's. That state includes the batches not
            // settled yet: they must commit. A cached state may be behind another process's
            // writes: read them first.
            let pending = state
                .last
                .as_ref()
                .filter(|b| b.settled().is_none())
                .cloned();
            if let Some(batch) = pending {
                drop(state);
                return match *batch.wait().await {
                    Outcome::Committed { .. } => answer,
                    _ => Ok(Attempt::Again {
                        conflict: None,
                        alone,
                    }),
                };
            }
            if cached && self.catch_up(&mut state, stream_id).await? {
                cached = false;
                continue;
            }
            return answer;
        }
    }

    /// Reads the events after the cached state and applies them; whether there were any.
    async fn catch_up<A: Aggregate>(
        &self,
        state: &mut LaneState<A>,
        stream_id: &StreamId,
    ) -> RepoResult<bool, A> {
        let Some(mut tip) = state.tip.take() else {
            return Ok(false);
        };
        let upcasters = self.upcasters::<A::Event>();
        let mut events = self
            .inner
            .store
            .read_stream(stream_id, ReadStream::forward().from(tip.version + 1));
        let mut moved = false;
        while let Some(event) = events.next().await {
            let event = event.map_err(|source| RepositoryError::Store {
                stream_id: stream_id.clone(),
                version: tip.version,
                source,
            })?;
            if event.stream_version != tip.version + 1 {
                return Err(RepositoryError::Store {
                    stream_id: stream_id.clone(),
                    version: tip.version,
                    source: StoreError::corrupt_at(
                        stream_id,
                        event.stream_version,
                        format!("expected version {} next", tip.version + 1),
                    ),
                });
            }
            upcasters.decode_into::<A::Event>(&event, |e| tip.aggregate.evolve(&e))?;
            tip.version = event.stream_version;
            tip.last_event_id = Some(event.event_id);
            moved = true;
        }
        state.tip = Some(tip);
        Ok(moved)
    }

    /// Adds a command's events to the lane's open batch (or a new one) and applies them to the
    /// lane's state.
    fn join<A: Aggregate>(
        &self,
        lane: &Arc<Lane<A>>,
        state: &mut LaneState<A>,
        stream_id: &StreamId,
        events: Vec<A::Event>,
        metadata: &crate::event::Metadata,
        alone: bool,
    ) -> RepoResult<Member<A>, A> {
        let new_events = super::command::encode_events::<A>(stream_id, &events, metadata)?;
        let outbox = self.translate::<A>(stream_id, &events, &new_events, metadata)?;
        let event_ids: Vec<Uuid> = new_events.iter().map(|e| e.event_id).collect();
        let bytes: usize = new_events.iter().map(|e| e.payload.len()).sum();

        // Apply to the lane's state; if that panics, the lane loads again.
        let mut tip = state.tip.take().unwrap_or_else(|| unreachable!("loaded"));
        let before = tip.version;
        for event in &events {
            tip.aggregate.evolve(event);
        }
        tip.version += events.len() as u64;
        tip.last_event_id = event_ids.last().copied();

        let joinable = state.open.as_ref().filter(|batch| {
            let parts = lock(&batch.parts);
            !alone
                && !parts.closed
                && parts.events.len() + new_events.len() <= MAX_BATCH_EVENTS
                && parts.bytes + bytes <= MAX_BATCH_BYTES
        });
        let batch = if let Some(batch) = joinable {
            Arc::clone(batch)
        } else {
            let batch = Arc::new(Batch::new(before, state.last.clone(), alone));
            state.last = Some(Arc::clone(&batch));
            state.open = (!alone).then(|| Arc::clone(&batch));
            tokio::spawn(self.clone().send_batch(
                Arc::clone(lane),
                Arc::clone(&batch),
                stream_id.clone(),
            ));
            batch
        };
        let offset = {
            let mut parts = lock(&batch.parts);
            let offset = parts.events.len();
            parts.events.extend(new_events);
            parts.outbox.extend(outbox);
            parts.bytes += bytes;
            parts.members += 1;
            let ctx = SnapshotContext {
                stream_id,
                version: tip.version,
                previous_version: batch.expected,
                last_snapshot_version: tip.snapshot_version,
            };
            if self.snapshot_policy::<A>().should_snapshot(&ctx) {
                parts.snapshot = Some((tip.aggregate.clone(), tip.version, tip.last_event_id));
            }
            offset
        };
        let aggregate = tip.aggregate.clone();
        state.tip = Some(tip);
        Ok(Member {
            batch,
            offset,
            events,
            event_ids,
            aggregate,
        })
    }

    /// Waits for a member's batch and makes its answer.
    async fn await_member<A: Aggregate>(
        &self,
        member: Member<A>,
        stream_id: &StreamId,
        attempts: u32,
    ) -> RepoResult<Attempt<A>, A> {
        let outcome = member.batch.wait().await;
        let first = member.batch.expected + member.offset as u64;
        let again = |conflict, alone| Ok(Attempt::Again { conflict, alone });
        match &*outcome {
            Outcome::Committed {
                positions,
                snapshot_saved,
            } => {
                let n = member.events.len();
                Ok(Attempt::Done(super::Executed {
                    stream_id: stream_id.clone(),
                    aggregate: member.aggregate,
                    version: first + n as u64,
                    positions: positions[member.offset..member.offset + n].to_vec(),
                    events: member.events,
                    event_ids: member.event_ids,
                    attempts,
                    snapshot_saved: *snapshot_saved,
                }))
            }
            Outcome::Conflict { actual } => again(Some((member.batch.expected, *actual)), false),
            Outcome::Refused { members, .. } if *members > 1 => again(None, true),
            Outcome::Refused { error, .. } => {
                let source = lock(error).take().unwrap_or_else(|| {
                    StoreError::backend("the store refused the append (its error was taken)")
                });
                Err(RepositoryError::Store {
                    stream_id: stream_id.clone(),
                    version: member.batch.expected,
                    source,
                })
            }
            Outcome::Unknown(error) => Err(RepositoryError::Store {
                stream_id: stream_id.clone(),
                version: member.batch.expected,
                source: shared(error),
            }),
            Outcome::Abandoned => again(None, false),
        }
    }

    /// Sends `batch` once the batch before it committed, and settles it.
    async fn send_batch<A: Aggregate>(
        self,
        lane: Arc<Lane<A>>,
        batch: Arc<Batch<A>>,
        stream_id: StreamId,
    ) {
        if let Some(previous) = &batch.previous {
            match &*previous.wait().await {
                Outcome::Committed { .. } => {}
                Outcome::Conflict { actual } => {
                    close(&lane, &batch).await;
                    batch.settle(Outcome::Conflict { actual: *actual });
                    return;
                }
                _ => {
                    close(&lane, &batch).await;
                    batch.settle(Outcome::Abandoned);
                    return;
                }
            }
        }
        let (request, members, snapshot) = {
            close(&lane, &batch).await;
            let mut parts = lock(&batch.parts);
            let request = AppendRequest::new(
                stream_id.clone(),
                ExpectedVersion::Exact(batch.expected),
                std::mem::take(&mut parts.events),
            )
            .with_outbox(std::mem::take(&mut parts.outbox));
            (request, parts.members, parts.snapshot.take())
        };
        let outcome = match self.append(request).await {
            Ok(result) => {
                let mut snapshot_saved = false;
                if let Some((aggregate, version, event_id)) = snapshot {
                    snapshot_saved = self
                        .save_snapshot(&stream_id, &aggregate, version, event_id)
                        .await;
                    if snapshot_saved {
                        let mut state = lane.state.lock().await;
                        if let Some(tip) = state.tip.as_mut() {
                            tip.snapshot_version = Some(version);
                        }
                    }
                }
                Outcome::Committed {
                    positions: result.positions,
                    snapshot_saved,
                }
            }
            Err(error) => {
                lane.reset().await;
                match error {
                    StoreError::Conflict { actual, .. } => Outcome::Conflict { actual },
                    error if nothing_written(&error) => Outcome::Refused {
                        error: Mutex::new(Some(error)),
                        members,
                    },
                    error => Outcome::Unknown(Arc::new(error)),
                }
            }
        };
        batch.settle(outcome);
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
