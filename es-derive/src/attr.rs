//! Parsing of `#[event(...)]` attributes.
//!
//! None of these parsers return `Result`: every problem goes to the [`Ctxt`] and parsing goes on
//! with the next key, so all bad attributes of an enum are reported together.

use std::fmt::{self, Display};

use proc_macro2::{Span, TokenTree};
use quote::ToTokens;
use syn::meta::ParseNestedMeta;
use syn::spanned::Spanned;
use syn::{
    token, Attribute, Expr, ExprLit, ExprUnary, Ident, Lit, LitStr, Meta, Path, Token, Type, UnOp,
};

use crate::ctxt::Ctxt;

/// The name of an attribute or of one of its keys.
#[derive(Clone, Copy)]
pub(crate) struct Symbol(&'static str);

/// The derive's attribute: `#[event(...)]`.
pub(crate) const EVENT: Symbol = Symbol("event");
/// Container: `apply(State, ...)`, the states the enum's variants are applied to.
pub(crate) const APPLY: Symbol = Symbol("apply");
/// Container: `crate = "path"`, where es-core is found.
pub(crate) const CRATE: Symbol = Symbol("crate");
/// Variant: `rename = "Name"`, the stable event type name.
pub(crate) const RENAME: Symbol = Symbol("rename");
/// Variant: `version = N`, the schema version.
pub(crate) const VERSION: Symbol = Symbol("version");

impl PartialEq<Symbol> for Path {
    fn eq(&self, word: &Symbol) -> bool {
        self.is_ident(word.0)
    }
}

impl Display for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Attributes on the enum.
pub(crate) struct Container {
    /// `apply(...)` states, in order, without duplicates.
    pub(crate) apply: Vec<Type>,
    /// `crate = "..."`.
    pub(crate) krate: Option<Path>,
}

/// Attributes on a variant.
pub(crate) struct Variant {
    /// `rename = "..."`.
    pub(crate) rename: Option<Rename>,
    /// `version = N`.
    pub(crate) version: Option<Version>,
}

/// A parsed `rename = "Name"`.
pub(crate) struct Rename {
    /// The `rename` key, so that errors can point at the whole setting.
    pub(crate) key: Ident,
    /// The name.
    pub(crate) name: LitStr,
}

impl Rename {
    /// `rename = "Name"` as written, for errors about the setting as a whole.
    pub(crate) fn tokens(&self) -> proc_macro2::TokenStream {
        let Rename { key, name } = self;
        quote::quote!(#key = #name)
    }
}

/// A parsed `version = N`.
pub(crate) struct Version {
    pub(crate) value: u32,
    /// The literal, for errors about its value.
    pub(crate) span: Span,
}

/// A key that may be given once; a repeat is reported on the repeated key (serde's `Attr`).
struct Attr<'c, T> {
    cx: &'c Ctxt,
    name: Symbol,
    value: Option<T>,
    seen: bool,
}

impl<'c, T> Attr<'c, T> {
    fn none(cx: &'c Ctxt, name: Symbol) -> Self {
        Attr {
            cx,
            name,
            value: None,
            seen: false,
        }
    }

    /// Records that the key appeared at `key`; reports it if it appeared before. Returns whether
    /// this is the first occurrence.
    fn first<K: ToTokens>(&mut self, key: K) -> bool {
        if self.seen {
            let name = self.name;
            self.cx.error_spanned_by(
                key,
                format_args!("duplicate event attribute `{name}`; keep only one `{name}`"),
            );
            return false;
        }
        self.seen = true;
        true
    }

    fn set(&mut self, value: T) {
        self.value = Some(value);
    }

    fn get(self) -> Option<T> {
        self.value
    }
}

impl Container {
    /// Parses the `#[event(...)]` attributes of the enum (or of the misused struct or union).
    pub(crate) fn from_ast(cx: &Ctxt, attrs: &[Attribute]) -> Self {
        let mut apply: Vec<Type> = Vec::new();
        let mut krate = Attr::none(cx, CRATE);

        for attr in event_attrs(cx, attrs) {
            let result = attr.parse_nested_meta(|meta| {
                if meta.path == APPLY {
                    parse_apply(cx, &meta, &mut apply)
                } else if meta.path == CRATE {
                    let first = krate.first(&meta.path);
                    if let Some(path) = parse_crate(cx, &meta)? {
                        if first {
                            krate.set(path);
                        }
                    }
                    Ok(())
                } else {
                    unknown_key(cx, &meta.path, Place::Enum);
                    skip_value(&meta)
                }
            });
            if let Err(err) = result {
                cx.syn_error(err);
            }
        }

        Container {
            apply,
            krate: krate.get(),
        }
    }
}

impl Variant {
    /// Parses the `#[event(...)]` attributes of one variant.
    pub(crate) fn from_ast(cx: &Ctxt, attrs: &[Attribute]) -> Self {
        let mut rename = Attr::none(cx, RENAME);
        let mut version = Attr::none(cx, VERSION);

        for attr in event_attrs(cx, attrs) {
            let result = attr.parse_nested_meta(|meta| {
                if meta.path == RENAME {
                    let first = rename.first(&meta.path);
                    if let Some(name) = parse_rename(cx, &meta)? {
                        if first {
                            rename.set(Rename {
                                key: Ident::new(&RENAME.to_string(), meta.path.span()),
                                name,
                            });
                        }
                    }
                    Ok(())
                } else if meta.path == VERSION {
                    let first = version.first(&meta.path);
                    if let Some(v) = parse_version(cx, &meta)? {
                        if first {
                            version.set(v);
                        }
                    }
                    Ok(())
                } else {
                    unknown_key(cx, &meta.path, Place::Variant);
                    skip_value(&meta)
                }
            });
            if let Err(err) = result {
                cx.syn_error(err);
            }
        }

        Variant {
            rename: rename.get(),
            version: version.get(),
        }
    }
}

/// Where an `#[event(...)]` attribute sits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    Enum,
    Variant,
}

