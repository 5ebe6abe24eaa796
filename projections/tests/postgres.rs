//! The read models in PostgreSQL, fed from the PostgreSQL event store:
//! catch-up and queries, rebuild and verification, exactly once after a
//! projector is killed between batches, and projection leadership (two
//! runners, one applies; killing it hands over to the other).
//!
//! Every test reads the server from `TRIAGE_PG_URL` and is skipped, saying
//! so, without it. Each uses a fresh event-store schema and fresh
//! read-model schemas, dropped at the end. The killed runners are real
//! child processes (this test binary, re-executed), killed with SIGKILL.

mod support;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use triage_domain::{Role, State};
use triage_event_store::EventStore;
use triage_projections::{
    PgProjector, PgReadModelOptions, PgReadModels, ProjectionError, ProjectionStatus, Projector, ProjectorOptions,
    ReadModelDb, ReadModels, RebuildOptions,
};
use triage_store_postgres::{PostgresEventStore, PostgresOptions};

use support::{Workload, projected_events};

const URL_ENV: &str = "TRIAGE_PG_URL";
const EVENTS_SCHEMA_ENV: &str = "TRIAGE_PG_TEST_EVENTS_SCHEMA";
const MODELS_SCHEMA_ENV: &str = "TRIAGE_PG_TEST_MODELS_SCHEMA";
const INSTANCE_ENV: &str = "TRIAGE_PG_TEST_INSTANCE";
const CATCH_UP_CHILD: &str = "pg_child_catches_up_until_killed";
const RUNNER_CHILD: &str = "pg_child_runs_live_until_killed";

/// The server URL, or `None` after saying plainly that `test` is skipped.
fn url(test: &str) -> Option<String> {
    match std::env::var(URL_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipped: {test} ({URL_ENV} is not set; e.g. postgres://postgres@127.0.0.1:5432/postgres)");
            None
        }
    }
}

async fn event_store(url: &str) -> Arc<PostgresEventStore> {
    Arc::new(
        PostgresEventStore::connect_temporary(url, PostgresOptions::default())
            .await
            .expect("a temporary event store opens"),
    )
}

async fn read_models(url: &str) -> PgReadModels {
    PgReadModels::connect_temporary(url, PgReadModelOptions::default())
        .await
        .expect("temporary read models open")
}

/// The same log projected from scratch into in-memory SQLite: the model
/// the PostgreSQL one must equal.
async fn sqlite_model(events: Arc<dyn EventStore>) -> ReadModels {
    let projector = Projector::new(events, ReadModelDb::in_memory().unwrap());
    projector.catch_up().await.expect("the SQLite model builds");
    ReadModels::Sqlite(projector)
}

/// The digests of a clean rebuild into fresh PostgreSQL read models.
async fn clean_pg_digests(url: &str, events: Arc<dyn EventStore>) -> [BTreeMap<String, u64>; 2] {
    let models = read_models(url).await;
    PgProjector::new(events, models.clone())
        .catch_up()
        .await
        .expect("a clean rebuild succeeds");
    [
        models.digest("tickets").await.unwrap(),
        models.digest("stats").await.unwrap(),
    ]
}

/// Asserts that both of `models` equal a clean rebuild of `events`.
async fn assert_equals_a_clean_rebuild(url: &str, models: &PgReadModels, events: Arc<dyn EventStore>) {
    let [tickets, stats] = clean_pg_digests(url, events).await;
    assert_eq!(models.digest("tickets").await.unwrap(), tickets, "tickets");
    assert_eq!(models.digest("stats").await.unwrap(), stats, "stats");
}

/// Every query the CLI serves answers the same from both models.
async fn assert_same_answers(pg: &ReadModels, sqlite: &ReadModels) {
    let all = sqlite.list(None, usize::MAX).await.unwrap();
    assert!(!all.is_empty(), "the workload opened tickets");
    assert_eq!(pg.list(None, usize::MAX).await.unwrap(), all, "all tickets");
    for state in State::ALL {
        assert_eq!(
            pg.list(Some(state), 1000).await.unwrap(),
            sqlite.list(Some(state), 1000).await.unwrap(),
            "tickets in {state:?}"
        );
    }
    for role in Role::ALL {
        assert_eq!(
            pg.work_queue(role, 7).await.unwrap(),
            sqlite.work_queue(role, 7).await.unwrap(),
            "work queue of {role:?}"
        );
    }
    let some = all[all.len() / 2].ticket.id.unwrap();
    assert_eq!(pg.ticket(some).await.unwrap(), sqlite.ticket(some).await.unwrap());
    assert_eq!(pg.counts().await.unwrap(), sqlite.counts().await.unwrap());
    let summary = sqlite.stats_summary().await.unwrap();
    assert!(summary.stage_latency.contains_key("classify"), "{summary:?}");
    assert_eq!(pg.stats_summary().await.unwrap(), summary);
}

