//! Multi-stream appends ([`EventStore::append_streams`]): the conformance cases, stamped onto a
//! backend by [`multi_conformance_tests!`](crate::multi_conformance_tests).
//!
//! Every case takes a fresh, empty store, single-feed or partitioned: the streams a case writes
//! share one feed partition when the store is partitioned by category (accounts are all of
//! category `account`), and are spread over the partitions otherwise. Cases that need streams in
//! different partitions are in [`spanning`], which a backend that cannot write across partitions
//! in one call (Redis) does not run.
//!
//! Every `pub async fn` at the top of this module is a case (the build script lists them);
//! helpers are private.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use serde_json::json;
use uuid::Uuid;

use es_core::{
    AppendRequest, AppendResult, EventStore, ExpectedVersion, NewEvent, ReadAll, ReadStream,
    RecordedEvent, Store, StoreError, StreamId,
};

use crate::support::{check_feed, patiently, tail_until_done, DONE};

/// How long any single wait in the suite may take before the case fails.
const PATIENCE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Helpers

fn account(n: usize) -> StreamId {
    StreamId::new("account", &format!("a{n}")).expect("valid stream id")
}

fn money(event_type: &str, amount: u64, transfer: u64) -> NewEvent {
    NewEvent::from_value(
        event_type,
        1,
        &json!({ "amount": amount, "transfer": transfer }),
    )
}

fn part(stream: &StreamId, expected: ExpectedVersion, events: Vec<NewEvent>) -> AppendRequest {
    AppendRequest::new(stream.clone(), expected, events)
}

async fn read<S: EventStore>(store: &S, stream: &StreamId) -> Vec<RecordedEvent> {
    store
        .read_stream(stream, ReadStream::forward())
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("reading `{stream}` failed: {e}"))
}

/// Every event of every partition, in each partition's order.
async fn read_everything<S: EventStore>(store: &S) -> Vec<RecordedEvent> {
    let partitioning = store.partitioning();
    let mut all = Vec::new();
    for partition in partitioning.partitions() {
        let read = if partitioning.is_single() {
            ReadAll::after(0)
        } else {
            ReadAll::after(0).partition(partition)
        };
        let events: Vec<RecordedEvent> = store
            .read_all(read)
            .try_collect()
            .await
            .unwrap_or_else(|e| panic!("read_all failed: {e}"));
        all.extend(events);
    }
    all
}

/// The signed effect of an event on its account's balance.
fn effect(event: &RecordedEvent) -> i64 {
    let amount = || -> i64 {
        let value = event.payload_json().expect("payload is JSON")["amount"]
            .as_u64()
            .expect("payload has an amount");
        i64::try_from(value).expect("small amounts")
    };
    match event.event_type.as_str() {
        "Opened" | "Credited" => amount(),
        "Debited" => -amount(),
        _ => 0,
    }
}

fn balance(events: &[RecordedEvent]) -> i64 {
    events.iter().map(effect).sum()
}

/// Opens `n` accounts of `opening` each, with one multi-stream append of them all.
async fn open_accounts<S: EventStore>(store: &S, accounts: &[StreamId], opening: u64) {
    let parts = accounts
        .iter()
        .map(|a| {
            part(
                a,
                ExpectedVersion::NoStream,
                vec![money("Opened", opening, 0)],
            )
        })
        .collect();
    let results = store
        .append_streams(parts)
        .await
        .unwrap_or_else(|e| panic!("opening the accounts failed: {e}"));
    assert_eq!(results.len(), accounts.len());
    assert!(results
        .iter()
        .all(|r| r.stream_version == 1 && !r.duplicate));
}

/// Transfers `amount` from `from` to `to`, deciding on the balances read, and retrying on a
/// conflict; returns the call's results and how many conflicts it met.
async fn transfer<S: EventStore>(
    store: &S,
    from: &StreamId,
    to: &StreamId,
    amount: u64,
    transfer: u64,
) -> (Option<Vec<AppendResult>>, u64) {
    let mut conflicts = 0;
    loop {
        let from_events = read(store, from).await;
        let to_events = read(store, to).await;
        if balance(&from_events) < i64::try_from(amount).expect("small amounts") {
            return (None, conflicts);
        }
        let call = vec![
            part(
                from,
                ExpectedVersion::Exact(from_events.len() as u64),
                vec![money("Debited", amount, transfer)],
            ),
            part(
                to,
                ExpectedVersion::Exact(to_events.len() as u64),
                vec![money("Credited", amount, transfer)],
            ),
        ];
        match store.append_streams(call).await {
            Ok(results) => return (Some(results), conflicts),
            Err(StoreError::Conflict { stream_id, .. }) => {
                assert!(
                    stream_id == *from || stream_id == *to,
                    "a conflict names a stream of the call, not `{stream_id}`"
                );
                conflicts += 1;
                tokio::task::yield_now().await;
            }
            Err(err) => panic!("transfer {transfer} failed: {err}"),
        }
    }
}

