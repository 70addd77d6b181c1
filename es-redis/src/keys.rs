//! The key layout: every key a store uses, derived from its prefix and layout.
//!
//! See the [crate documentation](crate#key-layout) for the layouts and the reasons behind them.

use std::fmt::Write as _;
use std::sync::Arc;

use es_core::contract::{PartitionKey, Partitioning};
use es_core::StreamId;

use crate::Error;

/// Longest accepted key prefix, in bytes.
pub const MAX_PREFIX_LEN: usize = 64;

/// The number of hash slots of a Redis Cluster.
pub const CLUSTER_SLOTS: u16 = 16384;

/// The most feed partitions a tagged layout may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// How a store's keys are named, which decides which of them share a Redis Cluster hash slot.
/// Recorded in the store's meta key when the store is first built; a store cannot be opened
/// with another layout ([`Error::LayoutMismatch`]). See the crate docs, section "Key layout".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyLayout {
    /// One hash tag per stream and one for the global keys: an append touches two slots, so
    /// it runs on a standalone server (or one that Sentinel follows) only. The default there,
    /// and the layout of every store made before layouts were recorded.
    Classic,
    /// One hash tag per feed partition, shared by the partition's feed, head, id index,
    /// outbox, relay lease, dead letters, epoch history and replication fence and by the keys
    /// of every stream in the partition: an append touches one slot. Required on a Redis
    /// Cluster, possible on a standalone server.
    Tagged,
}

impl KeyLayout {
    /// The name recorded in the meta key (`classic`, `tagged`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Tagged => "tagged",
        }
    }
}

impl std::fmt::Display for KeyLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The keys of one feed partition: its feed, head and id index, outbox, relay lease, dead
/// letters, epoch history and replication fence. In the [tagged](KeyLayout::Tagged) layout
/// they share the partition's hash tag, with the keys of every stream of the partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionKeys {
    tag: Arc<str>,
    feed: Arc<str>,
    index: Arc<str>,
    outbox: Arc<str>,
    lease: Arc<str>,
    dead_letters: Arc<str>,
    epochs: Arc<str>,
    replication_fence: Arc<str>,
}

impl PartitionKeys {
    fn under(prefix: &str, tag: &str) -> Self {
        let key = |name: &str| -> Arc<str> { format!("{prefix}:{{{tag}}}:{name}").into() };
        Self {
            tag: tag.into(),
            feed: key("feed"),
            index: key("index"),
            outbox: key("outbox"),
            lease: key("relay"),
            dead_letters: key("dead-letters"),
            epochs: key("epochs"),
            replication_fence: key("replication-fence"),
        }
    }

    /// The hash tag the partition's keys share (without braces).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The Redis Cluster hash slot of the partition's keys.
    pub fn slot(&self) -> u16 {
        slot_of_tag(self.tag.as_bytes())
    }

    /// The Redis stream holding the partition's feed; entry id `<position>-0`.
    pub fn feed(&self) -> &str {
        &self.feed
    }

    /// The hash holding the head (fields `position`, `recorded_at`, `outbox`, `run`) and the
    /// event-id index (event id → global position); see [`Keys::index`].
    pub fn index(&self) -> &str {
        &self.index
    }

    /// The Redis stream holding the partition's undelivered outbox records.
    pub fn outbox(&self) -> &str {
        &self.outbox
    }

    /// The hash holding the partition's relay lease; see [`Keys::relay_lease`].
    pub fn relay_lease(&self) -> &str {
        &self.lease
    }

    /// The sorted set holding the partition's outbox dead letters.
    pub fn dead_letters(&self) -> &str {
        &self.dead_letters
    }

    /// The Redis stream recording the partition's epochs.
    pub fn epochs(&self) -> &str {
        &self.epochs
    }

    /// The string set before each `WAIT`; see [`Keys::replication_fence`].
    pub fn replication_fence(&self) -> &str {
        &self.replication_fence
    }
}

