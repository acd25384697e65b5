//! Bearer secrets → principals, with an in-process cache in front of the registry.
//!
//! Every ingest request authenticates, so this is the hot path: a warm cache answers
//! with one SHA-256 and one map lookup. Deleting a device evicts its token and its
//! ownership entry here at once; other instances (production mode) are told through
//! a [`DeletionBroadcast`] (`registry::invalidation`; Redis pub/sub implements it),
//! whose listener calls [`Auth::forget_device`] on each of them.
//!
//! Design: an answer is fresh for `ttl`; after that the registry is asked again, but if
//! the registry is unavailable the stale answer is served (for up to `stale_for`,
//! `registry.stale_limit_secs`: minutes, not a day),
//! so that known devices keep ingesting while MySQL is down. Deletions do not depend
//! on the TTL: they are pushed to every instance.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::sync::Cache;

use super::invalidation::DeletionBroadcast;
use super::login_guard::LoginGuard;
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

/// How long the registry's "unknown" answer for a secret is trusted.
const UNKNOWN_FOR: Duration = Duration::from_secs(10);

/// Deletions waiting for the MQTT endpoint to close their connections, at most.
const REVOCATIONS: usize = 1024;

/// A cached answer and when the registry gave it.
#[derive(Debug, Clone, Copy)]
struct Cached<T> {
    value: T,
    fetched: Instant,
}

impl<T> Cached<T> {
    fn now(value: T) -> Self {
        Self {
            value,
            fetched: Instant::now(),
        }
    }
}

#[derive(Clone)]
pub struct Auth {
    registry: SharedRegistry,
    admin: [u8; 32],
    fresh_for: Duration,
    secrets: Cache<[u8; 32], Cached<Principal>>,
    owners: Cache<DeviceId, Cached<Option<UserId>>>,
    broadcast: Option<Arc<dyn DeletionBroadcast>>,
    /// Devices forgotten here (deleted on this or another instance), for whoever holds
    /// their open connections.
    revoked: tokio::sync::broadcast::Sender<DeviceId>,
    /// Slows down repeated failed logins; `None`: no limit.
    guard: Option<Arc<LoginGuard>>,
    /// Secrets the registry just said it does not know: asked again only after
    /// [`UNKNOWN_FOR`], so that a flood of guesses does not become a flood of queries.
    unknown: Cache<[u8; 32], ()>,
}

impl Auth {
    /// `ttl` bounds how long a cached answer is trusted without asking the registry;
    /// `stale_for`, how long it is still served while the registry cannot be asked.
    pub fn new(
        registry: SharedRegistry,
        admin_token: &str,
        ttl: Duration,
        stale_for: Duration,
    ) -> Self {
        let keep = ttl.max(stale_for);
        Self {
            registry,
            admin: secrets::digest(admin_token),
            fresh_for: ttl,
            secrets: Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .time_to_live(keep)
                .build(),
            owners: Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .time_to_live(keep)
                .build(),
            broadcast: None,
            revoked: tokio::sync::broadcast::channel(REVOCATIONS).0,
            guard: None,
            unknown: Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .time_to_live(UNKNOWN_FOR)
                .build(),
        }
    }

    /// Limits failed logins with `guard`.
    pub fn with_login_guard(mut self, guard: Option<LoginGuard>) -> Self {
        self.guard = guard.map(Arc::new);
        self
    }

    /// How long a login from `ip` (claiming `identity`) must wait after too many
    /// failures; `None`: go ahead.
    pub fn login_wait(&self, ip: IpAddr, identity: Option<&str>) -> Option<Duration> {
        self.guard.as_ref()?.wait(ip, identity)
    }

    /// Counts a failed login, and logs it.
    pub fn login_failed(&self, ip: IpAddr, identity: Option<&str>, source: &str) {
        tracing::warn!(%ip, identity, source, "failed login");
        if let Some(g) = &self.guard {
            g.failed(ip, identity);
        }
    }

    /// Deleted devices, as they are forgotten here. A receiver that lags behind gets
    /// `Lagged` and must assume it missed some.
    pub fn revocations(&self) -> tokio::sync::broadcast::Receiver<DeviceId> {
        self.revoked.subscribe()
    }

