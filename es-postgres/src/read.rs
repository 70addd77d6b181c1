//! Lazy, paged reads with keyset pagination.
//!
//! A read runs one short query per page (`... AND stream_version >= $next ORDER BY .. LIMIT n`),
//! so a huge stream never sits in memory and no transaction stays open while the caller consumes
//! events. While the caller consumes one page, the next one is already being fetched. Pages start
//! small (a snapshot load usually reads a few events) and grow up to [`MAX_PAGE`] rows or about
//! [`PAGE_BYTES`] of payload.
//!
//! Stream reads know where the next page starts before the current one arrives (versions are
//! dense), so they keep two pages in flight; `read_all` learns it from the page's last event
//! (positions have gaps where appends failed after their allocation).
//!
//! A page of `read_all` is read by the schema's function `read_feed` (migration 8), which plans
//! it as one ordered index range scan from the cursor to the page's last event whatever the
//! table's statistics: a plain query on a table not analyzed yet was planned as a bitmap scan of
//! everything after the cursor plus a sort, so each page cost the rest of the feed.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use es_core::{
    Direction, EventPage, EventPages, EventStream, ReadAll, ReadStream, RecordedEvent, StoreError,
    StreamId,
};
use futures::{Stream, TryStreamExt};
use sqlx::postgres::{PgPool, PgRow};
use sqlx::AssertSqlSafe;
use tokio::task::JoinHandle;

use crate::codec::{decode_event, to_i64, EventColumns, RowPage, Rows};
use crate::error::{store_error, timed};
use crate::schema::Sql;

/// Rows in the first page of a read.
const FIRST_PAGE: u64 = 512;
/// Most rows in one page.
const MAX_PAGE: u64 = 10_000;
/// Target payload bytes per page once the event size is known.
const PAGE_BYTES: u64 = 8 << 20;

/// Where the next page starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cursor {
    Stream {
        stream: StreamId,
        /// The stream's partition (what its events report).
        partition: u32,
        direction: Direction,
        /// The next version to read (inclusive).
        next: u64,
    },
    All {
        partition: u32,
        after: u64,
        categories: Arc<[String]>,
        types: Arc<[String]>,
    },
}

impl Cursor {
    /// The cursor after the last event of a page (`Last`), or `None` when nothing can follow it.
    fn after(&self, last: Last) -> Option<Self> {
        let mut next = self.clone();
        match (&mut next, last) {
            (
                Cursor::Stream {
                    direction: Direction::Forward,
                    next,
                    ..
                },
                Last::Version(version),
            ) => *next = version.checked_add(1)?,
            (
                Cursor::Stream {
                    direction: Direction::Backward,
                    next,
                    ..
                },
                Last::Version(version),
            ) => *next = version.checked_sub(1).filter(|v| *v > 0)?,
            (Cursor::All { after, .. }, Last::Position(position)) => *after = position,
            _ => return None,
        }
        Some(next)
    }
}

impl Cursor {
    /// The start of the page after a full page of `rows` from here, when it is known without
    /// reading the page: stream versions are dense, global positions are not.
    fn skip(&self, rows: u64) -> Option<Self> {
        let mut next = self.clone();
        match &mut next {
            Cursor::Stream {
                direction: Direction::Forward,
                next,
                ..
            } => *next = (*next).max(1).checked_add(rows)?,
            Cursor::Stream {
                direction: Direction::Backward,
                next,
                ..
            } => {
                // A backward read from "the end" (u64::MAX) learns where the end is from its
                // first page.
                if *next >= i64::MAX as u64 {
                    return None;
                }
                *next = next.checked_sub(rows).filter(|v| *v > 0)?;
            }
            Cursor::All { .. } => return None,
        }
        Some(next)
    }
}

/// Where the last event of a page was: what the cursor after it needs.
#[derive(Debug, Clone, Copy)]
enum Last {
    Version(u64),
    Position(u64),
}

