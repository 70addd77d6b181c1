//! Closing streams: the conformance cases, stamped onto a backend by
//! [`closing_conformance_tests!`](crate::closing_conformance_tests).
//!
//! A stream is closed by its tombstone ([`NewEvent::closing`]), appended like any event, last in
//! its batch. The cases try to break what closing promises: nothing ever follows the tombstone,
//! whatever the expected version of a later append and however it races the close (appenders
//! with `Any` while another task closes, closers racing each other, a close whose reply was
//! lost and that is sent again); every refused append gets [`StoreError::StreamClosed`] and
//! writes nothing, in a multi-stream append too; an exact retry of a stored batch, the close
//! included, still returns its first result; and a closed stream reads, loads (as of any point
//! too), feeds subscribers and lists like any other, while the repository refuses commands on
//! it with [`RepositoryError::Closed`], never as a conflict.
//!
//! Every case takes a fresh, empty store, single-feed or partitioned: streams that one call
//! appends to together are picked in one feed partition. Every `pub async fn` at the top of this
//! module is a case (the build script lists them); helpers are private.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use tokio::sync::Barrier;
use uuid::Uuid;

use es_core::{
    Aggregate, AppendRequest, AppendResult, AsOf, EventFilter, EventStore, ExpectedVersion,
    FeedPosition, ListStreams, Metadata, NewEvent, ReadAll, ReadStream, RecordedEvent, Repository,
    RepositoryError, SnapshotPolicy, Store, StoreError, StreamId, CLOSED_EVENT_TYPE,
};

use crate::domain::{Ledger, LedgerCommand};
use crate::support::patiently;

/// How long any single wait in the suite may take before the case fails.
const PATIENCE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Helpers

fn stream(id: &str) -> StreamId {
    StreamId::new("account", id).expect("valid stream id")
}

fn event(event_type: &str, n: u64) -> NewEvent {
    NewEvent::from_value(event_type, 1, &json!({ "n": n }))
}

fn append(stream: &StreamId, expected: ExpectedVersion, events: Vec<NewEvent>) -> AppendRequest {
    AppendRequest::new(stream.clone(), expected, events)
}

/// Another stream of the category `account` in the same feed partition as `stream`, so that a
/// multi-stream append may write both on every store.
fn partner<S: EventStore>(store: &S, stream: &StreamId, name: &str) -> StreamId {
    let partitioning = store.partitioning();
    let partition = partitioning.partition_of(stream);
    (0..10_000)
        .map(|n| StreamId::new("account", &format!("{name}{n}")).expect("valid stream id"))
        .find(|s| partitioning.partition_of(s) == partition)
        .expect("a stream in the same partition")
}

async fn read<S: EventStore>(store: &S, stream: &StreamId, read: ReadStream) -> Vec<RecordedEvent> {
    store
        .read_stream(stream, read)
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("reading `{stream}` failed: {e}"))
}

/// Every event of `stream`'s feed partition, in feed order.
async fn partition_feed<S: EventStore>(store: &S, stream: &StreamId) -> Vec<RecordedEvent> {
    let partitioning = store.partitioning();
    let read = if partitioning.is_single() {
        ReadAll::after(0)
    } else {
        ReadAll::after(0).partition(partitioning.partition_of(stream))
    };
    store
        .read_all(read)
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("read_all failed: {e}"))
}

/// Asserts that `result` is `StreamClosed` for `stream` at `version`.
#[track_caller]
fn assert_closed<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    stream: &StreamId,
    version: u64,
    what: &str,
) {
    match result {
        Err(StoreError::StreamClosed {
            stream_id,
            version: v,
        }) => {
            assert_eq!(&stream_id, stream, "{what}: the error names the stream");
            assert_eq!(
                v, version,
                "{what}: the error names the tombstone's version"
            );
        }
        other => panic!("{what}: expected StreamClosed on `{stream}`, got {other:?}"),
    }
}

/// The stream's events, checking that its last is its only tombstone, at `version`, with `id`.
async fn closed_stream<S: EventStore>(
    store: &S,
    stream: &StreamId,
    version: u64,
    id: Uuid,
) -> Vec<RecordedEvent> {
    let events = read(store, stream, ReadStream::forward()).await;
    let tombstones: Vec<&RecordedEvent> = events.iter().filter(|e| e.is_tombstone()).collect();
    assert_eq!(
        tombstones.len(),
        1,
        "`{stream}` holds exactly one tombstone"
    );
    let last = events.last().expect("a closed stream has events");
    assert!(
        last.is_tombstone(),
        "the tombstone is `{stream}`'s last event"
    );
    assert_eq!(last.event_type, CLOSED_EVENT_TYPE);
    assert_eq!(last.event_id, id, "the tombstone is the one sent");
    assert_eq!(last.stream_version, version, "the tombstone's version");
    assert_eq!(
        store.stream_version(stream).await.expect("stream_version"),
        version,
        "the stream's version is its tombstone's"
    );
    events
}

