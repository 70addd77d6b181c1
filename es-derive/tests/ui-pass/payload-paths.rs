// Payload types named by paths, from other modules, generic and boxed.
use es_core::{Apply, DomainEvent};

mod account {
    pub mod events {
        use serde::{Deserialize, Serialize};

        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        pub struct Opened {
            pub owner: String,
        }

        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        pub struct Tagged<T> {
            pub tag: T,
        }
    }
}

#[derive(Debug, PartialEq, DomainEvent)]
#[event(apply(crate::Counter))]
enum Event {
    Opened(account::events::Opened),
    Tagged(account::events::Tagged<String>),
    Numbers(Vec<u64>),
    Boxed(Box<account::events::Tagged<u8>>),
    Optional(::std::option::Option<u32>),
    Unit(()),
}

#[derive(Default)]
struct Counter(u32);

impl<E> Apply<E> for Counter {
    fn apply(&mut self, _: &E) {
        self.0 += 1;
    }
}

fn main() {
    let events = [
        Event::from(account::events::Opened {
            owner: "ann".to_owned(),
        }),
        Event::from(account::events::Tagged {
            tag: "x".to_owned(),
        }),
        Event::from(vec![1, 2]),
        Event::from(Box::new(account::events::Tagged { tag: 1u8 })),
        Event::from(Some(3)),
        Event::from(()),
    ];
    let mut counter = Counter::default();
    for event in &events {
        let back = Event::from_payload(event.event_type(), &event.to_payload().unwrap()).unwrap();
        assert_eq!(&back, event);
        event.apply_to(&mut counter);
    }
    assert_eq!(counter.0, 6);
}
