//! Schema evolution: upcasters turn stored events of an old `(event_type, schema_version)` into
//! the current shape, on the serialized form, when they are read. Stored events are never
//! rewritten.
//!
//! An upcaster transforms one `(type, version)` into zero or more events: the next version of
//! the same type, a renamed type, several events (a split), or nothing (a retired event). It
//! declares what it can produce, so that a chain is validated once, when the repository is built
//! ([`Upcasters::new`]): two upcasters for one source, an output that is
//! neither a current event type nor the source of another upcaster (a gap), an upcaster for a
//! current version, and cycles are all reported as [`UpcastChainError`]s.
//!
//! After upcasting, every event must be at the current schema version of its type; an event
//! stored at an older version with no upcaster, or at a newer version than the application knows,
//! is a [`DecodeError`], not a guess.
//!
//! ```
//! use es_core::upcast;
//! // v1 of "AccountOpened" had no currency; v2 requires one.
//! let add_currency = upcast::map("AccountOpened", 1, |mut payload| {
//!     payload["currency"] = "EUR".into();
//!     Ok(payload)
//! });
//! // A payload the upcaster cannot read is a typed error.
//! let split_name = upcast::map("CustomerRegistered", 1, |mut payload| {
//!     let name = payload["name"].as_str().ok_or(upcast::UpcastError::MissingField("name"))?;
//!     let (first, last) = name.split_once(' ').unwrap_or((name, ""));
//!     let (first, last) = (first.to_owned(), last.to_owned());
//!     payload["first_name"] = first.into();
//!     payload["last_name"] = last.into();
//!     Ok(payload)
//! });
//! # let _ = (add_currency, split_name);
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use crate::event::{DomainEvent, EventSchema, PayloadError, RecordedEvent, RecordedEventRef};
use crate::stream_id::StreamId;

/// One event produced by an upcaster.
#[derive(Debug, Clone, PartialEq)]
pub struct UpcastEvent {
    /// Its event type.
    pub event_type: String,
    /// Its schema version.
    pub schema_version: u32,
    /// Its payload.
    pub payload: Value,
}

/// Why an upcaster could not transform a stored payload. It becomes
/// [`DecodeError::Upcast`], which names the stream and version.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpcastError {
    /// The payload is not a JSON object, so it has no fields to read or add.
    #[error("the payload is not a JSON object")]
    NotAnObject,
    /// A field the upcaster needs is missing from the payload (or is not of the expected type).
    #[error("the payload has no usable field `{0}`")]
    MissingField(&'static str),
    /// A field holds a value the upcaster cannot convert.
    #[error("field `{field}` cannot be upcast: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// The payload does not deserialize into the shape the upcaster reads.
    #[error("the payload does not have the shape this upcaster reads: {0}")]
    Shape(#[from] serde_json::Error),
    /// The upcaster produced a `(type, version)` it does not declare in
    /// [`Upcaster::produces`] (a bug in the upcaster).
    #[error(
        "the upcaster of `{from_type}` v{from_version} produced `{event_type}` v{version}, which \
         it does not declare"
    )]
    Undeclared {
        /// Source type of the upcaster.
        from_type: String,
        /// Source version of the upcaster.
        from_version: u32,
        /// The undeclared output type.
        event_type: String,
        /// The undeclared output version.
        version: u32,
    },
    /// Any other reason, from the upcaster's own error type.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl UpcastError {
    /// Wraps an error of the upcaster's own.
    pub fn other(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Other(err.into())
    }
}

/// Transforms stored events of one `(event_type, schema_version)`.
pub trait Upcaster: Send + Sync + 'static {
    /// The event type this upcaster reads.
    fn source_type(&self) -> &str;
    /// The schema version this upcaster reads.
    fn source_version(&self) -> u32;
    /// Every `(event_type, schema_version)` this upcaster may produce.
    fn produces(&self) -> Vec<(String, u32)>;
    /// Transforms one payload. An `Err` says what is wrong; it becomes a [`DecodeError`].
    fn upcast(&self, payload: Value) -> Result<Vec<UpcastEvent>, UpcastError>;
}