impl Place {
    /// The keys accepted here, each with the form it takes.
    fn keys(self) -> &'static [(Symbol, &'static str)] {
        match self {
            Place::Enum => &[(APPLY, "apply(State, ...)"), (CRATE, "crate = \"path\"")],
            Place::Variant => &[(RENAME, "rename = \"Name\""), (VERSION, "version = N")],
        }
    }

    fn other(self) -> Self {
        match self {
            Place::Enum => Place::Variant,
            Place::Variant => Place::Enum,
        }
    }

    /// "on an enum" / "on a variant".
    fn on(self) -> &'static str {
        match self {
            Place::Enum => "on an enum",
            Place::Variant => "on a variant",
        }
    }

    /// Where a key of this place goes: "on the enum" / "on a variant".
    fn goes(self) -> &'static str {
        match self {
            Place::Enum => "on the enum",
            Place::Variant => "on a variant",
        }
    }
}

/// Reports an unknown key: a key of the other place says where it belongs; a near miss of a
/// key (by edit distance) suggests it; anything else lists the valid keys.
fn unknown_key(cx: &Ctxt, path: &Path, place: Place) {
    let key = path_to_string(path);
    let other = place.other();
    let message = if let Some((symbol, _)) = other.keys().iter().find(|(s, _)| path == s) {
        format!(
            "unknown key \"{key}\" {}: `{symbol}` belongs {}",
            place.on(),
            other.goes()
        )
    } else if let Some(symbol) = closest(&key, place) {
        format!("unknown key \"{key}\"; did you mean \"{symbol}\"?")
    } else if let Some(symbol) = closest(&key, other) {
        format!(
            "unknown key \"{key}\" {}; did you mean \"{symbol}\"? It belongs {}",
            place.on(),
            other.goes()
        )
    } else {
        let valid: Vec<String> = place
            .keys()
            .iter()
            .map(|(symbol, form)| format!("\"{symbol}\" (`{form}`)"))
            .collect();
        format!(
            "unknown key \"{key}\" {}; the valid keys are {}",
            place.on(),
            valid.join(" and ")
        )
    };
    cx.error_spanned_by(path, message);
}

