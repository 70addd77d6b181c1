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

/// Positions of the events after `after`, at most `limit`, as read through the store.
async fn positions(store: &es_postgres::PgStore, after: u64, limit: Option<u64>) -> Vec<u64> {
    let mut read = ReadAll::after(after);
    if let Some(limit) = limit {
        read = read.limit(limit);
    }
    store
        .read_all(read)
        .map_ok(|e| e.global_position)
        .try_collect()
        .await
        .unwrap()
}

/// Global positions have gaps where appends failed after their allocation (made here by moving
/// the position sequence on). Gaps of every size (inside a page, across page ends, longer than a
/// page) neither end a read early nor skip or repeat anything, with and without limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_all_across_gaps_in_positions() {
    let store = common::fresh_store().await;
    let pool = store.pool().clone();
    let schema = store.schema().as_str().to_owned();
    let stream = StreamId::new("order", "gaps").unwrap();
    let gaps = [1u64, 3, 511, 2_048, 1, 9_999, 20_000, 2];
    let mut version = 0;
    for (i, size) in (0..40u64)
        .map(|i| (i, 100 + (i * 137) % 900))
        .collect::<Vec<_>>()
    {
        let batch = (0..size)
            .map(|k| NewEvent::from_value("A", 1, &json!({ "i": i, "k": k })))
            .collect();
        store
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Exact(version),
                batch,
            ))
            .await
            .unwrap();
        version += size;
        if i % 5 == 4 {
            let gap = gaps[(i / 5) as usize % gaps.len()];
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT setval('\"{schema}\".positions', \
                 (SELECT last_value FROM \"{schema}\".positions) + $1)"
            )))
            .bind(i64::try_from(gap).unwrap())
            .execute(&pool)
            .await
            .unwrap();
        }
    }
    let stored: Vec<u64> = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
        "SELECT global_position FROM \"{schema}\".events ORDER BY global_position"
    )))
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .map(|p| u64::try_from(p).unwrap())
    .collect();
    assert_eq!(stored.len() as u64, version);
    assert!(
        stored.windows(2).any(|w| w[1] - w[0] > 10_000),
        "the gaps are there"
    );

    let head = *stored.last().unwrap();
    let mut starts = vec![0, 1, stored[511], stored[600] - 1, head - 1, head, head + 5];
    starts.extend(stored.windows(2).filter(|w| w[1] > w[0] + 1).map(|w| w[0]));
    for after in starts {
        for limit in [None, Some(1), Some(700), Some(5_000), Some(100_000)] {
            let want: Vec<u64> = stored
                .iter()
                .copied()
                .filter(|p| *p > after)
                .take(limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap()))
                .collect();
            assert_eq!(
                positions(&store, after, limit).await,
                want,
                "read_all after {after}, limit {limit:?}"
            );
        }
    }
}

/// A gap in positions that starts exactly where the first page ends (and spans one or more page
/// lengths): the read goes on past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_all_past_a_gap_at_a_page_end() {
    for gap in [2_048u64, 2_049, 30_000] {
        let store = common::fresh_store().await;
        let schema = store.schema().as_str().to_owned();
        let stream = StreamId::new("order", "edge").unwrap();
        let append = |from: u64, n: u64| {
            let store = store.clone();
            let stream = stream.clone();
            async move {
                let batch = (0..n)
                    .map(|k| NewEvent::from_value("A", 1, &json!({ "k": from + k })))
                    .collect();
                store
                    .append(AppendRequest::new(
                        stream,
                        ExpectedVersion::Exact(from),
                        batch,
                    ))
                    .await
                    .unwrap()
            }
        };
        // The first page of a read from 0 is the first 512 events.
        let first = append(0, 512).await;
        let last = *first.positions.last().unwrap();
        assert_eq!(
            first.positions,
            (last - 511..=last).collect::<Vec<_>>(),
            "positions within an epoch are dense"
        );
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT setval('\"{schema}\".positions', $1)"
        )))
        .bind(i64::try_from(last + gap).unwrap())
        .execute(store.pool())
        .await
        .unwrap();
        let second = append(512, 100).await;
        assert_eq!(second.positions[0], last + gap + 1);
        let want: Vec<u64> = first
            .positions
            .into_iter()
            .chain(second.positions)
            .collect();
        assert_eq!(positions(&store, 0, None).await, want, "gap of {gap}");
        assert_eq!(
            positions(&store, 0, Some(600)).await,
            want[..600],
            "gap of {gap}, limit 600"
        );
    }
}
