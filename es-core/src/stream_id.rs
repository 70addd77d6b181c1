//! Validated stream identifiers.
//!
//! A stream id has the form `<category>-<id>`: the category names the aggregate type (and is what
//! subscriptions filter on), the id names one aggregate of that type.
//!
//! The character set is deliberately small so that every backend can use a stream id as a key,
//! a SQL parameter and part of a Redis key without escaping:
//!
//! - the category is 1 to [`StreamId::MAX_CATEGORY_LEN`] ASCII letters, digits or `_`, starting with
//!   a letter, and contains no `-`;
//! - the id is 1 or more ASCII letters, digits or one of `-_.:@+=~`;
//! - the whole stream id is at most [`StreamId::MAX_LEN`] bytes.
//!
//! Anything else (empty parts, spaces, quotes, `;`, `{`, `}`, `/`, non-ASCII text, overlong ids) is
//! rejected with [`InvalidStreamId`], never panicked on or passed through.

use std::fmt;
use std::sync::Arc;

/// A validated stream identifier, `<category>-<id>`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId {
    value: Arc<str>,
    category_len: usize,
}

/// Why a string is not a valid stream id, category or aggregate id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid stream id {input:?}: {reason}")]
pub struct InvalidStreamId {
    /// The rejected input, shortened to at most 80 characters.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl InvalidStreamId {
    fn new(input: &str, reason: &'static str) -> Self {
        let input = if input.chars().count() > 80 {
            let head: String = input.chars().take(77).collect();
            format!("{head}...")
        } else {
            input.to_owned()
        };
        Self { input, reason }
    }
}

impl StreamId {
    /// Longest accepted stream id, in bytes.
    pub const MAX_LEN: usize = 256;
    /// Longest accepted category, in bytes.
    pub const MAX_CATEGORY_LEN: usize = 64;

    /// Builds the stream id of aggregate `id` in `category`.
    pub fn new(category: &str, id: &str) -> Result<Self, InvalidStreamId> {
        validate_category(category)?;
        let full = format!("{category}-{id}");
        validate_id(id).map_err(|reason| InvalidStreamId::new(&full, reason))?;
        if full.len() > Self::MAX_LEN {
            return Err(InvalidStreamId::new(&full, "longer than 256 bytes"));
        }
        Ok(Self {
            category_len: category.len(),
            value: full.into(),
        })
    }

    /// Parses `<category>-<id>`; the category ends at the first `-`.
    pub fn parse(input: &str) -> Result<Self, InvalidStreamId> {
        let Some((category, id)) = input.split_once('-') else {
            return Err(InvalidStreamId::new(
                input,
                "expected `<category>-<id>`, found no `-`",
            ));
        };
        validate_category(category).map_err(|e| InvalidStreamId::new(input, e.reason))?;
        validate_id(id).map_err(|reason| InvalidStreamId::new(input, reason))?;
        if input.len() > Self::MAX_LEN {
            return Err(InvalidStreamId::new(input, "longer than 256 bytes"));
        }
        Ok(Self {
            category_len: category.len(),
            value: input.into(),
        })
    }

    /// The whole stream id, `<category>-<id>`.
    pub fn as_str(&self) -> &str {
        &self.value
    }

    /// The category (aggregate type) part.
    pub fn category(&self) -> &str {
        &self.value[..self.category_len]
    }

    /// The aggregate id part.
    pub fn id(&self) -> &str {
        &self.value[self.category_len + 1..]
    }
}

/// Checks that `category` is a valid category name (see the module docs).
pub fn validate_category(category: &str) -> Result<(), InvalidStreamId> {
    let reason = if category.is_empty() {
        Some("the category is empty")
    } else if category.len() > StreamId::MAX_CATEGORY_LEN {
        Some("the category is longer than 64 bytes")
    } else if !category.as_bytes()[0].is_ascii_alphabetic() {
        Some("the category must start with an ASCII letter")
    } else if !category
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        Some("the category may hold only ASCII letters, digits and `_`")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(InvalidStreamId::new(category, reason)),
        None => Ok(()),
    }
}

fn validate_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("the aggregate id is empty");
    }
    if id.len() > StreamId::MAX_LEN {
        return Err("longer than 256 bytes");
    }
    if !id.bytes().all(is_id_byte) {
        return Err("the aggregate id may hold only ASCII letters, digits and `-_.:@+=~`");
    }
    Ok(())
}

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@' | b'+' | b'=' | b'~')
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.value)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.value, f)
    }
}

impl AsRef<str> for StreamId {
    fn as_ref(&self) -> &str {
        &self.value
    }
}

impl std::str::FromStr for StreamId {
    type Err = InvalidStreamId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for StreamId {
    type Error = InvalidStreamId;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl serde::Serialize for StreamId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.value)
    }
}

impl<'de> serde::Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_category_at_first_dash() {
        let id = StreamId::parse("account-7f3c-2a9e").unwrap();
        assert_eq!(id.category(), "account");
        assert_eq!(id.id(), "7f3c-2a9e");
        assert_eq!(id, StreamId::new("account", "7f3c-2a9e").unwrap());
    }

    #[test]
    fn rejects_hostile_input() {
        for bad in [
            "",
            "account",
            "-x",
            "account-",
            "1account-x",
            "acc ount-x",
            "account-x y",
            "account-x'; DROP TABLE events; --",
            "account-{x}",
            "account-ü",
            "account-x\0",
        ] {
            assert!(StreamId::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let long = format!("account-{}", "x".repeat(10_000));
        let err = StreamId::parse(&long).unwrap_err();
        assert!(err.input.len() <= 80);
    }
}
