// Errors of different kinds in different places are all reported by one compile.
use es_core::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Opened {}
#[derive(Serialize, Deserialize)]
struct Closed {}

#[derive(DomainEvent)]
#[event(apply(&State), tagged)]
enum AccountEvent {
    #[event(version = 0, rename = "Closed")]
    Opened(Opened),
    #[event(renamed = "X")]
    Closed(Closed),
    Frozen,
    Moved { to: String },
}

fn main() {}
