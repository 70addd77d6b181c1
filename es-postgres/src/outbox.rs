//! The outbox side of [`PgStore`]: pending records, delivery marks, the relay lease, and
//! projection checkpoints.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use es_core::store::StoreFuture;
use es_core::{
    CheckpointStore, Metadata, OutboxMessage, OutboxRecord, OutboxStore, StoreError, StreamId,
};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

use crate::codec::{json_text, to_i64, to_u64};
use crate::error::store_error;
use crate::PgStore;

impl OutboxStore for PgStore {
    fn acquire_relay_lease(&self, owner: &str, ttl: Duration) -> impl StoreFuture<bool> {
        let sql = Arc::clone(&self.inner.sql.acquire_lease);
        let pool = self.inner.pool.clone();
        let owner = owner.to_owned();
        async move {
            let ttl = i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX);
            let done = sqlx::query(AssertSqlSafe(sql))
                .bind(owner)
                .bind(ttl)
                .execute(&pool)
                .await
                .map_err(store_error)?;
            Ok(done.rows_affected() == 1)
        }
    }

    fn release_relay_lease(&self, owner: &str) -> impl StoreFuture<()> {
        let sql = Arc::clone(&self.inner.sql.release_lease);
        let pool = self.inner.pool.clone();
        let owner = owner.to_owned();
        async move {
            sqlx::query(AssertSqlSafe(sql))
                .bind(owner)
                .execute(&pool)
                .await
                .map_err(store_error)?;
            Ok(())
        }
    }

    fn pending_outbox(&self, limit: u64) -> impl StoreFuture<Vec<OutboxRecord>> {
        let sql = Arc::clone(&self.inner.sql.pending_outbox);
        let pool = self.inner.pool.clone();
        async move {
            let rows = sqlx::query(AssertSqlSafe(sql))
                .bind(to_i64(limit))
                .fetch_all(&pool)
                .await
                .map_err(store_error)?;
            rows.iter().map(decode_record).collect()
        }
    }

    fn mark_delivered(&self, positions: &[u64]) -> impl StoreFuture<()> {
        let sql = Arc::clone(&self.inner.sql.mark_delivered);
        let pool = self.inner.pool.clone();
        let positions: Vec<i64> = positions.iter().map(|p| to_i64(*p)).collect();
        async move {
            if positions.is_empty() {
                return Ok(());
            }
            sqlx::query(AssertSqlSafe(sql))
                .bind(positions)
                .execute(&pool)
                .await
                .map_err(store_error)?;
            Ok(())
        }
    }

    fn outbox_len(&self) -> impl StoreFuture<u64> {
        let sql = Arc::clone(&self.inner.sql.outbox_len);
        let pool = self.inner.pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
                .fetch_one(&pool)
                .await
                .map_err(store_error)?;
            to_u64(n, "the outbox")
        }
    }
}

/// Decodes a row of the `pending_outbox` query.
fn decode_record(row: &PgRow) -> Result<OutboxRecord, StoreError> {
    let position: i64 = row.try_get(0).map_err(store_error)?;
    let location = || format!("outbox position {position}");
    let corrupt = |reason: String| StoreError::Corrupt {
        location: location(),
        reason,
    };
    let stream: &str = row.try_get(1).map_err(store_error)?;
    let stream_id =
        StreamId::parse(stream).map_err(|e| corrupt(format!("invalid stream id: {e}")))?;
    let message_id: Uuid = row.try_get(2).map_err(store_error)?;
    let source_event_id: Uuid = row.try_get(3).map_err(store_error)?;
    let topic: String = row.try_get(4).map_err(store_error)?;
    let key: String = row.try_get(5).map_err(store_error)?;
    let message_type: String = row.try_get(6).map_err(store_error)?;
    let schema_version: i64 = row.try_get(7).map_err(store_error)?;
    let payload = row.try_get_raw(8).map_err(store_error)?;
    let payload = json_text(&payload).map_err(corrupt)?;
    let metadata = row.try_get_raw(9).map_err(store_error)?;
    let metadata = json_text(&metadata).map_err(corrupt)?;
    let metadata =
        Metadata::from_json(metadata).map_err(|e| corrupt(format!("invalid metadata: {e}")))?;
    let recorded_at: DateTime<Utc> = row.try_get(10).map_err(store_error)?;
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

impl CheckpointStore for PgStore {
    fn load_checkpoint(&self, name: &str) -> impl StoreFuture<u64> {
        let sql = Arc::clone(&self.inner.sql.load_checkpoint);
        let pool = self.inner.pool.clone();
        let name = name.to_owned();
        async move {
            let position: Option<i64> = sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(&name)
                .fetch_optional(&pool)
                .await
                .map_err(store_error)?;
            to_u64(position.unwrap_or(0), &format!("checkpoint `{name}`"))
        }
    }

    fn save_checkpoint(&self, name: &str, position: u64) -> impl StoreFuture<bool> {
        let sql = Arc::clone(&self.inner.sql.save_checkpoint);
        let pool = self.inner.pool.clone();
        let name = name.to_owned();
        async move {
            // No checkpoint reads as 0, so 0 never raises one.
            if position == 0 {
                return Ok(false);
            }
            let done = sqlx::query(AssertSqlSafe(sql))
                .bind(name)
                .bind(to_i64(position))
                .execute(&pool)
                .await
                .map_err(store_error)?;
            Ok(done.rows_affected() == 1)
        }
    }

    fn reset_checkpoint(&self, name: &str) -> impl StoreFuture<()> {
        let sql = Arc::clone(&self.inner.sql.reset_checkpoint);
        let pool = self.inner.pool.clone();
        let name = name.to_owned();
        async move {
            sqlx::query(AssertSqlSafe(sql))
                .bind(name)
                .execute(&pool)
                .await
                .map_err(store_error)?;
            Ok(())
        }
    }
}
