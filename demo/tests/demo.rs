//! The demo runs in the test suite: a small Triage run must pass its audit,
//! and the naive baseline, run at the same time, is measured by the same
//! auditor.

use std::sync::Arc;

use triage_demo::{DemoConfig, DemoReport};
use triage_event_store::EventStore;
use triage_projections::{ProjectorOptions, ReadModelDb};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions};

fn small() -> DemoConfig {
    DemoConfig {
        tickets: 24,
        seed: 3,
        time_scale: 0.002,
        // Failures are more frequent than by default, so that a small run
        // still exercises every hazard.
        crash_rate: 0.08,
        timeout_rate: 0.08,
        invalid_rate: 0.08,
        retry_rate: 0.3,
        max_seconds: 60.0,
        ..DemoConfig::default()
    }
}

async fn triage_run(config: DemoConfig) -> DemoReport {
    let store = SqliteEventStore::open_temporary_with(SqliteOptions::default()).unwrap();
    let read_models = ReadModelDb::open(store.path().with_file_name("read.db")).unwrap();
    let store: Arc<dyn EventStore> = Arc::new(store);
    triage_demo::run_triage(store, read_models, ProjectorOptions::default(), config, |_| {})
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_demo_resolves_every_ticket_and_passes_its_audit() {
    let report = triage_run(small()).await;
    assert!(report.completed, "resolved {} of {}", report.resolved, report.tickets);
    assert!(report.audit_passed, "audit failed: {:?}", report.findings);
    assert_eq!(
        (
            report.lost_updates,
            report.invalid_transitions,
            report.duplicate_events,
            report.missing_events
        ),
        (0, 0, 0, 0)
    );
    assert!(report.read_model_matches_rebuild);
    assert_eq!(report.late_writes_accepted, 0, "a late write got through");
    assert_eq!(report.duplicates_applied, 0, "a retry was applied twice");
    // The hazards were really exercised.
    assert!(report.tasks >= report.tickets as u64 * 3, "{report:?}");
    assert!(
        report.late_writes_attempted > 0 && report.retries_sent > 0,
        "{report:?}"
    );
    assert_eq!(report.late_writes_rejected, report.late_writes_attempted);
    assert_eq!(report.duplicates_suppressed, report.retries_sent);
    assert!(report.claims_expired > 0, "{report:?}");
    // Tickets, not claims: a ticket may lose several claims. Every ticket
    // was resolved, so every one that lost a claim was too.
    assert!(
        (1..=report.claims_expired as usize).contains(&report.tickets_with_expired_claims),
        "{report:?}"
    );
    assert_eq!(report.claims_recovered, report.tickets_with_expired_claims);
    assert!(report.latency_p99_ms as f64 >= report.latency_mean_ms && report.latency_mean_ms > 0.0);
    // The rate counts the agents' events only: the intake's are written
    // before the clock starts.
    assert_eq!(report.intake_events, report.tickets, "one TicketOpened per ticket");
    let agents_events = (report.events - report.intake_events) as f64;
    assert!(
        (report.events_per_s * report.wall_s - agents_events).abs() < 1.0,
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_naive_design_is_measured_by_the_same_auditor() {
    let config = small();
    let (triage, naive) = tokio::join!(triage_run(config), triage_demo::run_naive(config, |_| {}));
    let naive = naive.unwrap();
    assert_eq!(naive.design, "naive");
    assert_eq!(naive.tickets, config.tickets);
    assert!(
        naive.events > 0 && naive.tasks > 0,
        "the naive agents worked: {naive:?}"
    );
    // The counts vary with scheduling; what must hold is that the verdict
    // follows from them.
    let clean = naive.lost_updates == 0
        && naive.invalid_transitions == 0
        && naive.duplicate_events == 0
        && naive.missing_events == 0
        && naive.read_model_matches_rebuild;
    assert_eq!(naive.audit_passed, clean, "{naive:?}");
    assert_eq!(
        naive.findings.is_empty(),
        naive.lost_updates + naive.invalid_transitions + naive.duplicate_events + naive.missing_events == 0
    );
    assert!(triage.audit_passed, "{:?}", triage.findings);
}

/// A run that `max_seconds` must end unfinished: it ends within `within`,
/// and what it did passes its audit.
async fn bounded_run(config: DemoConfig, within: std::time::Duration) -> DemoReport {
    let started = std::time::Instant::now();
    let report = triage_run(config).await;
    let took = started.elapsed();
    assert!(took < within, "the run took {took:?}");
    assert!(!report.completed, "{report:?}");
    assert!(report.audit_passed, "{:?}", report.findings);
    report
}

/// `--max-seconds` bounds the run even while agents sit in simulated
/// timeouts far longer than it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_seconds_ends_a_run_with_agents_asleep_in_timeouts() {
    let config = DemoConfig {
        // A timed-out model call sleeps past the lease: over 7 real s here.
        lease_secs: 3600,
        timeout_rate: 0.5,
        crash_rate: 0.0,
        invalid_rate: 0.0,
        max_seconds: 1.0,
        ..small()
    };
    let report = bounded_run(config, std::time::Duration::from_secs(5)).await;
    assert!(report.failures.timeouts > 0, "{report:?}");
}

/// `--max-seconds` bounds the opening of the tickets too: far more tickets
/// than the store can open in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_seconds_also_bounds_the_intake() {
    let config = DemoConfig {
        tickets: 200_000,
        max_seconds: 0.5,
        ..small()
    };
    // Opening 200,000 tickets alone takes far longer than this here.
    let report = bounded_run(config, std::time::Duration::from_secs(15)).await;
    assert!(
        report.intake_events > 0 && report.intake_events < 200_000,
        "opened {} tickets",
        report.intake_events
    );
}

/// A bound further off than the clock can count is no bound, not a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_max_seconds_beyond_the_clock_is_no_bound() {
    let report = triage_run(DemoConfig {
        max_seconds: 1e300,
        ..small()
    })
    .await;
    assert!(report.completed, "resolved {} of {}", report.resolved, report.tickets);
}

