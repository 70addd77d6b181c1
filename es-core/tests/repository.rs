//! Repository behaviour that needs a misbehaving store: conflicts on every attempt, lost replies,
//! an unreachable store, failing snapshot writes. The store underneath is the real in-memory
//! store; the wrappers only add the failure.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use es_core::contract::StoreFuture;
use es_core::{
    Aggregate, AppendRequest, AppendResult, Apply, Decision, DomainEvent, EventStore, EventStream,
    ExpectedVersion, Metadata, NewEvent, ReadAll, ReadStream, Repository, RepositoryError,
    RetryPolicy, SnapshotPolicy, SnapshotRecord, SnapshotStore, StoreError, StreamId,
};
use es_memory::InMemoryStore;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Added {
    n: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Bonus {
    n: u64,
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(apply(Counter))]
enum CounterEvent {
    Added(Added),
    Bonus(Bonus),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Counter {
    total: u64,
    bonuses: u64,
}

impl Apply<Added> for Counter {
    fn apply(&mut self, e: &Added) {
        self.total += e.n;
    }
}

impl Apply<Bonus> for Counter {
    fn apply(&mut self, e: &Bonus) {
        self.total += e.n;
        self.bonuses += 1;
    }
}

#[derive(Debug, thiserror::Error)]
#[error("zero is not allowed")]
struct Zero;

impl Aggregate for Counter {
    const CATEGORY: &'static str = "counter";
    type Command = u64;
    type Event = CounterEvent;
    type Error = Zero;

    /// Adds `n`; every time the total crosses a multiple of 100, a bonus of 1 follows. The bonus
    /// decision sees the effect of the first event through `Decision`.
    fn handle(&self, n: &u64) -> Result<Vec<CounterEvent>, Zero> {
        if *n == 0 {
            return Err(Zero);
        }
        let mut decision = Decision::new(self);
        let before = decision.state().total;
        decision.emit(Added { n: *n });
        if decision.state().total / 100 > before / 100 {
            decision.emit(Bonus { n: 1 });
        }
        Ok(decision.into_events())
    }
}

/// Failure injection around the in-memory store.
#[derive(Clone, Default)]
struct Faulty {
    inner: InMemoryStore,
    /// Appends a foreign event to the target stream before each append.
    interfere: bool,
    /// Appends succeed but the first `lose_replies` replies are "lost" (Unavailable).
    lose_replies: Arc<AtomicU32>,
    /// Every append fails as unreachable, without writing.
    down: bool,
    /// Snapshot writes fail.
    snapshots_fail: bool,
    /// Each append takes this long before it reaches the store.
    delay: Duration,
    appends: Arc<AtomicU32>,
}

impl EventStore for Faulty {
    fn append(&self, request: AppendRequest) -> impl StoreFuture<AppendResult> {
        let this = self.clone();
        async move {
            this.appends.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(this.delay).await;
            if this.down {
                return Err(StoreError::unavailable("connection refused"));
            }
            if this.interfere {
                let foreign = NewEvent::new("Added", 1, r#"{"n":1}"#).unwrap();
                let sneak = AppendRequest::new(
                    request.stream_id.clone(),
                    ExpectedVersion::Any,
                    vec![foreign],
                );
                this.inner.append(sneak).await?;
            }
            let result = this.inner.append(request).await?;
            let lost = this
                .lose_replies
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if lost {
                return Err(StoreError::unavailable("connection reset after commit"));
            }
            Ok(result)
        }
    }
    fn append_streams(&self, requests: Vec<AppendRequest>) -> impl StoreFuture<Vec<AppendResult>> {
        let this = self.clone();
        async move {
            this.appends.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(this.delay).await;
            if this.down {
                return Err(StoreError::unavailable("connection refused"));
            }
            if this.interfere {
                // A foreign event on the last part's stream before each call.
                let foreign = NewEvent::new("Added", 1, r#"{"n":1}"#).unwrap();
                let last = requests.last().map(|r| r.stream_id.clone()).unwrap();
                let sneak = AppendRequest::new(last, ExpectedVersion::Any, vec![foreign]);
                this.inner.append(sneak).await?;
            }
            let result = this.inner.append_streams(requests).await?;
            let lost = this
                .lose_replies
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if lost {
                return Err(StoreError::unavailable("connection reset after commit"));
            }
            Ok(result)
        }
    }
    fn archive_stream(
        &self,
        stream: &StreamId,
        before: u64,
    ) -> impl StoreFuture<es_core::Archived> {
        self.inner.archive_stream(stream, before)
    }
    fn stream_version(&self, stream: &StreamId) -> impl StoreFuture<u64> {
        self.inner.stream_version(stream)
    }
    fn list_streams(&self, list: es_core::ListStreams) -> impl StoreFuture<es_core::StreamPage> {
        self.inner.list_streams(list)
    }
    fn read_stream(&self, stream: &StreamId, read: ReadStream) -> EventStream {
        self.inner.read_stream(stream, read)
    }
    fn read_all(&self, read: ReadAll) -> EventStream {
        self.inner.read_all(read)
    }
    fn partition_head(&self, partition: u32) -> impl StoreFuture<u64> {
        self.inner.partition_head(partition)
    }
    fn wait_for_partition(&self, partition: u32, after: u64) -> impl Future<Output = ()> + Send {
        self.inner.wait_for_partition(partition, after)
    }
}

impl SnapshotStore for Faulty {
    fn load_snapshot(&self, stream: &StreamId) -> impl StoreFuture<Option<SnapshotRecord>> {
        self.inner.load_snapshot(stream)
    }
    fn save_snapshot(&self, snapshot: SnapshotRecord) -> impl StoreFuture<bool> {
        let this = self.clone();
        async move {
            if this.snapshots_fail {
                return Err(StoreError::unavailable("snapshot table locked"));
            }
            this.inner.save_snapshot(snapshot).await
        }
    }
    fn delete_snapshot(&self, stream: &StreamId, version: u64) -> impl StoreFuture<bool> {
        self.inner.delete_snapshot(stream, version)
    }
}

fn retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        max_transient_attempts: 4,
        backoff: es_core::Backoff::new(Duration::from_millis(1), Duration::from_millis(10)),
    }
}

#[tokio::test]
async fn decisions_see_earlier_events_of_the_same_command() {
    let repo = Repository::new(InMemoryStore::new());
    repo.execute::<Counter>("c", &90).await.unwrap();
    let done = repo.execute::<Counter>("c", &20).await.unwrap();
    assert_eq!(
        done.events,
        vec![
            CounterEvent::Added(Added { n: 20 }),
            CounterEvent::Bonus(Bonus { n: 1 })
        ]
    );
    assert_eq!(
        done.aggregate,
        Counter {
            total: 111,
            bonuses: 1
        }
    );
    assert_eq!(done.version, 3);
}

#[tokio::test]
async fn conflicts_are_retried_then_reported_with_versions() {
    let store = Faulty {
        interfere: true,
        ..Faulty::default()
    };
    let repo = Repository::builder(store.clone())
        .retry_policy(retry(3))
        .build()
        .unwrap();
    match repo.execute::<Counter>("x", &5).await {
        Err(RepositoryError::Conflict {
            stream_id: stream,
            expected,
            actual,
            attempts,
        }) => {
            assert_eq!(stream.as_str(), "counter-x");
            assert_eq!(attempts, 3);
            assert_eq!(expected, 2, "the last attempt was decided at version 2");
            assert_eq!(actual, 3);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(store.appends.load(Ordering::SeqCst), 3);
    // Only the interfering events were stored.
    assert_eq!(
        store
            .stream_version(&StreamId::parse("counter-x").unwrap())
            .await
            .unwrap(),
        3
    );
}

#[tokio::test]
async fn a_lost_reply_is_resent_and_stored_once() {
    let store = Faulty {
        lose_replies: Arc::new(AtomicU32::new(2)),
        ..Faulty::default()
    };
    let repo = Repository::builder(store.clone())
        .retry_policy(retry(1))
        .build()
        .unwrap();
    let done = repo.execute::<Counter>("y", &7).await.unwrap();
    assert_eq!(done.version, 1);
    assert_eq!(store.appends.load(Ordering::SeqCst), 3, "sent three times");
    let stream = StreamId::parse("counter-y").unwrap();
    let stored: Vec<_> = store
        .read_stream(&stream, ReadStream::forward())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(stored.len(), 1, "the batch is stored exactly once");
    assert_eq!(stored[0].event_id, done.event_ids[0]);
}

#[tokio::test]
async fn an_unreachable_store_is_a_store_error_after_retries() {
    let store = Faulty {
        down: true,
        ..Faulty::default()
    };
    let repo = Repository::builder(store.clone())
        .retry_policy(retry(5))
        .build()
        .unwrap();
    match repo.execute::<Counter>("z", &1).await {
        Err(RepositoryError::Store {
            stream_id: stream,
            version: 0,
            source,
        }) => {
            assert_eq!(stream.as_str(), "counter-z");
            assert!(source.is_transient());
        }
        other => panic!("expected a store error, got {other:?}"),
    }
    assert_eq!(
        store.appends.load(Ordering::SeqCst),
        4,
        "max_transient_attempts"
    );
}

#[tokio::test]
async fn a_failing_snapshot_write_does_not_fail_the_command() {
    let store = Faulty {
        snapshots_fail: true,
        ..Faulty::default()
    };
    let repo = Repository::builder(store)
        .snapshot_policy::<Counter>(SnapshotPolicy::EveryNEvents(1))
        .build()
        .unwrap();
    let done = repo.execute::<Counter>("s", &3).await.unwrap();
    assert!(!done.snapshot_saved);
    assert_eq!(repo.load::<Counter>("s").await.unwrap().aggregate.total, 3);
}

#[tokio::test]
async fn custom_snapshot_policies_see_the_versions() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let repo = Repository::builder(InMemoryStore::new())
        .snapshot_policy::<Counter>(SnapshotPolicy::Custom(Arc::new(move |ctx| {
            log.lock().unwrap().push((
                ctx.previous_version,
                ctx.version,
                ctx.last_snapshot_version,
            ));
            ctx.version >= 3
        })))
        .build()
        .unwrap();
    for n in [1, 2, 3, 4] {
        repo.execute::<Counter>("p", &n).await.unwrap();
    }
    let loaded = repo.load::<Counter>("p").await.unwrap();
    assert_eq!(loaded.snapshot_version, Some(4));
    assert_eq!(loaded.events_read, 0);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(0, 1, None), (1, 2, None), (2, 3, None), (3, 4, Some(3))]
    );
    let (version, written) = repo.snapshot::<Counter>("p").await.unwrap();
    assert_eq!(
        (version, written),
        (4, false),
        "an equal snapshot is not rewritten"
    );
}

#[test]
fn an_invalid_upcaster_chain_fails_the_build() {
    let err = Repository::builder(InMemoryStore::new())
        .upcaster::<Counter>(es_core::upcast::map("Added", 1, Ok))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("counter"), "{err}");
}