type UpcastFn = dyn Fn(Value) -> Result<Vec<UpcastEvent>, UpcastError> + Send + Sync;

/// An upcaster made of a closure; built by [`map`], [`rename`], [`retire`] and [`custom`].
pub struct FnUpcaster {
    event_type: String,
    from_version: u32,
    produces: Vec<(String, u32)>,
    f: Box<UpcastFn>,
}

impl fmt::Debug for FnUpcaster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnUpcaster")
            .field("event_type", &self.event_type)
            .field("from_version", &self.from_version)
            .field("produces", &self.produces)
            .finish_non_exhaustive()
    }
}

impl Upcaster for FnUpcaster {
    fn source_type(&self) -> &str {
        &self.event_type
    }
    fn source_version(&self) -> u32 {
        self.from_version
    }
    fn produces(&self) -> Vec<(String, u32)> {
        self.produces.clone()
    }
    fn upcast(&self, payload: Value) -> Result<Vec<UpcastEvent>, UpcastError> {
        (self.f)(payload)
    }
}

/// Rewrites the payload of `(event_type, from_version)` into version `from_version + 1`.
pub fn map<F>(event_type: &str, from_version: u32, f: F) -> FnUpcaster
where
    F: Fn(Value) -> Result<Value, UpcastError> + Send + Sync + 'static,
{
    let name = event_type.to_owned();
    let to = from_version + 1;
    FnUpcaster {
        event_type: name.clone(),
        from_version,
        produces: vec![(name.clone(), to)],
        f: Box::new(move |payload| {
            Ok(vec![UpcastEvent {
                event_type: name.clone(),
                schema_version: to,
                payload: f(payload)?,
            }])
        }),
    }
}

/// Renames `(event_type, from_version)` to `(new_type, new_version)`, keeping the payload.
pub fn rename(event_type: &str, from_version: u32, new_type: &str, new_version: u32) -> FnUpcaster {
    let new_type = new_type.to_owned();
    FnUpcaster {
        event_type: event_type.to_owned(),
        from_version,
        produces: vec![(new_type.clone(), new_version)],
        f: Box::new(move |payload| {
            Ok(vec![UpcastEvent {
                event_type: new_type.clone(),
                schema_version: new_version,
                payload,
            }])
        }),
    }
}

/// Drops every stored `(event_type, from_version)` event on read (a retired event type).
pub fn retire(event_type: &str, from_version: u32) -> FnUpcaster {
    FnUpcaster {
        event_type: event_type.to_owned(),
        from_version,
        produces: Vec::new(),
        f: Box::new(|_| Ok(Vec::new())),
    }
}

/// Any transformation of `(event_type, from_version)` into events of the declared `produces`
/// kinds, for example a split into several events.
pub fn custom<F>(event_type: &str, from_version: u32, produces: &[(&str, u32)], f: F) -> FnUpcaster
where
    F: Fn(Value) -> Result<Vec<UpcastEvent>, UpcastError> + Send + Sync + 'static,
{
    FnUpcaster {
        event_type: event_type.to_owned(),
        from_version,
        produces: produces
            .iter()
            .map(|(t, v)| ((*t).to_owned(), *v))
            .collect(),
        f: Box::new(f),
    }
}

/// Why a set of upcasters is not a valid chain for an event enum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpcastChainError {
    /// Two upcasters read the same `(type, version)`.
    #[error("two upcasters read `{event_type}` v{version}")]
    Duplicate {
        /// Event type.
        event_type: String,
        /// Schema version.
        version: u32,
    },
    /// An upcaster reads the current version of a type, which needs no upcasting.
    #[error("an upcaster reads `{event_type}` v{version}, which is the current version")]
    ReadsCurrentVersion {
        /// Event type.
        event_type: String,
        /// Schema version.
        version: u32,
    },
    /// An upcaster produces a `(type, version)` that is neither current nor upcast further.
    #[error(
        "the upcaster of `{from_type}` v{from_version} produces `{event_type}` v{version}, \
         which is not a current event type and no upcaster reads it (a gap in the chain)"
    )]
    Gap {
        /// Source type of the upcaster.
        from_type: String,
        /// Source version of the upcaster.
        from_version: u32,
        /// The dangling output type.
        event_type: String,
        /// The dangling output version.
        version: u32,
    },
    /// Upcasters feed each other in a loop.
    #[error("upcasters form a cycle: {path}")]
    Cycle {
        /// The cycle, as `type vN -> type vM -> ...`.
        path: String,
    },
}

