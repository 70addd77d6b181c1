//! The typed repository: loads aggregates (snapshot + newer events, upcast, applied), runs
//! commands, appends with optimistic concurrency, retries conflicts, and snapshots by policy.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tracing::Instrument;

use crate::aggregate::Aggregate;
use crate::event::{now_micros, DomainEvent, Metadata, NewEvent, RecordedEvent};
use crate::outbox::{OutboxMessage, Translator};
use crate::store::{
    AppendRequest, AppendResult, ExpectedVersion, ReadStream, SnapshotRecord, Store, StoreError,
};
use crate::stream_id::{InvalidStreamId, StreamId};
use crate::upcast::{DecodeError, UpcastChainError, Upcaster, Upcasters};

/// When to snapshot an aggregate after a command.
#[derive(Clone, Default)]
pub enum SnapshotPolicy {
    /// Never (the default).
    #[default]
    Never,
    /// When at least this many events were appended since the last snapshot.
    EveryNEvents(u64),
    /// A custom rule.
    Custom(Arc<dyn Fn(&SnapshotContext<'_>) -> bool + Send + Sync>),
}

impl fmt::Debug for SnapshotPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Never => f.write_str("Never"),
            Self::EveryNEvents(n) => write!(f, "EveryNEvents({n})"),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// What a [`SnapshotPolicy::Custom`] rule sees after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotContext<'a> {
    /// The aggregate's stream.
    pub stream: &'a StreamId,
    /// The stream version after the command.
    pub version: u64,
    /// The stream version before the command.
    pub previous_version: u64,
    /// The version of the snapshot the aggregate was loaded from, if any.
    pub last_snapshot_version: Option<u64>,
}

impl SnapshotPolicy {
    fn should_snapshot(&self, ctx: &SnapshotContext<'_>) -> bool {
        match self {
            Self::Never => false,
            Self::EveryNEvents(n) => ctx.version - ctx.last_snapshot_version.unwrap_or(0) >= *n,
            Self::Custom(rule) => rule(ctx),
        }
    }
}

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per command when the stream moved on between load and append (1 = no retry).
    pub max_attempts: u32,
    /// Attempts per append when the store is unreachable; the same request is re-sent, which is
    /// idempotent by event id.
    pub max_transient_attempts: u32,
    /// Delay before the first retry; doubled each time.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            max_transient_attempts: 5,
            backoff: Duration::from_millis(5),
        }
    }
}

/// Errors of repository operations on aggregate type `A`; every variant names the stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepositoryError<E: std::error::Error + 'static> {
    /// The aggregate rejected the command.
    #[error("`{stream}` at version {version} rejected the command: {source}")]
    Domain {
        /// The aggregate's stream.
        stream: StreamId,
        /// The version the command was decided at.
        version: u64,
        /// The domain error.
        #[source]
        source: E,
    },
    /// The stream kept moving between load and append; retries were exhausted.
    #[error(
        "conflict on `{stream}`: expected version {expected}, found {actual}, after {attempts} attempt(s)"
    )]
    Conflict {
        /// The aggregate's stream.
        stream: StreamId,
        /// The version the last attempt was decided at.
        expected: u64,
        /// The version the store reported.
        actual: u64,
        /// Attempts made.
        attempts: u32,
    },
    /// A stored event could not be decoded or upcast.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// An emitted event could not be serialized.
    #[error("cannot serialize event `{event_type}` for `{stream}`: {source}")]
    Encode {
        /// The aggregate's stream.
        stream: StreamId,
        /// The event's type.
        event_type: &'static str,
        /// The serialization error.
        #[source]
        source: serde_json::Error,
    },
    /// The aggregate id is not valid in a stream id.
    #[error(transparent)]
    InvalidId(#[from] InvalidStreamId),
    /// The store failed.
    #[error("store error on `{stream}` at version {version}: {source}")]
    Store {
        /// The aggregate's stream.
        stream: StreamId,
        /// The last version known when it failed.
        version: u64,
        /// The store error.
        #[source]
        source: StoreError,
    },
}

