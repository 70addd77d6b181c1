//! End to end on the in-memory store against the shared broker (`KAFKA_BROKERS`, started by
//! `cargo xtask test`): repository -> outbox -> relay -> Kafka -> consumers.

use es_kafka::testing;
use es_kafka::KafkaConfig;
use es_memory::InMemoryStore;

fn config() -> KafkaConfig {
    KafkaConfig::new(es_test_support::kafka_brokers())
}

es_kafka::kafka_store_tests!(|| async { InMemoryStore::new() }, config());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_refusals_are_permanent() {
    testing::producer_refusals_are_permanent(config()).await;
}

/// A batch whose records do not all fit in the producer's queue at once waits (`QueueFull`)
/// between records; meanwhile the relay's next batch in flight begins and hands its own records
/// over as room frees up. Hand-over order is then not outbox order, and records of one key
/// (one partition) are written out of order, with no failure at all. A queue of 5 messages
/// stands for any queue smaller than `max_in_flight * batch_size` records (by count, or by
/// `queue.buffering.max.kbytes` with large messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_in_flight_keep_outbox_order_when_the_producer_queue_is_full() {
    use std::time::Duration;

    use es_core::{OutboxStore, Relay, RelayStep};
    use es_kafka::KafkaPublisher;

    let config = config()
        .with_delivery_timeout(Duration::from_secs(10))
        .set("queue.buffering.max.messages", "5");
    let topic = testing::unique_topic("queuefull");
    es_kafka::ensure_topic(&config, &topic, 1).await.unwrap();
    let store = InMemoryStore::new();
    let records = testing::one_key_outbox(&store, &topic, 400).await;
    let publisher = KafkaPublisher::new(config.clone()).unwrap();
    let relay = Relay::new(
        store.clone(),
        publisher,
        testing::relay_config("queuefull", 40, Duration::from_secs(30)),
    );
    let mut steps = Vec::new();
    loop {
        let step = relay.drain().await.unwrap();
        steps.push(step);
        if step == RelayStep::Idle {
            break;
        }
        assert!(steps.len() < 20, "the relay makes progress: {steps:?}");
    }
    assert_eq!(store.outbox_len().await.unwrap(), 0, "{steps:?}");
    let received = testing::read_all(&config, &topic).await;
    let firsts = testing::first_positions(&received);
    let expected: Vec<u64> = records.iter().map(|r| r.position).collect();
    assert_eq!(firsts, expected, "first copies in outbox order ({steps:?})");
}
