//! Group commit: `triage_append` takes a batch of appends, checks each one
//! on its own, and writes those that hold in one transaction; the store
//! groups the appends of concurrent callers into such batches.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::Barrier;
use triage_event_store::{Error, EventData, EventStore, ExpectedRevision, ReadStream, StreamName};
use triage_store_postgres::PostgresOptions;
use uuid::Uuid;

fn stream() -> StreamName {
    StreamName::new(format!("ticket-{}", Uuid::new_v4())).unwrap()
}

/// The transaction id of every event in the log, in position order.
async fn transactions_in_log_order(url: &str, schema: &str) -> Vec<i64> {
    let rows = common::raw_client(url)
        .await
        .query(
            &format!(r#"SELECT tx_id::text::bigint FROM "{schema}".triage_events ORDER BY position"#),
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|row| row.get(0)).collect()
}

/// One append of a direct `triage_append` call: the stream, `p_expected`
/// and the events.
type RawAppend<'a> = (&'a StreamName, Option<i64>, Vec<EventData>);

/// Calls `triage_append` directly with `batch`, in one transaction of its
/// own; its rows as they come.
async fn call_append(
    client: &tokio_postgres::Client,
    schema: &str,
    batch: &[RawAppend<'_>],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let streams: Vec<&str> = batch.iter().map(|(stream, ..)| stream.as_str()).collect();
    let expected: Vec<Option<i64>> = batch.iter().map(|(_, expected, _)| *expected).collect();
    let mut event_append = Vec::new();
    let mut event_index = Vec::new();
    let mut events = Vec::new();
    for (number, (_, _, batch_events)) in (1i32..).zip(batch) {
        for (index, event) in (0i32..).zip(batch_events) {
            event_append.push(number);
            event_index.push(index);
            events.push(event.clone());
        }
    }
    client
        .query(
            &format!(
                r#"SELECT first_revision, last_position, conflict, actual_revision
                   FROM "{schema}".triage_append($1, $2, $3, $4, $5, $6, $7, $8)"#
            ),
            &[
                &streams,
                &expected,
                &event_append,
                &event_index,
                &events.iter().map(|event| event.id).collect::<Vec<_>>(),
                &events.iter().map(|event| event.event_type.as_str()).collect::<Vec<_>>(),
                &events.iter().map(|event| event.data.as_slice()).collect::<Vec<_>>(),
                &events.iter().map(|event| event.metadata.as_slice()).collect::<Vec<_>>(),
            ],
        )
        .await
}

/// One batch, every outcome: a new stream, an `Exact` on a missing stream,
/// a second append to the new stream (it goes on after the first), an
/// append whose id is stored, a stale `Exact` on the new stream, an append
/// that holds, and one with an id of the batch's first append. The batch
/// means what its appends would mean one after the other: those that hold
/// are written together, in one transaction; the others write nothing and
/// say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_writes_only_the_appends_that_hold() {
    let Some(url) = common::url("one_batch_writes_only_the_appends_that_hold") else {
        return;
    };
    let store = common::temporary_store(&url, PostgresOptions::default()).await;
    let schema = store.schema().to_owned();
    let client = common::raw_client(&url).await;
    let existing = stream();
    let stored = common::event("Stored");
    store
        .append(&existing, ExpectedRevision::NoStream, vec![stored.clone()])
        .await
        .unwrap();

    let (fresh, missing, other) = (stream(), stream(), stream());
    let a = common::event("A");
    // (stream, p_expected, events)
    let batch: Vec<(&StreamName, Option<i64>, Vec<EventData>)> = vec![
        (&fresh, Some(-1), vec![a.clone(), common::event("B")]),
        (&missing, Some(4), vec![common::event("C")]),
        (&fresh, None, vec![common::event("D")]),
        (&other, None, vec![stored.clone()]),
        (&fresh, Some(1), vec![common::event("F")]),
        (&existing, Some(0), vec![common::event("E")]),
        (&other, None, vec![a.clone()]),
    ];
    let rows = call_append(&client, &schema, &batch).await.unwrap();
    let answers: Vec<(Option<i64>, Option<i64>)> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    let refusals: Vec<(bool, Option<i64>)> = rows.iter().map(|row| (row.get(2), row.get(3))).collect();
    assert_eq!(answers.len(), 7, "one row per append");
    let (first, again, last) = (answers[0], answers[2], answers[5]);
    assert_eq!(first.0, Some(0), "the new stream starts at revision 0");
    assert_eq!(again.0, Some(2), "the second append to it goes on after the first");
    assert_eq!(last.0, Some(1), "the existing stream goes on after revision 0");
    for skipped in [answers[1], answers[3], answers[4], answers[6]] {
        assert_eq!(skipped, (None, None), "{answers:?}");
    }
    // Why not: a conflict with the actual revision (none: no stream; 2:
    // after the batch's own D), or an id stored already, or written by an
    // earlier append of the batch (A).
    assert_eq!(
        refusals,
        [
            (false, None),
            (true, None),
            (false, None),
            (false, None),
            (true, Some(2)),
            (false, None),
            (false, None)
        ]
    );
    // Written in the batch's order: A, B, D, then E.
    let start = first.1.expect("written");
    assert_eq!(
        (first.1, again.1, last.1),
        (Some(start), Some(start + 1), Some(start + 2))
    );

    let log = client
        .query(
            &format!(
                r#"SELECT event_type, stream, revision, tx_id::text FROM "{schema}".triage_events ORDER BY position"#
            ),
            &[],
        )
        .await
        .unwrap();
    let written: Vec<(String, String, i64)> = log.iter().map(|row| (row.get(0), row.get(1), row.get(2))).collect();
    assert_eq!(
        written,
        [
            ("Stored".to_owned(), existing.to_string(), 0),
            ("A".to_owned(), fresh.to_string(), 0),
            ("B".to_owned(), fresh.to_string(), 1),
            ("D".to_owned(), fresh.to_string(), 2),
            ("E".to_owned(), existing.to_string(), 1),
        ]
    );
    let batch_transactions: HashSet<String> = log[1..].iter().map(|row| row.get(3)).collect();
    assert_eq!(batch_transactions.len(), 1, "the batch is one transaction");
    assert!(matches!(
        store.read_stream(&missing, ReadStream::forwards()).await,
        Err(Error::StreamNotFound { .. })
    ));
}

