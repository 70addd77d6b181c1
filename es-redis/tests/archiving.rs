//! Archiving on es-redis: events leave Redis for a PostgreSQL archive (`PgEventArchive`), and
//! every read merges the two. The conformance cases on one feed, on four partitions, under the
//! documented ACL user and on the Redis Cluster, each with an archive on a fresh PostgreSQL
//! schema; then what `redis-cli` sees (entries and memory gone from Redis), a crash between
//! "stored in the archive" and "deleted from Redis", an unreachable archive, reads racing
//! archiving in small pages, a store without an archive, and an archive claimed by two stores.

mod common;

use std::sync::Arc;
use std::time::Duration;

use es_core::contract::EventArchive;
use es_core::{
    AppendRequest, EventStore, ExpectedVersion, NewEvent, ReadAll, ReadStream, RecordedEvent,
    StoreError, StreamId,
};
use es_postgres::sqlx::postgres::{PgPool, PgPoolOptions};
use es_postgres::PgEventArchive;
use es_redis::redis::{self, aio::MultiplexedConnection};
use es_redis::{RedisStore, RedisStoreBuilder};
use futures::TryStreamExt;

/// A pool on the shared PostgreSQL server (`DATABASE_URL`).
async fn pg_pool() -> PgPool {
    let url = es_test_support::database_url();
    PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL: {e}"))
}

fn fresh_schema() -> String {
    es_testkit::support::unique_name("t_rarch", '_')
}

/// An archive on a fresh schema of the shared PostgreSQL server.
async fn fresh_archive() -> PgEventArchive {
    PgEventArchive::create(pg_pool().await, &fresh_schema())
        .await
        .unwrap_or_else(|e| panic!("cannot create the archive: {e}"))
}

/// `builder` under a fresh prefix with an archive on a fresh schema.
async fn with_archive(name: &str, builder: RedisStoreBuilder) -> RedisStore {
    common::store_with(name, builder.archive(Arc::new(fresh_archive().await))).await
}

async fn archived_store(name: &str) -> RedisStore {
    with_archive(name, RedisStore::builder(es_test_support::redis_url())).await
}

es_testkit::archiving_conformance_tests!(|| async { archived_store("arch").await });

/// Four partitions by stream id (the tagged layout).
mod partitioned {
    es_testkit::archiving_conformance_tests!(|| async {
        super::with_archive(
            "archp",
            es_redis::RedisStore::builder(es_test_support::redis_url())
                .partitioning(es_core::Partitioning::new(4).expect("4 partitions")),
        )
        .await
    });
}

/// Under a user with exactly the rights of the documented `ACL SETUSER` line
/// (docs/12-production.md), whose `+hdel` archiving needs.
mod acl {
    use super::common;

    const PASSWORD: &str = "acl-arch-pw";

    pub(super) async fn acl_builder(name: &str, prefix: &str) -> es_redis::RedisStoreBuilder {
        let admin = es_test_support::redis_url();
        es_redis::RedisStore::builder(admin.as_str())
            .install_functions()
            .await
            .expect("the administrator installs the functions");
        let user = es_testkit::support::unique_name(&format!("t_acl_{name}"), '_');
        common::set_user(
            &admin,
            &user,
            &common::documented_acl(&user, PASSWORD, prefix),
        )
        .await;
        es_redis::RedisStore::builder(common::url_with_user(&admin, &user, PASSWORD)).prefix(prefix)
    }

    es_testkit::archiving_conformance_tests!(|| async {
        let prefix = common::unique_prefix("archacl");
        let builder = acl_builder("arch", &prefix).await;
        builder
            .archive(std::sync::Arc::new(super::fresh_archive().await))
            .build()
            .await
            .unwrap_or_else(|e| panic!("the documented user cannot build the store: {e}"))
    });
}

/// On the Redis Cluster (`REDIS_CLUSTER_URLS`), one partition and three.
#[cfg(feature = "cluster")]
mod cluster {
    async fn store(name: &str, partitions: u32) -> es_redis::RedisStore {
        super::with_archive(
            name,
            es_redis::RedisStore::cluster_builder(es_test_support::redis_cluster_urls())
                .partitioning(es_core::Partitioning::new(partitions).expect("partitions")),
        )
        .await
    }

