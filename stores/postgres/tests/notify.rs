//! Appends are announced to other processes after they commit, by a NOTIFY
//! of their own (schema version 2: `triage_append` no longer notifies), and
//! a store from version 1 is migrated to that.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use triage_event_store::{EventStore, ExpectedRevision, ReadStream, StreamName, SubscribeToAll, SubscriptionMessage};
use triage_store_postgres::{PostgresEventStore, PostgresOptions};
use uuid::Uuid;

fn fresh_schema() -> String {
    format!("triage_test_{}", &Uuid::new_v4().simple().to_string()[..16])
}

/// Two "processes" on one schema; the subscriber's store polls only every
/// 60 s, so only a notification can wake it in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_process_is_woken_by_the_notification_after_commit() {
    let Some(url) = common::url("another_process_is_woken_by_the_notification_after_commit") else {
        return;
    };
    let schema = fresh_schema();
    let writer = PostgresEventStore::connect(&url, PostgresOptions::in_schema(&schema))
        .await
        .unwrap();
    let reader = Arc::new(
        PostgresEventStore::connect(
            &url,
            PostgresOptions {
                poll_interval: Duration::from_secs(60),
                ..PostgresOptions::in_schema(&schema)
            },
        )
        .await
        .unwrap(),
    );
    let mut subscription = reader.clone().subscribe_to_all(SubscribeToAll::default());
    let first = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .unwrap();
    assert!(matches!(first, Some(Ok(SubscriptionMessage::CaughtUp))));
    // The reader's LISTEN connection may still be starting: wait until it
    // is listening, then append.
    let admin = common::raw_client(&url).await;
    let channel = format!("triage_events_{schema}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listening: bool = admin
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE query = $1)",
                &[&format!(r#"LISTEN "{channel}""#)],
            )
            .await
            .unwrap()
            .get(0);
        if listening {
            break;
        }
        assert!(Instant::now() < deadline, "the reader never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for round in 0..3 {
        let event = common::event("Announced");
        let stream = StreamName::new(format!("ticket-notify-{round}")).unwrap();
        writer
            .append(&stream, ExpectedRevision::NoStream, vec![event.clone()])
            .await
            .unwrap();
        let started = Instant::now();
        let delivered = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match subscription.next().await {
                    Some(Ok(SubscriptionMessage::Event(event))) => return event,
                    Some(Ok(_)) => continue,
                    other => panic!("subscription: {other:?}"),
                }
            }
        })
        .await
        .expect("the notification wakes the other process long before its poll");
        assert_eq!(delivered.id, event.id);
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    drop(writer);
    drop(subscription);
    drop(reader);
    admin
        .batch_execute(&format!(r#"DROP SCHEMA "{schema}" CASCADE"#))
        .await
        .unwrap();
}

/// A store at schema version 1 (whose `triage_append` notified inside the
/// append's transaction) is migrated to the latest version on open and
/// keeps its events; afterwards no append transaction notifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_store_is_migrated_and_keeps_its_events() {
    let Some(url) = common::url("a_version_1_store_is_migrated_and_keeps_its_events") else {
        return;
    };
    let admin = common::raw_client(&url).await;
    let schema = fresh_schema();
    let store = PostgresEventStore::connect(&url, PostgresOptions::in_schema(&schema))
        .await
        .unwrap();
    let stream = StreamName::new("ticket-migrated").unwrap();
    let events = vec![common::event("A"), common::event("B")];
    store
        .append(&stream, ExpectedRevision::NoStream, events.clone())
        .await
        .unwrap();
    drop(store);
    // Back to version 1: the old function, which notified.
    admin
        .batch_execute(&format!(
            r#"UPDATE "{schema}".triage_schema SET version = 1;
               CREATE OR REPLACE FUNCTION "{schema}".triage_append(
                   p_stream text, p_first_revision bigint, p_ids uuid[], p_types text[], p_data bytea[], p_metadata bytea[]
               ) RETURNS bigint LANGUAGE plpgsql AS $fn$
               BEGIN
                   PERFORM pg_notify('triage_events_{schema}', '0');
                   RETURN 0;
               END
               $fn$;"#
        ))
        .await
        .unwrap();

    let reopened = PostgresEventStore::connect(&url, PostgresOptions::in_schema(&schema))
        .await
        .unwrap();
    let (version, source): (i32, String) = {
        let row = admin
            .query_one(
                &format!(
                    r#"SELECT (SELECT version FROM "{schema}".triage_schema),
                              (SELECT prosrc FROM pg_proc WHERE oid = '"{schema}".triage_append'::regproc)"#
                ),
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(version, 5);
    assert!(!source.contains("pg_notify"), "{source}");
    // Version 5's function: the append lock counts as taken before it is
    // asked for (see `tests/cancel.rs`).
    let counted = source
        .find("v_locked := true")
        .expect("the function tracks the append lock");
    let taken = source
        .find("PERFORM pg_advisory_lock(")
        .expect("the function takes the append lock");
    assert!(counted < taken, "{source}");
    let more = common::event("C");
    let written = reopened
        .append(&stream, ExpectedRevision::Exact(1), vec![more.clone()])
        .await
        .unwrap();
    assert_eq!(written.current_revision, 2);
    let read = reopened.read_stream(&stream, ReadStream::forwards()).await.unwrap();
    assert_eq!(
        read.iter().map(|e| e.id).collect::<Vec<_>>(),
        [events[0].id, events[1].id, more.id]
    );
    drop(reopened);
    admin
        .batch_execute(&format!(r#"DROP SCHEMA "{schema}" CASCADE"#))
        .await
        .unwrap();
}

/// The pid of the backend listening on `channel`, once there is one.
async fn listener_pid(admin: &tokio_postgres::Client, channel: &str, other_than: Option<i32>) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE query = $1 AND pid IS DISTINCT FROM $2",
                &[&format!(r#"LISTEN "{channel}""#), &other_than],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            return row.get(0);
        }
        assert!(Instant::now() < deadline, "nobody listens on {channel}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Terminates the listening backend `pid` and waits for the next one;
/// how long that took.
async fn drop_listener(admin: &tokio_postgres::Client, channel: &str, pid: i32) -> (i32, Duration) {
    let started = Instant::now();
    let ended: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(ended);
    let next = listener_pid(admin, channel, Some(pid)).await;
    (next, started.elapsed())
}

/// A LISTEN connection that keeps dropping as soon as it listens is
/// retried less and less often (0.1 s, 0.2 s, … up to 5 s), not hammered;
/// one that dropped after serving for 5 s or more is back after the first pause,
/// however long the pauses had grown before (here to 3.2 s), so other
/// processes' appends reach this one by notification again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_is_back_at_once_after_serving_and_slowly_while_it_keeps_dropping() {
    let Some(url) = common::url("a_listener_is_back_at_once_after_serving_and_slowly_while_it_keeps_dropping") else {
        return;
    };
    let store = common::temporary_store(&url, PostgresOptions::default()).await;
    let admin = common::raw_client(&url).await;
    let channel = format!("triage_events_{}", store.schema());
    let mut pid = listener_pid(&admin, &channel, None).await;
    let mut flapping = Duration::ZERO;
    for _ in 0..5 {
        let (next, took) = drop_listener(&admin, &channel, pid).await;
        (pid, flapping) = (next, flapping + took);
    }
    assert!(
        flapping >= Duration::from_millis(100 + 200 + 400 + 800 + 1600),
        "five drops right after listening were retried within {flapping:?}"
    );
    // Serving for longer than the longest pause earns the first pause again.
    // The listener counts from when LISTEN's reply reached it, a little
    // after the server showed the query: 2 s of margin for a slow machine.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let (_, took) = drop_listener(&admin, &channel, pid).await;
    assert!(
        took < Duration::from_secs(2),
        "a listener that had served for 5 s came back after {took:?} (3.2 s without the reset)"
    );
    drop(store);
}

/// Another process's listener on `channel`: its connection (LISTEN lasts
/// as long as it does) and the notifications it hears, as (channel, pid of
/// the notifying backend).
async fn listen_to(
    url: &str,
    channel: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<(String, i32)>,
) {
    let (listener, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    let (heard, notifications) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = futures::StreamExt::next(&mut messages).await {
            if let tokio_postgres::AsyncMessage::Notification(notification) = message {
                let _ = heard.send((notification.channel().to_owned(), notification.process_id()));
            }
        }
    });
    listener.batch_execute(&format!(r#"LISTEN "{channel}""#)).await.unwrap();
    (listener, notifications)
}

/// A retried append that finds its events stored (the original's process
/// may have stopped between its commit and its NOTIFY) is announced as
/// well: other processes hear of every append that returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_append_that_finds_its_events_stored_is_announced() {
    let Some(url) = common::url("a_retried_append_that_finds_its_events_stored_is_announced") else {
        return;
    };
    let store = common::temporary_store(&url, PostgresOptions::default()).await;
    let channel = format!("triage_events_{}", store.schema());
    let (_listener, mut notifications) = listen_to(&url, &channel).await;

    let stream = StreamName::new("ticket-retried").unwrap();
    let event = common::event("Retried");
    let first = store
        .append(&stream, ExpectedRevision::NoStream, vec![event.clone()])
        .await
        .unwrap();
    let announced = tokio::time::timeout(Duration::from_secs(10), notifications.recv()).await;
    assert_eq!(announced.unwrap().map(|heard| heard.0), Some(channel.clone()));
    // Nothing else is on its way for the first append.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while notifications.try_recv().is_ok() {}

    let retry = store
        .append(&stream, ExpectedRevision::NoStream, vec![event])
        .await
        .unwrap();
    assert!(retry.replayed);
    assert_eq!(retry.position, first.position);
    let announced = tokio::time::timeout(Duration::from_secs(10), notifications.recv())
        .await
        .expect("the retry that returned is announced");
    assert_eq!(announced.map(|heard| heard.0), Some(channel.clone()));
    drop(store);
}

/// The NOTIFY connection, killed while idle, is opened again at the next
/// append, not at once with a NOTIFY nobody asked for (which would wake
/// every other process's subscribers for nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_announcer_that_drops_sends_nothing_until_the_next_append() {
    let Some(url) = common::url("an_idle_announcer_that_drops_sends_nothing_until_the_next_append") else {
        return;
    };
    let store = common::temporary_store(&url, PostgresOptions::default()).await;
    let admin = common::raw_client(&url).await;
    let channel = format!("triage_events_{}", store.schema());
    let (_listener, mut notifications) = listen_to(&url, &channel).await;

    let append = |name: &str| {
        let stream = StreamName::new(name).unwrap();
        let store = &store;
        async move {
            store
                .append(&stream, ExpectedRevision::NoStream, vec![common::event("Announced")])
                .await
                .unwrap();
        }
    };
    append("ticket-before").await;
    let (_, announcer) = tokio::time::timeout(Duration::from_secs(10), notifications.recv())
        .await
        .expect("the append is announced")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    while notifications.try_recv().is_ok() {}

    let ended: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&announcer])
        .await
        .unwrap()
        .get(0);
    assert!(ended);
    // Longer than the first reconnect pause (0.1 s) by far.
    let unasked = tokio::time::timeout(Duration::from_secs(1), notifications.recv()).await;
    assert!(unasked.is_err(), "a NOTIFY nobody asked for: {unasked:?}");

    append("ticket-after").await;
    let (_, next) = tokio::time::timeout(Duration::from_secs(10), notifications.recv())
        .await
        .expect("the next append is announced on a new connection")
        .unwrap();
    assert_ne!(next, announcer, "a new backend announces");
    drop(store);
}
