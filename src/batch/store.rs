//! Where submitted batches are remembered, so a restarted process can
//! collect them ([`Batch::resume`](super::Batch::resume)).
//!
//! A [`Record`] is written when a batch's input file is uploaded (before
//! the batch is created, so a crash in between loses nothing: resume finds
//! or creates the batch), updated with the batch id once it is created,
//! and removed once every line was handed to a caller. [`FileStore`] (the
//! default) keeps them in one JSON file, rewritten atomically (a temporary
//! file, `fsync`, rename); [`RedisStore`] (features `batch` + `redis`)
//! keeps them in one Redis hash, for processes without a durable disk.
//! Implement [`BatchStore`] for anything else.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::BoxError;

/// A boxed future, as [`BatchStore`] methods return.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'a>>;

/// One submitted batch: enough to collect it after a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Record {
    /// The uploaded input file: the record's key.
    pub input_file_id: String,
    /// The batch, once created.
    pub batch_id: Option<String>,
    /// The batch endpoint (`/v1/chat/completions`, `/v1/embeddings`,
    /// `/v1/chat/ds-test`).
    pub endpoint: String,
    /// The one model of the file.
    pub model: String,
    /// The `custom_id` of every line, in file order.
    pub custom_ids: Vec<String>,
    /// When the file was uploaded, in seconds since the Unix epoch.
    pub submitted_at: u64,
}

/// Remembers submitted batches. Methods may be called concurrently; each
/// must be atomic on its own (a reader never sees half a record).
pub trait BatchStore: Send + Sync + 'static {
    /// Every record stored.
    fn load(&self) -> StoreFuture<'_, Vec<Record>>;
    /// Inserts or replaces the record of `record.input_file_id`.
    fn save<'a>(&'a self, record: &'a Record) -> StoreFuture<'a, ()>;
    /// Removes the record of `input_file_id` (absent is fine).
    fn remove<'a>(&'a self, input_file_id: &'a str) -> StoreFuture<'a, ()>;
}

/// Records in one local JSON file: `{"version":1,"batches":[..]}`.
///
/// The file is read on first use (a missing file is an empty store; a file
/// that is not a store is an error, never overwritten) and rewritten on
/// each change: written to `<path>.tmp`, synced, renamed over `<path>`, so
/// a crash leaves either the old or the new file. One process (one
/// [`Batch`](super::Batch) service and its clones) per file.
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_qwen::BoxError> {
/// use tower_qwen::batch::{BatchStore, FileStore};
///
/// let path = std::env::temp_dir().join(format!("tq-doc-{}.json", std::process::id()));
/// let store = FileStore::new(&path);
/// assert!(store.load().await?.is_empty());
/// # let _ = std::fs::remove_file(&path);
/// # Ok(()) }
/// ```
pub struct FileStore {
    path: PathBuf,
    records: tokio::sync::Mutex<Option<BTreeMap<String, Record>>>,
}

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    batches: Vec<Record>,
}

/// The default store's file, relative to the working directory.
pub const DEFAULT_STORE_PATH: &str = "tower-qwen-batches.json";

impl FileStore {
    /// A store in the file at `path` (created on the first write, with its
    /// parent directories).
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
            records: tokio::sync::Mutex::new(None),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn read(&self) -> Result<BTreeMap<String, Record>, BoxError> {
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(e.into()),
        };
        let file: FileFormat = serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a batch store: {e}", self.path.display()),
            )
        })?;
        if file.version != 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} has batch store version {}, expected 1",
                    self.path.display(),
                    file.version
                ),
            )
            .into());
        }
        Ok(file
            .batches
            .into_iter()
            .map(|r| (r.input_file_id.clone(), r))
            .collect())
    }

    async fn write(&self, records: &BTreeMap<String, Record>) -> Result<(), BoxError> {
        let file = FileFormat {
            version: 1,
            batches: records.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec(&file)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await?;
        }
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            use tokio::io::AsyncWriteExt;
            let mut f = tokio::fs::File::create(&tmp).await?;
            f.write_all(&bytes).await?;
            f.sync_all().await?;
        }
        tokio::fs::rename(&tmp, &self.path).await?;
        Ok(())
    }

    /// Applies `change` to the records and writes them.
    async fn update(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, Record>) -> bool,
    ) -> Result<(), BoxError> {
        let mut guard = self.records.lock().await;
        if guard.is_none() {
            *guard = Some(self.read().await?);
        }
        let records = guard.as_mut().expect("loaded above");
        if change(records) {
            self.write(records).await?;
        }
        Ok(())
    }
}

