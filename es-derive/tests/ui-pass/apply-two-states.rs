use es_core::{Apply, ApplyEvent, DomainEvent};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Opened {}

#[derive(Serialize, Deserialize)]
struct Deposited {
    amount: u64,
}

#[derive(DomainEvent)]
#[event(apply(Account))]
#[event(apply(Totals, report::Report<u64>))]
enum AccountEvent {
    Opened(Opened),
    Deposited(Deposited),
}

#[derive(Default)]
struct Account {
    balance: u64,
}

impl Apply<Opened> for Account {
    fn apply(&mut self, _: &Opened) {}
}

impl Apply<Deposited> for Account {
    fn apply(&mut self, event: &Deposited) {
        self.balance += event.amount;
    }
}

#[derive(Default)]
struct Totals {
    events: u32,
}

// One generic impl covers every payload.
impl<E> Apply<E> for Totals {
    fn apply(&mut self, _: &E) {
        self.events += 1;
    }
}

mod report {
    #[derive(Default)]
    pub struct Report<T> {
        pub lines: Vec<T>,
    }
}

impl Apply<Opened> for report::Report<u64> {
    fn apply(&mut self, _: &Opened) {}
}

impl Apply<Deposited> for report::Report<u64> {
    fn apply(&mut self, event: &Deposited) {
        self.lines.push(event.amount);
    }
}

fn require<S, E: ApplyEvent<S>>() {}

fn main() {
    require::<Account, AccountEvent>();
    require::<Totals, AccountEvent>();
    require::<report::Report<u64>, AccountEvent>();

    let event = AccountEvent::from(Deposited { amount: 2 });
    let mut account = Account::default();
    let mut totals = Totals::default();
    let mut report = report::Report::default();
    event.apply_to(&mut account);
    event.apply_to(&mut totals);
    event.apply_to(&mut report);
    assert_eq!((account.balance, totals.events, report.lines), (2, 1, vec![2]));
}
