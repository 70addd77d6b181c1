use es_core::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Opened {}

#[derive(DomainEvent)]
#[event(crate = "::es_core_reexport")]
enum AccountEvent {
    Opened(Opened),
}

fn main() {}
