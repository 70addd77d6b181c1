//! What the runtime does on a store with several feed partitions, where there is no single feed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use es_core::outbox::{PublishOutcome, Publisher, Relay, RelayConfig};
use es_core::projection::{AtLeastOnce, HandlerError, Projection, ProjectionError};
use es_core::{
    AppendRequest, EventStore, ExpectedVersion, Metadata, NewEvent, OutboxMessage, OutboxRecord,
    Partitioning, ProjectionRunner, ProjectionStatus, RecordedEvent, StoreError, StreamId,
};
use es_memory::InMemoryStore;

struct Count(u64);

impl Projection for Count {
    fn name(&self) -> &'static str {
        "count"
    }

    async fn handle(&mut self, _: &RecordedEvent) -> Result<(), HandlerError> {
        self.0 += 1;
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        self.0 = 0;
        Ok(())
    }
}

/// A projection cannot follow a single feed that does not exist: it stops with the store's
/// typed error instead of reading one partition and calling that the feed.
#[tokio::test]
async fn a_projection_on_a_partitioned_store_stops_with_the_typed_error() {
    let store = InMemoryStore::builder()
        .partitioning(Partitioning::new(4).unwrap())
        .build();
    for i in 0..8 {
        let stream = StreamId::new("account", &i.to_string()).unwrap();
        let event = NewEvent::new("Opened", 1, "{}").unwrap();
        store
            .append(AppendRequest::new(
                stream,
                ExpectedVersion::Any,
                vec![event],
            ))
            .await
            .unwrap();
    }
    let handle = ProjectionRunner::new(store.clone()).spawn(AtLeastOnce::new(Count(0), store));
    let status = tokio::time::timeout(Duration::from_secs(10), handle.wait_for(1))
        .await
        .expect("the projection settles");
    match status {
        ProjectionStatus::Failed(failure) => match *failure {
            ProjectionError::Feed { ref source, .. } => assert!(
                matches!(**source, StoreError::Partitioned { partitions: 4 }),
                "{source:?}"
            ),
            other => panic!("expected a feed error, got {other:?}"),
        },
        other => panic!("expected the projection to fail, got {other:?}"),
    }
    assert!(
        handle.lag().await.is_err(),
        "no single head to measure lag against"
    );
}

/// Records what it is handed and acknowledges it.
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<OutboxRecord>>>);

impl Publisher for Collect {
    type Error = std::io::Error;

    async fn publish(&self, records: &[OutboxRecord]) -> Vec<PublishOutcome<Self::Error>> {
        self.0.lock().unwrap().extend_from_slice(records);
        records
            .iter()
            .map(|_| PublishOutcome::Acknowledged)
            .collect()
    }
}

/// An idle relay on a partitioned store waits for an append in any partition, not only
/// partition 0: an outbox record appended to another partition, with partition 0 empty, is
/// published long before the relay's 30 s polling interval (and the store's 5 s one).
#[tokio::test]
async fn an_idle_relay_is_woken_by_an_append_to_any_partition() {
    let partitioning = Partitioning::new(4).unwrap();
    let store = InMemoryStore::builder().partitioning(partitioning).build();
    let stream = (0..1000)
        .map(|i| StreamId::new("account", &i.to_string()).unwrap())
        .find(|s| partitioning.partition_of(s) == 3)
        .unwrap();
    let published = Collect::default();
    let relay = Relay::new(
        store.clone(),
        published.clone(),
        RelayConfig {
            idle_poll: Duration::from_secs(30),
            ..RelayConfig::default()
        },
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async {
        let _ = stopped.await;
    }));
    // Let the relay find the outbox empty and go idle.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let event = NewEvent::new("Opened", 1, "{}").unwrap();
    let message = OutboxMessage {
        message_id: uuid::Uuid::new_v4(),
        source_event_id: event.event_id,
        topic: "accounts".to_owned(),
        key: stream.to_string(),
        message_type: "AccountOpened".to_owned(),
        schema_version: 1,
        payload: bytes::Bytes::from_static(b"{}"),
        metadata: Metadata::new(),
    };
    store
        .append(
            AppendRequest::new(stream, ExpectedVersion::NoStream, vec![event])
                .with_outbox(vec![message]),
        )
        .await
        .unwrap();
    // Well within both the relay's polling interval and the memory store's own (5 s).
    tokio::time::timeout(Duration::from_secs(2), async {
        while published.0.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the idle relay is woken by the append");
    let _ = stop.send(());
    running.await.unwrap().unwrap();
}
