//! Group commit: concurrent appends of one store share one transaction and one commit.
//!
//! Callers put validated requests on a queue. A writer task takes what is queued (up to a size
//! budget, at most one append per stream), sends it as one call of the `append_events` function,
//! and answers every caller with its own outcome: a conflict, a duplicate or a malformed event
//! fails only its own append (a group that fails as a whole is re-run append by append).
//!
//! Pacing. Small groups (under [`PARALLEL_MIN_EVENTS`] events) run one at a time: while one is
//! in flight the next keeps gathering, and after a call the next group waits up to
//! [`MAX_LINGER`] (and at most an eighth of the last call's duration) for the callers the last
//! call answered, who in a command loop append again right away. So sixteen tasks appending
//! single events settle into one group of sixteen per commit instead of two alternating halves.
//! Large groups run in parallel on up to `writers` connections: their cost is CPU on the server
//! rather than the commit, and their commits are still few.
//!
//! Inline projections. Without them a group is one autocommit statement. With them the group
//! runs in an explicit transaction: `append_events` (told not to wait for earlier allocations),
//! then each projection once per written append, then `wait_for_predecessors`, then COMMIT. So
//! the projections of concurrent groups run in parallel and only the commits stay ordered. A
//! projection that fails rolls the group back at once (an explicit ROLLBACK, so the positions it
//! drew are released before the caller hears of it); its append gets
//! [`StoreError::InlineProjection`] and the rest of the group runs again without it.
//!
//! Bounded stalls. Every append runs under the store's append time-out `T`: its own lock waits
//! (streams, inserts) give up after `T` (`lock_timeout`), and with inline projections the
//! transaction is also limited to `T` per statement and `T` idle between statements, set locally
//! in the transaction (`statement_timeout`, `idle_in_transaction_session_timeout`), so a
//! projection that hangs, a client that is paused or a host that vanished is aborted by
//! PostgreSQL itself. The wait for earlier allocations is exempt: each of them is bounded the same
//! way. On the client side a call that has not answered after [`deadline`] is abandoned and its
//! connection closed (never returned to the pool), and its callers get
//! [`StoreError::Unavailable`].
//!
//! Backpressure. The job queue is bounded: when it is full, `append` waits for room. Jobs whose
//! caller stopped waiting are dropped unsent when a group is formed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use es_core::contract::{classify_retry, StoredEventRef};
use es_core::projection::HandlerError;
use es_core::{AppendRequest, AppendResult, ExpectedVersion, RecordedEvent, StoreError, StreamId};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgBindIterExt, PgConnection, PgPool, PgRow};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Connection, Postgres, Row};
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use uuid::Uuid;

use crate::codec::{to_u64, RawJson, RawJsonb};
use crate::error::{
    constraint, is_retryable, is_unavailable, shared_store_error, sqlstate, store_error,
};
use crate::inline::InlineProjection;
use crate::protocol::{column, AppendOutcome, ExpectedKind, UNCHECKED_INCARNATION};
use crate::schema::Sql;

pub(crate) mod streams;

/// Most appends in one group.
const MAX_GROUP_APPENDS: usize = 256;
/// Most events in one group (a larger single append still goes alone).
const MAX_GROUP_EVENTS: usize = 10_000;
/// Most payload bytes in one group (a larger single append still goes alone).
const MAX_GROUP_BYTES: usize = 16 << 20;
/// The longest a writer waits for the callers it expects before sending a group.
const MAX_LINGER: Duration = Duration::from_micros(500);
/// A group with fewer events waits for the call in flight to end before it is sent.
const PARALLEL_MIN_EVENTS: usize = 64;
/// Attempts for a group that hit a deadlock, a serialization failure or an event id that a
/// concurrent transaction stored first.
const MAX_ATTEMPTS: usize = 4;

/// How long the client waits for an append call with time-out `append` before it gives the call
/// up and closes its connection: the call's own bounded work, the bounded wait for earlier
/// allocations, and a margin for the commit.
pub(crate) fn deadline(append: Duration) -> Duration {
    append * 3 + Duration::from_secs(2)
}

/// How many jobs the next group should gather, and for how long to wait for them.
#[derive(Debug, Clone, Copy)]
struct Pace {
    expect: usize,
    linger: Duration,
}

