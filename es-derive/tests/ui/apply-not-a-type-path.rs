use es_core::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Opened {}

struct Account;

#[derive(DomainEvent)]
#[event(apply("Account"))]
#[event(apply(&Account, [Account; 2], Account, Account))]
#[event(apply())]
#[event(apply = Account)]
enum AccountEvent {
    Opened(Opened),
}

fn main() {}
