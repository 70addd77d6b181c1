//! Replay to fix a bug, end to end on the in-memory store: a balance projection with a bug (it
//! adds withdrawals instead of subtracting them, and keeps a row per event type it does not
//! know) runs live; the fixed code is rebuilt into a shadow (interrupted once and resumed), the
//! diff names exactly the rows the bug spoiled, and the switch makes the fixed rows live and lets
//! the fixed projection go on from the shadow's position. A second replay is discarded.

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use es_core::projection::HandlerError;
use es_core::replay::{Built, Diff, Replay, ReplayTarget, Side};
use es_core::{
    AppendRequest, AtLeastOnce, CheckpointStore, EventStore, ExpectedVersion, NewEvent, Projection,
    ProjectionRunner, RecordedEvent, StreamId,
};
use es_memory::InMemoryStore;
use serde_json::{json, Value};

type Rows = Arc<Mutex<BTreeMap<String, i64>>>;

/// The two read models, as an application would keep them in two tables.
#[derive(Clone, Default)]
struct Models {
    live: Rows,
    shadow: Rows,
    /// Whether the shadow exists (dropped by `discard`, made by a reset).
    shadow_exists: Arc<Mutex<bool>>,
    /// Promotions still to fail (an injected fault).
    failing_promotions: Arc<Mutex<u32>>,
}

/// Balances per account, written into `rows`; `fixed` says whether withdrawals subtract.
struct Balances {
    rows: Rows,
    fixed: bool,
    created: Option<Arc<Mutex<bool>>>,
}

impl Projection for Balances {
    fn name(&self) -> &'static str {
        "balances"
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        let payload: Value = serde_json::from_slice(&event.payload)?;
        let amount = payload["amount"].as_i64().unwrap_or(0);
        let mut rows = self.rows.lock().unwrap();
        let key = event.stream_id.to_string();
        match (event.event_type.as_str(), self.fixed) {
            // The bug: a withdrawal counted as a deposit.
            ("Deposited", _) | ("Withdrawn", false) => *rows.entry(key).or_default() += amount,
            ("Withdrawn", true) => *rows.entry(key).or_default() -= amount,
            ("Opened", true) => {
                rows.entry(key).or_default();
            }
            (other, false) => {
                // The bug's second half: a row per unknown event type.
                rows.insert(format!("unknown:{other}"), 0);
            }
            (_, true) => {}
        }
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        self.rows.lock().unwrap().clear();
        if let Some(created) = &self.created {
            *created.lock().unwrap() = true;
        }
        Ok(())
    }
}

impl ReplayTarget for Models {
    type Projection = Balances;

    fn shadow(&self) -> Balances {
        Balances {
            rows: Arc::clone(&self.shadow),
            fixed: true,
            created: Some(Arc::clone(&self.shadow_exists)),
        }
    }

    async fn rows(&self, side: Side) -> Result<BTreeMap<String, Value>, HandlerError> {
        let rows = match side {
            Side::Live => &self.live,
            Side::Shadow => &self.shadow,
        };
        Ok(rows
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect())
    }

    async fn has_shadow(&self) -> Result<bool, HandlerError> {
        Ok(*self.shadow_exists.lock().unwrap())
    }

    async fn promote(&self) -> Result<(), HandlerError> {
        {
            let mut failing = self.failing_promotions.lock().unwrap();
            if *failing > 0 {
                *failing -= 1;
                return Err("the promotion failed (injected)".into());
            }
        }
        let mut exists = self.shadow_exists.lock().unwrap();
        if !*exists {
            return Err("there is no shadow to promote".into());
        }
        // Both locks held: a reader sees the old rows or the new ones.
        let mut live = self.live.lock().unwrap();
        let mut shadow = self.shadow.lock().unwrap();
        *live = std::mem::take(&mut *shadow);
        *exists = false;
        Ok(())
    }

    async fn discard(&self) -> Result<(), HandlerError> {
        self.shadow.lock().unwrap().clear();
        *self.shadow_exists.lock().unwrap() = false;
        Ok(())
    }
}

/// The balance projection writing into the live read model, with or without the bug.
fn spawn_live(
    runner: &ProjectionRunner<InMemoryStore>,
    models: &Models,
    store: &InMemoryStore,
    fixed: bool,
) -> es_core::ProjectionHandle<InMemoryStore> {
    runner.spawn(AtLeastOnce::new(
        Balances {
            rows: Arc::clone(&models.live),
            fixed,
            created: None,
        },
        store.clone(),
    ))
}

