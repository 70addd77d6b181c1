// A bad attribute is the only error: the enum still implements everything the derive would
// generate, so code using it does not add a cascade of errors.
use es_core::{Aggregate, Apply, DomainEvent};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Deposited {
    amount: u64,
}

#[derive(Debug, DomainEvent)]
#[event(apply(Account))]
enum AccountEvent {
    #[event(version = 0)]
    Deposited(Deposited),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Account {
    balance: u64,
}

impl Apply<Deposited> for Account {
    fn apply(&mut self, event: &Deposited) {
        self.balance += event.amount;
    }
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Aggregate for Account {
    const CATEGORY: &'static str = "account";
    type Command = u64;
    type Event = AccountEvent;
    type Error = Never;

    fn handle(&self, amount: &u64) -> Result<Vec<AccountEvent>, Never> {
        Ok(vec![Deposited { amount: *amount }.into()])
    }
}

fn main() {
    let event = AccountEvent::from(Deposited { amount: 1 });
    let _ = (event.event_type(), event.schema_version(), event.to_payload());
    let _ = AccountEvent::from_payload("Deposited", b"{}");
}
