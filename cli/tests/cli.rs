//! The `triage` binary through its real surface: arguments in, text out.
//!
//! Snapshots live in `tests/snapshots/`; `TRIAGE_BLESS=1` rewrites them.

mod common;

use std::path::Path;
use std::process::Output;

use common::{events_in, fail, rejections_in, snapshot, stderr, stdout, succeed, triage};
use serde_json::Value;

#[test]
fn states_prints_the_transition_table() {
    let dir = tempfile::tempdir().unwrap();
    snapshot("states.txt", &succeed(dir.path(), &["states"]));
    snapshot("states.mmd", &succeed(dir.path(), &["states", "--mermaid"]));
    let rows: Vec<Value> = succeed(dir.path(), &["states", "--json"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(rows.len(), triage_domain::TRANSITIONS.len());
    assert_eq!(rows[0]["command"], "open_ticket");
    assert_eq!(rows[0]["roles"], serde_json::json!(["intake", "operator"]));
}

#[test]
fn open_show_and_history_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let opened: Value = serde_json::from_str(&succeed(
        dir.path(),
        &[
            "ticket",
            "open",
            "--subject",
            "Charged twice",
            "--body",
            "Twice in March.",
            "--customer",
            "dana@example.com",
            "--agent",
            "intake-7",
            "--role",
            "intake",
            "--json",
        ],
    ))
    .unwrap();
    let id = opened["id"].as_str().unwrap().to_owned();
    assert_eq!(opened["revision"], 0);
    assert_eq!(opened["state"], "NEW");
    assert!(
        dir.path().join("triage.db").exists(),
        "the default store is ./triage.db"
    );

    let shown: Value = serde_json::from_str(&succeed(dir.path(), &["ticket", "show", &id, "--json"])).unwrap();
    assert_eq!(shown["state"], "NEW");
    assert_eq!(shown["subject"], "Charged twice");
    assert_eq!(shown["customer"], "dana@example.com");
    assert_eq!(shown["revision"], 0);

    let table = succeed(dir.path(), &["ticket", "show", &format!("ticket-{id}")]);
    assert!(table.contains("Charged twice") && table.contains("NEW"), "{table}");

    let history: Vec<Value> = succeed(dir.path(), &["ticket", "history", &id, "--json"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["type"], "TicketOpened");
    assert_eq!(history[0]["agent"]["id"], "intake-7");
    assert_eq!(history[0]["agent"]["role"], "intake");
    let people = succeed(dir.path(), &["ticket", "history", &id]);
    assert!(
        people.contains("TicketOpened") && people.contains("intake-7 (intake)"),
        "{people}"
    );

    // Two commands a moment apart: UUIDv7 ids that share their first 8
    // digits (time), told apart in the table by their last 4.
    succeed(
        dir.path(),
        &[
            "ticket",
            "send",
            &id,
            r#"{"type":"start_classification"}"#,
            "--agent",
            "classifier-1",
            "--role",
            "classifier",
        ],
    );
    let history: Vec<Value> = succeed(dir.path(), &["ticket", "history", &id, "--json"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let people = succeed(dir.path(), &["ticket", "history", &id]);
    for entry in &history {
        let command = entry["command_id"].as_str().unwrap().replace('-', "");
        let shown = format!("{}…{}", &command[..8], &command[command.len() - 4..]);
        assert!(people.contains(&shown), "{shown} not in {people}");
    }
}

#[test]
fn retrying_an_open_with_the_same_command_id_is_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "ticket",
        "open",
        "--subject",
        "s",
        "--body",
        "b",
        "--id",
        "11111111-1111-4111-8111-111111111111",
        "--command-id",
        "22222222-2222-4222-8222-222222222222",
        "--json",
    ];
    let first: Value = serde_json::from_str(&succeed(dir.path(), &args)).unwrap();
    let again: Value = serde_json::from_str(&succeed(dir.path(), &args)).unwrap();
    assert_eq!(first["duplicate"], false);
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["revision"], first["revision"]);
    let history = succeed(
        dir.path(),
        &["ticket", "history", "11111111-1111-4111-8111-111111111111", "--json"],
    );
    assert_eq!(history.lines().count(), 1, "the retry wrote nothing");
    // A different command for the same ticket id is refused.
    let error = fail(
        dir.path(),
        &[
            "ticket",
            "open",
            "--subject",
            "s",
            "--body",
            "b",
            "--id",
            "11111111-1111-4111-8111-111111111111",
        ],
    );
    assert!(error.contains("already exists"), "{error}");
}

#[test]
fn retrying_an_open_with_only_a_command_id_reaches_the_same_ticket() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "ticket",
        "open",
        "--subject",
        "s",
        "--body",
        "b",
        "--command-id",
        "33333333-3333-4333-8333-333333333333",
        "--json",
    ];
    let first: Value = serde_json::from_str(&succeed(dir.path(), &args)).unwrap();
    let again: Value = serde_json::from_str(&succeed(dir.path(), &args)).unwrap();
    assert_eq!(first["id"], again["id"]);
    assert_eq!(
        (first["duplicate"].clone(), again["duplicate"].clone()),
        (Value::Bool(false), Value::Bool(true))
    );
    assert_eq!(events_in(&dir.path().join("triage.db")), 1);
}

