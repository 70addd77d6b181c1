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
//! acknowledged them. Every message carries a unique `message_id` (and the `source_event_id` it
//! came from): a consumer that sees a message twice can tell.
//!
//! # One relay at a time: the lease and its generation
//!
//! Several relays may run; a lease held in the store lets one of them publish at a time. Each
//! time the lease changes hands (a relay takes a free, released or expired lease) its
//! **generation** goes up, and the relay that took it gets that generation as its fencing token.
//! Every write a relay makes under the lease ([`OutboxStore::mark_delivered`],
//! [`OutboxStore::dead_letter`]) names its generation; the store refuses it with
//! [`StoreError::Fenced`], writing nothing, once the lease has passed to a newer generation. A
//! relay that stalled (a paused process, a slow network) and woke up after another relay took
//! over can therefore not mark or park anything; the records stay pending and the current owner
//! publishes them (at least once).
//!
//! A relay also never publishes beyond its lease. It computes the lease's end on its own clock
//! from the moment it *sent* its acquire request, minus a guard of a tenth of the lease
//! ([`RelayConfig::lease_ttl`]), so it ends before the store's end of the lease, which counts
//! from when the store *received* the request. It starts a batch only if
//! [`RelayConfig::publish_timeout`] still fits before that end, and cuts a publish call off
//! after `publish_timeout` (the records stay pending and are sent again). Another relay can only
//! take the lease after the store's end of it. So two relays' publish calls never overlap, as
//! long as the relay's runtime wakes it within the guard (a tenth of the lease) of its timer;
//! what a [`Publisher`] already handed to the network when it is cut off is outside the relay's
//! reach (see the publisher's documentation: `es-kafka` purges its queue and abandons requests in
//! flight). Tested by the streaming conformance case
//! `two_relays_with_a_short_lease_never_publish_at_once` on every store: two live relays with a
//! 1 s lease (publish timeout 0.5 s) and a publisher that takes three times the lease on every
//! fourth call, the first relay's first delivery mark stalled for 2.5 s; the recorded publish
//! intervals of the two relays never overlap at all (the slow calls are cut off), every record
//! is published, and the stalled mark, arriving after the other relay took over, is refused.
//! Before fencing and the cut-off, the relay published through its whole 3 s call while the
//! other relay, having taken the expired lease, published too.
//!
//! # Records that can never be published: dead letters
//!
//! A [`Publisher`] says of each record of a batch whether the broker acknowledged it, rejected it
//! for good ([`PublishOutcome::Rejected`]: too large for the broker, an invalid topic name, not
//! authorized, ...) or failed this time ([`PublishOutcome::Failed`]: a time-out, a broker down, a
//! leader election). Before sending, the relay asks [`Publisher::check`] whether the publisher's
//! own limits (message size, topic name rules) allow the record at all, and never sends one they
//! refuse. The relay then, under its lease's generation:
//!
//! - moves every record that was refused or rejected out of the outbox into the store's
//!   **dead-letter list** ([`OutboxStore::dead_letter`], atomically: a record is pending or dead,
//!   never both or neither), with the error text, the time and how many times this relay sent
//!   it ([`DeadLetter`](crate::contract::DeadLetter));
//! - marks delivered the acknowledged records that precede the first record that failed
//!   transiently; the failed record and everything after it stay pending and are sent again in
//!   order (records acknowledged after a failure are sent again too: at least once);
//! - goes on with the next batch: a dead letter never blocks the records after it, and the
//!   records before it are not sent again.
//!
//! Dead letters are visible in [`OutboxStore::relay_status`] (pending and dead-letter counts, the
//! last dead-lettering error, the lease) and listed by [`OutboxStore::dead_letters`]. Tested by
//! `relay_parks_poison_records_and_keeps_going` (an in-process broker) and, against a real
//! Kafka-protocol broker, by `es_kafka::testing::poison_records_are_dead_lettered`.
//!
//! **Order.** A dead-lettered record breaks per-key order for its key until it is re-queued:
//! the records recorded after it (same key included) are published without it, so a consumer
//! of that key sees a gap where it belongs. [`OutboxStore::requeue_dead_letters`] puts it back
//! at the *end* of the outbox with a new outbox position (same message id, same payload), so it
//! is published after every record recorded before the re-queue, including the later records of
//! its own key that were already published: the gap is filled late, and the record arrives
//! after records it preceded (its `outbox_position` is the new one). Re-queue a record only once
//! what rejected it is fixed (a larger broker limit, the topic created or authorized);
//! otherwise it is dead-lettered again. Tested by `dead_letters_are_parked_and_requeued` and
//! `relay_parks_poison_records_and_keeps_going`.
//!
//! **Partial failures.** When a record of a batch fails transiently, the records acknowledged
//! after it are sent again with it (duplicates, never gaps). A publisher that wrote a later
//! record of the same key although the earlier one failed would put that later record's first
//! copy before the earlier one's; a [gapless](Publisher::gapless) publisher never does. Tested
//! by `relay_publishes_everything_in_order`.
//!
//! # Pipelining: batches in flight
//!
//! With a [gapless](Publisher::gapless) publisher, [`Relay::drain`] (and so [`Relay::run`])
//! keeps up to [`RelayConfig::max_in_flight`] batches in flight (default 8): it reads the next
//! batch ([`OutboxStore::pending_outbox_after`] the last position read) and hands it to the
//! publisher while earlier batches wait for their acknowledgements, and writes each batch's
//! marks and dead letters as it settles (one store write at a time, in batch order), while
//! later batches are still in flight. With a publisher that is not gapless it keeps one.
//! [`Relay::step`] is the same with one batch. A relay that waits for each batch pays a broker
//! round trip per batch: with the raw producer against the test broker, waves of 500 records,
//! each awaited, ran at 0.6–0.8x of the same records all in flight (README, `kafka` rows).
//!
//! - **Marks never skip an unacknowledged record.** Outcomes are taken in outbox order (batch
//!   after batch); acknowledged records are marked only while no record before them failed in
//!   the pass. After the first transient failure the pass starts no more batches, lets the ones
//!   in flight settle (rejections in them are still dead-lettered, acknowledgements are not
//!   marked) and ends; the next pass reads again from the oldest pending record, so the failed
//!   record and everything after it are sent again, in order.
//! - **First copies stay in order.** Calls are made in outbox order, and a gapless publisher
//!   writes, per key, a prefix of what it was handed: once a record fails, no later record of
//!   its key that was already handed over (in a later batch in flight) is written. So the
//!   retry's copy of the failed record is the first one written, and per key every record's
//!   first copy is in outbox order, failures or not. A batch's call begins when the window is
//!   next polled after the batch joined it; if the pass settled a failure in between, the batch
//!   is not handed over at all (a gapless publisher with no call in flight would otherwise start
//!   afresh and write it: `pipelined_relay_makes_no_call_after_it_settled_a_failure`). Why a
//!   gapless publisher is needed: with
//!   one that writes what it is handed regardless (the in-process test broker in its default
//!   mode), `k#2` in a later batch would be written although `k#1` failed, and the retry would
//!   write `k#1` after it.
//! - **Within the lease.** A pass takes or renews the lease once, at its start, and starts a
//!   batch only while [`RelayConfig::publish_timeout`] still fits before the lease's end (each
//!   batch is cut off after it); once it does not, the pass stops starting batches, lets those
//!   in flight settle and ends, and the next pass renews the lease. The lease is never renewed
//!   with a batch in flight, and every mark of a pass names the pass's generation: marks
//!   refused as [`StoreError::Fenced`] end the pass at once ([`RelayStep::Fenced`]), with no
//!   later mark written.
//! - **A store failure** (reading a batch, writing marks) stops the pass the same way: the
//!   batches in flight settle (they are not cut off), nothing more is written, and the error is
//!   returned; the records not marked are sent again by the next pass.
//! - **Killed mid-window.** Nothing is marked before it is acknowledged, so a relay dropped with
//!   batches in flight leaves them pending; the next owner reads from the oldest pending record
//!   and sends them again (what the dead relay's publisher had handed over is written twice).
//!
//! Tested by the streaming conformance cases `pipelined_relay_keeps_batches_in_flight_in_order`,
//! `pipelined_relay_resends_after_a_failure_mid_window` (a record fails while a later batch with
//! later records of its key is in flight: first copies stay in order),
//! `relay_waits_for_each_batch_of_a_publisher_that_is_not_gapless`,
//! `relay_killed_mid_window_is_resumed_by_another` and
//! `relay_fenced_with_batches_in_flight_marks_nothing_more`, each checking at-least-once and
//! per-key order from the in-process broker's log of what it wrote; against Kafka by the
//! `es-kafka` relay tests (four batches in flight, a broker killed and restarted), and by the
//! chaos checker's `outbox_order` rule (relays killed, stalled and failing at random, with the
//! default window).
//!
//! **Limits.** A pass reads past a position once: a record that becomes visible below it later
//! (a dead letter re-queued in PostgreSQL while a pass runs, whose new position is drawn outside
//! the append ordering) is published by the next pass, which starts when the outbox is caught
//! up or the lease needs renewing. Memory held: up to `max_in_flight * batch_size` records.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, OptionFuture};
use futures::stream::{FuturesOrdered, StreamExt};
use tracing::Instrument;
use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::contract::{
    Delivered, EventStore, OutboxRecord, OutboxStore, Rejection, RelayStatus, StoreError,
};
use crate::event::DomainEvent;
use crate::retry::Backoff;
use crate::stream_id::StreamId;
use crate::telemetry;

