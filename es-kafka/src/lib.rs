//! Kafka for the es-core outbox: a [`Publisher`](es_core::Publisher) that the
//! [`Relay`](es_core::Relay) uses to send integration events to Kafka, plus small helpers to
//! create topics and read them back.
//!
//! Kafka's client (librdkafka, built from source by `rdkafka`) lives in this crate only, so
//! applications that do not publish to Kafka do not compile it.
//!
//! Features: `tls` builds librdkafka with TLS and SASL/SCRAM against the system's OpenSSL and
//! adds `KafkaTls`, `KafkaSasl` and `KafkaConfig::with_tls` / `with_sasl` (see "TLS and SASL"
//! below); `testing` adds the `testing` module, the end-to-end cases the stores run.
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
#![doc = include_str!("../DESIGN.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod admin;
mod client;
mod config;
mod consumer;
mod error;
pub mod headers;
mod publisher;
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
mod security;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

pub use admin::{ensure_topic, partition_count};
pub use client::check_connection;
pub use config::{KafkaConfig, DEFAULT_MAX_MESSAGE_BYTES};
pub use consumer::{read_topic, ConsumedMessage, TopicConsumer};
pub use error::{Error, PublishError, RecordError};
pub use publisher::{classify, KafkaPublisher, Permanence};
/// The Kafka client this crate is built on, for settings and raw access.
pub use rdkafka;
#[cfg(feature = "tls")]
pub use security::{KafkaSasl, KafkaTls, SaslMechanism};
