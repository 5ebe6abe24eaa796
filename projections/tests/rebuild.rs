//! Rebuilds into a shadow generation: under load, cancelled, triggered by a
//! version bump; and what an event type this build does not know does to a
//! projection.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::Connection;
use triage_domain::{Agent, EventMetadata, Role, TicketId};
use triage_event_store::{EventData, EventStore, ExpectedRevision, InMemoryEventStore, StreamName};
use triage_projections::{
    ProjectedEvent, Projection, ProjectionError, ProjectionStatus, Projector, ProjectorOptions, ReadModelDb,
    RebuildOptions, Slot, TicketsProjection, TicketsView,
};
use uuid::Uuid;

use support::{Workload, clean_digests, clean_digests_with, digest, projected_events};

fn status_of(statuses: &[ProjectionStatus], name: &str) -> ProjectionStatus {
    statuses
        .iter()
        .find(|status| status.name == name)
        .unwrap_or_else(|| panic!("no status for {name}: {statuses:?}"))
        .clone()
}

fn small_batches(batch_size: usize) -> ProjectorOptions {
    ProjectorOptions {
        batch_size,
        ..ProjectorOptions::default()
    }
}

/// The names of the schema objects of type `kind` (`table`, `index`) on
/// tables whose names start with `prefix`; for indexes, the secondary ones
/// only (the primary keys' automatic ones have no SQL).
fn objects_on(conn: &Connection, kind: &str, prefix: &str) -> Vec<String> {
    let mut statement = conn
        .prepare(
            "SELECT name FROM sqlite_schema WHERE type = ?1 AND sql IS NOT NULL AND tbl_name LIKE ?2 || '%' \
             ORDER BY name",
        )
        .unwrap();
    statement
        .query_map([kind, prefix], |row| row.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

/// Tables of the read-model database whose names start with `prefix`.
fn tables_like(projector: &Projector, prefix: &str) -> Vec<String> {
    objects_on(&projector.db().lock(), "table", prefix)
}

/// An in-memory log of 300 pseudo-random workload steps (a ticket opened
/// every 15), and a projector caught up with it in batches of 10.
async fn caught_up_on_random_tickets() -> (Arc<dyn EventStore>, Projector) {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut workload = Workload::new(store.clone());
    workload.random(300, 15, 5).await;
    let projector = Projector::new(store.clone(), ReadModelDb::in_memory().unwrap()).with_options(small_batches(10));
    projector.catch_up().await.unwrap();
    (store, projector)
}

/// The secondary indexes on tables whose names start with `prefix`.
fn indexes_like(conn: &Connection, prefix: &str) -> Vec<String> {
    objects_on(conn, "index", prefix)
}

#[tokio::test]
async fn a_rebuild_indexes_its_generation_when_it_goes_live() {
    let (_store, projector) = caught_up_on_random_tickets().await;
    let live_indexes = |generation: u32| {
        vec![
            format!("stats_latency_g{generation}_stage"),
            format!("tickets_g{generation}_created"),
            format!("tickets_g{generation}_lease"),
            format!("tickets_g{generation}_queue"),
        ]
    };
    let both = |conn: &Connection, generation: u32| {
        let mut names = indexes_like(conn, &format!("stats_latency_g{generation}"));
        names.extend(indexes_like(conn, &format!("tickets_g{generation}")));
        names
    };
    // A generation made live at once has its indexes from the start.
    assert_eq!(both(&projector.db().lock(), 1), live_indexes(1));

    // While the rebuild replays, its generation has none: each index is
    // built once at the swap instead of updated row by row.
    let seen_during_replay = Arc::new(std::sync::Mutex::new(Vec::new()));
    let options = RebuildOptions {
        progress: Some(Box::new({
            let (db, seen) = (projector.db().clone(), seen_during_replay.clone());
            move |_| seen.lock().unwrap().push(both(&db.lock(), 2))
        })),
        ..RebuildOptions::default()
    };
    let reports = projector.rebuild_many(&["tickets", "stats"], options).await.unwrap();
    assert!(reports.iter().all(|report| report.events > 0), "{reports:?}");
    let seen = seen_during_replay.lock().unwrap().clone();
    assert!(seen.len() > 1, "a progress report per batch: {seen:?}");
    assert!(seen.iter().all(Vec::is_empty), "indexes during the replay: {seen:?}");

    // Swapped in with its indexes; the old generation's went with its tables.
    let conn = projector.db().lock();
    assert_eq!(both(&conn, 2), live_indexes(2));
    assert!(both(&conn, 1).is_empty());
    // The work queue's query is answered from its index.
    let plan: Vec<String> = conn
        .prepare("EXPLAIN QUERY PLAN SELECT ticket_id FROM tickets WHERE state = 'new' ORDER BY state_entered_at")
        .unwrap()
        .query_map([], |row| row.get(3))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert!(plan.iter().any(|step| step.contains("tickets_g2_queue")), "{plan:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_under_load_keeps_serving_and_converges() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut workload = Workload::new(store.clone());
    workload.random(1500, 15, 3).await;
    let projector = Projector::new(store.clone(), ReadModelDb::in_memory().unwrap()).with_options(small_batches(16));
    projector.catch_up().await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let rebuilding = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut seed = 100;
            while !stop.load(Ordering::Relaxed) {
                workload.random(5, 15, seed).await;
                seed += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            workload
        }
    });
    let reads_during_rebuild = Arc::new(AtomicU64::new(0));
    let reader = tokio::spawn({
        let (stop, rebuilding, reads) = (stop.clone(), rebuilding.clone(), reads_during_rebuild.clone());
        let projector = projector.clone();
        async move {
            let mut seen = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let during = rebuilding.load(Ordering::Relaxed);
                let (total, queue) = projector
                    .read("tickets", |conn, slot| {
                        let view = TicketsView::new(conn, slot);
                        Ok((
                            view.counts()?.values().sum::<u64>(),
                            view.work_queue(Role::Classifier, 5)?,
                        ))
                    })
                    .expect("the live model serves during the rebuild");
                // Tickets are never deleted, and the swapped-in generation
                // is at least as far along as the one it replaces.
                assert!(total >= seen, "the live model went back from {seen} to {total} tickets");
                assert!(queue.len() <= 5);
                seen = total;
                if during && rebuilding.load(Ordering::Relaxed) {
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            seen
        }
    });

    // The live projector keeps following the log, as `triage serve` does.
    let follower = tokio::spawn({
        let (stop, projector) = (stop.clone(), projector.clone());
        async move { projector.run_live(stop).await }
    });

    tokio::time::sleep(Duration::from_millis(20)).await;
    rebuilding.store(true, Ordering::Relaxed);
    let tickets = projector.rebuild("tickets", RebuildOptions::default()).await.unwrap();
    let stats = projector
        .rebuild(
            "stats",
            RebuildOptions {
                verify: true,
                ..RebuildOptions::default()
            },
        )
        .await
        .unwrap();
    rebuilding.store(false, Ordering::Relaxed);
    assert_eq!(tickets.generation, 2);
    assert_eq!(stats.generation, 2);
    assert!(tickets.events > 0);
    // Writing is part of the replay: some time, never more than all of it.
    for report in [&tickets, &stats] {
        assert!(
            report.write_s > 0.0 && report.write_s <= report.wall_s,
            "{}: write_s {} of wall_s {}",
            report.name,
            report.write_s,
            report.wall_s
        );
    }
    // Verification brings both generations to the same position under load.
    assert_eq!(stats.differences, Some(vec![]));

    projector.catch_up().await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let workload = writer.await.unwrap();
    let tickets_seen = reader.await.unwrap();
    follower.await.unwrap().expect("the live projector follows the log");
    projector.catch_up().await.unwrap();

    assert!(
        reads_during_rebuild.load(Ordering::Relaxed) > 0,
        "no read was served while the rebuild ran"
    );
    assert!(tickets_seen > 0);
    assert!(workload.accepted > 0);
    let [clean_tickets, clean_stats] = clean_digests(store.clone()).await;
    assert_eq!(digest(&projector, "tickets"), clean_tickets);
    assert_eq!(digest(&projector, "stats"), clean_stats);
    let (projected, head) = projected_events(store.as_ref()).await;
    for status in projector.status().await.unwrap() {
        assert_eq!(status.events_applied, projected, "{status:?}");
        assert_eq!(status.checkpoint, head);
        assert_eq!(status.generation, Some(2));
        assert!(!status.build_in_progress);
    }
    // The old generation is gone.
    assert_eq!(tables_like(&projector, "tickets_g"), ["tickets_g2"]);
}

#[tokio::test]
async fn a_cancelled_rebuild_leaves_the_live_model_untouched() {
    let (store, projector) = caught_up_on_random_tickets().await;
    let before = digest(&projector, "tickets");
    let status_before = status_of(&projector.status().await.unwrap(), "tickets");

    let cancel = Arc::new(AtomicBool::new(false));
    let reports = Arc::new(std::sync::Mutex::new(Vec::new()));
    let options = RebuildOptions {
        cancel: Some(cancel.clone()),
        progress: Some(Box::new({
            let (cancel, reports) = (cancel.clone(), reports.clone());
            move |progress| {
                reports.lock().unwrap().push(progress);
                cancel.store(true, Ordering::Relaxed);
            }
        })),
        ..RebuildOptions::default()
    };
    let result = projector.rebuild("tickets", options).await;
    assert!(matches!(result, Err(ProjectionError::Cancelled)), "{result:?}");
    let reports = reports.lock().unwrap().clone();
    assert_eq!(reports.len(), 1, "cancelled after the first batch: {reports:?}");
    let head = store.head_position().await.unwrap().unwrap();
    assert_eq!(reports[0].total, head.commit);
    assert!(reports[0].done > 0 && reports[0].done < reports[0].total);

    assert_eq!(digest(&projector, "tickets"), before);
    let status = status_of(&projector.status().await.unwrap(), "tickets");
    assert!(!status.build_in_progress, "{status:?}");
    assert_eq!(status, status_before);
    assert_eq!(tables_like(&projector, "tickets_g"), ["tickets_g1"]);

    // A later rebuild completes and finds the same model.
    let report = projector
        .rebuild(
            "tickets",
            RebuildOptions {
                verify: true,
                ..RebuildOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(report.differences, Some(vec![]));
    assert_eq!(digest(&projector, "tickets"), before);
}

/// `tickets` with its version bumped by one: the same tables and handler.
#[derive(Debug)]
struct TicketsNext;

impl Projection for TicketsNext {
    fn name(&self) -> &'static str {
        TicketsProjection.name()
    }

    fn version(&self) -> u32 {
        TicketsProjection.version() + 1
    }

    fn tables(&self) -> &'static [&'static str] {
        TicketsProjection.tables()
    }

    fn create(&self, conn: &Connection, slot: &Slot) -> rusqlite::Result<()> {
        TicketsProjection.create(conn, slot)
    }

    fn apply(&self, conn: &Connection, slot: &Slot, events: &[ProjectedEvent]) -> Result<(), ProjectionError> {
        TicketsProjection.apply(conn, slot, events)
    }

    fn digest(&self, conn: &Connection, slot: &Slot) -> rusqlite::Result<BTreeMap<String, u64>> {
        TicketsProjection.digest(conn, slot)
    }
}

#[tokio::test]
async fn a_version_bump_rebuilds_before_serving() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut workload = Workload::new(store.clone());
    workload.random(300, 15, 7).await;
    let db = ReadModelDb::in_memory().unwrap();
    let v1 = Projector::new(store.clone(), db.clone()).with_options(small_batches(25));
    v1.catch_up().await.unwrap();
    let before = status_of(&v1.status().await.unwrap(), "tickets");
    let old = TicketsProjection.version();
    assert_eq!((before.generation, before.live_version), (Some(1), Some(old)));
    // More events the old version never saw.
    workload.random(200, 15, 8).await;

    let v2 = Projector::with_projections(store.clone(), db.clone(), vec![Arc::new(TicketsNext)])
        .with_options(small_batches(25));
    let pending = status_of(&v2.status().await.unwrap(), "tickets");
    assert!(pending.needs_rebuild, "{pending:?}");
    assert_eq!((pending.code_version, pending.live_version), (old + 1, Some(old)));

    v2.catch_up().await.unwrap();
    let after = status_of(&v2.status().await.unwrap(), "tickets");
    assert_eq!(after.generation, Some(2), "{after:?}");
    assert_eq!(after.live_version, Some(old + 1));
    assert!(
        !after.needs_rebuild && !after.build_in_progress && after.lag == 0,
        "{after:?}"
    );
    let (projected, _) = projected_events(store.as_ref()).await;
    assert_eq!(after.events_applied, projected);
    assert_eq!(tables_like(&v2, "tickets_g"), ["tickets_g2"]);

    let [clean_tickets, _] = clean_digests(store.clone()).await;
    assert_eq!(digest(&v2, "tickets"), clean_tickets);
    // And one ticket, read through the view, is what its stream says.
    let id = *workload.tickets.last().unwrap();
    let loaded = workload.handler.load(id).await.unwrap();
    let row = v2
        .read("tickets", |conn, slot| TicketsView::new(conn, slot).get(id))
        .unwrap()
        .expect("the newest ticket is in the rebuilt model");
    assert_eq!(row.ticket, loaded.ticket);
    assert_eq!(Some(row.revision), loaded.revision);
    // A second catch-up at the same version does not rebuild again.
    v2.catch_up().await.unwrap();
    assert_eq!(status_of(&v2.status().await.unwrap(), "tickets").generation, Some(2));
}

/// A rolling upgrade: an older instance runs beside a newer one. It must
/// neither write into the model the newer one swapped in while it was
/// following the log, nor rebuild that model back to its own version at
/// its next catch-up (each would undo the other's work for ever).
#[tokio::test]
async fn an_older_instance_leaves_a_newer_model_alone() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut workload = Workload::new(store.clone());
    workload.random(300, 15, 7).await;
    let db = ReadModelDb::in_memory().unwrap();
    let old = Projector::with_projections(store.clone(), db.clone(), vec![Arc::new(TicketsProjection)])
        .with_options(small_batches(25));
    old.catch_up().await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let following = tokio::spawn({
        let old = old.clone();
        let stop = stop.clone();
        async move { old.run_live(stop).await }
    });

    let new = Projector::with_projections(store.clone(), db.clone(), vec![Arc::new(TicketsNext)])
        .with_options(small_batches(25));
    new.catch_up().await.unwrap();
    let upgraded = status_of(&new.status().await.unwrap(), "tickets");
    assert_eq!(upgraded.live_version, Some(TicketsNext.version()), "{upgraded:?}");
    // New events: the older instance's live loop reaches a page, finds
    // the newer generation, and stops instead of applying it.
    workload.random(100, 15, 8).await;
    let stopped = tokio::time::timeout(Duration::from_secs(10), following)
        .await
        .expect("the older instance stops following")
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let error = stopped.expect_err("the older instance must not apply to the newer model");
    assert!(
        matches!(error, ProjectionError::OtherVersion { live, code, .. }
            if live == TicketsNext.version() && code == TicketsProjection.version()),
        "{error:?}"
    );
    assert!(error.to_string().contains("upgrade this instance"), "{error}");

    // Its next catch-up refuses too, and leaves the model as it was.
    let before = status_of(&new.status().await.unwrap(), "tickets");
    let before_digest = digest(&new, "tickets");
    assert!(matches!(
        old.catch_up().await,
        Err(ProjectionError::OtherVersion { .. })
    ));
    let after = status_of(&new.status().await.unwrap(), "tickets");
    assert_eq!(
        (after.generation, after.live_version, after.events_applied),
        (before.generation, before.live_version, before.events_applied)
    );
    assert_eq!(digest(&new, "tickets"), before_digest);
    // Nor does it read the newer model with its own queries.
    let read = old.read("tickets", |conn, slot| TicketsView::new(conn, slot).counts());
    assert!(matches!(read, Err(ProjectionError::OtherVersion { .. })), "{read:?}");
    // The newer instance goes on, and its model equals a clean rebuild.
    new.catch_up().await.unwrap();
    let [clean_tickets, _] = clean_digests(store.clone()).await;
    assert_eq!(digest(&new, "tickets"), clean_tickets);
}

