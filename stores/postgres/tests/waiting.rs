//! Reads of `$all` that wait for an older transaction (one left open on
//! the cluster) hold no pooled connection while they wait, so appends do
//! not queue behind them for a connection.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use triage_event_store::{EventStore, ExpectedRevision, ReadAll, StreamName};
use triage_store_postgres::PostgresOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_waiting_on_an_open_transaction_leave_connections_to_appends() {
    let Some(url) = common::url("readers_waiting_on_an_open_transaction_leave_connections_to_appends") else {
        return;
    };
    const POOL: usize = 4;
    let wait = Duration::from_secs(3);
    let options = PostgresOptions {
        pool_size: POOL,
        visibility_wait: wait,
        ..PostgresOptions::default()
    };
    let store = Arc::new(common::temporary_store(&url, options).await);
    let first = StreamName::new("ticket-first").unwrap();
    store
        .append(&first, ExpectedRevision::NoStream, vec![common::event("First")])
        .await
        .unwrap();
    // Another session holds a transaction id and stays open: everything
    // committed after it is above the watermark until it ends.
    let holder = common::raw_client(&url).await;
    holder
        .batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .await
        .unwrap();
    let hidden = StreamName::new("ticket-hidden").unwrap();
    store
        .append(&hidden, ExpectedRevision::NoStream, vec![common::event("Hidden")])
        .await
        .unwrap();

    // As many readers as the pool has connections, each waiting for the
    // hidden event.
    let readers: Vec<_> = (0..POOL)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let started = Instant::now();
                let page = store.read_all(ReadAll::forwards(100)).await.unwrap();
                (page.len(), started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let later = StreamName::new("ticket-later").unwrap();
    store
        .append(&later, ExpectedRevision::NoStream, vec![common::event("Later")])
        .await
        .unwrap();
    let append_took = started.elapsed();
    for reader in readers {
        let (events, took) = reader.await.unwrap();
        // The visible prefix, after the whole wait.
        assert_eq!(events, 1, "only the event before the open transaction is visible");
        assert!(took >= wait - Duration::from_millis(100), "the reader waited: {took:?}");
    }
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert!(
        append_took < Duration::from_secs(1),
        "an append waited {append_took:?} while readers waited on an open transaction"
    );
}