    es_testkit::archiving_conformance_tests!(|| async { store("carch", 1).await });

    mod partitioned_3 {
        es_testkit::archiving_conformance_tests!(|| async { super::store("carch3", 3).await });
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn stream(id: &str) -> StreamId {
    StreamId::new("cold", id).expect("valid stream id")
}

/// Appends `count` events of about `size` bytes of payload each, in batches of 50.
async fn fill(store: &RedisStore, s: &StreamId, count: u64, size: usize) {
    let mut version = store.stream_version(s).await.unwrap();
    let target = version + count;
    while version < target {
        let n = (target - version).min(50);
        let events: Vec<NewEvent> = (version + 1..=version + n)
            .map(|v| {
                NewEvent::from_value(
                    "Noted",
                    1,
                    &serde_json::json!({ "v": v, "pad": "x".repeat(size) }),
                )
            })
            .collect();
        store
            .append(AppendRequest::new(
                s.clone(),
                ExpectedVersion::Exact(version),
                events,
            ))
            .await
            .unwrap_or_else(|e| panic!("appending to `{s}`: {e}"));
        version += n;
    }
}

async fn read(store: &RedisStore, s: &StreamId, read: ReadStream) -> Vec<RecordedEvent> {
    store
        .read_stream(s, read)
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("reading `{s}`: {e}"))
}

async fn feed(store: &RedisStore) -> Vec<RecordedEvent> {
    store
        .read_all(ReadAll::after(0))
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("reading the feed: {e}"))
}

/// Every read the tests compare: forward, backward, from the middle both ways, with limits, and
/// the feed whole and in pages of 7.
async fn all_reads(store: &RedisStore, s: &StreamId) -> Vec<Vec<RecordedEvent>> {
    let mut reads = Vec::new();
    for r in [
        ReadStream::forward(),
        ReadStream::backward(),
        ReadStream::forward().from(40).limit(25),
        ReadStream::backward().from(60).limit(30),
        ReadStream::backward().from(10),
    ] {
        reads.push(read(store, s, r).await);
    }
    reads.push(feed(store).await);
    let mut paged = Vec::new();
    let mut after = 0;
    loop {
        let page: Vec<RecordedEvent> = store
            .read_all(ReadAll::after(after).limit(7))
            .try_collect()
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = last.global_position;
        paged.extend(page);
    }
    reads.push(paged);
    reads
}

async fn admin() -> MultiplexedConnection {
    redis::Client::open(es_test_support::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn xlen(conn: &mut MultiplexedConnection, key: &str) -> u64 {
    redis::cmd("XLEN").arg(key).query_async(conn).await.unwrap()
}

async fn hlen(conn: &mut MultiplexedConnection, key: &str) -> u64 {
    redis::cmd("HLEN").arg(key).query_async(conn).await.unwrap()
}

async fn memory_usage(conn: &mut MultiplexedConnection, key: &str) -> u64 {
    redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(key)
        .arg("SAMPLES")
        .arg(0)
        .query_async(conn)
        .await
        .unwrap()
}

/// `used_memory` of `INFO memory`.
async fn used_memory(conn: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory in INFO memory")
}

// ---------------------------------------------------------------------------------------------
// Cases

/// What `redis-cli` sees: after archiving all but the last of 300 events of about 2 KB, the
/// stream key and the feed hold one entry each, the id index lost 299 fields, the two keys'
/// `MEMORY USAGE` fell below a tenth and the server's `used_memory` by at least 1 MB; the
/// archive holds the 299 events; every read returns what it returned before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_events_leave_redis_and_its_memory() {
    let store = archived_store("gone").await;
    let s = stream("gone");
    fill(&store, &s, 300, 2000).await;
    let keys = store.keys().clone();
    let (events_key, feed_key, index_key) = (
        keys.events(&s),
        keys.feed().to_owned(),
        keys.index().to_owned(),
    );
    let mut conn = admin().await;
    assert_eq!(xlen(&mut conn, &events_key).await, 300);
    assert_eq!(xlen(&mut conn, &feed_key).await, 300);
    let index_before = hlen(&mut conn, &index_key).await;
    let memory_before =
        memory_usage(&mut conn, &events_key).await + memory_usage(&mut conn, &feed_key).await;
    let used_before = used_memory(&mut conn).await;
    let before = all_reads(&store, &s).await;

    let archived = store.archive_stream(&s, 300).await.unwrap();
    assert_eq!((archived.moved, archived.hot_from), (299, 300));

    assert_eq!(xlen(&mut conn, &events_key).await, 1, "the stream key");
    assert_eq!(xlen(&mut conn, &feed_key).await, 1, "the feed");
    assert_eq!(
        hlen(&mut conn, &index_key).await,
        index_before - 299,
        "the id index"
    );
    let last: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&events_key)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(last[0].0, "300-0", "the last event stays in Redis");
    let memory_after =
        memory_usage(&mut conn, &events_key).await + memory_usage(&mut conn, &feed_key).await;
    assert!(
        memory_after * 10 < memory_before,
        "MEMORY USAGE of the two keys: {memory_before} bytes before, {memory_after} after"
    );
    let used_after = used_memory(&mut conn).await;
    assert!(
        used_after + 1_000_000 < used_before,
        "used_memory: {used_before} before, {used_after} after"
    );
    assert_eq!(all_reads(&store, &s).await, before, "the reads changed");
}

