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
//! - **At least once.** The relay marks outbox records delivered only after
//!   [`KafkaPublisher::send`] saw the broker acknowledge every record of the batch (`acks=all`).
//!   If anything fails (broker down, timeout, relay killed before marking) the whole batch is
//!   sent again, so some messages can arrive twice.
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
//!
//! One known gap of the idempotent producer (not of this crate): if, within one batch, the
//! broker comes back in the instant between the delivery deadlines of two messages of one
//! partition, the earlier message can fail while the later one is written. The batch is then
//! sent again, and the later message's first copy precedes the earlier one's. Consumers that
//! compare [`outbox_position`](headers::OUTBOX_POSITION) per key see it.
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
//! | `message.timeout.ms`, `request.timeout.ms` | delivery timeout (5 s) | a batch fails in bounded time, below the relay's lease |
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
pub use config::KafkaConfig;
pub use consumer::{read_topic, ConsumedMessage, TopicConsumer};
pub use error::Error;
pub use publisher::KafkaPublisher;
/// The Kafka client this crate is built on, for settings and raw access.
pub use rdkafka;
