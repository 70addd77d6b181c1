use es_core::{DomainEvent, EventSchema};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Opened {}

#[derive(Serialize, Deserialize)]
struct Deposited {
    amount: u64,
}

#[derive(DomainEvent)]
enum AccountEvent {
    #[event(rename = "account.opened")]
    Opened(Opened),
    #[event(rename = "account.money-deposited_v2")]
    #[event(version = 4294967295)]
    Deposited(Deposited),
}

fn main() {
    assert_eq!(
        AccountEvent::EVENT_TYPES,
        &[
            EventSchema {
                name: "account.opened",
                version: 1,
            },
            EventSchema {
                name: "account.money-deposited_v2",
                version: u32::MAX,
            },
        ]
    );
}
