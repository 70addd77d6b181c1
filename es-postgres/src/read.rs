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

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use es_core::{Direction, EventStream, ReadAll, ReadStream, RecordedEvent, StoreError, StreamId};
use futures::{Stream, TryStreamExt};
use sqlx::postgres::PgPool;
use sqlx::AssertSqlSafe;
use tokio::task::JoinHandle;

use crate::codec::{decode_event, to_i64, EventColumns};
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
        direction: Direction,
        /// The next version to read (inclusive).
        next: u64,
    },
    All {
        after: u64,
        categories: Arc<[String]>,
        types: Arc<[String]>,
    },
}

impl Cursor {
    /// The cursor after `last`, or `None` when nothing can follow it.
    fn after(&self, last: &RecordedEvent) -> Option<Self> {
        let mut next = self.clone();
        match &mut next {
            Cursor::Stream {
                direction: Direction::Forward,
                next,
                ..
            } => *next = last.stream_version.checked_add(1)?,
            Cursor::Stream {
                direction: Direction::Backward,
                next,
                ..
            } => *next = last.stream_version.checked_sub(1).filter(|v| *v > 0)?,
            Cursor::All { after, .. } => *after = last.global_position,
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

/// A page being fetched in the background.
struct Ahead {
    task: Prefetch,
    start: Cursor,
    rows: u64,
}

/// One page request.
struct Page {
    pool: PgPool,
    sql: Arc<Sql>,
    cursor: Cursor,
    rows: u64,
    timeout: Duration,
}

type PageResult = Result<Vec<RecordedEvent>, StoreError>;

/// Aborts the prefetch when the read is dropped.
struct Prefetch(JoinHandle<PageResult>);

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Reader {
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
    buffer: std::vec::IntoIter<RecordedEvent>,
    /// Pages requested and not yet consumed, in order (at most two).
    ahead: VecDeque<Ahead>,
}

pub(crate) fn read_stream(
    pool: PgPool,
    sql: Arc<Sql>,
    timeout: Duration,
    stream: StreamId,
    read: ReadStream,
) -> EventStream {
    let cursor =
        (read.direction == Direction::Forward || read.from > 0).then_some(Cursor::Stream {
            stream,
            direction: read.direction,
            next: read.from,
        });
    reader(pool, sql, timeout, cursor, read.limit)
}

pub(crate) fn read_all(
    pool: PgPool,
    sql: Arc<Sql>,
    timeout: Duration,
    read: ReadAll,
) -> EventStream {
    let cursor = Cursor::All {
        after: read.after,
        categories: read.filter.categories.into(),
        types: read.filter.event_types.into(),
    };
    reader(pool, sql, timeout, Some(cursor), read.limit)
}

fn reader(
    pool: PgPool,
    sql: Arc<Sql>,
    timeout: Duration,
    cursor: Option<Cursor>,
    limit: Option<u64>,
) -> EventStream {
    Box::pin(Reader {
        pool,
        sql,
        timeout,
        cursor,
        remaining: limit.unwrap_or(u64::MAX),
        page_rows: FIRST_PAGE,
        max_rows: MAX_PAGE,
        buffer: Vec::new().into_iter(),
        ahead: VecDeque::new(),
    })
}

/// Hands out the buffered page event by event, without an allocation or a future per event;
/// between pages it waits for the page fetched in the background.
impl Stream for Reader {
    type Item = Result<RecordedEvent, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(event) = this.buffer.next() {
                return Poll::Ready(Some(Ok(event)));
            }
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
                Ok(page) => this.take_page(page, &start, rows),
                Err(err) => {
                    this.cursor = None;
                    this.ahead.clear();
                    return Poll::Ready(Some(Err(err)));
                }
            }
        }
    }
}

impl Reader {
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
            sql: Arc::clone(&self.sql),
            cursor: cursor.clone(),
            rows,
            timeout: self.timeout,
        };
        self.ahead.push_back(Ahead {
            task: Prefetch(tokio::spawn(timed(page.timeout, page.fetch()))),
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

    /// Takes a fetched page of the `rows` requested at `start` into the buffer, and works out
    /// where the read goes on.
    fn take_page(&mut self, page: Vec<RecordedEvent>, start: &Cursor, rows: u64) {
        let got = page.len() as u64;
        let next = match page.last() {
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
        let bytes: u64 = page.iter().map(|e| e.payload.len() as u64 + 128).sum();
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
        self.buffer = page.into_iter();
    }
}

impl Page {
    async fn fetch(self) -> PageResult {
        let limit = to_i64(self.rows);
        let query = match &self.cursor {
            Cursor::Stream {
                stream,
                direction,
                next,
            } => {
                let sql = match direction {
                    Direction::Forward => &self.sql.stream_forward,
                    Direction::Backward => &self.sql.stream_backward,
                };
                sqlx::query(AssertSqlSafe(Arc::clone(sql)))
                    .bind(stream.as_str())
                    .bind(to_i64(*next))
                    .bind(limit)
            }
            Cursor::All {
                after,
                categories,
                types,
            } => {
                let sql = match (categories.is_empty(), types.is_empty()) {
                    (true, true) => &self.sql.all,
                    (false, true) => &self.sql.all_categories,
                    (true, false) => &self.sql.all_types,
                    (false, false) => &self.sql.all_both,
                };
                let mut query = sqlx::query(AssertSqlSafe(Arc::clone(sql)))
                    .bind(to_i64(*after))
                    .bind(limit);
                if !categories.is_empty() {
                    query = query.bind(&categories[..]);
                }
                if !types.is_empty() {
                    query = query.bind(&types[..]);
                }
                query
            }
        };
        let mut rows = query.fetch(&self.pool);
        let mut page = Vec::with_capacity(self.rows.min(MAX_PAGE) as usize);
        let mut columns = None;
        while let Some(row) = rows.try_next().await.map_err(store_error)? {
            let columns = match columns {
                Some(columns) => columns,
                None => *columns.insert(EventColumns::find(&row)?),
            };
            page.push(decode_event(&row, &columns)?);
        }
        Ok(page)
    }
}
