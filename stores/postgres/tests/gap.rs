//! The PostgreSQL gap: a transaction that took a lower position commits
//! after transactions with higher positions. A live subscriber must still
//! receive every event exactly once and in position order, the slow one
//! included, and must not run ahead of it while it is open.
//!
//! The slow transaction calls the store's own `triage_append` inside an
//! explicit transaction and keeps it open, exactly as a slow append would.

mod common;

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use triage_event_store::{
    EventData, EventStore, ExpectedRevision, Position, ReadAll, StreamName, SubscribeToAll, Subscription,
    SubscriptionMessage,
};
use triage_store_postgres::{PostgresEventStore, PostgresOptions};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);

fn options() -> PostgresOptions {
    PostgresOptions {
        // Short, so that reads give up waiting for the open transaction
        // quickly and the test sees what they answer meanwhile.
        visibility_wait: Duration::from_millis(200),
        poll_interval: Duration::from_millis(100),
        ..PostgresOptions::default()
    }
}

fn stream(name: &str) -> StreamName {
    StreamName::new(format!("{name}-{}", Uuid::new_v4().simple())).unwrap()
}

/// Starts a transaction on `client` that appends `event` through
/// `triage_append` and stays open; returns the position it took.
async fn begin_slow_append(client: &Client, schema: &str, stream: &StreamName, event: &EventData) -> u64 {
    client.batch_execute("BEGIN").await.unwrap();
    let position = call_triage_append(client, schema, stream, event)
        .await
        .unwrap()
        .expect("a new stream is written");
    position as u64
}

