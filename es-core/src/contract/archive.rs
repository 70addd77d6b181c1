//! Archiving: moving the old events of a stream out of the store's hot storage.
//!
//! [`EventStore::archive_stream`](super::EventStore::archive_stream) moves the events of a stream
//! below a version into the archive the store owns, where every read still finds them: stream
//! reads in either direction, historical loads, the global feed and the subscriptions and
//! projection rebuilds that follow it return exactly the events they returned before, in the
//! same order, at the same versions and positions. Archiving changes where events are kept, never
//! what a reader sees.
//!
//! The last event of a stream always stays in hot storage: it carries the stream's version (and,
//! for a closed stream, its tombstone), so appends, version checks and the feed's head are
//! answered from hot storage alone.

use std::ops::RangeInclusive;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};

use super::error::StoreError;
use super::read::{Direction, EventFilter, EventStream, ReadAll, ReadStream};
use crate::event::RecordedEvent;
use crate::stream_id::StreamId;

/// What [`EventStore::archive_stream`](super::EventStore::archive_stream) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Archived {
    /// Events this call moved out of hot storage (0 when an earlier call had moved them).
    pub moved: u64,
    /// The lowest version still in hot storage: every version below it is in the archive.
    pub hot_from: u64,
}

/// Checks an archive request against the stream's version: `before` must leave the last event in
/// hot storage (`before <= version`). `before` 0 or 1 asks to move nothing, and reports where the
/// hot part begins. A stream without events has nothing to archive.
pub fn check_archive(stream: &StreamId, before: u64, version: u64) -> Result<(), StoreError> {
    let reason = if version == 0 {
        "the stream has no events".to_owned()
    } else if before > version {
        format!(
            "the last event of a stream stays in hot storage: `before` may be at most the \
             stream's version {version}, not {before}"
        )
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidArchive {
        stream_id: stream.clone(),
        reason,
    })
}

/// A cold event archive: where a store whose hot storage is expensive (Redis keeps everything in
/// memory) moves the events [`EventStore::archive_stream`](super::EventStore::archive_stream)
/// archives, and reads them back from when a read reaches them.
///
/// The store owns the order of operations that keeps reads exact (see [`merge_stream_read`] and
/// [`merge_feed_read`]): it [`store`](Self::store)s events here, durably, *before* it deletes
/// them from hot storage, and its reads read hot storage *before* they read the archive. So an
/// event is, at every moment, in hot storage, in the archive, or in both (after a crash between
/// the two steps); the merge adapters read each version and position from one of them, once.
///
/// Object safe: a store keeps an `Arc<dyn EventArchive>`. es-postgres implements it
/// (`es_postgres::PgEventArchive`).
pub trait EventArchive: Send + Sync + 'static {
    /// Claims the archive for the store named `owner` (an identity the store keeps, stable
    /// across restarts), the first time it is used. An archive holds the events of one store:
    /// positions and versions of two stores would collide. A claim by another owner than the
    /// recorded one fails with a typed error, and the store refuses to use the archive.
    fn claim<'a>(&'a self, owner: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Stores `events` (each with its stream, version, partition and position as the store
    /// recorded them), durably once it returns `Ok`. Idempotent: an event already stored (same
    /// event id at the same stream version and position) is kept as is; a different event at a
    /// stored stream version or feed position is [`StoreError::Corrupt`], and nothing of the
    /// call is stored.
    fn store<'a>(&'a self, events: &'a [RecordedEvent]) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The archived events of `stream` with versions in `versions`, ascending for
    /// [`Direction::Forward`], descending for [`Direction::Backward`], at most `limit`.
    fn read_stream<'a>(
        &'a self,
        stream: &'a StreamId,
        versions: RangeInclusive<u64>,
        direction: Direction,
        limit: u64,
    ) -> BoxFuture<'a, Result<Vec<RecordedEvent>, StoreError>>;

    /// The archived events of feed partition `partition` with positions in `(after, up_to]`
    /// that `filter` matches, in position order, at most `limit`.
    fn read_partition<'a>(
        &'a self,
        partition: u32,
        after: u64,
        up_to: u64,
        filter: &'a EventFilter,
        limit: u64,
    ) -> BoxFuture<'a, Result<Vec<RecordedEvent>, StoreError>>;
}

