//! The `DomainEvent` impl: names, versions, the list of event types and payload (de)serialization.

use es_core::{DomainEvent, EventSchema, PayloadError};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Opened {
    owner: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Deposited {
    amount: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Closed;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Note(String);

#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum AccountEvent {
    Opened(Opened),
    #[event(rename = "MoneyDeposited", version = 2)]
    Deposited(Deposited),
    #[event(version = 3)]
    Closed(Closed),
    #[event(rename = "account.note-added_v1")]
    Noted(Note),
    #[event(version = 2)]
    r#Raw(Vec<u8>),
}

fn all_events() -> Vec<AccountEvent> {
    vec![
        AccountEvent::Opened(Opened {
            owner: "ann".to_owned(),
        }),
        AccountEvent::Deposited(Deposited { amount: 5 }),
        AccountEvent::Closed(Closed),
        AccountEvent::Noted(Note("hi".to_owned())),
        AccountEvent::Raw(vec![1, 2]),
    ]
}

#[test]
fn event_types_lists_every_variant_in_declaration_order() {
    let schema = |name, version| EventSchema { name, version };
    assert_eq!(
        AccountEvent::EVENT_TYPES,
        &[
            schema("Opened", 1),
            schema("MoneyDeposited", 2),
            schema("Closed", 3),
            schema("account.note-added_v1", 1),
            schema("Raw", 2),
        ]
    );
}

#[test]
fn event_type_and_version_match_event_types() {
    let events = all_events();
    assert_eq!(events.len(), AccountEvent::EVENT_TYPES.len());
    for (event, schema) in events.iter().zip(AccountEvent::EVENT_TYPES) {
        assert_eq!(event.event_type(), schema.name);
        assert_eq!(event.schema_version(), schema.version);
        assert_eq!(AccountEvent::schema_of(schema.name), Some(*schema));
    }
}

#[test]
fn name_defaults_to_the_variant_name_and_rename_overrides_it() {
    assert_eq!(all_events()[0].event_type(), "Opened");
    assert_eq!(all_events()[1].event_type(), "MoneyDeposited");
    // A raw identifier is stored without its `r#`.
    assert_eq!(all_events()[4].event_type(), "Raw");
    assert_eq!(AccountEvent::schema_of("Deposited"), None);
}

#[test]
fn payload_is_stored_without_the_enum_tag() {
    let payloads: Vec<String> = all_events()
        .iter()
        .map(|e| String::from_utf8(e.to_payload().unwrap()).unwrap())
        .collect();
    assert_eq!(
        payloads,
        [
            r#"{"owner":"ann"}"#,
            r#"{"amount":5}"#,
            "null",
            r#""hi""#,
            "[1,2]"
        ]
    );
}

#[test]
fn round_trips_every_variant_through_bytes() {
    for event in all_events() {
        let payload = event.to_payload().unwrap();
        let back = AccountEvent::from_payload(event.event_type(), &payload).unwrap();
        assert_eq!(back, event);
    }
}

#[test]
fn round_trips_every_variant_through_a_json_value() {
    for event in all_events() {
        let value: serde_json::Value =
            serde_json::from_slice(&event.to_payload().unwrap()).unwrap();
        let back = AccountEvent::from_value(event.event_type(), value).unwrap();
        assert_eq!(back, event);
    }
}

#[test]
fn decodes_by_the_stored_name_not_the_variant_name() {
    let event = AccountEvent::from_value("MoneyDeposited", json!({ "amount": 7 })).unwrap();
    assert_eq!(event, AccountEvent::Deposited(Deposited { amount: 7 }));

    let err = AccountEvent::from_value("Deposited", json!({ "amount": 7 })).unwrap_err();
    assert!(matches!(err, PayloadError::UnknownType(name) if name == "Deposited"));
}

#[test]
fn unknown_type_is_a_typed_error() {
    let err = AccountEvent::from_payload("Nope", br#"{"amount":1}"#).unwrap_err();
    assert!(matches!(&err, PayloadError::UnknownType(name) if name == "Nope"));
    assert_eq!(err.to_string(), "unknown event type `Nope`");

    let err = AccountEvent::from_value("", json!(null)).unwrap_err();
    assert!(matches!(err, PayloadError::UnknownType(name) if name.is_empty()));
}

#[test]
fn bad_payload_is_a_typed_error() {
    let err = AccountEvent::from_payload("MoneyDeposited", br#"{"amount":"five"}"#).unwrap_err();
    assert!(matches!(err, PayloadError::Invalid(_)), "{err:?}");

    let err = AccountEvent::from_payload("MoneyDeposited", b"not json").unwrap_err();
    assert!(matches!(err, PayloadError::Invalid(_)), "{err:?}");

    let err = AccountEvent::from_value("Opened", json!({ "amount": 1 })).unwrap_err();
    assert!(matches!(err, PayloadError::Invalid(_)), "{err:?}");
}

#[test]
fn a_tagged_payload_is_rejected() {
    // The externally tagged form serde would produce for the enum is not the stored form.
    let err = AccountEvent::from_value("MoneyDeposited", json!({ "Deposited": { "amount": 1 } }))
        .unwrap_err();
    assert!(matches!(err, PayloadError::Invalid(_)), "{err:?}");
}

#[test]
fn works_with_the_store_envelope() {
    let event = AccountEvent::Deposited(Deposited { amount: 9 });
    let new = es_core::NewEvent::from_domain(&event).unwrap();
    assert_eq!(new.event_type, "MoneyDeposited");
    assert_eq!(new.schema_version, 2);
    assert_eq!(&new.payload[..], br#"{"amount":9}"#);
}

/// A single-variant enum exercises the single-arm matches.
#[derive(Debug, PartialEq, DomainEvent)]
enum Single {
    Only(Deposited),
}

#[test]
fn single_variant_enum() {
    assert_eq!(
        Single::EVENT_TYPES,
        &[EventSchema {
            name: "Only",
            version: 1
        }]
    );
    let event = Single::from_payload("Only", br#"{"amount":1}"#).unwrap();
    assert_eq!(event, Single::Only(Deposited { amount: 1 }));
    assert_eq!(event.schema_version(), 1);
}
