//! Heavier races than the conformance suite: many tasks keep racing `Exact`
//! appends on one stream while a live subscriber watches.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use triage_event_store::{
    Error, EventStore, ExpectedRevision, ReadAll, ReadStream, StreamName, SubscribeToAll, SubscriptionMessage,
};
use triage_store_postgres::PostgresOptions;
use uuid::Uuid;

/// 24 tasks race to extend one stream to 300 events, each reading the last
/// revision and appending `Exact(last)`: every revision has exactly one
/// winner, the stream is consecutive and holds exactly the winners' events,
/// every loser is told a newer actual revision, and the subscriber receives
/// every event exactly once in position order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_exact_appends_have_one_winner_per_revision() {
    let Some(url) = common::url("racing_exact_appends_have_one_winner_per_revision") else {
        return;
    };
    const TASKS: usize = 24;
    const TARGET: u64 = 300;
    let store = Arc::new(common::temporary_store(&url, PostgresOptions::default()).await);
    let stream = StreamName::new(format!("ticket-{}", Uuid::new_v4())).unwrap();
    let first = common::event("Opened");
    store
        .append(&stream, ExpectedRevision::NoStream, vec![first.clone()])
        .await
        .unwrap();
    let mut subscription = store.clone().subscribe_to_all(SubscribeToAll::default());

    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let store = store.clone();
        let stream = stream.clone();
        tasks.push(tokio::spawn(async move {
            let mut wins = Vec::new();
            let mut losses = 0u64;
            loop {
                let last = store
                    .read_stream(&stream, ReadStream::backwards().limit(1))
                    .await
                    .unwrap()[0]
                    .revision;
                if last + 1 >= TARGET {
                    return (wins, losses);
                }
                let event = common::event("Worked");
                match store
                    .append(&stream, ExpectedRevision::Exact(last), vec![event.clone()])
                    .await
                {
                    Ok(result) => {
                        assert_eq!(result.current_revision, last + 1);
                        assert!(!result.replayed);
                        wins.push((result.current_revision, event.id));
                    }
                    Err(Error::WrongExpectedVersion { actual, expected, .. }) => {
                        assert_eq!(expected, ExpectedRevision::Exact(last));
                        assert!(
                            actual > Some(last),
                            "a loser sees a newer revision: {actual:?} after {last}"
                        );
                        losses += 1;
                    }
                    Err(other) => panic!("unexpected error: {other}"),
                }
            }
        }));
    }
    let mut winners: HashMap<u64, Uuid> = HashMap::new();
    let mut losses = 0;
    for task in tasks {
        let (wins, lost) = task.await.unwrap();
        losses += lost;
        for (revision, id) in wins {
            assert!(
                winners.insert(revision, id).is_none(),
                "two winners for revision {revision}"
            );
        }
    }
    assert!(losses > 0, "the tasks really raced");
    let stored = store.read_stream(&stream, ReadStream::forwards()).await.unwrap();
    assert_eq!(stored.len() as u64, TARGET);
    for (index, event) in stored.iter().enumerate() {
        assert_eq!(event.revision, index as u64, "consecutive revisions");
        if index > 0 {
            assert_eq!(
                winners.get(&event.revision),
                Some(&event.id),
                "the stored event is the winner's"
            );
        }
    }
    assert_eq!(winners.len() as u64, TARGET - 1);

    let mut delivered = Vec::new();
    while delivered.len() < TARGET as usize {
        match tokio::time::timeout(Duration::from_secs(10), subscription.next()).await {
            Ok(Some(Ok(SubscriptionMessage::Event(event)))) => delivered.push(event),
            Ok(Some(Ok(_))) => {}
            other => panic!("subscription stopped after {} events: {other:?}", delivered.len()),
        }
    }
    let log = store.read_all(ReadAll::forwards(1000)).await.unwrap();
    assert_eq!(
        delivered.iter().map(|e| e.id).collect::<Vec<_>>(),
        log.iter().map(|e| e.id).collect::<Vec<_>>()
    );
    assert_eq!(
        delivered.iter().map(|e| e.id).collect::<Vec<_>>(),
        stored.iter().map(|e| e.id).collect::<Vec<_>>()
    );
    let stats = store.stats();
    assert_eq!(stats.appends_written, TARGET);
    assert_eq!(stats.conflicts, losses);
}

/// Concurrent retries of one append (same ids, same expectation) store it
/// once and all succeed with the same result.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_of_one_append_store_it_once() {
    let Some(url) = common::url("concurrent_retries_of_one_append_store_it_once") else {
        return;
    };
    let store = Arc::new(common::temporary_store(&url, PostgresOptions::default()).await);
    for round in 0..10 {
        let stream = StreamName::new(format!("ticket-{}", Uuid::new_v4())).unwrap();
        let batch = vec![common::event("A"), common::event("B")];
        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (store, stream, batch, barrier) = (store.clone(), stream.clone(), batch.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                store.append(&stream, ExpectedRevision::NoStream, batch).await
            }));
        }
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap().expect("a retry of the same append succeeds"));
        }
        assert_eq!(
            results.iter().filter(|r| !r.replayed).count(),
            1,
            "round {round}: one original"
        );
        assert!(
            results.windows(2).all(
                |pair| pair[0].position == pair[1].position && pair[0].current_revision == pair[1].current_revision
            )
        );
        let stored = store.read_stream(&stream, ReadStream::forwards()).await.unwrap();
        assert_eq!(
            stored.iter().map(|e| e.id).collect::<Vec<_>>(),
            [batch[0].id, batch[1].id]
        );
    }
}
