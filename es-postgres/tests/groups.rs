//! Consumer groups on PostgreSQL: group leases on the database clock, fenced checkpoints, and
//! exactly-once projections run by several workers that divide a 4-partition store.
//!
//! Each worker runs the way a process of its own would: on an OS thread with a single-threaded
//! Tokio runtime, on a `PgStore` with a pool of its own. Killing a worker aborts its group and
//! drops its runtime (its connections close); freezing one blocks its thread, so that nothing of
//! it runs (not even its lease renewals), like a process that is stopped and continued.
//!
//! The read model is one row per applied event (`applied`, keyed by partition and global
//! position): an event applied twice shows `times = 2`, an event never applied has no row, and
//! `seq` (drawn from a sequence as the row is written) gives the order of application.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use es_core::contract::{HeldLease, LeaseStore, MAX_LEASE_NAME, MAX_LEASE_TTL};
use es_core::group::GroupConfig;
use es_core::projection::{
    partition_checkpoint, BatchError, HandlerError, ProjectionGroup, RunnerConfig,
};
use es_core::{
    AppendRequest, Checkpoint, CheckpointStore, EventFilter, EventStore, ExpectedVersion, NewEvent,
    Partitioning, ProjectionRunner, ProjectionSink, ReadAll, RecordedEvent, StoreError, StreamId,
};
use es_postgres::{ExactlyOnce, PgProjection, PgStore};
use futures::TryStreamExt;
use serde_json::json;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};

/// The longest any wait in these tests may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(60);

/// The projection's name, and so its checkpoints' (`applied#<partition>`).
const PROJECTION: &str = "applied";

fn four() -> Partitioning {
    Partitioning::new(4).expect("4 partitions")
}

async fn within<T>(what: &str, limit: Duration, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {limit:?}"))
}

/// A store on `schema` with 4 partitions and a pool of its own.
async fn store_on(url: &str, schema: &str, connections: u32) -> PgStore {
    PgStore::builder(common::pool(url, connections).await)
        .schema(schema)
        .partitioning(four())
        .poll_interval(Duration::from_millis(100))
        .build()
        .await
        .unwrap_or_else(|e| panic!("cannot build the store on schema {schema}: {e}"))
}

/// A fresh 4-partition schema with the read model; returns its name, a store for the writers and
/// an admin pool.
async fn schema_with_read_model() -> (String, PgStore, PgPool) {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("grp");
    let store = store_on(&url, &schema, 16).await;
    let admin = common::pool(&url, 4).await;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE SEQUENCE \"{schema}\".apply_seq;
         CREATE TABLE \"{schema}\".applied (
             partition      integer NOT NULL,
             global_position bigint NOT NULL,
             event_id       uuid    NOT NULL,
             stream_id      text    NOT NULL,
             stream_version bigint  NOT NULL,
             worker         text    NOT NULL,
             seq            bigint  NOT NULL DEFAULT nextval('\"{schema}\".apply_seq'),
             times          integer NOT NULL DEFAULT 1,
             PRIMARY KEY (partition, global_position));"
    )))
    .execute(&admin)
    .await
    .unwrap();
    (schema, store, admin)
}

/// The read model: one row per applied event, written in the batch's transaction.
struct Applied {
    schema: String,
    worker: String,
    /// Freezes the worker inside a batch's transaction when armed so.
    freeze: Option<Arc<Freeze>>,
}

impl PgProjection for Applied {
    fn name(&self) -> &'static str {
        PROJECTION
    }

    async fn handle(
        &mut self,
        tx: &mut PgConnection,
        event: &RecordedEvent,
    ) -> Result<(), HandlerError> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{}\".applied AS a (partition, global_position, event_id, stream_id, \
                 stream_version, worker) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (partition, global_position) DO UPDATE SET times = a.times + 1",
            self.schema
        )))
        .bind(i32::try_from(event.partition)?)
        .bind(i64::try_from(event.global_position)?)
        .bind(event.event_id)
        .bind(event.stream_id.as_str())
        .bind(i64::try_from(event.stream_version)?)
        .bind(&self.worker)
        .execute(&mut *tx)
        .await?;
        if let Some(freeze) = &self.freeze {
            freeze.block_if_armed(std::slice::from_ref(event), FreezePoint::InsideTransaction);
        }
        Ok(())
    }

    async fn reset(&mut self, tx: &mut PgConnection) -> Result<(), HandlerError> {
        sqlx::query(AssertSqlSafe(format!(
            "TRUNCATE \"{}\".applied",
            self.schema
        )))
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// Where a worker freezes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FreezePoint {
    /// With a batch in hand, before its transaction begins.
    BeforeBatch,
    /// Inside the batch's transaction, after the checkpoint row is locked and an event written.
    InsideTransaction,
}

/// The `(partition, position)` of each event of a frozen batch, and when the worker froze.
type Frozen = (Vec<(u32, u64)>, Instant);