/// Why a stored event could not become a typed event. Names the stream and version.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The stored event type is not part of the event enum and no upcaster handles it.
    #[error("unknown event type `{event_type}` in `{stream_id}` at version {version}")]
    UnknownEventType {
        /// The stream.
        stream_id: StreamId,
        /// The stream version of the event.
        version: u64,
        /// The unknown type.
        event_type: String,
    },
    /// The payload does not deserialize into the event's payload type.
    #[error("corrupt payload of `{event_type}` in `{stream_id}` at version {version}: {source}")]
    Payload {
        /// The stream.
        stream_id: StreamId,
        /// The stream version of the event.
        version: u64,
        /// The event type.
        event_type: String,
        /// The deserialization error.
        #[source]
        source: serde_json::Error,
    },
    /// An upcaster failed or produced something it did not declare.
    #[error(
        "upcasting `{event_type}` v{schema_version} in `{stream_id}` at version {version} \
         failed: {source}"
    )]
    Upcast {
        /// The stream.
        stream_id: StreamId,
        /// The stream version of the event.
        version: u64,
        /// The event type being upcast.
        event_type: String,
        /// Its schema version.
        schema_version: u32,
        /// What went wrong.
        #[source]
        source: UpcastError,
    },
    /// The event's schema version is not the current one and no upcaster bridges the two.
    #[error(
        "`{event_type}` in `{stream_id}` at version {version} is stored at schema v{stored_version} \
         but the application reads v{current_version} and no upcaster bridges them"
    )]
    SchemaVersion {
        /// The stream.
        stream_id: StreamId,
        /// The stream version of the event.
        version: u64,
        /// The event type.
        event_type: String,
        /// Stored schema version.
        stored_version: u32,
        /// Current schema version.
        current_version: u32,
    },
}

impl DecodeError {
    /// `personal`: whether the payload held readable personal values (then the message of a
    /// deserialization error, which may quote one, is withheld).
    fn from_payload(at: &At<'_>, event_type: &str, err: PayloadError, personal: bool) -> Self {
        match err {
            PayloadError::UnknownType(event_type) => Self::UnknownEventType {
                stream_id: at.stream_id.clone(),
                version: at.version,
                event_type,
            },
            PayloadError::Invalid(source) => Self::Payload {
                stream_id: at.stream_id.clone(),
                version: at.version,
                event_type: event_type.to_owned(),
                source: crate::personal::redact_error(source, personal),
            },
        }
    }
}

/// The stored event being decoded: what its errors name.
struct At<'a> {
    stream_id: &'a StreamId,
    version: u64,
    event_type: &'a str,
    schema_version: u32,
}

impl At<'_> {
    fn upcast_error(&self, source: UpcastError) -> DecodeError {
        DecodeError::Upcast {
            stream_id: self.stream_id.clone(),
            version: self.version,
            event_type: self.event_type.to_owned(),
            schema_version: self.schema_version,
            source,
        }
    }
}

/// One validated upcaster with what it declared it produces, asked once.
#[derive(Clone)]
struct Step {
    version: u32,
    event_type: String,
    upcaster: Arc<dyn Upcaster>,
    produces: Vec<(String, u32)>,
}

/// A validated set of upcasters for one event enum; decodes stored events into typed ones.
#[derive(Clone, Default)]
pub struct Upcasters {
    /// Sorted by source version and type. Chains are short, so a scan that compares the
    /// version first beats hashing the type name of every event read.
    by_source: Vec<Step>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<_> = self
            .by_source
            .iter()
            .map(|s| format!("{} v{}", s.event_type, s.version))
            .collect();
        f.debug_struct("Upcasters").field("reads", &keys).finish()
    }
}

