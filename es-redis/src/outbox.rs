//! The outbox side of the store ([`OutboxStore`]) and projection checkpoints
//! ([`CheckpointStore`]). Outbox records are written by the append script; see the crate docs,
//! section "Outbox, relay lease and checkpoints".

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::DateTime;
use es_core::store::StoreFuture;
use es_core::{
    CheckpointStore, Metadata, OutboxMessage, OutboxRecord, OutboxStore, StoreError, StreamId,
};
use redis::Value;
use uuid::Uuid;

use crate::decode;
use crate::error::store_error;
use crate::script::query;
use crate::{Inner, RedisStore};

/// Positions per `XDEL` in [`OutboxStore::mark_delivered`].
const DELETE_CHUNK: usize = 1000;

impl Inner {
    async fn int_script(
        &self,
        script: &crate::script::Lua,
        cmd: &redis::Cmd,
        location: impl FnOnce() -> String,
    ) -> Result<i64, StoreError> {
        let mut conn = self.conn.clone();
        match script.invoke(&mut conn, cmd).await {
            Ok(Value::Int(n)) => Ok(n),
            Ok(other) => Err(StoreError::backend(format!(
                "unexpected reply from a script ({}): {other:?}",
                location()
            ))),
            Err(err) => Err(store_error(err, location)),
        }
    }
}

fn lease_location() -> String {
    "the relay lease".to_owned()
}

fn outbox_location() -> String {
    "the outbox".to_owned()
}

impl OutboxStore for RedisStore {
    fn acquire_relay_lease(&self, owner: &str, ttl: Duration) -> impl StoreFuture<bool> {
        let inner = Arc::clone(&self.inner);
        let owner = owner.to_owned();
        async move {
            // `PX` takes whole milliseconds, at least one.
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            let mut cmd = inner.acquire_lease.command(&[inner.keys.relay_lease()]);
            cmd.arg(&owner).arg(ms);
            let held = inner
                .int_script(&inner.acquire_lease, &cmd, lease_location)
                .await?;
            Ok(held == 1)
        }
    }

    fn release_relay_lease(&self, owner: &str) -> impl StoreFuture<()> {
        let inner = Arc::clone(&self.inner);
        let owner = owner.to_owned();
        async move {
            let mut cmd = inner.release_lease.command(&[inner.keys.relay_lease()]);
            cmd.arg(&owner);
            inner
                .int_script(&inner.release_lease, &cmd, lease_location)
                .await?;
            Ok(())
        }
    }

    fn pending_outbox(&self, limit: u64) -> impl StoreFuture<Vec<OutboxRecord>> {
        let inner = Arc::clone(&self.inner);
        async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let mut cmd = redis::cmd("XRANGE");
            cmd.arg(inner.keys.outbox())
                .arg("-")
                .arg("+")
                .arg("COUNT")
                // Redis takes a signed 64-bit count.
                .arg(limit.min(i64::MAX as u64));
            let mut conn = inner.conn.clone();
            let reply = query(&mut conn, &cmd)
                .await
                .map_err(|e| store_error(e, outbox_location))?;
            decode::entries(reply, decode::Source::Outbox)?
                .into_iter()
                .map(|(id, fields)| record(&id, fields))
                .collect()
        }
    }

    fn mark_delivered(&self, positions: &[u64]) -> impl StoreFuture<()> {
        let inner = Arc::clone(&self.inner);
        let ids: Vec<String> = positions.iter().map(|p| format!("{p}-0")).collect();
        async move {
            let mut conn = inner.conn.clone();
            for chunk in ids.chunks(DELETE_CHUNK) {
                let mut cmd = redis::cmd("XDEL");
                cmd.arg(inner.keys.outbox()).arg(chunk);
                query(&mut conn, &cmd)
                    .await
                    .map_err(|e| store_error(e, outbox_location))?;
            }
            Ok(())
        }
    }

    fn outbox_len(&self) -> impl StoreFuture<u64> {
        let inner = Arc::clone(&self.inner);
        async move {
            let mut conn = inner.conn.clone();
            let reply = query(&mut conn, redis::cmd("XLEN").arg(inner.keys.outbox()))
                .await
                .map_err(|e| store_error(e, outbox_location))?;
            decode::counter(reply, &outbox_location())
        }
    }
}

