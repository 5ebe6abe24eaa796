//! The embedded SQLite backend of Triage's event store: the default, with
//! nothing to install (`sqlite://PATH`).
//!
//! [`SqliteEventStore`] implements the port [`triage_event_store::EventStore`]
//! and passes its conformance suite, with group commit on and off.
//!
//! # Main decision: one writer thread with group commit
//! SQLite admits one writer at a time, and with `synchronous=FULL` every
//! commit costs an fsync. So one `std::thread` owns the only write
//! connection; appends from every task queue up on a channel, and the thread
//! takes everything queued (up to [`SqliteOptions::max_batch`]) into one
//! `BEGIN IMMEDIATE` transaction: one fsync for the whole batch. Each append
//! is checked against the state left by the appends before it in the batch
//! and runs in its own savepoint, so a conflicting append is rolled back
//! alone and the others commit. Callers hear back (over a
//! `tokio::sync::oneshot`) only after `COMMIT`, so an acknowledged append is
//! on disk. With [`SqliteOptions::group_commit`] off, each append gets its own
//! transaction: the benchmark's peer.
//!
//! Because one connection commits at a time, positions (rowids) are assigned
//! in commit order, and a subscriber reading forward from its last position
//! never skips an event; the PostgreSQL gap cannot happen here.
//!
//! # Layout
//! - `options`: [`SqliteOptions`] and [`Synchronous`].
//! - `schema`: the file format (`application_id`, `user_version`, the
//!   `events` table) and opening safety: a file that is not a Triage store,
//!   is damaged or is newer is refused as [`Error::Incompatible`] after a
//!   read-only look, and is never modified.
//! - `writer`: the writer thread and group commit.
//! - `checkpoint`: a second thread that copies the WAL back into the main
//!   file (`PASSIVE` checkpoints), so that commits never wait for it.
//! - `reader`: the pool of read-only connections and the read queries, run
//!   in `spawn_blocking`.
//!
//! # Reading a file one may not write
//! [`SqliteEventStore::open_read_only`] opens a store with readers only (no
//! writer thread, no checkpointer), for analysts' commands on a file they
//! may not write: a store at rest is read with SQLite's `immutable` flag,
//! one that a writer has open through ordinary read-only connections.
//!
//! # Durability
//! WAL mode with `synchronous=FULL` by default: an acknowledged append
//! survives power loss. [`Synchronous::Normal`] trades the last commits
//! before a power loss (not a process crash) for speed.
//!
//! # Limits
//! One process should own a store file at a time. Another process appending
//! to the same file stays correct (every batch re-reads revisions under
//! SQLite's write lock); this process's live subscriptions wake at once on
//! its own commits, and find another process's within
//! [`OTHER_PROCESSES_POLL`] (`triage events --follow` beside a writer).
//!
//! Dependency: `rusqlite` with SQLite bundled, so that the embedded default
//! needs no system library and every build runs the same SQLite version.

/// How often a caught-up subscription reads again for appends of other
/// processes, which do not wake it.
pub const OTHER_PROCESSES_POLL: std::time::Duration = std::time::Duration::from_millis(250);

mod checkpoint;
mod options;
mod reader;
mod schema;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use async_trait::async_trait;
use tokio::sync::{oneshot, watch};
use triage_event_store::{
    AppendResult, Error, EventData, EventStore, ExpectedRevision, Position, ReadAll, ReadStream, RecordedEvent, Result,
    StreamName, SubscribeToAll, Subscription, validate_append,
};

pub use options::{SqliteOptions, Synchronous};

use reader::Readers;
use writer::{AppendRequest, Counters, Writer};