/// An aggregate loaded from the store.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    /// Its stream.
    pub stream: StreamId,
    /// Its state.
    pub aggregate: A,
    /// The stream version it reflects (0 for an aggregate with no events).
    pub version: u64,
    /// The version of the snapshot it was started from, if one was used.
    pub snapshot_version: Option<u64>,
    /// How many stored events were read on top of the snapshot.
    pub events_read: u64,
    /// The id of the stream's event at `version` (`None` at version 0, or when a snapshot
    /// without one was used and no event was read on top of it).
    pub last_event_id: Option<uuid::Uuid>,
}

/// The outcome of a successful command.
#[derive(Debug, Clone)]
pub struct Executed<A: Aggregate> {
    /// The aggregate's stream.
    pub stream: StreamId,
    /// The state after the command.
    pub aggregate: A,
    /// The stream version after the command.
    pub version: u64,
    /// The events the command emitted (empty if it changed nothing).
    pub events: Vec<A::Event>,
    /// Their ids, in order.
    pub event_ids: Vec<uuid::Uuid>,
    /// Their global positions, in order.
    pub positions: Vec<u64>,
    /// Attempts it took (more than 1 after conflicts).
    pub attempts: u32,
    /// Whether a snapshot was written after it.
    pub snapshot_saved: bool,
}

/// Which past state to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// The state after stream version `v` (or the latest, if the stream is shorter).
    Version(u64),
    /// The state made of the stream's events at or below global position `p`.
    Position(u64),
    /// The state made of the stream's events recorded at or before `t`.
    Time(DateTime<Utc>),
}

/// A decoded snapshot to replay from.
struct Snapshot<A> {
    state: A,
    version: u64,
    event_id: Option<uuid::Uuid>,
}

/// Where a replay starts.
enum Start<A> {
    Empty,
    Snapshot(Snapshot<A>),
}

#[derive(Clone, Copy)]
enum Until {
    Latest,
    Past(AsOf),
}

/// Why a repository could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The upcasters registered for an aggregate's events do not form a valid chain.
    #[error("upcasters of `{category}`: {source}")]
    Upcasters {
        /// The aggregate's category.
        category: &'static str,
        /// What is wrong with the chain.
        #[source]
        source: UpcastChainError,
    },
}

/// Validates a list of upcasters against one event enum's current schemas.
type ValidateChain = fn(Vec<Arc<dyn Upcaster>>) -> Result<Upcasters, UpcastChainError>;

struct PendingUpcasters {
    category: &'static str,
    validate: ValidateChain,
    upcasters: Vec<Arc<dyn Upcaster>>,
}

/// Configures a [`Repository`].
pub struct RepositoryBuilder<S> {
    store: S,
    upcasters: HashMap<TypeId, PendingUpcasters>,
    translators: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    snapshot_policies: HashMap<TypeId, SnapshotPolicy>,
    default_snapshot_policy: SnapshotPolicy,
    retry: RetryPolicy,
}

impl<S: Store> RepositoryBuilder<S> {
    /// Registers an upcaster for the events of aggregate `A`.
    pub fn upcaster<A: Aggregate>(mut self, upcaster: impl Upcaster) -> Self {
        self.upcasters
            .entry(TypeId::of::<A::Event>())
            .or_insert_with(|| PendingUpcasters {
                category: A::CATEGORY,
                validate: Upcasters::for_events::<A::Event>,
                upcasters: Vec::new(),
            })
            .upcasters
            .push(Arc::new(upcaster));
        self
    }

    /// Translates the events of aggregate `A` into integration events, recorded in the outbox
    /// atomically with them (see [`crate::outbox`]). One translator per aggregate type.
    pub fn translator<A: Aggregate, T: Translator<A>>(mut self, translator: T) -> Self {
        let erased: Box<ErasedTranslator<A>> = Box::new(move |stream, events, stored, metadata| {
            translate(&translator, stream, events, stored, metadata)
        });
        self.translators.insert(TypeId::of::<A>(), Box::new(erased));
        self
    }

