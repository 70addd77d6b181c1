//! The one rule every store applies to the JSON it is given (payloads, metadata, outbox messages,
//! snapshots), so that what one store accepts, every store accepts and can read back.
//!
//! JSON text is accepted when it is valid UTF-8 JSON (RFC 8259) that
//!
//! - nests arrays and objects at most [`MAX_DEPTH`] deep (or a lower configured depth): deeper
//!   documents are written by some stores and then cannot be read back (`serde_json` stops at 128
//!   levels), which would stop every reader of the feed at that event;
//! - holds no `\u0000` escape: PostgreSQL's `jsonb` and `text` cannot store the NUL character, so
//!   an event another store would accept could not be moved to PostgreSQL;
//! - holds no unpaired UTF-16 surrogate escape (`\ud800` alone): it stands for no character, and
//!   PostgreSQL refuses it.

use std::fmt;

/// The deepest nesting of arrays and objects any store accepts.
pub const MAX_DEPTH: usize = 64;

/// Why JSON text was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonProblem {
    /// The bytes are not valid UTF-8.
    NotUtf8,
    /// The text is not JSON.
    Syntax(String),
    /// Arrays and objects nest deeper than allowed.
    TooDeep {
        /// The allowed depth.
        limit: usize,
    },
    /// A string holds the NUL character (`\u0000`).
    Nul,
    /// A string holds a UTF-16 surrogate escape without its pair.
    LoneSurrogate,
}

impl fmt::Display for JsonProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotUtf8 => f.write_str("is not valid UTF-8"),
            Self::Syntax(err) => write!(f, "is not valid JSON ({err})"),
            Self::TooDeep { limit } => {
                write!(f, "nests arrays and objects more than {limit} levels deep")
            }
            Self::Nul => f.write_str("holds the NUL character (\\u0000), which stores cannot keep"),
            Self::LoneSurrogate => {
                f.write_str("holds an unpaired UTF-16 surrogate escape, which is no character")
            }
        }
    }
}

/// Checks `bytes` against the rule of this module, with nesting limited to `max_depth`.
pub fn check(bytes: &[u8], max_depth: usize) -> Result<(), JsonProblem> {
    if std::str::from_utf8(bytes).is_err() {
        return Err(JsonProblem::NotUtf8);
    }
    scan(bytes, max_depth)?;
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map(|_| ())
        .map_err(|err| JsonProblem::Syntax(err.to_string()))
}

/// Depth, NUL and surrogates; syntax is left to `serde_json`, which runs after this (so its own
/// recursion limit is never what stops a document). Inside strings it jumps from one quote or
/// backslash to the next, so ordinary text costs a byte search, not a branch per byte.
fn scan(bytes: &[u8], max_depth: usize) -> Result<(), JsonProblem> {
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => i = scan_string(bytes, i + 1)?,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(JsonProblem::TooDeep { limit: max_depth });
                }
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// Scans a string from just after its opening quote; returns the index after its closing quote
/// (or the end of the input, when it is cut short: `serde_json` reports that).
fn scan_string(bytes: &[u8], mut i: usize) -> Result<usize, JsonProblem> {
    // A high surrogate escape seen just before: the next thing must be its low half's escape.
    let mut pending_high = false;
    loop {
        let Some(k) = bytes[i..].iter().position(|&b| b == b'"' || b == b'\\') else {
            return Ok(bytes.len());
        };
        if pending_high && k > 0 {
            return Err(JsonProblem::LoneSurrogate);
        }
        i += k;
        if bytes[i] == b'"' {
            return if pending_high {
                Err(JsonProblem::LoneSurrogate)
            } else {
                Ok(i + 1)
            };
        }
        match bytes.get(i + 1) {
            Some(b'u') => {
                let Some(unit) = bytes.get(i + 2..i + 6).and_then(hex4) else {
                    return Ok(bytes.len());
                };
                match unit {
                    0 => return Err(JsonProblem::Nul),
                    0xD800..=0xDBFF if pending_high => return Err(JsonProblem::LoneSurrogate),
                    0xD800..=0xDBFF => pending_high = true,
                    0xDC00..=0xDFFF if pending_high => pending_high = false,
                    0xDC00..=0xDFFF => return Err(JsonProblem::LoneSurrogate),
                    _ if pending_high => return Err(JsonProblem::LoneSurrogate),
                    _ => {}
                }
                i += 6;
            }
            Some(_) if pending_high => return Err(JsonProblem::LoneSurrogate),
            Some(_) => i += 2,
            None => return Ok(bytes.len()),
        }
    }
}

fn hex4(digits: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(digits).ok()?;
    u32::from_str_radix(text, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deep(n: usize) -> String {
        format!("{}{}", "[".repeat(n), "]".repeat(n))
    }

    #[test]
    fn accepts_ordinary_json() {
        for ok in [
            r#"{"a":1,"b":[true,null,"x"]}"#,
            r#""é日本😀""#,
            r#""\ud83d\ude00 and \u00e9 and \\u0000 is text""#,
            r#"{"k":"\"[{"}"#,
            "3",
        ] {
            assert_eq!(check(ok.as_bytes(), MAX_DEPTH), Ok(()), "{ok}");
        }
        assert_eq!(check(deep(64).as_bytes(), 64), Ok(()));
    }

    #[test]
    fn refuses_what_some_store_cannot_keep() {
        assert_eq!(check(br#"{"a":"x\u0000y"}"#, 64), Err(JsonProblem::Nul));
        assert_eq!(check(br#""\ud800""#, 64), Err(JsonProblem::LoneSurrogate));
        assert_eq!(check(br#""\ud800x""#, 64), Err(JsonProblem::LoneSurrogate));
        assert_eq!(check(br#""\udc00""#, 64), Err(JsonProblem::LoneSurrogate));
        assert_eq!(
            check(br#""\ud800\u0041""#, 64),
            Err(JsonProblem::LoneSurrogate)
        );
        assert_eq!(
            check(deep(65).as_bytes(), 64),
            Err(JsonProblem::TooDeep { limit: 64 })
        );
        assert_eq!(
            check(deep(200).as_bytes(), 64),
            Err(JsonProblem::TooDeep { limit: 64 })
        );
        assert_eq!(check(b"\"\xff\"", 64), Err(JsonProblem::NotUtf8));
        assert!(matches!(check(b"{", 64), Err(JsonProblem::Syntax(_))));
        assert!(matches!(
            check(br#""\u12"#, 64),
            Err(JsonProblem::Syntax(_))
        ));
        assert!(matches!(check(b"", 64), Err(JsonProblem::Syntax(_))));
    }
}