/// The keys of one consumer group's leases ([`es_core::contract::LeaseStore`]): a hash and a
/// sorted set under a hash tag of the group's own, `<prefix>:$group:<group>` (the group name
/// with every byte outside `[A-Za-z0-9_.:-]` written as `%XX`), so that one lease call touches
/// one hash slot, in either layout. The tag holds a `$`, which neither a stream id nor a
/// partition tag can, and differs from the global tag `<prefix>:$all`, so no other key of the
/// store shares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupKeys {
    tag: String,
    leases: String,
    held: String,
}

impl GroupKeys {
    fn under(prefix: &str, group: &str) -> Self {
        let mut tag = format!("{prefix}:$group:");
        for byte in group.bytes() {
            if byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b':' | b'-') {
                tag.push(char::from(byte));
            } else {
                let _ = write!(tag, "%{byte:02X}");
            }
        }
        Self {
            leases: format!("{prefix}:{{{tag}}}:leases"),
            held: format!("{prefix}:{{{tag}}}:held"),
            tag,
        }
    }

    /// The hash tag the group's keys share (without braces).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The Redis Cluster hash slot of the group's keys.
    pub fn slot(&self) -> u16 {
        slot_of_tag(self.tag.as_bytes())
    }

    /// The hash holding every lease of the group ever taken: lease name → `<generation>
    /// <expires> <owner>` (`expires` in milliseconds of the server clock, 0 once released).
    /// Entries stay after release and expiry, for the generation.
    pub fn leases(&self) -> &str {
        &self.leases
    }

    /// The sorted set indexing the leases that may be held: lease name scored by its expiry
    /// (milliseconds of the server clock). A lease leaves it when released, and when a later
    /// call of the group finds it expired.
    pub fn held(&self) -> &str {
        &self.held
    }
}

/// The Redis key names of one store, derived from its validated prefix and its [`KeyLayout`].
///
/// Exposed for operators and tests (inspecting or repairing data by hand); the store itself is the
/// only writer these keys should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: Arc<str>,
    layout: KeyLayout,
    partitioning: Partitioning,
    partitions: Arc<[PartitionKeys]>,
    checkpoints: Arc<str>,
    checkpoint_generations: Arc<str>,
    meta: Arc<str>,
}

impl Keys {
    /// The [classic](KeyLayout::Classic) layout under `prefix`, which must be 1 to
    /// [`MAX_PREFIX_LEN`] bytes of ASCII letters, digits or `_-.:`.
    pub fn new(prefix: &str) -> Result<Self, Error> {
        validate_prefix(prefix)?;
        // The global keys share the hash tag `{<prefix>:$all}`; `$` cannot occur in a stream id, so
        // no stream's tag can equal it.
        let all = format!("{prefix}:$all");
        Ok(Self::with(
            prefix,
            KeyLayout::Classic,
            Partitioning::single(),
            vec![PartitionKeys::under(prefix, &all)],
        ))
    }

    /// The [tagged](KeyLayout::Tagged) layout under `prefix` with `partitions` feed partitions
    /// (1 to [`MAX_PARTITIONS`]), streams assigned by the hash of their id; see
    /// [`Keys::partitioned`].
    pub fn tagged(prefix: &str, partitions: u32) -> Result<Self, Error> {
        if partitions == 0 || partitions > MAX_PARTITIONS {
            return Err(Error::InvalidSetting(
                "the number of feed partitions must be 1 to 1024",
            ));
        }
        let partitioning = Partitioning::new(partitions).map_err(|_| {
            Error::InvalidSetting("the number of feed partitions must be 1 to 1024")
        })?;
        Self::partitioned(prefix, partitioning)
    }

