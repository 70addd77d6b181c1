//! Inline projections run inside the append: they see exactly the committed events, and a
//! failing one rejects the append.

use std::sync::{Arc, Mutex};

use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StoreError, StreamId};
use es_memory::InMemoryStore;

#[tokio::test]
async fn inline_projection_sees_committed_events_and_can_veto() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let store = InMemoryStore::builder()
        .inline_projection("counter", move |events| {
            if events.iter().any(|e| e.event_type == "Forbidden") {
                return Err("forbidden events are not accepted".into());
            }
            log.lock()
                .unwrap()
                .extend(events.iter().map(|e| (e.stream_version, e.global_position)));
            Ok(())
        })
        .build();
    let s = StreamId::parse("order-1").unwrap();
    let ok = vec![
        NewEvent::new("Placed", 1, "{}").unwrap(),
        NewEvent::new("Paid", 1, "{}").unwrap(),
    ];
    let r = store
        .append(AppendRequest::new(s.clone(), ExpectedVersion::NoStream, ok))
        .await
        .unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(1, r.positions[0]), (2, r.positions[1])]
    );

    let bad = vec![
        NewEvent::new("Shipped", 1, "{}").unwrap(),
        NewEvent::new("Forbidden", 1, "{}").unwrap(),
    ];
    match store
        .append(AppendRequest::new(
            s.clone(),
            ExpectedVersion::Exact(2),
            bad,
        ))
        .await
    {
        Err(StoreError::InlineProjection {
            stream_id: stream,
            projection,
            reason,
        }) => {
            assert_eq!((stream, projection.as_str()), (s.clone(), "counter"));
            assert!(reason.contains("forbidden"));
        }
        other => panic!("expected the inline projection to reject the append, got {other:?}"),
    }
    assert_eq!(
        store.stream_version(&s).await.unwrap(),
        2,
        "nothing was written"
    );
    assert_eq!(seen.lock().unwrap().len(), 2);
    // A conflicting append never reaches the projection.
    let conflict = store
        .append(AppendRequest::new(
            s.clone(),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("Placed", 1, "{}").unwrap()],
        ))
        .await;
    assert!(matches!(conflict, Err(StoreError::Conflict { .. })));
    assert_eq!(seen.lock().unwrap().len(), 2);
}
