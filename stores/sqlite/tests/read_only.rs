//! A store opened read-only, for analysts who may read a store file but not
//! write it or its directory: everything reads, nothing is written (not
//! the file, not a `-wal` or `-shm` beside it), appends are refused, and a
//! writer that opens the file later is seen.

use std::path::Path;

use triage_event_store::{Error, EventData, EventStore, ExpectedRevision, ReadAll, ReadStream, StreamName};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions};
use uuid::Uuid;

fn event() -> EventData {
    EventData {
        id: Uuid::new_v4(),
        event_type: "Tested".to_owned(),
        data: b"{}".to_vec(),
        metadata: b"{}".to_vec(),
    }
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("directory lists")
        .map(|entry| entry.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Appends `count` events to `stream` of the store at `path`, opened for
/// writing; returns their ids.
async fn append(store: &SqliteEventStore, stream: &str, count: usize) -> Vec<Uuid> {
    let stream = StreamName::new(stream).unwrap();
    let events: Vec<EventData> = (0..count).map(|_| event()).collect();
    let ids = events.iter().map(|event| event.id).collect();
    store
        .append(&stream, ExpectedRevision::Any, events)
        .await
        .expect("append");
    ids
}

/// A store in a new directory holding `count` events of `stream`, closed
/// (at rest); the directory and the store's path.
async fn store_at_rest(stream: &str, count: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("triage.db");
    let writer = SqliteEventStore::open(&path, SqliteOptions::default()).expect("store opens");
    append(&writer, stream, count).await;
    (dir, path)
}

#[tokio::test]
async fn a_store_opened_read_only_reads_everything_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("triage.db");
    let ids = {
        let writer = SqliteEventStore::open(&path, SqliteOptions::default()).expect("store opens");
        let mut ids = append(&writer, "ticket-1", 3).await;
        ids.extend(append(&writer, "ticket-2", 2).await);
        ids
    };
    let files_before = listing(dir.path());
    assert_eq!(
        files_before,
        ["triage.db"],
        "the writer closed and checkpointed the store"
    );
    let bytes_before = std::fs::read(&path).unwrap();

    let store = SqliteEventStore::open_read_only(&path, SqliteOptions::default()).expect("opens read-only");
    assert!(store.is_read_only());
    let all = store.read_all(ReadAll::forwards(100)).await.expect("reads $all");
    assert_eq!(all.iter().map(|record| record.id).collect::<Vec<_>>(), ids);
    let stream = store
        .read_stream(&StreamName::new("ticket-2").unwrap(), ReadStream::forwards())
        .await
        .expect("reads a stream");
    assert_eq!(stream.len(), 2);
    assert_eq!(
        store.head_position().await.unwrap(),
        all.last().map(|record| record.position)
    );
    assert_eq!(
        store.read_event(ids[1]).await.unwrap().map(|record| record.id),
        Some(ids[1])
    );
    assert!(!store.accepts_writes().await.unwrap());
    match store
        .append(
            &StreamName::new("ticket-3").unwrap(),
            ExpectedRevision::NoStream,
            vec![event()],
        )
        .await
    {
        Err(Error::Refused { message, .. }) => assert!(message.contains("read-only"), "{message}"),
        other => panic!("an append to a read-only store: {other:?}"),
    }
    drop(store);

    assert_eq!(listing(dir.path()), files_before, "no -wal or -shm file was made");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes_before,
        "the file is byte-for-byte unchanged"
    );
}

#[tokio::test]
async fn a_read_only_store_sees_a_writer_that_opens_the_file_later() {
    let (_dir, path) = store_at_rest("ticket-1", 2).await;
    let reader = SqliteEventStore::open_read_only(&path, SqliteOptions::default()).expect("opens read-only");
    assert_eq!(reader.read_all(ReadAll::forwards(100)).await.unwrap().len(), 2);

    // A writer opens the store (its -wal file appears) and appends.
    let writer = SqliteEventStore::open(&path, SqliteOptions::default()).unwrap();
    let later = append(&writer, "ticket-2", 3).await;
    let all = reader.read_all(ReadAll::forwards(100)).await.unwrap();
    assert_eq!(all.len(), 5, "the reader sees the writer's commits");
    assert_eq!(all[2..].iter().map(|record| record.id).collect::<Vec<_>>(), later);
    assert_eq!(
        reader.head_position().await.unwrap(),
        writer.head_position().await.unwrap()
    );
}

