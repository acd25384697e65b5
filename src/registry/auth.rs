//! Bearer secrets → principals, with an in-process cache in front of the registry.
//!
//! Every ingest request authenticates, so this is the hot path: a warm cache answers
//! with one SHA-256 and one map lookup. Deleting a device evicts its token and its
//! ownership entry here at once; other instances (production mode) are told through
//! the live backend.

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use super::secrets::{self, SecretKind};
use super::{RegistryError, SharedRegistry};
use crate::model::{DeviceId, UserId};

/// Who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    Admin,
    User(UserId),
    Device { id: DeviceId, user_id: UserId },
}

/// How many secrets and device owners are cached at most.
const CACHE_CAPACITY: u64 = 200_000;

#[derive(Clone)]
pub struct Auth {
    registry: SharedRegistry,
    admin: [u8; 32],
    secrets: Cache<[u8; 32], Principal>,
    owners: Cache<DeviceId, Option<UserId>>,
}

impl Auth {
    /// `ttl` bounds how long a cached answer is trusted without asking the registry.
    pub fn new(registry: SharedRegistry, admin_token: &str, ttl: Duration) -> Self {
        Self {
            registry,
            admin: secrets::digest(admin_token),
            secrets: Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .time_to_live(ttl)
                .build(),
            owners: Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .time_to_live(ttl)
                .build(),
        }
    }

    pub fn registry(&self) -> &SharedRegistry {
        &self.registry
    }

    /// Resolves a bearer secret. `Ok(None)` means unknown.
    ///
    /// # Errors
    ///
    /// When the registry cannot be asked and the cache does not know the secret.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<Principal>, RegistryError> {
        let digest = secrets::digest(secret);
        if constant_time_eq(&digest, &self.admin) {
            return Ok(Some(Principal::Admin));
        }
        if let Some(p) = self.secrets.get(&digest) {
            return Ok(Some(p));
        }
        let hash = hex::encode(digest);
        let found = match SecretKind::of(secret) {
            Some(SecretKind::UserKey) => {
                self.registry.user_by_key(&hash).await?.map(Principal::User)
            }
            Some(SecretKind::DeviceToken) => {
                self.registry
                    .device_by_token(&hash)
                    .await?
                    .map(|d| Principal::Device {
                        id: d.id,
                        user_id: d.user_id,
                    })
            }
            Some(SecretKind::Admin) | None => None,
        };
        if let Some(p) = found {
            self.secrets.insert(digest, p);
        }
        Ok(found)
    }

    /// Checks a device's own credentials (MQTT CONNECT: username = device id,
    /// password = token). Returns the device's user if the token belongs to that device.
    ///
    /// # Errors
    ///
    /// When the registry cannot be asked and the cache does not know the token.
    pub async fn authenticate_device(
        &self,
        device: DeviceId,
        token: &str,
    ) -> Result<Option<UserId>, RegistryError> {
        match self.authenticate(token).await? {
            Some(Principal::Device { id, user_id }) if id == device => Ok(Some(user_id)),
            _ => Ok(None),
        }
    }

    /// The owner of a device, if it exists.
    ///
    /// # Errors
    ///
    /// When the registry cannot be asked and the cache does not know the device.
    pub async fn device_owner(&self, device: DeviceId) -> Result<Option<UserId>, RegistryError> {
        if let Some(owner) = self.owners.get(&device) {
            return Ok(owner);
        }
        let owner = self.registry.device(device).await?.map(|d| d.user_id);
        self.owners.insert(device, owner);
        Ok(owner)
    }

    /// Forgets a deleted device: its token and its ownership.
    pub fn forget_device(&self, device: DeviceId, token_hash: &str) {
        self.owners.insert(device, None);
        if let Ok(bytes) = hex::decode(token_hash) {
            if let Ok(digest) = <[u8; 32]>::try_from(bytes.as_slice()) {
                self.secrets.invalidate(&digest);
            }
        }
    }

    /// Remembers a new device's owner, so the first ingest does not miss.
    pub fn remember_device(&self, device: DeviceId, owner: UserId) {
        self.owners.insert(device, Some(owner));
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Shared handle.
pub type SharedAuth = Arc<Auth>;