async fn append_teleport(store: &dyn EventStore, ticket: TicketId) -> triage_event_store::Position {
    let metadata = EventMetadata {
        schema_version: 1,
        command_id: Uuid::new_v4(),
        correlation_id: Uuid::new_v4(),
        causation_id: Uuid::new_v4(),
        agent: Agent::new("triage-9", Role::System),
        traceparent: None,
        recorded_at: chrono::Utc::now(),
        decided_at_revision: None,
        sender_saw_revision: None,
        command_digest: None,
    };
    let event = EventData {
        id: Uuid::new_v4(),
        event_type: "TicketTeleported".into(),
        data: br#"{"to":"mars"}"#.to_vec(),
        metadata: metadata.encode(),
    };
    let stream = StreamName::new(ticket.stream_name()).unwrap();
    store
        .append(&stream, ExpectedRevision::Any, vec![event])
        .await
        .unwrap()
        .position
}

#[tokio::test]
async fn an_unknown_event_type_stops_the_projection_until_skipped() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut workload = Workload::new(store.clone());
    workload.random(150, 10, 9).await;
    let projector = Projector::new(store.clone(), ReadModelDb::in_memory().unwrap()).with_options(small_batches(5));
    projector.catch_up().await.unwrap();
    let first_checkpoint = status_of(&projector.status().await.unwrap(), "tickets").checkpoint;

    workload.random(60, 10, 10).await;
    let teleported = append_teleport(store.as_ref(), workload.tickets[0]).await;
    workload.random(60, 10, 11).await;
    let head = store.head_position().await.unwrap();
    assert!(Some(teleported) < head);

    for _ in 0..2 {
        let error = projector
            .catch_up()
            .await
            .expect_err("an unknown type stops the projection");
        let message = error.to_string();
        let ProjectionError::Undecodable {
            position, event_type, ..
        } = &error
        else {
            panic!("expected Undecodable, got {error:?}");
        };
        assert_eq!(*position, teleported);
        assert_eq!(event_type, "TicketTeleported");
        assert!(message.contains(&teleported.to_string()), "{message}");
        assert!(message.contains("TicketTeleported"), "{message}");

        for status in projector.status().await.unwrap() {
            let last_error = status.last_error.clone().expect("the error is recorded");
            assert!(last_error.contains("TicketTeleported"), "{status:?}");
            assert!(status.checkpoint < Some(teleported), "{status:?}");
            assert!(status.checkpoint >= first_checkpoint, "{status:?}");
        }
    }

    let skipping = Projector::new(store.clone(), projector.db().clone()).with_options(ProjectorOptions {
        batch_size: 5,
        skip_event_types: BTreeSet::from(["TicketTeleported".to_owned()]),
    });
    skipping.catch_up().await.unwrap();
    let (projected, _) = projected_events(store.as_ref()).await;
    for status in skipping.status().await.unwrap() {
        assert_eq!(status.checkpoint, head, "{status:?}");
        assert!(status.last_error.is_none(), "{status:?}");
        assert_eq!(status.events_applied, projected, "{status:?}");
    }
    let [clean_tickets, clean_stats] = clean_digests_with(
        store.clone(),
        ProjectorOptions {
            skip_event_types: BTreeSet::from(["TicketTeleported".to_owned()]),
            ..ProjectorOptions::default()
        },
    )
    .await;
    assert_eq!(digest(&skipping, "tickets"), clean_tickets);
    assert_eq!(digest(&skipping, "stats"), clean_stats);
}

