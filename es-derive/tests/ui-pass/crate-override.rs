// A crate that re-exports es-core under another path points the derive at it.
mod framework {
    pub mod events {
        pub use es_core::*;
    }
}

use framework::events::{Apply, DomainEvent};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Opened {}

#[derive(DomainEvent)]
#[event(crate = "crate::framework::events", apply(State))]
enum AccountEvent {
    Opened(Opened),
}

#[derive(DomainEvent)]
#[event(crate = framework::events)]
enum Unquoted {
    Opened(Opened),
}

struct State;

impl Apply<Opened> for State {
    fn apply(&mut self, _: &Opened) {}
}

fn main() {
    assert_eq!(AccountEvent::from(Opened {}).event_type(), "Opened");
    assert_eq!(Unquoted::from(Opened {}).event_type(), "Opened");
    AccountEvent::from(Opened {}).apply_to(&mut State);
}