/// State shared by the writer tasks of one store.
pub(crate) struct Shared {
    queue: Mutex<Queue>,
    /// The append time-out (see the module docs).
    append_timeout: Duration,
    /// Calls in flight, per partition.
    calls: Box<[watch::Sender<usize>]>,
    /// Appends queued or in a call, not yet answered.
    active: AtomicUsize,
    writers: usize,
    pace: std::sync::Mutex<Pace>,
}

impl Shared {
    pub(crate) fn new(
        jobs: mpsc::Receiver<Job>,
        writers: usize,
        append_timeout: Duration,
        partitions: u32,
    ) -> Self {
        Self {
            queue: Mutex::new(Queue {
                jobs,
                carry: VecDeque::new(),
            }),
            append_timeout,
            calls: (0..partitions).map(|_| watch::channel(0).0).collect(),
            active: AtomicUsize::new(0),
            writers,
            pace: std::sync::Mutex::new(Pace {
                expect: 1,
                linger: Duration::ZERO,
            }),
        }
    }

    /// Counts an append that is about to be queued.
    pub(crate) fn enqueued(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    /// Uncounts an append that will not be answered by a writer (it could not be queued, or its
    /// caller gave up before it was sent).
    pub(crate) fn withdrawn(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    fn pace(&self) -> Pace {
        *self
            .pace
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Queued jobs, and jobs set aside because their stream was already in the group being formed.
struct Queue {
    jobs: mpsc::Receiver<Job>,
    carry: VecDeque<Job>,
}

/// One queued append and where to send its outcome.
pub(crate) struct Job {
    pub(crate) request: AppendRequest,
    /// The partition of the request's stream.
    pub(crate) partition: u32,
    pub(crate) reply: oneshot::Sender<Result<AppendResult, StoreError>>,
}

impl Job {
    fn bytes(&self) -> usize {
        let events: usize = self
            .request
            .events
            .iter()
            .map(|e| e.payload.len() + e.event_type.len() + 64)
            .sum();
        let outbox: usize = self
            .request
            .outbox
            .iter()
            .map(|m| m.payload.len() + m.topic.len() + m.key.len() + m.message_type.len() + 64)
            .sum();
        events + outbox
    }
}

/// One writer task.
pub(crate) struct Writer {
    pub(crate) pool: PgPool,
    /// The connection this writer keeps between groups (taken from the pool on first use and
    /// after a connection failure), so a group costs one round trip and no pool checkout.
    pub(crate) conn: Option<PoolConnection<Postgres>>,
    pub(crate) sql: Arc<Sql>,
    /// The head of each partition, as far as this store knows.
    pub(crate) heads: Arc<[watch::Sender<u64>]>,
    /// The heads this store's commits reached, for the notifier.
    pub(crate) committed: Arc<crate::listener::Committed>,
    pub(crate) shared: Arc<Shared>,
    /// Inline projections, run in the append transaction of every written append.
    pub(crate) inline: Arc<[InlineProjection]>,
}

/// The outcome of one `append_events` call.
pub(crate) struct CallResult {
    outcomes: Vec<i16>,
    versions: Vec<i64>,
    offsets: Vec<Option<i64>>,
    base: Option<i64>,
    recorded: Option<DateTime<Utc>>,
    found: HashMap<Uuid, StoredEventRef>,
}

pub(crate) enum CallError {
    /// The call failed as a whole.
    Sql(sqlx::Error),
    /// The call succeeded but its result could not be read (a corrupt stored row).
    Store(StoreError),
    /// An inline projection failed on the append at `index`; the transaction was rolled back.
    Inline {
        index: usize,
        projection: String,
        reason: String,
    },
}

impl Writer {
    /// Runs until the store is dropped (the queue closes).
    pub(crate) async fn run(mut self) {
        while let Some((partition, group)) = self.next_group().await {
            let started = tokio::time::Instant::now();
            let answered = group.len();
            self.execute(partition, group).await;
            self.shared.calls[partition as usize].send_modify(|calls| *calls -= 1);
            // The callers just answered are likely to append again right away (a closed loop of
            // commands); with those queued or in other calls they are the concurrency to expect.
            let others = self.shared.active.fetch_sub(answered, Ordering::Relaxed) - answered;
            let pace = Pace {
                expect: (answered + others).min(MAX_GROUP_APPENDS),
                linger: (started.elapsed() / 8).min(MAX_LINGER),
            };
            *self
                .shared
                .pace
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = pace;
        }
    }

    /// Forms the next group (the appends of one partition) and registers it as a call in flight.
    ///
    /// Takes carried-over jobs first, then whatever is queued; jobs of other partitions are
    /// carried over to a later group. While another call of the partition is in flight and the
    /// group is small, keeps gathering until that call ends: small appends gain more from
    /// sharing a commit than from running in parallel, large ones from using more cores. Then,
    /// if fewer jobs are there than the last call suggests will come, waits briefly for them.
    async fn next_group(&self) -> Option<(u32, Vec<Job>)> {
        let mut queue = self.shared.queue.lock().await;
        let queue = &mut *queue;
        let first = loop {
            let job = match queue.carry.pop_front() {
                Some(job) => job,
                None => queue.jobs.recv().await?,
            };
            if let Some(job) = self.wanted(job) {
                break job;
            }
        };
        let mut group = Group::new(first);
        for _ in 0..queue.carry.len() {
            let Some(job) = queue.carry.pop_front() else {
                break;
            };
            if let Some(job) = self.wanted(job) {
                group.add_or_carry(job, &mut queue.carry);
            }
        }
        while !group.full() {
            match queue.jobs.try_recv() {
                Ok(job) => {
                    if let Some(job) = self.wanted(job) {
                        group.add_or_carry(job, &mut queue.carry);
                    }
                }
                Err(_) => break,
            }
        }
        let partition = group.partition;
        let mut calls = self.shared.calls[partition as usize].subscribe();
        // Gathering holds the queue: it stops as soon as another partition with no call in
        // flight has jobs waiting, so that partitions commit side by side.
        while *calls.borrow_and_update() > 0
            && group.events < PARALLEL_MIN_EVENTS
            && !group.full()
            && !self.other_partition_ready(partition, &queue.carry)
        {
            tokio::select! {
                job = queue.jobs.recv() => match job {
                    Some(job) => {
                        if let Some(job) = self.wanted(job) {
                            group.add_or_carry(job, &mut queue.carry);
                        }
                    }
                    None => break,
                },
                _ = calls.changed() => {}
            }
        }
        // Small groups run one at a time and wait for every caller expected; large ones share
        // the expected callers among the writers, which run them in parallel.
        let pace = self.shared.pace();
        let expect = if group.events < PARALLEL_MIN_EVENTS {
            pace.expect
        } else {
            pace.expect.div_ceil(self.shared.writers)
        };
        let deadline = tokio::time::Instant::now() + pace.linger;
        while !group.full() && group.jobs.len() + queue.carry.len() < expect {
            match tokio::time::timeout_at(deadline, queue.jobs.recv()).await {
                Ok(Some(job)) => {
                    if let Some(job) = self.wanted(job) {
                        group.add_or_carry(job, &mut queue.carry);
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        self.shared.calls[partition as usize].send_modify(|calls| *calls += 1);
        Some((partition, group.jobs))
    }

    /// Whether `carry` holds a job of a partition other than `partition` that has no call in
    /// flight.
    fn other_partition_ready(&self, partition: u32, carry: &VecDeque<Job>) -> bool {
        carry.iter().any(|job| {
            job.partition != partition && *self.shared.calls[job.partition as usize].borrow() == 0
        })
    }

    /// `job`, unless its caller has stopped waiting: then it is dropped unsent.
    fn wanted(&self, job: Job) -> Option<Job> {
        if job.reply.is_closed() {
            self.shared.withdrawn();
            None
        } else {
            Some(job)
        }
    }

    /// Runs a group, retrying transient conflicts; if the group fails for a reason other than a
    /// lost connection, runs its appends one by one so that a bad append fails alone.
    async fn execute(&mut self, partition: u32, mut jobs: Vec<Job>) {
        let mut attempt = 1;
        let mut checks = 0;
        // An append that does not check for an exact version may be the retry of a stored batch
        // that its expected version cannot reveal: look its ids up before allocating, so that the
        // common idempotent retry does not fail on the unique key after drawing positions.
        let mut lookup = jobs.iter().any(|j| {
            !j.request.events.is_empty()
                && matches!(
                    j.request.expected,
                    ExpectedVersion::Any | ExpectedVersion::StreamExists
                )
        });
        let err = loop {
            match self.call(partition, &jobs, lookup).await {
                Ok(result) => return self.answer(partition, jobs, &result),
                Err(CallError::Inline {
                    index,
                    projection,
                    reason,
                }) if index < jobs.len() => {
                    // Nothing was written. The failing append fails alone; the others run again.
                    let job = jobs.remove(index);
                    let _ = job.reply.send(Err(StoreError::InlineProjection {
                        stream_id: job.request.stream_id.clone(),
                        projection,
                        reason,
                    }));
                    if jobs.is_empty() {
                        return;
                    }
                }
                Err(CallError::Sql(err))
                    if sqlstate(&err) == Some(UNCHECKED_INCARNATION) && checks < MAX_ATTEMPTS =>
                {
                    // A session's first allocation: check the server's incarnation (starting an
                    // epoch if it is new), then run the group again. Nothing was allocated. (A
                    // session setting that does not stick, behind a transaction-mode pooler,
                    // ends here after a few checks with the error.)
                    checks += 1;
                    if let Err(err) = self.check_incarnation().await {
                        break err;
                    }
                }
                Err(CallError::Sql(err)) if retry_as_is(&err) && attempt < MAX_ATTEMPTS => {
                    tracing::debug!(error = %err, attempt, "append group retried");
                    // A stored event id: this time look every id up, so that each append is
                    // classified (exact retry or partial overlap).
                    lookup |= is_event_id_violation(&err);
                    attempt += 1;
                }
                Err(err) => break err,
            }
        };
        match err {
            CallError::Sql(err) if is_unavailable(&err) => {
                // The outcome is unknown (or the transaction was rolled back): every caller gets
                // `Unavailable` and may retry, idempotently by event id.
                let err = Arc::new(err);
                for job in jobs {
                    let _ = job.reply.send(Err(shared_store_error(&err)));
                }
            }
            _ if jobs.len() > 1 => {
                for job in jobs {
                    Box::pin(self.execute(partition, vec![job])).await;
                }
            }
            err => {
                let Some(job) = jobs.pop() else { return };
                let err = match err {
                    CallError::Sql(err) => append_error(&job.request, err),
                    CallError::Store(err) => err,
                    CallError::Inline {
                        projection, reason, ..
                    } => StoreError::InlineProjection {
                        stream_id: job.request.stream_id.clone(),
                        projection,
                        reason,
                    },
                };
                let _ = job.reply.send(Err(err));
            }
        }
    }

    /// Runs `check_incarnation()` on the writer's connection, in a statement of its own.
    async fn check_incarnation(&mut self) -> Result<(), CallError> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            slot @ None => slot.insert(self.pool.acquire().await.map_err(CallError::Sql)?),
        };
        let result = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.check_incarnation)))
            .execute(&mut **conn)
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(err) => {
                if is_unavailable(&err) {
                    self.conn = None;
                }
                Err(CallError::Sql(err))
            }
        }
    }

    async fn call(
        &mut self,
        partition: u32,
        jobs: &[Job],
        lookup: bool,
    ) -> Result<CallResult, CallError> {
        let timeout = self.shared.append_timeout;
        let Ok(result) =
            tokio::time::timeout(deadline(timeout), self.call_once(partition, jobs, lookup)).await
        else {
            // The call is cut off mid-flight: the connection's state is unknown. Close it rather
            // than return it to the pool (which would wait for the stalled statement); the
            // server aborts the transaction when it notices.
            if let Some(conn) = self.conn.take() {
                drop(conn.detach());
            }
            tracing::warn!(appends = jobs.len(), timeout = ?deadline(timeout),
                "append call did not answer in time; connection closed");
            return Err(CallError::Sql(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the append did not answer within {:?}; its outcome is unknown",
                    deadline(timeout)
                ),
            ))));
        };
        result
    }

    async fn call_once(
        &mut self,
        partition: u32,
        jobs: &[Job],
        lookup: bool,
    ) -> Result<CallResult, CallError> {
        let deferred = !self.inline.is_empty();
        let timeout = self.shared.append_timeout;
        let query = append_query(&self.sql.append, partition, jobs, lookup, deferred, timeout);
        let conn = match &mut self.conn {
            Some(conn) => conn,
            slot @ None => slot.insert(self.pool.acquire().await.map_err(CallError::Sql)?),
        };
        let (result, rolled_back) = if deferred {
            let call = Call {
                partition,
                jobs,
                inline: &self.inline,
                sql: &self.sql,
                timeout,
            };
            call_inline(conn, query, &call).await
        } else {
            let result = match query.fetch_one(&mut **conn).await {
                Ok(row) => CallResult::decode(&row),
                Err(err) => Err(CallError::Sql(err)),
            };
            (result, true)
        };
        if !rolled_back {
            // The rollback did not go through: the transaction may still hold its positions.
            // Close the connection, which ends it on the server.
            if let Some(conn) = self.conn.take() {
                drop(conn.detach());
            }
        } else if let Err(CallError::Sql(err)) = &result {
            if is_unavailable(err) {
                // The connection may be broken; the next call takes a fresh one.
                self.conn = None;
            }
        }
        result
    }

    /// Answers every job of a successful call and publishes the new head.
    ///
    /// The head goes first, so that a caller answered here finds it at or past its append (reads
    /// from a replica wait for the replica to reach it).
    fn answer(&self, partition: u32, jobs: Vec<Job>, result: &CallResult) {
        let outcomes: Vec<_> = jobs
            .iter()
            .enumerate()
            .map(|(i, job)| result.outcome(i, &job.request))
            .collect();
        let last = outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok())
            .filter(|r| !r.duplicate)
            .filter_map(|r| r.positions.last().copied())
            .max()
            .unwrap_or(0);
        if last > 0 {
            self.committed.record(partition, last);
            if let Some(head) = self.heads.get(partition as usize) {
                head.send_if_modified(|head| {
                    let newer = last > *head;
                    if newer {
                        *head = last;
                    }
                    newer
                });
            }
        }
        for (job, outcome) in jobs.into_iter().zip(outcomes) {
            let _ = job.reply.send(outcome);
        }
    }
}