/// Every kind of expected version an append to a stream at `version` can state, matching or
/// not.
fn every_expectation(version: u64) -> Vec<ExpectedVersion> {
    vec![
        ExpectedVersion::Any,
        ExpectedVersion::NoStream,
        ExpectedVersion::StreamExists,
        ExpectedVersion::Exact(0),
        ExpectedVersion::Exact(version - 1),
        ExpectedVersion::Exact(version),
        ExpectedVersion::Exact(version + 1),
        ExpectedVersion::Exact(u64::from(u32::MAX)),
    ]
}

// ---------------------------------------------------------------------------------------------
// Cases

/// A closed stream refuses every later append, whatever its expected version (the one that
/// matches included), with one event or several or none, and another close: each with
/// `StreamClosed` naming the stream and its tombstone's version, not transient, and nothing is
/// written. The close itself took a version and a feed position like any event.
pub async fn a_closed_stream_refuses_every_later_append<S: Store>(store: S) {
    let s = stream("refuse");
    store
        .append(append(
            &s,
            ExpectedVersion::NoStream,
            vec![event("Opened", 1), event("Credited", 2)],
        ))
        .await
        .expect("two events");
    let close = AppendRequest::close(s.clone(), ExpectedVersion::Exact(2))
        .because(Metadata::new().with("reason", "account moved"));
    let tombstone = close.events[0].event_id;
    assert!(close.closes());
    let closed = store.append(close).await.expect("the close");
    assert_eq!(
        closed.stream_version, 3,
        "the tombstone takes the next version"
    );
    assert_eq!(closed.positions.len(), 1, "and a feed position");
    assert!(!closed.duplicate);

    for expected in every_expectation(3) {
        for events in [
            vec![event("Credited", 3)],
            vec![event("Credited", 4), event("Debited", 5)],
            Vec::new(),
            vec![NewEvent::closing()],
        ] {
            let what = format!("{} events expecting {expected}", events.len());
            let result = store.append(append(&s, expected, events)).await;
            if let Err(err) = &result {
                assert!(!err.is_transient(), "{what}: StreamClosed is not transient");
            }
            assert_closed(result, &s, 3, &what);
        }
    }
    let events = closed_stream(&store, &s, 3, tombstone).await;
    assert_eq!(events.len(), 3, "nothing was written after the close");
    assert_eq!(
        events[2].metadata.custom.get("reason"),
        Some(&json!("account moved")),
        "the tombstone keeps its metadata"
    );
    assert_eq!(events[2].global_position, closed.positions[0]);
}

/// A stream can be closed before it has any event (`NoStream`), and by an append of several
/// events whose last is the tombstone (they are all written, then the stream is closed).
pub async fn a_stream_is_closed_by_a_tombstone_alone_or_after_events<S: Store>(store: S) {
    let empty = stream("never-used");
    let close = AppendRequest::close(empty.clone(), ExpectedVersion::NoStream);
    let id = close.events[0].event_id;
    let result = store.append(close).await.expect("closing an empty stream");
    assert_eq!(result.stream_version, 1);
    assert_closed(
        store
            .append(append(
                &empty,
                ExpectedVersion::Exact(1),
                vec![event("Opened", 1)],
            ))
            .await,
        &empty,
        1,
        "after closing an empty stream",
    );
    closed_stream(&store, &empty, 1, id).await;

    let full = stream("last-words");
    let tombstone = NewEvent::closing();
    let id = tombstone.event_id;
    let result = store
        .append(append(
            &full,
            ExpectedVersion::NoStream,
            vec![event("Opened", 1), event("Debited", 2), tombstone],
        ))
        .await
        .expect("events and the tombstone in one batch");
    assert_eq!(result.stream_version, 3);
    assert_eq!(result.positions.len(), 3);
    let events = closed_stream(&store, &full, 3, id).await;
    assert_eq!(events[0].event_type, "Opened");
    assert_eq!(events[1].event_type, "Debited");
    assert_closed(
        store
            .append(append(
                &full,
                ExpectedVersion::Any,
                vec![event("Credited", 3)],
            ))
            .await,
        &full,
        3,
        "after a batch that closed",
    );
}

