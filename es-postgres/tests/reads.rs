//! Paged reads across page boundaries, in both directions, with limits and large payloads.

mod common;

use es_core::{
    AppendRequest, EventFilter, EventStore, ExpectedVersion, NewEvent, ReadAll, ReadStream,
    RecordedEvent, StreamId,
};
use futures::{StreamExt, TryStreamExt};
use serde_json::json;

async fn versions(store: &es_postgres::PgStore, stream: &StreamId, read: ReadStream) -> Vec<u64> {
    store
        .read_stream(stream, read)
        .map_ok(|e| e.stream_version)
        .try_collect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_cover_every_range() {
    const N: u64 = 9_000;
    let store = common::fresh_store().await;
    let stream = StreamId::new("order", "paged").unwrap();
    let other = StreamId::new("payment", "noise").unwrap();
    for chunk in 0..N / 1000 {
        let batch = (0..1000)
            .map(|i| NewEvent::from_value("A", 1, &json!({ "i": chunk * 1000 + i })))
            .collect();
        store
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Exact(chunk * 1000),
                batch,
            ))
            .await
            .unwrap();
        store
            .append(AppendRequest::new(
                other.clone(),
                ExpectedVersion::Any,
                vec![NewEvent::from_value("B", 1, &json!({}))],
            ))
            .await
            .unwrap();
    }
    assert_eq!(
        versions(&store, &stream, ReadStream::forward()).await,
        (1..=N).collect::<Vec<_>>()
    );
    assert_eq!(
        versions(&store, &stream, ReadStream::backward()).await,
        (1..=N).rev().collect::<Vec<_>>()
    );
    for (from, limit) in [
        (0, 5_000),
        (1, 256),
        (200, 1_100),
        (5_000, 8_000),
        (8_999, 10),
        (9_001, 5),
    ] {
        let want: Vec<u64> = (from.max(1)..=N).take(limit).collect();
        assert_eq!(
            versions(
                &store,
                &stream,
                ReadStream::forward().from(from).limit(limit as u64)
            )
            .await,
            want,
            "forward from {from} limit {limit}"
        );
        let want: Vec<u64> = (1..=from.min(N)).rev().take(limit).collect();
        assert_eq!(
            versions(
                &store,
                &stream,
                ReadStream::backward().from(from).limit(limit as u64)
            )
            .await,
            want,
            "backward from {from} limit {limit}"
        );
    }
    // A reader that stops early leaves nothing behind.
    let mut partial = store.read_stream(&stream, ReadStream::forward());
    for v in 1..=300 {
        assert_eq!(partial.next().await.unwrap().unwrap().stream_version, v);
    }
    drop(partial);

    let all: Vec<RecordedEvent> = store
        .read_all(ReadAll::after(0))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len() as u64, N + N / 1000);
    let payments: Vec<RecordedEvent> = store
        .read_all(ReadAll::after(0).filter(EventFilter::all().category("payment")))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(payments.len() as u64, N / 1000);
    let tail: Vec<RecordedEvent> = store
        .read_all(ReadAll::after(all[4_500].global_position).limit(3_000))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(tail[..], all[4_501..7_501]);
}

#[tokio::test]
async fn large_payloads_page_by_size() {
    let store = common::fresh_store().await;
    let stream = StreamId::new("blob", "1").unwrap();
    let text = "y".repeat(200_000);
    for i in 0..60u64 {
        store
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Exact(i),
                vec![NewEvent::from_value(
                    "Blob",
                    1,
                    &json!({ "i": i, "text": text }),
                )],
            ))
            .await
            .unwrap();
    }
    let events: Vec<RecordedEvent> = store
        .read_stream(&stream, ReadStream::forward())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(events.len(), 60);
    for (i, e) in events.iter().enumerate() {
        let value = e.payload_json().unwrap();
        assert_eq!(value["i"], i as u64);
        assert_eq!(value["text"].as_str().map(str::len), Some(200_000));
    }
}
