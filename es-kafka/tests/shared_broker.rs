//! End to end on the in-memory store against the shared broker (`KAFKA_BROKERS`, started by
//! `cargo xtask test`): repository -> outbox -> relay -> Kafka -> consumers.

use es_kafka::testing;
use es_kafka::KafkaConfig;
use es_memory::InMemoryStore;

fn config() -> KafkaConfig {
    KafkaConfig::new(es_test_support::kafka_brokers())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_delivers_every_message_in_order() {
    let delivery =
        testing::relay_delivers_every_message_in_order(InMemoryStore::new(), config()).await;
    eprintln!("{delivery}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outside_client_reads_every_message() {
    let delivery =
        testing::outside_client_reads_every_message(InMemoryStore::new(), config()).await;
    eprintln!("{delivery}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_killed_mid_batch_loses_nothing() {
    let delivery =
        testing::relay_killed_mid_batch_loses_nothing(InMemoryStore::new(), config()).await;
    eprintln!("{delivery}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_records_are_dead_lettered() {
    let report = testing::poison_records_are_dead_lettered(InMemoryStore::new(), config()).await;
    eprintln!("{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_refusals_are_permanent() {
    testing::producer_refusals_are_permanent(config()).await;
}
