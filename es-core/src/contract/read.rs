//! Reads: which part of a stream or of the global feed, and the lazy streams they return: of
//! events, or of pages of borrowed events for loading aggregates.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};

use super::error::StoreError;
use super::partition::Partitioning;
use crate::event::{RecordedEvent, RecordedEventRef};

/// Direction of a stream read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Ascending versions.
    Forward,
    /// Descending versions.
    Backward,
}

/// Which part of a stream to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadStream {
    /// Read direction.
    pub direction: Direction,
    /// First version to return (inclusive). Backward reads from `u64::MAX` start at the end.
    pub from: u64,
    /// Most events to return; `None` for all.
    pub limit: Option<u64>,
}

impl ReadStream {
    /// The whole stream, oldest first.
    pub fn forward() -> Self {
        Self {
            direction: Direction::Forward,
            from: 1,
            limit: None,
        }
    }

    /// The whole stream, newest first.
    pub fn backward() -> Self {
        Self {
            direction: Direction::Backward,
            from: u64::MAX,
            limit: None,
        }
    }

    /// Starts at version `from` (inclusive).
    pub fn from(mut self, from: u64) -> Self {
        self.from = from;
        self
    }

    /// Returns at most `limit` events.
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Whether `version` lies in the requested direction from `from`.
    pub fn includes(&self, version: u64) -> bool {
        match self.direction {
            Direction::Forward => version >= self.from,
            Direction::Backward => version <= self.from,
        }
    }
}

/// Which events of the global feed to return.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct EventFilter {
    /// Only events of these stream categories; empty means every category.
    pub categories: Vec<String>,
    /// Only events of these types; empty means every type.
    pub event_types: Vec<String>,
}

impl EventFilter {
    /// Every event.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only events of streams in `category` (can be chained to allow several).
    pub fn category(mut self, category: impl Into<String>) -> Self {
        self.categories.push(category.into());
        self
    }

    /// Only events of type `event_type` (can be chained to allow several).
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_types.push(event_type.into());
        self
    }

    /// Whether the filter lets everything through.
    pub fn is_empty(&self) -> bool {
        self.categories.is_empty() && self.event_types.is_empty()
    }

    /// Whether `event` passes the filter.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        (self.categories.is_empty() || self.categories.iter().any(|c| c == event.category()))
            && (self.event_types.is_empty() || self.event_types.contains(&event.event_type))
    }
}

/// Which part of the global feed to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadAll {
    /// The feed partition to read (see [`partition`](super::partition)). `None`: the whole feed,
    /// which only a store with one partition has; a store with several fails the read with
    /// [`StoreError::Partitioned`].
    pub partition: Option<u32>,
    /// Return events with a global position strictly greater than this (0 reads from the start).
    pub after: u64,
    /// Most events to return; `None` for all.
    pub limit: Option<u64>,
    /// Which events to return.
    pub filter: EventFilter,
}

impl ReadAll {
    /// Every event after `after`.
    pub fn after(after: u64) -> Self {
        Self {
            after,
            ..Self::default()
        }
    }

    /// Returns at most `limit` events.
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Reads feed partition `partition` (positions are then that partition's).
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// The partition this read addresses on a store partitioned by `partitioning`: the one it
    /// names if that exists ([`StoreError::NoSuchPartition`] otherwise), or, if it names none,
    /// partition 0 of a single-feed store ([`StoreError::Partitioned`] on a store with several).
    pub fn partition_in(&self, partitioning: &Partitioning) -> Result<u32, StoreError> {
        match self.partition {
            Some(partition) => partitioning.check(partition).map(|()| partition),
            None => partitioning.single_feed(),
        }
    }

    /// Returns only events that pass `filter`.
    pub fn filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }
}

/// A lazy stream of recorded events. It owns what it needs, so it can outlive the store handle.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<RecordedEvent, StoreError>> + Send>>;

/// A read that fails at once with `err`: what a backend returns for a read it refuses (a
/// partition it does not have).
pub fn failed_read(err: StoreError) -> EventStream {
    Box::pin(futures::stream::once(std::future::ready(Err(err))))
}

/// A page of a stream's events, as [`EventStore::read_stream_pages`](super::EventStore::read_stream_pages)
/// hands them to the repository's load: the store keeps them in its own form (rows as received,
/// shared entries) and lends each one out as a [`RecordedEventRef`] that the load decodes in
/// place.
pub trait EventPage: Send {
    /// How many events the page holds.
    fn len(&self) -> usize;

    /// Whether the page holds no event.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The event at `index` (below [`len`](EventPage::len)), borrowed from the page. A stored
    /// event the store cannot turn into an envelope (a row changed behind its back) is
    /// [`StoreError::Corrupt`], the same error [`read_stream`](super::EventStore::read_stream)
    /// gives for it.
    fn event(&self, index: usize) -> Result<RecordedEventRef<'_>, StoreError>;
}

impl EventPage for Vec<RecordedEvent> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn event(&self, index: usize) -> Result<RecordedEventRef<'_>, StoreError> {
        Ok(self[index].borrowed())
    }
}