fn event(event_type: &str, amount: i64) -> NewEvent {
    NewEvent::from_value(event_type, 1, &json!({ "amount": amount }))
}

async fn append(store: &InMemoryStore, id: &str, events: Vec<NewEvent>) {
    let stream = StreamId::new("account", id).unwrap();
    store
        .append(AppendRequest::new(stream, ExpectedVersion::Any, events))
        .await
        .unwrap();
}

/// What the fixed code makes of the whole feed.
fn fixed_balances(accounts: &HashMap<&str, Vec<(&str, i64)>>) -> BTreeMap<String, Value> {
    accounts
        .iter()
        .map(|(id, events)| {
            let balance: i64 = events
                .iter()
                .map(|(t, a)| match *t {
                    "Deposited" => *a,
                    "Withdrawn" => -*a,
                    _ => 0,
                })
                .sum();
            (format!("account-{id}"), json!(balance))
        })
        .collect()
}

/// 1,200 events over four accounts (several shadow batches, so an interrupted build can
/// resume); returns each account's events.
async fn seed(store: &InMemoryStore) -> HashMap<&'static str, Vec<(&'static str, i64)>> {
    let mut accounts: HashMap<&str, Vec<(&str, i64)>> = HashMap::new();
    for round in 0..100_i64 {
        for id in ["a", "b", "c", "d"] {
            let mut batch = vec![("Deposited", 10 + round)];
            if id != "d" {
                batch.push(("Withdrawn", 3));
            }
            if round == 0 {
                batch.insert(0, ("Opened", 0));
            }
            accounts
                .entry(id)
                .or_default()
                .extend(batch.iter().copied());
            append(store, id, batch.iter().map(|(t, a)| event(t, *a)).collect()).await;
        }
    }
    accounts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buggy_projection_is_replayed_compared_and_switched() {
    let store = InMemoryStore::new();
    let mut accounts = seed(&store).await;
    let head = store.head_position().await.unwrap();

    // The buggy projection, live.
    let models = Models::default();
    let runner = ProjectionRunner::new(store.clone());
    let live = spawn_live(&runner, &models, &store, false);
    live.wait_for(head).await;
    let spoiled = models.rows(Side::Live).await.unwrap();
    assert_eq!(
        spoiled["account-d"],
        json!(fixed_balances(&accounts)["account-d"])
    );

    // Build the shadow, stopped after its first batch, then resumed.
    let replay = Replay::new(store.clone(), models.clone());
    let mut calls = 0;
    let built = replay
        .build(|_, _| {
            calls += 1;
            ControlFlow::Break(())
        })
        .await
        .unwrap();
    let Built::Interrupted { position, head: to } = built else {
        panic!("the build was not interrupted: {built:?}");
    };
    assert_eq!((calls, to), (1, head));
    assert!(
        position > 0 && position < head,
        "stopped at {position} of {head}"
    );
    let stored = store
        .load_checkpoint(&replay.shadow_checkpoint())
        .await
        .unwrap();
    assert_eq!(stored.position, position, "the stop recorded its position");
    let built = replay
        .resume(|_, _| ControlFlow::Continue(()))
        .await
        .unwrap();
    assert_eq!(built, Built::Complete { position: head });
    assert_eq!(
        models.rows(Side::Shadow).await.unwrap(),
        fixed_balances(&accounts),
        "the resumed shadow holds what one pass of the fixed code makes"
    );

    // The diff names exactly the spoiled rows.
    let diff = replay.diff().await.unwrap();
    assert_eq!(diff.added, Vec::<(String, Value)>::new());
    assert_eq!(
        diff.changed
            .iter()
            .map(|c| c.0.as_str())
            .collect::<Vec<_>>(),
        ["account-a", "account-b", "account-c"]
    );
    assert_eq!(diff.removed, vec![("unknown:Opened".to_owned(), json!(0))]);
    assert_eq!(diff.unchanged, 1);
    let text = diff.report(2);
    assert!(
        text.starts_with("0 added, 3 changed, 1 removed, 1 unchanged\n"),
        "{text}"
    );
    assert!(text.contains("~ account-a: 6250 -> 5650"), "{text}");
    assert!(text.contains("- unknown:Opened: 0"), "{text}");
    assert!(text.contains("(1 more not shown)"), "{text}");

    switch_then_discard(&store, &models, &replay, live, &mut accounts).await;
}

/// Switches (the old worker stopped), lets the fixed projection go on with a later event, then
/// replays again (an empty diff) and discards; a switch with no shadow changes nothing.
async fn switch_then_discard(
    store: &InMemoryStore,
    models: &Models,
    replay: &Replay<InMemoryStore, Models>,
    live: es_core::ProjectionHandle<InMemoryStore>,
    accounts: &mut HashMap<&'static str, Vec<(&'static str, i64)>>,
) {
    let head = store.head_position().await.unwrap();
    let runner = ProjectionRunner::new(store.clone());
    // Switch: the live worker (old code) is fenced off and stopped; the fixed one goes on from
    // the shadow's position with the events appended after it.
    let moved = replay.switch().await.unwrap();
    assert_eq!(moved, head);
    live.shutdown().await;
    assert_eq!(
        models.rows(Side::Live).await.unwrap(),
        fixed_balances(accounts)
    );
    let checkpoint = store.load_checkpoint("balances").await.unwrap();
    assert_eq!(checkpoint.position, head);
    assert!(
        checkpoint.generation >= 1,
        "the switch started a new generation"
    );
    append(store, "a", vec![event("Withdrawn", 50)]).await;
    accounts.get_mut("a").unwrap().push(("Withdrawn", 50));
    let fixed = spawn_live(&runner, models, store, true);
    fixed.wait_for(store.head_position().await.unwrap()).await;
    fixed.shutdown().await;
    assert_eq!(
        models.rows(Side::Live).await.unwrap(),
        fixed_balances(accounts)
    );
    assert_eq!(
        replay.diff().await.unwrap().removed.len(),
        4,
        "the shadow is gone"
    );

    // A second replay with nothing to fix: an empty diff, then discarded.
    let built = replay
        .build(|_, _| ControlFlow::Continue(()))
        .await
        .unwrap();
    assert!(matches!(built, Built::Complete { .. }));
    let diff: Diff = replay.diff().await.unwrap();
    assert!(diff.is_empty(), "{}", diff.report(3));
    replay.discard().await.unwrap();
    assert_eq!(
        models.rows(Side::Live).await.unwrap(),
        fixed_balances(accounts)
    );
    let before = store.load_checkpoint("balances").await.unwrap();
    let refused = replay.switch().await.unwrap_err();
    assert!(
        refused.to_string().contains("there is no shadow"),
        "{refused}"
    );
    assert_eq!(
        store.load_checkpoint("balances").await.unwrap(),
        before,
        "a refused switch leaves the live checkpoint alone"
    );
}

