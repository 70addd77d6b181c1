//! Crypto-shredding: personal fields encrypted with a key per data subject, erased by destroying
//! the key.
//!
//! A payload field that holds personal data is declared as [`Personal<T>`]: a value together
//! with the *subject* it is about (a customer id, an employee number). Events, snapshots and
//! outbox messages are written through [`Encrypted`], a store wrapper that encrypts every such
//! field with its subject's key before the inner store sees it (XChaCha20-Poly1305, a random
//! 192-bit nonce per field, the subject and key version as associated data) and decrypts it on
//! the way back. The keys live in a [`KeyStore`] of their own: `es-memory`, `es-postgres` and
//! `es-redis` each provide one, and a [`KeyWrap`] lets a key management service wrap the keys
//! before they are stored.
//!
//! [`Encrypted::forget`] destroys a subject's key and leaves a tombstone in its place. Every
//! event, snapshot and outbox record about the subject stays where it is and can still be read
//! and replayed; its personal fields read as [`Personal::Erased`], and a value written for the
//! subject afterwards is stored erased too (a forgotten subject is never given a new key).
//! Aggregates rehydrate and projections rebuild as before; what they do with an erased field is
//! theirs to decide.
//!
//! # Stored forms
//!
//! `Personal<T>` serializes to a one-key JSON object; the key says which form it is:
//!
//! | form | JSON | where it exists |
//! |---|---|---|
//! | value | `{"$personal":{"subject":"c-7","value":..}}` | in memory only: [`Encrypted`] seals it before anything is stored |
//! | sealed | `{"$sealed":{"subject":"c-7","key":1,"nonce":"..","data":".."}}` | in the store (nonce and ciphertext in base64) |
//! | erased | `{"$erased":{"subject":"c-7"}}` | read back after `forget`, or written for a forgotten subject |
//!
//! The subject id is stored in clear next to the ciphertext (it names the key): use an opaque id,
//! never a name or an e-mail address. Deserializing a sealed value without going through
//! [`Encrypted`] fails with an error that says so; a sealed value whose ciphertext, nonce or
//! subject was altered fails to authenticate and the read fails with
//! [`StoreError::Corrupt`], never with a wrong value.
//!
//! The guarantees, their limits (backups, replicas, WAL and AOF files, projections that copy
//! plaintext, processes holding aggregates in memory) and the tests that try to break them are in
//! the guide's chapter on personal data (`docs/14-personal-data.md`).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::contract::{StoreError, StoreFuture};

mod store;

pub use store::Encrypted;

/// The key of a personal value's JSON object.
pub const VALUE_TAG: &str = "$personal";
/// The key of a sealed (encrypted) value's JSON object.
pub const SEALED_TAG: &str = "$sealed";
/// The key of an erased value's JSON object.
pub const ERASED_TAG: &str = "$erased";
/// The longest subject id, in bytes.
pub const MAX_SUBJECT_BYTES: usize = 256;
/// The length of a subject key, in bytes (256 bits).
pub const KEY_BYTES: usize = 32;

/// A piece of personal data about one subject, or the mark that it was erased.
///
/// Its `Debug` form never shows the value. Compare and clone it like the value; serialize it only
/// through a store wrapped in [`Encrypted`], which stores the value encrypted (see the module
/// documentation).
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Personal<T> {
    /// The value, readable.
    Value {
        /// Whom it is about: the id whose key encrypts it.
        subject: String,
        /// The data.
        value: T,
    },
    /// The subject was forgotten: the value can no longer be read.
    Erased {
        /// Whom it was about.
        subject: String,
    },
}

impl<T> Personal<T> {
    /// `value`, about `subject`.
    pub fn new(subject: impl Into<String>, value: T) -> Self {
        Self::Value {
            subject: subject.into(),
            value,
        }
    }

    /// Whom it is about.
    pub fn subject(&self) -> &str {
        match self {
            Self::Value { subject, .. } | Self::Erased { subject } => subject,
        }
    }

    /// The value, unless it was erased.
    pub fn value(&self) -> Option<&T> {
        match self {
            Self::Value { value, .. } => Some(value),
            Self::Erased { .. } => None,
        }
    }

