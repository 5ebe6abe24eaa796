//! 32 agents race on the same 10 tickets; the event log alone must show no
//! lost update, no invalid transition, no effect from retries and no late
//! write accepted.

use std::sync::Arc;

use triage_event_store::{EventStore, InMemoryEventStore};
use triage_store_postgres::{PostgresEventStore, PostgresOptions};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions};
use triage_tests::{RaceConfig, audit_store, race};

async fn race_and_audit(store: Arc<dyn EventStore>) {
    let report = race(store.clone(), RaceConfig::default()).await;
    assert!(report.errors.is_empty(), "unexpected errors: {:?}", report.errors);
    let audit = audit_store(store.as_ref(), &report.acknowledged).await;
    eprintln!(
        "{}: {} events in {} streams; {} acknowledged, {} rejections, {} stale decisions, {} retries, \
         {} late writes attempted, {} claims expired; final states {:?}",
        store.describe(),
        audit.audit.events,
        audit.streams,
        report.acknowledged.len(),
        report.rejections,
        report.stale_decisions,
        report.retries_sent,
        report.late_writes_attempted,
        audit.claims_expired,
        audit.final_states,
    );
    assert_eq!(
        audit.audit.invalid_transitions, 0,
        "invalid transitions: {:#?}",
        audit.audit.findings
    );
    assert_eq!(audit.audit.lost_updates, 0, "lost updates: {:#?}", audit.audit.findings);
    assert_eq!(audit.audit.duplicate_events, 0, "events stored twice");
    assert_eq!(
        audit.audit.missing_events, 0,
        "acknowledged but missing: {:#?}",
        audit.audit.findings
    );
    assert!(
        audit.misplaced_acknowledged.is_empty(),
        "{:?}",
        audit.misplaced_acknowledged
    );
    assert_eq!(audit.foreign_event_ids, 0);
    assert!(
        audit.unacknowledged_commands.is_empty(),
        "{:?}",
        audit.unacknowledged_commands
    );
    assert!(audit.passed());
    assert_eq!(audit.streams, 10);
    // The hazards really happened, and none of them got through.
    assert!(report.late_writes_attempted > 0, "the run exercised late writes");
    assert_eq!(report.late_writes_accepted, 0, "a late write was accepted");
    assert!(report.retries_sent > 0, "the run exercised retries");
    assert!(report.stale_decisions + report.rejections > 0, "agents collided");
    assert!(audit.claims_expired > 0, "the sweeper expired claims");
    let retried_outcomes = report.acknowledged.iter().filter(|accepted| accepted.duplicate).count();
    assert!(retried_outcomes > 0, "retries were answered from the log");
    let resolved = audit
        .final_states
        .get(&triage_domain::State::Resolved)
        .copied()
        .unwrap_or(0);
    assert!(resolved > 0, "tickets went through the whole lifecycle");
}

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
