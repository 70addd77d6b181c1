use es_core::DomainEvent;
use serde::Serialize;

#[derive(Serialize)]
struct Opened {}

struct Deposited {
    amount: u64,
}

#[derive(DomainEvent)]
enum AccountEvent {
    Opened(Opened),
    Deposited(Deposited),
}

fn main() {}
