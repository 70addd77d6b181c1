//! What the runtime does on a store with several feed partitions, where there is no single feed.

use std::time::Duration;

use es_core::projection::{AtLeastOnce, HandlerError, Projection, ProjectionError};
use es_core::{
    AppendRequest, EventStore, ExpectedVersion, NewEvent, Partitioning, ProjectionRunner,
    ProjectionStatus, RecordedEvent, StoreError, StreamId,
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