/// Decodes one outbox entry (written by the append script).
fn record(id: &Value, fields: Vec<Value>) -> Result<OutboxRecord, StoreError> {
    let position = decode::entry_number(id).ok_or_else(|| StoreError::Corrupt {
        location: outbox_location(),
        reason: "unreadable entry id".to_owned(),
    })?;
    let fail = |reason: String| StoreError::Corrupt {
        location: format!("outbox position {position}"),
        reason,
    };
    let mut fields = decode::Fields::new(fields).map_err(|r| fail(r.to_owned()))?;
    let stream = fields.text("stream").map_err(&fail)?;
    let stream_id = StreamId::parse(&stream).map_err(|e| fail(format!("bad stream id: {e}")))?;
    let uuid = |fields: &mut decode::Fields, name: &str| -> Result<Uuid, StoreError> {
        let text = fields.text(name).map_err(&fail)?;
        Uuid::parse_str(&text).map_err(|e| fail(format!("bad `{name}`: {e}")))
    };
    let message_id = uuid(&mut fields, "message_id")?;
    let source_event_id = uuid(&mut fields, "source")?;
    let topic = fields.text("topic").map_err(&fail)?;
    let key = fields.text("key").map_err(&fail)?;
    let message_type = fields.text("type").map_err(&fail)?;
    let schema_version = u32::try_from(fields.number("schema").map_err(&fail)?)
        .map_err(|_| fail("schema version out of range".to_owned()))?;
    let payload = Bytes::from(fields.bytes("payload").map_err(&fail)?);
    let metadata = Metadata::from_json(&fields.bytes("metadata").map_err(&fail)?)
        .map_err(|e| fail(format!("bad metadata: {e}")))?;
    let micros = fields.number("recorded_at").map_err(&fail)?;
    let recorded_at = i64::try_from(micros)
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(|| fail("recorded_at out of range".to_owned()))?;
    Ok(OutboxRecord {
        position,
        stream_id,
        recorded_at,
        message: OutboxMessage {
            message_id,
            source_event_id,
            topic,
            key,
            message_type,
            schema_version,
            payload,
            metadata,
        },
    })
}

fn checkpoint_location(name: &str) -> String {
    format!("the checkpoint of projection `{name}`")
}

impl CheckpointStore for RedisStore {
    fn load_checkpoint(&self, name: &str) -> impl StoreFuture<u64> {
        let inner = Arc::clone(&self.inner);
        let name = name.to_owned();
        async move {
            let mut conn = inner.conn.clone();
            let mut cmd = redis::cmd("HGET");
            cmd.arg(inner.keys.checkpoints()).arg(&name);
            let value = query(&mut conn, &cmd)
                .await
                .map_err(|e| store_error(e, || checkpoint_location(&name)))?;
            decode::counter(value, &checkpoint_location(&name))
        }
    }

    fn save_checkpoint(&self, name: &str, position: u64) -> impl StoreFuture<bool> {
        let inner = Arc::clone(&self.inner);
        let name = name.to_owned();
        async move {
            // Nothing stored reads as 0, so 0 is never higher.
            if position == 0 {
                return Ok(false);
            }
            let mut cmd = inner.save_checkpoint.command(&[inner.keys.checkpoints()]);
            cmd.arg(&name).arg(position);
            match inner
                .int_script(&inner.save_checkpoint, &cmd, || checkpoint_location(&name))
                .await?
            {
                -1 => Err(StoreError::Corrupt {
                    location: checkpoint_location(&name),
                    reason: "the stored checkpoint is not a number; nothing was written".to_owned(),
                }),
                written => Ok(written == 1),
            }
        }
    }

    fn reset_checkpoint(&self, name: &str) -> impl StoreFuture<()> {
        let inner = Arc::clone(&self.inner);
        let name = name.to_owned();
        async move {
            let mut conn = inner.conn.clone();
            let mut cmd = redis::cmd("HDEL");
            cmd.arg(inner.keys.checkpoints()).arg(&name);
            query(&mut conn, &cmd)
                .await
                .map_err(|e| store_error(e, || checkpoint_location(&name)))?;
            Ok(())
        }
    }
}
