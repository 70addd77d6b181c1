//! Faults on a real Redis Cluster of its own per test (3 primaries with a replica each, every
//! node a `redis-server` process on loopback): the store's hash slot moved to another primary
//! while writers append, and SIGKILL of the primary holding it, with and without
//! `min_replicas_acked`. Each test checks the store's whole history afterwards.
#![cfg(feature = "cluster")]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use es_core::contract::position::epoch_of;
use es_core::{
    AppendRequest, AppendResult, EventFilter, EventStore, ExpectedVersion, FeedPosition, NewEvent,
    Partitioning, ReadAll, ReadStream, RecordedEvent, StoreError, StreamId,
};
use es_redis::{Error, RedisStore, RedisStoreBuilder};
use es_test_support::{scratch_dir, ClusterConfig, RedisCluster};
use futures::{StreamExt, TryStreamExt};

const WRITERS: usize = 6;
const PATIENCE: Duration = Duration::from_secs(90);

type Acked = (AppendRequest, AppendResult);

fn start_cluster(name: &str, config: &ClusterConfig) -> RedisCluster {
    RedisCluster::start(&scratch_dir(name), config).unwrap_or_else(|e| {
        panic!(
            "cannot start a Redis Cluster: {e}\nthe cluster tests need redis-server 7 and \
             redis-cli (`apt-get install -y redis-server`, or run `cargo xtask test -p es-redis`, \
             which installs them)"
        )
    })
}

fn builder(cluster: &RedisCluster, prefix: &str) -> RedisStoreBuilder {
    RedisStore::cluster_builder(cluster.urls())
        .prefix(prefix)
        .connect_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_secs(2))
}

