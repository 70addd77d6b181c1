//! The typed repository: loads aggregates (snapshot + newer events, upcast, applied), runs
//! commands, appends with optimistic concurrency, retries conflicts, and snapshots by policy.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::aggregate::Aggregate;
use crate::contract::{Store, StoreError};
use crate::event::{DomainEvent, RecordedEvent};
use crate::outbox::Translator;
use crate::retry::Backoff;
use crate::stream_id::{InvalidStreamId, StreamId};
use crate::upcast::{DecodeError, UpcastChainError, Upcaster, Upcasters};

mod close;
mod command;
mod lane;
mod load;
mod snapshot;
mod two;

use command::ErasedTranslator;
pub use snapshot::{SnapshotContext, SnapshotPolicy, DEFAULT_SNAPSHOT_INTERVAL};
pub use two::{ExecutedTwo, TwoEvents};

/// How many aggregates a repository keeps in memory between commands unless
/// [`RepositoryBuilder::cache_capacity`] says otherwise.
pub const DEFAULT_CACHE_CAPACITY: usize = 1024;

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per command when the stream moved on between load and append (1 = no retry).
    pub max_attempts: u32,
    /// Attempts per append when the store is unreachable; the same request is re-sent, which is
    /// idempotent by event id.
    pub max_transient_attempts: u32,
    /// Pauses between attempts, of either kind.
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            max_transient_attempts: 5,
            backoff: Backoff::new(Duration::from_millis(5), Duration::from_millis(500)),
        }
    }
}

/// Errors of repository operations on aggregate type `A`; every variant names the stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepositoryError<E: std::error::Error + 'static> {
    /// The aggregate rejected the command.
    #[error("`{stream_id}` at version {version} rejected the command: {source}")]
    Domain {
        /// The aggregate's stream.
        stream_id: StreamId,
        /// The version the command was decided at.
        version: u64,
        /// The domain error.
        #[source]
        source: E,
    },
    /// The stream kept moving between load and append; retries were exhausted.
    #[error(
        "conflict on `{stream_id}`: expected version {expected}, found {actual}, after {attempts} attempt(s)"
    )]
    Conflict {
        /// The aggregate's stream.
        stream_id: StreamId,
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
    #[error("cannot serialize event `{event_type}` for `{stream_id}`: {source}")]
    Encode {
        /// The aggregate's stream.
        stream_id: StreamId,
        /// The event's type.
        event_type: &'static str,
        /// The serialization error.
        #[source]
        source: serde_json::Error,
    },
    /// The aggregate id is not valid in a stream id.
    #[error(transparent)]
    InvalidId(#[from] InvalidStreamId),
    /// The aggregate's stream is closed ([`Repository::close`], or
    /// [`AppendRequest::close`](crate::AppendRequest::close) on the store): it takes no more
    /// commands. Never retried: a closed stream stays closed.
    #[error(
        "`{stream_id}` is closed (its tombstone is version {version}): it takes no more commands"
    )]
    Closed {
        /// The aggregate's stream.
        stream_id: StreamId,
        /// The version of its tombstone, the stream's last.
        version: u64,
    },
    /// The store failed.
    #[error("store error on `{stream_id}` at version {version}: {source}")]
    Store {
        /// The aggregate's stream.
        stream_id: StreamId,
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
    pub stream_id: StreamId,
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
    /// Whether the stream is closed as loaded: its event at `version` is its tombstone (see
    /// [`Repository::close`]). A load as of an earlier version reports the stream open.
    pub closed: bool,
}

/// The outcome of [`Repository::close`]: the stream's tombstone, stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedStream {
    /// The aggregate's stream.
    pub stream_id: StreamId,
    /// The tombstone's version, the stream's last.
    pub version: u64,
    /// The tombstone's position in its partition's feed.
    pub position: u64,
    /// The tombstone's event id.
    pub event_id: uuid::Uuid,
    /// Attempts it took (more than 1 after conflicts).
    pub attempts: u32,
}

/// The outcome of a successful command.
#[derive(Debug, Clone)]
pub struct Executed<A: Aggregate> {
    /// The aggregate's stream.
    pub stream_id: StreamId,
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
    cache_capacity: usize,
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
        let erased: Box<ErasedTranslator<A>> =
            Box::new(move |stream_id, events, stored, metadata| {
                command::translate(&translator, stream_id, events, stored, metadata)
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

    /// How many aggregates stay in memory between commands (default
    /// [`DEFAULT_CACHE_CAPACITY`]), least recently used first out. A command on an aggregate in
    /// memory decides without reading its stream; the append, which expects the version in
    /// memory, catches a write by another process (a conflict: the aggregate is loaded again).
    /// 0 keeps none: every command loads its aggregate. Aggregates with commands in progress
    /// stay in memory until they finish, whatever the capacity. See [`Repository::execute_with`].
    pub fn cache_capacity(mut self, aggregates: usize) -> Self {
        self.cache_capacity = aggregates;
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
                lanes: lane::Lanes::new(self.cache_capacity),
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
    lanes: lane::Lanes,
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
            .field("aggregates_in_memory", &self.inner.lanes.len())
            .finish_non_exhaustive()
    }
}

static NO_UPCASTERS: std::sync::LazyLock<Upcasters> = std::sync::LazyLock::new(Upcasters::default);

type RepoResult<T, A> = Result<T, RepositoryError<<A as Aggregate>::Error>>;

impl<S: Store> Repository<S> {
    /// A repository on `store` with the default policies: a snapshot every
    /// [`DEFAULT_SNAPSHOT_INTERVAL`] events, 5 attempts on conflict, up to
    /// [`DEFAULT_CACHE_CAPACITY`] aggregates in memory.
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
            default_snapshot_policy: SnapshotPolicy::default(),
            retry: RetryPolicy::default(),
            cache_capacity: DEFAULT_CACHE_CAPACITY,
        }
    }

    /// How many aggregates this repository keeps in memory now (at most
    /// [`RepositoryBuilder::cache_capacity`], plus those with commands in progress).
    pub fn aggregates_in_memory(&self) -> usize {
        self.inner.lanes.len()
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

    /// The stream id of aggregate `A` with id `id`; the same as [`Aggregate::stream_id`], which
    /// needs no repository (nor its store type).
    pub fn stream_id<A: Aggregate>(id: &str) -> Result<StreamId, InvalidStreamId> {
        A::stream_id(id)
    }
}
