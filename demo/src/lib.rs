//! `triage demo`: simulated agents work support tickets end to end, then an
//! auditor checks the outcome from the write log alone.
//!
//! # Layout
//! - [`workload`]: realistic tickets, deterministic from a seed.
//! - `sim`: the agents (classifiers, drafters, escalators, a human
//!   operator) and the lease sweeper, on a [`ScaledClock`] so that LLM calls
//!   of seconds and leases of a minute fit in a short run.
//! - `backend`: the two designs the same agents can work against: Triage,
//!   and the naive shared record with read-modify-write and no revision
//!   check.
//! - [`audit`]: one auditor for both designs.
//!
//! # Main decision
//! The agents are the same code for both designs and make the same random
//! choices from the same seed; only the backend differs. The numbers in the
//! naive column are what the auditor counts in that design's write log,
//! never asserted or estimated.

pub mod audit;
mod backend;
mod sim;
pub mod workload;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use triage_command_handler::{CommandHandler, RetryPolicy};
use triage_domain::{Agent, Command, CommandEnvelope, Event, Policy, Role, State, Ticket, TicketId};
use triage_event_store::EventStore;
use triage_projections::{Projector, ProjectorOptions, ReadModelDb, RebuildOptions};

pub use sim::ScaledClock;

use crate::audit::LoggedEvent;
use crate::backend::{Backend, NaiveBackend, Snapshot, TriageBackend};
use crate::sim::{Counters, Shared};

/// What the demo runs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct DemoConfig {
    /// Tickets to work.
    pub tickets: usize,
    /// Seed of the tickets and of every agent's choices.
    pub seed: u64,
    /// Classifier agents.
    pub classifiers: usize,
    /// Drafter agents.
    pub drafters: usize,
    /// Escalator agents.
    pub escalators: usize,
    /// Human operators (they resolve tickets handed to a human).
    pub operators: usize,
    /// Real seconds per simulated second: 0.02 runs a 5 s LLM call in
    /// 100 ms.
    pub time_scale: f64,
    /// The lease of every claim, in simulated seconds.
    pub lease_secs: u32,
    /// Failed attempts at one stage, or drafts rejected, before a ticket
    /// goes to a human.
    pub max_attempts: u32,
    /// Share of tasks whose agent crashes holding the claim.
    pub crash_rate: f64,
    /// Share of tasks whose model call outlives the lease (a late write).
    pub timeout_rate: f64,
    /// Share of tasks whose model output fails validation.
    pub invalid_rate: f64,
    /// Share of successful submissions sent again with the same command id.
    pub retry_rate: f64,
    /// Stop after this many real seconds, the opening of the tickets
    /// included, even if tickets remain (or were never opened).
    pub max_seconds: f64,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            tickets: 200,
            seed: 42,
            classifiers: 3,
            drafters: 3,
            escalators: 2,
            operators: 1,
            time_scale: 0.01,
            lease_secs: 30,
            max_attempts: 3,
            crash_rate: 0.03,
            timeout_rate: 0.04,
            invalid_rate: 0.06,
            retry_rate: 0.10,
            max_seconds: 120.0,
        }
    }
}

/// A live view of a run, for progress output.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// Real seconds since the agents started (0 while the tickets are
    /// still being opened).
    pub elapsed_s: f64,
    /// Tickets per state.
    pub states: BTreeMap<State, u64>,
    /// Events (or writes) since the agents started; the intake's, written
    /// before, are not counted.
    pub events: u64,
    /// Those per real second.
    pub events_per_s: f64,
}

/// How the detected conflicts were resolved.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Conflicts {
    /// Two agents went for the same ticket; the loser was told and picked
    /// other work.
    pub claim_races_lost: u64,
    /// A decision on a revision the ticket had moved past was refused, and
    /// the agent looked again.
    pub stale_decisions_refused: u64,
    /// The command handler decided a command again on fresh state.
    pub decided_again: u64,
}

/// Task failures by kind.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Failures {
    /// Agents that died holding a claim.
    pub crashes: u64,
    /// Model calls that outlived the lease.
    pub timeouts: u64,
    /// Outputs that failed validation (hallucinations).
    pub invalid_outputs: u64,
}

