//! Feed partitions: how a store divides its streams among independent feeds, and the position of
//! a reader that follows all of them.
//!
//! A store has `P` **feed partitions**, fixed when the store is created (default 1). Every stream
//! belongs to exactly one partition, chosen by a stable hash of its id, or of its category
//! ([`PartitionKey`]). Each partition is a feed of its own, with everything the contract says of
//! the feed: positions strictly increasing in commit order, never skipped, per-stream order
//! matching versions, its own epochs (see [`position`](super::position)) and its own head. Across
//! partitions there is **no order**: position 7 of partition 0 and position 7 of partition 1
//! say nothing about which committed first, and a reader of several partitions sees them
//! interleaved in no particular order (each partition's events stay in order).
//!
//! With `P = 1` (the default) partition 0 is the whole feed and every single-feed call
//! ([`head_position`](super::EventStore::head_position), [`ReadAll::after`](super::ReadAll::after),
//! [`subscribe`](super::EventStore::subscribe)) means what it always meant. On a store with
//! `P > 1` those calls fail with [`StoreError::Partitioned`] instead of quietly reading one
//! partition: a reader names the partition ([`ReadAll::partition`](super::ReadAll::partition),
//! [`subscribe_partition`](super::EventStore::subscribe_partition)) or follows them all from a
//! [`FeedPosition`] ([`subscribe_all`](super::EventStore::subscribe_all)).
//!
//! The partition of a stream is `xxh3_64(key) mod P`, where the key is the stream id's text or its
//! category: a pure function of the stream id and the store's [`Partitioning`], the same in every
//! process and every release (the hash is XXH3, 64 bits, seed 0).

use std::fmt;

use super::error::StoreError;
use crate::stream_id::StreamId;

/// The most partitions a store can have.
pub const MAX_PARTITIONS: u32 = 1024;

/// What decides a stream's partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PartitionKey {
    /// The whole stream id: streams spread evenly over the partitions.
    #[default]
    Stream,
    /// The stream's category: every stream of a category shares a partition, so a reader of
    /// one partition sees a category's events in commit order (at the price of one partition
    /// taking all of a busy category's writes).
    Category,
}

/// How many feed partitions a store has and how streams are assigned to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Partitioning {
    count: u32,
    key: PartitionKey,
}

impl Default for Partitioning {
    fn default() -> Self {
        Self::single()
    }
}

impl fmt::Display for Partitioning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = match self.key {
            PartitionKey::Stream => "stream",
            PartitionKey::Category => "category",
        };
        write!(f, "{} partition(s) by {key}", self.count)
    }
}

impl Partitioning {
    /// One partition: the whole feed.
    pub const fn single() -> Self {
        Self {
            count: 1,
            key: PartitionKey::Stream,
        }
    }

    /// `count` partitions, streams assigned by the hash of their id. `count` must be 1 to
    /// [`MAX_PARTITIONS`]; anything else is [`StoreError::InvalidPartitioning`].
    pub fn new(count: u32) -> Result<Self, StoreError> {
        if count == 0 || count > MAX_PARTITIONS {
            return Err(StoreError::InvalidPartitioning {
                reason: format!("{count} partitions: a store has 1 to {MAX_PARTITIONS}"),
            });
        }
        Ok(Self {
            count,
            key: PartitionKey::Stream,
        })
    }

    /// The same count, streams assigned by `key`.
    pub const fn by(mut self, key: PartitionKey) -> Self {
        self.key = key;
        self
    }

    /// How many partitions.
    pub const fn count(&self) -> u32 {
        self.count
    }

    /// What decides a stream's partition.
    pub const fn key(&self) -> PartitionKey {
        self.key
    }

    /// Whether the store has a single feed.
    pub const fn is_single(&self) -> bool {
        self.count == 1
    }

    /// The partition `stream` belongs to.
    pub fn partition_of(&self, stream: &StreamId) -> u32 {
        if self.count == 1 {
            return 0;
        }
        let key = match self.key {
            PartitionKey::Stream => stream.as_str(),
            PartitionKey::Category => stream.category(),
        };
        // The remainder is below `count`, which fits in u32.
        (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % u64::from(self.count)) as u32
    }

    /// Checks that `partition` exists: [`StoreError::NoSuchPartition`] otherwise.
    pub fn check(&self, partition: u32) -> Result<(), StoreError> {
        if partition < self.count {
            Ok(())
        } else {
            Err(StoreError::NoSuchPartition {
                partition,
                partitions: self.count,
            })
        }
    }

    /// The partition a single-feed call addresses: 0 on a store with one partition,
    /// [`StoreError::Partitioned`] on a store with several (the caller must name one).
    pub fn single_feed(&self) -> Result<u32, StoreError> {
        if self.count == 1 {
            Ok(0)
        } else {
            Err(StoreError::Partitioned {
                partitions: self.count,
            })
        }
    }