/// The archive in PostgreSQL holds exactly the archived events, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_holds_the_archived_events_unchanged() {
    let archive = Arc::new(fresh_archive().await);
    let store = common::store_with(
        "rows",
        RedisStore::builder(es_test_support::redis_url()).archive(archive.clone()),
    )
    .await;
    let s = stream("rows");
    fill(&store, &s, 40, 100).await;
    let before = read(&store, &s, ReadStream::forward()).await;
    store.archive_stream(&s, 31).await.unwrap();
    let cold = archive
        .read_stream(&s, 1..=40, es_core::Direction::Forward, 100)
        .await
        .unwrap();
    assert_eq!(
        cold,
        before[..30],
        "the archive holds versions 1 to 30 as recorded"
    );
    let in_partition = archive
        .read_partition(0, 0, u64::MAX, &es_core::EventFilter::all(), 100)
        .await
        .unwrap();
    assert_eq!(in_partition, before[..30]);
    assert!(archive
        .owner()
        .await
        .unwrap()
        .unwrap()
        .contains(store.keys().prefix()));
}

/// A crash between the archiver's two steps: the events are in the archive (its store step ran)
/// and still in Redis (the delete never ran). Reads return every event once; a rerun of
/// `archive_stream` deletes them from Redis and counts them moved; reads are unchanged again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_storing_and_deleting_duplicates_nothing() {
    let archive = Arc::new(fresh_archive().await);
    let store = common::store_with(
        "crash",
        RedisStore::builder(es_test_support::redis_url())
            .read_page_size(8)
            .archive(archive.clone()),
    )
    .await;
    let s = stream("crash");
    let other = StreamId::new("warm", "crash").unwrap();
    for _ in 0..10 {
        fill(&store, &s, 10, 50).await;
        fill(&store, &other, 3, 50).await;
    }
    let before = all_reads(&store, &s).await;
    // A first archiving that completes, then the store step of a second one, and the "crash".
    assert_eq!(store.archive_stream(&s, 21).await.unwrap().moved, 20);
    let hot: Vec<RecordedEvent> = read(&store, &s, ReadStream::forward().from(21).limit(40)).await;
    assert_eq!(hot.first().map(|e| e.stream_version), Some(21));
    archive.store(&hot).await.unwrap();
    let mut conn = admin().await;
    assert_eq!(
        xlen(&mut conn, &store.keys().events(&s)).await,
        80,
        "nothing deleted yet"
    );
    assert_eq!(all_reads(&store, &s).await, before, "reads after the crash");
    // The same events stored twice are kept once.
    archive.store(&hot).await.unwrap();

    let rerun = store.archive_stream(&s, 61).await.unwrap();
    assert_eq!((rerun.moved, rerun.hot_from), (40, 61));
    assert_eq!(xlen(&mut conn, &store.keys().events(&s)).await, 40);
    assert_eq!(all_reads(&store, &s).await, before, "reads after the rerun");
}

