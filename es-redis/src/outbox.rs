//! The outbox side of the store ([`OutboxStore`]: pending records, delivery marks, dead letters,
//! the relay lease) and projection checkpoints ([`CheckpointStore`]), with their fencing
//! generations. Outbox records are written by the append script; see the crate docs, section
//! "Outbox, relay lease and checkpoints". The scripts here (their code in `outbox/*.lua`) are
//! invoked by SHA and loaded on `NOSCRIPT` like the append script.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use es_core::contract::Checkpoint;
use es_core::contract::StoreFuture;
use es_core::contract::{DeadLetter, Delivered, LastRejection, LeaseState, Rejection, RelayStatus};
use es_core::{
    CheckpointStore, Metadata, OutboxMessage, OutboxRecord, OutboxStore, StoreError, StreamId,
};
use redis::Value;
use uuid::Uuid;

use crate::decode;
use crate::error::store_error;
use crate::keys::PartitionKeys;
use crate::protocol::CheckpointSave;
use crate::script::{query, Lua};
use crate::{Inner, RedisStore};

/// The relay lease, taken or renewed.
///
/// KEYS: 1 the relay hash (`owner`, `generation`, `expires` in ms of the server clock). ARGV:
/// owner, time to live in milliseconds. If the lease is held (not expired) by another owner,
/// replies -1. If the caller holds it, extends it and replies its generation. Otherwise (free,
/// released, expired: whoever held it) raises the generation, takes it and replies the new
/// generation. Replies -2, writing nothing, if the hash holds something the store did not write.
pub(crate) const ACQUIRE_LEASE: &str = include_str!("outbox/acquire_lease.lua");

/// The relay lease, given up by its owner in its generation (and only then): it expires now,
/// keeping its generation.
///
/// KEYS: 1 the relay hash. ARGV: owner, generation. Replies 1 if released, 0 if not held so.
pub(crate) const RELEASE_LEASE: &str = include_str!("outbox/release_lease.lua");

/// Delivery marks: deletes outbox entries if the caller's generation is the lease's, each only
/// while it still holds the message delivered (a position handed out again after a lost tail
/// holds another one).
///
/// KEYS: 1 the relay hash, 2 the outbox. ARGV: generation, then per record its outbox position
/// and message id. Replies 1 if allowed (positions not in the outbox, or holding another message,
/// are ignored), 0 if the generation moved on (nothing deleted).
const MARK_DELIVERED: &str = include_str!("outbox/mark_delivered.lua");

/// Dead-lettering: moves outbox entries to the dead letters if the caller's generation is the
/// lease's, and records the last one moved as the lease's last error.
///
/// KEYS: 1 the relay hash, 2 the outbox, 3 the dead letters (sorted set). ARGV: generation, then
/// per record its outbox position, message id, error text and attempts (an entry holding another
/// message is left alone). Each dead letter is one member,
/// scored by its outbox position: the entry's fields and values, then `position`, `error`,
/// `attempts` and `dead_at` (µs, server clock) with theirs, each as `<length>:<bytes>`, so any
/// byte can appear. Replies 1 if allowed (positions not in the outbox are ignored), 0 if the
/// generation moved on (nothing moved).
const DEAD_LETTER: &str = include_str!("outbox/dead_letter.lua");

/// Re-queueing: moves dead letters back to the end of the outbox with new outbox positions (from
/// the index hash's `outbox` counter, like appends), in the order of their old positions.
///
/// KEYS: 1 the index hash, 2 the outbox, 3 the dead letters. ARGV: old positions, ascending.
/// Replies the number moved, or -1 (nothing written) if the outbox holds an entry beyond the
/// counter (written behind the store's back).
const REQUEUE: &str = include_str!("outbox/requeue.lua");

/// A checkpoint and its generation, read together.
///
/// KEYS: 1 the checkpoint hash, 2 the generation hash. ARGV: name. Replies `{position,
/// generation}`, each nil if not stored.
const LOAD_CHECKPOINT: &str = include_str!("outbox/load_checkpoint.lua");