#[tokio::test]
async fn nonsense_configurations_are_refused() {
    let config = DemoConfig {
        crash_rate: 0.7,
        timeout_rate: 0.7,
        ..small()
    };
    let error = triage_demo::run_naive(config, |_| {}).await.unwrap_err();
    assert!(
        error.to_string().contains("failure rates must add up to at most 1"),
        "{error}"
    );
    // Each of these would run without ever finishing.
    for (config, says) in [
        (
            DemoConfig {
                lease_secs: 100_000,
                ..small()
            },
            "above the policy's longest lease",
        ),
        (
            DemoConfig {
                operators: 0,
                ..small()
            },
            "at least one operator",
        ),
        (
            DemoConfig {
                max_seconds: f64::NAN,
                ..small()
            },
            "--max-seconds must be a positive number",
        ),
    ] {
        let error = triage_demo::run_naive(config, |_| {}).await.unwrap_err();
        assert!(error.to_string().contains(says), "{error}");
    }
}

/// The demo audits its own tickets only: in a store shared with other
/// tickets it reads the run's own streams, and another ticket's stream,
/// even one holding a record no Triage build can read, is not read.
#[tokio::test]
async fn the_audit_reads_only_the_tickets_it_is_given() {
    use triage_command_handler::CommandHandler;
    use triage_domain::{Agent, Command, CommandEnvelope, Role, TicketId};
    use triage_event_store::{EventData, ExpectedRevision, InMemoryEventStore, StreamName};

    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let handler = CommandHandler::new(store.clone());
    let mut opened = Vec::new();
    for subject in ["Printer on fire", "Invoice twice"] {
        let envelope = CommandEnvelope::new(
            TicketId::new(),
            Agent::new("intake-1", Role::Intake),
            Command::OpenTicket {
                subject: subject.into(),
                body: "Help.".into(),
                customer: None,
            },
        );
        opened.push(envelope.ticket_id);
        handler.handle(envelope).await.unwrap();
    }
    let foreign = TicketId::new();
    store
        .append(
            &StreamName::new(foreign.stream_name()).unwrap(),
            ExpectedRevision::NoStream,
            vec![EventData {
                id: uuid::Uuid::new_v4(),
                event_type: "TicketOpened".into(),
                data: b"not json".to_vec(),
                metadata: b"{}".to_vec(),
            }],
        )
        .await
        .unwrap();
    // The whole store cannot be read back; its own tickets can.
    assert!(triage_demo::audit::logs_from_store(store.as_ref()).await.is_err());
    let never_written = TicketId::new();
    let logs = triage_demo::audit::logs_of_tickets(store.clone(), &[opened[1], never_written])
        .await
        .unwrap();
    assert_eq!(logs.keys().copied().collect::<Vec<_>>(), vec![opened[1]]);
    let log = &logs[&opened[1]];
    assert_eq!(log.len(), 1);
    assert!(
        matches!(&log[0].event, triage_domain::Event::TicketOpened { subject, .. } if subject == "Invoice twice"),
        "{log:?}"
    );
    assert_eq!(log[0].seen, 0);
}