impl Upcasters {
    /// Validates `upcasters` as a chain into the current schemas of `E`.
    pub fn for_events<E: DomainEvent>(
        upcasters: Vec<Arc<dyn Upcaster>>,
    ) -> Result<Self, UpcastChainError> {
        Self::new(E::EVENT_TYPES, upcasters)
    }

    /// Validates `upcasters` as a chain into `current` schemas.
    pub fn new(
        current: &[EventSchema],
        upcasters: Vec<Arc<dyn Upcaster>>,
    ) -> Result<Self, UpcastChainError> {
        let is_current = |t: &str, v: u32| current.iter().any(|s| s.name == t && s.version == v);
        let mut by_key: HashMap<(String, u32), Arc<dyn Upcaster>> = HashMap::new();
        for u in upcasters {
            let key = (u.source_type().to_owned(), u.source_version());
            if is_current(&key.0, key.1) {
                return Err(UpcastChainError::ReadsCurrentVersion {
                    event_type: key.0,
                    version: key.1,
                });
            }
            if by_key.contains_key(&key) {
                return Err(UpcastChainError::Duplicate {
                    event_type: key.0,
                    version: key.1,
                });
            }
            by_key.insert(key, u);
        }
        let mut keys: Vec<_> = by_key.keys().cloned().collect();
        keys.sort();
        for key in &keys {
            for (t, v) in by_key[key].produces() {
                if !is_current(&t, v) && !by_key.contains_key(&(t.clone(), v)) {
                    return Err(UpcastChainError::Gap {
                        from_type: key.0.clone(),
                        from_version: key.1,
                        event_type: t,
                        version: v,
                    });
                }
            }
        }
        // Depth-first search for cycles: 0 = unvisited, 1 = on the path, 2 = done.
        let mut state: HashMap<(String, u32), u8> = HashMap::new();
        for key in &keys {
            let mut path = Vec::new();
            find_cycle(key, &by_key, &mut state, &mut path)?;
        }
        let mut by_source: Vec<_> = by_key
            .into_iter()
            .map(|((event_type, version), upcaster)| Step {
                version,
                event_type,
                produces: upcaster.produces(),
                upcaster,
            })
            .collect();
        by_source.sort_by(|a, b| (a.version, &a.event_type).cmp(&(b.version, &b.event_type)));
        Ok(Self { by_source })
    }

    /// Whether no upcaster is registered.
    pub fn is_empty(&self) -> bool {
        self.by_source.is_empty()
    }

    fn find(&self, event_type: &str, version: u32) -> Option<&Step> {
        self.by_source
            .iter()
            .find(|s| s.version == version && s.event_type == event_type)
    }

    /// Upcasts and decodes one stored event, passing each resulting typed event to `sink`
    /// (an upcaster may split an event into several, or drop it).
    pub fn decode_into<E: DomainEvent>(
        &self,
        event: &RecordedEvent,
        sink: impl FnMut(E),
    ) -> Result<(), DecodeError> {
        self.decode_ref_into(&event.stream_id, event.borrowed(), sink)
    }

    /// [`decode_into`](Upcasters::decode_into) for an event of stream `stream_id` borrowed from
    /// a page: the payload is decoded where it lies.
    ///
    /// A stream's tombstone ([`CLOSED_EVENT_TYPE`](crate::CLOSED_EVENT_TYPE)) is no event of any
    /// aggregate: it decodes to no typed event, so a closed aggregate loads like any other and a
    /// typed projection passes over it.
    pub fn decode_ref_into<E: DomainEvent>(
        &self,
        stream_id: &StreamId,
        event: RecordedEventRef<'_>,
        mut sink: impl FnMut(E),
    ) -> Result<(), DecodeError> {
        if event.is_tombstone() {
            return Ok(());
        }
        let at = At {
            stream_id,
            version: event.stream_version,
            event_type: event.event_type,
            schema_version: event.schema_version,
        };
        let Some(step) = self.find(event.event_type, event.schema_version) else {
            check_version::<E>(&at, event.event_type, event.schema_version)?;
            let typed = E::from_payload(event.event_type, event.payload).map_err(|e| {
                let personal = crate::personal::holds_readable_values(event.payload);
                DecodeError::from_payload(&at, event.event_type, e, personal)
            })?;
            sink(typed);
            return Ok(());
        };
        let payload: Value =
            serde_json::from_slice(event.payload).map_err(|source| DecodeError::Payload {
                stream_id: stream_id.clone(),
                version: event.stream_version,
                event_type: event.event_type.to_owned(),
                source: crate::personal::redact_error(
                    source,
                    crate::personal::may_hold_values(event.payload),
                ),
            })?;
        self.expand(&at, step, payload, &mut sink)
    }

