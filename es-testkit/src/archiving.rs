//! Archiving ([`EventStore::archive_stream`]): the conformance cases, stamped onto a backend by
//! [`archiving_conformance_tests!`](crate::archiving_conformance_tests).
//!
//! The promise under test: archiving moves where events are kept and never what a reader sees.
//! Each case records what every kind of read returns, archives, and compares; the last case
//! archives while writers append and readers page through the same streams and the feed.
//!
//! Every `pub async fn` at the top of this module is a case (the build script lists them);
//! helpers are private.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use uuid::Uuid;

use es_core::{
    AppendRequest, Archived, AsOf, EventFilter, EventStore, ExpectedVersion, FeedPosition,
    ListStreams, NewEvent, ReadAll, ReadStream, RecordedEvent, Repository, SnapshotPolicy, Store,
    StoreError, StreamId,
};

use crate::domain::{Ledger, LedgerCommand};
use crate::support::{check_feed, patiently, poll_until_done, tail_until_done, DONE};

/// How long any single wait in the suite may take before the case fails.
const PATIENCE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Helpers

fn stream(category: &str, id: &str) -> StreamId {
    StreamId::new(category, id).expect("valid stream id")
}

fn event(n: u64) -> NewEvent {
    let event_type = if n % 3 == 0 { "Debited" } else { "Credited" };
    NewEvent::from_value(
        event_type,
        1,
        &json!({ "n": n, "note": "x".repeat((n % 7) as usize) }),
    )
}

async fn append<S: EventStore>(store: &S, stream: &StreamId, count: u64) -> Vec<Uuid> {
    let version = store
        .stream_version(stream)
        .await
        .unwrap_or_else(|e| panic!("version of `{stream}`: {e}"));
    let events: Vec<NewEvent> = (version + 1..=version + count).map(event).collect();
    let ids = events.iter().map(|e| e.event_id).collect();
    store
        .append(AppendRequest::new(
            stream.clone(),
            ExpectedVersion::Exact(version),
            events,
        ))
        .await
        .unwrap_or_else(|e| panic!("appending to `{stream}` failed: {e}"));
    ids
}

async fn archive<S: EventStore>(store: &S, stream: &StreamId, before: u64) -> Archived {
    store
        .archive_stream(stream, before)
        .await
        .unwrap_or_else(|e| panic!("archiving `{stream}` before {before} failed: {e}"))
}

async fn collect(events: es_core::EventStream, what: &str) -> Vec<RecordedEvent> {
    events
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("{what} failed: {e}"))
}

/// The versions a load's pages ([`EventStore::read_stream_pages`]) hold, in order.
async fn page_versions<S: EventStore>(store: &S, stream: &StreamId, read: ReadStream) -> Vec<u64> {
    let mut pages = store.read_stream_pages(stream, read);
    let mut versions = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.unwrap_or_else(|e| panic!("pages of `{stream}` failed: {e}"));
        for i in 0..page.len() {
            let event = page
                .event(i)
                .unwrap_or_else(|e| panic!("event {i} of a page of `{stream}`: {e}"));
            versions.push(event.stream_version);
        }
    }
    versions
}

/// A read of partition `partition`'s feed (the whole feed of a single-feed store).
fn feed_read(store: &impl EventStore, partition: u32, after: u64) -> ReadAll {
    let read = ReadAll::after(after);
    if store.partitioning().is_single() {
        read
    } else {
        read.partition(partition)
    }
}

/// The whole feed, partition by partition, read in pages of `page` events (`None`: one read).
async fn feed<S: EventStore>(
    store: &S,
    filter: &EventFilter,
    page: Option<u64>,
) -> Vec<RecordedEvent> {
    let mut all = Vec::new();
    for partition in store.partitioning().partitions() {
        let mut after = 0;
        loop {
            let mut read = feed_read(store, partition, after).filter(filter.clone());
            if let Some(page) = page {
                read = read.limit(page);
            }
            let events = collect(store.read_all(read), "read_all").await;
            let Some(last) = events.last() else { break };
            after = last.global_position;
            let full = page.is_some_and(|p| events.len() as u64 == p);
            all.extend(events);
            if !full {
                break;
            }
        }
    }
    all
}