/// Maps a domain event of aggregate `A` to zero or more integration events.
pub trait Translator<A: Aggregate>: Send + Sync + 'static {
    /// The integration events: their own enum, with their own names and versions.
    type Message: DomainEvent;

    /// The topic the messages go to.
    fn topic(&self) -> &str;

    /// Translates one domain event of `stream`.
    fn translate(&self, stream: &StreamId, event: &A::Event) -> Vec<Self::Message>;
}

/// What became of one record of a batch handed to [`Publisher::publish`]; `E` is the
/// publisher's [`Error`](Publisher::Error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishOutcome<E> {
    /// The broker acknowledged it.
    Acknowledged,
    /// The broker (or the publisher) refused it for good: sending it again cannot succeed
    /// (too large, invalid topic, not authorized, ...). The relay dead-letters it, with the
    /// error's text.
    Rejected(E),
    /// Not acknowledged this time (time-out, broker unavailable, leader moving, ...). The relay
    /// sends it again.
    Failed(E),
}

impl<E> PublishOutcome<E> {
    /// `n` outcomes of [`Failed`](Self::Failed) with `error`: a batch that failed as a whole.
    pub fn all_failed(n: usize, error: E) -> Vec<Self>
    where
        E: Clone,
    {
        vec![Self::Failed(error); n]
    }

