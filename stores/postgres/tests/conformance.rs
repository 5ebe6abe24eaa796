//! The port's conformance suite against PostgreSQL: each case in a fresh
//! schema. Skipped, saying so, without `TRIAGE_PG_URL`.

mod common;

use std::sync::Arc;

use triage_event_store::EventStore;
use triage_store_postgres::PostgresOptions;

async fn store() -> Option<Arc<dyn EventStore>> {
    let url = common::url("PostgreSQL conformance case")?;
    Some(Arc::new(
        common::temporary_store(&url, PostgresOptions::default()).await,
    ))
}

triage_event_store::conformance_suite!(store);

/// A read with a zero limit holds no revision, so only the store can tell
/// an existing stream (empty) from a missing one (not found); reads that
/// hold revision 0 answer "not found" from their own empty result.
#[tokio::test]
async fn a_zero_limit_read_tells_an_existing_stream_from_a_missing_one() {
    use triage_event_store::{Error, ExpectedRevision, ReadStream, StreamName};

    let Some(store) = store().await else {
        return;
    };
    let existing = StreamName::new("ticket-zero-limit").unwrap();
    store
        .append(&existing, ExpectedRevision::NoStream, vec![common::event("Noted")])
        .await
        .unwrap();
    for options in [ReadStream::forwards().limit(0), ReadStream::backwards().limit(0)] {
        assert_eq!(store.read_stream(&existing, options).await.unwrap(), vec![]);
    }
    let missing = StreamName::new("ticket-never-written").unwrap();
    for options in [
        ReadStream::forwards().limit(0),
        ReadStream::backwards().limit(0),
        ReadStream::forwards(),
        ReadStream::backwards(),
    ] {
        assert!(
            matches!(
                store.read_stream(&missing, options).await,
                Err(Error::StreamNotFound { .. })
            ),
            "{options:?} of a missing stream"
        );
    }
}