/// The tombstone must be the last event of its batch (else `InvalidRequest`), and event types
/// beginning with `$` other than the tombstone's are refused (`ReservedEventType`): in a plain
/// append and in a multi-stream append, nothing is written and the stream stays open.
pub async fn a_misplaced_tombstone_or_reserved_type_is_refused<S: Store>(store: S) {
    let s = stream("misplaced");
    let other = partner(&store, &s, "misplaced-partner");
    let misplaced = || vec![NewEvent::closing(), event("Credited", 1)];
    match store
        .append(append(&s, ExpectedVersion::Any, misplaced()))
        .await
    {
        Err(StoreError::InvalidRequest { stream_id, reason }) => {
            assert_eq!(stream_id, s);
            assert!(reason.contains("last"), "{reason}");
        }
        other => panic!("a tombstone before another event: {other:?}"),
    }
    let reserved = NewEvent::from_value("$reopened", 1, &json!({}));
    let reserved_id = reserved.event_id;
    match store
        .append(append(&s, ExpectedVersion::Any, vec![reserved]))
        .await
    {
        Err(StoreError::ReservedEventType {
            stream_id,
            event_id,
            event_type,
        }) => {
            assert_eq!(stream_id, s);
            assert_eq!(event_id, reserved_id);
            assert_eq!(event_type, "$reopened");
        }
        other => panic!("a reserved event type: {other:?}"),
    }
    let multi = store
        .append_streams(vec![
            append(&other, ExpectedVersion::Any, vec![event("Credited", 1)]),
            append(&s, ExpectedVersion::Any, misplaced()),
        ])
        .await;
    assert!(
        matches!(&multi, Err(StoreError::InvalidRequest { stream_id, .. }) if *stream_id == s),
        "a misplaced tombstone in a multi-stream append: {multi:?}"
    );
    assert_eq!(
        store.stream_version(&s).await.unwrap(),
        0,
        "nothing written"
    );
    assert_eq!(
        store.stream_version(&other).await.unwrap(),
        0,
        "nothing written"
    );
    let open = store
        .append(append(
            &s,
            ExpectedVersion::NoStream,
            vec![event("Opened", 1)],
        ))
        .await
        .expect("the stream is still open");
    assert_eq!(open.stream_version, 1);
}

/// The retry rule runs before the closed check: the close sent again with its ids (whatever its
/// expected version now) returns its first result marked duplicate, and so does a batch stored
/// before the close; a batch that holds the tombstone's id with new events is a partial overlap
/// (`DuplicateEvent`); none writes anything.
pub async fn retries_of_stored_batches_return_their_first_results<S: Store>(store: S) {
    let s = stream("retried");
    let before = append(&s, ExpectedVersion::NoStream, vec![event("Opened", 1)]);
    let first = store.append(before.clone()).await.expect("an event");
    let close = AppendRequest::close(s.clone(), ExpectedVersion::Exact(1));
    let tombstone = close.events[0].clone();
    let closed = store.append(close.clone()).await.expect("the close");

    for (request, original, what) in [
        (close.clone(), &closed, "the close sent again"),
        (
            append(&s, ExpectedVersion::Any, close.events.clone()),
            &closed,
            "the close sent again expecting Any",
        ),
        (
            append(&s, ExpectedVersion::Exact(2), close.events.clone()),
            &closed,
            "the close sent again expecting its own version",
        ),
        (before.clone(), &first, "a batch stored before the close"),
    ] {
        let again = store
            .append(request)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(again.duplicate, "{what}: marked duplicate");
        assert_eq!(again.stream_version, original.stream_version, "{what}");
        assert_eq!(again.positions, original.positions, "{what}");
    }
    let overlap = store
        .append(append(
            &s,
            ExpectedVersion::Any,
            vec![event("Credited", 2), tombstone.clone()],
        ))
        .await;
    assert!(
        matches!(&overlap, Err(StoreError::DuplicateEvent { .. })),
        "new events with the tombstone's id: {overlap:?}"
    );
    closed_stream(&store, &s, 2, tombstone.event_id).await;
}

/// A multi-stream append with a part on a closed stream writes nothing to any part and fails
/// with `StreamClosed` naming that part, wherever it stands in the call, with every kind of
/// expected version; the open streams of the call stay as they were.
pub async fn a_multi_append_touching_a_closed_stream_writes_nothing<S: Store>(store: S) {
    let shut = stream("multi-shut");
    let open = partner(&store, &shut, "multi-open");
    let third = partner(&store, &shut, "multi-third");
    store
        .append(append(
            &open,
            ExpectedVersion::NoStream,
            vec![event("Opened", 1)],
        ))
        .await
        .expect("an open stream");
    store
        .append(append(
            &shut,
            ExpectedVersion::NoStream,
            vec![event("Opened", 1), NewEvent::closing()],
        ))
        .await
        .expect("a closed stream");
    let feed_before = partition_feed(&store, &shut).await.len();
    for expected in every_expectation(2) {
        for order in 0..3 {
            let shut_part = append(&shut, expected, vec![event("Credited", 7)]);
            let open_part = append(&open, ExpectedVersion::Exact(1), vec![event("Debited", 7)]);
            let third_part = append(&third, ExpectedVersion::Any, vec![event("Credited", 1)]);
            let parts = match order {
                0 => vec![shut_part, open_part, third_part],
                1 => vec![open_part, shut_part, third_part],
                _ => vec![open_part, third_part, shut_part],
            };
            let what = format!("the closed part at {order} expecting {expected}");
            assert_closed(store.append_streams(parts).await, &shut, 2, &what);
        }
    }
    // Closing the closed stream again inside a call, too.
    let again = vec![
        append(&open, ExpectedVersion::Exact(1), vec![event("Debited", 7)]),
        AppendRequest::close(shut.clone(), ExpectedVersion::Any),
    ];
    assert_closed(
        store.append_streams(again).await,
        &shut,
        2,
        "a second close",
    );
    assert_eq!(
        store.stream_version(&open).await.unwrap(),
        1,
        "nothing written"
    );
    assert_eq!(
        store.stream_version(&third).await.unwrap(),
        0,
        "nothing written"
    );
    assert_eq!(
        store.stream_version(&shut).await.unwrap(),
        2,
        "nothing written"
    );
    assert_eq!(
        partition_feed(&store, &shut).await.len(),
        feed_before,
        "the feed did not move"
    );
}