#[test]
fn bad_input_gets_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("triage.db");
    succeed(dir.path(), &["ticket", "open", "--subject", "s", "--body", "b"]);
    assert_eq!(events_in(&db), 1);

    let error = fail(dir.path(), &["ticket", "show", "6b1d0d0e-0000-4000-8000-000000000000"]);
    assert!(
        error.contains("ticket 6b1d0d0e-0000-4000-8000-000000000000 not found"),
        "{error}"
    );

    let error = fail(dir.path(), &["ticket", "show", "not-a-uuid"]);
    assert!(error.contains("is not a ticket id"), "{error}");

    let error = fail(dir.path(), &["ticket", "open", "--subject", "  ", "--body", "b"]);
    assert!(
        error.contains("rejected [invalid_input]: invalid input: subject must not be empty"),
        "{error}"
    );
    assert!(error.contains("the ticket was not changed"), "{error}");

    let long_subject = "x".repeat(201);
    let error = fail(
        dir.path(),
        &["ticket", "open", "--subject", &long_subject, "--body", "b"],
    );
    assert!(
        error.contains("subject is 201 characters long, more than the limit of 200"),
        "{error}"
    );

    let error = fail(
        dir.path(),
        &["ticket", "open", "--subject", "s", "--body", "b", "--role", "drafter"],
    );
    assert!(
        error.contains("rejected [role_not_allowed]: role drafter may not open_ticket"),
        "{error}"
    );

    let error = fail(
        dir.path(),
        &["ticket", "open", "--subject", "s", "--body", "b", "--role", "wizard"],
    );
    assert!(error.contains("unknown role \"wizard\""), "{error}");

    let error = fail(
        dir.path(),
        &[
            "--store",
            "mysql://db",
            "ticket",
            "show",
            "6b1d0d0e-0000-4000-8000-000000000000",
        ],
    );
    assert!(error.contains("unsupported store URL scheme \"mysql\""), "{error}");

    // An empty TRIAGE_DB is named as the cause, not the flag it stands for.
    let output = common::command(dir.path())
        .env("TRIAGE_DB", "")
        .args(["ticket", "list"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let error = stderr(&output);
    assert!(error.contains("if TRIAGE_DB is set to nothing"), "{error}");

    // TLS settings are checked before any server is reached (none runs at
    // this address), and the password never shows.
    let missing_root =
        "postgres://triage:hunter2@127.0.0.1:1/triage?sslmode=verify-full&sslrootcert=%2Fno%2Fsuch%2Fca.pem";
    let error = fail(dir.path(), &["--store", missing_root, "events"]);
    assert!(
        error.contains("cannot read the root certificates in /no/such/ca.pem"),
        "{error}"
    );
    assert!(!error.contains("hunter2"), "{error}");
    // Run with this test's directory as HOME: libpq's ~/.postgresql files
    // are looked for there.
    let fail_at_home = |args: &[&str]| {
        let output = common::command(dir.path())
            .env("HOME", dir.path())
            .args(args)
            .output()
            .unwrap();
        assert!(!output.status.success());
        stderr(&output)
    };
    // No ~/.postgresql/root.crt in this HOME, and no sslrootcert.
    let error = fail_at_home(&[
        "--store",
        "postgres://triage@127.0.0.1:1/triage?sslmode=verify-full",
        "events",
    ]);
    assert!(
        error.contains("sslmode=verify-full needs trusted root certificates"),
        "{error}"
    );
    // libpq would check a revocation list there; Triage cannot, so it
    // refuses rather than trust what the list revokes.
    std::fs::create_dir_all(dir.path().join(".postgresql")).unwrap();
    std::fs::write(dir.path().join(".postgresql/root.crl"), "").unwrap();
    let error = fail_at_home(&["--store", missing_root, "events"]);
    assert!(
        error.contains("root.crl exists, and certificate revocation lists are not supported"),
        "{error}"
    );
    // libpq's default client certificate is sent when it is there; its key
    // must be there too, and readable by its owner only.
    let test_data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../stores/postgres/tests/data");
    std::fs::copy(
        test_data.join("client.pem"),
        dir.path().join(".postgresql/postgresql.crt"),
    )
    .unwrap();
    let no_roots = "postgres://triage:hunter2@127.0.0.1:1/triage?sslmode=require";
    let error = fail_at_home(&["--store", no_roots, "events"]);
    assert!(
        error.contains(".postgresql/postgresql.key is not (name it with sslkey=FILE)"),
        "{error}"
    );
    let key = dir.path().join(".postgresql/postgresql.key");
    std::fs::copy(test_data.join("client.key"), &key).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let error = fail_at_home(&["--store", no_roots, "events"]);
    assert!(
        error.contains(".postgresql/postgresql.key can be read by others"),
        "{error}"
    );
    assert!(!error.contains("hunter2"), "{error}");

    assert_eq!(events_in(&db), 1, "no rejected command wrote an event");
}

#[test]
fn a_corrupt_or_foreign_file_is_refused_and_left_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.db");
    let garbage: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&corrupt, &garbage).unwrap();
    let error = fail(
        dir.path(),
        &[
            "--db",
            "corrupt.db",
            "ticket",
            "show",
            "6b1d0d0e-0000-4000-8000-000000000000",
        ],
    );
    assert!(error.contains("corrupt.db is not a Triage event store"), "{error}");
    assert_eq!(
        std::fs::read(&corrupt).unwrap(),
        garbage,
        "the corrupt file is unchanged"
    );

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "shopping list\n").unwrap();
    let error = fail(
        dir.path(),
        &["--db", "notes.txt", "ticket", "open", "--subject", "s", "--body", "b"],
    );
    assert!(error.contains("notes.txt is not a Triage event store"), "{error}");
    assert_eq!(std::fs::read_to_string(&text).unwrap(), "shopping list\n");
}

