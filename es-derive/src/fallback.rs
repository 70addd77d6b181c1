//! What the derive emits for invalid input: the errors, plus stub impls of everything the
//! derive would have generated, so the rest of the user's crate still type-checks and the user
//! sees only the real errors instead of a cascade of "`AccountEvent` is not a `DomainEvent`".
//!
//! The stubs never run (the crate does not compile) but are still written without panics.
//! Payloads that lack serde impls are checked here too, so that their errors come with the
//! others.

use std::collections::HashSet;

use proc_macro2::TokenStream;
use quote::quote;

use crate::ast::Input;
use crate::attr::type_to_string;
use crate::expand::{from_impls, inherent_apply_to, payload_checks, payload_support, Paths};

/// The compile errors and the stubs.
pub(crate) fn expand(input: &Input<'_>, errors: &syn::Error) -> TokenStream {
    let paths = Paths::new(input);
    let Paths {
        import,
        krate,
        std,
        json,
    } = &paths;
    let ident = input.ident();

    let generics = &input.original.generics;
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    let event_where = if generics.params.is_empty() {
        quote!(#where_clause)
    } else {
        // The trait's supertraits, stated so a generic stub does not add errors of its own.
        let predicates = where_clause.map(|w| &w.predicates);
        quote!(where Self: #std::marker::Send + #std::marker::Sync + 'static, #predicates)
    };

    // A payload type in two variants is one of the reported errors; stub one `From` for it.
    // A generic enum gets none: `From<T>` could overlap with the other impls.
    let mut seen = HashSet::new();
    let unique: Vec<_> = input
        .variants
        .iter()
        .filter(|v| generics.params.is_empty() && seen.insert(type_to_string(v.payload)))
        .collect();
    let from = from_impls(input, unique.iter().copied(), &paths);
    // Payloads without serde impls are reported along with the other errors.
    let support = payload_support(&paths);
    let checks = payload_checks(unique.iter().copied());

    let apply = input.attrs.apply.iter().map(|state| {
        quote! {
            #[automatically_derived]
            impl #impl_generics #krate::ApplyEvent<#state> for #ident #ty_generics #where_clause {
                fn apply_to(&self, _: &mut #state) {}
            }
        }
    });
    let apply_to = inherent_apply_to(input, &paths);

    let errors = errors.to_compile_error();
    quote! {
        #errors

        #[doc(hidden)]
        const _: () = {
            #import
            #support
            #checks
            #[automatically_derived]
            impl #impl_generics #krate::DomainEvent for #ident #ty_generics #event_where {
                const EVENT_TYPES: &'static [#krate::EventSchema] = &[];

                fn event_type(&self) -> &'static #std::primitive::str {
                    ""
                }

                fn schema_version(&self) -> #std::primitive::u32 {
                    1
                }

                fn to_payload(
                    &self,
                ) -> #std::result::Result<#std::vec::Vec<#std::primitive::u8>, #json::Error> {
                    #std::result::Result::Ok(#std::vec::Vec::new())
                }

                fn from_payload(
                    event_type: &#std::primitive::str,
                    _: &[#std::primitive::u8],
                ) -> #std::result::Result<Self, #krate::PayloadError> {
                    #std::result::Result::Err(#krate::PayloadError::UnknownType(
                        #std::borrow::ToOwned::to_owned(event_type),
                    ))
                }

                fn from_value(
                    event_type: &#std::primitive::str,
                    _: #json::Value,
                ) -> #std::result::Result<Self, #krate::PayloadError> {
                    #std::result::Result::Err(#krate::PayloadError::UnknownType(
                        #std::borrow::ToOwned::to_owned(event_type),
                    ))
                }
            }
            #(#from)*
            #(#apply)*
            #apply_to
        };
    }
}
