//! Every page of a statement's answer as a stream of typed rows, its errors already
//! the store's: the one way the store reads more than a row.

use futures::stream::{MapErr, TryStreamExt};
use scylla::client::pager::TypedRowStream;
use scylla::deserialize::row::DeserializeRow;
use scylla::errors::NextRowError;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;

use super::errors::{corrupt, pager_error, row_error};
use super::rows::SummaryRow;
use super::Inner;
use crate::store::{Rollup, StoreError};

/// A row type read from a paged answer: owned, since pages are dropped as they go.
pub(super) trait Row: for<'f, 'm> DeserializeRow<'f, 'm> + 'static {}
impl<T: for<'f, 'm> DeserializeRow<'f, 'm> + 'static> Row for T {}

/// A paged answer as a stream of `T`, each row's failure a [`StoreError`]. A named
/// type, so that answers to different statements can be chosen between.
pub(super) type Rows<T> = MapErr<TypedRowStream<T>, fn(NextRowError) -> StoreError>;

impl Inner {
    /// The rows `statement` answers for `values`. The next page is fetched as the
    /// stream is read, so a large answer is never held whole unless collected.
    pub(super) async fn rows<T: Row>(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Rows<T>, StoreError> {
        Ok(self
            .session
            .execute_iter(statement.clone(), values)
            .await
            .map_err(pager_error)?
            .rows_stream::<T>()
            .map_err(corrupt)?
            .map_err(row_error as fn(NextRowError) -> StoreError))
    }

    /// The summary rows `statement` answers for `values`, as rollups.
    pub(super) async fn rollup_rows<T: Row + SummaryRow>(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<Rollup>, StoreError> {
        let rows = self.rows::<T>(statement, values).await?;
        rows.and_then(|r| futures::future::ready(r.into_rollup()))
            .try_collect()
            .await
    }

    /// All the rows `statement` answers for `values`.
    pub(super) async fn all_rows<T: Row>(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<T>, StoreError> {
        self.rows(statement, values).await?.try_collect().await
    }
}
