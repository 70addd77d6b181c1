//! Semantic checks on the parsed input: everything `expand.rs` relies on.

use std::collections::HashMap;

use crate::ast::{Input, Variant};
use crate::attr::type_to_string;
use crate::ctxt::Ctxt;

/// The longest event type name, in bytes; stores reject longer ones.
const MAX_NAME_LEN: usize = 256;

impl Input<'_> {
    /// Reports every rule the input breaks to `cx`.
    pub(crate) fn validate(&self, cx: &Ctxt) {
        self.check_generics(cx);
        self.check_not_empty(cx);
        for variant in &self.variants {
            variant.check_version(cx);
            variant.check_name(cx);
        }
        self.check_unique_names(cx);
        self.check_unique_payloads(cx);
    }

    /// Event enums are stored by name; a type parameter would give one name many payload types.
    fn check_generics(&self, cx: &Ctxt) {
        let generics = &self.original.generics;
        let message = "`DomainEvent` cannot be derived for a generic enum: stored events are \
                       decoded by name into one concrete payload type; remove the generic \
                       parameters";
        if !generics.params.is_empty() {
            cx.error_spanned_by(generics, message);
        } else if let Some(where_clause) = &generics.where_clause {
            cx.error_spanned_by(where_clause, message);
        }
    }

    fn check_not_empty(&self, cx: &Ctxt) {
        if let syn::Data::Enum(data) = &self.original.data {
            if self.is_enum && data.variants.is_empty() {
                let keyword = &data.enum_token;
                let ident = self.ident();
                cx.error_spanned_by(
                    quote::quote!(#keyword #ident),
                    format_args!(
                        "`{ident}` has no variants; add one variant per event, e.g. \
                         `Opened(Opened)`"
                    ),
                );
            }
        }
    }

    /// Two variants with one name could not be told apart when read back. Two variants cannot
    /// share an identifier, so every clash comes from a `rename`: the error points at the
    /// `rename` that caused it (the later variant's if both are renamed) and names the other
    /// variant.
    fn check_unique_names(&self, cx: &Ctxt) {
        let mut seen: HashMap<String, &Variant<'_>> = HashMap::new();
        for variant in &self.variants {
            let name = variant.name();
            let Some(first) = seen.get(&name).copied() else {
                seen.insert(name, variant);
                continue;
            };
            let (renamed, other) = if variant.attrs.rename.is_some() {
                (variant, first)
            } else {
                (first, variant)
            };
            let Some(rename) = &renamed.attrs.rename else {
                continue;
            };
            let how = if other.attrs.rename.is_some() {
                "given by its own `rename`"
            } else {
                "its variant name"
            };
            cx.error_spanned_by(
                rename.tokens(),
                format_args!(
                    "duplicate event type name `{name}`: this rename gives variant `{}` the \
                     name of variant `{}` ({how}); stored events of the two could not be told \
                     apart; choose another name",
                    renamed.ident(),
                    other.ident(),
                ),
            );
        }
    }

    /// Each payload type gets a `From` impl, so it may be wrapped by one variant only.
    fn check_unique_payloads(&self, cx: &Ctxt) {
        let mut seen: HashMap<String, &Variant<'_>> = HashMap::new();
        for variant in &self.variants {
            let payload = type_to_string(variant.payload);
            if let Some(first) = seen.get(&payload) {
                cx.error_spanned_by(
                    variant.payload,
                    format_args!(
                        "payload type `{payload}` is already wrapped by variant `{}`; each \
                         payload type may appear in one variant only, because the enum \
                         implements `From<{payload}>`; wrap a distinct type (e.g. a newtype)",
                        first.ident()
                    ),
                );
            } else {
                seen.insert(payload, variant);
            }
        }
    }
}

impl Variant<'_> {
    fn check_version(&self, cx: &Ctxt) {
        if let Some(version) = &self.attrs.version {
            if version.value == 0 {
                cx.error_at(
                    version.span,
                    "schema versions start at 1; use `version = 1` or more",
                );
            }
        }
    }

    /// Names are stored and matched as plain strings by every backend.
    fn check_name(&self, cx: &Ctxt) {
        let name = self.name();
        let fix = if self.attrs.rename.is_some() {
            "change the name"
        } else {
            "give the variant a valid name with `#[event(rename = \"...\")]`"
        };
        if name.is_empty() {
            cx.error_at(
                self.name_span(),
                "the event type name must not be empty; write a name like \
                 `rename = \"MoneyDeposited\"`",
            );
        } else if name.len() > MAX_NAME_LEN {
            cx.error_at(
                self.name_span(),
                format_args!(
                    "the event type name is {} bytes long; stores accept at most \
                     {MAX_NAME_LEN}; {fix}",
                    name.len()
                ),
            );
        } else if let Some(bad) = name.chars().find(|c| !is_name_char(*c)) {
            cx.error_at(
                self.name_span(),
                format_args!(
                    "event type name `{name}` contains {bad:?}; names may only use ASCII \
                     letters, digits, `_`, `.` and `-`; {fix}"
                ),
            );
        }
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}
