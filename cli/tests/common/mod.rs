//! Helpers shared by the CLI tests: run the real binary, compare snapshots,
//! count what is stored.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The triage binary in `dir`, with none of the caller's Triage settings.
pub fn command(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_triage"));
    command
        .current_dir(dir)
        .env_remove("TRIAGE_DB")
        .env_remove("TRIAGE_STORE")
        .env_remove("TRIAGE_READ_MODEL")
        .env_remove("RUST_LOG")
        .env("COLUMNS", "200");
    command
}

pub fn triage(dir: &Path, args: &[&str]) -> Output {
    command(dir).args(args).output().expect("the triage binary runs")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

#[track_caller]
pub fn succeed(dir: &Path, args: &[&str]) -> String {
    let output = triage(dir, args);
    assert!(output.status.success(), "triage {args:?} failed: {}", stderr(&output));
    stdout(&output)
}

#[track_caller]
pub fn fail(dir: &Path, args: &[&str]) -> String {
    let output = triage(dir, args);
    assert!(
        !output.status.success(),
        "triage {args:?} succeeded: {}",
        stdout(&output)
    );
    assert!(output.stdout.is_empty(), "failures print nothing on stdout");
    stderr(&output)
}

pub fn snapshot(name: &str, actual: &str) {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "snapshots", name]
        .iter()
        .collect();
    if std::env::var_os("TRIAGE_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("missing snapshot {}", path.display()));
    assert_eq!(actual, expected, "snapshot {name} differs (TRIAGE_BLESS=1 rewrites it)");
}

/// Events in ticket streams (refusals are recorded in `rejections-…`
/// streams, which never change a ticket). Counted through the binary itself,
/// a bug could hide in both; ask SQLite directly instead.
pub fn events_in(db: &Path) -> i64 {
    count_in_streams(db, "ticket-%")
}

pub fn rejections_in(db: &Path) -> i64 {
    count_in_streams(db, "rejections-%")
}

pub fn count_in_streams(db: &Path, pattern: &str) -> i64 {
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.query_row(
        "SELECT count(*) FROM events JOIN streams USING (stream_id) WHERE streams.name LIKE ?1",
        [pattern],
        |row| row.get(0),
    )
    .unwrap()
}