/// An archive whose event differs from the one Redis holds at a version is refused, typed, and
/// the call deletes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_event_in_the_archive_is_refused_and_nothing_is_deleted() {
    let archive = Arc::new(fresh_archive().await);
    let store = common::store_with(
        "clash",
        RedisStore::builder(es_test_support::redis_url()).archive(archive.clone()),
    )
    .await;
    let s = stream("clash");
    fill(&store, &s, 10, 10).await;
    let mut forged = read(&store, &s, ReadStream::forward().limit(1)).await;
    forged[0].event_id = uuid::Uuid::new_v4();
    archive.store(&forged).await.unwrap();
    match store.archive_stream(&s, 5).await {
        Err(StoreError::Corrupt { location, .. }) => assert!(location.contains("version 1")),
        other => panic!("archiving over a different archived event: {other:?}"),
    }
    let mut conn = admin().await;
    assert_eq!(xlen(&mut conn, &store.keys().events(&s)).await, 10);
}

/// The archive unreachable while `archive_stream` runs (its pool closed after the store was
/// built): the call fails as `Unavailable` and deletes nothing from Redis; stream reads that need
/// nothing from the archive still work, feed reads fail typed rather than return part of the
/// feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_archive_fails_typed_and_nothing_leaves_redis() {
    let pool = pg_pool().await;
    let archive = PgEventArchive::create(pool.clone(), &fresh_schema())
        .await
        .unwrap()
        .query_timeout(Duration::from_secs(3));
    let store = common::store_with(
        "down",
        RedisStore::builder(es_test_support::redis_url()).archive(Arc::new(archive)),
    )
    .await;
    let s = stream("down");
    fill(&store, &s, 30, 10).await;
    let mut conn = admin().await;
    let index_before = hlen(&mut conn, store.keys().index()).await;
    pool.close().await;

    match store.archive_stream(&s, 20).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("archiving with the archive down: {other:?}"),
    }
    assert_eq!(xlen(&mut conn, &store.keys().events(&s)).await, 30);
    assert_eq!(xlen(&mut conn, store.keys().feed()).await, 30);
    assert_eq!(hlen(&mut conn, store.keys().index()).await, index_before);
    assert_eq!(read(&store, &s, ReadStream::forward()).await.len(), 30);
    let err = store
        .read_all(ReadAll::after(0))
        .try_collect::<Vec<_>>()
        .await
        .expect_err("a feed read cannot see the archive");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

/// Readers paging in pages of 5 (so archiving lands between their pages again and again) while
/// one task archives a 600-event stream 37 versions at a time and a writer appends to another:
/// every forward, backward and feed read returns every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_in_small_pages_while_archiving_see_every_event_once() {
    let store = with_archive(
        "race",
        RedisStore::builder(es_test_support::redis_url()).read_page_size(5),
    )
    .await;
    let s = stream("race");
    fill(&store, &s, 600, 20).await;
    let archiver = {
        let (store, s) = (store.clone(), s.clone());
        tokio::spawn(async move {
            let mut moved = 0;
            for before in (1..=600).step_by(37) {
                moved += store.archive_stream(&s, before).await.unwrap().moved;
            }
            moved += store.archive_stream(&s, 600).await.unwrap().moved;
            moved
        })
    };
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let w = StreamId::new("warm", "race").unwrap();
            fill(&store, &w, 200, 20).await;
        })
    };
    let mut rounds = 0;
    while !archiver.is_finished() || rounds < 3 {
        let forward: Vec<u64> = read(&store, &s, ReadStream::forward())
            .await
            .iter()
            .map(|e| e.stream_version)
            .collect();
        assert_eq!(forward, (1..=600).collect::<Vec<_>>());
        let backward: Vec<u64> = read(&store, &s, ReadStream::backward())
            .await
            .iter()
            .map(|e| e.stream_version)
            .collect();
        assert_eq!(backward, (1..=600).rev().collect::<Vec<_>>());
        let feed = feed(&store).await;
        let cold: Vec<u64> = feed
            .iter()
            .filter(|e| e.stream_id == s)
            .map(|e| e.stream_version)
            .collect();
        assert_eq!(cold, (1..=600).collect::<Vec<_>>(), "the feed");
        assert!(
            feed.windows(2)
                .all(|w| w[0].global_position < w[1].global_position),
            "the feed in position order, once"
        );
        rounds += 1;
    }
    assert_eq!(archiver.await.unwrap(), 599);
    writer.await.unwrap();
    let all = feed(&store).await;
    assert_eq!(all.len(), 800);
}