/// Damage inside a file whose header is intact: the store says it is
/// damaged and to restore it from a backup (it said "database disk image
/// is malformed" and no more); the read-model file says it can be moved
/// aside and rebuilt. Neither file is written to.
#[test]
fn damage_inside_a_file_is_named_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let body = "x".repeat(3000);
    for n in 0..40 {
        succeed(
            dir.path(),
            &["ticket", "open", "--subject", &format!("s{n}"), "--body", &body],
        );
    }
    // The read models catch up on the next read.
    succeed(dir.path(), &["ticket", "list"]);
    let damage = |name: &str| -> Vec<u8> {
        let path = dir.path().join(name);
        let mut bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() > 16 * 4096, "{name} is {} bytes", bytes.len());
        // Pages in the middle: rows, not the header, the schema or the
        // last pages that opening the file reads.
        let (from, to) = (bytes.len() / 3 / 4096 * 4096, bytes.len() / 2 / 4096 * 4096);
        for (i, byte) in bytes.iter_mut().enumerate().take(to).skip(from) {
            *byte = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2];
        }
        std::fs::write(&path, &bytes).unwrap();
        bytes
    };

    let read_model = damage("triage.read.db");
    // `projections status` checks the whole file: it said "ok".
    let status = common::triage(dir.path(), &["projections", "status"]);
    assert_eq!(status.status.code(), Some(1), "{}", stdout(&status));
    assert!(
        stdout(&status).contains("stopped: the read-model file is damaged"),
        "{}",
        stdout(&status)
    );
    assert!(
        stderr(&status).contains("triage.read.db is damaged") && stderr(&status).contains("move it"),
        "{}",
        stderr(&status)
    );
    let error = fail(dir.path(), &["ticket", "list"]);
    assert!(
        error.contains("move it") && error.contains("rebuilds it from the log"),
        "{error}"
    );
    assert_eq!(std::fs::read(dir.path().join("triage.read.db")).unwrap(), read_model);

    let store = damage("triage.db");
    let error = fail(dir.path(), &["events", "--format", "jsonl"]);
    assert!(
        error.contains("triage.db is damaged") && error.contains("restore it from a backup"),
        "{error}"
    );
    assert_eq!(std::fs::read(dir.path().join("triage.db")).unwrap(), store);
}

#[test]
fn help_explains_the_commands_and_the_store_option() {
    let dir = tempfile::tempdir().unwrap();
    let help = succeed(dir.path(), &["--help"]);
    for expected in [
        "states",
        "ticket",
        "--store <URL>",
        "--db <PATH>",
        "--json",
        "TRIAGE_DB",
    ] {
        assert!(help.contains(expected), "--help lacks {expected}: {help}");
    }
    let help = succeed(dir.path(), &["ticket", "open", "--help"]);
    assert!(
        help.contains("--command-id") && help.contains("harmless retry"),
        "{help}"
    );
}

