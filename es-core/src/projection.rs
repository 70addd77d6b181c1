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

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};

use crate::event::RecordedEvent;
use crate::store::{EventFilter, EventStore, StoreError, StoreFuture};
use crate::stream_id::StreamId;

/// An error from a projection handler.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Stores projection checkpoints: the global position each projection has handled up to.
pub trait CheckpointStore: Clone + Send + Sync + 'static {
    /// The checkpoint of `name` (0 if it has none).
    fn load_checkpoint(&self, name: &str) -> impl StoreFuture<u64>;

    /// Raises the checkpoint of `name` to `position`. A lower or equal position is ignored, so a
    /// stale runner can never move a checkpoint back. Returns whether it was written.
    fn save_checkpoint(&self, name: &str, position: u64) -> impl StoreFuture<bool>;

    /// Removes the checkpoint of `name` (for a rebuild from position 0).
    fn reset_checkpoint(&self, name: &str) -> impl StoreFuture<()>;
}

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
    /// What went wrong.
    pub source: HandlerError,
}

/// The mode-specific half of a projection: applies batches and records checkpoints.
pub trait ProjectionSink: Send + 'static {
    /// Stable name.
    fn name(&self) -> &str;

    /// Which events it consumes.
    fn filter(&self) -> EventFilter;

    /// The position handled up to.
    fn checkpoint(&mut self) -> impl Future<Output = Result<u64, HandlerError>> + Send;

    /// Applies `events` in order and records `checkpoint` (the position of the last one, or
    /// further). Exactly-once sinks do both atomically.
    fn apply(
        &mut self,
        events: &[RecordedEvent],
        checkpoint: u64,
    ) -> impl Future<Output = Result<(), BatchError>> + Send;

    /// Drops the read model and the checkpoint.
    fn reset(&mut self) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Runs a [`Projection`] at least once, with its checkpoint in a [`CheckpointStore`].
#[derive(Debug)]
pub struct AtLeastOnce<P, C> {
    projection: P,
    checkpoints: C,
}

impl<P: Projection, C: CheckpointStore> AtLeastOnce<P, C> {
    /// Pairs a projection with where its checkpoint lives.
    pub fn new(projection: P, checkpoints: C) -> Self {
        Self {
            projection,
            checkpoints,
        }
    }

    /// The projection (for reading its state).
    pub fn projection(&self) -> &P {
        &self.projection
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
        Ok(self
            .checkpoints
            .load_checkpoint(self.projection.name())
            .await?)
    }

    async fn apply(&mut self, events: &[RecordedEvent], checkpoint: u64) -> Result<(), BatchError> {
        for (index, event) in events.iter().enumerate() {
            if let Err(source) = self.projection.handle(event).await {
                // Record the progress made before the failing event, so it is not handled again.
                let applied = match index.checked_sub(1).map(|i| &events[i]) {
                    Some(last) => {
                        let saved = self
                            .checkpoints
                            .save_checkpoint(self.projection.name(), last.global_position)
                            .await;
                        if saved.is_ok() {
                            index
                        } else {
                            0
                        }
                    }
                    None => 0,
                };
                return Err(BatchError {
                    index,
                    applied,
                    source,
                });
            }
        }
        self.checkpoints
            .save_checkpoint(self.projection.name(), checkpoint)
            .await
            .map_err(|e| BatchError {
                index: events.len(),
                applied: 0,
                source: e.into(),
            })?;
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        self.projection.reset().await?;
        self.checkpoints
            .reset_checkpoint(self.projection.name())
            .await?;
        Ok(())
    }
}

/// A projection stopped on an event that kept failing. Names the event.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "projection `{projection}` stopped at global position {position} ({event_type} {event_id} in \
     `{stream}` version {version}) after {attempts} attempts: {reason}"
)]
pub struct ProjectionError {
    /// The projection.
    pub projection: String,
    /// The failing event's global position.
    pub position: u64,
    /// Its id.
    pub event_id: uuid::Uuid,
    /// Its type.
    pub event_type: String,
    /// Its stream.
    pub stream: StreamId,
    /// Its stream version.
    pub version: u64,
    /// Attempts made.
    pub attempts: u32,
    /// The handler's last error, as text.
    pub reason: String,
}

/// Where a projection stands.
#[derive(Debug, Clone, PartialEq)]
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
    /// Stopped on an event that kept failing.
    Failed(Box<ProjectionFailure>),
    /// Shut down.
    Stopped {
        /// Global position handled up to.
        position: u64,
    },
}

/// The failure a [`ProjectionStatus::Failed`] carries (kept as text so statuses stay cloneable).
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionFailure {
    /// The failing event's position, if an event failed (not the checkpoint store).
    pub position: Option<u64>,
    /// The full error message.
    pub message: String,
}

