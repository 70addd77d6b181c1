//! Failover for real: a primary, a replica and three sentinels on loopback, each a process of
//! its own. Eight writers append through a store that finds the primary through the sentinels;
//! the replica is frozen (SIGSTOP) for a moment, as a lagging replica would be, the primary is
//! killed with SIGKILL during the appends, the sentinels promote the replica, and the store
//! follows it. With `min_replicas_acked(1, ..)` every acknowledged append is on the promoted
//! replica; without it, the appends acknowledged while the replica lagged are lost, which the
//! test measures and which readers past the surviving head learn of (`LostTail`).
#![cfg(feature = "sentinel")]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use es_core::{
    AppendRequest, AppendResult, EventFilter, EventStore, ExpectedVersion, NewEvent, ReadStream,
    StoreError, StreamId,
};
use es_redis::redis;
use es_redis::{Error, RedisStore};
use es_test_support::{scratch_dir, RedisSentinel, RedisServer};
use futures::{StreamExt, TryStreamExt};

const SERVICE: &str = "es-primary";
const WRITERS: usize = 8;
const PATIENCE: Duration = Duration::from_secs(60);

/// A primary, its replica and three sentinels (quorum 2, down after 1 s).
struct Group {
    primary: RedisServer,
    replica: RedisServer,
    sentinels: Vec<RedisSentinel>,
}

async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn info(url: &str, section: &str) -> String {
    let mut conn = connect(url).await;
    redis::cmd("INFO")
        .arg(section)
        .query_async(&mut conn)
        .await
        .unwrap()
}

fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.trim_end().strip_prefix(name)?.strip_prefix(':'))
}

