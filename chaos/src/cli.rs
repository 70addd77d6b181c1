//! Command-line options: `--name value`, `--name=value` and bare `--flag`s, checked against the
//! names a command accepts.

use std::collections::BTreeMap;
use std::str::FromStr;

use anyhow::{bail, Context, Result};

/// The store a run or a process works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum StoreKind {
    /// es-postgres.
    Postgres,
    /// es-redis.
    Redis,
}

impl StoreKind {
    /// Its name on the command line and in reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Redis => "redis",
        }
    }
}

impl FromStr for StoreKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "postgres" | "pg" => Ok(Self::Postgres),
            "redis" => Ok(Self::Redis),
            other => bail!("unknown store {other:?} (expected postgres or redis)"),
        }
    }
}

/// Parsed options.
#[derive(Debug, Default)]
pub(crate) struct Opts {
    values: BTreeMap<String, String>,
    flags: Vec<String>,
}

impl Opts {
    /// Parses `args`; `valued` are the names that take a value, `flags` those that do not.
    pub(crate) fn parse(args: &[String], valued: &[&str], flags: &[&str]) -> Result<Self> {
        let mut opts = Self::default();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let Some(name) = arg.strip_prefix("--") else {
                bail!("unexpected argument {arg:?}");
            };
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (name, None),
            };
            if flags.contains(&name) && inline.is_none() {
                opts.flags.push(name.to_owned());
            } else if valued.contains(&name) {
                let value = match inline {
                    Some(v) => v,
                    None => args
                        .next()
                        .with_context(|| format!("--{name} needs a value"))?
                        .clone(),
                };
                if opts.values.insert(name.to_owned(), value).is_some() {
                    bail!("--{name} given twice");
                }
            } else {
                bail!("unknown option --{name}");
            }
        }
        Ok(opts)
    }

    /// The value of `--name`, if given.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// The value of `--name`, which is required.
    pub(crate) fn required(&self, name: &str) -> Result<&str> {
        self.get(name)
            .with_context(|| format!("--{name} is required"))
    }

    /// The value of `--name` parsed, or `default`.
    pub(crate) fn parsed<T: FromStr>(&self, name: &str, default: T) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|e| anyhow::anyhow!("--{name} {v:?}: {e}")),
        }
    }

    /// The value of `--name` parsed; required.
    pub(crate) fn parsed_required<T: FromStr>(&self, name: &str) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let v = self.required(name)?;
        v.parse()
            .map_err(|e| anyhow::anyhow!("--{name} {v:?}: {e}"))
    }

    /// Whether `--name` was given.
    pub(crate) fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|&a| a.to_owned()).collect()
    }

    #[test]
    fn parses_values_and_flags() {
        let opts = Opts::parse(
            &strings(&["--store", "pg", "--seconds=40", "--inline"]),
            &["store", "seconds"],
            &["inline"],
        )
        .unwrap();
        assert_eq!(
            opts.parsed_required::<StoreKind>("store").unwrap(),
            StoreKind::Postgres
        );
        assert_eq!(opts.parsed("seconds", 0u64).unwrap(), 40);
        assert_eq!(opts.parsed("writers", 4u16).unwrap(), 4);
        assert!(opts.flag("inline"));
        assert!(Opts::parse(&strings(&["--nope"]), &["store"], &[]).is_err());
        assert!(Opts::parse(&strings(&["--store"]), &["store"], &[]).is_err());
        assert!(Opts::parse(&strings(&["--store", "a", "--store", "b"]), &["store"], &[]).is_err());
    }
}
