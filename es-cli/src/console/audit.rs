//! The audit chain: finding events by id, by correlation and by causation.
//!
//! The store API has no index by event id, correlation or causation, so each lookup reads the
//! feed (`EventStore::read_all`, every partition from its start, in pages the store chooses) and
//! keeps the matching events. The cost is linear in the feed's length: one lookup reads at most
//! `--scan-limit` events (default 100 000) and the page says so when it stopped there. A lookup
//! by event id stops at the first match.

use es_core::{EventStore, ReadAll, RecordedEvent};
use futures::TryStreamExt;
use uuid::Uuid;

/// What one scan found.
pub(crate) struct Scan {
    /// The matching events, in feed order (partition by partition).
    pub(crate) found: Vec<RecordedEvent>,
    /// How many events were read.
    pub(crate) read: u64,
    /// Whether the scan stopped at the limit before the end of the feed.
    pub(crate) cut: bool,
}

/// What to look for.
#[derive(Clone, Copy)]
pub(crate) enum Wanted {
    /// The event with this id (the scan stops at it).
    Event(Uuid),
    /// Every event with this correlation id.
    Correlation(Uuid),
    /// Every event whose causation id is this.
    CausedBy(Uuid),
}

impl Wanted {
    fn matches(self, event: &RecordedEvent) -> bool {
        match self {
            Wanted::Event(id) => event.event_id == id,
            Wanted::Correlation(id) => event.metadata.correlation_id == Some(id),
            Wanted::CausedBy(id) => event.metadata.causation_id == Some(id),
        }
    }
}

/// Reads the feed, at most `limit` events, keeping those `wanted` matches.
pub(crate) async fn scan<S: EventStore>(
    store: &S,
    wanted: Wanted,
    limit: u64,
) -> Result<Scan, es_core::StoreError> {
    let mut scan = Scan {
        found: Vec::new(),
        read: 0,
        cut: false,
    };
    for partition in store.partitioning().partitions() {
        let left = limit.saturating_sub(scan.read);
        if left == 0 {
            scan.cut = true;
            break;
        }
        let mut events = store.read_all(ReadAll::after(0).partition(partition).limit(left));
        let mut read_here = 0;
        let mut last = 0;
        while let Some(event) = events.try_next().await? {
            read_here += 1;
            last = event.global_position;
            if wanted.matches(&event) {
                scan.found.push(event);
                if matches!(wanted, Wanted::Event(_)) {
                    scan.read += read_here;
                    return Ok(scan);
                }
            }
        }
        scan.read += read_here;
        if read_here == left && last < store.partition_head(partition).await? {
            scan.cut = true;
            break;
        }
    }
    Ok(scan)
}
