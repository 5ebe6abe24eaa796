//! The file format and opening safety: what a Triage store file is, how a new
//! one is initialized, and how a file that is not one is refused untouched.

use std::path::Path;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};
use triage_event_store::Error;

use crate::SqliteOptions;

/// `PRAGMA application_id` of every Triage store file: "TRIA" in ASCII.
/// Tools such as `file(1)` read it from the header to tell what a file is.
pub(crate) const APPLICATION_ID: i32 = 0x5452_4941;

/// `PRAGMA user_version`: the version of the events schema below. A build
/// opens files up to this version and refuses newer ones.
pub(crate) const SCHEMA_VERSION: i32 = 1;

/// The events schema, version 1.
///
/// `position` is the rowid, so it is assigned as `max(rowid) + 1` inside the
/// writing transaction. The log is append-only (no row is ever deleted), so a
/// committed position is never reused. `STRICT` makes SQLite refuse values of
/// the wrong type instead of silently storing them.
///
/// Other tables (read models, checkpoints) may later share the file; nothing
/// here assumes `events` is the only table.
///
/// Streams get small integer ids in creation order. The `(stream_id,
/// revision)` index then keeps the streams being worked on (mostly recent
/// ones) in a few neighbouring pages, where an index on the
/// `ticket-<uuid>` names would dirty one random page per append for any
/// ticket whose id is not time-ordered (a UUIDv5 of a random command id,
/// see `TicketId::for_command`); fewer dirty pages per group commit means
/// less to fsync.
const CREATE_EVENTS: &str = "
    CREATE TABLE streams (
        stream_id   INTEGER PRIMARY KEY,
        name        TEXT    NOT NULL UNIQUE
    ) STRICT;
    CREATE TABLE events (
        position    INTEGER PRIMARY KEY,
        stream_id   INTEGER NOT NULL REFERENCES streams (stream_id),
        revision    INTEGER NOT NULL,
        event_id    BLOB    NOT NULL UNIQUE,
        event_type  TEXT    NOT NULL,
        data        BLOB    NOT NULL,
        metadata    BLOB    NOT NULL,
        recorded_at INTEGER NOT NULL, -- microseconds since the Unix epoch
        UNIQUE (stream_id, revision)
    ) STRICT;
";

/// Checks a store's shape without reading its rows: fails to prepare unless
/// every column exists.
const PROBE_EVENTS: &str = concat!(
    "SELECT e.position, s.name, e.revision, e.event_id, e.event_type, e.data, e.metadata, e.recorded_at",
    " FROM events e JOIN streams s ON s.stream_id = e.stream_id LIMIT 0"
);

/// Opens (and, if the file is new or empty, initializes) the write
/// connection. A file that exists with content is inspected read-only first,
/// so that nothing is written to a file that is not a Triage store.
pub(crate) fn open_writer(path: &Path, options: &SqliteOptions) -> Result<Connection, Error> {
    let has_content = match std::fs::metadata(path) {
        Ok(metadata) => metadata.len() > 0,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => false,
        Err(error) => return Err(Error::backend(format!("cannot inspect {}", path.display()), error)),
    };
    if has_content {
        inspect(path)?;
    }

    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|error| open_failure(path, error))?;
    // SQLite opens a file it may not write read-only without a word (and,
    // when another account's writer left its -wal and -shm files, reads
    // then work): a writer that cannot write is refused here instead, as
    // SQLite refuses a directory it cannot write.
    if conn
        .is_readonly(rusqlite::MAIN_DB)
        .map_err(|error| open_failure(path, error))?
    {
        let read_only = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_READONLY),
            Some("the file cannot be written by this process".to_owned()),
        );
        return Err(open_failure(path, read_only));
    }
    let setup = |conn: &Connection| -> rusqlite::Result<String> {
        conn.busy_timeout(options.busy_timeout)?;
        // Takes effect only on a file with no content yet; must come before
        // WAL mode, which fixes the page size.
        conn.pragma_update(None, "page_size", options.page_size)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        options.synchronous.apply(conn)?;
        conn.pragma_update(None, "wal_autocheckpoint", crate::checkpoint::BACKSTOP_PAGES)?;
        Ok(mode)
    };
    let mode = setup(&conn).map_err(|error| open_failure(path, error))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Refused {
            message: format!(
                "{} cannot use WAL mode (SQLite kept journal_mode={mode}); put it on a local file system",
                path.display()
            ),
            source: None,
        });
    }
    plan_once(&conn).map_err(|error| open_failure(path, error))?;
    conn.set_prepared_statement_cache_capacity(32);
    initialize(path, &conn)?;
    Ok(conn)
}

