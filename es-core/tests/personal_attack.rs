//! Crypto-shredding against oddly shaped payloads: a `Personal` flattened into its parent struct
//! or carried by an internally tagged enum (serde writes its tag next to other fields), a key
//! spelled with a JSON escape, and an application map whose key is one of the tags. Each is
//! either sealed (never stored in clear, erased after `forget`) or refused with a typed error;
//! none is stored and then unreadable.

use std::collections::BTreeMap;

use es_core::personal::{Encrypted, Personal};
use es_core::{
    AppendRequest, EventStore, ExpectedVersion, NewEvent, ReadStream, RecordedEvent, StoreError,
    StreamId,
};
use es_memory::{InMemoryKeyStore, InMemoryStore};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Flattened {
    #[serde(flatten)]
    email: Personal<String>,
    segment: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
enum Contact {
    Email(Personal<String>),
    Phone { number: Personal<String> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Holder {
    contact: Contact,
}

fn encrypted() -> Encrypted<InMemoryStore, InMemoryKeyStore> {
    Encrypted::new(InMemoryStore::new(), InMemoryKeyStore::new())
}

async fn append(
    store: &impl EventStore,
    stream: &StreamId,
    payload: Vec<u8>,
) -> Result<(), StoreError> {
    store
        .append(AppendRequest::new(
            stream.clone(),
            ExpectedVersion::Any,
            vec![NewEvent::new("Written", 1, payload).unwrap()],
        ))
        .await
        .map(|_| ())
}

async fn read(
    store: &impl EventStore,
    stream: &StreamId,
) -> Result<Vec<RecordedEvent>, StoreError> {
    store
        .read_stream(stream, ReadStream::forward())
        .try_collect()
        .await
}

fn raw(events: &[RecordedEvent]) -> String {
    events
        .iter()
        .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Writes `payload` (which holds "ada@example.com" about subject "c-1") through `Encrypted`,
/// checks the inner store never holds it in clear, that it reads back, and that after `forget`
/// nothing read through `Encrypted` holds it.
async fn sealed_then_erased(payload: Vec<u8>) -> Vec<RecordedEvent> {
    let store = encrypted();
    let stream = StreamId::new("customer", "1").unwrap();
    append(&store, &stream, payload).await.unwrap();
    let inner = read(store.inner(), &stream).await.unwrap();
    assert!(
        !raw(&inner).contains("ada@example.com"),
        "stored in clear: {}",
        raw(&inner)
    );
    let opened = read(&store, &stream).await.unwrap();
    assert!(raw(&opened).contains("ada@example.com"), "{}", raw(&opened));
    assert!(store.forget("c-1").await.unwrap(), "a key was made");
    let erased = read(&store, &stream).await.unwrap();
    assert!(
        !raw(&erased).contains("ada@example.com"),
        "{}",
        raw(&erased)
    );
    erased
}

#[tokio::test]
async fn a_flattened_personal_field_is_sealed_and_erased() {
    let event = Flattened {
        email: Personal::new("c-1", "ada@example.com".to_owned()),
        segment: "retail".to_owned(),
    };
    let erased = sealed_then_erased(serde_json::to_vec(&event).unwrap()).await;
    let back: Flattened = serde_json::from_slice(&erased[0].payload).unwrap();
    assert!(back.email.is_erased());
    assert_eq!(back.segment, "retail");
}

#[tokio::test]
async fn a_flattened_personal_field_reads_back_as_its_value() {
    let store = encrypted();
    let stream = StreamId::new("customer", "2").unwrap();
    let event = Flattened {
        email: Personal::new("c-1", "ada@example.com".to_owned()),
        segment: "retail".to_owned(),
    };
    append(&store, &stream, serde_json::to_vec(&event).unwrap())
        .await
        .unwrap();
    let opened = read(&store, &stream).await.unwrap();
    let back: Flattened = serde_json::from_slice(&opened[0].payload).unwrap();
    assert_eq!(back, event);
}

#[tokio::test]
async fn a_personal_value_in_an_internally_tagged_enum_is_sealed_and_erased() {
    let event = Holder {
        contact: Contact::Email(Personal::new("c-1", "ada@example.com".to_owned())),
    };
    let erased = sealed_then_erased(serde_json::to_vec(&event).unwrap()).await;
    let back: Holder = serde_json::from_slice(&erased[0].payload).unwrap();
    let Contact::Email(email) = back.contact else {
        panic!("an e-mail contact")
    };
    assert!(email.is_erased());

    // The struct variant holds the value one level down: sealed as before.
    let event = Holder {
        contact: Contact::Phone {
            number: Personal::new("c-1", "ada@example.com".to_owned()),
        },
    };
    sealed_then_erased(serde_json::to_vec(&event).unwrap()).await;
}

#[tokio::test]
async fn a_bare_store_refuses_a_flattened_personal_value() {
    let store = InMemoryStore::new();
    let stream = StreamId::new("customer", "3").unwrap();
    let event = Flattened {
        email: Personal::new("c-1", "ada@example.com".to_owned()),
        segment: "retail".to_owned(),
    };
    let err = append(&store, &stream, serde_json::to_vec(&event).unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::InvalidRequest { reason, .. } if reason.contains("Encrypted")),
        "{err}"
    );
    let event = Holder {
        contact: Contact::Email(Personal::new("c-1", "ada@example.com".to_owned())),
    };
    let err = append(&store, &stream, serde_json::to_vec(&event).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidRequest { .. }), "{err}");
    assert!(read(&store, &stream).await.unwrap().is_empty());
}

/// The tag spelled with a JSON escape (`\u0024` is `$`) is the same key to every JSON reader.
const ESCAPED: &str = r#"{"email":{"\u0024personal":{"subject":"c-1","value":"ada@example.com"}}}"#;

#[tokio::test]
async fn an_escaped_tag_is_sealed_through_encrypted() {
    // It is what the application reads back as a readable personal value.
    let value: serde_json::Value = serde_json::from_str(ESCAPED).unwrap();
    let email: Personal<String> = serde_json::from_value(value["email"].clone()).unwrap();
    assert_eq!(email.value().unwrap(), "ada@example.com");
    sealed_then_erased(ESCAPED.as_bytes().to_vec()).await;
}

#[tokio::test]
async fn a_bare_store_refuses_an_escaped_tag() {
    let store = InMemoryStore::new();
    let stream = StreamId::new("customer", "4").unwrap();
    let err = append(&store, &stream, ESCAPED.as_bytes().to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidRequest { .. }), "{err}");
}

/// An application map whose key happens to be a tag (user-chosen attribute names).
#[tokio::test]
async fn a_map_key_named_like_a_tag_is_never_stored_unreadable() {
    for tag in ["$sealed", "$erased", "$personal"] {
        let store = encrypted();
        let stream = StreamId::new("customer", "5").unwrap();
        let attributes = BTreeMap::from([(tag.to_owned(), "x".to_owned())]);
        let payload = serde_json::to_vec(&serde_json::json!({ "attributes": attributes })).unwrap();
        match append(&store, &stream, payload).await {
            // Refused with a typed error, nothing written: fine.
            Err(StoreError::InvalidRequest { .. }) => {
                assert!(read(store.inner(), &stream).await.unwrap().is_empty());
            }
            Err(other) => panic!("{tag}: {other}"),
            // Accepted: then every reader must be able to read it.
            Ok(()) => {
                let events = read(&store, &stream).await.unwrap_or_else(|err| {
                    panic!("{tag}: accepted, then unreadable through Encrypted: {err}")
                });
                assert_eq!(events.len(), 1);
            }
        }
    }
}

mod decode_errors {
    //! An event whose personal field no longer matches the type the application reads (a schema
    //! change gone wrong): the error names the event, never the decrypted value.

    use es_core::personal::{Encrypted, Personal};
    use es_core::{
        Aggregate, AppendRequest, Apply, DomainEvent, EventStore, ExpectedVersion, NewEvent,
        Repository, StreamId,
    };
    use es_memory::{InMemoryKeyStore, InMemoryStore};
    use serde::{Deserialize, Serialize};

    /// The application now reads the field as a number; it was stored as a string.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Registered {
        email: Personal<u64>,
    }

    #[derive(Debug, Clone, DomainEvent)]
    #[event(apply(Customer))]
    enum CustomerEvent {
        Registered(Registered),
    }

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    struct Customer {
        registered: bool,
    }

    impl Apply<Registered> for Customer {
        fn apply(&mut self, _: &Registered) {
            self.registered = true;
        }
    }

    impl Aggregate for Customer {
        const CATEGORY: &'static str = "customer";
        type Command = ();
        type Event = CustomerEvent;
        type Error = std::convert::Infallible;

        fn handle(&self, (): &()) -> Result<Vec<CustomerEvent>, Self::Error> {
            Ok(Vec::new())
        }
    }

    fn chain(err: &dyn std::error::Error) -> String {
        let mut parts = vec![format!("{err} / {err:?}")];
        let mut source = err.source();
        while let Some(s) = source {
            parts.push(format!("{s} / {s:?}"));
            source = s.source();
        }
        parts.join(" / ")
    }

    #[tokio::test]
    async fn a_payload_that_does_not_decode_does_not_show_its_personal_value() {
        let store = Encrypted::new(InMemoryStore::new(), InMemoryKeyStore::new());
        let payload = serde_json::to_vec(&serde_json::json!({
            "email": Personal::new("c-9", "ada@example.com"),
        }))
        .unwrap();
        store
            .append(AppendRequest::new(
                StreamId::new("customer", "9").unwrap(),
                ExpectedVersion::NoStream,
                vec![NewEvent::new("Registered", 1, payload).unwrap()],
            ))
            .await
            .unwrap();
        let repo = Repository::new(store);
        let err = repo.load::<Customer>("9").await.unwrap_err();
        let text = chain(&err);
        assert!(!text.contains("ada@example.com"), "{text}");
        assert!(
            text.contains("customer-9"),
            "the error names the event: {text}"
        );
    }
}

