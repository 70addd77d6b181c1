// A rename that takes the name of a later variant: the error points at the rename that caused
// the clash, not at the innocent variant, and names the variant it clashes with.
use es_core::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Opened {}

#[derive(Serialize, Deserialize)]
struct Closed {}

#[derive(DomainEvent)]
enum AccountEvent {
    #[event(version = 2, rename = "Closed")]
    Opened(Opened),
    Closed(Closed),
}

fn main() {}
