//! The registration API: the application's aggregates and upcasters, so that `es state` shows
//! an aggregate's state instead of its raw events.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::future::Future;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use es_core::upcast::UpcastEvent;
use es_core::{
    Aggregate, AsOf, Projection, Repository, RepositoryBuilder, Store, UpcastError, Upcaster,
};
use es_postgres::PgStore;
use es_redis::RedisStore;
use futures::future::{BoxFuture, FutureExt, Shared as SharedFuture};
use serde_json::Value;

/// Resolves when the user asks the command to stop (Ctrl-C); every command may await a clone.
pub(crate) type Interrupt = SharedFuture<BoxFuture<'static, ()>>;

/// Rebuilds one registered projection on a store: `(store, resume, out, interrupt)`.
pub(crate) type Rebuilder<S> = Arc<
    dyn for<'a> Fn(S, bool, &'a mut (dyn Write + Send), Interrupt) -> BoxFuture<'a, Result<()>>
        + Send
        + Sync,
>;

/// A registered projection's rebuilders, one per backend.
#[derive(Clone)]
pub(crate) struct Rebuilders {
    pub(crate) pg: Rebuilder<PgStore>,
    pub(crate) redis: Rebuilder<RedisStore>,
}

/// What `es projections replay | switch | discard` asks of a registered replay.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ReplayStep {
    /// Build (or, with `resume`, go on building) the shadow, then print the diff.
    Build { resume: bool, sample: usize },
    /// Make the shadow live.
    Switch,
    /// Drop the shadow.
    Discard,
}

/// Runs one step of a registered replay on a store: `(store, step, out, interrupt)`.
pub(crate) type Replayer<S> = Arc<
    dyn for<'a> Fn(
            S,
            ReplayStep,
            &'a mut (dyn Write + Send),
            Interrupt,
        ) -> BoxFuture<'a, Result<()>>
        + Send
        + Sync,
>;

/// A registered replay's steps, one per backend.
#[derive(Clone)]
pub(crate) struct Replayers {
    pub(crate) pg: Replayer<PgStore>,
    pub(crate) redis: Replayer<RedisStore>,
}

/// What went wrong in a run of the command line.
#[derive(Debug)]
pub struct Error(pub(crate) anyhow::Error);

impl Error {
    /// Whether the run stopped because it was interrupted (Ctrl-C, or the `interrupt` future
    /// given to [`Registry::run`]).
    pub fn is_interrupted(&self) -> bool {
        self.0.is::<crate::run::Interrupted>()
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Error {}

/// Loads an aggregate of one type from a repository: its state as JSON and its version.
type Loader<S> = Arc<
    dyn Fn(Repository<S>, String, AsOf) -> BoxFuture<'static, Result<(Value, u64)>> + Send + Sync,
>;

/// Registers an upcaster on a repository builder.
type Configure<S> = Arc<dyn Fn(RepositoryBuilder<S>) -> RepositoryBuilder<S> + Send + Sync>;

/// The application's aggregates and upcasters, and the `es` command line that uses them.
///
/// ```no_run
/// # use es_core::Aggregate;
/// # fn run<Account: Aggregate>() -> std::process::ExitCode {
/// es_cli::Registry::new().aggregate::<Account>().main()
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Registry {
    pub(crate) aggregates: BTreeMap<&'static str, Loaders>,
    pub(crate) projections: BTreeMap<String, Rebuilders>,
    pub(crate) replays: BTreeMap<String, Replayers>,
    configure_pg: Vec<Configure<PgStore>>,
    configure_redis: Vec<Configure<RedisStore>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("aggregates", &self.aggregates.keys().collect::<Vec<_>>())
            .field("projections", &self.projections.keys().collect::<Vec<_>>())
            .field("replays", &self.replays.keys().collect::<Vec<_>>())
            .field("upcasters", &self.configure_pg.len())
            .finish_non_exhaustive()
    }
}

/// An aggregate type's loaders, one per backend.
#[derive(Clone)]
pub(crate) struct Loaders {
    pg: Loader<PgStore>,
    redis: Loader<RedisStore>,
}

impl Registry {
    /// No aggregates: `es state` shows raw events.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers aggregate `A`: `es state <A::CATEGORY>-<id>` loads it and prints its state.
    pub fn aggregate<A: Aggregate>(mut self) -> Self {
        self.aggregates.insert(
            A::CATEGORY,
            Loaders {
                pg: loader::<PgStore, A>(),
                redis: loader::<RedisStore, A>(),
            },
        );
        self
    }

    /// Registers an upcaster of `A`'s events, as the application registers it on its
    /// repository.
    pub fn upcaster<A: Aggregate>(mut self, upcaster: impl Upcaster) -> Self {
        let shared: Arc<dyn Upcaster> = Arc::new(upcaster);
        let one = shared.clone();
        self.configure_pg
            .push(Arc::new(move |b| b.upcaster::<A>(Shared(one.clone()))));
        self.configure_redis
            .push(Arc::new(move |b| b.upcaster::<A>(Shared(shared.clone()))));
        self
    }

