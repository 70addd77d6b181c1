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
#[event = "x"]
enum Event {
    #[event(rename)]
    A(A),
    #[event(version)]
    B(B),
    #[event]
    C(C),
    #[event(rename = Deposited)]
    D(D),
    #[event("E")]
    E(E),
}

fn main() {}
