//! The in-memory store as an oracle for property tests of other backends.
//!
//! [`ops`] generates random operation sequences: appends with every expected-version mode,
//! exact retries and partly overlapping batches, stream reads in both directions with limits,
//! filtered global reads, version and head queries, and snapshot writes and reads.
//! [`check_against_memory`] runs a sequence on the backend under test and on a fresh
//! [`InMemoryStore`] and compares every result.
//!
//! Global positions need not be dense, so positions are compared by what they point at: the
//! `k`-th event of the global feed in each store. Timestamps come from each store's clock and are
//! only checked for being non-decreasing.
//!
//! A backend runs it with [`property_tests!`](crate::property_tests), one proptest test per
//! backend:
//!
//! ```no_run
//! es_testkit::property_tests!(matches_the_in_memory_store, || async { es_memory::InMemoryStore::new() }, cases = 48);
//! ```

use std::collections::HashMap;
use std::fmt;

use bytes::Bytes;
use es_core::{
    AppendRequest, AppendResult, EventFilter, EventStore, ExpectedVersion, NewEvent, ReadAll,
    ReadStream, RecordedEvent, SnapshotRecord, SnapshotStore, StoreError, StreamId,
};
use futures::TryStreamExt;
use proptest::prelude::*;
use uuid::Uuid;

use es_memory::InMemoryStore;

const STREAMS: [&str; 5] = ["order-1", "order-2", "payment-1", "payment-x:y", "audit-1"];
const CATEGORIES: [&str; 3] = ["order", "payment", "audit"];
const TYPES: [&str; 3] = ["Placed", "Paid", "Noted"];

/// An expected version, possibly relative to the stream's current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// `ExpectedVersion::Any`.
    Any,
    /// `ExpectedVersion::NoStream`.
    NoStream,
    /// `ExpectedVersion::StreamExists`.
    StreamExists,
    /// `Exact(current)`: the right version.
    Current,
    /// `Exact(current + d)`, `d` in -2..=2 and not 0 unless the result would underflow.
    Off(i8),
}

/// Which events an append sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// `n` new events.
    New(u8),
    /// The exact batch of an earlier append (an idempotent retry when it was stored).
    Retry(u8),
    /// Some events of an earlier append plus `n` new ones (a partial overlap).
    Overlap(u8, u8),
}

/// One operation of a generated sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Append to `STREAMS[stream]`.
    Append {
        /// Stream index.
        stream: u8,
        /// Expected version.
        expect: Expect,
        /// Events.
        batch: Batch,
    },
    /// Read a stream.
    ReadStream {
        /// Stream index.
        stream: u8,
        /// Forward or backward.
        forward: bool,
        /// Start version.
        from: u8,
        /// Limit.
        limit: Option<u8>,
    },
    /// Read the feed after the `after`-th event (0 = from the start).
    ReadAll {
        /// Number of feed events to skip.
        after: u8,
        /// Limit.
        limit: Option<u8>,
        /// Category filter index, if any.
        category: Option<u8>,
        /// Event type filter index, if any.
        event_type: Option<u8>,
    },
    /// Ask a stream's version.
    Version {
        /// Stream index.
        stream: u8,
    },
    /// Ask the head position.
    Head,
    /// Save a snapshot.
    SaveSnapshot {
        /// Stream index.
        stream: u8,
        /// Its version.
        version: u8,
    },
    /// Load a snapshot.
    LoadSnapshot {
        /// Stream index.
        stream: u8,
    },
}

fn expect() -> impl Strategy<Value = Expect> {
    prop_oneof![
        1 => Just(Expect::Any),
        1 => Just(Expect::NoStream),
        1 => Just(Expect::StreamExists),
        4 => Just(Expect::Current),
        1 => (-2i8..=2).prop_map(Expect::Off),
    ]
}

fn batch() -> impl Strategy<Value = Batch> {
    prop_oneof![
        6 => (0u8..5).prop_map(Batch::New),
        2 => any::<u8>().prop_map(Batch::Retry),
        1 => (any::<u8>(), 1u8..3).prop_map(|(i, n)| Batch::Overlap(i, n)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let stream = 0u8..STREAMS.len() as u8;
    prop_oneof![
        8 => (stream.clone(), expect(), batch())
            .prop_map(|(stream, expect, batch)| Op::Append { stream, expect, batch }),
        2 => (stream.clone(), any::<bool>(), 0u8..12, proptest::option::of(0u8..6))
            .prop_map(|(stream, forward, from, limit)| Op::ReadStream { stream, forward, from, limit }),
        2 => (0u8..40, proptest::option::of(0u8..12), proptest::option::of(0u8..3), proptest::option::of(0u8..3))
            .prop_map(|(after, limit, category, event_type)| Op::ReadAll { after, limit, category, event_type }),
        1 => stream.clone().prop_map(|stream| Op::Version { stream }),
        1 => Just(Op::Head),
        1 => (stream.clone(), 1u8..10).prop_map(|(stream, version)| Op::SaveSnapshot { stream, version }),
        1 => stream.prop_map(|stream| Op::LoadSnapshot { stream }),
    ]
}

/// Random operation sequences of 1 to 60 operations.
pub fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), 1..60)
}

