//! One stream's events, kept in shared segments: a load borrows a page of them by sharing its
//! segment, without copying, or even touching, each event.

use std::ops::Range;
use std::sync::Arc;

use es_core::{Direction, EventPage, RecordedEvent, RecordedEventRef, StoreError};

/// Events per segment: the most a page of [`StreamEvents::page`] holds.
const SEGMENT: usize = 512;

type Segment = Arc<Vec<Arc<RecordedEvent>>>;

/// The events of one stream, in version order. The event at version `v` is at index `v - 1`:
/// in segment `(v - 1) / SEGMENT`, at `(v - 1) % SEGMENT`. Every segment but the last is full;
/// the last one grows by [`push`](StreamEvents::push), copied first only if a page still shares
/// it.
#[derive(Default)]
pub(crate) struct StreamEvents {
    segments: Vec<Segment>,
    len: usize,
}

impl StreamEvents {
    /// How many events the stream has: its version.
    pub(crate) fn len(&self) -> u64 {
        self.len as u64
    }

    /// Adds the event after the last one.
    pub(crate) fn push(&mut self, event: Arc<RecordedEvent>) {
        match self.segments.last_mut() {
            Some(last) if last.len() < SEGMENT => Arc::make_mut(last).push(event),
            _ => self.segments.push(Arc::new(vec![event])),
        }
        self.len += 1;
    }

    /// The event at index `i` (version `i + 1`), below [`len`](StreamEvents::len).
    fn get(&self, i: usize) -> &Arc<RecordedEvent> {
        &self.segments[i / SEGMENT][i % SEGMENT]
    }

    /// The indices of up to `take` events from version `cursor` on in `direction`, all in one
    /// segment when `one_segment`; moves `cursor` past them. `None` when there is none.
    fn range(
        &self,
        direction: Direction,
        cursor: &mut u64,
        take: usize,
        one_segment: bool,
    ) -> Option<Range<usize>> {
        let len = self.len as u64;
        let take = take as u64;
        match direction {
            Direction::Forward => {
                let first = (*cursor).max(1);
                if first > len || take == 0 {
                    return None;
                }
                let mut end = len.min(first - 1 + take);
                if one_segment {
                    end = end.min((first - 1) / SEGMENT as u64 * SEGMENT as u64 + SEGMENT as u64);
                }
                *cursor = end + 1;
                Some((first - 1) as usize..end as usize)
            }
            Direction::Backward => {
                let last = (*cursor).min(len);
                if last == 0 || take == 0 {
                    return None;
                }
                let mut start = last.saturating_sub(take);
                if one_segment {
                    start = start.max((last - 1) / SEGMENT as u64 * SEGMENT as u64);
                }
                *cursor = start;
                Some(start as usize..last as usize)
            }
        }
    }

    /// Copies out up to `take` events from version `cursor` on in `direction`, each by `copy`,
    /// moving `cursor` past them. Returns them and whether the stream has nothing after them.
    pub(crate) fn copy<T>(
        &self,
        direction: Direction,
        cursor: &mut u64,
        take: usize,
        copy: impl Fn(&Arc<RecordedEvent>) -> T,
    ) -> (Vec<T>, bool) {
        let Some(range) = self.range(direction, cursor, take, false) else {
            return (Vec::new(), true);
        };
        let page = match direction {
            Direction::Forward => range.map(|i| copy(self.get(i))).collect(),
            Direction::Backward => range.rev().map(|i| copy(self.get(i))).collect(),
        };
        (page, self.ended(direction, *cursor))
    }

