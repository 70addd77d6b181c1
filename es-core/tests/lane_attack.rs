//! Adversarial tests of the per-aggregate lanes (`es-core/src/repository/lane.rs`,
//! `es-core/src/repository/command.rs`): each test tries to break one of their guarantees.
//! Two tests run their body in a child process (they measure the process' memory, or would crash
//! it): the test runs itself again with the `CHILD` variable set.
//!
//! Every history check replays the stream from the store and compares it with what callers were
//! told: each `Ok`'s events stored exactly once at its version, each stored command's events
//! what `handle` gives on the real state before them (no lost update), each domain error
//! justified by the state at the version it names, and real-time order respected.

#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_wrap,
    clippy::similar_names,
    clippy::many_single_char_names,
    clippy::manual_assert,
    clippy::too_many_lines,
    clippy::if_not_else
)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use es_core::contract::StoreFuture;
use es_core::{
    Aggregate, AppendLimits, AppendRequest, AppendResult, Apply, DomainEvent, EventStore,
    EventStream, ExpectedVersion, ReadAll, ReadStream, Repository, RepositoryError, RetryPolicy,
    SnapshotPolicy, SnapshotRecord, SnapshotStore, StoreError, StreamId,
};
use es_memory::InMemoryStore;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// The aggregate: an account whose decisions depend on its state.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Deposited {
    cmd: u64,
    n: i64,
}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Withdrawn {
    cmd: u64,
    n: i64,
}
/// Follows a deposit that crosses a multiple of 100; adds 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Bonus {
    cmd: u64,
}
/// Applying it panics (a bug in user code).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Poisoned {
    cmd: u64,
}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Blob {
    cmd: u64,
    data: String,
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(apply(Acct))]
enum AcctEvent {
    Deposited(Deposited),
    Withdrawn(Withdrawn),
    Bonus(Bonus),
    Poisoned(Poisoned),
    Blob(Blob),
}

