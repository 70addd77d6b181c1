//! Integration events and the transactional outbox.
//!
//! Domain events are private to their aggregate. What other systems see are *integration events*:
//! a public contract with its own type names and schema versions, produced from domain events by
//! a [`Translator`]. The repository writes them into the store's outbox **in the same atomic
//! append** as the domain events (same PostgreSQL transaction, same Redis script, same lock in
//! memory), so an integration event exists if and only if the domain events that caused it do.
//!
//! A [`Relay`] then publishes outbox records to a broker through a [`Publisher`], in outbox order
//! (which keeps per-stream order), at least once, and marks them delivered only after the broker
//! acknowledged them. Several relays may run: a lease held in the store lets one of them publish
//! at a time, and a relay that crashes loses its lease when it expires, so another takes over.
//! Every message carries a unique `message_id` (and the `source_event_id` it came from): a
//! consumer that sees a message twice can tell.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tracing::Instrument;
use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::event::{DomainEvent, Metadata};
use crate::store::{EventStore, StoreError, StoreFuture};
use crate::stream_id::StreamId;

/// An outgoing message to record with an append.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    /// Unique id; the dedupe key consumers use.
    pub message_id: Uuid,
    /// The domain event it was translated from.
    pub source_event_id: Uuid,
    /// Destination (a Kafka topic).
    pub topic: String,
    /// Partitioning key; the source stream id by default, which keeps per-stream order per
    /// partition.
    pub key: String,
    /// Stable message type name (the public contract, not the domain event's name).
    pub message_type: String,
    /// Schema version of the payload.
    pub schema_version: u32,
    /// JSON payload.
    pub payload: Bytes,
    /// Correlation, causation (the source event) and actor.
    pub metadata: Metadata,
}

/// A message stored in the outbox, waiting for delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRecord {
    /// Position in the outbox: increasing in commit order, like global positions.
    pub position: u64,
    /// The stream whose append recorded it.
    pub stream_id: StreamId,
    /// When it was recorded (store clock).
    pub recorded_at: DateTime<Utc>,
    /// The message.
    pub message: OutboxMessage,
}

/// The outbox side of a store: pending records, delivery marks and the relay lease.
///
/// Outbox records are written by [`EventStore::append`] from
/// [`AppendRequest::outbox`](crate::store::AppendRequest::outbox), atomically with the events.
pub trait OutboxStore: Clone + Send + Sync + 'static {
    /// Takes or renews the relay lease for `owner` until `ttl` from now. Returns whether `owner`
    /// holds it. A lease not renewed within its ttl expires and can be taken by another owner.
    fn acquire_relay_lease(&self, owner: &str, ttl: Duration) -> impl StoreFuture<bool>;

    /// Gives the lease up if `owner` holds it.
    fn release_relay_lease(&self, owner: &str) -> impl StoreFuture<()>;

    /// Up to `limit` undelivered records, in outbox order.
    fn pending_outbox(&self, limit: u64) -> impl StoreFuture<Vec<OutboxRecord>>;

    /// Marks the records at `positions` delivered. Idempotent.
    fn mark_delivered(&self, positions: &[u64]) -> impl StoreFuture<()>;

    /// Number of undelivered records.
    fn outbox_len(&self) -> impl StoreFuture<u64>;
}

/// Maps a domain event of aggregate `A` to zero or more integration events.
pub trait Translator<A: Aggregate>: Send + Sync + 'static {
    /// The integration events: their own enum, with their own names and versions.
    type Message: DomainEvent;

    /// The topic the messages go to.
    fn topic(&self) -> &str;

    /// Translates one domain event of `stream`.
    fn translate(&self, stream: &StreamId, event: &A::Event) -> Vec<Self::Message>;
}

/// Delivers outbox records to a broker.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `records` in order. Returns `Ok` only once the broker has acknowledged every
    /// record; on `Err` nothing is marked delivered and the batch is sent again (at least once).
    fn publish(
        &self,
        records: &[OutboxRecord],
    ) -> impl Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + Send;
}

/// Why a relay stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The store failed in a way retrying cannot fix.
    #[error("outbox relay store error: {0}")]
    Store(#[from] StoreError),
}