/// A lazy stream of pages of one stream's events, in the order of the read. It owns what it
/// needs, so it can outlive the store handle.
pub type EventPages = Pin<Box<dyn Stream<Item = Result<Box<dyn EventPage>, StoreError>> + Send>>;

/// Most events [`pages_of`] puts in one page.
const PAGE: usize = 512;

/// Groups the events of `events` into pages, in order: each page holds what the stream has ready
/// (at most 512 events), so it never waits to fill a page. An error comes after the page of the
/// events before it, and ends the pages. The default
/// [`EventStore::read_stream_pages`](super::EventStore::read_stream_pages).
pub fn pages_of(events: EventStream) -> EventPages {
    Box::pin(Paged {
        events,
        failed: None,
        done: false,
    })
}

struct Paged {
    events: EventStream,
    /// An error met after some events of a page: yielded after that page.
    failed: Option<StoreError>,
    done: bool,
}

impl Stream for Paged {
    type Item = Result<Box<dyn EventPage>, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(err) = this.failed.take() {
            this.done = true;
            return Poll::Ready(Some(Err(err)));
        }
        if this.done {
            return Poll::Ready(None);
        }
        let mut page: Vec<RecordedEvent> = Vec::new();
        let ready = |page: Vec<RecordedEvent>| -> Poll<Option<Self::Item>> {
            Poll::Ready(Some(Ok(Box::new(page))))
        };
        loop {
            match this.events.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(event))) => {
                    page.push(event);
                    if page.len() == PAGE {
                        return ready(page);
                    }
                }
                Poll::Ready(Some(Err(err))) if page.is_empty() => {
                    this.done = true;
                    return Poll::Ready(Some(Err(err)));
                }
                Poll::Ready(Some(Err(err))) => {
                    this.failed = Some(err);
                    return ready(page);
                }
                Poll::Ready(None) => {
                    this.done = true;
                    return if page.is_empty() {
                        Poll::Ready(None)
                    } else {
                        ready(page)
                    };
                }
                Poll::Pending if page.is_empty() => return Poll::Pending,
                Poll::Pending => return ready(page),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Metadata;
    use crate::stream_id::StreamId;

    fn event(version: u64) -> RecordedEvent {
        RecordedEvent {
            event_id: uuid::Uuid::new_v4(),
            stream_id: StreamId::new("t", "s").unwrap(),
            stream_version: version,
            global_position: version,
            partition: 0,
            event_type: "E".to_owned(),
            schema_version: 1,
            payload: bytes::Bytes::from_static(b"{}"),
            metadata: Metadata::default(),
            recorded_at: chrono::Utc::now(),
        }
    }

    /// The versions of each page, and the error that ended them, if any.
    async fn paged(items: Vec<Result<RecordedEvent, StoreError>>) -> (Vec<Vec<u64>>, bool) {
        let mut pages = pages_of(Box::pin(futures::stream::iter(items)));
        let (mut seen, mut failed) = (Vec::new(), false);
        while let Some(page) = pages.next().await {
            if let Ok(page) = page {
                let versions = (0..page.len()).map(|i| page.event(i).unwrap().stream_version);
                seen.push(versions.collect());
            } else {
                assert!(!failed, "one error at most");
                failed = true;
            }
        }
        (seen, failed)
    }

    #[tokio::test]
    async fn pages_of_keeps_order_and_reports_errors_after_the_events_before_them() {
        let (pages, failed) = paged((1..=1100).map(|v| Ok(event(v))).collect()).await;
        assert_eq!(
            pages.iter().map(Vec::len).collect::<Vec<_>>(),
            [512, 512, 76]
        );
        assert_eq!(pages.concat(), (1..=1100).collect::<Vec<_>>());
        assert!(!failed);

        let mut items: Vec<_> = (1..=3).map(|v| Ok(event(v))).collect();
        items.push(Err(StoreError::backend("broken")));
        items.push(Ok(event(4)));
        let (pages, failed) = paged(items).await;
        assert_eq!(pages, [vec![1, 2, 3]], "nothing after the error");
        assert!(failed);

        let (pages, failed) = paged(vec![Err(StoreError::backend("broken"))]).await;
        assert!(pages.is_empty() && failed);
        assert_eq!(paged(Vec::new()).await, (Vec::new(), false));
    }

    #[tokio::test]
    async fn pages_of_hands_out_what_is_ready_without_waiting_to_fill_a_page() {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut pages = pages_of(Box::pin(rx));
        tx.unbounded_send(Ok(event(1))).unwrap();
        tx.unbounded_send(Ok(event(2))).unwrap();
        let page = pages.next().await.unwrap().unwrap();
        assert_eq!(page.len(), 2);
        tx.unbounded_send(Ok(event(3))).unwrap();
        drop(tx);
        assert_eq!(pages.next().await.unwrap().unwrap().len(), 1);
        assert!(pages.next().await.is_none());
    }
}
