//! `triage events` through the real binary: formats that round-trip,
//! filters, and exit codes scripts can rely on.

mod common;

use std::path::Path;

use common::{fail, snapshot, succeed, triage};
use serde_json::Value;

/// Two tickets with fixed ids and command ids; returns their ids.
fn seed(dir: &Path) -> [&'static str; 2] {
    let ids = [
        "00000000-0000-4000-8000-000000000001",
        "00000000-0000-4000-8000-000000000002",
    ];
    for (n, id) in ids.iter().enumerate() {
        let command = format!("00000000-0000-4000-8000-0000000000a{n}");
        succeed(
            dir,
            &[
                "ticket",
                "open",
                "--subject",
                "Subject, with \"quotes\"",
                "--body",
                "line one\nline two",
                "--id",
                id,
                "--command-id",
                &command,
            ],
        );
    }
    succeed(
        dir,
        &[
            "ticket",
            "send",
            ids[0],
            r#"{"type":"start_classification"}"#,
            "--agent",
            "c-1",
            "--role",
            "classifier",
            "--command-id",
            "00000000-0000-4000-8000-0000000000b0",
        ],
    );
    // A refusal, recorded in the ticket's rejections stream.
    let refused = triage(
        dir,
        &[
            "ticket",
            "send",
            ids[1],
            r#"{"type":"start_drafting"}"#,
            "--agent",
            "d-1",
            "--role",
            "drafter",
            "--command-id",
            "00000000-0000-4000-8000-0000000000c0",
        ],
    );
    assert!(!refused.status.success());
    ids
}