impl fmt::Debug for FileStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl BatchStore for FileStore {
    fn load(&self) -> StoreFuture<'_, Vec<Record>> {
        Box::pin(async move {
            let mut guard = self.records.lock().await;
            if guard.is_none() {
                *guard = Some(self.read().await?);
            }
            Ok(guard
                .as_ref()
                .map(|r| r.values().cloned().collect())
                .unwrap_or_default())
        })
    }

    fn save<'a>(&'a self, record: &'a Record) -> StoreFuture<'a, ()> {
        Box::pin(self.update(move |r| {
            r.insert(record.input_file_id.clone(), record.clone());
            true
        }))
    }

    fn remove<'a>(&'a self, input_file_id: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(self.update(move |r| r.remove(input_file_id).is_some()))
    }
}

/// Records in one Redis hash (field: the input file id, value: the record
/// as JSON), through the `redis` crate's tokio [`ConnectionManager`]
/// (which reconnects on its own).
///
/// Several processes may share a Redis; give each its own hash key, since
/// each collects every batch in its store on
/// [`resume`](super::Batch::resume).
///
/// [`ConnectionManager`]: ::redis::aio::ConnectionManager
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[derive(Clone)]
pub struct RedisStore {
    conn: ::redis::aio::ConnectionManager,
    key: String,
}

#[cfg(feature = "redis")]
impl RedisStore {
    /// The default hash key.
    pub const DEFAULT_KEY: &'static str = "tower-qwen:batches";

    /// A store in the hash `key` (e.g. [`RedisStore::DEFAULT_KEY`]).
    pub fn new(conn: ::redis::aio::ConnectionManager, key: impl Into<String>) -> Self {
        Self {
            conn,
            key: key.into(),
        }
    }
}

#[cfg(feature = "redis")]
impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "redis")]
impl BatchStore for RedisStore {
    fn load(&self) -> StoreFuture<'_, Vec<Record>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let all: Vec<(String, String)> = ::redis::cmd("HGETALL")
                .arg(&self.key)
                .query_async(&mut conn)
                .await?;
            all.into_iter()
                .map(|(field, value)| {
                    serde_json::from_str::<Record>(&value).map_err(|e| {
                        BoxError::from(format!(
                            "batch store {} field {field} is not a record: {e}",
                            self.key
                        ))
                    })
                })
                .collect()
        })
    }

    fn save<'a>(&'a self, record: &'a Record) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let value = serde_json::to_string(record)?;
            let _: i64 = ::redis::cmd("HSET")
                .arg(&self.key)
                .arg(&record.input_file_id)
                .arg(value)
                .query_async(&mut conn)
                .await?;
            Ok(())
        })
    }

    fn remove<'a>(&'a self, input_file_id: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let _: i64 = ::redis::cmd("HDEL")
                .arg(&self.key)
                .arg(input_file_id)
                .query_async(&mut conn)
                .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> Record {
        Record {
            input_file_id: id.into(),
            batch_id: None,
            endpoint: "/v1/chat/completions".into(),
            model: "qwen-plus".into(),
            custom_ids: vec!["a".into(), "b".into()],
            submitted_at: 1,
        }
    }

    #[tokio::test]
    async fn file_store_round_trips_and_survives_a_new_instance() {
        let dir = std::env::temp_dir().join(format!("tq-store-{}", std::process::id()));
        let path = dir.join("sub").join("batches.json");
        let _ = std::fs::remove_dir_all(&dir);
        let store = FileStore::new(&path);
        store.save(&record("f1")).await.unwrap();
        store.save(&record("f2")).await.unwrap();
        let mut r = record("f1");
        r.batch_id = Some("batch_1".into());
        store.save(&r).await.unwrap();
        store.remove("f2").await.unwrap();
        store.remove("absent").await.unwrap();
        // A new store (a restarted process) reads what the first wrote.
        let again = FileStore::new(&path);
        assert_eq!(again.load().await.unwrap(), vec![r.clone()]);
        // Its first write keeps the records already in the file.
        again.save(&record("f3")).await.unwrap();
        let third = FileStore::new(&path);
        assert_eq!(third.load().await.unwrap().len(), 2);
        assert!(!dir.join("sub").join("batches.json.tmp").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_store_is_an_error_and_is_left_alone() {
        let path = std::env::temp_dir().join(format!("tq-store-bad-{}.json", std::process::id()));
        std::fs::write(&path, b"hello").unwrap();
        let store = FileStore::new(&path);
        assert!(store.load().await.is_err());
        assert!(store.save(&record("f1")).await.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        let _ = std::fs::remove_file(&path);
    }
}