/// The result of one run, for one design.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DemoReport {
    /// `triage` or `naive`.
    pub design: String,
    /// Tickets generated.
    pub tickets: usize,
    /// Tickets resolved at the end.
    pub resolved: usize,
    /// Whether every ticket was resolved before `max_seconds`.
    pub completed: bool,
    /// Real seconds the agents ran.
    pub wall_s: f64,
    /// Events (or writes) in the log.
    pub events: usize,
    /// Of those, the intake's `TicketOpened`, written before the clock
    /// starts.
    pub intake_events: usize,
    /// The others, written while the agents ran, per real second of
    /// `wall_s`.
    pub events_per_s: f64,
    /// Tasks started (claims taken).
    pub tasks: u64,
    /// Failed tasks by kind.
    pub failures: Failures,
    /// Failed tasks / tasks.
    pub task_failure_rate: f64,
    /// Mean time from opening to resolution, in simulated milliseconds.
    pub latency_mean_ms: f64,
    /// 99th percentile of the same.
    pub latency_p99_ms: u64,
    /// Conflicts detected and told to an agent.
    pub conflicts_detected: u64,
    /// How they were resolved.
    pub conflicts: Conflicts,
    /// Writes sent after the lease ran out.
    pub late_writes_attempted: u64,
    /// Of those, refused.
    pub late_writes_rejected: u64,
    /// Of those, accepted (must be 0 for Triage).
    pub late_writes_accepted: u64,
    /// Commands sent again with the same id.
    pub retries_sent: u64,
    /// Retries answered with the original outcome, writing nothing.
    pub duplicates_suppressed: u64,
    /// Retries applied a second time.
    pub duplicates_applied: u64,
    /// Claims the sweeper expired.
    pub claims_expired: u64,
    /// Tickets with at least one expired claim, from the log.
    pub tickets_with_expired_claims: usize,
    /// Of those, tickets resolved anyway.
    pub claims_recovered: usize,
    /// From the auditor: updates overwritten unseen.
    pub lost_updates: usize,
    /// From the auditor: steps not in the transition table, or breaking a
    /// claim rule.
    pub invalid_transitions: usize,
    /// From the auditor: events stored twice.
    pub duplicate_events: usize,
    /// From the auditor: acknowledged commands missing from the log.
    pub missing_events: usize,
    /// Whether the live read model equals a rebuild from the log (Triage),
    /// or the shared records equal a replay of their writes (naive).
    pub read_model_matches_rebuild: bool,
    /// Whether the auditor found nothing and the read model matched.
    pub audit_passed: bool,
    /// The auditor's first findings, in words.
    pub findings: Vec<String>,
}