    /// Sets the snapshot policy of aggregate `A`.
    pub fn snapshot_policy<A: Aggregate>(mut self, policy: SnapshotPolicy) -> Self {
        self.snapshot_policies.insert(TypeId::of::<A>(), policy);
        self
    }

    /// Sets the snapshot policy of aggregates without their own.
    pub fn default_snapshot_policy(mut self, policy: SnapshotPolicy) -> Self {
        self.default_snapshot_policy = policy;
        self
    }

    /// Sets the retry policy.
    pub fn retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Validates the configuration (upcaster chains) and builds the repository.
    pub fn build(self) -> Result<Repository<S>, BuildError> {
        let mut upcasters = HashMap::new();
        for (type_id, pending) in self.upcasters {
            let chain =
                (pending.validate)(pending.upcasters).map_err(|source| BuildError::Upcasters {
                    category: pending.category,
                    source,
                })?;
            upcasters.insert(type_id, chain);
        }
        Ok(Repository {
            inner: Arc::new(Inner {
                store: self.store,
                upcasters,
                translators: self.translators,
                snapshot_policies: self.snapshot_policies,
                default_snapshot_policy: self.default_snapshot_policy,
                retry: self.retry,
            }),
        })
    }
}

struct Inner<S> {
    store: S,
    upcasters: HashMap<TypeId, Upcasters>,
    translators: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    snapshot_policies: HashMap<TypeId, SnapshotPolicy>,
    default_snapshot_policy: SnapshotPolicy,
    retry: RetryPolicy,
}

/// Loads and changes aggregates of any type on one store. Cheap to clone, `Send + Sync`.
pub struct Repository<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Repository<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S> fmt::Debug for Repository<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Repository")
            .field("retry", &self.inner.retry)
            .field(
                "default_snapshot_policy",
                &self.inner.default_snapshot_policy,
            )
            .finish_non_exhaustive()
    }
}

static NO_UPCASTERS: std::sync::LazyLock<Upcasters> = std::sync::LazyLock::new(Upcasters::default);

type RepoResult<T, A> = Result<T, RepositoryError<<A as Aggregate>::Error>>;

impl<S: Store> Repository<S> {
    /// A repository on `store` with default policies (no snapshots, 5 attempts on conflict).
    pub fn new(store: S) -> Self {
        Self::builder(store)
            .build()
            .unwrap_or_else(|_| unreachable!("no upcasters to validate"))
    }

    /// Starts configuring a repository on `store`.
    pub fn builder(store: S) -> RepositoryBuilder<S> {
        RepositoryBuilder {
            store,
            upcasters: HashMap::new(),
            translators: HashMap::new(),
            snapshot_policies: HashMap::new(),
            default_snapshot_policy: SnapshotPolicy::Never,
            retry: RetryPolicy::default(),
        }
    }

    /// The underlying store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// The validated upcasters of event enum `E` (empty if none were registered).
    pub fn upcasters<E: DomainEvent>(&self) -> &Upcasters {
        self.inner
            .upcasters
            .get(&TypeId::of::<E>())
            .unwrap_or(&NO_UPCASTERS)
    }

    /// Upcasts and decodes one stored event of aggregate `A` into typed events.
    pub fn decode<A: Aggregate>(
        &self,
        event: &RecordedEvent,
    ) -> Result<Vec<A::Event>, DecodeError> {
        self.upcasters::<A::Event>().decode(event)
    }

    /// The stream id of aggregate `A` with id `id`.
    pub fn stream_id<A: Aggregate>(id: &str) -> Result<StreamId, InvalidStreamId> {
        StreamId::new(A::CATEGORY, id)
    }

    fn snapshot_policy<A: Aggregate>(&self) -> &SnapshotPolicy {
        self.inner
            .snapshot_policies
            .get(&TypeId::of::<A>())
            .unwrap_or(&self.inner.default_snapshot_policy)
    }