/// A batch of one append takes a path of its own in `triage_append`
/// (schema version 4): for every kind of append it answers what the
/// general path answers for the same append in a batch of two (whose other
/// append writes to a stream of its own), and writes the same events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_one_append_answers_as_the_general_path_does() {
    let Some(url) = common::url("a_batch_of_one_append_answers_as_the_general_path_does") else {
        return;
    };
    let store = common::temporary_store(&url, PostgresOptions::default()).await;
    let schema = store.schema().to_owned();
    let client = common::raw_client(&url).await;

    /// The stream a case starts from: none, or one event (with an id of its
    /// own, or the id the case's append then sends again).
    #[derive(Clone, Copy, Debug)]
    enum Start {
        NoStream,
        OneEvent,
        OneEventWithTheAppendsId,
    }
    // (what the case is, the stream before, p_expected, events the append sends)
    let cases: [(&str, Start, Option<i64>, usize); 11] = [
        ("no stream expected, none there", Start::NoStream, Some(-1), 2),
        ("no stream expected, one there", Start::OneEvent, Some(-1), 1),
        ("exact revision that holds", Start::OneEvent, Some(0), 3),
        ("stale exact revision", Start::OneEvent, Some(5), 1),
        ("exact revision on no stream", Start::NoStream, Some(0), 1),
        ("stream exists, and it does", Start::OneEvent, Some(-2), 1),
        ("stream exists, and it does not", Start::NoStream, Some(-2), 1),
        ("any revision, on no stream", Start::NoStream, None, 1),
        ("any revision, on a stream", Start::OneEvent, None, 2),
        ("an id stored already", Start::OneEventWithTheAppendsId, Some(0), 1),
        // Stored ids are looked for first: a retry, not a conflict.
        (
            "an id stored already, no stream expected",
            Start::OneEventWithTheAppendsId,
            Some(-1),
            1,
        ),
    ];
    let mut written = Vec::new();
    for (case, start, expected, count) in cases {
        let mut answers = Vec::new();
        let mut logs = Vec::new();
        for general in [false, true] {
            let target = stream();
            let events: Vec<EventData> = (0..count).map(|n| common::event(&format!("E{n}"))).collect();
            match start {
                Start::NoStream => {}
                Start::OneEvent => {
                    store
                        .append(&target, ExpectedRevision::NoStream, vec![common::event("Before")])
                        .await
                        .unwrap();
                }
                Start::OneEventWithTheAppendsId => {
                    store
                        .append(&target, ExpectedRevision::NoStream, vec![events[0].clone()])
                        .await
                        .unwrap();
                }
            }
            let own = stream();
            let mut batch: Vec<RawAppend<'_>> = vec![(&target, expected, events)];
            if general {
                batch.push((&own, Some(-1), vec![common::event("Other")]));
            }
            let rows = call_append(&client, &schema, &batch).await.unwrap();
            assert_eq!(rows.len(), batch.len(), "{case}: one row per append");
            let row = &rows[0];
            let (first, last, conflict, actual): (Option<i64>, Option<i64>, bool, Option<i64>) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            answers.push((first, last.is_some(), conflict, actual));
            let log: Vec<(String, i64)> = store
                .read_stream(&target, ReadStream::forwards())
                .await
                .map(|events| {
                    events
                        .iter()
                        .map(|event| (event.event_type.clone(), event.revision as i64))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(last) = last {
                let position: i64 = client
                    .query_one(
                        &format!(r#"SELECT max(position) FROM "{schema}".triage_events WHERE stream = $1"#),
                        &[&target.as_str()],
                    )
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(last, position, "{case}: the last position is the stream's last event");
            }
            logs.push(log);
        }
        assert_eq!(
            answers[0], answers[1],
            "{case}: one append alone, then in a batch of two"
        );
        assert_eq!(logs[0], logs[1], "{case}: the same events stored");
        written.push((case, answers[0].0, answers[0].2));
    }
    // What the answers are (first revision, conflict), so that the two
    // paths cannot agree on nonsense.
    assert_eq!(
        written,
        [
            ("no stream expected, none there", Some(0), false),
            ("no stream expected, one there", None, true),
            ("exact revision that holds", Some(1), false),
            ("stale exact revision", None, true),
            ("exact revision on no stream", None, true),
            ("stream exists, and it does", Some(1), false),
            ("stream exists, and it does not", None, true),
            ("any revision, on no stream", Some(0), false),
            ("any revision, on a stream", Some(1), false),
            ("an id stored already", None, false),
            ("an id stored already, no stream expected", None, false),
        ]
    );

    // Two events with one id in the append: both paths leave it to the
    // unique index, which refuses the whole call.
    for general in [false, true] {
        let (target, own) = (stream(), stream());
        let twice = common::event("Twice");
        let mut batch: Vec<RawAppend<'_>> = vec![(&target, Some(-1), vec![twice.clone(), twice])];
        if general {
            batch.push((&own, Some(-1), vec![common::event("Other")]));
        }
        let error = call_append(&client, &schema, &batch)
            .await
            .expect_err("a repeated id within one append is refused");
        assert_eq!(
            error.code(),
            Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION),
            "general path: {general}: {error}"
        );
        assert!(matches!(
            store.read_stream(&target, ReadStream::forwards()).await,
            Err(Error::StreamNotFound { .. })
        ));
        // The failed call let go of the schema's append lock, a session
        // lock that outlives the rollback: held, it would stop every append.
        let held: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(held, 0, "general path: {general}: advisory locks still held");
    }
}

/// 64 callers append at once, half to streams of their own and half racing
/// `Exact(0)` on one shared stream. Every append to an own stream is
/// stored once at revision 0; exactly one racer wins and every other one
/// gets `WrongExpectedVersion` with the winner's revision; some appends
/// shared a transaction; and, read back from the log, positions follow
/// transaction ids (each transaction's events are one block of
/// positions), which the watermark relies on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_transactions_and_keep_their_checks() {
    let Some(url) = common::url("concurrent_appends_share_transactions_and_keep_their_checks") else {
        return;
    };
    const CALLERS: usize = 64;
    let store = Arc::new(common::temporary_store(&url, PostgresOptions::default()).await);
    let shared = stream();
    store
        .append(&shared, ExpectedRevision::NoStream, vec![common::event("Opened")])
        .await
        .unwrap();
    let barrier = Arc::new(Barrier::new(CALLERS));
    let tasks: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let (store, barrier, shared) = (Arc::clone(&store), Arc::clone(&barrier), shared.clone());
            tokio::spawn(async move {
                let (target, expected) = if caller % 2 == 0 {
                    (stream(), ExpectedRevision::NoStream)
                } else {
                    (shared, ExpectedRevision::Exact(0))
                };
                barrier.wait().await;
                let result = store.append(&target, expected, vec![common::event("Worked")]).await;
                (target, result)
            })
        })
        .collect();
    let mut racers_won = 0;
    for task in tasks {
        let (target, result) = task.await.unwrap();
        if target == shared {
            match result {
                Ok(written) => {
                    assert_eq!(written.current_revision, 1);
                    racers_won += 1;
                }
                Err(Error::WrongExpectedVersion { actual, .. }) => assert_eq!(actual, Some(1)),
                Err(other) => panic!("a racer failed: {other}"),
            }
        } else {
            assert_eq!(result.expect("an own stream is written").current_revision, 0);
            let read = store.read_stream(&target, ReadStream::forwards()).await.unwrap();
            assert_eq!(read.len(), 1);
        }
    }
    assert_eq!(racers_won, 1, "exactly one racer wins");
    assert_eq!(
        store.read_stream(&shared, ReadStream::forwards()).await.unwrap().len(),
        2
    );

    let transactions = transactions_in_log_order(&url, store.schema()).await;
    assert_eq!(transactions.len(), 1 + CALLERS / 2 + 1, "every written append once");
    assert!(
        transactions.windows(2).all(|pair| pair[0] <= pair[1]),
        "positions follow transaction ids: {transactions:?}"
    );
    let distinct: HashSet<i64> = transactions.iter().copied().collect();
    assert!(
        distinct.len() < transactions.len(),
        "some appends shared a transaction: {} transactions for {} appends",
        distinct.len(),
        transactions.len()
    );
}

