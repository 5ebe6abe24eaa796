//! `triage projections`, `ticket list/queue/show` and `stats` through the
//! real binary. Snapshots have their timings masked.

mod common;

use std::path::Path;

use common::{fail, snapshot, succeed};
use serde_json::Value;

fn json_lines(text: &str) -> Vec<Value> {
    text.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

/// Opens three tickets and moves one to CLASSIFIED; returns their ids.
fn seed(dir: &Path) -> Vec<String> {
    let ids: Vec<String> = (0..3)
        .map(|n| {
            let subject = format!("Ticket {n}");
            let opened: Value = serde_json::from_str(&succeed(
                dir,
                &[
                    "ticket",
                    "open",
                    "--subject",
                    &subject,
                    "--body",
                    "b",
                    "--json",
                    "--id",
                    &format!("00000000-0000-4000-8000-00000000000{n}"),
                ],
            ))
            .unwrap();
            opened["id"].as_str().unwrap().to_owned()
        })
        .collect();
    let claim: Value = serde_json::from_str(&succeed(
        dir,
        &[
            "ticket",
            "send",
            &ids[0],
            r#"{"type":"start_classification"}"#,
            "--agent",
            "c-1",
            "--role",
            "classifier",
            "--json",
        ],
    ))
    .unwrap();
    let classify = format!(
        r#"{{"type":"classify","claim_id":"{}","category":"billing","priority":"high","confidence":0.9}}"#,
        claim["command_id"].as_str().unwrap()
    );
    succeed(
        dir,
        &[
            "ticket",
            "send",
            &ids[0],
            &classify,
            "--agent",
            "c-1",
            "--role",
            "classifier",
        ],
    );
    // A refusal for the statistics.
    fail(
        dir,
        &[
            "ticket",
            "send",
            &ids[1],
            r#"{"type":"start_drafting"}"#,
            "--agent",
            "d-1",
            "--role",
            "drafter",
        ],
    );
    ids
}

/// Masks the run-dependent parts of rebuild output (timings).
fn mask_timings(text: &str) -> String {
    text.lines()
        .map(|line| match line.find(" events in ") {
            Some(at) => format!("{} events in <time>", &line[..at]),
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[test]
fn list_status_and_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    snapshot("projections-list.txt", &succeed(dir.path(), &["projections", "list"]));
    // Nothing has read the models yet: not built.
    snapshot(
        "projections-status-before.txt",
        &succeed(dir.path(), &["projections", "status"]),
    );
    succeed(dir.path(), &["ticket", "list"]);
    snapshot(
        "projections-status-after.txt",
        &succeed(dir.path(), &["projections", "status"]),
    );
    let rebuilt = succeed(
        dir.path(),
        &["projections", "rebuild", "--all", "--verify", "--no-progress"],
    );
    snapshot("projections-rebuild.txt", &mask_timings(&rebuilt));
    let statuses = json_lines(&succeed(dir.path(), &["projections", "status", "--json"]));
    assert_eq!(statuses.len(), 2);
    let head = succeed(dir.path(), &["events", "--format", "jsonl"]).lines().count();
    for status in &statuses {
        assert_eq!(status["generation"], 2, "{status}");
        assert_eq!(status["lag"], 0, "{status}");
        assert_eq!(status["last_error"], Value::Null);
        assert_eq!(
            status["checkpoint"],
            head.to_string(),
            "a position, written as `events` writes them: {status}"
        );
    }
    let reports = json_lines(&succeed(
        dir.path(),
        &[
            "projections",
            "rebuild",
            "tickets",
            "--json",
            "--no-progress",
            "--verify",
        ],
    ));
    assert_eq!(reports[0]["differences"], serde_json::json!([]));
    assert_eq!(reports[0]["generation"], 3);
    assert!(
        dir.path().join("triage.read.db").exists(),
        "read models live next to the events"
    );
}

#[test]
fn rebuild_progress_is_printed_as_lines_when_not_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    let output = common::triage(dir.path(), &["projections", "rebuild", "tickets"]);
    assert!(output.status.success());
    let progress = common::stderr(&output);
    assert!(
        progress.contains("rebuild tickets: ") && progress.contains("(100%)"),
        "{progress}"
    );
    let unknown = common::triage(dir.path(), &["projections", "rebuild", "nonsense"]);
    assert_eq!(unknown.status.code(), Some(2), "a bad argument");
    assert!(
        common::stderr(&unknown).contains("no projection named \"nonsense\"; known: tickets, stats"),
        "{}",
        common::stderr(&unknown)
    );
    let error = fail(dir.path(), &["projections", "rebuild"]);
    assert!(error.contains("required"), "{error}");
}

#[test]
fn tickets_lists_and_queues_come_from_the_read_model() {
    let dir = tempfile::tempdir().unwrap();
    let ids = seed(dir.path());
    let all = json_lines(&succeed(dir.path(), &["ticket", "list", "--json"]));
    assert_eq!(all.len(), 3);
    let new = json_lines(&succeed(dir.path(), &["ticket", "list", "--state", "new", "--json"]));
    assert_eq!(
        new.iter().map(|t| t["id"].as_str().unwrap()).collect::<Vec<_>>(),
        [&ids[1], &ids[2]]
    );
    let drafting_queue = json_lines(&succeed(
        dir.path(),
        &["ticket", "queue", "--role", "drafter", "--json"],
    ));
    assert_eq!(drafting_queue.len(), 1);
    assert_eq!(drafting_queue[0]["id"], ids[0].as_str());
    assert_eq!(drafting_queue[0]["revision"], 2);
    let shown = succeed(dir.path(), &["ticket", "show", &ids[0]]);
    assert!(
        shown.contains("read model at log position") && shown.contains("this ticket at revision 2"),
        "{shown}"
    );
    let error = fail(dir.path(), &["ticket", "list", "--state", "LIMBO"]);
    assert!(error.contains("unknown state \"LIMBO\""), "{error}");
}

#[test]
fn stats_counts_states_refusals_and_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    let stats: Value = serde_json::from_str(&succeed(dir.path(), &["stats", "--json"])).unwrap();
    assert_eq!(stats["tickets_per_state"]["NEW"], 2);
    assert_eq!(stats["tickets_per_state"]["CLASSIFIED"], 1);
    assert_eq!(stats["counters"]["rejections.invalid_transition"], 1);
    assert_eq!(stats["agents"]["c-1"]["outcomes"]["completed"], 1);
    assert_eq!(stats["agents"]["d-1"]["outcomes"]["refused"], 1);
    assert_eq!(stats["stage_latency"]["classify"]["count"], 1);
    let people = succeed(dir.path(), &["stats"]);
    assert!(
        people.contains("rejections.invalid_transition") && people.contains("classify"),
        "{people}"
    );
}

#[test]
fn a_foreign_read_model_file_is_refused_and_left_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    std::fs::write(dir.path().join("other.db"), b"not a database at all").unwrap();
    let error = fail(dir.path(), &["--read-model", "other.db", "ticket", "list"]);
    assert!(
        error.contains("other.db cannot be used as a read-model file"),
        "{error}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("other.db")).unwrap(),
        b"not a database at all"
    );
}

