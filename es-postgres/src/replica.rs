//! Reads from a streaming-replication standby, with read-your-writes.
//!
//! A standby applies commits in the order of their commit records, and the store's commit order
//! makes that the order of positions (see the crate docs, section "Ordering"), so a reader of the
//! standby never skips a position either: what it lacks is only recency. A read that goes to the
//! replica first waits until the replica's head has reached the head this store handle knows (its
//! own appends and every commit its listener has heard of), so a caller reads its own writes; if
//! the replica does not get there within the configured wait (lagging, down, or not a replica of
//! this primary), the read goes to the primary instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, PgPool};

/// The default longest wait for a replica to reach a read's target head before the read goes
/// to the primary.
pub const DEFAULT_REPLICA_WAIT: Duration = Duration::from_secs(2);

/// Where a store's reads of events (`read_stream`, `read_all`, and the subscriptions and
/// projections built on them) go when it has a replica.
#[derive(Debug, Clone)]
pub(crate) struct Replica {
    pub(crate) pool: PgPool,
    pub(crate) wait: Duration,
    pub(crate) counts: Arc<Counts>,
}

/// Reads sent to the replica and to the primary.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    replica: AtomicU64,
    primary: AtomicU64,
}

/// How many event reads of a store with a read replica went where, since it was built
/// ([`PgStore::replica_reads`](crate::PgStore::replica_reads)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicaReads {
    /// Reads served by the replica.
    pub replica: u64,
    /// Reads sent to the primary because the replica had not caught up within the wait, or
    /// could not answer.
    pub primary: u64,
}

impl Counts {
    pub(crate) fn get(&self) -> ReplicaReads {
        ReplicaReads {
            replica: self.replica.load(Ordering::Relaxed),
            primary: self.primary.load(Ordering::Relaxed),
        }
    }
}

impl Replica {
    /// The pool for a read that must see every position of `partition` up to `target`: the
    /// replica once its head of the partition is there, else (after `wait`, or at once if the
    /// replica cannot answer) the primary. `head_sql` reads the head of partition `$1`.
    pub(crate) async fn pool_for(
        &self,
        partition: u32,
        target: u64,
        head_sql: &str,
        primary: &PgPool,
    ) -> PgPool {
        let on_replica = self.choose(partition, target, head_sql).await;
        let counter = if on_replica {
            &self.counts.replica
        } else {
            &self.counts.primary
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if on_replica {
            self.pool.clone()
        } else {
            primary.clone()
        }
    }

    /// Whether the replica has reached `target`, waiting for it at most `wait`.
    async fn choose(&self, partition: u32, target: u64, head_sql: &str) -> bool {
        if target == 0 {
            return true;
        }
        let start = Instant::now();
        let mut pause = Duration::from_micros(500);
        loop {
            let head = tokio::time::timeout(
                self.wait
                    .saturating_sub(start.elapsed())
                    .max(Duration::from_millis(1)),
                sqlx::query_scalar::<_, i64>(AssertSqlSafe(head_sql.to_owned()))
                    .bind(crate::read::partition_param(partition))
                    .fetch_one(&self.pool),
            )
            .await;
            match head {
                Ok(Ok(head)) if u64::try_from(head).unwrap_or(0) >= target => {
                    return true;
                }
                Ok(Ok(_)) if start.elapsed() < self.wait => {}
                Ok(Ok(head)) => {
                    tracing::debug!(
                        replica_head = head,
                        target,
                        "the read replica is behind after {:?}: reading from the primary",
                        self.wait
                    );
                    return false;
                }
                Ok(Err(err)) => {
                    tracing::warn!(
                        error = %err,
                        "the read replica cannot answer: reading from the primary"
                    );
                    return false;
                }
                Err(_) => return false,
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}
