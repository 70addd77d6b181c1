// A payload without serde impls gets one error, naming the derives it lacks, on the payload type.
use es_core::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize)]
struct Opened {}

struct Deposited {
    amount: u64,
}

#[derive(Deserialize)]
struct Closed {}

#[derive(Serialize, Deserialize)]
struct Frozen {}

#[derive(DomainEvent)]
enum AccountEvent {
    Opened(Opened),
    Deposited(Deposited),
    Closed(Closed),
    Frozen(Frozen),
}

fn main() {}
