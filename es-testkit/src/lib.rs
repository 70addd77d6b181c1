//! The test kit of es-core, kept apart from the library: backends and applications use it as a
//! dev-dependency.
//!
//! - [`conformance`] and [`conformance_tests!`]: the contract of `es_core::contract` as executable
//!   cases, stamped onto a backend as one named test per case.
//! - [`multi`] and [`multi_conformance_tests!`]: multi-stream appends (all or nothing across
//!   streams, retries, concurrent transfers), with [`multi::spanning`] for calls across feed
//!   partitions.
//! - [`archiving`] and [`archiving_conformance_tests!`]: archiving a stream's old events changes
//!   no read, also while writers append and readers page through the same streams.
//! - [`closing`] and [`closing_conformance_tests!`]: closing streams (the tombstone refuses
//!   every later append, however it races the close; a closed stream reads, loads and feeds
//!   like any other; the repository refuses commands on it).
//! - [`streaming`] and [`streaming_conformance_tests!`]: the outbox, the relay lease, projection
//!   checkpoints and the projection runner, the same way.
//! - [`shredding`] and [`shredding_conformance_tests!`]: crypto-shredding (personal fields sealed
//!   through `es_core::personal::Encrypted`, then forgotten) on a store and its key store.
//! - [`tenancy`] and [`tenancy_conformance_tests!`]: a backend's tenant factory keeps every
//!   path of the store inside the tenant's namespace, and refuses hostile tenant ids.
//! - [`oracle`] and [`property_tests!`]: random operation sequences run on a backend and on the
//!   in-memory store, every result compared.
//! - [`AggregateTest`]: given/when/then tests for an aggregate, with no store.
//! - [`support`]: what backends' own tests share (unique names, feed tails, patience).
//! - [`domain`]: the ledger aggregate the suites run.
//!
//! A backend's conformance test file is three macro calls:
//!
//! ```no_run
//! es_testkit::conformance_tests!(|| async { es_memory::InMemoryStore::new() });
//!
//! mod streaming {
//!     es_testkit::streaming_conformance_tests!(|| async { es_memory::InMemoryStore::new() });
//! }
//!
//! es_testkit::property_tests!(in_memory_matches_itself, || async { es_memory::InMemoryStore::new() });
//! ```
//!
//! The stamping macros are generated from the suites' source by this crate's build script: every
//! `pub async fn` of a suite is a case, so a new case runs on every backend without being listed
//! anywhere.

pub mod archiving;
pub mod closing;
pub mod conformance;
pub mod domain;
pub mod multi;
pub mod oracle;
mod scenario;
pub mod shredding;
pub mod streaming;
pub mod support;
pub mod tenancy;

pub use scenario::{AggregateTest, Outcome};

#[doc(hidden)]
pub mod __private {
    pub use proptest;
    pub use tokio;
}

/// Stamps `$case`s of suite module `$suite` as tests on `$factory`'s stores.
#[doc(hidden)]
#[macro_export]
macro_rules! __stamp {
    ($factory:expr; $suite:ident; $($case:ident),+ $(,)?) => {
        $(
            #[$crate::__private::tokio::test(
                flavor = "multi_thread",
                worker_threads = 4,
                crate = "::es_testkit::__private::tokio"
            )]
            async fn $case() {
                let store = ($factory)().await;
                $crate::$suite::$case(store).await;
            }
        )+
    };
}

/// Stamps the lease and consumer-group cases of [`streaming`] onto a backend: the part of the
/// streaming suite that runs on a store with several feed partitions (the rest of it follows the
/// single feed). `streaming_conformance_tests!` already holds these cases; use this one on a
/// partitioned store, in a module of its own.
///
/// ```no_run
/// es_testkit::group_conformance_tests!(|| async {
///     es_memory::InMemoryStore::builder()
///         .partitioning(es_core::Partitioning::new(4).unwrap())
///         .build()
/// });
/// ```
#[macro_export]
macro_rules! group_conformance_tests {
    ($factory:expr) => {
        $crate::__stamp!($factory; streaming;
            leases_follow_the_generation_rules,
            fenced_checkpoints_refuse_earlier_holders,
            group_worker_killed_hands_its_partitions_over,
            group_worker_added_takes_its_share,
            group_stale_worker_never_records,
            group_worker_cut_off_stops_by_its_own_clock,
            group_worker_refused_by_its_store_stops_retrying_by_its_own_clock,
            group_workers_sharing_a_name_divide_the_partitions,
            group_rebuild_pauses_every_worker_and_replays,
            group_rebuild_dropped_midway_lets_the_group_resume,
            group_two_rebuilds_at_once_take_turns,
            group_rebuild_slower_than_the_lease_keeps_the_group_paused,
            group_pause_holds_back_a_worker_that_took_partitions_late,
            relay_group_worker_killed_hands_its_outboxes_over,
        );
    };
}

/// Runs random operation sequences ([`oracle::ops`]) on a backend and on the in-memory store and
/// compares every result ([`oracle::check_against_memory`]), as one proptest test named `$name`.
///
/// `$factory` is callable with no arguments and returns a future of a fresh, empty store. The
/// number of cases is proptest's (`PROPTEST_CASES`, default 256) unless `cases = N` sets it. Each
/// case runs on a runtime of its own with two worker threads.
///
/// ```no_run
/// es_testkit::property_tests!(matches_the_in_memory_store, || async { es_memory::InMemoryStore::new() }, cases = 48);
/// ```
#[macro_export]
macro_rules! property_tests {
    ($name:ident, $factory:expr $(, cases = $cases:expr)? $(,)?) => {
        $crate::__private::proptest::proptest! {
            #![proptest_config($crate::__property_config!($($cases)?))]
            #[test]
            fn $name(ops in $crate::oracle::ops()) {
                let runtime = $crate::__private::tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a test runtime starts");
                runtime.block_on(async {
                    let store = ($factory)().await;
                    $crate::oracle::check_against_memory(store, &ops).await;
                });
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __property_config {
    () => {
        $crate::__private::proptest::test_runner::Config::default()
    };
    ($cases:expr) => {
        $crate::__private::proptest::test_runner::Config::with_cases($cases)
    };
}

include!(concat!(env!("OUT_DIR"), "/stamp.rs"));