/// The comparable outcome of one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Appended {
        version: u64,
        events: Vec<usize>,
        duplicate: bool,
    },
    Error(String),
    Events(Vec<(Uuid, String, u64, String, u32, serde_json::Value)>),
    Number(u64),
    Feed(usize),
    Written(bool),
    Snapshot(Option<(u64, u32, serde_json::Value)>),
}

/// Runs one operation sequence on both stores.
struct Run<S> {
    store: S,
    /// Global positions of the feed, in order.
    feed: Vec<u64>,
}

fn error_kind(err: &StoreError) -> String {
    match err {
        StoreError::Conflict {
            stream_id: stream,
            expected,
            actual,
        } => format!("Conflict({stream}, {expected:?}, {actual})"),
        StoreError::DuplicateEvent {
            stream_id: stream,
            event_id,
            ..
        } => format!("DuplicateEvent({stream}, {event_id})"),
        StoreError::InvalidRequest {
            stream_id: stream, ..
        } => format!("InvalidRequest({stream})"),
        StoreError::PayloadTooLarge {
            stream_id: stream,
            event_id,
            ..
        } => format!("PayloadTooLarge({stream}, {event_id})"),
        other => format!("unexpected: {other}"),
    }
}

impl<S: EventStore + SnapshotStore> Run<S> {
    fn index_of(&self, position: u64) -> usize {
        self.feed
            .iter()
            .position(|p| *p == position)
            .unwrap_or_else(|| panic!("position {position} is not in the feed {:?}", self.feed))
    }

    fn position_of(&self, index: usize) -> u64 {
        match index.min(self.feed.len()) {
            0 => 0,
            i => self.feed[i - 1],
        }
    }

    fn events(events: &[RecordedEvent]) -> Outcome {
        // Along each stream, the store's clock never goes backwards.
        let mut by_stream: HashMap<&StreamId, Vec<&RecordedEvent>> = HashMap::new();
        for e in events {
            by_stream.entry(&e.stream_id).or_default().push(e);
        }
        for (stream, mut list) in by_stream {
            list.sort_by_key(|e| e.stream_version);
            assert!(
                list.windows(2)
                    .all(|w| w[0].recorded_at <= w[1].recorded_at),
                "recorded_at decreases along {stream}"
            );
        }
        Outcome::Events(
            events
                .iter()
                .map(|e| {
                    (
                        e.event_id,
                        e.stream_id.to_string(),
                        e.stream_version,
                        e.event_type.clone(),
                        e.schema_version,
                        e.payload_json().expect("stored payload is JSON"),
                    )
                })
                .collect(),
        )
    }

    async fn append(&mut self, stream: u8, expect: Expect, request: &AppendRequest) -> Outcome {
        let stream = stream_id(stream);
        let current = self
            .store
            .stream_version(&stream)
            .await
            .expect("stream_version");
        let request = AppendRequest::new(stream, expected(expect, current), request.events.clone());
        match self.store.append(request).await {
            Ok(AppendResult {
                stream_version,
                positions,
                duplicate,
            }) => {
                if !duplicate {
                    self.feed.extend(&positions);
                }
                Outcome::Appended {
                    version: stream_version,
                    events: positions.iter().map(|p| self.index_of(*p)).collect(),
                    duplicate,
                }
            }
            Err(err) => Outcome::Error(error_kind(&err)),
        }
    }

    async fn read_stream(&self, stream: u8, forward: bool, from: u8, limit: Option<u8>) -> Outcome {
        let mut read = if forward {
            ReadStream::forward()
        } else {
            ReadStream::backward()
        }
        .from(u64::from(from));
        if let Some(limit) = limit {
            read = read.limit(u64::from(limit));
        }
        let events: Vec<RecordedEvent> = self
            .store
            .read_stream(&stream_id(stream), read)
            .try_collect()
            .await
            .expect("read_stream");
        Self::events(&events)
    }

    async fn read_all(
        &self,
        after: u8,
        limit: Option<u8>,
        category: Option<u8>,
        event_type: Option<u8>,
    ) -> Outcome {
        let mut filter = EventFilter::all();
        if let Some(c) = category {
            filter = filter.category(CATEGORIES[usize::from(c)]);
        }
        if let Some(t) = event_type {
            filter = filter.event_type(TYPES[usize::from(t)]);
        }
        let mut read = ReadAll::after(self.position_of(usize::from(after))).filter(filter);
        if let Some(limit) = limit {
            read = read.limit(u64::from(limit));
        }
        let events: Vec<RecordedEvent> = self
            .store
            .read_all(read)
            .try_collect()
            .await
            .expect("read_all");
        assert!(events
            .windows(2)
            .all(|w| w[0].global_position < w[1].global_position));
        Self::events(&events)
    }