/// Freezes a worker's whole thread (its runtime: partitions, lease renewals, everything) at the
/// armed point of the next batch of the armed partition, until released; then records how that
/// batch ended.
#[derive(Default)]
struct Freeze {
    /// The partition whose next batch freezes the worker, and where.
    armed: Mutex<Option<(u32, FreezePoint)>>,
    released: Mutex<bool>,
    wake: Condvar,
    /// The events of the frozen batch (or the one event, inside a transaction), and when the
    /// worker froze.
    batch: Mutex<Option<Frozen>>,
    /// How the frozen batch's apply ended: `Err(true)` refused as fenced, `Err(false)` failed
    /// otherwise.
    outcome: Mutex<Option<Result<(), bool>>>,
    /// Batches of this worker refused as fenced.
    fenced: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Freeze {
    fn arm(&self, partition: u32, point: FreezePoint) {
        *lock(&self.armed) = Some((partition, point));
    }

    fn release(&self) {
        *lock(&self.released) = true;
        self.wake.notify_all();
    }

    fn frozen_batch(&self) -> Option<Frozen> {
        lock(&self.batch).clone()
    }

    fn outcome(&self) -> Option<Result<(), bool>> {
        *lock(&self.outcome)
    }

    /// Blocks the calling thread if `events` are of the armed partition and `point` is the
    /// armed one (once).
    fn block_if_armed(&self, events: &[RecordedEvent], point: FreezePoint) {
        let Some(first) = events.first() else { return };
        {
            let mut armed = lock(&self.armed);
            if *armed != Some((first.partition, point)) {
                return;
            }
            *armed = None;
        }
        *lock(&self.batch) = Some((
            events
                .iter()
                .map(|e| (e.partition, e.global_position))
                .collect(),
            Instant::now(),
        ));
        let mut released = lock(&self.released);
        while !*released {
            released = self
                .wake
                .wait(released)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Records how a batch ended if it is the frozen one (holds its first frozen event).
    fn record(&self, events: &[RecordedEvent], result: &Result<(), BatchError>) {
        let Some((frozen, _)) = self.frozen_batch() else {
            return;
        };
        let holds = events
            .iter()
            .any(|e| frozen.first() == Some(&(e.partition, e.global_position)));
        let mut outcome = lock(&self.outcome);
        if holds && outcome.is_none() {
            *outcome = Some(match result {
                Ok(()) => Ok(()),
                Err(err) => Err(err.is_fenced()),
            });
        }
    }
}

/// A sink that may freeze its worker (see [`Freeze`]) and counts fenced batches.
struct Freezing<K> {
    sink: K,
    freeze: Arc<Freeze>,
}

impl<K: ProjectionSink> ProjectionSink for Freezing<K> {
    fn name(&self) -> &str {
        self.sink.name()
    }

    fn filter(&self) -> EventFilter {
        self.sink.filter()
    }

    async fn checkpoint(&mut self) -> Result<u64, HandlerError> {
        self.sink.checkpoint().await
    }

    async fn apply(&mut self, events: &[RecordedEvent], checkpoint: u64) -> Result<(), BatchError> {
        self.freeze.block_if_armed(events, FreezePoint::BeforeBatch);
        let result = self.sink.apply(events, checkpoint).await;
        if result.as_ref().is_err_and(BatchError::is_fenced) {
            self.freeze.fenced.fetch_add(1, Ordering::SeqCst);
        }
        self.freeze.record(events, &result);
        result
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        self.sink.reset().await
    }

    async fn claim(&mut self, partition: u32) -> Result<u64, HandlerError> {
        self.sink.claim(partition).await
    }

    async fn reset_group(&mut self, partitions: u32) -> Result<(), HandlerError> {
        self.sink.reset_group(partitions).await
    }
}

/// One worker of the projection's group, as a process of its own would run it.
struct Worker {
    name: String,
    group: Option<ProjectionGroup>,
    freeze: Arc<Freeze>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    async fn start(schema: &str, name: &str, ttl: Duration) -> Self {
        Self::start_with(schema, name, ttl, None).await
    }

    /// A worker whose connections have `idle_in_transaction_session_timeout` set to
    /// `idle_timeout` (unset: the server's default, none).
    async fn start_with(
        schema: &str,
        name: &str,
        ttl: Duration,
        idle_timeout: Option<Duration>,
    ) -> Self {
        let freeze = Arc::new(Freeze::default());
        let (handle_tx, handle_rx) = tokio::sync::oneshot::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (schema, worker, freezes) = (schema.to_owned(), name.to_owned(), Arc::clone(&freeze));
        let thread = std::thread::Builder::new()
            .name(format!("worker-{name}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                runtime.block_on(async move {
                    let url = es_test_support::database_url();
                    let mut options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
                    if let Some(idle) = idle_timeout {
                        let millis = idle.as_millis().to_string();
                        options =
                            options.options([("idle_in_transaction_session_timeout", millis)]);
                    }
                    let pool = sqlx::postgres::PgPoolOptions::new()
                        .max_connections(8)
                        .test_before_acquire(false)
                        .connect_with(options)
                        .await
                        .expect("the worker's pool");
                    let store = PgStore::builder(pool)
                        .schema(schema.as_str())
                        .partitioning(four())
                        .poll_interval(Duration::from_millis(100))
                        .build()
                        .await
                        .expect("the worker's store");
                    let runner = ProjectionRunner::with_config(
                        store.clone(),
                        RunnerConfig {
                            max_attempts: 5,
                            backoff: es_core::Backoff::new(
                                Duration::from_millis(5),
                                Duration::from_millis(100),
                            ),
                            batch_size: 16,
                            ..RunnerConfig::default()
                        },
                    );
                    let config = GroupConfig::new(worker.clone()).lease_ttl(ttl);
                    let group = runner.spawn_group(config, move || Freezing {
                        sink: ExactlyOnce::new(
                            &store,
                            Applied {
                                schema: schema.clone(),
                                worker: worker.clone(),
                                freeze: Some(Arc::clone(&freezes)),
                            },
                        ),
                        freeze: Arc::clone(&freezes),
                    });
                    let _ = handle_tx.send(group);
                    let _ = stop_rx.await;
                });
                // Dropping the runtime ends every task of the worker and closes its connections.
            })
            .expect("a worker thread");
        let group = within("the worker starts", PATIENCE, handle_rx)
            .await
            .expect("the worker thread sends its group");
        Self {
            name: name.to_owned(),
            group: Some(group),
            freeze,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn group(&self) -> &ProjectionGroup {
        self.group.as_ref().expect("a running worker")
    }

    fn owned(&self) -> Vec<u32> {
        self.group().owned()
    }

    /// Waits until this worker runs every partition.
    async fn wait_owns_all(&self, limit: Duration) -> Duration {
        let started = Instant::now();
        within(
            &format!("worker {} running every partition", self.name),
            limit,
            self.group().wait_owned(|owned| owned == [0, 1, 2, 3]),
        )
        .await;
        started.elapsed()
    }

    /// Waits until this worker is frozen; returns the frozen batch and when it froze.
    async fn wait_frozen(&self) -> Frozen {
        within(&format!("worker {} freezes", self.name), PATIENCE, async {
            loop {
                if let Some(batch) = self.freeze.frozen_batch() {
                    return batch;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    /// Releases this frozen worker and waits for its frozen batch to end; returns how it ended.
    async fn thaw(&self) -> Result<(), bool> {
        self.freeze.release();
        within("the frozen batch ends", PATIENCE, async {
            loop {
                if let Some(outcome) = self.freeze.outcome() {
                    return outcome;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    /// What a crash does: the group ends with no release, then the whole "process" goes.
    async fn kill(mut self) {
        if let Some(group) = self.group.take() {
            group.kill();
        }
        self.end().await;
    }

    /// Hands the partitions over and ends.
    async fn shutdown(mut self) {
        if let Some(group) = self.group.take() {
            within("the worker shuts down", PATIENCE, group.shutdown()).await;
        }
        self.end().await;
    }

    async fn end(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .expect("joined")
                .expect("the worker thread does not panic");
        }
    }
}

/// Waits until `workers` divide the 4 partitions: each runs at least one, none runs a partition
/// another runs, and every partition is run.
async fn wait_divided(workers: &[&Worker]) {
    within("the workers divide the partitions", PATIENCE, async {
        loop {
            let owned: Vec<Vec<u32>> = workers.iter().map(|w| w.owned()).collect();
            let all: Vec<u32> = owned.iter().flatten().copied().collect();
            let distinct: BTreeSet<u32> = all.iter().copied().collect();
            if owned.iter().all(|o| !o.is_empty())
                && all.len() == distinct.len()
                && distinct == BTreeSet::from([0, 1, 2, 3])
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// `n` streams with at least `n / 8` in each of the 4 partitions.
fn streams(prefix: &str, n: usize) -> Vec<StreamId> {
    let partitioning = four();
    let per = n / 4;
    let mut out = Vec::new();
    for p in partitioning.partitions() {
        out.extend(
            (0..)
                .map(|i| StreamId::new("acct", &format!("{prefix}{i}")).unwrap())
                .filter(|s| partitioning.partition_of(s) == p)
                .take(per),
        );
    }
    out
}

/// Writer tasks appending to their own streams (in version order, `Exact`) until stopped.
struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<usize>>,
}

impl Writers {
    fn start(store: &PgStore, streams: &[StreamId], tasks: usize, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..tasks)
            .map(|t| {
                let mine: Vec<StreamId> = streams.iter().skip(t).step_by(tasks).cloned().collect();
                let (store, stop) = (store.clone(), Arc::clone(&stop));
                tokio::spawn(async move {
                    let mut versions = vec![0_u64; mine.len()];
                    let mut written = 0;
                    let mut round = 0_usize;
                    while !stop.load(Ordering::SeqCst) {
                        for (stream, version) in mine.iter().zip(versions.iter_mut()) {
                            let n = 1 + (round + t) % 2;
                            let events = (0..n)
                                .map(|i| {
                                    NewEvent::from_value(
                                        "Ticked",
                                        1,
                                        &json!({ "n": *version + 1 + i as u64 }),
                                    )
                                })
                                .collect();
                            store
                                .append(AppendRequest::new(
                                    stream.clone(),
                                    ExpectedVersion::Exact(*version),
                                    events,
                                ))
                                .await
                                .unwrap_or_else(|e| panic!("appending to {stream}: {e}"));
                            *version += n as u64;
                            written += n;
                            tokio::time::sleep(pause).await;
                        }
                        round += 1;
                    }
                    written
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the writers; returns how many events they appended.
    async fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let mut total = 0;
        for task in self.tasks {
            total += task.await.expect("a writer does not panic");
        }
        total
    }
}

/// Appends `per_stream` events to each of `streams`, after what they hold.
async fn append_each(store: &PgStore, streams: &[StreamId], per_stream: u64) {
    for stream in streams {
        let events = (0..per_stream)
            .map(|i| NewEvent::from_value("Ticked", 1, &json!({ "i": i })))
            .collect();
        store
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Any,
                events,
            ))
            .await
            .unwrap();
    }
}

async fn count(admin: &PgPool, schema: &str, table: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{schema}\".{table}"
    )))
    .fetch_one(admin)
    .await
    .unwrap()
}

/// Waits until the read model holds at least `n` rows.
async fn wait_applied(admin: &PgPool, schema: &str, n: i64) {
    within(&format!("{n} events applied"), PATIENCE, async {
        while count(admin, schema, "applied").await < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Waits until the read model holds a row for every stored event, then checks that every event
/// of every partition was applied exactly once, as itself, and each stream in version order.
async fn assert_every_event_applied_once(admin: &PgPool, schema: &str) {
    let events = count(admin, schema, "events").await;
    wait_applied(admin, schema, events).await;
    let s = format!("\"{schema}\"");
    let twice: Vec<(i32, i64, i32)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT partition, global_position, times FROM {s}.applied WHERE times <> 1"
    )))
    .fetch_all(admin)
    .await
    .unwrap();
    assert!(twice.is_empty(), "applied more than once: {twice:?}");
    let missing: Vec<(i32, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT e.partition, e.global_position FROM {s}.events e \
         LEFT JOIN {s}.applied a ON a.partition = e.partition \
              AND a.global_position = e.global_position AND a.event_id = e.event_id \
              AND a.stream_id = e.stream_id AND a.stream_version = e.stream_version \
         WHERE a.event_id IS NULL"
    )))
    .fetch_all(admin)
    .await
    .unwrap();
    assert!(
        missing.is_empty(),
        "never applied (or not as stored): {missing:?}"
    );
    assert_eq!(
        count(admin, schema, "applied").await,
        events,
        "rows of no event"
    );
    let streams: Vec<(String, Vec<i64>)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT stream_id, array_agg(stream_version ORDER BY seq) FROM {s}.applied \
         GROUP BY stream_id"
    )))
    .fetch_all(admin)
    .await
    .unwrap();
    assert!(!streams.is_empty());
    for (stream, versions) in streams {
        let expected: Vec<i64> = (1..=i64::try_from(versions.len()).unwrap()).collect();
        assert_eq!(
            versions, expected,
            "{stream} was applied out of version order"
        );
    }
}

/// The checkpoint of each partition.
async fn checkpoints(store: &PgStore) -> Vec<Checkpoint> {
    let mut out = Vec::new();
    for p in 0..4 {
        out.push(
            store
                .load_checkpoint(&partition_checkpoint(PROJECTION, p))
                .await
                .unwrap(),
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Exactly-once groups
// ---------------------------------------------------------------------------------------------

/// Two workers divide the partitions while writers append to 32 streams across all four; one
/// is killed mid-stream (no release, its runtime and connections gone). The survivor takes every
/// partition once the dead worker's leases run out, and every event of every partition ends up
/// applied exactly once, each stream in version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_group_survives_a_killed_worker() {
    let ttl = Duration::from_millis(1500);
    let (schema, store, admin) = schema_with_read_model().await;
    let a = Worker::start(&schema, "a", ttl).await;
    let b = Worker::start(&schema, "b", ttl).await;
    wait_divided(&[&a, &b]).await;

    let writers = Writers::start(&store, &streams("k", 32), 4, Duration::from_millis(5));
    wait_applied(&admin, &schema, 150).await;
    let lost = b.owned();
    assert!(!lost.is_empty());
    b.kill().await;
    let took = a.wait_owns_all(Duration::from_secs(20)).await;
    eprintln!("the survivor ran every partition {took:?} after the kill (lease {ttl:?})");

    // The survivor goes on with the live stream for a while, then the writers stop.
    let before = count(&admin, &schema, "applied").await;
    wait_applied(&admin, &schema, before + 100).await;
    let appended = writers.finish().await;
    assert_every_event_applied_once(&admin, &schema).await;
    assert_eq!(
        count(&admin, &schema, "applied").await,
        i64::try_from(appended).unwrap()
    );
    // Each partition the dead worker had was fenced again by the survivor.
    let generations = checkpoints(&store).await;
    for p in &lost {
        assert!(
            generations[*p as usize].generation >= 2,
            "partition {p}: {:?}",
            generations[*p as usize]
        );
    }
    a.shutdown().await;
}

/// Two workers run the exactly-once projection while writers append, and one rebuilds it: the
/// group pauses, every partition's checkpoint and the read model are reset in one transaction,
/// and the group resumes. Every event ends up applied exactly once after the reset (the table
/// counts each application), each stream in version order, and every partition's checkpoint is
/// of a newer generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_group_rebuild_applies_every_event_once() {
    let ttl = Duration::from_millis(1500);
    let (schema, store, admin) = schema_with_read_model().await;
    let worker = |name: &'static str| {
        let (sinks, schema) = (store.clone(), schema.clone());
        ProjectionRunner::new(store.clone()).spawn_group(
            GroupConfig::new(name).lease_ttl(ttl),
            move || {
                ExactlyOnce::new(
                    &sinks,
                    Applied {
                        schema: schema.clone(),
                        worker: name.to_owned(),
                        freeze: None,
                    },
                )
            },
        )
    };
    let (a, b) = (worker("a"), worker("b"));
    within("a and b divide the partitions", PATIENCE, async {
        while a.owned().is_empty() || b.owned().is_empty() || a.owned().len() + b.owned().len() != 4
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let writers = Writers::start(&store, &streams("rb", 32), 4, Duration::from_millis(5));
    wait_applied(&admin, &schema, 150).await;
    let before = checkpoints(&store).await;
    let started = Instant::now();
    a.rebuild().await.unwrap();
    eprintln!(
        "rebuild: the group paused and reset in {:?}",
        started.elapsed()
    );
    wait_applied(&admin, &schema, 100).await;
    let appended = writers.finish().await;
    assert_every_event_applied_once(&admin, &schema).await;
    assert_eq!(
        count(&admin, &schema, "applied").await,
        i64::try_from(appended).unwrap()
    );
    for (p, (before, now)) in before.iter().zip(checkpoints(&store).await).enumerate() {
        assert!(
            now.generation > before.generation,
            "partition {p}: {before:?} -> {now:?}"
        );
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// One worker runs every partition; a second and a third join while writers append. The
/// partitions end up divided among the three (each runs at least one), and every event is
/// applied exactly once, each stream in version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_group_rebalances_to_an_added_worker() {
    let ttl = Duration::from_millis(1500);
    let (schema, store, admin) = schema_with_read_model().await;
    let a = Worker::start(&schema, "a", ttl).await;
    a.wait_owns_all(PATIENCE).await;

    let writers = Writers::start(&store, &streams("r", 32), 4, Duration::from_millis(5));
    wait_applied(&admin, &schema, 100).await;
    let b = Worker::start(&schema, "b", ttl).await;
    wait_divided(&[&a, &b]).await;
    let applied = count(&admin, &schema, "applied").await;
    wait_applied(&admin, &schema, applied + 100).await;
    let c = Worker::start(&schema, "c", ttl).await;
    wait_divided(&[&a, &b, &c]).await;
    let applied = count(&admin, &schema, "applied").await;
    wait_applied(&admin, &schema, applied + 100).await;
    let appended = writers.finish().await;

    assert_every_event_applied_once(&admin, &schema).await;
    assert_eq!(
        count(&admin, &schema, "applied").await,
        i64::try_from(appended).unwrap()
    );
    let owned = [a.owned(), b.owned(), c.owned()];
    eprintln!("divided: {owned:?}");
    let workers: BTreeSet<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT DISTINCT worker FROM \"{schema}\".applied"
    )))
    .fetch_all(&admin)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(
        workers,
        BTreeSet::from(["a".to_owned(), "b".to_owned(), "c".to_owned()]),
        "every worker applied events"
    );
    c.shutdown().await;
    b.shutdown().await;
    a.shutdown().await;
}

/// A worker is frozen whole (its thread blocked: no batch, no lease renewal) with a batch of
/// partition 0 in hand, before the batch's transaction begins. Its leases run out on the
/// database clock, a second worker takes every partition, fences their checkpoints and applies
/// everything, the frozen batch's events included. Then the frozen worker continues: its batch
/// finds a newer generation under the checkpoint row lock and rolls back, refused as fenced.
/// The worker rejoins, the partitions are divided again, and every event is applied exactly
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_stale_worker_never_commits() {
    let ttl = Duration::from_secs(1);
    let (schema, store, admin) = schema_with_read_model().await;
    let a = Worker::start(&schema, "a", ttl).await;
    a.wait_owns_all(PATIENCE).await;
    let all = streams("s", 16);
    let first: Vec<StreamId> = all
        .iter()
        .filter(|s| four().partition_of(s) == 0)
        .cloned()
        .collect();

    // Only partition 0 gets events, so no other partition has a transaction open when `a`
    // freezes (a transaction open in a frozen process holds its checkpoint row: see the next
    // test).
    a.freeze.arm(0, FreezePoint::BeforeBatch);
    append_each(&store, &first, 3).await;
    let (frozen, frozen_at) = a.wait_frozen().await;
    assert!(!frozen.is_empty());

    // Meanwhile events go to every partition.
    append_each(&store, &all, 2).await;
    let b = Worker::start(&schema, "b", ttl).await;
    b.wait_owns_all(PATIENCE).await;
    eprintln!(
        "b ran every partition {:?} after a froze (lease {ttl:?})",
        frozen_at.elapsed()
    );
    // In the store, b holds every partition's lease and a is no member any more.
    let held = store
        .held_leases(&format!("projection:{PROJECTION}"))
        .await
        .unwrap();
    let partitions: Vec<&str> = held
        .iter()
        .filter(|l| l.name.starts_with("partition:"))
        .map(|l| l.name.as_str())
        .collect();
    assert_eq!(
        partitions,
        ["partition:0", "partition:1", "partition:2", "partition:3"]
    );
    assert!(held.iter().all(|l| l.owner.starts_with("b~")), "{held:?}");
    assert_every_event_applied_once(&admin, &schema).await;
    let positions: Vec<i64> = frozen
        .iter()
        .map(|(_, p)| i64::try_from(*p).unwrap())
        .collect();
    let by: Vec<(String, i32)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT worker, times FROM \"{schema}\".applied \
         WHERE partition = 0 AND global_position = ANY ($1)"
    )))
    .bind(&positions)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(by.len(), frozen.len());
    assert!(
        by.iter().all(|(w, n)| w == "b" && *n == 1),
        "the frozen batch's events were applied by b, once: {by:?}"
    );
    assert!(a.freeze.outcome().is_none(), "a stayed frozen");

    // The frozen worker continues: its batch is refused, and commits nothing.
    let outcome = a.thaw().await;
    assert_eq!(
        outcome,
        Err(true),
        "the stale batch rolled back, refused as fenced"
    );
    let by_after: Vec<(String, i32)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT worker, times FROM \"{schema}\".applied \
         WHERE partition = 0 AND global_position = ANY ($1)"
    )))
    .bind(&positions)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(by_after, by, "the stale transaction changed nothing");

    // It rejoins; the partitions are divided again and later events are applied once.
    wait_divided(&[&a, &b]).await;
    append_each(&store, &all, 2).await;
    assert_every_event_applied_once(&admin, &schema).await;
    assert!(a.freeze.fenced.load(Ordering::SeqCst) >= 1);
    b.shutdown().await;
    a.shutdown().await;
}

/// A worker frozen *inside* a batch's transaction (the checkpoint row locked, an event written)
/// holds its partition: the fence of the worker taking the partition over waits for that
/// transaction, which a frozen process never ends. The server ends it: with
/// `idle_in_transaction_session_timeout` (2 s here) PostgreSQL terminates the frozen session and
/// rolls the batch back, the new owner's fence goes through, and the new owner applies
/// everything while the frozen worker is still frozen. When it continues, its batch fails (its
/// session is gone) and commits nothing. Every event is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_frozen_inside_its_transaction_is_cut_off_by_the_server() {
    let ttl = Duration::from_secs(1);
    let idle = Duration::from_secs(2);
    let (schema, store, admin) = schema_with_read_model().await;
    let a = Worker::start_with(&schema, "a", ttl, Some(idle)).await;
    a.wait_owns_all(PATIENCE).await;
    let all = streams("t", 16);
    let first: Vec<StreamId> = all
        .iter()
        .filter(|s| four().partition_of(s) == 0)
        .cloned()
        .collect();

    a.freeze.arm(0, FreezePoint::InsideTransaction);
    append_each(&store, &first, 3).await;
    // The server's idle time of the frozen transaction starts just before the worker freezes.
    let (frozen, frozen_at) = a.wait_frozen().await;
    append_each(&store, &all, 2).await;
    let b = Worker::start(&schema, "b", ttl).await;
    b.wait_owns_all(PATIENCE).await;
    assert_every_event_applied_once(&admin, &schema).await;
    let waited = frozen_at.elapsed();
    eprintln!("b applied the frozen partition {waited:?} after a froze (idle timeout {idle:?})");
    assert!(
        waited + Duration::from_millis(200) >= idle,
        "the takeover waited for the frozen transaction's end: {waited:?}"
    );
    let (partition, position) = frozen[0];
    let by: (String, i32) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT worker, times FROM \"{schema}\".applied \
         WHERE partition = $1 AND global_position = $2"
    )))
    .bind(i32::try_from(partition).unwrap())
    .bind(i64::try_from(position).unwrap())
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(
        by,
        ("b".to_owned(), 1),
        "the frozen event was applied by b, once"
    );
    assert!(a.freeze.outcome().is_none(), "a stayed frozen");

    assert_eq!(
        a.thaw().await,
        Err(false),
        "the frozen batch failed with its session and committed nothing"
    );
    wait_divided(&[&a, &b]).await;
    append_each(&store, &all, 2).await;
    assert_every_event_applied_once(&admin, &schema).await;
    b.shutdown().await;
    a.shutdown().await;
}