async fn start_group(name: &str) -> Group {
    let dir = scratch_dir(name);
    let primary = RedisServer::start(
        &dir.join("primary"),
        &["--appendonly", "yes", "--appendfsync", "always"],
    )
    .expect("start the primary");
    let port = primary.port().to_string();
    let replica = RedisServer::start(
        &dir.join("replica"),
        &[
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--replicaof",
            "127.0.0.1",
            &port,
        ],
    )
    .expect("start the replica");
    let started = Instant::now();
    while field(
        &info(&replica.url(), "replication").await,
        "master_link_status",
    ) != Some("up")
    {
        assert!(started.elapsed() < PATIENCE, "the replica did not sync");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sentinels = (0..3)
        .map(|i| {
            RedisSentinel::start(
                &dir.join(format!("sentinel-{i}")),
                SERVICE,
                primary.port(),
                2,
                1000,
            )
            .expect("start a sentinel")
        })
        .collect();
    Group {
        primary,
        replica,
        sentinels,
    }
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// One acknowledged append: its request and result.
type Acked = (AppendRequest, AppendResult);

/// What a run saw.
struct Run {
    store: RedisStore,
    acked: Vec<Acked>,
    /// Appends acknowledged while the replica was frozen (before the kill).
    acked_while_frozen: usize,
    /// How long after the kill the sentinels named the new primary.
    failover: Duration,
    /// How long after the kill the first append was acknowledged by the new primary.
    recovery: Duration,
    /// Appends refused because the replica did not acknowledge them in time.
    not_replicated: usize,
    group: Group,
}

/// Stops the replica and has the primary drop its link, so that what the primary writes from
/// now on reaches no replica (what a network partition or a slow replica does); 300 ms later
/// kills the primary with SIGKILL and lets the replica go on. Waits for all sentinels to name
/// the promoted replica, then restarts the old primary (from its AOF, with the appends the replica never
/// got), which the sentinels make a replica of the new one, discarding them. Returns the appends
/// acknowledged during the lag, the appends acknowledged when the primary was killed, when that
/// was, and how long the sentinels took.
async fn lag_and_kill(
    group: &mut Group,
    acked_count: &AtomicUsize,
) -> (usize, usize, Instant, Duration) {
    let replica_pid = group.replica.pid().unwrap();
    signal(replica_pid, "STOP");
    let before_freeze = acked_count.load(Ordering::Relaxed);
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("replica")
        .query_async(&mut connect(&group.primary.url()).await)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let acked_while_frozen = acked_count.load(Ordering::Relaxed) - before_freeze;
    tokio::task::block_in_place(|| group.primary.kill9()).unwrap();
    let killed_at = Instant::now();
    let at_kill = acked_count.load(Ordering::Relaxed);
    signal(replica_pid, "CONT");

    // Every sentinel names the new primary before the old one comes back: one that has not
    // heard of the failover yet would otherwise take the returning old primary back as the
    // primary (split brain), which is Sentinel's to prevent, not the store's.
    let replica_port = group.replica.port().to_string();
    for sentinel in group.sentinels.iter().map(RedisSentinel::url) {
        loop {
            let named: Vec<String> = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(SERVICE)
                .query_async(&mut connect(&sentinel).await)
                .await
                .unwrap();
            if named.get(1) == Some(&replica_port) {
                break;
            }
            assert!(
                killed_at.elapsed() < PATIENCE,
                "the sentinels did not fail over"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let failover = killed_at.elapsed();
    tokio::task::block_in_place(|| group.primary.restart()).unwrap();
    (acked_while_frozen, at_kill, killed_at, failover)
}

/// A writer appending 1 to 3 events at a time to a stream of its own until `stop`, retrying
/// each append while the store is unavailable; returns what was acknowledged.
fn spawn_writer(
    w: usize,
    store: RedisStore,
    stop: Arc<AtomicBool>,
    acked_count: Arc<AtomicUsize>,
    not_replicated: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Vec<Acked>> {
    tokio::spawn(async move {
        let stream = StreamId::new("account", &w.to_string()).unwrap();
        let mut acked = Vec::new();
        let mut n = 0_usize;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let events = (0..=n % 3)
                .map(|i| NewEvent::new("Deposited", 1, format!("{{\"n\":{n},\"i\":{i}}}")).unwrap())
                .collect();
            let request = AppendRequest::new(stream.clone(), ExpectedVersion::Any, events);
            let started = Instant::now();
            loop {
                match store.append(request.clone()).await {
                    Ok(result) => {
                        acked.push((request, result));
                        acked_count.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(StoreError::Unavailable(source)) => {
                        if matches!(
                            source.downcast_ref::<Error>(),
                            Some(Error::ReplicasNotAcked { .. })
                        ) {
                            not_replicated.fetch_add(1, Ordering::Relaxed);
                        }
                        assert!(
                            started.elapsed() < PATIENCE,
                            "unavailable too long: {source}"
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

async fn run(name: &str, wait: bool) -> Run {
    let group = start_group(name).await;
    let urls: Vec<String> = group.sentinels.iter().map(RedisSentinel::url).collect();
    let mut builder = RedisStore::builder("redis://127.0.0.1:1")
        .prefix("failover")
        .sentinels(SERVICE, urls)
        .connect_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_secs(2));
    if wait {
        builder = builder.min_replicas_acked(1, Duration::from_millis(500));
    }
    let store = builder
        .build()
        .await
        .expect("a store through the sentinels");
    let primary_run_id = store.server_settings().run_id;
    let replica_run_id = field(&info(&group.replica.url(), "server").await, "run_id")
        .unwrap()
        .to_owned();

    let stop = Arc::new(AtomicBool::new(false));
    let acked_count = Arc::new(AtomicUsize::new(0));
    let not_replicated = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            spawn_writer(
                w,
                store.clone(),
                Arc::clone(&stop),
                Arc::clone(&acked_count),
                Arc::clone(&not_replicated),
            )
        })
        .collect();

    // Appends flow to both; then the replica lags (frozen) while appends go on, and the primary
    // dies.
    let wait_for = |count: usize| {
        let acked_count = Arc::clone(&acked_count);
        async move {
            let started = Instant::now();
            while acked_count.load(Ordering::Relaxed) < count {
                assert!(started.elapsed() < PATIENCE, "appends stalled");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_for(200).await;
    let mut group = group;
    let (acked_while_frozen, at_kill, killed_at, failover) =
        lag_and_kill(&mut group, &acked_count).await;
    wait_for(at_kill + 1).await;
    let recovery = killed_at.elapsed();
    wait_for(at_kill + 200).await;
    stop.store(true, Ordering::Relaxed);

    let mut acked = Vec::new();
    for writer in writers {
        acked.extend(
            tokio::time::timeout(PATIENCE, writer)
                .await
                .unwrap()
                .unwrap(),
        );
    }

    // The store follows the primary the sentinels name (the promoted replica; under the load of
    // these tests the sentinels have been seen to fail over once more, back to the returned old
    // primary once it had resynchronised): its settings monitor reads that server's run_id.
    let started = Instant::now();
    loop {
        let named: Vec<String> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(SERVICE)
            .query_async(&mut connect(&group.sentinels[0].url()).await)
            .await
            .unwrap();
        let primary_url = format!("redis://127.0.0.1:{}", named[1]);
        let primary = info(&primary_url, "server").await;
        let role = info(&primary_url, "replication").await;
        let settings = store.server_settings();
        if field(&primary, "run_id") == Some(settings.run_id.as_str())
            && field(&role, "role") == Some("master")
            && settings.run_id != primary_run_id
        {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the store did not follow the primary the sentinels name ({primary_url}, run_id \
             {:?}; the promoted replica's is {replica_run_id}, the first primary's \
             {primary_run_id}); the store's settings: {settings}",
            field(&primary, "run_id"),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    Run {
        store,
        acked,
        acked_while_frozen,
        failover,
        recovery,
        not_replicated: not_replicated.load(Ordering::Relaxed),
        group,
    }
}

/// The acknowledged appends whose events the store no longer holds at the acknowledged
/// versions, with the highest acknowledged position among them.
async fn lost(run: &Run) -> Vec<&Acked> {
    let mut streams: HashMap<StreamId, HashMap<u64, uuid::Uuid>> = HashMap::new();
    for (request, _) in &run.acked {
        if streams.contains_key(&request.stream_id) {
            continue;
        }
        let events: Vec<_> = run
            .store
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
    run.acked
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
async fn with_min_replicas_acked_every_acknowledged_append_survives_a_failover() {
    let run = run("redis-failover-wait", true).await;
    let lost = lost(&run).await;
    eprintln!(
        "min_replicas_acked(1): {} appends acknowledged, {} while the replica was frozen, {} \
         refused as not replicated and retried, failover {:?} and first acknowledgement {:?} \
         after the kill; lost: {}",
        run.acked.len(),
        run.acked_while_frozen,
        run.not_replicated,
        run.failover,
        run.recovery,
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged appends lost: {}", lost.len());
    assert!(
        run.not_replicated > 0,
        "the frozen replica refused no append"
    );
    // At most one append per writer, whose WAIT the replica answered just before it froze, is
    // acknowledged after the freeze began; nothing written after it is.
    assert!(
        run.acked_while_frozen <= WRITERS,
        "{} appends were acknowledged while the only replica could not have them",
        run.acked_while_frozen
    );

    // The promoted replica began an epoch; a reader at the last acknowledged position before
    // the failover reads on without a loss.
    let epochs = run.store.epochs().await.unwrap();
    assert!(epochs.len() >= 2, "{epochs:?}");
    let last_before = run
        .acked
        .iter()
        .filter_map(|(_, r)| r.positions.last().copied())
        .filter(|p| es_core::contract::position::epoch_of(*p) < epochs.last().unwrap().epoch)
        .max()
        .unwrap();
    let mut feed = run.store.subscribe(last_before, EventFilter::all());
    let first = tokio::time::timeout(PATIENCE, feed.next()).await.unwrap();
    assert!(matches!(first, Some(Ok(_))), "{first:?}");
    drop(run.group);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_min_replicas_acked_a_failover_loses_what_the_replica_lacked_and_readers_learn_of_it(
) {
    let run = run("redis-failover-async", false).await;
    let lost = lost(&run).await;
    eprintln!(
        "asynchronous replication: {} appends acknowledged, {} while the replica was frozen \
         (300 ms), failover {:?} and first acknowledgement {:?} after the kill; lost: {}",
        run.acked.len(),
        run.acked_while_frozen,
        run.failover,
        run.recovery,
        lost.len()
    );
    assert!(
        run.acked_while_frozen > 0,
        "nothing was appended while the replica lagged"
    );
    assert!(
        !lost.is_empty(),
        "a lagging replica lost nothing: the test did not lag it"
    );
    // What is lost is what the replica lacked: at most what was acknowledged while it was frozen
    // (and what was in flight when it froze).
    assert!(
        lost.len() <= run.acked_while_frozen + WRITERS,
        "lost {} of {} acknowledged while frozen",
        lost.len(),
        run.acked_while_frozen
    );

    // Readers past the surviving head learn of the loss.
    let epochs = run.store.epochs().await.unwrap();
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
    let mut feed = run.store.subscribe(past, EventFilter::all());
    match tokio::time::timeout(PATIENCE, feed.next()).await.unwrap() {
        Some(Err(StoreError::LostTail { position, head, .. })) => {
            assert_eq!(position, past);
            assert_eq!(head, epoch.previous_head);
        }
        other => panic!("expected LostTail, got {other:?}"),
    }
    drop(run.group);
}