/// Runs `tasks` tasks of `per_task` transfers each between `accounts` (pairs chosen by a seeded
/// generator, both directions), with a subscriber following the whole feed; then checks that
/// the subscriber saw every event once, in per-stream order, and that the balances add up to
/// the opening total, in the end and (on a single feed) after every transfer it read.
async fn transfers_under_load<S: EventStore>(
    store: S,
    accounts: Vec<StreamId>,
    tasks: usize,
    per_task: usize,
) {
    const OPENING: u64 = 1_000;
    let subscriber = tail_until_done(&store);
    open_accounts(&store, &accounts, OPENING).await;
    let total = i64::try_from(OPENING * accounts.len() as u64).expect("small");
    let next_transfer = Arc::new(AtomicU64::new(1));
    let conflicts = Arc::new(AtomicU64::new(0));
    let accounts = Arc::new(accounts);
    let mut handles = Vec::new();
    for task in 0..tasks {
        let store = store.clone();
        let accounts = Arc::clone(&accounts);
        let next_transfer = Arc::clone(&next_transfer);
        let conflicts = Arc::clone(&conflicts);
        handles.push(tokio::spawn(async move {
            let mut rng = Rng(task as u64 * 0x9E37_79B9 + 7);
            let mut written = Vec::new();
            for _ in 0..per_task {
                let from = rng.below(accounts.len() as u64) as usize;
                let mut to = rng.below(accounts.len() as u64 - 1) as usize;
                if to >= from {
                    to += 1;
                }
                let id = next_transfer.fetch_add(1, Ordering::SeqCst);
                let amount = 1 + rng.below(199);
                let (results, met) =
                    transfer(&store, &accounts[from], &accounts[to], amount, id).await;
                conflicts.fetch_add(met, Ordering::SeqCst);
                if let Some(results) = results {
                    written.push((id, results));
                }
            }
            written
        }));
    }
    let mut done = 0;
    for handle in handles {
        done += patiently("the transfer tasks", PATIENCE, handle)
            .await
            .expect("a transfer task panicked")
            .len();
    }
    store
        .append(AppendRequest::new(
            StreamId::new("marker", "done").expect("valid"),
            ExpectedVersion::Any,
            vec![NewEvent::from_value(DONE, 1, &json!({}))],
        ))
        .await
        .expect("the Done marker is appended");
    let seen = patiently("the subscriber", PATIENCE, subscriber)
        .await
        .expect("the subscriber panicked");
    check_transfers(&store, &accounts, &seen, done, total).await;
    assert!(
        conflicts.load(Ordering::SeqCst) > 0 || tasks == 1,
        "concurrent transfers between few accounts met no conflict: the case did not race"
    );
}

