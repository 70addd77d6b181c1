//! [`KafkaPublisher`]: the outbox relay's way to Kafka.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use es_core::projection::HandlerError;
use es_core::{OutboxRecord, Publisher};
use futures::future::join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use crate::config::KafkaConfig;
use crate::error::Error;
use crate::headers;

/// Publishes outbox records to Kafka with an idempotent producer.
///
/// Each record goes to `record.message.topic`, keyed by `record.message.key` (the stream id, so
/// one stream's messages share a partition and keep their order), with the JSON payload as value,
/// the [`headers`](crate::headers) and `recorded_at` as timestamp. A batch is sent pipelined
/// (every record handed to the producer at once, in outbox order) and
/// [`publish`](Publisher::publish) returns `Ok` only when the broker acknowledged every record
/// of it. See the [crate docs](crate#delivery-semantics) for what that guarantees.
///
/// One publisher holds one producer (a background thread and a connection per broker); share it
/// rather than creating one per batch. After a batch failed, the next one goes through a fresh
/// producer (a new producer id), whatever state the old one was left in.
pub struct KafkaPublisher {
    config: KafkaConfig,
    producer: Mutex<FutureProducer>,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("brokers", &self.config.brokers())
            .finish_non_exhaustive()
    }
}

impl KafkaPublisher {
    /// A publisher with `config`'s producer settings. Connecting happens in the background: a
    /// broker that is down now only delays the first batch.
    pub fn new(config: KafkaConfig) -> Result<Self, Error> {
        let producer = create_producer(&config)?;
        Ok(Self {
            config,
            producer: Mutex::new(producer),
        })
    }

    /// The settings it was created with.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// Sends `records` in order and waits until the broker acknowledged each of them.
    ///
    /// On error some records may have been written anyway (the caller sends the batch again, so
    /// they arrive twice, with the same `message_id`). Returns only after every record of the
    /// batch is settled, so no attempt of it is still in flight when the batch is sent again.
    pub async fn send(&self, records: &[OutboxRecord]) -> Result<(), Error> {
        let producer = self
            .producer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let deadline = Instant::now() + self.config.delivery_timeout();
        let mut pending = Vec::with_capacity(records.len());
        let mut enqueue_error = None;
        for record in records {
            match enqueue(&producer, record, deadline).await {
                Ok(delivery) => pending.push((record, delivery)),
                Err(source) => {
                    enqueue_error = Some(Error::Enqueue {
                        position: record.position,
                        message_id: record.message.message_id,
                        source,
                    });
                    break;
                }
            }
        }
        let outcomes = join_all(
            pending
                .into_iter()
                .map(|(record, delivery)| async move { (record, delivery.await) }),
        )
        .await;
        let mut failures = outcomes.into_iter().filter_map(|(record, outcome)| {
            let error = match outcome {
                Ok(Ok(_)) => return None,
                Ok(Err((error, _))) => error,
                Err(_) => KafkaError::Canceled,
            };
            Some((record, error))
        });
        let result = match (failures.next(), enqueue_error) {
            (Some((record, source)), _) => Err(Error::Delivery {
                failed: 1 + failures.count(),
                total: records.len(),
                position: record.position,
                message_id: record.message.message_id,
                source,
            }),
            (None, Some(error)) => Err(error),
            (None, None) => Ok(()),
        };
        if let Err(error) = &result {
            self.renew(producer, error);
        }
        result
    }

    /// Waits up to `timeout` for messages still queued in the producer (none are after
    /// [`send`](Self::send) returned).
    pub fn flush(&self, timeout: Duration) -> Result<(), Error> {
        let producer = self
            .producer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        producer.flush(timeout).map_err(|source| Error::Request {
            what: "flush the producer".into(),
            source,
        })
    }

    /// Replaces the producer after a failed batch, so the batch is sent again by a producer
    /// with a fresh identity.
    ///
    /// The failed producer's messages are all settled by now, so nothing of it is lost. Kept, it
    /// would recover its idempotence state after the timeouts by bumping its producer epoch on
    /// its own (KIP-360) and sending with an epoch the broker never handed out; Kafka accepts
    /// that, but tansu 0.6 does not (its SQLite engine stops serving, its in-memory engine
    /// answers `ProducerFenced`). A fresh producer only asks the broker for a new producer id.
    /// A producer in a fatal state would refuse everything anyway.
    fn renew(&self, failed: FutureProducer, error: &Error) {
        if let Some((code, reason)) = failed.client().fatal_error() {
            tracing::warn!(%code, %reason, "the Kafka producer hit a fatal error");
        }
        if matches!(error, Error::Enqueue { .. }) && failed.client().fatal_error().is_none() {
            // Refused locally (too large, unknown topic): the producer itself is fine.
            return;
        }
        let old = match create_producer(&self.config) {
            Ok(fresh) => std::mem::replace(
                &mut *self.producer.lock().unwrap_or_else(PoisonError::into_inner),
                fresh,
            ),
            Err(error) => {
                tracing::warn!(%error, "cannot create a new Kafka producer; keeping the old one");
                return;
            }
        };
        // Dropping a producer purges, flushes and joins its thread: not on the async runtime.
        drop(tokio::task::spawn_blocking(move || drop((old, failed))));
    }
}

impl Publisher for KafkaPublisher {
    async fn publish(&self, records: &[OutboxRecord]) -> Result<(), HandlerError> {
        self.send(records).await.map_err(Into::into)
    }
}

fn create_producer(config: &KafkaConfig) -> Result<FutureProducer, Error> {
    config
        .producer_client_config()
        .create()
        .map_err(|source| Error::Client {
            client: "producer",
            source,
        })
}

/// Hands `record` to the producer, waiting while its queue is full.
async fn enqueue(
    producer: &FutureProducer,
    record: &OutboxRecord,
    deadline: Instant,
) -> Result<DeliveryFuture, KafkaError> {
    let message = &record.message;
    let mut future_record = FutureRecord::to(&message.topic)
        .key(message.key.as_bytes())
        .payload(&message.payload[..])
        .headers(headers::encode(record))
        .timestamp(record.recorded_at.timestamp_millis());
    loop {
        match producer.send_result(future_record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                if Instant::now() < deadline =>
            {
                future_record = back;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((error, _)) => return Err(error),
        }
    }
}