/// A store file deleted and made anew starts its positions at 1 again, so
/// once it is as long as the old one the read-model file beside it looked
/// current. It must be rebuilt from the new log, not show the old one's
/// tickets with the new ones.
#[test]
fn read_models_of_a_deleted_store_are_rebuilt_from_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let open = |subject: &str| -> String {
        let opened: Value = serde_json::from_str(&succeed(
            dir.path(),
            &["--json", "ticket", "open", "--subject", subject, "--body", "b"],
        ))
        .unwrap();
        opened["id"].as_str().unwrap().to_owned()
    };
    for n in 0..3 {
        open(&format!("old {n}"));
    }
    assert_eq!(json_lines(&succeed(dir.path(), &["ticket", "list", "--json"])).len(), 3);
    for file in ["triage.db", "triage.db-wal", "triage.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(file));
    }
    let new: Vec<String> = (0..4).map(|n| open(&format!("new {n}"))).collect();
    let mut listed: Vec<String> = json_lines(&succeed(dir.path(), &["ticket", "list", "--json"]))
        .iter()
        .map(|row| row["id"].as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    let mut expected = new.clone();
    expected.sort();
    assert_eq!(listed, expected, "only the new store's tickets");
    succeed(dir.path(), &["ticket", "show", &new[0]]);
}

