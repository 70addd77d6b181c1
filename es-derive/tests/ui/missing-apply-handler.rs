use es_core::{Apply, DomainEvent};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Opened {}

#[derive(Serialize, Deserialize)]
struct Deposited {
    amount: u64,
}

#[derive(DomainEvent)]
#[event(apply(Account))]
enum AccountEvent {
    Opened(Opened),
    Deposited(Deposited),
}

#[derive(Default)]
struct Account {
    open: bool,
}

impl Apply<Opened> for Account {
    fn apply(&mut self, _: &Opened) {
        self.open = true;
    }
}

fn main() {}
