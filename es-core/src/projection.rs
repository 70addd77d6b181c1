//! Projections: read models fed from the global feed, from a stored checkpoint.
//!
//! One runner serves every mode. A [`ProjectionSink`] is the part that differs: it applies a batch
//! of events and records the checkpoint.
//!
//! - **At least once** ([`AtLeastOnce`] over any [`CheckpointStore`]): events are handled, then the
//!   checkpoint is saved. After a crash, events after the last saved checkpoint are handled
//!   again; handlers see each event's `global_position` so they can be idempotent.
//! - **Exactly once** (PostgreSQL, in `es-postgres`): the read-model writes and the checkpoint
//!   commit in one transaction.
//! - **Inline** (where a backend allows): the projection runs inside the append itself; see the
//!   backend crates.
//!
//! The runner ([`ProjectionRunner::spawn`]) subscribes from the checkpoint, hands the sink batches
//! of whatever events are ready, retries a failing batch with backoff, and, when an event keeps
//! failing, commits the events before it and stops the projection with a [`ProjectionError`]
//! naming the event. It never skips an event. Each projection reports its position and its lag
//! behind the head, can be rebuilt from position 0 (drop the read model, replay every event),
//! and shuts down gracefully after the batch in hand.
//!
//! # Rebuilds and other runners: checkpoint generations
//!
//! A checkpoint ([`Checkpoint`]) carries a **generation**. A rebuild
//! ([`ProjectionHandle::rebuild`]) drops the read model first, then starts a new generation at
//! position 0 ([`CheckpointStore::reset_checkpoint`]). A sink saves its checkpoints in the
//! generation it loaded; a save naming an older generation fails with [`StoreError::Fenced`]
//! and writes nothing. So a second runner of the same projection (another process, a deployment
//! overlap) that was in the middle of a batch when the projection was rebuilt cannot raise the
//! new generation's checkpoint over events the rebuilt read model does not hold: before
//! generations, its save could make the rebuilding runner resume after it and never replay the
//! events before it. A runner whose batch is fenced **reloads the checkpoint and continues from
//! there** (it does not stop): the events it handled in the fenced batch are handled again,
//! which at-least-once handlers tolerate and exactly-once sinks never commit.
//!
//! Tested by the streaming conformance case `projection_rebuild_racing_a_second_runner` on every
//! store (at least once: a second runner parked in the middle of a batch while the first
//! rebuilds, released after the reset and before the rebuilding runner reloads its checkpoint;
//! afterwards the read model holds every event of the feed) and, exactly once on PostgreSQL, by
//! `es-postgres`'s `rebuild_racing_a_second_runner_applies_every_event_once`.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::contract::position::distance;
use crate::contract::{
    Checkpoint, CheckpointStore, EventFilter, EventStore, LeaseStore, ReadAll, StoreError,
};
use crate::event::RecordedEvent;
use crate::group::{spawn_group, Claim, GroupConfig, GroupHandle};
use crate::retry::{Backoff, Delays};
use crate::stream_id::StreamId;
use crate::telemetry;
use tracing::Instrument;

