//! Upcaster chains: validation when built, and decoding through renames, splits, retirements and
//! multi-step chains.

use std::sync::Arc;

use bytes::Bytes;
use es_core::upcast::{self, UpcastEvent, Upcaster};
use es_core::{
    DecodeError, DomainEvent, Metadata, RecordedEvent, StreamId, UpcastChainError, Upcasters,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Named {
    first: String,
    last: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Aged {
    years: u32,
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum PersonEvent {
    #[event(version = 3)]
    Named(Named),
    Aged(Aged),
}

fn chain(list: Vec<Arc<dyn Upcaster>>) -> Result<Upcasters, UpcastChainError> {
    Upcasters::for_events::<PersonEvent>(list)
}

fn stored(event_type: &str, version: u32, payload: &serde_json::Value) -> RecordedEvent {
    RecordedEvent {
        event_id: uuid::Uuid::now_v7(),
        stream_id: StreamId::parse("person-1").unwrap(),
        stream_version: 7,
        global_position: 70,
        partition: 0,
        event_type: event_type.into(),
        schema_version: version,
        payload: Bytes::from(payload.to_string()),
        metadata: Metadata::default(),
        recorded_at: es_core::event::now_micros(),
    }
}

fn v1_to_v2() -> Arc<dyn Upcaster> {
    Arc::new(upcast::map("Named", 1, |p| {
        let full = p["name"]
            .as_str()
            .ok_or(upcast::UpcastError::MissingField("name"))?
            .to_owned();
        let (first, last) = full.split_once(' ').unwrap_or((&full, ""));
        Ok(json!({ "given": first, "family": last }))
    }))
}

fn v2_to_v3() -> Arc<dyn Upcaster> {
    Arc::new(upcast::map("Named", 2, |p| {
        Ok(json!({ "first": p["given"], "last": p["family"] }))
    }))
}

#[test]
fn multi_step_chain_brings_old_events_to_the_current_version() {
    let upcasters = chain(vec![v2_to_v3(), v1_to_v2()]).unwrap();
    let decoded: Vec<PersonEvent> = upcasters
        .decode(&stored("Named", 1, &json!({ "name": "Ada Lovelace" })))
        .unwrap();
    assert_eq!(
        decoded,
        vec![PersonEvent::Named(Named {
            first: "Ada".into(),
            last: "Lovelace".into()
        })]
    );
    let decoded: Vec<PersonEvent> = upcasters
        .decode(&stored(
            "Named",
            2,
            &json!({ "given": "Alan", "family": "Turing" }),
        ))
        .unwrap();
    assert_eq!(
        decoded,
        vec![PersonEvent::Named(Named {
            first: "Alan".into(),
            last: "Turing".into()
        })]
    );
    let current: Vec<PersonEvent> = upcasters
        .decode(&stored("Named", 3, &json!({ "first": "G", "last": "H" })))
        .unwrap();
    assert_eq!(current.len(), 1);
}

#[test]
fn renames_splits_and_retirements() {
    let upcasters = chain(vec![
        Arc::new(upcast::rename("Birthday", 1, "Aged", 1)),
        Arc::new(upcast::custom(
            "Registered",
            1,
            &[("Named", 3), ("Aged", 1)],
            |p| {
                Ok(vec![
                    UpcastEvent {
                        event_type: "Named".into(),
                        schema_version: 3,
                        payload: json!({ "first": p["first"], "last": p["last"] }),
                    },
                    UpcastEvent {
                        event_type: "Aged".into(),
                        schema_version: 1,
                        payload: json!({ "years": p["age"] }),
                    },
                ])
            },
        )),
        Arc::new(upcast::retire("Pinged", 1)),
    ])
    .unwrap();
    let renamed: Vec<PersonEvent> = upcasters
        .decode(&stored("Birthday", 1, &json!({ "years": 40 })))
        .unwrap();
    assert_eq!(renamed, vec![PersonEvent::Aged(Aged { years: 40 })]);
    let split: Vec<PersonEvent> = upcasters
        .decode(&stored(
            "Registered",
            1,
            &json!({ "first": "Grace", "last": "Hopper", "age": 85 }),
        ))
        .unwrap();
    assert_eq!(
        split,
        vec![
            PersonEvent::Named(Named {
                first: "Grace".into(),
                last: "Hopper".into()
            }),
            PersonEvent::Aged(Aged { years: 85 }),
        ],
        "a split keeps the order of its outputs"
    );
    let dropped: Vec<PersonEvent> = upcasters.decode(&stored("Pinged", 1, &json!({}))).unwrap();
    assert!(dropped.is_empty());
}

#[test]
fn invalid_chains_are_rejected_when_built() {
    let dup = chain(vec![v1_to_v2(), v1_to_v2(), v2_to_v3()]).unwrap_err();
    assert_eq!(
        dup,
        UpcastChainError::Duplicate {
            event_type: "Named".into(),
            version: 1
        }
    );

    let gap = chain(vec![v1_to_v2()]).unwrap_err();
    assert!(
        matches!(gap, UpcastChainError::Gap { ref event_type, version: 2, .. } if event_type == "Named"),
        "{gap}"
    );
    assert!(gap.to_string().contains("gap"));

    let current = chain(vec![Arc::new(upcast::map("Aged", 1, Ok))]).unwrap_err();
    assert_eq!(
        current,
        UpcastChainError::ReadsCurrentVersion {
            event_type: "Aged".into(),
            version: 1
        }
    );

    let cycle = chain(vec![
        Arc::new(upcast::rename("Old", 1, "Older", 1)),
        Arc::new(upcast::rename("Older", 1, "Old", 1)),
    ])
    .unwrap_err();
    assert!(
        matches!(cycle, UpcastChainError::Cycle { ref path } if path.contains("Old v1 -> Older v1 -> Old v1")),
        "{cycle}"
    );

    let unknown_target = chain(vec![Arc::new(upcast::rename("Old", 1, "Nowhere", 1))]).unwrap_err();
    assert!(matches!(unknown_target, UpcastChainError::Gap { .. }));
}

#[test]
fn decode_errors_name_the_stream_and_version() {
    let upcasters = chain(vec![
        v2_to_v3(),
        Arc::new(upcast::map("Named", 1, |_| {
            Err(upcast::UpcastError::other("cannot parse the legacy name"))
        })),
        Arc::new(upcast::custom("Liar", 1, &[("Aged", 1)], |_| {
            Ok(vec![UpcastEvent {
                event_type: "Named".into(),
                schema_version: 3,
                payload: json!({}),
            }])
        })),
    ])
    .unwrap();
    let check = |event: RecordedEvent, what: &str| {
        let err = upcasters.decode::<PersonEvent>(&event).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("person-1") && text.contains("version 7"),
            "{what}: {text}"
        );
        err
    };
    let failing = check(stored("Named", 1, &json!({})), "failing upcaster");
    assert!(
        matches!(&failing, DecodeError::Upcast { source: upcast::UpcastError::Other(e), .. }
            if e.to_string() == "cannot parse the legacy name"),
        "{failing:?}"
    );
    assert!(
        std::error::Error::source(&failing).is_some(),
        "the upcaster's error is the source"
    );
    assert!(matches!(
        check(stored("Liar", 1, &json!({})), "undeclared output"),
        DecodeError::Upcast {
            source: upcast::UpcastError::Undeclared { .. },
            ..
        }
    ));
    assert!(matches!(
        check(stored("Unheard", 1, &json!({})), "unknown type"),
        DecodeError::UnknownEventType { .. }
    ));
    assert!(matches!(
        check(stored("Aged", 1, &json!({ "years": "old" })), "bad payload"),
        DecodeError::Payload { .. }
    ));
    assert!(matches!(
        check(stored("Aged", 2, &json!({ "years": 1 })), "newer schema"),
        DecodeError::SchemaVersion {
            stored_version: 2,
            current_version: 1,
            ..
        }
    ));
    let mut not_json = stored("Named", 2, &json!({}));
    not_json.payload = Bytes::from_static(b"{not json");
    assert!(matches!(
        check(not_json, "not JSON"),
        DecodeError::Payload { .. }
    ));
}

#[test]
fn event_types_list_every_variant() {
    let names: Vec<(&str, u32)> = PersonEvent::EVENT_TYPES
        .iter()
        .map(|s| (s.name, s.version))
        .collect();
    assert_eq!(names, [("Named", 3), ("Aged", 1)]);
}
