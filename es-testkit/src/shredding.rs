//! The crypto-shredding suite: [`Personal`] fields sealed through
//! [`Encrypted`] on a backend's store with the backend's key store,
//! then forgotten. Every `pub async fn` of this module is a case, stamped by
//! [`shredding_conformance_tests!`](crate::shredding_conformance_tests) onto a factory of
//! `(store, key store)` pairs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use es_core::personal::{Encrypted, KeyStore, Personal, StoredKey};
use es_core::projection::HandlerError;
use es_core::{
    Aggregate, AppendRequest, AtLeastOnce, DomainEvent, EventFilter, EventStore, ExpectedVersion,
    NewEvent, OutboxStore, Projection, ProjectionRunner, ReadAll, ReadStream, RecordedEvent,
    Repository, SnapshotPolicy, SnapshotStore, StoreError, StreamId, StreamingStore, Translator,
    Upcasters,
};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::support::patiently;

/// A backend under test: its store and its key store.
pub trait ShredFixture: Send + 'static {
    /// The event store.
    type Store: StreamingStore;
    /// The key store.
    type Keys: KeyStore;
    /// Both.
    fn into_parts(self) -> (Self::Store, Self::Keys);
}

impl<S: StreamingStore, K: KeyStore> ShredFixture for (S, K) {
    type Store = S;
    type Keys = K;
    fn into_parts(self) -> (S, K) {
        self
    }
}

/// Payload of `Registered`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registered {
    /// Personal: the name.
    pub name: Personal<String>,
    /// Personal: the e-mail address.
    pub email: Personal<String>,
    /// Not personal.
    pub tier: String,
}

/// Payload of `Ordered`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ordered {
    /// Not personal.
    pub amount: u64,
    /// Personal: where it goes.
    pub address: Personal<String>,
}

/// The events of a customer.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(apply(Customer))]
pub enum CustomerEvent {
    /// Registered.
    Registered(Registered),
    /// Ordered.
    Ordered(Ordered),
}

/// A customer whose name, e-mail and last address are personal.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    /// The name, once registered.
    pub name: Option<Personal<String>>,
    /// The e-mail address, once registered.
    pub email: Option<Personal<String>>,
    /// The address of the last order.
    pub address: Option<Personal<String>>,
    /// Orders placed.
    pub orders: u64,
    /// Sum of the orders.
    pub total: u64,
}

impl es_core::Apply<Registered> for Customer {
    fn apply(&mut self, e: &Registered) {
        self.name = Some(e.name.clone());
        self.email = Some(e.email.clone());
    }
}

impl es_core::Apply<Ordered> for Customer {
    fn apply(&mut self, e: &Ordered) {
        self.orders += 1;
        self.total += e.amount;
        self.address = Some(e.address.clone());
    }
}

/// Customer commands.
#[derive(Debug, Clone)]
pub enum CustomerCommand {
    /// Register with a name and an e-mail address.
    Register(String, String),
    /// Order an amount to an address.
    Order(u64, String),
}

impl Aggregate for Customer {
    const CATEGORY: &'static str = "customer";
    type Command = CustomerCommand;
    type Event = CustomerEvent;
    type Error = std::convert::Infallible;

    /// The subject of every personal field is the customer's own id, carried in the command's
    /// data: here the name doubles as the id (`<id>:<name>`), kept simple for the suite.
    fn handle(&self, command: &CustomerCommand) -> Result<Vec<CustomerEvent>, Self::Error> {
        Ok(match command {
            CustomerCommand::Register(id_name, email) => {
                let (id, name) = id_name.split_once(':').unwrap_or((id_name, id_name));
                vec![CustomerEvent::Registered(Registered {
                    name: Personal::new(id, name.to_owned()),
                    email: Personal::new(id, email.clone()),
                    tier: "gold".to_owned(),
                })]
            }
            CustomerCommand::Order(amount, address) => {
                let subject = self.name.as_ref().map_or("unknown", Personal::subject);
                vec![CustomerEvent::Ordered(Ordered {
                    amount: *amount,
                    address: Personal::new(subject, address.clone()),
                })]
            }
        })
    }
}

/// The integration event: a welcome mail to send.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WelcomeMail {
    /// Personal: where to send it.
    pub to: Personal<String>,
}

/// The integration events.
#[derive(Debug, Clone, DomainEvent)]
pub enum CustomerMessage {
    /// A welcome mail.
    WelcomeMail(WelcomeMail),
}