/// The failure of a stream read that found versions in neither hot storage nor the archive.
fn missing(stream: &StreamId, versions: RangeInclusive<u64>) -> StoreError {
    StoreError::Corrupt {
        location: format!(
            "stream `{stream}` versions {} to {}",
            versions.start(),
            versions.end()
        ),
        reason: "the versions are neither in hot storage nor in the archive".to_owned(),
    }
}

/// A range of versions still to read from the archive, in the read's direction.
#[derive(Debug, Clone)]
struct Gap {
    versions: RangeInclusive<u64>,
    /// Whether the archive may hold none of it (the tail of a backward read that found no hot
    /// event: the stream may have no events at all).
    may_be_empty: bool,
}

struct StreamMerge {
    hot: EventStream,
    hot_done: bool,
    archive: Arc<dyn EventArchive>,
    stream: StreamId,
    direction: Direction,
    /// Where a backward read starts (`u64::MAX`: at the end).
    from: u64,
    /// The version the read returns next; `None` for a backward read until its first hot event.
    expected: Option<u64>,
    /// A hot event held back until the gap before it is filled from the archive.
    pending: Option<RecordedEvent>,
    gap: Option<Gap>,
    page: u64,
}

impl StreamMerge {
    /// One step: a page of the archive, the next hot event, nothing yet (an empty batch), or
    /// the end of the read (`None`).
    async fn step(mut self) -> Result<Option<(Vec<RecordedEvent>, Self)>, StoreError> {
        if let Some(gap) = self.gap.take() {
            let events = self.fill(&gap).await?;
            return Ok(Some((events, self)));
        }
        if let Some(event) = self.pending.take() {
            self.expected = Some(self.after(event.stream_version));
            return Ok(Some((vec![event], self)));
        }
        if self.hot_done {
            return Ok(None);
        }
        let Some(event) = self.hot.next().await.transpose()? else {
            self.hot_done = true;
            // Hot storage holds nothing more; a backward read still wants every version below
            // the last one it returned, and those are archived (the archived part of a stream
            // is always a prefix: the versions below the lowest hot one).
            if self.direction == Direction::Backward {
                self.gap = match self.expected {
                    Some(0) => None,
                    Some(expected) => Some(Gap {
                        versions: 1..=expected,
                        may_be_empty: false,
                    }),
                    // No hot event at or below `from`: every version up to `from` is archived,
                    // or the stream has no events.
                    None if self.from > 0 && self.from < u64::MAX => Some(Gap {
                        versions: 1..=self.from,
                        may_be_empty: true,
                    }),
                    None => None,
                };
            }
            return Ok(Some((Vec::new(), self)));
        };
        let version = event.stream_version;
        // The first hot event of a backward read is the highest hot version at or below `from`:
        // a version above it and below `from` would be hot too (the archive is a prefix), so
        // it is the stream's last and nothing lies between it and `from`.
        let expected = *self.expected.get_or_insert(version);
        let (behind, gap) = match self.direction {
            Direction::Forward => (
                version < expected,
                (version > expected).then(|| expected..=version - 1),
            ),
            Direction::Backward => (
                version > expected,
                (version < expected).then(|| version + 1..=expected),
            ),
        };
        if behind {
            // Already returned (from the archive). Hot reads never go back, so this does not
            // happen; skipping it keeps every version once regardless.
            return Ok(Some((Vec::new(), self)));
        }
        if let Some(versions) = gap {
            self.gap = Some(Gap {
                versions,
                may_be_empty: false,
            });
            self.pending = Some(event);
            return Ok(Some((Vec::new(), self)));
        }
        self.expected = Some(self.after(version));
        Ok(Some((vec![event], self)))
    }

