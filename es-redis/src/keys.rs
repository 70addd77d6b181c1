//! The key layout: every key a store uses, derived from its prefix.
//!
//! See the [crate documentation](crate#key-layout) for the layout and the reasons behind it.

use std::sync::Arc;

use es_core::StreamId;

use crate::Error;

/// Longest accepted key prefix, in bytes.
pub const MAX_PREFIX_LEN: usize = 64;

/// The Redis key names of one store, derived from its validated prefix.
///
/// Exposed for operators and tests (inspecting or repairing data by hand); the store itself is the
/// only writer these keys should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: Arc<str>,
    feed: Arc<str>,
    index: Arc<str>,
    outbox: Arc<str>,
    lease: Arc<str>,
    dead_letters: Arc<str>,
    checkpoints: Arc<str>,
    checkpoint_generations: Arc<str>,
    epochs: Arc<str>,
    replication_fence: Arc<str>,
}

impl Keys {
    /// The layout under `prefix`, which must be 1 to [`MAX_PREFIX_LEN`] bytes of ASCII letters,
    /// digits or `_-.:`.
    pub fn new(prefix: &str) -> Result<Self, Error> {
        validate_prefix(prefix)?;
        // The global keys share the hash tag `{<prefix>:$all}`; `$` cannot occur in a stream id, so
        // no stream's tag can equal it.
        let global =
            |name: &str| -> Arc<str> { format!("{prefix}:{{{prefix}:$all}}:{name}").into() };
        Ok(Self {
            prefix: prefix.into(),
            feed: global("feed"),
            index: global("index"),
            outbox: global("outbox"),
            lease: global("relay"),
            dead_letters: global("dead-letters"),
            checkpoints: global("checkpoints"),
            checkpoint_generations: global("checkpoint-generations"),
            epochs: global("epochs"),
            replication_fence: global("replication-fence"),
        })
    }

    /// The prefix every key starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Redis stream holding `stream`'s events; entry id `<version>-0`.
    pub fn events(&self, stream: &StreamId) -> String {
        format!("{}:{{{stream}}}:events", self.prefix)
    }

    /// The string holding `stream`'s version.
    pub fn version(&self, stream: &StreamId) -> String {
        format!("{}:{{{stream}}}:version", self.prefix)
    }

    /// The hash holding `stream`'s latest snapshot.
    pub fn snapshot(&self, stream: &StreamId) -> String {
        format!("{}:{{{stream}}}:snapshot", self.prefix)
    }

    /// The Redis stream holding the global feed; entry id `<position>-0`.
    pub fn feed(&self) -> &str {
        &self.feed
    }

    /// The hash holding the head: the last assigned global position (field `position`), the
    /// last `recorded_at` in microseconds (field `recorded_at`), the last assigned outbox
    /// position (field `outbox`) and the `run_id` of the server process that wrote last (field
    /// `run`); and the event-id index: one field per event id (hyphenated, so never one of the
    /// head fields) holding the event's global position (its stream and version are in its feed
    /// entry). One hash, so an append reads and writes both with one command each.
    pub fn index(&self) -> &str {
        &self.index
    }

    /// The Redis stream holding the undelivered outbox records; entry id `<outbox position>-0`.
    /// The last assigned outbox position is the index hash's field `outbox`.
    pub fn outbox(&self) -> &str {
        &self.outbox
    }

    /// The hash holding the relay lease: `owner`, `generation` (raised whenever the lease
    /// changes hands), `expires` (milliseconds, server clock; 0 once released), and the last
    /// dead-lettering (`last_error_position`, `last_error`, `last_error_at` in µs).
    pub fn relay_lease(&self) -> &str {
        &self.lease
    }

    /// The sorted set holding the outbox's dead letters, scored by outbox position; each member
    /// holds the record's fields and the error, attempts and time (see `outbox.rs`).
    pub fn dead_letters(&self) -> &str {
        &self.dead_letters
    }

    /// The hash holding projection checkpoints: projection name → global position.
    pub fn checkpoints(&self) -> &str {
        &self.checkpoints
    }

    /// The hash holding the checkpoints' generations: projection name → generation (none: 0).
    pub fn checkpoint_generations(&self) -> &str {
        &self.checkpoint_generations
    }

    /// The Redis stream recording the epochs started after the server changed incarnation; entry
    /// id `<epoch>-0`, fields `previous_head`, `previous_outbox`, `run_id`, `previous_run_id`,
    /// `cause` and `recorded_at`. See the [crate documentation](crate#epochs-and-lost-tails).
    pub fn epochs(&self) -> &str {
        &self.epochs
    }

    /// The string the store sets before each `WAIT` when
    /// [`min_replicas_acked`](crate::RedisStoreBuilder::min_replicas_acked) is on, so that the
    /// `WAIT` also covers what an idempotent retry found already stored. Holds `1`.
    pub fn replication_fence(&self) -> &str {
        &self.replication_fence
    }
}

fn validate_prefix(prefix: &str) -> Result<(), Error> {
    let reason = if prefix.is_empty() {
        Some("the prefix is empty")
    } else if prefix.len() > MAX_PREFIX_LEN {
        Some("the prefix is longer than 64 bytes")
    } else if !prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
    {
        Some("the prefix may hold only ASCII letters, digits and `_-.:`")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidPrefix {
            prefix: prefix.chars().take(80).collect(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_keys_share_the_stream_tag() {
        let keys = Keys::new("es").unwrap();
        let s = StreamId::parse("order-a:b:c").unwrap();
        assert_eq!(keys.events(&s), "es:{order-a:b:c}:events");
        assert_eq!(keys.version(&s), "es:{order-a:b:c}:version");
        assert_eq!(keys.snapshot(&s), "es:{order-a:b:c}:snapshot");
        assert_eq!(keys.feed(), "es:{es:$all}:feed");
        assert_eq!(keys.index(), "es:{es:$all}:index");
        assert_eq!(keys.outbox(), "es:{es:$all}:outbox");
        assert_eq!(keys.relay_lease(), "es:{es:$all}:relay");
        assert_eq!(keys.dead_letters(), "es:{es:$all}:dead-letters");
        assert_eq!(keys.checkpoints(), "es:{es:$all}:checkpoints");
        assert_eq!(
            keys.checkpoint_generations(),
            "es:{es:$all}:checkpoint-generations"
        );
        assert_eq!(keys.epochs(), "es:{es:$all}:epochs");
    }

    #[test]
    fn rejects_bad_prefixes() {
        for bad in ["", "a b", "a{b}", "ü", "a\nb", &"x".repeat(65)] {
            assert!(
                matches!(Keys::new(bad), Err(Error::InvalidPrefix { .. })),
                "{bad:?}"
            );
        }
        for good in ["es", "app-1.test:events_v2", &"x".repeat(64)] {
            assert!(Keys::new(good).is_ok(), "{good:?}");
        }
    }
}
