//! The backend conformance suite: the contract of `es_core::contract` as executable cases.
//!
//! Each case is a `pub async fn(store)` that takes a fresh, empty store and panics on a
//! violation. Backends run them all through [`conformance_tests!`](crate::conformance_tests),
//! which stamps one named `#[tokio::test]` per case onto a factory:
//!
//! ```no_run
//! es_testkit::conformance_tests!(|| async { es_memory::InMemoryStore::new() });
//! ```
//!
//! Every `pub async fn` of this module is a case (the build script lists them); helpers are
//! private. The suite only uses the public traits, so it holds a backend to exactly what users
//! can observe.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use uuid::Uuid;

use es_core::{
    upcast, AppendLimits, AppendRequest, AppendResult, AsOf, EventFilter, ExpectedVersion,
    ListStreams, Metadata, NewEvent, ReadAll, ReadStream, RecordedEvent, Repository,
    RepositoryError, RetryPolicy, SnapshotPolicy, SnapshotRecord, Store, StoreError, StreamId,
};

use crate::domain::{Credited, Ledger, LedgerCommand, LedgerError, LedgerEvent};
use crate::support::{check_feed, in_feed_order, poll_until_done, tail_until_done};

/// How long any single wait in the suite may take before the case fails.
const PATIENCE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Helpers

fn stream(name: &str) -> StreamId {
    StreamId::parse(name).expect("test stream ids are valid")
}

fn event(event_type: &str, n: u64) -> NewEvent {
    NewEvent::from_value(event_type, 1, &json!({ "n": n }))
}

fn events(event_type: &str, range: std::ops::Range<u64>) -> Vec<NewEvent> {
    range.map(|n| event(event_type, n)).collect()
}

fn n_of(event: &RecordedEvent) -> u64 {
    event.payload_json().expect("payload is JSON")["n"]
        .as_u64()
        .expect("payload has n")
}

async fn append<S: Store>(
    store: &S,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> Result<AppendResult, StoreError> {
    store
        .append(AppendRequest::new(stream.clone(), expected, events))
        .await
}

async fn read<S: Store>(store: &S, stream: &StreamId, read: ReadStream) -> Vec<RecordedEvent> {
    store
        .read_stream(stream, read)
        .try_collect()
        .await
        .expect("read_stream succeeds")
}

async fn read_all<S: Store>(store: &S, read: ReadAll) -> Vec<RecordedEvent> {
    store
        .read_all(read)
        .try_collect()
        .await
        .expect("read_all succeeds")
}

// The feed, whatever the store's partitioning: a store with one partition is read with the
// single-feed calls (`head_position`, `read_all` naming no partition, `subscribe`), so those stay
// covered; a store with several is read partition by partition, and every check that the
// contract makes of "the feed" is made of each partition's feed.

/// The feeds to check: the single feed (`None`) or each partition.
fn feeds<S: Store>(store: &S) -> Vec<Option<u32>> {
    let partitioning = store.partitioning();
    if partitioning.is_single() {
        vec![None]
    } else {
        partitioning.partitions().map(Some).collect()
    }
}

/// The feed `stream`'s events are in.
fn feed_of<S: Store>(store: &S, stream: &StreamId) -> Option<u32> {
    let partitioning = store.partitioning();
    (!partitioning.is_single()).then(|| partitioning.partition_of(stream))
}

/// `read` addressed to `feed`.
fn in_feed(read: ReadAll, feed: Option<u32>) -> ReadAll {
    match feed {
        Some(partition) => read.partition(partition),
        None => read,
    }
}

/// The head of `feed`.
async fn head_of<S: Store>(store: &S, feed: Option<u32>) -> u64 {
    match feed {
        Some(partition) => store.partition_head(partition).await,
        None => store.head_position().await,
    }
    .expect("the head reads")
}

/// The head of every feed.
async fn heads<S: Store>(store: &S) -> Vec<u64> {
    let mut heads = Vec::new();
    for feed in feeds(store) {
        heads.push(head_of(store, feed).await);
    }
    heads
}

/// Every event after `heads` (as [`heads`] returned them), all feeds.
async fn read_after<S: Store>(store: &S, heads: &[u64]) -> Vec<RecordedEvent> {
    let mut events = Vec::new();
    for (feed, head) in feeds(store).into_iter().zip(heads) {
        events.extend(read_all(store, in_feed(ReadAll::after(*head), feed)).await);
    }
    events
}

/// Every feed's events that `read` selects, feed after feed.
async fn read_feeds<S: Store>(store: &S, read: ReadAll) -> Vec<RecordedEvent> {
    let mut events = Vec::new();
    for feed in feeds(store) {
        events.extend(read_all(store, in_feed(read.clone(), feed)).await);
    }
    events
}

/// Follows the feed of `stream` from `after`.
fn follow<S: Store>(
    store: &S,
    stream: &StreamId,
    after: u64,
    filter: EventFilter,
) -> es_core::EventStream {
    match feed_of(store, stream) {
        Some(partition) => store.subscribe_partition(partition, after, filter),
        None => store.subscribe(after, filter),
    }
}

#[track_caller]
fn assert_feed_empty(heads: &[u64]) {
    assert!(
        heads.iter().all(|&h| h == 0),
        "the feed is empty: {heads:?}"
    );
}

fn versions(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.stream_version).collect()
}

#[track_caller]
fn assert_conflict(
    result: Result<AppendResult, StoreError>,
    on: &StreamId,
    expected: ExpectedVersion,
    actual: u64,
) {
    match result {
        Err(StoreError::Conflict {
            stream_id: stream,
            expected: e,
            actual: a,
        }) => {
            assert_eq!(&stream, on, "conflict names the stream");
            assert_eq!(e, expected, "conflict reports the expected version");
            assert_eq!(a, actual, "conflict reports the actual version");
        }
        other => panic!("expected a conflict at version {actual}, got {other:?}"),
    }
}

async fn patiently<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {PATIENCE:?}: {what}"))
}

fn repository<S: Store>(store: &S, policy: SnapshotPolicy) -> Repository<S> {
    Repository::builder(store.clone())
        .snapshot_policy::<Ledger>(policy)
        .upcaster::<Ledger>(upcast::map("Credited", 1, |mut payload| {
            payload["currency"] = json!("EUR");
            Ok(payload)
        }))
        .retry_policy(RetryPolicy {
            max_attempts: 1000,
            max_transient_attempts: 5,
            backoff: es_core::Backoff::new(Duration::from_micros(100), Duration::from_millis(5)),
        })
        .build()
        .expect("valid upcaster chain")
}

async fn run<S: Store>(repo: &Repository<S>, id: &str, command: LedgerCommand) -> u64 {
    repo.execute::<Ledger>(id, &command)
        .await
        .unwrap_or_else(|e| panic!("{command:?} on {id} failed: {e}"))
        .version
}

// ---------------------------------------------------------------------------------------------
// Appends and expected versions

/// Versions start at 1 and count up; positions increase strictly.
pub async fn append_assigns_versions_and_positions<S: Store>(store: S) {
    let s = stream("order-1");
    let first = append(
        &store,
        &s,
        ExpectedVersion::NoStream,
        events("Placed", 0..3),
    )
    .await
    .unwrap();
    assert_eq!(first.stream_version, 3);
    assert_eq!(first.first_version(), Some(1));
    assert_eq!(first.positions.len(), 3);
    assert!(first.positions.windows(2).all(|w| w[0] < w[1]));
    assert!(!first.duplicate);
    assert_eq!(store.stream_version(&s).await.unwrap(), 3);

    let second = append(
        &store,
        &s,
        ExpectedVersion::Exact(3),
        events("Placed", 3..5),
    )
    .await
    .unwrap();
    assert_eq!(second.stream_version, 5);
    assert_eq!(second.first_version(), Some(4));
    assert!(second.positions[0] > first.positions[2]);

    let stored = read(&store, &s, ReadStream::forward()).await;
    assert_eq!(versions(&stored), vec![1, 2, 3, 4, 5]);
    let positions: Vec<u64> = stored.iter().map(|e| e.global_position).collect();
    let returned: Vec<u64> = first
        .positions
        .iter()
        .chain(&second.positions)
        .copied()
        .collect();
    assert_eq!(
        positions, returned,
        "reads report the positions the append returned"
    );
}

/// `Any` appends whatever the version.
pub async fn expected_version_any<S: Store>(store: S) {
    let s = stream("order-any");
    let r = append(&store, &s, ExpectedVersion::Any, vec![event("A", 1)])
        .await
        .unwrap();
    assert_eq!(r.stream_version, 1);
    let r = append(&store, &s, ExpectedVersion::Any, events("A", 2..4))
        .await
        .unwrap();
    assert_eq!(r.stream_version, 3);
}

/// `NoStream` (and `Exact(0)`) only succeed on a stream with no events.
pub async fn expected_version_no_stream<S: Store>(store: S) {
    let s = stream("order-new");
    append(&store, &s, ExpectedVersion::NoStream, vec![event("A", 1)])
        .await
        .unwrap();
    let again = append(&store, &s, ExpectedVersion::NoStream, vec![event("A", 2)]).await;
    assert_conflict(again, &s, ExpectedVersion::NoStream, 1);

    let t = stream("order-zero");
    append(&store, &t, ExpectedVersion::Exact(0), vec![event("A", 1)])
        .await
        .unwrap();
    let again = append(&store, &t, ExpectedVersion::Exact(0), vec![event("A", 2)]).await;
    assert_conflict(again, &t, ExpectedVersion::Exact(0), 1);
}

/// `StreamExists` fails on a stream with no events and succeeds on one with events.
pub async fn expected_version_stream_exists<S: Store>(store: S) {
    let s = stream("order-exists");
    let missing = append(
        &store,
        &s,
        ExpectedVersion::StreamExists,
        vec![event("A", 1)],
    )
    .await;
    assert_conflict(missing, &s, ExpectedVersion::StreamExists, 0);
    assert_eq!(store.stream_version(&s).await.unwrap(), 0);
    append(&store, &s, ExpectedVersion::NoStream, vec![event("A", 1)])
        .await
        .unwrap();
    let r = append(
        &store,
        &s,
        ExpectedVersion::StreamExists,
        vec![event("A", 2)],
    )
    .await
    .unwrap();
    assert_eq!(r.stream_version, 2);
}

/// `Exact(v)` succeeds only at version `v` and reports the actual version otherwise.
pub async fn expected_version_exact<S: Store>(store: S) {
    let s = stream("order-exact");
    let ahead = append(&store, &s, ExpectedVersion::Exact(1), vec![event("A", 0)]).await;
    assert_conflict(ahead, &s, ExpectedVersion::Exact(1), 0);
    append(&store, &s, ExpectedVersion::Exact(0), events("A", 0..2))
        .await
        .unwrap();
    let stale = append(&store, &s, ExpectedVersion::Exact(1), vec![event("A", 9)]).await;
    assert_conflict(stale, &s, ExpectedVersion::Exact(1), 2);
    let ahead = append(&store, &s, ExpectedVersion::Exact(5), vec![event("A", 9)]).await;
    assert_conflict(ahead, &s, ExpectedVersion::Exact(5), 2);
    let r = append(&store, &s, ExpectedVersion::Exact(2), vec![event("A", 2)])
        .await
        .unwrap();
    assert_eq!(r.stream_version, 3);
}