    /// The value, unless it was erased.
    pub fn into_value(self) -> Option<T> {
        match self {
            Self::Value { value, .. } => Some(value),
            Self::Erased { .. } => None,
        }
    }

    /// Whether the value was erased.
    pub fn is_erased(&self) -> bool {
        matches!(self, Self::Erased { .. })
    }

    /// The same subject with the value mapped (an erased value stays erased).
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Personal<U> {
        match self {
            Self::Value { subject, value } => Personal::Value {
                subject,
                value: f(value),
            },
            Self::Erased { subject } => Personal::Erased { subject },
        }
    }
}

impl<T> fmt::Debug for Personal<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value { subject, .. } => f
                .debug_struct("Personal")
                .field("subject", subject)
                .field("value", &format_args!("<personal>"))
                .finish(),
            Self::Erased { subject } => f
                .debug_struct("Personal")
                .field("subject", subject)
                .field("value", &format_args!("<erased>"))
                .finish(),
        }
    }
}

/// The JSON forms, as serde's externally tagged enum: `{"<tag>": {..}}`.
#[derive(Serialize)]
enum WireRef<'a, T> {
    #[serde(rename = "$personal")]
    Value { subject: &'a str, value: &'a T },
    #[serde(rename = "$erased")]
    Erased { subject: &'a str },
}

#[derive(Deserialize)]
enum Wire<T> {
    #[serde(rename = "$personal")]
    Value { subject: String, value: T },
    #[serde(rename = "$erased")]
    Erased { subject: String },
    #[serde(rename = "$sealed")]
    Sealed(serde::de::IgnoredAny),
}

impl<T: Serialize> Serialize for Personal<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Value { subject, value } => WireRef::Value { subject, value },
            Self::Erased { subject } => WireRef::Erased { subject },
        }
        .serialize(serializer)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Personal<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Wire::deserialize(deserializer)? {
            Wire::Value { subject, value } => Ok(Self::Value { subject, value }),
            Wire::Erased { subject } => Ok(Self::Erased { subject }),
            Wire::Sealed(_) => Err(serde::de::Error::custom(
                "a sealed personal value was read without its key store: read the store through \
                 es_core::personal::Encrypted",
            )),
        }
    }
}

/// A subject's key as a [`KeyStore`] keeps it.
#[derive(Clone, PartialEq, Eq)]
pub enum StoredKey {
    /// The subject has a key.
    Active {
        /// The key's version, stored with every value it seals.
        version: u32,
        /// The key as stored: wrapped by the [`KeyWrap`], or the raw 32 bytes with [`PlainKeys`].
        material: Vec<u8>,
    },
    /// The subject was forgotten: its key was destroyed, and it never gets another.
    Forgotten,
}

impl fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Active { version, material } => f
                .debug_struct("Active")
                .field("version", version)
                .field("material", &format_args!("<{} bytes>", material.len()))
                .finish(),
            Self::Forgotten => f.write_str("Forgotten"),
        }
    }
}

/// Where subjects' keys are kept, one per subject; each backend crate has one (`es-memory`'s
/// `InMemoryKeyStore`, `es-postgres`'s `PgKeyStore`, `es-redis`'s `RedisKeyStore`).
///
/// A key store keeps opaque bytes per subject: [`Encrypted`] makes the keys, wraps them with its
/// [`KeyWrap`] and unwraps what it loads, so a store never needs to know about a key management
/// service.
pub trait KeyStore: Clone + Send + Sync + 'static {
    /// Stores `material` as version `version` of `subject`'s key, unless the subject has a key
    /// already or was forgotten; returns what the subject has now. Concurrent calls for one
    /// subject (in any process) all return the same key: the first one stored.
    fn create_key(
        &self,
        subject: &str,
        version: u32,
        material: Vec<u8>,
    ) -> impl StoreFuture<StoredKey>;

    /// The keys of `subjects`, in one round trip; a subject that never had a key is absent.
    fn load_keys(&self, subjects: &[String]) -> impl StoreFuture<HashMap<String, StoredKey>>;

    /// Destroys `subject`'s key in the backend (the key's bytes are deleted, not flagged) and
    /// records that the subject was forgotten. Returns whether a key was destroyed now (`false`
    /// for a subject forgotten already, or one that never had a key, which is now forgotten too).
    fn forget(&self, subject: &str) -> impl StoreFuture<bool>;
}

