//! The embedded registry: SQLite through sqlx.

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::SqlSafeStr;
use uuid::Uuid;

use super::{Device, Registry, RegistryError, User};
use crate::model::{DeviceId, UserId};

/// The migrations, embedded so the binary needs no files beside it.
fn migrator() -> Migrator {
    Migrator::with_migrations(vec![Migration::new(
        1,
        Cow::Borrowed("registry"),
        MigrationType::Simple,
        include_str!("../../migrations/sqlite/0001_registry.sql").into_sql_str(),
        false,
    )])
}

type DeviceRow = (String, i64, String, String, i64);

const DEVICE_COLUMNS: &str = "id, user_id, name, type, created_at_ms";

pub struct SqliteRegistry {
    pool: SqlitePool,
}

impl SqliteRegistry {
    /// Opens the database at `url` (`sqlite://PATH`), creating the file if needed.
    ///
    /// # Errors
    ///
    /// Fails if the URL is malformed or the file cannot be opened.
    pub async fn connect(url: &str) -> Result<Self, RegistryError> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| RegistryError::Unavailable(format!("bad registry URL: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        Ok(Self { pool })
    }

    /// The URL of the default registry file in `data_dir`.
    pub fn default_url(data_dir: &Path) -> String {
        format!("sqlite://{}", data_dir.join("registry.db").display())
    }

    /// Applies the embedded migrations.
    ///
    /// # Errors
    ///
    /// Fails if a migration fails or the database has migrations this binary lacks.
    pub async fn migrate(&self) -> Result<(), RegistryError> {
        migrator()
            .run(&self.pool)
            .await
            .map_err(|e| RegistryError::Unavailable(format!("migration failed: {e}")))
    }
}

fn device_of(row: DeviceRow) -> Result<Device, RegistryError> {
    let (id, user_id, name, kind, created_at_ms) = row;
    Ok(Device {
        id: Uuid::parse_str(&id).map_err(|e| RegistryError::Corrupt(e.to_string()))?,
        user_id,
        name,
        kind,
        created_at_ms,
    })
}

#[async_trait]
impl Registry for SqliteRegistry {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn create_user(
        &self,
        username: &str,
        email: &str,
        key_hash: &str,
        now_ms: i64,
    ) -> Result<User, RegistryError> {
        let id: (i64,) = sqlx::query_as(
            "INSERT INTO users (username, email, api_key_hash, created_at_ms) \
             VALUES (?, ?, ?, ?) RETURNING id",
        )
        .bind(username)
        .bind(email)
        .bind(key_hash)
        .bind(now_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok(User {
            id: id.0,
            username: username.to_owned(),
            email: email.to_owned(),
            created_at_ms: now_ms,
        })
    }

    async fn user_by_key(&self, key_hash: &str) -> Result<Option<UserId>, RegistryError> {
        let row: Option<(i64,)> = sqlx::query_as("SELECT id FROM users WHERE api_key_hash = ?")
            .bind(key_hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.0))
    }

    async fn create_device(
        &self,
        user: UserId,
        name: &str,
        kind: &str,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<Device, RegistryError> {
        let id = Uuid::new_v4();
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
        Ok(Device {
            id,
            user_id: user,
            name: name.to_owned(),
            kind: kind.to_owned(),
            created_at_ms: now_ms,
        })
    }

    async fn device_by_token(&self, token_hash: &str) -> Result<Option<Device>, RegistryError> {
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE token_hash = ?");
        let row: Option<DeviceRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.map(device_of).transpose()
    }

    async fn device(&self, id: DeviceId) -> Result<Option<Device>, RegistryError> {
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?");
        let row: Option<DeviceRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(device_of).transpose()
    }

    async fn devices(&self, user: UserId) -> Result<Vec<Device>, RegistryError> {
        let sql = format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE user_id = ? ORDER BY created_at_ms, id"
        );
        let rows: Vec<DeviceRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(user)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(device_of).collect()
    }

    async fn delete_device(
        &self,
        user: UserId,
        id: DeviceId,
    ) -> Result<Option<String>, RegistryError> {
        let row: Option<(String,)> =
            sqlx::query_as("DELETE FROM devices WHERE id = ? AND user_id = ? RETURNING token_hash")
                .bind(id.to_string())
                .bind(user)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.0))
    }

    async fn ping(&self) -> Result<(), RegistryError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
