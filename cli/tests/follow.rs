//! `triage events --follow` through the real binary: the live tail prints
//! what is appended after it started, and Ctrl-C ends it cleanly even
//! while events keep arriving.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use common::succeed;
use serde_json::Value;

fn open_ticket(dir: &Path, subject: &str) {
    succeed(dir, &["ticket", "open", "--subject", subject, "--body", "b"]);
}

fn follow(dir: &Path) -> Child {
    common::command(dir)
        .args(["events", "--follow", "--format", "jsonl"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the triage binary runs")
}

/// Waits up to `limit` for `child` to end; kills it if it does not.
fn exit_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Starts a tail, checks that it prints the history and then live events,
/// and sends it Ctrl-C while events keep arriving; returns how it ended.
/// `opened` counts the tickets the writer has opened so far.
fn tail_until_ctrl_c(dir: &Path, opened: &AtomicUsize) -> Option<std::process::ExitStatus> {
    let mut tail = follow(dir);
    let (lines, received) = mpsc::channel::<String>();
    let stdout = tail.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let subject = |line: &str| -> Option<String> {
        let row: Value = serde_json::from_str(line).expect("every line is JSON");
        row["data"]["subject"].as_str().map(str::to_owned)
    };
    let first = received
        .recv_timeout(Duration::from_secs(30))
        .expect("the history is printed");
    assert_eq!(subject(&first).as_deref(), Some("before the tail"));
    // The history of this small log is one page, printed by now; a ticket
    // the writer starts after this pause can only come live.
    std::thread::sleep(Duration::from_millis(500));
    let live_from = opened.load(Ordering::SeqCst) + 1;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = received
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no ticket opened after the tail started was printed"));
        let number = subject(&line)
            .and_then(|subject| subject.strip_prefix("live ").map(str::to_owned))
            .and_then(|number| number.parse::<usize>().ok());
        if number.is_some_and(|number| number >= live_from) {
            break;
        }
    }
    // A few more deliveries, then Ctrl-C in the middle of the flow.
    for _ in 0..3 {
        received
            .recv_timeout(Duration::from_secs(30))
            .expect("live events keep coming");
    }
    let pid = tail.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    exit_within(&mut tail, Duration::from_secs(10))
}

/// A tail that missed Ctrl-C did so only when the signal arrived between
/// two deliveries (about one run in six before the fix), so several tails
/// are stopped in turn.
#[test]
fn the_tail_prints_new_events_and_stops_on_ctrl_c_while_events_flow() {
    let dir = tempfile::tempdir().unwrap();
    open_ticket(dir.path(), "before the tail");
    // Keep appending while the tails run, so that Ctrl-C arrives while
    // events are being delivered and printed.
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, opened) = (Arc::clone(&stop), Arc::clone(&opened));
        let dir = dir.path().to_path_buf();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let next = opened.load(Ordering::SeqCst);
                open_ticket(&dir, &format!("live {next}"));
                opened.store(next + 1, Ordering::SeqCst);
            }
            opened.load(Ordering::SeqCst)
        })
    };
    let ended: Vec<_> = (0..8).map(|_| tail_until_ctrl_c(dir.path(), &opened)).collect();
    stop.store(true, Ordering::Relaxed);
    assert!(writer.join().unwrap() > 0);
    for (run, status) in ended.into_iter().enumerate() {
        let status = status.unwrap_or_else(|| panic!("tail {run} did not end within 10 s of Ctrl-C"));
        assert!(status.success(), "Ctrl-C ends tail {run} cleanly: {status:?}");
    }
}

/// A tail bounded by --to-position ends by itself once the log passes it,
/// whether the history already did or a later append does.
#[test]
fn a_tail_bounded_by_to_position_ends_there() {
    let dir = tempfile::tempdir().unwrap();
    for subject in ["one", "two", "three"] {
        open_ticket(dir.path(), subject);
    }
    let tail = |to: &str| {
        common::command(dir.path())
            .args(["events", "--follow", "--format", "jsonl", "--to-position", to])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the triage binary runs")
    };
    // The history reaches the bound: the tail ends after it.
    let mut within_history = tail("2");
    let status = exit_within(&mut within_history, Duration::from_secs(20)).expect("the tail ended by itself");
    assert!(status.success(), "{status:?}");
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut within_history.stdout.take().unwrap(), &mut printed).unwrap();
    assert_eq!(printed.lines().count(), 2, "{printed}");
    // The bound lies ahead: the tail prints up to it as it is appended.
    let mut ahead = tail("5");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        ahead.try_wait().unwrap().is_none(),
        "the tail waits for positions 4 and 5"
    );
    open_ticket(dir.path(), "four");
    open_ticket(dir.path(), "five");
    let status = exit_within(&mut ahead, Duration::from_secs(20)).expect("the tail ended at position 5");
    assert!(status.success(), "{status:?}");
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut ahead.stdout.take().unwrap(), &mut printed).unwrap();
    let subjects: Vec<String> = printed
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["data"]["subject"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(subjects, ["one", "two", "three", "four", "five"]);
}