#[test]
fn json_lines_and_csv_parse_with_standard_parsers_and_agree_on_every_field() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    let jsonl: Vec<Value> = succeed(dir.path(), &["events", "--format", "jsonl"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let csv_text = succeed(dir.path(), &["events", "--format", "csv"]);
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    let header: Vec<String> = reader.headers().unwrap().iter().map(str::to_owned).collect();
    assert_eq!(
        header,
        [
            "position",
            "stream",
            "ticket_id",
            "revision",
            "id",
            "type",
            "recorded_at",
            "data",
            "metadata",
            "agent_id",
            "role",
            "command_id",
            "correlation_id"
        ]
    );
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(jsonl.len(), 4, "3 ticket events and 1 refusal");
    assert_eq!(rows.len(), jsonl.len());
    for (json, row) in jsonl.iter().zip(&rows) {
        assert_eq!(json["position"], row[0]);
        assert_eq!(json["stream"], row[1]);
        assert_eq!(json["ticket_id"], row[2]);
        assert_eq!(json["revision"].as_u64().unwrap().to_string(), row[3]);
        assert_eq!(json["id"], row[4]);
        assert_eq!(json["type"], row[5]);
        let json_time = chrono::DateTime::parse_from_rfc3339(json["recorded_at"].as_str().unwrap()).unwrap();
        let csv_time = chrono::DateTime::parse_from_rfc3339(&row[6]).unwrap();
        assert_eq!(json_time, csv_time);
        assert_eq!(json["data"], serde_json::from_str::<Value>(&row[7]).unwrap());
        assert_eq!(json["metadata"], serde_json::from_str::<Value>(&row[8]).unwrap());
        // The metadata's fields analysts filter on, as columns of their own.
        assert_eq!(json["metadata"]["agent"]["id"], row[9]);
        assert_eq!(json["metadata"]["agent"]["role"], row[10]);
        assert_eq!(json["metadata"]["command_id"], row[11]);
        assert_eq!(json["metadata"]["correlation_id"], row[12]);
        assert!(!row[9].is_empty() && !row[11].is_empty());
    }
    // The payload survives commas, quotes and newlines.
    assert_eq!(jsonl[0]["data"]["subject"], "Subject, with \"quotes\"");
    assert_eq!(jsonl[0]["data"]["body"], "line one\nline two");
    assert_eq!(jsonl[3]["type"], "CommandRejected");
    assert_eq!(jsonl[3]["ticket_id"], "00000000-0000-4000-8000-000000000002");
    assert_eq!(jsonl[2]["metadata"]["agent"]["id"], "c-1");
}

/// The table shortens stream names and command ids to fit a terminal;
/// `--wide` prints them whole, to copy into another command.
#[test]
fn the_wide_table_prints_whole_ids() {
    let dir = tempfile::tempdir().unwrap();
    let ids = seed(dir.path());
    let stream = format!("ticket-{}", ids[0]);
    let command = "00000000-0000-4000-8000-0000000000a0";
    let narrow = succeed(dir.path(), &["events", "--format", "table"]);
    assert!(!narrow.contains(&stream) && !narrow.contains(command), "{narrow}");
    let wide = succeed(dir.path(), &["events", "--format", "table", "--wide"]);
    assert!(wide.contains(&stream) && wide.contains(command), "{wide}");
    assert_eq!(wide.lines().count(), narrow.lines().count());
}

#[test]
fn filters_narrow_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let ids = seed(dir.path());
    let count = |args: &[&str]| {
        let mut all = vec!["events", "--format", "jsonl"];
        all.extend_from_slice(args);
        succeed(dir.path(), &all).lines().count()
    };
    assert_eq!(count(&["--ticket", ids[1]]), 2, "the ticket's event and its refusal");
    assert_eq!(count(&["--stream", &format!("ticket-{}", ids[1])]), 1);
    assert_eq!(
        count(&["--stream", &format!("rejections-{}", ids[1].to_uppercase())]),
        1,
        "a stream's uuid in upper case, as --ticket takes it"
    );
    assert_eq!(count(&["--type", "TicketOpened"]), 2);
    assert_eq!(count(&["--type", "TicketOpened,ClassificationStarted"]), 3);
    assert_eq!(
        count(&["--type", "TicketOpened, ClassificationStarted"]),
        3,
        "a space after the comma dropped the second type"
    );
    assert_eq!(count(&["--type", "CommandRejected"]), 1);
    // A type this build does not write is a bad argument, not "no events
    // match".
    for (bad, says) in [
        ("ticketopened", "did you mean TicketOpened?"),
        ("Bogus", "the types are TicketOpened"),
        ("", "is not an event type"),
    ] {
        let output = common::triage(dir.path(), &["events", "--type", bad]);
        assert_eq!(output.status.code(), Some(2), "{bad:?}");
        assert!(common::stderr(&output).contains(says), "{}", common::stderr(&output));
    }
    // A KurrentDB position on a store of plain positions names no event.
    for args in [
        &["events", "--from-position", "C:5/P:1"][..],
        &["replay", "--until", "C:1/P:5", "--into", "never.db"][..],
    ] {
        let output = common::triage(dir.path(), args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            common::stderr(&output).contains("is a KurrentDB position"),
            "{}",
            common::stderr(&output)
        );
    }
    assert!(!dir.path().join("never.db").exists());
    // --json and another --format: which was meant cannot be told (the
    // format won, silently).
    for format in ["csv", "table"] {
        let output = common::triage(dir.path(), &["--json", "events", "--format", format]);
        assert_eq!(output.status.code(), Some(2), "{format}");
        assert!(
            common::stderr(&output).contains(&format!("--format for {format}")),
            "{}",
            common::stderr(&output)
        );
    }
    assert_eq!(
        succeed(dir.path(), &["--json", "events", "--format", "jsonl"])
            .lines()
            .count(),
        count(&[]),
        "--json with --format jsonl agree"
    );
    assert_eq!(count(&["--role", "classifier"]), 1);
    assert_eq!(count(&["--agent", "d-1"]), 1);
    assert_eq!(count(&["--command-id", "00000000-0000-4000-8000-0000000000b0"]), 1);
    assert_eq!(count(&["--from-position", "2", "--to-position", "3"]), 2);
    assert_eq!(count(&["--since", "2000-01-01T00:00:00Z"]), 4);
}