/// The `append_events` call for `jobs`, every argument bound.
pub(crate) fn append_query(
    sql: &Arc<str>,
    partition: u32,
    jobs: &[Job],
    lookup: bool,
    deferred: bool,
    timeout: Duration,
) -> Query<'static, Postgres, PgArguments> {
    let requests: Vec<&AppendRequest> = jobs.iter().map(|j| &j.request).collect();
    append_query_for(sql, partition, &requests, lookup, deferred, timeout)
}

/// The `append_events` call for `list` (appends to streams of `partition`), every argument
/// bound.
pub(crate) fn append_query_for(
    sql: &Arc<str>,
    partition: u32,
    list: &[&AppendRequest],
    lookup: bool,
    deferred: bool,
    timeout: Duration,
) -> Query<'static, Postgres, PgArguments> {
    let requests = || list.iter().copied();
    let events = || requests().flat_map(|r| r.events.iter());
    let messages = || requests().flat_map(|r| r.outbox.iter());
    let metadata: Vec<Vec<u8>> = events().map(|e| e.metadata.to_json()).collect();
    let message_metadata: Vec<Vec<u8>> = messages().map(|m| m.metadata.to_json()).collect();
    sqlx::query(AssertSqlSafe(Arc::clone(sql)))
        .bind(requests().map(|r| r.stream_id.as_str()).bind_iter())
        .bind(requests().map(|r| r.stream_id.category()).bind_iter())
        .bind(
            requests()
                .map(|r| ExpectedKind::of(r.expected).0.code())
                .bind_iter(),
        )
        .bind(
            requests()
                .map(|r| ExpectedKind::of(r.expected).1)
                .bind_iter(),
        )
        .bind(requests().map(|r| int4(r.events.len())).bind_iter())
        .bind(
            requests()
                .enumerate()
                .flat_map(|(i, r)| std::iter::repeat_n(int4(i + 1), r.events.len()))
                .bind_iter(),
        )
        .bind(requests().flat_map(|r| 0..int4(r.events.len())).bind_iter())
        .bind(events().map(|e| e.event_id).bind_iter())
        .bind(events().map(|e| e.event_type.as_str()).bind_iter())
        .bind(events().map(|e| i64::from(e.schema_version)).bind_iter())
        .bind(events().map(|e| RawJsonb(&e.payload)).bind_iter())
        .bind(metadata.iter().map(|m| RawJsonb(m)).bind_iter())
        .bind(lookup)
        .bind(deferred)
        .bind(requests().map(|r| int4(r.outbox.len())).bind_iter())
        .bind(
            requests()
                .enumerate()
                .flat_map(|(i, r)| std::iter::repeat_n(int4(i + 1), r.outbox.len()))
                .bind_iter(),
        )
        .bind(requests().flat_map(|r| 0..int4(r.outbox.len())).bind_iter())
        .bind(messages().map(|m| m.message_id).bind_iter())
        .bind(messages().map(|m| m.source_event_id).bind_iter())
        .bind(messages().map(|m| m.topic.as_str()).bind_iter())
        .bind(messages().map(|m| m.key.as_str()).bind_iter())
        .bind(messages().map(|m| m.message_type.as_str()).bind_iter())
        .bind(messages().map(|m| i64::from(m.schema_version)).bind_iter())
        .bind(messages().map(|m| RawJson(&m.payload)).bind_iter())
        .bind(message_metadata.iter().map(|m| RawJson(m)).bind_iter())
        .bind(millis(timeout))
        .bind(crate::read::partition_param(partition))
}

