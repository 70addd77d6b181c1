//! Commands that touch two aggregates: load both, decide once, append both in one multi-stream
//! append ([`EventStore::append_streams`](crate::EventStore::append_streams)), all or nothing.

use tracing::Instrument;

use super::command::encode_events;
use super::{Executed, Loaded, Repository, RepositoryError, SnapshotContext};
use crate::aggregate::Aggregate;
use crate::contract::{AppendRequest, AppendResult, ExpectedVersion, Store, StoreError};
use crate::event::Metadata;

/// The outcome of a command on two aggregates ([`Repository::execute_two`]): each aggregate's
/// own result, as [`Repository::execute`] reports it for one.
pub struct ExecutedTwo<A: Aggregate, B: Aggregate> {
    /// The first aggregate after the command.
    pub first: Executed<A>,
    /// The second aggregate after the command.
    pub second: Executed<B>,
}

impl<A: Aggregate, B: Aggregate> std::fmt::Debug for ExecutedTwo<A, B>
where
    Executed<A>: std::fmt::Debug,
    Executed<B>: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutedTwo")
            .field("first", &self.first)
            .field("second", &self.second)
            .finish()
    }
}

impl<A: Aggregate, B: Aggregate> Clone for ExecutedTwo<A, B>
where
    Executed<A>: Clone,
    Executed<B>: Clone,
{
    fn clone(&self) -> Self {
        Self {
            first: self.first.clone(),
            second: self.second.clone(),
        }
    }
}

/// What a two-aggregate decision returns: the events of the first aggregate and those of the
/// second, or the decision's error.
pub type TwoEvents<A, B, E> =
    Result<(Vec<<A as Aggregate>::Event>, Vec<<B as Aggregate>::Event>), E>;

/// A repository error about one aggregate, as an error of a two-aggregate command (whose domain
/// error is the decision's). Loads, encoding and translation never produce `Domain`.
fn recast<E1, E2>(err: RepositoryError<E1>) -> RepositoryError<E2>
where
    E1: std::error::Error + 'static,
    E2: std::error::Error + 'static,
{
    match err {
        RepositoryError::Domain {
            stream_id,
            version,
            source,
        } => RepositoryError::Store {
            stream_id,
            version,
            source: StoreError::backend(source.to_string()),
        },
        RepositoryError::Conflict {
            stream_id,
            expected,
            actual,
            attempts,
        } => RepositoryError::Conflict {
            stream_id,
            expected,
            actual,
            attempts,
        },
        RepositoryError::Decode(e) => RepositoryError::Decode(e),
        RepositoryError::Encode {
            stream_id,
            event_type,
            source,
        } => RepositoryError::Encode {
            stream_id,
            event_type,
            source,
        },
        RepositoryError::InvalidId(e) => RepositoryError::InvalidId(e),
        RepositoryError::Closed { stream_id, version } => {
            RepositoryError::Closed { stream_id, version }
        }
        RepositoryError::Store {
            stream_id,
            version,
            source,
        } => RepositoryError::Store {
            stream_id,
            version,
            source,
        },
    }
}

/// [`RepositoryError::Closed`] if either aggregate's stream is closed as loaded.
fn refuse_closed<A: Aggregate, B: Aggregate, E>(
    first: &Loaded<A>,
    second: &Loaded<B>,
) -> Result<(), RepositoryError<E>>
where
    E: std::error::Error + 'static,
{
    for (stream_id, version, closed) in [
        (&first.stream_id, first.version, first.closed),
        (&second.stream_id, second.version, second.closed),
    ] {
        if closed {
            return Err(RepositoryError::Closed {
                stream_id: stream_id.clone(),
                version,
            });
        }
    }
    Ok(())
}

/// A store failure of a two-aggregate command, named with the stream of the part it is about
/// (the first aggregate's when it concerns the call as a whole); a part refused because its
/// stream was closed by another writer since it was loaded is [`RepositoryError::Closed`].
fn store_failure<A: Aggregate, B: Aggregate, E>(
    source: StoreError,
    first: &Loaded<A>,
    second: &Loaded<B>,
) -> RepositoryError<E>
where
    E: std::error::Error + 'static,
{
    if let StoreError::StreamClosed { stream_id, version } = source {
        return RepositoryError::Closed { stream_id, version };
    }
    let (stream_id, version) = match &source {
        StoreError::DuplicateEvent { stream_id, .. }
        | StoreError::InvalidRequest { stream_id, .. }
        | StoreError::InlineProjection { stream_id, .. }
        | StoreError::PayloadTooLarge { stream_id, .. }
            if *stream_id == second.stream_id =>
        {
            (second.stream_id.clone(), second.version)
        }
        _ => (first.stream_id.clone(), first.version),
    };
    RepositoryError::Store {
        stream_id,
        version,
        source,
    }
}

