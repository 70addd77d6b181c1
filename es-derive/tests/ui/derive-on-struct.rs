use es_core::DomainEvent;

#[derive(DomainEvent)]
struct Opened {
    owner: String,
}

fn main() {}
