//! The production registry: MySQL or MariaDB through sqlx.
//!
//! The SQL mirrors [`super::sqlite`] with two differences MySQL imposes: `INSERT` and
//! `DELETE` have no portable `RETURNING` (MariaDB has it, MySQL does not), so the new
//! user id comes from the insert's `LAST_INSERT_ID()` and a delete reads the token hash
//! under a row lock first, in one transaction.

use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};

use super::dump::dump_queries;
use super::sql::{self, sql_registry};
use super::{Registry, RegistryError, User};
use crate::model::{DeviceId, UserId};

/// How long a request waits for a pooled connection. Short on purpose: while the
/// database is down, registry writes should answer 503 quickly, and cached
/// authentication must not queue behind them.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct MySqlRegistry {
    pool: MySqlPool,
}

impl MySqlRegistry {
    /// Connects lazily to `url` (`mysql://user:pass@host:port/db`): the pool opens
    /// connections on first use, so iotpipe starts (degraded) while MySQL is down.
    ///
    /// # Errors
    ///
    /// Fails if the URL is malformed.
    pub fn connect_lazy(url: &str) -> Result<Self, RegistryError> {
        let opts = MySqlConnectOptions::from_str(url)
            .map_err(|e| RegistryError::Unavailable(format!("bad registry URL: {e}")))?;
        let pool = MySqlPoolOptions::new()
            .max_connections(16)
            .min_connections(0)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(opts);
        Ok(Self { pool })
    }

    /// Connects to `url` and checks the database answers.
    ///
    /// # Errors
    ///
    /// Fails if the URL is malformed or the server cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, RegistryError> {
        let registry = Self::connect_lazy(url)?;
        registry.ping().await?;
        Ok(registry)
    }

    /// Applies the embedded migrations.
    ///
    /// # Errors
    ///
    /// Fails if a migration fails or the database has migrations this binary lacks.
    pub async fn migrate(&self) -> Result<(), RegistryError> {
        sql::migrator(include_str!("../../migrations/mysql/0001_registry.sql"))
            .run(&self.pool)
            .await
            .map_err(|e| RegistryError::Unavailable(format!("migration failed: {e}")))
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

dump_queries!(MySqlRegistry, "INSERT IGNORE");

// Only what differs between the engines is written here; the rest of the trait is
// the same SQL on both, written once by the macro.
sql_registry!(MySqlRegistry, "mysql", {
    async fn create_user(
        &self,
        username: &str,
        email: &str,
        key_hash: &str,
        now_ms: i64,
    ) -> Result<User, RegistryError> {
        let done = sqlx::query(
            "INSERT INTO users (username, email, api_key_hash, created_at_ms) VALUES (?, ?, ?, ?)",
        )
        .bind(username)
        .bind(email)
        .bind(key_hash)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        let id = i64::try_from(done.last_insert_id())
            .map_err(|e| RegistryError::Corrupt(format!("user id out of range: {e}")))?;
        Ok(User {
            id,
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
        let mut tx = self.pool.begin().await?;
        // The row lock keeps a concurrent delete from returning the same hash twice.
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT token_hash FROM devices WHERE id = ? AND user_id = ? FOR UPDATE",
        )
        .bind(id.to_string())
        .bind(user)
        .fetch_optional(&mut *tx)
        .await?;
        if row.is_some() {
            sqlx::query("DELETE FROM devices WHERE id = ? AND user_id = ?")
                .bind(id.to_string())
                .bind(user)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(row.map(|r| r.0))
    }
});
