//! What the suites and the backends' own tests share: names no other test uses, tails of the
//! global feed that run until a `Done` event, the feed check, and a bounded wait.
//!
//! A backend's fresh-store factory is its own (a schema, a key prefix), built on
//! [`unique_name`]; everything that only needs the store's traits lives here once.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use es_core::{EventFilter, EventStore, FeedPosition, ReadAll, RecordedEvent, StreamId};
use futures::{StreamExt, TryStreamExt};
use uuid::Uuid;

/// The event type that ends [`tail_until_done`] and [`poll_until_done`].
pub const DONE: &str = "Done";

/// A name no other test uses, in this process or a concurrent run: `prefix`, the process id, a
/// counter and the clock's nanoseconds, joined by `sep`. Made of ASCII letters, digits, `_` and
/// `sep`, so it fits a PostgreSQL schema (`sep = '_'`, lower-case prefix) or a Redis key prefix
/// (`sep = ':'`).
pub fn unique_name(prefix: &str, sep: char) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{prefix}{sep}{}{sep}{}{sep}{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Awaits `fut`, failing the test with `what` after `patience`.
pub fn patiently<T>(
    what: &str,
    patience: Duration,
    fut: impl Future<Output = T>,
) -> impl Future<Output = T> {
    let what = what.to_owned();
    async move {
        tokio::time::timeout(patience, fut)
            .await
            .unwrap_or_else(|_| panic!("timed out after {patience:?} waiting for: {what}"))
    }
}

/// Subscribes to `store`'s whole feed from position 0 (every partition, with
/// [`subscribe_all`](EventStore::subscribe_all), on a partitioned store) and collects what it
/// delivers until it has delivered an event of type [`DONE`] and, on a partitioned store, every
/// other partition up to its head as read after `Done` (whatever was committed before `Done`).
/// The subscription must not fail (it retries transient errors itself) and must not end before.
pub fn tail_until_done<S: EventStore>(store: &S) -> tokio::task::JoinHandle<Vec<RecordedEvent>> {
    let partitioning = store.partitioning();
    let mut feed = if partitioning.is_single() {
        store.subscribe(0, EventFilter::all())
    } else {
        store.subscribe_all(&FeedPosition::start(&partitioning), EventFilter::all())
    };
    let store = store.clone();
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut at = FeedPosition::start(&partitioning);
        // Once `Done` is seen: the heads every partition must reach.
        let mut until: Option<FeedPosition> = None;
        while let Some(event) = feed.next().await {
            let event = event.unwrap_or_else(|e| panic!("the subscription failed: {e}"));
            at.advance(event.partition, event.global_position);
            if event.event_type == DONE {
                until = Some(partition_heads(&store).await);
            }
            seen.push(event);
            if until.as_ref().is_some_and(|heads| at.covers(heads)) {
                return seen;
            }
        }
        panic!("the subscription ended before `{DONE}`");
    })
}

/// The head of every partition.
async fn partition_heads<S: EventStore>(store: &S) -> FeedPosition {
    let mut heads = Vec::new();
    for partition in store.partitioning().partitions() {
        let head = store
            .partition_head(partition)
            .await
            .unwrap_or_else(|e| panic!("reading the head of partition {partition} failed: {e}"));
        heads.push(head);
    }
    FeedPosition::from_positions(heads)
}

/// Reads `store`'s feed by polling `read_all` from its own checkpoint (one per partition, each
/// partition in turn, on a partitioned store), `page` events at a time, until it has read an
/// event of type [`DONE`] and then found every partition read to its end; returns everything it
/// read.
pub fn poll_until_done<S: EventStore>(
    store: &S,
    page: u64,
) -> tokio::task::JoinHandle<Vec<RecordedEvent>> {
    let store = store.clone();
    tokio::spawn(async move {
        let partitioning = store.partitioning();
        let mut seen: Vec<RecordedEvent> = Vec::new();
        let mut at = FeedPosition::start(&partitioning);
        let mut done = false;
        loop {
            let mut read_any = false;
            for partition in partitioning.partitions() {
                let read = ReadAll::after(at.get(partition)).limit(page);
                let read = if partitioning.is_single() {
                    read
                } else {
                    read.partition(partition)
                };
                let events: Vec<RecordedEvent> = store
                    .read_all(read)
                    .try_collect()
                    .await
                    .unwrap_or_else(|e| panic!("read_all failed: {e}"));
                done |= events.iter().any(|e| e.event_type == DONE);
                if let Some(last) = events.last() {
                    at.advance(partition, last.global_position);
                }
                read_any |= !events.is_empty();
                seen.extend(events);
            }
            // Everything was committed before `Done`: once it is read, a pass that finds
            // nothing new in any partition has read everything.
            if done && !read_any {
                return seen;
            }
            if !read_any {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    })
}

/// Checks a feed as a reader saw it (`name` says which reader) against the ids of every event
/// `written`: positions strictly increase (within each partition), nothing is delivered twice,
/// nothing is missed or unexpected, and each stream's events come in version order from
/// version 1.
#[track_caller]
pub fn check_feed<H: BuildHasher>(name: &str, seen: &[RecordedEvent], written: &HashSet<Uuid, H>) {
    assert!(
        in_feed_order(seen),
        "{name}: positions strictly increase within each partition"
    );
    let ids: HashSet<Uuid> = seen.iter().map(|e| e.event_id).collect();
    assert_eq!(
        ids.len(),
        seen.len(),
        "{name}: an event was delivered twice"
    );
    let missed = written.iter().filter(|id| !ids.contains(*id)).count();
    assert_eq!(
        missed,
        0,
        "{name}: missed {missed} of {} events",
        written.len()
    );
    assert_eq!(ids.len(), written.len(), "{name}: unexpected events");
    let mut last: HashMap<&StreamId, u64> = HashMap::new();
    for e in seen {
        let prev = last.insert(&e.stream_id, e.stream_version).unwrap_or(0);
        assert_eq!(
            e.stream_version,
            prev + 1,
            "{name}: per-stream order in the feed"
        );
    }
}

/// Whether positions strictly increase within each partition's run of `events` (the events of
/// one partition in the order given, whatever lies between them).
pub fn in_feed_order(events: &[RecordedEvent]) -> bool {
    let mut last: HashMap<u32, u64> = HashMap::new();
    events.iter().all(|e| {
        let before = last.insert(e.partition, e.global_position).unwrap_or(0);
        e.global_position > before
    })
}

/// Everything an error shows a user or a log: its `Display`, its `Debug`, and the `Display` of
/// every source. A test that a secret never appears searches this.
pub fn everything_shown(err: &(dyn std::error::Error + 'static)) -> String {
    let mut shown = vec![err.to_string(), format!("{err:?}")];
    let mut source = err.source();
    while let Some(cause) = source {
        shown.push(cause.to_string());
        source = cause.source();
    }
    shown.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_fit_identifiers() {
        let a = unique_name("t_s", '_');
        let b = unique_name("t_s", '_');
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        assert!(unique_name("t:x", ':').starts_with("t:x:"));
    }
}
