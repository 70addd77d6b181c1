//! Global positions, store epochs, and how a reader learns that a store lost a tail.
//!
//! A store that can lose acknowledged events (a Redis restart that replays a short AOF, a failover
//! to a replica that lagged, a PostgreSQL restore from a backup, a crash with
//! `synchronous_commit = off`, a store whose data was wiped and started again) must never hand
//! the lost positions out again: a reader that had passed them would skip the new events
//! silently. So positions carry an **epoch** in their high bits:
//! `position = epoch << EPOCH_BITS | sequence`, with [`EPOCH_BITS`] = 22 (4,194,303 positions per
//! epoch; a sequence that runs past the end of its epoch simply continues into the next one).
//!
//! Whenever a store's server is a new incarnation (the first write ever, a restart, another
//! primary, a restored backup), the first append of that incarnation starts a new epoch, numbered
//! from the clock ([`next_epoch`]: the seconds since 2024-01-01, or one more than any epoch the
//! store knows, whichever is larger). So a new epoch lies above every position an earlier
//! incarnation can have handed out, even one whose records were lost with the tail (a restored
//! backup does not know the epochs begun after it was taken; the clock does). The store records
//! an [`EpochStart`] with the head that survived (0 for a store whose data is new or wiped).
//!
//! A reader resuming after position `p` that finds the next event in a later epoch asks the store
//! whether `p` survived ([`verify_resume`](super::verify_resume)). If an epoch began between the two with a surviving
//! head below `p`, the events the reader saw after that head are gone: the read fails with
//! [`StoreError::LostTail`] instead of going on as if nothing happened. Subscriptions and
//! projections do this check themselves; it costs one read of the epoch list per epoch crossed.
//!
//! Limits: epoch numbers stay below 2^31 (the year 2092) so that positions stay below 2^53, where
//! Redis' Lua numbers are exact. Two incarnations that begin within the same second, the second
//! one having lost the first one's record, would share an epoch; stores document where that can
//! happen.

use super::error::StoreError;

/// Bits of a position below the epoch.
pub const EPOCH_BITS: u32 = 22;

/// The Unix time (seconds) of epoch 0: 2024-01-01T00:00:00Z.
pub const EPOCH_CLOCK_ORIGIN: u64 = 1_704_067_200;

/// The largest epoch: positions stay below 2^53.
pub const MAX_EPOCH: u64 = (1 << (53 - EPOCH_BITS)) - 1;

/// The epoch of a position.
pub const fn epoch_of(position: u64) -> u64 {
    position >> EPOCH_BITS
}

/// The first position of `epoch`.
pub const fn first_of_epoch(epoch: u64) -> u64 {
    (epoch << EPOCH_BITS) + 1
}

/// The epoch a new incarnation starts: the seconds since [`EPOCH_CLOCK_ORIGIN`] at `unix_seconds`,
/// but above the last recorded epoch and above the epoch of the highest position handed out.
pub fn next_epoch(last_recorded: Option<u64>, handed_out: u64, unix_seconds: u64) -> u64 {
    let by_clock = unix_seconds.saturating_sub(EPOCH_CLOCK_ORIGIN);
    let above_recorded = last_recorded.map_or(0, |e| e + 1);
    let above_handed_out = if handed_out == 0 {
        0
    } else {
        epoch_of(handed_out) + 1
    };
    by_clock.max(above_recorded).max(above_handed_out)
}

/// A recorded start of an epoch: the store's server was a new incarnation, and the positions from
/// [`first_of_epoch(epoch)`](first_of_epoch) on were handed out in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EpochStart {
    /// The new epoch.
    pub epoch: u64,
    /// The highest position stored when the epoch began (0 if the store held nothing):
    /// everything above it that an earlier incarnation may have handed out is lost.
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
/// `history` is the store's [`EventStore::epochs`](super::EventStore::epochs). Within one epoch, or from position 0, there is
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
        // Positions of the last epoch stay exact in a double.
        assert!(first_of_epoch(MAX_EPOCH) + (E1 - 2) < (1 << 53));
    }

    #[test]
    fn new_epochs_follow_the_clock_and_never_go_back() {
        let now = EPOCH_CLOCK_ORIGIN + 1000;
        assert_eq!(next_epoch(None, 0, now), 1000);
        assert_eq!(next_epoch(Some(5), 10, now), 1000);
        // Two restarts within a second.
        assert_eq!(next_epoch(Some(1000), first_of_epoch(1000), now), 1001);
        // A sequence that ran past its epoch.
        assert_eq!(next_epoch(Some(1000), first_of_epoch(1003) + 7, now), 1004);
        // A restored backup that knows only epoch 3: the clock is past the lost epochs.
        assert_eq!(next_epoch(Some(3), first_of_epoch(3) + 5, now), 1000);
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
    fn a_wiped_store_is_a_lost_tail_for_every_reader() {
        let history = [EpochStart {
            epoch: 7,
            previous_head: 0,
        }];
        assert!(check_resume(0, first_of_epoch(7), &history).is_ok());
        assert!(check_resume(3, first_of_epoch(7), &history).is_err());
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
        assert!(check_resume(E1 + 60, first_of_epoch(2), &history).is_err());
    }

    #[test]
    fn lag_across_epochs_counts_the_new_epoch_only() {
        assert_eq!(distance(5, 9), 4);
        assert_eq!(distance(9, 5), 0);
        assert_eq!(distance(100, E1 + 3), 3);
    }
}