/// Closing inside a multi-stream append: an account's balance moves out and the account is
/// closed in one call (its part ends with the tombstone); both parts are written, the account
/// is closed, the other stays open; the same call sent again returns its first results.
pub async fn a_multi_append_can_close_a_stream_while_moving_its_balance_out<S: Store>(store: S) {
    let leaving = stream("leaving");
    let staying = partner(&store, &leaving, "staying");
    store
        .append_streams(vec![
            append(
                &leaving,
                ExpectedVersion::NoStream,
                vec![event("Opened", 50)],
            ),
            append(
                &staying,
                ExpectedVersion::NoStream,
                vec![event("Opened", 0)],
            ),
        ])
        .await
        .expect("two accounts");
    let tombstone = NewEvent::closing()
        .with_metadata(Metadata::new().with("reason", "balance moved to staying"));
    let id = tombstone.event_id;
    let call = vec![
        append(
            &leaving,
            ExpectedVersion::Exact(1),
            vec![event("Debited", 50), tombstone],
        ),
        append(
            &staying,
            ExpectedVersion::Exact(1),
            vec![event("Credited", 50)],
        ),
    ];
    let results = store
        .append_streams(call.clone())
        .await
        .expect("the move and the close");
    assert_eq!(results.len(), 2);
    assert_eq!(results[0].stream_version, 3);
    assert_eq!(results[1].stream_version, 2);
    assert!(results.iter().all(|r| !r.duplicate));
    let events = closed_stream(&store, &leaving, 3, id).await;
    assert_eq!(events[1].event_type, "Debited");
    assert_closed(
        store
            .append(append(
                &leaving,
                ExpectedVersion::Any,
                vec![event("Credited", 1)],
            ))
            .await,
        &leaving,
        3,
        "after the call that closed it",
    );
    let credited = store
        .append(append(
            &staying,
            ExpectedVersion::Exact(2),
            vec![event("Credited", 1)],
        ))
        .await
        .expect("the other account is open");
    assert_eq!(credited.stream_version, 3);

    let again = store
        .append_streams(call)
        .await
        .expect("the call sent again after a lost reply");
    assert!(again.iter().all(|r| r.duplicate), "{again:?}");
    assert_eq!(
        again.iter().map(|r| &r.positions).collect::<Vec<_>>(),
        results.iter().map(|r| &r.positions).collect::<Vec<_>>()
    );
}

/// Eight tasks append to one stream with `Any` (single events and batches of three) while
/// another task closes it, in two rounds (the close once the stream has some events, and the
/// close sent at once). Afterwards the tombstone is the stream's last and only tombstone and
/// nothing follows it, in the stream and in the feed; every acknowledged append is stored at
/// the versions it was told, before the tombstone; every refused append got `StreamClosed` with
/// the tombstone's version and none of its events is stored; each appender, once refused, is
/// refused again.
pub async fn appends_racing_a_close_never_follow_the_tombstone<S: Store>(store: S) {
    for (round, close_after) in [(0u64, 20u64), (1, 0)] {
        let s = stream(&format!("race-{round}"));
        let start = Arc::new(Barrier::new(9));
        let appenders: Vec<_> = (0..8u64)
            .map(|task| {
                tokio::spawn(append_until_closed(
                    store.clone(),
                    s.clone(),
                    task,
                    Arc::clone(&start),
                ))
            })
            .collect();
        let closing = {
            let store = store.clone();
            let s = s.clone();
            let start = Arc::clone(&start);
            tokio::spawn(async move {
                start.wait().await;
                while store.stream_version(&s).await.expect("stream_version") < close_after {
                    tokio::task::yield_now().await;
                }
                let close = AppendRequest::close(s.clone(), ExpectedVersion::Any);
                let id = close.events[0].event_id;
                (id, store.append(close).await.expect("the close"))
            })
        };
        let (tombstone, closed) = patiently("the close", PATIENCE, closing)
            .await
            .expect("the closing task");
        let mut acked = Vec::new();
        let mut refused = HashSet::new();
        for task in appenders {
            let (a, r, version, again) = patiently("an appender", PATIENCE, task)
                .await
                .expect("an appender");
            assert_eq!(version, closed.stream_version, "refused at the tombstone");
            assert_closed(
                again,
                &s,
                closed.stream_version,
                "an appender refused again",
            );
            acked.extend(a);
            refused.extend(r);
        }
        assert!(
            !refused.is_empty(),
            "round {round}: every appender was refused"
        );
        check_nothing_follows(&store, &s, (tombstone, &closed), &acked, &refused).await;
    }
}

