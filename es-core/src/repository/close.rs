//! Closing an aggregate's stream: its tombstone, appended expecting the version the repository
//! knows, after which the aggregate takes no more commands.

use tracing::Instrument;

use super::{ClosedStream, RepoResult, Repository, RepositoryError};
use crate::aggregate::Aggregate;
use crate::contract::Store;
use crate::event::{Metadata, NewEvent};

impl<S: Store> Repository<S> {
    /// Closes aggregate `id`: appends its stream's tombstone ([`NewEvent::closing`], carrying
    /// `metadata`, say the reason) expecting the version of the aggregate as this repository
    /// has it (loaded first if it has none). From then on every command on the aggregate fails
    /// with [`RepositoryError::Closed`], in this process and any other, and every append to
    /// the stream with [`StoreError::StreamClosed`](crate::StoreError::StreamClosed); loads,
    /// historical loads and reads keep working, and the tombstone reaches the feed like any
    /// event (typed decoding passes over it).
    ///
    /// Commands to the aggregate in this repository that are in flight finish first; the
    /// close then runs alone on the aggregate. When another writer moved the stream on
    /// meanwhile (a conflict), the aggregate is loaded again and the close tried again, up to
    /// the retry policy's attempts: the tombstone always lands after every event the
    /// repository saw. A stream closed already (by anyone) is [`RepositoryError::Closed`]: of
    /// two racing closes, exactly one succeeds. A store that is unreachable gets the same
    /// tombstone again, which is idempotent by event id.
    ///
    /// ```
    /// # use es_core::{Aggregate, Metadata, Repository, RepositoryError, Store};
    /// # #[allow(dead_code)]
    /// # async fn example<S: Store, A: Aggregate>(repo: &Repository<S>, command: A::Command) {
    /// let reason = Metadata::new().with("reason", "customer left");
    /// let closed = repo.close::<A>("acc-7", &reason).await;
    /// # let _ = closed;
    /// match repo.execute::<A>("acc-7", &command).await {
    ///     Err(RepositoryError::Closed { version, .. }) => println!("closed at version {version}"),
    ///     other => println!("{:?}", other.is_ok()),
    /// }
    /// # }
    /// ```
    pub async fn close<A: Aggregate>(
        &self,
        id: &str,
        metadata: &Metadata,
    ) -> RepoResult<ClosedStream, A> {
        let stream_id = Self::stream_id::<A>(id)?;
        let span = tracing::debug_span!("es.close", category = A::CATEGORY, stream_id = %stream_id,
            version = tracing::field::Empty, attempts = tracing::field::Empty);
        let lane = self.inner.lanes.lane::<A>(&stream_id);
        let tombstone = NewEvent::closing().with_metadata(metadata.clone());
        let retry = self.inner.retry;
        let result = async {
            let mut backoff = retry.backoff.delays();
            let mut attempts = 0;
            loop {
                attempts += 1;
                match self.close_attempt(&lane, &stream_id, &tombstone).await? {
                    Ok(result) => {
                        let span = tracing::Span::current();
                        span.record("version", result.stream_version);
                        span.record("attempts", attempts);
                        return Ok(ClosedStream {
                            stream_id: stream_id.clone(),
                            version: result.stream_version,
                            position: result.positions.first().copied().unwrap_or(0),
                            event_id: tombstone.event_id,
                            attempts,
                        });
                    }
                    Err((expected, actual)) => {
                        if attempts >= retry.max_attempts {
                            return Err(RepositoryError::Conflict {
                                stream_id: stream_id.clone(),
                                expected,
                                actual,
                                attempts,
                            });
                        }
                        tracing::debug!(stream_id = %stream_id, expected, actual, attempts,
                            "conflict; closing again at the stream's new version");
                        backoff.sleep().await;
                    }
                }
            }
        }
        .instrument(span)
        .await;
        drop(lane);
        self.inner.lanes.trim();
        result
    }
}
