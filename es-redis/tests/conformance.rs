//! The es-core conformance suites on Redis (`REDIS_URL`), each case under its own key prefix.

mod common;

es_testkit::conformance_tests!(|| async { common::store("conf").await });

/// The streaming-out suite: the outbox written by the append script, the relay lease,
/// checkpoints and the projection runner.
mod streaming {
    use super::common;

    es_testkit::streaming_conformance_tests!(|| async { common::store("stream").await });
}

/// The core suite on a store with four feed partitions (the tagged layout on the standalone
/// server: every partition in a hash slot of its own): each case checks each partition's feed.
mod partitioned {
    use super::common;

    es_testkit::conformance_tests!(|| async { common::partitioned_store("pconf", 4).await });
}

/// The same suite with the partitions assigned by stream category.
mod partitioned_by_category {
    use super::common;

    es_testkit::conformance_tests!(|| async {
        let partitioning = es_core::Partitioning::new(3)
            .expect("3 partitions")
            .by(es_core::PartitionKey::Category);
        common::store_with(
            "pcat",
            es_redis::RedisStore::builder(es_test_support::redis_url()).partitioning(partitioning),
        )
        .await
    });
}

/// The suite's lease and consumer-group cases on a store with four partitions by stream id
/// (the unscoped handle: a projection group runs on every partition, a relay group on every
/// outbox).
mod partitioned_groups {
    use super::common;

    es_testkit::group_conformance_tests!(|| async { common::partitioned_store("pgroup", 4).await });
}

/// The streaming-out cases on a store with four partitions by category, through the handle
/// scoped to the partition of the `ledger` category (every stream those cases write an outbox
/// record for is a `ledger-*` stream, so all their records are in that partition's outbox).
///
/// The suite's outbox, relay and checkpoint cases run here. Its four projection cases
/// (`projection_catches_up_and_resumes`, `projection_rebuild_gives_identical_results`,
/// `projection_rebuild_racing_a_second_runner`, `poisoned_event_stops_the_projection`) run one
/// `ProjectionRunner::spawn` on the single feed (`subscribe`, `head_position`), which a store
/// with several partitions refuses with `StoreError::Partitioned`, as the contract requires.
/// On a partitioned store a projection runs as a consumer group
/// (`ProjectionRunner::spawn_group`): a runner on every partition, each from the partition's own
/// fenced checkpoint, divided among the group's workers by leases. That is tested in
/// `groups.rs`: on 4 partitions here and 8 on the cluster, workers killed and added while
/// writers append to every partition (`projection_group_on_*_partitions_survives_a_kill_and_a_join`),
/// a stalled worker fenced (`a_stalled_projection_worker_never_records_after_its_lease`), and a
/// relay group over every partition's outbox
/// (`relay_group_on_*_partitions_publishes_everything_across_a_kill`).
mod partitioned_streaming {
    use es_core::{OutboxStore, PartitionKey, Partitioning, StreamId};

    use super::common;

    async fn scoped_store() -> es_redis::RedisStore {
        let partitioning = Partitioning::new(4)
            .expect("4 partitions")
            .by(PartitionKey::Category);
        let store = common::store_with(
            "pstream",
            es_redis::RedisStore::builder(es_test_support::redis_url()).partitioning(partitioning),
        )
        .await;
        let ledger = partitioning.partition_of(&StreamId::new("ledger", "x").unwrap());
        store.outbox_partition(ledger).unwrap()
    }

    macro_rules! cases {
        ($($case:ident),+ $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    es_testkit::streaming::$case(scoped_store().await).await;
                }
            )+
        };
    }

    cases!(
        outbox_is_written_with_the_events,
        outbox_is_not_written_by_rejected_appends,
        outbox_keeps_commit_order_and_delivery_marks,
        relay_lease_has_one_owner,
        relay_lease_generations_fence_stale_owners,
        relay_publishes_everything_in_order,
        competing_relays_take_over,
        dead_letters_are_parked_and_requeued,
        relay_parks_poison_records_and_keeps_going,
        two_relays_with_a_short_lease_never_publish_at_once,
        pipelined_relay_keeps_batches_in_flight_in_order,
        pipelined_relay_resends_after_a_failure_mid_window,
        relay_waits_for_each_batch_of_a_publisher_that_is_not_gapless,
        pipelined_relay_makes_no_call_after_it_settled_a_failure,
        relay_killed_mid_window_is_resumed_by_another,
        relay_fenced_with_batches_in_flight_marks_nothing_more,
        checkpoints_only_move_forward,
        checkpoint_generations_fence_stale_saves,
        repository_translates_into_the_outbox,
    );
}
