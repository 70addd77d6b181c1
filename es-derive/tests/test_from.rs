//! `From<Payload>` for each variant.

use es_core::DomainEvent;
use serde::{Deserialize, Serialize};

mod payloads {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    pub(crate) struct Opened {
        pub(crate) owner: String,
    }
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Deposited {
    amount: u64,
}

#[derive(Debug, PartialEq, DomainEvent)]
enum AccountEvent {
    Opened(payloads::Opened),
    #[event(rename = "MoneyDeposited")]
    Deposited(Deposited),
    Tagged(Box<Deposited>),
}

#[test]
fn from_wraps_each_payload_in_its_variant() {
    let opened = payloads::Opened {
        owner: "ann".to_owned(),
    };
    assert_eq!(
        AccountEvent::from(opened),
        AccountEvent::Opened(payloads::Opened {
            owner: "ann".to_owned()
        })
    );

    let deposited: AccountEvent = Deposited { amount: 3 }.into();
    assert_eq!(deposited, AccountEvent::Deposited(Deposited { amount: 3 }));
    assert_eq!(deposited.event_type(), "MoneyDeposited");

    let boxed = AccountEvent::from(Box::new(Deposited { amount: 4 }));
    assert_eq!(boxed.event_type(), "Tagged");
}

#[test]
fn into_collects_events_of_several_types() {
    let events: Vec<AccountEvent> = vec![
        payloads::Opened {
            owner: "bob".to_owned(),
        }
        .into(),
        Deposited { amount: 1 }.into(),
    ];
    let names: Vec<_> = events.iter().map(DomainEvent::event_type).collect();
    assert_eq!(names, ["Opened", "MoneyDeposited"]);
}