/// Translates `Registered` into a [`WelcomeMail`].
#[derive(Debug, Clone, Copy)]
pub struct Mailer;

impl Translator<Customer> for Mailer {
    type Message = CustomerMessage;
    fn topic(&self) -> &'static str {
        "mail"
    }
    fn translate(&self, _: &StreamId, event: &CustomerEvent) -> Vec<CustomerMessage> {
        match event {
            CustomerEvent::Registered(r) => vec![CustomerMessage::WelcomeMail(WelcomeMail {
                to: r.email.clone(),
            })],
            CustomerEvent::Ordered(_) => Vec::new(),
        }
    }
}

/// A projection: the e-mail address per customer stream, as decoded.
#[derive(Clone, Default)]
pub struct Directory {
    /// E-mail per stream.
    pub emails: Arc<Mutex<HashMap<String, Personal<String>>>>,
}

impl Projection for Directory {
    fn name(&self) -> &'static str {
        "directory"
    }

    fn filter(&self) -> EventFilter {
        EventFilter::all().category(Customer::CATEGORY)
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        for e in Upcasters::default().decode::<CustomerEvent>(event)? {
            if let CustomerEvent::Registered(r) = e {
                self.emails
                    .lock()
                    .expect("lock")
                    .insert(event.stream_id.to_string(), r.email);
            }
        }
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        self.emails.lock().expect("lock").clear();
        Ok(())
    }
}

/// A name no other case uses, for subjects and stream ids.
fn unique(prefix: &str) -> String {
    crate::support::unique_name(prefix, '_')
}

fn repository<S: StreamingStore, K: KeyStore>(
    store: &Encrypted<S, K>,
    snapshots: SnapshotPolicy,
) -> Repository<Encrypted<S, K>> {
    Repository::builder(store.clone())
        .translator::<Customer, _>(Mailer)
        .default_snapshot_policy(snapshots)
        .cache_capacity(0)
        .build()
        .expect("no upcasters")
}

/// Every payload the inner store holds in the customer streams and its outbox, as text.
async fn raw_text<S: StreamingStore>(store: &S) -> String {
    let events: Vec<RecordedEvent> = store
        .read_all(ReadAll::after(0).filter(EventFilter::all().category(Customer::CATEGORY)))
        .try_collect()
        .await
        .expect("read the raw feed");
    let mut text: String = events
        .iter()
        .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
        .collect();
    for record in store.pending_outbox(10_000).await.expect("raw outbox") {
        text.push_str(&String::from_utf8_lossy(&record.message.payload));
    }
    text
}

fn erased(p: Option<&Personal<String>>) -> bool {
    p.is_some_and(Personal::is_erased)
}

/// Personal fields are stored sealed (the inner store holds no plaintext, in events, snapshots
/// or the outbox) and read back as written through the wrapper.
pub async fn personal_fields_are_stored_sealed<F: ShredFixture>(fixture: F) {
    let (inner, keys) = fixture.into_parts();
    let store = Encrypted::new(inner.clone(), keys);
    let repo = repository(&store, SnapshotPolicy::EveryNEvents(1));
    let id = unique("sealed");
    let email = format!("{id}@mail.example");
    repo.execute::<Customer>(
        &id,
        &CustomerCommand::Register(format!("{id}:Ada Lovelace"), email.clone()),
    )
    .await
    .unwrap();
    repo.execute::<Customer>(&id, &CustomerCommand::Order(12, "1 Analytical Lane".into()))
        .await
        .unwrap();

    let raw = raw_text(&inner).await;
    for secret in ["Ada Lovelace", email.as_str(), "Analytical"] {
        assert!(!raw.contains(secret), "`{secret}` stored in clear: {raw}");
    }
    assert!(raw.contains("$sealed"), "{raw}");
    let stream = Customer::stream_id(&id).unwrap();
    let snapshot = inner
        .load_snapshot(&stream)
        .await
        .unwrap()
        .expect("a snapshot");
    let snap = String::from_utf8_lossy(&snapshot.payload);
    assert!(
        !snap.contains("Ada Lovelace") && !snap.contains(&email),
        "{snap}"
    );

    let loaded = repo.load::<Customer>(&id).await.unwrap();
    assert!(
        loaded.snapshot_version.is_some(),
        "loaded from the sealed snapshot"
    );
    assert_eq!(
        loaded.aggregate.name.unwrap().value().unwrap(),
        "Ada Lovelace"
    );
    assert_eq!(loaded.aggregate.email.unwrap().into_value().unwrap(), email);
    let replayed = repo.load_without_snapshot::<Customer>(&id).await.unwrap();
    assert_eq!(
        replayed.aggregate.address.unwrap().value().unwrap(),
        "1 Analytical Lane"
    );
    let outbox = store.pending_outbox(10_000).await.unwrap();
    let mail = outbox
        .iter()
        .find(|r| r.stream_id == stream)
        .expect("the welcome mail");
    let mail: WelcomeMail = serde_json::from_slice(&mail.message.payload).unwrap();
    assert_eq!(mail.to.value().unwrap(), &email);
}

