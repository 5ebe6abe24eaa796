//! Two handles on one store file stand in for two processes (`triage
//! events --follow` beside a writer, or two writers): a live subscription
//! of one must see what the other appends, though only its own commits wake
//! it, and a writer must decide on what the other committed.

use std::sync::Arc;
use std::time::Duration;

use triage_event_store::{EventData, EventStore, ExpectedRevision, StreamName, SubscribeToAll, SubscriptionMessage};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions};
use uuid::Uuid;

fn event() -> EventData {
    triage_event_store::testing::event("Tested")
}

/// The subscription's next message, within 5 s.
async fn next(subscription: &mut triage_event_store::Subscription) -> SubscriptionMessage {
    tokio::time::timeout(Duration::from_secs(5), subscription.next())
        .await
        .expect("a message within 5 s")
        .expect("the subscription goes on")
        .unwrap()
}

fn stream() -> StreamName {
    StreamName::new(format!("ticket-{}", Uuid::new_v4().simple())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_subscription_sees_what_another_handle_appends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let follower = Arc::new(SqliteEventStore::open(&path, SqliteOptions::default()).unwrap());
    let writer = SqliteEventStore::open(&path, SqliteOptions::default()).unwrap();
    writer
        .append(&stream(), ExpectedRevision::NoStream, vec![event()])
        .await
        .unwrap();

    let mut subscription = follower.clone().subscribe_to_all(SubscribeToAll::default());
    assert!(matches!(next(&mut subscription).await, SubscriptionMessage::Event(_)));
    assert!(matches!(next(&mut subscription).await, SubscriptionMessage::CaughtUp));

    // Live now: appends through the other handle do not wake the follower.
    for expected in 2..=3 {
        let appended = writer
            .append(&stream(), ExpectedRevision::NoStream, vec![event()])
            .await
            .unwrap();
        match next(&mut subscription).await {
            SubscriptionMessage::Event(event) => {
                assert_eq!(event.position, appended.position);
                assert_eq!(event.position.commit, expected);
            }
            other => panic!("expected the other handle's event, got {other:?}"),
        }
    }
}

/// Each writer remembers the revisions its own commits left; the other's
/// commits must make it forget them, or it would refuse an append that
/// expects the other's revision, and accept one that expects its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_writer_decides_on_what_the_other_committed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let first = SqliteEventStore::open(&path, SqliteOptions::default()).unwrap();
    let second = SqliteEventStore::open(&path, SqliteOptions::default()).unwrap();
    let shared = stream();
    let mut revision = first
        .append(&shared, ExpectedRevision::NoStream, vec![event()])
        .await
        .unwrap()
        .current_revision;
    for round in 0..6 {
        let (writer, other) = if round % 2 == 0 {
            (&second, &first)
        } else {
            (&first, &second)
        };
        let appended = writer
            .append(&shared, ExpectedRevision::Exact(revision), vec![event()])
            .await
            .unwrap_or_else(|error| panic!("round {round}: {error}"));
        assert_eq!(appended.current_revision, revision + 1);
        // The other writer's view is one revision behind now.
        let stale = other
            .append(&shared, ExpectedRevision::Exact(revision), vec![event()])
            .await;
        assert!(
            matches!(stale, Err(triage_event_store::Error::WrongExpectedVersion { actual: Some(actual), .. }) if actual == revision + 1),
            "round {round}: {stale:?}"
        );
        revision += 1;
    }
    assert_eq!(first.stats().careful_reruns + second.stats().careful_reruns, 0);
}