    async fn apply(&mut self, op: &Op, requests: &[AppendRequest]) -> Outcome {
        match op {
            Op::Append { stream, expect, .. } => {
                let request = requests.last().expect("the append's request");
                self.append(*stream, *expect, request).await
            }
            Op::ReadStream {
                stream,
                forward,
                from,
                limit,
            } => self.read_stream(*stream, *forward, *from, *limit).await,
            Op::ReadAll {
                after,
                limit,
                category,
                event_type,
            } => self.read_all(*after, *limit, *category, *event_type).await,
            Op::Version { stream } => Outcome::Number(
                self.store
                    .stream_version(&stream_id(*stream))
                    .await
                    .expect("stream_version"),
            ),
            Op::Head => {
                let head = self.store.head_position().await.expect("head_position");
                Outcome::Feed(if head == 0 {
                    0
                } else {
                    self.index_of(head) + 1
                })
            }
            Op::SaveSnapshot { stream, version } => {
                let record = SnapshotRecord {
                    stream_id: stream_id(*stream),
                    version: u64::from(*version),
                    schema_version: 1,
                    payload: Bytes::from(format!("{{\"v\":{version}}}")),
                    recorded_at: es_core::event::now_micros(),
                    event_id: Some(uuid::Uuid::from_u128(u128::from(*version))),
                };
                Outcome::Written(
                    self.store
                        .save_snapshot(record)
                        .await
                        .expect("save_snapshot"),
                )
            }
            Op::LoadSnapshot { stream } => Outcome::Snapshot(
                self.store
                    .load_snapshot(&stream_id(*stream))
                    .await
                    .expect("load_snapshot")
                    .map(|s| {
                        let payload = serde_json::from_slice(&s.payload).expect("snapshot JSON");
                        (s.version, s.schema_version, payload)
                    }),
            ),
        }
    }
}

fn stream_id(index: u8) -> StreamId {
    StreamId::parse(STREAMS[index as usize % STREAMS.len()]).expect("valid")
}

fn expected(expect: Expect, current: u64) -> ExpectedVersion {
    match expect {
        Expect::Any => ExpectedVersion::Any,
        Expect::NoStream => ExpectedVersion::NoStream,
        Expect::StreamExists => ExpectedVersion::StreamExists,
        Expect::Current => ExpectedVersion::Exact(current),
        Expect::Off(d) => ExpectedVersion::Exact(current.saturating_add_signed(i64::from(d))),
    }
}

struct Step<'a>(usize, &'a Op);

impl fmt::Display for Step<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {} ({:?})", self.0, self.1)
    }
}

/// Runs `ops` on `store` (which must start empty) and on a fresh in-memory store, and panics at
/// the first operation whose results differ.
pub async fn check_against_memory<S: EventStore + SnapshotStore>(store: S, ops: &[Op]) {
    let mut ours = Run {
        store,
        feed: Vec::new(),
    };
    let mut oracle = Run {
        store: InMemoryStore::new(),
        feed: Vec::new(),
    };
    // Batches sent so far, so retries and overlaps can reuse their events.
    let mut sent: Vec<AppendRequest> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        if let Op::Append { stream, batch, .. } = op {
            let events = match *batch {
                Batch::New(n) => fresh_events(i, n),
                Batch::Retry(k) if !sent.is_empty() => sent[k as usize % sent.len()].events.clone(),
                Batch::Overlap(k, n) if !sent.is_empty() => {
                    let earlier = &sent[k as usize % sent.len()].events;
                    let mut events: Vec<NewEvent> = earlier.iter().take(1).cloned().collect();
                    events.extend(fresh_events(i, n));
                    events
                }
                Batch::Retry(_) | Batch::Overlap(..) => fresh_events(i, 1),
            };
            sent.push(AppendRequest::new(
                stream_id(*stream),
                ExpectedVersion::Any,
                events,
            ));
        }
        let expected = oracle.apply(op, &sent).await;
        let actual = ours.apply(op, &sent).await;
        assert_eq!(
            actual,
            expected,
            "{} differs from the in-memory oracle",
            Step(i, op)
        );
    }
}

fn fresh_events(step: usize, n: u8) -> Vec<NewEvent> {
    (0..n)
        .map(|j| {
            let event_type = TYPES[(step + usize::from(j)) % TYPES.len()];
            let payload = serde_json::json!({ "step": step, "j": j, "text": "ok \"quoted\" ü" });
            NewEvent::from_value(event_type, 1 + u32::from(j % 2), &payload).with_id(Uuid::now_v7())
        })
        .collect()
}