/// A promotion that fails after the live checkpoint moved: the switch reports it, the live
/// checkpoint is at the shadow's position (behind the live read model, which handled later
/// events), the shadow is still there, and a second switch completes; the fixed projection then
/// catches up the later events from the shadow's position, so none is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_promotion_leaves_the_checkpoint_behind_the_read_model() {
    let store = InMemoryStore::new();
    let mut accounts = seed(&store).await;
    let models = Models::default();
    let runner = ProjectionRunner::new(store.clone());
    let live = spawn_live(&runner, &models, &store, false);
    let replay = Replay::new(store.clone(), models.clone());
    let built = replay
        .build(|_, _| ControlFlow::Continue(()))
        .await
        .unwrap();
    let Built::Complete {
        position: shadow_at,
    } = built
    else {
        panic!("{built:?}");
    };
    // The live side goes on past the shadow.
    append(&store, "b", vec![event("Deposited", 1000)]).await;
    accounts.get_mut("b").unwrap().push(("Deposited", 1000));
    let head = store.head_position().await.unwrap();
    live.wait_for(head).await;
    live.shutdown().await;
    let spoiled = models.rows(Side::Live).await.unwrap();

    *models.failing_promotions.lock().unwrap() = 1;
    let failed = replay.switch().await.unwrap_err();
    assert!(failed.to_string().contains("injected"), "{failed}");
    let checkpoint = store.load_checkpoint("balances").await.unwrap();
    assert_eq!(
        checkpoint.position, shadow_at,
        "the checkpoint moved to the shadow's position, behind what the read model holds"
    );
    assert!(shadow_at < head);
    assert_eq!(
        models.rows(Side::Live).await.unwrap(),
        spoiled,
        "the read model stayed"
    );
    assert!(
        models.has_shadow().await.unwrap(),
        "the shadow is still there"
    );

    assert_eq!(replay.switch().await.unwrap(), shadow_at);
    let fixed = spawn_live(&runner, &models, &store, true);
    fixed.wait_for(head).await;
    fixed.shutdown().await;
    assert_eq!(
        models.rows(Side::Live).await.unwrap(),
        fixed_balances(&accounts),
        "the events after the shadow's position were caught up, none missing"
    );
}
