//! The `[store]` settings of the wide-column store, resolved and checked.

use crate::store::retention::Retention;
use std::time::Duration;

use scylla::frame::types::Consistency;

use crate::config::StoreConfig;
use crate::store::StoreError;

/// The settings the store needs, resolved from [`StoreConfig`].
#[derive(Debug, Clone)]
pub struct ScyllaSettings {
    pub nodes: Vec<String>,
    pub keyspace: String,
    pub replication: String,
    pub consistency: Consistency,
    /// The retention tiers, bound as each row's TTL and set as the tables' default.
    pub retention: Retention,
    pub batch_max_bytes: usize,
    pub write_concurrency: usize,
    pub request_timeout: Duration,
    pub page_size: i32,
    pub local_datacenter: Option<String>,
    pub bucket_len_ms: i64,
    /// Age after which the sweep recomputes a pending minute (see `rollup.rs`).
    pub rollup_sweep_after: Duration,
    /// Pending minutes past which writes are refused as overload (see `write.rs`).
    pub rollup_backlog_max: usize,
}

impl ScyllaSettings {
    /// Resolves and checks the `[store]` settings.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] for no nodes, a keyspace name that is not a plain CQL
    /// identifier, or an unknown consistency.
    pub fn from_config(config: &StoreConfig, bucket_len_ms: i64) -> Result<Self, StoreError> {
        let nodes: Vec<String> = config
            .scylla_nodes
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        if nodes.is_empty() {
            return Err(StoreError::Invalid(
                "IOTPIPE_SCYLLA_NODES lists no node".into(),
            ));
        }
        // The keyspace is spliced into statements, so it must be a plain identifier.
        let ks = &config.keyspace;
        let ks_ok = (1..=48).contains(&ks.len())
            && ks.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && ks.as_bytes()[0].is_ascii_alphabetic();
        if !ks_ok {
            return Err(StoreError::Invalid(format!(
                "store.keyspace = {ks:?}: expected 1 to 48 letters, digits or _, starting with a letter"
            )));
        }
        Ok(Self {
            nodes,
            keyspace: ks.to_ascii_lowercase(),
            replication: config.replication.clone(),
            consistency: parse_consistency(&config.consistency)?,
            // The caller sets the tiers: they are not `[store]` settings.
            retention: Retention::default(),
            batch_max_bytes: config.batch_max_bytes,
            write_concurrency: config.write_concurrency,
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            page_size: config.page_size.max(1),
            local_datacenter: config.local_datacenter.clone(),
            bucket_len_ms,
            rollup_sweep_after: Duration::from_secs(config.rollup_sweep_after_secs),
            rollup_backlog_max: config.rollup_backlog_max.max(1),
        })
    }
}

/// Parses a consistency level name, such as `LOCAL_QUORUM`.
///
/// # Errors
///
/// [`StoreError::Invalid`] for an unknown name.
pub fn parse_consistency(name: &str) -> Result<Consistency, StoreError> {
    Ok(match name.to_ascii_uppercase().as_str() {
        "ANY" => Consistency::Any,
        "ONE" => Consistency::One,
        "TWO" => Consistency::Two,
        "THREE" => Consistency::Three,
        "QUORUM" => Consistency::Quorum,
        "ALL" => Consistency::All,
        "LOCAL_QUORUM" => Consistency::LocalQuorum,
        "EACH_QUORUM" => Consistency::EachQuorum,
        "LOCAL_ONE" => Consistency::LocalOne,
        other => {
            return Err(StoreError::Invalid(format!(
                "store.consistency = {other:?} is not a consistency level"
            )))
        }
    })
}