/// A projection checkpoint, raised only, within its generation.
///
/// KEYS: 1 the checkpoint hash, 2 the generation hash. ARGV: name, generation, position (both
/// decimal). Positions are compared as decimal strings (length, then digits), exact over the
/// whole `u64` range where Lua's numbers (doubles) are not. Replies 1 if written, 0 if the stored
/// checkpoint is as high or higher, -1 if the stored value is not a number, -2 if the generation
/// is not the stored one (nothing written in either case).
pub(crate) const SAVE_CHECKPOINT: &str = include_str!("outbox/save_checkpoint.lua");

/// A new generation of a checkpoint, at position 0.
///
/// KEYS: 1 the checkpoint hash, 2 the generation hash. ARGV: name. Replies the new generation.
const RESET_CHECKPOINT: &str = include_str!("outbox/reset_checkpoint.lua");

/// A new generation of a checkpoint at its current position: the consumer-group takeover
/// ([`CheckpointStore::fence_checkpoint`]).
///
/// KEYS: 1 the checkpoint hash, 2 the generation hash. ARGV: name. Raises the generation
/// (`HINCRBY`), creates the checkpoint at 0 if it has none, and replies `{position,
/// generation}` (the position as its decimal string, exact over the whole `u64` range); replies
/// -1 if the stored position is not a number, -2 if the stored generation is not one, writing
/// nothing in either case.
const FENCE_CHECKPOINT: &str = include_str!("outbox/fence_checkpoint.lua");

/// The scripts of this module that the store does not load when it is built.
struct Scripts {
    mark_delivered: Lua,
    dead_letter: Lua,
    requeue: Lua,
    load_checkpoint: Lua,
    reset_checkpoint: Lua,
    fence_checkpoint: Lua,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    mark_delivered: Lua::new(MARK_DELIVERED),
    dead_letter: Lua::new(DEAD_LETTER),
    requeue: Lua::new(REQUEUE),
    load_checkpoint: Lua::new(LOAD_CHECKPOINT),
    reset_checkpoint: Lua::new(RESET_CHECKPOINT),
    fence_checkpoint: Lua::new(FENCE_CHECKPOINT),
});

/// Positions per `XRANGE` of dead letters and per `ZRANGE` page.
const PAGE: u64 = 1000;