/// A time-out in whole milliseconds for a PostgreSQL setting (at least 1: 0 means none).
pub(crate) fn millis(timeout: Duration) -> i32 {
    i32::try_from(timeout.as_millis())
        .unwrap_or(i32::MAX)
        .max(1)
}

/// Runs a group with inline projections: one explicit transaction in which `append_events` does
/// not wait for earlier allocations, the projections run on every written append, and then the
/// group waits for every earlier allocation to end and commits. Any failure rolls the
/// transaction back before returning, so the positions it drew never hold later commits back;
/// the flag is false when that rollback failed (the connection must then be closed).
/// A call with inline projections: what [`call_inline`] runs.
struct Call<'a> {
    partition: u32,
    jobs: &'a [Job],
    inline: &'a [InlineProjection],
    sql: &'a Sql,
    timeout: Duration,
}

async fn call_inline(
    conn: &mut PgConnection,
    query: Query<'static, Postgres, PgArguments>,
    call: &Call<'_>,
) -> (Result<CallResult, CallError>, bool) {
    let mut tx = match begin_bounded(conn, call.timeout).await {
        Ok(tx) => tx,
        Err(err) => return (Err(CallError::Sql(err)), false),
    };
    match inline_body(&mut tx, query, call).await {
        Ok(result) => match tx.commit().await {
            Ok(()) => (Ok(result), true),
            // A failed COMMIT ends the transaction (or the connection) on the server.
            Err(err) => (Err(CallError::Sql(err)), true),
        },
        Err(err) => roll_back(tx, err, "append").await,
    }
}