/// Without an archive, `archive_stream` says how to configure one and moves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_archive_archive_stream_says_how_to_configure_one() {
    let store = common::store("noarch").await;
    let s = stream("noarch");
    fill(&store, &s, 5, 10).await;
    match store.archive_stream(&s, 3).await {
        Err(StoreError::InvalidArchive { stream_id, reason }) => {
            assert_eq!(stream_id, s);
            assert!(reason.contains("RedisStoreBuilder::archive"), "{reason}");
            assert!(reason.contains("PgEventArchive"), "{reason}");
        }
        other => panic!("archiving without an archive: {other:?}"),
    }
    let mut conn = admin().await;
    assert_eq!(xlen(&mut conn, &store.keys().events(&s)).await, 5);
}

/// One archive, one store: a second store (another prefix) claiming the same schema is refused
/// at build with `Error::Archive` holding es-postgres' `ArchiveOwned`; the owner itself, built
/// again, is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_belongs_to_one_store() {
    let schema = fresh_schema();
    let archive = Arc::new(
        PgEventArchive::create(pg_pool().await, &schema)
            .await
            .unwrap(),
    );
    let prefix = common::unique_prefix("owner");
    let builder = RedisStore::builder(es_test_support::redis_url()).prefix(&prefix);
    builder
        .clone()
        .archive(archive.clone())
        .build()
        .await
        .unwrap();
    builder
        .archive(archive.clone())
        .build()
        .await
        .expect("the owner again");

    let other = RedisStore::builder(es_test_support::redis_url())
        .prefix(common::unique_prefix("intruder"))
        .archive(archive.clone())
        .build()
        .await
        .expect_err("a second store on the same archive");
    let es_redis::Error::Archive {
        source: StoreError::Backend(source),
    } = &other
    else {
        panic!("expected Error::Archive, got {other:?}");
    };
    match source.downcast_ref::<es_postgres::Error>() {
        Some(es_postgres::Error::ArchiveOwned { owner, .. }) => {
            assert!(owner.contains(&prefix), "{owner}");
        }
        other => panic!("expected ArchiveOwned, got {other:?}"),
    }
}

/// The documented user without `+hdel`: archiving is refused with `NoPermission` before the
/// script deletes anything, and reads are unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_hdel_is_refused_before_anything_is_deleted() {
    let prefix = common::unique_prefix("nohdel");
    let builder = acl::acl_builder("nohdel", &prefix).await;
    let store = builder
        .archive(Arc::new(fresh_archive().await))
        .build()
        .await
        .unwrap();
    let admin_url = es_test_support::redis_url();
    let s = stream("nohdel");
    fill(&store, &s, 10, 10).await;
    // Take the right away from every user of this prefix: the store's user is the one whose
    // key pattern is the prefix.
    let mut conn = admin().await;
    let users: Vec<String> = redis::cmd("ACL")
        .arg("USERS")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut changed = 0;
    for user in users.iter().filter(|u| u.starts_with("t_acl_nohdel")) {
        let rules: Vec<redis::Value> = redis::cmd("ACL")
            .arg("GETUSER")
            .arg(user)
            .query_async(&mut conn)
            .await
            .unwrap();
        if format!("{rules:?}").contains(&prefix) {
            let _: () = redis::cmd("ACL")
                .arg("SETUSER")
                .arg(user)
                .arg("-hdel")
                .query_async(&mut conn)
                .await
                .unwrap();
            changed += 1;
        }
    }
    assert_eq!(changed, 1, "the store's user on {admin_url}");
    let before = read(&store, &s, ReadStream::forward()).await;
    let err = store
        .archive_stream(&s, 8)
        .await
        .expect_err("no HDEL right");
    assert!(
        err.to_string().contains("NOPERM") || err.to_string().contains("permission"),
        "{err}"
    );
    assert_eq!(xlen(&mut conn, &store.keys().events(&s)).await, 10);
    assert_eq!(xlen(&mut conn, store.keys().feed()).await, 10);
    assert_eq!(read(&store, &s, ReadStream::forward()).await, before);
}
