//! Embedded, versioned migrations, applied under a per-schema advisory lock.

use std::fmt::Write as _;

use sqlx::{AssertSqlSafe, PgPool, Row};

use crate::schema::SchemaName;
use crate::Error;

/// One embedded migration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    pub(crate) version: i64,
    pub(crate) name: &'static str,
    /// SQL with `__SCHEMA__`, `__CHANNEL__` and advisory-lock key placeholders.
    pub(crate) sql: &'static str,
}

/// Every migration, in order.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "outbox",
        sql: include_str!("../migrations/0002_outbox.sql"),
    },
    Migration {
        version: 3,
        name: "commit_order",
        sql: include_str!("../migrations/0003_commit_order.sql"),
    },
    Migration {
        version: 4,
        name: "relay",
        sql: include_str!("../migrations/0004_relay.sql"),
    },
    Migration {
        version: 5,
        name: "snapshot_event",
        sql: include_str!("../migrations/0005_snapshot_event.sql"),
    },
    Migration {
        version: 6,
        name: "least_privilege",
        sql: include_str!("../migrations/0006_least_privilege.sql"),
    },
    Migration {
        version: 7,
        name: "partitions",
        sql: include_str!("../migrations/0007_partitions.sql"),
    },
    Migration {
        version: 8,
        name: "feed_reads",
        sql: include_str!("../migrations/0008_feed_reads.sql"),
    },
    Migration {
        version: 9,
        name: "group_leases",
        sql: include_str!("../migrations/0009_group_leases.sql"),
    },
    Migration {
        version: 11,
        name: "subject_keys",
        sql: include_str!("../migrations/0011_subject_keys.sql"),
    },
    Migration {
        version: 12,
        name: "closed_streams",
        sql: include_str!("../migrations/0012_closed_streams.sql"),
    },
    Migration {
        version: 13,
        name: "archive",
        sql: include_str!("../migrations/0013_archive.sql"),
    },
];

/// The latest migration version this crate knows.
pub(crate) fn latest() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

impl Migration {
    /// The SQL for `schema`: the validated, quoted name replaces the placeholders.
    fn render(&self, schema: &SchemaName) -> String {
        self.sql
            .replace("__SCHEMA__", &schema.quoted())
            .replace("__CHANNEL__", &format!("'{}'", schema.channel()))
            .replace("__LOCK_SPACE__", &schema.lock_space().to_string())
            .replace("__TICKET_SPACE__", &schema.commit_lock_space().to_string())
            .replace("__GLOBAL_LOCK__", &schema.global_lock().to_string())
            .replace(
                "__INCARNATION_GUC__",
                &format!("'{}'", schema.incarnation_setting()),
            )
    }

    /// A stable checksum of the migration text (FNV-1a, 64 bit), independent of the schema.
    fn checksum(&self) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.sql.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{hash:016x}")
    }
}

fn bookkeeping(schema: &SchemaName) -> String {
    let s = schema.quoted();
    format!(
        "CREATE SCHEMA IF NOT EXISTS {s};\n\
         CREATE TABLE IF NOT EXISTS {s}.schema_migrations (\n    \
             version    bigint      NOT NULL PRIMARY KEY,\n    \
             name       text        NOT NULL,\n    \
             checksum   text        NOT NULL,\n    \
             applied_at timestamptz NOT NULL DEFAULT now()\n\
         );\n"
    )
}

/// The complete SQL that brings an empty database to the latest version for `schema`, for tools
/// that manage schemas themselves (psql, Flyway, Liquibase, a deployment pipeline).
///
/// The script creates the schema, the migration bookkeeping table, every table and function, and
/// records the applied migrations, so that a store built with
/// [`run_migrations(false)`](crate::PgStoreBuilder::run_migrations) accepts the schema. Run it in
/// one transaction (`psql --single-transaction -f`).
pub fn migration_script(schema: &str) -> Result<String, Error> {
    let schema = SchemaName::new(schema)?;
    let mut script = bookkeeping(&schema);
    for m in MIGRATIONS {
        let _ = write!(
            script,
            "\n-- migration {} ({})\n{}\nINSERT INTO {}.schema_migrations (version, name, checksum) \
             VALUES ({}, '{}', '{}');\n",
            m.version,
            m.name,
            m.render(&schema),
            schema.quoted(),
            m.version,
            m.name,
            m.checksum()
        );
    }
    Ok(script)
}

/// The statements that give `role` what a store on `schema` needs, and nothing more, for a DBA
/// to run once the schema is migrated (by [`migration_script`] or by a store built with a role
/// that may create it):
///
/// - `USAGE` on the schema, so that the role can name what is in it;
/// - `SELECT` on its tables, for reads, subscriptions and the relay's queries;
/// - `EXECUTE` on its functions, through which every write goes: appends, snapshots, the outbox
///   relay's marks and lease, checkpoints.
///
/// The functions run with their owner's rights (`SECURITY DEFINER`, `search_path` pinned), so the
/// role needs no right on the sequences and no `INSERT`, `UPDATE` or `DELETE` on any table: it
/// cannot add events below the head, move a position sequence, or edit snapshots, checkpoints or
/// the lease other than as the functions do. A store built with this role on a migrated schema
/// issues no DDL ([`run_migrations`](crate::PgStoreBuilder::run_migrations) finds nothing to do).
/// The statements are idempotent; run them again after a migration that adds tables or
/// functions.
///
/// ```
/// let sql = es_postgres::grants_script("billing", "billing_app").unwrap();
/// assert!(sql.contains(r#"GRANT USAGE ON SCHEMA "billing" TO "billing_app";"#));
/// assert!(!sql.contains("INSERT"));
/// ```
pub fn grants_script(schema: &str, role: &str) -> Result<String, Error> {
    let schema = SchemaName::new(schema)?.quoted();
    let reason = if role.is_empty() {
        Some("the name is empty")
    } else if role.len() > 63 {
        Some("PostgreSQL names are at most 63 bytes")
    } else if role.contains('\0') {
        Some("the name holds a NUL character")
    } else if role.starts_with("pg_") {
        Some("names starting with `pg_` are reserved by PostgreSQL")
    } else {
        None
    };
    if let Some(reason) = reason {
        let name: String = role.chars().take(80).collect();
        return Err(Error::InvalidRoleName { name, reason });
    }
    let role = format!("\"{}\"", role.replace('"', "\"\""));
    Ok(format!(
        "GRANT USAGE ON SCHEMA {schema} TO {role};\n\
         GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role};\n\
         GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {role};\n"
    ))
}