/// Wraps subject keys before a [`KeyStore`] stores them, and unwraps them after loading: the hook
/// for a key management service (wrap with a master key that never leaves it).
///
/// Object-safe (boxed futures) so that [`Encrypted`] holds any one without another type
/// parameter.
pub trait KeyWrap: Send + Sync + 'static {
    /// The stored form of `key`, the key of `subject`.
    fn wrap<'a>(
        &'a self,
        subject: &'a str,
        key: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<u8>, StoreError>>;

    /// The key of `subject` from its stored form.
    fn unwrap<'a>(
        &'a self,
        subject: &'a str,
        stored: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<u8>, StoreError>>;
}

/// Stores keys as they are (no key management service): whoever can read the key store can
/// decrypt.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainKeys;

impl KeyWrap for PlainKeys {
    fn wrap<'a>(&'a self, _: &'a str, key: &'a [u8]) -> BoxFuture<'a, Result<Vec<u8>, StoreError>> {
        Box::pin(std::future::ready(Ok(key.to_vec())))
    }

    fn unwrap<'a>(
        &'a self,
        _: &'a str,
        stored: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<u8>, StoreError>> {
        Box::pin(std::future::ready(Ok(stored.to_vec())))
    }
}

/// Wraps subject keys with a master key held by the application (from a secret manager, an
/// environment variable, a file), with the same cipher: a copy of the key store alone then
/// decrypts nothing. An example of a [`KeyWrap`]; a key management service plugs in the same way.
#[derive(Clone)]
pub struct MasterKey {
    cipher: Arc<XChaCha20Poly1305>,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<secret>)")
    }
}

impl MasterKey {
    /// A master key from its 32 bytes.
    pub fn new(key: &[u8; KEY_BYTES]) -> Self {
        Self {
            cipher: Arc::new(XChaCha20Poly1305::new(&(*key).into())),
        }
    }
}

impl KeyWrap for MasterKey {
    fn wrap<'a>(
        &'a self,
        subject: &'a str,
        key: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<u8>, StoreError>> {
        Box::pin(async move {
            let nonce = random_nonce()?;
            let aad = [b"es-key-wrap\0".as_slice(), subject.as_bytes()].concat();
            let sealed = self
                .cipher
                .encrypt(
                    &nonce,
                    Payload {
                        msg: key,
                        aad: &aad,
                    },
                )
                .map_err(|_| StoreError::backend("wrapping a subject key failed"))?;
            Ok([nonce.as_slice(), &sealed].concat())
        })
    }

    fn unwrap<'a>(
        &'a self,
        subject: &'a str,
        stored: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<u8>, StoreError>> {
        Box::pin(async move {
            let corrupt = || StoreError::Corrupt {
                location: format!("the key of subject `{subject}`"),
                reason: "the wrapped key does not authenticate with this master key".to_owned(),
            };
            if stored.len() < NONCE_BYTES {
                return Err(corrupt());
            }
            let (nonce, sealed) = stored.split_at(NONCE_BYTES);
            let nonce = XNonce::try_from(nonce).map_err(|_| corrupt())?;
            let aad = [b"es-key-wrap\0".as_slice(), subject.as_bytes()].concat();
            self.cipher
                .decrypt(
                    &nonce,
                    Payload {
                        msg: sealed,
                        aad: &aad,
                    },
                )
                .map_err(|_| corrupt())
        })
    }
}

const NONCE_BYTES: usize = 24;

fn random_nonce() -> Result<XNonce, StoreError> {
    let mut nonce = [0u8; NONCE_BYTES];
    getrandom::fill(&mut nonce).map_err(|e| StoreError::backend(format!("no randomness: {e}")))?;
    Ok(XNonce::from(nonce))
}

