use es_core::DomainEvent;

#[derive(DomainEvent)]
enum AccountEvent {
    Opened,
}

fn main() {}
