use es_core::DomainEvent;

#[derive(DomainEvent)]
enum AccountEvent {
    Deposited { amount: u64 },
}

fn main() {}