    /// Registers an at-least-once projection, made by `make` (once per rebuild), for
    /// `es projections rebuild <name>` (its [`Projection::name`]). Its checkpoint lives in the
    /// store, as [`AtLeastOnce`](es_core::AtLeastOnce) keeps it.
    pub fn projection<P: Projection>(
        mut self,
        make: impl Fn() -> P + Send + Sync + 'static,
    ) -> Self {
        let name = make().name().to_owned();
        let make = Arc::new(make);
        let for_redis = Arc::clone(&make);
        self.projections.insert(
            name,
            Rebuilders {
                pg: Arc::new(move |store, resume, out, interrupt| {
                    crate::run::rebuild(store, make(), resume, out, interrupt).boxed()
                }),
                redis: Arc::new(move |store, resume, out, interrupt| {
                    crate::run::rebuild(store, for_redis(), resume, out, interrupt).boxed()
                }),
            },
        );
        self
    }

    /// Registers projection `name` for replay to fix a bug (`es projections replay | switch |
    /// discard <name>`): `pg` and `redis` make the [`ReplayTarget`](es_core::replay::ReplayTarget)
    /// that says where its live and shadow read models are on each backend (tables of the
    /// application's database, keys of its Redis) and holds the fixed projection. The shadow's
    /// checkpoint lives in the store, beside the live one.
    pub fn replay<P, R>(
        mut self,
        name: &str,
        pg: impl Fn(&PgStore) -> P + Send + Sync + 'static,
        redis: impl Fn(&RedisStore) -> R + Send + Sync + 'static,
    ) -> Self
    where
        P: es_core::replay::ReplayTarget,
        R: es_core::replay::ReplayTarget,
    {
        let pg = Arc::new(pg);
        let redis = Arc::new(redis);
        self.replays.insert(
            name.to_owned(),
            Replayers {
                pg: Arc::new(move |store, step, out, interrupt| {
                    let target = pg(&store);
                    crate::run::replay(store, target, step, out, interrupt).boxed()
                }),
                redis: Arc::new(move |store, step, out, interrupt| {
                    let target = redis(&store);
                    crate::run::replay(store, target, step, out, interrupt).boxed()
                }),
            },
        );
        self
    }

    /// Parses the process's arguments, runs the command and returns its exit code: 0, 1 on an
    /// error (printed on standard error), 2 on bad usage, 130 when interrupted (Ctrl-C).
    pub fn main(self) -> ExitCode {
        crate::run::main(&self)
    }

    /// Runs the command line `args` (the program name first), printing to `out`, in the
    /// caller's Tokio runtime; `interrupt` resolving is what Ctrl-C is to [`main`](Self::main):
    /// the command stops where it is safe to, and the run fails with an error whose
    /// [`is_interrupted`](Error::is_interrupted) is true. Bad usage is an error too (with
    /// clap's message).
    pub async fn run<I, T>(
        &self,
        args: I,
        out: &mut (dyn Write + Send),
        interrupt: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        use clap::Parser as _;
        let cli = crate::cli::Cli::try_parse_from(args).map_err(|e| Error(e.into()))?;
        let interrupt: Interrupt = interrupt.boxed().shared();
        crate::run::run(cli, self, out, interrupt)
            .await
            .map_err(Error)
    }

    /// The repository on `store` with the registered upcasters.
    pub(crate) fn repository_pg(&self, store: PgStore) -> Result<Repository<PgStore>> {
        let builder = self
            .configure_pg
            .iter()
            .fold(Repository::builder(store), |b, configure| configure(b));
        Ok(builder.build()?)
    }

    /// The repository on `store` with the registered upcasters.
    pub(crate) fn repository_redis(&self, store: RedisStore) -> Result<Repository<RedisStore>> {
        let builder = self
            .configure_redis
            .iter()
            .fold(Repository::builder(store), |b, configure| configure(b));
        Ok(builder.build()?)
    }

    /// Loads `id` of the registered aggregate `category`, if there is one.
    pub(crate) async fn load_pg(
        &self,
        store: PgStore,
        category: &str,
        id: &str,
        as_of: AsOf,
    ) -> Option<Result<(Value, u64)>> {
        let loaders = self.aggregates.get(category)?;
        Some(match self.repository_pg(store) {
            Ok(repo) => (loaders.pg)(repo, id.to_owned(), as_of).await,
            Err(err) => Err(err),
        })
    }

    /// Loads `id` of the registered aggregate `category`, if there is one.
    pub(crate) async fn load_redis(
        &self,
        store: RedisStore,
        category: &str,
        id: &str,
        as_of: AsOf,
    ) -> Option<Result<(Value, u64)>> {
        let loaders = self.aggregates.get(category)?;
        Some(match self.repository_redis(store) {
            Ok(repo) => (loaders.redis)(repo, id.to_owned(), as_of).await,
            Err(err) => Err(err),
        })
    }
}

fn loader<S: Store, A: Aggregate>() -> Loader<S> {
    Arc::new(|repo: Repository<S>, id: String, as_of: AsOf| {
        Box::pin(async move {
            let loaded = repo.load_as_of::<A>(&id, as_of).await?;
            Ok((serde_json::to_value(&loaded.aggregate)?, loaded.version))
        })
    })
}

/// An upcaster shared by the repositories of both backends.
struct Shared(Arc<dyn Upcaster>);

impl Upcaster for Shared {
    fn source_type(&self) -> &str {
        self.0.source_type()
    }
    fn source_version(&self) -> u32 {
        self.0.source_version()
    }
    fn produces(&self) -> Vec<(String, u32)> {
        self.0.produces()
    }
    fn upcast(&self, payload: Value) -> Result<Vec<UpcastEvent>, UpcastError> {
        self.0.upcast(payload)
    }
}
