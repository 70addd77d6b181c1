//! The error sink shared by attribute parsing and validation.
//!
//! Nothing in `attr.rs` or `valid.rs` returns `Result`: each problem is pushed here and parsing
//! carries on, so the user sees every bad attribute and every conflict of one derive at once
//! instead of fixing them one compile at a time.

use std::cell::RefCell;
use std::fmt::Display;
use std::thread;

use proc_macro2::Span;
use quote::ToTokens;

/// Collects the errors of one derive invocation.
pub(crate) struct Ctxt {
    /// `None` once [`Ctxt::check`] has taken the errors; `Drop` uses it to catch a forgotten check.
    errors: RefCell<Option<Vec<syn::Error>>>,
}

impl Ctxt {
    pub(crate) fn new() -> Self {
        Ctxt {
            errors: RefCell::new(Some(Vec::new())),
        }
    }

    /// Reports `msg` on the tokens of `obj` (first to last token).
    pub(crate) fn error_spanned_by<A: ToTokens, T: Display>(&self, obj: A, msg: T) {
        self.syn_error(syn::Error::new_spanned(obj.into_token_stream(), msg));
    }

    /// Reports `msg` at `span`.
    pub(crate) fn error_at<T: Display>(&self, span: Span, msg: T) {
        self.syn_error(syn::Error::new(span, msg));
    }

    /// Reports an error produced by syn's parser.
    pub(crate) fn syn_error(&self, err: syn::Error) {
        // `check` consumes the context, so the list is always there while it can be called.
        if let Some(errors) = self.errors.borrow_mut().as_mut() {
            errors.push(err);
        }
    }

    /// Consumes the context: all errors combined into one, if there were any.
    pub(crate) fn check(self) -> syn::Result<()> {
        let errors = self.errors.borrow_mut().take().unwrap_or_default();
        let mut errors = errors.into_iter();
        let Some(mut combined) = errors.next() else {
            return Ok(());
        };
        for err in errors {
            combined.combine(err);
        }
        Err(combined)
    }
}

impl Drop for Ctxt {
    fn drop(&mut self) {
        assert!(
            thread::panicking() || self.errors.borrow().is_none(),
            "es-derive bug: errors were collected but never checked"
        );
    }
}
