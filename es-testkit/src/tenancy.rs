//! The tenancy suite: a backend's tenant factory (`es_core::TenantStores`) keeps every path of
//! the store inside the tenant's namespace. Stamped onto a backend by
//! [`tenancy_conformance_tests!`](crate::tenancy_conformance_tests); the factory it is given
//! must put its tenants under a base no other run uses.
//!
//! Each case writes the same stream ids, checkpoint names, lease names and outbox topics in
//! several tenants, then checks every read path of each tenant (stream reads, versions, the
//! feed and its head, stream listings, subscriptions, a running projection, checkpoints,
//! snapshots, the outbox and its relay lease, consumer-group leases) sees its own data and
//! nothing else; and that hostile tenant ids are refused before anything is opened.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use es_core::contract::{Checkpoint, ReadAll};
use es_core::projection::{AtLeastOnce, Projection, ProjectionRunner};
use es_core::{
    AppendRequest, EventFilter, EventStore, ExpectedVersion, ListStreams, Metadata, NewEvent,
    OutboxMessage, ReadStream, RecordedEvent, SnapshotRecord, StreamId, TenantError, TenantStores,
    Tenants,
};
use es_core::{CheckpointStore, LeaseStore};
use futures::{StreamExt, TryStreamExt};
use uuid::Uuid;

use crate::domain::{Ledger, LedgerCommand};
use crate::support::patiently;

const PATIENCE: Duration = Duration::from_secs(20);

/// Tenant ids that look alike but are distinct tenants.
const LOOKALIKES: [&str; 6] = ["a", "a_", "a_b", "ab", "a__b", "a_t_b"];

/// Ids that must be refused: separators of the backends' namespaces, quotes and SQL, path
/// tricks, case, white space, non-ASCII look-alikes, too long.
const HOSTILE: [&str; 16] = [
    "",
    "A",
    "acme-eu",
    "acme:eu",
    "acme.eu",
    "../acme",
    "acme/eu",
    "acme eu",
    "acme\"; DROP SCHEMA public CASCADE; --",
    "acme'",
    "_acme",
    "acm\u{0435}",
    "acme\0",
    "acme*",
    "{acme}",
    "acme_0123456789_0123456789_0123456",
];

fn event(kind: &str, tag: &str) -> NewEvent {
    let payload =
        serde_json::to_vec(&serde_json::json!({ "tenant": tag })).unwrap_or_else(|e| panic!("{e}"));
    NewEvent::new(kind, 1, payload).unwrap_or_else(|e| panic!("{e}"))
}

fn stream(id: &str) -> StreamId {
    StreamId::new("doc", id).unwrap_or_else(|e| panic!("{e}"))
}

async fn tenant_store<F: TenantStores>(tenants: &Tenants<F>, tenant: &str) -> F::Store {
    tenants
        .store(tenant)
        .await
        .unwrap_or_else(|e| panic!("cannot open tenant {tenant}: {e}"))
}

/// Every event of the store's feed (all partitions), read once.
async fn whole_feed<S: EventStore>(store: &S) -> Vec<RecordedEvent> {
    let mut all = Vec::new();
    for partition in store.partitioning().partitions() {
        let read = ReadAll::after(0).partition(partition);
        let events: Vec<RecordedEvent> = store
            .read_all(read)
            .try_collect()
            .await
            .unwrap_or_else(|e| panic!("reading the feed: {e}"));
        all.extend(events);
    }
    all
}