/// Begins a transaction whose statements, lock waits and idle time are each bounded by
/// `timeout` (see the module docs), local to the transaction.
pub(crate) async fn begin_bounded(
    conn: &mut PgConnection,
    timeout: Duration,
) -> Result<sqlx::Transaction<'_, Postgres>, sqlx::Error> {
    let ms = millis(timeout);
    let begin = format!(
        "BEGIN; SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}; \
         SET LOCAL idle_in_transaction_session_timeout = {ms}"
    );
    conn.begin_with(AssertSqlSafe(begin)).await
}

/// Rolls `tx` back after `err`, which it returns; the flag is false when the rollback failed
/// (the connection must then be closed).
pub(crate) async fn roll_back<T>(
    tx: sqlx::Transaction<'_, Postgres>,
    err: CallError,
    what: &str,
) -> (Result<T, CallError>, bool) {
    match tx.rollback().await {
        Ok(()) => (Err(err), true),
        Err(rollback) => {
            tracing::warn!(error = %rollback, "rolling back a failed {what} failed");
            (Err(err), false)
        }
    }
}

async fn inline_body(
    tx: &mut PgConnection,
    query: Query<'static, Postgres, PgArguments>,
    call: &Call<'_>,
) -> Result<CallResult, CallError> {
    let row = query.fetch_one(&mut *tx).await.map_err(CallError::Sql)?;
    let result = CallResult::decode(&row)?;
    let Some(base) = result.base else {
        return Ok(result);
    };
    for (index, job) in call.jobs.iter().enumerate() {
        let Some(events) = result.recorded(index, &job.request, call.partition)? else {
            continue;
        };
        for projection in call.inline {
            (projection.handler)(&mut *tx, &events)
                .await
                .map_err(|err| inline_error(index, projection, err))?;
        }
    }
    // The wait is bounded by the earlier allocations' own bounds, not by this transaction's
    // statement time-out; one round trip (simple protocol, `base` is a number).
    sqlx::raw_sql(AssertSqlSafe(format!(
        "SET LOCAL statement_timeout = 0; SELECT {}({base}, {})",
        call.sql.wait_for_predecessors, call.partition
    )))
    .execute(&mut *tx)
    .await
    .map_err(CallError::Sql)?;
    Ok(result)
}

