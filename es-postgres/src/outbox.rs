//! The outbox side of [`PgStore`]: pending records, delivery marks, dead letters, the relay lease
//! and projection checkpoints, with their fencing generations (migrations 4 and 9).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use es_core::contract::Checkpoint;
use es_core::contract::StoreFuture;
use es_core::contract::{DeadLetter, Delivered, LastRejection, LeaseState, Rejection, RelayStatus};
use es_core::{
    CheckpointStore, Metadata, OutboxMessage, OutboxRecord, OutboxStore, StoreError, StreamId,
};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

use crate::codec::{json_text, to_i64, to_u64};
use crate::error::store_error;
use crate::error::timed;
use crate::protocol::CheckpointSave;
use crate::{PgStore, SchemaName};

/// The lease name of the outbox relay in `relay_leases`.
const OUTBOX_LEASE: &str = "outbox";

/// The outbox columns [`decode_record`] reads (by name).
const RECORD_COLUMNS: &str = "position, stream_id, message_id, source_event_id, topic, key, \
     message_type, schema_version, payload, metadata, recorded_at";

/// SQL text for the store's schema: `__S__` becomes the quoted schema name.
fn sql(store: &PgStore, template: &str) -> AssertSqlSafe<String> {
    render(&store.inner.schema, template)
}

/// SQL text for `schema`: `__S__` becomes the quoted, validated schema name.
pub(crate) fn render(schema: &SchemaName, template: &str) -> AssertSqlSafe<String> {
    AssertSqlSafe(template.replace("__S__", &schema.quoted()))
}

fn lease_fenced(generation: u64) -> StoreError {
    StoreError::Fenced {
        resource: "the outbox relay lease".to_owned(),
        reason: format!(
            "generation {generation} is no longer the lease's: another relay took it over"
        ),
    }
}