fn send(dir: &Path, id: &str, agent: &str, role: &str, command: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "ticket", "send", id, command, "--agent", agent, "--role", role, "--json",
    ];
    args.extend_from_slice(extra);
    triage(dir, &args)
}

fn accepted(output: Output) -> Value {
    assert!(output.status.success(), "send failed: {}", stderr(&output));
    serde_json::from_str(&stdout(&output)).unwrap()
}

#[test]
fn agents_drive_a_ticket_through_its_lifecycle_with_send() {
    let dir = tempfile::tempdir().unwrap();
    let opened: Value = serde_json::from_str(&succeed(
        dir.path(),
        &["ticket", "open", "--subject", "s", "--body", "b", "--json"],
    ))
    .unwrap();
    let id = opened["id"].as_str().unwrap().to_owned();
    let claim = accepted(send(
        dir.path(),
        &id,
        "c-1",
        "classifier",
        r#"{"type":"start_classification"}"#,
        &["--at-revision", "0"],
    ));
    assert_eq!(claim["state"], "CLASSIFYING");
    let claim_id = claim["command_id"].as_str().unwrap().to_owned();
    let classify = format!(
        r#"{{"type":"classify","claim_id":"{claim_id}","category":"billing","priority":"high","confidence":0.9}}"#
    );
    let classified = accepted(send(
        dir.path(),
        &id,
        "c-1",
        "classifier",
        &classify,
        &["--at-revision", "1"],
    ));
    assert_eq!(
        (classified["state"].as_str(), classified["revision"].as_u64()),
        (Some("CLASSIFIED"), Some(2))
    );
    assert_eq!(classified["events"][0]["type"], "TicketClassified");
    let shown: Value = serde_json::from_str(&succeed(dir.path(), &["ticket", "show", &id, "--json"])).unwrap();
    assert_eq!(shown["classification"]["category"], "billing");
    assert_eq!(shown["revision"], 2);
}

#[test]
fn every_kind_of_bad_command_gets_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("triage.db");
    let opened: Value = serde_json::from_str(&succeed(
        dir.path(),
        &["ticket", "open", "--subject", "s", "--body", "b", "--json"],
    ))
    .unwrap();
    let id = opened["id"].as_str().unwrap().to_owned();
    let cases: &[(&str, &str, &str, &[&str], &str)] = &[
        ("d-1", "drafter", "{not json", &[], "the command is not valid"),
        (
            "d-1",
            "drafter",
            r#"{"type":"summon_dragon"}"#,
            &[],
            "unknown variant `summon_dragon`",
        ),
        (
            "d-1",
            "drafter",
            r#"{"type":"submit_draft","claim_id":"6b1d0d0e-0000-4000-8000-000000000000","body":"hi"}"#,
            &[],
            "rejected [invalid_transition]: submit_draft is not allowed in state NEW (ticket",
        ),
        (
            "d-1",
            "drafter",
            r#"{"type":"start_classification"}"#,
            &[],
            "rejected [role_not_allowed]: role drafter",
        ),
        (
            "c-1",
            "classifier",
            r#"{"type":"start_classification"}"#,
            &["--at-revision", "5"],
            "stale decision",
        ),
        (
            "c-1",
            "classifier",
            r#"{"type":"start_classification","lease_secs":0}"#,
            &[],
            "rejected [invalid_input]: invalid input: a lease of 0s",
        ),
    ];
    for (agent, role, command, extra, expected) in cases {
        let output = send(dir.path(), &id, agent, role, command, extra);
        assert!(!output.status.success(), "{command} was accepted");
        let message = stderr(&output);
        assert!(
            message.contains(expected),
            "{command}: expected {expected:?} in {message:?}"
        );
        assert_eq!(events_in(&db), 1, "{command} wrote an event");
    }
    // A hallucinated classification under a real claim.
    let claim = accepted(send(
        dir.path(),
        &id,
        "c-1",
        "classifier",
        r#"{"type":"start_classification"}"#,
        &[],
    ));
    let claim_id = claim["command_id"].as_str().unwrap();
    let hallucinated = format!(
        r#"{{"type":"classify","claim_id":"{claim_id}","category":"astrology","priority":"high","confidence":1.7}}"#
    );
    let message = stderr(&send(dir.path(), &id, "c-1", "classifier", &hallucinated, &[]));
    assert!(message.contains("category \"astrology\" is not one of"), "{message}");
    // Someone else's claim is fenced off.
    let foreign =
        format!(r#"{{"type":"classify","claim_id":"{claim_id}","category":"bug","priority":"low","confidence":0.5}}"#);
    let message = stderr(&send(dir.path(), &id, "c-2", "classifier", &foreign, &[]));
    assert!(message.contains("rejected [not_claim_holder]"), "{message}");
    let message = stderr(&send(
        dir.path(),
        "6b1d0d0e-0000-4000-8000-000000000000",
        "c-1",
        "classifier",
        r#"{"type":"start_classification"}"#,
        &[],
    ));
    assert!(message.contains("not found"), "{message}");
    assert_eq!(events_in(&db), 2, "only the claim was written");
    // Every refusal of an existing ticket decided by the domain or by a stale
    // revision is on record for analysts: 4 from the table above (the two
    // JSON errors never reached the handler), the hallucination and the
    // foreign claim.
    assert_eq!(rejections_in(&db), 6);
}