impl Inner {
    async fn int_script(
        &self,
        script: &Lua,
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

fn dead_location() -> String {
    "the outbox dead letters".to_owned()
}

fn lease_fenced(generation: u64) -> StoreError {
    StoreError::Fenced {
        resource: "the outbox relay lease".to_owned(),
        reason: format!(
            "generation {generation} is no longer the lease's: another relay took it over"
        ),
    }
}

impl RedisStore {
    /// The keys of the partition whose outbox this handle addresses: the one it was scoped to,
    /// or the single feed's; [`StoreError::Partitioned`] for an unscoped handle of a store with
    /// several partitions.
    fn outbox_keys(&self) -> Result<PartitionKeys, StoreError> {
        let keys = &self.inner.keys;
        let partition = match self.outbox_scope {
            Some(partition) => partition,
            None => keys.partitioning().single_feed()?,
        };
        keys.partition(partition)
            .cloned()
            .ok_or(StoreError::NoSuchPartition {
                partition,
                partitions: keys.partitions(),
            })
    }
}

impl OutboxStore for RedisStore {
    fn outbox_partitions(&self) -> u32 {
        self.inner.keys.partitioning().partitions().end
    }

    fn outbox_partition(&self, partition: u32) -> Result<Self, StoreError> {
        self.inner.keys.partitioning().check(partition)?;
        Ok(Self {
            inner: Arc::clone(&self.inner),
            outbox_scope: Some(partition),
        })
    }

    fn acquire_relay_lease(&self, owner: &str, ttl: Duration) -> impl StoreFuture<Option<u64>> {
        let inner = Arc::clone(&self.inner);
        let keys = self.outbox_keys();
        let owner = owner.to_owned();
        async move {
            let keys = keys?;
            // Whole milliseconds, at least one.
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            let mut cmd = inner.acquire_lease.command(&[keys.relay_lease()]);
            cmd.arg(&owner).arg(ms);
            match inner
                .int_script(&inner.acquire_lease, &cmd, lease_location)
                .await?
            {
                -1 => Ok(None),
                generation if generation > 0 => Ok(Some(generation.unsigned_abs())),
                _ => Err(StoreError::Corrupt {
                    location: lease_location(),
                    reason: "the lease hash holds fields that are not numbers; nothing was written"
                        .to_owned(),
                }),
            }
        }
    }

    fn release_relay_lease(&self, owner: &str, generation: u64) -> impl StoreFuture<()> {
        let inner = Arc::clone(&self.inner);
        let keys = self.outbox_keys();
        let owner = owner.to_owned();
        async move {
            let keys = keys?;
            let mut cmd = inner.release_lease.command(&[keys.relay_lease()]);
            cmd.arg(&owner).arg(generation);
            inner
                .int_script(&inner.release_lease, &cmd, lease_location)
                .await?;
            Ok(())
        }
    }

    fn pending_outbox(&self, limit: u64) -> impl StoreFuture<Vec<OutboxRecord>> {
        self.pending_outbox_after(0, limit)
    }

    fn pending_outbox_after(&self, after: u64, limit: u64) -> impl StoreFuture<Vec<OutboxRecord>> {
        let inner = Arc::clone(&self.inner);
        let keys = self.outbox_keys();
        async move {
            let keys = keys?;
            if limit == 0 || after == u64::MAX {
                return Ok(Vec::new());
            }
            // Entry ids are `<position>-0`: the range starts at the first position above `after`.
            let mut cmd = redis::cmd("XRANGE");
            cmd.arg(keys.outbox())
                .arg(format!("{}-0", after + 1))
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
                .map(|(id, fields)| {
                    let position =
                        decode::entry_number(&id).ok_or_else(|| StoreError::Corrupt {
                            location: outbox_location(),
                            reason: "unreadable entry id".to_owned(),
                        })?;
                    record(position, fields)
                })
                .collect()
        }
    }

    fn mark_delivered(&self, generation: u64, delivered: &[Delivered]) -> impl StoreFuture<()> {
        let inner = Arc::clone(&self.inner);
        let keys = self.outbox_keys();
        let delivered = delivered.to_vec();
        async move {
            let keys = keys?;
            let script = &SCRIPTS.mark_delivered;
            let mut cmd = script.command(&[keys.relay_lease(), keys.outbox()]);
            cmd.arg(generation);
            let mut buf = Uuid::encode_buffer();
            for d in &delivered {
                cmd.arg(d.position)
                    .arg(&*d.message_id.hyphenated().encode_lower(&mut buf));
            }
            match inner.int_script(script, &cmd, outbox_location).await? {
                1 => Ok(()),
                _ => Err(lease_fenced(generation)),
            }
        }
    }

    fn dead_letter(&self, generation: u64, rejections: &[Rejection]) -> impl StoreFuture<()> {
        let inner = Arc::clone(&self.inner);
        let keys = self.outbox_keys();
        let rejections = rejections.to_vec();
        async move {
            let keys = keys?;
            let script = &SCRIPTS.dead_letter;
            let mut cmd = script.command(&[keys.relay_lease(), keys.outbox(), keys.dead_letters()]);
            cmd.arg(generation);
            let mut buf = Uuid::encode_buffer();
            for r in &rejections {
                cmd.arg(r.position)
                    .arg(&*r.message_id.hyphenated().encode_lower(&mut buf))
                    .arg(&r.error)
                    .arg(r.attempts);
            }
            match inner.int_script(script, &cmd, dead_location).await? {
                1 => Ok(()),
                _ => Err(lease_fenced(generation)),
            }
        }
    }

    fn dead_letters(&self, limit: u64) -> impl StoreFuture<Vec<DeadLetter>> {
        let inner = Arc::clone(&self.inner);
        let keys = self.outbox_keys();
        async move {
            let keys = keys?;
            let mut letters = Vec::new();
            let mut after = "-inf".to_owned();
            while (letters.len() as u64) < limit {
                let take = (limit - letters.len() as u64).min(PAGE);
                let mut cmd = redis::cmd("ZRANGEBYSCORE");
                cmd.arg(keys.dead_letters())
                    .arg(&after)
                    .arg("+inf")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(take);
                let mut conn = inner.conn.clone();
                let reply = query(&mut conn, &cmd)
                    .await
                    .map_err(|e| store_error(e, dead_location))?;
                let Value::Array(members) = reply else {
                    return Err(StoreError::backend(
                        "ZRANGEBYSCORE of the dead letters returned no array",
                    ));
                };
                let page = members.len() as u64;
                for member in members {
                    let Value::BulkString(member) = member else {
                        return Err(StoreError::Corrupt {
                            location: dead_location(),
                            reason: "a member is not a string".to_owned(),
                        });
                    };
                    letters.push(dead_letter(&member)?);
                }
                match letters.last() {
                    Some(last) if page == take => after = format!("({}", last.record.position),
                    _ => break,
                }
            }
            Ok(letters)
        }
    }

    fn requeue_dead_letters(&self, positions: &[u64]) -> impl StoreFuture<u64> {
        let inner = Arc::clone(&self.inner);
        let keys = self.outbox_keys();
        let mut positions = positions.to_vec();
        positions.sort_unstable();
        positions.dedup();
        async move {
            let keys = keys?;
            if positions.is_empty() {
                return Ok(0);
            }
            let script = &SCRIPTS.requeue;
            let mut cmd = script.command(&[keys.index(), keys.outbox(), keys.dead_letters()]);
            cmd.arg(&positions);
            let n = inner.int_script(script, &cmd, dead_location).await?;
            u64::try_from(n).map_err(|_| StoreError::Corrupt {
                location: outbox_location(),
                reason: "the outbox holds entries beyond its counter; nothing was re-queued"
                    .to_owned(),
            })
        }
    }

    fn outbox_len(&self) -> impl StoreFuture<u64> {
        let inner = Arc::clone(&self.inner);
        let keys = self.outbox_keys();
        async move {
            let keys = keys?;
            let mut conn = inner.conn.clone();
            let reply = query(&mut conn, redis::cmd("XLEN").arg(keys.outbox()))
                .await
                .map_err(|e| store_error(e, outbox_location))?;
            decode::counter(reply, &outbox_location())
        }
    }

    fn relay_status(&self) -> impl StoreFuture<RelayStatus> {
        let inner = Arc::clone(&self.inner);
        let keys = self.outbox_keys();
        async move {
            let keys = keys?;
            let mut conn = inner.conn.clone();
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("XLEN")
                .arg(keys.outbox())
                .cmd("ZCARD")
                .arg(keys.dead_letters())
                .cmd("HMGET")
                .arg(keys.relay_lease())
                .arg("owner")
                .arg("generation")
                .arg("expires")
                .arg("last_error_position")
                .arg("last_error")
                .arg("last_error_at")
                .cmd("TIME");
            let (pending, dead, lease, time): (u64, u64, Vec<Option<String>>, (u64, u64)) = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| store_error(e, lease_location))?;
            let now_ms = time.0 * 1000 + time.1 / 1000;
            let corrupt = |what: &str| StoreError::Corrupt {
                location: lease_location(),
                reason: format!("field `{what}` is not a number"),
            };
            let number = |i: usize, what: &str| -> Result<Option<u64>, StoreError> {
                lease
                    .get(i)
                    .cloned()
                    .flatten()
                    .map(|v| v.parse().map_err(|_| corrupt(what)))
                    .transpose()
            };
            let generation = number(1, "generation")?;
            let expires = number(2, "expires")?;
            let lease_state = match (lease.first().cloned().flatten(), generation) {
                (Some(owner), Some(generation)) => Some(LeaseState {
                    owner,
                    generation,
                    held: expires.is_some_and(|e| e > now_ms),
                }),
                _ => None,
            };
            let last_error = match (
                number(3, "last_error_position")?,
                lease.get(4).cloned().flatten(),
                number(5, "last_error_at")?,
            ) {
                (Some(position), Some(error), Some(at)) => Some(LastRejection {
                    position,
                    error,
                    at: micros(at).ok_or_else(|| corrupt("last_error_at"))?,
                }),
                _ => None,
            };
            Ok(RelayStatus {
                pending,
                dead_letters: dead,
                last_error,
                lease: lease_state,
            })
        }
    }
}

fn micros(value: u64) -> Option<DateTime<Utc>> {
    i64::try_from(value)
        .ok()
        .and_then(DateTime::from_timestamp_micros)
}

/// Decodes one outbox entry's fields (written by the append script).
fn record(position: u64, fields: Vec<Value>) -> Result<OutboxRecord, StoreError> {
    let mut fields = decode::Fields::new(fields).map_err(|reason| StoreError::Corrupt {
        location: format!("outbox position {position}"),
        reason: reason.to_owned(),
    })?;
    record_from(position, &mut fields)
}

fn record_from(position: u64, fields: &mut decode::Fields) -> Result<OutboxRecord, StoreError> {
    let fail = |reason: String| StoreError::Corrupt {
        location: format!("outbox position {position}"),
        reason,
    };
    let stream = fields.text("stream").map_err(&fail)?;
    let stream_id = StreamId::parse(&stream).map_err(|e| fail(format!("bad stream id: {e}")))?;
    let uuid = |fields: &mut decode::Fields, name: &str| -> Result<Uuid, StoreError> {
        let text = fields.text(name).map_err(&fail)?;
        Uuid::parse_str(&text).map_err(|e| fail(format!("bad `{name}`: {e}")))
    };
    let message_id = uuid(fields, "message_id")?;
    let source_event_id = uuid(fields, "source")?;
    let topic = fields.text("topic").map_err(&fail)?;
    let key = fields.text("key").map_err(&fail)?;
    let message_type = fields.text("type").map_err(&fail)?;
    let schema_version = u32::try_from(fields.number("schema").map_err(&fail)?)
        .map_err(|_| fail("schema version out of range".to_owned()))?;
    let payload = Bytes::from(fields.bytes("payload").map_err(&fail)?);
    let metadata = Metadata::from_json(&fields.bytes("metadata").map_err(&fail)?)
        .map_err(|e| fail(format!("bad metadata: {e}")))?;
    let recorded_at = micros(fields.number("recorded_at").map_err(&fail)?)
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

/// Decodes a dead-letter member (see [`DEAD_LETTER`]).
fn dead_letter(member: &[u8]) -> Result<DeadLetter, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        location: dead_location(),
        reason,
    };
    let mut values = Vec::new();
    let mut rest = member;
    while !rest.is_empty() {
        let colon = rest
            .iter()
            .position(|b| *b == b':')
            .ok_or_else(|| corrupt("a member is not a list of `<length>:<bytes>`".to_owned()))?;
        let len: usize = std::str::from_utf8(&rest[..colon])
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| corrupt("a member has an unreadable length".to_owned()))?;
        let value = rest
            .get(colon + 1..colon + 1 + len)
            .ok_or_else(|| corrupt("a member is cut short".to_owned()))?;
        values.push(Value::BulkString(value.to_vec()));
        rest = &rest[colon + 1 + len..];
    }
    let mut fields = decode::Fields::new(values).map_err(|r| corrupt(r.to_owned()))?;
    let position = fields.number("position").map_err(&corrupt)?;
    let fail = |reason: String| StoreError::Corrupt {
        location: format!("dead letter at outbox position {position}"),
        reason,
    };
    let error = fields.text("error").map_err(&fail)?;
    let attempts = u32::try_from(fields.number("attempts").map_err(&fail)?)
        .map_err(|_| fail("attempts out of range".to_owned()))?;
    let dead_at = micros(fields.number("dead_at").map_err(&fail)?)
        .ok_or_else(|| fail("dead_at out of range".to_owned()))?;
    Ok(DeadLetter {
        record: record_from(position, &mut fields)?,
        error,
        attempts,
        dead_at,
    })
}