#[test]
fn what_is_not_a_store_is_refused_read_only_too() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    match SqliteEventStore::open_read_only(&missing, SqliteOptions::default()) {
        Err(Error::Backend { .. }) => {}
        other => panic!("a missing file: {other:?}"),
    }
    assert!(!missing.exists(), "no file was made");

    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    match SqliteEventStore::open_read_only(&empty, SqliteOptions::default()) {
        Err(Error::Incompatible(message)) => assert!(message.contains("empty"), "{message}"),
        other => panic!("an empty file: {other:?}"),
    }

    let text = dir.path().join("notes.db");
    std::fs::write(&text, "not a database, just some notes\n".repeat(200)).unwrap();
    match SqliteEventStore::open_read_only(&text, SqliteOptions::default()) {
        Err(Error::Incompatible(message)) => assert!(message.contains("not a Triage event store"), "{message}"),
        other => panic!("a text file: {other:?}"),
    }
    assert_eq!(
        listing(dir.path()),
        ["empty.db", "notes.db"],
        "nothing was made beside them"
    );
}

/// A writer that opens the store, appends and closes between two reads
/// (`triage ticket open`) leaves the store at rest again: the read-only
/// store still sees what it wrote, every time, as `events --follow` needs.
#[tokio::test]
async fn a_read_only_store_sees_writers_that_come_and_go() {
    let (dir, path) = store_at_rest("ticket-0", 50).await;
    let reader = SqliteEventStore::open_read_only(&path, SqliteOptions::default()).expect("opens read-only");
    let mut seen = reader.read_all(ReadAll::forwards(1000)).await.unwrap().len();
    assert_eq!(seen, 50);
    for round in 1..=5 {
        {
            let writer = SqliteEventStore::open(&path, SqliteOptions::default()).unwrap();
            append(&writer, &format!("ticket-{round}"), 40).await;
        }
        assert!(
            !dir.path().join("triage.db-wal").exists(),
            "the writer closed the store"
        );
        let all = reader.read_all(ReadAll::forwards(1000)).await.unwrap();
        assert_eq!(all.len(), seen + 40, "round {round}");
        seen = all.len();
        let stream = reader
            .read_stream(
                &StreamName::new(format!("ticket-{round}")).unwrap(),
                ReadStream::forwards(),
            )
            .await
            .expect("the new stream reads");
        assert_eq!(stream.len(), 40, "round {round}");
        assert_eq!(
            reader.head_position().await.unwrap(),
            all.last().map(|record| record.position)
        );
    }
}

/// An empty `-wal` file (a writer that opened the store and has written
/// nothing yet, or a copy taken with it) holds no commits: the store is
/// read as at rest, without making a `-shm` file.
#[tokio::test]
async fn an_empty_wal_file_is_read_as_a_store_at_rest() {
    let (dir, path) = store_at_rest("ticket-1", 3).await;
    std::fs::write(dir.path().join("triage.db-wal"), b"").unwrap();
    let before = listing(dir.path());
    let reader = SqliteEventStore::open_read_only(&path, SqliteOptions::default()).expect("opens read-only");
    assert_eq!(reader.read_all(ReadAll::forwards(100)).await.unwrap().len(), 3);
    drop(reader);
    assert_eq!(listing(dir.path()), before, "no -shm file was made");
}

/// A store file made read-only for this process while alive: by its mode,
/// and, for a process that modes do not stop (root), by the file system's
/// immutable attribute. `None` when neither stops this process here.
struct ReadOnlyFile {
    path: std::path::PathBuf,
    immutable: bool,
}

impl ReadOnlyFile {
    fn make(path: &Path) -> Option<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).unwrap();
        let mut guard = ReadOnlyFile {
            path: path.to_path_buf(),
            immutable: false,
        };
        let writable = || std::fs::OpenOptions::new().write(true).open(path).is_ok();
        if writable() {
            guard.immutable = std::process::Command::new("chattr")
                .arg("+i")
                .arg(path)
                .status()
                .is_ok_and(|status| status.success());
            if writable() {
                return None;
            }
        }
        Some(guard)
    }
}

impl Drop for ReadOnlyFile {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt as _;
        if self.immutable {
            let _ = std::process::Command::new("chattr").arg("-i").arg(&self.path).status();
        }
        let _ = std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o644));
    }
}

/// SQLite opens a file it may not write read-only without a word: the store
/// refuses to open it for writing instead (with a refusal that says it
/// cannot be written), and it opens read-only.
#[tokio::test]
async fn a_file_that_cannot_be_written_is_refused_for_writing_and_opens_read_only() {
    let (dir, path) = store_at_rest("ticket-1", 3).await;
    let Some(read_only) = ReadOnlyFile::make(&path) else {
        eprintln!("skipped: neither modes nor chattr make a file read-only for this process here");
        return;
    };
    match SqliteEventStore::open(&path, SqliteOptions::default()) {
        Err(error) => assert!(SqliteEventStore::is_not_writable(&error), "{error:?}"),
        Ok(_) => panic!("a store that cannot be written opened for writing"),
    }
    let reader = SqliteEventStore::open_read_only(&path, SqliteOptions::default()).expect("opens read-only");
    assert_eq!(reader.read_all(ReadAll::forwards(100)).await.unwrap().len(), 3);
    drop(reader);
    drop(read_only);
    assert_eq!(listing(dir.path()), ["triage.db"]);
}