/// After `forget`, every event, snapshot and outbox record about the subject is still there and
/// replayable, with its personal fields erased; the aggregate rehydrates (from events and from a
/// snapshot taken before the erasure) with its other fields intact; another subject stays
/// readable; forgetting again changes nothing.
pub async fn forget_erases_events_snapshots_and_outbox<F: ShredFixture>(fixture: F) {
    let (inner, keys) = fixture.into_parts();
    let store = Encrypted::new(inner.clone(), keys.clone());
    let repo = repository(&store, SnapshotPolicy::EveryNEvents(2));
    let gone = unique("gone");
    let kept = unique("kept");
    for id in [&gone, &kept] {
        repo.execute::<Customer>(
            id,
            &CustomerCommand::Register(format!("{id}:Name {id}"), format!("{id}@x")),
        )
        .await
        .unwrap();
        repo.execute::<Customer>(id, &CustomerCommand::Order(5, format!("Street {id}")))
            .await
            .unwrap();
        repo.execute::<Customer>(id, &CustomerCommand::Order(7, format!("Road {id}")))
            .await
            .unwrap();
    }
    let stream = Customer::stream_id(&gone).unwrap();
    let before = inner
        .load_snapshot(&stream)
        .await
        .unwrap()
        .expect("snapshot at 2");
    assert_eq!(before.version, 2);
    let events_before: Vec<RecordedEvent> = inner
        .read_stream(&stream, ReadStream::forward())
        .try_collect()
        .await
        .unwrap();

    assert!(store.forget(&gone).await.unwrap(), "the key is destroyed");
    assert!(
        !store.forget(&gone).await.unwrap(),
        "forgetting again is a no-op"
    );
    let stored = keys.load_keys(&[gone.clone(), kept.clone()]).await.unwrap();
    assert_eq!(stored.get(&gone), Some(&StoredKey::Forgotten));
    assert!(matches!(stored.get(&kept), Some(StoredKey::Active { .. })));

    // Nothing moved in the inner store.
    let events_after: Vec<RecordedEvent> = inner
        .read_stream(&stream, ReadStream::forward())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(events_after, events_before);

    // The snapshot taken before the erasure: used, and reveals nothing.
    let loaded = repo.load::<Customer>(&gone).await.unwrap();
    assert_eq!(loaded.snapshot_version, Some(2));
    assert!(
        erased(loaded.aggregate.name.as_ref()),
        "{:?}",
        loaded.aggregate
    );
    assert!(erased(loaded.aggregate.email.as_ref()));
    assert!(erased(loaded.aggregate.address.as_ref()));
    assert_eq!((loaded.aggregate.orders, loaded.aggregate.total), (2, 12));
    let opened = store.load_snapshot(&stream).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&opened.payload);
    assert!(
        !text.contains(&format!("Name {gone}")) && text.contains("$erased"),
        "{text}"
    );

    // From the events alone: the same.
    let replayed = repo.load_without_snapshot::<Customer>(&gone).await.unwrap();
    assert_eq!(replayed.version, 3);
    assert_eq!(replayed.aggregate, loaded.aggregate);

    // The aggregate keeps working: a new command appends.
    repo.execute::<Customer>(&gone, &CustomerCommand::Order(1, "new".into()))
        .await
        .unwrap();
    assert_eq!(
        repo.load::<Customer>(&gone).await.unwrap().aggregate.orders,
        3
    );

    // The other subject is readable.
    let other = repo.load_without_snapshot::<Customer>(&kept).await.unwrap();
    assert_eq!(
        other.aggregate.name.unwrap().value().unwrap(),
        &format!("Name {kept}")
    );

    // The outbox record is erased, the other's is not.
    let mails: HashMap<StreamId, WelcomeMail> = store
        .pending_outbox(10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.stream_id,
                serde_json::from_slice(&r.message.payload).unwrap(),
            )
        })
        .collect();
    assert!(mails[&stream].to.is_erased());
    assert_eq!(
        mails[&Customer::stream_id(&kept).unwrap()]
            .to
            .value()
            .unwrap(),
        &format!("{kept}@x")
    );
}