/// Two stores on one schema (two processes, as far as PostgreSQL can
/// tell), 16 tasks each, race `Exact` appends on four shared streams, so
/// batches of both stores hold several of the same streams at once and
/// take their stream locks concurrently. Nothing deadlocks (the test ends
/// within its deadline), every stream is consecutive and holds exactly the
/// winners' events, and positions follow transaction ids in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_racing_on_shared_streams_neither_deadlock_nor_lose_events() {
    let Some(url) = common::url("two_stores_racing_on_shared_streams_neither_deadlock_nor_lose_events") else {
        return;
    };
    const TASKS_PER_STORE: usize = 16;
    const APPENDS_PER_TASK: usize = 25;
    let first = common::temporary_store(&url, PostgresOptions::default()).await;
    let schema = first.schema().to_owned();
    let second = triage_store_postgres::PostgresEventStore::connect(&url, PostgresOptions::in_schema(&schema))
        .await
        .expect("a second store opens the same schema");
    let stores = [Arc::new(first), Arc::new(second)];
    let streams: Vec<StreamName> = (0..4).map(|_| stream()).collect();
    for shared in &streams {
        stores[0]
            .append(shared, ExpectedRevision::NoStream, vec![common::event("Opened")])
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for (number, store) in (0..).zip(stores.iter().cycle().take(2 * TASKS_PER_STORE)) {
        let (store, streams) = (Arc::clone(store), streams.clone());
        tasks.push(tokio::spawn(async move {
            let mut wins = Vec::new();
            for attempt in 0..APPENDS_PER_TASK {
                let target = &streams[(number + attempt) % streams.len()];
                let last = store
                    .read_stream(target, ReadStream::backwards().limit(1))
                    .await
                    .unwrap()[0]
                    .revision;
                let event = common::event("Worked");
                match store
                    .append(target, ExpectedRevision::Exact(last), vec![event.clone()])
                    .await
                {
                    Ok(written) => {
                        assert_eq!(written.current_revision, last + 1);
                        wins.push((target.clone(), written.current_revision, event.id));
                    }
                    Err(Error::WrongExpectedVersion { actual, .. }) => {
                        assert!(actual > Some(last), "{actual:?} after {last}");
                    }
                    Err(other) => panic!("unexpected error: {other}"),
                }
            }
            wins
        }));
    }
    let everything = async {
        let mut winners = std::collections::HashMap::new();
        for task in tasks {
            for (target, revision, id) in task.await.unwrap() {
                assert!(winners.insert((target, revision), id).is_none(), "two winners");
            }
        }
        winners
    };
    let winners = tokio::time::timeout(std::time::Duration::from_secs(60), everything)
        .await
        .expect("no deadlock: every append was answered");
    for shared in &streams {
        let stored = stores[1].read_stream(shared, ReadStream::forwards()).await.unwrap();
        for (revision, event) in (0u64..).zip(&stored) {
            assert_eq!(event.revision, revision, "consecutive revisions");
            if revision > 0 {
                assert_eq!(winners.get(&(shared.clone(), revision)), Some(&event.id));
            }
        }
        assert_eq!(
            stored.len() - 1,
            winners.keys().filter(|(target, _)| target == shared).count()
        );
    }
    let transactions = transactions_in_log_order(&url, &schema).await;
    assert_eq!(transactions.len(), streams.len() + winners.len());
    assert!(transactions.windows(2).all(|pair| pair[0] <= pair[1]));
}