/// Opens one read connection. Reads never write, so the connection is
/// read-only; WAL lets it read while the writer commits.
pub(crate) fn open_reader(path: &Path, options: &SqliteOptions) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(options.busy_timeout)?;
    plan_once(&conn)?;
    conn.set_prepared_statement_cache_capacity(16);
    Ok(conn)
}

/// Turns on the query planner stability guarantee. Without it, a cached
/// statement with a bound `LIMIT ?` or range bound (and this SQLite is built
/// with STAT4) is re-parsed and re-planned on every new binding, which showed
/// up as a tenth of the CPU of a read-then-append workload.
fn plan_once(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(())
}

/// Creates the schema in an empty database, or checks an existing one, in a
/// write transaction: two processes opening the same new file cannot both
/// create it.
fn initialize(path: &Path, conn: &Connection) -> Result<(), Error> {
    let result = (|| -> rusqlite::Result<Result<(), Error>> {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let header = Header::read(conn)?;
        if header.is_blank() {
            conn.execute_batch(CREATE_EVENTS)?;
            conn.pragma_update(None, "application_id", APPLICATION_ID)?;
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            conn.execute_batch("COMMIT")?;
            tracing::info!(path = %path.display(), "created a new Triage event store");
            return Ok(Ok(()));
        }
        let verdict = header.check(path).and_then(|()| probe(path, conn));
        conn.execute_batch("COMMIT")?;
        Ok(verdict)
    })();
    match result {
        Ok(verdict) => verdict,
        Err(error) => {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            Err(open_failure(path, error))
        }
    }
}

/// [`inspect`] for a store that must exist already: a missing or empty file
/// is an error, not a store to create.
pub(crate) fn inspect_existing(path: &Path) -> Result<(), Error> {
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_file() && metadata.len() > 0 => inspect(path).map_err(|error| {
            // Reading commits from a -wal file takes a -shm file beside it,
            // which a plain read-only open must make when it is missing.
            if wal_pending(path) && !side_file(path, "-shm").exists() {
                Error::Refused {
                    message: format!(
                        "{} holds commits in its -wal file that are not in the store file yet, and reading them \
                         needs a -shm file that cannot be made here; copy {0} and {0}-wal to a directory you can \
                         write and read the copy",
                        path.display()
                    ),
                    source: Some(Box::new(error)),
                }
            } else {
                error
            }
        }),
        Ok(metadata) if metadata.is_dir() => Err(Error::Refused {
            message: format!("cannot open the event store {}: it is a directory", path.display()),
            source: None,
        }),
        Ok(_) => Err(Error::Incompatible(format!(
            "{} is an empty file, not a Triage event store",
            path.display()
        ))),
        Err(error) => Err(Error::backend(
            format!("cannot open the event store {}", path.display()),
            error,
        )),
    }
}

/// Whether `path` has commits in its `-wal` file: a `-wal` file with
/// anything in it. Without one the main file holds the whole database.
pub(crate) fn wal_pending(path: &Path) -> bool {
    std::fs::metadata(side_file(path, "-wal")).is_ok_and(|wal| wal.len() > 0)
}

/// What is seen of a store file from outside: compared before and after a
/// read through an `immutable` connection, which is right only if nobody
/// wrote the file meanwhile.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct FileState {
    /// Length, inode, and modification and change times of the file.
    main: Option<(u64, u64, i64, i64, i64, i64)>,
    wal_pending: bool,
}

impl FileState {
    pub(crate) fn of(path: &Path) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        FileState {
            main: std::fs::metadata(path).ok().map(|file| {
                (
                    file.len(),
                    file.ino(),
                    file.mtime(),
                    file.mtime_nsec(),
                    file.ctime(),
                    file.ctime_nsec(),
                )
            }),
            wal_pending: wal_pending(path),
        }
    }

    /// The main file holds the whole database.
    pub(crate) fn is_at_rest(&self) -> bool {
        self.main.is_some() && !self.wal_pending
    }
}