/// A view of a store for one projector: `read_all` waits for a permit of
/// `gate` (when set), and records after `limit` (when set) are hidden, as
/// if they had not been written yet.
#[derive(Debug)]
struct View {
    inner: Arc<dyn EventStore>,
    gate: Option<Arc<tokio::sync::Semaphore>>,
    limit: Option<triage_event_store::Position>,
}

#[async_trait::async_trait]
impl EventStore for View {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedRevision,
        events: Vec<EventData>,
    ) -> triage_event_store::Result<triage_event_store::AppendResult> {
        self.inner.append(stream, expected, events).await
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        options: triage_event_store::ReadStream,
    ) -> triage_event_store::Result<Vec<triage_event_store::RecordedEvent>> {
        self.inner.read_stream(stream, options).await
    }

    async fn read_all(
        &self,
        options: triage_event_store::ReadAll,
    ) -> triage_event_store::Result<Vec<triage_event_store::RecordedEvent>> {
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        let mut records = self.inner.read_all(options).await?;
        if let Some(limit) = self.limit {
            records.retain(|record| record.position <= limit);
        }
        Ok(records)
    }

    async fn read_event(
        &self,
        event_id: Uuid,
    ) -> triage_event_store::Result<Option<triage_event_store::RecordedEvent>> {
        let event = self.inner.read_event(event_id).await?;
        Ok(event.filter(|event| self.limit.is_none_or(|limit| event.position <= limit)))
    }

    async fn head_position(&self) -> triage_event_store::Result<Option<triage_event_store::Position>> {
        let head = self.inner.head_position().await?;
        Ok(match self.limit {
            Some(limit) => head.map(|head| head.min(limit)),
            None => head,
        })
    }

    fn subscribe_to_all(
        self: Arc<Self>,
        options: triage_event_store::SubscribeToAll,
    ) -> triage_event_store::Subscription {
        self.inner.clone().subscribe_to_all(options)
    }

    fn describe(&self) -> String {
        format!("view of {}", self.inner.describe())
    }
}