/// A rejected append leaves no trace: the stream, the feed and the event ids are untouched.
pub async fn conflict_writes_nothing<S: Store>(store: S) {
    let s = stream("order-c");
    append(&store, &s, ExpectedVersion::NoStream, events("A", 0..2))
        .await
        .unwrap();
    let head = heads(&store).await;
    let rejected = events("B", 0..3);
    let result = append(&store, &s, ExpectedVersion::Exact(1), rejected.clone()).await;
    assert_conflict(result, &s, ExpectedVersion::Exact(1), 2);
    assert_eq!(store.stream_version(&s).await.unwrap(), 2);
    assert_eq!(heads(&store).await, head);
    assert_eq!(read(&store, &s, ReadStream::forward()).await.len(), 2);
    assert_eq!(read_after(&store, &head).await.len(), 0);
    // The ids of the rejected batch were not consumed.
    let r = append(&store, &s, ExpectedVersion::Exact(2), rejected)
        .await
        .unwrap();
    assert!(!r.duplicate);
    assert_eq!(r.stream_version, 5);
}

/// An empty append checks the expected version and writes nothing.
pub async fn empty_append_checks_version_only<S: Store>(store: S) {
    let s = stream("order-e");
    let r = append(&store, &s, ExpectedVersion::NoStream, Vec::new())
        .await
        .unwrap();
    assert_eq!(r.stream_version, 0);
    assert!(r.positions.is_empty());
    append(&store, &s, ExpectedVersion::NoStream, events("A", 0..2))
        .await
        .unwrap();
    let r = append(&store, &s, ExpectedVersion::Exact(2), Vec::new())
        .await
        .unwrap();
    assert_eq!(r.stream_version, 2);
    let wrong = append(&store, &s, ExpectedVersion::Exact(1), Vec::new()).await;
    assert_conflict(wrong, &s, ExpectedVersion::Exact(1), 2);
    assert_eq!(store.stream_version(&s).await.unwrap(), 2);
}

/// Re-sending a stored batch returns the original result and writes nothing.
pub async fn idempotent_retry_returns_original_result<S: Store>(store: S) {
    let s = stream("order-idem");
    let batch = events("A", 0..3);
    let original = append(&store, &s, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    let head = heads(&store).await;
    for expected in [
        ExpectedVersion::NoStream,
        ExpectedVersion::Any,
        ExpectedVersion::Exact(0),
    ] {
        let retry = append(&store, &s, expected, batch.clone()).await.unwrap();
        assert!(retry.duplicate, "a retry is reported as a duplicate");
        assert_eq!(retry.stream_version, original.stream_version);
        assert_eq!(retry.positions, original.positions);
    }
    assert_eq!(heads(&store).await, head);
    assert_eq!(read(&store, &s, ReadStream::forward()).await.len(), 3);
}

/// A retry of an earlier batch still returns that batch's result after later appends.
pub async fn idempotent_retry_after_later_appends<S: Store>(store: S) {
    let s = stream("order-idem2");
    let first = vec![event("A", 0)];
    let r1 = append(&store, &s, ExpectedVersion::NoStream, first.clone())
        .await
        .unwrap();
    append(&store, &s, ExpectedVersion::Exact(1), events("A", 1..3))
        .await
        .unwrap();
    let retry = append(&store, &s, ExpectedVersion::NoStream, first)
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.stream_version, 1);
    assert_eq!(retry.positions, r1.positions);
    assert_eq!(store.stream_version(&s).await.unwrap(), 3);
}

/// A batch that partly overlaps stored events is rejected and writes nothing.
pub async fn partial_overlap_is_rejected<S: Store>(store: S) {
    let s = stream("order-overlap");
    let first = event("A", 0);
    let second = event("A", 1);
    let third = event("A", 2);
    append(
        &store,
        &s,
        ExpectedVersion::NoStream,
        vec![first.clone(), second.clone()],
    )
    .await
    .unwrap();
    let head = heads(&store).await;
    let overlap = append(
        &store,
        &s,
        ExpectedVersion::Exact(2),
        vec![second.clone(), third.clone()],
    )
    .await;
    match overlap {
        Err(StoreError::DuplicateEvent {
            stream_id: on,
            event_id,
            ..
        }) => {
            assert_eq!(on, s);
            assert_eq!(event_id, second.event_id);
        }
        other => panic!("expected DuplicateEvent, got {other:?}"),
    }
    // Stored events in another order are not a retry either.
    let reordered = append(
        &store,
        &s,
        ExpectedVersion::Any,
        vec![second.clone(), first.clone()],
    )
    .await;
    assert!(
        matches!(reordered, Err(StoreError::DuplicateEvent { .. })),
        "{reordered:?}"
    );
    assert_eq!(heads(&store).await, head);
    assert_eq!(store.stream_version(&s).await.unwrap(), 2);
    let r = append(&store, &s, ExpectedVersion::Exact(2), vec![third])
        .await
        .unwrap();
    assert_eq!(
        r.stream_version, 3,
        "the new event of the rejected batch was not stored"
    );
}

/// An event id stored in one stream cannot be appended to another.
pub async fn event_id_of_other_stream_is_rejected<S: Store>(store: S) {
    let s1 = stream("order-a");
    let s2 = stream("order-b");
    let e = event("A", 0);
    append(&store, &s1, ExpectedVersion::NoStream, vec![e.clone()])
        .await
        .unwrap();
    let r = append(&store, &s2, ExpectedVersion::Any, vec![e.clone()]).await;
    match r {
        Err(StoreError::DuplicateEvent {
            stream_id: on,
            event_id,
            ..
        }) => {
            assert_eq!(on, s2);
            assert_eq!(event_id, e.event_id);
        }
        other => panic!("expected DuplicateEvent, got {other:?}"),
    }
    assert_eq!(store.stream_version(&s2).await.unwrap(), 0);
}

/// A batch naming one event id twice is malformed.
pub async fn duplicate_ids_in_one_batch_are_rejected<S: Store>(store: S) {
    let s = stream("order-dup");
    let e = event("A", 0);
    let r = append(&store, &s, ExpectedVersion::Any, vec![e.clone(), e]).await;
    assert!(matches!(r, Err(StoreError::InvalidRequest { .. })), "{r:?}");
    assert_eq!(store.stream_version(&s).await.unwrap(), 0);
    assert_feed_empty(&heads(&store).await);
}

/// Empty, overlong and control-character event types are malformed, whatever the store.
pub async fn invalid_event_types_are_rejected<S: Store>(store: S) {
    let s = stream("order-types");
    let long = "T".repeat(257);
    for bad in ["", "Nul\0Type", "Line\nBreak", long.as_str()] {
        let r = append(&store, &s, ExpectedVersion::Any, vec![event(bad, 0)]).await;
        assert!(
            matches!(r, Err(StoreError::InvalidRequest { .. })),
            "{bad:?}: {r:?}"
        );
    }
    assert_feed_empty(&heads(&store).await);
    let fine = "bank.account.opened-v2_x";
    append(&store, &s, ExpectedVersion::Any, vec![event(fine, 0)])
        .await
        .unwrap();
    assert_eq!(
        read(&store, &s, ReadStream::forward()).await[0].event_type,
        fine
    );
}

/// A batch whose last event is invalid stores none of its events.
pub async fn batch_is_atomic<S: Store>(store: S) {
    let s = stream("order-atomic");
    let limit = AppendLimits::default().max_payload_bytes;
    let mut batch = events("A", 0..4);
    let big = format!("\"{}\"", "x".repeat(limit));
    batch.push(NewEvent::new("A", 1, big).unwrap());
    let r = append(&store, &s, ExpectedVersion::Any, batch).await;
    assert!(
        matches!(r, Err(StoreError::PayloadTooLarge { .. })),
        "{r:?}"
    );
    assert_eq!(store.stream_version(&s).await.unwrap(), 0);
    assert_feed_empty(&heads(&store).await);
    assert!(read(&store, &s, ReadStream::forward()).await.is_empty());

    // A conflict part-way into a sequence of appends leaves earlier appends intact and adds
    // nothing of its own.
    append(&store, &s, ExpectedVersion::NoStream, events("A", 0..2))
        .await
        .unwrap();
    let r = append(&store, &s, ExpectedVersion::NoStream, events("A", 2..50)).await;
    assert_conflict(r, &s, ExpectedVersion::NoStream, 2);
    assert_eq!(read(&store, &s, ReadStream::forward()).await.len(), 2);
}

