//! Crypto-shredding: appending and loading events with one personal field sealed by
//! `es_core::personal::Encrypted`, against the same events with the field in clear on the same
//! store, in the same run (rows `<group>:personal`).

use std::time::{Duration, Instant};

use es_core::personal::{Encrypted, KeyStore, Personal};
use es_core::{
    AppendRequest, EventStore, ExpectedVersion, NewEvent, ReadStream, RecordedEvent, StreamId,
};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use crate::config::pick;
use crate::report::{Report, Row, Samples};

#[derive(Serialize, Deserialize)]
struct Signup<E> {
    amount: u64,
    plan: String,
    email: E,
}

/// How many subjects the events are about (keys are created once each, then loaded).
const SUBJECTS: u64 = 50;

fn payload(i: u64, sealed: bool) -> anyhow::Result<Vec<u8>> {
    let email = format!("customer{i}@mail.example");
    let subject = format!("customer-{}", i % SUBJECTS);
    Ok(if sealed {
        serde_json::to_vec(&Signup {
            amount: i,
            plan: "gold".into(),
            email: Personal::new(subject, email),
        })?
    } else {
        serde_json::to_vec(&Signup {
            amount: i,
            plan: "gold".into(),
            email,
        })?
    })
}

/// Appends `count` one-event batches to `stream` (each a round trip), then reads the stream and
/// decodes every payload; returns the two times.
async fn round<S: EventStore>(
    store: &S,
    stream: &StreamId,
    count: u64,
    sealed: bool,
) -> anyhow::Result<(Duration, Duration)> {
    let events: Vec<NewEvent> = (0..count)
        .map(|i| Ok(NewEvent::new("Signup", 1, payload(i, sealed)?)?))
        .collect::<anyhow::Result<_>>()?;
    let start = Instant::now();
    for (i, event) in events.into_iter().enumerate() {
        store
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Exact(i as u64),
                vec![event],
            ))
            .await?;
    }
    let appended = start.elapsed();
    let start = Instant::now();
    let read: Vec<RecordedEvent> = store
        .read_stream(stream, ReadStream::forward())
        .try_collect()
        .await?;
    let mut sum = 0;
    for event in &read {
        if sealed {
            let s: Signup<Personal<String>> = serde_json::from_slice(&event.payload)?;
            anyhow::ensure!(s.email.value().is_some(), "a sealed value did not open");
            sum += s.amount;
        } else {
            let s: Signup<String> = serde_json::from_slice(&event.payload)?;
            sum += s.amount;
        }
    }
    let loaded = start.elapsed();
    anyhow::ensure!(read.len() as u64 == count && sum == count * (count - 1) / 2);
    Ok((appended, loaded))
}

/// Pairs of rounds, alternating which runs first: the events with the personal field sealed
/// through [`Encrypted`] over `store` and `keys` ("ours") against the same events with the field
/// in clear on `store` itself ("raw").
pub(crate) async fn run<S: EventStore, K: KeyStore>(
    report: &mut Report,
    group: &'static str,
    store: S,
    keys: K,
) -> anyhow::Result<()> {
    let count = pick(2_000, 300);
    let pairs = pick(7, 2);
    let encrypted = Encrypted::new(store.clone(), keys);
    let tag = std::process::id();
    let stream = |kind: &str, i: usize| StreamId::new("personal", &format!("{kind}-{tag}-{i}"));
    // Warm-up: connections, key creation for every subject.
    round(&encrypted, &stream("warm-enc", 0)?, SUBJECTS, true).await?;
    round(&store, &stream("warm-raw", 0)?, SUBJECTS, false).await?;
    let mut appends = Samples::default();
    let mut loads = Samples::default();
    for i in 0..pairs {
        let (ours, raw) = if i % 2 == 0 {
            let raw = round(&store, &stream("raw", i)?, count, false).await?;
            (
                round(&encrypted, &stream("enc", i)?, count, true).await?,
                raw,
            )
        } else {
            let ours = round(&encrypted, &stream("enc", i)?, count, true).await?;
            (ours, round(&store, &stream("raw", i)?, count, false).await?)
        };
        appends.push_times(count, ours.0, raw.0);
        loads.push_times(count, ours.1, raw.1);
    }
    report.push(Row::paired(
        group,
        "append, one personal field sealed (Encrypted) vs the same field in clear",
        &appends,
        "appends/s",
        None,
        format!(
            "{count} one-event appends per round, one client, {SUBJECTS} subjects (each append \
             loads its subject's key: one key-store round trip); {}",
            appends.describe()
        ),
    ));
    report.push(Row::paired(
        group,
        "load (read + decode), one personal field sealed vs in clear",
        &loads,
        "events/s",
        None,
        format!(
            "reads the {count} events back and decodes each; keys fetched once per ready chunk \
             of up to 256 events; {}",
            loads.describe()
        ),
    ));
    Ok(())
}
