//! The port's conformance suite against the SQLite store: once with group
//! commit (the default) and once with one transaction per append.

use std::sync::Arc;

use triage_event_store::EventStore;
use triage_store_sqlite::{SqliteEventStore, SqliteOptions};

async fn store() -> Option<Arc<dyn EventStore>> {
    Some(Arc::new(
        SqliteEventStore::open_temporary().expect("temporary store opens"),
    ))
}

triage_event_store::conformance_suite!(store);

mod single_commit {
    use super::*;

    async fn store() -> Option<Arc<dyn EventStore>> {
        Some(Arc::new(
            SqliteEventStore::open_temporary_with(SqliteOptions::single_commit()).expect("temporary store opens"),
        ))
    }

    triage_event_store::conformance_suite!(store);
}