impl AcctEvent {
    fn cmd(&self) -> u64 {
        match self {
            Self::Deposited(e) => e.cmd,
            Self::Withdrawn(e) => e.cmd,
            Self::Bonus(e) => e.cmd,
            Self::Poisoned(e) => e.cmd,
            Self::Blob(e) => e.cmd,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Acct {
    balance: i64,
    bonuses: u64,
    blobs: u64,
}

/// The state change of every event but `Poisoned` (the history checker uses it too).
fn fold(s: &mut Acct, e: &AcctEvent) {
    match e {
        AcctEvent::Deposited(d) => s.balance += d.n,
        AcctEvent::Withdrawn(w) => s.balance -= w.n,
        AcctEvent::Bonus(_) => {
            s.balance += 1;
            s.bonuses += 1;
        }
        AcctEvent::Poisoned(_) => {}
        AcctEvent::Blob(_) => s.blobs += 1,
    }
}

impl Apply<Deposited> for Acct {
    fn apply(&mut self, e: &Deposited) {
        fold(self, &AcctEvent::Deposited(e.clone()));
    }
}
impl Apply<Withdrawn> for Acct {
    fn apply(&mut self, e: &Withdrawn) {
        fold(self, &AcctEvent::Withdrawn(e.clone()));
    }
}
impl Apply<Bonus> for Acct {
    fn apply(&mut self, e: &Bonus) {
        fold(self, &AcctEvent::Bonus(e.clone()));
    }
}
impl Apply<Poisoned> for Acct {
    fn apply(&mut self, _: &Poisoned) {
        panic!("evolve panics on Poisoned (a bug in user code)");
    }
}
impl Apply<Blob> for Acct {
    fn apply(&mut self, e: &Blob) {
        fold(self, &AcctEvent::Blob(e.clone()));
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    /// Deposited, plus a Bonus if the balance crosses a multiple of 100.
    Deposit(i64),
    /// Withdrawn, or `Insufficient` if the balance is below.
    Withdraw(i64),
    /// No event; `TooLow` if the balance is below.
    AtLeast(i64),
    /// No event.
    Noop,
    /// Emits `Poisoned`: the repository's evolve panics.
    Poison,
    /// One event with a payload of about this many bytes.
    Blob(usize),
    /// `handle` panics.
    PanicInHandle,
}

#[derive(Debug, Clone, Copy)]
struct Cmd {
    id: u64,
    op: Op,
}

#[derive(Debug, PartialEq, thiserror::Error)]
enum AcctError {
    #[error("insufficient funds")]
    Insufficient,
    #[error("balance too low")]
    TooLow,
}

fn decide(s: &Acct, c: &Cmd) -> Result<Vec<AcctEvent>, AcctError> {
    let cmd = c.id;
    match c.op {
        Op::Deposit(n) => {
            let mut out = vec![AcctEvent::Deposited(Deposited { cmd, n })];
            if (s.balance + n).div_euclid(100) > s.balance.div_euclid(100) {
                out.push(AcctEvent::Bonus(Bonus { cmd }));
            }
            Ok(out)
        }
        Op::Withdraw(n) if s.balance < n => Err(AcctError::Insufficient),
        Op::Withdraw(n) => Ok(vec![AcctEvent::Withdrawn(Withdrawn { cmd, n })]),
        Op::AtLeast(m) if s.balance < m => Err(AcctError::TooLow),
        Op::AtLeast(_) | Op::Noop => Ok(vec![]),
        Op::Poison => Ok(vec![AcctEvent::Poisoned(Poisoned { cmd })]),
        Op::Blob(size) => Ok(vec![AcctEvent::Blob(Blob {
            cmd,
            data: "x".repeat(size),
        })]),
        Op::PanicInHandle => panic!("handle panics (a bug in user code)"),
    }
}

impl Aggregate for Acct {
    const CATEGORY: &'static str = "acct";
    type Command = Cmd;
    type Event = AcctEvent;
    type Error = AcctError;
    fn handle(&self, c: &Cmd) -> Result<Vec<AcctEvent>, AcctError> {
        decide(self, c)
    }
}

// ---------------------------------------------------------------------------------------------
// A seeded RNG (no dependency).
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn pct(&mut self, p: u32) -> bool {
        self.below(100) < u64::from(p)
    }
}

// ---------------------------------------------------------------------------------------------
// What callers were told.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
#[allow(dead_code)] // the strings are for the failure messages
enum Told {
    Ok {
        version: u64,
        events: Vec<AcctEvent>,
        ids: Vec<uuid::Uuid>,
        positions: Vec<u64>,
        aggregate: Acct,
        attempts: u32,
    },
    Domain {
        version: u64,
    },
    Conflict,
    Store(String),
    Other(String),
    Cancelled,
}

#[derive(Debug, Clone)]
struct Record {
    id: String,
    cmd: Cmd,
    start: Instant,
    end: Instant,
    told: Told,
    #[allow(dead_code)] // for the failure messages
    foreign: bool,
    /// Which repository ran it (stress tests).
    #[allow(dead_code)] // for the failure messages
    repo: usize,
}

type Log = Arc<Mutex<Vec<Record>>>;

fn told(result: Result<es_core::Executed<Acct>, RepositoryError<AcctError>>) -> Told {
    match result {
        Ok(e) => Told::Ok {
            version: e.version,
            events: e.events,
            ids: e.event_ids,
            positions: e.positions,
            aggregate: e.aggregate,
            attempts: e.attempts,
        },
        Err(RepositoryError::Domain { version, .. }) => Told::Domain { version },
        Err(RepositoryError::Conflict {
            expected, actual, ..
        }) => {
            // The conflict a command reports is one that happened: never "expected N, found N"
            // (a batch abandoned behind a conflicting one reports that one's conflict).
            assert_ne!(
                expected, actual,
                "a conflict between equal versions was reported"
            );
            Told::Conflict
        }
        Err(RepositoryError::Store { source, .. }) => Told::Store(source.to_string()),
        Err(other) => Told::Other(other.to_string()),
    }
}

/// Runs one command, optionally cancelled after `cancel_after`, and logs what the caller saw.
async fn run<S: es_core::Store>(
    repo: &Repository<S>,
    log: &Log,
    id: &str,
    cmd: Cmd,
    cancel_after: Option<Duration>,
) -> Told {
    run_tagged(repo, 0, log, id, cmd, cancel_after).await
}

async fn run_tagged<S: es_core::Store>(
    repo: &Repository<S>,
    tag: usize,
    log: &Log,
    id: &str,
    cmd: Cmd,
    cancel_after: Option<Duration>,
) -> Told {
    let start = Instant::now();
    let t = match cancel_after {
        None => told(repo.execute::<Acct>(id, &cmd).await),
        Some(d) => match tokio::time::timeout(d, repo.execute::<Acct>(id, &cmd)).await {
            Ok(r) => told(r),
            Err(_) => Told::Cancelled,
        },
    };
    log.lock().unwrap().push(Record {
        id: id.to_owned(),
        cmd,
        start,
        end: Instant::now(),
        told: t.clone(),
        foreign: false,
        repo: tag,
    });
    t
}

// ---------------------------------------------------------------------------------------------
// The failure-injecting store.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Knobs {
    /// Each append sleeps up to this long (ms) before it reaches the store.
    delay_max_ms: AtomicU64,
    /// ... plus exactly this long (ms).
    delay_fixed_ms: AtomicU64,
    /// The reply of an append that wrote takes this long (ms) to come back.
    reply_delay_ms: AtomicU64,
    /// A snapshot write takes this long (ms).
    snapshot_delay_ms: AtomicU64,
    /// Percent of appends that are written but answered Unavailable.
    lose_pct: AtomicU32,
    /// Percent of appends answered Unavailable without writing.
    down_pct: AtomicU32,
    /// Percent of stream reads that fail part-way.
    read_fail_pct: AtomicU32,
    /// Percent of appends before which "another process" runs a real command on the stream.
    interfere_pct: AtomicU32,
    /// Appends never answer.
    hang: AtomicBool,
    /// The next append panics.
    panic_next_append: AtomicBool,
    appends: AtomicU32,
    foreign_ids: AtomicU64,
}

#[derive(Clone)]
struct Faulty {
    inner: InMemoryStore,
    knobs: Arc<Knobs>,
    rng: Arc<Mutex<Rng>>,
    log: Log,
}

impl Faulty {
    fn new(inner: InMemoryStore, seed: u64, log: Log) -> Self {
        Self {
            inner,
            knobs: Arc::new(Knobs {
                foreign_ids: AtomicU64::new(1 << 40),
                ..Knobs::default()
            }),
            rng: Arc::new(Mutex::new(Rng(seed ^ 0xABCD))),
            log,
        }
    }
    fn roll(&self, pct: &AtomicU32) -> bool {
        let p = pct.load(Ordering::SeqCst);
        p > 0 && self.rng.lock().unwrap().pct(p)
    }
}

impl EventStore for Faulty {
    fn append(&self, request: AppendRequest) -> impl StoreFuture<AppendResult> {
        let this = self.clone();
        async move {
            this.knobs.appends.fetch_add(1, Ordering::SeqCst);
            if this.knobs.panic_next_append.swap(false, Ordering::SeqCst) {
                panic!("the store's driver panics inside append");
            }
            if this.knobs.hang.load(Ordering::SeqCst) {
                futures::future::pending::<()>().await;
            }
            let max = this.knobs.delay_max_ms.load(Ordering::SeqCst);
            let mut d = this.knobs.delay_fixed_ms.load(Ordering::SeqCst);
            if max > 0 {
                d += this.rng.lock().unwrap().below(max + 1);
            }
            if d > 0 {
                tokio::time::sleep(Duration::from_millis(d)).await;
            }
            if this.roll(&this.knobs.down_pct) {
                return Err(StoreError::unavailable("connection refused"));
            }
            if this.roll(&this.knobs.interfere_pct) {
                // Another process runs a real command on the same aggregate.
                let other = Repository::builder(this.inner.clone())
                    .cache_capacity(0)
                    .build()
                    .unwrap();
                let id = request.stream_id.id().to_owned();
                let n = 1 + this.rng.lock().unwrap().below(5) as i64;
                let cmd = Cmd {
                    id: this.knobs.foreign_ids.fetch_add(1, Ordering::SeqCst),
                    op: Op::Deposit(n),
                };
                let start = Instant::now();
                let t = told(other.execute::<Acct>(&id, &cmd).await);
                this.log.lock().unwrap().push(Record {
                    id,
                    cmd,
                    start,
                    end: Instant::now(),
                    told: t,
                    foreign: true,
                    repo: 99,
                });
            }
            let result = this.inner.append(request).await?;
            let reply = this.knobs.reply_delay_ms.load(Ordering::SeqCst);
            if reply > 0 {
                tokio::time::sleep(Duration::from_millis(reply)).await;
            }
            if this.roll(&this.knobs.lose_pct) {
                return Err(StoreError::unavailable("connection reset after commit"));
            }
            Ok(result)
        }
    }
    /// Not used by these tests (their commands touch one aggregate): passed through.
    fn append_streams(&self, requests: Vec<AppendRequest>) -> impl StoreFuture<Vec<AppendResult>> {
        self.inner.append_streams(requests)
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
        let events = self.inner.read_stream(stream, read);
        if self.roll(&self.knobs.read_fail_pct) {
            let k = self.rng.lock().unwrap().below(3) as usize;
            let fail = futures::stream::once(async {
                Err(StoreError::unavailable("read failed part-way"))
            });
            return Box::pin(events.take(k).chain(fail));
        }
        events
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
            let d = this.knobs.snapshot_delay_ms.load(Ordering::SeqCst);
            if d > 0 {
                tokio::time::sleep(Duration::from_millis(d)).await;
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
        backoff: es_core::Backoff::new(Duration::from_millis(1), Duration::from_millis(8)),
    }
}

// ---------------------------------------------------------------------------------------------
// The history checker.
// ---------------------------------------------------------------------------------------------

struct History {
    /// `events[v-1]` = (event id, event) at version v.
    events: Vec<(uuid::Uuid, AcctEvent)>,
    /// `positions[v-1]` = global position of the event at version v.
    positions: Vec<u64>,
    /// `states[v]` = state after version v.
    states: Vec<Acct>,
}

async fn history(store: &InMemoryStore, id: &str) -> History {
    let decoder = Repository::new(store.clone());
    let stream = Acct::stream_id(id).unwrap();
    let stored: Vec<_> = store
        .read_stream(&stream, ReadStream::forward())
        .try_collect()
        .await
        .unwrap();
    let mut events = Vec::new();
    let mut positions = Vec::new();
    let mut states = vec![Acct::default()];
    for (i, rec) in stored.iter().enumerate() {
        assert_eq!(rec.stream_version, i as u64 + 1);
        let mut decoded = decoder.decode::<Acct>(rec).unwrap();
        assert_eq!(decoded.len(), 1);
        let e = decoded.remove(0);
        let mut s = states.last().unwrap().clone();
        fold(&mut s, &e);
        states.push(s);
        events.push((rec.event_id, e));
        positions.push(rec.global_position);
    }
    History {
        events,
        positions,
        states,
    }
}

/// Checks every aggregate touched by `log`; returns the problems found.
async fn check(store: &InMemoryStore, log: &[Record]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut by_stream: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for r in log {
        by_stream.entry(&r.id).or_default().push(r);
    }
    for (id, records) in by_stream {
        let h = history(store, id).await;
        let cmds: HashMap<u64, Cmd> = records.iter().map(|r| (r.cmd.id, r.cmd)).collect();
        // Groups of stored events per command (versions).
        let mut groups: HashMap<u64, Vec<u64>> = HashMap::new();
        for (i, (_, e)) in h.events.iter().enumerate() {
            groups.entry(e.cmd()).or_default().push(i as u64 + 1);
        }
        for (cmd_id, versions) in &groups {
            let Some(cmd) = cmds.get(cmd_id) else {
                problems.push(format!("{id}: events of unknown command {cmd_id}"));
                continue;
            };
            let first = versions[0];
            if versions.windows(2).any(|w| w[1] != w[0] + 1) {
                problems.push(format!(
                    "{id}: command {cmd_id} ({:?}) stored more than once, at versions {versions:?}",
                    cmd.op
                ));
                continue;
            }
            let stored: Vec<AcctEvent> = versions
                .iter()
                .map(|v| h.events[(*v - 1) as usize].1.clone())
                .collect();
            let expected = decide(&h.states[(first - 1) as usize], cmd);
            if expected.as_ref().ok() != Some(&stored) {
                problems.push(format!(
                    "{id}: LOST UPDATE: command {cmd_id} ({:?}) stored {stored:?} at versions \
                     {versions:?}, but on the real state before them ({:?} at version {}) it \
                     gives {expected:?}",
                    cmd.op,
                    h.states[(first - 1) as usize],
                    first - 1
                ));
            }
        }
        let len = h.events.len() as u64;
        // Linearization points: (start, end, version before, version after).
        let mut points = Vec::new();
        for r in &records {
            let cmd_id = r.cmd.id;
            let stored = groups.get(&cmd_id);
            match &r.told {
                Told::Ok {
                    version,
                    events,
                    ids,
                    positions,
                    aggregate,
                    ..
                } => {
                    if *version > len {
                        problems.push(format!(
                            "{id}: command {cmd_id} told Ok at version {version}, stream has {len}"
                        ));
                        continue;
                    }
                    if events.is_empty() {
                        if stored.is_some() {
                            problems.push(format!(
                                "{id}: command {cmd_id} told Ok without events but has stored events"
                            ));
                        }
                        let real = decide(&h.states[*version as usize], &r.cmd);
                        if !real.as_ref().is_ok_and(Vec::is_empty) {
                            problems.push(format!(
                                "{id}: command {cmd_id} ({:?}) told Ok (no events) at version \
                                 {version}, but the state there gives {real:?}",
                                r.cmd.op
                            ));
                        }
                        points.push((r.start, r.end, *version, *version, *r));
                    } else {
                        let n = events.len() as u64;
                        let want: Vec<u64> = (version + 1 - n..=*version).collect();
                        if stored != Some(&want) {
                            problems.push(format!(
                                "{id}: command {cmd_id} told Ok at versions {want:?}, stored at \
                                 {stored:?}"
                            ));
                        } else {
                            let stored_positions: Vec<u64> = want
                                .iter()
                                .map(|v| h.positions[(*v - 1) as usize])
                                .collect();
                            if &stored_positions != positions {
                                problems.push(format!(
                                    "{id}: command {cmd_id} told positions {positions:?}, \
                                     stored at {stored_positions:?}"
                                ));
                            }
                            for (k, v) in want.iter().enumerate() {
                                let (sid, se) = &h.events[(*v - 1) as usize];
                                if sid != &ids[k] || se != &events[k] {
                                    problems.push(format!(
                                        "{id}: command {cmd_id}: told event {:?} ({}) at {v}, \
                                         stored {se:?} ({sid})",
                                        events[k], ids[k]
                                    ));
                                }
                            }
                        }
                        points.push((r.start, r.end, version - n, *version, *r));
                    }
                    if *version <= len && aggregate != &h.states[*version as usize] {
                        problems.push(format!(
                            "{id}: command {cmd_id} ({:?}) told state {aggregate:?} at version \
                             {version}; the stream's state there is {:?}",
                            r.cmd.op, h.states[*version as usize]
                        ));
                    }
                }
                Told::Domain { version } => {
                    if stored.is_some() {
                        problems.push(format!(
                            "{id}: command {cmd_id} told a domain error but its events are stored"
                        ));
                    }
                    if *version > len || decide(&h.states[*version as usize], &r.cmd).is_ok() {
                        problems.push(format!(
                            "{id}: command {cmd_id} ({:?}) told a domain error at version \
                             {version}, unjustified by the state there ({:?})",
                            r.cmd.op,
                            h.states.get(*version as usize)
                        ));
                    }
                    points.push((r.start, r.end, *version, *version, *r));
                }
                Told::Conflict => {
                    if stored.is_some() {
                        problems.push(format!(
                            "{id}: command {cmd_id} told Conflict but its events are stored"
                        ));
                    }
                }
                Told::Store(_) | Told::Other(_) | Told::Cancelled => {}
            }
        }
        // Real-time order: whatever finished before another started is not after it.
        for a in &points {
            for b in &points {
                if a.1 < b.0 && b.2 < a.3 {
                    problems.push(format!(
                        "{id}: real-time order broken: a command that finished at version {} \
                         preceded one decided at version {} ({:?} ended {:?} before {:?} \
                         started)",
                        a.3,
                        b.2,
                        a.4,
                        b.0 - a.1,
                        b.4
                    ));
                }
            }
        }
        // Loads agree with the replay (snapshots are right).
        let fresh = Repository::builder(store.clone())
            .cache_capacity(0)
            .build()
            .unwrap();
        let plain = fresh.load_without_snapshot::<Acct>(id).await.unwrap();
        let snap = fresh.load::<Acct>(id).await.unwrap();
        if plain.aggregate != *h.states.last().unwrap() || snap.aggregate != plain.aggregate {
            problems.push(format!(
                "{id}: loads disagree: replay {:?}, load_without_snapshot {:?}, load {:?} (snapshot {:?})",
                h.states.last(),
                plain.aggregate,
                snap.aggregate,
                snap.snapshot_version
            ));
        }
    }
    problems.truncate(12);
    problems
}

// ---------------------------------------------------------------------------------------------
// Randomized stress: many callers, several repositories, faults.
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Scenario {
    seed: u64,
    repos: Vec<usize>, // cache capacity of each repository
    aggregates: u64,
    callers: u64,
    commands: u64,
    delay_max_ms: u64,
    lose_pct: u32,
    down_pct: u32,
    read_fail_pct: u32,
    interfere_pct: u32,
    cancel_pct: u32,
    snapshot_every: Option<u64>,
    /// A background task deletes snapshots and plants older (valid) ones.
    meddle_snapshots: bool,
    max_attempts: u32,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            seed: 1,
            repos: vec![1024],
            aggregates: 2,
            callers: 12,
            commands: 25,
            delay_max_ms: 3,
            lose_pct: 0,
            down_pct: 0,
            read_fail_pct: 0,
            interfere_pct: 0,
            cancel_pct: 0,
            snapshot_every: None,
            meddle_snapshots: false,
            max_attempts: 8,
        }
    }
}

fn random_op(rng: &mut Rng) -> Op {
    match rng.below(100) {
        0..=39 => Op::Deposit(1 + rng.below(60) as i64),
        40..=74 => Op::Withdraw(1 + rng.below(80) as i64),
        75..=89 => Op::AtLeast(rng.below(150) as i64),
        _ => Op::Noop,
    }
}

async fn stress(sc: Scenario) -> (Vec<String>, Vec<Record>) {
    let log: Log = Arc::default();
    let inner = InMemoryStore::new();
    let store = Faulty::new(inner.clone(), sc.seed, Arc::clone(&log));
    let k = &store.knobs;
    k.delay_max_ms.store(sc.delay_max_ms, Ordering::SeqCst);
    k.lose_pct.store(sc.lose_pct, Ordering::SeqCst);
    k.down_pct.store(sc.down_pct, Ordering::SeqCst);
    k.read_fail_pct.store(sc.read_fail_pct, Ordering::SeqCst);
    k.interfere_pct.store(sc.interfere_pct, Ordering::SeqCst);
    let policy = match sc.snapshot_every {
        Some(n) => SnapshotPolicy::EveryNEvents(n),
        None => SnapshotPolicy::Never,
    };
    let repos: Vec<Repository<Faulty>> = sc
        .repos
        .iter()
        .map(|cap| {
            Repository::builder(store.clone())
                .cache_capacity(*cap)
                .retry_policy(retry(sc.max_attempts))
                .default_snapshot_policy(policy.clone())
                .build()
                .unwrap()
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let meddler = sc.meddle_snapshots.then(|| {
        let inner = inner.clone();
        let stop = Arc::clone(&stop);
        let aggregates = sc.aggregates;
        let mut rng = Rng(sc.seed ^ 0x5555);
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1 + rng.below(4))).await;
                let id = format!("a{}", rng.below(aggregates));
                let stream = Acct::stream_id(&id).unwrap();
                if let Ok(Some(s)) = inner.load_snapshot(&stream).await {
                    let _ = inner.delete_snapshot(&stream, s.version).await;
                }
                if rng.pct(50) {
                    // Plant an older, valid snapshot (a stale one).
                    let h = history(&inner, &id).await;
                    if !h.events.is_empty() {
                        let v = 1 + rng.below(h.events.len() as u64);
                        let rec = SnapshotRecord {
                            stream_id: stream.clone(),
                            version: v,
                            schema_version: Acct::SNAPSHOT_VERSION,
                            payload: serde_json::to_vec(&h.states[v as usize]).unwrap().into(),
                            recorded_at: chrono::Utc::now(),
                            event_id: Some(h.events[(v - 1) as usize].0),
                        };
                        let _ = inner.save_snapshot(rec).await;
                    }
                }
            }
        })
    });
    let next_id = Arc::new(AtomicU64::new(1));
    let tasks: Vec<_> = (0..sc.callers)
        .map(|c| {
            let repos = repos.clone();
            let log = Arc::clone(&log);
            let next_id = Arc::clone(&next_id);
            let sc = sc.clone();
            tokio::spawn(async move {
                let mut rng = Rng(sc.seed.wrapping_mul(1000).wrapping_add(c));
                for _ in 0..sc.commands {
                    let ix = rng.below(repos.len() as u64) as usize;
                    let repo = &repos[ix];
                    let id = format!("a{}", rng.below(sc.aggregates));
                    let cmd = Cmd {
                        id: next_id.fetch_add(1, Ordering::SeqCst),
                        op: random_op(&mut rng),
                    };
                    let cancel = rng
                        .pct(sc.cancel_pct)
                        .then(|| Duration::from_micros(rng.below(sc.delay_max_ms * 1500 + 500)));
                    run_tagged(repo, ix, &log, &id, cmd, cancel).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    if let Some(m) = meddler {
        m.await.unwrap();
    }
    // Let spawned appends of cancelled callers finish.
    tokio::time::sleep(Duration::from_millis(sc.delay_max_ms * 20 + 100)).await;
    let records = log.lock().unwrap().clone();
    (check(&inner, &records).await, records)
}

fn summary(records: &[Record]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in records {
        let k = match &r.told {
            Told::Ok { events, .. } if events.is_empty() => "ok-empty",
            Told::Ok { .. } => "ok",
            Told::Domain { .. } => "domain",
            Told::Conflict => "conflict",
            Told::Store(_) => "store",
            Told::Other(_) => "other",
            Told::Cancelled => "cancelled",
        };
        *counts.entry(k).or_default() += 1;
    }
    format!("{counts:?}")
}

async fn stress_seeds(base: Scenario, seeds: std::ops::Range<u64>) {
    for seed in seeds {
        let sc = Scenario {
            seed,
            ..base.clone()
        };
        let (problems, records) = stress(sc).await;
        assert!(
            problems.is_empty(),
            "seed {seed}: {}\n{}",
            summary(&records),
            problems.join("\n")
        );
        eprintln!("seed {seed}: {}", summary(&records));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_one_repository_slow_appends() {
    stress_seeds(
        Scenario {
            delay_max_ms: 4,
            ..Scenario::default()
        },
        0..4,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_lost_replies_and_unreachable_store() {
    stress_seeds(
        Scenario {
            lose_pct: 25,
            down_pct: 15,
            ..Scenario::default()
        },
        0..4,
    )
    .await;
}

/// Several repositories with tiny caches and another process writing: answers without events
/// must not be stale (see `an_answer_without_events_is_not_stale_after_a_slow_append_reply`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_several_repositories_tiny_caches_and_another_process() {
    stress_seeds(
        Scenario {
            repos: vec![0, 1, 1024],
            aggregates: 3,
            interfere_pct: 15,
            lose_pct: 10,
            ..Scenario::default()
        },
        0..4,
    )
    .await;
}

/// Callers cancelled mid-way, reads failing, another process writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_cancelled_callers_and_failing_reads() {
    stress_seeds(
        Scenario {
            repos: vec![1, 1024],
            cancel_pct: 35,
            read_fail_pct: 15,
            lose_pct: 10,
            interfere_pct: 5,
            ..Scenario::default()
        },
        0..4,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_snapshots_deleted_and_stale() {
    stress_seeds(
        Scenario {
            repos: vec![0, 2, 1024],
            snapshot_every: Some(2),
            meddle_snapshots: true,
            interfere_pct: 10,
            cancel_pct: 10,
            ..Scenario::default()
        },
        0..4,
    )
    .await;
}

/// With one repository and no other writer, no command needs a second attempt (guarantee 2),
/// however the callers interleave and whether some are cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_one_repository_never_conflicts_with_itself() {
    for seed in 0..4 {
        let (problems, records) = stress(Scenario {
            seed,
            repos: vec![1],
            aggregates: 3,
            cancel_pct: 20,
            delay_max_ms: 5,
            max_attempts: 1,
            ..Scenario::default()
        })
        .await;
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        for r in &records {
            match &r.told {
                Told::Ok { attempts, .. } => assert_eq!(*attempts, 1, "{r:?}"),
                Told::Conflict => panic!("seed {seed}: a command conflicted: {r:?}"),
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Targeted scenarios that hold.
// ---------------------------------------------------------------------------------------------

fn setup(delay_ms: u64) -> (InMemoryStore, Faulty, Log) {
    let log: Log = Arc::default();
    let inner = InMemoryStore::new();
    let store = Faulty::new(inner.clone(), 7, Arc::clone(&log));
    store.knobs.delay_fixed_ms.store(delay_ms, Ordering::SeqCst);
    (inner, store, log)
}

fn cmd(id: u64, op: Op) -> Cmd {
    Cmd { id, op }
}

/// A cached state, another process withdraws, then a no-event / domain-error command: it must
/// see the other process' write.
#[tokio::test]
async fn a_command_without_events_on_a_cached_state_sees_another_process() {
    let (inner, store, log) = setup(0);
    let a = Repository::new(store.clone());
    let b = Repository::new(store.clone());
    run(&a, &log, "x", cmd(1, Op::Deposit(50)), None).await;
    run(&a, &log, "x", cmd(2, Op::AtLeast(50)), None).await;
    run(&b, &log, "x", cmd(3, Op::Withdraw(40)), None).await;
    let t = run(&a, &log, "x", cmd(4, Op::AtLeast(50)), None).await;
    assert!(matches!(t, Told::Domain { version: 2 }), "{t:?}");
    let t = run(&a, &log, "x", cmd(5, Op::Withdraw(20)), None).await;
    assert!(matches!(t, Told::Domain { version: 2 }), "{t:?}");
    let records = log.lock().unwrap().clone();
    let problems = check(&inner, &records).await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A domain error decided on a state that includes a batch in flight must wait for it; if that
/// batch fails (another process wrote), the command is decided again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_error_on_a_pending_state_is_decided_again_if_the_batch_fails() {
    let (inner, store, log) = setup(0);
    let repo = Repository::builder(store.clone())
        .retry_policy(retry(5))
        .build()
        .unwrap();
    run(&repo, &log, "x", cmd(1, Op::Deposit(10)), None).await;
    store.knobs.delay_fixed_ms.store(60, Ordering::SeqCst);
    store.knobs.interfere_pct.store(100, Ordering::SeqCst);
    // Withdraw 5 is in flight (5 left, if it commits); another process deposits first.
    let r1 = repo.clone();
    let l1 = Arc::clone(&log);
    let w = tokio::spawn(async move { run(&r1, &l1, "x", cmd(2, Op::Withdraw(5)), None).await });
    tokio::time::sleep(Duration::from_millis(15)).await;
    store.knobs.interfere_pct.store(0, Ordering::SeqCst);
    let t = run(&repo, &log, "x", cmd(3, Op::AtLeast(8)), None).await;
    w.await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let records = log.lock().unwrap().clone();
    let problems = check(&inner, &records).await;
    assert!(problems.is_empty(), "{t:?}\n{}", problems.join("\n"));
}

/// A batch refused for one member's payload: the others still succeed, the big one fails, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_runs_each_member_alone() {
    let log: Log = Arc::default();
    let inner = InMemoryStore::builder()
        .limits(AppendLimits {
            max_payload_bytes: 2_000,
            ..AppendLimits::default()
        })
        .build();
    let store = Faulty::new(inner.clone(), 3, Arc::clone(&log));
    store.knobs.delay_fixed_ms.store(20, Ordering::SeqCst);
    let repo = Repository::new(store.clone());
    let mut tasks = Vec::new();
    for i in 0..12u64 {
        let repo = repo.clone();
        let log = Arc::clone(&log);
        let op = if i % 4 == 2 {
            Op::Blob(5_000)
        } else {
            Op::Deposit(7)
        };
        tasks.push(tokio::spawn(async move {
            run(&repo, &log, "x", cmd(i + 1, op), None).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let t = t.await.unwrap();
        if i % 4 == 2 {
            assert!(matches!(t, Told::Store(_)), "{i}: {t:?}");
        } else {
            assert!(matches!(t, Told::Ok { .. }), "{i}: {t:?}");
        }
    }
    let records = log.lock().unwrap().clone();
    let problems = check(&inner, &records).await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A panic in `handle` leaves nothing behind: the next commands run as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handle_leaves_the_lane_usable() {
    let (inner, store, log) = setup(30);
    let repo = Repository::new(store.clone());
    run(&repo, &log, "x", cmd(1, Op::Deposit(10)), None).await;
    let r = repo.clone();
    let l = Arc::clone(&log);
    let a = tokio::spawn(async move { run(&r, &l, "x", cmd(2, Op::Deposit(5)), None).await });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let r = repo.clone();
    let p = tokio::spawn(async move { r.execute::<Acct>("x", &cmd(3, Op::PanicInHandle)).await });
    assert!(p.await.unwrap_err().is_panic());
    let t = run(&repo, &log, "x", cmd(4, Op::Withdraw(15)), None).await;
    assert!(matches!(t, Told::Ok { version: 3, .. }), "{t:?}");
    a.await.unwrap();
    let records = log.lock().unwrap().clone();
    let problems = check(&inner, &records).await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Sequential commands on many aggregates: idle, the repository holds at most its capacity.
#[tokio::test]
async fn the_cache_is_bounded_after_completed_commands() {
    let (_inner, store, log) = setup(0);
    let repo = Repository::builder(store)
        .cache_capacity(2)
        .build()
        .unwrap();
    for i in 0..30u64 {
        run(
            &repo,
            &log,
            &format!("c{i}"),
            cmd(i + 1, Op::Deposit(1)),
            None,
        )
        .await;
    }
    assert!(repo.aggregates_in_memory() <= 2);
}

// ---------------------------------------------------------------------------------------------
// Single scenarios.
// ---------------------------------------------------------------------------------------------

/// Guarantees 1, 3, 6. A command whose event makes `evolve` panic (a bug in one caller's
/// command) while batches are in flight: the next command must not decide on the committed
/// state and join a batch built on the batches in flight (a lost update). Here an account with
/// 101, withdrawals of 60 and 10 in flight, then a withdrawal of 50: refused on 31.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_evolve_makes_the_lane_load_again() {
    let (inner, store, log) = setup(0);
    let repo = Repository::builder(store.clone())
        .snapshot_policy::<Acct>(SnapshotPolicy::Never)
        .build()
        .unwrap();
    run(&repo, &log, "x", cmd(1, Op::Deposit(100)), None).await;
    store.knobs.delay_fixed_ms.store(150, Ordering::SeqCst);
    let spawn = |id: u64, op: Op| {
        let repo = repo.clone();
        let log = Arc::clone(&log);
        tokio::spawn(async move { run(&repo, &log, "x", cmd(id, op), None).await })
    };
    let a = spawn(2, Op::Withdraw(60)); // batch 1, in flight
    tokio::time::sleep(Duration::from_millis(5)).await;
    let b = spawn(3, Op::Withdraw(10)); // batch 2, open
    tokio::time::sleep(Duration::from_millis(5)).await;
    let r = repo.clone();
    let p = tokio::spawn(async move { r.execute::<Acct>("x", &cmd(4, Op::Poison)).await });
    assert!(
        p.await.unwrap_err().is_panic(),
        "evolve panicked in that caller"
    );
    let c = spawn(5, Op::Withdraw(50)); // 30 left: must be refused
    let (a, b, c) = (a.await.unwrap(), b.await.unwrap(), c.await.unwrap());
    eprintln!("a: {a:?}\nb: {b:?}\nc: {c:?}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let records = log.lock().unwrap().clone();
    let problems = check(&inner, &records).await;
    let h = history(&inner, "x").await;
    assert!(
        problems.is_empty(),
        "final balance {}\n{}",
        h.states.last().unwrap().balance,
        problems.join("\n")
    );
}

/// Where the append of a batch is slow to settle after the store wrote it.
#[derive(Clone, Copy)]
enum SlowAfterWrite {
    /// The append's reply.
    Reply,
    /// The snapshot written after it (one more round trip before the batch settles).
    SnapshotWrite,
}

/// Guarantee 1 (linearizability across processes). A command without events decided on a
/// state that includes a batch not settled yet: the batch may have been written before the
/// command began (only its settlement is late), and another process may have written since.
/// Repository A's deposit is written (balance 15) but settles 100 ms late; repository B
/// deposits 100 and returns (balance 116); then A's caller asks `AtLeast(100)`: Ok at version 4.
async fn an_answer_without_events_is_not_stale(slow: SlowAfterWrite) {
    let (inner, store, log) = setup(0);
    let policy = match slow {
        SlowAfterWrite::Reply => SnapshotPolicy::Never,
        SlowAfterWrite::SnapshotWrite => SnapshotPolicy::EveryNEvents(1),
    };
    let a = Repository::builder(store.clone())
        .snapshot_policy::<Acct>(policy)
        .build()
        .unwrap();
    let b = Repository::builder(store.clone())
        .cache_capacity(0)
        .build()
        .unwrap();
    run(&a, &log, "x", cmd(1, Op::Deposit(10)), None).await;
    let knob = match slow {
        SlowAfterWrite::Reply => &store.knobs.reply_delay_ms,
        SlowAfterWrite::SnapshotWrite => &store.knobs.snapshot_delay_ms,
    };
    knob.store(100, Ordering::SeqCst);
    let (a2, l2) = (a.clone(), Arc::clone(&log));
    let late = tokio::spawn(async move { run(&a2, &l2, "x", cmd(2, Op::Deposit(5)), None).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    knob.store(0, Ordering::SeqCst);
    let other = run(&b, &log, "x", cmd(3, Op::Deposit(100)), None).await;
    assert!(matches!(other, Told::Ok { version: 4, .. }), "{other:?}");
    // Started after the other process' deposit returned: balance 116.
    let asked = run(&a, &log, "x", cmd(4, Op::AtLeast(100)), None).await;
    late.await.unwrap();
    let records = log.lock().unwrap().clone();
    let problems = check(&inner, &records).await;
    assert!(
        problems.is_empty(),
        "AtLeast(100) was told {asked:?}\n{}",
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_events_is_not_stale_after_a_slow_append_reply() {
    an_answer_without_events_is_not_stale(SlowAfterWrite::Reply).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_events_is_not_stale_behind_a_slow_snapshot_write() {
    an_answer_without_events_is_not_stale(SlowAfterWrite::SnapshotWrite).await;
}

/// A hung append blocks its own aggregate only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_append_blocks_only_its_aggregate() {
    let (_inner, store, _log) = setup(0);
    let repo = Repository::new(store.clone());
    store.knobs.hang.store(true, Ordering::SeqCst);
    let r = repo.clone();
    let stuck = tokio::spawn(async move { r.execute::<Acct>("x", &cmd(1, Op::Deposit(1))).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.knobs.hang.store(false, Ordering::SeqCst);
    let other = tokio::time::timeout(
        Duration::from_secs(2),
        repo.execute::<Acct>("y", &cmd(2, Op::Deposit(1))),
    )
    .await;
    assert!(matches!(other, Ok(Ok(_))), "{other:?}");
    stuck.abort();
}

/// Guarantee 4. The task that appends a batch dies before settling it (the runtime it ran on
/// is shut down, as when a repository is shared between `#[tokio::test]`s): the caller gets an
/// error, and later commands on that aggregate are answered.
#[test]
fn a_dead_append_task_does_not_wedge_the_aggregate() {
    let (_inner, store, log) = setup(0);
    store.knobs.delay_fixed_ms.store(200, Ordering::SeqCst);
    let repo = Repository::new(store.clone());
    let rt1 = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let first = rt1.block_on(run(
        &repo,
        &log,
        "x",
        cmd(1, Op::Deposit(1)),
        Some(Duration::from_millis(20)),
    ));
    assert!(matches!(first, Told::Cancelled));
    drop(rt1); // the append task dies with its runtime
    store.knobs.delay_fixed_ms.store(0, Ordering::SeqCst);
    let rt2 = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let second = rt2.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(3),
            repo.execute::<Acct>("x", &cmd(2, Op::Deposit(2))),
        )
        .await
    });
    let third = rt2.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(1),
            repo.execute::<Acct>("x", &cmd(3, Op::AtLeast(0))),
        )
        .await
    });
    assert!(
        second.is_ok() && third.is_ok(),
        "HANG: a command with events: {:?}; a command without: {:?}",
        second.as_ref().map(|r| r.as_ref().map(|e| e.version)),
        third.as_ref().map(|r| r.as_ref().map(|e| e.version)),
    );
}

/// Guarantee 4: a store whose append panics once (a driver bug): the caller gets an error, and
/// later commands on that aggregate are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_append_answers_the_caller_and_frees_the_aggregate() {
    let (_inner, store, _log) = setup(0);
    let repo = Repository::new(store.clone());
    repo.execute::<Acct>("x", &cmd(1, Op::Deposit(1)))
        .await
        .unwrap();
    store.knobs.panic_next_append.store(true, Ordering::SeqCst);
    let first = tokio::time::timeout(
        Duration::from_secs(2),
        repo.execute::<Acct>("x", &cmd(2, Op::Deposit(1))),
    )
    .await;
    let second = tokio::time::timeout(
        Duration::from_secs(1),
        repo.execute::<Acct>("x", &cmd(3, Op::Deposit(1))),
    )
    .await;
    assert!(
        first.is_ok() && second.is_ok(),
        "HANG: the command whose append panicked: {}; the next command: {}",
        if first.is_ok() {
            "answered"
        } else {
            "no answer"
        },
        if second.is_ok() {
            "answered"
        } else {
            "no answer"
        },
    );
    // The caller is told the outcome is unknown; the append wrote nothing, so the next command
    // follows the first deposit.
    let first = first.unwrap();
    assert!(
        matches!(&first, Err(RepositoryError::Store { source, .. }) if source.is_transient()),
        "{first:?}"
    );
    let second = second.unwrap().expect("the next command succeeds");
    assert_eq!(second.version, 2, "{second:?}");
}

/// Guarantee 2. A `load` (from any caller, even a read-only query) finds a snapshot that does
/// not match its stream while commands are in flight: the repository keeps one lane for the
/// aggregate, and its commands do not conflict with each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatched_snapshot_found_by_a_load_does_not_split_a_busy_lane() {
    let (inner, store, log) = setup(0);
    let repo = Repository::builder(store.clone())
        .retry_policy(retry(1))
        .build()
        .unwrap();
    for i in 1..=3 {
        run(&repo, &log, "x", cmd(i, Op::Deposit(10)), None).await;
    }
    // A snapshot that does not match the stream (say, restored from another environment).
    let stream = Acct::stream_id("x").unwrap();
    inner
        .save_snapshot(SnapshotRecord {
            stream_id: stream.clone(),
            version: 3,
            schema_version: Acct::SNAPSHOT_VERSION,
            payload: serde_json::to_vec(&Acct::default()).unwrap().into(),
            recorded_at: chrono::Utc::now(),
            event_id: Some(uuid::Uuid::now_v7()),
        })
        .await
        .unwrap();
    store.knobs.delay_fixed_ms.store(60, Ordering::SeqCst);
    let r = repo.clone();
    let l = Arc::clone(&log);
    let first = tokio::spawn(async move { run(&r, &l, "x", cmd(4, Op::Deposit(1)), None).await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    // A query loads the aggregate: the snapshot is found stale and discarded.
    let loaded = repo.load::<Acct>("x").await.unwrap();
    assert_eq!(loaded.version, 3);
    let second = run(&repo, &log, "x", cmd(5, Op::Deposit(1)), None).await;
    let first = first.await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let records = log.lock().unwrap().clone();
    let problems = check(&inner, &records).await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    for t in [&first, &second] {
        assert!(
            matches!(t, Told::Ok { attempts: 1, .. }),
            "two commands of one repository conflicted: first {first:?}, second {second:?}"
        );
    }
}

/// Guarantee 5. Callers cancelled mid-way: once idle, the repository holds no more lanes than
/// `cache_capacity`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_callers_leave_no_lanes_beyond_the_capacity() {
    let (_inner, store, log) = setup(0);
    store.knobs.delay_fixed_ms.store(30, Ordering::SeqCst);
    let repo = Repository::builder(store)
        .cache_capacity(2)
        .build()
        .unwrap();
    for i in 0..20u64 {
        run(
            &repo,
            &log,
            &format!("c{i}"),
            cmd(i + 1, Op::Deposit(1)),
            Some(Duration::from_millis(2)),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // every append is done: idle
    assert!(
        repo.aggregates_in_memory() <= 2,
        "idle repository with cache_capacity 2 holds {} aggregates",
        repo.aggregates_in_memory()
    );
}

/// `SnapshotContext::previous_version` is "the stream version before the command", also for a
/// command that joined a batch behind others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_context_names_the_version_before_the_command() {
    let (_inner, store, _log) = setup(0);
    store.knobs.delay_fixed_ms.store(20, Ordering::SeqCst);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let repo = Repository::builder(store)
        .snapshot_policy::<Acct>(SnapshotPolicy::Custom(Arc::new(move |ctx| {
            s.lock().unwrap().push((ctx.previous_version, ctx.version));
            false
        })))
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..10u64)
        .map(|i| {
            let repo = repo.clone();
            tokio::spawn(async move {
                repo.execute::<Acct>("x", &cmd(i + 1, Op::Withdraw(0)))
                    .await
                    .unwrap()
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|(prev, v)| v - prev == 1),
        "each command emits one event, but the policy saw (previous_version, version) = {seen:?}"
    );
}

// --- The batch chain: every batch keeps the one before it alive, forever. ---------------------

/// A store that accepts every append and keeps nothing, so that only the repository's own
/// memory grows.
#[derive(Clone, Default)]
struct BlackHole {
    position: Arc<AtomicU64>,
}

impl EventStore for BlackHole {
    fn append(&self, request: AppendRequest) -> impl StoreFuture<AppendResult> {
        let n = request.events.len() as u64;
        let base = match request.expected {
            ExpectedVersion::Exact(v) => v,
            _ => 0,
        };
        let first = self.position.fetch_add(n, Ordering::SeqCst) + 1;
        futures::future::ready(Ok(AppendResult {
            stream_version: base + n,
            positions: (first..first + n).collect(),
            duplicate: false,
        }))
    }
    fn append_streams(&self, requests: Vec<AppendRequest>) -> impl StoreFuture<Vec<AppendResult>> {
        let results = requests
            .iter()
            .map(|request| {
                let n = request.events.len() as u64;
                let base = match request.expected {
                    ExpectedVersion::Exact(v) => v,
                    _ => 0,
                };
                let first = self.position.fetch_add(n, Ordering::SeqCst) + 1;
                AppendResult {
                    stream_version: base + n,
                    positions: (first..first + n).collect(),
                    duplicate: false,
                }
            })
            .collect();
        futures::future::ready(Ok(results))
    }
    fn archive_stream(
        &self,
        stream: &StreamId,
        before: u64,
    ) -> impl StoreFuture<es_core::Archived> {
        let checked = es_core::contract::check_archive(stream, before, 0);
        futures::future::ready(checked.map(|()| es_core::Archived {
            moved: 0,
            hot_from: 1,
        }))
    }
    fn stream_version(&self, _: &StreamId) -> impl StoreFuture<u64> {
        futures::future::ready(Ok(0))
    }
    fn list_streams(&self, _: es_core::ListStreams) -> impl StoreFuture<es_core::StreamPage> {
        futures::future::ready(Ok(es_core::StreamPage::default()))
    }
    fn read_stream(&self, _: &StreamId, _: ReadStream) -> EventStream {
        Box::pin(futures::stream::empty())
    }
    fn read_all(&self, _: ReadAll) -> EventStream {
        Box::pin(futures::stream::empty())
    }
    fn partition_head(&self, _: u32) -> impl StoreFuture<u64> {
        futures::future::ready(Ok(0))
    }
    fn wait_for_partition(&self, _: u32, _: u64) -> impl Future<Output = ()> + Send {
        futures::future::ready(())
    }
}

impl SnapshotStore for BlackHole {
    fn load_snapshot(&self, _: &StreamId) -> impl StoreFuture<Option<SnapshotRecord>> {
        futures::future::ready(Ok(None))
    }
    fn save_snapshot(&self, _: SnapshotRecord) -> impl StoreFuture<bool> {
        futures::future::ready(Ok(true))
    }
    fn delete_snapshot(&self, _: &StreamId, _: u64) -> impl StoreFuture<bool> {
        futures::future::ready(Ok(false))
    }
}

const CHILD: &str = "LANE_ATTACK_CHILD";

fn run_child(name: &str) -> std::process::Output {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .unwrap()
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Runs `commands` one after another on one aggregate, on a 2 MiB thread (a tokio worker's
/// default stack), then `after` on the same thread.
fn on_worker_sized_thread(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

async fn sequential(repo: &Repository<BlackHole>, id: &str, from: u64, count: u64) {
    for i in from..from + count {
        repo.execute::<Acct>(id, &cmd(i, Op::Deposit(1)))
            .await
            .unwrap();
    }
}

/// The part of `a_hot_aggregate_does_not_grow_memory` that runs in a child process.
fn child_memory_of_a_hot_aggregate() {
    on_worker_sized_thread(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let repo = Repository::builder(BlackHole::default())
                .default_snapshot_policy(SnapshotPolicy::Never)
                .build()
                .unwrap();
            sequential(&repo, "hot", 1, 5_000).await;
            let before = rss_bytes();
            sequential(&repo, "hot", 5_001, 60_000).await;
            let after = rss_bytes();
            println!("RSS_GROWTH {}", after.saturating_sub(before));
            // Do not drop the repository here (see the stack test).
            std::mem::forget(repo);
        });
    });
}

/// Guarantee 5. 60,000 commands, one after another, on one aggregate, against a store that keeps
/// nothing: the repository's memory does not grow (a lane keeps only its batches not settled).
#[test]
fn a_hot_aggregate_does_not_grow_memory() {
    if std::env::var_os(CHILD).is_some() {
        child_memory_of_a_hot_aggregate();
        return;
    }
    let out = run_child("a_hot_aggregate_does_not_grow_memory");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {stdout}");
    let growth: u64 = stdout
        .lines()
        .find_map(|l| l.split("RSS_GROWTH ").nth(1))
        .expect("the child reports")
        .trim()
        .parse()
        .unwrap();
    assert!(
        growth < 4 << 20,
        "60,000 more sequential commands on one cached aggregate grew the resident memory by \
         {} KiB (the store keeps nothing)",
        growth >> 10
    );
}

/// The part of `evicting_a_long_lived_aggregate_does_not_overflow_the_stack` that runs in a child process.
fn child_evict_a_long_lived_aggregate() {
    on_worker_sized_thread(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let repo = Repository::builder(BlackHole::default())
                .default_snapshot_policy(SnapshotPolicy::Never)
                .cache_capacity(1)
                .build()
                .unwrap();
            let n = std::env::var("LANE_ATTACK_N")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(60_000);
            sequential(&repo, "hot", 1, n).await;
            println!("built the chain");
            // Another aggregate pushes "hot" out of the cache: its lane is dropped, and with it
            // the chain of 60,000 batches, recursively.
            sequential(&repo, "other", 100_000, 1).await;
            println!("EVICTED_OK");
        });
    });
}

/// Guarantees 4 and 5. After 60,000 commands on one aggregate, evicting it does not overflow a
/// 2 MiB stack (a tokio worker's default).
#[test]
fn evicting_a_long_lived_aggregate_does_not_overflow_the_stack() {
    if std::env::var_os(CHILD).is_some() {
        child_evict_a_long_lived_aggregate();
        return;
    }
    let out = run_child("evicting_a_long_lived_aggregate_does_not_overflow_the_stack");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("EVICTED_OK"),
        "the process died evicting the aggregate: {:?}\n{}",
        out.status,
        stderr.lines().rev().take(3).collect::<Vec<_>>().join("\n")
    );
}