/// A fresh random key.
pub(crate) fn random_key() -> Result<[u8; KEY_BYTES], StoreError> {
    let mut key = [0u8; KEY_BYTES];
    getrandom::fill(&mut key).map_err(|e| StoreError::backend(format!("no randomness: {e}")))?;
    Ok(key)
}

/// Checks a subject id: 1 to [`MAX_SUBJECT_BYTES`] bytes, no control characters.
pub fn check_subject(subject: &str) -> Result<(), String> {
    if subject.is_empty() || subject.len() > MAX_SUBJECT_BYTES {
        return Err(format!(
            "a subject id has 1 to {MAX_SUBJECT_BYTES} bytes; this one has {}",
            subject.len()
        ));
    }
    if subject.chars().any(char::is_control) {
        return Err("a subject id has no control characters".to_owned());
    }
    Ok(())
}

/// A subject's key, ready to seal and open.
#[derive(Clone)]
pub(crate) struct SubjectKey {
    version: u32,
    cipher: XChaCha20Poly1305,
}

impl SubjectKey {
    pub(crate) fn new(version: u32, key: &[u8]) -> Option<Self> {
        let key: [u8; KEY_BYTES] = key.try_into().ok()?;
        Some(Self {
            version,
            cipher: XChaCha20Poly1305::new(&key.into()),
        })
    }
}

/// The keys one seal or open uses: `None` for a forgotten subject (or, when reading, one with
/// no key at all).
pub(crate) type KeyRing = HashMap<String, Option<SubjectKey>>;

fn aad(subject: &str, version: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(16 + subject.len());
    aad.extend_from_slice(b"es-personal\0");
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(subject.as_bytes());
    aad
}

/// Whether `payload` may hold a personal value in its readable form (a fast byte search: false
/// means it surely holds none). A JSON string escape (`\u0024` for `$`) can spell the tag without
/// its bytes, so a payload with any `\u` escape is looked at too.
pub(crate) fn may_hold_values(payload: &[u8]) -> bool {
    memchr::memmem::find(payload, b"\"$personal\"").is_some() || has_unicode_escape(payload)
}

/// Whether `payload` holds a `\u` escape (`serde_json` writes one only for control characters).
fn has_unicode_escape(payload: &[u8]) -> bool {
    memchr::memmem::find(payload, b"\\u").is_some()
}

/// Whether `payload` holds a personal value in its readable form: a store refuses such a
/// payload (it reaches a store only when the store is not wrapped in [`Encrypted`]).
pub(crate) fn holds_readable_values(payload: &[u8]) -> bool {
    may_hold_values(payload)
        && serde_json::from_slice::<Value>(payload).is_ok_and(|value| value_holds_readable(&value))
}

/// Whether `value` holds a personal value in its readable form.
pub(crate) fn value_holds_readable(value: &Value) -> bool {
    match value {
        Value::Object(map) => map
            .iter()
            .any(|(key, value)| key == VALUE_TAG || (!is_tag(key) && value_holds_readable(value))),
        Value::Array(items) => items.iter().any(value_holds_readable),
        _ => false,
    }
}

/// `err`, from deserializing a payload, with its message cut down to its category and place when
/// the payload held readable personal values (`holds`): serde's messages quote the value they
/// met (`invalid type: string "ada@example.com"`), and decode errors end up in logs.
pub(crate) fn redact_error(err: serde_json::Error, holds: bool) -> serde_json::Error {
    if !holds {
        return err;
    }
    let category = match err.classify() {
        serde_json::error::Category::Io => "I/O",
        serde_json::error::Category::Syntax => "syntax",
        serde_json::error::Category::Data => "data",
        serde_json::error::Category::Eof => "end of input",
    };
    <serde_json::Error as serde::de::Error>::custom(format_args!(
        "{category} error at line {} column {} (the message is withheld: the payload holds \
         personal values)",
        err.line(),
        err.column()
    ))
}

/// The reason a store gives for a payload that holds a readable personal value.
pub(crate) const READABLE_REFUSED: &str = "holds a `Personal` value in clear: write personal \
     data through `es_core::personal::Encrypted`, which seals it, so that it is never stored \
     readable";

