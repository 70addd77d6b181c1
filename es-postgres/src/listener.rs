//! Keeps the latest known head position of every partition in a `watch` channel each, from
//! LISTEN/NOTIFY, and tells the other processes of this store's commits.
//!
//! After a group's COMMIT, the store's [`Notifier`] notifies the schema's channel with the new
//! head (`<position>` for partition 0, `<partition>:<position>` for the others), in a
//! transaction of its own: PostgreSQL serializes the commits of transactions that notify
//! (database-wide, flush included), so a NOTIFY inside the append transaction would make the
//! commits of every partition wait for each other. The notifier coalesces: while one NOTIFY is
//! on its way, later commits only raise the heads it sends next. A process that dies between a
//! commit and its NOTIFY leaves the others to find the events at their polling interval.
//!
//! The listener starts with the store's first wait for an append (a subscription), or at once
//! when the store reads from a replica: a process that only appends does not listen, so the
//! server does not deliver every process's notifications to every other. It reconnects after the
//! connection drops or the server restarts, and re-reads the head after each (re)connection and
//! when it starts, because notifications sent while it was away are lost. The watch is only a
//! wake-up: subscribers re-read the feed, and `wait_for_append` also returns after the polling
//! interval.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use sqlx::AssertSqlSafe;
use tokio::sync::watch;

/// Pauses between reconnection attempts (the workspace's one capped, jittered backoff).
const RECONNECT: es_core::Backoff =
    es_core::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
/// How often the listener checks that its connection still answers.
const CHECK_EVERY: Duration = Duration::from_secs(30);
/// How long that check may take before the listener reconnects.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The latest head each partition reached by this store's commits, for the [`Notifier`].
pub(crate) struct Committed {
    heads: std::sync::Mutex<Vec<u64>>,
    changed: tokio::sync::Notify,
}

impl Committed {
    pub(crate) fn new(partitions: u32) -> Self {
        Self {
            heads: std::sync::Mutex::new(vec![0; partitions as usize]),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// A commit of this store made `head` visible in `partition`.
    pub(crate) fn record(&self, partition: u32, head: u64) {
        let mut heads = self
            .heads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(slot) = heads.get_mut(partition as usize) {
            if head > *slot {
                *slot = head;
                // Keeps a permit if the notifier is busy: no commit goes unannounced.
                self.changed.notify_one();
            }
        }
    }

    /// The payloads of the heads above `sent`, and the heads they announce.
    fn news(&self, sent: &[u64]) -> (Vec<String>, Vec<u64>) {
        let heads = self
            .heads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let payloads = heads
            .iter()
            .zip(sent)
            .enumerate()
            .filter(|(_, (head, sent))| head > sent)
            .map(|(partition, (head, _))| match partition {
                0 => head.to_string(),
                p => format!("{p}:{head}"),
            })
            .collect();
        (payloads, heads)
    }
}

/// Sends the NOTIFY for this store's commits (see the module docs).
pub(crate) struct Notifier {
    pub(crate) pool: PgPool,
    pub(crate) channel: String,
    pub(crate) committed: Arc<Committed>,
}

impl Notifier {
    /// Runs until aborted (when the store is dropped).
    pub(crate) async fn run(self) {
        let partitions = self
            .committed
            .heads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        let mut sent = vec![0; partitions];
        let mut delays = RECONNECT.delays();
        loop {
            self.committed.changed.notified().await;
            loop {
                let (payloads, heads) = self.committed.news(&sent);
                if payloads.is_empty() {
                    break;
                }
                let notified =
                    sqlx::query("SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload")
                        .bind(&self.channel)
                        .bind(&payloads)
                        .execute(&self.pool)
                        .await;
                match notified {
                    Ok(_) => {
                        sent = heads;
                        delays.reset();
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "notifying a commit failed; retrying");
                        delays.sleep().await;
                    }
                }
            }
        }
    }
}

#[derive(Clone)]
pub(crate) struct Listener {
    pub(crate) pool: PgPool,
    pub(crate) channel: String,
    /// Reads the head of every partition (`Sql::heads`).
    pub(crate) heads_sql: Arc<str>,
    pub(crate) heads: Arc<[watch::Sender<u64>]>,
}

/// The partition and head a notification payload names, if it is one of the append function's.
pub(crate) fn parse_payload(payload: &str) -> Option<(u32, u64)> {
    match payload.split_once(':') {
        None => Some((0, payload.parse().ok()?)),
        Some((partition, head)) => Some((partition.parse().ok()?, head.parse().ok()?)),
    }
}

impl Listener {
    /// Runs until aborted (when the store is dropped).
    pub(crate) async fn run(self) {
        let mut delays = RECONNECT.delays();
        loop {
            match self.session().await {
                Ok(()) => delays.reset(),
                Err(err) => {
                    tracing::debug!(error = %err, "event listener disconnected; reconnecting");
                    delays.sleep().await;
                }
            }
        }
    }

    /// One connection's worth of listening; returns when the connection is lost.
    async fn session(&self) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.eager_reconnect(false);
        listener.listen(&self.channel).await?;
        // Anything committed before LISTEN took effect was not notified to us.
        self.refresh().await?;
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.tick().await;
        loop {
            tokio::select! {
                received = listener.try_recv() => match received? {
                    Some(notification) => {
                        if let Some((partition, head)) = parse_payload(notification.payload()) {
                            self.publish(partition, head);
                        }
                    }
                    None => return Ok(()),
                },
                _ = check.tick() => {
                    // A connection whose server vanished never says so (no TCP keepalive on the
                    // client side): read the head on it, with a time-out, and reconnect if it
                    // does not answer. The head read also covers a notification that was lost.
                    let heads = tokio::time::timeout(
                        CHECK_TIMEOUT,
                        self.heads_query().fetch_all(&mut listener),
                    )
                    .await
                    .map_err(|_| sqlx::Error::PoolTimedOut)??;
                    self.publish_all(heads);
                }
            }
        }
    }

    async fn refresh(&self) -> Result<(), sqlx::Error> {
        let heads = self.heads_query().fetch_all(&self.pool).await?;
        self.publish_all(heads);
        Ok(())
    }

    fn heads_query(
        &self,
    ) -> sqlx::query::QueryAs<'static, sqlx::Postgres, (i32, i64), sqlx::postgres::PgArguments>
    {
        // At most MAX_PARTITIONS watches.
        let partitions = i32::try_from(self.heads.len()).unwrap_or(i32::MAX);
        sqlx::query_as(AssertSqlSafe(Arc::clone(&self.heads_sql))).bind(partitions)
    }

    fn publish_all(&self, heads: Vec<(i32, i64)>) {
        for (partition, head) in heads {
            if let (Ok(partition), Ok(head)) = (u32::try_from(partition), u64::try_from(head)) {
                self.publish(partition, head);
            }
        }
    }

    fn publish(&self, partition: u32, head: u64) {
        let Some(watch) = self.heads.get(partition as usize) else {
            return;
        };
        watch.send_if_modified(|current| {
            let newer = head > *current;
            if newer {
                *current = head;
            }
            newer
        });
    }
}

#[cfg(test)]
mod tests {
    use super::parse_payload;

    #[test]
    fn payloads_name_a_partition_and_a_head() {
        assert_eq!(parse_payload("42"), Some((0, 42)));
        assert_eq!(parse_payload("3:42"), Some((3, 42)));
        assert_eq!(parse_payload("x"), None);
        assert_eq!(parse_payload("3:"), None);
        assert_eq!(parse_payload("-1:5"), None);
    }
}
