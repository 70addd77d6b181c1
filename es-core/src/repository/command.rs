//! Running commands: load, decide, append with the loaded version as the expected version,
//! retry conflicts and lost replies, translate into the outbox, snapshot by policy.

use std::any::TypeId;

use bytes::Bytes;
use tracing::Instrument;

use super::snapshot::SnapshotContext;
use super::{Executed, Loaded, RepoResult, Repository, RepositoryError, Until};
use crate::aggregate::Aggregate;
use crate::contract::{
    AppendRequest, AppendResult, ExpectedVersion, OutboxMessage, Store, StoreError,
};
use crate::event::{DomainEvent, Metadata, NewEvent};
use crate::outbox::Translator;
use crate::stream_id::StreamId;

impl<S: Store> Repository<S> {
    /// Runs `command` on aggregate `id` with empty metadata. See [`execute_with`](Self::execute_with).
    pub async fn execute<A: Aggregate>(
        &self,
        id: &str,
        command: &A::Command,
    ) -> RepoResult<Executed<A>, A> {
        self.execute_with(id, command, &Metadata::default()).await
    }

    /// Runs `command` on aggregate `id`: loads it, decides, appends the events with the loaded
    /// version as the expected version, and applies them. On a conflict it reloads and decides
    /// again, up to the retry policy. Every event carries `metadata`.
    pub async fn execute_with<A: Aggregate>(
        &self,
        id: &str,
        command: &A::Command,
        metadata: &Metadata,
    ) -> RepoResult<Executed<A>, A> {
        let stream_id = Self::stream_id::<A>(id)?;
        let span = tracing::info_span!("es.execute", category = A::CATEGORY, stream_id = %stream_id,
            version = tracing::field::Empty, events = tracing::field::Empty, attempts = tracing::field::Empty);
        self.execute_stream(stream_id, command, metadata)
            .instrument(span)
            .await
    }

    async fn execute_stream<A: Aggregate>(
        &self,
        stream_id: StreamId,
        command: &A::Command,
        metadata: &Metadata,
    ) -> RepoResult<Executed<A>, A> {
        let retry = self.inner.retry;
        let mut backoff = retry.backoff.delays();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let loaded: Loaded<A> = self.load_stream(stream_id.clone(), Until::Latest).await?;
            let Loaded {
                mut aggregate,
                version,
                snapshot_version,
                ..
            } = loaded;
            let events = aggregate
                .handle(command)
                .map_err(|source| RepositoryError::Domain {
                    stream_id: stream_id.clone(),
                    version,
                    source,
                })?;
            if events.is_empty() {
                return Ok(Executed {
                    stream_id,
                    aggregate,
                    version,
                    events,
                    event_ids: Vec::new(),
                    positions: Vec::new(),
                    attempts,
                    snapshot_saved: false,
                });
            }
            let new_events = encode_events::<A>(&stream_id, &events, metadata)?;
            let event_ids: Vec<uuid::Uuid> = new_events.iter().map(|e| e.event_id).collect();
            let outbox = self.translate::<A>(&stream_id, &events, &new_events, metadata)?;
            let request = AppendRequest::new(
                stream_id.clone(),
                ExpectedVersion::Exact(version),
                new_events,
            )
            .with_outbox(outbox);
            match self.append(request).await {
                Ok(result) => {
                    for event in &events {
                        aggregate.evolve(event);
                    }
                    let span = tracing::Span::current();
                    span.record("version", result.stream_version);
                    span.record("events", events.len());
                    span.record("attempts", attempts);
                    let ctx = SnapshotContext {
                        stream_id: &stream_id,
                        version: result.stream_version,
                        previous_version: version,
                        last_snapshot_version: snapshot_version,
                    };
                    let snapshot_saved = self.snapshot_policy::<A>().should_snapshot(&ctx)
                        && self
                            .save_snapshot(
                                &stream_id,
                                &aggregate,
                                result.stream_version,
                                event_ids.last().copied(),
                            )
                            .await;
                    return Ok(Executed {
                        stream_id,
                        aggregate,
                        version: result.stream_version,
                        events,
                        event_ids,
                        positions: result.positions,
                        attempts,
                        snapshot_saved,
                    });
                }
                Err(StoreError::Conflict { actual, .. }) => {
                    if attempts >= retry.max_attempts {
                        return Err(RepositoryError::Conflict {
                            stream_id,
                            expected: version,
                            actual,
                            attempts,
                        });
                    }
                    tracing::debug!(stream_id = %stream_id, expected = version, actual, attempts, "conflict; retrying command");
                    backoff.sleep().await;
                }
                Err(source) => {
                    return Err(RepositoryError::Store {
                        stream_id,
                        version,
                        source,
                    })
                }
            }
        }
    }

    /// The outbox messages of `A`'s translator for these events (none without a translator).
    fn translate<A: Aggregate>(
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
    async fn append(&self, request: AppendRequest) -> Result<AppendResult, StoreError> {
        let span = tracing::debug_span!("es.append", stream_id = %request.stream_id,
            expected = %request.expected, events = request.events.len());
        async move {
            let mut backoff = self.inner.retry.backoff.delays();
            let mut attempt = 1;
            loop {
                match self.inner.store.append(request.clone()).await {
                    Err(err) if err.is_transient() && attempt < self.inner.retry.max_transient_attempts => {
                        tracing::warn!(error = %err, attempt, "append failed transiently; re-sending the same batch");
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

fn encode_events<A: Aggregate>(
    stream_id: &StreamId,
    events: &[A::Event],
    metadata: &Metadata,
) -> RepoResult<Vec<NewEvent>, A> {
    events
        .iter()
        .map(|event| {
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
