//! Live counters and rate limits, behind the [`Live`] trait.
//!
//! The rate-limit arithmetic ([`gcra`]) is shared by every backend; a backend only
//! keeps its state (a map in process, or Redis keys).

pub mod gcra;
pub mod local;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;

use crate::model::{DeviceId, UserId};

/// Which budget a refused request exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LimitKind {
    Device,
    User,
    /// Too many failed logins from the caller's address.
    Login,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Device => "device",
            LimitKind::User => "user",
            LimitKind::Login => "login",
        }
    }
}

/// A refused admission.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limited {
    pub limit: LimitKind,
    /// How long until the budget is out of debt.
    pub retry_after_ms: f64,
}

/// New (non-duplicate) events written for one device in one flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCount {
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub new_events: u64,
    /// The latest time of receipt among them.
    pub received_ms: i64,
}

/// A device's figures recomputed from the event store (`iotpipe rebuild-live`, and
/// in-process live figures at start-up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveTotal {
    pub user_id: UserId,
    pub device_id: DeviceId,
    /// Stored events: what `events_total` counts (each new event once).
    pub events: u64,
    /// The time of its newest stored event. The store keeps no receipt time in its
    /// read API, so this stands for the last receipt; a newer one already known is
    /// kept.
    pub last_seen_ms: Option<i64>,
}

/// `GET /v1/devices/{id}/live`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct DeviceLive {
    pub events_total: u64,
    pub rejected_total: u64,
    pub events_last_minute: u64,
    pub last_seen: Option<String>,
    pub last_error: Option<String>,
}

/// `GET /v1/live`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct UserLive {
    pub events_total: u64,
    pub events_last_minute: u64,
    pub devices_active_5m: u64,
}

/// Events per second allowed; 0 means no limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    pub device_per_sec: u64,
    pub user_per_sec: u64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LiveError {
    #[error("live backend unavailable: {0}")]
    Unavailable(String),
}

/// Live counters and rate limits.
#[async_trait]
pub trait Live: Send + Sync + 'static {
    fn backend(&self) -> &'static str;

    /// Admits `events` for the device and its user if neither budget is in debt, and
    /// charges them (possibly into debt). See the contract's rate-limit accounting.
    async fn admit(
        &self,
        user: UserId,
        device: DeviceId,
        events: u64,
        now_ms: i64,
    ) -> Result<(), Limited>;

    /// Counts events written for the first time. Duplicates are never passed here.
    async fn record_ingested(&self, counts: &[DeviceCount]);

    /// Counts rejected events of a device and keeps the reason as its `last_error`.
    async fn record_rejected(&self, user: UserId, device: DeviceId, events: u64, reason: &str);

    async fn device(&self, device: DeviceId, now_ms: i64) -> DeviceLive;

    async fn user(&self, user: UserId, now_ms: i64) -> UserLive;

    async fn ping(&self) -> Result<(), LiveError>;

    /// Forgets a device whose events were purged: its figures and rate budget go,
    /// and its events leave its user's total.
    ///
    /// # Errors
    ///
    /// The backend could not be reached; the figures may then still be there.
    async fn forget_device(&self, user: UserId, device: DeviceId) -> Result<(), LiveError>;

    /// Replaces the totals of these devices, and of their users with the sum of
    /// theirs (so `totals` holds every device of each user it names), by figures
    /// recomputed from the store. Per-second counts and rejections are left alone.
    ///
    /// # Errors
    ///
    /// The backend could not be reached.
    async fn set_totals(&self, totals: &[LiveTotal]) -> Result<(), LiveError>;
}

pub type SharedLive = Arc<dyn Live>;
