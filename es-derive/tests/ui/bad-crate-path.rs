use es_core::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Opened {}

#[derive(DomainEvent)]
#[event(crate = "not a path")]
enum A {
    Opened(Opened),
}

#[derive(DomainEvent)]
#[event(crate = 5)]
enum B {
    Opened(Opened),
}

fn main() {}
