use es_core::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Opened {}

#[derive(Serialize, Deserialize)]
struct Closed {}

#[derive(DomainEvent)]
#[event(crate = "::es_core", crate = "::es_core")]
enum AccountEvent {
    #[event(rename = "AccountOpened", rename = "Opened")]
    Opened(Opened),
    #[event(version = 2)]
    #[event(version = 3)]
    Closed(Closed),
}

fn main() {}