    /// Loads the current state of aggregate `id`: from its latest usable snapshot plus the newer
    /// events. An aggregate with no events loads as `A::default()` at version 0.
    pub async fn load<A: Aggregate>(&self, id: &str) -> RepoResult<Loaded<A>, A> {
        let stream = Self::stream_id::<A>(id)?;
        self.load_stream(stream, Until::Latest).await
    }

    /// Loads aggregate `id` as it was at a version, a global position or a time.
    pub async fn load_as_of<A: Aggregate>(
        &self,
        id: &str,
        as_of: AsOf,
    ) -> RepoResult<Loaded<A>, A> {
        let stream = Self::stream_id::<A>(id)?;
        self.load_stream(stream, Until::Past(as_of)).await
    }

    /// Loads aggregate `id` from its events only, ignoring snapshots.
    pub async fn load_without_snapshot<A: Aggregate>(&self, id: &str) -> RepoResult<Loaded<A>, A> {
        let stream = Self::stream_id::<A>(id)?;
        self.replay(stream, Start::Empty, Until::Latest).await
    }

    async fn load_stream<A: Aggregate>(
        &self,
        stream: StreamId,
        until: Until,
    ) -> RepoResult<Loaded<A>, A> {
        let span = tracing::debug_span!("es.load", stream = %stream, version = tracing::field::Empty, events = tracing::field::Empty);
        async move {
            let start = match self.usable_snapshot::<A>(&stream, until).await {
                Some(snapshot) => Start::Snapshot(snapshot),
                None => Start::Empty,
            };
            let loaded = self.replay(stream, start, until).await?;
            tracing::Span::current().record("version", loaded.version);
            tracing::Span::current().record("events", loaded.events_read);
            Ok(loaded)
        }
        .instrument(span)
        .await
    }

    /// The stored snapshot, if the policy allows, it fits `until`, and it decodes.
    async fn usable_snapshot<A: Aggregate>(
        &self,
        stream: &StreamId,
        until: Until,
    ) -> Option<Snapshot<A>> {
        if matches!(self.snapshot_policy::<A>(), SnapshotPolicy::Never) {
            return None;
        }
        let record = match self.inner.store.load_snapshot(stream).await {
            Ok(record) => record?,
            Err(err) => {
                tracing::warn!(stream = %stream, error = %err, "snapshot load failed; replaying events");
                return None;
            }
        };
        match until {
            Until::Latest => {}
            Until::Past(AsOf::Version(v)) if record.version <= v => {}
            Until::Past(_) => return None,
        }
        if record.version == 0 {
            return None;
        }
        if record.schema_version != A::SNAPSHOT_VERSION {
            tracing::info!(stream = %stream, stored = record.schema_version, current = A::SNAPSHOT_VERSION,
                "snapshot schema changed; replaying events");
            return None;
        }
        match serde_json::from_slice(&record.payload) {
            Ok(state) => Some(Snapshot {
                state,
                version: record.version,
                event_id: record.event_id,
            }),
            Err(err) => {
                tracing::warn!(stream = %stream, error = %err, "snapshot does not decode; replaying events");
                None
            }
        }
    }

