//! Loading aggregates: the latest state from a snapshot and newer events, a past state, or a
//! replay of every event.

use futures::StreamExt;
use tracing::Instrument;

use super::snapshot::Snapshot;
use super::{AsOf, Loaded, RepoResult, Repository, RepositoryError, Until};
use crate::aggregate::Aggregate;
use crate::contract::{ReadStream, Store, StoreError};
use crate::event::RecordedEventRef;
use crate::stream_id::StreamId;

/// Where a replay starts.
enum Start<A> {
    Empty,
    Snapshot(Snapshot<A>),
}

impl<S: Store> Repository<S> {
    /// Loads the current state of aggregate `id`: from its latest usable snapshot plus the newer
    /// events. An aggregate with no events loads as `A::default()` at version 0.
    pub async fn load<A: Aggregate>(&self, id: &str) -> RepoResult<Loaded<A>, A> {
        let stream_id = Self::stream_id::<A>(id)?;
        self.load_stream(stream_id, Until::Latest).await
    }

    /// Loads aggregate `id` as it was at a version, a global position or a time.
    pub async fn load_as_of<A: Aggregate>(
        &self,
        id: &str,
        as_of: AsOf,
    ) -> RepoResult<Loaded<A>, A> {
        let stream_id = Self::stream_id::<A>(id)?;
        self.load_stream(stream_id, Until::Past(as_of)).await
    }

    /// Loads aggregate `id` from its events only, ignoring snapshots.
    pub async fn load_without_snapshot<A: Aggregate>(&self, id: &str) -> RepoResult<Loaded<A>, A> {
        let stream_id = Self::stream_id::<A>(id)?;
        self.replay(stream_id, Start::Empty, Until::Latest).await
    }

    pub(super) async fn load_stream<A: Aggregate>(
        &self,
        stream_id: StreamId,
        until: Until,
    ) -> RepoResult<Loaded<A>, A> {
        let span = tracing::debug_span!("es.load", stream_id = %stream_id, version = tracing::field::Empty, events = tracing::field::Empty);
        async move {
            let start = match self.usable_snapshot::<A>(&stream_id, until).await {
                Some(snapshot) => Start::Snapshot(snapshot),
                None => Start::Empty,
            };
            let loaded = self.replay(stream_id, start, until).await?;
            tracing::Span::current().record("version", loaded.version);
            tracing::Span::current().record("events", loaded.events_read);
            Ok(loaded)
        }
        .instrument(span)
        .await
    }

    /// Replays the stream onto `start`. From a snapshot, the read begins at the snapshot's own
    /// version: the stream must still hold an event there (with the snapshot's event id, when it
    /// has one). If it does not, the snapshot does not belong to the stream as it is now (the
    /// stream was restored from an older backup, its events were lost, the snapshot was edited):
    /// it is ignored with a warning and the replay starts again from the first event.
    async fn replay<A: Aggregate>(
        &self,
        stream_id: StreamId,
        mut start: Start<A>,
        until: Until,
    ) -> RepoResult<Loaded<A>, A> {
        'replay: loop {
            let (mut aggregate, mut version, check) = match start {
                Start::Empty => (A::default(), 0, None),
                Start::Snapshot(s) => (s.state, s.version, Some(s.event_id)),
            };
            start = Start::Empty;
            let snapshot_version = check.is_some().then_some(version);
            let mut last_event_id = None;
            let first = if check.is_some() {
                version
            } else {
                version + 1
            };
            let mut read = ReadStream::forward().from(first);
            if let Until::Past(AsOf::Version(v)) = until {
                if v < first {
                    return Ok(Loaded {
                        stream_id,
                        aggregate,
                        version,
                        snapshot_version,
                        events_read: 0,
                        last_event_id,
                        closed: false,
                    });
                }
                read = read.limit(v - first + 1);
            }
            let upcasters = self.upcasters::<A::Event>();
            let store_error = |version, source| RepositoryError::Store {
                stream_id: stream_id.clone(),
                version,
                source,
            };
            // Pages of events borrowed from the store: each payload is decoded where it lies.
            let mut pages = self.inner.store.read_stream_pages(&stream_id, read);
            let mut events_read = 0;
            // Whether the last event applied (or the snapshot's own) is the stream's tombstone,
            // which decodes to no typed event.
            let mut closed = false;
            let mut checked = check.is_none();
            'pages: while let Some(page) = pages.next().await {
                let page = page.map_err(|source| store_error(version, source))?;
                for index in 0..page.len() {
                    let event = page
                        .event(index)
                        .map_err(|source| store_error(version, source))?;
                    if !checked {
                        let expected_id = check.flatten();
                        if event.stream_version != version
                            || expected_id.is_some_and(|id| id != event.event_id)
                        {
                            tracing::warn!(stream_id = %stream_id, snapshot_version = version,
                                snapshot_event = ?expected_id, stream_event = %event.event_id,
                                stream_event_version = event.stream_version,
                                "snapshot does not match the stream's events; deleting it and \
                                 replaying every event");
                            drop(pages);
                            self.discard_snapshot::<A>(&stream_id, version).await;
                            continue 'replay;
                        }
                        checked = true;
                        last_event_id = Some(event.event_id);
                        closed = event.is_tombstone();
                        continue;
                    }
                    if until.excludes(&event) {
                        break 'pages;
                    }
                    if event.stream_version != version + 1 {
                        return Err(store_error(
                            version,
                            out_of_order(&stream_id, version, &event),
                        ));
                    }
                    upcasters.decode_ref_into::<A::Event>(&stream_id, event, |e| {
                        aggregate.evolve(&e);
                    })?;
                    version = event.stream_version;
                    last_event_id = Some(event.event_id);
                    closed = event.is_tombstone();
                    events_read += 1;
                }
            }
            if !checked {
                tracing::warn!(stream_id = %stream_id, snapshot_version = version,
                    "snapshot is ahead of its stream (the stream has no event at its version); \
                     deleting it and replaying every event");
                self.discard_snapshot::<A>(&stream_id, version).await;
                continue 'replay;
            }
            return Ok(Loaded {
                stream_id,
                aggregate,
                version,
                snapshot_version,
                events_read,
                last_event_id,
                closed,
            });
        }
    }
}

impl Until {
    /// Whether `event` lies past a position or time bound (and so does every event after it).
    fn excludes(self, event: &RecordedEventRef<'_>) -> bool {
        match self {
            Until::Past(AsOf::Position(p)) => event.global_position > p,
            Until::Past(AsOf::Time(t)) => event.recorded_at > t,
            _ => false,
        }
    }
}

/// A stream whose event after `version` is not at `version + 1` (lost, moved or duplicated):
/// replaying on would build a state the stream never had.
fn out_of_order(stream_id: &StreamId, version: u64, event: &RecordedEventRef<'_>) -> StoreError {
    StoreError::corrupt_at(
        stream_id,
        event.stream_version,
        format!("expected version {} next", version + 1),
    )
}
