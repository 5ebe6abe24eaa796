//! Group commit batches concurrent appends into few transactions, and an
//! append that fails inside a batch fails alone.
//!
//! No timing: another connection holds SQLite's write lock while the appends
//! queue up, so the writer is provably busy while all of them arrive.

use std::collections::HashMap;
use std::sync::Arc;

use triage_event_store::{Error, EventData, EventStore, ExpectedRevision, ReadStream, StreamName};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions};

const APPENDS: usize = 256;

fn event() -> EventData {
    triage_event_store::testing::event("Tested")
}

/// Holds SQLite's write lock from a second connection until `release`.
fn hold_write_lock(store: &SqliteEventStore) -> rusqlite::Connection {
    let blocker = rusqlite::Connection::open(store.path()).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    blocker
}

async fn wait_until_submitted(store: &SqliteEventStore, count: u64) {
    while store.stats().appends_submitted < count {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_transactions_and_conflicts_fail_alone() {
    let store = Arc::new(SqliteEventStore::open_temporary().unwrap());
    let taken = StreamName::new("ticket-taken").unwrap();
    let stored = event();
    store
        .append(&taken, ExpectedRevision::NoStream, vec![stored.clone()])
        .await
        .unwrap();
    let before = store.stats();
    assert_eq!(before.transactions, 1);

    let blocker = hold_write_lock(&store);
    let mut tasks = Vec::new();
    for index in 0..APPENDS {
        let store = Arc::clone(&store);
        let stored = stored.clone();
        let taken = taken.clone();
        tasks.push(tokio::spawn(async move {
            // Pairs race on one stream: exactly one of each pair may win.
            let stream = StreamName::new(format!("ticket-pair-{}", index / 2)).unwrap();
            let result = match index % 8 {
                // A stored id behind a new one: fails on the unique index.
                7 => {
                    store
                        .append(&stream, ExpectedRevision::Any, vec![event(), stored])
                        .await
                }
                // The stream exists already: fails in plan_append.
                5 => store.append(&taken, ExpectedRevision::NoStream, vec![event()]).await,
                _ => {
                    store
                        .append(&stream, ExpectedRevision::NoStream, vec![event(), event()])
                        .await
                }
            };
            (index, stream, result)
        }));
    }
    wait_until_submitted(&store, before.appends_submitted + APPENDS as u64).await;
    blocker.execute_batch("COMMIT").unwrap();
    drop(blocker);

    let mut winners: HashMap<StreamName, usize> = HashMap::new();
    for task in tasks {
        let (index, stream, result) = task.await.unwrap();
        match (index % 8, result) {
            (7, Err(Error::WrongExpectedVersion { .. })) => {}
            (5, Err(Error::WrongExpectedVersion { actual, .. })) => assert_eq!(actual, Some(0)),
            (5 | 7, other) => panic!("append {index} should conflict, got {other:?}"),
            (_, Ok(result)) => {
                assert_eq!(result.current_revision, 1);
                *winners.entry(stream).or_default() += 1;
            }
            (_, Err(Error::WrongExpectedVersion { actual, .. })) => {
                assert_eq!(actual, Some(1), "the loser of a pair sees the winner");
            }
            (_, Err(other)) => panic!("append {index} failed: {other}"),
        }
    }
    // Every pair had at least one NoStream append; each got exactly one winner.
    assert_eq!(winners.len(), APPENDS / 2);
    assert!(winners.values().all(|&wins| wins == 1), "{winners:?}");
    for stream in winners.keys() {
        let events = store.read_stream(stream, ReadStream::forwards()).await.unwrap();
        assert_eq!(events.iter().map(|e| e.revision).collect::<Vec<_>>(), [0, 1]);
    }

    let stats = store.stats();
    let transactions = stats.transactions - before.transactions;
    assert_eq!(stats.appends_answered - before.appends_answered, APPENDS as u64);
    // The writer took what was queued when it woke, waited for the lock,
    // then took every other append in one more transaction.
    assert!(transactions <= 2, "{APPENDS} appends used {transactions} transactions");
    assert!(stats.largest_batch >= (APPENDS / 2) as u64, "{stats:?}");
    assert_eq!(stats.events_written, 1 + 2 * (APPENDS / 2) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_group_commit_every_append_is_its_own_transaction() {
    let store = Arc::new(SqliteEventStore::open_temporary_with(SqliteOptions::single_commit()).unwrap());
    let blocker = hold_write_lock(&store);
    let mut tasks = Vec::new();
    for index in 0..32 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let stream = StreamName::new(format!("ticket-{index}")).unwrap();
            store.append(&stream, ExpectedRevision::NoStream, vec![event()]).await
        }));
    }
    wait_until_submitted(&store, 32).await;
    blocker.execute_batch("COMMIT").unwrap();
    drop(blocker);
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let stats = store.stats();
    assert_eq!(stats.transactions, 32);
    assert_eq!(stats.largest_batch, 1);
}

