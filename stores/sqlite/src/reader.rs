//! Reads: a small pool of read-only connections and the queries they run.
//!
//! WAL gives every read statement a snapshot of the last commit, so reads run
//! beside the writer without blocking it. A connection reads through one
//! statement at a time, so each query takes a connection out of the pool for
//! its duration; a semaphore caps how many exist.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, Row};
use tokio::sync::Semaphore;
use triage_event_store::{AllStart, Direction, Error, Position, ReadAll, ReadStream, RecordedEvent, Result};
use triage_event_store::{StreamName, StreamStart};
use uuid::Uuid;

use crate::SqliteOptions;
use crate::schema::{open_read_only_reader, open_reader};

/// Tries of one query on `immutable` connections while the store file keeps
/// changing under them (see `Readers::query`).
const IMMUTABLE_TRIES: usize = 3;

/// The pool of read connections, opened lazily.
#[derive(Debug)]
pub(crate) struct Readers {
    path: PathBuf,
    options: SqliteOptions,
    /// One permit per connection that may exist; taken for each query and
    /// held until its connection is back in `idle`.
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Pooled>>,
    /// The store was opened read-only (see `open_read_only_reader`).
    read_only_store: bool,
}

/// An idle read connection.
#[derive(Debug)]
struct Pooled {
    conn: Connection,
    /// Opened with `immutable`: never pooled (see `Readers::query`).
    immutable: bool,
}

impl Readers {
    pub(crate) fn new(path: PathBuf, options: SqliteOptions) -> Self {
        let permits = Arc::new(Semaphore::new(options.max_readers.max(1)));
        Readers {
            path,
            options,
            permits,
            idle: Mutex::new(Vec::new()),
            read_only_store: false,
        }
    }

    /// The readers of a store opened read-only.
    pub(crate) fn read_only_store(path: PathBuf, options: SqliteOptions) -> Self {
        Readers {
            read_only_store: true,
            ..Self::new(path, options)
        }
    }

    pub(crate) fn serves_a_read_only_store(&self) -> bool {
        self.read_only_store
    }

    /// An idle connection, or a new one. Only ordinary connections are
    /// pooled; an `immutable` one serves one try of one query.
    fn connection(&self) -> rusqlite::Result<Pooled> {
        if let Some(pooled) = self.idle().pop() {
            return Ok(pooled);
        }
        if self.read_only_store {
            let (conn, immutable) = open_read_only_reader(&self.path, &self.options)?;
            Ok(Pooled { conn, immutable })
        } else {
            Ok(Pooled {
                conn: open_reader(&self.path, &self.options)?,
                immutable: false,
            })
        }
    }

    /// Runs `query` on a pooled connection in `spawn_blocking`, so that
    /// SQLite's blocking I/O never stalls the async runtime.
    pub(crate) async fn run<T, F>(self: &Arc<Self>, what: &'static str, query: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> rusqlite::Result<Result<T>> + Send + 'static,
    {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| Error::Closed)?;
        let readers = Arc::clone(self);
        let outcome = tokio::task::spawn_blocking(move || {
            // The permit moves in here: a caller that stops waiting drops
            // only its future, and the connection stays counted until it is
            // back in the pool. So there are never more connections than
            // permits.
            let _permit = permit;
            readers.query(&query)
        })
        .await
        .map_err(|join_error| Error::backend(format!("{what} panicked or was cancelled"), join_error))?;
        outcome.map_err(|error| {
            if crate::is_damage(&error) {
                Error::refused(crate::damage_message(&self.path, what), error)
            } else {
                Error::backend(what, error)
            }
        })?
    }

    /// Runs `query` on a connection of the pool. An `immutable` one (a
    /// read-only store at rest) reads the file as though nobody wrote it,
    /// and keeps pages in its cache on that assumption: its answer stands
    /// only if the file was at rest and unchanged from before the query to
    /// after it. Otherwise (a writer opened the store, or appended and
    /// closed it, meanwhile; a damaged-looking page read halfway through a
    /// checkpoint) the query runs again on a new connection.
    fn query<T>(&self, query: &dyn Fn(&Connection) -> rusqlite::Result<Result<T>>) -> rusqlite::Result<Result<T>> {
        for _ in 0..IMMUTABLE_TRIES {
            // Only a read-only store has immutable connections to check.
            let before = self.read_only_store.then(|| crate::schema::FileState::of(&self.path));
            let pooled = self.connection()?;
            let result = query(&pooled.conn);
            if !pooled.immutable {
                // A connection left inside a transaction would answer later
                // queries from an old snapshot; it is closed instead.
                if pooled.conn.is_autocommit() {
                    self.idle().push(pooled);
                }
                return result;
            }
            drop(pooled);
            if before.is_some_and(|before| before.is_at_rest() && crate::schema::FileState::of(&self.path) == before) {
                return result;
            }
        }
        Ok(Err(Error::backend(
            "reading a store opened read-only",
            std::io::Error::other(format!(
                "{} kept changing while it was read ({IMMUTABLE_TRIES} tries); read again",
                self.path.display()
            )),
        )))
    }

