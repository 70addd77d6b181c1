//! The user guide of the `es` workspace, in chapters to read in order.
//!
//! The chapters are the Markdown files of the repository's `docs/` folder, pulled into this
//! crate's documentation one module per chapter, so that every Rust sample in them is a doctest:
//! `cargo test -p es-guide --doc` compiles each one against the real crates and runs those that
//! need no server (they use the in-memory store). Samples that need PostgreSQL, Redis or Kafka are
//! compiled but not run; the crates' own test suites run the same code against real servers.
//!
//! 1. [`concepts`]: events, streams, versions, the global feed, positions and epochs.
//! 2. [`first_aggregate`]: the derive, `Apply`, `evolve`, `handle`, `Decision`,
//!    `Repository::execute`.
//! 3. [`stores`]: choosing and configuring a store (memory, PostgreSQL, Redis).
//! 4. [`upcasting`]: changing an event's shape without rewriting stored events.
//! 5. [`snapshots`]: the policy, and why a snapshot that disagrees is never trusted.
//! 6. [`history`]: loads as of a version, a position or a time; the audit trail.
//! 7. [`projections`]: read models at least once, exactly once, inline; rebuilds.
//! 8. [`outbox`]: integration events, the outbox relay, leases, dead letters, Kafka.
//! 9. [`testing`]: given/when/then tests and the conformance suites.
//! 10. [`operating`]: migrations, what each failure looks like, monitoring, the chaos checker.
//! 11. [`guarantees`]: what holds, where it stops, and the tests that try to break it.
//! 12. [`production`]: TLS, least-privilege roles, durability settings, failover, read replicas.
//! 13. [`scaling_out`]: feed partitions, Redis Cluster, partitioned PostgreSQL.
//! 14. [`personal_data`]: crypto-shredding: personal fields encrypted per subject, forgetting.
//! 15. [`multi_stream`]: one decision over two aggregates, appended to both streams or neither.
//! 16. [`tenancy`]: a store per tenant, in a schema or key prefix of its own.
#![doc(test(attr(deny(warnings))))]

/// Cross-references between chapters, resolved by rustdoc. Each chapter's own Markdown defines
/// the same labels as links to the `.md` files (for reading on a forge); the definitions here
/// come first, and in Markdown the first definition of a label wins.
macro_rules! chapter_links {
    () => {
        "[concepts]: crate::concepts\n\
         [first-aggregate]: crate::first_aggregate\n\
         [stores]: crate::stores\n\
         [upcasting]: crate::upcasting\n\
         [snapshots]: crate::snapshots\n\
         [history]: crate::history\n\
         [projections]: crate::projections\n\
         [outbox]: crate::outbox\n\
         [testing]: crate::testing\n\
         [operating]: crate::operating\n\
         [guarantees]: crate::guarantees\n\
         [production]: crate::production\n\
         [scaling-out]: crate::scaling_out\n\
         [personal-data]: crate::personal_data\n\
         [multi-stream]: crate::multi_stream\n\
         [multi-tenancy]: crate::tenancy\n\n"
    };
}

#[doc = chapter_links!()]
#[doc = include_str!("../../docs/01-concepts.md")]
pub mod concepts {}

#[doc = chapter_links!()]
#[doc = include_str!("../../docs/02-first-aggregate.md")]
pub mod first_aggregate {}

#[doc = chapter_links!()]
#[doc = include_str!("../../docs/03-stores.md")]
pub mod stores {}

#[doc = chapter_links!()]
#[doc = include_str!("../../docs/04-upcasting.md")]
pub mod upcasting {}

#[doc = chapter_links!()]
#[doc = include_str!("../../docs/05-snapshots.md")]
pub mod snapshots {}

#[doc = chapter_links!()]
#[doc = include_str!("../../docs/06-history.md")]
pub mod history {}

#[doc = chapter_links!()]
#[doc = include_str!("../../docs/07-projections.md")]
pub mod projections {}

#[doc = chapter_links!()]
#[doc = include_str!("../../docs/08-outbox.md")]
pub mod outbox {}

#[doc = chapter_links!()]
#[doc = include_str!("../../docs/09-testing.md")]
pub mod testing {}

#[doc = chapter_links!()]
#[doc = include_str!("../../docs/10-operating.md")]
pub mod operating {}

#[doc = chapter_links!()]
#[doc = include_str!("../../docs/11-guarantees.md")]
pub mod guarantees {}

#[doc = chapter_links!()]
#[doc = include_str!("../../docs/12-production.md")]
pub mod production {}

#[doc = chapter_links!()]
#[doc = include_str!("../../docs/13-scaling-out.md")]
pub mod scaling_out {}

#[doc = chapter_links!()]
#[doc = include_str!("../../docs/14-personal-data.md")]
pub mod personal_data {}

#[doc = chapter_links!()]
#[doc = include_str!("../../docs/15-multi-stream-appends.md")]
pub mod multi_stream {}

#[doc = chapter_links!()]
#[doc = include_str!("../../docs/16-multi-tenancy.md")]
pub mod tenancy {}

#[doc = chapter_links!()]
#[doc = include_str!("../../docs/18-archiving-redis.md")]
pub mod archiving_redis {}