fn tags(events: &[RecordedEvent]) -> BTreeSet<String> {
    events
        .iter()
        .map(|e| {
            let v: serde_json::Value =
                serde_json::from_slice(&e.payload).unwrap_or_else(|err| panic!("{err}"));
            v["tenant"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

/// Two tenants run the same commands on the same aggregate ids: each loads its own state, and
/// each one's versions, stream reads, feed, head and stream list hold only its own events.
pub async fn tenants_with_the_same_stream_ids_never_see_each_other<S: TenantStores>(store: S) {
    let tenants = Tenants::new(store);
    let acme = tenants
        .repository("acme", |b| b)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let globex = tenants
        .repository("globex", |b| b)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for (repo, amount) in [(&acme, 70), (&globex, 5)] {
        repo.execute::<Ledger>("shared", &LedgerCommand::Open)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        repo.execute::<Ledger>("shared", &LedgerCommand::Credit(amount))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    acme.execute::<Ledger>("acme_only", &LedgerCommand::Open)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let loaded_acme = acme
        .load::<Ledger>("shared")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let loaded_globex = globex
        .load::<Ledger>("shared")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (loaded_acme.aggregate.balance, loaded_acme.version),
        (70, 2)
    );
    assert_eq!(
        (loaded_globex.aggregate.balance, loaded_globex.version),
        (5, 2)
    );
    assert!(
        globex
            .load::<Ledger>("acme_only")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .version
            == 0,
        "globex loads acme's aggregate"
    );

    let (a, g) = (
        tenant_store(&tenants, "acme").await,
        tenant_store(&tenants, "globex").await,
    );
    let listed = |s: S::Store| async move {
        s.list_streams(ListStreams::all())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .streams
            .into_iter()
            .map(|summary| summary.stream_id.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        listed(a.clone()).await,
        ["ledger-acme_only", "ledger-shared"]
    );
    assert_eq!(listed(g.clone()).await, ["ledger-shared"]);
    assert_eq!(whole_feed(&a).await.len(), 3);
    assert_eq!(whole_feed(&g).await.len(), 2);
    // Each partition's head is the last position of that tenant's own events in it.
    for s in [&a, &g] {
        let feed = whole_feed(s).await;
        for p in s.partitioning().partitions() {
            let last = feed
                .iter()
                .filter(|e| e.partition == p)
                .map(|e| e.global_position)
                .max()
                .unwrap_or(0);
            let head = s.partition_head(p).await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(head, last, "partition {p}'s head is not its own last event");
        }
    }
    let g_ids: BTreeSet<Uuid> = whole_feed(&g).await.iter().map(|e| e.event_id).collect();
    let a_ids: BTreeSet<Uuid> = whole_feed(&a).await.iter().map(|e| e.event_id).collect();
    assert!(
        g_ids.is_disjoint(&a_ids),
        "an event is in both tenants' feeds"
    );
}

/// A subscription and a running projection of one tenant, while another tenant writes to the
/// same stream ids under the same projection name: each sees its own events only, and each
/// tenant's checkpoint of that name moves alone.
pub async fn subscriptions_and_projections_stay_in_their_tenant<S: TenantStores>(store: S) {
    let tenants = Tenants::new(store);
    let (a, b) = (
        tenant_store(&tenants, "left").await,
        tenant_store(&tenants, "right").await,
    );
    let mut feed = if a.partitioning().is_single() {
        a.subscribe(0, EventFilter::all())
    } else {
        a.subscribe_all(
            &es_core::FeedPosition::start(&a.partitioning()),
            EventFilter::all(),
        )
    };
    let counted = Counter::default();
    let runner_a =
        ProjectionRunner::new(a.clone()).spawn(AtLeastOnce::new(counted.clone(), a.clone()));
    for i in 0..20u64 {
        for (s, tag) in [(&a, "left"), (&b, "right")] {
            s.append(AppendRequest::new(
                stream(&format!("s{}", i % 4)),
                ExpectedVersion::Exact(i / 4),
                vec![event("Noted", tag)],
            ))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let mut seen = Vec::new();
    patiently(
        "the subscription delivers left's 20 events",
        PATIENCE,
        async {
            while seen.len() < 20 {
                let next = feed
                    .next()
                    .await
                    .unwrap_or_else(|| panic!("the feed ended"));
                seen.push(next.unwrap_or_else(|e| panic!("{e}")));
            }
        },
    )
    .await;
    assert_eq!(tags(&seen), BTreeSet::from(["left".to_owned()]));
    let nothing_more = tokio::time::timeout(Duration::from_millis(500), feed.next()).await;
    assert!(
        nothing_more.is_err(),
        "the subscription delivered more: {nothing_more:?}"
    );
    let head = whole_feed(&a)
        .await
        .iter()
        .map(|e| e.global_position)
        .max()
        .unwrap_or(0);
    if a.partitioning().is_single() {
        patiently(
            "the projection catches up",
            PATIENCE,
            runner_a.wait_for(head),
        )
        .await;
        assert_eq!(counted.tags(), BTreeSet::from(["left".to_owned()]));
        assert_eq!(counted.count(), 20);
        let name = counted.name().to_owned();
        let mine = a
            .load_checkpoint(&name)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let theirs = b
            .load_checkpoint(&name)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mine.position, head);
        assert_eq!(theirs, Checkpoint::default(), "right has left's checkpoint");
    }
    runner_a.shutdown().await;
}

/// Snapshots, and the outbox with its relay lease, written under the same names in two
/// tenants: each tenant reads only its own.
pub async fn snapshots_and_the_outbox_stay_in_their_tenant<S: TenantStores>(store: S) {
    use es_core::{OutboxStore, SnapshotStore};
    let tenants = Tenants::new(store);
    let (a, b) = (
        tenant_store(&tenants, "north").await,
        tenant_store(&tenants, "south").await,
    );
    let s = stream("same");
    let new = event("Noted", "north");
    let message = OutboxMessage {
        message_id: Uuid::now_v7(),
        source_event_id: new.event_id,
        topic: "topic".to_owned(),
        key: s.to_string(),
        message_type: "Noted".to_owned(),
        schema_version: 1,
        payload: Bytes::from_static(b"{}"),
        metadata: Metadata::default(),
    };
    a.append(
        AppendRequest::new(s.clone(), ExpectedVersion::NoStream, vec![new])
            .with_outbox(vec![message]),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    a.save_snapshot(SnapshotRecord {
        stream_id: s.clone(),
        version: 1,
        schema_version: 1,
        payload: Bytes::from_static(b"{\"of\":\"north\"}"),
        recorded_at: es_core::event::now_micros(),
        event_id: None,
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        b.load_snapshot(&s)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none(),
        "south loads north's snapshot"
    );
    assert!(a
        .load_snapshot(&s)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .is_some());

    let outbox = |x: &S::Store| x.outbox_partition(0).unwrap_or_else(|e| panic!("{e}"));
    let (oa, ob) = (outbox(&a), outbox(&b));
    assert_eq!(
        oa.pending_outbox(10)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .len(),
        1
    );
    assert!(
        ob.pending_outbox(10)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty(),
        "south sees north's outbox"
    );
    assert_eq!(
        ob.relay_status()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .pending,
        0
    );
    let ttl = Duration::from_secs(30);
    let lease_a = oa
        .acquire_relay_lease("relay-north", ttl)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let lease_b = ob
        .acquire_relay_lease("relay-south", ttl)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        lease_a.is_some() && lease_b.is_some(),
        "one tenant's relay lease blocks the other's: {lease_a:?} {lease_b:?}"
    );
}

/// Projection checkpoints and consumer-group leases of the same names in two tenants: each
/// tenant reads and holds only its own.
pub async fn checkpoints_and_group_leases_stay_in_their_tenant<S: TenantStores>(store: S) {
    let tenants = Tenants::new(store);
    let (a, b) = (
        tenant_store(&tenants, "north").await,
        tenant_store(&tenants, "south").await,
    );
    let ttl = Duration::from_secs(30);
    let saved = Checkpoint {
        position: 1,
        generation: 0,
    };
    assert!(a
        .save_checkpoint("same", saved)
        .await
        .unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(
        b.load_checkpoint("same")
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Checkpoint::default()
    );

    let held = a
        .acquire_lease("group", "p0", "north-worker", ttl)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(held.is_some());
    assert!(
        b.held_leases("group")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty(),
        "south sees north's group lease"
    );
    let other = b
        .acquire_lease("group", "p0", "south-worker", ttl)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(other.is_some(), "north's group lease blocks south's");
}

/// Hostile ids are refused with a typed error before any store is opened; ids that look alike
/// but differ are distinct tenants whose namespaces differ and whose data never meet.
pub async fn hostile_and_lookalike_tenant_ids_never_share_a_namespace<S: TenantStores>(store: S) {
    let tenants = Tenants::new(store);
    for bad in HOSTILE {
        match tenants.store(bad).await {
            Err(TenantError::InvalidTenant(err)) => {
                assert!(
                    err.shown.chars().count() <= 44,
                    "the error repeats the whole id: {err}"
                );
            }
            Err(other) => panic!("{bad:?}: refused late, by the backend: {other}"),
            Ok(_) => panic!("{bad:?} was accepted"),
        }
    }
    assert!(
        tenants.opened().await.is_empty(),
        "a refused id opened a store"
    );

    let namespaces: BTreeSet<String> = LOOKALIKES
        .iter()
        .map(|t| {
            tenants
                .factory()
                .namespace(&es_core::TenantId::new(t).unwrap_or_else(|e| panic!("{e}")))
        })
        .collect();
    assert_eq!(
        namespaces.len(),
        LOOKALIKES.len(),
        "two ids share a namespace: {namespaces:?}"
    );
    for tenant in LOOKALIKES {
        let s = tenant_store(&tenants, tenant).await;
        s.append(AppendRequest::new(
            stream("x"),
            ExpectedVersion::NoStream,
            vec![event("Noted", tenant)],
        ))
        .await
        .unwrap_or_else(|e| panic!("tenant {tenant}: {e}"));
    }
    for tenant in LOOKALIKES {
        let s = tenant_store(&tenants, tenant).await;
        let read: Vec<RecordedEvent> = s
            .read_stream(&stream("x"), ReadStream::forward())
            .try_collect()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            tags(&read),
            BTreeSet::from([tenant.to_owned()]),
            "tenant {tenant}"
        );
        assert_eq!(
            tags(&whole_feed(&s).await),
            BTreeSet::from([tenant.to_owned()]),
            "tenant {tenant}"
        );
    }
}

/// One tenant opened from two handles and from many tasks at once is one store: what one
/// writes, the other reads.
pub async fn a_tenant_opened_many_times_is_one_store<S: TenantStores>(store: S) {
    let first = Tenants::new(store.clone());
    let second = Tenants::new(store);
    let opening: Vec<_> = (0..8)
        .map(|_| {
            let first = first.clone();
            tokio::spawn(async move { tenant_store(&first, "shared").await })
        })
        .collect();
    for (i, task) in opening.into_iter().enumerate() {
        let s = task.await.unwrap_or_else(|e| panic!("{e}"));
        s.append(AppendRequest::new(
            stream("one"),
            ExpectedVersion::Exact(i as u64),
            vec![event("Noted", "shared")],
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let other = tenant_store(&second, "shared").await;
    assert_eq!(
        other
            .stream_version(&stream("one"))
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        8
    );
    assert_eq!(first.opened().await.len(), 1);
}

/// A projection that counts the events it handled and the tenant each names.
#[derive(Clone, Default)]
struct Counter {
    seen: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<u64, String>>>,
}

impl Counter {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, String>> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn tags(&self) -> BTreeSet<String> {
        self.lock().values().cloned().collect()
    }
    fn count(&self) -> usize {
        self.lock().len()
    }
}

impl Projection for Counter {
    fn name(&self) -> &'static str {
        "tenant-counter"
    }

    async fn handle(
        &mut self,
        event: &RecordedEvent,
    ) -> Result<(), es_core::projection::HandlerError> {
        let v: serde_json::Value = serde_json::from_slice(&event.payload)?;
        let tenant = v["tenant"].as_str().unwrap_or_default().to_owned();
        self.lock().insert(event.global_position, tenant);
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), es_core::projection::HandlerError> {
        self.lock().clear();
        Ok(())
    }
}
