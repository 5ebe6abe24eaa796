//! 32 agents race on the same 10 tickets; the event log alone must show no
//! lost update, no invalid transition, no effect from retries and no late
//! write accepted.

use std::sync::Arc;

use triage_event_store::InMemoryEventStore;
use triage_store_postgres::{PostgresEventStore, PostgresOptions};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions};
use triage_tests::race_and_audit;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_racing_on_the_in_memory_store() {
    race_and_audit(Arc::new(InMemoryEventStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_racing_on_the_sqlite_store() {
    let store = SqliteEventStore::open_temporary_with(SqliteOptions::default()).unwrap();
    race_and_audit(Arc::new(store)).await;
}

/// The same race on the PostgreSQL event store, in a fresh schema dropped
/// at the end. Reads the server from `TRIAGE_PG_URL`; skipped, saying so,
/// without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_racing_on_the_postgres_store() {
    let url = match std::env::var("TRIAGE_PG_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            eprintln!(
                "skipped: agents_racing_on_the_postgres_store (TRIAGE_PG_URL is not set; \
                 e.g. postgres://postgres@127.0.0.1:5432/postgres)"
            );
            return;
        }
    };
    let store = PostgresEventStore::connect_temporary(&url, PostgresOptions::default())
        .await
        .expect("a temporary PostgreSQL store opens");
    race_and_audit(Arc::new(store)).await;
}
