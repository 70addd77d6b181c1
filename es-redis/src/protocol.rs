//! The codes this crate and its Lua scripts exchange, named in one place.
//!
//! The scripts name them too (`script/append.lua` and `outbox/save_checkpoint.lua` declare them
//! as locals at the top); the tests at the end of this file read those declarations and check
//! that both sides agree, and that the scripts reply with the names only.

use es_core::ExpectedVersion;

/// How an append states its expected version to the append script (the first argument of
/// each append; an exact version goes as its decimal number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExpectedMode {
    /// Any version.
    Any,
    /// The stream must have no events.
    NoStream,
    /// The stream must have events.
    StreamExists,
}

/// The expected-version argument of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExpectedArg {
    /// A mode, sent as its name.
    Mode(ExpectedMode),
    /// An exact version, sent as its decimal number.
    Exact(u64),
}

impl ExpectedArg {
    /// The argument for `expected`.
    pub(crate) fn of(expected: ExpectedVersion) -> Self {
        match expected {
            ExpectedVersion::Any => Self::Mode(ExpectedMode::Any),
            ExpectedVersion::NoStream => Self::Mode(ExpectedMode::NoStream),
            ExpectedVersion::StreamExists => Self::Mode(ExpectedMode::StreamExists),
            ExpectedVersion::Exact(version) => Self::Exact(version),
        }
    }
}

impl ExpectedMode {
    /// Every mode.
    #[cfg(test)]
    pub(crate) const ALL: [Self; 3] = [Self::Any, Self::NoStream, Self::StreamExists];

    /// The argument the script compares with.
    pub(crate) fn arg(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::NoStream => "none",
            Self::StreamExists => "exists",
        }
    }

    /// The name of the Lua local holding [`arg`](Self::arg).
    #[cfg(test)]
    fn lua_name(self) -> &'static str {
        match self {
            Self::Any => "ANY",
            Self::NoStream => "NO_STREAM",
            Self::StreamExists => "STREAM_EXISTS",
        }
    }
}

/// The code the append script replies for each append (`code, x, y`; see
/// [`APPEND`](crate::script::APPEND) for `x` and `y`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i64)]
pub(crate) enum AppendCode {
    /// Appended: `x` the new version, `y` the first position (nil for an empty append).
    Appended = 0,
    /// Some event ids are stored already, nothing written: `x` where each one is.
    Duplicate = 1,
    /// The expected version does not hold, nothing written: `x` the actual version.
    Conflict = 2,
    /// A key holds data the store did not write, nothing written: `x` which.
    Corrupt = 3,
    /// The server refused the append's first write (out of memory, or a command the user may
    /// not run), nothing written: `x` the error.
    Refused = 4,
    /// A new server incarnation whose `maxmemory-policy` can evict the store's keys, nothing
    /// written: `x` the policy.
    Evicting = 5,
    /// The append would take a position above 2^53 - 1, nothing written: `x` which counter.
    Exhausted = 6,
    /// All-or-nothing call only: this append passed every check, but another append of the call
    /// did not, so nothing was written: `x` the version it would have reached.
    Held = 7,
    /// The stream is closed (its tombstone is stored), nothing written: `x` the tombstone's
    /// version.
    Closed = 8,
}

impl AppendCode {
    /// Every code.
    pub(crate) const ALL: [Self; 9] = [
        Self::Appended,
        Self::Duplicate,
        Self::Conflict,
        Self::Corrupt,
        Self::Refused,
        Self::Evicting,
        Self::Exhausted,
        Self::Held,
        Self::Closed,
    ];

    /// The code with value `code`, if there is one.
    pub(crate) fn from_code(code: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|c| *c as i64 == code)
    }

    /// The name of the Lua local holding the code.
    #[cfg(test)]
    fn lua_name(self) -> &'static str {
        match self {
            Self::Appended => "APPENDED",
            Self::Duplicate => "DUPLICATE",
            Self::Conflict => "CONFLICT",
            Self::Corrupt => "CORRUPT",
            Self::Refused => "REFUSED",
            Self::Evicting => "EVICTING",
            Self::Exhausted => "EXHAUSTED",
            Self::Held => "HELD",
            Self::Closed => "CLOSED",
        }
    }
}

/// What the checkpoint script did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i64)]
pub(crate) enum CheckpointSave {
    /// The position was raised.
    Saved = 1,
    /// The stored position is as high already: nothing written.
    NotHigher = 0,
    /// The stored position is not a number: nothing written.
    NotANumber = -1,
    /// The caller's generation is not the stored one: nothing written.
    Fenced = -2,
}

impl CheckpointSave {
    /// Every result.
    pub(crate) const ALL: [Self; 4] =
        [Self::Saved, Self::NotHigher, Self::NotANumber, Self::Fenced];

    /// The result with value `code`, if there is one.
    pub(crate) fn from_code(code: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|c| *c as i64 == code)
    }

    /// The name of the Lua local holding the code.
    #[cfg(test)]
    fn lua_name(self) -> &'static str {
        match self {
            Self::Saved => "SAVED",
            Self::NotHigher => "NOT_HIGHER",
            Self::NotANumber => "NOT_A_NUMBER",
            Self::Fenced => "FENCED",
        }
    }
}

/// The first element of a lease function's reply (see [`LEASE`](crate::script::LEASE)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i64)]
pub(crate) enum LeaseCode {
    /// Done: the lease's generation (or, for the list, the held leases) follows.
    Ok = 0,
    /// Not done: another owner holds the lease (its name follows), or the caller does not hold
    /// it in that generation; nothing written.
    Refused = 1,
    /// A stored lease is not `<generation> <expires> <owner>` (its name follows); nothing
    /// written.
    Corrupt = 2,
    /// The server's `maxmemory-policy` can evict keys without an expiry (the policy follows);
    /// nothing written.
    Evicting = 3,
}