/// Whether SQLite failed because the file cannot be opened or written at
/// all (permissions, a read-only file or file system, a moved file), which
/// retrying does not change. Not the passing kinds of "read-only" (another
/// connection recovering the WAL, a lock not got). "Cannot open" counts
/// only `at_open` (a missing directory): later it is more likely a passing
/// lack of file descriptors for a journal.
fn is_refusal(error: &rusqlite::Error, at_open: bool) -> bool {
    let rusqlite::Error::SqliteFailure(failure, _) = error else {
        return false;
    };
    match failure.code {
        rusqlite::ErrorCode::PermissionDenied => true,
        rusqlite::ErrorCode::ReadOnly => [
            rusqlite::ffi::SQLITE_READONLY,
            rusqlite::ffi::SQLITE_READONLY_DBMOVED,
            rusqlite::ffi::SQLITE_READONLY_DIRECTORY,
        ]
        .contains(&failure.extended_code),
        rusqlite::ErrorCode::CannotOpen => at_open,
        _ => false,
    }
}

/// Whether SQLite found the file damaged (a malformed page, or not a
/// database where one was): retrying meets the same damage.
fn is_damage(error: &rusqlite::Error) -> bool {
    matches!(
        error,
        rusqlite::Error::SqliteFailure(failure, _)
            if matches!(failure.code, rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// What to do about a damaged store file.
fn damage_message(path: &Path, what: &str) -> String {
    format!(
        "{what}: the event store file {path} is damaged; stop the processes that use it, keep a copy, and restore \
         it from a backup (`sqlite3 {path:?} 'PRAGMA integrity_check'` shows the damage)",
        path = path.display().to_string()
    )
}

/// An event store in one SQLite file.
///
/// Dropping it stops the writer thread after the batch in flight, closes every
/// connection (checkpointing the WAL into the main file) and, for
/// [`SqliteEventStore::open_temporary`], deletes the temporary directory.
/// Dropping waits for the writer thread, so it may block for one commit.
pub struct SqliteEventStore {
    path: PathBuf,
    options: SqliteOptions,
    /// `None` once the store is being dropped.
    requests: Option<mpsc::Sender<AppendRequest>>,
    writer: Option<JoinHandle<()>>,
    readers: Arc<Readers>,
    head: Arc<watch::Sender<Option<Position>>>,
    counters: Arc<Counters>,
    /// Declared last so that it is dropped after every connection closed.
    temp_dir: Option<tempfile::TempDir>,
}

/// What the writer thread has done so far; see [`SqliteEventStore::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SqliteStats {
    /// Appends handed to the writer thread.
    pub appends_submitted: u64,
    /// Appends the writer thread has answered, successfully or not.
    pub appends_answered: u64,
    /// Write transactions committed. With group commit this is one per
    /// batch, so it stays below `appends_answered` under concurrency.
    pub transactions: u64,
    /// Events written.
    pub events_written: u64,
    /// The most appends committed in one transaction.
    pub largest_batch: u64,
    /// Batches run twice: their optimistic run met an insert that failed
    /// (an event id stored already) and was rolled back, and the batch
    /// was run again with a lookup and a savepoint per append.
    pub careful_reruns: u64,
    /// Read connections open and waiting in the pool; never more than
    /// [`SqliteOptions::max_readers`].
    pub idle_read_connections: usize,
}

impl SqliteEventStore {
    /// Opens the store at `path`, creating and initializing the file if it
    /// does not exist or is empty.
    ///
    /// Errors: [`Error::Incompatible`] when the file is not a Triage store,
    /// is damaged or was written by a newer Triage; the file is then left
    /// byte-for-byte unchanged. [`Error::Backend`] when it cannot be opened
    /// (missing directory, permissions, locked).
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self> {
        Self::open_at(path.as_ref().to_path_buf(), options, None)
    }

    /// Opens a fresh store in a new temporary directory, deleted when the
    /// store is dropped. For tests and demos.
    pub fn open_temporary() -> Result<Self> {
        Self::open_temporary_with(SqliteOptions::default())
    }

    /// [`SqliteEventStore::open_temporary`] with options.
    pub fn open_temporary_with(options: SqliteOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("triage-sqlite-")
            .tempdir()
            .map_err(|error| Error::backend("cannot create a temporary directory", error))?;
        let path = dir.path().join("triage.db");
        Self::open_at(path, options, Some(dir))
    }

    /// Opens an existing store for reading only: for an analyst who may
    /// read the file but not write it or its directory (a copy handed out,
    /// a store owned by another account). Nothing is written: there is no
    /// write connection and no checkpointer, and appends fail with
    /// [`Error::Refused`].
    ///
    /// A store at rest (no `-wal` file: no process has it open) is read
    /// with SQLite's `immutable` flag, which takes no locks and creates no
    /// `-wal`/`-shm` files; that assumes nobody writes the file meanwhile,
    /// so each query looks for a `-wal` file first and, once one appears (a
    /// writer opened the store), reads through SQLite's ordinary read-only
    /// connections, which see the writer's commits.
    ///
    /// Errors: [`Error::Backend`] when there is no file; otherwise as
    /// [`SqliteEventStore::open`], which checks the same way that the file
    /// is a Triage store this build can read.
    pub fn open_read_only(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        schema::inspect_existing(&path)?;
        let readers = Arc::new(Readers::read_only_store(path.clone(), options.clone()));
        let store = SqliteEventStore {
            readers,
            path,
            options,
            requests: None,
            writer: None,
            head: Arc::new(watch::Sender::new(None)),
            counters: Arc::new(Counters::default()),
            temp_dir: None,
        };
        tracing::debug!(path = %store.path.display(), "opened SQLite event store read-only");
        Ok(store)
    }

    /// Whether `error`, from [`SqliteEventStore::open`], says that the file
    /// or its directory cannot be written by this process (permissions, a
    /// read-only file system): then [`SqliteEventStore::open_read_only`]
    /// may still read it.
    pub fn is_not_writable(error: &Error) -> bool {
        match error {
            Error::Refused {
                source: Some(source), ..
            } => source
                .downcast_ref::<rusqlite::Error>()
                .is_some_and(|error| is_refusal(error, true)),
            _ => false,
        }
    }

    /// Whether this store was opened with [`SqliteEventStore::open_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.readers.serves_a_read_only_store()
    }

    fn open_at(path: PathBuf, options: SqliteOptions, temp_dir: Option<tempfile::TempDir>) -> Result<Self> {
        let conn = schema::open_writer(&path, &options)?;
        let head = schema::head_position(&conn)
            .map_err(|error| Error::backend(format!("cannot read the head of {}", path.display()), error))?
            .map(|position| Position::from_sequence(position as u64));
        let head = Arc::new(watch::Sender::new(head));
        let counters = Arc::new(Counters::default());
        let checkpointer = checkpoint::Checkpointer::start(&path, &options)
            .map_err(|error| Error::backend(format!("cannot start the checkpointer of {}", path.display()), error))?;
        let writer = Writer {
            conn,
            checkpointer,
            events_since_checkpoint: 0,
            batch_limit: options.batch_limit(),
            head: Arc::clone(&head),
            counters: Arc::clone(&counters),
            streams: Default::default(),
        };
        let (requests, receiver) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("triage-sqlite-writer".to_owned())
            .spawn(move || writer.run(receiver))
            .map_err(|error| Error::backend("cannot start the SQLite writer thread", error))?;
        tracing::debug!(path = %path.display(), ?options, "opened SQLite event store");
        Ok(SqliteEventStore {
            readers: Arc::new(Readers::new(path.clone(), options.clone())),
            path,
            options,
            requests: Some(requests),
            writer: Some(writer),
            head,
            counters,
            temp_dir,
        })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &SqliteOptions {
        &self.options
    }

    /// A snapshot of the writer's counters.
    pub fn stats(&self) -> SqliteStats {
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        SqliteStats {
            appends_submitted: load(&self.counters.submitted),
            appends_answered: load(&self.counters.answered),
            transactions: load(&self.counters.transactions),
            events_written: load(&self.counters.events_written),
            largest_batch: load(&self.counters.largest_batch),
            careful_reruns: load(&self.counters.careful_reruns),
            idle_read_connections: self.readers.idle_count(),
        }
    }
}

impl Drop for SqliteEventStore {
    fn drop(&mut self) {
        // Readers first, so that the writer's connection is the last one
        // open: closing it checkpoints the WAL and removes the -wal file.
        self.readers.close_idle();
        drop(self.requests.take());
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "the SQLite writer thread panicked");
        }
    }
}

