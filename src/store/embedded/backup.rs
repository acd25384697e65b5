//! A consistent copy of a running embedded store (`iotpipe backup`).
//!
//! One fjall snapshot is taken first: a read view of every keyspace at one sequence
//! number, so the copy holds every batch committed before it (every acknowledged
//! event, with its index rows and rollups, since a flush is one atomic batch) and
//! none of the later ones. The copy is a new store created by [`EmbeddedStore::open`]
//! (so its keyspaces get the same options), filled keyspace by keyspace through
//! fjall's ingestion (sorted keys written straight into tables, no journal), and
//! synced. Writers never wait for it: the snapshot only keeps old versions alive.

use std::collections::BTreeMap;
use std::path::Path;

use fjall::{KeyspaceCreateOptions, PersistMode, Readable};

use super::{engine, EmbeddedStore};
use crate::store::StoreError;

/// The keyspace whose rows describe the directory itself (bucket length, layout
/// markers): copied exactly, replacing what opening the copy wrote.
const META: &str = "meta";

/// Keys per keyspace.
pub type KeyCounts = BTreeMap<String, u64>;

impl EmbeddedStore {
    /// Copies the store as of now into `target`, which must not exist or be empty;
    /// returns the keys copied per keyspace.
    ///
    /// # Errors
    ///
    /// `target` is not empty, or the engine failed.
    pub fn copy_to(&self, target: &Path) -> Result<KeyCounts, StoreError> {
        // First of all: the moment of the backup.
        let snapshot = self.inner.db.snapshot();
        if std::fs::read_dir(target).is_ok_and(|mut d| d.next().is_some()) {
            return Err(StoreError::Invalid(format!(
                "{} is not empty; a snapshot goes into a new directory",
                target.display()
            )));
        }
        let copy = EmbeddedStore::open(target, self.inner.bucket_len_ms)?;
        let mut counts = KeyCounts::new();
        for name in self.inner.db.list_keyspace_names() {
            let name: &str = &name;
            let source = self
                .inner
                .db
                .keyspace(name, KeyspaceCreateOptions::default)
                .map_err(engine)?;
            let dest = copy
                .inner
                .db
                .keyspace(name, KeyspaceCreateOptions::default)
                .map_err(engine)?;
            let mut rows = snapshot.iter(&source).peekable();
            let mut n = 0u64;
            if name == META {
                for item in dest.iter() {
                    dest.remove(item.key().map_err(engine)?).map_err(engine)?;
                }
                for item in rows {
                    let (k, v) = item.into_inner().map_err(engine)?;
                    dest.insert(k, v).map_err(engine)?;
                    n += 1;
                }
            } else if rows.peek().is_some() {
                let mut ingestion = dest.start_ingestion().map_err(engine)?;
                for item in rows {
                    let (k, v) = item.into_inner().map_err(engine)?;
                    ingestion.write(k, v).map_err(engine)?;
                    n += 1;
                }
                ingestion.finish().map_err(engine)?;
            }
            counts.insert(name.to_owned(), n);
        }
        copy.inner
            .db
            .persist(PersistMode::SyncAll)
            .map_err(engine)?;
        Ok(counts)
    }

    /// The keys of every keyspace, counted (to verify a restored copy).
    ///
    /// # Errors
    ///
    /// The engine failed.
    pub fn key_counts(&self) -> Result<KeyCounts, StoreError> {
        let mut counts = KeyCounts::new();
        for name in self.inner.db.list_keyspace_names() {
            let keyspace = self
                .inner
                .db
                .keyspace(&name, KeyspaceCreateOptions::default)
                .map_err(engine)?;
            counts.insert(name.to_string(), keyspace.len().map_err(engine)? as u64);
        }
        Ok(counts)
    }
}
