//! `ReadModelDb::open` refuses a file that is not a Triage read-model file,
//! or was written by a newer Triage, and leaves it byte-for-byte unchanged.

use std::path::Path;

use rusqlite::Connection;
use triage_projections::{APPLICATION_ID, ProjectionError, ReadModelDb, SCHEMA_VERSION};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions};

/// Opens `path`, expects a refusal naming `reason`, and checks the file did
/// not change and no journal was left next to it.
fn assert_refused_unchanged(path: &Path, reason: &str) {
    let before = std::fs::read(path).unwrap();
    let error = ReadModelDb::open(path).expect_err("the file must be refused");
    match &error {
        ProjectionError::Incompatible {
            path: refused,
            reason: why,
        } => {
            assert_eq!(refused, path);
            assert!(why.contains(reason), "reason {why:?} should mention {reason:?}");
        }
        other => panic!("expected Incompatible, got {other:?}"),
    }
    assert!(error.to_string().contains("left unchanged"), "{error}");
    assert_eq!(std::fs::read(path).unwrap(), before, "{} was modified", path.display());
    for suffix in ["-wal", "-journal"] {
        let mut sibling = path.as_os_str().to_owned();
        sibling.push(suffix);
        let sibling = Path::new(&sibling);
        assert!(
            !sibling.exists() || std::fs::metadata(sibling).unwrap().len() == 0,
            "{} was written",
            sibling.display()
        );
    }
}

#[test]
fn a_foreign_sqlite_file_is_refused_and_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('keep me');")
            .unwrap();
    }
    assert_refused_unchanged(&path, "not a Triage read-model file");
    // Even one whose tables look like ours.
    let lookalike = dir.path().join("lookalike.db");
    {
        let conn = Connection::open(&lookalike).unwrap();
        conn.execute_batch("CREATE TABLE projections (name TEXT PRIMARY KEY);")
            .unwrap();
        conn.pragma_update(None, "application_id", 0x1234_5678).unwrap();
    }
    assert_refused_unchanged(&lookalike, "not a Triage read-model file");
}

#[test]
fn an_event_store_file_is_refused_and_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("triage.db");
    drop(SqliteEventStore::open(&path, SqliteOptions::default()).unwrap());
    assert_refused_unchanged(&path, "it is a Triage event store, not a read-model file");
}

#[test]
fn random_bytes_are_refused_and_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut bytes = Vec::with_capacity(8192);
    while bytes.len() < 8192 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    let path = dir.path().join("noise.db");
    std::fs::write(&path, &bytes).unwrap();
    assert_refused_unchanged(&path, "not a readable SQLite database");

    // A valid SQLite header followed by garbage.
    let mut damaged = b"SQLite format 3\0".to_vec();
    damaged.extend_from_slice(&bytes[16..]);
    let path = dir.path().join("damaged.db");
    std::fs::write(&path, &damaged).unwrap();
    assert_refused_unchanged(&path, "");

    // A short text file.
    let path = dir.path().join("readme.db");
    std::fs::write(&path, "read models go here\n").unwrap();
    assert_refused_unchanged(&path, "");
}

#[test]
fn a_newer_schema_is_refused_and_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("triage.read.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE projections (name TEXT PRIMARY KEY, future TEXT);")
            .unwrap();
        conn.pragma_update(None, "application_id", APPLICATION_ID).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
    }
    assert_refused_unchanged(&path, "newer Triage");
}

#[test]
fn empty_and_own_files_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    // An empty file (as `touch` leaves it) becomes a read-model file.
    let path = dir.path().join("triage.read.db");
    std::fs::write(&path, b"").unwrap();
    drop(ReadModelDb::open(&path).unwrap());
    let conn = Connection::open(&path).unwrap();
    let (id, version): (i32, i32) = conn
        .query_row("SELECT * FROM pragma_application_id, pragma_user_version", [], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .unwrap();
    assert_eq!((id, version), (APPLICATION_ID, SCHEMA_VERSION));
    drop(conn);
    // And it opens again.
    drop(ReadModelDb::open(&path).unwrap());
}
