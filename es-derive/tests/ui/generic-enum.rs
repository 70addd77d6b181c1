use es_core::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Opened {}

#[derive(DomainEvent)]
enum AccountEvent<T> {
    Opened(Opened),
    Other(T),
}

#[derive(DomainEvent)]
enum WithWhere
where
    Opened: Send,
{
    Opened(Opened),
}

fn main() {}
