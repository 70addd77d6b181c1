//! Apply dispatch: `#[event(apply(...))]` routes each variant to the state's `Apply` impl.

use es_core::{Aggregate, Apply, ApplyEvent, DomainEvent};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Opened {
    owner: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Deposited {
    amount: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Withdrawn {
    amount: u64,
}

#[derive(Debug, DomainEvent)]
#[event(apply(Account, Summary))]
enum AccountEvent {
    Opened(Opened),
    #[event(rename = "MoneyDeposited", version = 2)]
    Deposited(Deposited),
    Withdrawn(Withdrawn),
}

/// Records which handler ran, to prove each variant reaches its own.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Account {
    owner: Option<String>,
    balance: i64,
    #[serde(skip)]
    handled: Vec<&'static str>,
}

impl Apply<Opened> for Account {
    fn apply(&mut self, event: &Opened) {
        self.owner = Some(event.owner.clone());
        self.handled.push("opened");
    }
}

impl Apply<Deposited> for Account {
    fn apply(&mut self, event: &Deposited) {
        self.balance += i64::try_from(event.amount).unwrap();
        self.handled.push("deposited");
    }
}

impl Apply<Withdrawn> for Account {
    fn apply(&mut self, event: &Withdrawn) {
        self.balance -= i64::try_from(event.amount).unwrap();
        self.handled.push("withdrawn");
    }
}

/// A second state (a read model) fed by the same events.
#[derive(Debug, Default, PartialEq)]
struct Summary {
    events: u32,
    moved: u64,
}

impl Apply<Opened> for Summary {
    fn apply(&mut self, _: &Opened) {
        self.events += 1;
    }
}

impl Apply<Deposited> for Summary {
    fn apply(&mut self, event: &Deposited) {
        self.events += 1;
        self.moved += event.amount;
    }
}

impl Apply<Withdrawn> for Summary {
    fn apply(&mut self, event: &Withdrawn) {
        self.events += 1;
        self.moved += event.amount;
    }
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Aggregate for Account {
    const CATEGORY: &'static str = "account";
    type Command = ();
    type Event = AccountEvent;
    type Error = Never;

    fn handle(&self, (): &()) -> Result<Vec<AccountEvent>, Never> {
        Ok(Vec::new())
    }
}

fn events() -> Vec<AccountEvent> {
    vec![
        Opened {
            owner: "ann".to_owned(),
        }
        .into(),
        Deposited { amount: 10 }.into(),
        Withdrawn { amount: 3 }.into(),
    ]
}

#[test]
fn routes_each_variant_to_its_handler() {
    let mut account = Account::default();
    for event in &events() {
        ApplyEvent::<Account>::apply_to(event, &mut account);
    }
    assert_eq!(
        account,
        Account {
            owner: Some("ann".to_owned()),
            balance: 7,
            handled: vec!["opened", "deposited", "withdrawn"],
        }
    );
}

#[test]
fn one_enum_applies_to_several_states() {
    let mut summary = Summary::default();
    for event in &events() {
        event.apply_to(&mut summary);
    }
    assert_eq!(
        summary,
        Summary {
            events: 3,
            moved: 13
        }
    );
}

#[test]
fn aggregate_evolve_goes_through_the_dispatch() {
    let mut account = Account::default();
    for event in &events() {
        account.evolve(event);
    }
    assert_eq!(account.handled, ["opened", "deposited", "withdrawn"]);
}

#[test]
fn applies_events_read_back_from_their_payloads() {
    let mut account = Account::default();
    for event in events() {
        let stored = event.to_payload().unwrap();
        let decoded = AccountEvent::from_payload(event.event_type(), &stored).unwrap();
        decoded.apply_to(&mut account);
    }
    assert_eq!(account.balance, 7);
}

fn apply_generic<S, E: ApplyEvent<S>>(state: &mut S, events: &[E]) {
    for event in events {
        event.apply_to(state);
    }
}

#[test]
fn apply_event_works_as_a_generic_bound() {
    let mut summary = Summary::default();
    apply_generic(&mut summary, &events());
    assert_eq!(summary.events, 3);
}