/// The key of `place` closest to `key`, if it is close enough to be a misspelling: at most one
/// edit (a transposition counts as one) per three characters.
fn closest(key: &str, place: Place) -> Option<Symbol> {
    let limit = key.len().max(3) / 3;
    place
        .keys()
        .iter()
        .map(|(symbol, _)| (strsim::osa_distance(key, symbol.0), *symbol))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, symbol)| symbol)
}

/// Rejects `#[event(...)]` on the payload field of a variant: nothing is configured there.
pub(crate) fn reject_on_field(cx: &Ctxt, attrs: &[Attribute]) {
    for attr in attrs.iter().filter(|attr| attr.path() == &EVENT) {
        cx.error_spanned_by(
            attr,
            "`#[event(...)]` is not supported on a payload field; put it on the variant",
        );
    }
}

/// The `#[event(...)]` attributes among `attrs`; reports `#[event]` and `#[event = ...]`.
fn event_attrs<'a>(cx: &'a Ctxt, attrs: &'a [Attribute]) -> impl Iterator<Item = &'a Attribute> {
    attrs
        .iter()
        .filter(|attr| attr.path() == &EVENT)
        .filter(move |attr| match &attr.meta {
            Meta::List(list) => match list.tokens.clone().into_iter().next() {
                // syn would say "expected ident"; say what the settings look like instead.
                Some(TokenTree::Literal(literal)) => {
                    cx.error_spanned_by(
                        literal,
                        "expected `key = value` settings, e.g. `#[event(rename = \"Name\")]`",
                    );
                    false
                }
                _ => true,
            },
            Meta::Path(_) | Meta::NameValue(_) => {
                cx.error_spanned_by(
                    attr,
                    "expected a list of settings in parentheses, \
                     e.g. `#[event(rename = \"Name\", version = 2)]`",
                );
                false
            }
        })
}

/// `apply(State, other::State, ...)`; each state must be a type path.
fn parse_apply(cx: &Ctxt, meta: &ParseNestedMeta<'_>, apply: &mut Vec<Type>) -> syn::Result<()> {
    if !meta.input.peek(token::Paren) {
        cx.error_spanned_by(
            &meta.path,
            "expected the state types in parentheses: `apply(State, ...)`",
        );
        return skip_value(meta);
    }
    let content;
    let parens = syn::parenthesized!(content in meta.input);
    if content.is_empty() {
        cx.error_at(
            parens.span.join(),
            "`apply(...)` needs at least one state type: `apply(State)`",
        );
    }
    while !content.is_empty() {
        if content.peek(Lit) {
            let lit: Lit = content.parse()?;
            cx.error_spanned_by(
                &lit,
                "expected a state type, found a literal; write the type without quotes: \
                 `apply(State)`",
            );
        } else {
            let ty: Type = content.parse()?;
            match &ty {
                Type::Path(path) if path.qself.is_none() => {
                    let text = type_to_string(&ty);
                    if apply.iter().any(|seen| type_to_string(seen) == text) {
                        cx.error_spanned_by(
                            &ty,
                            format_args!("state `{text}` is listed twice in `apply(...)`"),
                        );
                    } else {
                        apply.push(ty);
                    }
                }
                _ => cx.error_spanned_by(
                    &ty,
                    format_args!(
                        "expected a state type path such as `Account` or `crate::bank::Account`, \
                         found `{}`",
                        type_to_string(&ty)
                    ),
                ),
            }
        }
        if content.is_empty() {
            break;
        }
        content.parse::<Token![,]>()?;
    }
    Ok(())
}

/// `crate = "path"` (or an unquoted path).
fn parse_crate(cx: &Ctxt, meta: &ParseNestedMeta<'_>) -> syn::Result<Option<Path>> {
    let Some(expr) = parse_assigned(cx, meta, "crate = \"::path::to::es_core\"")? else {
        return Ok(None);
    };
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => {
            if let Ok(path) = lit.parse::<Path>() {
                return Ok(Some(path));
            }
            cx.error_spanned_by(
                &lit,
                format_args!(
                    "`{}` is not a path; write the path es-core is re-exported at, \
                     e.g. `crate = \"::my_facade::es\"`",
                    lit.value()
                ),
            );
            Ok(None)
        }
        Expr::Path(path) if path.qself.is_none() && path.attrs.is_empty() => Ok(Some(path.path)),
        other => {
            cx.error_spanned_by(
                &other,
                "expected a path in quotes: `crate = \"::path::to::es_core\"`",
            );
            Ok(None)
        }
    }
}