/// Opens one read connection of a store opened read-only (see
/// `SqliteEventStore::open_read_only`), and says whether it is an
/// `immutable` one: with nothing in a `-wal` file the store is at rest, and
/// a plain read-only open of a WAL-mode file would need to create the
/// `-shm` file, which a directory one may not write refuses.
pub(crate) fn open_read_only_reader(path: &Path, options: &SqliteOptions) -> rusqlite::Result<(Connection, bool)> {
    if wal_pending(path) {
        return open_reader(path, options).map(|conn| (conn, false));
    }
    let conn = Connection::open_with_flags(
        immutable_uri(path),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(options.busy_timeout)?;
    plan_once(&conn)?;
    conn.set_prepared_statement_cache_capacity(16);
    Ok((conn, true))
}

/// Decides whether an existing file is a Triage store this build can open,
/// through a connection that cannot write.
///
/// Without a `-wal` file next to it, or with an empty one, the main file
/// holds the whole database, so it is opened with `immutable=1`: SQLite then
/// takes no locks and creates no `-wal`/`-shm` files, which a plain
/// read-only open of a WAL-mode file would. With commits in a `-wal` file (a
/// store that is open elsewhere, or whose writer crashed) the committed
/// state includes the WAL, so it is opened read-only the ordinary way.
fn inspect(path: &Path) -> Result<(), Error> {
    let conn = if wal_pending(path) {
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
    } else {
        Connection::open_with_flags(
            immutable_uri(path),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
    }
    .map_err(|error| open_failure(path, error))?;
    let header = Header::read(&conn).map_err(|error| open_failure(path, error))?;
    if header.is_blank() {
        // An SQLite database with nothing in it: safe to make it a store.
        return Ok(());
    }
    header.check(path)?;
    probe(path, &conn)
}

/// Checks that the events table has the expected columns and that its
/// b-tree can be walked to the end: a truncated file fails here.
fn probe(path: &Path, conn: &Connection) -> Result<(), Error> {
    let check = || -> rusqlite::Result<()> {
        conn.prepare(PROBE_EVENTS)?;
        conn.query_row("SELECT max(position) FROM events", [], |row| {
            row.get::<_, Option<i64>>(0)
        })?;
        Ok(())
    };
    check().map_err(|error| match error {
        rusqlite::Error::SqliteFailure(failure, _)
            if matches!(failure.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) =>
        {
            open_failure(path, error)
        }
        rusqlite::Error::SqliteFailure(..) | rusqlite::Error::SqlInputError { .. } => Error::Incompatible(format!(
            "{} is a damaged Triage event store: its events table does not have the schema-{SCHEMA_VERSION} shape ({error}); the file was left unchanged",
            path.display()
        )),
        other => open_failure(path, other),
    })
}

/// The identifying part of a database: its header fields and table names.
#[derive(Debug)]
struct Header {
    application_id: i32,
    user_version: i32,
    /// Its tables, views and triggers.
    tables: Vec<String>,
}

impl Header {
    fn read(conn: &Connection) -> rusqlite::Result<Header> {
        let application_id = conn.query_row("PRAGMA application_id", [], |row| row.get(0))?;
        let user_version = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        let mut statement = conn.prepare(
            // Views and triggers count: a file holding only a view is
            // someone's database, not a blank one. SQLite reserves names
            // starting `sqlite_` in any case, which LIKE matches; the `_`
            // is escaped, or `sqlitestudio_notes` would pass for SQLite's.
            concat!(
                "SELECT name FROM sqlite_schema WHERE type IN ('table', 'view', 'trigger')",
                r" AND name NOT LIKE 'sqlite\_%' ESCAPE '\' ORDER BY name",
            ),
        )?;
        let tables = statement
            .query_map([], |row| row.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(Header {
            application_id,
            user_version,
            tables,
        })
    }

    /// A database nobody has put anything in yet.
    fn is_blank(&self) -> bool {
        self.application_id == 0 && self.user_version == 0 && self.tables.is_empty()
    }

    fn check(&self, path: &Path) -> Result<(), Error> {
        let path = path.display();
        if self.application_id != APPLICATION_ID {
            let tables = if self.tables.is_empty() {
                "no tables".to_owned()
            } else {
                format!("tables: {}", self.tables.join(", "))
            };
            return Err(Error::Incompatible(format!(
                "{path} is not a Triage event store (SQLite application_id {:#010x}, Triage uses {APPLICATION_ID:#010x}; {tables}); the file was left unchanged",
                self.application_id
            )));
        }
        if self.user_version > SCHEMA_VERSION {
            return Err(Error::Incompatible(format!(
                "{path} was written by a newer Triage (schema {}, this build reads up to {SCHEMA_VERSION}); upgrade Triage to open it; the file was left unchanged",
                self.user_version
            )));
        }
        if self.user_version < 1 {
            return Err(Error::Incompatible(format!(
                "{path} is a damaged Triage event store (invalid schema version {}); the file was left unchanged",
                self.user_version
            )));
        }
        Ok(())
    }
}

/// Maps a failure to open or read a database file: a file that SQLite says
/// is not a database or is corrupt is `Incompatible`; one it cannot open or
/// write (a missing directory, permissions, a read-only file system) is
/// `Refused`; anything else (locks held too long, I/O errors) is a backend
/// error.
fn open_failure(path: &Path, error: rusqlite::Error) -> Error {
    if crate::is_refusal(&error, true) {
        return Error::refused(
            format!(
                "cannot open the event store {} for reading and writing: check that its directory exists and \
                 that the file and the directory are writable",
                path.display()
            ),
            error,
        );
    }
    match &error {
        rusqlite::Error::SqliteFailure(failure, _) if failure.code == ErrorCode::NotADatabase => {
            Error::Incompatible(format!(
                "{} is not a Triage event store: it is not an SQLite database ({error}); the file was left unchanged",
                path.display()
            ))
        }
        rusqlite::Error::SqliteFailure(failure, _) if failure.code == ErrorCode::DatabaseCorrupt => {
            Error::Incompatible(format!(
                "{} is damaged: SQLite reports a corrupt or truncated database ({error}); the file was left unchanged",
                path.display()
            ))
        }
        _ => Error::backend(format!("cannot open the event store {}", path.display()), error),
    }
}

/// `path` with `suffix` appended to its file name, as SQLite names its
/// `-wal` and `-shm` files.
pub(crate) fn side_file(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

/// A `file:` URI opening `path` with `immutable=1`. Every byte outside the
/// unreserved set is percent-encoded, so `?`, `#` and `%` in names are safe.
fn immutable_uri(path: &Path) -> String {
    let mut uri = String::from("file:");
    for &byte in path.as_os_str().as_encoded_bytes() {
        if byte.is_ascii_alphanumeric() || b"/-._~".contains(&byte) {
            uri.push(char::from(byte));
        } else {
            uri.push_str(&format!("%{byte:02X}"));
        }
    }
    uri.push_str("?immutable=1");
    uri
}

/// The last position in the log, read when the store opens.
pub(crate) fn head_position(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.query_row("SELECT max(position) FROM events", [], |row| row.get(0))
        .optional()
        .map(Option::flatten)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Synchronous;

    #[test]
    fn uris_escape_reserved_characters() {
        assert_eq!(
            immutable_uri(Path::new("/tmp/a b?#%.db")),
            "file:/tmp/a%20b%3F%23%25.db?immutable=1"
        );
    }

    #[test]
    fn application_id_spells_tria() {
        assert_eq!(&APPLICATION_ID.to_be_bytes(), b"TRIA");
    }

    #[test]
    fn a_durable_writer_asks_for_full_fsync() {
        let dir = tempfile::tempdir().unwrap();
        for (synchronous, level, full) in [(Synchronous::Full, 2, true), (Synchronous::Normal, 1, false)] {
            let options = SqliteOptions {
                synchronous,
                ..SqliteOptions::default()
            };
            let conn = open_writer(&dir.path().join(format!("{level}.db")), &options).unwrap();
            let pragma = |name: &str| {
                conn.query_row(&format!("PRAGMA {name}"), [], |row| row.get::<_, i64>(0))
                    .unwrap()
            };
            assert_eq!(pragma("synchronous"), level);
            assert_eq!(pragma("fullfsync") == 1, full, "{synchronous:?}");
            assert_eq!(pragma("checkpoint_fullfsync") == 1, full, "{synchronous:?}");
        }
    }
}