#[test]
fn the_event_enum_knows_its_types() {
    assert_eq!(CounterEvent::from(Added { n: 1 }).event_type(), "Added");
}

/// 16 callers send 10 commands each to one aggregate while every append takes 5 ms: no command
/// conflicts with another of the same repository, the commands share appends, and the result is
/// what the commands one after another would give.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_to_one_aggregate_share_appends_and_never_conflict() {
    let store = Faulty {
        delay: Duration::from_millis(5),
        ..Faulty::default()
    };
    let repo = Repository::new(store.clone());
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let repo = repo.clone();
            tokio::spawn(async move {
                let mut versions = Vec::new();
                for _ in 0..10 {
                    let done = repo.execute::<Counter>("hot", &1).await.unwrap();
                    assert_eq!(done.attempts, 1, "no conflict within one repository");
                    versions.push(done.version);
                }
                versions
            })
        })
        .collect();
    let mut versions = Vec::new();
    for task in tasks {
        let mine = task.await.unwrap();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "{mine:?}");
        versions.extend(mine);
    }
    let appends = store.appends.load(Ordering::SeqCst);
    assert!(appends <= 40, "160 commands took {appends} appends");
    let loaded = repo.load::<Counter>("hot").await.unwrap();
    // 160 additions and the bonus for crossing 100.
    assert_eq!((loaded.aggregate.total, loaded.aggregate.bonuses), (161, 1));
    assert_eq!(loaded.version, 161);
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(versions.len(), 160, "each command has its own version");
}

