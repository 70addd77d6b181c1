//! Multi-stream appends: several streams, each with its own expected version, in one
//! transaction.
//!
//! A call runs on a connection of its own, outside group commit, as one explicit transaction:
//!
//! 1. the append locks of all its streams, taken in one statement in the order of their lock
//!    keys (the order `append_events` takes them in), so two calls, or a call and a group, never
//!    wait for each other in a cycle;
//! 2. with the streams locked, every part's events are looked up by id and every stream's version
//!    read, with whether it is closed: a call whose events are all stored is answered with the
//!    first results (nothing is written), one whose events are stored in part is refused, a part
//!    on a closed stream fails the call with `StreamClosed`, and a part whose expected version
//!    does not hold fails it with its conflict — all before a position is drawn;
//! 3. then, partition by partition in ascending order, `append_events` for the parts of that
//!    partition (drawing its positions, writing its rows), the inline projections on those events,
//!    and the wait for every earlier allocation of that partition to end, before the next
//!    partition's positions are drawn;
//! 4. COMMIT.
//!
//! Why step 3 waits partition by partition: a call holds each partition's commit ticket from its
//! allocation to its end. Were it to draw in every partition before waiting, two calls spanning
//! partitions 0 and 1 could each hold a ticket the other waits for (the one drawn first in 0
//! waits in 1 for the other, which waits in 0 for it). Waiting in a partition before drawing in
//! a higher one means a call waits only for allocations in the partition it is in, made by
//! transactions that are either single-partition groups or calls that have moved on to higher
//! partitions: the waits go up in (partition, position), so they form no cycle.
//!
//! Never skip: the positions of each partition are drawn and released by `append_events` and
//! its commit tickets, as for any group; a call that fails after drawing (an inline projection,
//! a lost connection, a cancelled statement) rolls back, its positions become a gap, and the
//! transactions after it in each partition stop waiting. Readers never see a position above one
//! whose transaction is still open.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use es_core::contract::{classify_streams_retry, StoredEventRef};
use es_core::{AppendRequest, AppendResult, Partitioning, StoreError, StreamId};
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::watch;
use uuid::Uuid;

use super::{
    append_error, append_query_for, deadline, inline_error, is_event_id_violation, millis,
    retry_as_is, CallError, CallResult, MAX_ATTEMPTS,
};
use crate::codec::to_u64;
use crate::error::{is_unavailable, sqlstate, store_error};
use crate::inline::InlineProjection;
use crate::protocol::{AppendOutcome, UNCHECKED_INCARNATION};
use crate::schema::Sql;

/// What a multi-stream append needs of its store.
pub(crate) struct StreamsAppender {
    pub(crate) pool: PgPool,
    pub(crate) sql: Arc<Sql>,
    pub(crate) partitioning: Partitioning,
    /// The head of each partition, as far as this store knows.
    pub(crate) heads: Arc<[watch::Sender<u64>]>,
    /// The heads this store's commits reached, for the notifier.
    pub(crate) committed: Arc<crate::listener::Committed>,
    pub(crate) inline: Arc<[InlineProjection]>,
    pub(crate) append_timeout: Duration,
}

impl std::fmt::Debug for StreamsAppender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamsAppender")
            .field("partitioning", &self.partitioning)
            .field("append_timeout", &self.append_timeout)
            .finish_non_exhaustive()
    }
}

/// What one attempt came to.
enum Attempt {
    /// Committed (or an exact retry, nothing written): the results.
    Done(Vec<AppendResult>),
    /// Refused before anything was drawn, rolled back.
    Refused(StoreError),
}

impl StreamsAppender {
    /// Starts `count` group-commit writer tasks on the same pool, statements, heads and inline
    /// projections.
    pub(crate) fn spawn_writers(&self, count: usize, shared: &Arc<super::Shared>) {
        for _ in 0..count {
            let writer = super::Writer {
                pool: self.pool.clone(),
                conn: None,
                sql: Arc::clone(&self.sql),
                heads: Arc::clone(&self.heads),
                committed: Arc::clone(&self.committed),
                shared: Arc::clone(shared),
                inline: Arc::clone(&self.inline),
            };
            tokio::spawn(writer.run());
        }
    }

