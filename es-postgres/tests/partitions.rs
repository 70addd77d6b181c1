//! Feed partitions on PostgreSQL: each partition is a never-skip feed with a commit chain of its
//! own, so a transaction that holds positions of one partition (stalled, rolled back, its backend
//! terminated) never holds the other partitions back, and never lets its own partition skip.
//! Several stores share each schema, with pools of their own, as separate processes would.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use es_core::contract::{PartitionKey, Partitioning};
use es_core::{
    AppendRequest, AppendResult, EventFilter, EventStore, ExpectedVersion, NewEvent, ReadAll,
    RecordedEvent, StoreError, StreamId,
};
use es_postgres::{Error, PgStore};
use futures::{StreamExt, TryStreamExt};
use serde_json::json;

/// The longest any append or wait in these tests may take before the test fails.
const LIVENESS: Duration = Duration::from_secs(60);

/// How long an append to another partition may take while one partition is held: far below the
/// holds the tests inject (3 s and more).
const UNHELD: Duration = Duration::from_millis(1500);

fn stream(name: &str) -> StreamId {
    StreamId::parse(name).unwrap()
}

fn event(kind: &str) -> NewEvent {
    NewEvent::from_value(kind, 1, &json!({ "kind": kind }))
}

fn partitions(count: u32) -> Partitioning {
    Partitioning::new(count).unwrap()
}

/// The first `n` streams named `<prefix>-<i>` that fall into `partition`.
fn streams_in(partitioning: Partitioning, partition: u32, prefix: &str, n: usize) -> Vec<StreamId> {
    (0..)
        .map(|i| stream(&format!("{prefix}-{i}")))
        .filter(|s| partitioning.partition_of(s) == partition)
        .take(n)
        .collect()
}

/// A store on `schema` with `partitioning`, a pool of its own whose connections carry the
/// application name `app`, and the test-wide inline projection that stalls or refuses.
async fn held_store(
    schema: &str,
    app: &str,
    partitioning: Partitioning,
    stall: Duration,
    append_timeout: Duration,
) -> PgStore {
    let options: sqlx::postgres::PgConnectOptions =
        es_test_support::database_url().parse().unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .test_before_acquire(false)
        .connect_with(options.application_name(app))
        .await
        .unwrap();
    PgStore::builder(pool)
        .schema(schema)
        .partitioning(partitioning)
        .poll_interval(Duration::from_millis(100))
        .append_timeout(append_timeout)
        .inline_projection("slow_or_refusing", common::slow_or_refusing(stall))
        .build()
        .await
        .unwrap()
}

async fn plain_store(schema: &str, partitioning: Partitioning) -> PgStore {
    PgStore::builder(common::pool(&es_test_support::database_url(), 16).await)
        .schema(schema)
        .partitioning(partitioning)
        .poll_interval(Duration::from_millis(100))
        .build()
        .await
        .unwrap_or_else(|e| panic!("cannot build the store on schema {schema}: {e}"))
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIVENESS, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not return within {LIVENESS:?}"))
}

/// What a subscriber of every partition delivered must be, in each partition, exactly that
/// partition's committed feed up to the last position it delivered there, in order (nothing
/// skipped, nothing twice), and each event must be in its stream's partition.
async fn assert_never_skipped(store: &PgStore, delivered: &[RecordedEvent]) {
    let partitioning = store.partitioning();
    for partition in partitioning.partitions() {
        let got: Vec<(u64, uuid::Uuid)> = delivered
            .iter()
            .filter(|e| e.partition == partition)
            .map(|e| (e.global_position, e.event_id))
            .collect();
        let last = got.last().map_or(0, |(p, _)| *p);
        let feed: Vec<RecordedEvent> = store
            .read_all(ReadAll::after(0).partition(partition))
            .try_collect()
            .await
            .unwrap();
        let expected: Vec<(u64, uuid::Uuid)> = feed
            .iter()
            .filter(|e| e.global_position <= last)
            .map(|e| (e.global_position, e.event_id))
            .collect();
        assert_eq!(
            got, expected,
            "partition {partition}: the subscriber skipped or repeated an event"
        );
        for e in &feed {
            assert_eq!(e.partition, partition);
            assert_eq!(partitioning.partition_of(&e.stream_id), partition);
        }
    }
}

