//! The head watcher: one background task per feed partition of a store (started when something
//! first waits for the partition) that follows the partition's feed with `XREAD BLOCK` on a
//! connection of its own and publishes its head position in a [`tokio::sync::watch`] channel,
//! which `wait_for_partition` waits on.
//!
//! The watcher only affects latency: subscriptions read the feed themselves, and
//! `wait_for_append` also returns after the polling interval, so a dead connection or a
//! restarting server delays live events by at most that interval.
//!
//! [`Head`] (one per partition) also keeps the handle's *floor* of the partition, the highest
//! position of it the handle has seen (acknowledged to its appends, read as the head by it or
//! its watcher), which the append script compares with the partition's stored head to notice a
//! head that moved back (see the crate docs, section "Epochs and
//! lost tails").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use redis::RedisResult;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::conn::Side;
use crate::decode;

/// What the watcher needs from the store; the task holds it weakly and ends once the last store
/// handle is gone.
#[derive(Debug)]
pub(crate) struct Head {
    tx: watch::Sender<u64>,
    /// The highest position this handle has seen.
    floor: AtomicU64,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Head {
    pub(crate) fn new() -> Self {
        Self {
            tx: watch::channel(0).0,
            floor: AtomicU64::new(0),
            task: Mutex::new(None),
        }
    }

    /// The highest position this handle has seen.
    pub(crate) fn floor(&self) -> u64 {
        self.floor.load(Ordering::Acquire)
    }

    /// Records that `position` was seen stored (read as the head, or acknowledged).
    pub(crate) fn saw(&self, position: u64) {
        self.floor.fetch_max(position, Ordering::AcqRel);
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// Raises the published head to `position` (after an append through this handle).
    pub(crate) fn advance(&self, position: u64) {
        self.saw(position);
        self.tx.send_if_modified(|head| {
            let newer = position > *head;
            if newer {
                *head = position;
            }
            newer
        });
    }

    /// Starts the watcher task unless it runs already (it is restarted if the runtime that ran it
    /// has shut down). Without a Tokio runtime nothing starts and waits fall back to polling.
    pub(crate) fn ensure_watching(self: &Arc<Self>, config: WatchConfig) {
        let mut task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        *task = Some(runtime.spawn(run(Arc::downgrade(self), config)));
    }
}

impl Drop for Head {
    fn drop(&mut self) {
        if let Some(task) = self
            .task
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

/// The watcher's connection settings, and the partition it follows.
#[derive(Debug, Clone)]
pub(crate) struct WatchConfig {
    pub(crate) client: crate::conn::Target,
    pub(crate) feed: Arc<str>,
    pub(crate) index: Arc<str>,
    /// How long one `XREAD BLOCK` waits.
    pub(crate) block: Duration,
    pub(crate) connect_timeout: Duration,
    /// The response time-out of commands other than `XREAD BLOCK` (which gets `block` on top).
    pub(crate) response_timeout: Duration,
}

async fn run(head: Weak<Head>, config: WatchConfig) {
    const MIN_BACKOFF: Duration = Duration::from_millis(50);
    let mut conn: Option<Side> = None;
    let mut delays = es_core::Backoff::new(MIN_BACKOFF, config.block).delays();
    loop {
        if head.strong_count() == 0 {
            return;
        }
        let result = match conn.as_mut() {
            Some(c) => step(c, &config, &head).await,
            None => match connect(&config).await {
                Ok(c) => {
                    conn = Some(c);
                    continue;
                }
                Err(err) => Err(err),
            },
        };
        match result {
            Ok(()) => delays.reset(),
            Err(err) => {
                tracing::debug!(error = %err, "head watcher lost its connection; reconnecting");
                conn = None;
                delays.sleep().await;
            }
        }
    }
}

/// The watcher's own connection. Its response time-out is the store's plus the block time, so
/// that an `XREAD BLOCK` that the server answers only when the block time is up does not time
/// out, and one that a stalled or vanished server never answers does.
async fn connect(config: &WatchConfig) -> RedisResult<Side> {
    config
        .client
        .connect(
            config.connect_timeout,
            config.response_timeout + config.block,
        )
        .await
}

/// Publishes the current head, then blocks until an entry after it arrives or the block time
/// passes.
async fn step(conn: &mut Side, config: &WatchConfig, head: &Weak<Head>) -> RedisResult<()> {
    let value = redis::cmd("HGET")
        .arg(&*config.index)
        .arg("position")
        .query_async(conn)
        .await?;
    // A head that cannot be read is left to the readers to report; the watcher just polls.
    let position = decode::counter(value, "head").unwrap_or(0);
    match head.upgrade() {
        // The server's head is authoritative: after data loss it may even move back.
        Some(h) => {
            h.saw(position);
            h.tx.send_if_modified(|published| {
                let changed = *published != position;
                *published = position;
                changed
            });
        }
        None => return Ok(()),
    }
    let block_ms = u64::try_from(config.block.as_millis()).unwrap_or(u64::MAX);
    let _: redis::Value = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(1)
        .arg("BLOCK")
        .arg(block_ms)
        .arg("STREAMS")
        .arg(&*config.feed)
        .arg(format!("{position}-0"))
        .query_async(conn)
        .await?;
    Ok(())
}