/// Metadata is never encrypted: a `Personal` put there would be stored in clear, so it is refused
/// like one in a payload written to a bare store, through `Encrypted` too.
#[tokio::test]
async fn a_personal_value_in_metadata_is_refused() {
    let store = encrypted();
    let stream = StreamId::new("customer", "6").unwrap();
    let mut metadata = es_core::Metadata::new();
    metadata.custom.insert(
        "who".to_owned(),
        serde_json::to_value(Personal::new("c-1", "ada@example.com")).unwrap(),
    );
    let event = NewEvent::new("Written", 1, b"{}".to_vec())
        .unwrap()
        .with_metadata(metadata);
    let err = store
        .append(AppendRequest::new(
            stream.clone(),
            ExpectedVersion::Any,
            vec![event],
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::InvalidRequest { reason, .. } if reason.contains("metadata")),
        "{err}"
    );
    let stored = read(store.inner(), &stream).await.unwrap();
    assert!(stored.is_empty(), "{stored:?}");
}

/// A sealed value whose subject has neither a key nor a tombstone in the key store (the key store
/// lost its data, or the store is read with another key store than it was written with) was not
/// forgotten: it is an error, not an erased value that a projection would keep for good.
#[tokio::test]
async fn a_key_store_without_the_subject_is_an_error_not_an_erasure() {
    let store = encrypted();
    let stream = StreamId::new("customer", "7").unwrap();
    let payload = serde_json::to_vec(&Personal::new("c-7", "ada@example.com")).unwrap();
    append(&store, &stream, payload).await.unwrap();
    let lost = Encrypted::new(store.inner().clone(), InMemoryKeyStore::new());
    let err = read(&lost, &stream).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { reason, .. } if reason.contains("c-7")),
        "{err}"
    );
    // Forgotten in that key store, it reads erased.
    lost.forget("c-7").await.unwrap();
    let events = read(&lost, &stream).await.unwrap();
    let email: Personal<String> = serde_json::from_slice(&events[0].payload).unwrap();
    assert!(email.is_erased());
}