    /// The [tagged](KeyLayout::Tagged) layout under `prefix` with the feed partitions of
    /// `partitioning`. Partition `k`'s hash tag is `<prefix>:p<k>:<n>` with the smallest `n`
    /// whose hash slot lies in the `k`-th of P equal slices of the cluster's 16384 slots, so
    /// that the partitions spread evenly over the slot space (and over the primaries, which
    /// serve contiguous slot ranges when slots are assigned evenly).
    pub fn partitioned(prefix: &str, partitioning: Partitioning) -> Result<Self, Error> {
        validate_prefix(prefix)?;
        let partitions = partitioning.count();
        if partitions == 0 || partitions > MAX_PARTITIONS {
            return Err(Error::InvalidSetting(
                "the number of feed partitions must be 1 to 1024",
            ));
        }
        let parts = (0..partitions)
            .map(|k| PartitionKeys::under(prefix, &partition_tag(prefix, k, partitions)))
            .collect();
        Ok(Self::with(prefix, KeyLayout::Tagged, partitioning, parts))
    }

    /// The keys under `prefix` in `layout` with one partition.
    pub fn with_layout(prefix: &str, layout: KeyLayout) -> Result<Self, Error> {
        match layout {
            KeyLayout::Classic => Self::new(prefix),
            KeyLayout::Tagged => Self::tagged(prefix, 1),
        }
    }

    fn with(
        prefix: &str,
        layout: KeyLayout,
        partitioning: Partitioning,
        partitions: Vec<PartitionKeys>,
    ) -> Self {
        let global =
            |name: &str| -> Arc<str> { format!("{prefix}:{{{prefix}:$all}}:{name}").into() };
        Self {
            prefix: prefix.into(),
            layout,
            partitioning,
            partitions: partitions.into(),
            checkpoints: global("checkpoints"),
            checkpoint_generations: global("checkpoint-generations"),
            meta: global("meta"),
        }
    }

    /// The prefix every key starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The layout.
    pub fn layout(&self) -> KeyLayout {
        self.layout
    }

    /// The number of feed partitions (1 in the classic layout).
    pub fn partitions(&self) -> u32 {
        self.partitioning.count()
    }

    /// How the store divides its streams among feed partitions.
    pub fn partitioning(&self) -> Partitioning {
        self.partitioning
    }

    /// The partition `stream` belongs to: the one place in this crate that decides it, by
    /// [`Partitioning::partition_of`] (0 with one partition; otherwise the XXH3 hash of the
    /// stream id, or of its category, modulo the number of partitions), so a stream never
    /// changes partition while the store's partitioning stays the same.
    pub fn partition_of(&self, stream: &StreamId) -> u32 {
        self.partitioning.partition_of(stream)
    }

    /// The keys of partition `partition`, if the layout has it.
    pub fn partition(&self, partition: u32) -> Option<&PartitionKeys> {
        self.partitions.get(usize::try_from(partition).ok()?)
    }

    /// The keys of every partition, in order.
    pub fn all_partitions(&self) -> &[PartitionKeys] {
        &self.partitions
    }

    /// The keys of the partition `stream` belongs to.
    pub fn partition_of_stream(&self, stream: &StreamId) -> &PartitionKeys {
        self.part(self.partition_of(stream))
    }

    /// Partition `partition`, which [`Keys::partition_of`] returned (always in range).
    fn part(&self, partition: u32) -> &PartitionKeys {
        let index = usize::try_from(partition).unwrap_or(0);
        &self.partitions[index.min(self.partitions.len() - 1)]
    }

    /// Partition 0: the whole store while it has one partition.
    fn first(&self) -> &PartitionKeys {
        &self.partitions[0]
    }

    fn stream_key(&self, stream: &StreamId, name: &str) -> String {
        match self.layout {
            KeyLayout::Classic => format!("{}:{{{stream}}}:{name}", self.prefix),
            KeyLayout::Tagged => format!(
                "{}:{{{}}}:s:{stream}:{name}",
                self.prefix,
                self.partition_of_stream(stream).tag
            ),
        }
    }

    /// The Redis stream holding `stream`'s events; entry id `<version>-0`.
    pub fn events(&self, stream: &StreamId) -> String {
        self.stream_key(stream, "events")
    }

    /// The string holding `stream`'s version.
    pub fn version(&self, stream: &StreamId) -> String {
        self.stream_key(stream, "version")
    }

