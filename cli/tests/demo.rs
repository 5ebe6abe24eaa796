//! `triage demo` through the real binary.

mod common;

use common::{fail, succeed};
use serde_json::Value;

const SMALL: &[&str] = &[
    "demo",
    "--tickets",
    "12",
    "--time-scale",
    "0.002",
    "--no-progress",
    "--json",
];

const KEYS: &[&str] = &[
    "tickets",
    "resolved",
    "task_failure_rate",
    "latency_mean_ms",
    "latency_p99_ms",
    "conflicts_detected",
    "late_writes_rejected",
    "duplicates_suppressed",
    "claims_expired",
    "lost_updates",
    "invalid_transitions",
    "duplicate_events",
    "missing_events",
    "read_model_matches_rebuild",
    "audit_passed",
];

#[test]
fn the_demo_prints_its_summary_as_json_and_passes_its_audit() {
    let dir = tempfile::tempdir().unwrap();
    let report: Value = serde_json::from_str(&succeed(dir.path(), SMALL)).unwrap();
    for key in KEYS {
        assert!(report.get(key).is_some(), "missing key {key} in {report}");
    }
    assert_eq!(report["tickets"], 12);
    assert_eq!(report["resolved"], 12);
    assert_eq!(report["audit_passed"], true);
    assert_eq!(report["lost_updates"], 0);
    assert!(
        !dir.path().join("triage.db").exists(),
        "the demo used a temporary store"
    );
}

#[test]
fn compare_naive_prints_both_designs() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = SMALL.to_vec();
    args.extend(["--compare", "naive"]);
    let both: Value = serde_json::from_str(&succeed(dir.path(), &args)).unwrap();
    for design in ["triage", "naive"] {
        for key in KEYS {
            assert!(both[design].get(key).is_some(), "missing {design}.{key}");
        }
    }
    assert_eq!(both["triage"]["audit_passed"], true);
    assert_eq!(both["naive"]["design"], "naive");
}

#[test]
fn the_demo_keeps_its_events_when_given_a_store_and_people_get_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let text = succeed(
        dir.path(),
        &[
            "--db",
            "kept.db",
            "demo",
            "--tickets",
            "6",
            "--time-scale",
            "0.002",
            "--no-progress",
        ],
    );
    assert!(
        text.contains("AUDIT (from the log alone)") && text.contains("PASSED"),
        "{text}"
    );
    let listed = succeed(
        dir.path(),
        &["--db", "kept.db", "ticket", "list", "--state", "resolved", "--json"],
    );
    assert_eq!(listed.lines().count(), 6, "the demo's tickets stay in kept.db");
    let error = fail(dir.path(), &["demo", "--crash-rate", "0.9", "--timeout-rate", "0.9"]);
    assert!(error.contains("failure rates must add up to at most 1"), "{error}");
}

#[test]
fn a_second_demo_into_the_same_store_counts_and_audits_its_own_tickets() {
    let dir = tempfile::tempdir().unwrap();
    let run = || -> Value {
        serde_json::from_str(&succeed(
            dir.path(),
            &[
                "--db",
                "kept.db",
                "demo",
                "--tickets",
                "5",
                "--time-scale",
                "0.002",
                "--no-progress",
                "--json",
            ],
        ))
        .unwrap()
    };
    let first = run();
    let second = run();
    for report in [&first, &second] {
        assert_eq!(report["tickets"], 5);
        assert_eq!(report["resolved"], 5, "{report}");
        assert!(report["tasks"].as_u64().unwrap() >= 15, "the agents worked: {report}");
        assert_eq!(report["audit_passed"], true);
    }
    let all = succeed(dir.path(), &["--db", "kept.db", "ticket", "list", "--json"]);
    assert_eq!(all.lines().count(), 10, "both runs' tickets are in the store");
}

#[test]
fn the_demo_runs_on_a_kurrentdb_store_through_the_test_double() {
    // The server runs on its own runtime for the length of the test; the
    // binary connects to it like to a real KurrentDB node.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime
        .block_on(triage_kurrentdb_testserver::TestServer::start(
            "127.0.0.1:0".parse().unwrap(),
        ))
        .unwrap();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--store", url.as_str()];
    args.extend_from_slice(SMALL);
    let report: Value = serde_json::from_str(&succeed(dir.path(), &args)).unwrap();
    assert_eq!(report["resolved"], 12, "{report}");
    assert_eq!(report["audit_passed"], true, "{report}");
    assert_eq!(report["read_model_matches_rebuild"], true, "{report}");
    let events = server.log().len();
    assert!(events >= 12 * 5, "the events are on the server: {events}");
    assert!(
        dir.path().join("triage.esdb.read.db").exists(),
        "read models default to a SQLite file in the working directory"
    );
    // The analysts' tools read the same server.
    let listed = succeed(dir.path(), &["--store", url.as_str(), "ticket", "list", "--json"]);
    assert_eq!(listed.lines().count(), 12, "{listed}");
    let stopped = runtime.block_on(server.stop());
    assert_eq!(stopped.len(), events, "nothing was written after the demo");
}