    /// Whether the broker acknowledged the record.
    pub fn is_acknowledged(&self) -> bool {
        matches!(self, Self::Acknowledged)
    }
}

/// Delivers outbox records to a broker.
pub trait Publisher: Send + Sync + 'static {
    /// Why a record was refused or not acknowledged. The relay logs it and, for a record it
    /// dead-letters, stores its `Display` text.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Whether `record` can ever be published, by the publisher's own limits (message size,
    /// topic name rules): `Err` with the reason if not, and the relay dead-letters it without
    /// sending it. The default accepts everything.
    fn check(&self, record: &OutboxRecord) -> Result<(), Self::Error> {
        let _ = record;
        Ok(())
    }

    /// Publishes `records` in order and says what became of each: one [`PublishOutcome`] per
    /// record, in the same order (a reply of another length counts as a failure of the whole
    /// batch). Returns once every record is settled.
    ///
    /// The relay may drop the returned future when the lease runs out (see the
    /// [module docs](self#one-relay-at-a-time-the-lease-and-its-generation)); a publisher should
    /// then stop sending what it has not sent yet.
    ///
    /// If the publisher is [`gapless`](Self::gapless), the relay calls `publish` again before
    /// earlier calls returned (up to [`RelayConfig::max_in_flight`] calls, made in outbox order;
    /// see [Pipelining](self#pipelining-batches-in-flight)); otherwise it waits for each call.
    fn publish(
        &self,
        records: &[OutboxRecord],
    ) -> impl Future<Output = Vec<PublishOutcome<Self::Error>>> + Send;

    /// Whether the publisher writes, per key, only a prefix of what it was handed: it keeps each
    /// key's records in hand-over order across calls, and once a record fails
    /// ([`PublishOutcome::Failed`], or a call cut off), it writes no record of that key handed
    /// over after it, in the same call or in calls made before every call in flight at the
    /// failure returned. A rejected record ([`PublishOutcome::Rejected`]) is a dead letter, not
    /// a failure: the records after it may be written.
    ///
    /// Only a gapless publisher gets several calls in flight ([`RelayConfig::max_in_flight`]):
    /// with one that is not, a later record of a key already handed over could be written
    /// before the first copy of an earlier one that failed. The default is `false`: one call
    /// at a time. `es-kafka` is gapless (see its delivery semantics).
    fn gapless(&self) -> bool {
        false
    }
}

/// Why a publish call failed as a whole: every record of its batch is sent again.
#[derive(Debug, thiserror::Error)]
enum CallFailure {
    #[error("the publisher answered {answered} outcomes for {records} records")]
    WrongCount { answered: usize, records: usize },
    #[error(
        "publishing took longer than the publish timeout ({0:?}); cut off to stay within the lease"
    )]
    TimedOut(Duration),
    /// The pass had settled a failure before the batch's call would have begun: not handed
    /// over, so nothing after the failed record is written.
    #[error("not handed over: an earlier record of the pass failed first")]
    NotHandedOver,
}

/// Why a relay stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The store failed in a way retrying cannot fix.
    #[error("outbox relay store error: {0}")]
    Store(#[from] StoreError),
    /// The configuration cannot work: the relay would never publish.
    #[error("invalid relay configuration: {0}")]
    Config(#[from] RelayConfigError),
}

/// Why a [`RelayConfig`] cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayConfigError {
    /// A batch of no records publishes nothing.
    #[error("the batch size must not be 0")]
    ZeroBatchSize,
    /// A relay with no batch in flight publishes nothing.
    #[error("max_in_flight must not be 0")]
    ZeroInFlight,
    /// The publish timeout leaves no room in the lease.
    #[error(
        "publish_timeout ({publish_timeout:?}) must be above zero and below nine tenths of \
         lease_ttl ({lease_ttl:?}): a relay starts a batch only if it can finish it before its \
         lease ends"
    )]
    PublishTimeout {
        /// The configured publish timeout.
        publish_timeout: Duration,
        /// The configured lease.
        lease_ttl: Duration,
    },
}