impl<S: Store> Repository<S> {
    /// Runs one decision over two aggregates and records its events in both, atomically.
    ///
    /// Loads aggregate `first_id` of type `A` and `second_id` of type `B` (which may be the same
    /// type), calls `decide` with both states, and appends the events it returns for each in one
    /// [`append_streams`](crate::EventStore::append_streams) call, each part expecting the
    /// version its aggregate was loaded at: both streams get their events, or neither does. When
    /// either stream moved on meanwhile (a conflict), both are loaded again and `decide` runs
    /// again, up to the retry policy's attempts, with its backoff between them; a store that is
    /// unreachable gets the same call again (idempotent by event id), as
    /// [`execute`](Self::execute) does. Every event carries `metadata`; each aggregate's
    /// translator (if any) writes its outbox messages in the same call, and each aggregate's
    /// snapshot policy applies after it.
    ///
    /// If either aggregate's stream is closed, the command fails with
    /// [`RepositoryError::Closed`] naming it, and nothing is appended.
    ///
    /// `decide` returning `Err` is [`RepositoryError::Domain`], named with the first aggregate's
    /// stream and version; a conflict that outlasts the attempts is
    /// [`RepositoryError::Conflict`] naming the stream that moved. If `decide` returns no event
    /// for either aggregate, nothing is appended and both are reported at the versions they were
    /// loaded at; if it returns events for only one, only that one is appended (a plain
    /// append, with its expected version).
    ///
    /// The two ids must name different streams. Commands that run on these aggregates in this
    /// repository through [`execute`](Self::execute) at the same time are not queued behind this
    /// one: whichever appends second conflicts and decides again. See
    /// `docs/15-multi-stream-appends.md`.
    ///
    /// ```
    /// # use es_core::{Aggregate, Repository, Store};
    /// # #[allow(dead_code)]
    /// # async fn transfer<S: Store, A: Aggregate>(repo: &Repository<S>, debit: A::Command, credit: A::Command) {
    /// let moved = repo
    ///     .execute_two::<A, A, A::Error>("alice", "bob", &Default::default(), |alice, bob| {
    ///         Ok((alice.handle(&debit)?, bob.handle(&credit)?))
    ///     })
    ///     .await;
    /// # let _ = moved;
    /// # }
    /// ```
    pub async fn execute_two<A, B, E>(
        &self,
        first_id: &str,
        second_id: &str,
        metadata: &Metadata,
        decide: impl Fn(&A, &B) -> TwoEvents<A, B, E> + Send + Sync,
    ) -> Result<ExecutedTwo<A, B>, RepositoryError<E>>
    where
        A: Aggregate,
        B: Aggregate,
        E: std::error::Error + Send + Sync + 'static,
    {
        let first_stream = Self::stream_id::<A>(first_id)?;
        let second_stream = Self::stream_id::<B>(second_id)?;
        if first_stream == second_stream {
            return Err(RepositoryError::Store {
                stream_id: first_stream.clone(),
                version: 0,
                source: StoreError::InvalidRequest {
                    stream_id: first_stream,
                    reason: "a command on two aggregates needs two different streams".to_owned(),
                },
            });
        }
        let span = tracing::debug_span!("es.execute_two", first = %first_stream, second = %second_stream,
            attempts = tracing::field::Empty);
        async move {
            let retry = self.inner.retry;
            let mut backoff = retry.backoff.delays();
            let mut attempts = 0;
            loop {
                attempts += 1;
                let first: Loaded<A> = self
                    .load_stream(first_stream.clone(), super::Until::Latest)
                    .await
                    .map_err(recast)?;
                let second: Loaded<B> = self
                    .load_stream(second_stream.clone(), super::Until::Latest)
                    .await
                    .map_err(recast)?;
                refuse_closed(&first, &second)?;
                let (first_events, second_events) = decide(&first.aggregate, &second.aggregate)
                    .map_err(|source| RepositoryError::Domain {
                        stream_id: first.stream_id.clone(),
                        version: first.version,
                        source,
                    })?;
                let first_part = self
                    .part::<A>(&first, &first_events, metadata)
                    .map_err(recast)?;
                let second_part = self
                    .part::<B>(&second, &second_events, metadata)
                    .map_err(recast)?;
                let parts: Vec<AppendRequest> = [first_part.clone(), second_part.clone()]
                    .into_iter()
                    .flatten()
                    .collect();
                let outcome = self.send_parts(parts).await;
                match outcome {
                    Ok(results) => {
                        let mut results = results.into_iter();
                        let first_result = first_part.as_ref().and_then(|_| results.next());
                        let second_result = second_part.as_ref().and_then(|_| results.next());
                        tracing::Span::current().record("attempts", attempts);
                        let first = self
                            .settle(first, first_events, first_part, first_result, attempts)
                            .await;
                        let second = self
                            .settle(second, second_events, second_part, second_result, attempts)
                            .await;
                        return Ok(ExecutedTwo { first, second });
                    }
                    Err(StoreError::Conflict {
                        stream_id,
                        expected,
                        actual,
                    }) => {
                        let expected = match expected {
                            ExpectedVersion::Exact(v) => v,
                            _ => 0,
                        };
                        if attempts >= retry.max_attempts {
                            return Err(RepositoryError::Conflict {
                                stream_id,
                                expected,
                                actual,
                                attempts,
                            });
                        }
                        tracing::debug!(stream_id = %stream_id, expected, actual, attempts,
                            "conflict; retrying the two-aggregate command");
                        backoff.sleep().await;
                    }
                    Err(source) => return Err(store_failure(source, &first, &second)),
                }
            }
        }
        .instrument(span)
        .await
    }