#[test]
fn an_unreachable_kurrentdb_store_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 9 (discard) on loopback here.
    let error = fail(
        dir.path(),
        &[
            "--store",
            "esdb://127.0.0.1:9?tls=false&discoveryInterval=0",
            "ticket",
            "list",
        ],
    );
    assert!(error.contains("unavailable"), "{error}");
    assert!(error.contains("127.0.0.1:9"), "{error}");
}

#[test]
fn a_demo_on_a_store_with_other_tickets_never_touches_them() {
    let dir = tempfile::tempdir().unwrap();
    let open = || -> String {
        let opened: Value = serde_json::from_str(&succeed(
            dir.path(),
            &[
                "--db",
                "real.db",
                "ticket",
                "open",
                "--subject",
                "Refund",
                "--body",
                "Twice.",
                "--json",
            ],
        ))
        .unwrap();
        opened["id"].as_str().unwrap().to_owned()
    };
    // One waiting in the classifiers' queue, one with a lease that runs out
    // while the demo runs: the demo's agents and sweeper would take both.
    let waiting = open();
    let claimed = open();
    succeed(
        dir.path(),
        &[
            "--db",
            "real.db",
            "ticket",
            "send",
            &claimed,
            r#"{"type":"start_classification","lease_secs":1}"#,
            "--agent",
            "classifier-7",
            "--role",
            "classifier",
        ],
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let report: Value = serde_json::from_str(&succeed(
        dir.path(),
        &[
            "--db",
            "real.db",
            "demo",
            "--tickets",
            "6",
            "--time-scale",
            "0.002",
            "--no-progress",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(report["resolved"], 6, "{report}");
    assert_eq!(report["audit_passed"], true);
    for (ticket, events) in [(&waiting, 1), (&claimed, 2)] {
        let history = succeed(dir.path(), &["--db", "real.db", "ticket", "history", ticket, "--json"]);
        assert_eq!(
            history.lines().count(),
            events,
            "the demo worked a ticket not its own:\n{history}"
        );
    }
}

/// Ctrl-C during a run: the demo stops, says so, exits 130 and deletes the
/// temporary store it said it would delete at exit.
#[test]
fn ctrl_c_stops_the_demo_and_deletes_its_temporary_store() {
    use std::io::{BufRead, BufReader};
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut demo = common::command(dir.path())
        .args(["demo", "--tickets", "500", "--no-progress"])
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the triage binary runs");
    let mut stderr = BufReader::new(demo.stderr.take().unwrap());
    let mut banner = String::new();
    stderr.read_line(&mut banner).unwrap();
    assert!(banner.contains("deleted at exit"), "{banner}");
    let store_dirs = || std::fs::read_dir(tmp.path()).unwrap().count();
    assert_eq!(store_dirs(), 1, "the demo made its temporary store");
    std::thread::sleep(Duration::from_millis(500));
    let status = ctrl_c(&mut demo);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert_eq!(status.code(), Some(130), "{rest}");
    assert!(rest.contains("interrupted"), "{rest}");
    assert_eq!(store_dirs(), 0, "the temporary store was deleted");
}

/// Ctrl-C during the naive design's run, after Triage's: still stops the
/// demo (listening for Ctrl-C once takes it over for the whole process),
/// and Triage's finished, audited run is still shown.
#[test]
fn ctrl_c_stops_the_demo_during_the_naive_run_too() {
    use std::io::{BufRead, BufReader, Read};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let mut demo = common::command(dir.path())
        .args(["demo", "--tickets", "400", "--max-seconds", "4", "--compare", "naive"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the triage binary runs");
    let stderr = BufReader::new(demo.stderr.take().unwrap());
    let (lines, received) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    // Progress lines name the design: wait for the naive run's first.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = received
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the naive run starts");
        if line.trim_start().starts_with("naive") {
            break;
        }
    }
    let status = ctrl_c(&mut demo);
    let mut shown = String::new();
    demo.stdout.take().unwrap().read_to_string(&mut shown).unwrap();
    let rest: Vec<String> = received.iter().collect();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    assert!(
        rest.iter()
            .any(|line| line.contains("the naive baseline was cut short")),
        "{rest:?}"
    );
    assert!(shown.contains("audit"), "Triage's run is shown: {shown}");
}

/// Sends the demo Ctrl-C and waits (at most 20 s) for it to end.
fn ctrl_c(demo: &mut std::process::Child) -> std::process::ExitStatus {
    use std::time::{Duration, Instant};
    let pid = demo.id().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = demo.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = demo.kill();
            panic!("the demo did not stop on Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// TRIAGE_DB and its siblings name the user's own store: the demo's
/// simulated tickets must not land there (an append-only log cannot take
/// them back). Only --db or --store on the command line keeps them.
#[test]
fn the_demo_ignores_the_stores_named_in_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let own = dir.path().join("own.db");
    let own_read = dir.path().join("own.read.db");
    succeed(
        dir.path(),
        &[
            "--db",
            own.to_str().unwrap(),
            "ticket",
            "open",
            "--subject",
            "Real",
            "--body",
            "A real ticket.",
        ],
    );
    let read_before = std::fs::read(&own_read).unwrap();
    let output = common::command(dir.path())
        .env("TRIAGE_DB", &own)
        .env("TRIAGE_READ_MODEL", &own_read)
        .args(SMALL)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", common::stderr(&output));
    assert!(
        common::stderr(&output).contains("ignoring TRIAGE_DB, TRIAGE_READ_MODEL"),
        "{}",
        common::stderr(&output)
    );
    let report: Value = serde_json::from_str(&common::stdout(&output)).unwrap();
    assert_eq!(report["audit_passed"], true);
    assert_eq!(
        common::events_in(&own),
        1,
        "the demo wrote into the store TRIAGE_DB names"
    );
    assert_eq!(
        std::fs::read(&own_read).unwrap(),
        read_before,
        "the demo wrote into TRIAGE_READ_MODEL's file"
    );
}

/// A run no machine can carry out is refused before anything is written.
#[test]
fn an_impossible_demo_is_refused_before_it_creates_a_store() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--db", "fresh.db", "demo", "--tickets", "0"][..],
        &["--db", "fresh.db", "demo", "--tickets", "100000000000"][..],
        &["--db", "fresh.db", "demo", "--classifiers", "100000000"][..],
    ] {
        let error = fail(dir.path(), args);
        assert!(
            error.contains("--tickets") || error.contains("--classifiers"),
            "{error}"
        );
        assert!(!dir.path().join("fresh.db").exists(), "{args:?} left a store behind");
    }
}

/// The demo takes --read-model as every command does: a URL with a slip
/// is refused, not made into a file of that name (it was, on both the
/// temporary and a named store).
#[test]
fn the_demo_refuses_a_mistyped_read_model_url() {
    let dir = tempfile::tempdir().unwrap();
    for global in [
        &["--read-model", "postgres:bar"][..],
        &["--db", "s.db", "--read-model", "postgres:foo"][..],
    ] {
        let mut args = global.to_vec();
        args.extend_from_slice(SMALL);
        let refused = fail(dir.path(), &args);
        assert!(refused.contains("looks like a postgres URL"), "{refused}");
    }
    let made: Vec<String> = common::file_names(dir.path())
        .into_iter()
        .filter(|name| name.starts_with("postgres:"))
        .collect();
    assert!(made.is_empty(), "{made:?}");

    // Read models in PostgreSQL are refused before the store is opened,
    // which would make the store only for the run to stop.
    let mut args = vec!["--db", "kept.db", "--read-model", "postgres://nobody@127.0.0.1:1/x"];
    args.extend_from_slice(SMALL);
    let refused = fail(dir.path(), &args);
    assert!(
        refused.contains("the demo keeps its read models in SQLite"),
        "{refused}"
    );
    assert!(!dir.path().join("kept.db").exists(), "the refused demo made its store");
}

/// Ctrl-C stops the demo at once, says that nothing was audited, exits 130,
/// and does not report the run's own ending as a projector failure (which
/// it did when the signal found the projector reading: about one run in
/// three with a kept store, so this catches it only sometimes).
#[test]
fn ctrl_c_stops_the_demo_quietly() {
    use std::io::Read as _;
    let dir = tempfile::tempdir().unwrap();
    let mut demo = common::command(dir.path())
        .args(["--db", "kept.db", "demo", "--no-progress"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = demo.stderr.take().unwrap();
    // The first line says the run has begun (its agents are at work).
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !seen.ends_with(b"\n") && stderr.read(&mut byte).unwrap() == 1 {
        seen.push(byte[0]);
    }
    assert!(String::from_utf8_lossy(&seen).contains("triage demo:"), "{seen:?}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let sent = std::process::Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    let status = demo.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest}");
    assert!(rest.contains("interrupted; nothing was audited"), "{rest}");
    assert!(!rest.contains("the live projector stopped"), "{rest}");
}