/// An error from a projection handler.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// An at-least-once projection: a handler for events and a way to drop its read model.
pub trait Projection: Send + 'static {
    /// Stable name; it keys the checkpoint.
    fn name(&self) -> &str;

    /// Which events it consumes.
    fn filter(&self) -> EventFilter {
        EventFilter::all()
    }

    /// Handles one event. May be called again for an event after a crash: use
    /// `event.global_position` to stay idempotent.
    fn handle(
        &mut self,
        event: &RecordedEvent,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Drops the read model, before a rebuild from position 0.
    fn reset(&mut self) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A batch that failed at one of its events.
#[derive(Debug)]
pub struct BatchError {
    /// Index in the batch of the failing event; the batch's length if recording the checkpoint
    /// failed.
    pub index: usize,
    /// How many leading events are durably applied with their checkpoint recorded (0 when a
    /// transaction rolled back). The runner applies the rest of the events before `index` again
    /// as their own batch, then retries the failing event.
    pub applied: usize,
    /// What went wrong. A [`StoreError::Fenced`] here (see [`is_fenced`](Self::is_fenced))
    /// means the projection was rebuilt meanwhile: the runner reloads its checkpoint.
    pub source: HandlerError,
}

impl BatchError {
    /// A batch refused because the checkpoint's generation moved on (the projection was
    /// rebuilt while this batch ran): nothing of it was recorded.
    pub fn fenced(events: usize, source: StoreError) -> Self {
        Self {
            index: events,
            applied: 0,
            source: source.into(),
        }
    }

    /// Whether the batch was refused by a newer generation of the checkpoint
    /// ([`StoreError::Fenced`]).
    pub fn is_fenced(&self) -> bool {
        matches!(
            self.source.downcast_ref::<StoreError>(),
            Some(StoreError::Fenced { .. })
        )
    }
}

/// The mode-specific half of a projection: applies batches and records checkpoints.
pub trait ProjectionSink: Send + 'static {
    /// Stable name.
    fn name(&self) -> &str;

    /// Which events it consumes.
    fn filter(&self) -> EventFilter;

    /// The position handled up to. The sink remembers the checkpoint's generation and records
    /// later checkpoints in it.
    fn checkpoint(&mut self) -> impl Future<Output = Result<u64, HandlerError>> + Send;

    /// Applies `events` in order and records `checkpoint` (the position of the last one, or
    /// further). Exactly-once sinks do both atomically. If the checkpoint's generation is no
    /// longer the one the sink loaded (a rebuild happened meanwhile), the checkpoint is not
    /// recorded and the error [`is_fenced`](BatchError::is_fenced).
    fn apply(
        &mut self,
        events: &[RecordedEvent],
        checkpoint: u64,
    ) -> impl Future<Output = Result<(), BatchError>> + Send;

    /// Drops the read model, then starts a new generation of the checkpoint at position 0 and
    /// adopts it.
    fn reset(&mut self) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Takes feed partition `partition` over, for a consumer-group worker (see
    /// [`crate::group`]): from now on the sink keeps that partition's own checkpoint (named by
    /// [`partition_checkpoint`]), fences it (a new generation at the same position, see
    /// [`CheckpointStore::fence_checkpoint`]) so that every save of an earlier holder is
    /// refused, and returns its position.
    fn claim(&mut self, partition: u32) -> impl Future<Output = Result<u64, HandlerError>> + Send;

    /// The rebuild of a consumer group, run while the group is paused (no worker runs a
    /// partition): starts a new generation at position 0 of the checkpoint of each of the
    /// `partitions` feed partitions ([`partition_checkpoint`]), then drops the read model. In
    /// that order, a crash in between leaves checkpoints at 0 over the old read model, which the
    /// replay overwrites, never a dropped read model behind old checkpoints.
    fn reset_group(
        &mut self,
        partitions: u32,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// The name of the checkpoint that a consumer group keeps for `projection`'s feed partition
/// `partition`: `<projection>#<partition>`.
pub fn partition_checkpoint(projection: &str, partition: u32) -> String {
    format!("{projection}#{partition}")
}

/// Runs a [`Projection`] at least once, with its checkpoint in a [`CheckpointStore`].
///
/// It remembers the generation of the checkpoint it loaded (or started by a reset) and saves in
/// that generation only; once the projection is rebuilt elsewhere, its saves fail with
/// [`StoreError::Fenced`] and the runner reloads the checkpoint.
#[derive(Debug)]
pub struct AtLeastOnce<P, C> {
    projection: P,
    checkpoints: C,
    generation: u64,
    /// The partition claimed, in a consumer group.
    partition: Option<u32>,
}

impl<P: Projection, C: CheckpointStore> AtLeastOnce<P, C> {
    /// Pairs a projection with where its checkpoint lives.
    pub fn new(projection: P, checkpoints: C) -> Self {
        Self {
            projection,
            checkpoints,
            generation: 0,
            partition: None,
        }
    }

    /// The projection (for reading its state).
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// The checkpoint's name: the projection's, or its partition's in a consumer group.
    fn key(&self) -> String {
        match self.partition {
            Some(partition) => partition_checkpoint(self.projection.name(), partition),
            None => self.projection.name().to_owned(),
        }
    }

    async fn save(&mut self, position: u64) -> Result<bool, StoreError> {
        self.checkpoints
            .save_checkpoint(
                &self.key(),
                Checkpoint {
                    position,
                    generation: self.generation,
                },
            )
            .await
    }
}

impl<P: Projection, C: CheckpointStore> ProjectionSink for AtLeastOnce<P, C> {
    fn name(&self) -> &str {
        self.projection.name()
    }

    fn filter(&self) -> EventFilter {
        self.projection.filter()
    }

    async fn checkpoint(&mut self) -> Result<u64, HandlerError> {
        let stored = self.checkpoints.load_checkpoint(&self.key()).await?;
        self.generation = stored.generation;
        Ok(stored.position)
    }

    async fn apply(&mut self, events: &[RecordedEvent], checkpoint: u64) -> Result<(), BatchError> {
        for (index, event) in events.iter().enumerate() {
            if let Err(source) = self.projection.handle(event).await {
                // Record the progress made before the failing event, so it is not handled again.
                let applied = match index.checked_sub(1).map(|i| &events[i]) {
                    Some(last) => match self.save(last.global_position).await {
                        Ok(_) => index,
                        Err(err @ StoreError::Fenced { .. }) => {
                            return Err(BatchError::fenced(events.len(), err))
                        }
                        Err(_) => 0,
                    },
                    None => 0,
                };
                return Err(BatchError {
                    index,
                    applied,
                    source,
                });
            }
        }
        self.save(checkpoint).await.map_err(|e| BatchError {
            index: events.len(),
            applied: 0,
            source: e.into(),
        })?;
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        // The read model first: a runner that loads the new generation must find it empty.
        self.projection.reset().await?;
        let fresh = self.checkpoints.reset_checkpoint(&self.key()).await?;
        self.generation = fresh.generation;
        Ok(())
    }

    async fn claim(&mut self, partition: u32) -> Result<u64, HandlerError> {
        self.partition = Some(partition);
        let fenced = self.checkpoints.fence_checkpoint(&self.key()).await?;
        self.generation = fenced.generation;
        Ok(fenced.position)
    }

    async fn reset_group(&mut self, partitions: u32) -> Result<(), HandlerError> {
        for partition in 0..partitions {
            let name = partition_checkpoint(self.projection.name(), partition);
            self.checkpoints.reset_checkpoint(&name).await?;
        }
        self.projection.reset().await
    }
}

/// An error shared by the clones of a [`ProjectionError`] (statuses are cloneable).
pub type SharedError = Arc<dyn std::error::Error + Send + Sync>;

/// Why a projection stopped. Every variant names the projection.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// An event kept failing; the events before it are applied and their checkpoint recorded.
    #[error(
        "projection `{projection}` stopped at global position {position} ({event_type} \
         {event_id} in `{stream_id}` version {version}) after {attempts} attempts: {source}"
    )]
    Event {
        /// The projection.
        projection: String,
        /// The failing event's global position.
        position: u64,
        /// Its id.
        event_id: uuid::Uuid,
        /// Its type.
        event_type: String,
        /// Its stream.
        stream_id: StreamId,
        /// Its stream version.
        version: u64,
        /// Attempts made.
        attempts: u32,
        /// The handler's last error.
        #[source]
        source: SharedError,
    },
    /// Recording the checkpoint kept failing.
    #[error(
        "projection `{projection}` could not record its checkpoint after {attempts} attempts: \
         {source}"
    )]
    Checkpoint {
        /// The projection.
        projection: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        #[source]
        source: SharedError,
    },
    /// The feed failed in a way retrying cannot fix (say, [`StoreError::LostTail`]).
    #[error("the feed of projection `{projection}` failed: {source}")]
    Feed {
        /// The projection.
        projection: String,
        /// The store's error.
        #[source]
        source: Arc<StoreError>,
    },
    /// The feed ended, which a subscription never does on its own.
    #[error("the feed of projection `{projection}` ended")]
    FeedEnded {
        /// The projection.
        projection: String,
    },
}

