//! Code generation for a valid input.
//!
//! Everything sits in one `const _: () = { .. };` block that starts by importing es-core under a
//! private alias (`use ::es_core as __es_core;`, or the `crate = "..."` override), so a wrong
//! path is one unresolved import rather than an error per generated path. std and `serde_json`
//! are reached through `es_core::__private`: the code works whatever the user's crate imports or
//! shadows, even under `#![no_implicit_prelude]`, and needs no dependency besides es-core.
//!
//! Code whose failure is the user's to fix (a payload without serde impls, a missing `Apply`
//! handler) is built with `quote_spanned!` on the user's payload type or variant, so rustc
//! reports it there. A payload without serde impls is reported once, by a check of its own
//! (see [`payload_support`]), in words about the derives it lacks; the generated serialization
//! code compiles whatever the payload implements, so it adds no errors of its own. Those spanned tokens name only single-segment aliases imported at the top of
//! the block (`__es_to_vec`, `__EsApply`, ...): a qualified path carrying the user's span could
//! trip `unused_qualifications` in a crate that imports the same item.

use proc_macro2::{Literal, Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{DeriveInput, Ident, Type};

use crate::ast::{Input, Variant};
use crate::ctxt::Ctxt;
use crate::fallback;

/// Expands `#[derive(DomainEvent)]`: the impls, or the errors plus stub impls.
pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    let cx = Ctxt::new();
    let input = Input::from_syn(&cx, input);
    input.validate(&cx);
    match cx.check() {
        Ok(()) => impl_enum(&input),
        Err(errors) => fallback::expand(&input, &errors),
    }
}

/// Paths shared by the generated impls (es-core through its block-local alias, see the module
/// docs).
pub(crate) struct Paths {
    /// The `use` item bringing es-core into the generated block.
    pub(crate) import: TokenStream,
    /// es-core, as imported.
    pub(crate) krate: TokenStream,
    /// std, through es-core.
    pub(crate) std: TokenStream,
    /// `serde_json`, through es-core.
    pub(crate) json: TokenStream,
}