/// Appends while `stop` is not set: 1 to 3 events at a time to streams of its own (three,
/// in turn; at the version it last saw if `exact`, else at any), each append retried with the same event ids until it is acknowledged (an append
/// is idempotent, so a retry of one that was stored returns its original result). Returns
/// what was acknowledged; counts the failed tries.
#[allow(clippy::too_many_arguments)]
fn spawn_writer(
    streams: Vec<StreamId>,
    exact: bool,
    store: RedisStore,
    stop: Arc<AtomicBool>,
    acked_count: Arc<AtomicUsize>,
    failed_tries: Arc<AtomicUsize>,
    own: Arc<WriterCounts>,
) -> tokio::task::JoinHandle<Vec<Acked>> {
    tokio::spawn(async move {
        let mut versions = [0_u64; 3];
        let mut acked = Vec::new();
        let mut n = 0_usize;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let s = n % 3;
            let events = (0..=n % 3)
                .map(|i| NewEvent::new("Deposited", 1, format!("{{\"n\":{n},\"i\":{i}}}")).unwrap())
                .collect();
            let expected = if exact {
                ExpectedVersion::Exact(versions[s])
            } else {
                ExpectedVersion::Any
            };
            let request = AppendRequest::new(streams[s].clone(), expected, events);
            let started = Instant::now();
            loop {
                match store.append(request.clone()).await {
                    Ok(result) => {
                        versions[s] = result.stream_version;
                        acked.push((request, result));
                        acked_count.fetch_add(1, Ordering::Relaxed);
                        own.acked.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(err @ (StoreError::Unavailable(_) | StoreError::Backend(_))) => {
                        failed_tries.fetch_add(1, Ordering::Relaxed);
                        own.failed.fetch_add(1, Ordering::Relaxed);
                        assert!(
                            started.elapsed() < PATIENCE,
                            "an append failed for {PATIENCE:?}: {err}"
                        );
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(other) => panic!("append failed: {other}"),
                }
            }
        }
        acked
    })
}

/// What one writer had acknowledged and how many of its tries failed.
#[derive(Default)]
struct WriterCounts {
    acked: AtomicUsize,
    failed: AtomicUsize,
}

/// Writer `w`'s three streams.
fn streams_of_writer(w: usize) -> Vec<StreamId> {
    (0..3)
        .map(|s| StreamId::new("account", &format!("{w}-{s}")).unwrap())
        .collect()
}

/// Writers, a subscriber from the start of the feed (of every partition) and the counters they
/// share.
struct Load {
    /// Per writer, its counts.
    per_writer: Vec<Arc<WriterCounts>>,
    stop: Arc<AtomicBool>,
    acked_count: Arc<AtomicUsize>,
    failed_tries: Arc<AtomicUsize>,
    writers: Vec<tokio::task::JoinHandle<Vec<Acked>>>,
    delivered: Arc<Mutex<Vec<RecordedEvent>>>,
    subscriber: tokio::task::JoinHandle<Option<StoreError>>,
}

impl Load {
    fn start(store: &RedisStore, exact: bool) -> Self {
        Self::start_with(store, exact, streams_of_writer)
    }

    /// Writer `w` appends to `streams(w)`.
    fn start_with(
        store: &RedisStore,
        exact: bool,
        streams: impl Fn(usize) -> Vec<StreamId>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked_count = Arc::new(AtomicUsize::new(0));
        let failed_tries = Arc::new(AtomicUsize::new(0));
        let per_writer: Vec<Arc<WriterCounts>> = (0..WRITERS).map(|_| Arc::default()).collect();
        let writers = (0..WRITERS)
            .map(|w| {
                spawn_writer(
                    streams(w),
                    exact,
                    store.clone(),
                    Arc::clone(&stop),
                    Arc::clone(&acked_count),
                    Arc::clone(&failed_tries),
                    Arc::clone(&per_writer[w]),
                )
            })
            .collect();
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let subscriber = {
            let delivered = Arc::clone(&delivered);
            let partitioning = store.partitioning();
            let mut feed = if partitioning.is_single() {
                store.subscribe(0, EventFilter::all())
            } else {
                store.subscribe_all(&FeedPosition::start(&partitioning), EventFilter::all())
            };
            tokio::spawn(async move {
                while let Some(event) = feed.next().await {
                    match event {
                        Ok(event) => delivered.lock().unwrap().push(event),
                        Err(err) => return Some(err),
                    }
                }
                None
            })
        };
        Self {
            per_writer,
            stop,
            acked_count,
            failed_tries,
            writers,
            delivered,
            subscriber,
        }
    }

    async fn wait_for(&self, count: usize) {
        let started = Instant::now();
        while self.acked_count.load(Ordering::Relaxed) < count {
            assert!(
                started.elapsed() < PATIENCE,
                "appends stalled at {}",
                self.acked_count.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn acked(&self) -> usize {
        self.acked_count.load(Ordering::Relaxed)
    }

    /// Stops the writers; what they had acknowledged.
    async fn stop(
        self,
    ) -> (
        Vec<Acked>,
        Arc<Mutex<Vec<RecordedEvent>>>,
        usize,
        Subscriber,
    ) {
        self.stop.store(true, Ordering::Relaxed);
        let mut acked = Vec::new();
        for writer in self.writers {
            acked.extend(
                tokio::time::timeout(PATIENCE, writer)
                    .await
                    .expect("a writer finished")
                    .unwrap(),
            );
        }
        (
            acked,
            self.delivered,
            self.failed_tries.load(Ordering::Relaxed),
            Subscriber(self.subscriber),
        )
    }
}

/// The subscriber task of a stopped [`Load`].
struct Subscriber(tokio::task::JoinHandle<Option<StoreError>>);

/// Checks the store's history against what was acknowledged: every acknowledged event is in
/// its stream at the acknowledged version and in the feed at the acknowledged position, each
/// stream's versions are 1, 2, 3, ... with nothing else in it, the feed's positions strictly
/// increase, every event id is in the feed once, and per-stream order in the feed follows the
/// versions. Returns the feed.
async fn check_history(store: &RedisStore, acked: &[Acked]) -> Vec<RecordedEvent> {
    let mut expected: BTreeMap<StreamId, BTreeMap<u64, (uuid::Uuid, u64)>> = BTreeMap::new();
    for (request, result) in acked {
        let first = result.stream_version + 1 - request.events.len() as u64;
        for (i, event) in request.events.iter().enumerate() {
            let previous = expected
                .entry(request.stream_id.clone())
                .or_default()
                .insert(first + i as u64, (event.event_id, result.positions[i]));
            assert!(previous.is_none(), "two acknowledgements of one version");
        }
    }
    let mut total = 0;
    for (stream, versions) in &expected {
        let events: Vec<RecordedEvent> = store
            .read_stream(stream, ReadStream::forward())
            .try_collect()
            .await
            .unwrap();
        let stored: Vec<(u64, uuid::Uuid, u64)> = events
            .iter()
            .map(|e| (e.stream_version, e.event_id, e.global_position))
            .collect();
        let wanted: Vec<(u64, uuid::Uuid, u64)> = versions
            .iter()
            .map(|(&v, &(id, position))| (v, id, position))
            .collect();
        assert_eq!(stored, wanted, "stream {stream}");
        assert!(
            stored.iter().map(|e| e.0).eq(1..=stored.len() as u64),
            "stream {stream}: versions not dense"
        );
        total += stored.len();
    }
    // Each partition's feed, partition by partition (the whole feed with one partition).
    let mut feed: Vec<RecordedEvent> = Vec::new();
    for partition in store.partitioning().partitions() {
        let part: Vec<RecordedEvent> = store
            .read_all(ReadAll::after(0).partition(partition))
            .try_collect()
            .await
            .unwrap();
        assert!(
            part.windows(2)
                .all(|w| w[0].global_position < w[1].global_position),
            "feed positions of partition {partition} do not strictly increase"
        );
        assert!(part.iter().all(|e| e.partition == partition
            && store.partitioning().partition_of(&e.stream_id) == partition));
        feed.extend(part);
    }
    assert_eq!(
        feed.len(),
        total,
        "the feed holds other events than acknowledged"
    );
    let ids: HashSet<uuid::Uuid> = feed.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), feed.len(), "an event is in the feed twice");
    let mut last_version: HashMap<&StreamId, u64> = HashMap::new();
    for event in &feed {
        let (id, position) = expected[&event.stream_id][&event.stream_version];
        assert_eq!((event.event_id, event.global_position), (id, position));
        let last = last_version.entry(&event.stream_id).or_insert(0);
        assert_eq!(
            event.stream_version,
            *last + 1,
            "per-stream order in the feed"
        );
        *last = event.stream_version;
    }
    feed
}

/// Waits until the subscriber delivered `feed.len()` events, then checks it delivered exactly
/// the feed, in order.
async fn check_delivered(
    delivered: &Mutex<Vec<RecordedEvent>>,
    subscriber: Subscriber,
    feed: &[RecordedEvent],
) {
    let started = Instant::now();
    while delivered.lock().unwrap().len() < feed.len() {
        if subscriber.0.is_finished() {
            let ended = subscriber.0.await.unwrap();
            panic!("the subscriber ended: {ended:?}");
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the subscriber delivered {} of {}",
            delivered.lock().unwrap().len(),
            feed.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    subscriber.0.abort();
    let delivered = delivered.lock().unwrap();
    // Per partition, in its order (partitions interleave in no particular order).
    let per_partition = |events: &[RecordedEvent]| {
        let mut per: BTreeMap<u32, Vec<(uuid::Uuid, u64)>> = BTreeMap::new();
        for e in events {
            per.entry(e.partition)
                .or_default()
                .push((e.event_id, e.global_position));
        }
        per
    };
    assert_eq!(
        per_partition(&delivered),
        per_partition(feed),
        "the subscriber delivered other than the feed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_while_the_store_slot_migrates_lose_and_duplicate_nothing() {
    let cluster = Arc::new(start_cluster(
        "redis-cluster-migrate",
        &ClusterConfig::default(),
    ));
    let store = builder(&cluster, "migrate").build().await.unwrap();
    let slot = store.keys().partition(0).unwrap().slot();
    let first_owner = cluster.primary_for_slot(slot).unwrap();

    let load = Load::start(&store, true);
    load.wait_for(100).await;
    // Move the slot to each other primary in turn, ten keys at a time with a pause between
    // batches, so that appends meet the slot half-moved (some keys here, some there: `ASK`
    // redirects and `TRYAGAIN` refusals) and then moved (`MOVED`).
    let mut moves = Vec::new();
    let others: Vec<u16> = cluster
        .primaries()
        .unwrap()
        .into_iter()
        .filter(|n| n.id != first_owner.id)
        .map(|n| n.port)
        .collect();
    for target in others {
        let before = load.acked();
        let started = Instant::now();
        let keys_moved = {
            let cluster = Arc::clone(&cluster);
            tokio::task::spawn_blocking(move || {
                cluster.migrate_slot(slot, target, 10, Duration::from_millis(30))
            })
            .await
            .unwrap()
            .unwrap()
        };
        assert_eq!(cluster.primary_for_slot(slot).unwrap().port, target);
        moves.push((keys_moved, started.elapsed(), load.acked() - before));
        load.wait_for(load.acked() + 100).await;
    }
    let (acked, delivered, failed_tries, subscriber) = load.stop().await;
    eprintln!(
        "slot {slot} moved twice while {WRITERS} writers appended: {moves:?} (keys moved, time, \
         appends acknowledged meanwhile); {} appends acknowledged, {failed_tries} failed tries \
         retried",
        acked.len()
    );
    for (moved, _, during) in &moves {
        assert!(*moved > 0, "no key was moved");
        assert!(
            *during > 0,
            "no append was acknowledged while the slot moved"
        );
    }

    let feed = check_history(&store, &acked).await;
    check_delivered(&delivered, subscriber, &feed).await;
    // Each primary the slot reached began an epoch after the whole head: no reader lost
    // anything.
    let epochs = store.epochs().await.unwrap();
    assert!(epochs.len() >= 3, "{epochs:?}");
    let mut previous = 0;
    for epoch in &epochs[1..] {
        let head_then = feed
            .iter()
            .map(|e| e.global_position)
            .filter(|&p| epoch_of(p) < epoch.epoch)
            .max()
            .unwrap_or(0);
        assert_eq!(epoch.previous_head, head_then, "{epoch:?}");
        assert!(epoch.epoch > previous);
        previous = epoch.epoch;
    }
    // The same store handle goes on appending on the last primary.
    let stream = StreamId::new("order", "after-moves").unwrap();
    common::append_two_and_read_back(&store, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_partition_slot_migrating_stalls_and_loses_nothing_in_the_others() {
    let cluster = Arc::new(start_cluster(
        "redis-cluster-migrate-partition",
        &ClusterConfig::default(),
    ));
    let partitioning = Partitioning::new(3).unwrap();
    let store = builder(&cluster, "pmigrate")
        .partitioning(partitioning)
        .build()
        .await
        .unwrap();
    // Two writers per partition, each with three streams of its partition.
    let per_partition = streams_per_partition(partitioning, 6);
    let partition_of_writer = |w: usize| w % 3;
    let load = Load::start_with(&store, true, |w| {
        let p = partition_of_writer(w);
        let half = w / 3;
        per_partition[p][half * 3..half * 3 + 3].to_vec()
    });
    load.wait_for(150).await;
    // The three partitions' slots are on the three primaries; partition 1's moves to each of
    // the other primaries in turn, ten keys at a time, while every partition is appended to.
    let moving = 1u32;
    let slot = store.keys().partition(moving).unwrap().slot();
    let owners: HashSet<u16> = store
        .keys()
        .all_partitions()
        .iter()
        .map(|part| cluster.primary_for_slot(part.slot()).unwrap().port)
        .collect();
    assert_eq!(owners.len(), 3, "the partitions are on three primaries");
    let first_owner = cluster.primary_for_slot(slot).unwrap();
    let others: Vec<u16> = cluster
        .primaries()
        .unwrap()
        .into_iter()
        .filter(|n| n.id != first_owner.id)
        .map(|n| n.port)
        .collect();
    let acked_of = |w: usize| load.per_writer[w].acked.load(Ordering::Relaxed);
    let failed_of = |w: usize| load.per_writer[w].failed.load(Ordering::Relaxed);
    let mut moves = Vec::new();
    for target in others {
        let before: Vec<usize> = (0..WRITERS).map(acked_of).collect();
        let failed_before: Vec<usize> = (0..WRITERS).map(failed_of).collect();
        let started = Instant::now();
        let keys_moved = {
            let cluster = Arc::clone(&cluster);
            tokio::task::spawn_blocking(move || {
                cluster.migrate_slot(slot, target, 10, Duration::from_millis(30))
            })
            .await
            .unwrap()
            .unwrap()
        };
        let took = started.elapsed();
        assert_eq!(cluster.primary_for_slot(slot).unwrap().port, target);
        assert!(keys_moved > 0, "no key was moved");
        let during: Vec<usize> = (0..WRITERS).map(|w| acked_of(w) - before[w]).collect();
        let failed: Vec<usize> = (0..WRITERS)
            .map(|w| failed_of(w) - failed_before[w])
            .collect();
        // The writers of the other partitions kept going: each acknowledged appends all
        // through the move. (Their failed tries are reported, not asserted: their appends also
        // look event ids up in the moving partition's index, and an occasional try of theirs
        // has been seen to time out during a move.)
        for w in (0..WRITERS).filter(|&w| partition_of_writer(w) != moving as usize) {
            assert!(
                during[w] >= 10,
                "writer {w} (partition {}) stalled while partition {moving} moved: {during:?} in \
                 {took:?}",
                partition_of_writer(w)
            );
        }
        moves.push((keys_moved, took, during, failed));
        // The moved partition's writers append on its new primary before the next move, so
        // that each primary it reaches is written to (and begins an epoch).
        let now: Vec<usize> = (0..WRITERS).map(acked_of).collect();
        let started = Instant::now();
        while (0..WRITERS)
            .filter(|&w| partition_of_writer(w) == moving as usize)
            .any(|w| acked_of(w) < now[w] + 30)
        {
            assert!(
                started.elapsed() < PATIENCE,
                "partition {moving}'s writers stalled"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let (acked, delivered, failed_tries, subscriber) = load.stop().await;
    eprintln!(
        "partition {moving}'s slot {slot} moved twice while {WRITERS} writers appended to all \
         three partitions: {moves:?} (keys moved, time, appends acknowledged meanwhile and failed \
         tries per writer); {} appends acknowledged, {failed_tries} failed tries retried",
        acked.len()
    );
    let feed = check_history(&store, &acked).await;
    check_delivered(&delivered, subscriber, &feed).await;
    check_partition_epochs(&store, &feed, moving).await;
}

/// `n` streams of each partition of `partitioning`.
fn streams_per_partition(partitioning: Partitioning, n: usize) -> Vec<Vec<StreamId>> {
    let mut per: Vec<Vec<StreamId>> = vec![Vec::new(); partitioning.count() as usize];
    let mut i = 0;
    while per.iter().any(|s| s.len() < n) {
        let stream = StreamId::new("account", &i.to_string()).unwrap();
        let p = partitioning.partition_of(&stream) as usize;
        if per[p].len() < n {
            per[p].push(stream);
        }
        i += 1;
    }
    per
}

/// The partition `moving` began an epoch on each of the two primaries its slot moved to,
/// after its whole head; the others never changed server and have the one epoch of their
/// first write.
async fn check_partition_epochs(store: &RedisStore, feed: &[RecordedEvent], moving: u32) {
    for p in store.partitioning().partitions() {
        let epochs = store.partition_epochs(p).await.unwrap();
        if p == moving {
            assert_eq!(epochs.len(), 3, "{epochs:?}");
            for epoch in &epochs[1..] {
                let head_then = feed
                    .iter()
                    .filter(|e| e.partition == p && epoch_of(e.global_position) < epoch.epoch)
                    .map(|e| e.global_position)
                    .max()
                    .unwrap_or(0);
                assert_eq!(epoch.previous_head, head_then, "{epoch:?}");
            }
        } else {
            assert_eq!(epochs.len(), 1, "partition {p}: {epochs:?}");
        }
    }
}

/// Kills the primary of the store's slot with SIGKILL while writers append, after freezing its
/// replica (SIGSTOP) and cutting the replication link for `lag`, so that the replica lacks
/// what was acknowledged meanwhile; lets the replica go (SIGCONT) and waits until it is
/// promoted. Returns the appends acknowledged while it lagged, the count at the kill and the
/// failover's duration.
async fn lag_and_kill(
    cluster: &Arc<Mutex<RedisCluster>>,
    slot: u16,
    load: &Load,
    lag: Duration,
) -> (Lagging, usize, Duration) {
    let before = load.acked();
    let (primary, replica) = {
        let cluster = cluster.lock().unwrap();
        let primary = cluster.primary_for_slot(slot).unwrap();
        let replica = cluster.replicas_of(&primary.id).unwrap().remove(0);
        let pid = cluster.server(replica.port).unwrap().pid().unwrap();
        common::signal(pid, "STOP");
        cluster
            .cli(primary.port, &["CLIENT", "KILL", "TYPE", "replica"])
            .unwrap();
        (primary, (replica, pid))
    };
    let frozen = load.acked();
    tokio::time::sleep(lag).await;
    let killed_at = Instant::now();
    let at_kill = {
        let mut cluster = cluster.lock().unwrap();
        cluster.kill9(primary.port).unwrap();
        let at_kill = load.acked();
        common::signal(replica.1, "CONT");
        at_kill
    };
    let lagging = Lagging {
        around: at_kill - before,
        frozen: at_kill - frozen,
    };
    let cluster2 = Arc::clone(cluster);
    let id = primary.id.clone();
    let promoted = tokio::task::spawn_blocking(move || {
        cluster2
            .lock()
            .unwrap()
            .wait_for_failover(&id, slot, PATIENCE)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        promoted.port, replica.0.port,
        "its replica took the slot over"
    );
    let failover = killed_at.elapsed();
    let cluster2 = Arc::clone(cluster);
    tokio::task::spawn_blocking(move || {
        let mut cluster = cluster2.lock().unwrap();
        cluster.restart(primary.port)?;
        cluster.wait_ok(PATIENCE)
    })
    .await
    .unwrap()
    .unwrap();
    (lagging, at_kill, failover)
}

/// The appends acknowledged while the replica lagged.
#[derive(Debug, Clone, Copy)]
struct Lagging {
    /// From just before the replica was frozen to the kill: those the replica may lack.
    around: usize,
    /// From the moment it was frozen and cut off to the kill: those it cannot have.
    frozen: usize,
}

/// The acknowledged appends whose events the store no longer holds at their versions.
async fn lost<'a>(store: &RedisStore, acked: &'a [Acked]) -> Vec<&'a Acked> {
    let mut streams: HashMap<StreamId, HashMap<u64, uuid::Uuid>> = HashMap::new();
    for (request, _) in acked {
        if streams.contains_key(&request.stream_id) {
            continue;
        }
        let events: Vec<RecordedEvent> = store
            .read_stream(&request.stream_id, ReadStream::forward())
            .try_collect()
            .await
            .unwrap();
        streams.insert(
            request.stream_id.clone(),
            events
                .into_iter()
                .map(|e| (e.stream_version, e.event_id))
                .collect(),
        );
    }
    acked
        .iter()
        .filter(|(request, result)| {
            let stored = &streams[&request.stream_id];
            let first = result.stream_version + 1 - request.events.len() as u64;
            request
                .events
                .iter()
                .enumerate()
                .any(|(i, e)| stored.get(&(first + i as u64)) != Some(&e.event_id))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_min_replicas_acked_a_failover_of_the_store_slot_loses_nothing_acknowledged() {
    let cluster = start_cluster("redis-cluster-failover-wait", &ClusterConfig::default());
    // Every primary persists and keeps keys: the settings were read on the slot's primary.
    let store = builder(&cluster, "failover-wait")
        .min_replicas_acked(1, Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let slot = store.keys().partition(0).unwrap().slot();
    let cluster = Arc::new(Mutex::new(cluster));
    let load = Load::start(&store, true);
    load.wait_for(150).await;
    let (lagging, at_kill, failover) =
        lag_and_kill(&cluster, slot, &load, Duration::from_millis(300)).await;
    load.wait_for(at_kill + 150).await;
    let (acked, delivered, failed_tries, subscriber) = load.stop().await;
    eprintln!(
        "min_replicas_acked(1): {} appends acknowledged, {} while the replica was frozen \
         (300 ms), failover in {failover:?}, {failed_tries} failed tries retried",
        acked.len(),
        lagging.frozen
    );
    // With WAIT, an append is acknowledged only once the replica has it: while it was frozen,
    // at most the appends whose WAIT it had answered just before.
    assert!(
        lagging.frozen <= WRITERS,
        "{} acknowledged while the replica was frozen",
        lagging.frozen
    );
    assert!(lost(&store, &acked).await.is_empty());
    let feed = check_history(&store, &acked).await;
    check_delivered(&delivered, subscriber, &feed).await;
    let epochs = store.epochs().await.unwrap();
    assert!(
        epochs.len() >= 2,
        "the promoted replica began an epoch: {epochs:?}"
    );
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_min_replicas_acked_a_failover_loses_the_unreplicated_tail_and_readers_get_lost_tail(
) {
    let cluster = start_cluster("redis-cluster-failover-async", &ClusterConfig::default());
    let store = builder(&cluster, "failover-async").build().await.unwrap();
    let slot = store.keys().partition(0).unwrap().slot();
    let cluster = Arc::new(Mutex::new(cluster));
    let load = Load::start(&store, false);
    load.wait_for(150).await;
    let (lagging, at_kill, failover) =
        lag_and_kill(&cluster, slot, &load, Duration::from_millis(300)).await;
    let during = lagging.around;
    load.wait_for(at_kill + 150).await;
    let (acked, _delivered, failed_tries, subscriber) = load.stop().await;
    subscriber.0.abort();
    let lost = lost(&store, &acked).await;
    eprintln!(
        "asynchronous replication: {} appends acknowledged, {during} while the replica lagged \
         (300 ms), failover in {failover:?}, {failed_tries} failed tries retried; lost: {}",
        acked.len(),
        lost.len()
    );
    assert!(during > 0, "nothing was appended while the replica lagged");
    assert!(
        !lost.is_empty(),
        "the lagging replica lost nothing: the test did not lag it"
    );
    assert!(
        lost.len() <= during + WRITERS,
        "lost {} of {during} acknowledged while the replica lagged",
        lost.len()
    );
    // The promoted replica's first write began an epoch after the surviving head; a reader
    // past that head learns of the loss instead of skipping the new events.
    let epochs = store.epochs().await.unwrap();
    let epoch = epochs.last().unwrap();
    let past = lost
        .iter()
        .filter_map(|(_, r)| r.positions.last().copied())
        .max()
        .unwrap();
    assert!(
        past > epoch.previous_head,
        "{past} <= {}",
        epoch.previous_head
    );
    let mut feed = store.subscribe(past, EventFilter::all());
    match tokio::time::timeout(PATIENCE, feed.next()).await.unwrap() {
        Some(Err(StoreError::LostTail { position, head, .. })) => {
            assert_eq!(position, past);
            assert_eq!(head, epoch.previous_head);
        }
        other => panic!("expected LostTail, got {other:?}"),
    }
    // A reader at the surviving head reads on: everything after it is the new epoch's.
    let mut feed = store.subscribe(epoch.previous_head, EventFilter::all());
    let next = tokio::time::timeout(PATIENCE, feed.next()).await.unwrap();
    assert!(
        matches!(&next, Some(Ok(e)) if epoch_of(e.global_position) == epoch.epoch),
        "{next:?}"
    );
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_protected_cluster_and_its_settings_checks() {
    let cluster = start_cluster(
        "redis-cluster-password",
        &ClusterConfig {
            replicas: 0,
            password: Some("s3cret-pw".to_owned()),
            ..ClusterConfig::default()
        },
    );
    // The password in the URLs.
    let store = builder(&cluster, "pw").build().await.unwrap();
    let stream = StreamId::new("order", "1").unwrap();
    common::append_two_and_read_back(&store, &stream).await;
    let shown = format!("{:?}", builder(&cluster, "pw"));
    assert!(!shown.contains("s3cret-pw"), "{shown}");
    // Without it: refused, typed.
    let urls: Vec<String> = cluster
        .ports()
        .iter()
        .map(|port| format!("redis://127.0.0.1:{port}"))
        .collect();
    let err = RedisStore::cluster_builder(urls)
        .prefix("pw")
        .connect_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Connect { .. } | Error::NoPermission { .. }),
        "{err}"
    );

    // The primary of the store's slot may evict keys: the store refuses it at build, and
    // refuses appends once its monitor reads it on a running store.
    let slot = store.keys().partition(0).unwrap().slot();
    let owner = cluster.primary_for_slot(slot).unwrap();
    cluster
        .cli(
            owner.port,
            &["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"],
        )
        .unwrap();
    let err = builder(&cluster, "pw").build().await.unwrap_err();
    assert!(matches!(err, Error::EvictionPolicy { .. }), "{err}");
    let started = Instant::now();
    loop {
        let request = AppendRequest::new(
            stream.clone(),
            ExpectedVersion::Any,
            vec![NewEvent::new("Deposited", 1, "{}").unwrap()],
        );
        match store.append(request).await {
            Err(StoreError::Backend(source))
                if matches!(
                    source.downcast_ref::<Error>(),
                    Some(Error::EvictionPolicy { .. })
                ) =>
            {
                break
            }
            Ok(_) => {}
            Err(other) => panic!("{other}"),
        }
        assert!(started.elapsed() < PATIENCE, "appends were never refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Another primary's policy does not concern a store whose partition is not there.
    cluster
        .cli(
            owner.port,
            &["CONFIG", "SET", "maxmemory-policy", "noeviction"],
        )
        .unwrap();
    let other = cluster
        .primaries()
        .unwrap()
        .into_iter()
        .find(|n| n.id != owner.id)
        .unwrap();
    cluster
        .cli(
            other.port,
            &["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"],
        )
        .unwrap();
    builder(&cluster, "pw").build().await.unwrap();
}