/// What every read of `streams` and of the feed returns, to compare before and after archiving.
#[derive(Debug, PartialEq)]
struct Reads {
    streams: Vec<Vec<Vec<RecordedEvent>>>,
    pages: Vec<Vec<u64>>,
    versions: Vec<u64>,
    listed: Vec<(StreamId, u64)>,
    feeds: Vec<Vec<RecordedEvent>>,
}

async fn reads<S: EventStore>(store: &S, streams: &[StreamId]) -> Reads {
    let mut all = Reads {
        streams: Vec::new(),
        pages: Vec::new(),
        versions: Vec::new(),
        listed: Vec::new(),
        feeds: Vec::new(),
    };
    for s in streams {
        let mut kinds = Vec::new();
        for read in [
            ReadStream::forward(),
            ReadStream::backward(),
            ReadStream::forward().from(7).limit(9),
            ReadStream::forward().from(30),
            ReadStream::backward().from(33).limit(12),
            ReadStream::backward().from(5),
        ] {
            kinds.push(collect(store.read_stream(s, read), "read_stream").await);
        }
        all.streams.push(kinds);
        all.pages
            .push(page_versions(store, s, ReadStream::forward()).await);
        all.pages
            .push(page_versions(store, s, ReadStream::backward().from(20)).await);
        all.versions.push(store.stream_version(s).await.unwrap());
    }
    let listed = store.list_streams(ListStreams::all()).await.unwrap();
    all.listed = listed
        .streams
        .into_iter()
        .map(|s| (s.stream_id, s.version))
        .collect();
    for filter in [
        EventFilter::all(),
        EventFilter::all().category("cold"),
        EventFilter::all().event_type("Debited"),
        EventFilter::all().category("cold").category("warm"),
    ] {
        all.feeds.push(feed(store, &filter, None).await);
        all.feeds.push(feed(store, &filter, Some(5)).await);
    }
    all
}

/// Follows the feed from the start until it has delivered `count` events.
async fn follow<S: EventStore>(store: &S, count: usize) -> Vec<RecordedEvent> {
    let partitioning = store.partitioning();
    let events = if partitioning.is_single() {
        store.subscribe(0, EventFilter::all())
    } else {
        store.subscribe_all(&FeedPosition::start(&partitioning), EventFilter::all())
    };
    let taken = events.take(count).try_collect::<Vec<_>>();
    patiently("a subscription from the start", PATIENCE, taken)
        .await
        .unwrap_or_else(|e| panic!("the subscription failed: {e}"))
}

fn ledger_repository<S: Store>(store: &S) -> Repository<S> {
    Repository::builder(store.clone())
        .snapshot_policy::<Ledger>(SnapshotPolicy::EveryNEvents(10))
        .build()
        .expect("a repository without upcasters")
}

/// Reads `long` (3,000 events) whole, forward, backward and as a load's pages, again and again
/// until `stop` (three times at least), checking every read; returns how many rounds it made.
fn read_while_archived<S: Store>(
    store: &S,
    long: &StreamId,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    let (store, long, stop) = (store.clone(), long.clone(), Arc::clone(stop));
    tokio::spawn(async move {
        let mut rounds = 0_u64;
        while !stop.load(Ordering::Relaxed) || rounds < 3 {
            let forward: Vec<u64> = collect(
                store.read_stream(&long, ReadStream::forward()),
                "forward read",
            )
            .await
            .iter()
            .map(|e| e.stream_version)
            .collect();
            assert_eq!(forward, (1..=3000).collect::<Vec<_>>(), "a forward read");
            let backward: Vec<u64> = collect(
                store.read_stream(&long, ReadStream::backward()),
                "backward read",
            )
            .await
            .iter()
            .map(|e| e.stream_version)
            .collect();
            assert_eq!(
                backward,
                (1..=3000).rev().collect::<Vec<_>>(),
                "a backward read"
            );
            let pages = page_versions(&store, &long, ReadStream::forward()).await;
            assert_eq!(pages, (1..=3000).collect::<Vec<_>>(), "a load's pages");
            rounds += 1;
        }
        rounds
    })
}