/// The error of an inline projection. A database error that concerns the whole group (the
/// connection broke, a deadlock with another group) is reported as such, so that the group is
/// retried or every caller learns the outcome is unknown; anything else fails the append.
fn inline_error(index: usize, projection: &InlineProjection, err: HandlerError) -> CallError {
    match err.downcast::<sqlx::Error>() {
        Ok(err) if is_unavailable(&err) || is_retryable(&err) => CallError::Sql(*err),
        Ok(err) => CallError::Inline {
            index,
            projection: projection.name.clone(),
            reason: err.to_string(),
        },
        Err(err) => CallError::Inline {
            index,
            projection: projection.name.clone(),
            reason: err.to_string(),
        },
    }
}

/// The jobs of one call: distinct streams of one partition, within the size budget.
struct Group {
    partition: u32,
    jobs: Vec<Job>,
    streams: HashSet<StreamId>,
    events: usize,
    bytes: usize,
}

impl Group {
    fn new(first: Job) -> Self {
        let mut streams = HashSet::new();
        streams.insert(first.request.stream_id.clone());
        Self {
            partition: first.partition,
            events: first.request.events.len(),
            bytes: first.bytes(),
            jobs: vec![first],
            streams,
        }
    }

    fn full(&self) -> bool {
        self.jobs.len() >= MAX_GROUP_APPENDS
            || self.events >= MAX_GROUP_EVENTS
            || self.bytes >= MAX_GROUP_BYTES
    }