/// A value written for a forgotten subject is stored erased, and the subject gets no new key.
pub async fn forgotten_subjects_get_no_new_key<F: ShredFixture>(fixture: F) {
    let (inner, keys) = fixture.into_parts();
    let store = Encrypted::new(inner.clone(), keys.clone());
    let repo = repository(&store, SnapshotPolicy::Never);
    let id = unique("late");
    assert!(!store.forget(&id).await.unwrap(), "no key to destroy yet");
    repo.execute::<Customer>(
        &id,
        &CustomerCommand::Register(format!("{id}:Late Name"), "late@x".into()),
    )
    .await
    .unwrap();
    let raw = raw_text(&inner).await;
    assert!(
        !raw.contains("Late Name") && !raw.contains("late@x"),
        "{raw}"
    );
    let loaded = repo.load::<Customer>(&id).await.unwrap();
    assert!(erased(loaded.aggregate.name.as_ref()));
    let stored = keys.load_keys(std::slice::from_ref(&id)).await.unwrap();
    assert_eq!(stored.get(&id), Some(&StoredKey::Forgotten));
    assert_eq!(
        keys.create_key(&id, 1, vec![7; 32]).await.unwrap(),
        StoredKey::Forgotten,
        "a tombstone is never replaced by a key"
    );
}

/// A projection rebuilt from position 0 after `forget` sees erased values where it saw values
/// before.
pub async fn projection_rebuilt_after_forget_sees_erased_values<F: ShredFixture>(fixture: F) {
    let (inner, keys) = fixture.into_parts();
    let store = Encrypted::new(inner, keys);
    let repo = repository(&store, SnapshotPolicy::Never);
    let gone = unique("pgone");
    let kept = unique("pkept");
    let mut last = 0;
    for id in [&gone, &kept] {
        let done = repo
            .execute::<Customer>(
                id,
                &CustomerCommand::Register(format!("{id}:N"), format!("{id}@x")),
            )
            .await
            .unwrap();
        last = last.max(done.positions[0]);
    }
    let projection = Directory::default();
    let handle = ProjectionRunner::new(store.clone())
        .spawn(AtLeastOnce::new(projection.clone(), store.clone()));
    patiently(
        "first build",
        Duration::from_secs(30),
        handle.wait_for(last),
    )
    .await;
    let gone_stream = Customer::stream_id(&gone).unwrap().to_string();
    let kept_stream = Customer::stream_id(&kept).unwrap().to_string();
    assert_eq!(
        projection.emails.lock().unwrap()[&gone_stream]
            .value()
            .unwrap(),
        &format!("{gone}@x")
    );

    store.forget(&gone).await.unwrap();
    handle.rebuild().await.unwrap();
    patiently("rebuild", Duration::from_secs(30), handle.wait_for(last)).await;
    {
        let emails = projection.emails.lock().unwrap();
        assert!(
            emails[&gone_stream].is_erased(),
            "{:?}",
            emails[&gone_stream]
        );
        assert_eq!(emails[&kept_stream].value().unwrap(), &format!("{kept}@x"));
    }
    handle.shutdown().await;
}