/// How a [`Relay`] behaves.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Identifies this relay instance in the lease.
    pub owner: String,
    /// How long a lease lasts without renewal; a crashed relay is taken over after this.
    pub lease_ttl: Duration,
    /// Records published per batch.
    pub batch_size: u64,
    /// How long to wait for new records when the outbox is empty (it also wakes on appends).
    pub idle_poll: Duration,
    /// Longest pause between retries of a failing broker or store.
    pub max_backoff: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            owner: format!("relay-{}", Uuid::now_v7()),
            lease_ttl: Duration::from_secs(10),
            batch_size: 500,
            idle_poll: Duration::from_millis(500),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Publishes the outbox of a store through a [`Publisher`]. See the module docs.
#[derive(Debug)]
pub struct Relay<S, P> {
    store: S,
    publisher: P,
    config: RelayConfig,
}

/// What one [`Relay::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayStep {
    /// Another relay holds the lease.
    Standby,
    /// Nothing was pending.
    Idle,
    /// This many records were published and marked delivered.
    Published(usize),
    /// The broker did not acknowledge the batch; it stays pending and is sent again.
    PublishFailed,
}

impl<S: EventStore + OutboxStore, P: Publisher> Relay<S, P> {
    /// A relay over `store`'s outbox publishing through `publisher`.
    pub fn new(store: S, publisher: P, config: RelayConfig) -> Self {
        Self {
            store,
            publisher,
            config,
        }
    }

    /// One round: renew the lease, publish one batch, mark it delivered.
    ///
    /// A broker failure is [`RelayStep::PublishFailed`] (logged); store failures are returned.
    pub async fn step(&self) -> Result<RelayStep, StoreError> {
        let ttl = self.config.lease_ttl;
        if !self
            .store
            .acquire_relay_lease(&self.config.owner, ttl)
            .await?
        {
            return Ok(RelayStep::Standby);
        }
        let batch = self.store.pending_outbox(self.config.batch_size).await?;
        if batch.is_empty() {
            return Ok(RelayStep::Idle);
        }
        let span = tracing::debug_span!("es.relay.publish", owner = %self.config.owner,
            first = batch[0].position, records = batch.len());
        if let Err(err) = self.publisher.publish(&batch).instrument(span).await {
            tracing::warn!(owner = %self.config.owner, error = %err, "publishing failed; the batch will be sent again");
            return Ok(RelayStep::PublishFailed);
        }
        let positions: Vec<u64> = batch.iter().map(|r| r.position).collect();
        self.store.mark_delivered(&positions).await?;
        Ok(RelayStep::Published(batch.len()))
    }

    /// Runs until `shutdown` resolves; then releases the lease. Transient store failures and
    /// broker failures are retried with backoff.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), RelayError> {
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(50);
        loop {
            let step = tokio::select! {
                () = &mut shutdown => break,
                step = self.step() => step,
            };
            let pause = match step {
                Ok(RelayStep::Published(_)) => {
                    backoff = Duration::from_millis(50);
                    continue;
                }
                Ok(RelayStep::PublishFailed) => {
                    backoff = (backoff * 2).min(self.config.max_backoff);
                    backoff
                }
                Ok(RelayStep::Idle) => {
                    backoff = Duration::from_millis(50);
                    let head = self.store.head_position().await.unwrap_or(0);
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = self.store.wait_for_append(head) => {}
                        () = tokio::time::sleep(self.config.idle_poll) => {}
                    }
                    continue;
                }
                Ok(RelayStep::Standby) => self.config.lease_ttl / 3,
                Err(err) if err.is_transient() => {
                    tracing::warn!(owner = %self.config.owner, error = %err, "relay store error; retrying");
                    backoff = (backoff * 2).min(self.config.max_backoff);
                    backoff
                }
                Err(err) => return Err(err.into()),
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
        if let Err(err) = self.store.release_relay_lease(&self.config.owner).await {
            tracing::warn!(owner = %self.config.owner, error = %err, "could not release the relay lease; it will expire");
        }
        Ok(())
    }
}
