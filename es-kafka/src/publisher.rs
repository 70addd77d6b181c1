//! [`KafkaPublisher`]: the outbox relay's way to Kafka.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use es_core::outbox::PublishOutcome;
use es_core::{OutboxRecord, Publisher};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};

use crate::client::{self, Context};
use crate::config::KafkaConfig;
use crate::error::{Error, PublishError, RecordError};
use crate::headers;

/// Longest legal Kafka topic name.
const MAX_TOPIC_LEN: usize = 249;

/// Bytes librdkafka adds to every record when it checks `message.max.bytes`
/// (`RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`: the record's length, attributes, timestamp and offset
/// deltas, key and value lengths and header count, each at its largest varint size).
const RECORD_OVERHEAD: usize = 5 + 1 + 10 + 5 + 5 + 5 + 5;

/// Publishes outbox records to Kafka with an idempotent producer.
///
/// Each record goes to `record.message.topic`, keyed by `record.message.key` (the stream id, so
/// one stream's messages share a partition and keep their order), with the JSON payload as value,
/// the [`headers`](crate::headers) and `recorded_at` as timestamp. A batch is sent pipelined
/// (every record handed to the producer at once, in outbox order) and
/// [`publish`](Publisher::publish) returns once every record of it is settled, saying for each
/// whether the broker acknowledged it, rejected it for good, or failed this time (see
/// [`classify`]). See the [crate docs](crate#delivery-semantics) for what that guarantees.
///
/// One publisher holds one producer (a background thread and a connection per broker); give
/// each relay its own and share it rather than creating one per batch.
///
/// **Gapless.** The producer never times a message out on its own (`message.timeout.ms=0`); a
/// batch's deadline ([`KafkaConfig::delivery_timeout`]) is kept by the publisher. The first
/// failure of a batch (a record not acknowledged by its deadline, a delivery error, a record
/// the producer refuses for now, a call the relay cut off) *closes* the producer: its queue and
/// requests in flight are purged, and it takes no more records, so every record handed over
/// after the failed one, in this batch and in the batches in flight, fails too. Per partition,
/// what the idempotent producer wrote is then a prefix of what it was handed
/// ([`Publisher::gapless`]): a key's later record is never written while an earlier one
/// failed. A closed producer is replaced before the next batch, once no batch is in flight on
/// it (a batch started meanwhile waits), so two producers never write one partition at once.
/// A record the producer refuses for good when it is handed over (too large, ...) does not
/// close it: the relay dead-letters it and the records after it go on. A batch hands its
/// records over as a whole, batches in the order they began: one that waits for room in the
/// producer's queue keeps the batches begun after it waiting too, or their records would be
/// handed over (and written) between its own
/// (`batches_in_flight_keep_outbox_order_when_the_producer_queue_is_full`).
pub struct KafkaPublisher {
    config: KafkaConfig,
    line: Mutex<Arc<Line>>,
    /// Held shared by every batch in flight, exclusively to replace a closed producer.
    batches: tokio::sync::RwLock<()>,
    /// Held by a batch while it hands its records to the producer. Handing over waits while the
    /// producer's queue is full; without it, a batch begun meanwhile would hand its records over
    /// in between. Fair (first come, first served), so batches hand over in the order they
    /// began, each as a whole.
    handing_over: tokio::sync::Mutex<()>,
}

/// A producer and whether it was closed after a failure.
struct Line {
    producer: ThreadedProducer<Deliveries>,
    /// Set once, under the write lock, with the purge; every hand-over reads it first.
    closed: RwLock<bool>,
}

impl Line {
    fn new(config: &KafkaConfig) -> Result<Self, Error> {
        Ok(Self {
            producer: create_producer(config)?,
            closed: RwLock::new(false),
        })
    }