impl LeaseCode {
    /// Every code.
    pub(crate) const ALL: [Self; 4] = [Self::Ok, Self::Refused, Self::Corrupt, Self::Evicting];

    /// The code with value `code`, if there is one.
    pub(crate) fn from_code(code: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|c| *c as i64 == code)
    }

    /// The name of the Lua local holding the code.
    #[cfg(test)]
    fn lua_name(self) -> &'static str {
        match self {
            Self::Ok => "LEASE_OK",
            Self::Refused => "LEASE_REFUSED",
            Self::Corrupt => "LEASE_CORRUPT",
            Self::Evicting => "LEASE_EVICTING",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::{AppendCode, CheckpointSave, ExpectedMode, LeaseCode};
    use crate::outbox::SAVE_CHECKPOINT;
    use crate::script::{APPEND, LEASE};

    /// The constants a script declares on `local A, B = 1, 2` lines: upper-case names with
    /// number or string literal values (strings without their quotes).
    fn declared(script: &str) -> HashMap<String, String> {
        let mut constants = HashMap::new();
        for line in script.lines() {
            let Some(declaration) = line.strip_prefix("local ") else {
                continue;
            };
            let Some((names, values)) = declaration.split_once(" = ") else {
                continue;
            };
            let names: Vec<&str> = names.split(',').map(str::trim).collect();
            let values: Vec<&str> = values.split(',').map(str::trim).collect();
            let constant = |name: &&str| {
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            };
            if names.len() != values.len() || !names.iter().all(constant) {
                continue;
            }
            for (name, value) in names.into_iter().zip(values) {
                constants.insert(name.to_owned(), value.trim_matches('\'').to_owned());
            }
        }
        constants
    }

    /// The first values of the script's `return` statements that are numbers: the codes it
    /// replies without naming them.
    fn numeric_returns(script: &str) -> Vec<String> {
        script
            .split("return ")
            .skip(1)
            .filter_map(|rest| {
                let value: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '-')
                    .collect();
                (!value.is_empty()).then_some(value)
            })
            .collect()
    }

    #[test]
    fn the_append_script_names_the_codes_as_the_enum_does() {
        let lua = declared(APPEND);
        for code in AppendCode::ALL {
            assert_eq!(
                lua.get(code.lua_name()),
                Some(&(code as i64).to_string()),
                "{code:?}: append.lua declares {:?}",
                lua.get(code.lua_name())
            );
            assert_eq!(AppendCode::from_code(code as i64), Some(code));
        }
        for mode in ExpectedMode::ALL {
            assert_eq!(
                lua.get(mode.lua_name()).map(String::as_str),
                Some(mode.arg()),
                "{mode:?}"
            );
            // The script compares with the name, never the literal.
            assert!(APPEND.contains(&format!("expected == {}", mode.lua_name())));
            assert!(!APPEND.contains(&format!("expected == '{}'", mode.arg())));
        }
        assert_eq!(numeric_returns(APPEND), Vec::<String>::new());
        assert_eq!(AppendCode::from_code(9), None);
        // The script knows a tombstone by the type es-core gives it.
        assert_eq!(
            lua.get("TOMBSTONE").map(String::as_str),
            Some(es_core::CLOSED_EVENT_TYPE)
        );
    }

    #[test]
    fn the_checkpoint_script_names_the_codes_as_the_enum_does() {
        let lua = declared(SAVE_CHECKPOINT);
        for result in CheckpointSave::ALL {
            assert_eq!(
                lua.get(result.lua_name()),
                Some(&(result as i64).to_string()),
                "{result:?}"
            );
            assert_eq!(CheckpointSave::from_code(result as i64), Some(result));
        }
        assert_eq!(numeric_returns(SAVE_CHECKPOINT), Vec::<String>::new());
        assert_eq!(CheckpointSave::from_code(2), None);
    }

    #[test]
    fn the_lease_functions_name_the_codes_as_the_enum_does() {
        let lua = declared(LEASE);
        for code in LeaseCode::ALL {
            assert_eq!(
                lua.get(code.lua_name()),
                Some(&(code as i64).to_string()),
                "{code:?}"
            );
            assert_eq!(LeaseCode::from_code(code as i64), Some(code));
        }
        assert_eq!(numeric_returns(LEASE), Vec::<String>::new());
        // Every reply of a function is a table whose first element is a named code.
        let replies: Vec<&str> = LEASE
            .split("return ")
            .skip(1)
            .filter(|reply| reply.starts_with('{'))
            .collect();
        assert_eq!(replies.len(), 10, "{replies:?}");
        for reply in replies {
            assert!(
                LeaseCode::ALL
                    .iter()
                    .any(|c| reply[1..].starts_with(&format!("{},", c.lua_name()))),
                "a reply without a named code: {reply:.40}"
            );
        }
        assert_eq!(LeaseCode::from_code(4), None);
    }

    #[test]
    fn the_scanner_finds_declarations_and_numeric_returns() {
        let lua = declared("local A, B_2 = 0, -1\nlocal x, Y = 1, 2\nlocal C = 'c'\n");
        assert_eq!(lua.len(), 3, "{lua:?}");
        assert_eq!(lua["B_2"], "-1");
        assert_eq!(lua["C"], "c");
        assert_eq!(numeric_returns("return A, x\nreturn -2\nreturn n"), ["-2"]);
    }
}
