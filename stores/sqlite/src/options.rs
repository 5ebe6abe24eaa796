//! How a store is opened: commit batching, durability and pool sizes.

use std::time::Duration;

/// How hard SQLite pushes each commit to stable storage (`PRAGMA synchronous`).
///
/// The store always runs in WAL mode; this only decides when the WAL is
/// fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// `synchronous=FULL`: every commit fsyncs the WAL before any of its
    /// appends is acknowledged, so an acknowledged append survives a power
    /// loss or an OS crash. The default, and what Triage's durability
    /// promise relies on.
    #[default]
    Full,
    /// `synchronous=NORMAL`: the WAL is fsynced only at checkpoints. The file
    /// never gets corrupted and a process crash loses nothing, but a power
    /// loss or OS crash may lose the last commits even though their appends
    /// were acknowledged. Trades durability of those last commits for speed.
    Normal,
}

impl Synchronous {
    pub(crate) fn pragma_value(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }

    /// Sets `synchronous` on a connection that writes (the writer or the
    /// checkpointer). With `Full`, also `fullfsync`: on Apple systems a
    /// plain `fsync` leaves the data in the drive's cache, where a power loss
    /// takes it; elsewhere SQLite ignores these two.
    pub(crate) fn apply(self, conn: &rusqlite::Connection) -> rusqlite::Result<()> {
        conn.pragma_update(None, "synchronous", self.pragma_value())?;
        let full = self == Synchronous::Full;
        conn.pragma_update(None, "fullfsync", full)?;
        conn.pragma_update(None, "checkpoint_fullfsync", full)
    }
}

/// Options of [`crate::SqliteEventStore::open`]. `SqliteOptions::default()`
/// is the durable, batched configuration Triage ships with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqliteOptions {
    /// Group commit (default `true`): the writer thread runs every append
    /// queued at the moment in one transaction with one fsync, each append in
    /// its own savepoint.
    ///
    /// With `false` every append gets its own transaction and its own fsync.
    /// That is the classic one-commit-per-command design, kept as the peer
    /// the benchmark compares group commit against; it is slower, not safer.
    pub group_commit: bool,
    /// When commits reach stable storage; see [`Synchronous`].
    pub synchronous: Synchronous,
    /// Most appends in one group-commit transaction (default 512; at least 1).
    /// Bounds the latency one transaction adds to the appends queued behind it.
    pub max_batch: usize,
    /// Most read connections open at once (default 8; at least 1). Reads
    /// beyond that wait for a free connection.
    pub max_readers: usize,
    /// How long a connection waits for a lock held by another connection
    /// (`PRAGMA busy_timeout`, default 5 s) before failing with a backend error.
    pub busy_timeout: Duration,
    /// The page size of a new store file, in bytes (a power of two from 512
    /// to 65536; default 2048). Existing files keep theirs.
    ///
    /// Smaller than SQLite's 4096 because of how appends dirty pages: each
    /// append touches one random leaf of the unique `event_id` index (event
    /// ids are UUIDv5 hashes), and every dirty page is written to the WAL and
    /// fsynced at commit. On the benchmark machine 2 KiB pages raised durable
    /// commands/s at 32 agents by about 40% over 4 KiB; 1 KiB pages gained a
    /// little more but fit only one typical event row per page, making the
    /// file half again as large.
    pub page_size: u32,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            group_commit: true,
            synchronous: Synchronous::Full,
            max_batch: 512,
            max_readers: 8,
            busy_timeout: Duration::from_secs(5),
            page_size: 2048,
        }
    }
}

impl SqliteOptions {
    /// One transaction and one fsync per append: the benchmark's peer.
    pub fn single_commit() -> Self {
        SqliteOptions {
            group_commit: false,
            ..Self::default()
        }
    }

    /// The number of appends the writer takes into one transaction.
    pub(crate) fn batch_limit(&self) -> usize {
        if self.group_commit { self.max_batch.max(1) } else { 1 }
    }
}