/// What a page fetch makes of the rows of its query: decoded envelopes for `read_stream` and
/// `read_all`, the rows themselves for a load.
trait Fetched: Sized + Send + 'static {
    /// An empty page for at most `rows` rows of the read at `cursor`.
    fn with_capacity(cursor: &Cursor, rows: usize) -> Self;
    /// The query that reads a page at `cursor`.
    fn sql(sql: &Sql, cursor: &Cursor) -> Arc<str>;
    /// Adds the next row.
    fn push(&mut self, row: PgRow) -> Result<(), StoreError>;
    fn len(&self) -> usize;
    /// Where the last event is, if the page has one (and it is readable).
    fn last(&self, cursor: &Cursor) -> Option<Last>;
    /// Payload bytes in the page.
    fn payload_bytes(&self) -> u64;
}

/// Decoded envelopes: a page of `read_stream` or `read_all`.
struct Envelopes {
    events: Vec<RecordedEvent>,
    columns: Option<EventColumns>,
    /// The partition of every event of the page.
    partition: u32,
}

impl Cursor {
    fn partition(&self) -> u32 {
        match self {
            Cursor::Stream { partition, .. } | Cursor::All { partition, .. } => *partition,
        }
    }
}

impl Fetched for Envelopes {
    fn with_capacity(cursor: &Cursor, rows: usize) -> Self {
        Self {
            events: Vec::with_capacity(rows),
            columns: None,
            partition: cursor.partition(),
        }
    }

    fn sql(sql: &Sql, cursor: &Cursor) -> Arc<str> {
        let sql = match cursor {
            Cursor::Stream {
                direction: Direction::Forward,
                ..
            } => &sql.stream_forward,
            Cursor::Stream {
                direction: Direction::Backward,
                ..
            } => &sql.stream_backward,
            Cursor::All { .. } => &sql.all,
        };
        Arc::clone(sql)
    }

    fn push(&mut self, row: PgRow) -> Result<(), StoreError> {
        let columns = match self.columns {
            Some(columns) => columns,
            None => *self.columns.insert(EventColumns::find(&row)?),
        };
        let mut event = decode_event(&row, &columns)?;
        event.partition = self.partition;
        self.events.push(event);
        Ok(())
    }

    fn len(&self) -> usize {
        self.events.len()
    }

    fn last(&self, cursor: &Cursor) -> Option<Last> {
        let last = self.events.last()?;
        Some(match cursor {
            Cursor::Stream { .. } => Last::Version(last.stream_version),
            Cursor::All { .. } => Last::Position(last.global_position),
        })
    }

    fn payload_bytes(&self) -> u64 {
        self.events.iter().map(|e| e.payload.len() as u64).sum()
    }
}

impl Fetched for Rows {
    fn with_capacity(_: &Cursor, rows: usize) -> Self {
        Rows::with_capacity(rows)
    }

    fn sql(sql: &Sql, cursor: &Cursor) -> Arc<str> {
        match cursor {
            Cursor::Stream {
                direction: Direction::Backward,
                ..
            } => Arc::clone(&sql.load_backward),
            // Rows are read for stream reads only (`read_stream_pages`).
            _ => Arc::clone(&sql.load_forward),
        }
    }

    fn push(&mut self, row: PgRow) -> Result<(), StoreError> {
        Rows::push(self, row)
    }

    fn len(&self) -> usize {
        Rows::len(self)
    }

    fn last(&self, _: &Cursor) -> Option<Last> {
        self.last_version().map(Last::Version)
    }

    fn payload_bytes(&self) -> u64 {
        Rows::payload_bytes(self)
    }
}

/// A page being fetched in the background.
struct Ahead<P> {
    task: Prefetch<P>,
    start: Cursor,
    rows: u64,
}

/// One page request.
struct Page {
    pool: PgPool,
    sql: Arc<str>,
    cursor: Cursor,
    rows: u64,
    timeout: Duration,
}

/// Aborts the prefetch when the read is dropped.
struct Prefetch<P>(JoinHandle<Result<P, StoreError>>);

impl<P> Drop for Prefetch<P> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Pages of a read, fetched ahead in the background.
struct Reader<P> {
    pool: PgPool,
    sql: Arc<Sql>,
    /// The client-side time-out of one page.
    timeout: Duration,
    /// Where the next page not yet requested starts; `None` once the end is reached.
    cursor: Option<Cursor>,
    /// Events not yet requested.
    remaining: u64,
    page_rows: u64,
    /// The largest page for the event sizes seen so far.
    max_rows: u64,
    /// Pages requested and not yet consumed, in order (at most two).
    ahead: VecDeque<Ahead<P>>,
}

