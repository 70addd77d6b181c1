//! The codes this crate and its PL/pgSQL functions exchange, named in one place.
//!
//! The functions are defined by the migrations: `append_events` by
//! `migrations/0012_closed_streams.sql` (its codes date from `0001_init.sql`, the closed outcome
//! from `0012`), `checkpoint_save` by
//! `0004_relay.sql`. A migration that changes a code changes it here too; the tests at the end of
//! this file run every code against the server.

use es_core::ExpectedVersion;

use crate::codec::to_i64;

/// How an append states its expected version to `append_events`: the `p_kinds` element, with
/// the version in `p_expected` for [`Exact`](ExpectedKind::Exact) (else 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i16)]
pub(crate) enum ExpectedKind {
    /// Any version.
    Any = 0,
    /// The stream must have no events (`ExpectedVersion::NoStream` and `Exact(0)`).
    NoStream = 1,
    /// The stream must have events.
    StreamExists = 2,
    /// The stream must be at exactly `p_expected`.
    Exact = 3,
}

impl ExpectedKind {
    /// Every kind.
    #[cfg(test)]
    pub(crate) const ALL: [Self; 4] = [Self::Any, Self::NoStream, Self::StreamExists, Self::Exact];

    /// The kind and the `p_expected` value of `expected`.
    pub(crate) fn of(expected: ExpectedVersion) -> (Self, i64) {
        match expected {
            ExpectedVersion::Any => (ExpectedKind::Any, 0),
            ExpectedVersion::NoStream | ExpectedVersion::Exact(0) => (ExpectedKind::NoStream, 0),
            ExpectedVersion::StreamExists => (ExpectedKind::StreamExists, 0),
            ExpectedVersion::Exact(version) => (ExpectedKind::Exact, to_i64(version)),
        }
    }

    /// The code sent to the server.
    pub(crate) fn code(self) -> i16 {
        self as i16
    }
}

/// The outcome `append_events` reports for each append of a call (its `outcomes` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i16)]
pub(crate) enum AppendOutcome {
    /// Written (or an empty append whose expected version held); `versions` holds the new
    /// version, `offsets` where its positions start.
    Written = 0,
    /// The expected version did not hold; `versions` holds the actual version. Nothing written.
    Conflict = 1,
    /// Some of its event ids are stored already; their stored copies are in the `found_*`
    /// columns. Nothing written.
    Duplicate = 2,
    /// The stream is closed (its last event is its tombstone); `versions` holds its version.
    /// Nothing written. (Since `migrations/0012_closed_streams.sql`.)
    Closed = 3,
}

impl AppendOutcome {
    /// Every outcome.
    pub(crate) const ALL: [Self; 4] =
        [Self::Written, Self::Conflict, Self::Duplicate, Self::Closed];

    /// The outcome with code `code`, if there is one.
    pub(crate) fn from_code(code: i16) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|outcome| *outcome as i16 == code)
    }
}

/// The result columns of `append_events`, read by name.
pub(crate) mod column {
    /// One [`AppendOutcome`](super::AppendOutcome) code per append.
    pub(crate) const OUTCOMES: &str = "outcomes";
    /// Per append: the new version (written), the actual one (conflict), or 0.
    pub(crate) const VERSIONS: &str = "versions";
    /// Per append: where its positions start, relative to `base` (NULL unless written).
    pub(crate) const OFFSETS: &str = "offsets";
    /// The first position drawn by the call (NULL if it wrote no events).
    pub(crate) const BASE: &str = "base";
    /// The `recorded_at` of the call's events (NULL if it wrote none).
    pub(crate) const RECORDED: &str = "recorded";
    /// The stored copies of looked-up event ids: ids, streams, versions and positions.
    pub(crate) const FOUND_IDS: &str = "found_ids";
    pub(crate) const FOUND_STREAMS: &str = "found_streams";
    pub(crate) const FOUND_VERSIONS: &str = "found_versions";
    pub(crate) const FOUND_POSITIONS: &str = "found_positions";

    /// Every column, in the order of the function's `OUT` parameters.
    pub(crate) const ALL: [&str; 9] = [
        OUTCOMES,
        VERSIONS,
        OFFSETS,
        BASE,
        RECORDED,
        FOUND_IDS,
        FOUND_STREAMS,
        FOUND_VERSIONS,
        FOUND_POSITIONS,
    ];
}

/// The SQLSTATE `append_events` raises in a session that has not checked the server's
/// incarnation yet (the caller runs `check_incarnation()` and calls again); nothing was
/// allocated.
pub(crate) const UNCHECKED_INCARNATION: &str = "ES001";

/// What `checkpoint_save` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i16)]
pub(crate) enum CheckpointSave {
    /// The caller's generation is not the stored one: nothing written.
    Fenced = -1,
    /// The stored position is as high already: nothing written.
    NotHigher = 0,
    /// The position was raised.
    Saved = 1,
}

impl CheckpointSave {
    /// Every result.
    pub(crate) const ALL: [Self; 3] = [Self::Fenced, Self::NotHigher, Self::Saved];

    /// The result with code `code`, if there is one.
    pub(crate) fn from_code(code: i16) -> Option<Self> {
        Self::ALL.into_iter().find(|result| *result as i16 == code)
    }
}

#[cfg(test)]
mod tests;