    /// Appends `requests` (validated by the caller) all or nothing.
    pub(crate) async fn append(
        &self,
        requests: &[AppendRequest],
    ) -> Result<Vec<AppendResult>, StoreError> {
        let mut attempt = 1;
        let mut checks = 0;
        // Kept across attempts, so that the incarnation checked on it counts for the next.
        let mut kept = None;
        loop {
            let mut conn = match kept.take() {
                Some(conn) => conn,
                None => self.pool.acquire().await.map_err(store_error)?,
            };
            let limit = deadline(self.append_timeout);
            let Ok((outcome, rolled_back)) =
                tokio::time::timeout(limit, self.attempt(&mut conn, requests)).await
            else {
                // Cut off mid-flight: close the connection, which ends the transaction.
                drop(conn.detach());
                return Err(StoreError::unavailable(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the multi-stream append did not answer within {limit:?}; its outcome \
                         is unknown"
                    ),
                )));
            };
            if rolled_back {
                kept = Some(conn);
            } else {
                // The transaction may still hold its positions: end it with the connection.
                drop(conn.detach());
            }
            let err = match outcome {
                Ok(Attempt::Done(results)) => return Ok(results),
                Ok(Attempt::Refused(err)) => return Err(err),
                Err(err) => err,
            };
            match err {
                CallError::Sql(err)
                    if sqlstate(&err) == Some(UNCHECKED_INCARNATION) && checks < MAX_ATTEMPTS =>
                {
                    // This session has not checked the server's incarnation: check it, in a
                    // statement of its own, and run the call again (nothing was drawn).
                    checks += 1;
                    let mut conn = match kept.take() {
                        Some(conn) => conn,
                        None => self.pool.acquire().await.map_err(store_error)?,
                    };
                    sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.check_incarnation)))
                        .execute(&mut *conn)
                        .await
                        .map_err(store_error)?;
                    kept = Some(conn);
                }
                CallError::Sql(err) if retry_as_is(&err) && attempt < MAX_ATTEMPTS => {
                    // A deadlock victim, or an event id stored by a concurrent append: run it
                    // again; the lookup classifies the ids afresh.
                    tracing::debug!(error = %err, attempt, "multi-stream append retried");
                    attempt += 1;
                }
                CallError::Sql(err) if is_unavailable(&err) => {
                    return Err(StoreError::unavailable(err));
                }
                CallError::Sql(err) if is_event_id_violation(&err) => {
                    return Err(StoreError::DuplicateEvent {
                        stream_id: requests[0].stream_id.clone(),
                        event_id: requests[0]
                            .events
                            .first()
                            .map_or(Uuid::nil(), |e| e.event_id),
                        reason: "an event id of this call was stored concurrently by another \
                                 append; nothing was written"
                            .to_owned(),
                    });
                }
                CallError::Sql(err) => return Err(append_error(&requests[0], err)),
                CallError::Store(err) => return Err(err),
                CallError::Inline {
                    index,
                    projection,
                    reason,
                } => {
                    return Err(StoreError::InlineProjection {
                        stream_id: requests
                            .get(index)
                            .unwrap_or(&requests[0])
                            .stream_id
                            .clone(),
                        projection,
                        reason,
                    })
                }
            }
        }
    }

    /// One attempt in one transaction; the flag is false when a failed attempt could not be
    /// rolled back (the connection must then be closed).
    async fn attempt(
        &self,
        conn: &mut PgConnection,
        requests: &[AppendRequest],
    ) -> (Result<Attempt, CallError>, bool) {
        let mut tx = match super::begin_bounded(conn, self.append_timeout).await {
            Ok(tx) => tx,
            Err(err) => return (Err(CallError::Sql(err)), false),
        };
        match self.body(&mut tx, requests).await {
            Ok(Attempt::Done(results)) if results.iter().all(|r| r.duplicate) => {
                // An exact retry: nothing was written.
                let rolled_back = tx.rollback().await.is_ok();
                (Ok(Attempt::Done(results)), rolled_back)
            }
            Ok(Attempt::Done(results)) => match tx.commit().await {
                Ok(()) => {
                    self.publish(requests, &results);
                    (Ok(Attempt::Done(results)), true)
                }
                Err(err) => (Err(CallError::Sql(err)), true),
            },
            Ok(refused @ Attempt::Refused(_)) => {
                let rolled_back = tx.rollback().await.is_ok();
                (Ok(refused), rolled_back)
            }
            Err(err) => super::roll_back(tx, err, "multi-stream append").await,
        }
    }

    async fn body(
        &self,
        tx: &mut PgConnection,
        requests: &[AppendRequest],
    ) -> Result<Attempt, CallError> {
        if let Some(answer) = self.check(tx, requests).await? {
            return Ok(answer);
        }
        self.write(tx, requests).await
    }

    /// Locks the streams and runs every check: `Some` with the answer when the call must not
    /// write (an exact retry, a partly stored call, a conflict), `None` when it may.
    async fn check(
        &self,
        tx: &mut PgConnection,
        requests: &[AppendRequest],
    ) -> Result<Option<Attempt>, CallError> {
        let sql = CallError::Sql;
        let streams: Vec<&str> = requests.iter().map(|r| r.stream_id.as_str()).collect();
        sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.lock_streams)))
            .bind(&streams)
            .execute(&mut *tx)
            .await
            .map_err(sql)?;

        // Every check, with the streams locked, before a position is drawn.
        let ids: Vec<Uuid> = requests
            .iter()
            .flat_map(|r| r.events.iter().map(|e| e.event_id))
            .collect();
        let rows = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.find_events)))
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await
            .map_err(sql)?;
        if !rows.is_empty() {
            let mut stored = std::collections::HashMap::new();
            for row in rows {
                let id: Uuid = row.try_get(0).map_err(sql)?;
                let location = || format!("event {id}");
                let stream: String = row.try_get(1).map_err(sql)?;
                let stream = StreamId::parse(&stream).map_err(|e| {
                    CallError::Store(StoreError::Corrupt {
                        location: location(),
                        reason: format!("invalid stream id: {e}"),
                    })
                })?;
                let version: i64 = row.try_get(2).map_err(sql)?;
                let position: i64 = row.try_get(3).map_err(sql)?;
                stored.insert(
                    id,
                    StoredEventRef {
                        event_id: id,
                        stream_id: stream,
                        stream_version: to_u64(version, &location()).map_err(CallError::Store)?,
                        global_position: to_u64(position, &location()).map_err(CallError::Store)?,
                    },
                );
            }
            let found: Vec<Vec<Option<StoredEventRef>>> = requests
                .iter()
                .map(|r| {
                    r.events
                        .iter()
                        .map(|e| stored.get(&e.event_id).cloned())
                        .collect()
                })
                .collect();
            return match classify_streams_retry(requests, &found) {
                Ok(Some(results)) => Ok(Some(Attempt::Done(results))),
                Ok(None) => Err(CallError::Store(StoreError::backend(
                    "stored events were found, but none of the call's",
                ))),
                Err(err) => Ok(Some(Attempt::Refused(err))),
            };
        }
        let rows = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.stream_versions)))
            .bind(&streams)
            .fetch_all(&mut *tx)
            .await
            .map_err(sql)?;
        let mut versions = vec![(0u64, false); requests.len()];
        for row in rows {
            let i: i64 = row.try_get(0).map_err(sql)?;
            let version: i64 = row.try_get(1).map_err(sql)?;
            let closed: bool = row.try_get(2).map_err(sql)?;
            if let Some(slot) = usize::try_from(i - 1)
                .ok()
                .and_then(|i| versions.get_mut(i))
            {
                *slot = (
                    to_u64(version, "stream versions").map_err(CallError::Store)?,
                    closed,
                );
            }
        }
        for (request, &(actual, closed)) in requests.iter().zip(&versions) {
            if closed {
                return Ok(Some(Attempt::Refused(StoreError::StreamClosed {
                    stream_id: request.stream_id.clone(),
                    version: actual,
                })));
            }
            if let Err(conflict) = request.expected.check(&request.stream_id, actual) {
                return Ok(Some(Attempt::Refused(conflict)));
            }
        }
        Ok(None)
    }

    /// The writes, checked already.
    async fn write(
        &self,
        tx: &mut PgConnection,
        requests: &[AppendRequest],
    ) -> Result<Attempt, CallError> {
        let sql = CallError::Sql;
        // The writes, partition by partition in ascending order (see the module docs).
        let mut by_partition: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, request) in requests.iter().enumerate() {
            by_partition
                .entry(self.partitioning.partition_of(&request.stream_id))
                .or_default()
                .push(i);
        }
        let mut results: Vec<Option<AppendResult>> = vec![None; requests.len()];
        for (partition, indexes) in by_partition {
            let parts: Vec<&AppendRequest> = indexes.iter().map(|&i| &requests[i]).collect();
            let query = append_query_for(
                &self.sql.append,
                partition,
                &parts,
                false,
                true,
                self.append_timeout,
            );
            let row = query.fetch_one(&mut *tx).await.map_err(sql)?;
            let result = CallResult::decode(&row)?;
            for (k, (&i, request)) in indexes.iter().zip(&parts).enumerate() {
                if result.outcome_of(k) != Some(AppendOutcome::Written) {
                    // The streams are locked and were checked: only data changed behind the
                    // store's back gets here. Nothing is committed.
                    let err = match result.outcome(k, request) {
                        Err(err) => err,
                        Ok(_) => StoreError::backend(format!(
                            "`{}` changed while its append lock was held",
                            request.stream_id
                        )),
                    };
                    return Err(CallError::Store(err));
                }
                results[i] = Some(result.outcome(k, request).map_err(CallError::Store)?);
                if let Some(events) = result.recorded(k, request, partition)? {
                    for projection in self.inline.iter() {
                        (projection.handler)(&mut *tx, &events)
                            .await
                            .map_err(|err| inline_error(i, projection, err))?;
                    }
                }
            }
            let Some(base) = result.base else {
                return Err(CallError::Store(StoreError::backend(
                    "append_events drew no positions for a multi-stream append",
                )));
            };
            // Every earlier allocation of this partition ends before the next partition's
            // positions are drawn. Bounded by those allocations' own bounds, not by this
            // transaction's statement time-out.
            let ms = millis(self.append_timeout);
            sqlx::raw_sql(AssertSqlSafe(format!(
                "SET LOCAL statement_timeout = 0; SELECT {}({base}, {partition}); \
                 SET LOCAL statement_timeout = {ms}",
                self.sql.wait_for_predecessors
            )))
            .execute(&mut *tx)
            .await
            .map_err(sql)?;
        }
        let results = results
            .into_iter()
            .map(|r| {
                r.ok_or_else(|| {
                    CallError::Store(StoreError::backend("a part of the call got no result"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Attempt::Done(results))
    }

    /// Publishes the heads a committed call reached.
    fn publish(&self, requests: &[AppendRequest], results: &[AppendResult]) {
        let mut last: BTreeMap<u32, u64> = BTreeMap::new();
        for (request, result) in requests.iter().zip(results) {
            let partition = self.partitioning.partition_of(&request.stream_id);
            if let Some(&position) = result.positions.last() {
                let slot = last.entry(partition).or_default();
                *slot = (*slot).max(position);
            }
        }
        for (partition, position) in last {
            self.committed.record(partition, position);
            if let Some(head) = self.heads.get(partition as usize) {
                head.send_if_modified(|head| {
                    let newer = position > *head;
                    if newer {
                        *head = position;
                    }
                    newer
                });
            }
        }
    }
}