/// A payload over the limit is a typed error naming the event.
pub async fn oversized_payload_is_rejected<S: Store>(store: S) {
    let s = stream("order-big");
    let limit = AppendLimits::default().max_payload_bytes;
    let big = NewEvent::new("A", 1, format!("\"{}\"", "y".repeat(limit))).unwrap();
    let id = big.event_id;
    match append(&store, &s, ExpectedVersion::Any, vec![big]).await {
        Err(StoreError::PayloadTooLarge {
            stream_id: on,
            event_id,
            size,
            limit: l,
        }) => {
            assert_eq!(on, s);
            assert_eq!(event_id, id);
            assert_eq!(size, limit + 2);
            assert_eq!(l, limit);
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    // Just under the limit is fine.
    let fits = NewEvent::new("A", 1, format!("\"{}\"", "z".repeat(limit - 2))).unwrap();
    append(&store, &s, ExpectedVersion::Any, vec![fits])
        .await
        .unwrap();
    let stored = read(&store, &s, ReadStream::forward()).await;
    assert_eq!(
        stored[0].payload_json().unwrap().as_str().map(str::len),
        Some(limit - 2)
    );
}

// ---------------------------------------------------------------------------------------------
// Reads

/// Forward reads honour the start version and the limit.
pub async fn read_stream_forward<S: Store>(store: S) {
    let s = stream("order-f");
    append(&store, &s, ExpectedVersion::NoStream, events("A", 1..11))
        .await
        .unwrap();
    let all = read(&store, &s, ReadStream::forward()).await;
    assert_eq!(versions(&all), (1..=10).collect::<Vec<_>>());
    assert_eq!(
        all.iter().map(n_of).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    let page = read(&store, &s, ReadStream::forward().from(4).limit(3)).await;
    assert_eq!(versions(&page), vec![4, 5, 6]);
    let tail = read(&store, &s, ReadStream::forward().from(9).limit(5)).await;
    assert_eq!(versions(&tail), vec![9, 10]);
    assert!(read(&store, &s, ReadStream::forward().from(11))
        .await
        .is_empty());
    assert!(read(&store, &s, ReadStream::forward().limit(0))
        .await
        .is_empty());
    let from_zero = read(&store, &s, ReadStream::forward().from(0).limit(2)).await;
    assert_eq!(versions(&from_zero), vec![1, 2]);
}

/// Backward reads honour the start version and the limit.
pub async fn read_stream_backward<S: Store>(store: S) {
    let s = stream("order-b");
    append(&store, &s, ExpectedVersion::NoStream, events("A", 1..11))
        .await
        .unwrap();
    let all = read(&store, &s, ReadStream::backward()).await;
    assert_eq!(versions(&all), (1..=10).rev().collect::<Vec<_>>());
    let page = read(&store, &s, ReadStream::backward().from(7).limit(3)).await;
    assert_eq!(versions(&page), vec![7, 6, 5]);
    let last = read(&store, &s, ReadStream::backward().limit(1)).await;
    assert_eq!(versions(&last), vec![10]);
    let head = read(&store, &s, ReadStream::backward().from(2).limit(5)).await;
    assert_eq!(versions(&head), vec![2, 1]);
    assert!(read(&store, &s, ReadStream::backward().from(0))
        .await
        .is_empty());
    let beyond = read(&store, &s, ReadStream::backward().from(50).limit(2)).await;
    assert_eq!(versions(&beyond), vec![10, 9]);
}

/// A stream with no events reads empty at version 0.
pub async fn read_missing_stream<S: Store>(store: S) {
    let s = stream("order-none");
    assert_eq!(store.stream_version(&s).await.unwrap(), 0);
    assert!(read(&store, &s, ReadStream::forward()).await.is_empty());
    assert!(read(&store, &s, ReadStream::backward()).await.is_empty());
    assert!(read_feeds(&store, ReadAll::after(0)).await.is_empty());
    assert_feed_empty(&heads(&store).await);
    assert!(store.load_snapshot(&s).await.unwrap().is_none());
}

/// Every page of a listing, followed to its end with `next`.
async fn list_all<S: Store>(store: &S, list: ListStreams) -> Vec<(String, u64)> {
    let mut list = list;
    let mut listed = Vec::new();
    for _ in 0..1000 {
        let page = store
            .list_streams(list.clone())
            .await
            .expect("list_streams succeeds");
        assert!(
            page.streams.len() as u64 <= list.page_size(),
            "a page holds at most its limit: {page:?}"
        );
        listed.extend(
            page.streams
                .into_iter()
                .map(|s| (s.stream_id.as_str().to_owned(), s.version)),
        );
        match page.next {
            Some(next) => list = list.after(next),
            None => return listed,
        }
    }
    panic!("the listing did not end after 1000 pages: {listed:?}");
}

/// Listing streams: only streams with events, in stream-id byte order, with their versions,
/// a page at a time; prefixes select a category or the start of an id.
pub async fn list_streams_pages_in_order<S: Store>(store: S) {
    let empty = store.list_streams(ListStreams::all()).await.unwrap();
    assert!(
        empty.streams.is_empty() && empty.next.is_none(),
        "{empty:?}"
    );

    let layout = [
        ("order-2", 3),
        ("order-1", 2),
        ("order-10", 1),
        ("account-1", 1),
        ("orders-x", 1),
        ("order-1:a", 4),
    ];
    for (name, n) in layout {
        append(
            &store,
            &stream(name),
            ExpectedVersion::NoStream,
            events("E", 0..n),
        )
        .await
        .unwrap();
    }
    // Neither a refused append nor an empty one makes a stream.
    let refused = append(
        &store,
        &stream("order-3"),
        ExpectedVersion::Exact(5),
        events("E", 0..1),
    )
    .await;
    assert_conflict(refused, &stream("order-3"), ExpectedVersion::Exact(5), 0);
    append(
        &store,
        &stream("order-4"),
        ExpectedVersion::NoStream,
        Vec::new(),
    )
    .await
    .unwrap();

    let everything: Vec<(String, u64)> = [
        ("account-1", 1),
        ("order-1", 2),
        ("order-10", 1),
        ("order-1:a", 4),
        ("order-2", 3),
        ("orders-x", 1),
    ]
    .iter()
    .map(|(s, v)| ((*s).to_owned(), *v))
    .collect();
    for limit in [1, 2, 5, 6, 100] {
        assert_eq!(
            list_all(&store, ListStreams::all().limit(limit)).await,
            everything,
            "pages of {limit}"
        );
    }
    let names = |listed: Vec<(String, u64)>| listed.into_iter().map(|(s, _)| s).collect::<Vec<_>>();
    assert_eq!(
        names(list_all(&store, ListStreams::category("order").limit(2)).await),
        ["order-1", "order-10", "order-1:a", "order-2"],
        "a category is its streams only, not `orders`"
    );
    assert_eq!(
        names(list_all(&store, ListStreams::all().prefix("order-1")).await),
        ["order-1", "order-10", "order-1:a"],
        "a prefix equal to a stream id lists that stream"
    );
    let after = store
        .list_streams(ListStreams::category("order").after(stream("order-10")))
        .await
        .unwrap();
    let ids: Vec<&str> = after.streams.iter().map(|s| s.stream_id.as_str()).collect();
    assert_eq!(
        ids,
        ["order-1:a", "order-2"],
        "byte order: `0` sorts before `:`"
    );
    assert!(after.next.is_none());
    let before_prefix = store
        .list_streams(ListStreams::category("order").after(stream("account-9")))
        .await
        .unwrap();
    assert_eq!(before_prefix.streams.len(), 4, "{before_prefix:?}");
    assert!(store
        .list_streams(ListStreams::all().prefix("zzz"))
        .await
        .unwrap()
        .streams
        .is_empty());
}

/// A listing prefix outside the stream-id characters (glob patterns, braces, spaces) is a typed
/// error, whatever the store does with prefixes (key patterns, range bounds).
pub async fn list_streams_refuses_hostile_prefixes<S: Store>(store: S) {
    append(
        &store,
        &stream("order-1"),
        ExpectedVersion::NoStream,
        events("E", 0..1),
    )
    .await
    .unwrap();
    for hostile in [
        "order-*",
        "order-?",
        "order-[1]",
        "x}:version",
        "a b",
        "o\\",
    ] {
        match store.list_streams(ListStreams::all().prefix(hostile)).await {
            Err(StoreError::InvalidStreamId(_)) => {}
            other => panic!("prefix {hostile:?}: expected InvalidStreamId, got {other:?}"),
        }
    }
}

/// Reads of a stream longer than any page size return every event in order.
pub async fn read_stream_pages_through_large_stream<S: Store>(store: S) {
    let s = stream("order-large");
    let other = stream("order-other");
    for chunk in 0..5u64 {
        append(
            &store,
            &s,
            ExpectedVersion::Exact(chunk * 500),
            events("A", chunk * 500..(chunk + 1) * 500),
        )
        .await
        .unwrap();
        append(&store, &other, ExpectedVersion::Any, events("B", 0..3))
            .await
            .unwrap();
    }
    let forward = read(&store, &s, ReadStream::forward()).await;
    assert_eq!(versions(&forward), (1..=2500).collect::<Vec<_>>());
    assert!(forward.iter().enumerate().all(|(i, e)| n_of(e) == i as u64));
    let backward = read(&store, &s, ReadStream::backward()).await;
    assert_eq!(versions(&backward), (1..=2500).rev().collect::<Vec<_>>());
    let middle = read(&store, &s, ReadStream::forward().from(1200).limit(1100)).await;
    assert_eq!(versions(&middle), (1200..2300).collect::<Vec<_>>());
    let all = read_feeds(&store, ReadAll::after(0)).await;
    assert_eq!(all.len(), 2515);
    assert!(in_feed_order(&all));
}

/// The pages a load decodes (`read_stream_pages`) lend out exactly the events of `read_stream`:
/// the same envelopes in the same order, for every direction, start and limit, across page
/// boundaries, with no empty page.
pub async fn read_stream_pages_lend_the_events_of_read_stream<S: Store>(store: S) {
    let s = stream("order-pages");
    let other = stream("order-between");
    for chunk in 0..3u64 {
        let mut batch = events("A", chunk * 700..(chunk + 1) * 700);
        // Another type and schema now and then, and metadata the pages leave out.
        for (i, e) in batch.iter_mut().enumerate().filter(|(i, _)| i % 97 == 0) {
            *e = NewEvent::from_value("B", 3, &json!({ "n": i, "text": "ünïcode \"quoted\"" }))
                .with_metadata(Metadata::new().with_actor("ada"));
        }
        append(&store, &s, ExpectedVersion::Exact(chunk * 700), batch)
            .await
            .unwrap();
        append(&store, &other, ExpectedVersion::Any, events("C", 0..3))
            .await
            .unwrap();
    }
    let reads = [
        ReadStream::forward(),
        ReadStream::forward().from(0),
        ReadStream::forward().from(511).limit(1030),
        ReadStream::forward().from(2099),
        ReadStream::forward().from(2100),
        ReadStream::forward().from(5000),
        ReadStream::forward().limit(0),
        ReadStream::backward(),
        ReadStream::backward().from(1500).limit(600),
        ReadStream::backward().from(1),
        ReadStream::backward().from(0),
    ];
    for read_spec in reads {
        let events = read(&store, &s, read_spec).await;
        let mut lent = Vec::new();
        let mut pages = store.read_stream_pages(&s, read_spec);
        while let Some(page) = pages.next().await {
            let page = page.expect("pages read");
            assert!(!page.is_empty(), "{read_spec:?}: an empty page");
            for i in 0..page.len() {
                let e = page.event(i).expect("a stored event");
                lent.push((
                    e.event_id,
                    e.stream_version,
                    e.global_position,
                    e.event_type.to_owned(),
                    e.schema_version,
                    e.payload.to_vec(),
                    e.recorded_at,
                ));
            }
        }
        let expected: Vec<_> = events
            .iter()
            .map(|e| {
                (
                    e.event_id,
                    e.stream_version,
                    e.global_position,
                    e.event_type.clone(),
                    e.schema_version,
                    e.payload.to_vec(),
                    e.recorded_at,
                )
            })
            .collect();
        assert_eq!(lent.len(), expected.len(), "{read_spec:?}");
        assert!(
            lent == expected,
            "{read_spec:?}: pages differ from read_stream"
        );
    }
    let mut missing = store.read_stream_pages(&stream("order-none"), ReadStream::forward());
    assert!(missing.next().await.is_none());
}

/// Every envelope field survives the round trip.
pub async fn envelope_round_trips<S: Store>(store: S) {
    let s = stream("order-env");
    let payload = json!({
        "text": "grüße, \"quotes\", 'single', \\ backslash, 日本語, emoji 🎉",
        "nested": { "list": [1, 2.5, null, true, { "deep": [] }] },
        "big": 9_007_199_254_740_991u64,
    });
    let metadata = Metadata::new()
        .with_correlation_id(Uuid::now_v7())
        .with_causation_id(Uuid::new_v4())
        .with_actor("user:ada@example.com")
        .with("tenant", "acme")
        .with("trace", json!({ "span": 42, "sampled": true }));
    let new = NewEvent::from_value("OrderPlaced", 7, &payload).with_metadata(metadata.clone());
    let before = chrono::Utc::now() - chrono::Duration::seconds(2);
    let r = append(&store, &s, ExpectedVersion::NoStream, vec![new.clone()])
        .await
        .unwrap();
    let after = chrono::Utc::now() + chrono::Duration::seconds(2);
    let check = |e: &RecordedEvent| {
        assert_eq!(e.event_id, new.event_id);
        assert_eq!(e.stream_id, s);
        assert_eq!(e.category(), "order");
        assert_eq!(e.stream_version, 1);
        assert_eq!(e.global_position, r.positions[0]);
        assert_eq!(e.event_type, "OrderPlaced");
        assert_eq!(e.schema_version, 7);
        assert_eq!(e.payload_json().unwrap(), payload);
        assert_eq!(e.metadata, metadata);
        assert!(
            e.recorded_at >= before && e.recorded_at <= after,
            "recorded_at {}",
            e.recorded_at
        );
        assert_eq!(
            e.recorded_at.timestamp_subsec_nanos() % 1000,
            0,
            "microsecond precision"
        );
    };
    check(&read(&store, &s, ReadStream::forward()).await[0]);
    check(&read(&store, &s, ReadStream::backward()).await[0]);
    check(&read_all(&store, in_feed(ReadAll::after(0), feed_of(&store, &s))).await[0]);
    let mut sub = follow(&store, &s, 0, EventFilter::all());
    check(
        &patiently("subscription delivers", sub.next())
            .await
            .unwrap()
            .unwrap(),
    );
}

/// `recorded_at` never decreases along a stream or the feed.
pub async fn recorded_at_never_decreases<S: Store>(store: S) {
    let s = stream("order-time");
    for i in 0..20 {
        append(&store, &s, ExpectedVersion::Any, events("A", i..i + 1))
            .await
            .unwrap();
    }
    let stored = read(&store, &s, ReadStream::forward()).await;
    assert!(stored
        .windows(2)
        .all(|w| w[0].recorded_at <= w[1].recorded_at));
}

/// The global feed (each partition's feed) returns events in commit order, after a position, up
/// to a limit.
pub async fn read_all_in_commit_order<S: Store>(store: S) {
    let streams = [stream("order-x"), stream("order-y"), stream("payment-z")];
    // Per feed, the ids in commit order.
    let mut expected: HashMap<Option<u32>, Vec<Uuid>> = HashMap::new();
    for round in 0..4u64 {
        for (i, s) in streams.iter().enumerate() {
            let batch = events(
                "A",
                round * 10 + i as u64 * 100..round * 10 + i as u64 * 100 + 2,
            );
            let ids = expected.entry(feed_of(&store, s)).or_default();
            ids.extend(batch.iter().map(|e| e.event_id));
            append(&store, s, ExpectedVersion::Any, batch)
                .await
                .unwrap();
        }
    }
    for feed in feeds(&store) {
        let expected = expected.remove(&feed).unwrap_or_default();
        let all = read_all(&store, in_feed(ReadAll::after(0), feed)).await;
        assert_eq!(all.iter().map(|e| e.event_id).collect::<Vec<_>>(), expected);
        assert!(in_feed_order(&all));
        assert!(all.iter().all(|e| feed.is_none_or(|p| e.partition == p)));
        for s in &streams {
            let per_stream: Vec<u64> = all
                .iter()
                .filter(|e| &e.stream_id == s)
                .map(|e| e.stream_version)
                .collect();
            if feed_of(&store, s) == feed {
                assert_eq!(per_stream, (1..=8).collect::<Vec<_>>());
            } else {
                assert!(per_stream.is_empty(), "a stream's events in one partition");
            }
        }
        if all.is_empty() {
            continue;
        }
        // Cut after the 10th event of the feed (fewer in a partition holding one stream).
        let k = 9.min(all.len() / 2);
        let cut = all[k].global_position;
        let rest = read_all(&store, in_feed(ReadAll::after(cut), feed)).await;
        assert_eq!(
            rest.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            expected[k + 1..]
        );
        let page = read_all(&store, in_feed(ReadAll::after(cut).limit(5), feed)).await;
        assert_eq!(
            page.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            expected[k + 1..(k + 6).min(expected.len())]
        );
        let last = all.last().unwrap().global_position;
        assert!(read_all(&store, in_feed(ReadAll::after(last), feed))
            .await
            .is_empty());
        assert!(read_all(&store, in_feed(ReadAll::after(0).limit(0), feed))
            .await
            .is_empty());
    }
}

/// Category and event-type filters, alone and combined.
pub async fn read_all_filters<S: Store>(store: S) {
    for i in 0..30u64 {
        let (s, t) = match i % 3 {
            0 => ("order-1", "Placed"),
            1 => ("payment-1", "Paid"),
            _ => ("order-2", "Shipped"),
        };
        append(&store, &stream(s), ExpectedVersion::Any, vec![event(t, i)])
            .await
            .unwrap();
    }
    let orders = read_feeds(
        &store,
        ReadAll::after(0).filter(EventFilter::all().category("order")),
    )
    .await;
    assert_eq!(orders.len(), 20);
    assert!(orders.iter().all(|e| e.category() == "order"));
    assert!(in_feed_order(&orders));
    let two = EventFilter::all().category("order").category("payment");
    assert_eq!(
        read_feeds(&store, ReadAll::after(0).filter(two))
            .await
            .len(),
        30
    );
    let paid = read_feeds(
        &store,
        ReadAll::after(0).filter(EventFilter::all().event_type("Paid")),
    )
    .await;
    assert_eq!(
        paid.iter().map(n_of).collect::<Vec<_>>(),
        (0..30).filter(|i| i % 3 == 1).collect::<Vec<_>>()
    );
    let both = EventFilter::all().category("order").event_type("Shipped");
    let shipped = read_feeds(&store, ReadAll::after(0).filter(both.clone())).await;
    assert_eq!(shipped.len(), 10);
    // All of stream order-2, so all in its feed.
    let page = read_all(
        &store,
        in_feed(
            ReadAll::after(shipped[2].global_position)
                .limit(3)
                .filter(both),
            feed_of(&store, &stream("order-2")),
        ),
    )
    .await;
    assert_eq!(
        page.iter().map(n_of).collect::<Vec<_>>(),
        shipped[3..6].iter().map(n_of).collect::<Vec<_>>()
    );
    let none = EventFilter::all().category("nothing");
    assert!(read_feeds(&store, ReadAll::after(0).filter(none))
        .await
        .is_empty());
    // A category is matched whole, not as a prefix.
    let prefix = EventFilter::all().category("ord");
    assert!(read_feeds(&store, ReadAll::after(0).filter(prefix))
        .await
        .is_empty());
}

/// The head is the last visible position (of each partition).
pub async fn head_position_tracks_appends<S: Store>(store: S) {
    assert_feed_empty(&heads(&store).await);
    let (h, i) = (stream("order-h"), stream("order-i"));
    let r = append(&store, &h, ExpectedVersion::Any, events("A", 0..3))
        .await
        .unwrap();
    assert_eq!(head_of(&store, feed_of(&store, &h)).await, r.positions[2]);
    let r = append(&store, &i, ExpectedVersion::Any, events("A", 0..1))
        .await
        .unwrap();
    assert_eq!(head_of(&store, feed_of(&store, &i)).await, r.positions[0]);
}

// ---------------------------------------------------------------------------------------------
// Feed partitions (see `es_core::contract::partition`)

/// Single-feed calls work on a store with one partition and refuse one with several, with a
/// typed error; a partition the store does not have is a typed error everywhere.
pub async fn single_feed_calls_refuse_a_partitioned_store<S: Store>(store: S) {
    let partitioning = store.partitioning();
    let s = stream("order-single");
    append(&store, &s, ExpectedVersion::NoStream, events("A", 0..2))
        .await
        .unwrap();
    let p = partitioning.partition_of(&s);
    if partitioning.is_single() {
        assert_eq!(p, 0);
        assert_eq!(
            store.head_position().await.unwrap(),
            store.partition_head(0).await.unwrap()
        );
        assert_eq!(read_all(&store, ReadAll::after(0)).await.len(), 2);
        assert_eq!(
            read_all(&store, ReadAll::after(0).partition(0)).await.len(),
            2
        );
        assert!(store.epochs().await.is_ok());
    } else {
        let partitioned = |err: &StoreError| matches!(err, StoreError::Partitioned { partitions } if *partitions == partitioning.count());
        let err = store.head_position().await.unwrap_err();
        assert!(partitioned(&err), "head_position: {err:?}");
        let err = store.epochs().await.unwrap_err();
        assert!(partitioned(&err), "epochs: {err:?}");
        let read: Vec<_> = store.read_all(ReadAll::after(0)).collect().await;
        assert!(
            matches!(read.as_slice(), [Err(err)] if partitioned(err)),
            "read_all without a partition: {read:?}"
        );
        let sub: Vec<_> = patiently(
            "a refused subscription ends",
            store.subscribe(0, EventFilter::all()).collect::<Vec<_>>(),
        )
        .await;
        assert!(
            matches!(sub.as_slice(), [Err(err)] if partitioned(err)),
            "subscribe: {sub:?}"
        );
        assert_eq!(
            read_all(&store, ReadAll::after(0).partition(p)).await.len(),
            2
        );
    }
    let missing = partitioning.count();
    let no_such = |err: &StoreError| {
        matches!(err, StoreError::NoSuchPartition { partition, partitions }
            if *partition == missing && *partitions == partitioning.count())
    };
    let err = store.partition_head(missing).await.unwrap_err();
    assert!(no_such(&err), "partition_head: {err:?}");
    let err = store.partition_epochs(missing).await.unwrap_err();
    assert!(no_such(&err), "partition_epochs: {err:?}");
    let read: Vec<_> = store
        .read_all(ReadAll::after(0).partition(missing))
        .collect()
        .await;
    assert!(
        matches!(read.as_slice(), [Err(err)] if no_such(err)),
        "read_all: {read:?}"
    );
    let sub: Vec<_> = patiently(
        "a refused subscription ends",
        store
            .subscribe_partition(missing, 0, EventFilter::all())
            .collect::<Vec<_>>(),
    )
    .await;
    assert!(
        matches!(sub.as_slice(), [Err(err)] if no_such(err)),
        "subscribe_partition: {sub:?}"
    );
    let wrong = es_core::FeedPosition::from_positions(vec![0; missing as usize + 1]);
    let sub: Vec<_> = patiently(
        "a refused subscription ends",
        store
            .subscribe_all(&wrong, EventFilter::all())
            .collect::<Vec<_>>(),
    )
    .await;
    assert!(
        matches!(
            sub.as_slice(),
            [Err(StoreError::InvalidPartitioning { .. })]
        ),
        "subscribe_all from a position of another partitioning: {sub:?}"
    );
}

/// Each partition is a feed of its own: a stream's events all live in the partition its id
/// hashes to, every partition's positions strictly increase from its start, its head is its last
/// position, and the partitions together hold every event exactly once, with the positions the
/// appends returned and the stream reads report.
pub async fn each_partition_is_a_feed_of_its_own<S: Store>(store: S) {
    let partitioning = store.partitioning();
    let mut written: HashMap<Uuid, (StreamId, u64)> = HashMap::new();
    for round in 0..3u64 {
        for i in 0..40u64 {
            let s = stream(&format!("order-{i}"));
            let batch = events("A", 0..1 + (i + round) % 3);
            let ids: Vec<Uuid> = batch.iter().map(|e| e.event_id).collect();
            let r = append(&store, &s, ExpectedVersion::Any, batch)
                .await
                .unwrap();
            for (id, position) in ids.into_iter().zip(r.positions) {
                written.insert(id, (s.clone(), position));
            }
        }
    }
    let mut seen = HashSet::new();
    let mut used = 0;
    for partition in partitioning.partitions() {
        let feed = read_all(&store, ReadAll::after(0).partition(partition)).await;
        assert!(
            in_feed_order(&feed),
            "partition {partition}: positions increase"
        );
        assert_eq!(
            store.partition_head(partition).await.unwrap(),
            feed.last().map_or(0, |e| e.global_position),
            "partition {partition}: the head is its last position"
        );
        used += u32::from(!feed.is_empty());
        for e in &feed {
            assert_eq!(e.partition, partition);
            assert_eq!(partitioning.partition_of(&e.stream_id), partition);
            let (s, position) = &written[&e.event_id];
            assert_eq!((&e.stream_id, e.global_position), (s, *position));
            assert!(seen.insert(e.event_id), "an event in two partitions");
        }
    }
    assert_eq!(seen.len(), written.len(), "every event is in a partition");
    if partitioning.count() >= 4 {
        assert!(used >= 2, "40 streams spread over several partitions");
    }
    for i in 0..40u64 {
        let s = stream(&format!("order-{i}"));
        let events = read(&store, &s, ReadStream::forward()).await;
        assert!(events
            .iter()
            .all(|e| e.partition == partitioning.partition_of(&s)));
        assert_eq!(
            versions(&events),
            (1..=events.len() as u64).collect::<Vec<_>>()
        );
    }
}

/// `subscribe_all` delivers every event of every partition exactly once, each partition in its
/// order, while writers append; resumed from a [`FeedPosition`](es_core::FeedPosition) taken
/// midway, it delivers exactly the events after it.
pub async fn subscribe_all_delivers_every_event_once<S: Store>(store: S) {
    let partitioning = store.partitioning();
    let start = es_core::FeedPosition::start(&partitioning);
    let mut sub = store.subscribe_all(&start, EventFilter::all());
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..25u64 {
                let s = stream(&format!("order-{}", (w * 5 + i * 3) % 30));
                let batch = events("A", 0..1 + i % 2);
                ids.extend(batch.iter().map(|e| e.event_id));
                append(&store, &s, ExpectedVersion::Any, batch)
                    .await
                    .unwrap();
            }
            ids
        }));
    }
    let mut written = HashSet::new();
    for w in writers {
        written.extend(patiently("writers finish", w).await.unwrap());
    }
    let mut seen = Vec::new();
    while seen.len() < written.len() {
        let e = patiently("subscribe_all delivers", sub.next())
            .await
            .expect("the subscription does not end")
            .expect("the subscription does not fail");
        seen.push(e);
    }
    check_feed("subscribe_all", &seen, &written);
    // Nothing more: the next event is one appended now.
    let late = event("Late", 0);
    let late_id = late.event_id;
    append(
        &store,
        &stream("order-late"),
        ExpectedVersion::Any,
        vec![late],
    )
    .await
    .unwrap();
    let e = patiently("a live event", sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.event_id, late_id, "no event delivered twice");

    // Resume from where a reader stood after the first half of what it saw.
    let mut midway = start.clone();
    for e in &seen[..seen.len() / 2] {
        midway.advance(e.partition, e.global_position);
    }
    let expected: HashSet<Uuid> = seen
        .iter()
        .filter(|e| e.global_position > midway.get(e.partition))
        .map(|e| e.event_id)
        .chain([late_id])
        .collect();
    let mut resumed = store.subscribe_all(&midway, EventFilter::all());
    let mut again = HashSet::new();
    while again.len() < expected.len() {
        let e = patiently("resumed subscribe_all delivers", resumed.next())
            .await
            .unwrap()
            .unwrap();
        assert!(
            e.global_position > midway.get(e.partition),
            "nothing before the position"
        );
        assert!(again.insert(e.event_id), "an event delivered twice");
    }
    assert_eq!(again, expected);
}

