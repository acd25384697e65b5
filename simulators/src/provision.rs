//! Where the fleet comes from: devices created through the registry API with a user
//! key, read from a devices file, or made up (for raw broker benchmarks, where no
//! iotpipe checks credentials).

use std::path::Path;

use futures::stream::{self, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::api::{Api, ApiError};
use crate::profile::Profile;

/// Why the fleet could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("devices file {path}: {reason}")]
    File { path: String, reason: String },
}

/// A simulated device's credentials.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    pub token: String,
    #[serde(default)]
    pub name: String,
}

/// The fleet, and the user key that owns it (verification reads with it). This is
/// also the devices file format.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Fleet {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    pub devices: Vec<Device>,
}

/// Registry calls in flight at once while provisioning.
const PROVISION_CONCURRENCY: usize = 16;

impl Fleet {
    /// Creates a user with the admin token; returns its API key.
    ///
    /// # Errors
    ///
    /// Any failed API call.
    pub async fn create_user(api: &Api, admin: &str) -> Result<String, ProvisionError> {
        let name = format!("sim-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        Ok(api.create_user(admin, &name).await?)
    }

    /// Creates `count` devices for the user; device `i` gets the type of profile
    /// `i % profiles.len()`, the profile it will simulate.
    ///
    /// # Errors
    ///
    /// The first failed API call.
    pub async fn create(
        api: &Api,
        key: &str,
        count: usize,
        profiles: &[Profile],
    ) -> Result<Self, ProvisionError> {
        let devices = stream::iter(0..count)
            .map(|i| async move {
                let profile = profiles[i % profiles.len()].name();
                let name = format!("sim-{profile}-{i}");
                let d = api.create_device(key, &name, profile).await?;
                Ok::<_, ProvisionError>(Device {
                    id: d.id,
                    token: d.token,
                    name,
                })
            })
            // Ordered, so that device i keeps profile i % n.
            .buffered(PROVISION_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(Self {
            api_key: Some(key.to_owned()),
            devices,
        })
    }

    /// Devices with random ids and a dummy token, for brokers that check nothing.
    pub fn synthetic(count: usize) -> Self {
        let devices = (0..count)
            .map(|i| Device {
                id: uuid::Uuid::new_v4().to_string(),
                token: "synthetic".into(),
                name: format!("synthetic-{i}"),
            })
            .collect();
        Self {
            api_key: None,
            devices,
        }
    }

    /// # Errors
    ///
    /// An unreadable or malformed file, or one with no devices.
    pub fn load(path: &Path) -> Result<Self, ProvisionError> {
        let err = |reason: String| ProvisionError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let fleet: Fleet = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        if fleet.devices.is_empty() {
            return Err(err("no devices".into()));
        }
        Ok(fleet)
    }

    /// Writes the devices file, readable by the owner only: it holds secrets.
    ///
    /// # Errors
    ///
    /// The file cannot be written.
    pub fn save(&self, path: &Path) -> Result<(), ProvisionError> {
        let err = |reason: String| ProvisionError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = serde_json::to_string_pretty(self).map_err(|e| err(e.to_string()))?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(|e| err(e.to_string()))?;
        std::io::Write::write_all(&mut file, text.as_bytes()).map_err(|e| err(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_devices_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.json");
        let fleet = Fleet {
            api_key: Some("ipk_x".into()),
            devices: Fleet::synthetic(3).devices,
        };
        fleet.save(&path).unwrap();
        let back = Fleet::load(&path).unwrap();
        assert_eq!(back.api_key.as_deref(), Some("ipk_x"));
        assert_eq!(back.devices.len(), 3);
        assert_eq!(back.devices[2].id, fleet.devices[2].id);
        std::fs::write(&path, r#"{"devices": []}"#).unwrap();
        assert!(Fleet::load(&path).is_err());
    }
}
