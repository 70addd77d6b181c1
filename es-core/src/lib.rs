//! Event sourcing for Rust: the domain-facing traits, the storage contract and the typed
//! repository, kept apart from any particular store.
//!
//! - [`Aggregate`] and [`DomainEvent`]: the write model, written once and independent of storage.
//! - [`contract`]: the narrow contract each backend (`es-memory`, `es-postgres`, `es-redis`)
//!   implements over serialized events: [`EventStore`], [`SnapshotStore`], [`OutboxStore`] and
//!   [`CheckpointStore`], their records and errors, and the helpers backends share.
//! - [`upcast`]: schema evolution on the serialized form, validated when the repository is built.
//! - [`Repository`]: loads aggregates (snapshot + newer events, upcast, applied), runs commands with
//!   optimistic concurrency and retries, snapshots by policy, and loads past states.
//! - [`outbox`]: integration events translated from domain events, recorded atomically with them,
//!   and relayed to a broker at least once, in per-stream order.
//! - [`projection`]: read models fed from the global feed from a checkpoint, at least once or
//!   exactly once, rebuildable from position 0.
//! - [`replay`]: replay to fix a bug: a projection rebuilt with fixed code into a shadow read
//!   model, compared with the live one, then switched over or discarded.
//! - [`personal`]: crypto-shredding: personal fields encrypted with a key per subject, erased by
//!   destroying the key ([`Encrypted`](personal::Encrypted), [`Personal`](personal::Personal)).
//! - [`retry`]: the one capped, jittered [`Backoff`] every retry loop uses.
//! - [`tenancy`]: a store per tenant, in a namespace of its own ([`Tenants`]).
//! - [`telemetry`]: the stable names of the metrics and tracing spans the runtime reports.
//!
//! The conformance suites that prove a backend keeps the contract, and the given/when/then
//! harness for aggregates, are in the `es-testkit` crate (a dev-dependency).
//!
//! # Layers
//!
//! Modules depend one way: the vocabulary ([`stream_id`], [`json`], [`event`], [`retry`]) is used
//! by the domain ([`aggregate`], [`upcast`]) and by the [`contract`]; the runtime
//! ([`repository`], the [`outbox`] relay, the [`projection`] runner) uses all of them. The
//! contract never names the runtime.
//!
//! # Example
//!
//! ```
//! use es_core::{Aggregate, Apply, DomainEvent};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Serialize, Deserialize)]
//! struct Opened { owner: String }
//! #[derive(Debug, Serialize, Deserialize)]
//! struct Deposited { amount: u64 }
//!
//! #[derive(Debug, DomainEvent)]
//! #[event(apply(Account))]
//! enum AccountEvent {
//!     Opened(Opened),
//!     #[event(rename = "MoneyDeposited", version = 2)]
//!     Deposited(Deposited),
//! }
//!
//! #[derive(Clone, Debug, Default, Serialize, Deserialize)]
//! struct Account { open: bool, balance: u64 }
//!
//! impl Apply<Opened> for Account {
//!     fn apply(&mut self, _: &Opened) { self.open = true; }
//! }
//! impl Apply<Deposited> for Account {
//!     fn apply(&mut self, e: &Deposited) { self.balance += e.amount; }
//! }
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("account is not open")]
//! struct NotOpen;
//!
//! impl Aggregate for Account {
//!     const CATEGORY: &'static str = "account";
//!     type Command = u64; // deposit an amount
//!     type Event = AccountEvent;
//!     type Error = NotOpen;
//!     fn handle(&self, amount: &u64) -> Result<Vec<AccountEvent>, NotOpen> {
//!         if !self.open { return Err(NotOpen); }
//!         Ok(vec![Deposited { amount: *amount }.into()])
//!     }
//!     // `evolve` is provided: it routes each event to its `Apply` impl.
//! }
//!
//! assert_eq!(AccountEvent::from(Deposited { amount: 5 }).event_type(), "MoneyDeposited");
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

pub mod aggregate;
pub mod contract;
pub mod event;
pub mod group;
pub mod json;
pub mod outbox;
pub mod personal;
pub mod projection;
pub mod replay;
pub mod repository;
pub mod retry;
pub mod stream_id;
pub mod telemetry;
pub mod tenancy;
pub mod upcast;

#[doc(hidden)]
pub mod __private;

/// The README's Rust samples, compiled and run as doctests so they stay true.
#[cfg(all(doctest, feature = "derive"))]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

pub use aggregate::{Aggregate, Apply, ApplyEvent, Decision};
pub use contract::{
    AppendLimits, AppendRequest, AppendResult, Archived, Checkpoint, CheckpointStore, DeadLetter,
    Delivered, Direction, EpochStart, EventFilter, EventPage, EventPages, EventStore, EventStream,
    ExpectedVersion, FeedPosition, HeldLease, LeaseStore, ListStreams, OutboxMessage, OutboxRecord,
    OutboxStore, PartitionKey, Partitioning, ReadAll, ReadStream, Rejection, RelayStatus,
    SnapshotRecord, SnapshotStore, Store, StoreError, StoreFuture, StreamPage, StreamSummary,
    StreamingStore,
};
pub use event::{
    DomainEvent, EventSchema, Metadata, NewEvent, PayloadError, RecordedEvent, RecordedEventRef,
    CLOSED_EVENT_TYPE,
};
pub use group::GroupConfig;
pub use outbox::{
    PublishOutcome, Publisher, Relay, RelayConfig, RelayConfigError, RelayError, RelayStep,
    Translator,
};
pub use projection::{
    AtLeastOnce, Projection, ProjectionError, ProjectionGroup, ProjectionHandle, ProjectionRunner,
    ProjectionSink, ProjectionStatus, RebuildError, RunnerConfig,
};
pub use repository::{
    AsOf, BuildError, ClosedStream, Executed, ExecutedTwo, Loaded, Repository, RepositoryBuilder,
    RepositoryError, RetryPolicy, SnapshotContext, SnapshotPolicy, TwoEvents,
    DEFAULT_CACHE_CAPACITY, DEFAULT_SNAPSHOT_INTERVAL,
};
pub use retry::Backoff;
pub use stream_id::{InvalidStreamId, StreamId};
pub use tenancy::{InvalidTenantId, TenantError, TenantId, TenantStores, Tenants};
pub use upcast::{DecodeError, UpcastChainError, UpcastError, Upcaster, Upcasters};

/// Derives [`DomainEvent`] (and, with `#[event(apply(State))]`, [`ApplyEvent`]) for an enum of
/// event payloads.
#[cfg(feature = "derive")]
#[cfg_attr(docsrs, doc(cfg(feature = "derive")))]
pub use es_derive::DomainEvent;