// ---------------------------------------------------------------------------------------------
// Concurrency

/// Sixteen writers race on one stream with exact expected versions: every version has exactly one
/// winner and no event is lost or stored twice.
pub async fn concurrent_writers_one_stream<S: Store>(store: S) {
    const WRITERS: u64 = 16;
    const PER_WRITER: u64 = 20;
    let s = stream("order-hot");
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            let mut conflicts = 0u64;
            for i in 0..PER_WRITER {
                let e = event("A", w * 1000 + i);
                loop {
                    let v = store.stream_version(&s).await.unwrap();
                    match append(&store, &s, ExpectedVersion::Exact(v), vec![e.clone()]).await {
                        Ok(r) => {
                            assert_eq!(r.stream_version, v + 1);
                            won.push((r.stream_version, e.event_id));
                            break;
                        }
                        Err(StoreError::Conflict { actual, .. }) => {
                            assert!(actual > v, "a conflict means the stream moved on");
                            conflicts += 1;
                        }
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                }
            }
            (won, conflicts)
        }));
    }
    let mut winners: BTreeMap<u64, Uuid> = BTreeMap::new();
    for t in tasks {
        let (won, _) = patiently("writers finish", t).await.unwrap();
        for (version, id) in won {
            assert!(
                winners.insert(version, id).is_none(),
                "version {version} had two winners"
            );
        }
    }
    let total = WRITERS * PER_WRITER;
    assert_eq!(
        winners.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    let stored = read(&store, &s, ReadStream::forward()).await;
    assert_eq!(versions(&stored), (1..=total).collect::<Vec<_>>());
    for e in &stored {
        assert_eq!(
            winners[&e.stream_version], e.event_id,
            "stored event is the winner's"
        );
    }
}