    /// The partitions, in order.
    pub fn partitions(&self) -> std::ops::Range<u32> {
        0..self.count
    }
}

/// Where a reader of every partition stands: per partition, the position handled up to (0:
/// nothing yet). It only moves forward.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FeedPosition {
    positions: Vec<u64>,
}

impl FeedPosition {
    /// Position 0 in each of `partitioning`'s partitions: the start of every feed.
    pub fn start(partitioning: &Partitioning) -> Self {
        Self {
            positions: vec![0; partitioning.count() as usize],
        }
    }

    /// A position from its per-partition positions, partition 0 first (one per partition).
    pub fn from_positions(positions: Vec<u64>) -> Self {
        Self { positions }
    }

    /// Per partition, the position handled up to.
    pub fn positions(&self) -> &[u64] {
        &self.positions
    }

    /// How many partitions it covers.
    pub fn partitions(&self) -> u32 {
        // At most MAX_PARTITIONS entries where it came from a store.
        self.positions.len() as u32
    }

    /// The position handled up to in `partition` (0 beyond the vector).
    pub fn get(&self, partition: u32) -> u64 {
        self.positions
            .get(partition as usize)
            .copied()
            .unwrap_or_default()
    }

    /// Moves `partition` forward to `position`; a lower position is ignored. Returns whether it
    /// moved.
    pub fn advance(&mut self, partition: u32, position: u64) -> bool {
        let index = partition as usize;
        if index >= self.positions.len() {
            self.positions.resize(index + 1, 0);
        }
        let slot = &mut self.positions[index];
        if position > *slot {
            *slot = position;
            true
        } else {
            false
        }
    }

    /// Whether this position has reached `other` in every partition.
    pub fn covers(&self, other: &FeedPosition) -> bool {
        (0..other.partitions()).all(|p| self.get(p) >= other.get(p))
    }

    /// Checks that it has one entry per partition of `partitioning`.
    pub fn check(&self, partitioning: &Partitioning) -> Result<(), StoreError> {
        if self.partitions() == partitioning.count() {
            Ok(())
        } else {
            Err(StoreError::InvalidPartitioning {
                reason: format!(
                    "a feed position over {} partition(s) used on a store with {partitioning}",
                    self.partitions()
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(text: &str) -> StreamId {
        StreamId::parse(text).unwrap()
    }

    #[test]
    fn one_partition_holds_every_stream() {
        let single = Partitioning::single();
        assert_eq!(single.partition_of(&stream("order-1")), 0);
        assert_eq!(single.single_feed().unwrap(), 0);
    }

    #[test]
    fn the_hash_is_stable_and_spreads_streams() {
        let p = Partitioning::new(8).unwrap();
        // Pinned (xxh3_64 of each id, mod 8): a stream's partition must never change between
        // releases, or its events would be split across feeds.
        let pinned: Vec<u32> = ["order-1", "order-2", "account-42", "a-b"]
            .iter()
            .map(|s| p.partition_of(&stream(s)))
            .collect();
        assert_eq!(pinned, [6, 4, 7, 7]);
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[p.partition_of(&stream(&format!("order-{i}"))) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn by_category_keeps_a_category_together() {
        let p = Partitioning::new(16).unwrap().by(PartitionKey::Category);
        let first = p.partition_of(&stream("order-1"));
        assert!((0..100).all(|i| p.partition_of(&stream(&format!("order-{i}"))) == first));
    }

    #[test]
    fn bad_counts_and_partitions_are_typed_errors() {
        assert!(matches!(
            Partitioning::new(0),
            Err(StoreError::InvalidPartitioning { .. })
        ));
        assert!(Partitioning::new(MAX_PARTITIONS + 1).is_err());
        let p = Partitioning::new(4).unwrap();
        assert!(matches!(
            p.check(4),
            Err(StoreError::NoSuchPartition {
                partition: 4,
                partitions: 4
            })
        ));
        assert!(matches!(
            p.single_feed(),
            Err(StoreError::Partitioned { partitions: 4 })
        ));
    }

    #[test]
    fn feed_positions_only_move_forward() {
        let p = Partitioning::new(3).unwrap();
        let mut at = FeedPosition::start(&p);
        assert!(at.advance(1, 5));
        assert!(!at.advance(1, 4));
        assert!(at.advance(2, 1));
        assert_eq!(at.positions(), [0, 5, 1]);
        assert!(at.covers(&FeedPosition::from_positions(vec![0, 5, 0])));
        assert!(!at.covers(&FeedPosition::from_positions(vec![1, 0, 0])));
        assert!(at.check(&p).is_ok());
        assert!(at.check(&Partitioning::single()).is_err());
    }
}