/// The checks after [`transfers_under_load`]: `seen` is what the subscriber read, `done` the
/// transfers that went through, `total` the opening total.
async fn check_transfers<S: EventStore>(
    store: &S,
    accounts: &[StreamId],
    seen: &[RecordedEvent],
    done: usize,
    total: i64,
) {
    let stored = read_everything(store).await;
    let written: HashSet<Uuid> = stored.iter().map(|e| e.event_id).collect();
    check_feed("subscriber", seen, &written);
    let transfers = stored.iter().filter(|e| e.event_type == "Debited").count();
    assert_eq!(transfers, done, "one debit per transfer that succeeded");
    assert_eq!(
        stored.iter().filter(|e| e.event_type == "Credited").count(),
        done,
        "one credit per transfer that succeeded"
    );
    assert!(done > 0, "some transfers went through");
    let mut end = 0;
    for account in accounts {
        let own = read(store, account).await;
        let b = balance(&own);
        assert!(b >= 0, "`{account}` went below zero: {b}");
        end += b;
    }
    assert_eq!(end, total, "the balances add up to the opening total");
    assert_eq!(
        balance(seen),
        total,
        "the feed adds up to the opening total"
    );

    // Every transfer's two legs: both delivered, each once.
    let mut legs: HashMap<u64, u32> = HashMap::new();
    for event in seen {
        if event.event_type == "Debited" || event.event_type == "Credited" {
            let id = event.payload_json().expect("JSON")["transfer"]
                .as_u64()
                .expect("transfer id");
            *legs.entry(id).or_default() += 1;
        }
    }
    assert_eq!(legs.len(), done, "every transfer is in the feed");
    assert!(
        legs.values().all(|&n| n == 2),
        "each transfer has its two legs"
    );

    if store.partitioning().is_single() {
        // On one feed a call's events are adjacent: after every event that does not leave a
        // transfer half read, the balances read so far add up to the total.
        let mut sum = 0;
        let mut open: Option<u64> = None;
        for event in seen {
            sum += effect(event);
            let id = event.payload_json().expect("JSON")["transfer"].as_u64();
            match (event.event_type.as_str(), open) {
                ("Debited", None) => open = id,
                ("Credited", Some(o)) => {
                    assert_eq!(Some(o), id, "a transfer's legs are adjacent in the feed");
                    open = None;
                }
                ("Opened" | DONE, None) => {}
                (other, _) => panic!("`{other}` inside transfer {open:?}"),
            }
            if open.is_none() && event.event_type != "Opened" {
                assert_eq!(
                    sum, total,
                    "the prefix up to {} adds up",
                    event.global_position
                );
            }
        }
    }
}

/// A small deterministic generator (xorshift), so that a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

// ---------------------------------------------------------------------------------------------
// Cases

