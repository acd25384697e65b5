//! The embedded registry: SQLite through sqlx.

use std::path::Path;
use std::str::FromStr;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::dump::dump_queries;
use super::sql::{self, sql_registry};
use super::{RegistryError, User};
use crate::model::{DeviceId, UserId};

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
        sql::migrator(include_str!("../../migrations/sqlite/0001_registry.sql"))
            .run(&self.pool)
            .await
            .map_err(|e| RegistryError::Unavailable(format!("migration failed: {e}")))
    }
}

dump_queries!(SqliteRegistry, "INSERT OR IGNORE");

// Only what differs between the engines is written here; the rest of the trait is
// the same SQL on both, written once by the macro.
sql_registry!(SqliteRegistry, "sqlite", {
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
});