/// Appends `requests` while another connection holds the write lock, so
/// that the writer takes them all in one batch; returns their answers in
/// order.
async fn in_one_batch(
    store: &Arc<SqliteEventStore>,
    requests: Vec<(StreamName, ExpectedRevision, Vec<EventData>)>,
) -> Vec<triage_event_store::Result<triage_event_store::AppendResult>> {
    let before = store.stats();
    let blocker = hold_write_lock(store);
    let count = requests.len();
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|(stream, expected, events)| {
            let store = Arc::clone(store);
            tokio::spawn(async move { store.append(&stream, expected, events).await })
        })
        .collect();
    wait_until_submitted(store, before.appends_submitted + count as u64).await;
    blocker.execute_batch("COMMIT").unwrap();
    drop(blocker);
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    // The writer may have taken the first append before it met the lock.
    assert!(store.stats().transactions - before.transactions <= 2);
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_and_conflicts_in_a_batch_get_the_answers_they_get_alone() {
    let store = Arc::new(SqliteEventStore::open_temporary().unwrap());
    let stream = |name: &str| StreamName::new(format!("ticket-{name}")).unwrap();
    let stored = vec![event(), event()];
    let original = store
        .append(&stream("stored"), ExpectedRevision::NoStream, stored.clone())
        .await
        .unwrap();
    store
        .append(&stream("stored"), ExpectedRevision::Exact(1), vec![event()])
        .await
        .unwrap();

    // A retry whose expected revision no longer holds, and a conflict:
    // neither writes, so the batch needs no second run.
    let answers = in_one_batch(
        &store,
        vec![
            (stream("a"), ExpectedRevision::NoStream, vec![event()]),
            (stream("stored"), ExpectedRevision::NoStream, stored.clone()),
            (stream("stored"), ExpectedRevision::Exact(0), vec![event()]),
            (stream("b"), ExpectedRevision::NoStream, vec![event(), event()]),
        ],
    )
    .await;
    assert_eq!(answers[0].as_ref().unwrap().current_revision, 0);
    let replayed = answers[1].as_ref().unwrap();
    assert!(replayed.replayed);
    assert_eq!((replayed.current_revision, replayed.position), (1, original.position));
    assert!(
        matches!(&answers[2], Err(Error::WrongExpectedVersion { actual: Some(2), .. })),
        "{:?}",
        answers[2]
    );
    assert_eq!(answers[3].as_ref().unwrap().current_revision, 1);
    assert_eq!(store.stats().careful_reruns, 0);

    // A retry with `Any` meets its own stored event id on insert; so does
    // a new event behind a stored one. The batch is rolled back and run
    // again, and the appends around them are written once.
    let answers = in_one_batch(
        &store,
        vec![
            (stream("a"), ExpectedRevision::Exact(0), vec![event()]),
            (stream("stored"), ExpectedRevision::Any, stored.clone()),
            (stream("c"), ExpectedRevision::NoStream, vec![event()]),
            (stream("c"), ExpectedRevision::Any, vec![event(), stored[1].clone()]),
            (stream("b"), ExpectedRevision::Exact(1), vec![event()]),
        ],
    )
    .await;
    assert_eq!(answers[0].as_ref().unwrap().current_revision, 1);
    let replayed = answers[1].as_ref().unwrap();
    assert!(replayed.replayed);
    assert_eq!((replayed.current_revision, replayed.position), (1, original.position));
    assert_eq!(answers[2].as_ref().unwrap().current_revision, 0);
    assert!(
        matches!(&answers[3], Err(Error::WrongExpectedVersion { .. })),
        "{:?}",
        answers[3]
    );
    assert_eq!(answers[4].as_ref().unwrap().current_revision, 2);
    assert!(store.stats().careful_reruns >= 1);

    // The writer's view after the rerun is the log's: appends that
    // expect the revisions the batch left are accepted, stale ones not.
    for (name, revision) in [("a", 1), ("b", 2), ("c", 0), ("stored", 2)] {
        let next = store
            .append(&stream(name), ExpectedRevision::Exact(revision), vec![event()])
            .await
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        assert_eq!(next.current_revision, revision + 1);
        let stale = store
            .append(&stream(name), ExpectedRevision::Exact(revision), vec![event()])
            .await;
        assert!(
            matches!(&stale, Err(Error::WrongExpectedVersion { actual: Some(actual), .. }) if *actual == revision + 1),
            "{name}: {stale:?}"
        );
    }

    // The log holds each written event once, in its stream's order.
    let revisions = |name: &'static str| {
        let store = Arc::clone(&store);
        async move {
            store
                .read_stream(&stream(name), ReadStream::forwards())
                .await
                .unwrap()
                .iter()
                .map(|record| record.revision)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(revisions("a").await, [0, 1, 2]);
    assert_eq!(revisions("b").await, [0, 1, 2, 3]);
    assert_eq!(revisions("c").await, [0, 1]);
    assert_eq!(revisions("stored").await, [0, 1, 2, 3]);
    let all = store
        .read_all(triage_event_store::ReadAll::forwards(100))
        .await
        .unwrap();
    // Nothing else: "stored" 4, "a" 3, "b" 4, "c" 2.
    assert_eq!(all.len(), 13);
}
