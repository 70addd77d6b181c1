//! Crashes and stalls of a redis-server of the test's own.
//!
//! The crash test runs the server with `appendonly yes` / `appendfsync always`, kills it with
//! SIGKILL three times during concurrent appends (each time freezing it with SIGSTOP first, at an
//! arbitrary point of its work, so that the kill is sure to hit appends in flight: sent, not
//! answered; it counts them and asserts there were some) and restarts it from its AOF. Every
//! acknowledged append must be stored exactly once with the versions and positions it was
//! acknowledged with, no batch may be stored in part, every acknowledged append's outbox
//! messages must be in the outbox exactly once (and nothing else), each restart must have
//! started an epoch right after the last acknowledged position (nothing acknowledged lost), and
//! two subscribers that tail the feed through the crashes must deliver exactly the feed.
//!
//! What a kill of the process can and cannot show: Redis writes a script's effects to the AOF
//! (`write(2)`) before it sends the reply, in every `appendfsync` mode; the fsync only decides
//! when the kernel's page cache reaches the disk. A process killed with SIGKILL leaves the page
//! cache to the kernel, which still writes it out, so this test passes with `appendfsync no` as
//! well: it proves that acknowledged appends are in the AOF and that a restart replays whole
//! scripts, not that they were fsynced. Only a crash of the machine (power loss, kernel panic)
//! separates `always` from `everysec` and `no`, and no test here produces one.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use es_core::{
    AppendRequest, AppendResult, EventStore, ExpectedVersion, Metadata, NewEvent, OutboxMessage,
    OutboxRecord, OutboxStore, ReadAll, ReadStream, RecordedEvent, StoreError, StreamId,
};
use es_redis::RedisStore;
use es_test_support::{scratch_dir, RedisServer};
use es_testkit::support::tail_until_done;
use futures::TryStreamExt;
use serde_json::json;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(120);

/// The kills of the crash test, for counting the appends in flight at each.
///
/// A kill first freezes the server (SIGSTOP) at whatever point of its event loop it is, waits a
/// little so that every writer's next append is sent and waiting, then kills it (SIGKILL, which
/// a stopped process receives too). So the kill lands at an arbitrary instant, like a plain
/// kill, and it is certain to hit appends in flight: sent (or being sent), with no reply.
#[derive(Debug, Default)]
struct Kills {
    /// Raised once each kill has frozen the server.
    started: AtomicUsize,
    /// Per kill, the append attempts it hit.
    hit: Mutex<Vec<usize>>,
    /// Appends acknowledged so far.
    acknowledged: AtomicUsize,
}