/// The race between a live catch-up and a rebuild's swap, made
/// deterministic: the rebuild finishes at position B; the live projector
/// (`triage serve`) applies a page past B to the old generation, the
/// rebuild (`triage projections rebuild`) swaps its generation in at B, and
/// the live projector's next page must not skip the events between B and
/// that page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_during_a_live_catch_up_loses_no_events() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut workload = Workload::new(store.clone());
    workload.random(200, 10, 21).await;
    let db = ReadModelDb::in_memory().unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let live_view = Arc::new(View {
        inner: store.clone(),
        gate: Some(gate.clone()),
        limit: None,
    });
    let live = Projector::new(live_view, db.clone()).with_options(small_batches(5));
    gate.add_permits(1_000_000);
    live.catch_up().await.unwrap();
    let rebuilt_at = store.head_position().await.unwrap().unwrap();
    // Leave the gate with no permits.
    gate.acquire_many(gate.available_permits() as u32)
        .await
        .unwrap()
        .forget();

    // The writer moves on.
    workload.random(100, 10, 22).await;

    // The live projector reads and applies one page past `rebuilt_at`, then
    // waits for its next read.
    gate.add_permits(1);
    let catching_up = tokio::spawn({
        let live = live.clone();
        async move { live.catch_up().await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let checkpoint = status_of(&live.status().await.unwrap(), "tickets").checkpoint;
        if checkpoint > Some(rebuilt_at) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the live projector made no progress"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    // Another projector rebuilds up to `rebuilt_at` and swaps in.
    let rebuilder = Projector::new(
        Arc::new(View {
            inner: store.clone(),
            gate: None,
            limit: Some(rebuilt_at),
        }),
        db.clone(),
    );
    for name in ["tickets", "stats"] {
        let report = rebuilder.rebuild(name, RebuildOptions::default()).await.unwrap();
        assert_eq!(report.generation, 2);
    }

    // The live projector goes on. The swap put its checkpoints back
    // behind the pages it was reading: it reads again from them, so the
    // position its catch-up reports is one the model reached.
    gate.add_permits(1_000_000);
    let reported = catching_up.await.unwrap().unwrap();
    let (projected, head) = projected_events(store.as_ref()).await;
    assert_eq!(reported, head);
    for status in live.status().await.unwrap() {
        assert_eq!(
            status.checkpoint, head,
            "the catch-up reported {reported:?}: {status:?}"
        );
    }
    live.catch_up().await.unwrap();

    let [clean_tickets, clean_stats] = clean_digests(store.clone()).await;
    for status in live.status().await.unwrap() {
        assert_eq!(status.checkpoint, head, "{status:?}");
        assert_eq!(status.events_applied, projected, "events missing from {status:?}");
    }
    assert_eq!(digest(&live, "tickets"), clean_tickets);
    assert_eq!(digest(&live, "stats"), clean_stats);
}

/// `triage serve` reads while `triage projections rebuild` runs in another
/// process on the same read-model file (two connections here). Every swap
/// drops the old generation; a read must never see the registry before a
/// swap and the tables after it ("no such table").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_stay_whole_while_another_process_rebuilds_and_swaps() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("triage.read.db");
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut workload = Workload::new(store.clone());
    workload.random(600, 5, 7).await;
    let server = Projector::new(store.clone(), ReadModelDb::open(&path).unwrap());
    server.catch_up().await.unwrap();
    let tickets = server
        .read("tickets", |conn, slot| TicketsView::new(conn, slot).list(None, 10_000))
        .unwrap()
        .len();
    assert!(tickets > 0);
    let rebuilder = Projector::new(store.clone(), ReadModelDb::open(&path).unwrap()).with_options(ProjectorOptions {
        batch_size: 64,
        ..ProjectorOptions::default()
    });

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, server) = (stop.clone(), server.clone());
        std::thread::spawn(move || {
            let (mut reads, mut failures) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match server.read("tickets", |conn, slot| TicketsView::new(conn, slot).list(None, 10_000)) {
                    Ok(rows) if rows.len() == tickets => {}
                    Ok(rows) => failures.push(format!("{} tickets instead of {tickets}", rows.len())),
                    Err(error) => failures.push(error.to_string()),
                }
                reads += 1;
            }
            (reads, failures)
        })
    };
    for _ in 0..10 {
        rebuilder.rebuild("tickets", RebuildOptions::default()).await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let (reads, failures) = reader.join().unwrap();
    assert!(reads > 10, "the reader ran alongside ({reads} reads)");
    assert!(
        failures.is_empty(),
        "{} of {reads} reads failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
}

/// `triage projections rebuild --verify` while `triage serve` applies new
/// events in another process (two connections to one file): the live
/// model's checkpoint and its rows must be compared at one moment, or the
/// verification reports differences that are not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_beside_a_live_projector_in_another_process_finds_no_false_differences() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("triage.read.db");
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut workload = Workload::new(store.clone());
    workload.random(1500, 5, 11).await;
    let options = |batch_size| ProjectorOptions {
        batch_size,
        ..ProjectorOptions::default()
    };
    let server = Projector::new(store.clone(), ReadModelDb::open(&path).unwrap()).with_options(options(8));
    server.catch_up().await.unwrap();
    let cli = Projector::new(store.clone(), ReadModelDb::open(&path).unwrap()).with_options(options(64));

    let stop = Arc::new(AtomicBool::new(false));
    let live = tokio::spawn({
        let (server, stop) = (server.clone(), stop.clone());
        async move { server.run_live(stop).await }
    });
    let writer = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                workload.random(20, 5, 100 + round).await;
                round += 1;
                tokio::task::yield_now().await;
            }
        }
    });
    let mut false_differences = Vec::new();
    for _ in 0..6 {
        for name in ["tickets", "stats"] {
            let verify = RebuildOptions {
                verify: true,
                ..RebuildOptions::default()
            };
            let report = cli.rebuild(name, verify).await.unwrap();
            let differences = report.differences.expect("verified");
            if !differences.is_empty() {
                false_differences.push((name, differences.len(), differences[0].clone()));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    live.await.unwrap().unwrap();
    server.catch_up().await.unwrap();
    let [tickets, stats] = clean_digests(store.clone()).await;
    assert_eq!(digest(&server, "tickets"), tickets, "the live model converges");
    assert_eq!(digest(&server, "stats"), stats, "the live model converges");
    assert!(false_differences.is_empty(), "{false_differences:?}");
}

/// A projection whose version 2 adds a column to its table.
#[derive(Debug)]
struct Counter(u32);

impl Projection for Counter {
    fn name(&self) -> &'static str {
        "counter"
    }

    fn version(&self) -> u32 {
        self.0
    }

    fn tables(&self) -> &'static [&'static str] {
        &["counter"]
    }

    fn create(&self, conn: &Connection, slot: &Slot) -> rusqlite::Result<()> {
        let extra = if self.0 >= 2 { ", extra INTEGER NOT NULL" } else { "" };
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {} (k TEXT PRIMARY KEY, n INTEGER NOT NULL{extra})",
            slot.table("counter")
        ))
    }

    fn apply(&self, conn: &Connection, slot: &Slot, events: &[ProjectedEvent]) -> Result<(), ProjectionError> {
        let (columns, values) = if self.0 >= 2 {
            ("k, n, extra", "'n', ?1, 0")
        } else {
            ("k, n", "'n', ?1")
        };
        conn.execute(
            &format!(
                "INSERT INTO {} ({columns}) VALUES ({values}) ON CONFLICT (k) DO UPDATE SET n = n + ?1",
                slot.table("counter")
            ),
            [events.len() as i64],
        )
        .map_err(|error| ProjectionError::Internal(error.to_string()))?;
        Ok(())
    }

    fn digest(&self, conn: &Connection, slot: &Slot) -> rusqlite::Result<BTreeMap<String, u64>> {
        triage_projections::digest_rows(conn, &format!("SELECT k, n FROM {}", slot.table("counter")))
    }
}