    fn is_closed(&self) -> bool {
        *self.closed.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Purges the queue and the requests in flight, and takes no more records: nothing handed
    /// over from now on is written. A produce request already on the wire may still be written
    /// by the broker; it holds records handed over before everything purged.
    fn close(&self, why: &str) {
        let mut closed = self.closed.write().unwrap_or_else(PoisonError::into_inner);
        if !*closed {
            *closed = true;
            tracing::warn!(
                why,
                "closing the Kafka producer: purging its queue and requests"
            );
            self.producer
                .purge(PurgeConfig::default().queue().inflight());
        }
    }

    /// Hands `record` to the producer, waiting while its queue is full; refused with
    /// `_PURGE_QUEUE` once the line is closed. `slot` receives its delivery report; a record
    /// that is refused settles its slot with the error at once.
    async fn enqueue(
        &self,
        record: &OutboxRecord,
        slot: Box<Slot>,
        deadline: Instant,
    ) -> Result<(), KafkaError> {
        let message = &record.message;
        let mut base_record = BaseRecord::with_opaque_to(&message.topic, slot)
            .key(message.key.as_bytes())
            .payload(&message.payload[..])
            .headers(headers::encode(record))
            .timestamp(record.recorded_at.timestamp_millis());
        loop {
            let sent = {
                let closed = self.closed.read().unwrap_or_else(PoisonError::into_inner);
                if *closed {
                    let error = KafkaError::MessageProduction(RDKafkaErrorCode::PurgeQueue);
                    base_record.delivery_opaque.refuse(error.clone());
                    return Err(error);
                }
                self.producer.send(base_record)
            };
            match sent {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    base_record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((error, mut back)) => {
                    back.delivery_opaque.refuse(error.clone());
                    return Err(error);
                }
            }
        }
    }
}

/// The producer's context: the client context of this crate, and delivery reports settling
/// the [`Slot`] each record was handed over with.
struct Deliveries(Context);

impl ClientContext for Deliveries {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.0.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.0.error(error, reason);
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<Slot>;

