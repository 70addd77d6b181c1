//! Kafka for the es-core outbox: a [`Publisher`](es_core::Publisher) that the
//! [`Relay`](es_core::Relay) uses to send integration events to Kafka, plus small helpers to
//! create topics and read them back.
//!
//! Kafka's client (librdkafka, built from source by `rdkafka`) lives in this crate only, so
//! applications that do not publish to Kafka do not compile it.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use es_core::{Relay, RelayConfig};
//! use es_kafka::{KafkaConfig, KafkaPublisher};
//! use es_memory::InMemoryStore;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let store = InMemoryStore::new(); // or a PostgreSQL / Redis store
//! let config = KafkaConfig::new("127.0.0.1:9092");
//! es_kafka::ensure_topic(&config, "ledger.public", 3).await?;
//! let relay = Relay::new(store, KafkaPublisher::new(config)?, RelayConfig::default());
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let task = tokio::spawn(relay.run(async {
//!     let _ = stopped.await;
//! }));
//! // ... the application appends through a repository with a translator ...
//! # tokio::time::sleep(Duration::from_secs(1)).await;
//! let _ = stop.send(());
//! task.await??;
//! # Ok(())
//! # }
//! ```
//!
//! # Delivery semantics
//!
//! - **At least once.** The publisher settles every record of a batch and says which the broker
//!   acknowledged (`acks=all`). The relay marks delivered only the acknowledged records before
//!   the first one that failed; that one and everything after it (acknowledged or not) are sent
//!   again, as is a whole batch whose relay died before marking it, so some messages can arrive
//!   twice.
//! - **Duplicates are detectable.** Every message carries the outbox message's unique id in the
//!   [`message_id`](headers::MESSAGE_ID) header (and the domain event it came from in
//!   [`source_event_id`](headers::SOURCE_EVENT_ID)). A consumer that must act once per message
//!   remembers the ids it handled, or makes its effect idempotent by that id.
//! - **Per-stream order, per partition.** The key is the source stream id, so one stream's
//!   messages go to one partition (the Java client's `murmur2` hash, so other producers agree on
//!   the partition). The relay publishes in outbox order and the idempotent producer keeps that
//!   order across its internal retries. Taking each `message_id`'s first appearance, one stream's
//!   messages appear in the order they were recorded; the
//!   [`outbox_position`](headers::OUTBOX_POSITION) header increases along it. Repeating the
//!   partition count of a topic that already holds data moves keys to other partitions: create
//!   topics with their final partition count.
//! - **Nothing published that did not happen.** Outbox records are written atomically with the
//!   domain events, so a rejected command publishes nothing.
//! - **Records Kafka can never accept are parked, not retried forever.**
//!   [`KafkaPublisher::check`] refuses, before anything is sent, a record whose topic name is not
//!   a legal Kafka topic name or whose message is larger than
//!   [`KafkaConfig::max_message_bytes`] (counted exactly as librdkafka counts `message.max.bytes`:
//!   key, value, headers and the record's framing). Errors of records that were sent are
//!   classified by their error code ([`classify`]): the record's own fault (too large, invalid
//!   topic, record list too large, not authorized for the topic, invalid record or timestamp,
//!   policy violation) is [`PublishOutcome::Rejected`](es_core::outbox::PublishOutcome), anything
//!   about the producer or the cluster (time-outs, brokers down or moving, unknown topic, a
//!   producer in a fatal state) is [`PublishOutcome::Failed`](es_core::outbox::PublishOutcome).
//!   The relay dead-letters the first kind in the store and sends the second again; see
//!   [`es_core::outbox`] for what that does to per-key order and how to re-queue.
//!   Tested by `testing::poison_records_are_dead_lettered` (a 200 KB message with a 64 KiB limit
//!   and an invalid topic among ten good records, on every store: both dead-lettered without
//!   being sent, the ten published exactly once, the status counting two, the large one published
//!   after a re-queue with a raised limit) and `testing::producer_refusals_are_permanent` (the
//!   check's limit is librdkafka's to the byte; a record librdkafka refuses is `Rejected` and the
//!   records around it in the batch are written). The test broker, tansu 0.6, enforces no message
//!   size and no topic name rules (it accepts what Kafka would refuse), so a *broker's* refusal is
//!   covered by the code classification ([`classify`], unit-tested per code), not by a broker
//!   test.
//! - **Within the relay's lease.** When the relay's lease runs out it drops the publish call;
//!   the publisher then purges its producer's queue and the requests in flight and replaces the
//!   producer, so nothing it had not yet written to a socket is sent afterwards. A produce request
//!   already on the wire may still be written by the broker after that: the one overlap with the
//!   next relay's publishing that the relay cannot prevent.
//!
//! One known gap of the idempotent producer (not of this crate): if, within one batch, the
//! broker comes back in the instant between the delivery deadlines of two messages of one
//! partition, the earlier message can fail while the later one is written. The failed message
//! and the ones after it are then sent again, and the later message's first copy precedes the
//! earlier one's. Consumers that compare [`outbox_position`](headers::OUTBOX_POSITION) per key
//! see it.
//!
//! # Producer settings
//!
//! [`KafkaConfig::producer_settings`] lists them; [`KafkaConfig::set`] overrides any of them.
//!
//! | property | value | why |
//! |---|---|---|
//! | `enable.idempotence` | `true` | retries inside the producer neither duplicate nor reorder |
//! | `acks` | `all` | acknowledged = on every in-sync replica |
//! | `max.in.flight.requests.per.connection` | `5` | the most idempotence allows with order |
//! | `message.send.max.retries` | `2147483647` | retry until the delivery timeout |
//! | `message.timeout.ms`, `request.timeout.ms` | delivery timeout (5 s) | a batch settles in bounded time, below the relay's publish timeout |
//! | `message.max.bytes` | [`KafkaConfig::max_message_bytes`] (1,000,000) | the largest message sent; [`KafkaPublisher::check`] refuses larger ones before sending |
//! | `partitioner` | `murmur2_random` | same partition for a key as the Java client |
//! | `linger.ms` | `0` | a relay batch is queued at once, then awaited: lingering only delays it |
//! | `reconnect.backoff.ms` / `.max.ms` | `100` / `1000` | back quickly after a broker restart |
//!
//! # Headers
//!
//! See [`headers`]: `message_id`, `source_event_id`, `message_type`, `schema_version`,
//! `stream_id`, `outbox_position`, `recorded_at`, `content_type`, and when present
//! `correlation_id`, `causation_id`, `actor` and `metadata` (custom fields as JSON). The
//! message timestamp is `recorded_at`.
//!
//! # Watching a topic with a standard client
//!
//! With [kafka-python](https://pypi.org/project/kafka-python/) (`pip install kafka-python`):
//!
//! ```text
//! from kafka import KafkaConsumer
//! consumer = KafkaConsumer("ledger.public", bootstrap_servers="127.0.0.1:9092",
//!                          group_id="watcher", auto_offset_reset="earliest")
//! for m in consumer:
//!     headers = {k: v.decode() for k, v in m.headers}
//!     print(m.partition, m.offset, m.key.decode(), headers["message_type"],
//!           headers["message_id"], m.value.decode())
//! ```
//!
//! With the broker used in this workspace's tests,
//! [tansu](https://github.com/tansu-io/tansu): `tansu cat consume --broker
//! tcp://127.0.0.1:9092 --topic ledger.public` prints the values. In Rust, [`TopicConsumer`]
//! follows a topic as a consumer-group member and [`read_topic`] reads a whole topic once.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod admin;
mod config;
mod consumer;
mod error;
pub mod headers;
mod publisher;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

pub use admin::{ensure_topic, partition_count};
pub use config::{KafkaConfig, DEFAULT_MAX_MESSAGE_BYTES};
pub use consumer::{read_topic, ConsumedMessage, TopicConsumer};
pub use error::{Error, RecordError};
pub use publisher::{classify, KafkaPublisher, Permanence};
/// The Kafka client this crate is built on, for settings and raw access.
pub use rdkafka;