/// Calls `triage_append` with one append of `event` to the new stream
/// `stream`; its last position, or `None` when it wrote nothing.
async fn call_triage_append(
    client: &Client,
    schema: &str,
    stream: &StreamName,
    event: &EventData,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                r#"SELECT last_position FROM "{schema}".triage_append(
                       ARRAY[$1], ARRAY[-1]::bigint[], ARRAY[1], ARRAY[0], $2, $3, $4, $5)"#
            ),
            &[
                &stream.as_str(),
                &vec![event.id],
                &vec![event.event_type.as_str()],
                &vec![event.data.as_slice()],
                &vec![event.metadata.as_slice()],
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// The next event, skipping checkpoints and `CaughtUp`; `None` if nothing
/// arrives within `wait`.
async fn next_event(subscription: &mut Subscription, wait: Duration) -> Option<triage_event_store::RecordedEvent> {
    tokio::time::timeout(wait, async {
        loop {
            match subscription.next().await {
                Some(Ok(SubscriptionMessage::Event(event))) => return event,
                Some(Ok(_)) => continue,
                Some(Err(error)) => panic!("subscription failed: {error}"),
                None => panic!("subscription ended"),
            }
        }
    })
    .await
    .ok()
}

async fn next_events(subscription: &mut Subscription, count: usize) -> Vec<triage_event_store::RecordedEvent> {
    let mut events = Vec::new();
    while events.len() < count {
        let event = next_event(subscription, WAIT)
            .await
            .unwrap_or_else(|| panic!("only {} of {count} events arrived", events.len()));
        events.push(event);
    }
    events
}

/// Event ids in position order, as a reader without the watermark sees them.
async fn naive_log(client: &Client, schema: &str) -> Vec<Uuid> {
    client
        .query(
            &format!(r#"SELECT event_id FROM "{schema}".triage_events ORDER BY position"#),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn started(url: &str) -> (Arc<PostgresEventStore>, Subscription) {
    let store = Arc::new(common::temporary_store(url, options()).await);
    let mut subscription = store.clone().subscribe_to_all(SubscribeToAll::default());
    let first = tokio::time::timeout(WAIT, subscription.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        first,
        SubscriptionMessage::CaughtUp,
        "an empty store is caught up at once"
    );
    (store, subscription)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_transaction_with_a_lower_position_is_delivered_in_order() {
    let Some(url) = common::url("a_slow_transaction_with_a_lower_position_is_delivered_in_order") else {
        return;
    };
    let (store, mut subscription) = started(&url).await;
    let schema = store.schema().to_owned();
    let observer = common::raw_client(&url).await;

    let first = common::event("First");
    store
        .append(&stream("ticket"), ExpectedRevision::NoStream, vec![first.clone()])
        .await
        .unwrap();
    assert_eq!(next_event(&mut subscription, WAIT).await.map(|e| e.id), Some(first.id));

    let slow_client = common::raw_client(&url).await;
    let slow = common::event("Slow");
    let slow_position = begin_slow_append(&slow_client, &schema, &stream("ticket"), &slow).await;

    let mut later = Vec::new();
    for _ in 0..3 {
        let event = common::event("Later");
        let result = store
            .append(&stream("ticket"), ExpectedRevision::NoStream, vec![event.clone()])
            .await
            .unwrap();
        assert!(
            result.position > Position::from_sequence(slow_position),
            "later appends take higher positions"
        );
        later.push(event.id);
    }

    // The gap is real: without the watermark a reader sees the later events
    // and would go on past the slow one's position.
    let mut expected_naive = vec![first.id];
    expected_naive.extend(&later);
    assert_eq!(naive_log(&observer, &schema).await, expected_naive);

    // With it, nothing after the first event is delivered or readable
    // while the slow transaction is open.
    assert_eq!(
        next_event(&mut subscription, Duration::from_millis(1500))
            .await
            .map(|e| e.id),
        None,
        "nothing is delivered past an open transaction with a lower position"
    );
    let readable: Vec<Uuid> = store
        .read_all(ReadAll::forwards(100))
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(readable, [first.id], "read_all stops below the watermark");
    let head = store.head_position().await.unwrap().unwrap();
    assert!(
        head < Position::from_sequence(slow_position),
        "the head stays below the slow event"
    );

    slow_client.batch_execute("COMMIT").await.unwrap();

    let mut expected = vec![slow.id];
    expected.extend(&later);
    let delivered = next_events(&mut subscription, expected.len()).await;
    assert_eq!(delivered.iter().map(|e| e.id).collect::<Vec<_>>(), expected);
    assert!(delivered.windows(2).all(|pair| pair[0].position < pair[1].position));
    assert_eq!(delivered[0].position, Position::from_sequence(slow_position));
    assert_eq!(
        next_event(&mut subscription, Duration::from_millis(500))
            .await
            .map(|e| e.id),
        None,
        "no event is delivered twice"
    );
    let mut whole = vec![first.id];
    whole.extend(&expected);
    let log: Vec<Uuid> = store
        .read_all(ReadAll::forwards(100))
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(log, whole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_transaction_that_rolls_back_does_not_stall_subscribers() {
    let Some(url) = common::url("a_slow_transaction_that_rolls_back_does_not_stall_subscribers") else {
        return;
    };
    let (store, mut subscription) = started(&url).await;
    let slow_client = common::raw_client(&url).await;
    let slow = common::event("Slow");
    begin_slow_append(&slow_client, store.schema(), &stream("ticket"), &slow).await;
    let later = common::event("Later");
    store
        .append(&stream("ticket"), ExpectedRevision::NoStream, vec![later.clone()])
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut subscription, Duration::from_millis(800))
            .await
            .map(|e| e.id),
        None
    );
    slow_client.batch_execute("ROLLBACK").await.unwrap();
    // A rollback sends no notification: the poll finds the moved watermark.
    assert_eq!(next_event(&mut subscription, WAIT).await.map(|e| e.id), Some(later.id));
    assert_eq!(
        next_event(&mut subscription, Duration::from_millis(500))
            .await
            .map(|e| e.id),
        None
    );
}

/// Many slow transactions that commit or roll back in random order, beside
/// fast appends: the subscriber receives exactly the committed events, in
/// the order of the final log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interleaved_slow_and_fast_transactions_are_delivered_exactly_once_in_order() {
    let Some(url) = common::url("interleaved_slow_and_fast_transactions_are_delivered_exactly_once_in_order") else {
        return;
    };
    const SLOW_TASKS: u64 = 4;
    const SLOW_ROUNDS: u64 = 8;
    const FAST_TASKS: usize = 4;
    const FAST_APPENDS: usize = 30;
    let (store, mut subscription) = started(&url).await;
    let schema = store.schema().to_owned();

    let mut slow_tasks = Vec::new();
    for task in 0..SLOW_TASKS {
        let url = url.clone();
        let schema = schema.clone();
        slow_tasks.push(tokio::spawn(async move {
            let client = common::raw_client(&url).await;
            let mut committed = Vec::new();
            for round in 0..SLOW_ROUNDS {
                let event = common::event("Slow");
                begin_slow_append(&client, &schema, &stream("slow"), &event).await;
                // Deterministic but varied hold times and outcomes.
                let hold = (task * 37 + round * 53) % 120;
                tokio::time::sleep(Duration::from_millis(hold)).await;
                if (task + round) % 3 == 0 {
                    client.batch_execute("ROLLBACK").await.unwrap();
                } else {
                    client.batch_execute("COMMIT").await.unwrap();
                    committed.push(event.id);
                }
            }
            committed
        }));
    }
    let mut fast_tasks = Vec::new();
    for _ in 0..FAST_TASKS {
        let store = store.clone();
        fast_tasks.push(tokio::spawn(async move {
            let s = stream("fast");
            let mut written = Vec::new();
            for _ in 0..FAST_APPENDS {
                let event = common::event("Fast");
                written.push(event.id);
                store.append(&s, ExpectedRevision::Any, vec![event]).await.unwrap();
            }
            written
        }));
    }
    let mut committed = std::collections::HashSet::new();
    for task in slow_tasks {
        committed.extend(task.await.unwrap());
    }
    for task in fast_tasks {
        committed.extend(task.await.unwrap());
    }
    let delivered = next_events(&mut subscription, committed.len()).await;
    let log: Vec<Uuid> = store
        .read_all(ReadAll::forwards(10_000))
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(log.len(), committed.len(), "the log holds exactly the committed events");
    assert_eq!(
        delivered.iter().map(|e| e.id).collect::<Vec<_>>(),
        log,
        "delivered exactly once, in log order"
    );
    assert!(delivered.iter().all(|e| committed.contains(&e.id)));
    assert_eq!(
        next_event(&mut subscription, Duration::from_millis(500))
            .await
            .map(|e| e.id),
        None
    );
}

/// The watermark relies on every append taking its transaction id inside
/// `triage_append`'s lock, so the function refuses to run in a transaction
/// that already wrote (or already appended): its older transaction id could
/// sit below positions handed out in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triage_append_refuses_a_transaction_that_already_has_an_id() {
    let Some(url) = common::url("triage_append_refuses_a_transaction_that_already_has_an_id") else {
        return;
    };
    let store = common::temporary_store(&url, options()).await;
    let client = common::raw_client(&url).await;
    let s = stream("ticket");
    begin_slow_append(&client, store.schema(), &s, &common::event("First")).await;
    let error = call_triage_append(&client, store.schema(), &stream("ticket"), &common::event("Second"))
        .await
        .expect_err("a second append in one transaction is refused");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_TRANSACTION_STATE)
    );
    client.batch_execute("ROLLBACK").await.unwrap();

    client
        .batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .await
        .unwrap();
    let error = call_triage_append(&client, store.schema(), &s, &common::event("Third"))
        .await
        .expect_err("an append after the transaction took its id is refused");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_TRANSACTION_STATE)
    );
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(store.head_position().await.unwrap(), None, "nothing was stored");
}