impl ProjectionError {
    /// The projection's name.
    pub fn projection(&self) -> &str {
        match self {
            Self::Event { projection, .. }
            | Self::Checkpoint { projection, .. }
            | Self::Feed { projection, .. }
            | Self::FeedEnded { projection } => projection,
        }
    }

    /// The global position of the event that kept failing, if an event failed.
    pub fn position(&self) -> Option<u64> {
        match self {
            Self::Event { position, .. } => Some(*position),
            _ => None,
        }
    }
}

/// Why [`ProjectionHandle::rebuild`] did not drop the read model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RebuildError {
    /// The projection's task has ended (shut down).
    #[error("projection `{projection}` is not running")]
    NotRunning {
        /// The projection.
        projection: String,
    },
    /// The projection's task ended before it answered.
    #[error("projection `{projection}` stopped during the rebuild")]
    Stopped {
        /// The projection.
        projection: String,
    },
    /// A consumer group's workers could not be paused for the rebuild; nothing was dropped and
    /// the group goes on.
    #[error("consumer group of projection `{projection}` could not be paused: {source}")]
    Pause {
        /// The projection.
        projection: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// Dropping the read model or starting a new checkpoint generation failed; the projection
    /// goes on from its checkpoint.
    #[error("projection `{projection}` could not drop its read model: {source}")]
    Reset {
        /// The projection.
        projection: String,
        /// The sink's error.
        #[source]
        source: HandlerError,
    },
}

