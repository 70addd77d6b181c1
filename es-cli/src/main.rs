//! `es`: the event store's command line. Run `es --help`; see the `es_cli` crate docs.

fn main() -> std::process::ExitCode {
    es_cli::Registry::new().main()
}
