//! The tenancy suite on in-memory stores, one per tenant.

es_testkit::tenancy_conformance_tests!(|| async { es_memory::InMemoryTenants::new() });

/// The suite with tenants' stores of four feed partitions.
mod partitioned {
    es_testkit::tenancy_conformance_tests!(|| async {
        es_memory::InMemoryTenants::with(|| {
            es_memory::InMemoryStore::builder()
                .partitioning(es_core::Partitioning::new(4).unwrap_or_else(|e| panic!("{e}")))
                .build()
        })
    });
}
