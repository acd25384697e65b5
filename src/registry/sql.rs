//! What the two SQL registries (SQLite and MySQL) share: the device row, its decoding,
//! the embedded migrations, and the queries whose text is the same on both engines.
//!
//! The queries come as a macro ([`sql_registry`]) because sqlx's executor traits are
//! per driver: the macro writes the same bodies once against each registry's own
//! pool. Only what differs (how an insert returns its id, how a delete returns the
//! deleted hash) is written in `sqlite.rs` and `mysql.rs`.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::SqlSafeStr;
use uuid::Uuid;

use super::{Device, RegistryError};

/// `id, user_id, name, type, created_at_ms`.
pub(super) type DeviceRow = (String, i64, String, String, i64);

pub(super) const DEVICE_COLUMNS: &str = "id, user_id, name, type, created_at_ms";

pub(super) fn device_of(row: DeviceRow) -> Result<Device, RegistryError> {
    let (id, user_id, name, kind, created_at_ms) = row;
    Ok(Device {
        id: Uuid::parse_str(&id).map_err(|e| RegistryError::Corrupt(e.to_string()))?,
        user_id,
        name,
        kind,
        created_at_ms,
    })
}

/// The migrations, embedded so the binary needs no files beside it.
pub(super) fn migrator(registry_sql: &'static str) -> Migrator {
    Migrator::with_migrations(vec![Migration::new(
        1,
        Cow::Borrowed("registry"),
        MigrationType::Simple,
        registry_sql.into_sql_str(),
        false,
    )])
}

/// The `Registry` impl of a SQL registry, on a type with a `pool` field: `backend()`,
/// the methods given (those whose SQL differs between engines), and every other
/// method written once here. One place, so that a method added to the trait is
/// written for both engines at once.
macro_rules! sql_registry {
    ($registry:ty, $backend:literal, { $($own:tt)* }) => {
        impl $registry {
            /// One device by a column (`token_hash` or `id`).
            async fn find_device_by(
                &self,
                column: &'static str,
                value: String,
            ) -> Result<Option<$crate::registry::Device>, $crate::registry::RegistryError> {
                use $crate::registry::sql::{device_of, DeviceRow, DEVICE_COLUMNS};
                let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE {column} = ?");
                let row: Option<DeviceRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(value)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(device_of).transpose()
            }
        }

        #[async_trait::async_trait]
        impl $crate::registry::Registry for $registry {
            fn backend(&self) -> &'static str {
                $backend
            }

            $($own)*

            async fn user_by_key(
                &self,
                key_hash: &str,
            ) -> Result<Option<$crate::model::UserId>, $crate::registry::RegistryError> {
                let row: Option<(i64,)> =
                    sqlx::query_as("SELECT id FROM users WHERE api_key_hash = ?")
                        .bind(key_hash)
                        .fetch_optional(&self.pool)
                        .await?;
                Ok(row.map(|r| r.0))
            }

            async fn rotate_user_key(
                &self,
                user: $crate::model::UserId,
                key_hash: &str,
            ) -> Result<Option<String>, $crate::registry::RegistryError> {
                // One transaction: the old hash returned is the one replaced.
                let mut tx = self.pool.begin().await?;
                let old: Option<(String,)> =
                    sqlx::query_as("SELECT api_key_hash FROM users WHERE id = ?")
                        .bind(user)
                        .fetch_optional(&mut *tx)
                        .await?;
                if old.is_some() {
                    sqlx::query("UPDATE users SET api_key_hash = ? WHERE id = ?")
                        .bind(key_hash)
                        .bind(user)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(old.map(|o| o.0))
            }

            async fn create_device(
                &self,
                user: $crate::model::UserId,
                name: &str,
                kind: &str,
                token_hash: &str,
                now_ms: i64,
            ) -> Result<$crate::registry::Device, $crate::registry::RegistryError> {
                let id = uuid::Uuid::new_v4();
                sqlx::query(
                    "INSERT INTO devices (id, user_id, name, type, token_hash, created_at_ms) \
                     VALUES (?, ?, ?, ?, ?, ?)",
                )
                .bind(id.to_string())
                .bind(user)
                .bind(name)
                .bind(kind)
                .bind(token_hash)
                .bind(now_ms)
                .execute(&self.pool)
                .await?;
                Ok($crate::registry::Device {
                    id,
                    user_id: user,
                    name: name.to_owned(),
                    kind: kind.to_owned(),
                    created_at_ms: now_ms,
                })
            }

            async fn device_by_token(
                &self,
                token_hash: &str,
            ) -> Result<Option<$crate::registry::Device>, $crate::registry::RegistryError> {
                self.find_device_by("token_hash", token_hash.to_owned()).await
            }

            async fn device(
                &self,
                id: $crate::model::DeviceId,
            ) -> Result<Option<$crate::registry::Device>, $crate::registry::RegistryError> {
                self.find_device_by("id", id.to_string()).await
            }

            async fn devices(
                &self,
                user: $crate::model::UserId,
            ) -> Result<Vec<$crate::registry::Device>, $crate::registry::RegistryError> {
                use $crate::registry::sql::{device_of, DeviceRow, DEVICE_COLUMNS};
                let sql = format!(
                    "SELECT {DEVICE_COLUMNS} FROM devices WHERE user_id = ? \
                     ORDER BY created_at_ms, id"
                );
                let rows: Vec<DeviceRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(user)
                    .fetch_all(&self.pool)
                    .await?;
                rows.into_iter().map(device_of).collect()
            }

            async fn dump(
                &self,
            ) -> Result<$crate::registry::dump::RegistryDump, $crate::registry::RegistryError> {
                self.dump_rows().await
            }

            async fn load(
                &self,
                dump: &$crate::registry::dump::RegistryDump,
            ) -> Result<(), $crate::registry::RegistryError> {
                self.load_rows(dump).await
            }

            async fn ping(&self) -> Result<(), $crate::registry::RegistryError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }
        }
    };
}

pub(super) use sql_registry;
