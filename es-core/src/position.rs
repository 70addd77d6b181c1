//! Global positions, store epochs, and how a reader learns that a store lost a tail.
//!
//! A store that can lose acknowledged events (a Redis restart that replays a short AOF, a failover
//! to a replica that lagged, a PostgreSQL restore from a backup, a crash with
//! `synchronous_commit = off`) must never hand the lost positions out again: a reader that had
//! passed them would skip the new events silently. So positions carry an **epoch** in their high
//! bits: `position = epoch << 32 | sequence`. When a store detects a new incarnation of its
//! server (another process, another restore, another primary), the first append of that
//! incarnation starts a new epoch: its positions begin above anything any earlier incarnation
//! could have handed out, and the store records an [`EpochStart`] with the head that survived.
//!
//! A reader resuming after position `p` that finds the next event in a later epoch asks the store
//! whether `p` survived ([`verify_resume`]). If the epoch that held `p` ended below `p`, the events
//! it read after the surviving head are gone: the read fails with [`StoreError::LostTail`] instead
//! of going on as if nothing happened. Subscriptions and projections do this check themselves.
//!
//! Epoch 0 holds positions `1 ..= 2^32 - 1`; a fresh store starts there, so positions of a store
//! that never lost anything are `1, 2, 3, ...` (dense where the backend is dense). A sequence that
//! reaches the end of its epoch simply continues into the next one, without an [`EpochStart`]:
//! only recorded epoch starts mark a possible loss.

use crate::store::{EventStore, StoreError};

/// Bits of a position below the epoch.
pub const EPOCH_BITS: u32 = 32;

/// The epoch of a position.
pub const fn epoch_of(position: u64) -> u64 {
    position >> EPOCH_BITS
}

/// The first position of `epoch` (epoch 0 starts at 1).
pub const fn first_of_epoch(epoch: u64) -> u64 {
    if epoch == 0 {
        1
    } else {
        (epoch << EPOCH_BITS) + 1
    }
}

/// A recorded start of an epoch: the store's server changed incarnation, and the positions from
/// [`first_of_epoch(epoch)`](first_of_epoch) on were handed out in the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EpochStart {
    /// The new epoch.
    pub epoch: u64,
    /// The highest position stored when the epoch began: everything above it that an earlier
    /// incarnation may have handed out is lost.
    pub previous_head: u64,
}

/// How many positions lie between `from` and `to` as far as lag is concerned: the plain
/// difference within one epoch; across epochs, the part of `to`'s epoch up to `to` (the gap
/// between epochs holds no events).
pub fn distance(from: u64, to: u64) -> u64 {
    if to <= from {
        0
    } else if epoch_of(to) == epoch_of(from) {
        to - from
    } else {
        to - (epoch_of(to) << EPOCH_BITS)
    }
}

/// Checks that a reader that has seen everything up to `after` may go on to `next`, a position in
/// a later epoch: fails with [`StoreError::LostTail`] when the store recorded, between the two,
/// an epoch start whose surviving head is below `after`.
///
/// `history` is the store's [`EventStore::epochs`]. Within one epoch, or from position 0, there is
/// nothing to check.
pub fn check_resume(after: u64, next: u64, history: &[EpochStart]) -> Result<(), StoreError> {
    if after == 0 || epoch_of(next) <= epoch_of(after) {
        return Ok(());
    }
    let lost = history
        .iter()
        .filter(|start| start.epoch > epoch_of(after) && start.epoch <= epoch_of(next))
        .find(|start| start.previous_head < after);
    match lost {
        Some(start) => Err(StoreError::LostTail {
            position: after,
            head: start.previous_head,
            epoch: start.epoch,
        }),
        None => Ok(()),
    }
}

/// [`check_resume`] against the store's current epoch history (one read of it, only when `next`
/// is in a later epoch than `after`).
pub async fn verify_resume<S: EventStore>(
    store: &S,
    after: u64,
    next: u64,
) -> Result<(), StoreError> {
    if after == 0 || epoch_of(next) <= epoch_of(after) {
        return Ok(());
    }
    let history = store.epochs().await?;
    check_resume(after, next, &history)
}

#[cfg(test)]
mod tests {
    use super::*;

    const E1: u64 = 1 << EPOCH_BITS;

    #[test]
    fn epochs_split_positions() {
        assert_eq!(epoch_of(1), 0);
        assert_eq!(epoch_of(E1 - 1), 0);
        assert_eq!(epoch_of(E1 + 1), 1);
        assert_eq!(first_of_epoch(0), 1);
        assert_eq!(first_of_epoch(1), E1 + 1);
    }

    #[test]
    fn resuming_within_an_epoch_needs_no_history() {
        assert!(check_resume(5, 9, &[]).is_ok());
        assert!(check_resume(0, E1 + 1, &[]).is_ok());
    }

    #[test]
    fn a_reader_past_the_surviving_head_gets_lost_tail() {
        let history = [EpochStart {
            epoch: 1,
            previous_head: 100,
        }];
        assert!(check_resume(100, E1 + 1, &history).is_ok());
        assert!(check_resume(90, E1 + 7, &history).is_ok());
        match check_resume(120, E1 + 1, &history) {
            Err(StoreError::LostTail {
                position,
                head,
                epoch,
            }) => assert_eq!((position, head, epoch), (120, 100, 1)),
            other => panic!("expected LostTail, got {other:?}"),
        }
    }

    #[test]
    fn an_epoch_filled_up_is_not_a_loss() {
        // No recorded start between the epochs: the sequence ran into the next epoch.
        assert!(check_resume(E1 - 1, E1, &[]).is_ok());
        // A later loss does not concern a reader that already crossed into that epoch.
        let history = [EpochStart {
            epoch: 2,
            previous_head: E1 + 50,
        }];
        assert!(check_resume(E1 - 1, E1 + 10, &history).is_ok());
        assert!(check_resume(E1 + 60, (2 << EPOCH_BITS) + 1, &history).is_err());
    }

    #[test]
    fn lag_across_epochs_counts_the_new_epoch_only() {
        assert_eq!(distance(5, 9), 4);
        assert_eq!(distance(9, 5), 0);
        assert_eq!(distance(100, E1 + 3), 3);
    }
}