fn checkpoint_location(name: &str) -> String {
    format!("the checkpoint of projection `{name}`")
}

fn number(value: Value, what: &str) -> Result<u64, StoreError> {
    decode::counter(value, what)
}

impl CheckpointStore for RedisStore {
    fn load_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        checkpoint_call(
            Arc::clone(&self.inner),
            &SCRIPTS.load_checkpoint,
            name.to_owned(),
            "loading",
        )
    }

    fn save_checkpoint(&self, name: &str, checkpoint: Checkpoint) -> impl StoreFuture<bool> {
        let inner = Arc::clone(&self.inner);
        let name = name.to_owned();
        async move {
            let mut cmd = inner.save_checkpoint.command(&[
                inner.keys.checkpoints(),
                inner.keys.checkpoint_generations(),
            ]);
            cmd.arg(&name)
                .arg(checkpoint.generation)
                .arg(checkpoint.position);
            let code = inner
                .int_script(&inner.save_checkpoint, &cmd, || checkpoint_location(&name))
                .await?;
            match CheckpointSave::from_code(code) {
                Some(CheckpointSave::Fenced) => Err(StoreError::Fenced {
                    resource: checkpoint_location(&name),
                    reason: format!(
                        "generation {} is over; the projection was reset",
                        checkpoint.generation
                    ),
                }),
                Some(CheckpointSave::NotANumber) => Err(StoreError::Corrupt {
                    location: checkpoint_location(&name),
                    reason: "the stored checkpoint is not a number; nothing was written".to_owned(),
                }),
                Some(CheckpointSave::Saved) => Ok(true),
                Some(CheckpointSave::NotHigher) => Ok(false),
                None => Err(StoreError::backend(format!(
                    "unexpected reply {code} from the checkpoint script for {}",
                    checkpoint_location(&name)
                ))),
            }
        }
    }

    fn reset_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        let inner = Arc::clone(&self.inner);
        let name = name.to_owned();
        async move {
            let script = &SCRIPTS.reset_checkpoint;
            let mut cmd = script.command(&[
                inner.keys.checkpoints(),
                inner.keys.checkpoint_generations(),
            ]);
            cmd.arg(&name);
            let generation = inner
                .int_script(script, &cmd, || checkpoint_location(&name))
                .await?;
            Ok(Checkpoint {
                position: 0,
                generation: u64::try_from(generation).map_err(|_| StoreError::Corrupt {
                    location: checkpoint_location(&name),
                    reason: "the checkpoint's generation is negative".to_owned(),
                })?,
            })
        }
    }

    fn fence_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        checkpoint_call(
            Arc::clone(&self.inner),
            &SCRIPTS.fence_checkpoint,
            name.to_owned(),
            "fencing",
        )
    }
}

