use es_core::DomainEvent;

#[derive(DomainEvent)]
union Payload {
    amount: u64,
    code: u32,
}

fn main() {}