/// `rename = "Name"`.
fn parse_rename(cx: &Ctxt, meta: &ParseNestedMeta<'_>) -> syn::Result<Option<LitStr>> {
    let Some(expr) = parse_assigned(cx, meta, "rename = \"Name\"")? else {
        return Ok(None);
    };
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => Ok(Some(lit)),
        other => {
            let hint = match &other {
                Expr::Path(path) if path.path.get_ident().is_some() => {
                    format!("rename = \"{}\"", type_to_string(&other))
                }
                _ => "rename = \"Name\"".to_owned(),
            };
            cx.error_spanned_by(
                &other,
                format_args!("expected the event type name as a string literal: `{hint}`"),
            );
            Ok(None)
        }
    }
}

/// `version = N` with `N` a positive integer that fits in a `u32`. Zero is parsed here and
/// rejected in `valid.rs`.
fn parse_version(cx: &Ctxt, meta: &ParseNestedMeta<'_>) -> syn::Result<Option<Version>> {
    let Some(expr) = parse_assigned(cx, meta, "version = 2")? else {
        return Ok(None);
    };
    match &expr {
        Expr::Lit(ExprLit {
            lit: Lit::Int(int), ..
        }) => {
            if let Ok(value) = int.base10_parse::<u32>() {
                return Ok(Some(Version {
                    value,
                    span: int.span(),
                }));
            }
            cx.error_spanned_by(
                int,
                format_args!(
                    "schema version `{int}` does not fit in a u32; the largest is {}",
                    u32::MAX
                ),
            );
            Ok(None)
        }
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => {
            let hint = match lit.value().trim().parse::<u32>() {
                Ok(n) => format!("version = {n}"),
                Err(_) => "version = 2".to_owned(),
            };
            cx.error_spanned_by(
                lit,
                format_args!("expected the schema version as an integer, not a string: `{hint}`"),
            );
            Ok(None)
        }
        Expr::Unary(ExprUnary {
            op: UnOp::Neg(_), ..
        }) => {
            cx.error_spanned_by(
                &expr,
                "schema versions are positive integers starting at 1, e.g. `version = 2`",
            );
            Ok(None)
        }
        other => {
            cx.error_spanned_by(
                other,
                "expected the schema version as an integer literal, e.g. `version = 2`",
            );
            Ok(None)
        }
    }
}

/// The expression after `key =`; reports a missing `=` with the expected form.
fn parse_assigned(
    cx: &Ctxt,
    meta: &ParseNestedMeta<'_>,
    expected: &str,
) -> syn::Result<Option<Expr>> {
    if !meta.input.peek(Token![=]) {
        cx.error_spanned_by(
            &meta.path,
            format_args!(
                "expected a value: `{expected}`, found `{}` alone",
                path_to_string(&meta.path)
            ),
        );
        skip_value(meta)?;
        return Ok(None);
    }
    let expr: Expr = meta.value()?.parse()?;
    Ok(Some(expr))
}

/// Skips whatever follows a key (`= value` or `(...)`) so the next key can still be checked.
fn skip_value(meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(Token![=]) {
        meta.value()?.parse::<Expr>()?;
    } else if meta.input.peek(token::Paren) {
        let content;
        syn::parenthesized!(content in meta.input);
        content.parse::<proc_macro2::TokenStream>()?;
    }
    Ok(())
}

fn path_to_string(path: &Path) -> String {
    path.to_token_stream().to_string().replace(' ', "")
}

/// A type as the user would write it, for messages and duplicate detection.
pub(crate) fn type_to_string<T: ToTokens>(ty: &T) -> String {
    let text = ty.to_token_stream().to_string();
    // `TokenStream` puts spaces around every token; tighten the usual punctuation.
    text.replace(" :: ", "::")
        .replace(":: ", "::")
        .replace(" <", "<")
        .replace("< ", "<")
        .replace(" >", ">")
        .replace(" ,", ",")
        .replace("& ", "&")
}