/// The store is restored from a backup after the read models applied
/// events it does not hold, and written to before anything reads: its
/// head is back at the models' checkpoint, so it no longer looks behind
/// them. The event at the checkpoint is another one, which gives it away:
/// the models are rebuilt (they kept the lost ticket and missed the new
/// one, and `projections status` said "ok").
#[test]
fn read_models_of_a_store_restored_from_a_backup_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let open = |subject: &str| -> String {
        let opened: Value = serde_json::from_str(&succeed(
            dir.path(),
            &["--json", "ticket", "open", "--subject", subject, "--body", "b"],
        ))
        .unwrap();
        opened["id"].as_str().unwrap().to_owned()
    };
    let mut kept: Vec<String> = (0..3).map(|n| open(&format!("kept {n}"))).collect();
    let store_files = ["triage.db", "triage.db-wal", "triage.db-shm"];
    let backup = dir.path().join("backup");
    std::fs::create_dir(&backup).unwrap();
    for file in store_files {
        if dir.path().join(file).exists() {
            std::fs::copy(dir.path().join(file), backup.join(file)).unwrap();
        }
    }
    let lost = open("lost in the restore");
    assert_eq!(json_lines(&succeed(dir.path(), &["ticket", "list", "--json"])).len(), 4);
    for file in store_files {
        let _ = std::fs::remove_file(dir.path().join(file));
        if backup.join(file).exists() {
            std::fs::copy(backup.join(file), dir.path().join(file)).unwrap();
        }
    }
    kept.push(open("after the restore"));
    let statuses = json_lines(&succeed(dir.path(), &["projections", "status", "--json"]));
    assert!(
        statuses.iter().all(|status| status["needs_rebuild"] == true),
        "{statuses:?}"
    );
    let mut listed: Vec<String> = json_lines(&succeed(dir.path(), &["ticket", "list", "--json"]))
        .iter()
        .map(|row| row["id"].as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    kept.sort();
    assert_eq!(listed, kept, "the restored store's tickets, not {lost}");
    let statuses = json_lines(&succeed(dir.path(), &["projections", "status", "--json"]));
    assert!(
        statuses
            .iter()
            .all(|status| status["needs_rebuild"] == false && status["lag"] == 0),
        "{statuses:?}"
    );
    succeed(
        dir.path(),
        &["projections", "rebuild", "--all", "--verify", "--no-progress"],
    );
}

