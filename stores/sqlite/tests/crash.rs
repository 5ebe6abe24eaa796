//! Durability under SIGKILL, modelled on redb's crash-consistency tests.
//!
//! The test re-executes its own binary in "child mode" (the ignored test
//! `crash_child_appends_until_killed`, selected with `--exact --ignored`).
//! The child appends batches of three events from several tasks with
//! `synchronous=FULL` and prints each append before sending it (`SEND`) and
//! after it was acknowledged (`ACK`). The parent kills it with SIGKILL after
//! some hundreds of acknowledgements, reopens the file and checks that every
//! acknowledged event is there, that no append is partly there, that
//! revisions are consecutive and positions strictly increase. Three kills,
//! on the same file.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use triage_event_store::{EventData, EventStore, ExpectedRevision, ReadAll, RecordedEvent, StreamName};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions, Synchronous};
use uuid::Uuid;

const CHILD_TEST: &str = "crash_child_appends_until_killed";
const DB_VAR: &str = "TRIAGE_CRASH_CHILD_DB";
const RUN_VAR: &str = "TRIAGE_CRASH_CHILD_RUN";
const TASKS: usize = 8;
const EVENTS_PER_APPEND: usize = 3;
const KILLS: usize = 3;
/// Starts every reported line. libtest prints `test <name> ... ` without a
/// newline before the child's first line, so lines are found by this marker.
const MARKER: &str = "triage-crash:";