/// `rebuild --verify` right after a version bump: the live model is the
/// old version's, whose tables the new code must never write (here they
/// lack a column). The rebuild says there is nothing to compare, swaps in,
/// and leaves no build behind.
#[tokio::test]
async fn verify_after_a_version_bump_compares_nothing_and_swaps_in() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut workload = Workload::new(store.clone());
    workload.random(200, 5, 3).await;
    let db = ReadModelDb::in_memory().unwrap();
    let v1 = Projector::with_projections(store.clone(), db.clone(), vec![Arc::new(Counter(1))]);
    v1.catch_up().await.unwrap();
    // The live version-1 model falls behind.
    workload.random(200, 5, 4).await;

    let v2 = Projector::with_projections(store.clone(), db.clone(), vec![Arc::new(Counter(2))]);
    let verify = RebuildOptions {
        verify: true,
        ..RebuildOptions::default()
    };
    let report = v2.rebuild("counter", verify).await.expect("the rebuild succeeds");
    let differences = report.differences.expect("verified");
    assert!(
        matches!(differences.as_slice(), [note] if note.contains("version 1") && note.contains("nothing to compare")),
        "{differences:?}"
    );
    let status = status_of(&v2.status().await.unwrap(), "counter");
    assert_eq!(status.live_version, Some(2), "{status:?}");
    assert!(!status.build_in_progress, "{status:?}");
    let (projected, _) = projected_events(store.as_ref()).await;
    let counted: i64 = v2
        .read("counter", |conn, slot| {
            conn.query_row(&format!("SELECT n FROM {}", slot.table("counter")), [], |row| {
                row.get(0)
            })
        })
        .unwrap();
    assert_eq!(counted as u64, projected, "the new model counts every event once");
}