impl Kills {
    /// Waits until the writers have had `appends` more appends acknowledged (after a restart:
    /// until they are connected and appending again), so that the next kill hits them at work.
    async fn wait_for_progress(&self, appends: usize) {
        let target = self.acknowledged.load(Ordering::SeqCst) + appends;
        let started = std::time::Instant::now();
        while self.acknowledged.load(Ordering::SeqCst) < target {
            assert!(started.elapsed() < PATIENCE, "the writers made no progress");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kills and restarts the server until `wanted` kills hit appends in flight; returns how
    /// many kills it made. Group commit sends the writers' appends together, so a kill can fall
    /// between two calls and find none in flight: such a kill does not count.
    async fn kill_until_hit(&self, server: &mut RedisServer, wanted: usize) -> usize {
        let mut made = 0;
        loop {
            self.wait_for_progress(500).await;
            if self.hits() >= wanted {
                return made;
            }
            assert!(
                made < wanted * 3,
                "{made} kills, too few hit appends in flight: {:?}",
                self.hit.lock().unwrap()
            );
            self.kill(server).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            tokio::task::block_in_place(|| server.restart()).unwrap();
            made += 1;
        }
    }

    /// How many kills hit appends in flight.
    fn hits(&self) -> usize {
        self.hit.lock().unwrap().iter().filter(|n| **n > 0).count()
    }

    async fn kill(&self, server: &mut RedisServer) {
        common::signal(server.pid().unwrap(), "STOP");
        // Counted from here: the frozen server answers nothing until it is killed.
        let k = self.started.fetch_add(1, Ordering::SeqCst);
        self.hit.lock().unwrap().resize(k + 1, 0);
        tokio::time::sleep(Duration::from_millis(100)).await;
        tokio::task::block_in_place(|| server.kill9()).unwrap();
    }

    /// Runs one append attempt. One that began before a kill had frozen the server and failed
    /// after that was in flight when the kill hit (the frozen server answers nothing, so it
    /// cannot have failed earlier): its outcome was unknown to the caller, committed or not.
    /// Counts those (and not the ones sent to the frozen server afterwards).
    async fn attempt(
        &self,
        store: &RedisStore,
        request: AppendRequest,
    ) -> Result<AppendResult, StoreError> {
        let before = self.started.load(Ordering::SeqCst);
        let result = store.append(request).await;
        let after = self.started.load(Ordering::SeqCst);
        if result.is_ok() {
            self.acknowledged.fetch_add(1, Ordering::SeqCst);
        } else if after > before {
            let mut hit = self.hit.lock().unwrap();
            for kill in before..after {
                hit[kill] += 1;
            }
        }
        result
    }
}

/// Appends `request` until it is acknowledged, retrying the same request (idempotent by event
/// id) while the server is unavailable.
async fn append_until_acknowledged(store: &RedisStore, request: AppendRequest) -> AppendResult {
    append_counting(store, request, &Kills::default()).await
}

/// [`append_until_acknowledged`], counting the attempts in flight at each of `kills`.
async fn append_counting(
    store: &RedisStore,
    request: AppendRequest,
    kills: &Kills,
) -> AppendResult {
    let started = std::time::Instant::now();
    loop {
        match kills.attempt(store, request.clone()).await {
            Ok(result) => return result,
            Err(err @ StoreError::Unavailable(_)) => {
                assert!(
                    started.elapsed() < PATIENCE,
                    "unavailable for too long: {err}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(other) => panic!("append failed with a non-transient error: {other}"),
        }
    }
}

async fn wait_until_available(store: &RedisStore) {
    let started = std::time::Instant::now();
    while store.head_position().await.is_err() {
        assert!(started.elapsed() < PATIENCE, "the server did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The outbox messages of `events`: one per event for even `i`, none for odd `i`.
fn messages(i: usize, events: &[NewEvent]) -> Vec<OutboxMessage> {
    if i % 2 == 1 {
        return Vec::new();
    }
    events
        .iter()
        .map(|e| OutboxMessage {
            message_id: uuid::Uuid::now_v7(),
            source_event_id: e.event_id,
            topic: "accounts".into(),
            key: "acct".into(),
            message_type: "acct.moved".into(),
            schema_version: 1,
            payload: Bytes::from(json!({ "i": i }).to_string()),
            metadata: Metadata::new().with_causation_id(e.event_id),
        })
        .collect()
}

/// Appends batches of 1 to 4 events (with outbox messages every other time) round-robin to its
/// own streams with exact expected versions until `stop`; returns every acknowledged append with
/// its result.
async fn writer(
    store: RedisStore,
    w: usize,
    stop: Arc<AtomicBool>,
    kills: Arc<Kills>,
) -> Vec<(AppendRequest, AppendResult)> {
    const STREAMS_PER_WRITER: usize = 10;
    let mut versions = [0u64; STREAMS_PER_WRITER];
    let mut acknowledged = Vec::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let k = i % STREAMS_PER_WRITER;
        let stream = StreamId::new("acct", &format!("{w}-{k}")).unwrap();
        let batch: Vec<NewEvent> = (0..=i % 4)
            .map(|j| NewEvent::from_value("Moved", 1, &json!({ "w": w, "i": i, "j": j })))
            .collect();
        let outbox = messages(i, &batch);
        let request = AppendRequest::new(stream, ExpectedVersion::Exact(versions[k]), batch)
            .with_outbox(outbox);
        let result = append_counting(&store, request.clone(), &kills).await;
        assert_eq!(
            result.stream_version,
            versions[k] + request.events.len() as u64
        );
        versions[k] = result.stream_version;
        acknowledged.push((request, result));
        i += 1;
    }
    acknowledged
}

/// Checks that every acknowledged append is stored exactly once, whole, with the versions and
/// positions it was acknowledged with, and that nothing else is stored.
async fn check_acknowledged(store: &RedisStore, acknowledged: &[(AppendRequest, AppendResult)]) {
    let feed: Vec<RecordedEvent> = store
        .read_all(ReadAll::after(0))
        .try_collect()
        .await
        .unwrap();
    let mut by_id: HashMap<Uuid, &RecordedEvent> = HashMap::new();
    for e in &feed {
        assert!(
            by_id.insert(e.event_id, e).is_none(),
            "event {} stored twice",
            e.event_id
        );
    }
    assert!(feed
        .windows(2)
        .all(|w| w[0].global_position < w[1].global_position));
    let mut expected_total = 0;
    for (request, result) in acknowledged {
        expected_total += request.events.len();
        let first = result.first_version().unwrap();
        for (i, new) in request.events.iter().enumerate() {
            let stored = by_id
                .get(&new.event_id)
                .unwrap_or_else(|| panic!("acknowledged event {} was lost", new.event_id));
            assert_eq!(stored.stream_id, request.stream_id);
            assert_eq!(stored.stream_version, first + i as u64);
            assert_eq!(stored.global_position, result.positions[i]);
            assert_eq!(stored.payload, new.payload);
        }
        let stored: Vec<RecordedEvent> = store
            .read_stream(
                &request.stream_id,
                ReadStream::forward()
                    .from(first)
                    .limit(request.events.len() as u64),
            )
            .try_collect()
            .await
            .unwrap();
        assert_eq!(
            stored.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            request
                .events
                .iter()
                .map(|e| e.event_id)
                .collect::<Vec<_>>()
        );
    }
    // Nothing else is stored: no partial batch of an append whose acknowledgement was lost (every
    // such append was retried until acknowledged).
    assert_eq!(
        feed.len(),
        expected_total,
        "the feed holds exactly the acknowledged events"
    );
    check_outbox(store, acknowledged, &by_id).await;
}

/// Every acknowledged append's messages are in the outbox exactly once, intact, in commit order,
/// and nothing else is.
async fn check_outbox(
    store: &RedisStore,
    acknowledged: &[(AppendRequest, AppendResult)],
    by_id: &HashMap<Uuid, &RecordedEvent>,
) {
    let outbox: Vec<OutboxRecord> = store.pending_outbox(u64::MAX).await.unwrap();
    assert_eq!(
        store.outbox_len().await.unwrap(),
        outbox.len() as u64,
        "outbox_len counts the pending records"
    );
    let mut by_message: HashMap<Uuid, &OutboxRecord> = HashMap::new();
    for r in &outbox {
        assert!(
            by_message.insert(r.message.message_id, r).is_none(),
            "message {} is in the outbox twice",
            r.message.message_id
        );
    }
    let mut expected_total = 0;
    for (request, _) in acknowledged {
        expected_total += request.outbox.len();
        for sent in &request.outbox {
            let stored = by_message.get(&sent.message_id).unwrap_or_else(|| {
                panic!(
                    "the outbox lost message {} of an acknowledged append",
                    sent.message_id
                )
            });
            assert_eq!(stored.stream_id, request.stream_id);
            assert_eq!(&stored.message, sent);
        }
    }
    assert_eq!(
        outbox.len(),
        expected_total,
        "the outbox holds exactly the acknowledged appends' messages"
    );
    // Outbox order is commit order: the source events' global positions increase with it.
    let sources: Vec<u64> = outbox
        .iter()
        .map(|r| by_id[&r.message.source_event_id].global_position)
        .collect();
    assert!(outbox.windows(2).all(|w| w[0].position < w[1].position));
    assert!(
        sources.windows(2).all(|w| w[0] < w[1]),
        "outbox order is commit order"
    );
}

/// Every incarnation of the server that was written to (the first, and every restart followed
/// by a write) began an epoch of its own, right after the highest acknowledged position before it
/// (0 for the first): nothing acknowledged was lost.
async fn check_epochs(store: &RedisStore, acknowledged: &[(AppendRequest, AppendResult)]) {
    let epochs = store.epochs().await.unwrap();
    let mut positions: Vec<u64> = acknowledged
        .iter()
        .flat_map(|(_, r)| r.positions.iter().copied())
        .collect();
    positions.sort_unstable();
    let written_in: HashSet<u64> = positions
        .iter()
        .map(|p| es_core::contract::position::epoch_of(*p))
        .collect();
    assert_eq!(
        epochs.len(),
        written_in.len(),
        "one epoch per incarnation that was written to: {epochs:?}"
    );
    assert!(
        epochs.windows(2).all(|w| w[0].epoch < w[1].epoch),
        "{epochs:?}"
    );
    for start in &epochs {
        assert!(written_in.contains(&start.epoch), "{epochs:?}");
        let first = es_core::contract::position::first_of_epoch(start.epoch);
        let below = positions.iter().copied().rfind(|p| *p < first);
        assert_eq!(
            below.unwrap_or(0),
            start.previous_head,
            "epoch {} began right after the last acknowledged position",
            start.epoch
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_during_appends_loses_no_acknowledged_append() {
    const WRITERS: usize = 8;
    const KILLS: usize = 3;
    let dir = scratch_dir("es-redis-kill9");
    let mut server =
        RedisServer::start(&dir, &["--appendonly", "yes", "--appendfsync", "always"]).unwrap();
    let store = RedisStore::builder(server.url())
        .prefix("crash")
        .poll_interval(Duration::from_millis(200))
        .response_timeout(Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let settings = store.server_settings();
    assert!(settings.appendonly, "{settings}");
    assert_eq!(
        settings.appendfsync.as_deref(),
        Some("always"),
        "{settings}"
    );

    let subscribers = [tail_until_done(&store), tail_until_done(&store)];

    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(Kills::default());
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            tokio::spawn(writer(
                store.clone(),
                w,
                Arc::clone(&stop),
                Arc::clone(&kills),
            ))
        })
        .collect();

    let made = kills.kill_until_hit(&mut server, KILLS).await;
    stop.store(true, Ordering::Relaxed);

    let mut acknowledged = Vec::new();
    for w in writers {
        acknowledged.extend(tokio::time::timeout(PATIENCE, w).await.unwrap().unwrap());
    }
    let retried = acknowledged.iter().filter(|(_, r)| r.duplicate).count();
    let messages: usize = acknowledged.iter().map(|(r, _)| r.outbox.len()).sum();
    let in_flight = kills.hit.lock().unwrap().clone();
    eprintln!(
        "{} appends acknowledged with {messages} outbox messages, {retried} of them on a retry \
         after the reply was lost; appends in flight at each kill: {in_flight:?}",
        acknowledged.len()
    );
    assert_eq!(in_flight.len(), made, "{in_flight:?}");
    assert!(
        in_flight.iter().filter(|n| **n > 0).count() >= KILLS,
        "{KILLS} kills hit appends in flight: {in_flight:?}"
    );

    // One more restart from the AOF: what was acknowledged must be on disk, not just in memory.
    tokio::task::block_in_place(|| server.kill9()).unwrap();
    tokio::task::block_in_place(|| server.restart()).unwrap();
    wait_until_available(&store).await;

    check_acknowledged(&store, &acknowledged).await;
    check_epochs(&store, &acknowledged).await;

    let done = AppendRequest::new(
        StreamId::parse("control-1").unwrap(),
        ExpectedVersion::Any,
        vec![NewEvent::from_value("Done", 1, &json!({}))],
    );
    let done_result = append_until_acknowledged(&store, done.clone()).await;
    // The last restart, too, started an epoch with its first write, after the same head.
    let last = store.epochs().await.unwrap().last().copied();
    let last = last.expect("the restarts started epochs");
    assert_eq!(
        done_result.positions,
        [es_core::contract::position::first_of_epoch(last.epoch)]
    );
    acknowledged.push((done, done_result));
    check_epochs(&store, &acknowledged).await;
    let feed: Vec<Uuid> = store
        .read_all(ReadAll::after(0))
        .map_ok(|e| e.event_id)
        .try_collect()
        .await
        .unwrap();
    for (n, sub) in subscribers.into_iter().enumerate() {
        let seen = tokio::time::timeout(PATIENCE, sub).await.unwrap().unwrap();
        let ids: Vec<Uuid> = seen.iter().map(|e| e.event_id).collect();
        assert_eq!(
            ids.iter().copied().collect::<HashSet<_>>().len(),
            ids.len(),
            "subscriber {n} delivered an event twice"
        );
        assert_eq!(
            ids, feed,
            "subscriber {n} delivered exactly the feed, in order"
        );
    }
}

/// With the server down, operations fail fast with the transient `Unavailable`, and the same
/// handle works again once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_is_unavailable_then_recovers() {
    let dir = scratch_dir("es-redis-down");
    let mut server = RedisServer::start(&dir, &["--appendonly", "yes"]).unwrap();
    let store = RedisStore::builder(server.url())
        .prefix("down")
        .response_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let s = StreamId::parse("order-1").unwrap();
    let first = NewEvent::from_value("Placed", 1, &json!({}));
    store
        .append(AppendRequest::new(
            s.clone(),
            ExpectedVersion::NoStream,
            vec![first],
        ))
        .await
        .unwrap();
    tokio::task::block_in_place(|| server.kill9()).unwrap();
    let second = NewEvent::from_value("Paid", 1, &json!({}));
    let request = AppendRequest::new(s.clone(), ExpectedVersion::Exact(1), vec![second]);
    let err = tokio::time::timeout(PATIENCE, store.append(request.clone()))
        .await
        .expect("fails rather than hangs")
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    let err = tokio::time::timeout(PATIENCE, store.stream_version(&s))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    tokio::task::block_in_place(|| server.restart()).unwrap();
    let result = append_until_acknowledged(&store, request).await;
    assert_eq!(result.stream_version, 2);
    assert_eq!(store.stream_version(&s).await.unwrap(), 2);
}

/// Resumes a stopped server when dropped, so a failing test does not leave it stopped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        common::signal(self.0, "CONT");
    }
}

/// A server that stops answering (SIGSTOP: the process is frozen, its socket still accepts
/// bytes, so nothing but a time-out can end a call): appends, reads and the head fail as
/// `Unavailable` instead of hanging, `wait_for_append` still returns, and once the server runs
/// again the same handle works, and a retry of the append that was stuck is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_times_calls_out_instead_of_hanging() {
    let dir = scratch_dir("es-redis-stall");
    let server = RedisServer::start(&dir, &["--appendonly", "yes"]).unwrap();
    let store = RedisStore::builder(server.url())
        .prefix("stall")
        .response_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(500))
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let s = StreamId::parse("order-1").unwrap();
    let first = NewEvent::from_value("Placed", 1, &json!({}));
    store
        .append(AppendRequest::new(
            s.clone(),
            ExpectedVersion::NoStream,
            vec![first],
        ))
        .await
        .unwrap();

    let pid = server.pid().unwrap();
    common::signal(pid, "STOP");
    let resume = Resume(pid);
    let second = NewEvent::from_value("Paid", 1, &json!({}));
    let request = AppendRequest::new(s.clone(), ExpectedVersion::Exact(1), vec![second]);
    let err = tokio::time::timeout(PATIENCE, store.append(request.clone()))
        .await
        .expect("the append times out rather than hangs")
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let err = tokio::time::timeout(PATIENCE, store.head_position())
        .await
        .expect("the head read times out rather than hangs")
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let read = tokio::time::timeout(
        PATIENCE,
        store.read_all(ReadAll::after(0)).try_collect::<Vec<_>>(),
    )
    .await
    .expect("the read times out rather than hangs");
    assert!(matches!(read, Err(StoreError::Unavailable(_))), "{read:?}");
    tokio::time::timeout(PATIENCE, store.wait_for_append(1))
        .await
        .expect("waiting for appends returns after the poll interval");

    drop(resume);
    let result = append_until_acknowledged(&store, request).await;
    assert_eq!(result.stream_version, 2);
    let stored: Vec<RecordedEvent> = store
        .read_stream(&s, ReadStream::forward())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(stored.len(), 2, "the stuck append is stored once");
}

/// On Redis Cluster (here a one-node cluster owning every slot) the append script's keys span two
/// slots (the stream's and the global feed's), which Cluster refuses with `CROSSSLOT`: the store
/// reports a typed error and writes nothing, as the crate docs say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_refuses_cross_slot_appends_without_writing() {
    let dir = scratch_dir("es-redis-cluster");
    let server = RedisServer::start(
        &dir,
        &[
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--appendonly",
            "yes",
        ],
    )
    .unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLUSTER")
        .arg("ADDSLOTSRANGE")
        .arg(0)
        .arg(16383)
        .query_async(&mut conn)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut conn)
            .await
            .unwrap();
        if info.contains("cluster_state:ok") {
            break;
        }
        assert!(started.elapsed() < PATIENCE, "the cluster did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let s = StreamId::parse("order-1").unwrap();
    let r = store
        .append(AppendRequest::new(
            s.clone(),
            ExpectedVersion::Any,
            vec![NewEvent::from_value("Placed", 1, &json!({}))],
        ))
        .await;
    assert!(matches!(r, Err(StoreError::Backend(_))), "{r:?}");
    assert_eq!(store.stream_version(&s).await.unwrap(), 0);
    assert_eq!(store.head_position().await.unwrap(), 0);
}