/// The aggregates kept in memory stay within the capacity; commands on evicted ones load them
/// again and give the same results as a repository that keeps none.
#[tokio::test]
async fn the_cache_is_bounded_and_changes_no_result() {
    let cached_store = InMemoryStore::new();
    let plain_store = InMemoryStore::new();
    let cached = Repository::builder(cached_store)
        .cache_capacity(3)
        .build()
        .unwrap();
    let plain = Repository::builder(plain_store)
        .cache_capacity(0)
        .build()
        .unwrap();
    for round in 0..5u64 {
        for id in 0..20u64 {
            let n = (id * 7 + round * 13) % 60;
            let a = cached.execute::<Counter>(&format!("c{id}"), &n).await;
            let b = plain.execute::<Counter>(&format!("c{id}"), &n).await;
            match (a, b) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(
                        (a.version, &a.aggregate, &a.events),
                        (b.version, &b.aggregate, &b.events)
                    );
                }
                (
                    Err(RepositoryError::Domain { version: va, .. }),
                    Err(RepositoryError::Domain { version: vb, .. }),
                ) => {
                    assert_eq!(va, vb);
                }
                (a, b) => panic!("different outcomes: {a:?} and {b:?}"),
            }
            assert!(
                cached.aggregates_in_memory() <= 3,
                "{}",
                cached.aggregates_in_memory()
            );
            assert_eq!(plain.aggregates_in_memory(), 0);
        }
    }
}

