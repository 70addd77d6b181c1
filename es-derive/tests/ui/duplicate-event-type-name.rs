use es_core::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Deposited {}

#[derive(Serialize, Deserialize)]
struct DepositedV2 {}

#[derive(Serialize, Deserialize)]
struct Withdrawn {}

#[derive(DomainEvent)]
enum AccountEvent {
    Deposited(Deposited),
    #[event(rename = "Deposited")]
    DepositedAgain(DepositedV2),
    #[event(rename = "Deposited")]
    Withdrawn(Withdrawn),
}

fn main() {}
