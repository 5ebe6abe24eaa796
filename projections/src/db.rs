//! The read-model database: one SQLite file holding every projection's
//! tables, their checkpoints and the registry of live generations.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use triage_event_store::Position;
use uuid::Uuid;

use crate::ProjectionError;

/// `PRAGMA application_id` of a read-model file: "TRRM" in ASCII.
pub const APPLICATION_ID: i32 = 0x5452_524D;

/// `PRAGMA application_id` of a Triage event store file ("TRIA").
const EVENT_STORE_APPLICATION_ID: i32 = 0x5452_4941;

/// `PRAGMA user_version` of the registry schema below.
pub const SCHEMA_VERSION: i32 = 1;

/// `PRAGMA user_version` of a file that also holds a `replay_limit` row
/// ([`ReadModelDb::freeze_at`]): a Triage from before it would not know to
/// stop there, so it refuses the file as newer instead of moving it on.
pub const FROZEN_SCHEMA_VERSION: i32 = 2;

const CREATE_REGISTRY: &str = "
    CREATE TABLE projections (
        name             TEXT    PRIMARY KEY,
        version          INTEGER NOT NULL,
        generation       INTEGER NOT NULL,
        checkpoint_commit  INTEGER,
        checkpoint_prepare INTEGER,
        events_applied   INTEGER NOT NULL DEFAULT 0,
        last_error       TEXT,
        updated_at       INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE projection_builds (
        name             TEXT    PRIMARY KEY,
        version          INTEGER NOT NULL,
        generation       INTEGER NOT NULL,
        checkpoint_commit  INTEGER,
        checkpoint_prepare INTEGER,
        events_applied   INTEGER NOT NULL DEFAULT 0,
        started_at       INTEGER NOT NULL
    ) STRICT;
";

/// Where a projection's tables live: the registry row of a live generation
/// or of a build in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// The projection.
    pub name: String,
    /// The projection version its tables were built by.
    pub version: u32,
    /// The generation: table names end in `_g<generation>`.
    pub generation: u32,
    /// The last position applied; `None` before the first event.
    pub checkpoint: Option<Position>,
    /// Events applied to this generation.
    pub events_applied: u64,
}

impl Slot {
    /// The name of `table` in this slot's generation.
    pub fn table(&self, table: &str) -> String {
        generation_table(table, self.generation)
    }
}

/// The name of `table` in `generation`.
pub fn generation_table(table: &str, generation: u32) -> String {
    format!("{table}_g{generation}")
}

/// Which registry a slot is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum SlotKind {
    Live,
    Build,
}

impl SlotKind {
    fn table(self) -> &'static str {
        match self {
            SlotKind::Live => "projections",
            SlotKind::Build => "projection_builds",
        }
    }
}

/// The read-model file and its one write connection.
///
/// Read models are rebuildable from the events, so the file runs with
/// `synchronous=NORMAL`: a power loss may lose the last batches, but each
/// batch commits its rows and its checkpoint together, so it loses both
/// and replays them; nothing is applied twice.
#[derive(Debug, Clone)]
pub struct ReadModelDb {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
    /// Projections this process is rebuilding into this database.
    rebuilding: Arc<Mutex<BTreeSet<String>>>,
}

/// The right to rebuild one projection, given up when dropped.
#[derive(Debug)]
pub(crate) struct RebuildClaim {
    name: String,
    rebuilding: Arc<Mutex<BTreeSet<String>>>,
    /// Locked exclusively; closing it unlocks it.
    file: Option<std::fs::File>,
}

impl Drop for RebuildClaim {
    fn drop(&mut self) {
        self.rebuilding
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.name);
    }
}

impl ReadModelDb {
    /// The read-model file that goes with an event store file:
    /// `triage.db` → `triage.read.db`.
    pub fn sibling_of(events_path: &Path) -> PathBuf {
        let stem = events_path
            .file_stem()
            .map_or_else(|| "triage".into(), |s| s.to_string_lossy().into_owned());
        events_path.with_file_name(format!("{stem}.read.db"))
    }

