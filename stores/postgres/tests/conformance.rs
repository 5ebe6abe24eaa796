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