/// Concurrent first writes for one subject (many tasks, each appending to a stream of its own)
/// end with one key: every value written reads back.
pub async fn concurrent_first_writes_share_one_key<F: ShredFixture>(fixture: F) {
    let (inner, keys) = fixture.into_parts();
    let store = Encrypted::new(inner, keys.clone());
    let subject = unique("race");
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = store.clone();
        let subject = subject.clone();
        tasks.push(tokio::spawn(async move {
            let stream = StreamId::new("customer", &format!("{subject}-{i}")).unwrap();
            let payload =
                serde_json::to_vec(&Personal::new(&subject, format!("secret {i}"))).unwrap();
            store
                .append(AppendRequest::new(
                    stream,
                    ExpectedVersion::NoStream,
                    vec![NewEvent::new("Secret", 1, payload).unwrap()],
                ))
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for i in 0..16 {
        let stream = StreamId::new("customer", &format!("{subject}-{i}")).unwrap();
        let events: Vec<RecordedEvent> = store
            .read_stream(&stream, ReadStream::forward())
            .try_collect()
            .await
            .unwrap();
        let p: Personal<String> = serde_json::from_slice(&events[0].payload).unwrap();
        assert_eq!(p.value().unwrap(), &format!("secret {i}"));
    }
    // The key store itself: racing creations with different material all get the first.
    let other = unique("race_direct");
    let racers: Vec<_> = (0..16u8)
        .map(|i| {
            let keys = keys.clone();
            let other = other.clone();
            tokio::spawn(async move { keys.create_key(&other, 1, vec![i; 32]).await.unwrap() })
        })
        .collect();
    let mut seen = Vec::new();
    for r in racers {
        seen.push(r.await.unwrap());
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
    assert_eq!(
        keys.load_keys(std::slice::from_ref(&other)).await.unwrap()[&other],
        seen[0]
    );
}

/// A sealed value whose ciphertext was altered, or that was moved to another subject, fails to
/// authenticate: the read is a typed `StoreError::Corrupt`, never a wrong value.
pub async fn tampered_ciphertext_is_a_typed_error<F: ShredFixture>(fixture: F) {
    let (inner, keys) = fixture.into_parts();
    let store = Encrypted::new(inner.clone(), keys);
    let a = unique("ta");
    let b = unique("tb");
    let mut sealed = HashMap::new();
    for subject in [&a, &b] {
        let stream = StreamId::new("customer", subject.as_str()).unwrap();
        let payload = serde_json::to_vec(&Personal::new(subject, "the secret")).unwrap();
        store
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::NoStream,
                vec![NewEvent::new("Secret", 1, payload).unwrap()],
            ))
            .await
            .unwrap();
        let raw: Vec<RecordedEvent> = inner
            .read_stream(&stream, ReadStream::forward())
            .try_collect()
            .await
            .unwrap();
        let value: serde_json::Value = serde_json::from_slice(&raw[0].payload).unwrap();
        sealed.insert(subject.clone(), value);
    }
    // One bit of the ciphertext flipped.
    let mut flipped = sealed[&a].clone();
    let data = flipped["$sealed"]["data"].as_str().unwrap().to_owned();
    let mut bytes = data.into_bytes();
    bytes[0] = if bytes[0] == b'A' { b'B' } else { b'A' };
    flipped["$sealed"]["data"] = String::from_utf8(bytes).unwrap().into();
    // Subject a's ciphertext claimed for subject b.
    let mut moved = sealed[&a].clone();
    moved["$sealed"]["subject"] = b.clone().into();
    for (what, value) in [("flipped", flipped), ("moved", moved)] {
        // A good event, the altered one, another good one: the read delivers the first, then
        // the error naming the second, then nothing.
        let stream = StreamId::new("customer", &format!("{a}-{what}")).unwrap();
        let good = || {
            let payload = serde_json::to_vec(&Personal::new(&a, "fine")).unwrap();
            NewEvent::new("Secret", 1, payload).unwrap()
        };
        store
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::NoStream,
                vec![good()],
            ))
            .await
            .unwrap();
        inner
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Exact(1),
                vec![NewEvent::new("Secret", 1, Bytes::from(value.to_string())).unwrap()],
            ))
            .await
            .unwrap();
        store
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Exact(2),
                vec![good()],
            ))
            .await
            .unwrap();
        let items: Vec<Result<RecordedEvent, StoreError>> = store
            .read_stream(&stream, ReadStream::forward())
            .collect()
            .await;
        assert_eq!(
            items.len(),
            2,
            "{what}: the good event, then the error: {items:?}"
        );
        let first: Personal<String> =
            serde_json::from_slice(&items[0].as_ref().unwrap().payload).unwrap();
        assert_eq!(first.value().map(String::as_str), Some("fine"));
        match &items[1] {
            Err(StoreError::Corrupt { reason, location }) => {
                assert!(reason.contains("authenticate"), "{what}: {reason}");
                assert!(location.contains("version 2"), "{what}: {location}");
            }
            other => panic!("{what}: expected a Corrupt error, got {other:?}"),
        }
    }
}