/// A transaction left open anywhere on the cluster (here one that only took
/// an id) holds the watermark back. A read whose page ends below the
/// watermark (catching up far behind the head) answers at once; a read
/// that reaches past it waits, up to the visibility wait, and answers the
/// visible prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_below_the_watermark_does_not_wait_for_an_open_transaction() {
    let Some(url) = common::url("a_page_below_the_watermark_does_not_wait_for_an_open_transaction") else {
        return;
    };
    // A visibility wait far longer than the test's patience: a read that
    // waits shows up as a timeout, not as a slow pass.
    let store = common::temporary_store(
        &url,
        PostgresOptions {
            visibility_wait: Duration::from_secs(60),
            ..options()
        },
    )
    .await;
    let s = stream("ticket");
    let early: Vec<EventData> = (0..20).map(|_| common::event("Early")).collect();
    store.append(&s, ExpectedRevision::NoStream, early).await.unwrap();
    let idle = common::raw_client(&url).await;
    idle.batch_execute("BEGIN; SELECT pg_current_xact_id();").await.unwrap();
    // Committed, but above the watermark while `idle` stays open.
    store
        .append(&s, ExpectedRevision::Any, vec![common::event("Late")])
        .await
        .unwrap();

    let page = tokio::time::timeout(WAIT, store.read_all(ReadAll::forwards(10)))
        .await
        .expect("a page below the watermark is read without waiting")
        .unwrap();
    assert_eq!(page.len(), 10);
    assert!(page.iter().all(|record| record.event_type == "Early"));
    let backwards = tokio::time::timeout(
        WAIT,
        store.read_all(ReadAll::backwards(5).from_position(page[9].position)),
    )
    .await
    .expect("a backwards page below the watermark is read without waiting")
    .unwrap();
    assert_eq!(backwards.len(), 5);

    // A page reaching past the watermark does wait for the open transaction.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), store.read_all(ReadAll::forwards(100)))
            .await
            .is_err(),
        "a read up to the head waits for the open transaction"
    );
    idle.batch_execute("ROLLBACK").await.unwrap();
    let all = tokio::time::timeout(WAIT, store.read_all(ReadAll::forwards(100)))
        .await
        .expect("the wait ends with the transaction")
        .unwrap();
    assert_eq!(all.len(), 21, "the late event is read once the watermark passes it");
}
