//! The CQL schema (`cql/schema.cql`): filling it in, applying it, and the facts a
//! keyspace records about itself.

use scylla::client::session::Session;

use super::errors::{corrupt, exec_error, prepare_error};
use super::rows::{MetaIn, MetaKeyIn, MetaOut};
use super::statements::Cql;
use super::ScyllaSettings;
use crate::store::retention::Tier;
use crate::store::{Level, StoreError};

/// The schema, with `{keyspace}`, `{replication}` and the tiers' TTLs to fill in.
pub const SCHEMA: &str = include_str!("../../../cql/schema.cql");

pub(super) const BUCKET_META: &str = "bucket_len_ms";

/// The schema statements for `settings`, in order.
pub fn schema_statements(settings: &ScyllaSettings) -> Vec<String> {
    let filled = SCHEMA
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("{keyspace}", &settings.keyspace)
        .replace("{replication}", &settings.replication)
        .replace("{raw_ttl}", &table_ttl(settings, Tier::Raw))
        .replace(
            "{minute_ttl}",
            &table_ttl(settings, Tier::Rollup(Level::Minute)),
        )
        .replace(
            "{hour_ttl}",
            &table_ttl(settings, Tier::Rollup(Level::Hour)),
        );
    filled
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A tier's keep period as a table's `default_time_to_live`, in seconds (0: forever).
fn table_ttl(settings: &ScyllaSettings, tier: Tier) -> String {
    let secs = settings
        .retention
        .keep_ms(tier)
        .map_or(0, |ms| (ms + 999) / 1000);
    secs.to_string()
}

/// The tables whose default TTL is a tier, set to the current tiers.
pub(super) fn tier_ttl_statements(settings: &ScyllaSettings) -> Vec<String> {
    let ks = &settings.keyspace;
    [
        ("events", Tier::Raw),
        ("event_ids", Tier::Raw),
        ("buckets", Tier::Raw),
        ("rollups", Tier::Rollup(Level::Minute)),
        ("rollups_coarse", Tier::Rollup(Level::Hour)),
        ("fleet_by_type", Tier::Rollup(Level::Hour)),
    ]
    .into_iter()
    .map(|(table, tier)| {
        let ttl = table_ttl(settings, tier);
        format!("ALTER TABLE {ks}.{table} WITH default_time_to_live = {ttl}")
    })
    .collect()
}

/// Checks (and with `record`, records) the bucket length of the keyspace.
pub(super) async fn check_bucket_len(
    session: &Session,
    settings: &ScyllaSettings,
    record: bool,
) -> Result<(), StoreError> {
    let ks = &settings.keyspace;
    let stored = meta_value(session, ks, BUCKET_META).await?;
    match stored {
        Some(stored) if stored != settings.bucket_len_ms => Err(StoreError::Invalid(format!(
            "keyspace {ks} was created with a bucket of {stored} ms, not {} ms; set the bucket \
             back or use a new keyspace",
            settings.bucket_len_ms
        ))),
        Some(_) => Ok(()),
        None if record => set_meta(session, ks, BUCKET_META, settings.bucket_len_ms).await,
        None => Err(StoreError::Invalid(format!(
            "keyspace {ks} has no recorded bucket length; run `iotpipe migrate`"
        ))),
    }
}

/// Recorded by `iotpipe migrate` in keyspaces whose hour and day rollups are complete.
pub(super) const LEVELS_META: &str = "rollup_levels";

/// One value of the keyspace's `meta` table. A keyspace without the table has not
/// been migrated, and the error says so.
async fn meta_value(session: &Session, ks: &str, name: &str) -> Result<Option<i64>, StoreError> {
    let select =
        session
            .prepare(Cql::select_meta(ks))
            .await
            .map_err(|e| match prepare_error(e) {
                StoreError::Invalid(m) => StoreError::Invalid(format!(
                    "{m}; has `iotpipe migrate` been run for keyspace {ks}?"
                )),
                other => other,
            })?;
    Ok(session
        .execute_unpaged(&select, MetaKeyIn { name })
        .await
        .map_err(exec_error)?
        .into_rows_result()
        .map_err(corrupt)?
        .maybe_first_row::<MetaOut>()
        .map_err(corrupt)?
        .map(|m| m.value))
}

/// Checks that the keyspace keeps hour and day rollups. With `record` (`migrate`), a
/// keyspace without minute rollups yet is marked as keeping them; one made by an
/// earlier version that already holds minute rollups is refused rather than served
/// with hours and days missing: its events must be moved to a new keyspace.
pub(super) async fn check_levels(
    session: &Session,
    settings: &ScyllaSettings,
    record: bool,
) -> Result<(), StoreError> {
    let ks = &settings.keyspace;
    if meta_value(session, ks, LEVELS_META).await?.is_some() {
        return Ok(());
    }
    let refused = |why: &str| {
        Err(StoreError::Invalid(format!(
            "keyspace {ks} {why}; it predates hour and day rollups: write to a new keyspace"
        )))
    };
    if !record {
        return refused("was not migrated by this version (run `iotpipe migrate`)");
    }
    let any = session
        .query_unpaged(format!("SELECT minute FROM {ks}.rollups LIMIT 1"), ())
        .await
        .map_err(exec_error)?
        .into_rows_result()
        .map_err(corrupt)?
        .rows_num();
    if any > 0 {
        return refused("holds minute rollups without their hours and days");
    }
    set_meta(session, ks, LEVELS_META, 1).await
}

/// Recorded once `fleet_by_type` is complete. (Keyspaces whose fleet rows were built
/// in the older `fleet_counts` or `fleet_series` tables record `fleet_rows` or
/// `fleet_series`, and are built again.)
pub(super) const FLEET_META: &str = "fleet_by_type";

/// Refuses a keyspace whose fleet rows are not complete; `iotpipe migrate` (`record`)
/// builds them first (`fleet::build`).
pub(super) async fn check_fleet(
    session: &Session,
    settings: &ScyllaSettings,
    record: bool,
) -> Result<(), StoreError> {
    let ks = &settings.keyspace;
    if meta_value(session, ks, FLEET_META).await?.is_some() {
        return Ok(());
    }
    if !record {
        return Err(StoreError::Invalid(format!(
            "keyspace {ks} has no fleet rows yet; run `iotpipe migrate`"
        )));
    }
    super::fleet::build(session, settings).await?;
    set_meta(session, ks, FLEET_META, 1).await
}

async fn set_meta(session: &Session, ks: &str, name: &str, value: i64) -> Result<(), StoreError> {
    let insert = session
        .prepare(Cql::insert_meta(ks))
        .await
        .map_err(prepare_error)?;
    session
        .execute_unpaged(&insert, MetaIn { name, value })
        .await
        .map_err(exec_error)?;
    Ok(())
}

/// Whether `cql` (an unpaged query, such as a lookup in `system_schema`) answers any
/// row.
pub(super) async fn answers_rows(
    session: &Session,
    cql: &str,
    values: impl scylla::serialize::row::SerializeRow,
) -> Result<bool, StoreError> {
    let rows = session
        .query_unpaged(cql, values)
        .await
        .map_err(exec_error)?
        .into_rows_result()
        .map_err(corrupt)?;
    Ok(rows.rows_num() > 0)
}

/// Adds the columns that tables made by earlier versions lack (`CREATE TABLE IF NOT
/// EXISTS` leaves an existing table as it is): the sketch of `rollups`.
pub(super) async fn add_missing_columns(
    session: &Session,
    settings: &ScyllaSettings,
) -> Result<(), StoreError> {
    let ks = &settings.keyspace;
    for (table, column, kind) in [("rollups", "sketch", "blob")] {
        let present = answers_rows(
            session,
            "SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? \
             AND table_name = ? AND column_name = ?",
            (ks.as_str(), table, column),
        )
        .await?;
        if !present {
            session
                .query_unpaged(format!("ALTER TABLE {ks}.{table} ADD {column} {kind}"), ())
                .await
                .map_err(exec_error)?;
        }
    }
    Ok(())
}