/// What an appender of [`appends_racing_a_close_never_follow_the_tombstone`] comes back with:
/// the ids it had acknowledged with their versions, the ids refused, the version the refusal
/// named, and the outcome of one more append after it.
type Appended = (
    Vec<(Uuid, u64)>,
    Vec<Uuid>,
    u64,
    Result<AppendResult, StoreError>,
);

/// Appends to `s` with `Any` (batches of one or three events) until refused with
/// `StreamClosed`, then once more.
async fn append_until_closed<S: Store>(
    store: S,
    s: StreamId,
    task: u64,
    start: Arc<Barrier>,
) -> Appended {
    start.wait().await;
    let mut acked: Vec<(Uuid, u64)> = Vec::new();
    for n in 0u64.. {
        let size = if (task + n) % 3 == 0 { 3 } else { 1 };
        let events: Vec<NewEvent> = (0..size).map(|k| event("Credited", n * 10 + k)).collect();
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        match store.append(append(&s, ExpectedVersion::Any, events)).await {
            Ok(result) => {
                let first = result.first_version().expect("events written");
                acked.extend(ids.into_iter().zip(first..));
                // A store whose append never waits (memory) would keep the runtime's threads
                // from the closing task.
                tokio::task::yield_now().await;
            }
            Err(StoreError::StreamClosed { version, .. }) => {
                let again = store
                    .append(append(&s, ExpectedVersion::Any, vec![event("Credited", 0)]))
                    .await;
                return (acked, ids, version, again);
            }
            Err(other) => panic!("appender {task}: {other}"),
        }
    }
    unreachable!("the loop ends when the stream is closed")
}

/// After a race: the tombstone is `s`'s only one and its last event, in the stream and in the
/// feed; every `acked` event is stored at its version, before it; no `refused` event is stored.
async fn check_nothing_follows<S: Store>(
    store: &S,
    s: &StreamId,
    (tombstone, closed): (Uuid, &AppendResult),
    acked: &[(Uuid, u64)],
    refused: &HashSet<Uuid>,
) {
    let events = closed_stream(store, s, closed.stream_version, tombstone).await;
    assert_eq!(
        events.len(),
        acked.len() + 1,
        "`{s}` holds every acknowledged event and the tombstone"
    );
    let stored: std::collections::HashMap<Uuid, &RecordedEvent> =
        events.iter().map(|e| (e.event_id, e)).collect();
    for (id, version) in acked {
        let e = stored
            .get(id)
            .unwrap_or_else(|| panic!("`{s}`: acknowledged event {id} was lost"));
        assert_eq!(e.stream_version, *version, "stored where it was told");
        assert!(*version < closed.stream_version, "before the tombstone");
    }
    assert!(
        refused.iter().all(|id| !stored.contains_key(id)),
        "`{s}`: a refused event was stored"
    );
    // In the feed, nothing of the stream follows its tombstone.
    let feed: Vec<RecordedEvent> = partition_feed(store, s)
        .await
        .into_iter()
        .filter(|e| e.stream_id == *s)
        .collect();
    assert_eq!(feed.len(), events.len(), "`{s}`: the feed holds the stream");
    let last = feed.last().expect("events");
    assert_eq!(
        last.event_id, tombstone,
        "`{s}`: the tombstone is last in the feed"
    );
    assert_eq!(last.global_position, closed.positions[0]);
}