/// The sink of a group: `claim` moves `ExactlyOnce` to the partition's own checkpoint row and
/// fences it; a batch of the earlier holder is refused and writes nothing; reset and checkpoint
/// loads use the partition's row, and the projection's own row is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_moves_the_sink_to_the_partition_checkpoint_and_fences_the_earlier_holder() {
    let (schema, store, admin) = schema_with_read_model().await;
    let in_one: Vec<StreamId> = streams("c", 16)
        .into_iter()
        .filter(|s| four().partition_of(s) == 1)
        .collect();
    append_each(&store, &in_one, 2).await;
    let events: Vec<RecordedEvent> = store
        .read_all(ReadAll::after(0).partition(1))
        .try_collect()
        .await
        .unwrap();
    assert!(events.len() >= 6, "{} events", events.len());
    let sink = |worker: &str| {
        ExactlyOnce::new(
            &store,
            Applied {
                schema: schema.clone(),
                worker: worker.to_owned(),
                freeze: None,
            },
        )
    };
    let (mut a, mut b) = (sink("a"), sink("b"));
    let at = |i: usize| events[i].global_position;
    let row = partition_checkpoint(PROJECTION, 1);

    assert_eq!(a.claim(1).await.unwrap(), 0);
    assert_eq!(a.checkpoint_name(), row);
    a.apply(&events[..2], at(1)).await.unwrap();
    assert_eq!(
        store.load_checkpoint(&row).await.unwrap(),
        Checkpoint {
            position: at(1),
            generation: 1
        }
    );

    // b takes the partition over at what a recorded; a's next batch is refused.
    assert_eq!(b.claim(1).await.unwrap(), at(1));
    let refused = a.apply(&events[2..4], at(3)).await.unwrap_err();
    assert!(refused.is_fenced(), "{}", refused.source);
    assert_eq!(refused.applied, 0);
    assert_eq!(count(&admin, &schema, "applied").await, 2);
    b.apply(&events[2..4], at(3)).await.unwrap();
    assert_eq!(b.checkpoint().await.unwrap(), at(3));
    assert_eq!(
        store.load_checkpoint(&row).await.unwrap(),
        Checkpoint {
            position: at(3),
            generation: 2
        }
    );

    // A reset starts the partition's checkpoint over; the projection's own row stays unused.
    b.reset().await.unwrap();
    assert_eq!(count(&admin, &schema, "applied").await, 0);
    assert_eq!(
        store.load_checkpoint(&row).await.unwrap(),
        Checkpoint {
            position: 0,
            generation: 3
        }
    );
    let last = events.len() - 1;
    b.apply(&events, at(last)).await.unwrap();
    assert_eq!(a.claim(1).await.unwrap(), at(last));
    assert!(b.apply(&events, at(last)).await.unwrap_err().is_fenced());
    assert_eq!(
        store.load_checkpoint(PROJECTION).await.unwrap(),
        Checkpoint::default()
    );
    let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{schema}\".checkpoints WHERE name = '{PROJECTION}'"
    )))
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(rows, 0);
    assert_eq!(
        count(&admin, &schema, "applied").await,
        i64::try_from(events.len()).unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// Fencing checkpoints
// ---------------------------------------------------------------------------------------------

/// `fence_checkpoint` creates a missing checkpoint, raises the generation keeping the position,
/// refuses every later save of an older generation, and waits for a batch holding the row, so
/// that what it returns includes that batch's checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_checkpoint_raises_the_generation_at_the_recorded_position() {
    let store = common::fresh_store().await;
    let cp = |position, generation| Checkpoint {
        position,
        generation,
    };
    assert_eq!(store.fence_checkpoint("p#0").await.unwrap(), cp(0, 1));
    assert!(store.save_checkpoint("p#0", cp(10, 1)).await.unwrap());
    assert_eq!(store.fence_checkpoint("p#0").await.unwrap(), cp(10, 2));
    match store.save_checkpoint("p#0", cp(11, 1)).await {
        Err(StoreError::Fenced { .. }) => {}
        other => panic!("a save of the fenced generation: {other:?}"),
    }
    assert_eq!(store.load_checkpoint("p#0").await.unwrap(), cp(10, 2));
    // A reset and a fence both raise the generation; neither lowers it.
    assert_eq!(store.reset_checkpoint("p#0").await.unwrap(), cp(0, 3));
    assert_eq!(store.fence_checkpoint("p#0").await.unwrap(), cp(0, 4));

    // A batch holds the row (as an exactly-once batch does) and raises it; the fence waits for
    // its commit and returns what it recorded.
    let url = es_test_support::database_url();
    let admin = common::pool(&url, 2).await;
    let s = format!("\"{}\"", store.schema());
    let mut tx = admin.begin().await.unwrap();
    let locked: (i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT * FROM {s}.checkpoint_lock('p#0')"
    )))
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(locked, (0, 4));
    sqlx::query(AssertSqlSafe(format!(
        "SELECT {s}.checkpoint_raise('p#0', 20)"
    )))
    .execute(&mut *tx)
    .await
    .unwrap();
    let fencing = tokio::spawn({
        let store = store.clone();
        async move { store.fence_checkpoint("p#0").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!fencing.is_finished(), "the fence waits for the batch");
    tx.commit().await.unwrap();
    let fenced = within("the fence", PATIENCE, fencing)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fenced, cp(20, 5));
}

