use es_core::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Opened {}

#[derive(DomainEvent)]
#[event(rename_all = "snake_case", tag = "type")]
#[event(rename = "Account")]
enum AccountEvent {
    Opened(Opened),
}

fn main() {}
