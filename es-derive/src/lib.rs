//! Derive macros for `es-core`.
use proc_macro::TokenStream;

/// Derives `DomainEvent`.
#[proc_macro_derive(DomainEvent, attributes(event))]
pub fn derive_domain_event(_input: TokenStream) -> TokenStream {
    TokenStream::new()
}
