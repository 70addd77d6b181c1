//! Running commands: load, decide, append with the loaded version as the expected version,
//! retry conflicts and lost replies, translate into the outbox, snapshot by policy.

use std::any::TypeId;

use bytes::Bytes;
use tracing::Instrument;

use super::lane::{self, Attempt};
use super::{Executed, RepoResult, Repository, RepositoryError};
use crate::aggregate::Aggregate;
use crate::contract::{AppendRequest, AppendResult, OutboxMessage, Store, StoreError};
use crate::event::{DomainEvent, Metadata, NewEvent};
use crate::outbox::Translator;
use crate::stream_id::StreamId;
use crate::telemetry;

impl<S: Store> Repository<S> {
    /// Runs `command` on aggregate `id` with empty metadata. See [`execute_with`](Self::execute_with).
    pub async fn execute<A: Aggregate>(
        &self,
        id: &str,
        command: &A::Command,
    ) -> RepoResult<Executed<A>, A> {
        self.execute_with(id, command, &Metadata::default()).await
    }

    /// Runs `command` on aggregate `id`: loads it (or takes the state kept in memory), decides,
    /// appends the events with that state's version as the expected version, and applies them.
    /// On a conflict it loads again and decides again, up to the retry policy. Every event
    /// carries `metadata`.
    ///
    /// Commands to one aggregate in this repository (and its clones) queue up and never conflict
    /// with each other; those that queued behind an append in flight are decided one after
    /// another and appended together. The guide's chapter 2 (`docs/02-first-aggregate.md`)
    /// says how, and [`RepositoryBuilder::cache_capacity`](super::RepositoryBuilder::cache_capacity)
    /// how the state is kept between commands.
    pub async fn execute_with<A: Aggregate>(
        &self,
        id: &str,
        command: &A::Command,
        metadata: &Metadata,
    ) -> RepoResult<Executed<A>, A> {
        let stream_id = Self::stream_id::<A>(id)?;
        let span = tracing::debug_span!("es.execute", category = A::CATEGORY, stream_id = %stream_id,
            version = tracing::field::Empty, events = tracing::field::Empty, attempts = tracing::field::Empty);
        let started = std::time::Instant::now();
        let result = self
            .execute_stream(stream_id, command, metadata)
            .instrument(span)
            .await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(RepositoryError::Domain { .. }) => "rejected",
            Err(RepositoryError::Conflict { .. }) => "conflict",
            Err(RepositoryError::Closed { .. }) => "closed",
            Err(_) => "error",
        };
        metrics::counter!(telemetry::COMMANDS, "category" => A::CATEGORY, "outcome" => outcome)
            .increment(1);
        metrics::histogram!(telemetry::COMMAND_SECONDS, "category" => A::CATEGORY)
            .record(started.elapsed());
        result
    }

    async fn execute_stream<A: Aggregate>(
        &self,
        stream_id: StreamId,
        command: &A::Command,
        metadata: &Metadata,
    ) -> RepoResult<Executed<A>, A> {
        let lane = self.inner.lanes.lane::<A>(&stream_id);
        let result = self.run_on_lane(&lane, stream_id, command, metadata).await;
        drop(lane);
        self.inner.lanes.trim();
        result
    }

    async fn run_on_lane<A: Aggregate>(
        &self,
        lane: &std::sync::Arc<lane::Lane<A>>,
        stream_id: StreamId,
        command: &A::Command,
        metadata: &Metadata,
    ) -> RepoResult<Executed<A>, A> {
        let retry = self.inner.retry;
        let mut backoff = retry.backoff.delays();
        let mut attempts = 0;
        let mut alone = false;
        loop {
            attempts += 1;
            match self
                .attempt(lane, &stream_id, command, metadata, attempts, alone)
                .await?
            {
                Attempt::Done(executed) => {
                    let span = tracing::Span::current();
                    span.record("version", executed.version);
                    span.record("events", executed.events.len());
                    span.record("attempts", attempts);
                    return Ok(executed);
                }
                Attempt::Again {
                    conflict: Some((expected, actual)),
                    ..
                } => {
                    metrics::counter!(telemetry::COMMAND_CONFLICTS, "category" => A::CATEGORY)
                        .increment(1);
                    if attempts >= retry.max_attempts {
                        return Err(RepositoryError::Conflict {
                            stream_id,
                            expected,
                            actual,
                            attempts,
                        });
                    }
                    tracing::debug!(stream_id = %stream_id, expected, actual, attempts, "conflict; retrying command");
                    backoff.sleep().await;
                }
                Attempt::Again {
                    conflict: None,
                    alone: now_alone,
                } => {
                    // A batch this command was part of failed without a conflict of its own:
                    // it runs again, alone if the batch was refused.
                    alone |= now_alone;
                }
            }
        }
    }

    /// The outbox messages of `A`'s translator for these events (none without a translator).
    pub(super) fn translate<A: Aggregate>(
        &self,
        stream_id: &StreamId,
        events: &[A::Event],
        stored: &[NewEvent],
        metadata: &Metadata,
    ) -> RepoResult<Vec<OutboxMessage>, A> {
        let Some(erased) = self.inner.translators.get(&TypeId::of::<A>()) else {
            return Ok(Vec::new());
        };
        let Some(translate) = erased.downcast_ref::<Box<ErasedTranslator<A>>>() else {
            unreachable!("translators are keyed by their aggregate type");
        };
        translate(stream_id, events, stored, metadata).map_err(|(event_type, source)| {
            RepositoryError::Encode {
                stream_id: stream_id.clone(),
                event_type,
                source,
            }
        })
    }

    /// Appends, re-sending the same request (same event ids) while the store is unreachable.
    pub(super) async fn append(&self, request: AppendRequest) -> Result<AppendResult, StoreError> {
        let span = tracing::debug_span!("es.append", stream_id = %request.stream_id,
            expected = %request.expected, events = request.events.len());
        async move {
            let mut backoff = self.inner.retry.backoff.delays();
            let mut attempt = 1;
            let events = metrics::histogram!(telemetry::APPEND_EVENTS);
            let seconds = metrics::histogram!(telemetry::APPEND_SECONDS);
            loop {
                let started = std::time::Instant::now();
                let result = self.inner.store.append(request.clone()).await;
                seconds.record(started.elapsed());
                events.record(request.events.len() as u32);
                match result {
                    Err(err) if err.is_transient() && attempt < self.inner.retry.max_transient_attempts => {
                        tracing::warn!(error = %err, attempt, "append failed transiently; re-sending the same batch");
                        metrics::counter!(telemetry::APPEND_RETRIES).increment(1);
                        backoff.sleep().await;
                        attempt += 1;
                    }
                    other => return other,
                }
            }
        }
        .instrument(span)
        .await
    }
}

