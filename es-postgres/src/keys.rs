//! The PostgreSQL key store of crypto-shredding: table `subject_keys` of the store's schema
//! (migration 11).

use std::collections::HashMap;
use std::sync::Arc;

use es_core::contract::{StoreError, StoreFuture};
use es_core::personal::{KeyStore, StoredKey};
use sqlx::{AssertSqlSafe, PgPool, Row};

use crate::error::store_error;
use crate::PgStore;

/// Subject keys in the store's schema, for [`es_core::personal::Encrypted`] over a
/// [`PgStore`] (see [`PgStore::key_store`]). Cheap to clone.
///
/// Keys are created through the schema function `subject_key_create` (one key per subject,
/// whichever process creates it first) and destroyed through `subject_key_forget`, which sets the
/// key's columns to NULL and keeps the row as a tombstone, so that the subject never gets a new
/// key. The destroyed row version stays in the table's pages until VACUUM clears it, and in the
/// WAL, replicas and backups until they age out.
#[derive(Clone)]
pub struct PgKeyStore {
    pool: PgPool,
    sql: Arc<KeySql>,
}

struct KeySql {
    create: String,
    load: String,
    forget: String,
}

impl std::fmt::Debug for PgKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgKeyStore")
            .field("load", &self.sql.load)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// The key store in this store's schema, on its pool.
    pub fn key_store(&self) -> PgKeyStore {
        let s = self.schema().quoted();
        PgKeyStore {
            pool: self.pool().clone(),
            sql: Arc::new(KeySql {
                create: format!(
                    "SELECT out_version, out_material FROM {s}.subject_key_create($1, $2, $3)"
                ),
                load: format!(
                    "SELECT subject, key_version, material FROM {s}.subject_keys \
                     WHERE subject = ANY($1)"
                ),
                forget: format!("SELECT {s}.subject_key_forget($1)"),
            }),
        }
    }
}

fn stored(
    version: Option<i32>,
    material: Option<Vec<u8>>,
    subject: &str,
) -> Result<StoredKey, StoreError> {
    match (version, material) {
        (Some(version), Some(material)) => Ok(StoredKey::Active {
            version: u32::try_from(version).map_err(|_| StoreError::Corrupt {
                location: format!("the key of subject `{subject}`"),
                reason: format!("negative key version {version}"),
            })?,
            material,
        }),
        _ => Ok(StoredKey::Forgotten),
    }
}

impl KeyStore for PgKeyStore {
    fn create_key(
        &self,
        subject: &str,
        version: u32,
        material: Vec<u8>,
    ) -> impl StoreFuture<StoredKey> {
        let subject = subject.to_owned();
        async move {
            let version = i32::try_from(version).map_err(StoreError::backend)?;
            let row = sqlx::query(AssertSqlSafe(self.sql.create.as_str()))
                .bind(&subject)
                .bind(version)
                .bind(material)
                .fetch_one(&self.pool)
                .await
                .map_err(store_error)?;
            stored(
                row.try_get(0).map_err(store_error)?,
                row.try_get(1).map_err(store_error)?,
                &subject,
            )
        }
    }

    fn load_keys(&self, subjects: &[String]) -> impl StoreFuture<HashMap<String, StoredKey>> {
        let subjects = subjects.to_vec();
        async move {
            let rows = sqlx::query(AssertSqlSafe(self.sql.load.as_str()))
                .bind(&subjects)
                .fetch_all(&self.pool)
                .await
                .map_err(store_error)?;
            let mut keys = HashMap::with_capacity(rows.len());
            for row in rows {
                let subject: String = row.try_get(0).map_err(store_error)?;
                let key = stored(
                    row.try_get(1).map_err(store_error)?,
                    row.try_get(2).map_err(store_error)?,
                    &subject,
                )?;
                keys.insert(subject, key);
            }
            Ok(keys)
        }
    }

    fn forget(&self, subject: &str) -> impl StoreFuture<bool> {
        let subject = subject.to_owned();
        async move {
            sqlx::query_scalar(AssertSqlSafe(self.sql.forget.as_str()))
                .bind(&subject)
                .fetch_one(&self.pool)
                .await
                .map_err(store_error)
        }
    }
}
