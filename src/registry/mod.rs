//! Users, devices and their secrets, behind the [`Registry`] trait.
//!
//! Above the trait: [`secrets`] (generation and hashing) and [`auth`] (resolving a
//! bearer secret to a principal, with the in-process cache that keeps the registry off
//! the hot ingest path).

pub mod auth;
pub mod dump;
pub mod invalidation;
pub mod login_guard;
pub mod mysql;
pub mod secrets;
mod sql;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

use crate::model::{DeviceId, UserId};

/// A registered user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub username: String,
    pub email: String,
    pub created_at_ms: i64,
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: DeviceId,
    pub user_id: UserId,
    pub name: String,
    pub kind: String,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("{0} is already taken")]
    Conflict(&'static str),
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    #[error("registry data is invalid: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for RegistryError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                RegistryError::Conflict("username")
            }
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                RegistryError::Corrupt(e.to_string())
            }
            _ => RegistryError::Unavailable(e.to_string()),
        }
    }
}

/// The user and device registry. Secret hashes are passed in; the registry never sees
/// a secret.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    fn backend(&self) -> &'static str;

    /// # Errors
    ///
    /// [`RegistryError::Conflict`] if the username is taken.
    async fn create_user(
        &self,
        username: &str,
        email: &str,
        key_hash: &str,
        now_ms: i64,
    ) -> Result<User, RegistryError>;

    async fn user_by_key(&self, key_hash: &str) -> Result<Option<UserId>, RegistryError>;

    /// Gives the user a new key hash; returns the old one, or `None` if no such user.
    async fn rotate_user_key(
        &self,
        user: UserId,
        key_hash: &str,
    ) -> Result<Option<String>, RegistryError>;

    async fn create_device(
        &self,
        user: UserId,
        name: &str,
        kind: &str,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<Device, RegistryError>;

    async fn device_by_token(&self, token_hash: &str) -> Result<Option<Device>, RegistryError>;

    async fn device(&self, id: DeviceId) -> Result<Option<Device>, RegistryError>;

    /// The user's devices, oldest first.
    async fn devices(&self, user: UserId) -> Result<Vec<Device>, RegistryError>;

    /// Deletes the user's device. Returns its token hash, so caches can forget it, or
    /// `None` if the user has no such device.
    async fn delete_device(
        &self,
        user: UserId,
        id: DeviceId,
    ) -> Result<Option<String>, RegistryError>;

    async fn ping(&self) -> Result<(), RegistryError>;

    /// Every user and device with their secret hashes (`iotpipe transfer`).
    async fn dump(&self) -> Result<dump::RegistryDump, RegistryError>;

    /// Inserts users and devices with their ids and hashes, in one transaction;
    /// rows already present are kept as they are.
    async fn load(&self, dump: &dump::RegistryDump) -> Result<(), RegistryError>;
}

pub type SharedRegistry = Arc<dyn Registry>;
