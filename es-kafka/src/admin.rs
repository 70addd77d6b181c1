//! Creating the topics the outbox publishes to.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;

use crate::client::{self, Context};
use crate::config::KafkaConfig;
use crate::error::Error;

/// How long topic creation and the metadata check may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates `topic` with `partitions` partitions (and the broker's default replication factor)
/// unless it exists, then waits until the broker's metadata lists it. Returns whether it was
/// created by this call.
///
/// A topic that already exists counts as success, whatever its partition count; the
/// partition count of an existing topic is not changed (doing so would move keys to other
/// partitions and break per-stream order for consumers).
///
/// Checks the connection first ([`check_connection`](crate::check_connection)), so TLS and
/// SASL failures are [`Error::Tls`] and [`Error::Authentication`].
pub async fn ensure_topic(
    config: &KafkaConfig,
    topic: &str,
    partitions: u32,
) -> Result<bool, Error> {
    crate::check_connection(config).await?;
    let admin: AdminClient<Context> =
        client::create(config, "admin client", &config.client_settings(&[]))?;
    let partitions = i32::try_from(partitions).unwrap_or(i32::MAX);
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1));
    let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
    let results = admin
        .create_topics([&new], &options)
        .await
        .map_err(|source| Error::Request {
            what: format!("create topic `{topic}`"),
            source,
        })?;
    let mut created = false;
    for result in results {
        match result {
            Ok(_) => created = true,
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(Error::CreateTopic { topic, code }),
        }
    }
    wait_for_metadata(config, topic).await?;
    Ok(created)
}

/// The partition count of `topic` as the broker reports it, once it lists the topic.
pub async fn partition_count(config: &KafkaConfig, topic: &str) -> Result<u32, Error> {
    wait_for_metadata(config, topic).await
}

async fn wait_for_metadata(config: &KafkaConfig, topic: &str) -> Result<u32, Error> {
    let client: BaseConsumer<Context> =
        client::create(config, "consumer", &config.client_settings(&[]))?;
    let topic = topic.to_owned();
    let blocking = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        client::wait_connected(&client, ADMIN_TIMEOUT)?;
        loop {
            let left = ADMIN_TIMEOUT.saturating_sub(start.elapsed());
            let what = || format!("read the metadata of topic `{topic}`");
            if left.is_zero() {
                return Err(Error::Timeout {
                    what: what(),
                    timeout: ADMIN_TIMEOUT,
                });
            }
            let metadata = client
                .fetch_metadata(Some(topic.as_str()), left)
                .map_err(|source| Error::Request {
                    what: what(),
                    source,
                })?;
            let partitions = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map_or(0, |t| t.partitions().len());
            if partitions > 0 {
                return Ok(partitions as u32);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    blocking
        .await
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()))
}
