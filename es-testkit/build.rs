//! Stamps every case of the conformance suites: reads the suite files listed in `SUITES`, and writes the stamping macros with one test per case. A case is every
//! `pub async fn` at the top of a suite file; it takes the store by value and nothing else. So a
//! case cannot be left out of the macros, and a helper cannot pass for a case: a `pub async fn`
//! of any other shape stops the build.

use std::fmt::Write as _;
use std::path::Path;

/// The suites: source file, module, the stamping macro, the trait a case's store implements.
/// The suites: source file, module, the stamping macro, the trait a case's store implements
/// (its path, for the documentation), and a factory for the macro's example.
const SUITES: [(&str, &str, &str, &str, &str, &str); 7] = [
    (
        "src/archiving.rs",
        "archiving",
        "archiving_conformance_tests",
        "Store",
        "es_core::Store",
        "es_memory::InMemoryStore::new()",
    ),
    (
        "src/conformance.rs",
        "conformance",
        "conformance_tests",
        "Store",
        "es_core::Store",
        "es_memory::InMemoryStore::new()",
    ),
    (
        "src/multi.rs",
        "multi",
        "multi_conformance_tests",
        "Store",
        "es_core::Store",
        "es_memory::InMemoryStore::new()",
    ),
    (
        "src/closing.rs",
        "closing",
        "closing_conformance_tests",
        "Store",
        "es_core::Store",
        "es_memory::InMemoryStore::new()",
    ),
    (
        "src/streaming.rs",
        "streaming",
        "streaming_conformance_tests",
        "StreamingStore",
        "es_core::StreamingStore",
        "es_memory::InMemoryStore::new()",
    ),
    (
        "src/shredding.rs",
        "shredding",
        "shredding_conformance_tests",
        "ShredFixture",
        "es_testkit::shredding::ShredFixture",
        "(es_memory::InMemoryStore::new(), es_memory::InMemoryKeyStore::new())",
    ),
    (
        "src/tenancy.rs",
        "tenancy",
        "tenancy_conformance_tests",
        "TenantStores",
        "es_core::TenantStores",
        "es_memory::InMemoryTenants::new()",
    ),
];

fn main() {
    let mut out = String::new();
    for (file, module, macro_name, bound, bound_path, example) in SUITES {
        println!("cargo::rerun-if-changed={file}");
        let cases = cases(file, bound).unwrap_or_else(|err| panic!("{file}: {err}"));
        write_macro(&mut out, module, macro_name, bound_path, example, &cases);
    }
    let dir = std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    std::fs::write(Path::new(&dir).join("stamp.rs"), out).expect("OUT_DIR is writable");
}

/// The names of the cases in `file`, in source order.
fn cases(file: &str, bound: &str) -> Result<Vec<String>, String> {
    let source = std::fs::read_to_string(file).map_err(|e| format!("cannot read: {e}"))?;
    let ast = syn::parse_file(&source).map_err(|e| format!("cannot parse: {e}"))?;
    let mut cases = Vec::new();
    for item in ast.items {
        let syn::Item::Fn(f) = item else { continue };
        if !matches!(f.vis, syn::Visibility::Public(_)) || f.sig.asyncness.is_none() {
            continue;
        }
        let name = f.sig.ident.to_string();
        if !is_case(&f.sig, bound) {
            return Err(format!(
                "`pub async fn {name}` is not a case: a case is \
                 `pub async fn {name}<S: {bound}>(store: S)`, with nothing else in its signature; \
                 make a helper private or a plain `pub fn`"
            ));
        }
        cases.push(name);
    }
    if cases.is_empty() {
        return Err("no case found".to_owned());
    }
    Ok(cases)
}

/// `<S: Bound>(store: S)` with no return type.
fn is_case(sig: &syn::Signature, bound: &str) -> bool {
    let params: Vec<_> = sig.generics.params.iter().collect();
    let [syn::GenericParam::Type(generic)] = params.as_slice() else {
        return false;
    };
    let bounded = generic.bounds.iter().any(|b| {
        matches!(b, syn::TypeParamBound::Trait(t)
            if t.path.segments.last().is_some_and(|s| s.ident == bound))
    });
    let by_value = match sig.inputs.iter().collect::<Vec<_>>().as_slice() {
        [syn::FnArg::Typed(arg)] => matches!(&*arg.ty, syn::Type::Path(p)
            if p.qself.is_none() && p.path.is_ident(&generic.ident)),
        _ => false,
    };
    bounded
        && by_value
        && sig.generics.where_clause.is_none()
        && matches!(sig.output, syn::ReturnType::Default)
}

fn write_macro(
    out: &mut String,
    module: &str,
    macro_name: &str,
    bound: &str,
    example: &str,
    cases: &[String],
) {
    let list = cases.join(",\n            ");
    let _ = write!(
        out,
        r"
/// Stamps every case of [`{module}`](crate::{module}) ({count} cases) onto a backend, each as a
/// named `#[tokio::test]` on a multi-threaded runtime.
///
/// The argument is an expression callable with no arguments that returns a future of a fresh,
/// empty store implementing `{bound}` (`|| async {{ .. }}`). Use it once per backend,
/// in a module of its own. The list of cases is generated from the suite's source, so it holds
/// every case.
///
/// ```no_run
/// es_testkit::{macro_name}!(|| async {{ {example} }});
/// ```
#[macro_export]
macro_rules! {macro_name} {{
    ($factory:expr) => {{
        $crate::__stamp!($factory; {module};
            {list},
        );
    }};
}}
",
        count = cases.len(),
    );
}