impl OutboxStore for PgStore {
    fn acquire_relay_lease(&self, owner: &str, ttl: Duration) -> impl StoreFuture<Option<u64>> {
        // Taken when free, released, expired or already ours; the generation goes up unless the
        // owner renews a lease it still holds. The conflict clause locks the row, so concurrent
        // relays decide one after the other on the latest committed lease.
        let sql = sql(self, "SELECT __S__.relay_lease_acquire($1, $2, $3)");
        let pool = self.inner.pool.clone();
        let owner = owner.to_owned();
        timed(self.inner.query_timeout, async move {
            let ttl = i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX);
            let generation: Option<i64> = sqlx::query_scalar(sql)
                .bind(OUTBOX_LEASE)
                .bind(owner)
                .bind(ttl)
                .fetch_one(&pool)
                .await
                .map_err(store_error)?;
            generation
                .map(|g| to_u64(g, "the relay lease's generation"))
                .transpose()
        })
    }

    fn release_relay_lease(&self, owner: &str, generation: u64) -> impl StoreFuture<()> {
        let sql = sql(self, "SELECT __S__.relay_lease_release($1, $2, $3)");
        let pool = self.inner.pool.clone();
        let owner = owner.to_owned();
        timed(self.inner.query_timeout, async move {
            sqlx::query(sql)
                .bind(OUTBOX_LEASE)
                .bind(owner)
                .bind(to_i64(generation))
                .execute(&pool)
                .await
                .map_err(store_error)?;
            Ok(())
        })
    }

    fn pending_outbox(&self, limit: u64) -> impl StoreFuture<Vec<OutboxRecord>> {
        self.pending_outbox_after(0, limit)
    }

    fn pending_outbox_after(&self, after: u64, limit: u64) -> impl StoreFuture<Vec<OutboxRecord>> {
        let sql = Arc::clone(&self.inner.sql.pending_outbox);
        let pool = self.inner.pool.clone();
        timed(self.inner.query_timeout, async move {
            let rows = sqlx::query(AssertSqlSafe(sql))
                .bind(to_i64(after))
                .bind(to_i64(limit))
                .fetch_all(&pool)
                .await
                .map_err(store_error)?;
            rows.iter().map(decode_record).collect()
        })
    }

    fn mark_delivered(&self, generation: u64, delivered: &[Delivered]) -> impl StoreFuture<()> {
        let sql = sql(self, "SELECT __S__.relay_mark_delivered($1, $2, $3)");
        let pool = self.inner.pool.clone();
        let positions: Vec<i64> = delivered.iter().map(|d| to_i64(d.position)).collect();
        let ids: Vec<Uuid> = delivered.iter().map(|d| d.message_id).collect();
        timed(self.inner.query_timeout, async move {
            let allowed: bool = sqlx::query_scalar(sql)
                .bind(to_i64(generation))
                .bind(positions)
                .bind(ids)
                .fetch_one(&pool)
                .await
                .map_err(store_error)?;
            if allowed {
                Ok(())
            } else {
                Err(lease_fenced(generation))
            }
        })
    }

    fn dead_letter(&self, generation: u64, rejections: &[Rejection]) -> impl StoreFuture<()> {
        let sql = sql(self, "SELECT __S__.relay_dead_letter($1, $2, $3, $4, $5)");
        let pool = self.inner.pool.clone();
        let positions: Vec<i64> = rejections.iter().map(|r| to_i64(r.position)).collect();
        let ids: Vec<Uuid> = rejections.iter().map(|r| r.message_id).collect();
        // PostgreSQL text cannot hold NUL.
        let errors: Vec<String> = rejections
            .iter()
            .map(|r| r.error.replace('\0', "\u{fffd}"))
            .collect();
        let attempts: Vec<i32> = rejections
            .iter()
            .map(|r| i32::try_from(r.attempts).unwrap_or(i32::MAX))
            .collect();
        timed(self.inner.query_timeout, async move {
            let allowed: bool = sqlx::query_scalar(sql)
                .bind(to_i64(generation))
                .bind(positions)
                .bind(ids)
                .bind(errors)
                .bind(attempts)
                .fetch_one(&pool)
                .await
                .map_err(store_error)?;
            if allowed {
                Ok(())
            } else {
                Err(lease_fenced(generation))
            }
        })
    }

    fn dead_letters(&self, limit: u64) -> impl StoreFuture<Vec<DeadLetter>> {
        let sql = sql(
            self,
            &format!(
                "SELECT {RECORD_COLUMNS}, error, attempts, dead_at FROM __S__.outbox_dead_letters \
                 ORDER BY position LIMIT $1"
            ),
        );
        let pool = self.inner.pool.clone();
        timed(self.inner.query_timeout, async move {
            let rows = sqlx::query(sql)
                .bind(to_i64(limit))
                .fetch_all(&pool)
                .await
                .map_err(store_error)?;
            rows.iter()
                .map(|row| {
                    let record = decode_record(row)?;
                    let attempts: i32 = row.try_get("attempts").map_err(store_error)?;
                    Ok(DeadLetter {
                        error: row.try_get("error").map_err(store_error)?,
                        attempts: u32::try_from(attempts).unwrap_or(0),
                        dead_at: row.try_get("dead_at").map_err(store_error)?,
                        record,
                    })
                })
                .collect()
        })
    }

    fn requeue_dead_letters(&self, positions: &[u64]) -> impl StoreFuture<u64> {
        let sql = sql(self, "SELECT __S__.relay_requeue($1)");
        let pool = self.inner.pool.clone();
        let positions: Vec<i64> = positions.iter().map(|p| to_i64(*p)).collect();
        timed(self.inner.query_timeout, async move {
            let n: i64 = sqlx::query_scalar(sql)
                .bind(positions)
                .fetch_one(&pool)
                .await
                .map_err(store_error)?;
            to_u64(n, "the re-queued dead letters")
        })
    }

    fn outbox_len(&self) -> impl StoreFuture<u64> {
        let sql = Arc::clone(&self.inner.sql.outbox_len);
        let pool = self.inner.pool.clone();
        timed(self.inner.query_timeout, async move {
            let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
                .fetch_one(&pool)
                .await
                .map_err(store_error)?;
            to_u64(n, "the outbox")
        })
    }

    fn relay_status(&self) -> impl StoreFuture<RelayStatus> {
        let sql = sql(
            self,
            &format!(
                "SELECT (SELECT count(*) FROM __S__.outbox) AS pending, \
                        (SELECT count(*) FROM __S__.outbox_dead_letters) AS dead_letters, \
                        l.owner, l.generation, l.expires_at > clock_timestamp() AS held, \
                        l.last_error_position, l.last_error, l.last_error_at \
                 FROM (SELECT 1) AS one \
                 LEFT JOIN __S__.relay_leases l ON l.name = '{OUTBOX_LEASE}'"
            ),
        );
        let pool = self.inner.pool.clone();
        timed(self.inner.query_timeout, async move {
            let row = sqlx::query(sql)
                .fetch_one(&pool)
                .await
                .map_err(store_error)?;
            let get_u64 = |column: &str, what: &str| -> Result<Option<u64>, StoreError> {
                let value: Option<i64> = row.try_get(column).map_err(store_error)?;
                value.map(|v| to_u64(v, what)).transpose()
            };
            let pending = get_u64("pending", "the outbox")?.unwrap_or(0);
            let dead_letters = get_u64("dead_letters", "the dead letters")?.unwrap_or(0);
            let owner: Option<String> = row.try_get("owner").map_err(store_error)?;
            let generation = get_u64("generation", "the relay lease")?;
            let held: Option<bool> = row.try_get("held").map_err(store_error)?;
            let lease = match (owner, generation) {
                (Some(owner), Some(generation)) => Some(LeaseState {
                    owner,
                    generation,
                    held: held.unwrap_or(false),
                }),
                _ => None,
            };
            let last_position = get_u64("last_error_position", "the relay lease")?;
            let last_error: Option<String> = row.try_get("last_error").map_err(store_error)?;
            let last_at: Option<DateTime<Utc>> =
                row.try_get("last_error_at").map_err(store_error)?;
            let last_error = match (last_position, last_error, last_at) {
                (Some(position), Some(error), Some(at)) => Some(LastRejection {
                    position,
                    error,
                    at,
                }),
                _ => None,
            };
            Ok(RelayStatus {
                pending,
                dead_letters,
                last_error,
                lease,
            })
        })
    }
}