fn ids_of(results: &[(AppendRequest, AppendResult)]) -> HashSet<uuid::Uuid> {
    results
        .iter()
        .flat_map(|(request, _)| request.events.iter().map(|e| e.event_id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schema_keeps_the_partitioning_it_was_first_used_with() {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("part_claim");
    let four = plain_store(&schema, partitions(4)).await;
    four.append(AppendRequest::new(
        stream("acct-1"),
        ExpectedVersion::NoStream,
        vec![event("Opened")],
    ))
    .await
    .unwrap();
    // Another process with another partitioning: a typed error, and nothing changes.
    for other in [
        Partitioning::single(),
        partitions(8),
        partitions(4).by(PartitionKey::Category),
    ] {
        let built = PgStore::builder(common::pool(&url, 2).await)
            .schema(&schema)
            .partitioning(other)
            .build()
            .await;
        match built {
            Err(Error::Partitioning(StoreError::InvalidPartitioning { reason })) => {
                assert!(reason.contains("4 partition(s) by stream"), "{reason}");
            }
            other => panic!("a store with {other:?} was accepted on a 4-partition schema"),
        }
    }
    // The same partitioning opens it, from another pool as well.
    let again = plain_store(&schema, partitions(4)).await;
    assert_eq!(again.partitioning(), partitions(4));
    assert_eq!(
        again.stream_version(&stream("acct-1")).await.unwrap(),
        1,
        "the schema is the same"
    );

    // A schema first used with one partition stays at one.
    let single_schema = common::unique_schema("part_single");
    let single = common::store_on(&url, &single_schema).await;
    single
        .append(AppendRequest::new(
            stream("acct-1"),
            ExpectedVersion::NoStream,
            vec![event("Opened")],
        ))
        .await
        .unwrap();
    let built = PgStore::builder(common::pool(&url, 2).await)
        .schema(&single_schema)
        .partitioning(partitions(4))
        .build()
        .await;
    assert!(
        matches!(
            built,
            Err(Error::Partitioning(StoreError::InvalidPartitioning { .. }))
        ),
        "{built:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_partition_is_a_feed_of_its_own() {
    let schema = common::unique_schema("part_feeds");
    let p = partitions(4);
    let store = plain_store(&schema, p).await;
    let mut written: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for i in 0..40 {
        let s = stream(&format!("acct-{i}"));
        let result = store
            .append(AppendRequest::new(
                s.clone(),
                ExpectedVersion::NoStream,
                vec![event("A"), event("B")],
            ))
            .await
            .unwrap();
        written
            .entry(p.partition_of(&s))
            .or_default()
            .extend(result.positions);
    }
    assert_eq!(written.len(), 4, "40 streams fall into every partition");
    for partition in p.partitions() {
        let positions = &written[&partition];
        // One writer: each partition's positions are dense within the epoch.
        assert!(
            positions.windows(2).all(|w| w[1] == w[0] + 1),
            "{positions:?}"
        );
        let feed: Vec<RecordedEvent> = store
            .read_all(ReadAll::after(0).partition(partition))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(
            feed.iter().map(|e| e.global_position).collect::<Vec<_>>(),
            *positions
        );
        assert!(feed.iter().all(|e| e.partition == partition));
        assert_eq!(
            store.partition_head(partition).await.unwrap(),
            *positions.last().unwrap()
        );
        let epochs = store.partition_epochs(partition).await.unwrap();
        assert_eq!(epochs.len(), 1, "{epochs:?}");
        assert_eq!(epochs[0].previous_head, 0);
        // Filtered reads of a partition.
        let only_b: Vec<RecordedEvent> = store
            .read_all(
                ReadAll::after(0)
                    .partition(partition)
                    .filter(EventFilter::all().event_type("B")),
            )
            .try_collect()
            .await
            .unwrap();
        assert_eq!(only_b.len(), positions.len() / 2);
    }
    // Stream reads report the stream's partition.
    let s = stream("acct-7");
    let events: Vec<RecordedEvent> = store
        .read_stream(&s, es_core::ReadStream::forward())
        .try_collect()
        .await
        .unwrap();
    assert!(events.iter().all(|e| e.partition == p.partition_of(&s)));
    // Single-feed calls refuse a partitioned store; unknown partitions are typed errors.
    assert!(matches!(
        store.head_position().await,
        Err(StoreError::Partitioned { partitions: 4 })
    ));
    let mut all = store.read_all(ReadAll::after(0));
    assert!(matches!(
        all.next().await,
        Some(Err(StoreError::Partitioned { .. }))
    ));
    let mut none = store.read_all(ReadAll::after(0).partition(4));
    assert!(matches!(
        none.next().await,
        Some(Err(StoreError::NoSuchPartition { partition: 4, .. }))
    ));
    assert!(matches!(
        store.partition_head(9).await,
        Err(StoreError::NoSuchPartition { .. })
    ));
}

/// How the transaction holding positions of the held partition ends.
#[derive(Debug, Clone, Copy)]
enum Ending {
    /// An append that drew positions rolls back (its inline projection refuses it) while an
    /// earlier one of the partition is still open.
    Rollback,
    /// The append stalls after drawing its positions and PostgreSQL aborts it at the append
    /// time-out.
    Stall,
    /// The backend of the append is terminated while it holds its positions.
    Terminate,
}

/// The store that holds the partition, and the event type that makes its append hold: a slow
/// append (3 s, then it commits) for Rollback; a stall the time-out aborts for Stall; a
/// server-side sleep that gets terminated for Terminate.
async fn holder(
    ending: Ending,
    schema: &str,
    app: &str,
    p: Partitioning,
) -> (PgStore, &'static str) {
    let (stall, timeout, kind) = match ending {
        Ending::Rollback => (Duration::from_secs(3), LIVENESS, "Slow"),
        Ending::Stall => (Duration::from_secs(600), Duration::from_secs(3), "Slow"),
        Ending::Terminate => (
            Duration::from_secs(600),
            Duration::from_secs(3600),
            "SqlSlow",
        ),
    };
    (held_store(schema, app, p, stall, timeout).await, kind)
}

/// Appends three streams in every partition but `held`, each within [`UNHELD`].
async fn commit_elsewhere(
    store: &PgStore,
    held: u32,
    ending: Ending,
) -> Vec<(AppendRequest, AppendResult)> {
    let p = store.partitioning();
    let mut acknowledged = Vec::new();
    for partition in p.partitions().filter(|q| *q != held) {
        for s in streams_in(p, partition, "free", 3) {
            let request = AppendRequest::new(s, ExpectedVersion::NoStream, vec![event("Free")]);
            let started = Instant::now();
            let result = tokio::time::timeout(UNHELD, store.append(request.clone()))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "partition {partition} was held back by a transaction of partition \
                         {held} ({ending:?})"
                    )
                })
                .unwrap();
            assert!(started.elapsed() < UNHELD);
            acknowledged.push((request, result));
        }
    }
    acknowledged
}

/// One partition is held by a transaction that drew positions and then ends as `ending` says;
/// meanwhile every other partition commits at once, from another store, and the held partition's
/// later appends wait for it. Afterwards a subscriber of every partition has skipped nothing.
#[allow(clippy::too_many_lines)] // one scenario, checked end to end
async fn other_partitions_go_on_while_one_is_held(ending: Ending) {
    let schema = common::unique_schema(&format!("part_{ending:?}").to_lowercase());
    let p = partitions(4);
    let held_partition = 2;
    let victim_app = common::unique_schema("part_victim");
    let (holder, kind) = holder(ending, &schema, &victim_app, p).await;
    let refusing = held_store(&schema, "part_refusing", p, Duration::ZERO, LIVENESS).await;
    let other = plain_store(&schema, p).await;
    let admin = common::pool(&es_test_support::database_url(), 2).await;
    let recorder = common::Recorder::start(&other);
    let held_streams = streams_in(p, held_partition, "held", 3);

    let held = tokio::spawn({
        let holder = holder.clone();
        let request = AppendRequest::new(
            held_streams[0].clone(),
            ExpectedVersion::NoStream,
            vec![event(kind)],
        );
        async move { holder.append(request).await }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    if let Ending::Rollback = ending {
        // Draws positions after the slow append's and rolls back.
        let refused = within(
            "the refused append",
            refusing.append(AppendRequest::new(
                held_streams[1].clone(),
                ExpectedVersion::NoStream,
                vec![event("Refused"), event("Refused")],
            )),
        )
        .await;
        assert!(
            matches!(refused, Err(StoreError::InlineProjection { .. })),
            "{refused:?}"
        );
    }
    // Behind the held allocation: answered only once the holder ended.
    let behind = tokio::spawn({
        let other = other.clone();
        let request = AppendRequest::new(
            held_streams[2].clone(),
            ExpectedVersion::NoStream,
            vec![event("Behind")],
        );
        async move { other.append(request).await }
    });
    // Every other partition commits at once, several times, while the held one waits.
    let acknowledged = commit_elsewhere(&other, held_partition, ending).await;
    assert!(
        !behind.is_finished(),
        "the append behind the held one committed before it ended ({ending:?})"
    );
    if let Ending::Terminate = ending {
        let killed: Vec<(i32,)> = sqlx::query_as(
            "SELECT pid FROM pg_stat_activity \
             WHERE application_name = $1 AND query LIKE 'SELECT pg_sleep%' AND state = 'active' \
               AND pg_terminate_backend(pid)",
        )
        .bind(&victim_app)
        .fetch_all(&admin)
        .await
        .unwrap();
        assert_eq!(killed.len(), 1, "one stalled backend terminated");
    }
    let held = within("the held append", held).await.unwrap();
    match ending {
        Ending::Rollback => assert!(held.is_ok(), "{held:?}"),
        Ending::Stall | Ending::Terminate => {
            assert!(
                matches!(held, Err(StoreError::Unavailable(_))),
                "the held append must fail as unavailable, got {held:?}"
            );
        }
    }
    within("the append behind the held one", behind)
        .await
        .unwrap()
        .unwrap();
    let mut wanted: HashSet<uuid::Uuid> = ids_of(&acknowledged);
    let feed_of_held: Vec<RecordedEvent> = other
        .read_all(ReadAll::after(0).partition(held_partition))
        .try_collect()
        .await
        .unwrap();
    wanted.extend(feed_of_held.iter().map(|e| e.event_id));
    let delivered = recorder
        .until(
            "the subscriber delivers every acknowledged event",
            LIVENESS,
            |seen| {
                let have: HashSet<uuid::Uuid> = seen.iter().map(|e| e.event_id).collect();
                wanted.is_subset(&have)
            },
        )
        .await;
    assert_never_skipped(&other, &delivered).await;
    let held_types: Vec<&str> = delivered
        .iter()
        .filter(|e| e.partition == held_partition)
        .map(|e| e.event_type.as_str())
        .collect();
    match ending {
        Ending::Rollback => assert_eq!(held_types, ["Slow", "Behind"]),
        Ending::Stall | Ending::Terminate => assert_eq!(held_types, ["Behind"]),
    }
    assert_eq!(
        delivered
            .iter()
            .filter(|e| e.partition != held_partition)
            .count(),
        9
    );
    // The store that held the partition works again.
    within(
        "an append on the holder",
        holder.append(AppendRequest::new(
            held_streams[0].clone(),
            ExpectedVersion::Any,
            vec![event("Fine")],
        )),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollback_in_one_partition_holds_no_other_back() {
    other_partitions_go_on_while_one_is_held(Ending::Rollback).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stall_in_one_partition_holds_no_other_back() {
    other_partitions_go_on_while_one_is_held(Ending::Stall).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_terminated_backend_in_one_partition_holds_no_other_back() {
    other_partitions_go_on_while_one_is_held(Ending::Terminate).await;
}

/// A small deterministic generator (xorshift), so that a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Three stores (pools of their own, as three processes) append to 48 streams across 8
/// partitions, some streams shared by all of them (expected version `Any`), the others owned
/// by one task (`Exact`), while a subscriber of every partition on a fourth store follows. Each
/// partition's positions are strictly increasing in delivery order, every acknowledged event
/// is delivered once, nothing is delivered that the feed does not hold, and every stream's
/// events arrive in version order without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_stores_append_across_partitions_and_subscribers_miss_nothing() {
    let schema = common::unique_schema("part_many");
    let p = partitions(8);
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(plain_store(&schema, p).await);
    }
    let reader = plain_store(&schema, p).await;
    let recorder = common::Recorder::start(&reader);
    let tasks_per_store = 4;
    let rounds = 40;
    let mut tasks = Vec::new();
    for (s, store) in stores.iter().enumerate() {
        for t in 0..tasks_per_store {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((s * 31 + t) as u64 + 1));
                let owned: Vec<StreamId> = (0..3)
                    .map(|i| stream(&format!("own-{s}x{t}x{i}")))
                    .collect();
                let mut versions = [0_u64; 3];
                let mut done = Vec::new();
                for _ in 0..rounds {
                    let events: Vec<NewEvent> = (0..=rng.below(3)).map(|_| event("Step")).collect();
                    let request = if rng.below(3) == 0 {
                        let shared = stream(&format!("shared-{}", rng.below(12)));
                        AppendRequest::new(shared, ExpectedVersion::Any, events)
                    } else {
                        let i = rng.below(3) as usize;
                        let request = AppendRequest::new(
                            owned[i].clone(),
                            ExpectedVersion::Exact(versions[i]),
                            events,
                        );
                        versions[i] += request.events.len() as u64;
                        request
                    };
                    let result = within("an append", store.append(request.clone()))
                        .await
                        .unwrap();
                    done.push((request, result));
                }
                done
            }));
        }
    }
    let mut acknowledged = Vec::new();
    for task in tasks {
        acknowledged.extend(task.await.unwrap());
    }
    let wanted = ids_of(&acknowledged);
    let delivered = recorder
        .until(
            "the subscriber delivers every acknowledged event",
            LIVENESS,
            |seen| {
                let have: HashSet<uuid::Uuid> = seen.iter().map(|e| e.event_id).collect();
                wanted.is_subset(&have)
            },
        )
        .await;
    assert_never_skipped(&reader, &delivered).await;

    assert_eq!(
        delivered.len(),
        wanted.len(),
        "delivered exactly what was acknowledged"
    );
    let mut last_position: HashMap<u32, u64> = HashMap::new();
    let mut stream_versions: HashMap<StreamId, u64> = HashMap::new();
    for e in &delivered {
        let last = last_position.entry(e.partition).or_default();
        assert!(
            e.global_position > *last,
            "partition {} went from {last} to {}",
            e.partition,
            e.global_position
        );
        *last = e.global_position;
        let version = stream_versions.entry(e.stream_id.clone()).or_default();
        assert_eq!(
            e.stream_version,
            *version + 1,
            "stream {} out of order",
            e.stream_id
        );
        *version = e.stream_version;
    }
    assert_eq!(last_position.len(), 8, "every partition was written");
    // What each append was told matches where its events are.
    let by_id: HashMap<uuid::Uuid, &RecordedEvent> =
        delivered.iter().map(|e| (e.event_id, e)).collect();
    for (request, result) in &acknowledged {
        for (e, position) in request.events.iter().zip(&result.positions) {
            let got = by_id[&e.event_id];
            assert_eq!(got.global_position, *position);
            assert_eq!(got.partition, p.partition_of(&request.stream_id));
        }
    }
}

/// The wake-up is sent after the commit, by a task that coalesces: a reader in another process
/// (its own pool and listener) with a 60 s polling interval is woken, for every partition, soon
/// after a burst of concurrent commits, and reaches the last of them; nothing depends on polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_elsewhere_are_woken_after_a_burst_of_commits_in_any_partition() {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("part_wake");
    let partitioning = partitions(4);
    let writer = plain_store(&schema, partitioning).await;
    let reader = PgStore::builder(common::pool(&url, 8).await)
        .schema(&schema)
        .partitioning(partitioning)
        .poll_interval(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    for partition in partitioning.partitions() {
        let streams = streams_in(partitioning, partition, &format!("wake{partition}"), 16);
        let head = reader.partition_head(partition).await.unwrap();
        let mut feed = reader.subscribe_partition(partition, head, EventFilter::all());
        let expected = streams.len();
        // The subscription runs (catches up, then waits on the listener) before the commits.
        let follower = tokio::spawn(async move {
            let mut seen = Vec::new();
            while seen.len() < expected {
                let e = feed
                    .next()
                    .await
                    .expect("the subscription goes on")
                    .expect("the subscription does not fail");
                seen.push(e);
            }
            seen
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let appends = streams.iter().map(|s| {
            writer.append(AppendRequest::new(
                s.clone(),
                ExpectedVersion::Any,
                vec![event("Woken")],
            ))
        });
        let results = futures::future::try_join_all(appends).await.unwrap();
        let last = results.iter().map(|r| r.positions[0]).max().unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(10), follower)
            .await
            .unwrap_or_else(|_| {
                panic!("partition {partition}: not woken well before the 60 s poll")
            })
            .unwrap();
        assert!(seen.iter().all(|e| e.partition == partition));
        assert_eq!(
            seen.last().map(|e| e.global_position),
            Some(last),
            "the last commit is announced"
        );
    }
}
