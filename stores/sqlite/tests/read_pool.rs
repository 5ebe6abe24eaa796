//! The read pool stays within `max_readers` connections even when callers
//! stop waiting for their reads (request timeouts, aborted tasks).

use std::sync::Arc;
use std::time::Duration;

use triage_event_store::{EventStore, ExpectedRevision, ReadAll, StreamName};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions};

const MAX_READERS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abandoned_reads_do_not_grow_the_pool() {
    let options = SqliteOptions {
        max_readers: MAX_READERS,
        ..SqliteOptions::default()
    };
    let store = Arc::new(SqliteEventStore::open_temporary_with(options).unwrap());
    // Long enough reads that an abort lands while they run.
    for batch in 0..100 {
        let stream = StreamName::new(format!("ticket-{batch}")).unwrap();
        let events = (0..100).map(|_| triage_event_store::testing::event("Tested")).collect();
        store.append(&stream, ExpectedRevision::NoStream, events).await.unwrap();
    }

    for _ in 0..20 {
        let reads: Vec<_> = (0..2 * MAX_READERS)
            .map(|_| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.read_all(ReadAll::forwards(10_000)).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(2)).await;
        for read in &reads {
            read.abort();
        }
        let idle = store.stats().idle_read_connections;
        assert!(
            idle <= MAX_READERS,
            "{idle} idle read connections, at most {MAX_READERS} allowed"
        );
    }
    // Let the abandoned reads finish; each then returns its connection.
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let idle = store.stats().idle_read_connections;
        assert!(
            idle <= MAX_READERS,
            "{idle} idle read connections, at most {MAX_READERS} allowed"
        );
    }
    // The pool still serves reads.
    assert_eq!(store.read_all(ReadAll::forwards(20_000)).await.unwrap().len(), 10_000);
    assert!(store.stats().idle_read_connections >= 1);
}
