//! The registration API: the application's aggregates and upcasters, so that `es state` shows
//! an aggregate's state instead of its raw events.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use es_core::upcast::UpcastEvent;
use es_core::{Aggregate, AsOf, Repository, RepositoryBuilder, Store, UpcastError, Upcaster};
use es_postgres::PgStore;
use es_redis::RedisStore;
use futures::future::BoxFuture;
use serde_json::Value;

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
    configure_pg: Vec<Configure<PgStore>>,
    configure_redis: Vec<Configure<RedisStore>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("aggregates", &self.aggregates.keys().collect::<Vec<_>>())
            .field("upcasters", &self.configure_pg.len())
            .finish()
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

    /// Parses the process's arguments, runs the command and returns its exit code: 0, 1 on an
    /// error (printed on standard error), 2 on bad usage, 130 when interrupted.
    pub fn main(self) -> ExitCode {
        crate::run::main(&self)
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