/// A projection that raises the rebuild's cancel flag when its model is
/// digested, that is while `--verify` compares it.
#[derive(Debug)]
struct CancelsWhenVerified(Arc<AtomicBool>);

impl Projection for CancelsWhenVerified {
    fn name(&self) -> &'static str {
        "cancel_probe"
    }

    fn version(&self) -> u32 {
        1
    }

    fn tables(&self) -> &'static [&'static str] {
        &["probe"]
    }

    fn create(&self, conn: &Connection, slot: &Slot) -> rusqlite::Result<()> {
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {} (k TEXT PRIMARY KEY, n INTEGER NOT NULL)",
            slot.table("probe")
        ))
    }

    fn apply(&self, conn: &Connection, slot: &Slot, events: &[ProjectedEvent]) -> Result<(), ProjectionError> {
        conn.execute(
            &format!(
                "INSERT INTO {} (k, n) VALUES ('n', ?1) ON CONFLICT (k) DO UPDATE SET n = n + ?1",
                slot.table("probe")
            ),
            [events.len() as i64],
        )
        .map_err(|error| ProjectionError::Internal(error.to_string()))?;
        Ok(())
    }

    fn digest(&self, conn: &Connection, slot: &Slot) -> rusqlite::Result<BTreeMap<String, u64>> {
        self.0.store(true, Ordering::Relaxed);
        triage_projections::digest_rows(conn, &format!("SELECT k, n FROM {}", slot.table("probe")))
    }
}

