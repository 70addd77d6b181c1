use es_core::DomainEvent;

#[derive(DomainEvent)]
enum AccountEvent {}

fn main() {}