/// The events of a read, one by one, from the pages of a [`Reader`].
struct Events {
    pages: Reader<Envelopes>,
    buffer: std::vec::IntoIter<RecordedEvent>,
}

fn stream_cursor(stream: StreamId, partition: u32, read: ReadStream) -> Option<Cursor> {
    (read.direction == Direction::Forward || read.from > 0).then_some(Cursor::Stream {
        stream,
        partition,
        direction: read.direction,
        next: read.from,
    })
}

pub(crate) fn read_stream(
    pool: PgPool,
    sql: Arc<Sql>,
    timeout: Duration,
    stream: StreamId,
    partition: u32,
    read: ReadStream,
) -> EventStream {
    events(Reader::new(
        pool,
        sql,
        timeout,
        stream_cursor(stream, partition, read),
        read.limit,
    ))
}

/// The pages of a stream read as rows, for a load (see [`RowPage`]).
pub(crate) fn read_stream_pages(
    pool: PgPool,
    sql: Arc<Sql>,
    timeout: Duration,
    stream: StreamId,
    read: ReadStream,
) -> EventPages {
    // A load reads no envelope, so the partition plays no part.
    let cursor = stream_cursor(stream.clone(), 0, read);
    let reader: Reader<Rows> = Reader::new(pool, sql, timeout, cursor, read.limit);
    Box::pin(reader.map_ok(move |rows| -> Box<dyn EventPage> {
        Box::new(RowPage {
            stream_id: stream.clone(),
            rows,
        })
    }))
}

pub(crate) fn read_all(
    pool: PgPool,
    sql: Arc<Sql>,
    timeout: Duration,
    partition: u32,
    read: ReadAll,
) -> EventStream {
    let cursor = Cursor::All {
        partition,
        after: read.after,
        categories: read.filter.categories.into(),
        types: read.filter.event_types.into(),
    };
    events(Reader::new(pool, sql, timeout, Some(cursor), read.limit))
}

fn events(pages: Reader<Envelopes>) -> EventStream {
    Box::pin(Events {
        pages,
        buffer: Vec::new().into_iter(),
    })
}

/// Hands out the buffered page event by event, without an allocation or a future per event;
/// between pages it waits for the page fetched in the background.
impl Stream for Events {
    type Item = Result<RecordedEvent, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(event) = this.buffer.next() {
                return Poll::Ready(Some(Ok(event)));
            }
            match ready!(Pin::new(&mut this.pages).poll_next(cx)) {
                Some(Ok(page)) => this.buffer = page.events.into_iter(),
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => return Poll::Ready(None),
            }
        }
    }
}

/// Between pages, waits for the page fetched in the background.
impl<P: Fetched> Stream for Reader<P> {
    type Item = Result<P, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            this.request_pages();
            let Some(front) = this.ahead.front_mut() else {
                return Poll::Ready(None);
            };
            let fetched = ready!(Pin::new(&mut front.task.0).poll(cx));
            let Some(Ahead { start, rows, .. }) = this.ahead.pop_front() else {
                return Poll::Ready(None);
            };
            let page = fetched
                .map_err(|e| StoreError::backend(format!("page fetch failed: {e}")))
                .and_then(|page| page);
            match page {
                // An empty page ends the read (`take_page` leaves no cursor).
                Ok(page) if page.len() == 0 => this.take_page(&page, &start, rows),
                Ok(page) => {
                    this.take_page(&page, &start, rows);
                    return Poll::Ready(Some(Ok(page)));
                }
                Err(err) => {
                    this.cursor = None;
                    this.ahead.clear();
                    return Poll::Ready(Some(Err(err)));
                }
            }
        }
    }
}

impl<P: Fetched> Reader<P> {
    fn new(
        pool: PgPool,
        sql: Arc<Sql>,
        timeout: Duration,
        cursor: Option<Cursor>,
        limit: Option<u64>,
    ) -> Self {
        Self {
            pool,
            sql,
            timeout,
            cursor,
            remaining: limit.unwrap_or(u64::MAX),
            page_rows: FIRST_PAGE,
            max_rows: MAX_PAGE,
            ahead: VecDeque::new(),
        }
    }

