use es_core::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Opened {}

#[derive(Serialize, Deserialize)]
struct Closed {}

struct Account;

#[derive(DomainEvent)]
enum AccountEvent {
    #[event(alias = "AccountOpened")]
    Opened(Opened),
    #[event(apply(Account))]
    Closed(Closed),
}

fn main() {}