/// How a [`Relay`] behaves.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Identifies this relay instance in the lease. Give every relay process its own (the
    /// default is unique).
    pub owner: String,
    /// How long a lease lasts without renewal; a crashed relay is taken over after this.
    pub lease_ttl: Duration,
    /// The longest one publish call may take: the relay starts a batch only with this much lease
    /// left (after a guard of a tenth of `lease_ttl`), and cuts the call off after it. Must be
    /// below nine tenths of `lease_ttl`. Keep it above the publisher's own time-out (for
    /// `es-kafka`, the delivery timeout) so that the publisher reports failures itself.
    pub publish_timeout: Duration,
    /// Records published per batch (default 1,000).
    pub batch_size: u64,
    /// Batches a relay keeps in flight at once in [`Relay::drain`] (and [`Relay::run`]) when its
    /// publisher is [`gapless`](Publisher::gapless): while the oldest waits for its
    /// acknowledgements, the next ones are read, checked and handed to the publisher. A relay
    /// whose publisher is not gapless keeps one. Default 8: with the default batches of 1,000,
    /// up to 8,000 records in flight, which on the benchmark's broker reaches the raw producer's
    /// rate, where 2,000 (4 batches of 500) reach about 0.5–0.8x and one batch at a time about
    /// 0.3–0.4x (README, `kafka` rows). Memory held: up to `max_in_flight * batch_size`
    /// records. Must not be 0.
    pub max_in_flight: usize,
    /// How long to wait for new records when the outbox is empty (it also wakes on appends).
    pub idle_poll: Duration,
    /// Pauses between retries of a failing broker or store (the longest is `backoff.max()`).
    pub backoff: Backoff,
    /// How often, at most, [`Relay::run`] reads [`relay_status`](OutboxStore::relay_status)
    /// while it holds the lease, for the `es_outbox_backlog` and `es_outbox_dead_letters` gauges
    /// (see [`crate::telemetry`]). `None`: never. Default 1 s.
    pub backlog_every: Option<Duration>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            owner: format!("relay-{}", Uuid::now_v7()),
            lease_ttl: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(6),
            batch_size: 1000,
            max_in_flight: 8,
            idle_poll: Duration::from_millis(500),
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(5)),
            backlog_every: Some(Duration::from_secs(1)),
        }
    }
}

impl RelayConfig {
    /// The part of the lease a relay keeps clear at its end: a tenth of the lease.
    pub fn lease_guard(&self) -> Duration {
        self.lease_ttl / 10
    }

    /// Checks that a relay with this configuration can publish at all.
    pub fn validate(&self) -> Result<(), RelayConfigError> {
        if self.batch_size == 0 {
            return Err(RelayConfigError::ZeroBatchSize);
        }
        if self.max_in_flight == 0 {
            return Err(RelayConfigError::ZeroInFlight);
        }
        if self.publish_timeout.is_zero()
            || self.publish_timeout + self.lease_guard() >= self.lease_ttl
        {
            return Err(RelayConfigError::PublishTimeout {
                publish_timeout: self.publish_timeout,
                lease_ttl: self.lease_ttl,
            });
        }
        Ok(())
    }
}

/// Publishes the outbox of a store through a [`Publisher`]. See the module docs.
#[derive(Debug)]
pub struct Relay<S, P> {
    store: S,
    publisher: P,
    config: RelayConfig,
    /// Times each pending record was sent by this relay without an answer, by position.
    attempts: Mutex<HashMap<u64, u32>>,
    /// The generation of the lease this relay last held (0: none yet).
    generation: AtomicU64,
    /// The `outbox` label of the backlog gauges.
    outbox: String,
}

/// What one [`Relay::step`] (one batch) or [`Relay::drain`] (a pass of pipelined batches, in
/// total) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayStep {
    /// Another relay holds the lease.
    Standby,
    /// Nothing was pending.
    Idle,
    /// Every record of the batch was acknowledged; this many were marked delivered.
    Published(usize),
    /// Some records of the batch can never be published and were dead-lettered; the others were
    /// acknowledged and marked delivered.
    DeadLettered {
        /// Records marked delivered.
        delivered: usize,
        /// Records moved to the dead-letter list.
        dead_lettered: usize,
    },
    /// Some records were not acknowledged (or the publish call ran out of time): they and the
    /// records after them stay pending and are sent again. What could be settled was.
    PublishFailed {
        /// Records marked delivered (those acknowledged before the first failure).
        delivered: usize,
        /// Records moved to the dead-letter list.
        dead_lettered: usize,
        /// Records not acknowledged.
        failed: usize,
    },
    /// The lease left too little time to publish a batch (the store answered slowly, or the
    /// configuration is invalid); nothing was sent. The next step renews the lease.
    LeaseTooShort,
    /// Another relay took the lease over while this one published: its marks were refused and
    /// nothing was written. The records stay pending for the new owner.
    Fenced,
}

/// A published batch and what became of it.
type Sent<E> = (
    Vec<OutboxRecord>,
    Result<Vec<PublishOutcome<E>>, CallFailure>,
);

/// A lease a relay holds: its generation, and the instant after which it starts no publish
/// call that could outlast the store's end of the lease.
#[derive(Debug, Clone, Copy)]
struct Lease {
    generation: u64,
    cutoff: Instant,
}

/// Why a pass starts no more batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halt {
    /// The lease has too little time left for another batch, after some were started.
    LeaseEnds,
    /// The lease had too little time left for the pass's first batch.
    LeaseTooShort,
    /// A record was not acknowledged.
    Failed,
    /// The store failed.
    Store,
}

