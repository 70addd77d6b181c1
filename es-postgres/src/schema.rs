//! Validated schema names and the SQL text built from them.

use std::fmt;
use std::sync::Arc;

use crate::Error;

/// A validated PostgreSQL schema name for the store's tables.
///
/// The name is 1 to [`SchemaName::MAX_LEN`] bytes of lowercase ASCII letters, digits and `_`,
/// starts with a letter or `_`, and does not start with `pg_` (reserved by PostgreSQL). Anything
/// else (quotes, semicolons, spaces, upper case, unicode, overlong names) is rejected with
/// [`Error::InvalidSchemaName`]. The name is still double-quoted wherever it appears in SQL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SchemaName(String);

impl SchemaName {
    /// Longest accepted schema name, in bytes (the NOTIFY channel adds a suffix and PostgreSQL
    /// identifiers end at 63 bytes).
    pub const MAX_LEN: usize = 48;

    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, Error> {
        let reason = if name.is_empty() {
            Some("the name is empty")
        } else if name.len() > Self::MAX_LEN {
            Some("the name is longer than 48 bytes")
        } else if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            Some("the name may hold only lowercase ASCII letters, digits and `_`")
        } else if name.as_bytes()[0].is_ascii_digit() {
            Some("the name must start with a letter or `_`")
        } else if name.starts_with("pg_") {
            Some("names starting with `pg_` are reserved by PostgreSQL")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidSchemaName {
                name: shorten(name),
                reason,
            }),
            None => Ok(Self(name.to_owned())),
        }
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The double-quoted identifier, for SQL text.
    pub(crate) fn quoted(&self) -> String {
        // Validation leaves no `"` to escape.
        format!("\"{}\"", self.0)
    }

    /// The first key of the transaction-scoped advisory locks that order appends to one stream
    /// (the second is the hash of the stream id), so that stores in different schemas do not
    /// serialize each other.
    pub(crate) fn lock_space(&self) -> i32 {
        fold32(fnv64("es-postgres streams:", &self.0))
    }

    /// The first key of the locks that order commits, combined by XOR with the partition (the second is an
    /// allocation's last position, modulo 2^31).
    pub(crate) fn commit_lock_space(&self) -> i32 {
        fold32(fnv64("es-postgres tickets:", &self.0))
    }

    /// The key of the session-level advisory lock around position allocation, combined by XOR with the
    /// partition (the one-`bigint` key form, a key space apart from the two-`int4` locks above).
    pub(crate) fn global_lock(&self) -> i64 {
        i64::from_ne_bytes(fnv64("es-postgres allocation:", &self.0).to_ne_bytes())
    }

    /// The session setting that records which server incarnation this session has checked
    /// (see migration 3).
    pub(crate) fn incarnation_setting(&self) -> String {
        format!("es_incarnation.{}", self.0)
    }

    /// The LISTEN/NOTIFY channel the append function notifies on.
    pub fn channel(&self) -> String {
        format!("{}_events", self.0)
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// FNV-1a over `prefix` then `name`: stable across processes, versions and platforms.
fn fnv64(prefix: &str, name: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in prefix.bytes().chain(name.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn fold32(hash: u64) -> i32 {
    i32::from_ne_bytes(((hash >> 32) as u32 ^ hash as u32).to_ne_bytes())
}

fn shorten(input: &str) -> String {
    if input.chars().count() > 80 {
        let head: String = input.chars().take(77).collect();
        format!("{head}...")
    } else {
        input.to_owned()
    }
}

/// Every statement the store runs, rendered once for its schema.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) append: Arc<str>,
    /// The qualified name of the function that waits for every earlier allocation to end.
    pub(crate) wait_for_predecessors: Arc<str>,
    /// Checks the server's incarnation for this session, starting an epoch if it is new.
    pub(crate) check_incarnation: Arc<str>,
    pub(crate) stream_version: Arc<str>,
    /// Takes the append lock of every stream of `$1` (text[]), in the order of the lock keys,
    /// for the rest of the transaction (the lock `append_events` takes for its streams).
    pub(crate) lock_streams: Arc<str>,
    /// The version of each stream of `$1` (text[]) and whether it is closed: rows of (1-based
    /// index, version, closed).
    pub(crate) stream_versions: Arc<str>,
    /// Where the events with the ids `$1` (uuid[]) are stored: rows of (event id, stream id,
    /// version, position).
    pub(crate) find_events: Arc<str>,
    /// Moves the events of stream `$1` below version `$2` to the archive (migration 13): one row
    /// of (version, moved, lowest hot version).
    pub(crate) archive_stream: Arc<str>,
    /// The head of partition `$1`.
    pub(crate) head: Arc<str>,
    /// The head of every partition below `$1`: rows of (partition, head).
    pub(crate) heads: Arc<str>,
    /// The recorded epoch starts of partition 0 (every epoch but the first).
    pub(crate) epochs: Arc<str>,
    /// The recorded epoch starts of partition `$1`, for partitions 1 and up.
    pub(crate) partition_epochs: Arc<str>,
    /// Records the partitioning (`$1` partitions by `$2`) unless one is recorded, and returns the
    /// recorded one.
    pub(crate) claim_partitioning: Arc<str>,
    pub(crate) stream_forward: Arc<str>,
    pub(crate) stream_backward: Arc<str>,
    /// Stream reads of the columns a load decodes ([`LOAD_COLUMNS`]).
    pub(crate) load_forward: Arc<str>,
    pub(crate) load_backward: Arc<str>,
    /// A page of a partition's feed: `$1` partition, `$2` after, `$3` limit, `$4` categories and
    /// `$5` event types (`NULL` for no filter), read by the function `read_feed` (migration 8),
    /// whose settings make it an ordered index range scan whatever the table's statistics.
    pub(crate) all: Arc<str>,
    pub(crate) load_snapshot: Arc<str>,
    pub(crate) save_snapshot: Arc<str>,
    pub(crate) delete_snapshot: Arc<str>,
    pub(crate) pending_outbox: Arc<str>,
    pub(crate) outbox_len: Arc<str>,
    /// Sets a checkpoint row locked by its batch's transaction (see `projection.rs`).
    pub(crate) set_checkpoint: Arc<str>,
}

/// The columns every event read selects ([`crate::codec::decode_event`] finds them by name).
pub(crate) const EVENT_COLUMNS: &str = "global_position, stream_id, stream_version, event_id, \
     event_type, schema_version, payload, metadata, recorded_at";

/// The columns a load reads ([`crate::codec::RowPage`] finds them by name): the envelope without
/// the stream id, which the load knows, and the metadata, which it does not read (turning `jsonb`
/// into text is most of the server's work per row).
pub(crate) const LOAD_COLUMNS: &str = "global_position, stream_version, event_id, event_type, \
     schema_version, payload, recorded_at";

impl Sql {
    pub(crate) fn new(schema: &SchemaName) -> Self {
        let s = schema.quoted();
        let c = EVENT_COLUMNS;
        // A page of a stream from both the hot table and the archive (migration 13): each an
        // index range scan cut at the limit, merged in version order.
        let stream_where = |columns: &str, forward: bool| {
            let (cmp, order) = if forward { (">=", "") } else { ("<=", " DESC") };
            let part = |table: &str| {
                format!(
                    "(SELECT {columns} FROM {s}.{table} WHERE stream_id = $1 \
                     AND stream_version {cmp} $2 ORDER BY stream_version{order} LIMIT $3)"
                )
            };
            format!(
                "{} UNION ALL {} ORDER BY stream_version{order} LIMIT $3",
                part("events"),
                part("archived_events")
            )
        };
        Self {
            append: format!(
                "SELECT {} \
                 FROM {s}.append_events($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, \
                 $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27)",
                crate::protocol::column::ALL.join(", ")
            )
            .into(),
            wait_for_predecessors: format!("{s}.wait_for_predecessors").into(),
            check_incarnation: format!("SELECT {s}.check_incarnation()").into(),
            stream_version: format!(
                "SELECT coalesce(max(stream_version), 0) FROM {s}.events WHERE stream_id = $1"
            )
            .into(),
            head: format!(
                "SELECT coalesce(max(global_position), 0) FROM {s}.events WHERE partition = $1"
            )
            .into(),
            lock_streams: format!(
                "SELECT count(pg_advisory_xact_lock({}, k)) FROM (SELECT DISTINCT hashtext(s) AS k \
                 FROM unnest($1::text[]) AS s ORDER BY 1) AS keys",
                schema.lock_space()
            )
            .into(),
            stream_versions: format!(
                "SELECT u.i, coalesce((SELECT max(e.stream_version) FROM {s}.events e \
                 WHERE e.stream_id = u.s), 0), EXISTS (SELECT 1 FROM {s}.events c \
                 WHERE c.stream_id = u.s AND c.event_type = '{closed}') \
                 FROM unnest($1::text[]) WITH ORDINALITY AS u(s, i)",
                closed = es_core::CLOSED_EVENT_TYPE
            )
            .into(),
            find_events: format!(
                "SELECT event_id, stream_id, stream_version, global_position FROM {s}.events \
                 WHERE event_id = ANY($1::uuid[])"
            )
            .into(),
            archive_stream: format!(
                "SELECT out_version, out_moved, out_hot_from FROM {s}.archive_stream($1, $2)"
            )
            .into(),
            heads: format!(
                "SELECT p, (SELECT coalesce(max(global_position), 0) FROM {s}.events \
                 WHERE partition = p) FROM generate_series(0, $1 - 1) AS p"
            )
            .into(),
            epochs: format!(
                "SELECT epoch, previous_head FROM {s}.epochs WHERE epoch > 0 ORDER BY epoch"
            )
            .into(),
            partition_epochs: format!(
                "SELECT epoch, previous_head FROM {s}.partition_epochs \
                 WHERE partition = $1 AND epoch > 0 ORDER BY epoch"
            )
            .into(),
            claim_partitioning: format!(
                "SELECT partitions, partition_key FROM {s}.claim_partitioning($1, $2)"
            )
            .into(),
            stream_forward: stream_where(c, true).into(),
            stream_backward: stream_where(c, false).into(),
            load_forward: stream_where(LOAD_COLUMNS, true).into(),
            load_backward: stream_where(LOAD_COLUMNS, false).into(),
            all: format!("SELECT {c} FROM {s}.read_feed($1, $2, $3, $4, $5)").into(),
            load_snapshot: format!(
                "SELECT version, schema_version, payload, recorded_at, event_id \
                 FROM {s}.snapshots WHERE stream_id = $1"
            )
            .into(),
            save_snapshot: format!("SELECT {s}.snapshot_save($1, $2, $3, $4, $5, $6)").into(),
            delete_snapshot: format!("SELECT {s}.snapshot_delete($1, $2)").into(),
            pending_outbox: format!(
                "SELECT position, stream_id, message_id, source_event_id, topic, key, \
                 message_type, schema_version, payload, metadata, recorded_at \
                 FROM {s}.outbox WHERE position > $1 ORDER BY position LIMIT $2"
            )
            .into(),
            outbox_len: format!("SELECT count(*) FROM {s}.outbox").into(),
            set_checkpoint: format!("SELECT {s}.checkpoint_raise($1, $2)").into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for ok in ["es", "_x", "tenant_42", &"a".repeat(48)] {
            assert_eq!(SchemaName::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_hostile_names() {
        let long = "a".repeat(10_000);
        for bad in [
            "",
            "Es",
            "es\"; DROP SCHEMA public; --",
            "es'",
            "es;",
            "es schema",
            "1es",
            "pg_catalog",
            "ésquema",
            "es\0",
            "日本",
            &long,
        ] {
            match SchemaName::new(bad) {
                Err(Error::InvalidSchemaName { name, .. }) => assert!(name.chars().count() <= 80),
                other => panic!("{bad:?} was accepted: {other:?}"),
            }
        }
    }
}