/// Runs a checkpoint script that answers `[position, generation]` (or -1 / -2 when the stored
/// position / generation is not a number) for checkpoint `name`; `doing` names the call in
/// errors.
async fn checkpoint_call(
    inner: Arc<crate::Inner>,
    script: &'static Lua,
    name: String,
    doing: &'static str,
) -> Result<Checkpoint, StoreError> {
    let name = name.as_str();
    let mut cmd = script.command(&[
        inner.keys.checkpoints(),
        inner.keys.checkpoint_generations(),
    ]);
    cmd.arg(name);
    let mut conn = inner.conn.clone();
    let reply = script
        .invoke(&mut conn, &cmd)
        .await
        .map_err(|e| store_error(e, || checkpoint_location(name)))?;
    let location = checkpoint_location(name);
    let corrupt = |what: &str| StoreError::Corrupt {
        location: location.clone(),
        reason: format!("the stored {what} is not a number; nothing was written"),
    };
    match reply {
        Value::Array(pair) => {
            let mut pair = pair.into_iter();
            let position = number(pair.next().unwrap_or(Value::Nil), &location)?;
            let generation = number(pair.next().unwrap_or(Value::Nil), &location)?;
            Ok(Checkpoint {
                position,
                generation,
            })
        }
        Value::Int(-1) => Err(corrupt("checkpoint")),
        Value::Int(-2) => Err(corrupt("generation")),
        other => Err(StoreError::backend(format!(
            "unexpected reply {doing} {location}: {other:?}"
        ))),
    }
}