/// Decodes the [`RECORD_COLUMNS`] of a row.
fn decode_record(row: &PgRow) -> Result<OutboxRecord, StoreError> {
    let position: i64 = row.try_get("position").map_err(store_error)?;
    let location = || format!("outbox position {position}");
    let corrupt = |reason: String| StoreError::Corrupt {
        location: location(),
        reason,
    };
    let stream: &str = row.try_get("stream_id").map_err(store_error)?;
    let stream_id =
        StreamId::parse(stream).map_err(|e| corrupt(format!("invalid stream id: {e}")))?;
    let message_id: Uuid = row.try_get("message_id").map_err(store_error)?;
    let source_event_id: Uuid = row.try_get("source_event_id").map_err(store_error)?;
    let topic: String = row.try_get("topic").map_err(store_error)?;
    let key: String = row.try_get("key").map_err(store_error)?;
    let message_type: String = row.try_get("message_type").map_err(store_error)?;
    let schema_version: i64 = row.try_get("schema_version").map_err(store_error)?;
    let payload = row.try_get_raw("payload").map_err(store_error)?;
    let payload = json_text(&payload).map_err(corrupt)?;
    let metadata = row.try_get_raw("metadata").map_err(store_error)?;
    let metadata = json_text(&metadata).map_err(corrupt)?;
    let metadata =
        Metadata::from_json(metadata).map_err(|e| corrupt(format!("invalid metadata: {e}")))?;
    let recorded_at: DateTime<Utc> = row.try_get("recorded_at").map_err(store_error)?;
    Ok(OutboxRecord {
        position: to_u64(position, &location())?,
        stream_id,
        recorded_at,
        message: OutboxMessage {
            message_id,
            source_event_id,
            topic,
            key,
            message_type,
            schema_version: u32::try_from(schema_version)
                .map_err(|_| corrupt(format!("schema version {schema_version} is out of range")))?,
            payload: Bytes::copy_from_slice(payload),
            metadata,
        },
    })
}