    /// The string holding the version of `stream`'s tombstone, once the stream is closed (absent
    /// while it is open). Written by the append that stores the tombstone, read by every append
    /// to the stream, in the same script call; in the stream's hash slot.
    pub fn closed(&self, stream: &StreamId) -> String {
        self.stream_key(stream, "closed")
    }

    /// The hash holding `stream`'s latest snapshot.
    pub fn snapshot(&self, stream: &StreamId) -> String {
        self.stream_key(stream, "snapshot")
    }

    /// The Redis stream holding the global feed (partition 0's, the whole store's while it has
    /// one partition); entry id `<position>-0`.
    pub fn feed(&self) -> &str {
        &self.first().feed
    }

    /// The hash holding the head: the last assigned global position (field `position`), the
    /// last `recorded_at` in microseconds (field `recorded_at`), the last assigned outbox
    /// position (field `outbox`) and the `run_id` of the server process that wrote last (field
    /// `run`); and the event-id index: one field per event id (hyphenated, so never one of the
    /// head fields) holding the event's global position (its stream and version are in its feed
    /// entry). One hash, so an append reads and writes both with one command each. Partition
    /// 0's, like [`Keys::feed`].
    pub fn index(&self) -> &str {
        &self.first().index
    }

    /// The Redis stream holding the undelivered outbox records; entry id `<outbox position>-0`.
    /// The last assigned outbox position is the index hash's field `outbox`. Partition 0's.
    pub fn outbox(&self) -> &str {
        &self.first().outbox
    }

    /// The hash holding the relay lease: `owner`, `generation` (raised whenever the lease
    /// changes hands), `expires` (milliseconds, server clock; 0 once released), and the last
    /// dead-lettering (`last_error_position`, `last_error`, `last_error_at` in µs). Partition
    /// 0's.
    pub fn relay_lease(&self) -> &str {
        &self.first().lease
    }