/// A server started on an empty event store (the old one deleted, or a
/// wrong path) beside read models that hold a log's work refuses to
/// start, saying so, and changes nothing: a rebuild from the empty log
/// wiped the last copy of the tickets' state, and the server went on
/// writing a new log. With the store back, everything is as it was.
#[test]
fn a_server_on_an_empty_store_beside_read_models_refuses_and_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    for n in 0..3 {
        succeed(
            dir.path(),
            &["ticket", "open", "--subject", &format!("t{n}"), "--body", "b"],
        );
    }
    assert_eq!(json_lines(&succeed(dir.path(), &["ticket", "list", "--json"])).len(), 3);
    succeed(
        dir.path(),
        &["agents", "add", "in", "--role", "intake", "--agents", "a.toml"],
    );
    let mut server = common::command(dir.path())
        .args([
            "--db",
            "typo.db",
            "--read-model",
            "triage.read.db",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--agents",
            "a.toml",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(20) {
            server.kill().unwrap();
            server.wait().unwrap();
            panic!("the server started on an empty store beside the read models");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut server.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("the event store is empty"), "{stderr}");
    assert!(stderr.contains("triage.read.db aside"), "{stderr}");
    // Nothing was changed: not even the store this start made is left,
    // which the next command would take for a replaced log and rebuild
    // the read models from.
    assert!(
        !dir.path().join("typo.db").exists(),
        "the refused start left typo.db behind: {stderr}"
    );
    assert_eq!(
        json_lines(&succeed(dir.path(), &["ticket", "list", "--json"])).len(),
        3,
        "the read models were left as they were"
    );
}

#[test]
fn verify_with_no_live_model_says_nothing_was_compared_not_that_it_differs() {
    let dir = tempfile::tempdir().unwrap();
    common::succeed(dir.path(), &["ticket", "open", "--subject", "S", "--body", "B"]);
    std::fs::remove_file(dir.path().join("triage.read.db")).unwrap();
    let out = common::succeed(dir.path(), &["projections", "rebuild", "tickets", "--verify"]);
    assert!(out.contains("nothing to compare"), "{out}");
    assert!(out.contains("not verified (no live model to compare with)"), "{out}");
    assert!(!out.contains("difference"), "{out}");
}

/// `--verify` is only worth its name if it finds a difference: a live
/// model changed behind the projector's back (a ticket's state edited, a
/// statistic deleted) is reported, key by key, against a rebuild from the
/// log, and the rebuild that replaces it is clean.
#[test]
fn verify_reports_a_live_model_that_differs_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    succeed(dir.path(), &["projections", "rebuild", "--all", "--no-progress"]);
    let statuses = json_lines(&succeed(dir.path(), &["projections", "status", "--json"]));
    let generation = statuses[0]["generation"].as_u64().expect("the models are built");
    let ticket: String = {
        let db = rusqlite::Connection::open(dir.path().join("triage.read.db")).unwrap();
        let ticket: String = db
            .query_row(
                &format!("SELECT ticket_id FROM tickets_g{generation} LIMIT 1"),
                [],
                |row| row.get(0),
            )
            .unwrap();
        let edited = db
            .execute(
                &format!("UPDATE tickets_g{generation} SET state = 'RESOLVED' WHERE ticket_id = ?1"),
                [&ticket],
            )
            .unwrap();
        assert_eq!(edited, 1);
        let deleted = db
            .execute(
                &format!("DELETE FROM stats_counters_g{generation} WHERE name = 'tickets_opened'"),
                [],
            )
            .unwrap();
        assert_eq!(deleted, 1);
        ticket
    };
    // Exit status 4: a scheduled check sees the drift without reading the
    // report (it was 0).
    let drifted = common::triage(
        dir.path(),
        &["projections", "rebuild", "--all", "--verify", "--json", "--no-progress"],
    );
    assert_eq!(drifted.status.code(), Some(4), "{}", common::stderr(&drifted));
    assert!(
        common::stderr(&drifted).contains("the live model of tickets, stats differed"),
        "{}",
        common::stderr(&drifted)
    );
    let reports = json_lines(&common::stdout(&drifted));
    let differences = |name: &str| -> Vec<String> {
        let report = reports
            .iter()
            .find(|report| report["name"] == name)
            .expect("a report per projection");
        report["differences"]
            .as_array()
            .expect("differences are listed")
            .iter()
            .map(|difference| difference.as_str().unwrap().to_owned())
            .collect()
    };
    let tickets = differences("tickets");
    assert_eq!(tickets.len(), 1, "{tickets:?}");
    assert!(tickets[0].contains(&ticket), "{tickets:?}");
    let stats = differences("stats");
    assert!(
        stats.iter().any(|difference| difference.contains("tickets_opened")),
        "{stats:?}"
    );
    // The rebuild replaced the edited models: verifying again finds nothing.
    let again = json_lines(&succeed(
        dir.path(),
        &["projections", "rebuild", "--all", "--verify", "--json", "--no-progress"],
    ));
    assert!(
        again
            .iter()
            .all(|report| report["differences"] == serde_json::json!([])),
        "{again:?}"
    );
}