/// Where a projection stands.
#[derive(Debug, Clone)]
pub enum ProjectionStatus {
    /// Starting: loading the checkpoint.
    Starting,
    /// Consuming events; handled up to `position`.
    Running {
        /// Global position handled up to.
        position: u64,
    },
    /// Dropping the read model before a rebuild.
    Rebuilding,
    /// Stopped on an event that kept failing, or on a feed that failed for good.
    Failed(Box<ProjectionError>),
    /// Shut down.
    Stopped {
        /// Global position handled up to.
        position: u64,
    },
}

/// How the runner retries and batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerConfig {
    /// Attempts per failing event before the projection stops.
    pub max_attempts: u32,
    /// Pauses between attempts (and between attempts to load the checkpoint).
    pub backoff: Backoff,
    /// Most events per batch.
    pub batch_size: usize,
    /// How often the lag gauges (`es_projection_lag_events`, `es_projection_lag_seconds`; see
    /// [`crate::telemetry`]) are sampled: one read of the partition's head, and one
    /// of a single event while behind. `None`: never. Default 1 s.
    pub lag_every: Option<Duration>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(5)),
            batch_size: 1000,
            lag_every: Some(Duration::from_secs(1)),
        }
    }
}

enum Control {
    Rebuild(oneshot::Sender<Result<(), HandlerError>>),
    Shutdown,
}

/// Runs projections over a store's feed.
#[derive(Debug, Clone)]
pub struct ProjectionRunner<S> {
    store: S,
    config: RunnerConfig,
}

/// Controls one running projection.
#[derive(Debug)]
pub struct ProjectionHandle<S> {
    name: String,
    store: S,
    status: watch::Receiver<ProjectionStatus>,
    control: mpsc::Sender<Control>,
    task: tokio::task::JoinHandle<()>,
}

impl<S: EventStore> ProjectionRunner<S> {
    /// A runner over `store` with default settings.
    pub fn new(store: S) -> Self {
        Self::with_config(store, RunnerConfig::default())
    }

    /// A runner over `store` with `config`.
    pub fn with_config(store: S, config: RunnerConfig) -> Self {
        Self { store, config }
    }

    /// Starts `sink` in a task: from its checkpoint, catch up, then follow live appends.
    pub fn spawn<K: ProjectionSink>(&self, sink: K) -> ProjectionHandle<S> {
        let name = sink.name().to_owned();
        let (status_tx, status) = watch::channel(ProjectionStatus::Starting);
        let (control, control_rx) = mpsc::channel(4);
        let worker = Worker {
            store: self.store.clone(),
            config: self.config,
            sink,
            status: status_tx,
            control: control_rx,
            partition: None,
        };
        if let Some(every) = self.config.lag_every {
            let lag = report_lag(self.store.clone(), name.clone(), 0, every, status.clone());
            tokio::spawn(lag);
        }
        let span = tracing::info_span!("es.projection", projection = %name, partition = 0);
        let task = tokio::spawn(tracing::Instrument::instrument(worker.run(), span));
        ProjectionHandle {
            name,
            store: self.store.clone(),
            status,
            control,
            task,
        }
    }
}