    /// Opens or creates the file. A file that is not a Triage read-model
    /// file, or was written by a newer Triage, is refused and left unchanged.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ProjectionError> {
        let path = path.as_ref().to_path_buf();
        let incompatible = |reason: String| ProjectionError::Incompatible {
            path: path.clone(),
            reason,
        };
        let has_content = std::fs::metadata(&path).map(|m| m.len() > 0).unwrap_or(false);
        if has_content {
            // Inspect read-only first, so a foreign file is never written.
            let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(|error| incompatible(error.to_string()))?;
            let header = (|| -> rusqlite::Result<(i32, i32, i64)> {
                let id = conn.query_row("PRAGMA application_id", [], |row| row.get(0))?;
                let version = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
                let tables = conn.query_row(
                    "SELECT count(*) FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'",
                    [],
                    |row| row.get(0),
                )?;
                Ok((id, version, tables))
            })()
            .map_err(|error| incompatible(format!("it is not a readable SQLite database ({error})")))?;
            match header {
                (0, 0, 0) => {}
                (APPLICATION_ID, version, _) if version > FROZEN_SCHEMA_VERSION => {
                    return Err(incompatible(format!(
                        "it was written by a newer Triage (read-model schema {version}, this build reads up to {FROZEN_SCHEMA_VERSION})"
                    )));
                }
                (APPLICATION_ID, _, _) => {}
                (EVENT_STORE_APPLICATION_ID, _, _) => {
                    return Err(incompatible(format!(
                        "it is a Triage event store, not a read-model file: name it with --db (or --store), and \
                         give --read-model another file, such as the default beside it ({})",
                        Self::sibling_of(&path).display()
                    )));
                }
                (id, _, _) => {
                    return Err(incompatible(format!(
                        "it is not a Triage read-model file (SQLite application_id {id:#010x})"
                    )));
                }
            }
        }
        let conn =
            Connection::open(&path).map_err(|error| ProjectionError::sqlite("open the read-model file", error))?;
        let setup = || -> rusqlite::Result<()> {
            conn.busy_timeout(std::time::Duration::from_secs(10))?;
            conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.pragma_update(None, "foreign_keys", false)?;
            ensure_registry(&conn, true)
        };
        setup().map_err(|error| ProjectionError::sqlite("prepare the read-model file", error))?;
        Ok(ReadModelDb {
            path,
            conn: Arc::new(Mutex::new(conn)),
            rebuilding: Arc::default(),
        })
    }

    /// Opens read models inside an event store's own SQLite file instead of a
    /// sibling file. Only for measuring what that layout costs
    /// (`triage-bench commands --projector same-file`): the projection's
    /// batches then take the same write lock as the event writer's group
    /// commits. The CLI never does this, and [`ReadModelDb::open`] refuses an
    /// event store file so that a mistyped path cannot do it by accident.
    pub fn open_in_event_store_file(path: impl AsRef<Path>) -> Result<Self, ProjectionError> {
        let path = path.as_ref().to_path_buf();
        let conn =
            Connection::open(&path).map_err(|error| ProjectionError::sqlite("open the event store file", error))?;
        let setup = || -> rusqlite::Result<bool> {
            conn.busy_timeout(std::time::Duration::from_secs(10))?;
            let id: i32 = conn.query_row("PRAGMA application_id", [], |row| row.get(0))?;
            if id != EVENT_STORE_APPLICATION_ID {
                return Ok(false);
            }
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            ensure_registry(&conn, false)?;
            Ok(true)
        };
        match setup() {
            Ok(true) => Ok(ReadModelDb {
                path,
                conn: Arc::new(Mutex::new(conn)),
                rebuilding: Arc::default(),
            }),
            Ok(false) => Err(ProjectionError::Incompatible {
                path,
                reason: "it is not a Triage event store file".to_owned(),
            }),
            Err(error) => Err(ProjectionError::sqlite(
                "prepare the event store file for read models",
                error,
            )),
        }
    }

    /// An in-memory read-model database, for tests and throwaway stores.
    pub fn in_memory() -> Result<Self, ProjectionError> {
        let conn = Connection::open_in_memory().map_err(|error| ProjectionError::sqlite("open", error))?;
        conn.execute_batch(CREATE_REGISTRY)
            .map_err(|error| ProjectionError::sqlite("create the registry", error))?;
        Ok(ReadModelDb {
            path: PathBuf::from(":memory:"),
            conn: Arc::new(Mutex::new(conn)),
            rebuilding: Arc::default(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the models live in memory only.
    fn in_memory_only(&self) -> bool {
        self.path == Path::new(":memory:")
    }

    /// The file whose lock a rebuild of `name` holds.
    pub fn rebuild_lock_path(&self, name: &str) -> Option<PathBuf> {
        let file = self.path.file_name()?.to_string_lossy().into_owned();
        (!self.in_memory_only()).then(|| self.path.with_file_name(format!("{file}.rebuild-{name}.lock")))
    }

    /// Claims the right to rebuild `name`, or fails with
    /// [`ProjectionError::RebuildInProgress`] while another rebuild of it
    /// runs, in this process or another: a second rebuild would discard
    /// the first one's shadow generation under it. Across processes the
    /// claim is an exclusive lock on a file beside the database, which the
    /// system releases when its holder dies, so a crashed rebuild never
    /// blocks the next one.
    pub(crate) fn claim_rebuild(&self, name: &str) -> Result<RebuildClaim, ProjectionError> {
        let in_progress = || ProjectionError::RebuildInProgress { name: name.to_owned() };
        if !self
            .rebuilding
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(name.to_owned())
        {
            return Err(in_progress());
        }
        let mut claim = RebuildClaim {
            name: name.to_owned(),
            rebuilding: self.rebuilding.clone(),
            file: None,
        };
        if let Some(path) = self.rebuild_lock_path(name) {
            let cannot = |error: std::io::Error| {
                ProjectionError::Internal(format!("cannot lock {} for a rebuild: {error}", path.display()))
            };
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(cannot)?;
            match file.try_lock() {
                Ok(()) => claim.file = Some(file),
                Err(std::fs::TryLockError::WouldBlock) => return Err(in_progress()),
                Err(std::fs::TryLockError::Error(error)) => return Err(cannot(error)),
            }
        }
        Ok(claim)
    }

    /// Marks the file as read models as of `position` (`triage replay`):
    /// from now on, catching up stops there, and a rebuild is refused.
    pub fn freeze_at(&self, position: Position) -> Result<(), ProjectionError> {
        let conn = self.lock();
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             CREATE TABLE IF NOT EXISTS replay_limit (commit_position INTEGER NOT NULL, prepare_position INTEGER NOT NULL) STRICT;
             DELETE FROM replay_limit;",
        )
        .and_then(|()| {
            conn.execute(
                "INSERT INTO replay_limit VALUES (?1, ?2)",
                (position.commit as i64, position.prepare as i64),
            )
        })
        .and_then(|_| conn.pragma_update(None, "user_version", FROZEN_SCHEMA_VERSION))
        .and_then(|()| conn.execute_batch("COMMIT"))
        .map_err(|error| {
            let _ = conn.execute_batch("ROLLBACK");
            ProjectionError::sqlite("mark the read models as a replay", error)
        })
    }

    /// Moves everything into the main file and stops using a write-ahead
    /// log, so that the file alone holds the read models: for a file
    /// about to be moved or linked into place (`triage replay`). A later
    /// [`ReadModelDb::open`] turns the write-ahead log on again.
    pub fn seal(&self) -> Result<(), ProjectionError> {
        let conn = self.lock();
        let sealed = || -> rusqlite::Result<Option<String>> {
            // (busy, frames in the log, frames moved): busy means another
            // connection kept part of the log from the main file.
            let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| row.get(0))?;
            if busy != 0 {
                return Ok(Some("another connection kept the write-ahead log in use".to_owned()));
            }
            let mode: String = conn.query_row("PRAGMA journal_mode = DELETE", [], |row| row.get(0))?;
            Ok((!mode.eq_ignore_ascii_case("delete")).then(|| format!("the journal stayed in {mode} mode")))
        };
        match sealed() {
            Ok(None) => Ok(()),
            Ok(Some(reason)) => Err(ProjectionError::Internal(format!(
                "cannot seal the read-model file {}: {reason}",
                self.path.display()
            ))),
            Err(error) => Err(ProjectionError::sqlite("seal the read-model file", error)),
        }
    }

    /// The position the file's read models are frozen at, if it is a
    /// replay ([`ReadModelDb::freeze_at`]).
    pub fn frozen_at(&self) -> Result<Option<Position>, ProjectionError> {
        let conn = self.lock();
        let frozen = || -> rusqlite::Result<Option<Position>> {
            if !table_exists(&conn, "replay_limit")? {
                return Ok(None);
            }
            conn.query_row(
                "SELECT commit_position, prepare_position FROM replay_limit",
                [],
                |row| Ok(position(row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map(Option::flatten)
        };
        frozen().map_err(|error| ProjectionError::sqlite("read the replay limit", error))
    }

    /// The id of the first event of the log the read models were built
    /// from, if recorded ([`ReadModelDb::record_log`]).
    pub fn log_identity(&self) -> Result<Option<String>, ProjectionError> {
        let conn = self.lock();
        let read = || -> rusqlite::Result<Option<String>> {
            if !table_exists(&conn, "log_identity")? {
                return Ok(None);
            }
            conn.query_row("SELECT first_event_id FROM log_identity", [], |row| row.get(0))
                .optional()
        };
        read().map_err(|error| ProjectionError::sqlite("read the log identity", error))
    }

    /// Records `first_event_id`, the id of the log's first event, as the
    /// log the read models describe. A store file deleted and made anew
    /// has another first event, though its positions start again at 1.
    pub fn record_log(&self, first_event_id: &str) -> Result<(), ProjectionError> {
        let conn = self.lock();
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             CREATE TABLE IF NOT EXISTS log_identity (
                 only_row INTEGER PRIMARY KEY CHECK (only_row = 1), first_event_id TEXT NOT NULL) STRICT;",
        )
        .and_then(|()| {
            conn.execute(
                "INSERT INTO log_identity VALUES (1, ?1) ON CONFLICT (only_row) DO UPDATE SET first_event_id = ?1",
                [first_event_id],
            )
        })
        .and_then(|_| conn.execute_batch("COMMIT"))
        .map_err(|error| {
            let _ = conn.execute_batch("ROLLBACK");
            ProjectionError::sqlite("record the log identity", error)
        })
    }

    /// The connection. Held only for short, synchronous work.
    pub fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic mid-transaction leaves the transaction open; SQLite rolls
        // it back when the next BEGIN fails or the connection closes, and
        // the checkpoint rolls back with the rows.
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Creates the registry tables if the file has none, in a write
/// transaction so that two processes cannot both create them. `stamp` marks
/// the file as a read-model file (not done inside an event store's file).
fn ensure_registry(conn: &Connection, stamp: bool) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    if !table_exists(conn, "projections")? {
        conn.execute_batch(CREATE_REGISTRY)?;
        if stamp {
            conn.pragma_update(None, "application_id", APPLICATION_ID)?;
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
    }
    conn.execute_batch("COMMIT")
}

fn table_exists(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE name = ?1)",
        [name],
        |row| row.get(0),
    )
}

fn position(commit: Option<i64>, prepare: Option<i64>) -> Option<Position> {
    Some(Position {
        commit: commit? as u64,
        prepare: prepare? as u64,
    })
}

pub(crate) fn read_slot(conn: &Connection, kind: SlotKind, name: &str) -> rusqlite::Result<Option<Slot>> {
    conn.query_row(
        &format!(
            "SELECT version, generation, checkpoint_commit, checkpoint_prepare, events_applied FROM {} WHERE name = ?1",
            kind.table()
        ),
        [name],
        |row| {
            Ok(Slot {
                name: name.to_owned(),
                version: row.get(0)?,
                generation: row.get(1)?,
                checkpoint: position(row.get(2)?, row.get(3)?),
                events_applied: row.get::<_, i64>(4)? as u64,
            })
        },
    )
    .optional()
}

pub(crate) fn write_checkpoint(conn: &Connection, kind: SlotKind, slot: &Slot) -> rusqlite::Result<()> {
    conn.execute(
        &format!(
            "UPDATE {} SET checkpoint_commit = ?2, checkpoint_prepare = ?3, events_applied = ?4 WHERE name = ?1",
            kind.table()
        ),
        (
            &slot.name,
            slot.checkpoint.map(|p| p.commit as i64),
            slot.checkpoint.map(|p| p.prepare as i64),
            slot.events_applied as i64,
        ),
    )?;
    if kind == SlotKind::Live {
        conn.execute(
            "UPDATE projections SET last_error = NULL, updated_at = ?2 WHERE name = ?1",
            (&slot.name, now_micros()),
        )?;
    }
    Ok(())
}

/// The event each slot's checkpoint stands at, recorded with the
/// checkpoint. A store restored from a backup has fewer events than its
/// read models applied, and once new appends bring it back past their
/// checkpoint, its head no longer shows that the models describe events
/// it lost: the event at the checkpoint's position does, being another
/// one (or none). Kept in a table of its own, made when first written, so
/// that files from before it (and a Triage from before it, which neither
/// reads nor writes it) keep working: a checkpoint moved without it is
/// simply not checked.
const CREATE_CHECKPOINT_EVENTS: &str = "
    CREATE TABLE IF NOT EXISTS checkpoint_events (
        slot             TEXT    NOT NULL,
        name             TEXT    NOT NULL,
        position_commit  INTEGER NOT NULL,
        position_prepare INTEGER NOT NULL,
        event_id         TEXT    NOT NULL,
        PRIMARY KEY (slot, name)
    ) STRICT;
";

/// Records `event_id` as the event at `slot`'s checkpoint, in the
/// transaction that writes the checkpoint.
pub(crate) fn write_checkpoint_event(
    conn: &Connection,
    kind: SlotKind,
    name: &str,
    position: Position,
    event_id: Uuid,
) -> rusqlite::Result<()> {
    conn.execute_batch(CREATE_CHECKPOINT_EVENTS)?;
    conn.execute(
        "INSERT INTO checkpoint_events VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (slot, name) DO UPDATE SET \
         position_commit = ?3, position_prepare = ?4, event_id = ?5",
        (
            kind.table(),
            name,
            position.commit as i64,
            position.prepare as i64,
            event_id.to_string(),
        ),
    )?;
    Ok(())
}

/// The live slot's checkpoint and the event recorded at it, read
/// together; `None` without a record for the checkpoint it has now.
pub(crate) fn live_checkpoint_event(conn: &Connection, name: &str) -> rusqlite::Result<Option<(Position, Uuid)>> {
    if !table_exists(conn, "checkpoint_events")? {
        return Ok(None);
    }
    let found = conn
        .query_row(
            "SELECT e.position_commit, e.position_prepare, e.event_id FROM projections p \
             JOIN checkpoint_events e ON e.slot = 'projections' AND e.name = p.name \
             AND e.position_commit = p.checkpoint_commit AND e.position_prepare = p.checkpoint_prepare \
             WHERE p.name = ?1",
            [name],
            |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, String>(2)?)),
        )
        .optional()?;
    Ok(found.and_then(|(commit, prepare, id)| {
        let position = Position {
            commit: commit as u64,
            prepare: prepare as u64,
        };
        Uuid::parse_str(&id).ok().map(|id| (position, id))
    }))
}