// ---------------------------------------------------------------------------------------------
// Lease contract
// ---------------------------------------------------------------------------------------------

const LONG: Duration = Duration::from_secs(60);

/// Taking a free, released or expired lease raises the generation (its own owner included);
/// renewing a held lease keeps it; another owner gets `None`; a release counts only from the
/// owner in its generation, and keeps the generation.
#[tokio::test]
async fn lease_generations_change_only_when_the_lease_changes_hands() {
    let store = common::fresh_store().await;
    let take = |owner: &'static str| store.acquire_lease("g", "partition:0", owner, LONG);
    assert_eq!(take("a").await.unwrap(), Some(1));
    assert_eq!(take("a").await.unwrap(), Some(1), "a renewal keeps it");
    assert_eq!(take("b").await.unwrap(), None, "held by a");

    // Releases by someone else, or in another generation, do nothing.
    store
        .release_lease("g", "partition:0", "b", 1)
        .await
        .unwrap();
    store
        .release_lease("g", "partition:0", "a", 2)
        .await
        .unwrap();
    store
        .release_lease("g", "partition:1", "a", 1)
        .await
        .unwrap();
    store
        .release_lease("h", "partition:0", "a", 1)
        .await
        .unwrap();
    assert_eq!(take("b").await.unwrap(), None);

    store
        .release_lease("g", "partition:0", "a", 1)
        .await
        .unwrap();
    assert_eq!(store.held_leases("g").await.unwrap(), vec![]);
    assert_eq!(
        take("b").await.unwrap(),
        Some(2),
        "a released lease changes hands"
    );
    assert_eq!(take("a").await.unwrap(), None);
    store
        .release_lease("g", "partition:0", "b", 2)
        .await
        .unwrap();
    assert_eq!(
        take("b").await.unwrap(),
        Some(3),
        "its own released lease, again"
    );
    store
        .release_lease("g", "partition:0", "b", 3)
        .await
        .unwrap();
    store
        .release_lease("g", "partition:0", "b", 3)
        .await
        .unwrap();
    assert_eq!(
        take("a").await.unwrap(),
        Some(4),
        "generations never go down"
    );

    // Leases are per group and name.
    assert_eq!(
        store
            .acquire_lease("h", "partition:0", "b", LONG)
            .await
            .unwrap(),
        Some(1)
    );
    assert_eq!(
        store
            .acquire_lease("g", "partition:1", "b", LONG)
            .await
            .unwrap(),
        Some(1)
    );
}

