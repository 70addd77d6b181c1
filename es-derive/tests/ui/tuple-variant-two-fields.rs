use es_core::DomainEvent;

#[derive(DomainEvent)]
enum AccountEvent {
    Transferred(String, u64),
    Empty(),
}

fn main() {}