/// Two large batches appended concurrently with `Any` land contiguously, not interleaved.
pub async fn concurrent_batches_do_not_interleave<S: Store>(store: S) {
    let s = stream("order-batches");
    let a = events("A", 0..500);
    let b = events("B", 0..500);
    let (ra, rb) = tokio::join!(
        append(&store, &s, ExpectedVersion::Any, a),
        append(&store, &s, ExpectedVersion::Any, b)
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let mut ends = [ra.stream_version, rb.stream_version];
    ends.sort_unstable();
    assert_eq!(ends, [500, 1000]);
    let stored = read(&store, &s, ReadStream::forward()).await;
    let first = &stored[0].event_type;
    assert!(stored[..500].iter().all(|e| &e.event_type == first));
    assert!(stored[500..].iter().all(|e| &e.event_type != first));
    let all = read_all(&store, in_feed(ReadAll::after(0), feed_of(&store, &s))).await;
    assert_eq!(versions(&all), (1..=1000).collect::<Vec<_>>());
}

/// Writers on many streams while a subscriber and a polling reader tail the feed: neither
/// misses, repeats or reorders an event, and per-stream order holds in the feed.
pub async fn concurrent_writers_many_streams_tailing_subscriber<S: Store>(store: S) {
    const WRITERS: u64 = 16;
    const STREAMS: u64 = 100;
    const APPENDS_PER_WRITER: u64 = 60;
    let subscriber = tail_until_done(&store);
    let poller = poll_until_done(&store, 100);
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for i in 0..APPENDS_PER_WRITER {
                let s = stream(&format!("order-{}", (w * 7 + i * 13) % STREAMS));
                let batch = events("A", 0..1 + (i % 3));
                let ids: Vec<Uuid> = batch.iter().map(|e| e.event_id).collect();
                append(&store, &s, ExpectedVersion::Any, batch)
                    .await
                    .unwrap();
                written.extend(ids);
            }
            written
        }));
    }
    let mut written = HashSet::new();
    for w in writers {
        written.extend(patiently("writers finish", w).await.unwrap());
    }
    let done = event("Done", 0);
    written.insert(done.event_id);
    append(
        &store,
        &stream("control-1"),
        ExpectedVersion::Any,
        vec![done],
    )
    .await
    .unwrap();

    for (name, seen) in [
        (
            "subscriber",
            patiently("subscriber sees everything", subscriber)
                .await
                .unwrap(),
        ),
        (
            "poller",
            patiently("poller sees everything", poller).await.unwrap(),
        ),
    ] {
        check_feed(name, &seen, &written);
    }
}

/// A subscription delivers stored events, then new ones as they are appended, and can start
/// from any position.
pub async fn subscription_catches_up_then_goes_live<S: Store>(store: S) {
    let s = stream("order-sub");
    let r = append(&store, &s, ExpectedVersion::NoStream, events("A", 0..5))
        .await
        .unwrap();
    let mut sub = follow(&store, &s, 0, EventFilter::all());
    for n in 0..5 {
        let e = patiently("catch-up", sub.next()).await.unwrap().unwrap();
        assert_eq!(n_of(&e), n);
    }
    let writer = {
        let store = store.clone();
        let s = s.clone();
        tokio::spawn(async move {
            for n in 5..8 {
                tokio::time::sleep(Duration::from_millis(30)).await;
                append(&store, &s, ExpectedVersion::Any, vec![event("A", n)])
                    .await
                    .unwrap();
            }
        })
    };
    for n in 5..8 {
        let e = patiently("live event", sub.next()).await.unwrap().unwrap();
        assert_eq!(n_of(&e), n);
        assert_eq!(e.stream_version, n + 1);
    }
    writer.await.unwrap();
    let mut late = follow(&store, &s, r.positions[2], EventFilter::all());
    let e = patiently("resume after a position", late.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.stream_version, 4);
}

