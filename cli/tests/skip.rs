//! `--skip-event-type` through the real binary: every command that decodes
//! events honours it for a type this build does not know, and none passes
//! over a damaged event of a type it does know.

mod common;

use std::path::Path;

use common::{fail, succeed};

const TICKET: &str = "00000000-0000-4000-8000-0000000000c1";

/// Appends a row to the ticket's stream behind the store's back, as a
/// newer Triage (or damage) would leave it: `event_type` with `data`, and
/// the metadata of the stream's last event. Returns its position.
fn append_raw(db: &Path, event_type: &str, data: &str) -> i64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    let (stream_id, revision, metadata, recorded_at): (i64, i64, Vec<u8>, i64) = conn
        .query_row(
            "SELECT e.stream_id, e.revision, e.metadata, e.recorded_at FROM events e
             JOIN streams s USING (stream_id) WHERE s.name = ?1 ORDER BY e.revision DESC LIMIT 1",
            [format!("ticket-{TICKET}")],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
        )
        .unwrap();
    let position: i64 = conn
        .query_row("SELECT max(position) + 1 FROM events", [], |row| row.get(0))
        .unwrap();
    conn.execute(
        "INSERT INTO events (position, stream_id, revision, event_id, event_type, data, metadata, recorded_at)
         VALUES (?1, ?2, ?3, randomblob(16), ?4, ?5, ?6, ?7)",
        rusqlite::params![
            position,
            stream_id,
            revision + 1,
            event_type,
            data.as_bytes(),
            metadata,
            recorded_at
        ],
    )
    .unwrap();
    position
}

fn open_ticket(dir: &Path) {
    succeed(
        dir,
        &["ticket", "open", "--subject", "S", "--body", "B", "--id", TICKET],
    );
}

#[test]
fn every_command_that_decodes_events_honours_skip_event_type() {
    let dir = tempfile::tempdir().unwrap();
    open_ticket(dir.path());
    let position = append_raw(
        &dir.path().join("triage.db"),
        "TicketTeleported",
        r#"{"to":"elsewhere"}"#,
    );
    let skip = ["--skip-event-type", "TicketTeleported"];
    let until = position.to_string();
    let commands: [&[&str]; 5] = [
        &["ticket", "list"],
        &["ticket", "history", TICKET],
        &["ticket", "show", TICKET, "--at", "0"],
        &["stats", "--since", "2000-01-01T00:00:00Z"],
        &["replay", "--until", &until, "--into", "scratch.db"],
    ];
    for command in commands {
        // Without the flag each one stops at the event, and says how to
        // pass over it.
        let refused = fail(dir.path(), command);
        assert!(
            refused.contains("--skip-event-type TicketTeleported"),
            "{command:?}: {refused}"
        );
        // A failed replay leaves no scratch file behind to block a retry.
        assert!(!dir.path().join("scratch.db").exists(), "{command:?}");
        let args: Vec<&str> = skip.iter().chain(command).copied().collect();
        succeed(dir.path(), &args);
    }
    assert!(dir.path().join("scratch.db").exists());
}

#[test]
fn a_damaged_event_of_a_known_type_is_never_skipped() {
    let dir = tempfile::tempdir().unwrap();
    open_ticket(dir.path());
    append_raw(&dir.path().join("triage.db"), "TicketClassified", "{not json");
    let refused = fail(dir.path(), &["ticket", "list"]);
    assert!(refused.contains("damaged"), "{refused}");
    assert!(!refused.contains("--skip-event-type"), "{refused}");
    // Asked to skip it all the same, the read model still stops there
    // rather than drop the event for good.
    let refused = fail(dir.path(), &["--skip-event-type", "TicketClassified", "ticket", "list"]);
    assert!(refused.contains("damaged"), "{refused}");
}