    /// Announces deletions to the other instances through `broadcast`.
    pub fn with_broadcast(mut self, broadcast: Arc<dyn DeletionBroadcast>) -> Self {
        self.broadcast = Some(broadcast);
        self
    }

    fn is_fresh<T>(&self, cached: &Cached<T>) -> bool {
        cached.fetched.elapsed() < self.fresh_for
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
        let cached = self.secrets.get(&digest);
        if let Some(c) = cached.filter(|c| self.is_fresh(c)) {
            return Ok(Some(c.value));
        }
        if cached.is_none() && self.unknown.contains_key(&digest) {
            return Ok(None);
        }
        let hash = hex::encode(digest);
        let asked = match SecretKind::of(secret) {
            Some(SecretKind::UserKey) => self
                .registry
                .user_by_key(&hash)
                .await
                .map(|u| u.map(Principal::User)),
            Some(SecretKind::DeviceToken) => self.registry.device_by_token(&hash).await.map(|d| {
                d.map(|d| Principal::Device {
                    id: d.id,
                    user_id: d.user_id,
                })
            }),
            Some(SecretKind::Admin) | None => Ok(None),
        };
        let found = match (asked, cached) {
            (Ok(found), _) => found,
            (Err(RegistryError::Unavailable(e)), Some(stale)) => {
                tracing::debug!(error = %e, "registry unavailable; serving a cached secret");
                return Ok(Some(stale.value));
            }
            (Err(e), _) => return Err(e),
        };
        match found {
            Some(p) => self.secrets.insert(digest, Cached::now(p)),
            None => {
                self.secrets.invalidate(&digest);
                self.unknown.insert(digest, ());
            }
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
        let cached = self.owners.get(&device);
        if let Some(c) = cached.filter(|c| self.is_fresh(c)) {
            return Ok(c.value);
        }
        let owner = match (self.registry.device(device).await, cached) {
            (Ok(d), _) => d.map(|d| d.user_id),
            (Err(RegistryError::Unavailable(e)), Some(stale)) => {
                tracing::debug!(error = %e, "registry unavailable; serving a cached owner");
                return Ok(stale.value);
            }
            (Err(e), _) => return Err(e),
        };
        self.owners.insert(device, Cached::now(owner));
        Ok(owner)
    }

    /// Forgets a deleted device on this instance: its token and its ownership.
    pub fn forget_device(&self, device: DeviceId, token_hash: &str) {
        // Remembered as absent (not merely evicted), so that a registry outage cannot
        // bring back a stale "exists" answer.
        self.owners.insert(device, Cached::now(None));
        // Nobody listening (no built-in MQTT endpoint) is fine.
        let _ = self.revoked.send(device);
        self.forget_secret(token_hash);
    }

    /// Forgets a replaced secret on this instance.
    pub fn forget_secret(&self, token_hash: &str) {
        if let Ok(bytes) = hex::decode(token_hash) {
            if let Ok(digest) = <[u8; 32]>::try_from(bytes.as_slice()) {
                self.secrets.invalidate(&digest);
            }
        }
    }

    /// Forgets a replaced secret here and tells the other instances.
    pub async fn secret_revoked(&self, token_hash: &str) {
        self.forget_secret(token_hash);
        if let Some(b) = &self.broadcast {
            b.secret_revoked(token_hash).await;
        }
    }

    /// Forgets a deleted device here and tells the other instances.
    pub async fn device_deleted(&self, device: DeviceId, token_hash: &str) {
        self.forget_device(device, token_hash);
        if let Some(b) = &self.broadcast {
            b.device_deleted(device, token_hash).await;
        }
    }

    /// Forgets everything cached. Used when deletions from other instances may have
    /// been missed (the broadcast channel was down).
    pub fn forget_all(&self) {
        self.secrets.invalidate_all();
        self.owners.invalidate_all();
    }

    /// Remembers a new device's owner, so the first ingest does not miss.
    pub fn remember_device(&self, device: DeviceId, owner: UserId) {
        self.owners.insert(device, Cached::now(Some(owner)));
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Shared handle.
pub type SharedAuth = Arc<Auth>;