/// How the runner retries and batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerConfig {
    /// Attempts per failing event before the projection stops.
    pub max_attempts: u32,
    /// First retry delay; doubled per attempt.
    pub backoff: Duration,
    /// Most events per batch.
    pub batch_size: usize,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff: Duration::from_millis(50),
            batch_size: 1000,
        }
    }
}

enum Control {
    Rebuild(oneshot::Sender<Result<(), String>>),
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
        };
        let span = tracing::info_span!("es.projection", projection = %name);
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
        Ok(self
            .store
            .head_position()
            .await?
            .saturating_sub(self.position()))
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
    pub async fn rebuild(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(Control::Rebuild(tx))
            .await
            .map_err(|_| "the projection is not running".to_owned())?;
        rx.await
            .map_err(|_| "the projection stopped during the rebuild".to_owned())?
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
}

enum Exit {
    Shutdown(u64),
    Rebuild(oneshot::Sender<Result<(), String>>),
    Failed(ProjectionFailure),
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
                    tracing::error!(message = %failure.message, "projection stopped");
                    self.status
                        .send_replace(ProjectionStatus::Failed(Box::new(failure)));
                    // Stay alive for rebuild or shutdown requests.
                    match self.control.recv().await {
                        Some(Control::Rebuild(reply)) => self.rebuild(reply).await,
                        Some(Control::Shutdown) | None => return,
                    }
                }
                Exit::Rebuild(reply) => self.rebuild(reply).await,
            }
        }
    }

    async fn rebuild(&mut self, reply: oneshot::Sender<Result<(), String>>) {
        self.status.send_replace(ProjectionStatus::Rebuilding);
        let result = self.sink.reset().await.map_err(|e| e.to_string());
        if let Err(err) = &result {
            tracing::error!(error = %err, "projection reset failed");
        }
        let _ = reply.send(result);
    }

    /// Loads the checkpoint and consumes the feed until told otherwise or an event keeps failing.
    async fn consume(&mut self) -> Exit {
        let mut backoff = self.config.backoff;
        let mut position = loop {
            match self.sink.checkpoint().await {
                Ok(position) => break position,
                Err(err) => {
                    tracing::warn!(error = %err, "loading the checkpoint failed; retrying");
                    tokio::select! {
                        Some(control) = self.control.recv() => return Self::on_control(control, 0),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        self.status
            .send_replace(ProjectionStatus::Running { position });
        let mut feed = self
            .store
            .subscribe(position, self.sink.filter())
            .ready_chunks(self.config.batch_size);
        loop {
            let batch = tokio::select! {
                biased;
                Some(control) = self.control.recv() => return Self::on_control(control, position),
                batch = feed.next() => batch,
            };
            let Some(batch) = batch else {
                return Exit::Failed(ProjectionFailure {
                    position: None,
                    message: format!("the feed of projection `{}` ended", self.sink.name()),
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
                if let Err(failure) = self.apply(&events).await {
                    return Exit::Failed(failure);
                }
                position = events.last().map_or(position, |e| e.global_position);
                self.status
                    .send_replace(ProjectionStatus::Running { position });
            }
            if let Some(err) = feed_error {
                return Exit::Failed(ProjectionFailure {
                    position: None,
                    message: format!(
                        "the feed of projection `{}` failed: {err}",
                        self.sink.name()
                    ),
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
    async fn apply(&mut self, events: &[RecordedEvent]) -> Result<(), ProjectionFailure> {
        let (mut start, mut end) = (0, events.len());
        let mut attempts = 0;
        let mut backoff = self.config.backoff;
        while start < events.len() {
            let batch = &events[start..end];
            let checkpoint = batch[batch.len() - 1].global_position;
            let Err(BatchError {
                index,
                applied,
                source,
            }) = self.sink.apply(batch, checkpoint).await
            else {
                (start, end, attempts) = (end, events.len(), 0);
                continue;
            };
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
                return Err(self.failure(event, attempts, &*source));
            }
            tracing::warn!(error = %source, attempts, "projection batch failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        Ok(())
    }

    fn failure(
        &self,
        event: Option<&RecordedEvent>,
        attempts: u32,
        source: &(dyn std::error::Error + Send + Sync),
    ) -> ProjectionFailure {
        match event {
            Some(event) => ProjectionFailure {
                position: Some(event.global_position),
                message: ProjectionError {
                    projection: self.sink.name().to_owned(),
                    position: event.global_position,
                    event_id: event.event_id,
                    event_type: event.event_type.clone(),
                    stream: event.stream_id.clone(),
                    version: event.stream_version,
                    attempts,
                    reason: source.to_string(),
                }
                .to_string(),
            },
            None => ProjectionFailure {
                position: None,
                message: format!(
                    "projection `{}` could not record its checkpoint after {attempts} attempts: {source}",
                    self.sink.name()
                ),
            },
        }
    }
}