impl fmt::Debug for SqliteEventStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteEventStore")
            .field("path", &self.path)
            .field("options", &self.options)
            .field("temporary", &self.temp_dir.is_some())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl EventStore for SqliteEventStore {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedRevision,
        events: Vec<EventData>,
    ) -> Result<AppendResult> {
        validate_append(stream, &events)?;
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest {
            stream: stream.clone(),
            expected,
            events,
            reply,
        };
        if self.readers.serves_a_read_only_store() {
            return Err(Error::Refused {
                message: format!("the event store {} was opened read-only", self.path.display()),
                source: None,
            });
        }
        // Sent before the first await: appends polled in some order reach
        // the writer in that order.
        let requests = self.requests.as_ref().ok_or(Error::Closed)?;
        requests.send(request).map_err(|_| Error::Closed)?;
        self.counters.submitted.fetch_add(1, Ordering::Relaxed);
        answer.await.map_err(|_| Error::Closed)?
    }

    async fn read_stream(&self, stream: &StreamName, options: ReadStream) -> Result<Vec<RecordedEvent>> {
        let stream = stream.clone();
        self.readers
            .run("reading a stream", move |conn| {
                reader::read_stream(conn, &stream, options)
            })
            .await
    }

    async fn read_all(&self, options: ReadAll) -> Result<Vec<RecordedEvent>> {
        self.readers
            .run("reading $all", move |conn| reader::read_all(conn, options))
            .await
    }

    async fn head_position(&self) -> Result<Option<Position>> {
        self.readers
            .run("reading the head position", reader::head_position)
            .await
    }

    async fn read_event(&self, event_id: uuid::Uuid) -> Result<Option<RecordedEvent>> {
        self.readers
            .run("reading an event by id", move |conn| reader::read_event(conn, event_id))
            .await
    }

    fn subscribe_to_all(self: Arc<Self>, options: SubscribeToAll) -> Subscription {
        let head = self.head.subscribe();
        // `head` hears of this process's commits only; another process's
        // appends to the file are found by reading again now and then.
        Subscription::catch_up_polling(self, options, head, Some(OTHER_PROCESSES_POLL))
    }

    fn describe(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }

    async fn accepts_writes(&self) -> Result<bool> {
        Ok(!self.readers.serves_a_read_only_store())
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::ffi;

    fn failure(extended_code: std::os::raw::c_int) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(ffi::Error::new(extended_code), None)
    }

    /// Only what retrying cannot change is a refusal; the passing kinds
    /// of "read-only" and a later "cannot open" are not.
    #[test]
    fn refusals_are_told_from_passing_failures() {
        for lasting in [ffi::SQLITE_READONLY, ffi::SQLITE_READONLY_DBMOVED, ffi::SQLITE_PERM] {
            assert!(super::is_refusal(&failure(lasting), false), "{lasting}");
        }
        for passing in [
            ffi::SQLITE_READONLY_RECOVERY,
            ffi::SQLITE_READONLY_CANTLOCK,
            ffi::SQLITE_BUSY,
            ffi::SQLITE_IOERR,
            ffi::SQLITE_FULL,
        ] {
            assert!(!super::is_refusal(&failure(passing), false), "{passing}");
        }
        assert!(super::is_refusal(&failure(ffi::SQLITE_CANTOPEN), true));
        assert!(!super::is_refusal(&failure(ffi::SQLITE_CANTOPEN), false));
    }
}
