// The inherent `apply_to` follows the enum's visibility and its absence of use is not a warning.
#![deny(warnings, unreachable_pub, missing_docs)]
//! Crate docs.

mod outer {
    pub(crate) mod inner {
        use es_core::{Apply, DomainEvent};
        use serde::{Deserialize, Serialize};

        #[derive(Serialize, Deserialize)]
        pub(crate) struct Opened {}

        #[derive(DomainEvent)]
        #[event(apply(State))]
        pub(super) enum Restricted {
            Opened(Opened),
        }

        #[derive(DomainEvent)]
        #[event(apply(State))]
        enum Private {
            Opened(Opened),
        }

        pub(crate) struct State;

        impl Apply<Opened> for State {
            fn apply(&mut self, _: &Opened) {}
        }

        pub(crate) fn private_name() -> &'static str {
            Private::from(Opened {}).event_type()
        }
    }

    pub(crate) fn apply() {
        inner::Restricted::from(inner::Opened {}).apply_to(&mut inner::State);
    }
}

fn main() {
    outer::apply();
    assert_eq!(outer::inner::private_name(), "Opened");
}
