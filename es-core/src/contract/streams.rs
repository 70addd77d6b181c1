//! Listing the streams a store holds: pages of stream ids with their versions, in stream-id
//! order, optionally only those starting with a prefix (a category, or the start of an id).
//!
//! What [`EventStore::list_streams`](super::EventStore::list_streams) answers. It is for
//! operators and tools (the `es` command line lists and searches streams with it), not for the
//! write path: each backend documents what a page costs.

use super::error::StoreError;
use crate::stream_id::{InvalidStreamId, StreamId};

/// Which streams to list, and how many at most.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListStreams {
    /// Only streams whose id starts with this text (empty: every stream). `order-` lists the
    /// category `order`; `order-12` the orders whose id starts with `12`.
    pub prefix: String,
    /// Only streams whose id sorts after this one (byte order): the `next` of the previous
    /// page. `None` starts at the first stream.
    pub after: Option<StreamId>,
    /// The most streams a page holds: 1 to [`ListStreams::MAX_LIMIT`] (a value outside is
    /// clamped into that range).
    pub limit: u64,
}

impl Default for ListStreams {
    fn default() -> Self {
        Self::all()
    }
}

impl ListStreams {
    /// The most streams one page holds.
    pub const MAX_LIMIT: u64 = 10_000;

    /// The default page size.
    pub const DEFAULT_LIMIT: u64 = 100;

    /// Every stream, from the first, [`DEFAULT_LIMIT`](Self::DEFAULT_LIMIT) per page.
    pub fn all() -> Self {
        Self {
            prefix: String::new(),
            after: None,
            limit: Self::DEFAULT_LIMIT,
        }
    }

    /// The streams of `category` (the prefix `<category>-`).
    pub fn category(category: &str) -> Self {
        Self::all().prefix(format!("{category}-"))
    }

    /// Only streams whose id starts with `prefix`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Only streams after `after` (the `next` of the previous page).
    pub fn after(mut self, after: StreamId) -> Self {
        self.after = Some(after);
        self
    }

    /// At most `limit` streams (clamped to 1 to [`MAX_LIMIT`](Self::MAX_LIMIT)).
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }

    /// The page size actually used: [`limit`](Self::limit) clamped to 1 to
    /// [`MAX_LIMIT`](Self::MAX_LIMIT).
    pub fn page_size(&self) -> u64 {
        self.limit.clamp(1, Self::MAX_LIMIT)
    }

    /// Checks the prefix: at most [`StreamId::MAX_LEN`] bytes of the characters a stream id may
    /// hold (ASCII letters, digits and `-_.:@+=~`), so every backend can use it in a key pattern
    /// or a range bound without escaping. Anything else is [`StoreError::InvalidStreamId`].
    pub fn validate(&self) -> Result<(), StoreError> {
        let reason = if self.prefix.len() > StreamId::MAX_LEN {
            Some("a stream-id prefix is at most 256 bytes")
        } else if !self.prefix.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'-' | b'_' | b'.' | b':' | b'@' | b'+' | b'=' | b'~')
        }) {
            Some("a stream-id prefix may hold only ASCII letters, digits and `-_.:@+=~`")
        } else {
            None
        };
        match reason {
            None => Ok(()),
            Some(reason) => Err(StoreError::InvalidStreamId(InvalidStreamId {
                input: self.prefix.chars().take(80).collect(),
                reason,
            })),
        }
    }

    /// Whether `stream` belongs in a page of this listing: it starts with the prefix and sorts
    /// after [`after`](Self::after).
    pub fn matches(&self, stream: &StreamId) -> bool {
        stream.as_str().starts_with(&self.prefix)
            && self
                .after
                .as_ref()
                .is_none_or(|after| stream.as_str() > after.as_str())
    }

    /// The exclusive upper bound of the ids starting with the prefix, in byte order: the prefix
    /// with its last byte raised by one (`None` for an empty prefix: no bound). Every byte a
    /// valid prefix holds is below `~`, the largest, or `~` itself, whose successor is still
    /// ASCII.
    pub fn upper_bound(&self) -> Option<String> {
        let mut bytes = self.prefix.as_bytes().to_vec();
        let last = bytes.pop()?;
        bytes.push(last + 1);
        String::from_utf8(bytes).ok()
    }

    /// Builds a page from `candidates` (streams with their versions, in any order, possibly
    /// more than a page and possibly with streams outside this listing): keeps the matching
    /// streams with events, sorts them, and cuts the page. For backends that cannot list in
    /// order themselves.
    pub fn page_of(&self, candidates: impl IntoIterator<Item = StreamSummary>) -> StreamPage {
        let mut streams: Vec<StreamSummary> = candidates
            .into_iter()
            .filter(|s| s.version > 0 && self.matches(&s.stream_id))
            .collect();
        streams.sort_by(|a, b| a.stream_id.as_str().cmp(b.stream_id.as_str()));
        streams.dedup_by(|a, b| a.stream_id == b.stream_id);
        StreamPage::cut(streams, self.page_size())
    }
}

