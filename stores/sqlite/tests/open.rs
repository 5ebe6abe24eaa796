//! Opening safety: a file that is not a Triage store, is damaged or is newer
//! is refused with a typed `Error::Incompatible` and left byte-for-byte
//! unchanged; a good store reopens with its events.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use triage_event_store::{Error, EventData, EventStore, ExpectedRevision, ReadAll, ReadStream, StreamName};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions};
use uuid::Uuid;

fn event(size: usize) -> EventData {
    EventData {
        id: Uuid::new_v4(),
        event_type: "Tested".to_owned(),
        data: vec![b'x'; size],
        metadata: b"{}".to_vec(),
    }
}

fn side_file(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

/// Opens `path`, expects `Incompatible` whose message names the file and
/// contains `needle`, and checks that the file and its directory are
/// unchanged.
fn assert_refused_untouched(path: &Path, needle: &str) -> String {
    let before = std::fs::read(path).expect("file is readable");
    let message = match SqliteEventStore::open(path, SqliteOptions::default()) {
        Err(Error::Incompatible(message)) => message,
        other => panic!("expected Error::Incompatible for {}, got {other:?}", path.display()),
    };
    eprintln!("refused: {message}");
    assert!(
        message.contains(&path.display().to_string()),
        "message names the file: {message}"
    );
    assert!(message.contains(needle), "message says {needle:?}: {message}");
    assert_eq!(
        std::fs::read(path).expect("file is readable"),
        before,
        "the file is byte-for-byte unchanged"
    );
    for suffix in ["-wal", "-shm", "-journal"] {
        assert!(!side_file(path, suffix).exists(), "no {suffix} file was left behind");
    }
    message
}

/// Writes a store with `count` events of `size` bytes in one stream, closes
/// it, and returns the ids.
async fn write_store(path: &Path, count: usize, size: usize) -> Vec<Uuid> {
    let store = SqliteEventStore::open(path, SqliteOptions::default()).expect("store opens");
    let stream = StreamName::new("ticket-1").unwrap();
    let mut ids = Vec::new();
    for chunk in 0..count.div_ceil(10) {
        let batch: Vec<_> = (0..10.min(count - chunk * 10)).map(|_| event(size)).collect();
        ids.extend(batch.iter().map(|e| e.id));
        store.append(&stream, ExpectedRevision::Any, batch).await.unwrap();
    }
    drop(store);
    assert!(
        !side_file(path, "-wal").exists(),
        "a clean close checkpoints and removes the WAL"
    );
    ids
}

#[test]
fn random_bytes_are_not_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("random.db");
    let bytes: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, bytes).unwrap();
    assert_refused_untouched(&path, "not an SQLite database");
}

#[test]
fn a_text_file_is_not_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "just some notes\n").unwrap();
    assert_refused_untouched(&path, "not an SQLite database");
}

#[test]
fn a_foreign_sqlite_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreign.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA application_id = 0x0F0F0F0F;
             CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT);
             INSERT INTO customers (name) VALUES ('Ada');",
        )
        .unwrap();
    }
    let message = assert_refused_untouched(&path, "is not a Triage event store");
    assert!(
        message.contains("0x0f0f0f0f"),
        "message shows the application id: {message}"
    );
    assert!(
        message.contains("customers"),
        "message lists the foreign tables: {message}"
    );
}

/// A database that holds only a view has no tables, but is not blank: it
/// was turned into a Triage store.
#[test]
fn a_foreign_database_holding_only_a_view_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE VIEW report AS SELECT 42 AS answer;")
            .unwrap();
    }
    let message = assert_refused_untouched(&path, "is not a Triage event store");
    assert!(message.contains("report"), "message names the view: {message}");
}

/// Tables whose names merely start like SQLite's own (`sqlite_…` is
/// reserved; these are not) still make a database someone's.
#[test]
fn a_foreign_database_of_tables_named_like_sqlites_own_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tool.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE sqlitestudio_notes (x); INSERT INTO sqlitestudio_notes VALUES ('keep me');\
             CREATE TABLE sqlite3_cache (y);",
        )
        .unwrap();
    }
    let message = assert_refused_untouched(&path, "is not a Triage event store");
    assert!(
        message.contains("sqlitestudio_notes"),
        "message names the table: {message}"
    );
}

