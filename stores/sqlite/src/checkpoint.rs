//! The checkpointer thread: copies the WAL back into the main file off the
//! writer's path.
//!
//! SQLite's automatic checkpoint runs inside the committing connection, so
//! every few thousand pages one commit would also write and fsync the main
//! file while every append queued behind it waits. Instead the writer's
//! automatic checkpoint is only a backstop, and the writer asks this thread
//! (without waiting) to run a `PASSIVE` checkpoint on its own connection. A
//! passive checkpoint never takes the write lock, so commits go on meanwhile.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags};

use crate::SqliteOptions;

/// Events written between two checkpoint requests. A random-id append
/// dirties a few pages, so this keeps the WAL around the size SQLite's
/// default automatic checkpoint (1000 pages) would.
pub(crate) const CHECKPOINT_EVERY_EVENTS: u64 = 512;

/// The writer connection's own automatic checkpoint, in pages: a backstop
/// that bounds the WAL if the checkpointer falls behind or stops.
pub(crate) const BACKSTOP_PAGES: u32 = 20_000;

/// The writer's handle on the checkpointer thread.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    requests: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    pub(crate) fn start(path: &Path, options: &SqliteOptions) -> rusqlite::Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(options.busy_timeout)?;
        options.synchronous.apply(&conn)?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // One pending request is enough: requests made while one is pending
        // are covered by it.
        let (requests, receiver) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("triage-sqlite-checkpointer".to_owned())
            .spawn(move || run(conn, receiver))
            .map_err(|error| rusqlite::Error::ToSqlConversionFailure(Box::new(error)))?;
        Ok(Checkpointer {
            requests: Some(requests),
            thread: Some(thread),
        })
    }

    /// Asks for a checkpoint without waiting for it.
    pub(crate) fn request(&self) {
        if let Some(requests) = &self.requests {
            match requests.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) => {}
                Err(TrySendError::Disconnected(())) => {
                    tracing::warn!("the checkpointer thread stopped; the writer's automatic checkpoint takes over");
                }
            }
        }
    }

    /// Stops the thread and closes its connection.
    pub(crate) fn stop(&mut self) {
        drop(self.requests.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the SQLite checkpointer thread panicked");
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(conn: Connection, requests: Receiver<()>) {
    while requests.recv().is_ok() {
        let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        });
        match result {
            Ok((busy, wal_frames, copied)) => tracing::trace!(busy, wal_frames, copied, "WAL checkpoint"),
            Err(error) => tracing::warn!(%error, "WAL checkpoint failed; will retry on the next request"),
        }
    }
}