/// A stream and its version, as a listing returns it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamSummary {
    /// The stream.
    pub stream_id: StreamId,
    /// Its version (the number of its events) when it was listed: at least 1.
    pub version: u64,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamPage {
    /// The streams, in stream-id (byte) order.
    pub streams: Vec<StreamSummary>,
    /// Where the next page starts ([`ListStreams::after`]); `None` when this is the last page.
    pub next: Option<StreamId>,
}

impl StreamPage {
    /// The first `limit` of `sorted` (in order, one entry per stream), with `next` set if more
    /// remain.
    pub fn cut(mut sorted: Vec<StreamSummary>, limit: u64) -> Self {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let next = if sorted.len() > limit {
            sorted.truncate(limit);
            sorted.last().map(|s| s.stream_id.clone())
        } else {
            None
        };
        Self {
            streams: sorted,
            next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(id: &str, version: u64) -> StreamSummary {
        StreamSummary {
            stream_id: StreamId::parse(id).unwrap(),
            version,
        }
    }

    #[test]
    fn prefixes_are_checked_and_bounded() {
        assert!(ListStreams::category("order").validate().is_ok());
        for bad in ["order-*", "a b", "x{y}", "ü", "a?", "[a]"] {
            let err = ListStreams::all().prefix(bad).validate().unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidStreamId(_)),
                "{bad}: {err}"
            );
        }
        assert!(ListStreams::all()
            .prefix("a".repeat(257))
            .validate()
            .is_err());
        assert_eq!(
            ListStreams::category("order").upper_bound().unwrap(),
            "order."
        );
        assert_eq!(
            ListStreams::all().prefix("a~").upper_bound().unwrap(),
            "a\u{7f}"
        );
        assert_eq!(ListStreams::all().upper_bound(), None);
    }

    #[test]
    fn pages_are_sorted_filtered_and_cut() {
        let list = ListStreams::category("order").limit(2);
        let page = list.page_of([
            summary("order-3", 1),
            summary("order-1", 4),
            summary("orders-9", 1),
            summary("account-1", 1),
            summary("order-2", 0),
            summary("order-10", 2),
        ]);
        let ids: Vec<&str> = page.streams.iter().map(|s| s.stream_id.as_str()).collect();
        assert_eq!(ids, ["order-1", "order-10"]);
        assert_eq!(page.next.as_ref().unwrap().as_str(), "order-10");
        let rest = list.clone().after(page.next.unwrap()).page_of([
            summary("order-3", 1),
            summary("order-1", 4),
            summary("order-10", 2),
        ]);
        assert_eq!(rest.streams, [summary("order-3", 1)]);
        assert_eq!(rest.next, None);
        assert_eq!(ListStreams::all().limit(0).page_size(), 1);
        assert_eq!(
            ListStreams::all().limit(u64::MAX).page_size(),
            ListStreams::MAX_LIMIT
        );
    }
}
