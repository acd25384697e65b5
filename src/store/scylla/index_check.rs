//! `iotpipe check`'s look at the duplicate index (`event_ids`): each row names a
//! device, an event id and a ts, which give the event's primary key once the device's
//! user is known (from the `buckets` index). A row whose event is not stored makes a
//! later event with that id look like a duplicate, and be dropped. The table is read
//! whole (a token-range scan, paged), so this is for maintenance windows.

use std::collections::HashMap;

use futures::stream::TryStreamExt;
use scylla::value::CqlTimestamp;
use uuid::Uuid;

use super::errors::{corrupt, exec_error, prepare_error};
use super::rows::ms;
use super::Inner;
use crate::model::bucket_start;
use crate::store::{IndexReport, StoreError, MAX_EXAMPLES};

/// Lookups in flight at once.
const FANOUT: usize = 32;

impl Inner {
    pub(super) async fn check_index(&self, repair: bool) -> Result<IndexReport, StoreError> {
        let users: HashMap<Uuid, i64> = self
            .stored_devices()
            .await?
            .into_iter()
            .map(|(user, device)| (device, user))
            .collect();
        let ks = &self.settings.keyspace;
        let prepare = |cql: String| async move {
            let mut s = self.session.prepare(cql).await.map_err(prepare_error)?;
            s.set_is_idempotent(true);
            s.set_page_size(self.settings.page_size);
            Ok::<_, StoreError>(s)
        };
        let scan = prepare(format!(
            "SELECT device_id, event_id, ts FROM {ks}.event_ids"
        ))
        .await?;
        let delete = prepare(format!(
            "DELETE FROM {ks}.event_ids WHERE device_id = ? AND event_id = ?"
        ))
        .await?;
        let (users, delete) = (&users, &delete);
        let bucket_len = self.settings.bucket_len_ms;
        let rows = self.rows::<(Uuid, Uuid, CqlTimestamp)>(&scan, ()).await?;
        // Folded as the rows arrive: the table has a row per event of a device that
        // chose its ids, too many to hold.
        rows.map_ok(|(device, id, ts)| async move {
            let Some(&user) = users.get(&device) else {
                return Ok((device, id, false));
            };
            let key = (user, device, ms(bucket_start(ts.0, bucket_len)), ts, id);
            let _p = self.permit().await;
            let found = self
                .session
                .execute_unpaged(&self.cql.select_event_key, key)
                .await
                .map_err(exec_error)?
                .into_rows_result()
                .map_err(corrupt)?
                .rows_num()
                > 0;
            Ok((device, id, found))
        })
        .try_buffer_unordered(FANOUT)
        .try_fold(
            IndexReport::default(),
            |mut report, (device, id, found)| async move {
                report.rows += 1;
                if !found {
                    report.orphans += 1;
                    if report.examples.len() < MAX_EXAMPLES {
                        report.examples.push(format!("{device}/{id}"));
                    }
                    if repair {
                        self.session
                            .execute_unpaged(delete, (device, id))
                            .await
                            .map_err(exec_error)?;
                    }
                }
                Ok(report)
            },
        )
        .await
    }
}
