//! `#[event(crate = "...")]`: es-core reached through a re-export under another name.

mod facade {
    pub(crate) use es_core as es;
}

mod model {
    use serde::{Deserialize, Serialize};

    use crate::facade::es::{Apply, DomainEvent};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    pub(crate) struct Renamed {
        pub(crate) to: String,
    }

    #[derive(Debug, PartialEq, DomainEvent)]
    #[event(crate = "crate::facade::es", apply(Counter))]
    pub(crate) enum ItemEvent {
        #[event(rename = "item.renamed")]
        Renamed(Renamed),
    }

    #[derive(Default)]
    pub(crate) struct Counter(pub(crate) u32);

    impl Apply<Renamed> for Counter {
        fn apply(&mut self, _: &Renamed) {
            self.0 += 1;
        }
    }
}

use facade::es::DomainEvent;
use model::{Counter, ItemEvent, Renamed};

#[test]
fn uses_the_overridden_path() {
    let event = ItemEvent::from(Renamed { to: "x".to_owned() });
    assert_eq!(event.event_type(), "item.renamed");
    let back = ItemEvent::from_payload("item.renamed", &event.to_payload().unwrap()).unwrap();
    assert_eq!(back, event);

    let mut counter = Counter::default();
    event.apply_to(&mut counter);
    assert_eq!(counter.0, 1);
}