#[test]
fn a_command_id_reused_for_another_command_is_refused_not_called_a_retry() {
    let dir = tempfile::tempdir().unwrap();
    let opened: Value = serde_json::from_str(&succeed(
        dir.path(),
        &["ticket", "open", "--subject", "s", "--body", "b", "--json"],
    ))
    .unwrap();
    let id = opened["id"].as_str().unwrap().to_owned();
    let command_id = "33333333-3333-4333-8333-333333333333";
    let claim = accepted(send(
        dir.path(),
        &id,
        "c-1",
        "classifier",
        r#"{"type":"start_classification"}"#,
        &["--command-id", command_id],
    ));
    let classify = format!(
        r#"{{"type":"classify","claim_id":"{command_id}","category":"billing","priority":"high","confidence":0.9}}"#
    );
    let output = send(
        dir.path(),
        &id,
        "c-1",
        "classifier",
        &classify,
        &["--command-id", command_id],
    );
    assert!(!output.status.success(), "{}", stdout(&output));
    let error = stderr(&output);
    assert!(
        error.contains(command_id)
            && error.contains("already used for a different command")
            && error.contains("this one was not applied"),
        "{error}"
    );
    // The same command again is the harmless retry it claims to be.
    let again = accepted(send(
        dir.path(),
        &id,
        "c-1",
        "classifier",
        r#"{"type":"start_classification"}"#,
        &["--command-id", command_id],
    ));
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["revision"], claim["revision"]);
    let history = succeed(dir.path(), &["ticket", "history", &id, "--json"]);
    assert_eq!(
        history.lines().count(),
        2,
        "nothing was written by the reuse:\n{history}"
    );
}

/// Empty ids, and ids with a line break or an escape sequence (which
/// would split table rows and reach analysts' terminals), are usage
/// errors: nothing is sent, so no refusal record carries them either.
#[test]
fn a_bad_agent_id_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let opened: Value = serde_json::from_str(&succeed(
        dir.path(),
        &["ticket", "open", "--subject", "s", "--body", "b", "--json"],
    ))
    .unwrap();
    let id = opened["id"].as_str().unwrap().to_owned();
    for (agent, says) in [
        ("", "agent id must not be empty"),
        ("   ", "agent id must not be empty"),
        ("bad\nagent", "agent id must not contain the control character U+000A"),
        (
            "red\u{1b}[31m",
            "agent id must not contain the control character U+001B",
        ),
    ] {
        let output = send(
            dir.path(),
            &id,
            agent,
            "classifier",
            r#"{"type":"start_classification"}"#,
            &[],
        );
        assert_eq!(output.status.code(), Some(2), "a usage error");
        assert!(stderr(&output).contains(says), "{}", stderr(&output));
        let open = fail(
            dir.path(),
            &["ticket", "open", "--subject", "s", "--body", "b", "--agent", agent],
        );
        assert!(open.contains("agent id"), "{open}");
    }
    let history = succeed(dir.path(), &["ticket", "history", &id, "--json"]);
    assert_eq!(history.lines().count(), 1, "nothing was written:\n{history}");
    assert_eq!(
        rejections_in(&dir.path().join("triage.db")),
        0,
        "no refusal was recorded either"
    );
    let tickets = succeed(dir.path(), &["ticket", "list", "--json"]);
    assert_eq!(tickets.lines().count(), 1, "no ticket was opened:\n{tickets}");
}

/// A URL with a slip is refused, not taken for the name of a new SQLite
/// file: `postgres:triage` made a file of that name and stored a ticket
/// in it, with exit 0.
#[test]
fn a_mistyped_url_is_refused_and_makes_no_file() {
    let dir = tempfile::tempdir().unwrap();
    for store in ["postgres:triage", "postgresql//db/triage", "esdb:localhost:2113"] {
        let refused = common::fail(
            dir.path(),
            &["--store", store, "ticket", "open", "--subject", "s", "--body", "b"],
        );
        assert!(
            refused.contains("looks like a") && refused.contains("://"),
            "{store}: {refused}"
        );
    }
    for read_model in ["postgres:triage", "redis://localhost"] {
        let refused = common::fail(
            dir.path(),
            &[
                "--db",
                "t.db",
                "--read-model",
                read_model,
                "ticket",
                "open",
                "--subject",
                "s",
                "--body",
                "b",
            ],
        );
        assert!(refused.contains("://"), "{read_model}: {refused}");
    }
    let made: Vec<String> = common::file_names(dir.path())
        .into_iter()
        .filter(|name| !name.starts_with("t.db"))
        .collect();
    assert!(made.is_empty(), "{made:?}");
}