/// Archives `long` a hundred versions at a time, then the writers' streams up to their current
/// version, round after round until `stop`; returns how many events it moved.
fn archive_while_written<S: Store>(
    store: &S,
    long: &StreamId,
    writers: usize,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    let (store, long, stop) = (store.clone(), long.clone(), Arc::clone(stop));
    tokio::spawn(async move {
        let mut moved = 0;
        for before in (100..=3000).step_by(100) {
            moved += archive(&store, &long, before).await.moved;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let streams: Vec<StreamId> = (0..writers)
            .map(|w| stream("warm", &format!("w{w}")))
            .collect();
        while !stop.load(Ordering::Relaxed) {
            for s in &streams {
                let version = store.stream_version(s).await.unwrap();
                if version > 0 {
                    moved += archive(&store, s, version).await.moved;
                }
            }
            tokio::task::yield_now().await;
        }
        moved
    })
}

// ---------------------------------------------------------------------------------------------
// Cases

/// Archiving changes no read: stream reads in both directions, from any version, with limits,
/// a load's pages, versions, the stream list, the feed with and without filters (whole and in
/// small pages) and a subscription from the start return exactly what they returned before.
pub async fn archiving_changes_no_read<S: Store>(store: S) {
    let cold = stream("cold", "a");
    let warm = stream("warm", "b");
    let other = stream("other", "c");
    // Interleaved, so that the archived events of one stream lie between hot ones of others.
    for round in 0..8 {
        append(&store, &cold, 5).await;
        append(&store, &warm, 5).await;
        if round % 2 == 0 {
            append(&store, &other, 1).await;
        }
    }
    let streams = [cold.clone(), warm.clone(), other.clone()];
    let before = reads(&store, &streams).await;
    let total = before.feeds[0].len();
    assert_eq!(total, 84, "the history the case wrote");

    let all_but_last = archive(&store, &cold, 40).await;
    assert_eq!(
        all_but_last,
        Archived {
            moved: 39,
            hot_from: 40
        }
    );
    assert_eq!(archive(&store, &warm, 20).await.moved, 19);
    assert_eq!(
        archive(&store, &warm, 35).await,
        Archived {
            moved: 15,
            hot_from: 35
        }
    );
    assert_eq!(
        archive(&store, &other, 1).await,
        Archived {
            moved: 0,
            hot_from: 1
        }
    );

    let after = reads(&store, &streams).await;
    for (i, (was, is)) in before.streams.iter().zip(&after.streams).enumerate() {
        assert_eq!(was, is, "the reads of `{}` changed", streams[i]);
    }
    assert_eq!(before.pages, after.pages, "a load's pages changed");
    assert_eq!(before.versions, after.versions, "versions changed");
    assert_eq!(before.listed, after.listed, "the stream list changed");
    for (i, (was, is)) in before.feeds.iter().zip(&after.feeds).enumerate() {
        assert_eq!(
            was.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            is.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            "feed read {i} changed"
        );
        assert_eq!(was, is, "feed read {i} changed");
    }
    let followed = follow(&store, total).await;
    assert_eq!(
        followed.iter().map(|e| e.event_id).collect::<HashSet<_>>(),
        before.feeds[0].iter().map(|e| e.event_id).collect(),
        "a subscription from the start delivers every event, archived or not"
    );

    // The store goes on: appends after archiving take the next versions.
    append(&store, &cold, 2).await;
    let versions: Vec<u64> = collect(store.read_stream(&cold, ReadStream::forward()), "read")
        .await
        .iter()
        .map(|e| e.stream_version)
        .collect();
    assert_eq!(versions, (1..=42).collect::<Vec<_>>());
}

/// Requests that would move a stream's last event, or that name a stream with no events, are
/// [`StoreError::InvalidArchive`] and move nothing; repeated and lower requests move nothing
/// more; a conflict after archiving reports the true version; an exact retry of an archived
/// batch never writes it twice.
pub async fn archiving_is_checked_and_idempotent<S: Store>(store: S) {
    let s = stream("cold", "checked");
    match store.archive_stream(&s, 1).await {
        Err(StoreError::InvalidArchive { stream_id, .. }) => assert_eq!(stream_id, s),
        other => panic!("archiving a stream with no events: {other:?}"),
    }
    let first = NewEvent::from_value("Credited", 1, &json!({ "n": 1 }));
    let first_id = first.event_id;
    let first_batch = AppendRequest::new(s.clone(), ExpectedVersion::NoStream, vec![first]);
    store.append(first_batch.clone()).await.unwrap();
    append(&store, &s, 9).await;

    for too_far in [11, 12, u64::MAX] {
        match store.archive_stream(&s, too_far).await {
            Err(StoreError::InvalidArchive { stream_id, reason }) => {
                assert_eq!(stream_id, s);
                assert!(
                    reason.contains("10"),
                    "the reason names the version: {reason}"
                );
            }
            other => panic!("archiving before {too_far} of 10 events: {other:?}"),
        }
    }
    let nothing = Archived {
        moved: 0,
        hot_from: 1,
    };
    assert_eq!(archive(&store, &s, 0).await, nothing);
    assert_eq!(archive(&store, &s, 1).await, nothing);
    let six = Archived {
        moved: 5,
        hot_from: 6,
    };
    assert_eq!(archive(&store, &s, 6).await, six);
    let again = Archived {
        moved: 0,
        hot_from: 6,
    };
    assert_eq!(archive(&store, &s, 6).await, again);
    assert_eq!(archive(&store, &s, 3).await, again);
    assert_eq!(archive(&store, &s, 1).await, again);
    assert_eq!(
        archive(&store, &s, 10).await,
        Archived {
            moved: 4,
            hot_from: 10
        }
    );

    let stale = NewEvent::from_value("Credited", 1, &json!({ "n": 0 }));
    match store
        .append(AppendRequest::new(
            s.clone(),
            ExpectedVersion::Exact(9),
            vec![stale],
        ))
        .await
    {
        Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, 10),
        other => panic!("a stale append after archiving: {other:?}"),
    }
    // The first batch, re-sent after it was archived: recognized or refused, never stored twice.
    match store.append(first_batch).await {
        Ok(result) => assert!(result.duplicate, "a retry is reported as one: {result:?}"),
        Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, 10),
        Err(other) => panic!("re-sending an archived batch: {other}"),
    }
    let events = collect(store.read_stream(&s, ReadStream::forward()), "read").await;
    assert_eq!(
        events.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        events.iter().filter(|e| e.event_id == first_id).count(),
        1,
        "the archived event is stored once"
    );
    assert_eq!(store.stream_version(&s).await.unwrap(), 10);
}