/// A cancel before any projection is swapped in leaves every live model as
/// it was; once one is swapped in, the rest are too, rather than leaving
/// the models half rebuilt under a "nothing changed" answer.
#[tokio::test]
async fn a_cancel_after_the_first_swap_finishes_the_rebuild() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut workload = Workload::new(store.clone());
    workload.random(100, 5, 9).await;
    let cancel = Arc::new(AtomicBool::new(false));
    let projector = Projector::with_projections(
        store.clone(),
        ReadModelDb::in_memory().unwrap(),
        vec![
            Arc::new(TicketsProjection),
            Arc::new(CancelsWhenVerified(cancel.clone())),
        ],
    );
    projector.catch_up().await.unwrap();
    let generations = |statuses: Vec<ProjectionStatus>| -> Vec<Option<u32>> {
        ["tickets", "cancel_probe"]
            .iter()
            .map(|name| status_of(&statuses, name).generation)
            .collect()
    };
    let options = || RebuildOptions {
        verify: true,
        cancel: Some(cancel.clone()),
        ..RebuildOptions::default()
    };

    // The probe is verified first: cancelled before any swap.
    let cancelled = projector.rebuild_many(&["cancel_probe", "tickets"], options()).await;
    assert!(matches!(cancelled, Err(ProjectionError::Cancelled)), "{cancelled:?}");
    assert_eq!(generations(projector.status().await.unwrap()), [Some(1), Some(1)]);

    // Tickets first: swapped in before the probe raises the flag.
    cancel.store(false, Ordering::Relaxed);
    let reports = projector
        .rebuild_many(&["tickets", "cancel_probe"], options())
        .await
        .expect("the rebuild finishes once a projection is swapped in");
    assert_eq!(reports.len(), 2);
    assert!(cancel.load(Ordering::Relaxed), "the flag was raised during the rebuild");
    let statuses = projector.status().await.unwrap();
    assert!(statuses.iter().all(|status| !status.build_in_progress), "{statuses:?}");
    let after = generations(statuses);
    assert!(after.iter().all(|generation| generation > &Some(1)), "{after:?}");
}

/// A second rebuild of a projection while one runs, in the same process
/// or through another handle on the same file (as another process would
/// open it), is refused with a clear error and leaves the first alone; a
/// rebuild of another projection meanwhile is not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_rebuild_of_the_same_projection_is_refused() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut workload = Workload::new(store.clone());
    workload.random(300, 15, 21).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("triage.read.db");
    let db = ReadModelDb::open(&path).unwrap();
    let first = Projector::new(store.clone(), db.clone()).with_options(small_batches(25));
    first.catch_up().await.unwrap();
    let same_handle = Projector::new(store.clone(), db.clone());
    let other_handle = Projector::new(store.clone(), ReadModelDb::open(&path).unwrap());

    let mut tried = false;
    let progress = move |_| {
        if tried {
            return;
        }
        tried = true;
        let attempt = |projector: &Projector, name: &str| {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(projector.rebuild(name, RebuildOptions::default()))
            })
        };
        for projector in [&same_handle, &other_handle] {
            match attempt(projector, "tickets") {
                Err(ProjectionError::RebuildInProgress { name }) => assert_eq!(name, "tickets"),
                other => panic!("a second rebuild of tickets ran: {other:?}"),
            }
        }
        attempt(&other_handle, "stats").expect("a rebuild of stats runs meanwhile");
    };
    let report = first
        .rebuild(
            "tickets",
            RebuildOptions {
                progress: Some(Box::new(progress)),
                ..RebuildOptions::default()
            },
        )
        .await
        .expect("the first rebuild finishes");
    let (projected, _) = projected_events(store.as_ref()).await;
    assert_eq!(report.events, projected);
    assert!(path.with_file_name("triage.read.db.rebuild-tickets.lock").exists());
    // Once it has finished, the next rebuild runs.
    let again = Projector::new(store.clone(), ReadModelDb::open(&path).unwrap());
    again.rebuild("tickets", RebuildOptions::default()).await.unwrap();
    let [clean_tickets, clean_stats] = clean_digests(store.clone()).await;
    assert_eq!(digest(&again, "tickets"), clean_tickets);
    assert_eq!(digest(&again, "stats"), clean_stats);
}

/// The live model moves on after the rebuild has read its last page: the
/// rebuild catches up before its swap, and its report counts the events of
/// what it swapped in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_counts_what_was_swapped_in() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut workload = Workload::new(store.clone());
    workload.random(200, 10, 31).await;
    let db = ReadModelDb::in_memory().unwrap();
    let live = Projector::new(store.clone(), db.clone());
    live.catch_up().await.unwrap();

    let (progress, helper) = support::hold_at_head({
        let live = live.clone();
        async move {
            workload.random(100, 10, 32).await;
            live.catch_up().await.unwrap();
        }
    });
    let report = Projector::new(store.clone(), db.clone())
        .rebuild(
            "tickets",
            RebuildOptions {
                progress: Some(Box::new(progress)),
                ..RebuildOptions::default()
            },
        )
        .await
        .unwrap();
    helper.await.unwrap();
    let (projected, head) = projected_events(store.as_ref()).await;
    assert_eq!(report.events, projected, "{report:?}");
    let status = status_of(&live.status().await.unwrap(), "tickets");
    assert_eq!((status.checkpoint, status.events_applied), (head, projected));
}

/// A rebuild that fails after making its shadow tables drops them again:
/// the file does not keep a full-size abandoned build, and the status
/// does not show a rebuild under way.
#[tokio::test]
async fn a_rebuild_that_fails_after_its_shadow_tables_leaves_no_build_behind() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    Workload::new(store.clone()).random(50, 10, 31).await;
    let db = ReadModelDb::in_memory().unwrap();
    let live = Projector::new(store.clone(), db.clone());
    live.catch_up().await.unwrap();
    let failing = Projector::new(
        Arc::new(triage_event_store::testing::CountingStore::new(store.clone()).failing_head_position()),
        db.clone(),
    );
    let error = failing
        .rebuild_many(&["tickets", "stats"], RebuildOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(error, triage_projections::ProjectionError::Store(_)),
        "{error}"
    );
    for status in live.status().await.unwrap() {
        assert!(!status.build_in_progress, "{status:?}");
    }
}