/// With stderr closed (`2>&1 | true`), an error still exits 1: writing
/// its message failed, which panicked (exit 101).
#[test]
fn a_closed_stderr_does_not_turn_an_error_into_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let status = common::command(dir.path())
        .args(["--db", "missing.db", "events"])
        .stdout(std::process::Stdio::null())
        .stderr(writer)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1), "{status:?}");
}

#[test]
fn a_store_path_that_is_a_directory_or_empty_is_refused_plainly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("logs")).unwrap();
    let refused = common::fail(dir.path(), &["--db", "logs", "events"]);
    assert!(refused.contains("logs: it is a directory"), "{refused}");
    let refused = common::fail(dir.path(), &["--store", "", "events"]);
    assert!(refused.contains("empty path"), "{refused}");
    // Nothing was created in its place.
    assert!(!dir.path().join("triage.db").exists());
}

#[test]
fn errors_carry_each_cause_once_and_no_colour_codes_in_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let command_id = "00000000-0000-4000-8000-0000000000d1";
    common::succeed(
        dir.path(),
        &[
            "ticket",
            "open",
            "--subject",
            "S",
            "--body",
            "B",
            "--command-id",
            command_id,
        ],
    );
    // The same command id for another command: an error, said once (the
    // sender's mistake is not also logged as a failure of the command)...
    let reuse = |verbose: &[&str]| {
        let mut args = verbose.to_vec();
        args.extend([
            "ticket",
            "open",
            "--subject",
            "Other",
            "--body",
            "B",
            "--command-id",
            command_id,
        ]);
        common::triage(dir.path(), &args)
    };
    let quiet = reuse(&[]);
    assert!(!quiet.status.success());
    let stderr = common::stderr(&quiet);
    assert_eq!(stderr.matches(command_id).count(), 1, "{stderr}");
    // ... and with -vv, a debug line too, without colour codes in a pipe.
    let output = reuse(&["-vv"]);
    let stderr = common::stderr(&output);
    assert!(!output.status.success());
    assert!(stderr.contains("DEBUG"), "{stderr:?}");
    assert!(!stderr.contains('\u{1b}'), "{stderr:?}");
    let error = stderr.lines().find(|line| line.starts_with("error: ")).unwrap();
    assert_eq!(error.matches("already used").count(), 1, "{error}");
}

#[test]
fn a_db_flag_wins_over_triage_store_in_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    common::succeed(
        dir.path(),
        &["--db", "one.db", "ticket", "open", "--subject", "S", "--body", "B"],
    );
    for args in [
        &["--db", "one.db", "ticket", "list", "--json"][..],
        &["ticket", "list", "--db", "one.db", "--json"][..],
    ] {
        let output = common::command(dir.path())
            .env("TRIAGE_STORE", "two.db")
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        assert_eq!(stdout(&output).lines().count(), 1, "{args:?}: {}", stdout(&output));
    }
    assert!(
        !dir.path().join("two.db").exists(),
        "the environment's store was not opened"
    );
    // Without the flag the environment applies: a store that does not
    // exist, which a command that only reads does not create.
    let output = common::command(dir.path())
        .env("TRIAGE_STORE", "two.db")
        .args(["ticket", "list", "--json"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("there is no event store at two.db"),
        "{}",
        stderr(&output)
    );
    assert!(!dir.path().join("two.db").exists());
}

