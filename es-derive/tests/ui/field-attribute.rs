use es_core::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Opened {}

#[derive(DomainEvent)]
enum AccountEvent {
    Opened(#[event(rename = "AccountOpened")] Opened),
}

fn main() {}