impl<S: EventStore + LeaseStore> ProjectionRunner<S> {
    /// Starts this process's worker of the consumer group of a projection (see
    /// [`crate::group`]): the group's workers, here and in other processes, divide the store's
    /// feed partitions among them, and this one runs a sink from `make_sink` for each partition
    /// it takes, from that partition's own fenced checkpoint. The group is named after the
    /// sink. Every worker of a group must run the same projection.
    pub fn spawn_group<K, F>(&self, config: GroupConfig, make_sink: F) -> ProjectionGroup
    where
        K: ProjectionSink,
        F: FnMut() -> K + Send + 'static,
    {
        let make_sink = Arc::new(std::sync::Mutex::new(make_sink));
        let first = (lock(&make_sink))();
        let name = first.name().to_owned();
        let mut first = Some(first);
        let partitions = self.store.partitioning().partitions().end;
        let reset: ResetGroup = {
            let make_sink = Arc::clone(&make_sink);
            Arc::new(move || {
                let mut sink = (lock(&make_sink))();
                Box::pin(async move { sink.reset_group(partitions).await })
            })
        };
        let statuses = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let shared = Arc::clone(&statuses);
        let (store, runner) = (self.store.clone(), self.config);
        let group = spawn_group(
            self.store.clone(),
            format!("projection:{name}"),
            self.store.partitioning().partitions().end,
            config,
            move |mut claim: Claim| {
                let sink = first.take().unwrap_or_else(|| (lock(&make_sink))());
                let (control, control_rx) = mpsc::channel(4);
                let (status, status_rx) = watch::channel(ProjectionStatus::Starting);
                if let Some(every) = runner.lag_every {
                    let lag = report_lag(
                        store.clone(),
                        sink.name().to_owned(),
                        claim.partition,
                        every,
                        status_rx.clone(),
                    );
                    tokio::spawn(lag);
                }
                lock(&shared).insert(claim.partition, status_rx);
                let worker = Worker {
                    store: store.clone(),
                    config: runner,
                    sink,
                    status,
                    control: control_rx,
                    partition: Some(claim.partition),
                };
                let span = tracing::info_span!(
                    "es.projection",
                    projection = worker.sink.name(),
                    partition = claim.partition
                );
                let run = tracing::Instrument::instrument(worker.run(), span);
                async move {
                    tokio::pin!(run);
                    // The stop first: once it is signalled (the lease may run out), the
                    // projection hears `Shutdown` before it is polled for another batch.
                    tokio::select! {
                        biased;
                        () = claim.stopped() => {
                            let _ = control.send(Control::Shutdown).await;
                            run.await;
                        }
                        () = &mut run => {}
                    }
                }
            },
        );
        ProjectionGroup {
            name,
            group,
            statuses,
            reset,
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// This process's worker of a projection's consumer group: see
/// [`ProjectionRunner::spawn_group`].
pub struct ProjectionGroup {
    name: String,
    group: GroupHandle,
    statuses: Arc<std::sync::Mutex<BTreeMap<u32, watch::Receiver<ProjectionStatus>>>>,
    /// A fresh sink's [`ProjectionSink::reset_group`] over every partition.
    reset: ResetGroup,
}

/// What [`ProjectionGroup::rebuild`] runs while the group is paused.
type ResetGroup = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>
        + Send
        + Sync,
>;

impl std::fmt::Debug for ProjectionGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionGroup")
            .field("name", &self.name)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl ProjectionGroup {
    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The partitions this worker runs now.
    pub fn owned(&self) -> Vec<u32> {
        self.group.owned()
    }

    /// Waits until the partitions this worker runs satisfy `done`.
    pub async fn wait_owned(&self, done: impl FnMut(&[u32]) -> bool) -> Vec<u32> {
        self.group.wait_owned(done).await
    }

    /// The status of each partition this worker runs now.
    pub fn statuses(&self) -> BTreeMap<u32, ProjectionStatus> {
        let owned = self.group.owned();
        lock(&self.statuses)
            .iter()
            .filter(|(p, _)| owned.contains(p))
            .map(|(p, status)| (*p, status.borrow().clone()))
            .collect()
    }

    /// Rebuilds the projection from position 0 in every partition, whichever workers run them:
    /// pauses the whole group (every worker, in every process, stops its partitions and takes
    /// none; see [`GroupHandle::pause`]), resets every partition's checkpoint to a new
    /// generation at 0 and drops the read model ([`ProjectionSink::reset_group`]), then lets the
    /// group resume. Returns once the read model is dropped; the workers replay in the
    /// background. No worker's handler runs while the read model is dropped, so the replay
    /// starts from an empty model. A worker frozen past its lease may still run its handler
    /// when it wakes (at least once, as always), but never records a checkpoint.
    pub async fn rebuild(&self) -> Result<(), RebuildError> {
        let paused = self
            .group
            .pause()
            .await
            .map_err(|source| RebuildError::Pause {
                projection: self.name.clone(),
                source,
            })?;
        let result = (self.reset)().await;
        drop(paused);
        result.map_err(|source| RebuildError::Reset {
            projection: self.name.clone(),
            source,
        })
    }

    /// Stops every partition's projection after its batch in hand and hands the partitions to
    /// the other workers at once.
    pub async fn shutdown(self) {
        self.group.shutdown().await;
    }

    /// Ends at once, releasing nothing: what a crash does.
    pub fn kill(self) {
        self.group.kill();
    }
}

impl<S: EventStore> ProjectionHandle<S> {
    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it stands now.
    pub fn status(&self) -> ProjectionStatus {
        self.status.borrow().clone()
    }

    /// The global position handled up to.
    pub fn position(&self) -> u64 {
        match &*self.status.borrow() {
            ProjectionStatus::Running { position } | ProjectionStatus::Stopped { position } => {
                *position
            }
            _ => 0,
        }
    }

    /// Positions between the head of the feed and what the projection has handled.
    pub async fn lag(&self) -> Result<u64, StoreError> {
        let head = self.store.head_position().await?;
        Ok(distance(self.position(), head))
    }

    /// Waits until the projection has handled `position`, or has stopped or failed.
    pub async fn wait_for(&self, position: u64) -> ProjectionStatus {
        let mut rx = self.status.clone();
        let result = rx
            .wait_for(|s| match s {
                ProjectionStatus::Running { position: p } => *p >= position,
                ProjectionStatus::Failed(_) | ProjectionStatus::Stopped { .. } => true,
                ProjectionStatus::Starting | ProjectionStatus::Rebuilding => false,
            })
            .await
            .map(|s| s.clone());
        result.unwrap_or_else(|_| self.status())
    }

    /// Drops the read model and replays every event from position 0. Returns once the read
    /// model is dropped; the replay continues in the background (see [`wait_for`](Self::wait_for)).
    pub async fn rebuild(&self) -> Result<(), RebuildError> {
        let projection = || self.name.clone();
        let (tx, rx) = oneshot::channel();
        self.control
            .send(Control::Rebuild(tx))
            .await
            .map_err(|_| RebuildError::NotRunning {
                projection: projection(),
            })?;
        rx.await
            .map_err(|_| RebuildError::Stopped {
                projection: projection(),
            })?
            .map_err(|source| RebuildError::Reset {
                projection: projection(),
                source,
            })
    }

    /// Finishes the batch in hand, then stops. Returns the final status.
    pub async fn shutdown(self) -> ProjectionStatus {
        let _ = self.control.send(Control::Shutdown).await;
        let _ = self.task.await;
        self.status.borrow().clone()
    }
}

struct Worker<S, K> {
    store: S,
    config: RunnerConfig,
    sink: K,
    status: watch::Sender<ProjectionStatus>,
    control: mpsc::Receiver<Control>,
    /// The feed partition a consumer-group worker claimed; `None`: the single feed.
    partition: Option<u32>,
}

enum Exit {
    Shutdown(u64),
    Rebuild(oneshot::Sender<Result<(), HandlerError>>),
    Failed(ProjectionError),
    /// The checkpoint's generation moved on: reload it and go on from there.
    Fenced,
}

/// Why [`Worker::apply`] gave up on a batch.
enum ApplyError {
    Failed(ProjectionError),
    Fenced,
    /// A control request came between two attempts (in a consumer group: the partition's lease
    /// may run out): the batch is given up, recorded up to the position given, if any.
    Control(Control, Option<u64>),
}

impl<S: EventStore, K: ProjectionSink> Worker<S, K> {
    async fn run(mut self) {
        loop {
            let exit = self.consume().await;
            match exit {
                Exit::Shutdown(position) => {
                    self.status
                        .send_replace(ProjectionStatus::Stopped { position });
                    return;
                }
                Exit::Failed(failure) => {
                    tracing::error!(error = %failure, "projection stopped");
                    self.status
                        .send_replace(ProjectionStatus::Failed(Box::new(failure)));
                    // Stay alive for rebuild or shutdown requests.
                    match self.control.recv().await {
                        Some(Control::Rebuild(reply)) => self.rebuild(reply).await,
                        Some(Control::Shutdown) | None => return,
                    }
                }
                Exit::Rebuild(reply) => self.rebuild(reply).await,
                Exit::Fenced if self.partition.is_some() => {
                    // Another worker of the group took the partition over; the group decides
                    // whether this one claims it again.
                    tracing::warn!("the partition's checkpoint was fenced by another worker");
                    let position = self.position();
                    self.status
                        .send_replace(ProjectionStatus::Stopped { position });
                    return;
                }
                Exit::Fenced => {
                    tracing::warn!(
                        "the projection was rebuilt elsewhere; reloading its checkpoint"
                    );
                }
            }
        }
    }

    fn position(&self) -> u64 {
        match &*self.status.borrow() {
            ProjectionStatus::Running { position } | ProjectionStatus::Stopped { position } => {
                *position
            }
            _ => 0,
        }
    }

    async fn rebuild(&mut self, reply: oneshot::Sender<Result<(), HandlerError>>) {
        self.status.send_replace(ProjectionStatus::Rebuilding);
        let result = self.sink.reset().await;
        if let Err(err) = &result {
            tracing::error!(error = %err, "projection reset failed");
        }
        let _ = reply.send(result);
    }

    /// Loads the checkpoint and consumes the feed until told otherwise or an event keeps failing.
    async fn consume(&mut self) -> Exit {
        let mut backoff = self.config.backoff.delays();
        let mut position = loop {
            let loaded = match self.partition {
                Some(partition) => self.sink.claim(partition).await,
                None => self.sink.checkpoint().await,
            };
            match loaded {
                Ok(position) => break position,
                Err(err) => {
                    tracing::warn!(error = %err, "loading the checkpoint failed; retrying");
                    tokio::select! {
                        Some(control) = self.control.recv() => return Self::on_control(control, 0),
                        () = backoff.sleep() => {}
                    }
                }
            }
        };
        self.status
            .send_replace(ProjectionStatus::Running { position });
        let feed = match self.partition {
            Some(partition) => {
                self.store
                    .subscribe_partition(partition, position, self.sink.filter())
            }
            None => self.store.subscribe(position, self.sink.filter()),
        };
        let mut feed = feed.ready_chunks(self.config.batch_size);
        loop {
            let batch = tokio::select! {
                biased;
                Some(control) = self.control.recv() => return Self::on_control(control, position),
                batch = feed.next() => batch,
            };
            let Some(batch) = batch else {
                return Exit::Failed(ProjectionError::FeedEnded {
                    projection: self.sink.name().to_owned(),
                });
            };
            let mut events = Vec::with_capacity(batch.len());
            let mut feed_error = None;
            for item in batch {
                match item {
                    Ok(event) => events.push(event),
                    Err(err) => {
                        feed_error = Some(err);
                        break;
                    }
                }
            }
            if !events.is_empty() {
                let span = tracing::debug_span!(
                    "es.projection.batch",
                    projection = self.sink.name(),
                    events = events.len(),
                    first_position = events[0].global_position,
                    last_position = events[events.len() - 1].global_position
                );
                match self.apply(&events).instrument(span).await {
                    Ok(()) => {
                        let projection = self.sink.name().to_owned();
                        metrics::counter!(telemetry::PROJECTION_EVENTS, "projection" => projection.clone())
                            .increment(events.len() as u64);
                        metrics::histogram!(telemetry::PROJECTION_BATCH_EVENTS, "projection" => projection)
                            .record(events.len() as u32);
                    }
                    Err(ApplyError::Failed(failure)) => return Exit::Failed(failure),
                    Err(ApplyError::Fenced) => return Exit::Fenced,
                    Err(ApplyError::Control(control, recorded)) => {
                        return Self::on_control(control, recorded.unwrap_or(position))
                    }
                }
                position = events.last().map_or(position, |e| e.global_position);
                self.status
                    .send_replace(ProjectionStatus::Running { position });
            }
            if let Some(err) = feed_error {
                return Exit::Failed(ProjectionError::Feed {
                    projection: self.sink.name().to_owned(),
                    source: Arc::new(err),
                });
            }
        }
    }

    fn on_control(control: Control, position: u64) -> Exit {
        match control {
            Control::Shutdown => Exit::Shutdown(position),
            Control::Rebuild(reply) => Exit::Rebuild(reply),
        }
    }

    /// Applies a batch with retries. When one event keeps failing, applies the events before it,
    /// then retries it alone, and finally reports it.
    async fn apply(&mut self, events: &[RecordedEvent]) -> Result<(), ApplyError> {
        let (mut start, mut end) = (0, events.len());
        let mut attempts = 0;
        let mut backoff: Delays = self.config.backoff.delays();
        while start < events.len() {
            let batch = &events[start..end];
            let checkpoint = batch[batch.len() - 1].global_position;
            let error = match self.sink.apply(batch, checkpoint).await {
                Ok(()) => {
                    (start, end, attempts) = (end, events.len(), 0);
                    backoff.reset();
                    continue;
                }
                Err(error) if error.is_fenced() => return Err(ApplyError::Fenced),
                Err(error) => error,
            };
            let BatchError {
                index,
                applied,
                source,
            } = error;
            let checkpoint_failed = index >= batch.len();
            let failing = start + index;
            start += applied.min(index);
            if !checkpoint_failed && failing > start {
                // Apply what precedes the failing event on its own first.
                end = failing;
                continue;
            }
            end = events.len();
            attempts += 1;
            if attempts >= self.config.max_attempts {
                let event = (!checkpoint_failed).then(|| &events[failing]);
                return Err(ApplyError::Failed(self.failure(
                    event,
                    attempts,
                    Arc::from(source),
                )));
            }
            tracing::warn!(error = %source, attempts, "projection batch failed; retrying");
            metrics::counter!(telemetry::PROJECTION_RETRIES, "projection" => self.sink.name().to_owned())
                .increment(1);
            // A stop (or rebuild) is heard between attempts: a consumer-group worker told to stop
            // because its lease may run out must not go on handling the batch again and again.
            tokio::select! {
                biased;
                Some(control) = self.control.recv() => {
                    let recorded = start.checked_sub(1).map(|i| events[i].global_position);
                    return Err(ApplyError::Control(control, recorded));
                }
                () = backoff.sleep() => {}
            }
        }
        Ok(())
    }

    fn failure(
        &self,
        event: Option<&RecordedEvent>,
        attempts: u32,
        source: SharedError,
    ) -> ProjectionError {
        let projection = self.sink.name().to_owned();
        match event {
            Some(event) => ProjectionError::Event {
                projection,
                position: event.global_position,
                event_id: event.event_id,
                event_type: event.event_type.clone(),
                stream_id: event.stream_id.clone(),
                version: event.stream_version,
                attempts,
                source,
            },
            None => ProjectionError::Checkpoint {
                projection,
                attempts,
                source,
            },
        }
    }
}

/// Samples a projection worker's lag into the gauges of [`telemetry`] every `every`, until the
/// worker ends (its status channel closes); then sets both to 0, since this process no longer
/// works on the partition.
// Lag counts stay far below 2^52, where f64 is exact.
#[allow(clippy::cast_precision_loss)]
async fn report_lag<S: EventStore>(
    store: S,
    projection: String,
    partition: u32,
    every: Duration,
    mut status: watch::Receiver<ProjectionStatus>,
) {
    let labels = [
        ("projection", projection),
        ("partition", partition.to_string()),
    ];
    let events = metrics::gauge!(telemetry::PROJECTION_LAG_EVENTS, &labels);
    let seconds = metrics::gauge!(telemetry::PROJECTION_LAG_SECONDS, &labels);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The position handled up to, read at every change of the status. A watch keeps only the
    // latest status, so a projection that fails right after starting may never be seen
    // running: its failure names the event it stopped at, and everything before that event is
    // handled.
    let mut position = None;
    loop {
        match &*status.borrow_and_update() {
            ProjectionStatus::Running { position: p }
            | ProjectionStatus::Stopped { position: p } => {
                position = Some(*p);
            }
            ProjectionStatus::Failed(failure) => {
                if let Some(at) = failure.position() {
                    position = Some(at.saturating_sub(1));
                }
            }
            _ => {}
        }
        tokio::select! {
            changed = status.changed() => {
                if changed.is_err() {
                    break;
                }
                continue;
            }
            _ = tick.tick() => {}
        }
        let Some(position) = position else { continue };
        match sample_lag(&store, partition, position).await {
            Ok((behind, age)) => {
                events.set(behind as f64);
                seconds.set(age.as_secs_f64());
            }
            Err(err) => tracing::debug!(error = %err, "could not sample the projection's lag"),
        }
    }
    events.set(0.0);
    seconds.set(0.0);
}

/// Positions of `partition` after `position`, and the age of the first of them (zero if none).
async fn sample_lag<S: EventStore>(
    store: &S,
    partition: u32,
    position: u64,
) -> Result<(u64, Duration), StoreError> {
    let head = store.partition_head(partition).await?;
    let behind = distance(position, head);
    if behind == 0 {
        return Ok((0, Duration::ZERO));
    }
    let read = ReadAll::after(position).partition(partition).limit(1);
    let oldest = store.read_all(read).next().await.transpose()?;
    let age = oldest.map_or(Duration::ZERO, |event| {
        (crate::event::now_micros() - event.recorded_at)
            .to_std()
            .unwrap_or(Duration::ZERO)
    });
    Ok((behind, age))
}
