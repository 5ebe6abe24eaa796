//! The conformance suite against the in-memory reference store.

use std::sync::Arc;

use triage_event_store::{EventStore, InMemoryEventStore};

async fn store() -> Option<Arc<dyn EventStore>> {
    Some(Arc::new(InMemoryEventStore::new()))
}

triage_event_store::conformance_suite!(store);