/// Makes `kind`'s record of the event at `name`'s checkpoint the one
/// `from` had (a swapped-in build's), or none.
pub(crate) fn move_checkpoint_event(
    conn: &Connection,
    name: &str,
    from: SlotKind,
    to: SlotKind,
) -> rusqlite::Result<()> {
    if !table_exists(conn, "checkpoint_events")? {
        return Ok(());
    }
    conn.execute(
        "DELETE FROM checkpoint_events WHERE slot = ?1 AND name = ?2",
        (to.table(), name),
    )?;
    conn.execute(
        "UPDATE checkpoint_events SET slot = ?1 WHERE slot = ?2 AND name = ?3",
        (to.table(), from.table(), name),
    )?;
    Ok(())
}

pub(crate) fn insert_slot(conn: &Connection, kind: SlotKind, slot: &Slot) -> rusqlite::Result<()> {
    let time_column = match kind {
        SlotKind::Live => "updated_at",
        SlotKind::Build => "started_at",
    };
    conn.execute(
        &format!(
            "INSERT OR REPLACE INTO {} (name, version, generation, checkpoint_commit, checkpoint_prepare, events_applied, {time_column}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            kind.table()
        ),
        (
            &slot.name,
            slot.version,
            slot.generation,
            slot.checkpoint.map(|p| p.commit as i64),
            slot.checkpoint.map(|p| p.prepare as i64),
            slot.events_applied as i64,
            now_micros(),
        ),
    )?;
    Ok(())
}