/// What a pass (one or more batches under one lease generation) did so far.
#[derive(Debug, Default)]
struct Pass {
    /// The last position read (`None`: nothing yet; the first read is from the head).
    after: Option<u64>,
    /// Batches read (with records).
    started: usize,
    /// A read came back short: nothing more to read in this pass.
    caught_up: bool,
    /// Why the pass starts no more batches, if it does not.
    halt: Option<Halt>,
    /// A record was not acknowledged: no later record of this pass may be marked.
    out_of_order: bool,
    /// Acknowledged records waiting for their mark.
    delivered: Vec<Delivered>,
    /// Refused or rejected records waiting to be dead-lettered.
    rejected: Vec<Rejection>,
    /// Records marked delivered.
    marked: usize,
    /// Records dead-lettered.
    dead_lettered: usize,
    /// Records not acknowledged.
    failed: usize,
    /// Records not sent because the lease was too short.
    unsent: usize,
    /// The store failed: start nothing more, write nothing more, and return this once the
    /// batches in flight settled.
    store_error: Option<StoreError>,
}

impl Pass {
    /// Stops starting batches, keeping the first reason.
    fn halt(&mut self, why: Halt) {
        self.halt.get_or_insert(why);
    }

    fn step(&self) -> RelayStep {
        let (delivered, dead_lettered) = (self.marked, self.dead_lettered);
        let lease_too_short = self.halt == Some(Halt::LeaseTooShort);
        if self.after.is_none() {
            RelayStep::Idle
        } else if lease_too_short && delivered == 0 && dead_lettered == 0 && self.failed == 0 {
            RelayStep::LeaseTooShort
        } else if self.failed > 0 || lease_too_short {
            RelayStep::PublishFailed {
                delivered,
                dead_lettered,
                failed: self.failed + self.unsent,
            }
        } else if dead_lettered > 0 {
            RelayStep::DeadLettered {
                delivered,
                dead_lettered,
            }
        } else {
            RelayStep::Published(delivered)
        }
    }
}

impl<S: EventStore + OutboxStore, P: Publisher> Relay<S, P> {
    /// A relay over `store`'s outbox publishing through `publisher`. The configuration is checked
    /// by [`run`](Self::run) (see [`RelayConfig::validate`]).
    pub fn new(store: S, publisher: P, config: RelayConfig) -> Self {
        Self {
            store,
            publisher,
            config,
            attempts: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            outbox: "0".to_owned(),
        }
    }

    /// Names the outbox in the `outbox` label of the backlog gauges (default `0`): a relay over
    /// [`outbox_partition(p)`](OutboxStore::outbox_partition) of a store with an outbox per
    /// partition names `p` ([`spawn_group`](Self::spawn_group) does).
    pub fn outbox_label(mut self, outbox: impl Into<String>) -> Self {
        self.outbox = outbox.into();
        self
    }

    /// The configuration.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// The publisher.
    pub fn publisher(&self) -> &P {
        &self.publisher
    }

    /// The store's view of the outbox and the relay: see [`OutboxStore::relay_status`].
    pub async fn status(&self) -> Result<RelayStatus, StoreError> {
        self.store.relay_status().await
    }

    /// One batch: take or renew the lease, read the oldest pending records (one batch),
    /// dead-letter what the publisher's limits refuse, publish the rest within the lease, then
    /// dead-letter what the broker rejected and mark what it acknowledged, both under the lease's
    /// generation. [`drain`](Self::drain) does the same with batches pipelined.
    ///
    /// Broker failures are reported as [`RelayStep::PublishFailed`] (logged); store failures are
    /// returned, except [`StoreError::Fenced`], which is [`RelayStep::Fenced`].
    pub async fn step(&self) -> Result<RelayStep, StoreError> {
        self.pass(1).await
    }

    /// Publishes pending records until the outbox is caught up, with up to
    /// [`RelayConfig::max_in_flight`] batches in flight: the next batch is read and handed to
    /// the publisher while earlier ones wait for their acknowledgements, and each batch's marks
    /// are written as it settles, while later batches are still in flight. See the
    /// [module docs](self#pipelining-batches-in-flight) for what is kept (per-key order,
    /// at least once, the lease) and how a failure stops the pass.
    ///
    /// Returns the pass's totals: [`RelayStep::Published`] with every record marked,
    /// [`RelayStep::DeadLettered`] if some were parked, [`RelayStep::PublishFailed`] if a
    /// record failed (the pass stops starting batches, lets those in flight settle and marks
    /// the records before the first failure), [`RelayStep::Idle`] if nothing was pending, and
    /// [`RelayStep::Standby`], [`RelayStep::Fenced`] or [`RelayStep::LeaseTooShort`] as for
    /// [`step`](Self::step). Store failures are returned as by `step`, once the batches in
    /// flight settled.
    pub async fn drain(&self) -> Result<RelayStep, StoreError> {
        self.pass(usize::MAX).await
    }

    /// Takes or renews the lease.
    async fn take_lease(&self) -> Result<Option<Lease>, StoreError> {
        let ttl = self.config.lease_ttl;
        let asked = Instant::now();
        let Some(generation) = self
            .store
            .acquire_relay_lease(&self.config.owner, ttl)
            .await?
        else {
            return Ok(None);
        };
        self.generation.store(generation, Ordering::SeqCst);
        // The store's lease ends `ttl` after it received the request, so no earlier than this.
        Ok(Some(Lease {
            generation,
            cutoff: asked + ttl.saturating_sub(self.config.lease_guard()),
        }))
    }

