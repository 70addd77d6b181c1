//! The backend conformance suites on es-postgres, each case on a fresh schema.

mod common;

es_testkit::conformance_tests!(common::fresh_store);

/// The streaming suite: outbox, relay lease, checkpoints and the projection runner.
mod streaming {
    use super::common;

    es_testkit::streaming_conformance_tests!(common::fresh_store);
}

/// The suite on a store with eight feed partitions.
mod partitioned {
    use super::common;

    es_testkit::conformance_tests!(|| common::fresh_partitioned_store(
        es_core::Partitioning::new(8).expect("8 partitions")
    ));
}

/// The suite on a store whose three partitions follow the stream category.
mod partitioned_by_category {
    use super::common;

    es_testkit::conformance_tests!(|| common::fresh_partitioned_store(
        es_core::Partitioning::new(3)
            .expect("3 partitions")
            .by(es_core::PartitionKey::Category)
    ));
}

/// The lease, fencing and consumer-group cases on a store with four partitions: projections and
/// relays divided among workers partition by partition.
mod groups {
    use super::common;

    es_testkit::group_conformance_tests!(|| common::fresh_partitioned_store(
        es_core::Partitioning::new(4).expect("4 partitions")
    ));
}