/// Expiry is on the database clock: the stored expiry is the server's time plus the ttl, and a
/// lease of 200 ms is free once that has passed. An owner taking back its own expired lease
/// gets a new generation.
#[tokio::test]
async fn leases_expire_on_the_database_clock() {
    let store = common::fresh_store().await;
    let admin = common::pool(&es_test_support::database_url(), 2).await;
    let short = Duration::from_millis(200);
    let server_now = || async {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>("SELECT clock_timestamp()")
            .fetch_one(&admin)
            .await
            .unwrap()
    };

    let before = server_now().await;
    assert_eq!(
        store.acquire_lease("g", "x", "a", short).await.unwrap(),
        Some(1)
    );
    let after = server_now().await;
    let expires: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT expires_at FROM \"{}\".group_leases WHERE lease_group = 'g' AND name = 'x'",
        store.schema()
    )))
    .fetch_one(&admin)
    .await
    .unwrap();
    let ttl = chrono::Duration::milliseconds(200);
    assert!(
        before + ttl <= expires && expires <= after + ttl,
        "{before} + 200 ms <= {expires} <= {after} + 200 ms"
    );
    assert_eq!(
        store.acquire_lease("g", "x", "b", LONG).await.unwrap(),
        None
    );
    assert_eq!(store.held_leases("g").await.unwrap().len(), 1);

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.held_leases("g").await.unwrap(), vec![], "expired");
    // A release of the expired lease does not revive or end anything.
    store.release_lease("g", "x", "a", 1).await.unwrap();
    assert_eq!(
        store.acquire_lease("g", "x", "a", short).await.unwrap(),
        Some(2),
        "its own expired lease, taken back, is a new generation"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        store.acquire_lease("g", "x", "b", LONG).await.unwrap(),
        Some(3),
        "an expired lease is taken over"
    );
    // A renewal moves the expiry forward from the renewal.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        store.acquire_lease("g", "x", "b", short).await.unwrap(),
        Some(3)
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        store.acquire_lease("g", "x", "a", LONG).await.unwrap(),
        None
    );
}

