use es_core::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Amount {
    value: u64,
}

#[derive(DomainEvent)]
enum AccountEvent {
    Deposited(Amount),
    Withdrawn(Amount),
}

fn main() {}