/// A translator with its message type erased.
pub(super) type ErasedTranslator<A> = dyn Fn(
        &StreamId,
        &[<A as Aggregate>::Event],
        &[NewEvent],
        &Metadata,
    ) -> Result<Vec<OutboxMessage>, (&'static str, serde_json::Error)>
    + Send
    + Sync;

/// Translates the events of one command into outbox messages: each carries the source event's
/// id as its causation and the command's correlation and actor.
pub(super) fn translate<A: Aggregate, T: Translator<A>>(
    translator: &T,
    stream_id: &StreamId,
    events: &[A::Event],
    stored: &[NewEvent],
    metadata: &Metadata,
) -> Result<Vec<OutboxMessage>, (&'static str, serde_json::Error)> {
    let mut out = Vec::new();
    for (event, new) in events.iter().zip(stored) {
        for message in translator.translate(stream_id, event) {
            let payload = message
                .to_payload()
                .map_err(|e| (message.event_type(), e))?;
            out.push(OutboxMessage {
                message_id: uuid::Uuid::now_v7(),
                source_event_id: new.event_id,
                topic: translator.topic().to_owned(),
                key: stream_id.to_string(),
                message_type: message.event_type().to_owned(),
                schema_version: message.schema_version(),
                payload: Bytes::from(payload),
                metadata: Metadata {
                    correlation_id: metadata.correlation_id.or(Some(new.event_id)),
                    causation_id: Some(new.event_id),
                    actor: metadata.actor.clone(),
                    custom: metadata.custom.clone(),
                },
            });
        }
    }
    Ok(out)
}

/// Serializes a command's events. A typed event whose type begins with the reserved `$` (a
/// hand-written `DomainEvent` impl; the derive refuses such names) is refused before anything
/// is sent: as `$closed` it would close the stream.
pub(super) fn encode_events<A: Aggregate>(
    stream_id: &StreamId,
    events: &[A::Event],
    metadata: &Metadata,
) -> RepoResult<Vec<NewEvent>, A> {
    events
        .iter()
        .map(|event| {
            if event
                .event_type()
                .starts_with(crate::event::RESERVED_PREFIX)
            {
                return Err(RepositoryError::Store {
                    stream_id: stream_id.clone(),
                    version: 0,
                    source: StoreError::ReservedEventType {
                        stream_id: stream_id.clone(),
                        event_id: uuid::Uuid::nil(),
                        event_type: event.event_type().to_owned(),
                    },
                });
            }
            NewEvent::from_domain(event)
                .map(|e| e.with_metadata(metadata.clone()))
                .map_err(|source| RepositoryError::Encode {
                    stream_id: stream_id.clone(),
                    event_type: event.event_type(),
                    source,
                })
        })
        .collect()
}
