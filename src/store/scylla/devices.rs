//! The devices that have stored events: the partition keys of the `buckets` index
//! (`SELECT DISTINCT` reads one row per partition, not every bucket).

use futures::TryStreamExt;
use uuid::Uuid;

use super::errors::{corrupt, pager_error, prepare_error, row_error};
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
        self.session
            .execute_iter(statement, ())
            .await
            .map_err(pager_error)?
            .rows_stream::<(i64, Uuid)>()
            .map_err(corrupt)?
            .map_err(row_error)
            .try_collect()
            .await
    }
}
