//! Invariant 4, projections converge: a read model maintained batch by
//! batch, caught up at random points of a random history with a random
//! batch size, equals a rebuild from scratch.

mod support;

use std::sync::Arc;

use proptest::prelude::*;
use triage_event_store::{EventStore, InMemoryEventStore};
use triage_projections::{Projector, ProjectorOptions, ReadModelDb, stats};

use support::{Step, Workload, clean_digests, digest, projected_events};

/// A step of the history, or a catch-up of the incremental model.
#[derive(Clone, Debug)]
enum Action {
    Step(Step),
    CatchUp,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        1 => Just(Action::Step(Step::Open)),
        8 => (0..8usize, any::<u8>()).prop_map(|(ticket, pick)| Action::Step(Step::Act { ticket, pick })),
        2 => (1..90u32).prop_map(|seconds| Action::Step(Step::Advance(seconds))),
        1 => Just(Action::Step(Step::Sweep)),
        2 => Just(Action::CatchUp),
    ]
}

async fn incremental_equals_rebuild(actions: Vec<Action>, batch_size: usize) -> Result<(), TestCaseError> {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut workload = Workload::new(store.clone());
    let live = Projector::new(store.clone(), ReadModelDb::in_memory().unwrap()).with_options(ProjectorOptions {
        batch_size,
        ..ProjectorOptions::default()
    });
    for action in &actions {
        match action {
            Action::Step(step) => workload.run(step).await,
            Action::CatchUp => {
                live.catch_up()
                    .await
                    .map_err(|error| TestCaseError::fail(error.to_string()))?;
            }
        }
    }
    live.catch_up()
        .await
        .map_err(|error| TestCaseError::fail(error.to_string()))?;

    let [tickets, stats_rows] = clean_digests(store.clone()).await;
    prop_assert_eq!(digest(&live, "tickets"), tickets);
    prop_assert_eq!(digest(&live, "stats"), stats_rows);

    // Every projected event was applied exactly once.
    let (projected, _) = projected_events(store.as_ref()).await;
    for status in live.status().await.unwrap() {
        prop_assert_eq!(status.events_applied, projected, "{:?}", status);
        prop_assert_eq!(status.lag, 0);
    }
    let summary = live.read("stats", stats::summary).unwrap();
    prop_assert_eq!(summary.counters.get("events").copied().unwrap_or(0), projected);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn incremental_model_equals_a_rebuild(
        actions in prop::collection::vec(action(), 20..160),
        batch_size in 1..50usize,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(incremental_equals_rebuild(actions, batch_size))?;
    }
}

/// The generator reaches what the statistics count: refusals, stale
/// decisions, expired claims and finished tickets. Without this, the
/// property above could pass on histories that never exercise them.
#[tokio::test]
async fn the_workload_covers_refusals_conflicts_and_expired_claims() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut workload = Workload::new(store.clone());
    workload.random(800, 40, 0x2545_f491_4f6c_dd1d).await;
    let projector = Projector::new(store.clone(), ReadModelDb::in_memory().unwrap()).with_options(ProjectorOptions {
        batch_size: 7,
        ..ProjectorOptions::default()
    });
    projector.catch_up().await.unwrap();
    let summary = projector.read("stats", stats::summary).unwrap();
    for counter in [
        "rejections",
        "conflicts",
        "claims_expired",
        "claims_taken_over",
        "tickets_resolved",
    ] {
        assert!(
            summary.counters.get(counter).copied().unwrap_or(0) > 0,
            "{counter} never happened: {:?}",
            summary.counters
        );
    }
    let [tickets, stats_rows] = clean_digests(store).await;
    assert_eq!(digest(&projector, "tickets"), tickets);
    assert_eq!(digest(&projector, "stats"), stats_rows);
}