    /// The append of `events` to `loaded`'s stream, expecting the version it was loaded at, with
    /// its translator's outbox messages; `None` without events.
    fn part<A: Aggregate>(
        &self,
        loaded: &Loaded<A>,
        events: &[A::Event],
        metadata: &Metadata,
    ) -> super::RepoResult<Option<AppendRequest>, A> {
        if events.is_empty() {
            return Ok(None);
        }
        let stored = encode_events::<A>(&loaded.stream_id, events, metadata)?;
        let outbox = self.translate::<A>(&loaded.stream_id, events, &stored, metadata)?;
        Ok(Some(
            AppendRequest::new(
                loaded.stream_id.clone(),
                ExpectedVersion::Exact(loaded.version),
                stored,
            )
            .with_outbox(outbox),
        ))
    }

    /// Appends the parts of a two-aggregate command: nothing without parts, a plain append
    /// for one, a multi-stream append for two.
    async fn send_parts(&self, parts: Vec<AppendRequest>) -> Result<Vec<AppendResult>, StoreError> {
        let mut parts = parts.into_iter();
        match (parts.next(), parts.next()) {
            (None, _) => Ok(Vec::new()),
            (Some(only), None) => self.append(only).await.map(|r| vec![r]),
            (Some(first), Some(second)) => self.append_two(vec![first, second]).await,
        }
    }

    /// Sends a multi-stream append, re-sending the same call (same event ids) while the store is
    /// unreachable.
    async fn append_two(&self, parts: Vec<AppendRequest>) -> Result<Vec<AppendResult>, StoreError> {
        let mut backoff = self.inner.retry.backoff.delays();
        let mut attempt = 1;
        let events: usize = parts.iter().map(|part| part.events.len()).sum();
        loop {
            let started = std::time::Instant::now();
            let result = self.inner.store.append_streams(parts.clone()).await;
            metrics::histogram!(crate::telemetry::APPEND_SECONDS).record(started.elapsed());
            metrics::histogram!(crate::telemetry::APPEND_EVENTS).record(events as u32);
            match result {
                Err(err)
                    if err.is_transient() && attempt < self.inner.retry.max_transient_attempts =>
                {
                    tracing::warn!(error = %err, attempt,
                        "multi-stream append failed transiently; re-sending the same call");
                    metrics::counter!(crate::telemetry::APPEND_RETRIES).increment(1);
                    backoff.sleep().await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// One aggregate's result after the call: its events applied, the lane this repository
    /// keeps for it forgotten (its next command loads the new state), a snapshot by its policy.
    async fn settle<A: Aggregate>(
        &self,
        loaded: Loaded<A>,
        events: Vec<A::Event>,
        part: Option<AppendRequest>,
        result: Option<AppendResult>,
        attempts: u32,
    ) -> Executed<A> {
        let Loaded {
            stream_id,
            mut aggregate,
            version,
            snapshot_version,
            ..
        } = loaded;
        for event in &events {
            aggregate.evolve(event);
        }
        let (new_version, positions) = match &result {
            Some(r) => (r.stream_version, r.positions.clone()),
            None => (version, Vec::new()),
        };
        let event_ids: Vec<uuid::Uuid> = part
            .map(|p| p.events.iter().map(|e| e.event_id).collect())
            .unwrap_or_default();
        let mut snapshot_saved = false;
        if result.is_some() {
            self.inner.lanes.forget::<A>(&stream_id).await;
            let ctx = SnapshotContext {
                stream_id: &stream_id,
                version: new_version,
                previous_version: version,
                last_snapshot_version: snapshot_version,
            };
            if self.snapshot_policy::<A>().should_snapshot(&ctx) {
                snapshot_saved = self
                    .save_snapshot(
                        &stream_id,
                        &aggregate,
                        new_version,
                        event_ids.last().copied(),
                    )
                    .await;
            }
        }
        Executed {
            stream_id,
            aggregate,
            version: new_version,
            events,
            event_ids,
            positions,
            attempts,
            snapshot_saved,
        }
    }
}
