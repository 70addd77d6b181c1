//! What the store runs under, read once at build: the server version, whether the connection is
//! encrypted, and the durability settings; logged as one line.

use sqlx::PgPool;

use crate::schema::SchemaName;
use crate::Error;

/// The server settings a store found when it was built ([`PgStore::server`](crate::PgStore::server)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerSettings {
    /// `server_version`, e.g. `15.10 (Debian 15.10-0+deb12u1)`.
    pub version: String,
    /// The role the store's connections log in as (`current_user`).
    pub role: String,
    /// Whether the store's connection to the server is encrypted (TLS), as the server sees it
    /// (`pg_stat_ssl`).
    pub tls: bool,
    /// The TLS protocol version in use (`TLSv1.3`), if encrypted.
    pub tls_version: Option<String>,
    /// `fsync`: `off` loses committed transactions on an operating-system crash.
    pub fsync: String,
    /// `synchronous_commit` for the store's sessions: `off` acknowledges commits that a crash can
    /// lose; `local` ones that a failover to a synchronous standby can lose.
    pub synchronous_commit: String,
}

impl ServerSettings {
    /// Whether an acknowledged append survives a server crash under these settings.
    pub fn durable(&self) -> bool {
        self.fsync == "on" && self.synchronous_commit != "off"
    }

    /// Reads the settings over one connection of `pool`.
    pub(crate) async fn read(pool: &PgPool) -> Result<Self, Error> {
        let (version, role, tls, tls_version, fsync, synchronous_commit): (
            String,
            String,
            bool,
            Option<String>,
            String,
            String,
        ) = sqlx::query_as(
            "SELECT current_setting('server_version'), current_user::text, \
                    coalesce(s.ssl, false), s.version, \
                    current_setting('fsync'), current_setting('synchronous_commit') \
               FROM (SELECT 1) AS one \
               LEFT JOIN pg_catalog.pg_stat_ssl s ON s.pid = pg_catalog.pg_backend_pid()",
        )
        .fetch_one(pool)
        .await
        .map_err(Error::Database)?;
        Ok(Self {
            version,
            role,
            tls,
            tls_version: tls_version.filter(|_| tls),
            fsync,
            synchronous_commit,
        })
    }

    /// Logs the one line that says what the store on `schema` runs under, as a warning when an
    /// acknowledged append could be lost.
    pub(crate) fn log(&self, schema: &SchemaName) {
        let tls = self.tls_version.as_deref().unwrap_or("off");
        let risk = if self.durable() {
            ""
        } else {
            ": a crash can lose acknowledged appends"
        };
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    schema = schema.as_str(),
                    server_version = self.version.as_str(),
                    role = self.role.as_str(),
                    tls,
                    fsync = self.fsync.as_str(),
                    synchronous_commit = self.synchronous_commit.as_str(),
                    "es-postgres store on schema `{schema}`: PostgreSQL {}, role `{}`, TLS {tls}, \
                     fsync {}, synchronous_commit {}{risk}",
                    self.version,
                    self.role,
                    self.fsync,
                    self.synchronous_commit
                )
            };
        }
        if self.durable() {
            line!(info);
        } else {
            line!(warn);
        }
    }
}