fn status_of(statuses: &[ProjectionStatus], name: &str) -> ProjectionStatus {
    statuses.iter().find(|status| status.name == name).unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_read_models_follow_the_events_and_equal_the_sqlite_ones() {
    let Some(url) = url("pg_read_models_follow_the_events_and_equal_the_sqlite_ones") else {
        return;
    };
    let store = event_store(&url).await;
    let events: Arc<dyn EventStore> = store.clone();
    let models = read_models(&url).await;
    let projector = PgProjector::new(events.clone(), models.clone()).with_options(ProjectorOptions {
        batch_size: 64,
        ..ProjectorOptions::default()
    });
    let pg = ReadModels::Postgres(projector.clone());
    assert!(matches!(
        models.ticket(triage_domain::TicketId::new()).await,
        Err(triage_projections::ProjectionError::NotBuilt { .. })
    ));

    // Catch up in two steps: from nothing, then from the checkpoint.
    let mut workload = Workload::new(events.clone());
    workload.random(500, 10, 3).await;
    pg.catch_up().await.unwrap();
    workload.random(500, 10, 4).await;
    let checkpoint = pg.catch_up().await.unwrap();
    let (projected, head) = projected_events(events.as_ref()).await;
    assert_eq!(checkpoint, head);
    assert_same_answers(&pg, &sqlite_model(events.clone()).await).await;

    let statuses = pg.status().await.unwrap();
    for status in &statuses {
        assert_eq!(status.events_applied, projected, "{status:?}");
        assert_eq!((status.lag, status.generation), (0, Some(1)), "{status:?}");
        assert!(status.last_error.is_none() && !status.needs_rebuild, "{status:?}");
        // The one-shot catch-up released its leadership.
        assert_eq!(status.leader, None, "{status:?}");
    }
    let summary = pg.stats_summary().await.unwrap();
    assert_eq!(summary.counters.get("events"), Some(&projected));

    // A rebuild with verification finds the same model, and swaps it in.
    let report = projector
        .rebuild(
            "stats",
            RebuildOptions {
                verify: true,
                ..RebuildOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(report.differences, Some(vec![]));
    assert_eq!((report.generation, report.events), (2, projected));
    assert!(
        report.write_s > 0.0 && report.write_s <= report.wall_s,
        "write_s {} of wall_s {}",
        report.write_s,
        report.wall_s
    );
    assert_equals_a_clean_rebuild(&url, &models, events.clone()).await;
    assert_eq!(status_of(&pg.status().await.unwrap(), "stats").generation, Some(2));
    assert_eq!(pg.stats_summary().await.unwrap(), summary);

    // Every list, page by page through its cursors, as in SQLite.
    let sqlite = sqlite_model(events.clone()).await;
    let ids = |rows: &[triage_projections::TicketRow]| rows.iter().map(|row| row.ticket.id).collect::<Vec<_>>();
    let states: Vec<Option<State>> = std::iter::once(None)
        .chain(pg.counts().await.unwrap().into_keys().map(Some))
        .collect();
    for state in states {
        let (mut pg_after, mut sqlite_after) = (None, None);
        let mut paged = 0;
        loop {
            let pg_page = pg.list_after(state, pg_after.as_ref(), 7).await.unwrap();
            let sqlite_page = sqlite.list_after(state, sqlite_after.as_ref(), 7).await.unwrap();
            assert_eq!(ids(&pg_page), ids(&sqlite_page), "{state:?} after {paged}");
            let Some(last) = pg_page.last() else { break };
            paged += pg_page.len();
            pg_after = triage_projections::ListCursor::after(last, state);
            sqlite_after = triage_projections::ListCursor::after(sqlite_page.last().unwrap(), state);
        }
        assert!(paged > 0, "{state:?}: a list of tickets that exist");
    }

    // Read models built before the list indexes get them when opened.
    let indexes = [
        format!(r#""{}".tickets_g1_state_list"#, models.schema()),
        format!(r#""{}".tickets_g1_created_list"#, models.schema()),
    ];
    let client = raw_client(&url).await;
    let present = async |client: &tokio_postgres::Client| -> bool {
        client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
                &[&indexes[0], &indexes[1]],
            )
            .await
            .unwrap()
            .get(0)
    };
    assert!(present(&client).await, "a generation gets them when it is made");
    client
        .batch_execute(&format!("DROP INDEX {}; DROP INDEX {};", indexes[0], indexes[1]))
        .await
        .unwrap();
    assert!(!present(&client).await);
    PgReadModels::connect(&url, PgReadModelOptions::in_schema(models.schema()))
        .await
        .unwrap();
    assert!(present(&client).await, "added when the read models were opened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_swaps_in_while_a_leader_keeps_applying() {
    let Some(url) = url("a_rebuild_swaps_in_while_a_leader_keeps_applying") else {
        return;
    };
    let store = event_store(&url).await;
    let events: Arc<dyn EventStore> = store.clone();
    let models = read_models(&url).await;
    let leader = PgProjector::new(events.clone(), models.clone()).with_instance("leader");
    let mut workload = Workload::new(events.clone());
    workload.random(300, 10, 5).await;
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn({
        let (leader, stop) = (leader.clone(), stop.clone());
        async move { leader.run_live(stop).await }
    });
    // Writes go on while another projector (an operator's CLI) rebuilds.
    let writer = tokio::spawn(async move {
        workload.random(400, 10, 6).await;
        workload
    });
    let operator = PgProjector::new(events.clone(), models.clone()).with_instance("operator");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reports = operator
        .rebuild_many(
            &["tickets", "stats"],
            RebuildOptions {
                verify: true,
                ..RebuildOptions::default()
            },
        )
        .await
        .unwrap();
    for report in &reports {
        assert_eq!(report.differences, Some(vec![]), "{report:?}");
        assert_eq!(report.generation, 2, "{report:?}");
    }
    drop(writer.await.unwrap());
    let (projected, head) = projected_events(events.as_ref()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let statuses = operator.status().await.unwrap();
        if statuses.iter().all(|status| status.checkpoint == head) {
            for status in &statuses {
                assert_eq!(status.events_applied, projected, "{status:?}");
                assert_eq!(status.leader.as_deref(), Some("leader"), "{status:?}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "the leader did not catch up: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    running.await.unwrap().unwrap();
    assert_equals_a_clean_rebuild(&url, &models, events.clone()).await;
}

/// The secondary indexes of the read models' table `table`, as the
/// columns (and condition) they cover, sorted.
async fn secondary_indexes(client: &tokio_postgres::Client, models: &PgReadModels, table: &str) -> Vec<String> {
    let mut indexes: Vec<String> = client
        .query(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = $2 AND indexname NOT LIKE '%_pkey'",
            &[&models.schema(), &table],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| {
            let definition: String = row.get(0);
            definition
                .split_once(" USING btree ")
                .map_or(definition.clone(), |(_, covered)| covered.to_owned())
        })
        .collect();
    indexes.sort();
    indexes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pg_rebuild_indexes_its_generation_when_it_goes_live() {
    let Some(url) = url("a_pg_rebuild_indexes_its_generation_when_it_goes_live") else {
        return;
    };
    let store = event_store(&url).await;
    let events: Arc<dyn EventStore> = store.clone();
    let models = read_models(&url).await;
    Workload::new(events.clone()).random(300, 10, 5).await;
    let options = ProjectorOptions {
        batch_size: 16,
        ..ProjectorOptions::default()
    };
    let projector = PgProjector::new(events.clone(), models.clone()).with_options(options);
    projector.catch_up().await.unwrap();
    let client = raw_client(&url).await;
    let indexes = |generation: u32| {
        let (client, models) = (&client, &models);
        async move {
            [
                secondary_indexes(client, models, &format!("tickets_g{generation}")).await,
                secondary_indexes(client, models, &format!("stats_latency_g{generation}")).await,
            ]
        }
    };
    let expected = [
        vec![
            "(created_at, ticket_id)".to_owned(),
            "(lease_expires_at) WHERE (lease_expires_at IS NOT NULL)".to_owned(),
            "(state, state_entered_at, ticket_id)".to_owned(),
        ],
        vec!["(stage, ms)".to_owned()],
    ];
    // Made live at once: indexed from the start.
    assert_eq!(indexes(1).await, expected);

    // The rebuild stops after its first batch until the test has looked
    // at its generation: no indexes while it replays.
    let (reached, first_batch) = tokio::sync::oneshot::channel::<()>();
    let (resume, resumed) = std::sync::mpsc::channel::<()>();
    let mut reached = Some(reached);
    let options = RebuildOptions {
        progress: Some(Box::new(move |_| {
            if let Some(reached) = reached.take() {
                reached.send(()).unwrap();
                resumed.recv().unwrap();
            }
        })),
        ..RebuildOptions::default()
    };
    let rebuilding = tokio::spawn({
        let projector = projector.clone();
        async move { projector.rebuild_many(&["tickets", "stats"], options).await }
    });
    first_batch.await.unwrap();
    assert_eq!(indexes(2).await, [Vec::<String>::new(), Vec::new()]);
    resume.send(()).unwrap();
    let reports = rebuilding.await.unwrap().unwrap();
    assert!(reports.iter().all(|report| report.generation == 2), "{reports:?}");

    // Swapped in with them; the old generation went with its tables.
    assert_eq!(indexes(2).await, expected);
    assert_eq!(indexes(1).await, [Vec::<String>::new(), Vec::new()]);
    assert_equals_a_clean_rebuild(&url, &models, events.clone()).await;
}

/// A page's targets are applied at once on its transaction; two copies of
/// one would both read the old checkpoint and apply the page twice. A
/// projection named twice is rebuilt once, and equals a clean build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_named_twice_in_a_pg_rebuild_is_rebuilt_once() {
    let Some(url) = url("a_projection_named_twice_in_a_pg_rebuild_is_rebuilt_once") else {
        return;
    };
    let store = event_store(&url).await;
    let events: Arc<dyn EventStore> = store.clone();
    let models = read_models(&url).await;
    Workload::new(events.clone()).random(60, 10, 5).await;
    let options = ProjectorOptions {
        batch_size: 16,
        ..ProjectorOptions::default()
    };
    let projector = PgProjector::new(events.clone(), models.clone()).with_options(options);
    projector.catch_up().await.unwrap();
    let reports = projector
        .rebuild_many(&["stats", "tickets", "stats"], RebuildOptions::default())
        .await
        .unwrap();
    let names: Vec<&str> = reports.iter().map(|report| report.name.as_str()).collect();
    assert_eq!(names, ["stats", "tickets"]);
    assert_equals_a_clean_rebuild(&url, &models, events.clone()).await;
}

/// When one model's write fails, the other's statements in flight on the
/// same transaction fail with "current transaction is aborted"; the error
/// reported (and recorded) must be the one that caused it. Which of the
/// two fails first varies with timing, so the page is tried many times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pg_page_reports_the_statement_that_failed() {
    let Some(url) = url("a_failed_pg_page_reports_the_statement_that_failed") else {
        return;
    };
    let store = event_store(&url).await;
    let events: Arc<dyn EventStore> = store.clone();
    let models = read_models(&url).await;
    let mut workload = Workload::new(events.clone());
    workload.random(20, 10, 5).await;
    let projector = PgProjector::new(events.clone(), models.clone());
    let applied = projector.catch_up().await.unwrap();
    // No more rows into the live statistics' ticket table.
    raw_client(&url)
        .await
        .batch_execute(&format!(
            r#"ALTER TABLE "{}".stats_tickets_g1 ADD CONSTRAINT refuse_new_rows CHECK (false) NOT VALID"#,
            models.schema()
        ))
        .await
        .unwrap();
    workload.random(40, 10, 5).await;
    let mut failures = 0;
    for attempt in 0..200 {
        match projector.catch_up().await {
            Err(ProjectionError::Postgres { source, .. }) => {
                assert_eq!(
                    source.code(),
                    Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION),
                    "attempt {attempt}: {source}"
                );
                failures += 1;
                if failures == 30 {
                    return;
                }
            }
            // The failed attempt's session (and its leadership) was not
            // closed yet, so this one only followed: nothing was applied.
            Ok(position) => {
                assert_eq!(position, applied, "attempt {attempt} applied the page");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(other) => panic!("attempt {attempt}: expected the check violation, got {other:?}"),
        }
    }
    panic!("only {failures} of 200 attempts applied the page");
}

/// PostgreSQL's `text` cannot hold U+0000. The domain refuses it in new
/// commands, but an event stored before (or by another writer) must not
/// stop the read models for good: every catch-up would fail on its page,
/// and `stats` with it. The PostgreSQL models store U+FFFD instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_nul_character_does_not_stop_the_pg_read_models() {
    let Some(url) = url("a_stored_nul_character_does_not_stop_the_pg_read_models") else {
        return;
    };
    let store = event_store(&url).await;
    let events: Arc<dyn EventStore> = store.clone();
    let models = read_models(&url).await;
    let mut workload = Workload::new(events.clone());
    workload.random(30, 10, 5).await;
    // A ticket opened with a NUL in its subject, written to the log
    // directly: its opening event is a real one's with the ticket id and
    // the subject changed.
    let model = workload.open().await;
    let model_stream = triage_event_store::StreamName::new(model.stream_name()).unwrap();
    let opened = &events
        .read_stream(&model_stream, triage_event_store::ReadStream::forwards())
        .await
        .unwrap()[0];
    let ticket = triage_domain::TicketId::new();
    let data = String::from_utf8(opened.data.clone())
        .unwrap()
        .replace(&model.to_string(), &ticket.to_string())
        .replace("\"Ticket ", "\"Refund\\u0000please ");
    assert!(data.contains("\\u0000"), "{data}");
    events
        .append(
            &triage_event_store::StreamName::new(ticket.stream_name()).unwrap(),
            triage_event_store::ExpectedRevision::NoStream,
            vec![triage_event_store::EventData {
                id: uuid::Uuid::new_v4(),
                event_type: opened.event_type.clone(),
                data: data.into_bytes(),
                metadata: opened.metadata.clone(),
            }],
        )
        .await
        .unwrap();
    workload.random(30, 10, 6).await;

    let projector = PgProjector::new(events.clone(), models.clone());
    let (_, head) = projected_events(events.as_ref()).await;
    assert_eq!(projector.catch_up().await.unwrap(), head);
    let row = models
        .ticket(ticket)
        .await
        .unwrap()
        .expect("the ticket is in the model");
    assert!(
        row.ticket.subject.starts_with("Refund\u{FFFD}please "),
        "{:?}",
        row.ticket.subject
    );
    // The rest of the log was applied too, statistics included.
    let sqlite = sqlite_model(events.clone()).await;
    let listed = |rows: Vec<triage_projections::TicketRow>| rows.len();
    assert_eq!(
        listed(ReadModels::Postgres(projector).list(None, usize::MAX).await.unwrap()),
        listed(sqlite.list(None, usize::MAX).await.unwrap())
    );
}

/// The live model moves on while a rebuild replays (another instance
/// applies new events after the rebuild read its last page): the rebuild
/// catches up before swapping in, and the live model never moves back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_never_moves_the_live_model_back() {
    let Some(url) = url("a_swap_never_moves_the_live_model_back") else {
        return;
    };
    let store = event_store(&url).await;
    let events: Arc<dyn EventStore> = store.clone();
    let models = read_models(&url).await;
    let mut workload = Workload::new(events.clone());
    workload.random(200, 10, 8).await;
    let follower = PgProjector::new(events.clone(), models.clone()).with_instance("follower");
    follower.catch_up().await.unwrap();

    // When the rebuild has replayed everything there was, more is written
    // and applied to the live model by another instance, and only then
    // does the rebuild go on to its swap.
    let (progress, helper) = support::hold_at_head({
        let follower = follower.clone();
        async move {
            workload.random(100, 10, 9).await;
            follower.catch_up().await.unwrap();
        }
    });
    let operator = PgProjector::new(events.clone(), models.clone()).with_instance("operator");
    let reports = operator
        .rebuild_many(
            &["tickets", "stats"],
            RebuildOptions {
                progress: Some(Box::new(progress)),
                ..RebuildOptions::default()
            },
        )
        .await
        .unwrap();
    helper.await.unwrap();
    let (projected, head) = projected_events(events.as_ref()).await;
    for report in &reports {
        assert_eq!(report.events, projected, "the rebuild caught up: {report:?}");
    }
    // Nothing applies any more: what the swap left is what readers see.
    for status in operator.status().await.unwrap() {
        assert_eq!(status.checkpoint, head, "{status:?}");
        assert_eq!(status.events_applied, projected, "{status:?}");
    }
    assert_equals_a_clean_rebuild(&url, &models, events.clone()).await;
}

// ---------------------------------------------------------------------
// Child processes: killed by the parent tests below.

fn child_env() -> Option<(String, String, String, String)> {
    Some((
        std::env::var(URL_ENV).ok()?,
        std::env::var(EVENTS_SCHEMA_ENV).ok()?,
        std::env::var(MODELS_SCHEMA_ENV).ok()?,
        std::env::var(INSTANCE_ENV).unwrap_or_default(),
    ))
}

async fn child_projector(url: &str, events_schema: &str, models_schema: &str, batch_size: usize) -> PgProjector {
    let events: Arc<dyn EventStore> = Arc::new(
        PostgresEventStore::connect(url, PostgresOptions::in_schema(events_schema))
            .await
            .unwrap(),
    );
    let models = PgReadModels::connect(url, PgReadModelOptions::in_schema(models_schema))
        .await
        .unwrap();
    PgProjector::new(events, models).with_options(ProjectorOptions {
        batch_size,
        ..ProjectorOptions::default()
    })
}

#[test]
#[ignore = "child process of pg_projector_killed_between_batches_recovers_exactly_once; run by it"]
fn pg_child_catches_up_until_killed() {
    let Some((url, events_schema, models_schema, _)) = child_env() else {
        eprintln!("run by pg_projector_killed_between_batches_recovers_exactly_once only");
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let projector = child_projector(&url, &events_schema, &models_schema, 4).await;
        projector.catch_up().await.unwrap();
    });
}

#[test]
#[ignore = "child process of two_runners_one_applies_and_a_kill_hands_over; run by it"]
fn pg_child_runs_live_until_killed() {
    let Some((url, events_schema, models_schema, instance)) = child_env() else {
        eprintln!("run by two_runners_one_applies_and_a_kill_hands_over only");
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let projector = child_projector(&url, &events_schema, &models_schema, 16)
            .await
            .with_instance(instance);
        projector.run_live(Arc::new(AtomicBool::new(false))).await.unwrap();
    });
}

fn spawn_child(test: &str, url: &str, store: &PostgresEventStore, models: &PgReadModels, instance: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--ignored", "--nocapture", "--test-threads=1"])
        .env(URL_ENV, url)
        .env(EVENTS_SCHEMA_ENV, store.schema())
        .env(MODELS_SCHEMA_ENV, models.schema())
        .env(INSTANCE_ENV, instance)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the test binary re-executes itself")
}

/// A plain connection for watching the registry.
async fn raw_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// The live `tickets` row of the registry: checkpoint and recorded leader.
async fn registry(client: &tokio_postgres::Client, models: &PgReadModels, name: &str) -> (Option<u64>, Option<String>) {
    client
        .query_opt(
            &format!(
                r#"SELECT checkpoint_commit, leader FROM "{}".triage_read_models WHERE name = $1 AND slot = 'live'"#,
                models.schema()
            ),
            &[&name],
        )
        .await
        .unwrap()
        .map_or((None, None), |row| {
            (row.get::<_, Option<i64>>(0).map(|c| c as u64), row.get(1))
        })
}

fn kill(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn pg_projector_killed_between_batches_recovers_exactly_once() {
    let Some(url) = url("pg_projector_killed_between_batches_recovers_exactly_once") else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (store, models) = runtime.block_on(async { (event_store(&url).await, read_models(&url).await) });
    let events: Arc<dyn EventStore> = store.clone();
    let (projected, head) = runtime.block_on(async {
        let mut workload = Workload::new(events.clone());
        workload.random(1500, 12, 11).await;
        projected_events(events.as_ref()).await
    });
    let head = head.expect("the workload wrote events").commit;
    assert!(projected >= 800, "only {projected} events to project");

    // Kill the child at three growing checkpoints strictly inside the log.
    let watcher = runtime.block_on(raw_client(&url));
    let mut kills = Vec::new();
    for round in 1..=3u64 {
        let target = head * round / 4;
        let mut child = spawn_child(CATCH_UP_CHILD, &url, &store, &models, "crash");
        let started = Instant::now();
        let killed_at = loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the child finished ({status}) before it could be killed at {target} of {head}");
            }
            match runtime.block_on(registry(&watcher, &models, "tickets")).0 {
                Some(checkpoint) if checkpoint >= target && checkpoint < head => {
                    kill(&mut child);
                    break checkpoint;
                }
                _ => {}
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the child made no progress"
            );
            std::thread::sleep(Duration::from_millis(1));
        };
        let after = runtime
            .block_on(registry(&watcher, &models, "tickets"))
            .0
            .expect("a checkpoint survives the kill");
        assert!(
            after >= killed_at && after < head,
            "checkpoint {after} after a kill at {killed_at}"
        );
        eprintln!("kill {round}: checkpoint {after} of {head}");
        kills.push(after);
    }
    assert_eq!(kills.len(), 3);

    runtime.block_on(async {
        let projector = PgProjector::new(events.clone(), models.clone());
        projector.catch_up().await.unwrap();
        for status in projector.status().await.unwrap() {
            assert_eq!(
                status.events_applied, projected,
                "{}: events applied after kills at {kills:?}",
                status.name
            );
            assert_eq!(status.checkpoint.map(|c| c.commit), Some(head));
            assert!(status.last_error.is_none(), "{status:?}");
        }
        let [tickets, stats] = clean_pg_digests(&url, events.clone()).await;
        assert_eq!(models.digest("tickets").await.unwrap(), tickets);
        assert_eq!(models.digest("stats").await.unwrap(), stats);
        // The model's own count agrees: no batch was applied twice.
        let summary = models.stats_summary().await.unwrap();
        assert_eq!(summary.counters.get("events"), Some(&projected));
        assert_same_answers(&ReadModels::Postgres(projector), &sqlite_model(events.clone()).await).await;
    });
}

#[test]
fn two_runners_one_applies_and_a_kill_hands_over() {
    let Some(url) = url("two_runners_one_applies_and_a_kill_hands_over") else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (store, models) = runtime.block_on(async { (event_store(&url).await, read_models(&url).await) });
    let events: Arc<dyn EventStore> = store.clone();
    let observer = PgProjector::new(events.clone(), models.clone());
    let watcher = runtime.block_on(raw_client(&url));
    let mut workload = Workload::new(events.clone());
    runtime.block_on(workload.random(300, 10, 21));

    // Both projections led by A, and caught up.
    let mut a = spawn_child(RUNNER_CHILD, &url, &store, &models, "runner-a");
    let wait_for = |what: &str, leader: &str, timeout: Duration| -> Duration {
        let started = Instant::now();
        loop {
            let head = runtime.block_on(events.head_position()).unwrap();
            let statuses = runtime.block_on(observer.status()).unwrap();
            if statuses
                .iter()
                .all(|status| status.leader.as_deref() == Some(leader) && status.checkpoint == head)
            {
                return started.elapsed();
            }
            assert!(started.elapsed() < timeout, "{what}: {statuses:#?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("runner A leads and catches up", "runner-a", Duration::from_secs(60));

    // B starts and keeps trying; it must apply nothing while A lives.
    let mut b = spawn_child(RUNNER_CHILD, &url, &store, &models, "runner-b");
    let b_connected = || {
        runtime
            .block_on(watcher.query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'triage-projector runner-b'",
                &[],
            ))
            .unwrap()
            .get::<_, i64>(0)
            > 0
    };
    let started = Instant::now();
    while !b_connected() {
        assert!(started.elapsed() < Duration::from_secs(60), "runner B never connected");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut polls = 0;
    let writes = std::thread::scope(|scope| {
        let watch = scope.spawn(|| {
            let started = Instant::now();
            // Both runners live for well over B's retry interval.
            while started.elapsed() < Duration::from_secs(3) {
                for name in ["tickets", "stats"] {
                    let (_, leader) = runtime.block_on(registry(&watcher, &models, name));
                    assert_eq!(
                        leader.as_deref(),
                        Some("runner-a"),
                        "{name} was applied by another runner"
                    );
                }
                polls += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        runtime.block_on(workload.random(300, 10, 22));
        watch.join().unwrap();
        workload.accepted
    });
    assert!(polls > 50 && writes > 0, "{polls} polls, {writes} commands");
    wait_for("runner A applies the new events", "runner-a", Duration::from_secs(60));
    assert!(
        b.try_wait().unwrap().is_none(),
        "runner B is still running, as a follower"
    );

    // SIGKILL A: B takes over within seconds, and applies what follows.
    kill(&mut a);
    runtime.block_on(workload.random(300, 10, 23));
    let takeover = wait_for("runner B takes over", "runner-b", Duration::from_secs(15));
    eprintln!("runner B led and had caught up {takeover:?} after runner A was killed");
    assert!(takeover < Duration::from_secs(10), "take-over took {takeover:?}");
    kill(&mut b);

    runtime.block_on(async {
        let (projected, _) = projected_events(events.as_ref()).await;
        for status in observer.status().await.unwrap() {
            assert_eq!(
                status.events_applied, projected,
                "exactly once across the hand-over: {status:?}"
            );
        }
        // B's session, and with it its leadership, ended with the process.
        let started = Instant::now();
        while observer
            .status()
            .await
            .unwrap()
            .iter()
            .any(|status| status.leader.is_some())
        {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "a killed runner still leads"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let [tickets, stats] = clean_pg_digests(&url, events.clone()).await;
        assert_eq!(
            models.digest("tickets").await.unwrap(),
            tickets,
            "tickets equal a clean rebuild"
        );
        assert_eq!(
            models.digest("stats").await.unwrap(),
            stats,
            "stats equal a clean rebuild"
        );
        assert_same_answers(
            &ReadModels::Postgres(observer.clone()),
            &sqlite_model(events.clone()).await,
        )
        .await;
    });
}

/// `rebuild --verify` when the live model was built by another version of
/// the projection (as after an upgrade): its tables are not replayed with
/// this version's code or compared; the report says so, and the rebuild
/// swaps in a model equal to a clean one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_of_a_model_from_another_version_compares_nothing_and_swaps_in() {
    let Some(url) = url("verify_of_a_model_from_another_version_compares_nothing_and_swaps_in") else {
        return;
    };
    let store = event_store(&url).await;
    let events: Arc<dyn EventStore> = store.clone();
    let models = read_models(&url).await;
    let projector = PgProjector::new(events.clone(), models.clone());
    let mut workload = Workload::new(events.clone());
    workload.random(200, 10, 3).await;
    projector.catch_up().await.unwrap();
    workload.random(200, 10, 4).await;
    // The live model was built by an older version, and is behind.
    raw_client(&url)
        .await
        .execute(
            &format!(
                r#"UPDATE "{}".triage_read_models SET version = 0 WHERE name = 'stats' AND slot = 'live'"#,
                models.schema()
            ),
            &[],
        )
        .await
        .unwrap();
    let report = projector
        .rebuild(
            "stats",
            RebuildOptions {
                verify: true,
                ..RebuildOptions::default()
            },
        )
        .await
        .unwrap();
    let differences = report.differences.expect("verified");
    assert!(
        matches!(differences.as_slice(), [note] if note.contains("version 0") && note.contains("nothing to compare")),
        "{differences:?}"
    );
    let status = status_of(&projector.status().await.unwrap(), "stats");
    assert_eq!(status.generation, Some(2), "{status:?}");
    assert!(!status.build_in_progress, "{status:?}");
    let [_, stats] = clean_pg_digests(&url, events.clone()).await;
    assert_eq!(models.digest("stats").await.unwrap(), stats);

    // A build row that no rebuild holds (one left by a killed rebuild) is
    // not a rebuild in progress.
    let registry = format!(r#""{}".triage_read_models"#, models.schema());
    raw_client(&url)
        .await
        .batch_execute(&format!(
            "CREATE TEMP TABLE abandoned AS SELECT * FROM {registry} WHERE name = 'stats' AND slot = 'live';
             UPDATE abandoned SET slot = 'build', generation = generation + 1;
             INSERT INTO {registry} SELECT * FROM abandoned;"
        ))
        .await
        .unwrap();
    let status = status_of(&projector.status().await.unwrap(), "stats");
    assert!(!status.build_in_progress, "nobody holds the build: {status:?}");
}

/// A rolling upgrade: a newer Triage swapped in a generation of a newer
/// version of `tickets` (simulated here by its registry row) while this
/// instance leads. This instance must stop instead of writing into it, and
/// its next start must not rebuild it back to its own version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_pg_leader_leaves_a_newer_model_alone() {
    let Some(url) = url("an_older_pg_leader_leaves_a_newer_model_alone") else {
        return;
    };
    let store = event_store(&url).await;
    let events: Arc<dyn EventStore> = store.clone();
    let models = read_models(&url).await;
    let projector = PgProjector::new(events.clone(), models.clone());
    let mut workload = Workload::new(events.clone());
    workload.random(100, 10, 3).await;
    projector.catch_up().await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let leading = tokio::spawn({
        let projector = projector.clone();
        let stop = stop.clone();
        async move { projector.run_live(stop).await }
    });
    let code = status_of(&projector.status().await.unwrap(), "tickets").code_version;
    let newer = code + 1;
    raw_client(&url)
        .await
        .execute(
            &format!(
                r#"UPDATE "{}".triage_read_models SET version = $1 WHERE name = 'tickets' AND slot = 'live'"#,
                models.schema()
            ),
            &[&(newer as i32)],
        )
        .await
        .unwrap();
    workload.random(100, 10, 4).await;
    let stopped = tokio::time::timeout(Duration::from_secs(15), leading)
        .await
        .expect("the older leader stops")
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let error = stopped.expect_err("the older leader must not apply to the newer model");
    assert!(
        matches!(error, ProjectionError::OtherVersion { live, code: ours, .. } if live == newer && ours == code),
        "{error:?}"
    );
    let before = status_of(&projector.status().await.unwrap(), "tickets");
    let restarted = PgProjector::new(events.clone(), models.clone());
    assert!(matches!(
        restarted.catch_up().await,
        Err(ProjectionError::OtherVersion { .. })
    ));
    let after = status_of(&restarted.status().await.unwrap(), "tickets");
    assert_eq!(
        (after.generation, after.live_version, after.events_applied),
        (before.generation, Some(newer), before.events_applied)
    );
    assert!(!after.needs_rebuild, "a newer model needs a newer Triage: {after:?}");
    // Nor does an older rebuild take the model back, unless told to.
    let error = restarted
        .rebuild("tickets", RebuildOptions::default())
        .await
        .expect_err("an older rebuild replaced a newer model");
    assert!(
        matches!(error, ProjectionError::OtherVersion { live, .. } if live == newer),
        "{error:?}"
    );
    let unchanged = status_of(&restarted.status().await.unwrap(), "tickets");
    assert_eq!(
        (unchanged.generation, unchanged.live_version),
        (after.generation, Some(newer))
    );
    restarted
        .rebuild(
            "tickets",
            RebuildOptions {
                replace_newer: true,
                ..RebuildOptions::default()
            },
        )
        .await
        .unwrap();
    let replaced = status_of(&restarted.status().await.unwrap(), "tickets");
    assert_eq!(replaced.live_version, Some(code));
}

/// The log replaced under the read models (an event store schema dropped
/// and made anew, or the models pointed at another store): positions start
/// at 1 again, so once the new log is as long the checkpoint looks current.
/// The models must be rebuilt from the new log, not mix the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_read_models_of_a_replaced_log_are_rebuilt_from_it() {
    let Some(url) = url("pg_read_models_of_a_replaced_log_are_rebuilt_from_it") else {
        return;
    };
    let models = read_models(&url).await;
    let old_store = event_store(&url).await;
    let old: Arc<dyn EventStore> = old_store.clone();
    Workload::new(old.clone()).random(100, 10, 3).await;
    let old_head = PgProjector::new(old.clone(), models.clone()).catch_up().await.unwrap();

    let new_store = event_store(&url).await;
    let new: Arc<dyn EventStore> = new_store.clone();
    Workload::new(new.clone()).random(300, 10, 4).await;
    let (_, new_head) = projected_events(new.as_ref()).await;
    assert!(
        new_head > old_head,
        "the new log is longer: {new_head:?} against {old_head:?}"
    );

    let projector = PgProjector::new(new.clone(), models.clone());
    assert_eq!(projector.catch_up().await.unwrap(), new_head);
    let [tickets, stats] = clean_pg_digests(&url, new.clone()).await;
    assert_eq!(
        models.digest("tickets").await.unwrap(),
        tickets,
        "tickets of the new log only"
    );
    assert_eq!(
        models.digest("stats").await.unwrap(),
        stats,
        "stats of the new log only"
    );
}

/// Read models of a log met with an empty event store (dropped, or the
/// wrong one named): refused, saying so, and left as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_read_models_beside_an_empty_store_are_refused_and_kept() {
    let Some(url) = url("pg_read_models_beside_an_empty_store_are_refused_and_kept") else {
        return;
    };
    let models = read_models(&url).await;
    let old: Arc<dyn EventStore> = event_store(&url).await;
    Workload::new(old.clone()).random(20, 5, 7).await;
    PgProjector::new(old.clone(), models.clone()).catch_up().await.unwrap();
    let before = models.digest("tickets").await.unwrap();

    let empty: Arc<dyn EventStore> = event_store(&url).await;
    let refused = PgProjector::new(empty, models.clone()).catch_up().await;
    match refused {
        Err(error @ ProjectionError::EmptyLog { .. }) => {
            assert!(error.to_string().contains("the event store is empty"), "{error}");
        }
        other => panic!("expected EmptyLog, got {other:?}"),
    }
    assert_eq!(models.digest("tickets").await.unwrap(), before, "left as they were");
}

/// As on SQLite: a rebuild that fails after making its shadow tables drops
/// them again.
#[tokio::test]
async fn a_rebuild_that_fails_after_its_shadow_tables_leaves_no_build_behind() {
    let Some(url) = url("a_rebuild_that_fails_after_its_shadow_tables_leaves_no_build_behind") else {
        return;
    };
    let store = event_store(&url).await;
    let events: Arc<dyn EventStore> = store.clone();
    let models = read_models(&url).await;
    Workload::new(events.clone()).random(50, 10, 32).await;
    let live = PgProjector::new(events.clone(), models.clone());
    live.catch_up().await.unwrap();
    let failing = PgProjector::new(
        Arc::new(triage_event_store::testing::CountingStore::new(events.clone()).failing_head_position()),
        models.clone(),
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

/// A one-shot catch-up that finds the projections led by another session
/// takes them over when that session ends while it waits (a leader just
/// killed, whose session the server had not closed yet), instead of
/// waiting out its deadline for a leader that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_takes_over_from_a_leader_that_goes_away_while_it_waits() {
    let Some(url) = url("a_catch_up_takes_over_from_a_leader_that_goes_away_while_it_waits") else {
        return;
    };
    let store = event_store(&url).await;
    let events: Arc<dyn EventStore> = store.clone();
    let models = read_models(&url).await;
    let projector = PgProjector::new(events.clone(), models.clone());
    let mut workload = Workload::new(events.clone());
    workload.random(100, 5, 21).await;
    projector.catch_up().await.unwrap();

    // Another session leads both projections (the runtime's lock class
    // and keys), applies nothing, and goes away after a second.
    let leader = raw_client(&url).await;
    for name in ["tickets", "stats"] {
        leader
            .execute(
                "SELECT pg_advisory_lock($1, hashtext($2))",
                &[&0x5452_524C_i32, &format!("{}/{name}/live", models.schema())],
            )
            .await
            .unwrap();
    }
    workload.random(100, 5, 22).await;
    let (_, head) = projected_events(events.as_ref()).await;
    let gone = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(leader);
    });
    let reached = projector.catch_up().await.unwrap();
    gone.await.unwrap();
    assert_eq!(
        reached, head,
        "the catch-up took the projections over and applied the log"
    );
}

/// `url` with its user (and password) replaced by `user`.
fn as_user(url: &str, user: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let host_part = match rest[..authority_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    Some(format!("{scheme}://{user}@{host_part}"))
}

/// The servers run as a role that owns the read models; an administrator
/// (here the test's superuser) rebuilds them. The new generation stays the
/// owner's: the owner's projector and queries go on working. They failed
/// with "permission denied for table tickets_g2" when the tables were the
/// administrator's. A role granted only reads opens the models and
/// catches up by reading what was applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_a_rebuild_by_an_administrator_keeps_the_models_the_owners() {
    let test = "pg_a_rebuild_by_an_administrator_keeps_the_models_the_owners";
    let Some(url) = url(test) else {
        return;
    };
    let admin = raw_client(&url).await;
    let is_superuser: bool = admin
        .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = current_user", &[])
        .await
        .unwrap()
        .get(0);
    let role = format!("triage_owner_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let (Some(role_url), true) = (as_user(&url, &role), is_superuser) else {
        eprintln!("skipped: {test} (TRIAGE_PG_URL is not a superuser's postgres:// URL)");
        return;
    };
    let schema = format!("triage_rm_owned_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let store = event_store(&url).await;
    let events: Arc<dyn EventStore> = store.clone();
    let mut workload = Workload::new(events.clone());
    workload.random(150, 5, 31).await;
    let database: String = admin
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    admin
        .batch_execute(&format!(
            r#"CREATE ROLE "{role}" LOGIN; GRANT CREATE ON DATABASE "{database}" TO "{role}";"#
        ))
        .await
        .unwrap();

    // Panics (a failed assertion) are caught and raised again after the
    // cleanup below, so that a failure leaves no roles behind on the
    // server: roles are the cluster's, not the database's.
    let result = std::panic::AssertUnwindSafe(async {
        // The owner sets the read models up and keeps them.
        let owned = PgReadModels::connect(&role_url, PgReadModelOptions::in_schema(&schema)).await?;
        let owner = PgProjector::new(events.clone(), owned.clone());
        owner.catch_up().await?;
        // Models set up before the log identity table existed get it from
        // whoever opens them first: here the administrator, who must make
        // it as the owner (as itself, the owner's servers failed on it).
        admin
            .batch_execute(&format!(r#"DROP TABLE "{schema}".triage_read_log"#))
            .await
            .unwrap();
        // The administrator rebuilds both.
        let administered = PgReadModels::connect(&url, PgReadModelOptions::in_schema(&schema)).await?;
        let reports = PgProjector::new(events.clone(), administered)
            .rebuild_many(&["tickets", "stats"], RebuildOptions::default())
            .await?;
        assert!(reports.iter().all(|report| report.generation == 2), "{reports:?}");
        // The owner goes on: applies new events and answers queries.
        workload.random(50, 5, 32).await;
        let reached = owner.catch_up().await?;
        let (_, head) = projected_events(events.as_ref()).await;
        assert_eq!(reached, head);
        let counted: u64 = ReadModels::Postgres(owner.clone()).counts().await?.values().sum();
        assert!(counted > 0);
        // A role that may only read them opens them: nothing is created
        // when everything is there (it failed on "permission denied for
        // schema", creating the log identity table that existed).
        admin
            .batch_execute(&format!(
                r#"CREATE ROLE "{role}_ro" LOGIN; GRANT USAGE ON SCHEMA "{schema}" TO "{role}_ro";
                   GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{role}_ro";"#
            ))
            .await
            .unwrap();
        let reader_url = as_user(&url, &format!("{role}_ro")).unwrap();
        let read_only = PgReadModels::connect(&reader_url, PgReadModelOptions::in_schema(&schema)).await?;
        // With events no leader applied yet, its catch-up reads what is
        // there (after waiting for a leader) instead of failing on its
        // first write ("permission denied for table …").
        let before = owner.catch_up().await?;
        workload.random(20, 5, 33).await;
        let reader = PgProjector::new(events.clone(), read_only);
        assert_eq!(reader.catch_up().await?, before, "what the owner applied");
        let listed: u64 = ReadModels::Postgres(reader.clone()).counts().await?.values().sum();
        assert!(listed >= counted, "{listed} < {counted}");
        // A role that may write them but not act as their owner is refused
        // a rebuild before it replays anything: its swap could not replace
        // the owner's views (it failed there, after the whole replay).
        admin
            .batch_execute(&format!(
                r#"CREATE ROLE "{role}_other" LOGIN; GRANT USAGE, CREATE ON SCHEMA "{schema}" TO "{role}_other";
                   GRANT ALL ON ALL TABLES IN SCHEMA "{schema}" TO "{role}_other";"#
            ))
            .await
            .unwrap();
        let other_url = as_user(&url, &format!("{role}_other")).unwrap();
        let other = PgReadModels::connect(&other_url, PgReadModelOptions::in_schema(&schema)).await?;
        let refused = PgProjector::new(events.clone(), other)
            .rebuild_many(&["tickets"], RebuildOptions::default())
            .await
            .expect_err("a rebuild by a role that may not act as the owner");
        assert!(matches!(refused, ProjectionError::NotOwner { .. }), "{refused:?}");
        assert!(refused.to_string().contains(&role), "{refused}");
        // A rebuild replaces the views. What was granted on them is granted
        // on the new ones, so the reader goes on reading (it got
        // "permission denied for view tickets" after every rebuild).
        let granted = view_privileges(&admin, &schema).await;
        assert!(
            granted
                .iter()
                .any(|(_, grantee, privilege, _)| *grantee == format!("{role}_ro") && privilege == "SELECT"),
            "{granted:?}"
        );
        admin
            .batch_execute(&format!(
                r#"GRANT SELECT ON "{schema}".stats_counters TO PUBLIC;
                   GRANT SELECT ON "{schema}".tickets TO "{role}_other" WITH GRANT OPTION;"#
            ))
            .await
            .unwrap();
        let granted = view_privileges(&admin, &schema).await;
        let reports = owner
            .rebuild_many(&["tickets", "stats"], RebuildOptions::default())
            .await?;
        assert!(reports.iter().all(|report| report.generation == 3), "{reports:?}");
        assert_eq!(view_privileges(&admin, &schema).await, granted);
        let relisted: u64 = ReadModels::Postgres(reader).counts().await?.values().sum();
        assert!(relisted >= listed, "{relisted} < {listed}");
        Ok::<_, ProjectionError>(())
    })
    .catch_unwind()
    .await;
    let foreign: Result<Vec<String>, _> = admin
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_roles r ON r.oid = c.relowner WHERE n.nspname = $1 AND r.rolname <> $2",
            &[&schema, &role],
        )
        .await
        .map(|rows| rows.iter().map(|row| row.get(0)).collect());
    admin
        .batch_execute(&format!(
            r#"DROP SCHEMA IF EXISTS "{schema}" CASCADE; DROP OWNED BY "{role}"; DROP ROLE "{role}";
               DROP ROLE IF EXISTS "{role}_ro"; DROP ROLE IF EXISTS "{role}_other";"#
        ))
        .await
        .unwrap();
    let result = result.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    result.expect("the owner's read models keep working after the administrator's rebuild");
    let foreign = foreign.expect("the owners of the models' tables are listed");
    assert!(foreign.is_empty(), "objects not the owner's: {foreign:?}");
}

/// Every privilege granted on the views of `schema`: view, grantee
/// (`PUBLIC` for everyone), privilege, and whether it may be granted on.
async fn view_privileges(raw: &tokio_postgres::Client, schema: &str) -> Vec<(String, String, String, bool)> {
    raw.query(
        "SELECT c.relname::text, CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee)::text END, \
         a.privilege_type, a.is_grantable \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a \
         WHERE n.nspname = $1 AND c.relkind = 'v' ORDER BY 1, 2, 3",
        &[&schema],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
    .collect()
}

/// Whether each session named `application_name` is encrypted.
async fn encrypted_sessions(raw: &tokio_postgres::Client, application_name: &str) -> Vec<bool> {
    raw.query(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1",
        &[&application_name],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| row.get(0))
    .collect()
}

/// The read models' pool and the projector's leadership session both
/// connect as the URL's `sslmode` says, and a verifying mode refuses a
/// server whose certificate no trusted root signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_models_and_leadership_sessions_follow_the_urls_sslmode() {
    let test = "read_models_and_leadership_sessions_follow_the_urls_sslmode";
    let Some(url) = url(test) else { return };
    let raw = raw_client(&url).await;
    let ssl: String = raw.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    if ssl != "on" {
        eprintln!("skipped: {test} (the server at {URL_ENV} has ssl = off)");
        return;
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let application_name = format!("triage-rm-tls-{tag}");
    let models = read_models(&format!(
        "{url}{separator}sslmode=require&application_name={application_name}"
    ))
    .await;
    let events = event_store(&url).await;
    let instance = format!("tls-{tag}");
    let projector = PgProjector::new(events.clone(), models.clone()).with_instance(&instance);
    let stop = Arc::new(AtomicBool::new(false));
    let live = tokio::spawn({
        let (projector, stop) = (projector.clone(), stop.clone());
        async move { projector.run_live(stop).await }
    });
    let leader = format!("triage-projector {instance}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut leadership = encrypted_sessions(&raw, &leader).await;
    while leadership.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        leadership = encrypted_sessions(&raw, &leader).await;
    }
    let pooled = encrypted_sessions(&raw, &application_name).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    live.await.unwrap().unwrap();
    assert!(
        !pooled.is_empty() && pooled.iter().all(|&ssl| ssl),
        "read-model sessions: {pooled:?}"
    );
    assert!(
        !leadership.is_empty() && leadership.iter().all(|&ssl| ssl),
        "leadership sessions: {leadership:?}"
    );

    // A root that signed nothing (the store's TLS tests keep it).
    let unrelated =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../stores/postgres/tests/data/unrelated-ca.pem");
    let root = unrelated.display().to_string().replace('/', "%2F");
    let refused = PgReadModels::connect_temporary(
        &format!("{url}{separator}sslmode=verify-full&sslrootcert={root}"),
        PgReadModelOptions::default(),
    )
    .await
    .expect_err("a certificate no trusted root signed was accepted");
    let message = refused.to_string();
    assert!(message.contains("invalid peer certificate: UnknownIssuer"), "{message}");
    // A setup problem, not an outage that a retry would get past.
    assert!(!refused.is_unavailable(), "{message}");
}