#[test]
fn only_opening_a_ticket_creates_a_store() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--db", "tpyo.db", "ticket", "list"][..],
        &[
            "--db",
            "tpyo.db",
            "ticket",
            "show",
            "00000000-0000-4000-8000-000000000001",
        ][..],
        &["--db", "tpyo.db", "events"][..],
        &["--db", "tpyo.db", "stats"][..],
        &["--db", "tpyo.db", "projections", "status"][..],
        &["--db", "tpyo.db", "projections", "rebuild", "--all"][..],
        &[
            "--db",
            "tpyo.db",
            "ticket",
            "send",
            "00000000-0000-4000-8000-000000000001",
            r#"{"type": "start_classification"}"#,
            "--agent",
            "classifier-1",
            "--role",
            "classifier",
        ][..],
    ] {
        let refused = fail(dir.path(), args);
        assert!(
            refused.contains("there is no event store at tpyo.db"),
            "{args:?}: {refused}"
        );
    }
    // Listing the projections needs no store at all.
    succeed(dir.path(), &["--db", "tpyo.db", "projections", "list"]);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no file was created");
    // An empty file is not a store either, and a reading command leaves it
    // empty (SQLite would have made a store of it).
    std::fs::write(dir.path().join("empty.db"), b"").unwrap();
    for args in [
        &["--db", "empty.db", "events"][..],
        &["--db", "empty.db", "ticket", "list"][..],
    ] {
        let refused = fail(dir.path(), args);
        assert!(refused.contains("empty.db is an empty file"), "{args:?}: {refused}");
    }
    assert_eq!(std::fs::metadata(dir.path().join("empty.db")).unwrap().len(), 0);
    assert!(!dir.path().join("empty.read.db").exists());
    std::fs::remove_file(dir.path().join("empty.db")).unwrap();
    // A command that opens a ticket makes the store.
    succeed(
        dir.path(),
        &["--db", "tpyo.db", "ticket", "open", "--subject", "S", "--body", "B"],
    );
    succeed(dir.path(), &["--db", "tpyo.db", "ticket", "list"]);
    // So does an open_ticket command sent as JSON.
    succeed(
        dir.path(),
        &[
            "--db",
            "sent.db",
            "ticket",
            "send",
            "00000000-0000-4000-8000-000000000002",
            r#"{"type": "open_ticket", "subject": "S", "body": "B"}"#,
            "--agent",
            "intake-1",
            "--role",
            "intake",
        ],
    );
    assert!(dir.path().join("sent.db").exists());
}

#[test]
fn an_event_log_named_as_read_models_is_not_called_disposable() {
    let dir = tempfile::tempdir().unwrap();
    common::succeed(dir.path(), &["ticket", "open", "--subject", "S", "--body", "B"]);
    let refused = fail(dir.path(), &["--read-model", "triage.db", "ticket", "list"]);
    assert!(
        refused.contains("it is a Triage event store, not a read-model file") && refused.contains("--db"),
        "{refused}"
    );
    assert!(!refused.contains("move it aside"), "{refused}");
    assert_eq!(events_in(&dir.path().join("triage.db")), 1);
    // The default it suggests is the one beside this store.
    common::succeed(
        dir.path(),
        &["--db", "demo.db", "ticket", "open", "--subject", "S", "--body", "B"],
    );
    let refused = fail(
        dir.path(),
        &["--db", "demo.db", "--read-model", "demo.db", "ticket", "list"],
    );
    assert!(refused.contains("(demo.read.db)"), "{refused}");
}

#[test]
fn a_queue_is_asked_for_a_role_that_has_one() {
    let dir = tempfile::tempdir().unwrap();
    succeed(dir.path(), &["ticket", "open", "--subject", "S", "--body", "B"]);
    let output = triage(dir.path(), &["ticket", "queue", "--role", "intake"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("intake has no work queue"),
        "{}",
        stderr(&output)
    );
    let queue = succeed(dir.path(), &["ticket", "queue", "--role", "classifier", "--json"]);
    assert_eq!(queue.lines().count(), 1, "{queue}");
}

/// A list cut short by --limit says so (on stderr, so that JSON lines stay
/// one ticket each); a whole list does not.
#[test]
fn a_list_cut_short_by_its_limit_says_so() {
    let dir = tempfile::tempdir().unwrap();
    for subject in ["One", "Two", "Three"] {
        succeed(dir.path(), &["ticket", "open", "--subject", subject, "--body", "B"]);
    }
    let cut = common::triage(dir.path(), &["ticket", "list", "--limit", "2", "--json"]);
    assert!(cut.status.success());
    assert_eq!(common::stdout(&cut).lines().count(), 2);
    assert!(
        common::stderr(&cut).contains("more tickets follow"),
        "{}",
        common::stderr(&cut)
    );
    let whole = common::triage(dir.path(), &["ticket", "list", "--limit", "3", "--json"]);
    assert_eq!(common::stdout(&whole).lines().count(), 3);
    assert!(
        !common::stderr(&whole).contains("more tickets"),
        "{}",
        common::stderr(&whole)
    );
    let none = common::triage(dir.path(), &["ticket", "list", "--limit", "0"]);
    assert_eq!(none.status.code(), Some(2), "{}", common::stderr(&none));
    let queue = common::triage(dir.path(), &["ticket", "queue", "--role", "classifier", "--limit", "1"]);
    assert!(
        common::stderr(&queue).contains("more tickets are waiting"),
        "{}",
        common::stderr(&queue)
    );
}

/// A stand-in PostgreSQL server that asks every client for its password
/// in clear text, keeps what it is sent, and refuses it. Returns its port
/// and the passwords received so far.
fn password_recorder() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = std::sync::Arc::clone(&received);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let kept = std::sync::Arc::clone(&kept);
            std::thread::spawn(move || -> std::io::Result<()> {
                // The startup message: its length, then the rest.
                let mut length = [0u8; 4];
                stream.read_exact(&mut length)?;
                let mut startup = vec![0u8; (u32::from_be_bytes(length) as usize).saturating_sub(4)];
                stream.read_exact(&mut startup)?;
                // AuthenticationCleartextPassword.
                stream.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3])?;
                let mut header = [0u8; 5];
                stream.read_exact(&mut header)?;
                let mut password =
                    vec![0u8; (u32::from_be_bytes(header[1..].try_into().unwrap()) as usize).saturating_sub(4)];
                stream.read_exact(&mut password)?;
                let password = String::from_utf8_lossy(password.strip_suffix(&[0]).unwrap_or(&password)).into_owned();
                kept.lock().unwrap().push(password);
                let fields = b"SFATAL\0C28P01\0Mpassword noted by the test server\0\0";
                let mut error = vec![b'E'];
                error.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
                error.extend_from_slice(fields);
                stream.write_all(&error)
            });
        }
    });
    (port, received)
}