    /// Reads a page of `gap` from the archive, checks that it holds the gap's versions one by
    /// one from its near end, and keeps what is left of the gap for the next step.
    async fn fill(&mut self, gap: &Gap) -> Result<Vec<RecordedEvent>, StoreError> {
        let events = self
            .archive
            .read_stream(
                &self.stream,
                gap.versions.clone(),
                self.direction,
                self.page,
            )
            .await?;
        if events.is_empty() {
            return if gap.may_be_empty {
                Ok(events)
            } else {
                Err(missing(&self.stream, gap.versions.clone()))
            };
        }
        let (low, high) = (*gap.versions.start(), *gap.versions.end());
        let mut next = match self.direction {
            Direction::Forward => low,
            Direction::Backward => high,
        };
        for event in &events {
            if event.stream_version != next || !gap.versions.contains(&next) {
                return Err(missing(&self.stream, gap.versions.clone()));
            }
            next = self.after(next);
        }
        let rest = match self.direction {
            Direction::Forward => next..=high,
            Direction::Backward => low..=next,
        };
        // `next` is 0 once a backward read has returned version 1: nothing is left then.
        if next > 0 && !rest.is_empty() {
            self.gap = Some(Gap {
                versions: rest,
                may_be_empty: false,
            });
        }
        self.expected = Some(next);
        Ok(events)
    }

    /// The version a read returns after `version`.
    fn after(&self, version: u64) -> u64 {
        match self.direction {
            Direction::Forward => version.saturating_add(1),
            Direction::Backward => version.saturating_sub(1),
        }
    }
}

/// A stream read that merges hot storage with `archive`: `hot` is the store's own read of
/// `stream` in `read`'s direction from `read.from`, **without a limit**; the result is what
/// `read` asks for, every version once, in order, with `read.limit` applied after merging.
///
/// Versions are dense, so a gap in what the hot read returns is archived events: forward, a
/// version above the next one expected; backward, one below it, or a read that ends above
/// version 1. The adapter reads exactly that range from the archive (`page` events per call)
/// and returns it in place. This also covers events archived between two pages of the hot read:
/// the next hot page starts above (below) the archived ones, and the gap is read from the
/// archive, where they were stored before they were deleted from hot storage. A gap that the
/// archive does not hold either is [`StoreError::Corrupt`].
pub fn merge_stream_read(
    hot: EventStream,
    archive: Arc<dyn EventArchive>,
    stream: StreamId,
    read: ReadStream,
    page: u64,
) -> EventStream {
    let state = StreamMerge {
        hot,
        hot_done: false,
        archive,
        stream,
        direction: read.direction,
        from: read.from,
        expected: match read.direction {
            Direction::Forward => Some(read.from.max(1)),
            Direction::Backward => None,
        },
        pending: None,
        gap: None,
        page: page.max(1),
    };
    let events = futures::stream::try_unfold(state, StreamMerge::step)
        .map_ok(|batch| futures::stream::iter(batch.into_iter().map(Ok)))
        .try_flatten();
    match read.limit {
        Some(limit) => Box::pin(events.take(usize::try_from(limit).unwrap_or(usize::MAX))),
        None => Box::pin(events),
    }
}

/// A store's hot storage for one feed partition, as [`merge_feed_read`] reads it.
pub trait HotFeed: Send + Sync + 'static {
    /// The partition's head: the last position assigned.
    fn head(&self) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Up to `count` hot events of the partition with positions after `after`, in position
    /// order, unfiltered.
    fn page(&self, after: u64, count: u64)
        -> BoxFuture<'_, Result<Vec<RecordedEvent>, StoreError>>;
}

struct FeedMerge {
    hot: Arc<dyn HotFeed>,
    archive: Arc<dyn EventArchive>,
    partition: u32,
    filter: EventFilter,
    /// Where the next page starts; `None` once the read is complete.
    after: Option<u64>,
    remaining: u64,
    page: u64,
}