    /// Replays the stream onto `start`. From a snapshot, the read begins at the snapshot's own
    /// version: the stream must still hold an event there (with the snapshot's event id, when it
    /// has one). If it does not, the snapshot does not belong to the stream as it is now (the
    /// stream was restored from an older backup, its events were lost, the snapshot was edited):
    /// it is ignored with a warning and the replay starts again from the first event.
    async fn replay<A: Aggregate>(
        &self,
        stream: StreamId,
        mut start: Start<A>,
        until: Until,
    ) -> RepoResult<Loaded<A>, A> {
        'replay: loop {
            let (mut aggregate, mut version, check) = match start {
                Start::Empty => (A::default(), 0, None),
                Start::Snapshot(s) => (s.state, s.version, Some(s.event_id)),
            };
            start = Start::Empty;
            let snapshot_version = check.is_some().then_some(version);
            let mut last_event_id = None;
            let first = if check.is_some() {
                version
            } else {
                version + 1
            };
            let mut read = ReadStream::forward().from(first);
            if let Until::Past(AsOf::Version(v)) = until {
                if v < first {
                    return Ok(Loaded {
                        stream,
                        aggregate,
                        version,
                        snapshot_version,
                        events_read: 0,
                        last_event_id,
                    });
                }
                read = read.limit(v - first + 1);
            }
            let upcasters = self.upcasters::<A::Event>();
            let mut events = self.inner.store.read_stream(&stream, read);
            let mut events_read = 0;
            let mut checked = check.is_none();
            while let Some(event) = events.next().await {
                let event = event.map_err(|source| RepositoryError::Store {
                    stream: stream.clone(),
                    version,
                    source,
                })?;
                if !checked {
                    let expected_id = check.flatten();
                    if event.stream_version != version
                        || expected_id.is_some_and(|id| id != event.event_id)
                    {
                        tracing::warn!(stream = %stream, snapshot_version = version,
                            snapshot_event = ?expected_id, stream_event = %event.event_id,
                            stream_event_version = event.stream_version,
                            "snapshot does not match the stream's events; deleting it and \
                             replaying every event");
                        self.discard_snapshot(&stream, version).await;
                        continue 'replay;
                    }
                    checked = true;
                    last_event_id = Some(event.event_id);
                    continue;
                }
                let past_bound = match until {
                    Until::Past(AsOf::Position(p)) => event.global_position > p,
                    Until::Past(AsOf::Time(t)) => event.recorded_at > t,
                    _ => false,
                };
                if past_bound {
                    break;
                }
                if event.stream_version != version + 1 {
                    return Err(RepositoryError::Store {
                        stream: stream.clone(),
                        version,
                        source: StoreError::corrupt_at(
                            &stream,
                            event.stream_version,
                            format!("expected version {} next", version + 1),
                        ),
                    });
                }
                upcasters.decode_into::<A::Event>(&event, |e| aggregate.evolve(&e))?;
                version = event.stream_version;
                last_event_id = Some(event.event_id);
                events_read += 1;
            }
            if !checked {
                tracing::warn!(stream = %stream, snapshot_version = version,
                    "snapshot is ahead of its stream (the stream has no event at its version); \
                     deleting it and replaying every event");
                self.discard_snapshot(&stream, version).await;
                continue 'replay;
            }
            return Ok(Loaded {
                stream,
                aggregate,
                version,
                snapshot_version,
                events_read,
                last_event_id,
            });
        }
    }

    /// Deletes a snapshot found not to match its stream; a failure is logged (the next load finds
    /// it again and ignores it again).
    async fn discard_snapshot(&self, stream: &StreamId, version: u64) {
        if let Err(err) = self.inner.store.delete_snapshot(stream, version).await {
            tracing::warn!(stream = %stream, version, error = %err, "could not delete a snapshot that does not match its stream");
        }
    }

    /// Runs `command` on aggregate `id` with empty metadata. See [`execute_with`](Self::execute_with).
    pub async fn execute<A: Aggregate>(
        &self,
        id: &str,
        command: &A::Command,
    ) -> RepoResult<Executed<A>, A> {
        self.execute_with(id, command, &Metadata::default()).await
    }

    /// Runs `command` on aggregate `id`: loads it, decides, appends the events with the loaded
    /// version as the expected version, and applies them. On a conflict it reloads and decides
    /// again, up to the retry policy. Every event carries `metadata`.
    pub async fn execute_with<A: Aggregate>(
        &self,
        id: &str,
        command: &A::Command,
        metadata: &Metadata,
    ) -> RepoResult<Executed<A>, A> {
        let stream = Self::stream_id::<A>(id)?;
        let span = tracing::info_span!("es.execute", category = A::CATEGORY, stream = %stream,
            version = tracing::field::Empty, events = tracing::field::Empty, attempts = tracing::field::Empty);
        self.execute_stream(stream, command, metadata)
            .instrument(span)
            .await
    }

    async fn execute_stream<A: Aggregate>(
        &self,
        stream: StreamId,
        command: &A::Command,
        metadata: &Metadata,
    ) -> RepoResult<Executed<A>, A> {
        let retry = self.inner.retry;
        let mut backoff = retry.backoff;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let loaded: Loaded<A> = self.load_stream(stream.clone(), Until::Latest).await?;
            let Loaded {
                mut aggregate,
                version,
                snapshot_version,
                ..
            } = loaded;
            let events = aggregate
                .handle(command)
                .map_err(|source| RepositoryError::Domain {
                    stream: stream.clone(),
                    version,
                    source,
                })?;
            if events.is_empty() {
                return Ok(Executed {
                    stream,
                    aggregate,
                    version,
                    events,
                    event_ids: Vec::new(),
                    positions: Vec::new(),
                    attempts,
                    snapshot_saved: false,
                });
            }
            let new_events = encode_events::<A>(&stream, &events, metadata)?;
            let event_ids: Vec<uuid::Uuid> = new_events.iter().map(|e| e.event_id).collect();
            let outbox = self.translate::<A>(&stream, &events, &new_events, metadata)?;
            let request =
                AppendRequest::new(stream.clone(), ExpectedVersion::Exact(version), new_events)
                    .with_outbox(outbox);
            match self.append(request).await {
                Ok(result) => {
                    for event in &events {
                        aggregate.evolve(event);
                    }
                    let span = tracing::Span::current();
                    span.record("version", result.stream_version);
                    span.record("events", events.len());
                    span.record("attempts", attempts);
                    let ctx = SnapshotContext {
                        stream: &stream,
                        version: result.stream_version,
                        previous_version: version,
                        last_snapshot_version: snapshot_version,
                    };
                    let snapshot_saved = self.snapshot_policy::<A>().should_snapshot(&ctx)
                        && self
                            .save_snapshot(
                                &stream,
                                &aggregate,
                                result.stream_version,
                                event_ids.last().copied(),
                            )
                            .await;
                    return Ok(Executed {
                        stream,
                        aggregate,
                        version: result.stream_version,
                        events,
                        event_ids,
                        positions: result.positions,
                        attempts,
                        snapshot_saved,
                    });
                }
                Err(StoreError::Conflict { actual, .. }) => {
                    if attempts >= retry.max_attempts {
                        return Err(RepositoryError::Conflict {
                            stream,
                            expected: version,
                            actual,
                            attempts,
                        });
                    }
                    tracing::debug!(stream = %stream, expected = version, actual, attempts, "conflict; retrying command");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(source) => {
                    return Err(RepositoryError::Store {
                        stream,
                        version,
                        source,
                    })
                }
            }
        }
    }

    /// The outbox messages of `A`'s translator for these events (none without a translator).
    fn translate<A: Aggregate>(
        &self,
        stream: &StreamId,
        events: &[A::Event],
        stored: &[NewEvent],
        metadata: &Metadata,
    ) -> RepoResult<Vec<OutboxMessage>, A> {
        let Some(erased) = self.inner.translators.get(&TypeId::of::<A>()) else {
            return Ok(Vec::new());
        };
        let Some(translate) = erased.downcast_ref::<Box<ErasedTranslator<A>>>() else {
            unreachable!("translators are keyed by their aggregate type");
        };
        translate(stream, events, stored, metadata).map_err(|(event_type, source)| {
            RepositoryError::Encode {
                stream: stream.clone(),
                event_type,
                source,
            }
        })
    }

    /// Appends, re-sending the same request (same event ids) while the store is unreachable.
    async fn append(&self, request: AppendRequest) -> Result<AppendResult, StoreError> {
        let span = tracing::debug_span!("es.append", stream = %request.stream,
            expected = %request.expected, events = request.events.len());
        async move {
            let mut backoff = self.inner.retry.backoff;
            let mut attempt = 1;
            loop {
                match self.inner.store.append(request.clone()).await {
                    Err(err) if err.is_transient() && attempt < self.inner.retry.max_transient_attempts => {
                        tracing::warn!(error = %err, attempt, "append failed transiently; re-sending the same batch");
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                        attempt += 1;
                    }
                    other => return other,
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Serializes and stores a snapshot; a failure is logged, never returned.
    async fn save_snapshot<A: Aggregate>(
        &self,
        stream: &StreamId,
        aggregate: &A,
        version: u64,
        event_id: Option<uuid::Uuid>,
    ) -> bool {
        let payload = match serde_json::to_vec(aggregate) {
            Ok(p) => Bytes::from(p),
            Err(err) => {
                tracing::warn!(stream = %stream, error = %err, "snapshot does not serialize; skipped");
                return false;
            }
        };
        let record = SnapshotRecord {
            stream_id: stream.clone(),
            version,
            schema_version: A::SNAPSHOT_VERSION,
            payload,
            recorded_at: now_micros(),
            event_id,
        };
        match self.inner.store.save_snapshot(record).await {
            Ok(written) => written,
            Err(err) => {
                tracing::warn!(stream = %stream, error = %err, "snapshot write failed; the command stands");
                false
            }
        }
    }

    /// Takes a snapshot of aggregate `id` now, whatever the policy. Returns the version it was
    /// taken at and whether it was written (a newer one may exist).
    pub async fn snapshot<A: Aggregate>(&self, id: &str) -> RepoResult<(u64, bool), A> {
        let loaded = self.load::<A>(id).await?;
        let saved = loaded.version > 0
            && self
                .save_snapshot(
                    &loaded.stream,
                    &loaded.aggregate,
                    loaded.version,
                    loaded.last_event_id,
                )
                .await;
        Ok((loaded.version, saved))
    }
}

/// A translator with its message type erased.
type ErasedTranslator<A> = dyn Fn(
        &StreamId,
        &[<A as Aggregate>::Event],
        &[NewEvent],
        &Metadata,
    ) -> Result<Vec<OutboxMessage>, (&'static str, serde_json::Error)>
    + Send
    + Sync;

/// Translates the events of one command into outbox messages: each carries the source event's
/// id as its causation and the command's correlation and actor.
fn translate<A: Aggregate, T: Translator<A>>(
    translator: &T,
    stream: &StreamId,
    events: &[A::Event],
    stored: &[NewEvent],
    metadata: &Metadata,
) -> Result<Vec<OutboxMessage>, (&'static str, serde_json::Error)> {
    let mut out = Vec::new();
    for (event, new) in events.iter().zip(stored) {
        for message in translator.translate(stream, event) {
            let payload = message
                .to_payload()
                .map_err(|e| (message.event_type(), e))?;
            out.push(OutboxMessage {
                message_id: uuid::Uuid::now_v7(),
                source_event_id: new.event_id,
                topic: translator.topic().to_owned(),
                key: stream.to_string(),
                message_type: message.event_type().to_owned(),
                schema_version: message.schema_version(),
                payload: Bytes::from(payload),
                metadata: Metadata {
                    correlation_id: metadata.correlation_id.or(Some(new.event_id)),
                    causation_id: Some(new.event_id),
                    actor: metadata.actor.clone(),
                    custom: metadata.custom.clone(),
                },
            });
        }
    }
    Ok(out)
}

fn encode_events<A: Aggregate>(
    stream: &StreamId,
    events: &[A::Event],
    metadata: &Metadata,
) -> RepoResult<Vec<NewEvent>, A> {
    events
        .iter()
        .map(|event| {
            NewEvent::from_domain(event)
                .map(|e| e.with_metadata(metadata.clone()))
                .map_err(|source| RepositoryError::Encode {
                    stream: stream.clone(),
                    event_type: event.event_type(),
                    source,
                })
        })
        .collect()
}
