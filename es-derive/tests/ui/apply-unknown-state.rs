use es_core::{Apply, DomainEvent};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Opened {}

#[derive(Serialize, Deserialize)]
struct Closed {}

#[derive(DomainEvent)]
#[event(apply(Acount))]
enum AccountEvent {
    Opened(Opened),
    Closed(Closed),
}

struct Account;

impl Apply<Opened> for Account {
    fn apply(&mut self, _: &Opened) {}
}

impl Apply<Closed> for Account {
    fn apply(&mut self, _: &Closed) {}
}

fn main() {}