/// Aggregates load the same after archiving: the latest state (from the snapshot and hot
/// events), every past state by version, position and time, and a replay without snapshots; the
/// repository archives exactly what its snapshot covers.
pub async fn archived_aggregates_load_at_every_point<S: Store>(store: S) {
    let repo = ledger_repository(&store);
    repo.execute::<Ledger>("acct", &LedgerCommand::Open)
        .await
        .unwrap();
    let mut marks = Vec::new();
    for amount in 1..=24 {
        let command = if amount % 4 == 0 {
            LedgerCommand::Debit(amount)
        } else {
            LedgerCommand::Credit(amount * 10)
        };
        let executed = repo.execute::<Ledger>("acct", &command).await.unwrap();
        marks.push(executed.version);
    }
    let stream_id = Repository::<S>::stream_id::<Ledger>("acct").unwrap();
    let history = collect(store.read_stream(&stream_id, ReadStream::forward()), "read").await;
    let mut past = Vec::new();
    for event in &history {
        for as_of in [
            AsOf::Version(event.stream_version),
            AsOf::Position(event.global_position),
            AsOf::Time(event.recorded_at),
        ] {
            let loaded = repo.load_as_of::<Ledger>("acct", as_of).await.unwrap();
            past.push((loaded.version, loaded.aggregate));
        }
    }
    let latest = repo.load::<Ledger>("acct").await.unwrap();
    let replayed = repo.load_without_snapshot::<Ledger>("acct").await.unwrap();
    assert_eq!(latest.aggregate, replayed.aggregate);

    let archived = repo
        .archive_behind_snapshot::<Ledger>("acct")
        .await
        .unwrap();
    let snapshot = store
        .load_snapshot(&stream_id)
        .await
        .unwrap()
        .expect("a snapshot");
    assert_eq!(
        archived,
        Archived {
            moved: snapshot.version,
            hot_from: snapshot.version + 1
        },
        "everything the snapshot at {} covers moved",
        snapshot.version
    );

    let fresh = ledger_repository(&store);
    let mut again = Vec::new();
    for event in &history {
        for as_of in [
            AsOf::Version(event.stream_version),
            AsOf::Position(event.global_position),
            AsOf::Time(event.recorded_at),
        ] {
            let loaded = fresh.load_as_of::<Ledger>("acct", as_of).await.unwrap();
            again.push((loaded.version, loaded.aggregate));
        }
    }
    assert_eq!(past, again, "a past state changed");
    let reloaded = fresh.load::<Ledger>("acct").await.unwrap();
    assert_eq!(
        (reloaded.version, &reloaded.aggregate),
        (latest.version, &latest.aggregate)
    );
    let replayed_again = fresh.load_without_snapshot::<Ledger>("acct").await.unwrap();
    assert_eq!(replayed_again.aggregate, latest.aggregate);
    assert_eq!(replayed_again.events_read, latest.version);
    // And commands go on.
    let next = fresh
        .execute::<Ledger>("acct", &LedgerCommand::Credit(5))
        .await
        .unwrap();
    assert_eq!(next.version, latest.version + 1);
}