    /// Adds `job`, or sets it aside for a later group.
    fn add_or_carry(&mut self, job: Job, carry: &mut VecDeque<Job>) {
        if let Err(job) = self.add(job) {
            carry.push_back(job);
        }
    }

    /// Adds `job`, or hands it back when it belongs to another partition, its stream is in the
    /// group already or it does not fit.
    fn add(&mut self, job: Job) -> Result<(), Job> {
        let bytes = job.bytes();
        let events = job.request.events.len();
        if self.full()
            || job.partition != self.partition
            || self.events + events > MAX_GROUP_EVENTS
            || self.bytes + bytes > MAX_GROUP_BYTES
            || self.streams.contains(&job.request.stream_id)
        {
            return Err(job);
        }
        self.streams.insert(job.request.stream_id.clone());
        self.events += events;
        self.bytes += bytes;
        self.jobs.push(job);
        Ok(())
    }
}

/// A count or index as an `integer` parameter. Groups hold at most a few hundred appends and
/// appends at most `max_batch_len` events, far below `i32::MAX`.
fn int4(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

impl CallResult {
    pub(crate) fn decode(row: &PgRow) -> Result<Self, CallError> {
        let get = |e: sqlx::Error| CallError::Sql(e);
        let found_ids: Option<Vec<Uuid>> = row.try_get(column::FOUND_IDS).map_err(get)?;
        let mut found = HashMap::new();
        if let Some(ids) = found_ids {
            let streams: Vec<String> = row.try_get(column::FOUND_STREAMS).map_err(get)?;
            let versions: Vec<i64> = row.try_get(column::FOUND_VERSIONS).map_err(get)?;
            let positions: Vec<i64> = row.try_get(column::FOUND_POSITIONS).map_err(get)?;
            for (((id, stream), version), position) in
                ids.into_iter().zip(streams).zip(versions).zip(positions)
            {
                let location = || format!("event {id}");
                let stream = StreamId::parse(&stream).map_err(|e| {
                    CallError::Store(StoreError::Corrupt {
                        location: location(),
                        reason: format!("invalid stream id: {e}"),
                    })
                })?;
                found.insert(
                    id,
                    StoredEventRef {
                        event_id: id,
                        stream_id: stream,
                        stream_version: to_u64(version, &location()).map_err(CallError::Store)?,
                        global_position: to_u64(position, &location()).map_err(CallError::Store)?,
                    },
                );
            }
        }
        Ok(Self {
            outcomes: row.try_get(column::OUTCOMES).map_err(get)?,
            versions: row.try_get(column::VERSIONS).map_err(get)?,
            offsets: row.try_get(column::OFFSETS).map_err(get)?,
            base: row.try_get(column::BASE).map_err(get)?,
            recorded: row.try_get(column::RECORDED).map_err(get)?,
            found,
        })
    }

    /// The outcome of append `i` as the server reported it, if it reported a known one.
    pub(crate) fn outcome_of(&self, i: usize) -> Option<AppendOutcome> {
        self.outcomes
            .get(i)
            .copied()
            .and_then(AppendOutcome::from_code)
    }

    /// The version the server reported for append `i`.
    #[cfg(test)]
    pub(crate) fn version_of(&self, i: usize) -> Option<i64> {
        self.versions.get(i).copied()
    }

    /// The events append `i` wrote, as they are stored (`None` if it wrote none). The payloads
    /// are the caller's bytes; the stored `jsonb` holds the same JSON.
    fn recorded(
        &self,
        i: usize,
        request: &AppendRequest,
        partition: u32,
    ) -> Result<Option<Vec<RecordedEvent>>, CallError> {
        if request.events.is_empty() || self.outcome_of(i) != Some(AppendOutcome::Written) {
            return Ok(None);
        }
        let result = self.outcome(i, request).map_err(CallError::Store)?;
        let Some(recorded_at) = self.recorded else {
            return Ok(None);
        };
        let first_version = result.stream_version + 1 - request.events.len() as u64;
        Ok(Some(
            request
                .events
                .iter()
                .zip(result.positions)
                .zip(first_version..)
                .map(|((e, global_position), stream_version)| RecordedEvent {
                    event_id: e.event_id,
                    stream_id: request.stream_id.clone(),
                    stream_version,
                    global_position,
                    partition,
                    event_type: e.event_type.clone(),
                    schema_version: e.schema_version,
                    payload: e.payload.clone(),
                    metadata: e.metadata.clone(),
                    recorded_at,
                })
                .collect(),
        ))
    }

    fn outcome(&self, i: usize, request: &AppendRequest) -> Result<AppendResult, StoreError> {
        let missing = || StoreError::backend(format!("append_events returned no outcome for {i}"));
        let code = *self.outcomes.get(i).ok_or_else(missing)?;
        let version = to_u64(*self.versions.get(i).ok_or_else(missing)?, "streams")?;
        let outcome = AppendOutcome::from_code(code).ok_or_else(|| {
            StoreError::backend(format!(
                "append_events returned the unknown outcome {code} for append {i}"
            ))
        })?;
        match outcome {
            AppendOutcome::Written => {
                let positions = match (self.offsets.get(i).copied().flatten(), self.base) {
                    (Some(offset), Some(base)) => {
                        let first = to_u64(base + offset, "head")?;
                        (first..first + request.events.len() as u64).collect()
                    }
                    _ => Vec::new(),
                };
                Ok(AppendResult {
                    stream_version: version,
                    positions,
                    duplicate: false,
                })
            }
            AppendOutcome::Conflict => Err(StoreError::Conflict {
                stream_id: request.stream_id.clone(),
                expected: request.expected,
                actual: version,
            }),
            AppendOutcome::Closed => Err(StoreError::StreamClosed {
                stream_id: request.stream_id.clone(),
                version,
            }),
            AppendOutcome::Duplicate => {
                let found: Vec<Option<StoredEventRef>> = request
                    .events
                    .iter()
                    .map(|e| self.found.get(&e.event_id).cloned())
                    .collect();
                classify_retry(request, &found)?.ok_or_else(|| {
                    StoreError::backend("append_events reported stored events but none match")
                })
            }
        }
    }
}

/// Whether the whole call can be retried: it was rolled back by a deadlock or a serialization
/// failure, or an event id of the group is stored already (the retry looks every id up and
/// classifies each append).
fn retry_as_is(err: &sqlx::Error) -> bool {
    is_retryable(err) || is_event_id_violation(err)
}

fn is_event_id_violation(err: &sqlx::Error) -> bool {
    sqlstate(err) == Some("23505") && constraint(err) == Some("events_event_id_key")
}

/// The error of a single append that failed as a whole.
fn append_error(request: &AppendRequest, err: sqlx::Error) -> StoreError {
    let invalid = |reason: String| StoreError::InvalidRequest {
        stream_id: request.stream_id.clone(),
        reason,
    };
    if is_event_id_violation(&err) {
        return StoreError::DuplicateEvent {
            stream_id: request.stream_id.clone(),
            event_id: request.events.first().map_or(Uuid::nil(), |e| e.event_id),
            reason: "an event id of this batch was stored concurrently by another append"
                .to_owned(),
        };
    }
    // 22: data exception (invalid JSON text, `\u0000` in jsonb, NUL in text);
    // 54: program limit exceeded (a value or array too large).
    if let Some(code) = sqlstate(&err).filter(|c| c.starts_with("22") || c.starts_with("54")) {
        return invalid(format!(
            "PostgreSQL rejected the events (SQLSTATE {code}): {}",
            database_message(&err)
        ));
    }
    match err {
        sqlx::Error::Encode(e) => invalid(format!("cannot encode the events: {e}")),
        err => store_error(err),
    }
}

fn database_message(err: &sqlx::Error) -> String {
    match err {
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    }
}