    /// Reads, publishes and settles up to `max_batches` batches, at most
    /// `config.max_in_flight` of them in flight at once, under one lease generation.
    async fn pass(&self, max_batches: usize) -> Result<RelayStep, StoreError> {
        let Some(lease) = self.take_lease().await? else {
            return Ok(RelayStep::Standby);
        };
        let generation = lease.generation;
        let window = if self.publisher.gapless() {
            self.config.max_in_flight.max(1)
        } else {
            1
        };
        let limit = self.config.batch_size;
        let mut pass = Pass::default();
        let mut reading: Option<BoxFuture<'_, Result<Vec<OutboxRecord>, StoreError>>> = None;
        let mut writing: Option<BoxFuture<'_, Result<(usize, usize), StoreError>>> = None;
        // Set once the pass settled a failure. A batch's call begins when the window is first
        // polled after its push, not at the push: a failure settled in between must keep it from
        // being handed over, or a gapless publisher, with no call in flight any more, would start
        // afresh and write later records of the failed record's key before its retry.
        let failed = AtomicBool::new(false);
        let failed = &failed;
        let mut in_flight: FuturesOrdered<BoxFuture<'_, Sent<P::Error>>> = FuturesOrdered::new();
        loop {
            if reading.is_none()
                && pass.halt.is_none()
                && !pass.caught_up
                && pass.started < max_batches
                && in_flight.len() < window
            {
                reading = Some(match pass.after {
                    None => Box::pin(self.store.pending_outbox(limit)),
                    Some(position) => Box::pin(self.store.pending_outbox_after(position, limit)),
                });
            }
            if writing.is_none()
                && pass.store_error.is_none()
                && (!pass.rejected.is_empty() || !pass.delivered.is_empty())
            {
                let rejected = std::mem::take(&mut pass.rejected);
                let delivered = std::mem::take(&mut pass.delivered);
                writing = Some(Box::pin(self.write(generation, rejected, delivered)));
            }
            if reading.is_none() && writing.is_none() && in_flight.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                Some((records, outcomes)) = in_flight.next(), if !in_flight.is_empty() => {
                    self.settle(&records, outcomes, &mut pass);
                    if pass.out_of_order {
                        failed.store(true, Ordering::SeqCst);
                    }
                }
                Some(written) = OptionFuture::from(writing.as_mut()) => {
                    writing = None;
                    match written {
                        Ok((dead_lettered, delivered)) => {
                            pass.dead_lettered += dead_lettered;
                            pass.marked += delivered;
                        }
                        Err(err) if matches!(err, StoreError::Fenced { .. }) => {
                            return Ok(self.fenced(&err));
                        }
                        Err(err) => {
                            pass.halt(Halt::Store);
                            pass.store_error.get_or_insert(err);
                        }
                    }
                }
                Some(read) = OptionFuture::from(reading.as_mut()) => {
                    reading = None;
                    if let Some(batch) = self.next_batch(read, &lease, &mut pass) {
                        in_flight.push_back(Box::pin(async move {
                            if failed.load(Ordering::SeqCst) {
                                return (batch, Err(CallFailure::NotHandedOver));
                            }
                            let outcomes = self.publish(&batch).await;
                            (batch, outcomes)
                        }));
                    }
                }
                else => break,
            }
        }
        for (outcome, records) in [
            ("delivered", pass.marked),
            ("dead_lettered", pass.dead_lettered),
            ("failed", pass.failed + pass.unsent),
        ] {
            if records > 0 {
                metrics::counter!(telemetry::RELAY_RECORDS, "outcome" => outcome)
                    .increment(records as u64);
            }
        }
        match pass.store_error {
            Some(err) => Err(err),
            None => Ok(pass.step()),
        }
    }

    /// Takes in a batch read from the store: the records to publish now, if any. Refused
    /// records go to the dead letters; none are published if the lease has too little time
    /// left (the pass then stops starting batches).
    fn next_batch(
        &self,
        read: Result<Vec<OutboxRecord>, StoreError>,
        lease: &Lease,
        pass: &mut Pass,
    ) -> Option<Vec<OutboxRecord>> {
        let batch = match read {
            Ok(batch) => batch,
            Err(err) => {
                pass.halt(Halt::Store);
                pass.store_error.get_or_insert(err);
                return None;
            }
        };
        if pass.after.is_none() {
            if let Some(first) = batch.first() {
                self.forget_settled(first.position);
            }
        }
        if pass.halt.is_some() {
            // Read before the pass halted (a failure settled meanwhile): not handed over, so
            // nothing is sent after a failed record; the next pass reads it again.
            return None;
        }
        pass.caught_up = (batch.len() as u64) < self.config.batch_size;
        pass.after = Some(batch.last()?.position);
        pass.started += 1;
        let sendable = self.checked(batch, &mut pass.rejected);
        if sendable.is_empty() {
            return None;
        }
        let left = lease.cutoff.saturating_duration_since(Instant::now());
        if left >= self.config.publish_timeout {
            return Some(sendable);
        }
        // The lease is renewed only between passes, with nothing in flight: a pass that ran out
        // of lease lets its batches settle and ends, and the next pass renews the lease and
        // reads again from the oldest record.
        if pass.started == 1 {
            tracing::warn!(owner = %self.config.owner, ?left, publish_timeout = ?self.config.publish_timeout,
                "too little of the lease left to publish a batch");
            pass.halt(Halt::LeaseTooShort);
            pass.unsent += sendable.len();
        } else {
            pass.halt(Halt::LeaseEnds);
        }
        None
    }

    /// The records of `batch` the publisher's limits allow, kept in place (nothing is moved
    /// when every record passes); the others go to `rejected`.
    fn checked(
        &self,
        mut batch: Vec<OutboxRecord>,
        rejected: &mut Vec<Rejection>,
    ) -> Vec<OutboxRecord> {
        batch.retain(|record| match self.publisher.check(record) {
            Ok(()) => true,
            Err(error) => {
                rejected.push(Rejection {
                    position: record.position,
                    message_id: record.message.message_id,
                    attempts: self.attempts_of(record.position),
                    error: error.to_string(),
                });
                false
            }
        });
        batch
    }

    /// Takes in what became of a published batch: the acknowledged records before the pass's
    /// first failure are to be marked, the rejected ones to be dead-lettered; after a failure
    /// the pass starts no more batches.
    fn settle(
        &self,
        records: &[OutboxRecord],
        outcomes: Result<Vec<PublishOutcome<P::Error>>, CallFailure>,
        pass: &mut Pass,
    ) {
        let outcomes = match outcomes {
            Ok(outcomes) => outcomes,
            Err(CallFailure::NotHandedOver) => {
                pass.failed += records.len();
                pass.halt(Halt::Failed);
                pass.out_of_order = true;
                return;
            }
            Err(failure) => {
                tracing::warn!(owner = %self.config.owner, position = records[0].position, %failure,
                    "publishing failed; the batch will be sent again");
                for record in records {
                    self.count_attempt(record.position);
                }
                pass.failed += records.len();
                pass.halt(Halt::Failed);
                pass.out_of_order = true;
                return;
            }
        };
        if !pass.out_of_order {
            pass.delivered.reserve(records.len());
        }
        for (record, outcome) in records.iter().zip(outcomes) {
            match outcome {
                PublishOutcome::Acknowledged => {
                    if !pass.out_of_order {
                        pass.delivered.push(Delivered::from(record));
                    }
                }
                PublishOutcome::Rejected(error) => pass.rejected.push(Rejection {
                    position: record.position,
                    message_id: record.message.message_id,
                    attempts: self.attempts_of(record.position) + 1,
                    error: error.to_string(),
                }),
                PublishOutcome::Failed(error) => {
                    if !pass.out_of_order {
                        tracing::warn!(owner = %self.config.owner, position = record.position, %error,
                            "publishing failed; the record and those after it will be sent again");
                    }
                    pass.out_of_order = true;
                    pass.halt(Halt::Failed);
                    pass.failed += 1;
                    self.count_attempt(record.position);
                }
            }
        }
    }

    /// Dead-letters `rejected` and marks `delivered`, under `generation`: how many of each.
    async fn write(
        &self,
        generation: u64,
        rejected: Vec<Rejection>,
        delivered: Vec<Delivered>,
    ) -> Result<(usize, usize), StoreError> {
        if !rejected.is_empty() {
            for r in &rejected {
                tracing::error!(owner = %self.config.owner, position = r.position, attempts = r.attempts,
                    error = %r.error, "the record can never be published; moving it to the dead letters");
            }
            self.store.dead_letter(generation, &rejected).await?;
        }
        if !delivered.is_empty() {
            self.store.mark_delivered(generation, &delivered).await?;
        }
        self.forget(
            rejected
                .iter()
                .map(|r| r.position)
                .chain(delivered.iter().map(|d| d.position)),
        );
        Ok((rejected.len(), delivered.len()))
    }

    /// Sets the backlog gauges from the store's [`RelayStatus`].
    // Record counts stay far below 2^52, where f64 is exact.
    #[allow(clippy::cast_precision_loss)]
    async fn report_backlog(&self) {
        match self.store.relay_status().await {
            Ok(status) => {
                let outbox = self.outbox.clone();
                metrics::gauge!(telemetry::OUTBOX_BACKLOG, "outbox" => outbox.clone())
                    .set(status.pending as f64);
                metrics::gauge!(telemetry::OUTBOX_DEAD_LETTERS, "outbox" => outbox)
                    .set(status.dead_letters as f64);
            }
            Err(err) => tracing::debug!(error = %err, "could not read the outbox backlog"),
        }
    }

    fn fenced(&self, err: &StoreError) -> RelayStep {
        tracing::warn!(owner = %self.config.owner, error = %err,
            "another relay took the lease over; nothing more of this pass was marked");
        RelayStep::Fenced
    }

    /// Publishes `records`, cut off after the publish timeout: the outcome of each, or why the
    /// call as a whole failed.
    async fn publish(
        &self,
        records: &[OutboxRecord],
    ) -> Result<Vec<PublishOutcome<P::Error>>, CallFailure> {
        let span = tracing::debug_span!("es.relay.batch", owner = %self.config.owner,
            first_position = records[0].position, records = records.len());
        metrics::histogram!(telemetry::RELAY_BATCH_RECORDS).record(records.len() as u32);
        let call = self.publisher.publish(records).instrument(span);
        match tokio::time::timeout(self.config.publish_timeout, call).await {
            Ok(outcomes) if outcomes.len() == records.len() => Ok(outcomes),
            Ok(outcomes) => Err(CallFailure::WrongCount {
                answered: outcomes.len(),
                records: records.len(),
            }),
            Err(_) => Err(CallFailure::TimedOut(self.config.publish_timeout)),
        }
    }
    fn attempts(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
        self.attempts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn attempts_of(&self, position: u64) -> u32 {
        self.attempts().get(&position).copied().unwrap_or(0)
    }

    fn count_attempt(&self, position: u64) {
        *self.attempts().entry(position).or_insert(0) += 1;
    }

    fn forget(&self, positions: impl Iterator<Item = u64>) {
        let mut attempts = self.attempts();
        if attempts.is_empty() {
            return;
        }
        for p in positions {
            attempts.remove(&p);
        }
    }

    /// Records below the oldest pending one are settled (by this relay or another).
    fn forget_settled(&self, oldest_pending: u64) {
        self.attempts().retain(|p, _| *p >= oldest_pending);
    }

    /// Starts this process's worker of the relay group of `store` (see [`crate::group`]): the
    /// group's workers, here and in other processes, divide the store's outboxes
    /// ([`OutboxStore::outbox_partitions`]) among them, and this one runs a relay with `config`
    /// and a clone of `publisher` on each outbox it takes. Each relay still holds its outbox's
    /// relay lease and is fenced by it, so each outbox is published by one relay at a time, in
    /// order, and a key's messages reach the broker in order. On a store with one outbox, one
    /// worker publishes and the others stand by.
    pub fn spawn_group(
        store: S,
        publisher: P,
        config: RelayConfig,
        group: crate::group::GroupConfig,
    ) -> crate::group::GroupHandle
    where
        S: crate::contract::LeaseStore,
        P: Clone,
    {
        let outboxes = store.outbox_partitions();
        crate::group::spawn_group(
            store.clone(),
            "relay",
            outboxes,
            group,
            move |mut claim: crate::group::Claim| {
                let relay = store.outbox_partition(claim.partition).map(|outbox| {
                    Relay::new(outbox, publisher.clone(), config.clone())
                        .outbox_label(claim.partition.to_string())
                });
                async move {
                    let result = match relay {
                        Ok(relay) => relay.run(claim.stopped()).await.map_err(|e| e.to_string()),
                        Err(err) => Err(err.to_string()),
                    };
                    if let Err(err) = result {
                        tracing::error!(partition = claim.partition, error = %err, "the relay of an outbox stopped");
                    }
                }
            },
        )
    }

    /// Runs until `shutdown` resolves; then releases the lease. Transient store failures and
    /// broker failures are retried with backoff. Fails at once with [`RelayError::Config`] if the
    /// configuration cannot work.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), RelayError> {
        self.config.validate()?;
        tokio::pin!(shutdown);
        let mut backoff = self.config.backoff.delays();
        let mut reported: Option<Instant> = None;
        loop {
            let step = tokio::select! {
                () = &mut shutdown => break,
                step = self.drain() => step,
            };
            if let (Ok(step), Some(every)) = (&step, self.config.backlog_every) {
                let holds_lease = !matches!(step, RelayStep::Standby | RelayStep::Fenced);
                if holds_lease && reported.is_none_or(|at| at.elapsed() >= every) {
                    reported = Some(Instant::now());
                    self.report_backlog().await;
                }
            }
            let pause = match step {
                Ok(RelayStep::Published(_) | RelayStep::DeadLettered { .. }) => {
                    backoff.reset();
                    continue;
                }
                Ok(RelayStep::PublishFailed { .. } | RelayStep::LeaseTooShort) => {
                    backoff.next_delay()
                }
                Ok(RelayStep::Idle) => {
                    backoff.reset();
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = crate::contract::wait_for_any_append(&self.store) => {}
                        () = tokio::time::sleep(self.config.idle_poll) => {}
                    }
                    continue;
                }
                Ok(RelayStep::Standby | RelayStep::Fenced) => self.config.lease_ttl / 3,
                Err(err) if err.is_transient() => {
                    tracing::warn!(owner = %self.config.owner, error = %err, "relay store error; retrying");
                    backoff.next_delay()
                }
                Err(err) => return Err(err.into()),
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
        let generation = self.generation.load(Ordering::SeqCst);
        if generation > 0 {
            if let Err(err) = self
                .store
                .release_relay_lease(&self.config.owner, generation)
                .await
            {
                tracing::warn!(owner = %self.config.owner, error = %err, "could not release the relay lease; it will expire");
            }
        }
        Ok(())
    }
}