impl Paths {
    pub(crate) fn new(input: &Input<'_>) -> Self {
        let krate = quote!(__es_core);
        // An overridden path is spanned on the user's literal, so an unresolved import is
        // reported there.
        let import = if let Some(path) = &input.attrs.krate {
            quote_spanned!(path.span()=> use #path as __es_core;)
        } else {
            quote!(
                use ::es_core as __es_core;
            )
        };
        Paths {
            import,
            std: quote!(#krate::__private::std),
            json: quote!(#krate::__private::serde_json),
            krate,
        }
    }
}

fn impl_enum(input: &Input<'_>) -> TokenStream {
    let paths = Paths::new(input);
    let domain_event = impl_domain_event(input, &paths);
    let from = from_impls(input, &input.variants, &paths);
    let apply = input
        .attrs
        .apply
        .iter()
        .map(|state| impl_apply_event(input, state, &paths));
    let apply_to = inherent_apply_to(input, &paths);
    let Paths { import, krate, .. } = &paths;
    let import_apply = if input.attrs.apply.is_empty() {
        TokenStream::new()
    } else {
        quote!(use #krate::Apply as __EsApply;)
    };
    let support = payload_support(&paths);
    let checks = payload_checks(&input.variants);
    quote! {
        #[doc(hidden)]
        const _: () = {
            #import
            #support
            #checks
            #import_apply
            #domain_event
            #(#from)*
            #(#apply)*
            #apply_to
        };
    }
}

fn impl_domain_event(input: &Input<'_>, paths: &Paths) -> TokenStream {
    let Paths {
        krate, std, json, ..
    } = paths;
    let ident = input.ident();
    let variants = &input.variants;

    let schemas = variants.iter().map(|v| {
        let name = v.name_lit();
        let version = Literal::u32_unsuffixed(v.version());
        quote!(#krate::EventSchema { name: #name, version: #version })
    });

    let names = variants.iter().map(|v| {
        let variant = v.ident();
        let name = v.name_lit();
        quote!(Self::#variant(_) => #name,)
    });

    let schema_version = schema_version_body(variants);

    // Through the payload's codec (see `payload_support`), which compiles whatever the payload
    // implements: a payload without serde impls is reported by its check alone.
    let to_payload = variants.iter().map(|v| {
        let variant = v.ident();
        let codec = codec(v.payload);
        quote!(Self::#variant(payload) => #codec.__es_to_vec(payload),)
    });

    let decode_arms = |decode: &str| {
        variants
            .iter()
            .map(|v| {
                let variant = v.ident();
                let name = v.name_lit();
                let codec = codec(v.payload);
                let decode = Ident::new(decode, Span::call_site());
                quote! {
                    #name => #codec.#decode(payload)
                        .map(Self::#variant)
                        .map_err(#krate::PayloadError::Invalid),
                }
            })
            .collect::<Vec<_>>()
    };
    let from_slice = decode_arms("__es_from_slice");
    let from_value = decode_arms("__es_from_value");
    let unknown = quote! {
        _ => #std::result::Result::Err(#krate::PayloadError::UnknownType(
            #std::borrow::ToOwned::to_owned(event_type),
        )),
    };

    quote! {
        #[automatically_derived]
        impl #krate::DomainEvent for #ident {
            const EVENT_TYPES: &'static [#krate::EventSchema] = &[#(#schemas),*];

            fn event_type(&self) -> &'static #std::primitive::str {
                match self {
                    #(#names)*
                }
            }

            fn schema_version(&self) -> #std::primitive::u32 {
                #schema_version
            }

            fn to_payload(
                &self,
            ) -> #std::result::Result<#std::vec::Vec<#std::primitive::u8>, #json::Error> {
                match self {
                    #(#to_payload)*
                }
            }

            fn from_payload(
                event_type: &#std::primitive::str,
                payload: &[#std::primitive::u8],
            ) -> #std::result::Result<Self, #krate::PayloadError> {
                match event_type {
                    #(#from_slice)*
                    #unknown
                }
            }

            fn from_value(
                event_type: &#std::primitive::str,
                payload: #json::Value,
            ) -> #std::result::Result<Self, #krate::PayloadError> {
                match event_type {
                    #(#from_value)*
                    #unknown
                }
            }
        }
    }
}

/// The payload codec for `ty`: `(&&&&__EsProbe::<Ty>::NEW).__es_probe()`, a value whose
/// `PayloadCodec` methods (de)serialize `Ty` with `serde_json` if it implements both serde
/// traits (see [`payload_support`]).
fn codec(ty: &Type) -> TokenStream {
    quote!((&&&&__EsProbe::<#ty>::NEW).__es_probe())
}

/// Imports for asking whether a payload type implements `Serialize` and `Deserialize` without
/// failing to compile when it does not (see `es_core::__private::payload`): a payload that
/// lacks them is reported once, by [`payload_checks`], naming the missing derives, instead of
/// by one error per serde call. `(&&&&__EsProbe::<T>::NEW).__es_probe()` is the payload's codec.
pub(crate) fn payload_support(paths: &Paths) -> TokenStream {
    let krate = &paths.krate;
    quote! {
        use #krate::__private::{
            PayloadCodec as _, PayloadProbe as __EsProbe, ProbeDeserialize as _,
            ProbeNeither as _, ProbeSerde as _, ProbeSerialize as _,
        };
    }
}

/// One check per payload type, spanned on it: a payload without serde impls fails here, with
/// the message of a trait that names the derives it lacks (see [`payload_support`]).
pub(crate) fn payload_checks<'a>(
    variants: impl IntoIterator<Item = &'a Variant<'a>>,
) -> TokenStream {
    let checks = variants.into_iter().map(|v| {
        let ty = v.payload;
        quote_spanned!(ty.span()=> (&&&&__EsProbe::<#ty>::NEW).__es_probe().__es_check();)
    });
    quote! {
        const _: fn() = || {
            #(#checks)*
        };
    }
}

/// A constant when every variant has the same version, else one arm per distinct version (arms
/// with the same body would trip `clippy::match_same_arms`).
fn schema_version_body(variants: &[Variant<'_>]) -> TokenStream {
    let mut groups: Vec<(u32, Vec<&syn::Ident>)> = Vec::new();
    for v in variants {
        match groups
            .iter_mut()
            .find(|(version, _)| *version == v.version())
        {
            Some((_, idents)) => idents.push(v.ident()),
            None => groups.push((v.version(), vec![v.ident()])),
        }
    }
    if let [(version, _)] = groups.as_slice() {
        let version = Literal::u32_unsuffixed(*version);
        return quote!(#version);
    }
    let arms = groups.iter().map(|(version, idents)| {
        let version = Literal::u32_unsuffixed(*version);
        quote!(#(Self::#idents(_))|* => #version,)
    });
    quote! {
        match self {
            #(#arms)*
        }
    }
}

/// `From<Payload>` for each variant. Shared with the fallback, which passes only the variants
/// whose payload types are unique.
pub(crate) fn from_impls<'a>(
    input: &'a Input<'_>,
    variants: impl IntoIterator<Item = &'a Variant<'a>> + 'a,
    paths: &'a Paths,
) -> impl Iterator<Item = TokenStream> + 'a {
    let std = &paths.std;
    let ident = input.ident();
    let (impl_generics, ty_generics, where_clause) = input.original.generics.split_for_impl();
    variants.into_iter().map(move |v| {
        let variant = v.ident();
        let ty = v.payload;
        quote! {
            #[automatically_derived]
            impl #impl_generics #std::convert::From<#ty> for #ident #ty_generics #where_clause {
                #[inline]
                fn from(payload: #ty) -> Self {
                    Self::#variant(payload)
                }
            }
        }
    })
}

/// `ApplyEvent<State>`: one arm per variant calling `<State as Apply<Payload>>::apply`. The call
/// is spanned on the variant so a missing handler is reported there (the state and payload types
/// keep their own spans, so a misspelled state is reported once, in `apply(...)`).
fn impl_apply_event(input: &Input<'_>, state: &Type, paths: &Paths) -> TokenStream {
    let krate = &paths.krate;
    let ident = input.ident();
    let arms = input.variants.iter().map(|v| {
        let variant = v.ident();
        let ty = v.payload;
        // No `<State as ..>`: rustc would report the missing impl on the state type in
        // `apply(...)`; the state is inferred from the argument instead.
        let call = quote_spanned!(variant.span()=> __EsApply::<#ty>::apply(state, event));
        quote!(Self::#variant(event) => #call,)
    });
    quote! {
        #[automatically_derived]
        impl #krate::ApplyEvent<#state> for #ident {
            fn apply_to(&self, state: &mut #state) {
                match self {
                    #(#arms)*
                }
            }
        }
    }
}

/// An inherent `apply_to`, so `event.apply_to(&mut state)` works without importing
/// `ApplyEvent`. Only generated with `apply(...)`. Shared with the fallback.
pub(crate) fn inherent_apply_to(input: &Input<'_>, paths: &Paths) -> TokenStream {
    if input.attrs.apply.is_empty() {
        return TokenStream::new();
    }
    let krate = &paths.krate;
    let ident = input.ident();
    let vis = &input.original.vis;
    let (impl_generics, ty_generics, where_clause) = input.original.generics.split_for_impl();
    let predicates = where_clause.map(|w| &w.predicates);
    quote! {
        #[automatically_derived]
        impl #impl_generics #ident #ty_generics {
            /// Applies this event to `state` through its `Apply` impl for the variant's payload
            /// (generated by `#[derive(DomainEvent)]`; same as `ApplyEvent::apply_to`).
            #[inline]
            #vis fn apply_to<S>(&self, state: &mut S)
            where
                Self: #krate::ApplyEvent<S>,
                #predicates
            {
                <Self as #krate::ApplyEvent<S>>::apply_to(self, state);
            }
        }
    }
}