pub(crate) fn delete_slot(conn: &Connection, kind: SlotKind, name: &str) -> rusqlite::Result<()> {
    conn.execute(&format!("DELETE FROM {} WHERE name = ?1", kind.table()), [name])?;
    Ok(())
}

pub(crate) fn record_error(conn: &Connection, name: &str, error: &str) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE projections SET last_error = ?2, updated_at = ?3 WHERE name = ?1",
        (name, error, now_micros()),
    )?;
    Ok(())
}

/// Clears the recorded errors of `names`: a catch-up of them succeeded,
/// so none stands (a failure that passed, on a log with nothing new to
/// write a checkpoint for, stayed recorded until the next event). Looked
/// up first: an UPDATE would take the write lock on every catch-up.
pub(crate) fn clear_errors(conn: &Connection, names: &[&str]) -> rusqlite::Result<()> {
    for name in names {
        if last_error(conn, name)?.is_some() {
            conn.execute(
                "UPDATE projections SET last_error = NULL, updated_at = ?2 WHERE name = ?1",
                (name, now_micros()),
            )?;
        }
    }
    Ok(())
}

pub(crate) fn last_error(conn: &Connection, name: &str) -> rusqlite::Result<Option<String>> {
    Ok(conn
        .query_row("SELECT last_error FROM projections WHERE name = ?1", [name], |row| {
            row.get(0)
        })
        .optional()?
        .flatten())
}

/// The highest generation any slot of `name` used, so a new build never
/// reuses table names.
pub(crate) fn max_generation(conn: &Connection, name: &str) -> rusqlite::Result<u32> {
    conn.query_row(
        "SELECT max(g) FROM (SELECT generation AS g FROM projections WHERE name = ?1 \
         UNION ALL SELECT generation FROM projection_builds WHERE name = ?1)",
        [name],
        |row| row.get::<_, Option<u32>>(0),
    )
    .map(Option::unwrap_or_default)
}

pub(crate) fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}