/// `held_leases` lists the group's live leases in name order (byte order), with owner and
/// generation; released and expired leases and other groups' leases are left out.
#[tokio::test]
async fn held_leases_lists_live_leases_in_name_order() {
    let store = common::fresh_store().await;
    for (name, owner) in [
        ("partition:2", "b"),
        ("member:b~1", "b~1"),
        ("partition:10", "a"),
        ("member:a~2", "a~2"),
        ("Zeta", "z"),
        ("é", "e"),
        ("partition:1", "a"),
    ] {
        assert!(store
            .acquire_lease("grp", name, owner, LONG)
            .await
            .unwrap()
            .is_some());
    }
    store
        .acquire_lease("other", "partition:0", "a", LONG)
        .await
        .unwrap();
    store.acquire_lease("grp", "gone", "a", LONG).await.unwrap();
    store.release_lease("grp", "gone", "a", 1).await.unwrap();
    store
        .acquire_lease("grp", "brief", "a", Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Released again and retaken: a generation above 1.
    store
        .release_lease("grp", "partition:1", "a", 1)
        .await
        .unwrap();
    assert_eq!(
        store
            .acquire_lease("grp", "partition:1", "c", LONG)
            .await
            .unwrap(),
        Some(2)
    );

    let held = store.held_leases("grp").await.unwrap();
    let lease = |name: &str, owner: &str, generation| HeldLease {
        name: name.to_owned(),
        owner: owner.to_owned(),
        generation,
    };
    assert_eq!(
        held,
        vec![
            lease("Zeta", "z", 1),
            lease("member:a~2", "a~2", 1),
            lease("member:b~1", "b~1", 1),
            lease("partition:1", "c", 2),
            lease("partition:10", "a", 1),
            lease("partition:2", "b", 1),
            lease("é", "e", 1),
        ]
    );
    let mut sorted: Vec<String> = held.iter().map(|l| l.name.clone()).collect();
    sorted.sort();
    assert_eq!(
        sorted,
        held.iter().map(|l| l.name.clone()).collect::<Vec<_>>(),
        "the order of Rust strings"
    );
    assert_eq!(store.held_leases("nobody").await.unwrap(), vec![]);
}

/// Empty or overlong names and owners, and ttls out of range, are `InvalidLease` and write
/// nothing; the bounds themselves are accepted.
#[tokio::test]
async fn invalid_lease_arguments_are_refused_and_change_nothing() {
    let store = common::fresh_store().await;
    let admin = common::pool(&es_test_support::database_url(), 2).await;
    let long = "x".repeat(MAX_LEASE_NAME + 1);
    let cases: Vec<(&str, &str, &str, Duration)> = vec![
        ("", "n", "o", LONG),
        ("g", "", "o", LONG),
        ("g", "n", "", LONG),
        (&long, "n", "o", LONG),
        ("g", &long, "o", LONG),
        ("g", "n", &long, LONG),
        ("g", "n", "o", Duration::ZERO),
        ("g", "n", "o", Duration::from_micros(999)),
        ("g", "n", "o", MAX_LEASE_TTL + Duration::from_millis(1)),
        ("g", "n", "o", Duration::MAX),
        ("g\0", "n", "o", LONG),
        ("g", "n\0", "o", LONG),
        ("g", "n", "o\0", LONG),
    ];
    for (group, name, owner, ttl) in cases {
        match store.acquire_lease(group, name, owner, ttl).await {
            Err(StoreError::InvalidLease { reason }) => assert!(!reason.is_empty()),
            other => panic!(
                "a group of {} bytes, a name of {}, an owner of {}, {ttl:?}: {other:?}",
                group.len(),
                name.len(),
                owner.len()
            ),
        }
    }
    assert_eq!(
        count(&admin, store.schema().as_str(), "group_leases").await,
        0
    );
    // A lease that cannot exist is neither released nor listed, without an error.
    store.release_lease("g\0", "n", "o", 1).await.unwrap();
    assert_eq!(store.held_leases("g\0").await.unwrap(), vec![]);

    let longest = "é".repeat(MAX_LEASE_NAME / 2);
    assert_eq!(
        store
            .acquire_lease(&longest, &longest, &longest, MAX_LEASE_TTL)
            .await
            .unwrap(),
        Some(1)
    );
    assert_eq!(
        store
            .acquire_lease("g", "n", "o", Duration::from_millis(1))
            .await
            .unwrap(),
        Some(1)
    );
    assert_eq!(
        store.held_leases(&longest).await.unwrap(),
        vec![HeldLease {
            name: longest.clone(),
            owner: longest.clone(),
            generation: 1
        }]
    );
}

/// Sixteen owners on stores of their own race for one free lease, then for it again once it
/// expired: each time exactly one gets it, in one new generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_owners_get_one_lease_one_generation() {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("race");
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(common::store_on(&url, &schema).await);
    }
    for (round, generation) in [(0, 1_u64), (1, 2)] {
        let barrier = Arc::new(tokio::sync::Barrier::new(16));
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let store = stores[i % stores.len()].clone();
                let barrier = Arc::clone(&barrier);
                tokio::spawn(async move {
                    barrier.wait().await;
                    let owner = format!("owner-{round}-{i}");
                    store
                        .acquire_lease("g", "partition:0", &owner, Duration::from_millis(400))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut granted = Vec::new();
        for task in tasks {
            granted.extend(task.await.unwrap());
        }
        assert_eq!(granted, vec![generation], "round {round}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