/// A batch whose connection dies mid-flight (a server restart, a failover,
/// an administrator ending sessions): every caller still gets its own
/// answer by the single-append way, on a live connection, and nothing is
/// written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_whose_connection_dies_answers_every_caller_on_a_live_one() {
    let Some(url) = common::url("a_batch_whose_connection_dies_answers_every_caller_on_a_live_one") else {
        return;
    };
    let store = Arc::new(common::temporary_store(&url, PostgresOptions::default()).await);
    let schema = store.schema().to_owned();
    let hot = stream();
    store
        .append(&hot, ExpectedRevision::NoStream, vec![common::event("First")])
        .await
        .unwrap();
    // Another session appends to the stream and keeps its transaction open,
    // holding the stream's lock: the store's batches wait behind it.
    let slow = common::event("Slow");
    let locker = common::hold_stream_lock(&url, &schema, hot.as_str(), &slow).await;
    let exact = tokio::spawn({
        let (store, hot) = (store.clone(), hot.clone());
        async move {
            store
                .append(&hot, ExpectedRevision::Exact(0), vec![common::event("Exact")])
                .await
        }
    });
    let any = tokio::spawn({
        let (store, hot) = (store.clone(), hot.clone());
        async move {
            store
                .append(&hot, ExpectedRevision::Any, vec![common::event("Any")])
                .await
        }
    });
    // Wait until the batches are blocked on the lock, then end their
    // sessions.
    let admin = common::raw_client(&url).await;
    let mut killed = 0;
    for _ in 0..100 {
        killed = admin
            .query(
                // The store's own sessions only: a temporary store names
                // them after its schema.
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name = 'triage ' || $1 AND wait_event_type = 'Lock'
                   AND query LIKE '%triage_append%'",
                &[&schema],
            )
            .await
            .unwrap()
            .len();
        if killed > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(killed > 0, "a batch waited on the lock and its session was ended");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    locker.batch_execute("COMMIT").await.unwrap();

    let exact = exact.await.unwrap();
    assert!(
        matches!(exact, Err(Error::WrongExpectedVersion { actual: Some(actual), .. }) if actual >= 1),
        "the Exact(0) append conflicts with the slow one: {exact:?}"
    );
    let any = any.await.unwrap().expect("the Any append lands");
    assert_eq!(any.current_revision, 2);
    let types: Vec<String> = store
        .read_stream(&hot, ReadStream::forwards())
        .await
        .unwrap()
        .into_iter()
        .map(|record| record.event_type)
        .collect();
    assert_eq!(types, ["First", "Slow", "Any"]);
}