/// A reply lost after the store wrote a shared append: the same batch is sent again, the store
/// recognizes it, and every command of the batch succeeds once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_reply_to_a_shared_append_applies_every_command_once() {
    let store = Faulty {
        delay: Duration::from_millis(5),
        lose_replies: Arc::new(AtomicU32::new(3)),
        ..Faulty::default()
    };
    let repo = Repository::new(store.clone());
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let repo = repo.clone();
            tokio::spawn(async move { repo.execute::<Counter>("lossy", &2).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().expect("every command succeeds");
    }
    let loaded = repo
        .load_without_snapshot::<Counter>("lossy")
        .await
        .unwrap();
    assert_eq!((loaded.aggregate.total, loaded.version), (24, 12));
}

/// A move of `n` between two counters: `n` added to each (the second's events through its own
/// `handle`), or the counter's refusal of zero.
fn move_both(
    n: u64,
) -> impl Fn(&Counter, &Counter) -> Result<(Vec<CounterEvent>, Vec<CounterEvent>), Zero> {
    move |first, second| Ok((first.handle(&n)?, second.handle(&n)?))
}

#[tokio::test]
async fn execute_two_appends_both_streams_or_neither() {
    let store = Faulty::default();
    let repo = Repository::new(store.clone());
    let meta = Metadata::new();
    let done = repo
        .execute_two::<Counter, Counter, Zero>("a", "b", &meta, move_both(150))
        .await
        .unwrap();
    assert_eq!(done.first.version, 2, "Added and Bonus");
    assert_eq!(done.second.version, 2);
    assert_eq!(done.first.aggregate.total, 151);
    assert_eq!(done.first.attempts, 1);
    assert_eq!(done.second.positions.len(), 2);
    assert_eq!(store.appends.load(Ordering::SeqCst), 1, "one call for both");
    match repo
        .execute_two::<Counter, Counter, Zero>("a", "b", &meta, move_both(0))
        .await
    {
        Err(RepositoryError::Domain {
            stream_id, version, ..
        }) => {
            assert_eq!(stream_id.as_str(), "counter-a");
            assert_eq!(version, 2);
        }
        other => panic!("expected the decision's error, got {other:?}"),
    }
    assert_eq!(
        store.appends.load(Ordering::SeqCst),
        1,
        "a refusal appends nothing"
    );
    match repo
        .execute_two::<Counter, Counter, Zero>("a", "a", &meta, move_both(1))
        .await
    {
        Err(RepositoryError::Store {
            source: StoreError::InvalidRequest { .. },
            ..
        }) => {}
        other => panic!("expected a refusal of one stream twice, got {other:?}"),
    }
}