#[test]
fn a_password_not_in_the_url_comes_from_pgpassword_or_the_password_file() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let (port, received) = password_recorder();
    let url = format!("postgres://triage@127.0.0.1:{port}/triage?sslmode=disable&connect_timeout=5");
    let pgpass = dir.path().join(".pgpass");
    std::fs::write(
        &pgpass,
        format!(
            "# test\n127.0.0.1:{}:triage:triage:wrong-port\n127.0.0.1:{port}:triage:triage:from-file\n",
            port + 1
        ),
    )
    .unwrap();
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let attempt = |configure: &dyn Fn(&mut std::process::Command)| {
        received.lock().unwrap().clear();
        let mut command = common::command(dir.path());
        command.env("HOME", dir.path()).args(["--store", &url, "events"]);
        configure(&mut command);
        let output = command.output().unwrap();
        assert!(!output.status.success(), "the stand-in refuses every password");
        (received.lock().unwrap().clone(), stderr(&output))
    };

    let (sent, error) = attempt(&|_| {});
    assert!(!sent.is_empty(), "no password reached the server: {error}");
    assert!(sent.iter().all(|password| password == "from-file"), "{sent:?}");
    assert!(error.contains("password noted by the test server"), "{error}");

    let (sent, _) = attempt(&|command| {
        command.env("PGPASSWORD", "from-env");
    });
    assert!(
        !sent.is_empty() && sent.iter().all(|password| password == "from-env"),
        "{sent:?}"
    );

    let elsewhere = dir.path().join("elsewhere.pgpass");
    std::fs::write(&elsewhere, format!("*:{port}:*:*:from-pgpassfile\n")).unwrap();
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (sent, _) = attempt(&|command| {
        command.env("PGPASSFILE", &elsewhere);
    });
    assert!(
        !sent.is_empty() && sent.iter().all(|password| password == "from-pgpassfile"),
        "{sent:?}"
    );

    // A URL's own password wins.
    received.lock().unwrap().clear();
    let own = format!("postgres://triage:from-url@127.0.0.1:{port}/triage?sslmode=disable&connect_timeout=5");
    let output = common::command(dir.path())
        .env("HOME", dir.path())
        .env("PGPASSWORD", "from-env")
        .args(["--store", &own, "events"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let sent = received.lock().unwrap().clone();
    assert!(
        !sent.is_empty() && sent.iter().all(|password| password == "from-url"),
        "{sent:?}"
    );

    // A file others may read is ignored, as libpq ignores it: no password.
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (sent, error) = attempt(&|_| {});
    assert!(sent.is_empty(), "{sent:?}");
    assert!(error.contains("password file is ignored"), "{error}");
}

/// A command that fails on an event store it cannot reach leaves no
/// read-model file behind (it made an empty one beside a KurrentDB that
/// was down, which later commands then opened as if it were the models).
#[test]
fn a_store_that_cannot_be_reached_leaves_no_read_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let refused = common::fail(
        dir.path(),
        &["--store", "esdb://127.0.0.1:1?tls=false", "ticket", "list"],
    );
    assert!(refused.contains("unavailable"), "{refused}");
    assert_eq!(common::file_names(dir.path()), Vec::<String>::new());
}