/// A filtered subscription delivers only matching events, in order, catching up and live.
pub async fn subscription_with_filter<S: Store>(store: S) {
    for i in 0..10u64 {
        let s = if i % 2 == 0 { "order-1" } else { "payment-1" };
        append(
            &store,
            &stream(s),
            ExpectedVersion::Any,
            vec![event("A", i)],
        )
        .await
        .unwrap();
    }
    let payments = stream("payment-1");
    let mut sub = follow(&store, &payments, 0, EventFilter::all().category("payment"));
    for n in [1, 3, 5, 7, 9] {
        let e = patiently("filtered catch-up", sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((e.category(), n_of(&e)), ("payment", n));
    }
    for i in 10..40u64 {
        append(
            &store,
            &stream("order-1"),
            ExpectedVersion::Any,
            vec![event("A", i)],
        )
        .await
        .unwrap();
    }
    append(
        &store,
        &stream("payment-1"),
        ExpectedVersion::Any,
        vec![event("A", 99)],
    )
    .await
    .unwrap();
    let e = patiently("filtered live event", sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((e.category(), n_of(&e)), ("payment", 99));
}

// ---------------------------------------------------------------------------------------------
// Snapshots

/// Snapshots are upserted only when newer.
pub async fn snapshots_upsert_if_newer<S: Store>(store: S) {
    let s = stream("ledger-snap");
    let snap = |version: u64, payload: &str| SnapshotRecord {
        stream_id: s.clone(),
        version,
        schema_version: 3,
        payload: Bytes::from(payload.to_owned()),
        recorded_at: es_core::event::now_micros(),
        event_id: Some(Uuid::from_u128(u128::from(version))),
    };
    assert!(store.load_snapshot(&s).await.unwrap().is_none());
    assert!(store.save_snapshot(snap(5, r#"{"v":5}"#)).await.unwrap());
    let loaded = store.load_snapshot(&s).await.unwrap().unwrap();
    assert_eq!((loaded.version, loaded.schema_version), (5, 3));
    assert_eq!(loaded.event_id, Some(Uuid::from_u128(5)));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&loaded.payload).unwrap(),
        json!({"v": 5})
    );
    assert!(
        !store.save_snapshot(snap(3, r#"{"v":3}"#)).await.unwrap(),
        "older snapshot ignored"
    );
    assert!(
        !store.save_snapshot(snap(5, r#"{"v":55}"#)).await.unwrap(),
        "same version ignored"
    );
    assert_eq!(store.load_snapshot(&s).await.unwrap().unwrap().version, 5);
    assert!(store.save_snapshot(snap(8, r#"{"v":8}"#)).await.unwrap());
    assert_eq!(store.load_snapshot(&s).await.unwrap().unwrap().version, 8);
    assert!(store
        .load_snapshot(&stream("ledger-other"))
        .await
        .unwrap()
        .is_none());
}

// ---------------------------------------------------------------------------------------------
// The repository on this store

/// Commands are decided on the loaded state; domain errors name the stream and version.
pub async fn repository_runs_commands<S: Store>(store: S) {
    let repo = repository(&store, SnapshotPolicy::Never);
    assert_eq!(run(&repo, "a", LedgerCommand::Open).await, 1);
    assert_eq!(run(&repo, "a", LedgerCommand::Credit(100)).await, 2);
    assert_eq!(run(&repo, "a", LedgerCommand::Debit(30)).await, 3);
    let noop = repo
        .execute::<Ledger>("a", &LedgerCommand::Noop)
        .await
        .unwrap();
    assert_eq!((noop.version, noop.events.len()), (3, 0));
    match repo
        .execute::<Ledger>("a", &LedgerCommand::Debit(500))
        .await
    {
        Err(RepositoryError::Domain {
            stream_id: stream,
            version,
            source,
        }) => {
            assert_eq!(stream.as_str(), "ledger-a");
            assert_eq!(version, 3);
            assert_eq!(
                source,
                LedgerError::InsufficientFunds {
                    balance: 70,
                    requested: 500
                }
            );
        }
        other => panic!("expected a domain error, got {other:?}"),
    }
    let loaded = repo.load::<Ledger>("a").await.unwrap();
    assert_eq!(loaded.version, 3);
    assert_eq!(loaded.aggregate.balance, 70);
    let stored = read(&store, &stream("ledger-a"), ReadStream::forward()).await;
    let types: Vec<&str> = stored.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["Opened", "Credited", "Debited"]);
    assert_eq!(stored[1].schema_version, 2);
}

/// A command on an aggregate with no events is decided on the default state at version 0.
pub async fn command_on_missing_aggregate<S: Store>(store: S) {
    let repo = repository(&store, SnapshotPolicy::Never);
    match repo
        .execute::<Ledger>("ghost", &LedgerCommand::Credit(5))
        .await
    {
        Err(RepositoryError::Domain {
            stream_id: stream,
            version: 0,
            source: LedgerError::NotOpen,
        }) => {
            assert_eq!(stream.as_str(), "ledger-ghost");
        }
        other => panic!("expected NotOpen at version 0, got {other:?}"),
    }
    assert_feed_empty(&heads(&store).await);
    let loaded = repo.load::<Ledger>("ghost").await.unwrap();
    assert_eq!((loaded.version, loaded.aggregate), (0, Ledger::default()));
}

/// Ids that cannot form a stream id are rejected before the store is touched.
pub async fn invalid_aggregate_id_is_rejected<S: Store>(store: S) {
    let repo = repository(&store, SnapshotPolicy::Never);
    let long = "x".repeat(10_000);
    for bad in [
        "",
        "a b",
        "x'; DROP TABLE events; --",
        "{tag}",
        "ünï",
        long.as_str(),
    ] {
        let r = repo.execute::<Ledger>(bad, &LedgerCommand::Open).await;
        assert!(
            matches!(r, Err(RepositoryError::InvalidId(_))),
            "{bad:?}: {r:?}"
        );
    }
    assert_feed_empty(&heads(&store).await);
}

/// Loading with snapshots gives exactly the state of a full replay.
pub async fn snapshots_are_invisible<S: Store>(store: S) {
    let with = repository(&store, SnapshotPolicy::EveryNEvents(3));
    let without = repository(&store, SnapshotPolicy::Never);
    run(&with, "s", LedgerCommand::Open).await;
    let mut saved = 0;
    for i in 1..=10 {
        let r = with
            .execute::<Ledger>("s", &LedgerCommand::Credit(i))
            .await
            .unwrap();
        saved += u32::from(r.snapshot_saved);
    }
    run(&with, "s", LedgerCommand::Debit(7)).await;
    assert!(saved >= 3, "snapshots were taken ({saved})");
    let snap = with.load::<Ledger>("s").await.unwrap();
    assert!(snap.snapshot_version.is_some(), "the snapshot was used");
    assert!(snap.events_read < snap.version);
    let full = without.load::<Ledger>("s").await.unwrap();
    assert_eq!(full.snapshot_version, None);
    assert_eq!(full.events_read, 12);
    assert_eq!(snap.aggregate, full.aggregate);
    assert_eq!(snap.version, full.version);
    let replay = with.load_without_snapshot::<Ledger>("s").await.unwrap();
    assert_eq!(replay.aggregate, full.aggregate);
    assert_eq!(full.aggregate.balance, 55 - 7);
}

/// A snapshot that does not decode, or has another schema version, is ignored.
pub async fn undecodable_snapshot_is_ignored<S: Store>(store: S) {
    let repo = repository(&store, SnapshotPolicy::EveryNEvents(1));
    run(&repo, "u", LedgerCommand::Open).await;
    run(&repo, "u", LedgerCommand::Credit(10)).await;
    let s = stream("ledger-u");
    let bad = SnapshotRecord {
        stream_id: s.clone(),
        version: 50,
        schema_version: 1,
        payload: Bytes::from_static(br#"{"open": "yes"}"#),
        recorded_at: es_core::event::now_micros(),
        event_id: None,
    };
    assert!(store.save_snapshot(bad).await.unwrap());
    let loaded = repo.load::<Ledger>("u").await.unwrap();
    assert_eq!(loaded.snapshot_version, None);
    assert_eq!((loaded.version, loaded.aggregate.balance), (2, 10));
    let other_schema = SnapshotRecord {
        stream_id: s,
        version: 60,
        schema_version: 99,
        payload: Bytes::from(serde_json::to_vec(&loaded.aggregate).unwrap()),
        recorded_at: es_core::event::now_micros(),
        event_id: None,
    };
    assert!(store.save_snapshot(other_schema).await.unwrap());
    let loaded = repo.load::<Ledger>("u").await.unwrap();
    assert_eq!(loaded.snapshot_version, None);
    assert_eq!(loaded.version, 2);
    // Commands still work: the snapshot write fails to apply (older) and the command stands.
    run(&repo, "u", LedgerCommand::Credit(1)).await;
}

/// A snapshot ahead of its stream (the stream was restored from an older backup, or lost its
/// tail, or the snapshot was written by hand) is never trusted: the aggregate is replayed from
/// its events, the snapshot is deleted, and commands go on without conflicts.
pub async fn snapshot_ahead_of_its_stream_is_ignored<S: Store>(store: S) {
    let repo = repository(&store, SnapshotPolicy::EveryNEvents(2));
    run(&repo, "ahead", LedgerCommand::Open).await;
    run(&repo, "ahead", LedgerCommand::Credit(10)).await;
    let s = stream("ledger-ahead");
    let rich = Ledger {
        open: true,
        balance: 1_000_000,
        ..Ledger::default()
    };
    let ahead = SnapshotRecord {
        stream_id: s.clone(),
        version: 40,
        schema_version: <Ledger as es_core::Aggregate>::SNAPSHOT_VERSION,
        payload: Bytes::from(serde_json::to_vec(&rich).unwrap()),
        recorded_at: es_core::event::now_micros(),
        event_id: None,
    };
    assert!(store.save_snapshot(ahead).await.unwrap());
    let loaded = repo.load::<Ledger>("ahead").await.unwrap();
    assert_eq!(loaded.snapshot_version, None, "the snapshot was not used");
    assert_eq!((loaded.version, loaded.aggregate.balance), (2, 10));
    // The command is decided on the replayed state and appends at the stream's version; the bad
    // snapshot was deleted, so the policy's snapshot is written again.
    let done = repo
        .execute::<Ledger>("ahead", &LedgerCommand::Credit(5))
        .await
        .expect("no conflict with the snapshot's version");
    assert_eq!(done.version, 3);
    assert!(
        done.snapshot_saved,
        "a new snapshot replaces the deleted one"
    );
    let again = repo.load::<Ledger>("ahead").await.unwrap();
    assert_eq!(again.snapshot_version, Some(3));
    assert_eq!(again.aggregate.balance, 15);
}

/// A snapshot at a version the stream has, but taken of other events (the stream was restored
/// from a backup and written again since), is never trusted.
pub async fn snapshot_of_other_events_is_ignored<S: Store>(store: S) {
    let repo = repository(&store, SnapshotPolicy::EveryNEvents(100));
    run(&repo, "other", LedgerCommand::Open).await;
    run(&repo, "other", LedgerCommand::Credit(7)).await;
    let s = stream("ledger-other");
    let forged = SnapshotRecord {
        stream_id: s.clone(),
        version: 2,
        schema_version: <Ledger as es_core::Aggregate>::SNAPSHOT_VERSION,
        payload: Bytes::from(
            serde_json::to_vec(&Ledger {
                open: true,
                balance: 999,
                ..Ledger::default()
            })
            .unwrap(),
        ),
        recorded_at: es_core::event::now_micros(),
        event_id: Some(Uuid::now_v7()),
    };
    assert!(store.save_snapshot(forged).await.unwrap());
    let loaded = repo.load::<Ledger>("other").await.unwrap();
    assert_eq!(loaded.snapshot_version, None);
    assert_eq!(loaded.aggregate.balance, 7);
    // A snapshot the repository takes names the event it was taken at, and is used.
    let (version, saved) = repo.snapshot::<Ledger>("other").await.unwrap();
    assert_eq!((version, saved), (2, true));
    let stored = store.load_snapshot(&s).await.unwrap().unwrap();
    let events = read(&store, &s, ReadStream::forward()).await;
    assert_eq!(stored.event_id, Some(events[1].event_id));
    let loaded = repo.load::<Ledger>("other").await.unwrap();
    assert_eq!(loaded.snapshot_version, Some(2));
    assert_eq!(loaded.aggregate.balance, 7);
}

/// Appends to `s` that break the JSON rule or the size limits, each with what is wrong.
/// An event of type `Raw` with `payload` as it is, valid or not.
fn raw(payload: &'static [u8]) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "Raw".to_owned(),
        schema_version: 1,
        payload: Bytes::from_static(payload),
        metadata: Metadata::default(),
    }
}

/// `1` wrapped in `depth` arrays.
fn nested(depth: usize) -> serde_json::Value {
    let mut value = json!(1);
    for _ in 0..depth {
        value = json!([value]);
    }
    value
}

fn appends_every_store_refuses(s: &StreamId) -> Vec<(&'static str, AppendRequest)> {
    let limits = AppendLimits::default();
    vec![
        (
            "NUL escape",
            AppendRequest::new(
                s.clone(),
                ExpectedVersion::Any,
                vec![raw(br#"{"a":"x\u0000"}"#)],
            ),
        ),
        (
            "lone surrogate",
            AppendRequest::new(s.clone(), ExpectedVersion::Any, vec![raw(br#"["\ud800"]"#)]),
        ),
        (
            "invalid UTF-8",
            AppendRequest::new(s.clone(), ExpectedVersion::Any, vec![raw(b"\"\xff\xfe\"")]),
        ),
        (
            "not JSON",
            AppendRequest::new(s.clone(), ExpectedVersion::Any, vec![raw(b"{oops")]),
        ),
        (
            "payload nested too deep",
            AppendRequest::new(
                s.clone(),
                ExpectedVersion::Any,
                vec![NewEvent::from_value("Deep", 1, &nested(100))],
            ),
        ),
        (
            "metadata nested 128 deep",
            AppendRequest::new(
                s.clone(),
                ExpectedVersion::Any,
                vec![event("A", 1).with_metadata(Metadata::new().with("deep", nested(128)))],
            ),
        ),
        (
            "NUL in the actor",
            AppendRequest::new(
                s.clone(),
                ExpectedVersion::Any,
                vec![event("A", 1).with_metadata(Metadata::new().with_actor("ada\0"))],
            ),
        ),
        (
            "oversized metadata",
            AppendRequest::new(
                s.clone(),
                ExpectedVersion::Any,
                vec![event("A", 1).with_metadata(
                    Metadata::new().with("blob", "m".repeat(limits.max_metadata_bytes)),
                )],
            ),
        ),
        (
            "NUL in an outbox payload",
            AppendRequest::new(s.clone(), ExpectedVersion::Any, vec![event("A", 1)]).with_outbox(
                vec![es_core::OutboxMessage {
                    message_id: Uuid::now_v7(),
                    source_event_id: Uuid::now_v7(),
                    topic: "t".into(),
                    key: "k".into(),
                    message_type: "M".into(),
                    schema_version: 1,
                    payload: Bytes::from_static(br#""\u0000""#),
                    metadata: Metadata::new(),
                }],
            ),
        ),
        (
            "NUL in an outbox key",
            AppendRequest::new(s.clone(), ExpectedVersion::Any, vec![event("A", 1)]).with_outbox(
                vec![es_core::OutboxMessage {
                    message_id: Uuid::now_v7(),
                    source_event_id: Uuid::now_v7(),
                    topic: "t".into(),
                    key: "k\0".into(),
                    message_type: "M".into(),
                    schema_version: 1,
                    payload: Bytes::from_static(b"{}"),
                    metadata: Metadata::new(),
                }],
            ),
        ),
    ]
}

/// Every store applies the same rule to the JSON it is given (`es_core::json`) and the same size
/// limits, so an append one store accepts, every store accepts and reads back; what one would
/// refuse or could not read back, all refuse with a typed error, writing nothing.
pub async fn the_same_json_rule_everywhere<S: Store>(store: S) {
    let s = stream("json-rule");
    let refused = appends_every_store_refuses(&s);
    for (what, request) in refused {
        match store.append(request).await {
            Err(StoreError::InvalidRequest {
                stream_id: on,
                reason,
            }) => {
                assert_eq!(on, s, "{what}");
                assert!(!reason.is_empty(), "{what}");
            }
            other => panic!("{what}: expected InvalidRequest, got {other:?}"),
        }
    }
    assert_eq!(
        store.stream_version(&s).await.unwrap(),
        0,
        "nothing was written"
    );
    assert_feed_empty(&heads(&store).await);

    // What is fine everywhere goes in and comes back as it went in.
    let fine = vec![
        raw(r#"{"text":"é 日本 😀 \ud83d\ude00 \\u0000"}"#.as_bytes()),
        NewEvent::from_value("Deep", 1, &nested(63)),
        event("A", 2).with_metadata(
            Metadata::new()
                .with_actor("ünïcödé 👩‍💻")
                .with("deep", nested(60)),
        ),
    ];
    let sent: Vec<(Bytes, Metadata)> = fine
        .iter()
        .map(|e| (e.payload.clone(), e.metadata.clone()))
        .collect();
    append(&store, &s, ExpectedVersion::NoStream, fine)
        .await
        .unwrap();
    let stored = read(&store, &s, ReadStream::forward()).await;
    for ((payload, metadata), got) in sent.iter().zip(&stored) {
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(payload).unwrap(),
            got.payload_json().unwrap()
        );
        assert_eq!(*metadata, got.metadata);
    }

    // Snapshots follow the same rule.
    let bad_snapshot = SnapshotRecord {
        stream_id: s.clone(),
        version: 1,
        schema_version: 1,
        payload: Bytes::from_static(br#"{"name":"\u0000"}"#),
        recorded_at: es_core::event::now_micros(),
        event_id: None,
    };
    assert!(matches!(
        store.save_snapshot(bad_snapshot).await,
        Err(StoreError::InvalidRequest { .. })
    ));
    assert!(store.load_snapshot(&s).await.unwrap().is_none());
}

/// Old event versions are upcast when loaded; the stored events stay as they were.
pub async fn upcasting_on_load<S: Store>(store: S) {
    let s = stream("ledger-old");
    let old = vec![
        NewEvent::from_value("Opened", 1, &json!({})),
        NewEvent::from_value("Credited", 1, &json!({ "amount": 40 })),
        NewEvent::from_value("Credited", 2, &json!({ "amount": 2, "currency": "USD" })),
        NewEvent::from_value("Credited", 1, &json!({ "amount": 8 })),
    ];
    append(&store, &s, ExpectedVersion::NoStream, old)
        .await
        .unwrap();
    let repo = repository(&store, SnapshotPolicy::Never);
    let loaded = repo.load::<Ledger>("old").await.unwrap();
    assert_eq!(loaded.aggregate.balance, 50);
    assert_eq!(loaded.aggregate.currency, "EUR");
    let stored = read(&store, &s, ReadStream::forward()).await;
    assert_eq!(
        stored[1].schema_version, 1,
        "stored events are never rewritten"
    );
    assert_eq!(stored[1].payload_json().unwrap(), json!({ "amount": 40 }));
    let typed = repo.decode::<Ledger>(&stored[1]).unwrap();
    assert_eq!(
        typed,
        vec![LedgerEvent::Credited(Credited {
            amount: 40,
            currency: "EUR".into()
        })]
    );
}

/// Past states by version, global position and time.
pub async fn historical_loads<S: Store>(store: S) {
    let repo = repository(&store, SnapshotPolicy::EveryNEvents(2));
    let mut marks = Vec::new();
    run(&repo, "h", LedgerCommand::Open).await;
    for amount in [10, 20, 30, 40] {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let r = repo
            .execute::<Ledger>("h", &LedgerCommand::Credit(amount))
            .await
            .unwrap();
        // Another stream's event between commands, so positions are not dense per stream.
        append(
            &store,
            &stream("order-noise"),
            ExpectedVersion::Any,
            vec![event("A", 0)],
        )
        .await
        .unwrap();
        let stored = read(&store, &r.stream_id, ReadStream::backward().limit(1)).await;
        marks.push((
            r.version,
            r.positions[0],
            stored[0].recorded_at,
            r.aggregate.balance,
        ));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (version, position, at, balance) in marks {
        for as_of in [
            AsOf::Version(version),
            AsOf::Position(position),
            AsOf::Time(at),
        ] {
            let past = repo.load_as_of::<Ledger>("h", as_of).await.unwrap();
            assert_eq!(
                (past.version, past.aggregate.balance),
                (version, balance),
                "{as_of:?}"
            );
        }
    }
    let before = repo
        .load_as_of::<Ledger>(
            "h",
            AsOf::Time(chrono::Utc::now() - chrono::Duration::days(1)),
        )
        .await
        .unwrap();
    assert_eq!((before.version, before.aggregate), (0, Ledger::default()));
    let beyond = repo
        .load_as_of::<Ledger>("h", AsOf::Version(99))
        .await
        .unwrap();
    assert_eq!((beyond.version, beyond.aggregate.balance), (5, 100));
    let zero = repo
        .load_as_of::<Ledger>("h", AsOf::Version(0))
        .await
        .unwrap();
    assert_eq!(zero.version, 0);
}

/// Unknown types, corrupt payloads, failing upcasters and newer schemas in a stream are typed
/// errors that name the stream and version; the stored events stay readable.
pub async fn bad_stored_events_are_typed_errors<S: Store>(store: S) {
    let cases: Vec<(&str, NewEvent)> = vec![
        ("unknown", NewEvent::from_value("Exploded", 1, &json!({}))),
        (
            "corrupt",
            NewEvent::from_value("Debited", 1, &json!({ "amount": "lots" })),
        ),
        (
            "upcast",
            NewEvent::from_value("Credited", 1, &json!({ "amount": 1, "poison": true })),
        ),
        (
            "newer",
            NewEvent::from_value("Debited", 9, &json!({ "amount": 1 })),
        ),
    ];
    let repo = Repository::builder(store.clone())
        .upcaster::<Ledger>(upcast::map("Credited", 1, |mut payload| {
            if payload.get("poison").is_some() {
                return Err(upcast::UpcastError::InvalidField {
                    field: "poison",
                    reason: "a poisoned payload".to_owned(),
                });
            }
            payload["currency"] = json!("EUR");
            Ok(payload)
        }))
        .build()
        .unwrap();
    for (id, bad) in cases {
        let s = StreamId::new("ledger", id).unwrap();
        let good = NewEvent::from_value("Opened", 1, &json!({}));
        append(&store, &s, ExpectedVersion::NoStream, vec![good, bad])
            .await
            .unwrap();
        let err = repo.load::<Ledger>(id).await.unwrap_err();
        let RepositoryError::Decode(decode) = &err else {
            panic!("{id}: expected a decode error, got {err:?}");
        };
        let (on, version) = match decode {
            es_core::DecodeError::UnknownEventType {
                stream_id: stream,
                version,
                ..
            } if id == "unknown" => (stream, version),
            es_core::DecodeError::Payload {
                stream_id: stream,
                version,
                ..
            } if id == "corrupt" => (stream, version),
            es_core::DecodeError::Upcast {
                stream_id: stream,
                version,
                source,
                ..
            } if id == "upcast" => {
                assert!(
                    matches!(
                        source,
                        upcast::UpcastError::InvalidField {
                            field: "poison",
                            ..
                        }
                    ),
                    "{source}"
                );
                (stream, version)
            }
            es_core::DecodeError::SchemaVersion {
                stream_id: stream,
                version,
                stored_version: 9,
                ..
            } if id == "newer" => (stream, version),
            other => panic!("{id}: wrong decode error {other:?}"),
        };
        assert_eq!(
            (on, *version),
            (&s, 2),
            "{id}: the error names stream and version"
        );
        assert!(
            err.to_string().contains(s.as_str()),
            "{id}: message names the stream: {err}"
        );
        // A command on it fails the same way and writes nothing.
        let cmd = repo.execute::<Ledger>(id, &LedgerCommand::Credit(1)).await;
        assert!(
            matches!(cmd, Err(RepositoryError::Decode(_))),
            "{id}: {cmd:?}"
        );
        assert_eq!(
            read(&store, &s, ReadStream::forward()).await.len(),
            2,
            "{id}: nothing lost"
        );
    }
}

/// Concurrent commands on one aggregate all succeed through conflict retries.
pub async fn concurrent_commands_retry_conflicts<S: Store>(store: S) {
    let repo = repository(&store, SnapshotPolicy::EveryNEvents(5));
    run(&repo, "hot", LedgerCommand::Open).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            let mut attempts = 0;
            for _ in 0..15 {
                attempts += repo
                    .execute::<Ledger>("hot", &LedgerCommand::Credit(1))
                    .await
                    .unwrap()
                    .attempts;
            }
            attempts
        }));
    }
    let mut attempts = 0;
    for t in tasks {
        attempts += patiently("commands finish", t).await.unwrap();
    }
    assert!(attempts >= 120);
    let loaded = repo.load::<Ledger>("hot").await.unwrap();
    assert_eq!((loaded.version, loaded.aggregate.balance), (121, 120));
    let replay = repo.load_without_snapshot::<Ledger>("hot").await.unwrap();
    assert_eq!(replay.aggregate, loaded.aggregate);
}

// ---------------------------------------------------------------------------------------------
// Commands through the repository: one aggregate, many callers

/// Runs `tasks` commands at once on ledger `id`, each made by `command(i)`, through `repo`.
async fn race<S: Store>(
    repo: &Repository<S>,
    id: &str,
    tasks: usize,
    command: impl Fn(usize) -> (LedgerCommand, Metadata),
) -> Vec<Result<es_core::Executed<Ledger>, RepositoryError<LedgerError>>> {
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            let repo = repo.clone();
            let id = id.to_owned();
            let (command, metadata) = command(i);
            tokio::spawn(async move { repo.execute_with::<Ledger>(&id, &command, &metadata).await })
        })
        .collect();
    let mut results = Vec::new();
    for handle in handles {
        results.push(
            patiently("a racing command", handle)
                .await
                .expect("no panic"),
        );
    }
    results
}

/// 32 callers each take 1 of the 20 units of one aggregate at once, through a repository with
/// the default settings: every command ends in success or the domain error, none in a conflict,
/// exactly 20 succeed, and each success saw the state its predecessors left.
pub async fn commands_racing_for_stock_end_in_success_or_domain_error<S: Store>(store: S) {
    let repo = Repository::new(store.clone());
    run(&repo, "stock", LedgerCommand::Open).await;
    run(&repo, "stock", LedgerCommand::Credit(20)).await;
    let results = race(&repo, "stock", 32, |_| {
        (LedgerCommand::Debit(1), Metadata::default())
    })
    .await;
    let mut versions = Vec::new();
    let mut refused = 0;
    for result in results {
        match result {
            Ok(done) => {
                assert_eq!(done.attempts, 1, "no conflict within one repository");
                assert_eq!(
                    done.aggregate.balance,
                    20 - i64::try_from(done.version - 2).unwrap(),
                    "the state after the command at version {}",
                    done.version
                );
                versions.push(done.version);
            }
            Err(RepositoryError::Domain {
                source: LedgerError::InsufficientFunds { balance: 0, .. },
                ..
            }) => refused += 1,
            Err(other) => panic!("a command ended in {other:?}"),
        }
    }
    versions.sort_unstable();
    assert_eq!(
        versions,
        (3..=22).collect::<Vec<_>>(),
        "20 successes, one version each"
    );
    assert_eq!(refused, 12);
    let loaded = repo.load_without_snapshot::<Ledger>("stock").await.unwrap();
    assert_eq!((loaded.version, loaded.aggregate.balance), (22, 0));
}

/// Two repositories (two processes, as far as the store can tell) send commands to one aggregate
/// at once: every command succeeds (conflicts between them are retried), no update is lost, and
/// each repository's in-memory state follows the other's writes.
pub async fn two_repositories_on_one_aggregate_lose_no_update<S: Store>(store: S) {
    let patient = RetryPolicy {
        max_attempts: 1000,
        ..RetryPolicy::default()
    };
    let first = Repository::builder(store.clone())
        .retry_policy(patient)
        .build()
        .unwrap();
    let second = Repository::builder(store.clone())
        .retry_policy(patient)
        .build()
        .unwrap();
    run(&first, "shared", LedgerCommand::Open).await;
    let mut handles = Vec::new();
    for repo in [&first, &second] {
        for _ in 0..8 {
            let repo = repo.clone();
            handles.push(tokio::spawn(async move {
                for _ in 0..10 {
                    repo.execute::<Ledger>("shared", &LedgerCommand::Credit(1))
                        .await
                        .unwrap_or_else(|e| panic!("a credit failed: {e}"));
                }
            }));
        }
    }
    for handle in handles {
        patiently("the credits", handle).await.expect("no panic");
    }
    for repo in [&first, &second] {
        let loaded = repo
            .load_without_snapshot::<Ledger>("shared")
            .await
            .unwrap();
        assert_eq!((loaded.version, loaded.aggregate.balance), (161, 160));
    }
    // The next command of each decides on the stream as it is, not on a stale copy.
    for (repo, balance) in [(&first, 159), (&second, 158)] {
        let done = repo
            .execute::<Ledger>("shared", &LedgerCommand::Debit(1))
            .await
            .unwrap();
        assert_eq!(done.aggregate.balance, balance);
    }
}

/// A repository that keeps an aggregate in memory answers as if it had loaded it: another
/// writer's events are seen before a command is refused, and an append on a stale copy is
/// retried on the fresh state.
pub async fn a_cached_aggregate_follows_another_writer<S: Store>(store: S) {
    let cached = Repository::new(store.clone());
    let other = Repository::builder(store.clone())
        .cache_capacity(0)
        .build()
        .unwrap();
    run(&cached, "acct", LedgerCommand::Open).await;
    run(&cached, "acct", LedgerCommand::Credit(5)).await;
    run(&other, "acct", LedgerCommand::Credit(10)).await;
    // On the copy in memory (balance 5) this debit would be refused.
    let done = cached
        .execute::<Ledger>("acct", &LedgerCommand::Debit(12))
        .await
        .expect("the debit sees the other writer's credit");
    assert_eq!((done.version, done.aggregate.balance), (4, 3));
    run(&other, "acct", LedgerCommand::Credit(1)).await;
    // Emitting events on a stale copy: the append conflicts, the aggregate is loaded again.
    let done = cached
        .execute::<Ledger>("acct", &LedgerCommand::Credit(1))
        .await
        .unwrap();
    assert_eq!(
        (done.version, done.aggregate.balance, done.attempts),
        (6, 5, 2)
    );
    // And a refusal decided on a stale copy is checked against the stream first.
    run(&other, "acct", LedgerCommand::Debit(5)).await;
    let refused = cached
        .execute::<Ledger>("acct", &LedgerCommand::Debit(1))
        .await;
    assert!(
        matches!(
            refused,
            Err(RepositoryError::Domain {
                version: 7,
                source: LedgerError::InsufficientFunds { balance: 0, .. },
                ..
            })
        ),
        "{refused:?}"
    );
}

/// One command the store refuses (its metadata is over the limit) among commands appended with
/// it: it alone fails, with the store's error, and the others are stored.
pub async fn a_refused_command_does_not_fail_those_batched_with_it<S: Store>(store: S) {
    let repo = Repository::new(store.clone());
    run(&repo, "mixed", LedgerCommand::Open).await;
    let mut huge = Metadata::default();
    huge.custom.insert(
        "blob".into(),
        json!("x".repeat(AppendLimits::default().max_metadata_bytes + 1)),
    );
    let results = race(&repo, "mixed", 16, |i| {
        let metadata = if i == 5 {
            huge.clone()
        } else {
            Metadata::default()
        };
        (LedgerCommand::Credit(1), metadata)
    })
    .await;
    for (i, result) in results.iter().enumerate() {
        if i == 5 {
            assert!(
                matches!(
                    result,
                    Err(RepositoryError::Store {
                        source: StoreError::InvalidRequest { .. },
                        ..
                    })
                ),
                "the oversized command: {result:?}"
            );
        } else {
            assert!(result.is_ok(), "command {i}: {result:?}");
        }
    }
    let loaded = repo.load_without_snapshot::<Ledger>("mixed").await.unwrap();
    assert_eq!((loaded.version, loaded.aggregate.balance), (16, 15));
}

/// Callers that give up (their futures dropped) while their commands wait or are being appended
/// do not stall the others, and the stream stays whole: each stored credit is one command.
pub async fn cancelled_commands_do_not_stall_the_others<S: Store>(store: S) {
    let repo = Repository::new(store.clone());
    run(&repo, "cancel", LedgerCommand::Open).await;
    let handles: Vec<_> = (0..24)
        .map(|_| {
            let repo = repo.clone();
            tokio::spawn(async move {
                repo.execute::<Ledger>("cancel", &LedgerCommand::Credit(1))
                    .await
            })
        })
        .collect();
    tokio::task::yield_now().await;
    let mut finished = 0;
    for (i, handle) in handles.into_iter().enumerate() {
        if i % 2 == 0 {
            handle.abort();
            // An aborted command may still have been stored.
            let _ = handle.await;
        } else {
            patiently("a command next to cancelled ones", handle)
                .await
                .expect("no panic")
                .expect("the command succeeds");
            finished += 1;
        }
    }
    assert_eq!(finished, 12);
    let done = patiently(
        "a command after the cancellations",
        repo.execute::<Ledger>("cancel", &LedgerCommand::Credit(1)),
    )
    .await
    .unwrap();
    let loaded = repo
        .load_without_snapshot::<Ledger>("cancel")
        .await
        .unwrap();
    assert_eq!(loaded.version, done.version);
    assert_eq!(
        loaded.aggregate.balance,
        i64::try_from(loaded.version).unwrap() - 1
    );
    assert!((14..=26).contains(&loaded.version), "{}", loaded.version);
}