/// Child mode: appends until killed. Does nothing unless the parent set the
/// environment.
#[test]
#[ignore = "child process of acknowledged_appends_survive_sigkill"]
fn crash_child_appends_until_killed() {
    let (Ok(path), Ok(run)) = (std::env::var(DB_VAR), std::env::var(RUN_VAR)) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let options = SqliteOptions {
            synchronous: Synchronous::Full,
            ..SqliteOptions::default()
        };
        let store = Arc::new(SqliteEventStore::open(&path, options).expect("child opens the store"));
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let store = Arc::clone(&store);
            let run = run.clone();
            tasks.push(tokio::spawn(async move {
                for append in 0usize.. {
                    // A new stream every five appends, written with Exact.
                    let stream = StreamName::new(format!("crash-{run}-{task}-{}", append / 5)).unwrap();
                    let first_revision = (append % 5 * EVENTS_PER_APPEND) as u64;
                    let expected = match first_revision {
                        0 => ExpectedRevision::NoStream,
                        revision => ExpectedRevision::Exact(revision - 1),
                    };
                    let events: Vec<EventData> = (0..EVENTS_PER_APPEND)
                        .map(|index| EventData {
                            id: Uuid::new_v4(),
                            event_type: "Crashed".to_owned(),
                            data: format!("{{\"task\":{task},\"index\":{index}}}").into_bytes(),
                            metadata: b"{}".to_vec(),
                        })
                        .collect();
                    let line = format!(
                        "{stream} {first_revision} {}",
                        events.iter().map(|e| e.id.to_string()).collect::<Vec<_>>().join(",")
                    );
                    report("SEND", &line);
                    let result = store.append(&stream, expected, events).await.expect("append succeeds");
                    assert_eq!(result.current_revision, first_revision + EVENTS_PER_APPEND as u64 - 1);
                    report("ACK", &line);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
}

fn report(kind: &str, line: &str) {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{MARKER}{kind} {line}").unwrap();
    stdout.flush().unwrap();
}

/// One append as the child announced it.
#[derive(Clone, Debug)]
struct Announced {
    stream: StreamName,
    first_revision: u64,
    ids: Vec<Uuid>,
}

fn parse(line: &str) -> Option<(bool, Announced)> {
    let (_, report) = line.split_once(MARKER)?;
    let mut parts = report.split(' ');
    let acknowledged = match parts.next()? {
        "ACK" => true,
        "SEND" => false,
        _ => return None,
    };
    let stream = StreamName::new(parts.next()?).ok()?;
    let first_revision = parts.next()?.parse().ok()?;
    let ids = parts
        .next()?
        .split(',')
        .map(|id| id.parse().ok())
        .collect::<Option<Vec<Uuid>>>()?;
    (ids.len() == EVENTS_PER_APPEND).then_some((
        acknowledged,
        Announced {
            stream,
            first_revision,
            ids,
        },
    ))
}

/// Runs the child until it has acknowledged `kill_after` appends, kills it,
/// and returns every append it announced and the ids of the acknowledged ones.
fn run_child(path: &Path, run: usize, kill_after: usize) -> (Vec<Announced>, Vec<Announced>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([CHILD_TEST, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(DB_VAR, path)
        .env(RUN_VAR, run.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("child starts");
    let mut output = BufReader::new(child.stdout.take().unwrap());
    let mut sent = Vec::new();
    let mut acknowledged = Vec::new();
    let mut killed = false;
    let mut line = String::new();
    loop {
        line.clear();
        if output.read_line(&mut line).unwrap() == 0 {
            break;
        }
        // A line cut short by the kill was not fully reported: ignore it.
        let Some(complete) = line.strip_suffix('\n') else {
            continue;
        };
        match parse(complete) {
            Some((true, append)) => acknowledged.push(append),
            Some((false, append)) => sent.push(append),
            None => {}
        }
        if !killed && acknowledged.len() >= kill_after {
            // On Unix, kill() is SIGKILL: no destructors, no clean close.
            child.kill().unwrap();
            killed = true;
            // Keep reading: lines already in the pipe were reported before the kill.
        }
    }
    let status = child.wait().unwrap();
    assert!(
        killed,
        "the child exited ({status}) after only {} acknowledgements",
        acknowledged.len()
    );
    (sent, acknowledged)
}

async fn whole_log(store: &SqliteEventStore) -> Vec<RecordedEvent> {
    let mut log: Vec<RecordedEvent> = Vec::new();
    loop {
        let last = log.last().map(|event| event.position);
        let mut options = ReadAll::forwards(1000);
        if let Some(last) = last {
            options = options.from_position(last);
        }
        let page = store.read_all(options).await.unwrap();
        let before = log.len();
        // Reads include their start: skip the event already held.
        log.extend(page.into_iter().filter(|event| Some(event.position) > last));
        if log.len() == before {
            return log;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let mut all_sent = Vec::new();
    let mut all_acknowledged = Vec::new();
    for run in 0..KILLS {
        let kill_after = 200 + 100 * run;
        let child_path = path.clone();
        let (sent, acknowledged) = tokio::task::spawn_blocking(move || run_child(&child_path, run, kill_after))
            .await
            .unwrap();
        assert!(acknowledged.len() >= kill_after);
        all_sent.extend(sent);
        all_acknowledged.extend(acknowledged);

        let store = SqliteEventStore::open(&path, SqliteOptions::default()).expect("the killed store reopens");
        let log = whole_log(&store).await;
        let by_id: HashMap<Uuid, &RecordedEvent> = log.iter().map(|e| (e.id, e)).collect();
        assert_eq!(by_id.len(), log.len(), "no event id is stored twice");

        // Every acknowledged event is stored where the acknowledgement said.
        for append in &all_acknowledged {
            for (offset, id) in append.ids.iter().enumerate() {
                let stored = by_id
                    .get(id)
                    .unwrap_or_else(|| panic!("run {run}: acknowledged event {id} of {:?} is lost", append.stream));
                assert_eq!(stored.stream, append.stream);
                assert_eq!(stored.revision, append.first_revision + offset as u64);
            }
        }
        // Every append is all there or not there at all.
        let mut announced_ids = 0;
        for append in &all_sent {
            let present = append.ids.iter().filter(|id| by_id.contains_key(id)).count();
            assert!(
                present == 0 || present == EVENTS_PER_APPEND,
                "run {run}: {present} of {EVENTS_PER_APPEND} events of an append to {:?} survived",
                append.stream
            );
            announced_ids += present;
        }
        assert_eq!(
            announced_ids,
            log.len(),
            "every stored event was announced by the child"
        );
        // Positions strictly increase; revisions are consecutive per stream.
        assert!(log.windows(2).all(|pair| pair[0].position < pair[1].position));
        let mut revisions: BTreeMap<&StreamName, Vec<u64>> = BTreeMap::new();
        for event in &log {
            revisions.entry(&event.stream).or_default().push(event.revision);
        }
        for (stream, revisions) in revisions {
            let expected: Vec<u64> = (0..revisions.len() as u64).collect();
            assert_eq!(revisions, expected, "{stream} has consecutive revisions");
        }
        assert!(log.len() >= all_acknowledged.len() * EVENTS_PER_APPEND);
        eprintln!(
            "kill {run}: {} appends sent, {} acknowledged, {} stored in total",
            all_sent.len(),
            all_acknowledged.len(),
            log.len() / EVENTS_PER_APPEND
        );
        drop(store);
    }
}