/// Applies the pending migrations to `schema` in one transaction.
///
/// Concurrent callers (several processes starting at once) serialize on a transaction-scoped
/// advisory lock keyed by the schema name; the second one finds everything applied.
///
/// A schema found at the latest version is left alone without any DDL (no `CREATE`, no lock), so
/// that a store whose role has no rights but its grants (see [`grants_script`]) can be built with
/// the default settings on a schema migrated by another role.
pub(crate) async fn run(pool: &PgPool, schema: &SchemaName) -> Result<(), Error> {
    if let Some(done) = applied(pool, schema).await? {
        check_applied(schema, &done)?;
        if done.len() == MIGRATIONS.len() {
            return Ok(());
        }
    }
    let mut tx = pool.begin().await.map_err(Error::pool)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("es-postgres migrate {schema}"))
        .execute(&mut *tx)
        .await
        .map_err(Error::Database)?;
    sqlx::raw_sql(AssertSqlSafe(bookkeeping(schema)))
        .execute(&mut *tx)
        .await
        .map_err(Error::Database)?;
    let applied = sqlx::query(AssertSqlSafe(format!(
        "SELECT version, checksum FROM {}.schema_migrations ORDER BY version",
        schema.quoted()
    )))
    .fetch_all(&mut *tx)
    .await
    .map_err(Error::Database)?;
    let mut done = Vec::with_capacity(applied.len());
    for row in &applied {
        let version: i64 = row.try_get(0).map_err(Error::Database)?;
        let checksum: String = row.try_get(1).map_err(Error::Database)?;
        done.push((version, checksum));
    }
    check_applied(schema, &done)?;
    for m in MIGRATIONS
        .iter()
        .filter(|m| !done.iter().any(|(v, _)| *v == m.version))
    {
        let failed = |source| Error::Migration {
            schema: schema.to_string(),
            version: m.version,
            name: m.name,
            source,
        };
        sqlx::raw_sql(AssertSqlSafe(m.render(schema)))
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {}.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            schema.quoted()
        )))
        .bind(m.version)
        .bind(m.name)
        .bind(m.checksum())
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
        tracing::info!(schema = %schema, version = m.version, name = m.name, "applied migration");
    }
    tx.commit().await.map_err(Error::Database)
}

/// Checks that an externally managed schema is at the latest version.
pub(crate) async fn verify(pool: &PgPool, schema: &SchemaName) -> Result<(), Error> {
    let not_ready = |found| Error::SchemaNotReady {
        schema: schema.to_string(),
        found,
        expected: latest(),
    };
    let Some(done) = applied(pool, schema).await? else {
        return Err(not_ready(None));
    };
    check_applied(schema, &done)?;
    if done.len() < MIGRATIONS.len() {
        return Err(not_ready(done.last().map(|(v, _)| *v)));
    }
    Ok(())
}

/// The migrations recorded as applied to `schema`, `(version, checksum)` in order, or `None` if
/// the schema has no bookkeeping table. Reads only.
async fn applied(pool: &PgPool, schema: &SchemaName) -> Result<Option<Vec<(i64, String)>>, Error> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables \
         WHERE schemaname = $1 AND tablename = 'schema_migrations')",
    )
    .bind(schema.as_str())
    .fetch_one(pool)
    .await
    .map_err(Error::pool)?;
    if !exists {
        return Ok(None);
    }
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT version, checksum FROM {}.schema_migrations ORDER BY version",
        schema.quoted()
    )))
    .fetch_all(pool)
    .await
    .map_err(Error::Database)?;
    let mut done = Vec::with_capacity(rows.len());
    for row in &rows {
        done.push((
            row.try_get::<i64, _>(0).map_err(Error::Database)?,
            row.try_get::<String, _>(1).map_err(Error::Database)?,
        ));
    }
    Ok(Some(done))
}

fn check_applied(schema: &SchemaName, done: &[(i64, String)]) -> Result<(), Error> {
    for (version, checksum) in done {
        match MIGRATIONS.iter().find(|m| m.version == *version) {
            Some(m) if m.checksum() == *checksum => {}
            Some(m) => {
                return Err(Error::MigrationChanged {
                    schema: schema.to_string(),
                    version: m.version,
                    name: m.name,
                })
            }
            None => {
                return Err(Error::SchemaTooNew {
                    schema: schema.to_string(),
                    found: *version,
                    supported: latest(),
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_quotes_the_schema_and_records_migrations() {
        let script = migration_script("tenant_7").unwrap();
        assert!(script.contains("CREATE SCHEMA IF NOT EXISTS \"tenant_7\";"));
        assert!(script.contains("\"tenant_7\".append_events"));
        assert!(script.contains("pg_notify('tenant_7_events'"));
        assert!(!script.contains("__"));
        assert!(script.contains("INSERT INTO \"tenant_7\".schema_migrations"));
        assert!(migration_script("x\"; drop").is_err());
    }
}
