use es_core::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct A {}
#[derive(Serialize, Deserialize)]
struct B {}
#[derive(Serialize, Deserialize)]
struct C {}
#[derive(Serialize, Deserialize)]
struct D {}
#[derive(Serialize, Deserialize)]
struct E {}

#[derive(DomainEvent)]
enum Event {
    #[event(rename = "")]
    A(A),
    #[event(rename = "money deposited")]
    B(B),
    #[event(rename = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx")]
    C(C),
    #[event(rename = "Opened/v2")]
    D(D),
    Crème(E),
}

fn main() {}