/// Personal values that cannot be sealed (an empty subject, a subject with a control character,
/// a personal value inside another) are refused with `StoreError::InvalidRequest`, and the append
/// writes nothing, in clear or otherwise; a snapshot holding one is not written either.
pub async fn unsealable_values_are_refused_and_write_nothing<F: ShredFixture>(fixture: F) {
    let (inner, keys) = fixture.into_parts();
    let store = Encrypted::new(inner.clone(), keys);
    let id = unique("bad");
    let stream = StreamId::new("customer", &id).unwrap();
    let bad = [
        serde_json::to_vec(&Personal::new("", "empty subject")).unwrap(),
        serde_json::to_vec(&Personal::new("a\nb", "control character")).unwrap(),
        serde_json::to_vec(&Personal::new(&id, Personal::new("other", "nested"))).unwrap(),
    ];
    for payload in bad {
        let good = serde_json::to_vec(&Personal::new(&id, "fine")).unwrap();
        let err = store
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Any,
                vec![
                    NewEvent::new("Secret", 1, good).unwrap(),
                    NewEvent::new("Secret", 1, payload.clone()).unwrap(),
                ],
            ))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidRequest { .. }),
            "{}: {err}",
            String::from_utf8_lossy(&payload)
        );
        assert_eq!(
            inner.stream_version(&stream).await.unwrap(),
            0,
            "nothing written"
        );

        let snapshot = es_core::SnapshotRecord {
            stream_id: stream.clone(),
            version: 1,
            schema_version: 1,
            payload: Bytes::from(payload),
            recorded_at: es_core::event::now_micros(),
            event_id: None,
        };
        assert!(matches!(
            store.save_snapshot(snapshot).await,
            Err(StoreError::InvalidRequest { .. })
        ));
        assert!(inner.load_snapshot(&stream).await.unwrap().is_none());
    }
}

/// A store used without [`Encrypted`] refuses a `Personal` value in clear, in an event, an
/// outbox message or a snapshot, with a typed error that says how to store it; nothing is
/// written. A payload that merely mentions the tag inside a string is accepted.
pub async fn readable_personal_values_are_refused_by_a_bare_store<F: ShredFixture>(fixture: F) {
    let (inner, _keys) = fixture.into_parts();
    let id = unique("bare");
    let stream = StreamId::new("customer", &id).unwrap();
    let clear = serde_json::to_vec(&serde_json::json!({
        "tier": "gold",
        "contact": [{ "email": Personal::new(&id, "ada@example.com") }],
    }))
    .unwrap();
    let event = |payload: &[u8]| NewEvent::new("Registered", 1, payload.to_vec()).unwrap();
    let refused = |err: StoreError| {
        assert!(
            matches!(&err, StoreError::InvalidRequest { reason, .. } if reason.contains("Encrypted")),
            "{err}"
        );
    };
    refused(
        inner
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Any,
                vec![event(b"{}"), event(&clear)],
            ))
            .await
            .unwrap_err(),
    );
    let message = es_core::OutboxMessage {
        message_id: uuid::Uuid::now_v7(),
        source_event_id: uuid::Uuid::now_v7(),
        topic: "customers".into(),
        key: id.clone(),
        message_type: "Registered".into(),
        schema_version: 1,
        payload: Bytes::from(clear.clone()),
        metadata: es_core::Metadata::new(),
    };
    refused(
        inner
            .append(
                AppendRequest::new(stream.clone(), ExpectedVersion::Any, vec![event(b"{}")])
                    .with_outbox(vec![message]),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(
        inner.stream_version(&stream).await.unwrap(),
        0,
        "nothing written"
    );
    refused(
        inner
            .save_snapshot(es_core::SnapshotRecord {
                stream_id: stream.clone(),
                version: 1,
                schema_version: 1,
                payload: Bytes::from(clear),
                recorded_at: es_core::event::now_micros(),
                event_id: None,
            })
            .await
            .unwrap_err(),
    );
    assert!(inner.load_snapshot(&stream).await.unwrap().is_none());

    let mention = br#"{"note": "\"$personal\" is the tag", "tag": "$personal"}"#;
    inner
        .append(AppendRequest::new(
            stream.clone(),
            ExpectedVersion::NoStream,
            vec![event(mention)],
        ))
        .await
        .expect("a payload that only mentions the tag is stored");
}
