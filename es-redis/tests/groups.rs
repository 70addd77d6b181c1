//! Consumer groups on Redis: projections and relays run by several workers that divide a
//! store's feed partitions by leases kept in the store (`LeaseStore`), each worker on a store
//! handle of its own (its own connections, as separate processes would have), while writers
//! append across the partitions and workers die and join. On the standalone server (`REDIS_URL`)
//! and, with feature `cluster`, on the shared Redis Cluster (`REDIS_CLUSTER_URLS`).
//!
//! - A projection group (at least once, with the store's checkpoints, one per partition):
//!   every event of every partition is handled at least once, each partition's checkpoint
//!   covers its head, and per stream the last handling of each version comes in version order,
//!   across a worker killed and one added.
//! - A stale worker: a worker whose whole runtime stalls (a handler blocking its only thread)
//!   past its lease loses its partitions to another; when it comes back, its checkpoint save is
//!   refused (`StoreError::Fenced`) and the checkpoint never moves back.
//! - A relay group: every outbox record is published, per key in outbox order, across a worker
//!   killed, and the outboxes end empty.
// The stalled-worker helpers serve the cluster tests only.
#![cfg_attr(not(feature = "cluster"), allow(dead_code))]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use es_core::group::GroupConfig;
use es_core::projection::{partition_checkpoint, HandlerError, ProjectionGroup};
use es_core::{
    AppendRequest, AtLeastOnce, Backoff, Checkpoint, CheckpointStore, EventStore, ExpectedVersion,
    Metadata, NewEvent, OutboxMessage, OutboxStore, Partitioning, Projection, ProjectionRunner,
    ReadAll, RecordedEvent, Relay, RelayConfig, RunnerConfig, StoreError, StoreFuture, StreamId,
};
use es_redis::RedisStore;
use es_testkit::streaming::RecordingPublisher;
use futures::TryStreamExt;
use uuid::Uuid;

/// The projection's name; its group is `projection:orders-view`.
const PROJECTION: &str = "orders-view";

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?}: {what}"))
}