    pub(crate) fn idle_count(&self) -> usize {
        self.idle().len()
    }

    /// Closes every idle connection.
    pub(crate) fn close_idle(&self) {
        self.idle().clear();
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Pooled>> {
        // A panic while holding the lock leaves only a list of connections.
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Reads one stream; `Err(StreamNotFound)` when it has no events.
pub(crate) fn read_stream(
    conn: &Connection,
    stream: &StreamName,
    options: ReadStream,
) -> rusqlite::Result<Result<Vec<RecordedEvent>>> {
    let limit = to_sql_int(options.max_count as u64);
    let sql = match options.direction {
        Direction::Forwards => {
            const SQL: &str = concat!(
                "SELECT position, NULL, revision, event_id, event_type, data, metadata, recorded_at FROM events",
                " WHERE stream_id = (SELECT stream_id FROM streams WHERE name = ?1)",
                " AND revision >= ?2 ORDER BY revision ASC LIMIT ?3"
            );
            SQL
        }
        Direction::Backwards => {
            const SQL: &str = concat!(
                "SELECT position, NULL, revision, event_id, event_type, data, metadata, recorded_at FROM events",
                " WHERE stream_id = (SELECT stream_id FROM streams WHERE name = ?1)",
                " AND revision <= ?2 ORDER BY revision DESC LIMIT ?3"
            );
            SQL
        }
    };
    let from = match (options.direction, options.from) {
        (Direction::Forwards, StreamStart::Boundary) => 0,
        (Direction::Backwards, StreamStart::Boundary) => i64::MAX,
        (_, StreamStart::Revision(revision)) => to_sql_int(revision),
    };
    let read_events = || -> rusqlite::Result<Vec<RecordedEvent>> {
        conn.prepare_cached(sql)?
            .query_map((stream.as_str(), from, limit), |row| decode(row, Some(stream)))?
            .collect()
    };
    let events = read_events()?;
    if !events.is_empty() {
        return Ok(Ok(events));
    }
    // Empty is a valid answer only for a stream that exists (a read past its
    // end, or a zero limit). Each statement reads its own snapshot, so the
    // stream's first append may have committed since the read above: both
    // run again in one read transaction, which sees one snapshot.
    conn.prepare_cached("BEGIN DEFERRED")?.execute([])?;
    let snapshot = read_events().and_then(|events| {
        let exists = conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM streams WHERE name = ?1)")?
            .query_row([stream.as_str()], |row| row.get::<_, bool>(0))?;
        Ok((events, exists))
    });
    // A read transaction holds no lock worth keeping and has nothing to
    // undo: ending it cannot lose anything.
    let end = conn.prepare_cached("COMMIT").and_then(|mut commit| commit.execute([]));
    let (events, exists) = snapshot?;
    end?;
    if events.is_empty() && !exists {
        return Ok(Err(Error::StreamNotFound { stream: stream.clone() }));
    }
    Ok(Ok(events))
}

/// Reads a page of the global log, the start position included.
pub(crate) fn read_all(conn: &Connection, options: ReadAll) -> rusqlite::Result<Result<Vec<RecordedEvent>>> {
    let limit = to_sql_int(options.max_count as u64);
    // Positions here have equal parts (`Position::from_sequence`). A start
    // position from elsewhere may not; the bounds below keep the port's
    // order (commit, then prepare) exact for it too.
    let (sql, from) = match options.direction {
        Direction::Forwards => {
            const SQL: &str = concat!(
                "SELECT e.position, s.name, e.revision, e.event_id, e.event_type, e.data, e.metadata, e.recorded_at",
                " FROM events e JOIN streams s ON s.stream_id = e.stream_id",
                " WHERE e.position >= ?1 ORDER BY e.position ASC LIMIT ?2"
            );
            let from = match options.from {
                AllStart::Boundary => 0,
                AllStart::Position(Position { commit, prepare }) if prepare > commit => commit.saturating_add(1),
                AllStart::Position(Position { commit, .. }) => commit,
            };
            (SQL, from)
        }
        Direction::Backwards => {
            const SQL: &str = concat!(
                "SELECT e.position, s.name, e.revision, e.event_id, e.event_type, e.data, e.metadata, e.recorded_at",
                " FROM events e JOIN streams s ON s.stream_id = e.stream_id",
                " WHERE e.position <= ?1 ORDER BY e.position DESC LIMIT ?2"
            );
            let from = match options.from {
                AllStart::Boundary => u64::MAX,
                AllStart::Position(Position { commit, prepare }) if prepare < commit => commit - 1,
                AllStart::Position(Position { commit, .. }) => commit,
            };
            (SQL, from)
        }
    };
    let mut statement = conn.prepare_cached(sql)?;
    let events = statement
        .query_map((to_sql_int(from), limit), |row| decode(row, None))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Ok(events))
}

/// The event with `event_id`, through the unique index on it.
pub(crate) fn read_event(conn: &Connection, event_id: Uuid) -> rusqlite::Result<Result<Option<RecordedEvent>>> {
    const SQL: &str = concat!(
        "SELECT e.position, s.name, e.revision, e.event_id, e.event_type, e.data, e.metadata, e.recorded_at",
        " FROM events e JOIN streams s ON s.stream_id = e.stream_id WHERE e.event_id = ?1"
    );
    let event = conn
        .prepare_cached(SQL)?
        .query_row([event_id.as_bytes().as_slice()], |row| decode(row, None))
        .optional()?;
    Ok(Ok(event))
}

/// The position of the last committed event.
pub(crate) fn head_position(conn: &Connection) -> rusqlite::Result<Result<Option<Position>>> {
    let head = crate::schema::head_position(conn)?;
    Ok(Ok(head.map(|position| Position::from_sequence(position as u64))))
}

/// Decodes a row selecting `position, stream, revision, event_id,
/// event_type, data, metadata, recorded_at`, in that order. `stream` skips decoding the stream
/// column when the caller already knows it.
pub(crate) fn decode(row: &Row<'_>, stream: Option<&StreamName>) -> rusqlite::Result<RecordedEvent> {
    let stream = match stream {
        Some(stream) => stream.clone(),
        None => decode_stream(row.get(1)?, 1)?,
    };
    let recorded_at: i64 = row.get(7)?;
    Ok(RecordedEvent {
        stream,
        revision: row.get::<_, u64>(2)?,
        position: Position::from_sequence(row.get::<_, u64>(0)?),
        id: decode_uuid(row.get_ref(3)?.as_blob()?, 3)?,
        event_type: row.get(4)?,
        data: row.get(5)?,
        metadata: row.get(6)?,
        recorded_at: from_micros(recorded_at),
    })
}

/// A stored stream name, validated again: a damaged or hand-edited file
/// must not smuggle an invalid name into the port.
pub(crate) fn decode_stream(name: String, column: usize) -> rusqlite::Result<StreamName> {
    StreamName::new(name)
        .map_err(|error| rusqlite::Error::FromSqlConversionFailure(column, Type::Text, Box::new(error)))
}

pub(crate) fn decode_uuid(bytes: &[u8], column: usize) -> rusqlite::Result<Uuid> {
    Uuid::from_slice(bytes)
        .map_err(|error| rusqlite::Error::FromSqlConversionFailure(column, Type::Blob, Box::new(error)))
}

/// Microseconds since the Unix epoch, as stored in `recorded_at`.
pub(crate) fn to_micros(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |micros| -micros),
    }
}

fn from_micros(micros: i64) -> SystemTime {
    let magnitude = Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

/// SQLite integers are `i64`; bounds past its range mean "no bound".
pub(crate) fn to_sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_at_round_trips_through_microseconds() {
        for micros in [0, 1, 1_700_000_000_123_456, -5_000_001] {
            assert_eq!(to_micros(from_micros(micros)), micros);
        }
    }

    #[test]
    fn out_of_range_bounds_become_unbounded() {
        assert_eq!(to_sql_int(u64::MAX), i64::MAX);
        assert_eq!(to_sql_int(7), 7);
    }
}
