//! Event and message ids that say where they came from.
//!
//! A writer derives every id from the request that carries it, so a retry re-sends exactly the
//! same ids (even from a restarted process, rebuilt from its log), and the checker can map any
//! event or message in the store back to the request, writer and task that appended it.
//!
//! Layout of the 128 bits, high to low: a 32-bit tag, an 8-bit kind, the writer (16 bits), the
//! task (8 bits), the request's sequence number in its task (48 bits), the index in the request
//! (16 bits).

use uuid::Uuid;

/// Marks ids made here.
const TAG: u128 = 0xC4A0_5E00;

/// What an id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    /// An event appended by a writer.
    Event = 1,
    /// An outbox message appended by a writer.
    Message = 2,
    /// An event appended by the orchestrator (the end marker).
    Control = 3,
}

/// One request of one writer task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ReqKey {
    /// The writer process's number.
    pub(crate) writer: u16,
    /// The task within the writer.
    pub(crate) task: u8,
    /// The request's number within the task, from 1.
    pub(crate) seq: u64,
}

impl std::fmt::Display for ReqKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "writer {} task {} request {}",
            self.writer, self.task, self.seq
        )
    }
}

const SEQ_MASK: u64 = (1 << 48) - 1;

fn make(kind: Kind, key: ReqKey, index: u16) -> Uuid {
    let value = (TAG << 96)
        | ((kind as u128) << 88)
        | (u128::from(key.writer) << 72)
        | (u128::from(key.task) << 64)
        | (u128::from(key.seq & SEQ_MASK) << 16)
        | u128::from(index);
    Uuid::from_u128(value)
}

/// The id of event `index` of request `key`.
pub(crate) fn event_id(key: ReqKey, index: u16) -> Uuid {
    make(Kind::Event, key, index)
}

/// The id of the outbox message for event `index` of request `key`.
pub(crate) fn message_id(key: ReqKey, index: u16) -> Uuid {
    make(Kind::Message, key, index)
}

/// The id of the orchestrator's `n`th control event.
pub(crate) fn control_id(n: u64) -> Uuid {
    make(
        Kind::Control,
        ReqKey {
            writer: 0,
            task: 0,
            seq: n,
        },
        0,
    )
}

/// What `id` names, if it was made here.
pub(crate) fn decode(id: u128) -> Option<(Kind, ReqKey, u16)> {
    if id >> 96 != TAG {
        return None;
    }
    let kind = match (id >> 88) & 0xff {
        1 => Kind::Event,
        2 => Kind::Message,
        3 => Kind::Control,
        _ => return None,
    };
    let key = ReqKey {
        writer: ((id >> 72) & 0xffff) as u16,
        task: ((id >> 64) & 0xff) as u8,
        seq: ((id >> 16) as u64) & SEQ_MASK,
    };
    Some((kind, key, (id & 0xffff) as u16))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_do_not_collide() {
        let key = ReqKey {
            writer: 513,
            task: 7,
            seq: 123_456_789,
        };
        let e = event_id(key, 49).as_u128();
        let m = message_id(key, 49).as_u128();
        assert_ne!(e, m);
        assert_eq!(decode(e), Some((Kind::Event, key, 49)));
        assert_eq!(decode(m), Some((Kind::Message, key, 49)));
        assert_eq!(
            decode(control_id(1).as_u128()).map(|d| d.0),
            Some(Kind::Control)
        );
        assert_eq!(decode(Uuid::now_v7().as_u128()), None);
        let other = ReqKey {
            seq: 123_456_790,
            ..key
        };
        assert_ne!(event_id(other, 49), event_id(key, 49));
    }
}