    /// Runs the upcaster of `step` on `payload` and follows the chain for each output, in order.
    fn expand<E: DomainEvent>(
        &self,
        at: &At<'_>,
        step: &Step,
        payload: Value,
        sink: &mut impl FnMut(E),
    ) -> Result<(), DecodeError> {
        let outputs = step
            .upcaster
            .upcast(payload)
            .map_err(|e| at.upcast_error(e))?;
        for out in outputs {
            if !step
                .produces
                .iter()
                .any(|(t, v)| *t == out.event_type && *v == out.schema_version)
            {
                return Err(at.upcast_error(UpcastError::Undeclared {
                    from_type: step.event_type.clone(),
                    from_version: step.version,
                    event_type: out.event_type,
                    version: out.schema_version,
                }));
            }
            if let Some(next) = self.find(&out.event_type, out.schema_version) {
                self.expand(at, next, out.payload, sink)?;
            } else {
                check_version::<E>(at, &out.event_type, out.schema_version)?;
                let personal = crate::personal::value_holds_readable(&out.payload);
                let typed = E::from_value(&out.event_type, out.payload)
                    .map_err(|e| DecodeError::from_payload(at, &out.event_type, e, personal))?;
                sink(typed);
            }
        }
        Ok(())
    }

    /// Upcasts and decodes one stored event into a vector of typed events.
    pub fn decode<E: DomainEvent>(&self, event: &RecordedEvent) -> Result<Vec<E>, DecodeError> {
        let mut out = Vec::with_capacity(1);
        self.decode_into(event, |e| out.push(e))?;
        Ok(out)
    }
}

fn check_version<E: DomainEvent>(
    at: &At<'_>,
    event_type: &str,
    version: u32,
) -> Result<(), DecodeError> {
    match E::schema_of(event_type) {
        None => Err(DecodeError::UnknownEventType {
            stream_id: at.stream_id.clone(),
            version: at.version,
            event_type: event_type.to_owned(),
        }),
        Some(schema) if schema.version != version => Err(DecodeError::SchemaVersion {
            stream_id: at.stream_id.clone(),
            version: at.version,
            event_type: event_type.to_owned(),
            stored_version: version,
            current_version: schema.version,
        }),
        Some(_) => Ok(()),
    }
}

fn find_cycle(
    key: &(String, u32),
    graph: &HashMap<(String, u32), Arc<dyn Upcaster>>,
    state: &mut HashMap<(String, u32), u8>,
    path: &mut Vec<(String, u32)>,
) -> Result<(), UpcastChainError> {
    match state.get(key) {
        Some(2) => return Ok(()),
        Some(1) => {
            let start = path.iter().position(|k| k == key).unwrap_or(0);
            let mut names: Vec<String> = path[start..]
                .iter()
                .map(|(t, v)| format!("{t} v{v}"))
                .collect();
            names.push(format!("{} v{}", key.0, key.1));
            return Err(UpcastChainError::Cycle {
                path: names.join(" -> "),
            });
        }
        _ => {}
    }
    let Some(u) = graph.get(key) else {
        return Ok(());
    };
    state.insert(key.clone(), 1);
    path.push(key.clone());
    let mut seen = HashSet::new();
    for out in u.produces() {
        if seen.insert(out.clone()) {
            find_cycle(&out, graph, state, path)?;
        }
    }
    path.pop();
    state.insert(key.clone(), 2);
    Ok(())
}
