//! Exactly-once projections: read-model writes and the checkpoint commit in one transaction.

use std::future::Future;
use std::sync::Arc;

use es_core::projection::{partition_checkpoint, BatchError, HandlerError, ProjectionSink};
use es_core::{EventFilter, RecordedEvent};
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, PgConnection};

use crate::codec::to_i64;
use crate::outbox::{
    checkpoint_fenced, checkpoint_of, render, FENCE_CHECKPOINT, LOAD_CHECKPOINT, RESET_CHECKPOINT,
};
use crate::schema::{SchemaName, Sql};
use crate::PgStore;

/// Locks a projection's checkpoint row (creating it at position 0, generation 0) and returns its
/// position and generation.
const LOCK_CHECKPOINT: &str =
    "SELECT locked_position, locked_generation FROM __S__.checkpoint_lock($1)";

/// A projection whose read model lives in the store's PostgreSQL database.
///
/// Run it with [`ExactlyOnce`]: its writes for a batch of events and the projection's checkpoint
/// commit in one transaction, so after any crash every event has been applied exactly once.
/// The handler must write through the connection it is given (the transaction), and must not
/// commit or roll back itself.
pub trait PgProjection: Send + 'static {
    /// Stable name; it keys the checkpoint (in the store's `checkpoints` table; in a consumer
    /// group, one checkpoint per partition: `<name>#<partition>`).
    fn name(&self) -> &str;

    /// Which events it consumes.
    fn filter(&self) -> EventFilter {
        EventFilter::all()
    }

    /// Applies one event inside the batch's transaction. An error rolls the whole batch back.
    fn handle(
        &mut self,
        tx: &mut PgConnection,
        event: &RecordedEvent,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Drops the read model (for example `TRUNCATE`), before a rebuild from position 0. Runs in
    /// the transaction that also removes the checkpoint.
    fn reset(
        &mut self,
        tx: &mut PgConnection,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Runs a [`PgProjection`] exactly once: the [`ProjectionSink`] to hand to
/// [`es_core::ProjectionRunner::spawn`].
///
/// Each batch is one transaction: lock the projection's checkpoint row (creating it at 0) and
/// read it, check its generation, apply every event after it, raise the checkpoint to the
/// batch's end, commit. Events at or below the locked checkpoint are skipped, so a batch retried
/// after a commit whose outcome was unknown (the connection dropped during COMMIT), or a second
/// runner of the same projection, never applies an event twice. On a handler error the
/// transaction rolls back and the batch reports [`BatchError`] with `applied: 0`; the runner
/// then applies the events before the failing one as their own batch and retries it.
///
/// A rebuild ([`reset`](ProjectionSink::reset)) drops the read model and starts a new checkpoint
/// generation at position 0 in one transaction. A batch whose sink loaded an older generation
/// (another runner was rebuilding meanwhile) finds a different generation under the row lock,
/// rolls back without applying anything, and reports [`StoreError::Fenced`](es_core::StoreError::Fenced)
/// ([`BatchError::is_fenced`]): the runner reloads the checkpoint. Without the generation, that
/// batch would have applied its events to the emptied read model and raised the new
/// checkpoint over everything before them, which the rebuild then never replayed.
///
/// In a consumer group ([`es_core::ProjectionRunner::spawn_group`]) the runner
/// [`claim`](ProjectionSink::claim)s a feed partition: the sink switches to that partition's own
/// checkpoint row ([`partition_checkpoint`]: `<name>#<partition>`) and fences it (a new generation
/// at its position, in one statement that waits for a batch holding the row to end). From then
/// on every batch, reset and checkpoint load uses that row, and a batch of a worker that held the
/// partition before (one that was paused, or lost its lease) finds a newer generation under the
/// row lock and rolls back: each event is applied once across any number of hand-overs.
pub struct ExactlyOnce<P> {
    projection: P,
    pool: PgPool,
    sql: Arc<Sql>,
    schema: SchemaName,
    /// The checkpoint generation this sink loaded, started or fenced.
    generation: u64,
    /// The feed partition claimed in a consumer group, whose checkpoint row the sink keeps;
    /// `None`: the projection's own row.
    partition: Option<u32>,
}

impl<P> std::fmt::Debug for ExactlyOnce<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExactlyOnce").finish_non_exhaustive()
    }
}

impl<P: PgProjection> ExactlyOnce<P> {
    /// Runs `projection` on `store`'s database, with its checkpoint in the store's schema.
    pub fn new(store: &PgStore, projection: P) -> Self {
        Self {
            projection,
            pool: store.inner.pool.clone(),
            sql: Arc::clone(&store.inner.sql),
            schema: store.inner.schema.clone(),
            generation: 0,
            partition: None,
        }
    }

