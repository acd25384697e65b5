//! Every user and device with their secret hashes, read out of one registry and
//! written into another (`iotpipe transfer`): nobody re-provisions a device, and ids
//! are kept, so the events' user and device ids still name their owners.
//!
//! As in `sql.rs`, the queries come as a macro over each registry's own pool; only
//! the "insert unless present" keyword differs between the engines. Inserting a row
//! that is already there (same id, a transfer run again) changes nothing.

/// A user as stored: with its API key hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub id: crate::model::UserId,
    pub username: String,
    pub email: String,
    pub api_key_hash: String,
    pub created_at_ms: i64,
}

/// A device as stored: with its token hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    pub device: super::Device,
    pub token_hash: String,
}

/// A whole registry, users and devices in id order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryDump {
    pub users: Vec<UserRow>,
    pub devices: Vec<DeviceRow>,
}

/// `dump_rows` and `load_rows` on a registry type with a `pool` field;
/// `$insert_ignore` is the engine's "insert unless the key exists".
macro_rules! dump_queries {
    ($registry:ty, $insert_ignore:literal) => {
        impl $registry {
            async fn dump_rows(
                &self,
            ) -> Result<$crate::registry::dump::RegistryDump, $crate::registry::RegistryError>
            {
                use $crate::registry::dump::{DeviceRow, RegistryDump, UserRow};
                let users: Vec<(i64, String, String, String, i64)> = sqlx::query_as(
                    "SELECT id, username, email, api_key_hash, created_at_ms FROM users ORDER BY id",
                )
                .fetch_all(&self.pool)
                .await?;
                let devices: Vec<(String, i64, String, String, i64, String)> = sqlx::query_as(
                    "SELECT id, user_id, name, type, created_at_ms, token_hash FROM devices \
                     ORDER BY id",
                )
                .fetch_all(&self.pool)
                .await?;
                let devices = devices
                    .into_iter()
                    .map(|(id, user_id, name, kind, created_at_ms, token_hash)| {
                        let device =
                            $crate::registry::sql::device_of((id, user_id, name, kind, created_at_ms))?;
                        Ok(DeviceRow { device, token_hash })
                    })
                    .collect::<Result<_, $crate::registry::RegistryError>>()?;
                Ok(RegistryDump {
                    users: users
                        .into_iter()
                        .map(|(id, username, email, api_key_hash, created_at_ms)| UserRow {
                            id,
                            username,
                            email,
                            api_key_hash,
                            created_at_ms,
                        })
                        .collect(),
                    devices,
                })
            }

            async fn load_rows(
                &self,
                dump: &$crate::registry::dump::RegistryDump,
            ) -> Result<(), $crate::registry::RegistryError> {
                // One transaction: a registry is either loaded whole or not at all.
                let mut tx = self.pool.begin().await?;
                for u in &dump.users {
                    sqlx::query(concat!(
                        $insert_ignore,
                        " INTO users (id, username, email, api_key_hash, created_at_ms) \
                         VALUES (?, ?, ?, ?, ?)"
                    ))
                    .bind(u.id)
                    .bind(&u.username)
                    .bind(&u.email)
                    .bind(&u.api_key_hash)
                    .bind(u.created_at_ms)
                    .execute(&mut *tx)
                    .await?;
                }
                for d in &dump.devices {
                    sqlx::query(concat!(
                        $insert_ignore,
                        " INTO devices (id, user_id, name, type, token_hash, created_at_ms) \
                         VALUES (?, ?, ?, ?, ?, ?)"
                    ))
                    .bind(d.device.id.to_string())
                    .bind(d.device.user_id)
                    .bind(&d.device.name)
                    .bind(&d.device.kind)
                    .bind(&d.token_hash)
                    .bind(d.device.created_at_ms)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }
        }
    };
}

pub(super) use dump_queries;