#[test]
fn bad_input_and_empty_ranges_have_clear_messages_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    let unknown = triage(
        dir.path(),
        &["events", "--ticket", "6b1d0d0e-0000-4000-8000-000000000000"],
    );
    assert_eq!(unknown.status.code(), Some(3));
    assert!(common::stderr(&unknown).contains("ticket 6b1d0d0e-0000-4000-8000-000000000000 has no matching events"));
    let empty = triage(dir.path(), &["events", "--since", "2099-01-01T00:00:00Z"]);
    assert_eq!(empty.status.code(), Some(3), "a range with no events");
    assert!(
        common::stderr(&empty).contains("no events in sqlite://./triage.db match"),
        "{}",
        common::stderr(&empty)
    );
    let malformed = triage(dir.path(), &["events", "--since", "last tuesday"]);
    assert_eq!(malformed.status.code(), Some(2));
    assert!(common::stderr(&malformed).contains("is not an RFC 3339 time"));
    let position = triage(dir.path(), &["events", "--from-position", "first"]);
    assert_eq!(position.status.code(), Some(2));
    assert!(common::stderr(&position).contains("is not a position"));
    let inverted = triage(
        dir.path(),
        &[
            "events",
            "--since",
            "2026-01-02T00:00:00Z",
            "--until",
            "2026-01-01T00:00:00Z",
        ],
    );
    // Parsed, but an empty range: a bad argument, as `--help` says.
    assert_eq!(inverted.status.code(), Some(2));
    assert!(common::stderr(&inverted).contains("is not before --until"));
    // The same range is the same mistake for `stats`.
    let stats = triage(
        dir.path(),
        &[
            "stats",
            "--since",
            "2026-01-02T00:00:00Z",
            "--until",
            "2026-01-01T00:00:00Z",
        ],
    );
    assert_eq!(stats.status.code(), Some(2), "{}", common::stderr(&stats));
    assert!(common::stderr(&stats).contains("is not before --until"));
}

/// A reader that closes the pipe early (`triage events | head -1`) has
/// what it wanted: every format ends quietly with status 0, also when the
/// closed pipe is found by the last flush of output that was buffered.
#[test]
fn a_reader_that_goes_away_is_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    for format in ["csv", "jsonl", "table"] {
        let mut child = common::command(dir.path())
            .args(["events", "--format", format])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Closed before the process can have written: its first write or
        // flush finds the pipe closed.
        drop(child.stdout.take());
        let output = child.wait_with_output().unwrap();
        let stderr = common::stderr(&output);
        assert!(output.status.success(), "{format}: {:?} {stderr}", output.status);
        assert!(!stderr.contains("Broken pipe"), "{format}: {stderr}");
    }
}

