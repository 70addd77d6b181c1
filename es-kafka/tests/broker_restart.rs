//! Faults that need a broker of the test's own: kill -9 and restart, with durable storage.

use es_kafka::testing;
use es_memory::InMemoryStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_rides_out_a_broker_restart() {
    let dir = es_test_support::scratch_dir("kafka-restart");
    let mut broker = testing::durable_broker(&dir);
    let delivery =
        testing::relay_rides_out_a_broker_restart(InMemoryStore::new(), &mut broker).await;
    eprintln!("{delivery}");
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}