impl FeedMerge {
    async fn step(mut self) -> Result<Option<(Vec<RecordedEvent>, Self)>, StoreError> {
        let Some(after) = self.after.filter(|_| self.remaining > 0) else {
            return Ok(None);
        };
        // Unfiltered reads fetch what is still wanted; filtered ones scan full pages.
        let count = if self.filter.is_empty() {
            self.remaining.min(self.page)
        } else {
            self.page
        };
        // Why every event of the range is returned exactly once:
        //
        // - The archiver stores events in the archive before it deletes them from hot storage,
        //   and this reader reads hot storage before the archive. An event missing from the hot
        //   page had been deleted when the page was read, so it was in the archive before the
        //   archive is read here: each event is seen in at least one of the two reads, and the
        //   merge keeps one copy per position (an event can be in both: read between the
        //   archiver's two steps, or left by an archiver that crashed between them).
        // - Bound of the archive read: if the hot page is full, hot storage was read only up to
        //   its last position, so the page covers exactly `(after, last hot]`. Otherwise hot
        //   storage held nothing more, and every position assigned when the head `h0` was read
        //   is covered up to `max(h0, last hot)`. An event archived later than that, with a
        //   position above the bound, cannot exist: its stream's last event stays hot and
        //   lies above it, and would be in the (not full) hot page, raising the bound.
        // - Positions become visible in order and nothing appears in hot storage below a
        //   position that was visible (appends take positions above the head; archiving only
        //   deletes), so a later page cannot miss an event below this page's end.
        // - If the archive returned a full page, it may hold more below the bound: the merged
        //   page is cut at its last position and the next page starts there.
        let h0 = self.hot.head().await?;
        let hot = self.hot.page(after, count).await?;
        let hot_full = count > 0 && hot.len() as u64 >= count;
        let hot_last = hot.last().map(|e| e.global_position);
        let bound = if hot_full {
            hot_last.unwrap_or(after)
        } else {
            h0.max(hot_last.unwrap_or(after))
        };
        let cold = if bound > after {
            self.archive
                .read_partition(self.partition, after, bound, &self.filter, count)
                .await?
        } else {
            Vec::new()
        };
        let cold_full = count > 0 && cold.len() as u64 >= count;
        let cut = if cold_full {
            cold.last().map(|e| e.global_position)
        } else {
            None
        };
        let mut merged = Vec::with_capacity(hot.len() + cold.len());
        let mut hot = hot
            .into_iter()
            .filter(|e| self.filter.matches(e))
            .peekable();
        let mut cold = cold.into_iter().peekable();
        loop {
            let (h, c) = (
                hot.peek().map(|e| e.global_position),
                cold.peek().map(|e| e.global_position),
            );
            let next = match (h, c) {
                (None, None) => break,
                (Some(h), Some(c)) if h == c => {
                    cold.next();
                    hot.next()
                }
                (Some(h), Some(c)) if h < c => hot.next(),
                (Some(_), None) => hot.next(),
                _ => cold.next(),
            };
            if let Some(event) = next {
                let past_cut = cut.is_some_and(|cut| event.global_position > cut);
                if event.global_position > after && !past_cut {
                    merged.push(event);
                }
            }
        }
        merged.truncate(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        self.remaining -= merged.len() as u64;
        self.after = if cut.is_some() {
            cut
        } else if hot_full {
            hot_last
        } else {
            None
        };
        Ok(Some((merged, self)))
    }
}

/// A feed read of partition `partition` that merges hot storage with `archive`: `read.after`,
/// `read.filter` and `read.limit` as [`EventStore::read_all`](super::EventStore::read_all)
/// takes them, in pages of `page` events.
///
/// Positions are not dense, so gaps say nothing: per page the adapter reads the partition's
/// head `h0`, then the hot page (up to `page` events after `after`), then the archive for
/// `(after, bound]`, where `bound` is the hot page's last position if the page was full, else
/// `max(h0, last hot position)`; it merges both by position, keeping one copy of an event found
/// in both, and, if the archive returned a full page, cuts the merged page at the archive's last
/// position. The argument that this returns every event once is in the code.
pub fn merge_feed_read(
    hot: Arc<dyn HotFeed>,
    archive: Arc<dyn EventArchive>,
    partition: u32,
    read: ReadAll,
    page: u64,
) -> EventStream {
    let state = FeedMerge {
        hot,
        archive,
        partition,
        after: Some(read.after),
        remaining: read.limit.unwrap_or(u64::MAX),
        filter: read.filter,
        page: page.max(1),
    };
    Box::pin(
        futures::stream::try_unfold(state, FeedMerge::step)
            .map_ok(|batch| futures::stream::iter(batch.into_iter().map(Ok)))
            .try_flatten(),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::event::Metadata;

    fn stream() -> StreamId {
        StreamId::new("cold", "s").unwrap()
    }

    /// Version `v` at position `3 v` (positions are not dense).
    fn event(v: u64) -> RecordedEvent {
        RecordedEvent {
            event_id: uuid::Uuid::from_u128(u128::from(v)),
            stream_id: stream(),
            stream_version: v,
            global_position: 3 * v,
            partition: 0,
            event_type: if v % 2 == 0 { "Even" } else { "Odd" }.to_owned(),
            schema_version: 1,
            payload: bytes::Bytes::from_static(b"{}"),
            metadata: Metadata::default(),
            recorded_at: chrono::DateTime::UNIX_EPOCH,
        }
    }

    /// An archive holding `events`, read as PostgreSQL's would.
    struct Cold(Mutex<Vec<RecordedEvent>>);

    impl EventArchive for Cold {
        fn claim<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
            Box::pin(async { Ok(()) })
        }
        fn store<'a>(
            &'a self,
            events: &'a [RecordedEvent],
        ) -> BoxFuture<'a, Result<(), StoreError>> {
            self.0.lock().unwrap().extend_from_slice(events);
            Box::pin(async { Ok(()) })
        }
        fn read_stream<'a>(
            &'a self,
            _: &'a StreamId,
            versions: RangeInclusive<u64>,
            direction: Direction,
            limit: u64,
        ) -> BoxFuture<'a, Result<Vec<RecordedEvent>, StoreError>> {
            let mut found: Vec<RecordedEvent> = self
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|e| versions.contains(&e.stream_version))
                .cloned()
                .collect();
            found.sort_by_key(|e| e.stream_version);
            if direction == Direction::Backward {
                found.reverse();
            }
            found.truncate(usize::try_from(limit).unwrap());
            Box::pin(async move { Ok(found) })
        }
        fn read_partition<'a>(
            &'a self,
            _: u32,
            after: u64,
            up_to: u64,
            filter: &'a EventFilter,
            limit: u64,
        ) -> BoxFuture<'a, Result<Vec<RecordedEvent>, StoreError>> {
            let mut found: Vec<RecordedEvent> = self
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.global_position > after && e.global_position <= up_to)
                .filter(|e| filter.matches(e))
                .cloned()
                .collect();
            found.sort_by_key(|e| e.global_position);
            found.truncate(usize::try_from(limit).unwrap());
            Box::pin(async move { Ok(found) })
        }
    }

    /// Hot storage holding `events` (sorted by version).
    struct Hot(Vec<RecordedEvent>);

    impl Hot {
        fn read(&self, read: ReadStream) -> EventStream {
            let events: Vec<RecordedEvent> = match read.direction {
                Direction::Forward => self
                    .0
                    .iter()
                    .filter(|e| e.stream_version >= read.from)
                    .cloned()
                    .collect(),
                Direction::Backward => self
                    .0
                    .iter()
                    .rev()
                    .filter(|e| e.stream_version <= read.from)
                    .cloned()
                    .collect(),
            };
            Box::pin(futures::stream::iter(events.into_iter().map(Ok)))
        }
    }

    impl HotFeed for Hot {
        fn head(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
            let head = self.0.last().map_or(0, |e| e.global_position);
            Box::pin(async move { Ok(head) })
        }
        fn page(
            &self,
            after: u64,
            count: u64,
        ) -> BoxFuture<'_, Result<Vec<RecordedEvent>, StoreError>> {
            let page = self
                .0
                .iter()
                .filter(|e| e.global_position > after)
                .take(usize::try_from(count).unwrap())
                .cloned()
                .collect();
            Box::pin(async move { Ok(page) })
        }
    }

    /// Versions 1 to 20; `cold` in the archive, `hot` in hot storage (both may hold a version).
    fn split(cold: RangeInclusive<u64>, hot: RangeInclusive<u64>) -> (Arc<Cold>, Arc<Hot>) {
        (
            Arc::new(Cold(Mutex::new(cold.map(event).collect()))),
            Arc::new(Hot(hot.map(event).collect())),
        )
    }

    async fn versions(cold: &Arc<Cold>, hot: &Hot, read: ReadStream, page: u64) -> Vec<u64> {
        let archive: Arc<dyn EventArchive> = cold.clone();
        merge_stream_read(
            hot.read(ReadStream {
                limit: None,
                ..read
            }),
            archive,
            stream(),
            read,
            page,
        )
        .map_ok(|e| e.stream_version)
        .try_collect()
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn stream_reads_fill_gaps_from_the_archive_once() {
        // Archived 1..=11, hot 8..=20: a crash left 8..=11 in both.
        for (cold, hot) in [(1..=7, 8..=20), (1..=11, 8..=20), (1..=19, 20..=20)] {
            let (cold, hot) = split(cold, hot);
            for page in [1, 3, 100] {
                let all: Vec<u64> = (1..=20).collect();
                let read = |r| versions(&cold, &hot, r, page);
                assert_eq!(read(ReadStream::forward()).await, all);
                assert_eq!(
                    read(ReadStream::forward().from(3).limit(4)).await,
                    [3, 4, 5, 6]
                );
                assert_eq!(read(ReadStream::forward().from(0)).await, all);
                assert_eq!(
                    read(ReadStream::forward().from(21)).await,
                    Vec::<u64>::new()
                );
                let back: Vec<u64> = (1..=20).rev().collect();
                assert_eq!(read(ReadStream::backward()).await, back);
                assert_eq!(read(ReadStream::backward().from(100)).await, back);
                assert_eq!(read(ReadStream::backward().from(5)).await, [5, 4, 3, 2, 1]);
                assert_eq!(read(ReadStream::backward().from(9).limit(2)).await, [9, 8]);
                assert_eq!(
                    read(ReadStream::backward().from(0)).await,
                    Vec::<u64>::new()
                );
            }
        }
        // A stream without events.
        let (cold, hot) = (Arc::new(Cold(Mutex::new(Vec::new()))), Hot(Vec::new()));
        assert!(versions(&cold, &hot, ReadStream::backward().from(5), 10)
            .await
            .is_empty());
    }

    #[tokio::test]
    async fn a_gap_in_neither_place_is_corrupt() {
        let (cold, hot) = split(1..=3, 8..=20);
        let archive: Arc<dyn EventArchive> = cold;
        let read = ReadStream::forward();
        let err = merge_stream_read(hot.read(read), archive, stream(), read, 10)
            .try_collect::<Vec<_>>()
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn feed_reads_merge_by_position_once_in_any_page_size() {
        for (cold, hot) in [(1..=7, 8..=20), (1..=11, 8..=20), (1..=19, 20..=20)] {
            let (cold, hot) = split(cold, hot);
            for page in [1, 2, 3, 7, 100] {
                for (filter, expect) in [
                    (EventFilter::all(), (1..=20).collect::<Vec<u64>>()),
                    (
                        EventFilter::all().event_type("Even"),
                        (1..=20).filter(|v| v % 2 == 0).collect(),
                    ),
                ] {
                    let archive: Arc<dyn EventArchive> = cold.clone();
                    let read = ReadAll::after(0).filter(filter.clone());
                    let got: Vec<u64> = merge_feed_read(hot.clone(), archive, 0, read, page)
                        .map_ok(|e| e.stream_version)
                        .try_collect()
                        .await
                        .unwrap();
                    assert_eq!(got, expect, "page {page}");
                    let archive: Arc<dyn EventArchive> = cold.clone();
                    let read = ReadAll::after(3 * 4).limit(5).filter(filter);
                    let got: Vec<u64> = merge_feed_read(hot.clone(), archive, 0, read, page)
                        .map_ok(|e| e.stream_version)
                        .try_collect()
                        .await
                        .unwrap();
                    let tail: Vec<u64> = expect.into_iter().filter(|v| *v > 4).take(5).collect();
                    assert_eq!(got, tail, "after position 12, page {page}");
                }
            }
        }
    }
}