    /// The name of the checkpoint row this sink keeps: the projection's name, or in a consumer
    /// group the claimed partition's checkpoint ([`partition_checkpoint`]).
    pub fn checkpoint_name(&self) -> String {
        match self.partition {
            Some(partition) => partition_checkpoint(self.projection.name(), partition),
            None => self.projection.name().to_owned(),
        }
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// The projection, mutably.
    pub fn projection_mut(&mut self) -> &mut P {
        &mut self.projection
    }

    /// Gives the projection back.
    pub fn into_inner(self) -> P {
        self.projection
    }

    async fn try_apply(
        &mut self,
        events: &[RecordedEvent],
        checkpoint: u64,
    ) -> Result<(), BatchError> {
        let whole = |source: sqlx::Error| BatchError {
            index: events.len(),
            applied: 0,
            source: source.into(),
        };
        let name = self.checkpoint_name();
        let mut tx = self.pool.begin().await.map_err(whole)?;
        let row: (i64, i64) = sqlx::query_as(render(&self.schema, LOCK_CHECKPOINT))
            .bind(&name)
            .fetch_one(&mut *tx)
            .await
            .map_err(whole)?;
        let locked = checkpoint_of(&name, Some(row)).map_err(|e| BatchError {
            index: events.len(),
            applied: 0,
            source: e.into(),
        })?;
        if locked.generation != self.generation {
            // Dropping the transaction rolls it back: nothing of the batch is applied.
            return Err(BatchError::fenced(
                events.len(),
                checkpoint_fenced(&name, self.generation, Some(locked.generation)),
            ));
        }
        let stored = locked.position;
        for (index, event) in events.iter().enumerate() {
            if event.global_position <= stored {
                // Applied by an earlier transaction already.
                continue;
            }
            if let Err(source) = self.projection.handle(&mut tx, event).await {
                // Dropping the transaction rolls it back.
                return Err(BatchError {
                    index,
                    applied: 0,
                    source,
                });
            }
        }
        if checkpoint > stored {
            sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.set_checkpoint)))
                .bind(&name)
                .bind(to_i64(checkpoint))
                .execute(&mut *tx)
                .await
                .map_err(whole)?;
        }
        tx.commit().await.map_err(whole)
    }
}

impl<P: PgProjection> ProjectionSink for ExactlyOnce<P> {
    fn name(&self) -> &str {
        self.projection.name()
    }

    fn filter(&self) -> EventFilter {
        self.projection.filter()
    }

    async fn checkpoint(&mut self) -> Result<u64, HandlerError> {
        let name = self.checkpoint_name();
        let row: Option<(i64, i64)> = sqlx::query_as(render(&self.schema, LOAD_CHECKPOINT))
            .bind(&name)
            .fetch_optional(&self.pool)
            .await?;
        let stored = checkpoint_of(&name, row)?;
        self.generation = stored.generation;
        Ok(stored.position)
    }

    async fn apply(&mut self, events: &[RecordedEvent], checkpoint: u64) -> Result<(), BatchError> {
        self.try_apply(events, checkpoint).await
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        let name = self.checkpoint_name();
        let mut tx = self.pool.begin().await?;
        self.projection.reset(&mut tx).await?;
        let generation: i64 = sqlx::query_scalar(render(&self.schema, RESET_CHECKPOINT))
            .bind(&name)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        self.generation = checkpoint_of(&name, Some((0, generation)))?.generation;
        Ok(())
    }

    async fn claim(&mut self, partition: u32) -> Result<u64, HandlerError> {
        self.partition = Some(partition);
        let name = self.checkpoint_name();
        let row: (i64, i64) = sqlx::query_as(render(&self.schema, FENCE_CHECKPOINT))
            .bind(&name)
            .fetch_one(&self.pool)
            .await?;
        let fenced = checkpoint_of(&name, Some(row))?;
        self.generation = fenced.generation;
        Ok(fenced.position)
    }

    /// One transaction: every partition's checkpoint reset, then the read model dropped.
    async fn reset_group(&mut self, partitions: u32) -> Result<(), HandlerError> {
        let mut tx = self.pool.begin().await?;
        for partition in 0..partitions {
            let name = partition_checkpoint(self.projection.name(), partition);
            sqlx::query_scalar::<_, i64>(render(&self.schema, RESET_CHECKPOINT))
                .bind(&name)
                .fetch_one(&mut *tx)
                .await?;
        }
        self.projection.reset(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }
}