    /// Starts fetching the page at `cursor` in the background.
    fn spawn(&mut self, cursor: Cursor) {
        let rows = self.remaining.min(self.page_rows);
        if rows == 0 {
            return;
        }
        self.remaining -= rows;
        self.cursor = cursor.skip(rows);
        // Grow the pages of a long read quickly; a page's size caps the growth by bytes.
        self.page_rows = (self.page_rows * 4).min(self.max_rows);
        let page = Page {
            pool: self.pool.clone(),
            sql: P::sql(&self.sql, &cursor),
            cursor: cursor.clone(),
            rows,
            timeout: self.timeout,
        };
        self.ahead.push_back(Ahead {
            task: Prefetch(tokio::spawn(timed(page.timeout, page.fetch::<P>()))),
            start: cursor,
            rows,
        });
    }

    /// Makes sure the next page is requested, and the one after it too when its start is known
    /// without reading the next one (stream reads). Does nothing when both are requested
    /// already, so it may run again after the caller was told to wait.
    fn request_pages(&mut self) {
        if self.ahead.is_empty() {
            if let Some(cursor) = self.cursor.take() {
                self.spawn(cursor);
            }
        }
        if self.ahead.len() == 1 {
            if let Some(cursor) = self.cursor.take() {
                self.spawn(cursor);
            }
        }
    }

    /// Takes in a fetched page of the `rows` requested at `start`, and works out where the read
    /// goes on.
    fn take_page(&mut self, page: &P, start: &Cursor, rows: u64) {
        let got = page.len() as u64;
        let next = match page.last(start) {
            Some(last) if got == rows => start.after(last),
            _ => None,
        };
        match (&next, self.ahead.front()) {
            // The speculative page starts where this one ended: keep it.
            (Some(next), Some(ahead)) if ahead.start == *next => {}
            _ => {
                // This page ended the read, or the speculative page started elsewhere (a gap
                // in versions): drop what was requested after it and go on from its end.
                for dropped in self.ahead.drain(..) {
                    self.remaining += dropped.rows;
                }
                self.remaining += rows - got;
                self.cursor = next;
            }
        }
        let bytes = page.payload_bytes() + 128 * got;
        if let Some(per_event) = bytes.checked_div(got) {
            self.max_rows = (PAGE_BYTES / per_event.max(1)).clamp(16, MAX_PAGE);
            self.page_rows = self.page_rows.min(self.max_rows);
        }
        // Keep the following page in flight while the caller consumes this one.
        if self.ahead.is_empty() {
            if let Some(cursor) = self.cursor.take() {
                self.spawn(cursor);
            }
        }
    }
}

impl Page {
    async fn fetch<P: Fetched>(self) -> Result<P, StoreError> {
        let limit = to_i64(self.rows);
        let query = match &self.cursor {
            Cursor::Stream { stream, next, .. } => sqlx::query(AssertSqlSafe(self.sql))
                .bind(stream.as_str())
                .bind(to_i64(*next))
                .bind(limit),
            Cursor::All {
                partition,
                after,
                categories,
                types,
            } => sqlx::query(AssertSqlSafe(self.sql))
                .bind(partition_param(*partition))
                .bind(to_i64(*after))
                .bind(limit)
                .bind(filter(categories))
                .bind(filter(types)),
        };
        let mut rows = query.fetch(&self.pool);
        let mut page = P::with_capacity(&self.cursor, self.rows.min(MAX_PAGE) as usize);
        while let Some(row) = rows.try_next().await.map_err(store_error)? {
            page.push(row)?;
        }
        Ok(page)
    }
}

/// A filter of `read_feed`: `NULL` for none.
fn filter(values: &[String]) -> Option<&[String]> {
    (!values.is_empty()).then_some(values)
}

/// A partition as an `integer` parameter (partitions are below
/// [`MAX_PARTITIONS`](es_core::contract::MAX_PARTITIONS)).
pub(crate) fn partition_param(partition: u32) -> i32 {
    i32::try_from(partition).unwrap_or(i32::MAX)
}
