//! The devices that have stored events: the partition keys of the `buckets` index
//! (`SELECT DISTINCT` reads one row per partition, not every bucket).

use super::errors::prepare_error;
use super::Inner;
use crate::model::{DeviceId, UserId};
use crate::store::StoreError;

impl Inner {
    pub(super) async fn stored_devices(&self) -> Result<Vec<(UserId, DeviceId)>, StoreError> {
        let ks = &self.settings.keyspace;
        let mut statement = self
            .session
            .prepare(format!(
                "SELECT DISTINCT user_id, device_id FROM {ks}.buckets"
            ))
            .await
            .map_err(prepare_error)?;
        statement.set_is_idempotent(true);
        statement.set_page_size(self.settings.page_size);
        self.all_rows(&statement, ()).await
    }
}