    /// The sorted set holding the outbox's dead letters, scored by outbox position; each member
    /// holds the record's fields and the error, attempts and time (see `outbox.rs`). Partition
    /// 0's.
    pub fn dead_letters(&self) -> &str {
        &self.first().dead_letters
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
    /// Partition 0's.
    pub fn epochs(&self) -> &str {
        &self.first().epochs
    }

    /// The string the store sets before each `WAIT` when
    /// [`min_replicas_acked`](crate::RedisStoreBuilder::min_replicas_acked) is on, so that the
    /// `WAIT` also covers what an idempotent retry found already stored. Holds `1`. Partition
    /// 0's.
    pub fn replication_fence(&self) -> &str {
        &self.first().replication_fence
    }

    /// The keys of consumer group `group`'s leases (the same in either layout).
    pub fn lease_group(&self, group: &str) -> GroupKeys {
        GroupKeys::under(&self.prefix, group)
    }

    /// The hash recording the store's layout (field `layout`: `classic/1`,
    /// `tagged/<partitions>`, or `tagged/<partitions>/category` for partitions by category),
    /// written when the store is first built.
    pub fn meta(&self) -> &str {
        &self.meta
    }

    /// The layout as recorded in the meta key: `<layout>/<partitions>`, followed by
    /// `/category` when several partitions are assigned by stream category (with one
    /// partition, or by stream id, nothing follows, so stores recorded before partitions had
    /// a key read the same).
    pub fn recorded_layout(&self) -> String {
        let by = match self.partitioning.key() {
            PartitionKey::Category if self.partitions() > 1 => "/category",
            _ => "",
        };
        format!("{}/{}{by}", self.layout.name(), self.partitions())
    }

    /// The classic layout's index key under the same prefix: a store made before layouts were
    /// recorded has it, and no meta key.
    pub(crate) fn classic_index(&self) -> String {
        format!("{0}:{{{0}:$all}}:index", self.prefix)
    }
}

/// Partition `k`'s hash tag of `partitions`: `<prefix>:p<k>:<n>` with the smallest `n` whose
/// slot lies in `[k * 16384 / partitions, (k + 1) * 16384 / partitions)`.
fn partition_tag(prefix: &str, k: u32, partitions: u32) -> String {
    let slots = u32::from(CLUSTER_SLOTS);
    let low = k * slots / partitions;
    let high = (k + 1) * slots / partitions;
    (0u32..u32::MAX)
        .map(|n| format!("{prefix}:p{k}:{n}"))
        .find(|tag| (low..high).contains(&u32::from(slot_of_tag(tag.as_bytes()))))
        .unwrap_or_else(|| format!("{prefix}:p{k}:0"))
}

/// The Redis Cluster hash slot of a key whose hash tag is `tag`: CRC16 (XMODEM) mod 16384.
pub fn slot_of_tag(tag: &[u8]) -> u16 {
    crc16(tag) % CLUSTER_SLOTS
}

/// The Redis Cluster hash slot of `key`: its hash tag's (the bytes between the first `{` and
/// the first `}` after it, if not empty), else the whole key's.
#[cfg(any(test, feature = "cluster"))]
pub(crate) fn slot_of_key(key: &[u8]) -> u16 {
    let tag = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    slot_of_tag(tag)
}

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), the checksum Redis Cluster
/// hashes keys with.
fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &byte| {
        (0..8).fold(crc ^ (u16::from(byte) << 8), |crc, _| {
            if crc & 0x8000 == 0 {
                crc << 1
            } else {
                (crc << 1) ^ 0x1021
            }
        })
    })
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
        assert_eq!(keys.closed(&s), "es:{order-a:b:c}:closed");
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
        assert_eq!(keys.meta(), "es:{es:$all}:meta");
        assert_eq!(keys.layout(), KeyLayout::Classic);
        assert_eq!(keys.recorded_layout(), "classic/1");
        assert_eq!(keys.classic_index(), keys.index());
    }

    #[test]
    fn crc16_and_slots_match_redis() {
        // The check value of CRC16/XMODEM, and `CLUSTER KEYSLOT` of Redis 7.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot_of_tag(b"foo"), 12182);
        assert_eq!(slot_of_tag(b"bar"), 5061);
        assert_eq!(slot_of_tag(b"somekey"), 11058);
        assert_eq!(slot_of_key(b"x{foo}y"), 12182);
        assert_eq!(slot_of_key(b"{}foo"), slot_of_tag(b"{}foo"));
    }

    #[test]
    fn tagged_keys_of_a_partition_share_its_tag() {
        let keys = Keys::tagged("es", 1).unwrap();
        assert_eq!(keys.layout(), KeyLayout::Tagged);
        assert_eq!(keys.partitions(), 1);
        assert_eq!(keys.recorded_layout(), "tagged/1");
        let s = StreamId::parse("order-a:b:c").unwrap();
        assert_eq!(keys.partition_of(&s), 0);
        assert_eq!(keys.events(&s), "es:{es:p0:0}:s:order-a:b:c:events");
        assert_eq!(keys.version(&s), "es:{es:p0:0}:s:order-a:b:c:version");
        assert_eq!(keys.snapshot(&s), "es:{es:p0:0}:s:order-a:b:c:snapshot");
        assert_eq!(keys.feed(), "es:{es:p0:0}:feed");
        assert_eq!(keys.index(), "es:{es:p0:0}:index");
        assert_eq!(keys.outbox(), "es:{es:p0:0}:outbox");
        assert_eq!(keys.relay_lease(), "es:{es:p0:0}:relay");
        assert_eq!(keys.dead_letters(), "es:{es:p0:0}:dead-letters");
        assert_eq!(keys.epochs(), "es:{es:p0:0}:epochs");
        assert_eq!(keys.replication_fence(), "es:{es:p0:0}:replication-fence");
        // Not written by appends: under the global tag.
        assert_eq!(keys.checkpoints(), "es:{es:$all}:checkpoints");
        assert_eq!(keys.meta(), "es:{es:$all}:meta");
        let slot = keys.partition(0).unwrap().slot();
        assert_eq!(slot, slot_of_tag(b"es:p0:0"));
        for key in [
            keys.events(&s),
            keys.version(&s),
            keys.closed(&s),
            keys.feed().to_owned(),
        ] {
            assert_eq!(slot_of_key(key.as_bytes()), slot, "{key}");
        }
    }

    #[test]
    fn partitions_spread_evenly_over_the_slots() {
        for partitions in [1, 2, 3, 5, 7, 16, 100, MAX_PARTITIONS] {
            let keys = Keys::tagged("app.v2", partitions).unwrap();
            let slice = u32::from(CLUSTER_SLOTS) / partitions;
            let mut seen = std::collections::BTreeSet::new();
            for (k, part) in (0u32..).zip(keys.all_partitions()) {
                let slot = u32::from(part.slot());
                let low = k * u32::from(CLUSTER_SLOTS) / partitions;
                let high = (k + 1) * u32::from(CLUSTER_SLOTS) / partitions;
                assert!(
                    (low..high).contains(&slot),
                    "partition {k} of {partitions}: slot {slot} outside {low}..{high}"
                );
                assert!(high - low >= slice);
                assert!(seen.insert(slot), "two partitions share slot {slot}");
                assert!(part.tag().starts_with(&format!("app.v2:p{k}:")));
            }
            // The same inputs give the same tags.
            assert_eq!(keys, Keys::tagged("app.v2", partitions).unwrap());
        }
        // Three partitions land on the three primaries of an evenly assigned 3-shard cluster
        // (`redis-cli --cluster create`: 0-5460, 5461-10922, 10923-16383).
        let keys = Keys::tagged("es", 3).unwrap();
        let slots: Vec<u16> = keys
            .all_partitions()
            .iter()
            .map(PartitionKeys::slot)
            .collect();
        assert!(slots[0] <= 5460 && (5461..=10922).contains(&slots[1]) && slots[2] >= 10923);
        // Streams are assigned by a stable hash: the same stream, the same partition; and
        // many streams use every partition.
        let used: std::collections::BTreeSet<u32> = (0..300)
            .map(|i| keys.partition_of(&StreamId::new("order", &i.to_string()).unwrap()))
            .collect();
        assert_eq!(used.len(), 3);
        for bad in [0, MAX_PARTITIONS + 1] {
            assert!(matches!(
                Keys::tagged("es", bad),
                Err(Error::InvalidSetting(_))
            ));
        }
    }

    #[test]
    fn a_group_has_a_tag_of_its_own_in_either_layout() {
        for keys in [Keys::new("es").unwrap(), Keys::tagged("es", 4).unwrap()] {
            let group = keys.lease_group("projection:orders");
            assert_eq!(group.tag(), "es:$group:projection:orders");
            assert_eq!(group.leases(), "es:{es:$group:projection:orders}:leases");
            assert_eq!(group.held(), "es:{es:$group:projection:orders}:held");
            assert_eq!(slot_of_key(group.leases().as_bytes()), group.slot());
            assert_eq!(slot_of_key(group.held().as_bytes()), group.slot());
        }
        let keys = Keys::new("app").unwrap();
        // Braces, spaces, `%`, `$` and non-ASCII bytes are escaped, so the tag has no brace
        // and different groups never share keys.
        let odd = keys.lease_group("a}b{c d%$ü");
        assert_eq!(odd.tag(), "app:$group:a%7Db%7Bc%20d%25%24%C3%BC");
        assert_eq!(slot_of_key(odd.held().as_bytes()), odd.slot());
        let names = ["a", "A", "a%41", "a:b", "a b", "a%20b", "", "relay", "$all"];
        let tags: std::collections::BTreeSet<String> = names
            .iter()
            .map(|n| keys.lease_group(n).tag().to_owned())
            .collect();
        assert_eq!(tags.len(), names.len(), "{tags:?}");
        // Never the global tag, nor a partition's.
        assert_ne!(keys.lease_group("all").tag(), "app:$all");
        let tagged = Keys::tagged("app", 8).unwrap();
        for part in tagged.all_partitions() {
            assert!(names
                .iter()
                .all(|n| keys.lease_group(n).tag() != part.tag()));
        }
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