    fn delivery(&self, result: &DeliveryResult<'_>, mut slot: Box<Slot>) {
        slot.report = Some(match result {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(Failure {
                error: error.clone(),
                local: false,
            }),
        });
    }
}

/// One record of a batch handed to the producer: where its delivery report goes. Dropped
/// without a report (librdkafka destroyed the message without reporting it), it settles as
/// lost (`Canceled`).
struct Slot {
    batch: Arc<Batch>,
    index: usize,
    report: Option<Result<(), Failure>>,
}

impl Slot {
    /// Reports the record as refused when handed over (never sent); it settles when dropped.
    fn refuse(&mut self, error: KafkaError) {
        self.report = Some(Err(Failure::local(error)));
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let report = self.report.take().unwrap_or(Err(Failure {
            error: KafkaError::Canceled,
            local: false,
        }));
        self.batch.settle(self.index, report);
    }
}

/// The delivery reports of one batch, filled in by the producer's thread as they arrive: the
/// batch waits for all of them (or for the first failure) with one wake-up, rather than with a
/// channel and a wake-up per record.
struct Batch {
    state: Mutex<BatchState>,
}

struct BatchState {
    /// Per record, its report once settled.
    reports: Vec<Option<Result<(), Failure>>>,
    /// Records not settled yet.
    unsettled: usize,
    /// A record failed in delivery (not refused when handed over).
    failed: bool,
    /// The waiting batch, woken once everything is settled or a record failed in delivery.
    waker: Option<Waker>,
}

impl Batch {
    fn new(len: usize) -> Arc<Self> {
        let mut reports = Vec::with_capacity(len);
        reports.resize_with(len, || None);
        Arc::new(Self {
            state: Mutex::new(BatchState {
                reports,
                unsettled: len,
                failed: false,
                waker: None,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BatchState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn slot(self: &Arc<Self>, index: usize) -> Slot {
        Slot {
            batch: Arc::clone(self),
            index,
            report: None,
        }
    }

    fn settle(&self, index: usize, report: Result<(), Failure>) {
        let waker = {
            let mut state = self.state();
            let failed = matches!(report, Err(Failure { local: false, .. }));
            let Some(entry) = state.reports.get_mut(index) else {
                return;
            };
            if entry.is_some() {
                return;
            }
            *entry = Some(report);
            state.unsettled -= 1;
            state.failed |= failed;
            if state.unsettled == 0 || failed {
                state.waker.take()
            } else {
                None
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Resolves once every record is settled, or (with `until_failure`) once a record failed in
    /// delivery: whether one did.
    fn settled(&self, until_failure: bool) -> impl Future<Output = bool> + '_ {
        std::future::poll_fn(move |cx| {
            let mut state = self.state();
            if state.unsettled == 0 || (until_failure && state.failed) {
                return Poll::Ready(state.failed);
            }
            match &mut state.waker {
                Some(waker) => waker.clone_from(cx.waker()),
                None => state.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
    }

    /// The reports; a record not settled counts as timed out.
    fn reports(&self) -> Vec<Result<(), Failure>> {
        std::mem::take(&mut self.state().reports)
            .into_iter()
            .map(|report| {
                report.unwrap_or(Err(Failure {
                    error: KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
                    local: false,
                }))
            })
            .collect()
    }
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("brokers", &self.config.brokers())
            .finish_non_exhaustive()
    }
}

/// Whether a Kafka error is the record's own fault, so that sending it again can never succeed
/// (`true`: the relay dead-letters it), or the environment's, so that a later attempt may succeed
/// (`false`: the relay sends it again). Decided by the error code, never by the message text.
///
/// Permanent: the message or the batch is too large (`MESSAGE_TOO_LARGE`,
/// `INVALID_MESSAGE_SIZE`, `RECORD_LIST_TOO_LARGE`), the topic name is invalid
/// (`INVALID_TOPIC_EXCEPTION`), the producer may not write to the topic
/// (`TOPIC_AUTHORIZATION_FAILED`), the broker refuses the record itself (`INVALID_RECORD`,
/// `INVALID_TIMESTAMP`, `UNSUPPORTED_FOR_MESSAGE_FORMAT`, `POLICY_VIOLATION`), or librdkafka
/// cannot build it (`_BAD_MSG`).
///
/// Everything else is transient, notably time-outs (`_MSG_TIMED_OUT`, `REQUEST_TIMED_OUT`),
/// brokers down or moving (`_TRANSPORT`, `BROKER_NOT_AVAILABLE`, `NOT_LEADER_FOR_PARTITION`,
/// `LEADER_NOT_AVAILABLE`, `NOT_ENOUGH_REPLICAS`), a topic that does not exist yet
/// (`UNKNOWN_TOPIC_OR_PARTITION`, `_UNKNOWN_TOPIC`: an operator may create it), a full queue,
/// messages purged when a batch was cut off, and a producer in a fatal state (`_FATAL`, for
/// example `CLUSTER_AUTHORIZATION_FAILED` on the idempotent producer's id request): those are
/// about the producer or the cluster, not about one record, and dead-lettering every record
/// because of them would empty the outbox into the dead letters.
pub fn classify(error: &KafkaError) -> Permanence {
    use RDKafkaErrorCode as C;
    let permanent = error.rdkafka_error_code().is_some_and(|code| {
        matches!(
            code,
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::MessageBatchTooLarge
                | C::InvalidTopic
                | C::TopicAuthorizationFailed
                | C::InvalidRecord
                | C::InvalidTimestamp
                | C::UnsupportedForMessageFormat
                | C::PolicyViolation
                | C::BadMessage
        )
    });
    if permanent {
        Permanence::Permanent
    } else {
        Permanence::Transient
    }
}

/// What [`classify`] makes of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permanence {
    /// The record can never be published.
    Permanent,
    /// A later attempt may succeed.
    Transient,
}

impl KafkaPublisher {
    /// A publisher whose brokers answered, over TLS and authenticated when `config` says so:
    /// [`check_connection`](crate::check_connection), then [`new`](Self::new). A wrong CA,
    /// a certificate for another host name or wrong SASL credentials fail here, typed
    /// ([`Error::Tls`], [`Error::Authentication`]), rather than as delivery time-outs of the
    /// first batches.
    pub async fn connect(config: KafkaConfig) -> Result<Self, Error> {
        crate::check_connection(&config).await?;
        Self::new(config)
    }

    /// A publisher with `config`'s producer settings. Connecting happens in the background: a
    /// broker that is down now only delays the first batch, and so does a TLS or SASL failure
    /// (logged as a `tracing` warning; its records fail as not acknowledged and are sent
    /// again). [`connect`](Self::connect) checks the connection first.
    pub fn new(config: KafkaConfig) -> Result<Self, Error> {
        let line = Line::new(&config)?;
        Ok(Self {
            config,
            line: Mutex::new(Arc::new(line)),
            batches: tokio::sync::RwLock::new(()),
            handing_over: tokio::sync::Mutex::new(()),
        })
    }

    fn line(&self) -> Arc<Line> {
        Arc::clone(&self.line.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The settings it was created with.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// Whether Kafka could ever accept `record`: its topic name is legal (1 to 249 ASCII letters,
    /// digits, `.`, `_` or `-`, and neither `.` nor `..`) and its message is no larger than
    /// [`KafkaConfig::max_message_bytes`], counted as librdkafka counts it (key, value, headers,
    /// and the record's framing at its largest).
    pub fn check(&self, record: &OutboxRecord) -> Result<(), RecordError> {
        check_topic(&record.message.topic)?;
        let size = message_size(record);
        let limit = self.config.max_message_bytes();
        if size > limit {
            return Err(RecordError::TooLarge { size, limit });
        }
        Ok(())
    }

    /// Sends `records` in order and waits until the broker acknowledged each of them: `Ok` if
    /// it acknowledged them all, else the first failure. See [`publish`](Publisher::publish)
    /// for the outcome of each record.
    pub async fn send(&self, records: &[OutboxRecord]) -> Result<(), Error> {
        for (record, outcome) in records.iter().zip(self.deliver(records).await) {
            match outcome {
                Ok(()) => {}
                Err(Failure { error, local: true }) => {
                    return Err(Error::Enqueue {
                        position: record.position,
                        message_id: record.message.message_id,
                        source: error,
                    })
                }
                Err(Failure { error, .. }) => {
                    return Err(Error::Delivery {
                        failed: 1,
                        total: records.len(),
                        position: record.position,
                        message_id: record.message.message_id,
                        source: error,
                    })
                }
            }
        }
        Ok(())
    }

    /// Sends `records` in order and settles each: `Ok` once acknowledged, else the error.
    ///
    /// A record the producer refuses for good when it is handed over (too large, ...) is skipped
    /// and the next ones are sent. Any other failure closes the producer (see
    /// [`KafkaPublisher`]), so the records after it fail too. Returns only after every record
    /// sent is settled. If the returned future is dropped first (the relay's lease ran out),
    /// the producer is closed at once (failing the other batches in flight on it).
    async fn deliver(&self, records: &[OutboxRecord]) -> Vec<Result<(), Failure>> {
        let Some(_in_flight) = self.start_batch() else {
            return records
                .iter()
                .map(|_| {
                    Err(Failure::local(KafkaError::MessageProduction(
                        RDKafkaErrorCode::PurgeQueue,
                    )))
                })
                .collect();
        };
        let line = self.line();
        let mut cancel = CancelGuard(Some(Arc::clone(&line)));
        let deadline = Instant::now() + self.config.delivery_timeout();
        let batch = Batch::new(records.len());
        let handing_over = self.handing_over.lock().await;
        for (index, record) in records.iter().enumerate() {
            if let Err(error) = line
                .enqueue(record, Box::new(batch.slot(index)), deadline)
                .await
            {
                if classify(&error) == Permanence::Transient {
                    line.close("a record could not be handed over");
                }
            }
        }
        drop(handing_over);
        // One wait for the whole batch, cut short by the first delivery failure so that the
        // producer is closed at once.
        let mut until_failure = true;
        loop {
            match tokio::time::timeout_at(deadline.into(), batch.settled(until_failure)).await {
                Ok(false) => break,
                Ok(true) if !until_failure => break,
                Ok(true) => {
                    line.close("a record was not acknowledged");
                    until_failure = false;
                }
                Err(_) => {
                    line.close("the batch was not acknowledged by its deadline");
                    // Purged: the producer's thread settles what is left with `_PURGE_*` at
                    // once; what it does not settle counts as timed out.
                    let grace = self.config.delivery_timeout();
                    let _ = tokio::time::timeout(grace, batch.settled(false)).await;
                    break;
                }
            }
        }
        let outcomes = batch.reports();
        // Settled: nothing is left to cancel.
        cancel.0 = None;
        outcomes
    }

    /// Lets a batch start, holding a share of `batches` while it is in flight: at once on an
    /// open producer; on a closed one, after replacing it if no batch is in flight, else not at
    /// all (`None`: a batch handed over after a failure, while batches that were in flight at
    /// the failure have not all returned, fails as a whole, so nothing after the failed record
    /// is written).
    fn start_batch(&self) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        if !self.line().is_closed() {
            if let Ok(shared) = self.batches.try_read() {
                return Some(shared);
            }
        }
        let exclusive = self.batches.try_write().ok()?;
        if self.line().is_closed() {
            self.renew();
        }
        Some(tokio::sync::RwLockWriteGuard::downgrade(exclusive))
    }

    /// Waits up to `timeout` for messages still queued in the producer (none are after
    /// [`send`](Self::send) returned).
    pub fn flush(&self, timeout: Duration) -> Result<(), Error> {
        self.line()
            .producer
            .flush(timeout)
            .map_err(|source| Error::Request {
                what: "flush the producer".into(),
                source,
            })
    }

    /// Replaces a closed producer, so the next batch is sent by a producer with a fresh
    /// identity. Called only while no batch is in flight.
    ///
    /// A fresh producer asks the broker for a new producer id. Kept, a producer whose messages
    /// failed would have to recover its idempotence state by bumping its producer epoch on its
    /// own (KIP-360), with an epoch the broker never handed out; Kafka accepts that, tansu 0.6
    /// does not (its SQLite engine stops serving, its in-memory engine answers
    /// `ProducerFenced`). A producer in a fatal state would refuse everything anyway.
    fn renew(&self) {
        let fresh = match Line::new(&self.config) {
            Ok(fresh) => Arc::new(fresh),
            Err(error) => {
                tracing::warn!(%error, "cannot create a new Kafka producer; retrying with the next batch");
                return;
            }
        };
        let old = std::mem::replace(
            &mut *self.line.lock().unwrap_or_else(PoisonError::into_inner),
            fresh,
        );
        if let Some((code, reason)) = old.producer.client().fatal_error() {
            tracing::warn!(%code, %reason, "the Kafka producer hit a fatal error");
        }
        // Dropping a producer flushes and joins its thread: not on the async runtime.
        let drop_old = move || drop(old);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(drop_old)),
            Err(_) => drop_old(),
        }
    }
}

/// A record that was not acknowledged.
#[derive(Debug)]
struct Failure {
    error: KafkaError,
    /// Refused when handed to the producer (never sent), rather than failed in delivery.
    local: bool,
}

impl Failure {
    fn local(error: KafkaError) -> Self {
        Self { error, local: true }
    }
}

/// Closes the producer if a batch's future is dropped before it settled.
struct CancelGuard(Option<Arc<Line>>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(line) = self.0.take() {
            line.close("publishing was cut off");
        }
    }
}

impl Publisher for KafkaPublisher {
    type Error = PublishError;

    /// `true`: see [`KafkaPublisher`], "Gapless".
    fn gapless(&self) -> bool {
        true
    }

    fn check(&self, record: &OutboxRecord) -> Result<(), PublishError> {
        Ok(Self::check(self, record)?)
    }

    async fn publish(&self, records: &[OutboxRecord]) -> Vec<PublishOutcome<PublishError>> {
        self.deliver(records)
            .await
            .into_iter()
            .map(|outcome| match outcome {
                Ok(()) => PublishOutcome::Acknowledged,
                Err(Failure { error, local }) => {
                    let permanence = classify(&error);
                    let error = if local {
                        PublishError::Refused(error)
                    } else {
                        PublishError::NotAcknowledged(error)
                    };
                    match permanence {
                        Permanence::Permanent => PublishOutcome::Rejected(error),
                        Permanence::Transient => PublishOutcome::Failed(error),
                    }
                }
            })
            .collect()
    }
}

fn check_topic(topic: &str) -> Result<(), RecordError> {
    let reason = if topic.is_empty() {
        Some("the name is empty")
    } else if topic == "." || topic == ".." {
        Some("`.` and `..` are not topic names")
    } else if topic.len() > MAX_TOPIC_LEN {
        Some("the name is longer than 249 characters")
    } else if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("a topic name may hold only ASCII letters, digits, `.`, `_` and `-`")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(RecordError::InvalidTopic {
            topic: topic.chars().take(300).collect(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Bytes of a zigzag varint holding `n` (librdkafka sizes header fields this way).
fn varint_len(n: usize) -> usize {
    let mut v = (n as u64) << 1;
    let mut len = 1;
    while v >= 0x80 {
        v >>= 7;
        len += 1;
    }
    len
}

/// The size librdkafka compares with `message.max.bytes`: key, value, serialized headers and
/// the record overhead.
fn message_size(record: &OutboxRecord) -> usize {
    let header_bytes = headers::sized(record, |key, value| {
        key + value + varint_len(key) + varint_len(value)
    });
    RECORD_OVERHEAD + record.message.key.len() + record.message.payload.len() + header_bytes
}

fn create_producer(config: &KafkaConfig) -> Result<ThreadedProducer<Deliveries>, Error> {
    client::create_with(
        config,
        "producer",
        &config.producer_client_config(),
        Deliveries,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_by_code() {
        use RDKafkaErrorCode as C;
        let permanent = [
            C::MessageSizeTooLarge,
            C::InvalidMessageSize,
            C::MessageBatchTooLarge,
            C::InvalidTopic,
            C::TopicAuthorizationFailed,
            C::InvalidRecord,
            C::InvalidTimestamp,
            C::UnsupportedForMessageFormat,
            C::PolicyViolation,
            C::BadMessage,
        ];
        let transient = [
            C::MessageTimedOut,
            C::RequestTimedOut,
            C::BrokerTransportFailure,
            C::BrokerNotAvailable,
            C::NotLeaderForPartition,
            C::LeaderNotAvailable,
            C::NotEnoughReplicas,
            C::UnknownTopicOrPartition,
            C::UnknownTopic,
            C::QueueFull,
            C::PurgeQueue,
            C::PurgeInflight,
            C::Fatal,
            C::ClusterAuthorizationFailed,
            C::NetworkException,
        ];
        for code in permanent {
            assert_eq!(
                classify(&KafkaError::MessageProduction(code)),
                Permanence::Permanent,
                "{code:?}"
            );
        }
        for code in transient {
            assert_eq!(
                classify(&KafkaError::MessageProduction(code)),
                Permanence::Transient,
                "{code:?}"
            );
        }
        assert_eq!(classify(&KafkaError::Canceled), Permanence::Transient);
    }

    #[test]
    fn topic_names_follow_kafka_rules() {
        for ok in ["ledger.public", "a", "A-b_c.9", &"x".repeat(249)] {
            assert!(check_topic(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "has space",
            "ü",
            "a/b",
            "a:b",
            &"x".repeat(250),
        ] {
            assert!(
                matches!(check_topic(bad), Err(RecordError::InvalidTopic { .. })),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_batch_settles_from_its_slots_with_one_wake_up() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::task::Wake;

        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = std::task::Context::from_waker(&waker);

        let batch = Batch::new(4);
        let mut all = std::pin::pin!(batch.settled(false));
        assert!(all.as_mut().poll(&mut cx).is_pending());
        // Acknowledged, refused when handed over, lost (dropped without a report).
        let mut acked = batch.slot(0);
        acked.report = Some(Ok(()));
        drop(acked);
        let mut refused = batch.slot(1);
        refused.refuse(KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge,
        ));
        drop(refused);
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "no wake-up per record");
        assert!(all.as_mut().poll(&mut cx).is_pending());
        // A delivery failure wakes the batch at once, so that it closes the producer.
        drop(batch.slot(2));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        let mut first_failure = std::pin::pin!(batch.settled(true));
        assert_eq!(first_failure.as_mut().poll(&mut cx), Poll::Ready(true));
        assert!(all.as_mut().poll(&mut cx).is_pending());
        // A second report for a settled record changes nothing.
        let mut again = batch.slot(0);
        again.report = Some(Err(Failure::local(KafkaError::Canceled)));
        drop(again);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        drop(batch.slot(3));
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            2,
            "one wake-up once all settled"
        );
        assert_eq!(all.as_mut().poll(&mut cx), Poll::Ready(true));

        let reports = batch.reports();
        assert!(reports[0].is_ok());
        assert!(matches!(
            &reports[1],
            Err(Failure { local: true, error }) if classify(error) == Permanence::Permanent
        ));
        assert!(matches!(
            &reports[2],
            Err(Failure {
                local: false,
                error: KafkaError::Canceled
            })
        ));
        assert!(matches!(&reports[3], Err(Failure { local: false, .. })));
    }

    #[test]
    fn records_not_settled_count_as_timed_out() {
        let batch = Batch::new(2);
        let mut acked = batch.slot(0);
        acked.report = Some(Ok(()));
        drop(acked);
        let reports = batch.reports();
        assert!(reports[0].is_ok());
        assert!(matches!(
            &reports[1],
            Err(Failure { local: false, error })
                if error.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut)
        ));
    }

    #[test]
    fn varints_are_sized_like_librdkafka() {
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(63), 1);
        assert_eq!(varint_len(64), 2);
        assert_eq!(varint_len(8191), 2);
        assert_eq!(varint_len(8192), 3);
    }
}