#[test]
fn a_foreign_database_without_application_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE events (x);")
            .unwrap();
    }
    assert_refused_untouched(&path, "is not a Triage event store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_from_a_newer_triage_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("newer.db");
    write_store(&path, 5, 10).await;
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 7).unwrap();
    }
    assert!(!side_file(&path, "-wal").exists());
    assert_refused_untouched(&path, "newer Triage (schema 7, this build reads up to 1)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("truncated.db");
    write_store(&path, 200, 1000).await;
    let full = std::fs::read(&path).unwrap();
    assert!(full.len() > 100_000, "the store spans many pages");
    // Cut at half: the header promises pages the file no longer has.
    std::fs::write(&path, &full[..full.len() / 2]).unwrap();
    assert_refused_untouched(&path, "damaged");
    // Cut inside the first page: the header survives, the schema does not.
    std::fs::write(&path, &full[..1000]).unwrap();
    assert_refused_untouched(&path, "damaged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_reopens_with_its_events_and_positions_keep_increasing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("triage.db");
    let ids = write_store(&path, 25, 10).await;

    let store = Arc::new(SqliteEventStore::open(&path, SqliteOptions::default()).unwrap());
    assert_eq!(store.describe(), format!("sqlite://{}", path.display()));
    let stream = StreamName::new("ticket-1").unwrap();
    let stored = store.read_stream(&stream, ReadStream::forwards()).await.unwrap();
    assert_eq!(stored.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    let head = store.head_position().await.unwrap().expect("the log is not empty");
    assert_eq!(head, stored.last().unwrap().position);

    let next = store
        .append(&stream, ExpectedRevision::Exact(24), vec![event(10)])
        .await
        .unwrap();
    assert_eq!(next.current_revision, 25);
    assert!(next.position > head, "{} is after {}", next.position, head);
    let other = store
        .append(
            &StreamName::new("ticket-2").unwrap(),
            ExpectedRevision::NoStream,
            vec![event(10)],
        )
        .await
        .unwrap();
    assert!(other.position > next.position);
    let log = store.read_all(ReadAll::forwards(1000)).await.unwrap();
    assert_eq!(log.len(), 27);
    assert!(log.windows(2).all(|pair| pair[0].position < pair[1].position));
}

#[test]
fn an_empty_file_is_initialized() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.db");
    std::fs::write(&path, b"").unwrap();
    let store = SqliteEventStore::open(&path, SqliteOptions::default()).expect("an empty file becomes a store");
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let application_id: i32 = conn.query_row("PRAGMA application_id", [], |row| row.get(0)).unwrap();
    let user_version: i32 = conn.query_row("PRAGMA user_version", [], |row| row.get(0)).unwrap();
    let journal_mode: String = conn.query_row("PRAGMA journal_mode", [], |row| row.get(0)).unwrap();
    assert_eq!(&application_id.to_be_bytes(), b"TRIA");
    assert_eq!(user_version, 1);
    assert_eq!(journal_mode, "wal");
}

#[test]
fn a_missing_directory_is_refused_not_incompatible() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("triage.db");
    match SqliteEventStore::open(&path, SqliteOptions::default()) {
        Err(Error::Refused { message, .. }) => assert!(message.contains("no-such-dir"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temporary_store_deletes_its_directory_on_drop() {
    let store = SqliteEventStore::open_temporary().unwrap();
    let dir = store.path().parent().unwrap().to_path_buf();
    store
        .append(
            &StreamName::new("ticket-1").unwrap(),
            ExpectedRevision::NoStream,
            vec![event(1)],
        )
        .await
        .unwrap();
    assert!(dir.exists());
    drop(store);
    assert!(!dir.exists(), "{} was deleted", dir.display());
}
