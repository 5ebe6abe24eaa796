//! Helpers shared by the CLI tests: run the real binary, compare snapshots,
//! count what is stored.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

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
    // Read as libpq reads them, for what a PostgreSQL URL leaves out.
    for libpq in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGAPPNAME",
        "PGOPTIONS",
        "PGCONNECT_TIMEOUT",
        "PGSSLMODE",
        "PGSSLROOTCERT",
        "PGSSLCERT",
        "PGSSLKEY",
        "PGSSLCRL",
        "PGSSLCRLDIR",
        "PGPASSWORD",
        "PGPASSFILE",
    ] {
        command.env_remove(libpq);
    }
    command
}

pub fn triage(dir: &Path, args: &[&str]) -> Output {
    command(dir).args(args).output().expect("the triage binary runs")
}

/// The names of the files in `dir`.
pub fn file_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
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

/// One plain HTTP/1.1 request; returns the status line and the body.
pub fn request(address: &str, method: &str, path: &str, token: &str, body: &str) -> (String, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.lines().next().unwrap_or_default().to_owned();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Starts `triage [global] serve --listen 127.0.0.1:0 --agents a.toml` in
/// `dir` and returns it with the address it printed.
pub fn start_server(dir: &Path, global: &[&str]) -> (Server, String) {
    let mut child = command(dir)
        .args(global)
        .args(["serve", "--listen", "127.0.0.1:0", "--agents", "a.toml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let address = first
        .trim()
        .strip_prefix("listening on http://")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_owned();
    (Server(child), address)
}

/// A `triage serve` child, killed and reaped when dropped, however the
/// test ends: a server left behind by a failed assertion kept its database
/// sessions (and with them its projections' leadership) after the test.
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        // Already stopped by the test: both answer at once.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