#[tokio::test]
async fn execute_two_retries_conflicts_then_names_the_stream() {
    // Before each call a foreign event lands on the second stream.
    let store = Faulty {
        interfere: true,
        ..Faulty::default()
    };
    let repo = Repository::builder(store.clone())
        .retry_policy(retry(3))
        .build()
        .unwrap();
    match repo
        .execute_two::<Counter, Counter, Zero>("c", "d", &Metadata::new(), move_both(5))
        .await
    {
        Err(RepositoryError::Conflict {
            stream_id,
            expected,
            actual,
            attempts,
        }) => {
            assert_eq!(stream_id.as_str(), "counter-d");
            assert_eq!(attempts, 3);
            assert_eq!(expected, 2, "the last attempt was decided at version 2");
            assert_eq!(actual, 3);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let c = StreamId::parse("counter-c").unwrap();
    assert_eq!(
        store.stream_version(&c).await.unwrap(),
        0,
        "nothing was written to the first stream"
    );
}

#[tokio::test]
async fn execute_two_resends_the_same_call_after_a_lost_reply() {
    let store = Faulty {
        lose_replies: Arc::new(AtomicU32::new(2)),
        ..Faulty::default()
    };
    let repo = Repository::builder(store.clone())
        .retry_policy(retry(1))
        .build()
        .unwrap();
    let done = repo
        .execute_two::<Counter, Counter, Zero>("e", "f", &Metadata::new(), move_both(7))
        .await
        .unwrap();
    assert_eq!(store.appends.load(Ordering::SeqCst), 3, "sent three times");
    assert_eq!((done.first.version, done.second.version), (1, 1));
    for (id, executed_ids) in [
        ("counter-e", &done.first.event_ids),
        ("counter-f", &done.second.event_ids),
    ] {
        let stored: Vec<_> = store
            .read_stream(&StreamId::parse(id).unwrap(), ReadStream::forward())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(stored.len(), 1, "{id}: stored exactly once");
        assert_eq!(stored[0].event_id, executed_ids[0]);
    }
}

#[tokio::test]
async fn a_command_after_execute_two_decides_on_the_new_state() {
    let store = Faulty::default();
    let repo = Repository::new(store.clone());
    repo.execute::<Counter>("g", &10).await.unwrap();
    repo.execute_two::<Counter, Counter, Zero>("g", "h", &Metadata::new(), move_both(20))
        .await
        .unwrap();
    // The repository kept `g` at version 1 in memory: execute_two forgot it, so this command
    // loads version 2 and appends without a conflict.
    let done = repo.execute::<Counter>("g", &5).await.unwrap();
    assert_eq!(done.attempts, 1, "no conflict with a stale state");
    assert_eq!(done.aggregate.total, 35);
    assert_eq!(done.version, 3);
}
