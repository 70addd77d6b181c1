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
    #[event(version = 0)]
    A(A),
    #[event(version = -1)]
    B(B),
    #[event(version = "2")]
    C(C),
    #[event(version = 4294967296)]
    D(D),
    #[event(version = 1.5)]
    E(E),
}

fn main() {}
