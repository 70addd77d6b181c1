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

/// The publisher is gapless: a failure closes its producer for every batch handed over after
/// the failed record. With the broker down, batch `a` and, 2.5 s later, batch `b` of the same
/// key are handed over (a 3 s deadline each); `a` fails at its deadline, which purges `b` too;
/// batch `c`, handed over while `b` is still in flight, fails at once without being sent. The
/// broker is back before `b`'s own deadline, so without the purge `b` would be written although
/// `a` was not: a gap, `a`'s records then written after `b`'s. A batch started once none is in
/// flight goes through a fresh producer. In the topic, every record's first copy comes in
/// outbox order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_fails_every_batch_handed_over_after_it() {
    use std::time::Duration;

    use es_core::outbox::PublishOutcome;
    use es_core::Publisher;
    use es_kafka::rdkafka::error::RDKafkaErrorCode;
    use es_kafka::{KafkaConfig, KafkaPublisher, PublishError};

    let dir = es_test_support::scratch_dir("kafka-gapless");
    let mut broker = testing::durable_broker(&dir);
    let config = KafkaConfig::new(broker.brokers()).with_delivery_timeout(Duration::from_secs(3));
    let topic = testing::unique_topic("gapless");
    es_kafka::ensure_topic(&config, &topic, 1).await.unwrap();
    let store = InMemoryStore::new();
    let records = testing::one_key_outbox(&store, &topic, 16).await;
    let publisher = KafkaPublisher::new(config.clone()).unwrap();
    let acknowledged = |outcomes: &[PublishOutcome<PublishError>]| {
        outcomes.iter().all(PublishOutcome::is_acknowledged)
    };
    let warm_up = publisher.publish(&records[..1]).await;
    assert!(acknowledged(&warm_up), "warm-up: {warm_up:?}");

    tokio::task::block_in_place(|| broker.kill9()).unwrap();
    let a = publisher.publish(&records[1..6]);
    let b = publisher.publish(&records[6..11]);
    tokio::pin!(a, b);
    assert!(futures::poll!(&mut a).is_pending(), "a is handed over");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(futures::poll!(&mut b).is_pending(), "b is handed over");
    let a_out = a.await;
    assert!(
        a_out.iter().all(|o| matches!(o, PublishOutcome::Failed(_))),
        "a fails at its deadline: {a_out:?}"
    );
    // `b` has not returned: `c` is handed over while a batch that was in flight at the failure
    // still is, and fails without being sent.
    let c_out = publisher.publish(&records[11..16]).await;
    assert!(
        c_out.iter().all(|o| matches!(o,
            PublishOutcome::Failed(PublishError::Refused(e))
                if e.rdkafka_error_code() == Some(RDKafkaErrorCode::PurgeQueue))),
        "c is refused: {c_out:?}"
    );
    tokio::task::block_in_place(|| broker.restart()).unwrap();
    let b_out = b.await;
    assert!(
        b_out.iter().all(|o| matches!(o, PublishOutcome::Failed(_))),
        "b was purged with a: {b_out:?}"
    );
    // None in flight: a fresh producer sends everything again.
    let mut again = Vec::new();
    for _ in 0..5 {
        again = publisher.publish(&records[1..]).await;
        if acknowledged(&again) {
            break;
        }
    }
    assert!(acknowledged(&again), "sent again: {again:?}");

    let received = testing::read_all(&config, &topic).await;
    let firsts = testing::first_positions(&received);
    let expected: Vec<u64> = records.iter().map(|r| r.position).collect();
    assert_eq!(
        firsts, expected,
        "first copies in outbox order, none missing"
    );
    eprintln!(
        "{} messages in the topic for {} records",
        received.len(),
        records.len()
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}