/// Upgrading from version 2 of `tickets`, which kept a `claims` table next
/// to `tickets`: the swap drops the old generation's tables and views,
/// the former `claims` ones included, so SQL users do not go on reading a
/// frozen `claims` view.
#[tokio::test]
async fn an_upgrade_drops_the_tables_an_earlier_version_had() {
    let (store, projector) = caught_up_on_random_tickets().await;
    {
        // The file as version 2 left it.
        let conn = projector.db().lock();
        conn.execute_batch(
            "CREATE TABLE claims_g1 (claim_id TEXT PRIMARY KEY, ticket_id TEXT NOT NULL);
             CREATE VIEW claims AS SELECT * FROM claims_g1;
             UPDATE projections SET version = 2 WHERE name = 'tickets';",
        )
        .unwrap();
    }
    let upgraded = Projector::new(store, projector.db().clone());
    upgraded.catch_up().await.unwrap();
    assert_eq!(
        status_of(&upgraded.status().await.unwrap(), "tickets").generation,
        Some(2)
    );
    assert_eq!(tables_like(&upgraded, "claims"), Vec::<String>::new());
    assert_eq!(
        objects_on(&upgraded.db().lock(), "view", "claims"),
        Vec::<String>::new()
    );
    assert_eq!(tables_like(&upgraded, "tickets_g"), ["tickets_g2"]);
}

/// A model a newer Triage built (a higher projection version, as in a
/// rolling upgrade) is not taken back by an older instance's rebuild
/// unless it is told to replace it, and its status says to upgrade, not
/// to rebuild.
#[tokio::test]
async fn a_rebuild_leaves_a_newer_model_alone_unless_told_to_replace_it() {
    let (_store, projector) = caught_up_on_random_tickets().await;
    let before = status_of(&projector.status().await.unwrap(), "tickets");
    let newer = before.code_version + 5;
    projector
        .db()
        .lock()
        .execute("UPDATE projections SET version = ?1 WHERE name = 'tickets'", [newer])
        .unwrap();
    let status = status_of(&projector.status().await.unwrap(), "tickets");
    assert_eq!(status.live_version, Some(newer));
    assert!(!status.needs_rebuild, "a newer model needs a newer Triage: {status:?}");

    let error = projector
        .rebuild("tickets", RebuildOptions::default())
        .await
        .expect_err("an older rebuild replaced a newer model");
    assert!(
        matches!(error, ProjectionError::OtherVersion { live, .. } if live == newer),
        "{error:?}"
    );
    assert!(error.to_string().contains("--replace-newer"), "{error}");
    let after = status_of(&projector.status().await.unwrap(), "tickets");
    assert_eq!((after.generation, after.live_version), (before.generation, Some(newer)));

    projector
        .rebuild(
            "tickets",
            RebuildOptions {
                replace_newer: true,
                ..RebuildOptions::default()
            },
        )
        .await
        .unwrap();
    let replaced = status_of(&projector.status().await.unwrap(), "tickets");
    assert_eq!(replaced.live_version, Some(before.code_version));
    assert!(!replaced.needs_rebuild);
}

/// An event of a known type whose metadata is damaged where no read model
/// looks (a correlation id that is not a UUID) stops the projections at
/// that event, as the command handler refuses to load its ticket: it is
/// not applied as if it were whole, and a rebuild stops there too.
#[tokio::test]
async fn metadata_damaged_where_no_model_reads_stops_the_projection() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut workload = Workload::new(store.clone());
    workload.random(60, 10, 12).await;
    let ticket = workload.tickets[0];
    let event = triage_domain::Event::DraftRejected {
        claim_id: None,
        reason: "tone".into(),
    };
    let whole = EventMetadata {
        schema_version: 1,
        command_id: Uuid::new_v4(),
        correlation_id: Uuid::new_v4(),
        causation_id: Uuid::new_v4(),
        agent: Agent::new("drafter-1", Role::Drafter),
        traceparent: None,
        recorded_at: chrono::Utc::now(),
        decided_at_revision: None,
        sender_saw_revision: None,
        command_digest: None,
    };
    let mut damaged: serde_json::Value = serde_json::from_slice(&whole.encode()).unwrap();
    damaged["correlation_id"] = serde_json::json!("not a uuid");
    let stream = StreamName::new(ticket.stream_name()).unwrap();
    let position = store
        .append(
            &stream,
            ExpectedRevision::Any,
            vec![EventData {
                id: Uuid::new_v4(),
                event_type: event.event_type().into(),
                data: event.encode(),
                metadata: serde_json::to_vec(&damaged).unwrap(),
            }],
        )
        .await
        .unwrap()
        .position;
    workload.random(20, 10, 13).await;

    let projector = Projector::new(store.clone(), ReadModelDb::in_memory().unwrap()).with_options(small_batches(5));
    let error = projector
        .catch_up()
        .await
        .expect_err("damaged metadata stops the projection");
    let ProjectionError::Undecodable {
        position: at,
        event_type,
        ..
    } = &error
    else {
        panic!("expected Undecodable, got {error:?}");
    };
    assert_eq!(*at, position);
    assert_eq!(event_type, "DraftRejected");
    for status in projector.status().await.unwrap() {
        assert!(status.checkpoint < Some(position), "{status:?}");
    }
    let rebuilt = projector
        .rebuild_many(&["tickets", "stats"], RebuildOptions::default())
        .await;
    assert!(
        matches!(rebuilt, Err(ProjectionError::Undecodable { .. })),
        "{rebuilt:?}"
    );
}