/// Archiving races everything else: writers append to their streams, two tasks (as two
/// processes would) archive each stream up to its current version again and again, another reads a long stream forward,
/// backward and as a load's pages while it is archived piece by piece, a subscription and a
/// reader polling `read_all` in small pages follow the feed from the start. Every reader sees
/// every acknowledged event exactly once, in order, with no gap.
pub async fn archiving_races_appends_and_readers<S: Store>(store: S) {
    const WRITERS: usize = 4;
    const BATCHES: usize = 40;
    let long = stream("cold", "long");
    let mut written: HashSet<Uuid> = HashSet::new();
    for _ in 0..30 {
        written.extend(append(&store, &long, 100).await);
    }
    let feed = tail_until_done(&store);
    let poller = poll_until_done(&store, 7);

    let stop = Arc::new(AtomicBool::new(false));
    let reader = read_while_archived(&store, &long, &stop);
    // Two archivers on the same streams, as two processes would: each event is moved once.
    let archivers = [
        archive_while_written(&store, &long, WRITERS, &stop),
        archive_while_written(&store, &long, WRITERS, &stop),
    ];
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let s = stream("warm", &format!("w{w}"));
                let mut ids = Vec::new();
                for batch in 0..BATCHES {
                    ids.extend(append(&store, &s, 1 + (batch % 3) as u64).await);
                }
                ids
            })
        })
        .collect();
    for writer in writers {
        written.extend(patiently("a writer", PATIENCE, writer).await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let mut moved = 0;
    for archiver in archivers {
        moved += patiently("an archiver", PATIENCE, archiver).await.unwrap();
    }
    let rounds = patiently("the reader", PATIENCE, reader).await.unwrap();
    assert!(rounds >= 3, "the long stream was read {rounds} times");
    let done = NewEvent::from_value(DONE, 1, &json!({}));
    written.insert(done.event_id);
    store
        .append(AppendRequest::new(
            stream("warm", "done"),
            ExpectedVersion::NoStream,
            vec![done],
        ))
        .await
        .unwrap();

    let followed = patiently("the subscription", PATIENCE, feed).await.unwrap();
    check_feed("the subscription", &followed, &written);
    let paged = patiently("the poller", PATIENCE, poller).await.unwrap();
    check_feed("read_all in pages of 7", &paged, &written);

    let mut counted = 0;
    for s in (0..WRITERS)
        .map(|w| stream("warm", &format!("w{w}")))
        .chain([long])
    {
        let events = collect(store.read_stream(&s, ReadStream::forward()), "read").await;
        let version = events.len() as u64;
        assert_eq!(
            events.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
            (1..=version).collect::<Vec<_>>(),
            "`{s}` after the race"
        );
        counted += archive(&store, &s, 1).await.hot_from - 1;
    }
    assert_eq!(
        counted, moved,
        "every event was moved once, by one of the two archivers"
    );
    assert!(moved >= 2999, "the archiver moved {moved} events");
}

/// A closed stream archived up to its tombstone stays closed: the tombstone is the hot event,
/// every later append is still [`StoreError::StreamClosed`], and the aggregate loads closed,
/// with its state, from the archive.
pub async fn archived_closed_streams_stay_closed<S: Store>(store: S) {
    let repo = ledger_repository(&store);
    repo.execute::<Ledger>("gone", &LedgerCommand::Open)
        .await
        .unwrap();
    for amount in 1..=12 {
        repo.execute::<Ledger>("gone", &LedgerCommand::Credit(amount))
            .await
            .unwrap();
    }
    let open = repo.load::<Ledger>("gone").await.unwrap();
    repo.close::<Ledger>("gone", &es_core::Metadata::default())
        .await
        .unwrap();
    let stream_id = Repository::<S>::stream_id::<Ledger>("gone").unwrap();
    let version = store.stream_version(&stream_id).await.unwrap();
    assert_eq!(
        version,
        open.version + 1,
        "the tombstone took the next version"
    );
    assert_eq!(
        archive(&store, &stream_id, version).await,
        Archived {
            moved: version - 1,
            hot_from: version
        }
    );
    for expected in [
        ExpectedVersion::Any,
        ExpectedVersion::Exact(version),
        ExpectedVersion::StreamExists,
    ] {
        let late = NewEvent::from_value("Credited", 1, &json!({ "n": 0 }));
        match store
            .append(AppendRequest::new(stream_id.clone(), expected, vec![late]))
            .await
        {
            Err(StoreError::StreamClosed { version: at, .. }) => assert_eq!(at, version),
            other => panic!("an append ({expected:?}) to an archived closed stream: {other:?}"),
        }
    }
    let fresh = ledger_repository(&store);
    let loaded = fresh.load_without_snapshot::<Ledger>("gone").await.unwrap();
    assert!(loaded.closed, "the archived stream loads closed");
    assert_eq!(loaded.aggregate, open.aggregate);
    let events = collect(
        store.read_stream(&stream_id, ReadStream::backward()),
        "read",
    )
    .await;
    assert_eq!(events.len() as u64, version);
    assert_eq!(events[0].event_type, es_core::CLOSED_EVENT_TYPE);
}