/// Polls `done` every 20 ms until it holds.
async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    within(what, limit, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Whether `owned` (each worker's partitions) divides `0..partitions` among them, each
/// partition to one worker, every worker with at least one.
fn divided(owned: &[Vec<u32>], partitions: u32) -> bool {
    let mut all: Vec<u32> = owned.iter().flatten().copied().collect();
    all.sort_unstable();
    all == (0..partitions).collect::<Vec<_>>() && owned.iter().all(|o| !o.is_empty())
}

/// `n` streams of each partition of `partitioning`.
fn streams_per_partition(partitioning: Partitioning, n: usize) -> Vec<StreamId> {
    let mut per = vec![Vec::new(); partitioning.count() as usize];
    let mut i = 0;
    while per.iter().any(|streams: &Vec<StreamId>| streams.len() < n) {
        let stream = StreamId::new("order", &format!("g{i}")).unwrap();
        let streams = &mut per[partitioning.partition_of(&stream) as usize];
        if streams.len() < n {
            streams.push(stream);
        }
        i += 1;
    }
    per.into_iter().flatten().collect()
}

// ---------------------------------------------------------------------------------------------
// Writers

/// What the writers stored: per stream, its final version and its outbox messages in order.
type Written = BTreeMap<StreamId, (u64, Vec<Uuid>)>;

/// Writer tasks appending 1 to 3 events at a time (with one outbox message per event if
/// `outbox`) to their streams, round robin, with `Exact` versions, until stopped.
struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Written>>,
}

impl Writers {
    fn spawn(store: &RedisStore, streams: &[StreamId], writers: usize, outbox: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..writers)
            .map(|w| {
                let mine: Vec<StreamId> =
                    streams.iter().skip(w).step_by(writers).cloned().collect();
                let (store, stop) = (store.clone(), Arc::clone(&stop));
                tokio::spawn(async move {
                    let mut written: Written =
                        mine.iter().map(|s| (s.clone(), (0, Vec::new()))).collect();
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        for stream in &mine {
                            let (version, messages) = written.get_mut(stream).unwrap();
                            let events = 1 + (n % 3);
                            n += 1;
                            let request = append(stream, *version, events, outbox);
                            messages.extend(request.outbox.iter().map(|m| m.message_id));
                            *version = append_until_stored(&store, request).await;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    written
                })
            })
            .collect();
        Self { stop, tasks }
    }

    async fn stop(self) -> Written {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Written::new();
        for task in self.tasks {
            all.extend(
                within("the writers stop", Duration::from_secs(60), task)
                    .await
                    .unwrap(),
            );
        }
        all
    }
}

/// An append of `events` events to `stream` at `version`, with a message per event keyed by
/// the stream if `outbox`.
fn append(stream: &StreamId, version: u64, events: u64, outbox: bool) -> AppendRequest {
    let events: Vec<NewEvent> = (1..=events)
        .map(|i| NewEvent::new("Placed", 1, format!(r#"{{"v":{}}}"#, version + i)).unwrap())
        .collect();
    let messages = if outbox {
        events
            .iter()
            .map(|e| OutboxMessage {
                message_id: Uuid::now_v7(),
                source_event_id: e.event_id,
                topic: "orders".into(),
                key: stream.to_string(),
                message_type: "OrderPlaced".into(),
                schema_version: 1,
                payload: Bytes::from_static(br#"{"n":1}"#),
                metadata: Metadata::new(),
            })
            .collect()
    } else {
        Vec::new()
    };
    AppendRequest::new(stream.clone(), ExpectedVersion::Exact(version), events)
        .with_outbox(messages)
}

/// Appends `request`, sending it again (the same event ids) after a failure; returns the
/// stream's version.
async fn append_until_stored(store: &RedisStore, request: AppendRequest) -> u64 {
    for attempt in 0.. {
        match store.append(request.clone()).await {
            Ok(result) => return result.stream_version,
            Err(err) if attempt < 50 => {
                tracing::warn!(error = %err, "append failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("an append keeps failing: {err}"),
        }
    }
    unreachable!()
}

// ---------------------------------------------------------------------------------------------
// The projection

/// One handling of an event: its partition, position, stream and version.
type Handled = (u32, u64, StreamId, u64);

/// Holds the handler of the next event it sees, with the whole thread it runs on, until
/// released: a worker stalled as by a long pause.
#[derive(Default)]
struct Stall {
    armed: AtomicBool,
    released: AtomicBool,
    /// The event the handler stalled on.
    stalled_on: Mutex<Option<(u32, u64)>>,
}

impl Stall {
    fn hold(&self, event: &RecordedEvent) {
        if self.armed.swap(false, Ordering::SeqCst) {
            *lock(&self.stalled_on) = Some((event.partition, event.global_position));
            while !self.released.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn stalled_on(&self) -> Option<(u32, u64)> {
        *lock(&self.stalled_on)
    }
}

/// The read model: records every handling, in the order they happen, across all workers.
#[derive(Clone, Default)]
struct ReadModel {
    handled: Arc<Mutex<Vec<Handled>>>,
    stall: Option<Arc<Stall>>,
}

impl ReadModel {
    fn handled(&self) -> Vec<Handled> {
        lock(&self.handled).clone()
    }

    fn stalling(&self, stall: &Arc<Stall>) -> Self {
        Self {
            handled: Arc::clone(&self.handled),
            stall: Some(Arc::clone(stall)),
        }
    }
}

impl Projection for ReadModel {
    fn name(&self) -> &str {
        PROJECTION
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        if let Some(stall) = &self.stall {
            stall.hold(event);
        }
        lock(&self.handled).push((
            event.partition,
            event.global_position,
            event.stream_id.clone(),
            event.stream_version,
        ));
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        lock(&self.handled).clear();
        Ok(())
    }
}

/// What a checkpoint save came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Saved {
    /// Done (`true`: raised; `false`: as high already).
    Done(bool),
    /// Refused: the checkpoint's generation moved on.
    Fenced,
    /// Another failure.
    Failed(String),
}

/// One checkpoint save: the checkpoint's name, what was saved, the outcome.
type Save = (String, Checkpoint, Saved);

/// A worker's checkpoint store: its store handle's, recording the outcome of every save (in a
/// list that several workers' may share).
#[derive(Clone)]
struct Watched {
    store: RedisStore,
    saves: Arc<Mutex<Vec<Save>>>,
}

impl Watched {
    fn new(store: RedisStore) -> Self {
        Self {
            store,
            saves: Arc::default(),
        }
    }

    /// The checkpoints of `store`, recorded in the same list as this one's.
    fn on(&self, store: &RedisStore) -> Self {
        Self {
            store: store.clone(),
            saves: Arc::clone(&self.saves),
        }
    }

    fn saves(&self) -> Vec<Save> {
        lock(&self.saves).clone()
    }
}

impl CheckpointStore for Watched {
    fn load_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        self.store.load_checkpoint(name)
    }

    fn save_checkpoint(&self, name: &str, checkpoint: Checkpoint) -> impl StoreFuture<bool> {
        let saving = self.store.save_checkpoint(name, checkpoint);
        let (log, name) = (Arc::clone(&self.saves), name.to_owned());
        async move {
            let result = saving.await;
            let outcome = match &result {
                Ok(raised) => Saved::Done(*raised),
                Err(StoreError::Fenced { .. }) => Saved::Fenced,
                Err(err) => Saved::Failed(err.to_string()),
            };
            lock(&log).push((name, checkpoint, outcome));
            result
        }
    }

    fn reset_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        self.store.reset_checkpoint(name)
    }

    fn fence_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        self.store.fence_checkpoint(name)
    }
}

/// Starts a worker of the projection's group on `store` (its own handle) with `model`.
fn projection_worker(
    store: &RedisStore,
    member: &str,
    ttl: Duration,
    model: &ReadModel,
    checkpoints: &Watched,
) -> ProjectionGroup {
    let runner = ProjectionRunner::with_config(
        store.clone(),
        RunnerConfig {
            batch_size: 20,
            backoff: Backoff::new(Duration::from_millis(20), Duration::from_millis(200)),
            ..RunnerConfig::default()
        },
    );
    let (model, checkpoints) = (model.clone(), checkpoints.clone());
    runner.spawn_group(GroupConfig::new(member).lease_ttl(ttl), move || {
        AtLeastOnce::new(model.clone(), checkpoints.clone())
    })
}

async fn feed(store: &RedisStore, partition: u32) -> Vec<RecordedEvent> {
    store
        .read_all(ReadAll::after(0).partition(partition))
        .try_collect()
        .await
        .unwrap()
}

/// Waits until every partition's checkpoint covers the partition's head.
async fn wait_for_checkpoints(store: &RedisStore, limit: Duration) {
    let partitions = store.partitioning().count();
    within(
        "every partition's checkpoint covers its head",
        limit,
        async {
            loop {
                let mut behind = Vec::new();
                for p in 0..partitions {
                    let head = store.partition_head(p).await.unwrap();
                    let checkpoint = store
                        .load_checkpoint(&partition_checkpoint(PROJECTION, p))
                        .await
                        .unwrap();
                    if checkpoint.position < head {
                        behind.push((p, checkpoint.position, head));
                    }
                }
                if behind.is_empty() {
                    return;
                }
                tracing::debug!(?behind, "checkpoints behind");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
}

/// Every event of every partition handled at least once, as stored; each handling names an
/// event of the feed; per stream, the last handling of each version in version order, and every
/// version the writers stored handled.
async fn check_handled(store: &RedisStore, handled: &[Handled], written: &Written, order: bool) {
    let mut feeds: HashMap<(u32, u64), (StreamId, u64)> = HashMap::new();
    for p in 0..store.partitioning().count() {
        for event in feed(store, p).await {
            assert_eq!(event.partition, p);
            feeds.insert(
                (p, event.global_position),
                (event.stream_id.clone(), event.stream_version),
            );
        }
    }
    let seen: HashSet<(u32, u64)> = handled.iter().map(|(p, pos, _, _)| (*p, *pos)).collect();
    let missing: Vec<_> = feeds.keys().filter(|k| !seen.contains(k)).collect();
    assert!(missing.is_empty(), "never handled: {missing:?}");
    for (p, position, stream, version) in handled {
        assert_eq!(
            feeds.get(&(*p, *position)),
            Some(&(stream.clone(), *version)),
            "a handling that is not the feed's event at partition {p} position {position}"
        );
    }
    let stored: usize = written.values().map(|(v, _)| *v as usize).sum();
    assert_eq!(
        feeds.len(),
        stored,
        "the feeds hold what the writers stored"
    );
    if !order {
        return;
    }
    // Per stream, where each version was handled last.
    let mut last: HashMap<&StreamId, BTreeMap<u64, usize>> = HashMap::new();
    for (i, (_, _, stream, version)) in handled.iter().enumerate() {
        last.entry(stream).or_default().insert(*version, i);
    }
    for (stream, (version, _)) in written {
        let lasts = last.get(stream).cloned().unwrap_or_default();
        assert_eq!(
            lasts.keys().copied().collect::<Vec<_>>(),
            (1..=*version).collect::<Vec<_>>(),
            "{stream}: versions handled"
        );
        let at: Vec<usize> = lasts.values().copied().collect();
        assert!(
            at.windows(2).all(|w| w[0] < w[1]),
            "{stream}: the last handlings of its versions are out of order: {lasts:?}"
        );
    }
}

/// A group of two workers, A and B, on handles of their own, while writers append to every
/// partition; A is killed (its partitions go to B once its leases run out), then C joins and
/// takes its share; at the end the projection has handled everything, in per-stream order.
async fn projection_group_survives_a_kill_and_a_join(
    open: impl Fn() -> std::pin::Pin<Box<dyn Future<Output = RedisStore> + Send>>,
) {
    let writer = open().await;
    let partitions = writer.partitioning().count();
    let ttl = Duration::from_secs(2);
    let model = ReadModel::default();
    let (store_a, store_b, store_c) = (open().await, open().await, open().await);
    // Each worker keeps its checkpoints through its own handle; the saves go to one list.
    let checkpoints = Watched::new(store_a.clone());
    let a = projection_worker(&store_a, "a", ttl, &model, &checkpoints);
    let b = projection_worker(&store_b, "b", ttl, &model, &checkpoints.on(&store_b));
    wait_until(
        "A and B divide the partitions",
        Duration::from_secs(20),
        || divided(&[a.owned(), b.owned()], partitions),
    )
    .await;

    let streams = streams_per_partition(writer.partitioning(), 3);
    let writers = Writers::spawn(&writer, &streams, 4, false);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let a_had = a.owned();
    a.kill();
    wait_until(
        "B takes the partitions of the killed A",
        Duration::from_secs(30),
        || b.owned().len() == partitions as usize,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = projection_worker(&store_c, "c", ttl, &model, &checkpoints.on(&store_c));
    wait_until("C takes its share from B", Duration::from_secs(30), || {
        divided(&[b.owned(), c.owned()], partitions)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let written = writers.stop().await;
    wait_for_checkpoints(&writer, Duration::from_secs(60)).await;

    let handled = model.handled();
    check_handled(&writer, &handled, &written, true).await;
    // The workers handled in turn: some partition A had was checkpointed by B or C after A
    // died, in a generation above A's.
    let saves = checkpoints.saves();
    assert!(!a_had.is_empty());
    for p in a_had {
        let name = partition_checkpoint(PROJECTION, p);
        let generations: BTreeSet<u64> = saves
            .iter()
            .filter(|(n, _, _)| *n == name)
            .map(|(_, c, _)| c.generation)
            .collect();
        assert!(
            generations.len() >= 2,
            "partition {p}: saves in generations {generations:?}"
        );
    }
    within("B shuts down", Duration::from_secs(10), b.shutdown()).await;
    within("C shuts down", Duration::from_secs(10), c.shutdown()).await;
}

/// Appends two events to each of `streams`, one stream after the other, and records the
/// versions in `written`.
async fn write_round(writer: &RedisStore, written: &mut Written, streams: &[StreamId]) {
    for stream in streams {
        let (version, _) = written.get_mut(stream).unwrap();
        *version = append_until_stored(writer, append(stream, *version, 2, false)).await;
    }
}

/// Reads every partition's checkpoint every 10 ms, from start to finish.
struct CheckpointWatch {
    watching: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<BTreeMap<u32, Vec<Checkpoint>>>,
}

impl CheckpointWatch {
    fn start(store: &RedisStore) -> Self {
        let watching = Arc::new(AtomicBool::new(true));
        let (store, still) = (store.clone(), Arc::clone(&watching));
        let task = tokio::spawn(async move {
            let mut seen: BTreeMap<u32, Vec<Checkpoint>> = BTreeMap::new();
            while still.load(Ordering::SeqCst) {
                for p in 0..store.partitioning().count() {
                    let c = store
                        .load_checkpoint(&partition_checkpoint(PROJECTION, p))
                        .await
                        .unwrap();
                    seen.entry(p).or_default().push(c);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen
        });
        Self { watching, task }
    }

    /// Stops, and checks that no checkpoint ever moved back, in position or generation.
    async fn assert_never_moved_back(self) {
        self.watching.store(false, Ordering::SeqCst);
        let seen = self.task.await.unwrap();
        for (p, checkpoints) in &seen {
            assert!(
                checkpoints
                    .windows(2)
                    .all(|w| w[0].position <= w[1].position && w[0].generation <= w[1].generation),
                "partition {p}: a checkpoint moved back: {checkpoints:?}"
            );
        }
    }
}

/// A worker of the projection group on a runtime of its own, on one thread (as a process of its
/// own): a handler that blocks stalls everything the worker does, its lease renewals included.
struct Isolated {
    group: Option<ProjectionGroup>,
    /// Released when the worker is dropped, so that its thread can end.
    stall: Option<Arc<Stall>>,
    done: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Isolated {
    async fn start(
        open: impl Future<Output = RedisStore> + Send + 'static,
        member: &'static str,
        ttl: Duration,
        model: ReadModel,
        checkpoints: impl FnOnce(RedisStore) -> Watched + Send + 'static,
    ) -> (Self, tokio::sync::oneshot::Receiver<Watched>) {
        let (group_tx, group_rx) = tokio::sync::oneshot::channel();
        let (watched_tx, watched_rx) = tokio::sync::oneshot::channel();
        let (done, done_rx) = tokio::sync::oneshot::channel::<()>();
        let stall = model.stall.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let store = open.await;
                let watched = checkpoints(store.clone());
                let group = projection_worker(&store, member, ttl, &model, &watched);
                let _ = watched_tx.send(watched);
                let _ = group_tx.send(group);
                let _ = done_rx.await;
            });
        });
        let group = group_rx.await.expect("the isolated worker starts");
        (
            Self {
                group: Some(group),
                stall,
                done: Some(done),
                thread: Some(thread),
            },
            watched_rx,
        )
    }

    fn owned(&self) -> Vec<u32> {
        self.group
            .as_ref()
            .map(ProjectionGroup::owned)
            .unwrap_or_default()
    }

    async fn shutdown(mut self) {
        if let Some(group) = self.group.take() {
            within(
                "the isolated worker shuts down",
                Duration::from_secs(20),
                group.shutdown(),
            )
            .await;
        }
        self.end();
    }

    fn end(&mut self) {
        if let Some(stall) = &self.stall {
            stall.released.store(true, Ordering::SeqCst);
        }
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        if let Some(group) = self.group.take() {
            group.kill();
        }
        self.end();
    }
}

/// Releases the stalled worker and returns the first save of checkpoint `name` it makes then.
async fn release_and_await_save(stall: &Stall, watched: &Watched, name: &str) -> Save {
    let before = watched.saves().len();
    stall.released.store(true, Ordering::SeqCst);
    let first = || {
        watched.saves()[before..]
            .iter()
            .find(|(n, _, _)| n == name)
            .cloned()
    };
    wait_until("the released worker saves", Duration::from_secs(10), || {
        first().is_some()
    })
    .await;
    first().unwrap()
}

/// Worker A stalls (its handler blocks its only thread) past its lease; B takes A's partitions,
/// fences their checkpoints and handles on; released, A's save of the batch it stalled in is
/// refused with `StoreError::Fenced`, and no checkpoint ever moves back.
async fn a_stalled_worker_never_records_after_its_lease(
    open: impl Fn() -> std::pin::Pin<Box<dyn Future<Output = RedisStore> + Send>>,
) {
    let writer = open().await;
    let partitions = writer.partitioning().count();
    let ttl = Duration::from_secs(1);
    let model = ReadModel::default();
    let stall = Arc::new(Stall::default());
    let (a, a_watched) =
        Isolated::start(open(), "a", ttl, model.stalling(&stall), Watched::new).await;
    let a_watched = a_watched.await.unwrap();
    wait_until("A takes every partition", Duration::from_secs(20), || {
        a.owned().len() == partitions as usize
    })
    .await;
    let streams = streams_per_partition(writer.partitioning(), 2);
    let mut written: Written = streams
        .iter()
        .map(|s| (s.clone(), (0, Vec::new())))
        .collect();
    write_round(&writer, &mut written, &streams).await;
    wait_for_checkpoints(&writer, Duration::from_secs(30)).await;
    let watch = CheckpointWatch::start(&writer);

    let b_store = open().await;
    let b_watched = Watched::new(b_store.clone());
    let b = projection_worker(&b_store, "b", ttl, &model, &b_watched);
    wait_until(
        "A and B divide the partitions",
        Duration::from_secs(20),
        || divided(&[a.owned(), b.owned()], partitions),
    )
    .await;

    // A stalls on the next event it handles: one appended to a partition of A's.
    let a_partition = a.owned()[0];
    let a_stream = streams
        .iter()
        .find(|s| writer.partitioning().partition_of(s) == a_partition)
        .unwrap()
        .clone();
    let generation_before = writer
        .load_checkpoint(&partition_checkpoint(PROJECTION, a_partition))
        .await
        .unwrap()
        .generation;
    stall.armed.store(true, Ordering::SeqCst);
    write_round(&writer, &mut written, std::slice::from_ref(&a_stream)).await;
    wait_until("A stalls in its handler", Duration::from_secs(10), || {
        stall.stalled_on().is_some()
    })
    .await;
    let (stalled_partition, stalled_position) = stall.stalled_on().unwrap();
    assert_eq!(stalled_partition, a_partition);

    // B takes every partition once A's leases run out, and handles on past the stalled event.
    wait_until(
        "B takes the partitions of the stalled A",
        Duration::from_secs(20),
        || b.owned().len() == partitions as usize,
    )
    .await;
    write_round(&writer, &mut written, &streams).await;
    wait_for_checkpoints(&writer, Duration::from_secs(30)).await;
    let name = partition_checkpoint(PROJECTION, a_partition);
    let taken = writer.load_checkpoint(&name).await.unwrap();
    assert!(taken.position > stalled_position, "{taken:?}");
    assert!(taken.generation > generation_before, "{taken:?}");
    assert!(
        a_watched
            .saves()
            .iter()
            .all(|(_, _, saved)| matches!(saved, Saved::Done(_))),
        "A saved nothing refused while it ran: {:?}",
        a_watched.saves()
    );

    // Released, A finishes the batch it stalled in: its save is refused.
    let (_, checkpoint, result) = release_and_await_save(&stall, &a_watched, &name).await;
    assert!(checkpoint.position >= stalled_position, "{checkpoint:?}");
    assert!(checkpoint.generation <= generation_before, "{checkpoint:?}");
    assert_eq!(
        result,
        Saved::Fenced,
        "the stalled worker's save after its lease"
    );
    let after = writer.load_checkpoint(&name).await.unwrap();
    assert!(after.position >= taken.position, "{after:?} < {taken:?}");

    // A rejoins (it is alive again) and the group settles; then A leaves and B handles
    // everything on its own.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.shutdown().await;
    write_round(&writer, &mut written, &streams).await;
    wait_until(
        "B runs every partition again",
        Duration::from_secs(20),
        || b.owned().len() == partitions as usize,
    )
    .await;
    wait_for_checkpoints(&writer, Duration::from_secs(30)).await;
    watch.assert_never_moved_back().await;
    check_handled(&writer, &model.handled(), &written, false).await;
    within("B shuts down", Duration::from_secs(10), b.shutdown()).await;
}

// ---------------------------------------------------------------------------------------------
// The relay

fn relay_config(owner: &str, ttl: Duration) -> RelayConfig {
    RelayConfig {
        owner: owner.to_owned(),
        lease_ttl: ttl,
        publish_timeout: ttl / 2,
        batch_size: 7,
        max_in_flight: 3,
        idle_poll: Duration::from_millis(50),
        backoff: Backoff::new(Duration::from_millis(20), Duration::from_millis(100)),
        ..RelayConfig::default()
    }
}

/// Two relay workers on handles of their own divide the outboxes; writers append with outbox
/// messages across the partitions; one worker is killed; every record is published, per key in
/// outbox order, and every outbox ends empty.
async fn relay_group_publishes_everything_across_a_kill(
    open: impl Fn() -> std::pin::Pin<Box<dyn Future<Output = RedisStore> + Send>>,
) {
    let writer = open().await;
    let partitions = writer.outbox_partitions();
    assert_eq!(partitions, writer.partitioning().count());
    let ttl = Duration::from_secs(1);
    let broker = RecordingPublisher::default();
    let a = Relay::spawn_group(
        open().await,
        broker.for_relay("a"),
        relay_config("relay-a", ttl),
        GroupConfig::new("a").lease_ttl(ttl),
    );
    let b = Relay::spawn_group(
        open().await,
        broker.for_relay("b"),
        relay_config("relay-b", ttl),
        GroupConfig::new("b").lease_ttl(ttl),
    );
    wait_until(
        "A and B divide the outboxes",
        Duration::from_secs(20),
        || divided(&[a.owned(), b.owned()], partitions),
    )
    .await;
    let streams = streams_per_partition(writer.partitioning(), 3);
    let writers = Writers::spawn(&writer, &streams, 4, true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a_had = a.owned();
    a.kill();
    wait_until(
        "B takes the outboxes of the killed A",
        Duration::from_secs(30),
        || b.owned().len() == partitions as usize,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written = writers.stop().await;

    within("every outbox empties", Duration::from_secs(60), async {
        loop {
            let mut left = 0;
            for p in 0..partitions {
                left += writer
                    .outbox_partition(p)
                    .unwrap()
                    .outbox_len()
                    .await
                    .unwrap();
            }
            if left == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // Every record published; per key, the first appearance of each record in the order the
    // writer appended them, which is the key's outbox order; positions rise along each key.
    let received = lock(&broker.received).clone();
    let mut first: BTreeMap<String, Vec<(Uuid, u64)>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for (_, record) in &received {
        if seen.insert(record.message.message_id) {
            first
                .entry(record.message.key.clone())
                .or_default()
                .push((record.message.message_id, record.position));
        }
    }
    let total: usize = written.values().map(|(_, m)| m.len()).sum();
    assert!(total > 0);
    assert_eq!(seen.len(), total, "every record published");
    for (stream, (_, messages)) in &written {
        let got = first.get(&stream.to_string()).cloned().unwrap_or_default();
        assert_eq!(
            got.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            *messages,
            "{stream}: published out of order or not at all"
        );
        assert!(got.windows(2).all(|w| w[0].1 < w[1].1), "{stream}: {got:?}");
    }
    // Both workers published, A's outboxes were taken over by B.
    let by: BTreeSet<&str> = received.iter().map(|(relay, _)| relay.as_str()).collect();
    assert_eq!(by, BTreeSet::from(["a", "b"]), "{a_had:?}");
    for p in 0..partitions {
        let outbox = writer.outbox_partition(p).unwrap();
        assert!(outbox.pending_outbox(10).await.unwrap().is_empty());
    }
    within("B shuts down", Duration::from_secs(10), b.shutdown()).await;
}

// ---------------------------------------------------------------------------------------------
// On the standalone server

/// An opener of handles of one store on the standalone server with `partitions` partitions.
fn standalone(
    name: &str,
    partitions: u32,
) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = RedisStore> + Send>> {
    let prefix = common::unique_prefix(name);
    move || {
        let prefix = prefix.clone();
        Box::pin(async move {
            RedisStore::builder(es_test_support::redis_url())
                .prefix(prefix)
                .partitioning(Partitioning::new(partitions).unwrap())
                .build()
                .await
                .unwrap_or_else(|e| panic!("cannot build the store: {e}"))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn projection_group_on_four_partitions_survives_a_kill_and_a_join() {
    projection_group_survives_a_kill_and_a_join(standalone("gproj", 4)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_group_on_four_partitions_publishes_everything_across_a_kill() {
    relay_group_publishes_everything_across_a_kill(standalone("grelay", 4)).await;
}

// ---------------------------------------------------------------------------------------------
// On the Redis Cluster

/// The consumer groups on the shared cluster, each worker on a cluster connection of its own.
#[cfg(feature = "cluster")]
mod cluster {
    use std::future::Future;
    use std::pin::Pin;

    use es_core::Partitioning;
    use es_redis::RedisStore;

    use super::common;

    /// An opener of handles of one store on the cluster with `partitions` partitions.
    fn on_cluster(
        name: &str,
        partitions: u32,
    ) -> impl Fn() -> Pin<Box<dyn Future<Output = RedisStore> + Send>> {
        let prefix = common::unique_prefix(name);
        move || {
            let prefix = prefix.clone();
            Box::pin(async move {
                RedisStore::cluster_builder(es_test_support::redis_cluster_urls())
                    .prefix(prefix)
                    .partitioning(Partitioning::new(partitions).unwrap())
                    .build()
                    .await
                    .unwrap_or_else(|e| panic!("cannot build a store on the Redis Cluster: {e}"))
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn projection_group_on_eight_partitions_survives_a_kill_and_a_join() {
        super::projection_group_survives_a_kill_and_a_join(on_cluster("cgproj", 8)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_stalled_projection_worker_never_records_after_its_lease() {
        super::a_stalled_worker_never_records_after_its_lease(on_cluster("cgstale", 3)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn relay_group_on_three_partitions_publishes_everything_across_a_kill() {
        super::relay_group_publishes_everything_across_a_kill(on_cluster("cgrelay", 3)).await;
    }
}