/// Why a run could not be carried out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// The configuration makes no sense.
    #[error("invalid demo configuration: {0}")]
    Config(String),
    /// The event store failed.
    #[error(transparent)]
    Store(#[from] triage_event_store::Error),
    /// The read models failed.
    #[error(transparent)]
    Projection(#[from] triage_projections::ProjectionError),
}

fn policy(config: &DemoConfig) -> Policy {
    Policy {
        default_lease_secs: config.lease_secs,
        max_attempts: config.max_attempts,
        ..Policy::default()
    }
}

/// Most tickets in one run: the run generates them all (subject, body,
/// customer) before it starts, and the auditor holds every event of them.
pub const MAX_TICKETS: usize = 1_000_000;

/// Most agents of one role (or operators): each is a task.
pub const MAX_AGENTS_PER_ROLE: usize = 1_000;

/// Refuses a configuration no run can carry out. The run functions call
/// it first; a caller that prepares a store for the run calls it before
/// that, so that a refused run leaves nothing behind.
pub fn validate(config: &DemoConfig) -> Result<(), DemoError> {
    let rates = [
        config.crash_rate,
        config.timeout_rate,
        config.invalid_rate,
        config.retry_rate,
    ];
    if rates.iter().any(|rate| !(0.0..=1.0).contains(rate))
        || config.crash_rate + config.timeout_rate + config.invalid_rate > 1.0
    {
        return Err(DemoError::Config(
            "rates must be in [0, 1] and the failure rates must add up to at most 1".into(),
        ));
    }
    if !(config.time_scale > 0.0 && config.time_scale <= 1.0) {
        return Err(DemoError::Config("--time-scale must be in (0, 1]".into()));
    }
    if config.classifiers == 0 || config.drafters == 0 || config.escalators == 0 {
        return Err(DemoError::Config(
            "at least one classifier, drafter and escalator are needed".into(),
        ));
    }
    if config.tickets == 0 || config.lease_secs == 0 {
        return Err(DemoError::Config("--tickets and --lease-secs must be positive".into()));
    }
    if config.tickets > MAX_TICKETS {
        return Err(DemoError::Config(format!(
            "--tickets {} is above {MAX_TICKETS}, the most one run generates and audits",
            config.tickets
        )));
    }
    let agents = [
        ("--classifiers", config.classifiers),
        ("--drafters", config.drafters),
        ("--escalators", config.escalators),
        ("--operators", config.operators),
    ];
    if let Some((flag, count)) = agents.iter().find(|(_, count)| *count > MAX_AGENTS_PER_ROLE) {
        return Err(DemoError::Config(format!(
            "{flag} {count} is above {MAX_AGENTS_PER_ROLE}, the most agents of one role in a run"
        )));
    }
    let max_lease_secs = Policy::default().max_lease_secs;
    if config.lease_secs > max_lease_secs {
        return Err(DemoError::Config(format!(
            "--lease-secs {} is above the policy's longest lease ({max_lease_secs} s): every claim would be refused",
            config.lease_secs
        )));
    }
    if config.operators == 0 {
        return Err(DemoError::Config(
            "at least one operator is needed: escalated tickets wait for one".into(),
        ));
    }
    if !(config.max_seconds.is_finite() && config.max_seconds > 0.0) {
        return Err(DemoError::Config("--max-seconds must be a positive number".into()));
    }
    Ok(())
}

/// Runs the demo on Triage: `store` for events, `read_models` for queues.
pub async fn run_triage(
    store: Arc<dyn EventStore>,
    read_models: ReadModelDb,
    projector_options: ProjectorOptions,
    config: DemoConfig,
    mut on_progress: impl FnMut(&Progress) + Send,
) -> Result<DemoReport, DemoError> {
    validate(&config)?;
    let clock = Arc::new(ScaledClock::new(1.0 / config.time_scale));
    let handler = CommandHandler::new(store.clone())
        .with_clock(clock.clone())
        .with_policy(policy(&config))
        .with_retry(RetryPolicy::default());
    let projector = Projector::new(store.clone(), read_models).with_options(projector_options);
    projector.catch_up().await?;
    let backend = Arc::new(TriageBackend {
        handler: handler.clone(),
        projector: projector.clone(),
        own: std::sync::OnceLock::new(),
    });
    let stop_projector = Arc::new(AtomicBool::new(false));
    let live = {
        let projector = projector.clone();
        let stop = stop_projector.clone();
        // A failure of the store (a dropped connection) must not freeze
        // the queues the agents work from for the rest of the run: start
        // again, as `triage serve` does. A lasting failure shows in the
        // final catch-up.
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Err(error) = projector.run_live(stop.clone()).await {
                    // Stopped meanwhile (the run ended, or was dropped on
                    // Ctrl-C while the runtime shuts down and cancels the
                    // store's reads): an ending, not a failure.
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    tracing::warn!(%error, "the live projector stopped; restarting");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
            Ok::<(), triage_projections::ProjectionError>(())
        })
    };
    // A run dropped before its end (Ctrl-C) stops its live projector too.
    let _stop_when_dropped = StopOnDrop(stop_projector.clone());
    let events_in_store = {
        let store = store.clone();
        move || {
            let store = store.clone();
            async move { store.head_position().await.ok().flatten().map_or(0, |p| p.commit) }
        }
    };
    let (shared, wall) = drive(backend.clone(), clock, config, &mut on_progress, events_in_store).await;
    stop_projector.store(true, Ordering::Relaxed);
    live.await
        .map_err(|error| DemoError::Config(format!("the projector task failed: {error}")))??;
    projector.catch_up().await?;
    // Only the tickets this run sent to the store: the store may hold
    // earlier runs' and others'.
    let sent = shared.counters.openings_sent.load(Ordering::Relaxed) as usize;
    let own: Vec<TicketId> = shared.tickets[..sent].iter().map(|(id, _)| *id).collect();
    let logs = audit::logs_of_tickets(store.clone(), &own).await?;
    let mut matches = true;
    for name in ["tickets", "stats"] {
        let report = projector
            .rebuild(
                name,
                RebuildOptions {
                    verify: true,
                    ..RebuildOptions::default()
                },
            )
            .await?;
        matches &= report.differences.as_ref().is_some_and(Vec::is_empty);
    }
    let decided_again = handler.stats().conflicts_retried;
    Ok(report("triage", &shared, logs, wall, matches, decided_again))
}

/// Runs the same demo on the naive shared-record design.
pub async fn run_naive(
    config: DemoConfig,
    mut on_progress: impl FnMut(&Progress) + Send,
) -> Result<DemoReport, DemoError> {
    validate(&config)?;
    let clock = Arc::new(ScaledClock::new(1.0 / config.time_scale));
    let backend = Arc::new(NaiveBackend::new(clock.clone(), policy(&config)));
    let writes = {
        let backend = backend.clone();
        move || {
            let backend = backend.clone();
            async move { backend.log().values().map(|log| log.len() as u64).sum() }
        }
    };
    let (shared, wall) = drive(backend.clone(), clock, config, &mut on_progress, writes).await;
    let logs = backend.log();
    Ok(report("naive", &shared, logs, wall, backend.records_match_log(), 0))
}