/// Whether `payload` may hold a sealed value (escapes as in [`may_hold_values`]).
pub(crate) fn may_hold_sealed(payload: &[u8]) -> bool {
    memchr::memmem::find(payload, b"\"$sealed\"").is_some() || has_unicode_escape(payload)
}

/// Checks that every sealed value in `payload` has the form [`Encrypted`] gives it, so that no
/// store accepts a payload that could then not be read through [`Encrypted`] (an application map
/// whose key is `$sealed`, say): whether it authenticates is known only with the key, when it is
/// read. Returns the problem, for a store's `InvalidRequest`.
pub(crate) fn check_sealed_forms(payload: &[u8]) -> Result<(), String> {
    if !may_hold_sealed(payload) {
        return Ok(());
    }
    let Ok(value) = serde_json::from_slice::<Value>(payload) else {
        return Ok(());
    };
    let mut subjects_found = BTreeSet::new();
    subjects(&value, SEALED_TAG, &mut subjects_found).map_err(|reason| {
        format!(
            "holds a malformed sealed value ({reason}); the keys `{VALUE_TAG}`, `{SEALED_TAG}` \
             and `{ERASED_TAG}` are reserved for personal values"
        )
    })
}

/// Whether `key` is one of the three tags of a personal value.
fn is_tag(key: &str) -> bool {
    matches!(key, VALUE_TAG | SEALED_TAG | ERASED_TAG)
}

fn subject_of(body: &Value) -> Result<&str, String> {
    body.get("subject")
        .and_then(Value::as_str)
        .ok_or_else(|| "a personal value without a string `subject`".to_owned())
}

/// Checks the body of a sealed value: the fields [`open`] needs, a valid subject, a 24-byte nonce
/// and base64 ciphertext.
fn check_sealed_body(body: &Value) -> Result<SealedBody, String> {
    let body: SealedBody = serde_json::from_value(body.clone())
        .map_err(|e| format!("a sealed value without its fields ({e})"))?;
    check_subject(&body.subject)?;
    let nonce_ok = BASE64
        .decode(&body.nonce)
        .is_ok_and(|n| n.len() == NONCE_BYTES);
    if !nonce_ok || BASE64.decode(&body.data).is_err() {
        return Err(format!(
            "the sealed value of `{}` has no 24-byte base64 nonce or no base64 ciphertext",
            body.subject
        ));
    }
    Ok(body)
}

/// Adds the subjects of the values tagged `want` in `value` to `out`.
///
/// A personal value is the entry of a tag in an object: most often the object's only entry
/// (`{"$personal": {..}}`), but serde writes other entries next to it when the `Personal` is
/// flattened into a struct (`#[serde(flatten)]`) or is the content of an internally tagged enum
/// variant, so each entry of an object is looked at. An object with more than one tag, a readable
/// value inside another one (its key would be hidden by the outer encryption) and, for sealed
/// values, a body not in the sealed form are refused.
pub(crate) fn subjects(
    value: &Value,
    want: &str,
    out: &mut BTreeSet<String>,
) -> Result<(), String> {
    match value {
        Value::Object(map) => {
            if map.keys().filter(|k| is_tag(k)).count() > 1 {
                return Err(
                    "an object holds more than one personal value (two flattened into one \
                     struct?)"
                        .to_owned(),
                );
            }
            for (key, body) in map {
                if !is_tag(key) {
                    subjects(body, want, out)?;
                    continue;
                }
                if key != want {
                    continue;
                }
                let subject = if key == SEALED_TAG {
                    check_sealed_body(body)?.subject
                } else {
                    let subject = subject_of(body)?;
                    check_subject(subject)?;
                    subject.to_owned()
                };
                if key == VALUE_TAG {
                    let mut inner = BTreeSet::new();
                    if let Some(v) = body.get("value") {
                        subjects(v, VALUE_TAG, &mut inner)?;
                    }
                    if !inner.is_empty() {
                        return Err(format!(
                            "the personal value of `{subject}` holds another personal value; \
                             nest them the other way round or side by side"
                        ));
                    }
                }
                out.insert(subject);
            }
            Ok(())
        }
        Value::Array(items) => items.iter().try_for_each(|v| subjects(v, want, out)),
        _ => Ok(()),
    }
}

