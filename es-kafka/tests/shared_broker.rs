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