/// Closers race: in each of eight rounds four tasks close one stream at once, two expecting
/// `Any` and two the stream's version. Exactly one succeeds; every other gets `StreamClosed`
/// with the winner's version (never a conflict, though its expected version no longer holds),
/// and the stream holds exactly the winner's tombstone.
pub async fn closers_racing_leave_exactly_one_tombstone<S: Store>(store: S) {
    for round in 0..8u64 {
        let s = stream(&format!("closers-{round}"));
        store
            .append(append(
                &s,
                ExpectedVersion::NoStream,
                vec![event("Opened", round)],
            ))
            .await
            .expect("an event");
        let start = Arc::new(Barrier::new(4));
        let closers: Vec<_> = (0..4)
            .map(|k| {
                let store = store.clone();
                let expected = if k % 2 == 0 {
                    ExpectedVersion::Any
                } else {
                    ExpectedVersion::Exact(1)
                };
                let close = AppendRequest::close(s.clone(), expected);
                let start = Arc::clone(&start);
                tokio::spawn(async move {
                    let id = close.events[0].event_id;
                    start.wait().await;
                    (id, store.append(close).await)
                })
            })
            .collect();
        let mut winners: Vec<(Uuid, AppendResult)> = Vec::new();
        let mut losers = 0;
        for closer in closers {
            let (id, outcome) = patiently("a closer", PATIENCE, closer)
                .await
                .expect("a closer");
            match outcome {
                Ok(result) => winners.push((id, result)),
                Err(err) => {
                    assert_closed(Err::<(), _>(err), &s, 2, "a closer that lost");
                    losers += 1;
                }
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one close succeeds"
        );
        assert_eq!(losers, 3);
        let (id, result) = &winners[0];
        assert_eq!(result.stream_version, 2);
        closed_stream(&store, &s, 2, *id).await;
    }
}

/// A close whose reply was lost (its call dropped after a few scheduling points, in six rounds,
/// so that it was sent or not, committed or not) is sent again with the same tombstone: the
/// stream ends with exactly that tombstone, the retry's result names it, and a further retry
/// is a duplicate with the same result; appends after it are refused.
pub async fn a_close_whose_reply_was_lost_is_retried_with_its_ids<S: Store>(store: S) {
    for round in 0..6u64 {
        let s = stream(&format!("lost-{round}"));
        store
            .append(append(
                &s,
                ExpectedVersion::NoStream,
                vec![event("Opened", round)],
            ))
            .await
            .expect("an event");
        let close = AppendRequest::close(s.clone(), ExpectedVersion::Exact(1));
        let id = close.events[0].event_id;
        let lost = {
            let store = store.clone();
            let close = close.clone();
            tokio::spawn(async move { store.append(close).await })
        };
        for _ in 0..round * 3 {
            tokio::task::yield_now().await;
        }
        lost.abort();
        let _ = lost.await;
        let retried = store
            .append(close.clone())
            .await
            .expect("the close sent again");
        assert_eq!(retried.stream_version, 2, "round {round}");
        let again = store
            .append(close.clone())
            .await
            .expect("the close sent once more");
        assert!(again.duplicate, "round {round}: {again:?}");
        assert_eq!(again.positions, retried.positions, "round {round}");
        closed_stream(&store, &s, 2, id).await;
        assert_closed(
            store
                .append(append(
                    &s,
                    ExpectedVersion::Exact(2),
                    vec![event("Credited", 1)],
                ))
                .await,
            &s,
            2,
            "after the retried close",
        );
    }
}

/// A closed stream reads like any other: forward and backward, from a version, in the feed
/// (the tombstone at its position, with its metadata), through a subscription from the start,
/// and in the list of streams at its tombstone's version.
pub async fn a_closed_stream_reads_lists_and_feeds_like_any_other<S: Store>(store: S) {
    let s = stream("readable");
    store
        .append(append(
            &s,
            ExpectedVersion::NoStream,
            vec![
                event("Opened", 1),
                event("Credited", 2),
                event("Debited", 3),
            ],
        ))
        .await
        .expect("three events");
    let close = AppendRequest::close(s.clone(), ExpectedVersion::Exact(3))
        .because(Metadata::new().with_actor("ops").with("reason", "audit"));
    let id = close.events[0].event_id;
    let closed = store.append(close).await.expect("the close");
    let forward = closed_stream(&store, &s, 4, id).await;
    assert_eq!(
        forward.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    let backward = read(&store, &s, ReadStream::backward()).await;
    assert_eq!(
        backward.first().map(|e| e.event_id),
        Some(id),
        "backward starts at it"
    );
    assert_eq!(backward.len(), 4);
    let tail = read(&store, &s, ReadStream::forward().from(3)).await;
    assert_eq!(tail.len(), 2);
    assert_eq!(tail[1].event_id, id);
    assert_eq!(tail[1].metadata.actor.as_deref(), Some("ops"));

    let feed = partition_feed(&store, &s).await;
    let in_feed = feed
        .iter()
        .find(|e| e.event_id == id)
        .expect("the tombstone is in the feed");
    assert_eq!(in_feed.global_position, closed.positions[0]);
    assert_eq!(in_feed.stream_version, 4);
    assert_eq!(in_feed.event_type, CLOSED_EVENT_TYPE);
    let only_tombstones: Vec<RecordedEvent> = {
        let partitioning = store.partitioning();
        let read = ReadAll::after(0).filter(EventFilter::all().event_type(CLOSED_EVENT_TYPE));
        let read = if partitioning.is_single() {
            read
        } else {
            read.partition(partitioning.partition_of(&s))
        };
        store.read_all(read).try_collect().await.expect("read_all")
    };
    assert_eq!(
        only_tombstones
            .iter()
            .map(|e| e.event_id)
            .collect::<Vec<_>>(),
        [id],
        "the tombstone is found by its type"
    );

    let delivered = subscribe_until(&store, id).await;
    let stream_part: Vec<u64> = delivered
        .iter()
        .filter(|e| e.stream_id == s)
        .map(|e| e.stream_version)
        .collect();
    assert_eq!(
        stream_part,
        [1, 2, 3, 4],
        "delivered in order, the tombstone last"
    );

    let listed = store
        .list_streams(ListStreams::category("account"))
        .await
        .expect("list_streams");
    assert!(
        listed
            .streams
            .iter()
            .any(|summary| summary.stream_id == s && summary.version == 4),
        "listed at its tombstone's version: {listed:?}"
    );
}

/// Subscribes to the whole feed from the start (every partition on a partitioned store) and
/// collects what it delivers up to the event `id`.
async fn subscribe_until<S: Store>(store: &S, id: Uuid) -> Vec<RecordedEvent> {
    let partitioning = store.partitioning();
    let mut subscription = if partitioning.is_single() {
        store.subscribe(0, EventFilter::all())
    } else {
        store.subscribe_all(&FeedPosition::start(&partitioning), EventFilter::all())
    };
    patiently("the tombstone through a subscription", PATIENCE, async {
        let mut seen = Vec::new();
        while let Some(e) = subscription.next().await {
            let e = e.unwrap_or_else(|e| panic!("the subscription failed: {e}"));
            let done = e.event_id == id;
            seen.push(e);
            if done {
                return seen;
            }
        }
        panic!("the subscription ended before the tombstone");
    })
    .await
}

/// Asserts that every command on ledger `id` (closed at version 4) fails with `Closed` in
/// `repository` (`name` says which), and so does another close.
async fn assert_refuses_commands<S: Store>(
    name: &str,
    repository: &Repository<S>,
    id: &str,
    stream_id: &StreamId,
) {
    for command in [
        LedgerCommand::Credit(5),
        LedgerCommand::Debit(1),
        LedgerCommand::Noop,
    ] {
        match repository.execute::<Ledger>(id, &command).await {
            Err(RepositoryError::Closed {
                stream_id: closed_id,
                version,
            }) => {
                assert_eq!(&closed_id, stream_id, "{name}: {command:?}");
                assert_eq!(version, 4, "{name}: {command:?}");
            }
            other => panic!("{name}: {command:?} on a closed aggregate: {other:?}"),
        }
    }
    assert!(
        matches!(
            repository.close::<Ledger>(id, &Metadata::new()).await,
            Err(RepositoryError::Closed { version: 4, .. })
        ),
        "{name}: a second close"
    );
}

/// Through the repository: `close` appends the tombstone at the version it loaded, with its
/// metadata; the aggregate still loads (the tombstone decodes to no typed event), reports
/// itself closed, and loads as of any earlier point as it was; snapshots taken before the
/// close are used and agree with a replay; every command on it, in this repository or in one
/// whose cache held the aggregate before the close, fails with `Closed` after one attempt,
/// never as a conflict; a second close fails the same way.
pub async fn the_repository_closes_aggregates_and_refuses_commands_on_them<S: Store>(store: S) {
    let repo = Repository::builder(store.clone())
        .default_snapshot_policy(SnapshotPolicy::EveryNEvents(2))
        .build()
        .expect("a repository");
    let cached = Repository::new(store.clone());
    let id = "closing-1";
    repo.execute::<Ledger>(id, &LedgerCommand::Open)
        .await
        .expect("open");
    repo.execute::<Ledger>(id, &LedgerCommand::Credit(50))
        .await
        .expect("credit");
    repo.execute::<Ledger>(id, &LedgerCommand::Debit(20))
        .await
        .expect("debit");
    // Another repository holds the aggregate in memory before the close.
    let before = cached
        .execute::<Ledger>(id, &LedgerCommand::Noop)
        .await
        .expect("a command on the open aggregate");
    assert_eq!(before.version, 3);

    let reason = Metadata::new().with("reason", "customer left");
    let closed = repo.close::<Ledger>(id, &reason).await.expect("the close");
    assert_eq!(closed.version, 4);
    assert_eq!(closed.attempts, 1);
    let stream_id = Repository::<S>::stream_id::<Ledger>(id).expect("valid id");
    assert_eq!(closed.stream_id, stream_id);
    let events = closed_stream(&store, &stream_id, 4, closed.event_id).await;
    assert_eq!(events[3].global_position, closed.position);
    assert_eq!(
        events[3].metadata.custom.get("reason"),
        Some(&json!("customer left"))
    );
    assert!(
        repo.decode::<Ledger>(&events[3])
            .expect("the tombstone decodes")
            .is_empty(),
        "to no typed event"
    );

    let loaded = repo
        .load::<Ledger>(id)
        .await
        .expect("a closed aggregate loads");
    assert!(loaded.closed);
    assert_eq!(loaded.version, 4);
    assert_eq!(loaded.aggregate.balance, 30);
    let replayed = repo
        .load_without_snapshot::<Ledger>(id)
        .await
        .expect("a replay");
    assert!(replayed.closed);
    assert_eq!(replayed.aggregate, loaded.aggregate);
    assert_eq!(replayed.version, 4);
    let fresh = Repository::new(store.clone());
    let fresh_load = fresh
        .load::<Ledger>(id)
        .await
        .expect("a load with no cache");
    assert!(fresh_load.closed);
    assert_eq!(fresh_load.aggregate, loaded.aggregate);
    for (as_of, closed_then, version) in [
        (AsOf::Version(3), false, 3),
        (AsOf::Version(4), true, 4),
        (AsOf::Version(9), true, 4),
        (AsOf::Position(events[2].global_position), false, 3),
        (AsOf::Position(events[3].global_position), true, 4),
        (AsOf::Time(events[3].recorded_at), true, 4),
    ] {
        let past = repo
            .load_as_of::<Ledger>(id, as_of)
            .await
            .unwrap_or_else(|e| panic!("{as_of:?}: {e}"));
        assert_eq!(past.closed, closed_then, "{as_of:?}");
        assert_eq!(past.version, version, "{as_of:?}");
        assert_eq!(past.aggregate.balance, 30, "{as_of:?}");
    }

    for (name, repository) in [("closer", &repo), ("cached", &cached), ("fresh", &fresh)] {
        assert_refuses_commands(name, repository, id, &stream_id).await;
    }
    assert_eq!(store.stream_version(&stream_id).await.unwrap(), 4);
}

/// A command on two aggregates (`execute_two`) of which one is closed fails with `Closed` naming
/// it, whichever of the two it is, and writes nothing to the other.
pub async fn a_two_aggregate_command_on_a_closed_aggregate_is_refused<S: Store>(store: S) {
    let repo = Repository::new(store.clone());
    let (open, shut) = ("two-open", "two-shut");
    for id in [open, shut] {
        repo.execute::<Ledger>(id, &LedgerCommand::Open)
            .await
            .expect("open");
    }
    let closed = repo
        .close::<Ledger>(shut, &Metadata::new())
        .await
        .expect("the close");
    let credit_both = |a: &Ledger, b: &Ledger| {
        Ok((
            a.handle(&LedgerCommand::Credit(1))?,
            b.handle(&LedgerCommand::Credit(1))?,
        ))
    };
    for (first, second) in [(open, shut), (shut, open)] {
        let two = repo
            .execute_two::<Ledger, Ledger, crate::domain::LedgerError>(
                first,
                second,
                &Metadata::new(),
                credit_both,
            )
            .await;
        assert!(
            matches!(&two, Err(RepositoryError::Closed { stream_id, version: 2 })
                if *stream_id == closed.stream_id),
            "{first} and {second}: {two:?}"
        );
    }
    let open_stream = Repository::<S>::stream_id::<Ledger>(open).expect("valid");
    assert_eq!(
        store.stream_version(&open_stream).await.unwrap(),
        1,
        "nothing of the two-aggregate commands was written"
    );
    assert_eq!(store.stream_version(&closed.stream_id).await.unwrap(), 2);
}

/// `Repository::close` when another writer moved the stream on since the repository loaded it:
/// the conflict is retried at the new version, and the tombstone lands after that writer's
/// event; when another writer closed it meanwhile, the close fails with `Closed` naming that
/// writer's tombstone.
pub async fn the_repository_close_follows_writes_made_elsewhere<S: Store>(store: S) {
    let repo = Repository::new(store.clone());
    let id = "closing-elsewhere";
    repo.execute::<Ledger>(id, &LedgerCommand::Open)
        .await
        .expect("open");
    repo.execute::<Ledger>(id, &LedgerCommand::Credit(10))
        .await
        .expect("credit");
    let stream_id = Repository::<S>::stream_id::<Ledger>(id).expect("valid id");
    // Another process credits it; this repository's cache is behind.
    let elsewhere = NewEvent::from_value("Credited", 2, &json!({ "amount": 5, "currency": "EUR" }));
    store
        .append(append(
            &stream_id,
            ExpectedVersion::Exact(2),
            vec![elsewhere],
        ))
        .await
        .expect("a write elsewhere");
    let closed = repo
        .close::<Ledger>(id, &Metadata::new())
        .await
        .expect("the close after a conflict");
    assert_eq!(closed.version, 4);
    assert_eq!(closed.attempts, 2, "one conflict, then the close");
    let loaded = repo.load::<Ledger>(id).await.expect("load");
    assert!(loaded.closed);
    assert_eq!(
        loaded.aggregate.balance, 15,
        "the write elsewhere is before the tombstone"
    );

    let id2 = "closing-elsewhere-2";
    repo.execute::<Ledger>(id2, &LedgerCommand::Open)
        .await
        .expect("open");
    let stream2 = Repository::<S>::stream_id::<Ledger>(id2).expect("valid id");
    store
        .append(AppendRequest::close(stream2.clone(), ExpectedVersion::Any))
        .await
        .expect("closed elsewhere");
    assert!(
        matches!(
            repo.close::<Ledger>(id2, &Metadata::new()).await,
            Err(RepositoryError::Closed { version: 2, .. })
        ),
        "closing what another writer closed"
    );
    assert_eq!(store.stream_version(&stream2).await.unwrap(), 2);
}