/// Two streams in one call: both written, results in the call's order, each part's events at
/// consecutive versions and increasing positions, and the feed holding each event once.
pub async fn multi_append_writes_every_part<S: Store>(store: S) {
    let (a, b) = (account(1), account(2));
    store
        .append(part(
            &a,
            ExpectedVersion::NoStream,
            vec![money("Opened", 50, 0)],
        ))
        .await
        .expect("open a");
    let results = store
        .append_streams(vec![
            part(
                &a,
                ExpectedVersion::Exact(1),
                vec![money("Debited", 10, 1), money("Debited", 5, 2)],
            ),
            part(&b, ExpectedVersion::NoStream, vec![money("Opened", 15, 0)]),
        ])
        .await
        .expect("the call succeeds");
    assert_eq!(results.len(), 2);
    assert_eq!(results[0].stream_version, 3);
    assert_eq!(results[0].positions.len(), 2);
    assert!(results[0].positions[0] < results[0].positions[1]);
    assert_eq!(results[1].stream_version, 1);
    assert_eq!(results[1].positions.len(), 1);
    assert!(results.iter().all(|r| !r.duplicate));
    let a_events = read(&store, &a).await;
    let b_events = read(&store, &b).await;
    assert_eq!(
        a_events
            .iter()
            .map(|e| e.stream_version)
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(
        a_events[1..]
            .iter()
            .map(|e| e.global_position)
            .collect::<Vec<_>>(),
        results[0].positions
    );
    assert_eq!(b_events[0].global_position, results[1].positions[0]);
    let feed = read_everything(&store).await;
    assert_eq!(feed.len(), 4, "every event once in the feed");
    if store.partitioning().is_single() {
        // One commit: the call's events are adjacent in the single feed.
        let positions: Vec<u64> = feed[1..].iter().map(|e| e.global_position).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(feed[1].stream_id, a);
        assert_eq!(feed[3].stream_id, b);
    }
}

/// One part's expected version is wrong (the first, the last, or one of each kind): the call
/// fails with that part's conflict and writes nothing to any stream.
pub async fn multi_append_conflict_on_one_part_writes_nothing<S: Store>(store: S) {
    let (a, b, c) = (account(1), account(2), account(3));
    open_accounts(&store, &[a.clone(), b.clone()], 100).await;
    let before = read_everything(&store).await.len();
    let cases: [(Vec<AppendRequest>, &StreamId, u64); 4] = [
        (
            vec![
                part(&a, ExpectedVersion::Exact(1), vec![money("Debited", 1, 1)]),
                part(&b, ExpectedVersion::Exact(7), vec![money("Credited", 1, 1)]),
            ],
            &b,
            1,
        ),
        (
            vec![
                part(&a, ExpectedVersion::Exact(0), vec![money("Debited", 1, 2)]),
                part(&b, ExpectedVersion::Exact(1), vec![money("Credited", 1, 2)]),
            ],
            &a,
            1,
        ),
        (
            vec![
                part(
                    &a,
                    ExpectedVersion::StreamExists,
                    vec![money("Debited", 1, 3)],
                ),
                part(
                    &c,
                    ExpectedVersion::StreamExists,
                    vec![money("Credited", 1, 3)],
                ),
            ],
            &c,
            0,
        ),
        (
            vec![
                part(&c, ExpectedVersion::NoStream, vec![money("Opened", 1, 0)]),
                part(&a, ExpectedVersion::NoStream, vec![money("Credited", 1, 4)]),
                part(&b, ExpectedVersion::Any, vec![money("Credited", 1, 4)]),
            ],
            &a,
            1,
        ),
    ];
    for (call, culprit, actual) in cases {
        match store.append_streams(call).await {
            Err(StoreError::Conflict {
                stream_id,
                actual: found,
                ..
            }) => {
                assert_eq!(
                    &stream_id, culprit,
                    "the conflict names the part that failed"
                );
                assert_eq!(found, actual);
            }
            other => panic!("expected a conflict on `{culprit}`, got {other:?}"),
        }
        assert_eq!(read(&store, &a).await.len(), 1, "nothing written to a");
        assert_eq!(read(&store, &b).await.len(), 1, "nothing written to b");
        assert!(read(&store, &c).await.is_empty(), "nothing written to c");
        assert_eq!(
            read_everything(&store).await.len(),
            before,
            "the feed is unchanged"
        );
        assert_eq!(store.stream_version(&c).await.expect("version"), 0);
    }
    // The same streams with the right versions go through.
    store
        .append_streams(vec![
            part(&a, ExpectedVersion::Exact(1), vec![money("Debited", 1, 5)]),
            part(&b, ExpectedVersion::Exact(1), vec![money("Credited", 1, 5)]),
        ])
        .await
        .expect("the corrected call succeeds");
}

/// The same call sent again (a lost reply): the first results, marked duplicate, and nothing new
/// written; then again after the streams moved on, still the first results.
pub async fn multi_append_retried_returns_the_first_results<S: Store>(store: S) {
    let (a, b) = (account(1), account(2));
    open_accounts(&store, &[a.clone(), b.clone()], 100).await;
    let call = vec![
        part(&a, ExpectedVersion::Exact(1), vec![money("Debited", 30, 1)]),
        part(
            &b,
            ExpectedVersion::Exact(1),
            vec![money("Credited", 20, 1), money("Credited", 10, 1)],
        ),
    ];
    let first = store
        .append_streams(call.clone())
        .await
        .expect("first send");
    let feed = read_everything(&store).await.len();
    let again = store.append_streams(call.clone()).await.expect("the retry");
    assert_eq!(again.len(), 2);
    for (f, a) in first.iter().zip(&again) {
        assert!(a.duplicate, "a retry is reported as a duplicate");
        assert_eq!(f.stream_version, a.stream_version);
        assert_eq!(f.positions, a.positions);
    }
    assert_eq!(
        read_everything(&store).await.len(),
        feed,
        "nothing new written"
    );
    // The streams move on; the retry still finds the call stored and writes nothing.
    store
        .append_streams(vec![
            part(&a, ExpectedVersion::Exact(2), vec![money("Credited", 1, 2)]),
            part(&b, ExpectedVersion::Exact(3), vec![money("Debited", 1, 2)]),
        ])
        .await
        .expect("a later transfer");
    let late = store.append_streams(call).await.expect("a late retry");
    assert!(late.iter().all(|r| r.duplicate));
    assert_eq!(late[0].positions, first[0].positions);
    assert_eq!(read(&store, &a).await.len(), 3);
    assert_eq!(read(&store, &b).await.len(), 4);
}

/// A call whose parts are stored in part: one part's events were written before (by a single
/// append), the other part's were not; or one part's batch overlaps stored events partly. Each
/// is refused with the duplicate error naming the stored part's stream, and writes nothing.
pub async fn multi_append_partly_stored_is_refused<S: Store>(store: S) {
    let (a, b) = (account(1), account(2));
    open_accounts(&store, &[a.clone(), b.clone()], 100).await;
    let debit = money("Debited", 5, 1);
    let credit = money("Credited", 5, 1);
    // Only the first part got through earlier (as a single append).
    store
        .append(part(&a, ExpectedVersion::Exact(1), vec![debit.clone()]))
        .await
        .expect("the debit alone");
    let feed = read_everything(&store).await.len();
    let call = vec![
        part(&a, ExpectedVersion::Exact(1), vec![debit.clone()]),
        part(&b, ExpectedVersion::Exact(1), vec![credit.clone()]),
    ];
    match store.append_streams(call).await {
        Err(StoreError::DuplicateEvent {
            stream_id,
            event_id,
            ..
        }) => {
            assert_eq!(stream_id, a, "the error names the part already stored");
            assert_eq!(event_id, debit.event_id);
        }
        other => panic!("expected a duplicate error, got {other:?}"),
    }
    assert_eq!(
        read(&store, &b).await.len(),
        1,
        "the credit was not written"
    );
    assert_eq!(read_everything(&store).await.len(), feed);

    // The stored part second in the call: the same.
    let call = vec![
        part(&b, ExpectedVersion::Exact(1), vec![credit.clone()]),
        part(&a, ExpectedVersion::Exact(1), vec![debit.clone()]),
    ];
    match store.append_streams(call).await {
        Err(StoreError::DuplicateEvent { stream_id, .. }) => assert_eq!(stream_id, a),
        other => panic!("expected a duplicate error, got {other:?}"),
    }
    assert_eq!(
        read(&store, &b).await.len(),
        1,
        "the credit was not written"
    );

    // A part that overlaps stored events partly.
    let call = vec![
        part(
            &a,
            ExpectedVersion::Exact(2),
            vec![debit.clone(), money("Debited", 1, 2)],
        ),
        part(&b, ExpectedVersion::Exact(1), vec![money("Credited", 6, 2)]),
    ];
    match store.append_streams(call).await {
        Err(StoreError::DuplicateEvent { stream_id, .. }) => assert_eq!(stream_id, a),
        other => panic!("expected a duplicate error, got {other:?}"),
    }
    assert_eq!(read(&store, &a).await.len(), 2);
    assert_eq!(read(&store, &b).await.len(), 1);
    assert_eq!(
        read_everything(&store).await.len(),
        feed,
        "nothing was written"
    );
}

/// Malformed calls: none of them writes anything, each gets its typed error before the store
/// is touched.
pub async fn multi_append_refuses_malformed_calls<S: Store>(store: S) {
    let (a, b) = (account(1), account(2));
    match store.append_streams(Vec::new()).await {
        Err(StoreError::InvalidMultiAppend { .. }) => {}
        other => panic!("an empty call: expected InvalidMultiAppend, got {other:?}"),
    }
    let twice = vec![
        part(&a, ExpectedVersion::Any, vec![money("Opened", 1, 0)]),
        part(&b, ExpectedVersion::Any, vec![money("Opened", 1, 0)]),
        part(&a, ExpectedVersion::Any, vec![money("Credited", 1, 0)]),
    ];
    match store.append_streams(twice).await {
        Err(StoreError::InvalidRequest { stream_id, .. }) => assert_eq!(stream_id, a),
        other => panic!("a stream twice: expected InvalidRequest, got {other:?}"),
    }
    let empty_part = vec![
        part(&a, ExpectedVersion::Any, vec![money("Opened", 1, 0)]),
        part(&b, ExpectedVersion::Any, Vec::new()),
    ];
    match store.append_streams(empty_part).await {
        Err(StoreError::InvalidRequest { stream_id, .. }) => assert_eq!(stream_id, b),
        other => panic!("a part with no event: expected InvalidRequest, got {other:?}"),
    }
    let shared = money("Opened", 1, 0);
    let shared_id = vec![
        part(&a, ExpectedVersion::Any, vec![shared.clone()]),
        part(&b, ExpectedVersion::Any, vec![shared]),
    ];
    match store.append_streams(shared_id).await {
        Err(StoreError::InvalidRequest { stream_id, .. }) => assert_eq!(stream_id, b),
        other => panic!("an event id in two parts: expected InvalidRequest, got {other:?}"),
    }
    let unnamed = vec![
        part(&a, ExpectedVersion::Any, vec![money("Opened", 1, 0)]),
        part(
            &b,
            ExpectedVersion::Any,
            vec![NewEvent::from_value("", 1, &json!({}))],
        ),
    ];
    match store.append_streams(unnamed).await {
        Err(StoreError::InvalidRequest { stream_id, .. }) => assert_eq!(stream_id, b),
        other => panic!("a malformed event: expected InvalidRequest, got {other:?}"),
    }
    assert!(
        read_everything(&store).await.is_empty(),
        "nothing was written"
    );
    assert_eq!(store.stream_version(&a).await.expect("version"), 0);
}

/// Many tasks transfer money between four accounts at once, each transfer one call with both
/// accounts' expected versions, retried on conflicts: a subscriber sees every event once and in
/// per-stream order, no account goes below zero, the balances add up to the opening total at
/// the end, and on a single feed after every whole transfer it read.
pub async fn multi_append_concurrent_transfers_keep_the_sum<S: Store>(store: S) {
    let accounts = (1..=4).map(account).collect();
    transfers_under_load(store, accounts, 8, 25).await;
}

/// Transfers race single-stream appends to the same accounts: a single append that wins makes
/// the transfer conflict and decide again; none is lost, and a transfer is never half applied.
pub async fn multi_append_races_single_appends<S: Store>(store: S) {
    let accounts: Vec<StreamId> = (1..=3).map(account).collect();
    open_accounts(&store, &accounts, 500).await;
    let deposits = {
        let store = store.clone();
        let accounts = accounts.clone();
        tokio::spawn(async move {
            for i in 0..60u64 {
                let account = &accounts[(i % 3) as usize];
                store
                    .append(part(
                        account,
                        ExpectedVersion::Any,
                        vec![money("Credited", 1, 0)],
                    ))
                    .await
                    .expect("a deposit");
            }
        })
    };
    let mut moves = Vec::new();
    for t in 0..4u64 {
        let store = store.clone();
        let accounts = accounts.clone();
        moves.push(tokio::spawn(async move {
            let mut done = 0;
            for i in 0..15u64 {
                let from = ((t + i) % 3) as usize;
                let to = ((t + i + 1) % 3) as usize;
                let id = 1_000 * (t + 1) + i;
                if transfer(&store, &accounts[from], &accounts[to], 3, id)
                    .await
                    .0
                    .is_some()
                {
                    done += 1;
                }
            }
            done
        }));
    }
    patiently("the deposits", PATIENCE, deposits)
        .await
        .expect("deposit task");
    let mut done = 0;
    for m in moves {
        done += patiently("the transfers", PATIENCE, m)
            .await
            .expect("transfer task");
    }
    let mut sum = 0;
    let mut debits = 0;
    let mut credits = 0;
    for account in &accounts {
        let events = read(&store, account).await;
        let versions: Vec<u64> = events.iter().map(|e| e.stream_version).collect();
        assert_eq!(versions, (1..=events.len() as u64).collect::<Vec<_>>());
        sum += balance(&events);
        debits += events.iter().filter(|e| e.event_type == "Debited").count();
        credits += events
            .iter()
            .filter(|e| {
                e.event_type == "Credited"
                    && e.payload_json().expect("JSON")["transfer"].as_u64() != Some(0)
            })
            .count();
    }
    assert_eq!(debits, done);
    assert_eq!(credits, done, "every transfer has both legs");
    assert_eq!(sum, 3 * 500 + 60, "the opening total plus the deposits");
}

/// The cases that need streams in different feed partitions of one call: run them on a store
/// with several partitions (by stream id) that writes across partitions in one call (memory,
/// PostgreSQL). Redis refuses such calls, which its own tests check.
pub mod spanning {
    use super::{account, transfers_under_load, EventStore, StreamId};

    /// Accounts spread over every partition: `per_partition` in each.
    pub fn accounts_in_every_partition<S: EventStore>(
        store: &S,
        per_partition: usize,
    ) -> Vec<StreamId> {
        let partitioning = store.partitioning();
        assert!(
            !partitioning.is_single(),
            "these cases need a store with several feed partitions"
        );
        let mut found: Vec<Vec<StreamId>> = vec![Vec::new(); partitioning.count() as usize];
        let mut n = 0;
        while found.iter().any(|f| f.len() < per_partition) {
            n += 1;
            let stream = account(n);
            let slot = &mut found[partitioning.partition_of(&stream) as usize];
            if slot.len() < per_partition {
                slot.push(stream);
            }
        }
        found.into_iter().flatten().collect()
    }

    /// Concurrent transfers between accounts in different partitions, in both directions (so
    /// two calls take the partitions in opposite orders if the store does not order them):
    /// none deadlocks for good, a subscriber of every partition sees each partition's positions
    /// strictly increase with nothing skipped or repeated, and the balances add up.
    pub async fn multi_append_across_partitions_never_skips<S: EventStore>(store: S) {
        let accounts = accounts_in_every_partition(&store, 3);
        transfers_under_load(store, accounts, 16, 20).await;
    }
}