    /// Up to `take` events from version `cursor` on in `direction`, all from one segment, which
    /// the page shares; moves `cursor` past them. Returns the page, if there is an event there,
    /// and whether the stream has nothing after it.
    pub(crate) fn page(
        &self,
        direction: Direction,
        cursor: &mut u64,
        take: usize,
    ) -> (Option<SharedPage>, bool) {
        let Some(range) = self.range(direction, cursor, take, true) else {
            return (None, true);
        };
        let segment = range.start / SEGMENT;
        let offset = segment * SEGMENT;
        let page = SharedPage {
            segment: Arc::clone(&self.segments[segment]),
            range: range.start - offset..range.end - offset,
            backward: direction == Direction::Backward,
        };
        (Some(page), self.ended(direction, *cursor))
    }

    fn ended(&self, direction: Direction, cursor: u64) -> bool {
        match direction {
            Direction::Forward => cursor > self.len as u64,
            Direction::Backward => cursor == 0,
        }
    }
}

/// Events of one segment, lent out in place.
pub(crate) struct SharedPage {
    segment: Segment,
    range: Range<usize>,
    /// Newest first.
    backward: bool,
}

impl EventPage for SharedPage {
    fn len(&self) -> usize {
        self.range.len()
    }

    fn event(&self, index: usize) -> Result<RecordedEventRef<'_>, StoreError> {
        let at = if self.backward {
            self.range.end - 1 - index
        } else {
            self.range.start + index
        };
        Ok(self.segment[at].borrowed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_core::StreamId;

    fn stream(n: usize) -> StreamEvents {
        let id = StreamId::new("t", "s").unwrap();
        let mut events = StreamEvents::default();
        for v in 1..=n as u64 {
            events.push(Arc::new(RecordedEvent {
                event_id: uuid::Uuid::new_v4(),
                stream_id: id.clone(),
                stream_version: v,
                global_position: v,
                partition: 0,
                event_type: "E".to_owned(),
                schema_version: 1,
                payload: bytes::Bytes::from_static(b"{}"),
                metadata: es_core::Metadata::default(),
                recorded_at: chrono::Utc::now(),
            }));
        }
        events
    }

    /// Reads every page from `cursor` on; returns the versions in order.
    fn pages(
        events: &StreamEvents,
        direction: Direction,
        mut cursor: u64,
        take: usize,
    ) -> Vec<u64> {
        let mut versions = Vec::new();
        loop {
            let (page, end) = events.page(direction, &mut cursor, take);
            if let Some(page) = page {
                assert!(page.len() <= take.min(SEGMENT) && !page.is_empty());
                for i in 0..page.len() {
                    versions.push(page.event(i).unwrap().stream_version);
                }
            }
            if end {
                return versions;
            }
        }
    }

    #[test]
    fn pages_cover_every_version_once_in_order() {
        for n in [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT + 7] {
            let events = stream(n);
            for take in [1, 7, SEGMENT, 10_000] {
                for from in [0, 1, 2, SEGMENT as u64, SEGMENT as u64 + 1] {
                    let forward = pages(&events, Direction::Forward, from, take);
                    let expected: Vec<u64> = (from.max(1)..=n as u64).collect();
                    assert_eq!(forward, expected, "n {n} take {take} from {from}");
                    let backward = pages(&events, Direction::Backward, from, take);
                    let expected: Vec<u64> = (1..=from.min(n as u64)).rev().collect();
                    assert_eq!(backward, expected, "n {n} take {take} from {from} backward");
                }
                let (copied, end) =
                    events.copy(Direction::Forward, &mut 1, take, |e| e.stream_version);
                assert_eq!(copied, (1..=(take.min(n)) as u64).collect::<Vec<_>>());
                assert_eq!(end, take >= n);
            }
        }
    }

    #[test]
    fn a_shared_segment_is_copied_before_it_grows() {
        let mut events = stream(3);
        let (page, _) = events.page(Direction::Forward, &mut 1, 10);
        let page = page.unwrap();
        events.push(Arc::clone(events.get(0)));
        // The page still sees the three events it was given; the stream has four.
        assert_eq!(page.len(), 3);
        assert_eq!(page.segment.len(), 3);
        assert_eq!(events.len(), 4);
    }
}
