//! The production registry: MySQL or MariaDB through sqlx.
//!
//! The SQL mirrors [`super::sqlite`] with two differences MySQL imposes: `INSERT` and
//! `DELETE` have no portable `RETURNING` (MariaDB has it, MySQL does not), so the new
//! user id comes from the insert's `LAST_INSERT_ID()` and a delete reads the token hash
//! under a row lock first, in one transaction.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};

use super::dump::{dump_queries, RegistryDump};
use super::sql::{self, shared_queries};
use super::{Device, Registry, RegistryError, User};
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

shared_queries!(MySqlRegistry);
dump_queries!(MySqlRegistry, "INSERT IGNORE");

#[async_trait]
impl Registry for MySqlRegistry {
    fn backend(&self) -> &'static str {
        "mysql"
    }

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

    async fn user_by_key(&self, key_hash: &str) -> Result<Option<UserId>, RegistryError> {
        self.find_user_by_key(key_hash).await
    }

    async fn rotate_user_key(
        &self,
        user: UserId,
        key_hash: &str,
    ) -> Result<Option<String>, RegistryError> {
        self.replace_user_key(user, key_hash).await
    }

    async fn create_device(
        &self,
        user: UserId,
        name: &str,
        kind: &str,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<Device, RegistryError> {
        self.insert_device(user, name, kind, token_hash, now_ms)
            .await
    }

    async fn device_by_token(&self, token_hash: &str) -> Result<Option<Device>, RegistryError> {
        self.find_device_by("token_hash", token_hash.to_owned())
            .await
    }

    async fn device(&self, id: DeviceId) -> Result<Option<Device>, RegistryError> {
        self.find_device_by("id", id.to_string()).await
    }

    async fn devices(&self, user: UserId) -> Result<Vec<Device>, RegistryError> {
        self.list_devices(user).await
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

    async fn dump(&self) -> Result<RegistryDump, RegistryError> {
        self.dump_rows().await
    }

    async fn load(&self, dump: &RegistryDump) -> Result<(), RegistryError> {
        self.load_rows(dump).await
    }

    async fn ping(&self) -> Result<(), RegistryError> {
        self.ping_pool().await
    }
}
