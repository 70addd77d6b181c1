//! Lazy, paged reads of a stream (`XRANGE`/`XREVRANGE`) and of a feed partition (`XRANGE`).

use std::sync::Arc;

use es_core::{Direction, EventStream, ReadAll, ReadStream, RecordedEvent, StoreError, StreamId};
use futures::TryStreamExt;

use crate::decode::{self, Source};
use crate::error::store_error;
use crate::script::query;
use crate::Inner;

/// Where the next page of a stream read starts; `None` once the read is complete.
#[derive(Debug, Clone, Copy)]
struct StreamCursor {
    next: Option<u64>,
    remaining: u64,
}

pub(crate) fn stream(inner: Arc<Inner>, stream: StreamId, read: ReadStream) -> EventStream {
    let key = inner.keys.events(&stream);
    let partition = inner.keys.partition_of(&stream);
    let start = match read.direction {
        Direction::Forward => Some(read.from),
        Direction::Backward => (read.from > 0).then_some(read.from),
    };
    let cursor = StreamCursor {
        next: start,
        remaining: read.limit.unwrap_or(u64::MAX),
    };
    let pages = futures::stream::try_unfold(cursor, move |cursor| {
        let inner = Arc::clone(&inner);
        let key = key.clone();
        let stream = stream.clone();
        async move {
            let Some(from) = cursor.next.filter(|_| cursor.remaining > 0) else {
                return Ok(None);
            };
            let count = cursor.remaining.min(inner.page_size);
            let mut cmd = match read.direction {
                Direction::Forward => {
                    let mut cmd = redis::cmd("XRANGE");
                    cmd.arg(&key).arg(from).arg("+");
                    cmd
                }
                Direction::Backward => {
                    let mut cmd = redis::cmd("XREVRANGE");
                    cmd.arg(&key);
                    if from == u64::MAX {
                        cmd.arg("+");
                    } else {
                        cmd.arg(from);
                    }
                    cmd.arg("-");
                    cmd
                }
            };
            cmd.arg("COUNT").arg(count);
            let mut conn = inner.conn.clone();
            let reply = query(&mut conn, &cmd)
                .await
                .map_err(|e| store_error(e, || format!("stream `{stream}`")))?;
            let mut page = decode::page(reply, Source::Stream(&stream))?;
            for event in &mut page {
                event.partition = partition;
            }
            let next = if (page.len() as u64) < count {
                None
            } else {
                page.last().and_then(|last| match read.direction {
                    Direction::Forward => last.stream_version.checked_add(1),
                    Direction::Backward => last.stream_version.checked_sub(1).filter(|v| *v > 0),
                })
            };
            let remaining = cursor.remaining - page.len() as u64;
            Ok(Some((page, StreamCursor { next, remaining })))
        }
    });
    flatten(pages)
}

/// Where the next page of a feed read starts.
#[derive(Debug, Clone, Copy)]
struct FeedCursor {
    after: Option<u64>,
    remaining: u64,
}

/// Reads feed partition `partition` (one the store has) as `read` asks.
pub(crate) fn all(inner: Arc<Inner>, partition: u32, read: ReadAll) -> EventStream {
    let Some(feed) = inner
        .keys
        .partition(partition)
        .map(|p| Arc::<str>::from(p.feed()))
    else {
        return es_core::contract::failed_read(StoreError::NoSuchPartition {
            partition,
            partitions: inner.keys.partitions(),
        });
    };
    let cursor = FeedCursor {
        after: Some(read.after),
        remaining: read.limit.unwrap_or(u64::MAX),
    };
    let filter = Arc::new(read.filter);
    let pages = futures::stream::try_unfold(cursor, move |cursor| {
        let inner = Arc::clone(&inner);
        let filter = Arc::clone(&filter);
        let feed = Arc::clone(&feed);
        async move {
            let Some(after) = cursor.after.filter(|_| cursor.remaining > 0) else {
                return Ok(None);
            };
            let Some(from) = after.checked_add(1) else {
                return Ok(None);
            };
            // Unfiltered reads fetch exactly what is still wanted; filtered ones scan full pages.
            let count = if filter.is_empty() {
                cursor.remaining.min(inner.page_size)
            } else {
                inner.page_size
            };
            let mut cmd = redis::cmd("XRANGE");
            cmd.arg(&*feed).arg(from).arg("+").arg("COUNT").arg(count);
            let mut conn = inner.conn.clone();
            let reply = query(&mut conn, &cmd)
                .await
                .map_err(|e| store_error(e, || crate::partition_location("feed", partition)))?;
            let entries = decode::entries(reply, Source::Feed)?;
            let scanned = entries.len() as u64;
            let last = entries.last().and_then(|(id, _)| decode::entry_number(id));
            let mut page: Vec<RecordedEvent> = Vec::with_capacity(entries.len());
            for (id, fields) in entries {
                if page.len() as u64 == cursor.remaining {
                    break;
                }
                let mut event = decode::event(&id, fields, Source::Feed)?;
                event.partition = partition;
                if filter.matches(&event) {
                    page.push(event);
                }
            }
            let remaining = cursor.remaining - page.len() as u64;
            let after = if scanned < count { None } else { last };
            Ok(Some((page, FeedCursor { after, remaining })))
        }
    });
    flatten(pages)
}

fn flatten(
    pages: impl futures::Stream<Item = Result<Vec<RecordedEvent>, StoreError>> + Send + 'static,
) -> EventStream {
    Box::pin(
        pages
            .map_ok(|page| futures::stream::iter(page.into_iter().map(Ok)))
            .try_flatten(),
    )
}