/// Opens the tickets, runs every agent until all tickets are resolved (or
/// time runs out), reporting progress twice a second.
async fn drive<F, Fut>(
    backend: Arc<dyn Backend>,
    clock: Arc<ScaledClock>,
    config: DemoConfig,
    on_progress: &mut (impl FnMut(&Progress) + Send),
    events_so_far: F,
) -> (Shared, f64)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    // The tickets' content comes from the seed; their ids are fresh, so a
    // run into an existing store never collides with an earlier run's.
    let tickets: Vec<(TicketId, workload::GeneratedTicket)> = workload::generate(config.tickets, config.seed)
        .into_iter()
        .map(|ticket| (TicketId::new(), ticket))
        .collect();
    let ids: Vec<TicketId> = tickets.iter().map(|(id, _)| *id).collect();
    backend.keep_to(&ids);
    let shared = Shared {
        backend: backend.clone(),
        clock: clock.clone(),
        config,
        tickets: Arc::new(tickets),
        counters: Arc::new(Counters::default()),
        acks: Arc::default(),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let intake = Agent::new("intake-mailbox", Role::Intake);
    let nobody = |ticket_id| Snapshot {
        ticket_id,
        revision: 0,
        ticket: Ticket::default(),
        read_at: triage_command_handler::Clock::now(clock.as_ref()),
    };
    // `max_seconds` bounds the whole run, the intake included: a large
    // `--tickets` on a slow store must not outlast it. (None: further off
    // than this clock can count, which is no bound.)
    let deadline = Duration::try_from_secs_f64(config.max_seconds)
        .ok()
        .and_then(|bound| Instant::now().checked_add(bound));
    let past_deadline = || deadline.is_some_and(|deadline| Instant::now() >= deadline);
    // Tickets arrive together, as from a mailbox: concurrent openings
    // share the store's commits, where one at a time would wait for one
    // fsync each.
    const INTAKE_IN_FLIGHT: usize = 32;
    let mut openings = tokio::task::JoinSet::new();
    let mut opened = 0u64;
    let mut reported = Instant::now();
    for (id, ticket) in shared.tickets.iter() {
        if openings.len() >= INTAKE_IN_FLIGHT {
            opened += u64::from(matches!(openings.join_next().await, Some(Ok(true))));
        }
        if past_deadline() {
            break;
        }
        // The intake shows as tickets arriving in NEW; the agents' clock
        // and rates start after it.
        if reported.elapsed() >= Duration::from_millis(500) {
            reported = Instant::now();
            on_progress(&Progress {
                elapsed_s: 0.0,
                states: BTreeMap::from([(State::New, opened)]),
                events: 0,
                events_per_s: 0.0,
            });
        }
        let open = CommandEnvelope::new(
            *id,
            intake.clone(),
            Command::OpenTicket {
                subject: ticket.subject.clone(),
                body: ticket.body.clone(),
                customer: Some(ticket.customer.clone()),
            },
        );
        let (shared, snapshot) = (shared.clone(), nobody(*id));
        shared.counters.openings_sent.fetch_add(1, Ordering::Relaxed);
        openings.spawn(async move { shared.submit(open, &snapshot).await.is_ok() });
    }
    openings.join_all().await;
    // The intake's events are not the agents' work: rates count from here.
    let events_at_start = events_so_far().await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    // The intake took all the time there was: no agents to start.
    let agents_run = !past_deadline();
    for (role, count) in [
        (Role::Classifier, config.classifiers),
        (Role::Drafter, config.drafters),
        (Role::Escalator, config.escalators),
    ] {
        for index in (1..=count).filter(|_| agents_run) {
            tasks.push(tokio::spawn(sim::agent(shared.clone(), role, index)));
        }
    }
    for index in (1..=config.operators).filter(|_| agents_run) {
        tasks.push(tokio::spawn(sim::operator(shared.clone(), index)));
    }
    if agents_run {
        tasks.push(tokio::spawn(sim::sweeper(shared.clone())));
        loop {
            // Twice a second, or at the deadline if that comes first.
            let tick = deadline.map_or(Duration::from_millis(500), |deadline| {
                deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(500))
            });
            tokio::time::sleep(tick).await;
            let ids: Vec<TicketId> = shared.tickets.iter().map(|(id, _)| *id).collect();
            let states = backend.counts(&ids).await;
            let events = events_so_far().await.saturating_sub(events_at_start);
            let elapsed_s = started.elapsed().as_secs_f64();
            on_progress(&Progress {
                elapsed_s,
                events_per_s: events as f64 / elapsed_s.max(1e-3),
                states: states.clone(),
                events,
            });
            if sim::all_resolved(&states, config.tickets) || past_deadline() {
                break;
            }
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    (shared, started.elapsed().as_secs_f64())
}

fn report(
    design: &str,
    shared: &Shared,
    mut logs: BTreeMap<TicketId, Vec<LoggedEvent>>,
    wall_s: f64,
    read_model_matches_rebuild: bool,
    decided_again: u64,
) -> DemoReport {
    let counters = &shared.counters;
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    // Only this run's tickets: a store may hold earlier runs' too.
    let ours: std::collections::HashSet<TicketId> = shared.tickets.iter().map(|(id, _)| *id).collect();
    logs.retain(|id, _| ours.contains(id));
    let acks = shared
        .acks
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let audit = audit::audit(&logs, &acks);
    let mut latency = Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3).expect("valid histogram bounds");
    let mut resolved = 0;
    let mut claims_recovered = 0;
    let mut tickets_with_expired_claims = 0;
    let mut intake_events = 0;
    for log in logs.values() {
        intake_events += log
            .iter()
            .filter(|logged| matches!(logged.event, Event::TicketOpened { .. }))
            .count();
        let claim_expired = log
            .iter()
            .any(|logged| matches!(logged.event, Event::ClaimExpired { .. }));
        tickets_with_expired_claims += usize::from(claim_expired);
        let opened = log
            .iter()
            .find(|logged| matches!(logged.event, Event::TicketOpened { .. }));
        let final_state = log
            .iter()
            .fold(Ticket::default(), |ticket, logged| {
                triage_domain::evolve(ticket, &logged.event)
            })
            .state;
        if final_state == Some(State::Resolved) {
            resolved += 1;
            let closed = log
                .iter()
                .rev()
                .find(|logged| matches!(logged.event, Event::TicketResolved { .. }));
            if let (Some(opened), Some(closed)) = (opened, closed) {
                let ms = (closed.metadata.recorded_at - opened.metadata.recorded_at)
                    .num_milliseconds()
                    .max(1);
                // Clamped, not dropped: a latency past the bound (a tiny
                // --time-scale) must not vanish from the mean and p99.
                latency.saturating_record(ms as u64);
            }
            claims_recovered += usize::from(claim_expired);
        }
    }
    let tasks = load(&counters.tasks);
    let failures = Failures {
        crashes: load(&counters.crashes),
        timeouts: load(&counters.timeouts),
        invalid_outputs: load(&counters.invalid_outputs),
    };
    let failed = failures.crashes + failures.timeouts + failures.invalid_outputs;
    let conflicts = Conflicts {
        claim_races_lost: load(&counters.claim_races_lost),
        stale_decisions_refused: load(&counters.stale_decisions),
        decided_again,
    };
    let events = audit.events;
    DemoReport {
        design: design.to_owned(),
        tickets: shared.config.tickets,
        resolved,
        completed: resolved == shared.config.tickets,
        wall_s,
        events,
        intake_events,
        events_per_s: events.saturating_sub(intake_events) as f64 / wall_s.max(1e-3),
        tasks,
        task_failure_rate: if tasks == 0 { 0.0 } else { failed as f64 / tasks as f64 },
        failures,
        latency_mean_ms: if latency.is_empty() { 0.0 } else { latency.mean() },
        latency_p99_ms: latency.value_at_quantile(0.99),
        conflicts_detected: conflicts.claim_races_lost + conflicts.stale_decisions_refused + conflicts.decided_again,
        conflicts,
        late_writes_attempted: load(&counters.late_writes_attempted),
        late_writes_rejected: load(&counters.late_writes_rejected),
        late_writes_accepted: load(&counters.late_writes_accepted),
        retries_sent: load(&counters.retries_sent),
        duplicates_suppressed: load(&counters.duplicates_suppressed),
        duplicates_applied: load(&counters.duplicates_applied),
        claims_expired: load(&counters.claims_expired),
        tickets_with_expired_claims,
        claims_recovered,
        lost_updates: audit.lost_updates,
        invalid_transitions: audit.invalid_transitions,
        duplicate_events: audit.duplicate_events,
        missing_events: audit.missing_events,
        read_model_matches_rebuild,
        audit_passed: audit.passed() && read_model_matches_rebuild,
        findings: audit.findings,
    }
}

/// Sets its flag when dropped: stops what watches the flag when the
/// future holding this is dropped before its end.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