fn erased_body(subject: &str) -> Value {
    let mut body = Map::new();
    body.insert("subject".to_owned(), Value::String(subject.to_owned()));
    Value::Object(body)
}

#[cfg(test)]
fn erased(subject: &str) -> Value {
    let mut map = Map::new();
    map.insert(ERASED_TAG.to_owned(), erased_body(subject));
    Value::Object(map)
}

#[derive(Serialize, Deserialize)]
struct SealedBody {
    subject: String,
    key: u32,
    nonce: String,
    data: String,
}

/// Replaces every readable personal value in `value` by its sealed form, or by the erased form
/// for a subject whose key is `None` in `keys` (wherever its tag stands: see [`subjects`]).
pub(crate) fn seal(value: &mut Value, keys: &KeyRing) -> Result<(), StoreError> {
    match value {
        Value::Object(map) => {
            if let Some(body) = map.remove(VALUE_TAG) {
                let (tag, body) = seal_body(&body, keys)?;
                map.insert(tag.to_owned(), body);
            }
            map.iter_mut()
                .filter(|(key, _)| !is_tag(key))
                .try_for_each(|(_, v)| seal(v, keys))
        }
        Value::Array(items) => items.iter_mut().try_for_each(|v| seal(v, keys)),
        _ => Ok(()),
    }
}

/// The tag and body that replace the readable value `body`.
fn seal_body(body: &Value, keys: &KeyRing) -> Result<(&'static str, Value), StoreError> {
    let subject = subject_of(body).map_err(StoreError::backend)?.to_owned();
    let Some(Some(key)) = keys.get(&subject) else {
        return Ok((ERASED_TAG, erased_body(&subject)));
    };
    let plain = body.get("value").unwrap_or(&Value::Null);
    let plain = serde_json::to_vec(plain).map_err(StoreError::backend)?;
    let nonce = random_nonce()?;
    let aad = aad(&subject, key.version);
    let data = key
        .cipher
        .encrypt(
            &nonce,
            Payload {
                msg: &plain,
                aad: &aad,
            },
        )
        .map_err(|_| StoreError::backend("encrypting a personal value failed"))?;
    let body = SealedBody {
        subject,
        key: key.version,
        nonce: BASE64.encode(nonce),
        data: BASE64.encode(data),
    };
    Ok((
        SEALED_TAG,
        serde_json::to_value(body).map_err(StoreError::backend)?,
    ))
}

/// Replaces every sealed value in `value` by its readable form, or by the erased form for a
/// subject whose key is gone. A value that does not authenticate is an error naming `location`.
pub(crate) fn open(
    value: &mut Value,
    keys: &KeyRing,
    location: &dyn Fn() -> String,
) -> Result<(), StoreError> {
    match value {
        Value::Object(map) => {
            if let Some(body) = map.remove(SEALED_TAG) {
                let (tag, body) = open_body(body, keys, location)?;
                map.insert(tag.to_owned(), body);
            }
            map.iter_mut()
                .filter(|(key, _)| !is_tag(key))
                .try_for_each(|(_, v)| open(v, keys, location))
        }
        Value::Array(items) => items.iter_mut().try_for_each(|v| open(v, keys, location)),
        _ => Ok(()),
    }
}

