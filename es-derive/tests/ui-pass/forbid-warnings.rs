// The generated code holds up in a crate that forbids warnings outright (std payload types, as
// serde's own derives add `allow`s that `forbid` rejects).
#![forbid(warnings, dead_code, unused_qualifications)]

use es_core::{Apply, DomainEvent};

#[derive(DomainEvent)]
#[event(apply(State))]
enum Event {
    Deposited(u64),
    #[event(rename = "Noted", version = 2)]
    Note(String),
}

struct State;

impl<E> Apply<E> for State {
    fn apply(&mut self, _: &E) {}
}

fn main() {
    assert_eq!(Event::from(5u64).event_type(), "Deposited");
    assert_eq!(Event::from(String::new()).schema_version(), 2);
}