/// SQL loading a checkpoint: `(position, generation)`.
pub(crate) const LOAD_CHECKPOINT: &str =
    "SELECT position, generation FROM __S__.checkpoints WHERE name = $1";

/// SQL starting a new generation of a checkpoint at position 0 (the row is kept, so generations
/// never go down); returns the generation.
pub(crate) const RESET_CHECKPOINT: &str = "SELECT __S__.checkpoint_reset($1)";

/// SQL starting a new generation of a checkpoint at its current position (creating it at 0):
/// returns `(position, generation)`, read and raised in one statement.
pub(crate) const FENCE_CHECKPOINT: &str =
    "SELECT fenced_position, fenced_generation FROM __S__.checkpoint_fence($1)";

/// A stored `(position, generation)` pair as a [`Checkpoint`].
pub(crate) fn checkpoint_of(name: &str, row: Option<(i64, i64)>) -> Result<Checkpoint, StoreError> {
    let what = || format!("checkpoint `{name}`");
    let (position, generation) = row.unwrap_or((0, 0));
    Ok(Checkpoint {
        position: to_u64(position, &what())?,
        generation: to_u64(generation, &what())?,
    })
}

/// The error of a save or a batch that names an older generation than the stored one.
pub(crate) fn checkpoint_fenced(name: &str, generation: u64, stored: Option<u64>) -> StoreError {
    StoreError::Fenced {
        resource: format!("the checkpoint of projection `{name}`"),
        reason: match stored {
            Some(stored) => format!(
                "generation {generation} is over; the checkpoint is at generation {stored} now \
                 (the projection was reset, or another consumer-group worker took the partition \
                 over)"
            ),
            None => format!(
                "generation {generation} is over; the projection was reset, or another \
                 consumer-group worker took the partition over"
            ),
        },
    }
}

impl CheckpointStore for PgStore {
    fn load_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        let sql = sql(self, LOAD_CHECKPOINT);
        let pool = self.inner.pool.clone();
        let name = name.to_owned();
        timed(self.inner.query_timeout, async move {
            let row: Option<(i64, i64)> = sqlx::query_as(sql)
                .bind(&name)
                .fetch_optional(&pool)
                .await
                .map_err(store_error)?;
            checkpoint_of(&name, row)
        })
    }

    fn save_checkpoint(&self, name: &str, checkpoint: Checkpoint) -> impl StoreFuture<bool> {
        let sql = sql(self, "SELECT __S__.checkpoint_save($1, $2, $3)");
        let pool = self.inner.pool.clone();
        let name = name.to_owned();
        timed(self.inner.query_timeout, async move {
            let outcome: i16 = sqlx::query_scalar(sql)
                .bind(&name)
                .bind(to_i64(checkpoint.generation))
                .bind(to_i64(checkpoint.position))
                .fetch_one(&pool)
                .await
                .map_err(store_error)?;
            match CheckpointSave::from_code(outcome) {
                Some(CheckpointSave::Fenced) => {
                    Err(checkpoint_fenced(&name, checkpoint.generation, None))
                }
                Some(CheckpointSave::Saved) => Ok(true),
                Some(CheckpointSave::NotHigher) => Ok(false),
                None => Err(StoreError::backend(format!(
                    "checkpoint_save returned the unknown code {outcome} for projection `{name}`"
                ))),
            }
        })
    }

    fn reset_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        let sql = sql(self, RESET_CHECKPOINT);
        let pool = self.inner.pool.clone();
        let name = name.to_owned();
        timed(self.inner.query_timeout, async move {
            let generation: i64 = sqlx::query_scalar(sql)
                .bind(&name)
                .fetch_one(&pool)
                .await
                .map_err(store_error)?;
            checkpoint_of(&name, Some((0, generation)))
        })
    }

    fn fence_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        let sql = sql(self, FENCE_CHECKPOINT);
        let pool = self.inner.pool.clone();
        let name = name.to_owned();
        timed(self.inner.query_timeout, async move {
            let row: (i64, i64) = sqlx::query_as(sql)
                .bind(&name)
                .fetch_one(&pool)
                .await
                .map_err(store_error)?;
            checkpoint_of(&name, Some(row))
        })
    }
}