/// The tag and body that replace the sealed value `body`.
fn open_body(
    body: Value,
    keys: &KeyRing,
    location: &dyn Fn() -> String,
) -> Result<(&'static str, Value), StoreError> {
    let corrupt = |reason: &str| StoreError::Corrupt {
        location: location(),
        reason: format!("personal value: {reason}"),
    };
    let body: SealedBody = serde_json::from_value(body)
        .map_err(|e| corrupt(&format!("malformed sealed value ({e})")))?;
    let Some(Some(key)) = keys.get(&body.subject) else {
        return Ok((ERASED_TAG, erased_body(&body.subject)));
    };
    if key.version != body.key {
        return Err(corrupt(&format!(
            "sealed with key version {} of `{}`, the key store holds version {}",
            body.key, body.subject, key.version
        )));
    }
    let nonce = BASE64
        .decode(&body.nonce)
        .ok()
        .and_then(|n| XNonce::try_from(n.as_slice()).ok())
        .ok_or_else(|| corrupt("the nonce is not 24 bytes of base64"))?;
    let data = BASE64
        .decode(&body.data)
        .map_err(|_| corrupt("the ciphertext is not base64"))?;
    let aad = aad(&body.subject, body.key);
    let plain = key
        .cipher
        .decrypt(
            &nonce,
            Payload {
                msg: &data,
                aad: &aad,
            },
        )
        .map_err(|_| {
            corrupt(&format!(
                "the ciphertext of `{}` does not authenticate (altered or moved)",
                body.subject
            ))
        })?;
    let plain: Value =
        serde_json::from_slice(&plain).map_err(|_| corrupt("the decrypted value is not JSON"))?;
    let mut inner = Map::new();
    inner.insert("subject".to_owned(), Value::String(body.subject));
    inner.insert("value".to_owned(), plain);
    Ok((VALUE_TAG, Value::Object(inner)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(subject: &str) -> KeyRing {
        let key = random_key().unwrap();
        HashMap::from([(subject.to_owned(), SubjectKey::new(1, &key))])
    }

    #[test]
    fn personal_round_trips_through_its_json_forms() {
        let p = Personal::new("c-1", "Ada".to_owned());
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"$personal": {"subject": "c-1", "value": "Ada"}})
        );
        assert_eq!(serde_json::from_value::<Personal<String>>(json).unwrap(), p);
        let e: Personal<String> = Personal::Erased {
            subject: "c-1".into(),
        };
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(serde_json::from_value::<Personal<String>>(json).unwrap(), e);
        let opt = Personal::new("c-1", None::<u8>);
        let json = serde_json::to_value(&opt).unwrap();
        assert_eq!(
            serde_json::from_value::<Personal<Option<u8>>>(json).unwrap(),
            opt
        );
        assert!(!format!("{p:?}").contains("Ada"));
    }

    #[test]
    fn sealed_values_do_not_deserialize_without_the_key_store() {
        let mut v = serde_json::to_value(Personal::new("c-1", "Ada")).unwrap();
        seal(&mut v, &ring("c-1")).unwrap();
        assert!(!v.to_string().contains("Ada"), "{v}");
        let err = serde_json::from_value::<Personal<String>>(v).unwrap_err();
        assert!(err.to_string().contains("without its key store"), "{err}");
    }

    #[test]
    fn seal_then_open_gives_the_value_back_and_a_wrong_key_is_an_error() {
        let keys = ring("c-1");
        let original = serde_json::json!({"a": [1, {"name": Personal::new("c-1", "Ada")}], "b": 2});
        let mut v = original.clone();
        seal(&mut v, &keys).unwrap();
        let mut opened = v.clone();
        open(&mut opened, &keys, &|| "here".to_owned()).unwrap();
        assert_eq!(opened, original);
        let err = open(&mut v.clone(), &ring("c-1"), &|| "here".to_owned()).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        let mut forgotten = v;
        open(
            &mut forgotten,
            &HashMap::from([("c-1".to_owned(), None)]),
            &|| "here".to_owned(),
        )
        .unwrap();
        assert_eq!(forgotten["a"][1]["name"], erased("c-1"));
    }

    #[test]
    fn nested_personal_values_and_bad_subjects_are_refused() {
        let nested = serde_json::to_value(Personal::new("a", Personal::new("b", 1))).unwrap();
        assert!(subjects(&nested, VALUE_TAG, &mut BTreeSet::new()).is_err());
        let empty = serde_json::to_value(Personal::new("", 1)).unwrap();
        assert!(subjects(&empty, VALUE_TAG, &mut BTreeSet::new()).is_err());
        let control = serde_json::to_value(Personal::new("a\nb", 1)).unwrap();
        assert!(subjects(&control, VALUE_TAG, &mut BTreeSet::new()).is_err());
    }
}
