//! The derive input as the rest of the macro sees it: the enum, its attributes and its
//! newtype variants, each keeping the user's tokens for error spans.

use proc_macro2::Span;
use quote::quote;
use syn::ext::IdentExt;
use syn::{Data, DeriveInput, Fields, Ident, LitStr, Type};

use crate::attr;
use crate::ctxt::Ctxt;

/// The derive input.
pub(crate) struct Input<'a> {
    pub(crate) original: &'a DeriveInput,
    pub(crate) attrs: attr::Container,
    /// Whether the input is an enum at all (a struct or union was already reported).
    pub(crate) is_enum: bool,
    /// The variants that have the right shape, in declaration order. Variants with another
    /// shape were reported and are left out.
    pub(crate) variants: Vec<Variant<'a>>,
}

/// One newtype variant: `Name(Payload)`.
pub(crate) struct Variant<'a> {
    pub(crate) original: &'a syn::Variant,
    pub(crate) attrs: attr::Variant,
    /// The wrapped payload type.
    pub(crate) payload: &'a Type,
}

impl<'a> Input<'a> {
    /// Converts the syn input, reporting a non-enum input, badly shaped variants and bad
    /// attributes to `cx`.
    pub(crate) fn from_syn(cx: &Ctxt, input: &'a DeriveInput) -> Self {
        let attrs = attr::Container::from_ast(cx, &input.attrs);
        let ident = &input.ident;
        let variants = match &input.data {
            Data::Enum(data) => data
                .variants
                .iter()
                .filter_map(|variant| Variant::from_syn(cx, variant))
                .collect(),
            Data::Struct(data) => {
                let keyword = &data.struct_token;
                cx.error_spanned_by(
                    quote!(#keyword #ident),
                    "`DomainEvent` can only be derived for an enum with one variant per event, \
                     e.g. `enum AccountEvent { Opened(Opened) }`",
                );
                Vec::new()
            }
            Data::Union(data) => {
                let keyword = &data.union_token;
                cx.error_spanned_by(
                    quote!(#keyword #ident),
                    "`DomainEvent` can only be derived for an enum with one variant per event, \
                     e.g. `enum AccountEvent { Opened(Opened) }`",
                );
                Vec::new()
            }
        };
        Input {
            original: input,
            attrs,
            is_enum: matches!(input.data, Data::Enum(_)),
            variants,
        }
    }

    pub(crate) fn ident(&self) -> &'a Ident {
        &self.original.ident
    }
}

impl<'a> Variant<'a> {
    fn from_syn(cx: &Ctxt, variant: &'a syn::Variant) -> Option<Self> {
        let attrs = attr::Variant::from_ast(cx, &variant.attrs);
        for field in &variant.fields {
            attr::reject_on_field(cx, &field.attrs);
        }
        let ident = &variant.ident;
        let payload = match &variant.fields {
            Fields::Unnamed(fields) if fields.unnamed.len() == 1 => &fields.unnamed[0].ty,
            Fields::Unit => {
                cx.error_spanned_by(
                    ident,
                    format_args!(
                        "event variant `{ident}` has no payload; wrap a payload type: \
                         `{ident}({ident})`"
                    ),
                );
                return None;
            }
            Fields::Unnamed(fields) => {
                let found = fields.unnamed.len();
                cx.error_spanned_by(
                    fields,
                    format_args!(
                        "event variant `{ident}` must wrap exactly one payload type, found \
                         {found}; put the fields in one payload struct: `{ident}({ident})`"
                    ),
                );
                return None;
            }
            Fields::Named(fields) => {
                cx.error_spanned_by(
                    fields,
                    format_args!(
                        "event variant `{ident}` has named fields; move them into a payload \
                         struct `{ident}` deriving Serialize and Deserialize and write \
                         `{ident}({ident})`"
                    ),
                );
                return None;
            }
        };
        Some(Variant {
            original: variant,
            attrs,
            payload,
        })
    }

    pub(crate) fn ident(&self) -> &'a Ident {
        &self.original.ident
    }

    /// The stable event type name: `rename = "..."`, else the variant name (without `r#`).
    pub(crate) fn name(&self) -> String {
        match &self.attrs.rename {
            Some(rename) => rename.name.value(),
            None => self.ident().unraw().to_string(),
        }
    }

    /// Where the name was written: the `rename` literal, else the variant name.
    pub(crate) fn name_span(&self) -> Span {
        match &self.attrs.rename {
            Some(rename) => rename.name.span(),
            None => self.ident().span(),
        }
    }

    /// The name as a string literal for generated code.
    pub(crate) fn name_lit(&self) -> LitStr {
        LitStr::new(&self.name(), Span::call_site())
    }

    /// The schema version: `version = N`, else 1.
    pub(crate) fn version(&self) -> u32 {
        self.attrs.version.as_ref().map_or(1, |v| v.value)
    }
}
