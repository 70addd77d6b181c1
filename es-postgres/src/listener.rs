//! Keeps the latest known head position in a `watch` channel, from LISTEN/NOTIFY.
//!
//! The append function notifies the schema's channel with the new head in the append
//! transaction, so the notification is delivered on commit, to every process. The listener
//! reconnects after the connection drops or the server restarts, and re-reads the head after each
//! (re)connection, because notifications sent while it was away are lost. The watch is only a
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

pub(crate) struct Listener {
    pub(crate) pool: PgPool,
    pub(crate) channel: String,
    pub(crate) head_sql: Arc<str>,
    pub(crate) head: Arc<watch::Sender<u64>>,
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
                        if let Ok(head) = notification.payload().parse::<u64>() {
                            self.publish(head);
                        }
                    }
                    None => return Ok(()),
                },
                _ = check.tick() => {
                    // A connection whose server vanished never says so (no TCP keepalive on the
                    // client side): read the head on it, with a time-out, and reconnect if it
                    // does not answer. The head read also covers a notification that was lost.
                    let head = tokio::time::timeout(
                        CHECK_TIMEOUT,
                        sqlx::query_scalar::<_, i64>(AssertSqlSafe(Arc::clone(&self.head_sql)))
                            .fetch_one(&mut listener),
                    )
                    .await
                    .map_err(|_| sqlx::Error::PoolTimedOut)??;
                    self.publish(u64::try_from(head).unwrap_or(0));
                }
            }
        }
    }

    async fn refresh(&self) -> Result<(), sqlx::Error> {
        let head: i64 = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.head_sql)))
            .fetch_one(&self.pool)
            .await?;
        self.publish(u64::try_from(head).unwrap_or(0));
        Ok(())
    }

    fn publish(&self, head: u64) {
        self.head.send_if_modified(|current| {
            let newer = head > *current;
            if newer {
                *current = head;
            }
            newer
        });
    }
}