#[test]
fn the_table_for_people() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    let table = succeed(dir.path(), &["events", "--format", "table"]);
    // Mask the recording times, which change from run to run.
    let masked: String = table
        .lines()
        .map(|line| match line.find("2026-").or_else(|| line.find("20")) {
            Some(at) if line.len() > at + 24 && line.as_bytes()[at + 4] == b'-' => {
                format!("{}<time>{}", &line[..at], &line[at + 24..])
            }
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    snapshot("events-table.txt", &masked);
}

#[test]
fn a_ticket_timeline_shows_transitions_time_in_state_and_refused_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let ids = seed(dir.path());
    let first: Vec<Value> = succeed(dir.path(), &["ticket", "history", ids[0], "--json"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(first.len(), 2);
    assert_eq!(
        (first[0]["from"].clone(), first[0]["to"].clone()),
        (Value::Null, Value::from("NEW"))
    );
    assert_eq!(
        (first[1]["from"].clone(), first[1]["to"].clone()),
        (Value::from("NEW"), Value::from("CLASSIFYING"))
    );
    assert!(first[1]["time_in_from_state_ms"].as_i64().unwrap() >= 0);
    assert_eq!(first[1]["agent"]["id"], "c-1");
    // A refusal names the ticket revision it was decided on and moves
    // nothing; its own revision in the rejections stream is not the
    // ticket's.
    fail(
        dir.path(),
        &[
            "ticket",
            "send",
            ids[0],
            r#"{"type":"start_drafting"}"#,
            "--agent",
            "d-2",
            "--role",
            "drafter",
        ],
    );
    let first: Vec<Value> = succeed(dir.path(), &["ticket", "history", ids[0], "--json"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(first.len(), 3);
    assert_eq!(first[2]["refused"], true);
    assert_eq!(first[2]["revision"], 1, "{}", first[2]);
    assert_eq!(
        (first[2]["from"].clone(), first[2]["to"].clone()),
        (Value::from("CLASSIFYING"), Value::Null)
    );
    let second: Vec<Value> = succeed(dir.path(), &["ticket", "history", ids[1], "--json"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(second.len(), 2, "the opening and the refused start_drafting");
    assert_eq!(second[1]["refused"], true);
    assert_eq!(second[1]["code"], "invalid_transition");
    assert_eq!(second[1]["from"], "NEW");
    let people = succeed(dir.path(), &["ticket", "history", ids[1]]);
    assert!(
        people.contains("✗ invalid_transition") && people.contains("refused start_drafting"),
        "{people}"
    );
}

/// Folds the ticket events of `triage events` output up to a point, as an
/// independent check of time travel.
fn fold_until(dir: &Path, ticket: &str, keep: impl Fn(&Value) -> bool) -> triage_domain::Ticket {
    let events: Vec<triage_domain::Event> = succeed(
        dir,
        &["events", "--stream", &format!("ticket-{ticket}"), "--format", "jsonl"],
    )
    .lines()
    .map(|line| serde_json::from_str::<Value>(line).unwrap())
    .filter(|row| keep(row))
    .map(|row| serde_json::from_value(row["data"].clone()).unwrap())
    .collect();
    triage_domain::Ticket::from_events(&events)
}

#[test]
fn time_travel_equals_folding_the_stream_up_to_that_point() {
    let dir = tempfile::tempdir().unwrap();
    let ids = seed(dir.path());
    for revision in 0..=1u64 {
        let shown: Value = serde_json::from_str(&succeed(
            dir.path(),
            &["ticket", "show", ids[0], "--at", &revision.to_string(), "--json"],
        ))
        .unwrap();
        let folded = fold_until(dir.path(), ids[0], |row| row["revision"].as_u64().unwrap() <= revision);
        assert_eq!(
            shown["state"],
            serde_json::to_value(folded.state).unwrap(),
            "at revision {revision}"
        );
        assert_eq!(shown["revision"], revision);
    }
    // By time: the moment of the opening shows the new ticket.
    let opened_at = succeed(
        dir.path(),
        &["events", "--stream", &format!("ticket-{}", ids[0]), "--format", "jsonl"],
    )
    .lines()
    .next()
    .map(|line| {
        serde_json::from_str::<Value>(line).unwrap()["recorded_at"]
            .as_str()
            .unwrap()
            .to_owned()
    })
    .unwrap();
    let at_open: Value = serde_json::from_str(&succeed(
        dir.path(),
        &["ticket", "show", ids[0], "--at", &opened_at, "--json"],
    ))
    .unwrap();
    assert_eq!(at_open["state"], "NEW");
    let error = common::fail(dir.path(), &["ticket", "show", ids[0], "--at", "2001-01-01T00:00:00Z"]);
    assert!(error.contains("did not exist yet"), "{error}");
    let error = common::fail(dir.path(), &["ticket", "show", ids[0], "--at", "yesterday"]);
    assert!(error.contains("neither a revision number nor a time"), "{error}");
}

#[test]
fn replay_builds_the_read_models_as_of_a_moment_and_leaves_the_live_ones_alone() {
    let dir = tempfile::tempdir().unwrap();
    let ids = seed(dir.path());
    let live_before = succeed(dir.path(), &["ticket", "list", "--json"]);
    succeed(dir.path(), &["replay", "--until", "2", "--into", "then.db"]);
    // The file's tickets and states, read with SQLite itself.
    let states_in_file = || -> Vec<(String, String)> {
        let conn = rusqlite::Connection::open(dir.path().join("then.db")).unwrap();
        let mut states: Vec<(String, String)> = conn
            .prepare("SELECT ticket_id, state FROM tickets ORDER BY ticket_id")
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        states.sort();
        states
    };
    let states = states_in_file();
    let expected: Vec<(String, String)> = ids
        .iter()
        .map(|id| {
            let folded = fold_until(dir.path(), id, |row| {
                row["position"].as_str().unwrap().parse::<u64>().unwrap() <= 2
            });
            (id.to_string(), folded.state.unwrap().to_string())
        })
        .collect();
    assert_eq!(
        states, expected,
        "both tickets opened, neither claimed yet at position 2"
    );
    assert_eq!(
        succeed(dir.path(), &["ticket", "list", "--json"]),
        live_before,
        "the live model is untouched"
    );
    // Querying the file as a read model, as `replay --help` suggests,
    // shows that moment, and leaves the file there.
    let listed: Vec<(String, String)> = {
        let out = succeed(dir.path(), &["--read-model", "then.db", "ticket", "list", "--json"]);
        let mut rows: Vec<(String, String)> = out
            .lines()
            .map(|line| {
                let row: Value = serde_json::from_str(line).unwrap();
                (
                    row["id"].as_str().unwrap().to_owned(),
                    row["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        rows.sort();
        rows
    };
    assert_eq!(listed, expected, "the replay file is read as of position 2");
    let rebuild = common::fail(
        dir.path(),
        &["--read-model", "then.db", "projections", "rebuild", "--all"],
    );
    assert!(rebuild.contains("triage replay"), "{rebuild}");
    assert_eq!(states_in_file(), expected, "the file still holds position 2");
    let again = common::fail(dir.path(), &["replay", "--until", "2", "--into", "then.db"]);
    assert!(again.contains("already exists"), "{again}");
    let none = triage(
        dir.path(),
        &["replay", "--until", "2001-01-01T00:00:00Z", "--into", "never.db"],
    );
    assert_eq!(none.status.code(), Some(3));
    // Position 0 is before the first event too (it made an empty file and
    // exited 0).
    let zero = triage(dir.path(), &["replay", "--until", "0", "--into", "never.db"]);
    assert_eq!(zero.status.code(), Some(3), "{}", common::stderr(&zero));
    let nowhere = common::fail(dir.path(), &["replay", "--until", "2", "--into", "nodir/x.db"]);
    assert!(nowhere.contains("there is no directory nodir"), "{nowhere}");
    let garbled = triage(dir.path(), &["replay", "--until", "yesterday", "--into", "never.db"]);
    assert_eq!(
        garbled.status.code(),
        Some(2),
        "a bad argument: {}",
        common::stderr(&garbled)
    );
    assert!(common::stderr(&garbled).contains("neither a log position nor a time"));
    assert!(!dir.path().join("never.db").exists());

    // What a replay killed mid-way left (its process is gone: no pid is
    // this high) is cleared by the next replay into the same path.
    let abandoned = ".later.db.partial-4294967";
    for suffix in ["", "-wal", "-shm"] {
        std::fs::write(dir.path().join(format!("{abandoned}{suffix}")), b"left behind").unwrap();
    }
    succeed(dir.path(), &["replay", "--until", "2", "--into", "later.db"]);
    let left: Vec<String> = common::file_names(dir.path())
        .into_iter()
        .filter(|name| name.contains(".partial-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // A directory that cannot be written is named as such. Root may write
    // any directory, so as root the replay runs as `nobody` (runuser).
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    let args = ["replay", "--until", "2", "--into", "locked/x.db"];
    let refused = if std::fs::write(locked.join("probe"), b"").is_err() {
        Some(common::fail(dir.path(), &args))
    } else {
        let mode = |path: &std::path::Path, mode| {
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
        };
        mode(dir.path(), 0o777);
        mode(&dir.path().join("triage.db"), 0o644);
        std::process::Command::new("runuser")
            .args(["-u", "nobody", "--", env!("CARGO_BIN_EXE_triage")])
            .args(args)
            .current_dir(dir.path())
            .env_remove("TRIAGE_DB")
            .env_remove("TRIAGE_STORE")
            .env_remove("TRIAGE_READ_MODEL")
            .output()
            .ok()
            .filter(|output| !output.status.success())
            .map(|output| common::stderr(&output))
    };
    match refused {
        Some(refused) => {
            assert!(
                refused.contains("cannot write the replay's file in locked"),
                "{refused}"
            );
            assert!(!refused.contains("Error code"), "{refused}");
        }
        None => eprintln!("skipped: the unwritable directory case (root here, and runuser cannot run as nobody)"),
    }
}

/// Two replays into one path at once: exactly one makes the file, the
/// other is refused, and the file is wholly the winner's (its limit and
/// its models agree). Each is built under a name of its own and linked
/// into place only when finished, so nothing half-built is ever seen
/// there either.
#[test]
fn of_two_replays_into_one_file_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    for round in 0..8 {
        let file = format!("race-{round}.db");
        // Half the rounds into an empty file that exists (as `mktemp`
        // makes), which a replay may fill: one wins there too.
        if round % 2 == 1 {
            std::fs::write(dir.path().join(&file), b"").unwrap();
        }
        let start = |until: &str| {
            common::command(dir.path())
                .args(["replay", "--until", until, "--into", &file])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let early = start("2");
        let late = start("1000000");
        let (early, late) = (early.wait_with_output().unwrap(), late.wait_with_output().unwrap());
        assert!(
            early.status.success() != late.status.success(),
            "round {round}: exactly one succeeds: {} / {}",
            common::stderr(&early),
            common::stderr(&late)
        );
        let loser = if early.status.success() { &late } else { &early };
        assert!(
            common::stderr(loser).contains("already exists"),
            "{}",
            common::stderr(loser)
        );
        let conn = rusqlite::Connection::open(dir.path().join(&file)).unwrap();
        let limit: i64 = conn
            .query_row("SELECT commit_position FROM replay_limit", [], |row| row.get(0))
            .unwrap();
        let tickets: i64 = conn
            .query_row("SELECT count(*) FROM tickets", [], |row| row.get(0))
            .unwrap();
        let claimed: i64 = conn
            .query_row(
                "SELECT count(*) FROM tickets WHERE claim_id IS NOT NULL OR state <> 'NEW'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        if early.status.success() {
            assert_eq!((limit, tickets, claimed), (2, 2, 0), "round {round}: the replay to 2");
        } else {
            assert!(
                limit > 2 && claimed > 0,
                "round {round}: the replay to the end: {limit}, {claimed}"
            );
        }
    }
    let leftovers: Vec<String> = common::file_names(dir.path())
        .into_iter()
        .filter(|name| name.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A replay to a time holds the events recorded up to that nanosecond and
/// none recorded after it.
#[test]
fn a_replay_to_a_time_ends_at_that_nanosecond() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    let events: Vec<Value> = succeed(dir.path(), &["events", "--json"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let last = events.last().unwrap();
    let recorded: chrono::DateTime<chrono::Utc> = last["recorded_at"].as_str().unwrap().parse().unwrap();
    let replay_to = |time: chrono::DateTime<chrono::Utc>, file: &str| -> Value {
        let text = time.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        serde_json::from_str(&succeed(
            dir.path(),
            &["--json", "replay", "--until", &text, "--into", file],
        ))
        .unwrap()
    };
    let at = replay_to(recorded, "at.db");
    assert_eq!(at["reached"], last["position"], "{at}");
    let just_before = replay_to(recorded - chrono::Duration::nanoseconds(1), "before.db");
    assert_eq!(
        just_before["reached"],
        events[events.len() - 2]["position"],
        "{just_before}"
    );
}

/// A position past the end of the log is the log as it is now, and the
/// file stays there: an append made afterwards is not in it.
#[test]
fn a_replay_past_the_head_stays_at_the_head() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    let head = succeed(dir.path(), &["events", "--format", "jsonl"]).lines().count();
    let out = succeed(dir.path(), &["replay", "--until", "1000000", "--into", "now.db"]);
    assert!(out.contains(&format!("as of log position {head}")), "{out}");
    let listed = || {
        succeed(dir.path(), &["--read-model", "now.db", "ticket", "list", "--json"])
            .lines()
            .count()
    };
    let before = listed();
    let seeded = succeed(dir.path(), &["ticket", "list", "--json"]).lines().count();
    assert!(
        before > 0 && before == seeded,
        "the file holds the seeded tickets: {before} of {seeded}"
    );
    succeed(dir.path(), &["ticket", "open", "--subject", "later", "--body", "b"]);
    assert_eq!(listed(), before, "a ticket opened after the replay is not in the file");
}

#[test]
fn stats_for_a_period_and_by_group_come_from_the_events() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    let window: Value = serde_json::from_str(&succeed(
        dir.path(),
        &[
            "stats",
            "--since",
            "2000-01-01T00:00:00Z",
            "--until",
            "2100-01-01T00:00:00Z",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(window["summary"]["counters"]["events"], 4, "3 events and 1 refusal");
    assert_eq!(window["summary"]["counters"]["rejections"], 1);
    assert_eq!(window["rates"]["rejection_rate"], 0.25);
    assert!(window["rates"]["span_s"].as_f64().unwrap() >= 0.0);
    let by_role: Value = serde_json::from_str(&succeed(dir.path(), &["stats", "--by", "role", "--json"])).unwrap();
    assert_eq!(by_role["roles"]["classifier"]["claimed"], 1);
    assert_eq!(by_role["roles"]["drafter"]["refused"], 1);
    let groups: Vec<Value> = succeed(dir.path(), &["stats", "--by", "category", "--json"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(groups.len(), 1, "no ticket is classified yet");
    assert_eq!(groups[0]["group"], "unclassified");
    let empty = triage(dir.path(), &["stats", "--since", "2099-01-01T00:00:00Z"]);
    assert_eq!(empty.status.code(), Some(3));
    assert!(common::stderr(&empty).contains("fall in that period"));
}

/// A period that begins mid-ticket knows where the ticket stood: a stage
/// begun before it and completed inside it counts with its whole duration,
/// the ticket is counted in the state it reached, and `--by category`
/// groups by the category a ticket had at the end of the period, not by
/// the one it got later. Rates are over the period asked for.
#[test]
fn a_period_that_begins_mid_ticket_counts_whole_stages_and_the_categories_of_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let ids = seed(dir.path());
    std::thread::sleep(std::time::Duration::from_millis(50));
    let middle = chrono::Utc::now();
    let middle_text = middle.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let claim_id = "00000000-0000-4000-8000-0000000000b0";
    succeed(
        dir.path(),
        &[
            "ticket",
            "send",
            ids[0],
            &format!(
                r#"{{"type":"classify","claim_id":"{claim_id}","category":"billing","priority":"high","confidence":0.9}}"#
            ),
            "--agent",
            "c-1",
            "--role",
            "classifier",
        ],
    );
    let stats = |args: &[&str]| -> Vec<Value> {
        let mut all = vec!["stats", "--json"];
        all.extend_from_slice(args);
        succeed(dir.path(), &all)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    };

    let after = &stats(&["--since", &middle_text])[0];
    let classify = &after["summary"]["stage_latency"]["classify"];
    assert_eq!(classify["count"], 1, "{after}");
    assert!(
        classify["p50_ms"].as_u64().unwrap() >= 100,
        "the stage is timed from its start before the period: {classify}"
    );
    assert_eq!(
        after["summary"]["tickets_per_state"],
        serde_json::json!({"CLASSIFIED": 1}),
        "the one ticket the period touches, in the state it reached"
    );
    assert_eq!(after["summary"]["agents"]["c-1"]["outcomes"]["completed"], 1);
    let from: chrono::DateTime<chrono::Utc> = after["rates"]["from"].as_str().unwrap().parse().unwrap();
    assert_eq!(from, middle, "{after}");

    let before: Vec<String> = stats(&["--until", &middle_text, "--by", "category"])
        .iter()
        .map(|group| group["group"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(before, ["unclassified"], "classified only after the period");
    let later: Vec<String> = stats(&["--since", &middle_text, "--by", "category"])
        .iter()
        .map(|group| group["group"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(later, ["billing"]);

    // An hour-long period that began before the whole log: its rates are
    // over the period up to now, not over the moments its events span.
    let hour_ago = middle - chrono::Duration::hours(1);
    let hour = &stats(&[
        "--since",
        &hour_ago.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        "--until",
        &(hour_ago + chrono::Duration::hours(2)).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
    ])[0];
    let span = hour["rates"]["span_s"].as_f64().unwrap();
    assert!((3600.0..3700.0).contains(&span), "{hour}");

    // The groups of one period share it: their rates compare.
    let groups = stats(&[
        "--since",
        &hour_ago.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        "--by",
        "category",
    ]);
    assert_eq!(groups.len(), 2, "billing and unclassified: {groups:?}");
    assert_eq!(groups[0]["rates"]["from"], groups[1]["rates"]["from"]);
    assert_eq!(groups[0]["rates"]["to"], groups[1]["rates"]["to"], "{groups:?}");
}

/// The read-model file holds only what the log says. Damaged, it must not
/// stop the commands that read the log alone, and the commands that need it
/// say how to get it back; moved aside, it is rebuilt from the log.
#[test]
fn a_damaged_read_model_file_stops_only_what_needs_it_and_says_how_to_mend_it() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    let listed = succeed(dir.path(), &["ticket", "list", "--json"]);
    let read_db = dir.path().join("triage.read.db");
    for side in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.path().join(format!("triage.read.db{side}")));
    }
    std::fs::write(&read_db, vec![0x5a; 8192]).unwrap();

    let events = succeed(dir.path(), &["events", "--format", "jsonl"]);
    assert!(events.lines().count() > 2, "{events}");
    succeed(dir.path(), &["replay", "--until", "2", "--into", "then.db"]);
    succeed(dir.path(), &["stats", "--since", "2000-01-01T00:00:00Z"]);
    let error = common::fail(dir.path(), &["ticket", "list"]);
    assert!(
        error.contains("triage.read.db") && error.contains("move it aside"),
        "{error}"
    );

    std::fs::rename(&read_db, dir.path().join("damaged.read.db")).unwrap();
    assert_eq!(succeed(dir.path(), &["ticket", "list", "--json"]), listed);
}

#[test]
fn an_inverted_position_range_is_a_bad_argument_with_exit_status_2() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    let output = triage(dir.path(), &["events", "--from-position", "5", "--to-position", "2"]);
    assert_eq!(output.status.code(), Some(2), "{}", common::stderr(&output));
    assert!(
        common::stderr(&output).contains("--from-position 5 is after --to-position 2"),
        "{}",
        common::stderr(&output)
    );
    assert!(output.stdout.is_empty());
}

/// A directory made read-only for this process while alive: by its mode,
/// and, for a process that modes do not stop (root), by the file system's
/// immutable attribute. `None` when neither stops this process here.
struct ReadOnlyDir {
    dir: std::path::PathBuf,
    immutable: bool,
}

impl ReadOnlyDir {
    fn make(dir: &Path) -> Option<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let set_modes = |dir_mode: u32, file_mode: u32| {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(file_mode)).unwrap();
            }
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode)).unwrap();
        };
        set_modes(0o555, 0o444);
        let mut guard = ReadOnlyDir {
            dir: dir.to_path_buf(),
            immutable: false,
        };
        let writable = || {
            let probe = dir.join(".probe");
            let made = std::fs::File::create(&probe).is_ok();
            let _ = std::fs::remove_file(&probe);
            made
        };
        if writable() {
            guard.immutable = std::process::Command::new("chattr")
                .arg("+i")
                .arg(dir)
                .status()
                .is_ok_and(|status| status.success());
            if writable() {
                return None;
            }
        }
        Some(guard)
    }
}

impl Drop for ReadOnlyDir {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt as _;
        if self.immutable {
            let _ = std::process::Command::new("chattr").arg("-i").arg(&self.dir).status();
        }
        let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o755));
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let _ = std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o644));
            }
        }
    }
}

/// An analyst who may read a store but not write it or its directory (the
/// file of another account, a copy on read-only media) still queries its
/// events, told that it is read read-only; a command that keeps the read
/// models up to date says which commands read such a store. Nothing is
/// written beside the file.
#[test]
fn a_store_that_cannot_be_written_is_read_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let db = shared.join("triage.db");
    let db = db.to_str().unwrap();
    seed_with(dir.path(), db);
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(&shared)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = listing();
    let Some(read_only) = ReadOnlyDir::make(&shared) else {
        eprintln!("skipped: neither modes nor chattr make a directory read-only for this process here");
        return;
    };
    let output = triage(dir.path(), &["--db", db, "events", "--format", "jsonl"]);
    let err = common::stderr(&output);
    assert!(output.status.success(), "events failed: {err}");
    assert!(err.contains("reading the store read-only"), "{err}");
    let lines: Vec<Value> = common::stdout(&output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["type"], "TicketOpened");
    let refused = fail(dir.path(), &["--db", db, "ticket", "list"]);
    assert!(
        refused.contains("cannot be written here") && refused.contains("`triage events`"),
        "{refused}"
    );
    drop(read_only);
    assert_eq!(listing(), before, "nothing was written beside the store");
}

/// Two tickets opened in the store at `db`.
fn seed_with(dir: &Path, db: &str) {
    for subject in ["Printer on fire", "Cannot log in"] {
        succeed(
            dir,
            &[
                "--db",
                db,
                "ticket",
                "open",
                "--subject",
                subject,
                "--body",
                "It broke.",
            ],
        );
    }
}
