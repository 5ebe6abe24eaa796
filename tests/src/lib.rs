//! End-to-end checks across Triage crates.
//!
//! [`race`] runs many agents against the same few tickets through
//! several command handlers (as several processes would), with the hazards real agents have (stale decisions,
//! retries with the same command id, late writes after a lease ran out, a
//! sweeper expiring claims, operators taking over), and then [`audit_store`]
//! checks the invariants of DESIGN.md **from the event log alone**: it never
//! trusts what the writers believe happened.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use triage_command_handler::{Accepted, Clock, CommandError, CommandHandler, ManualClock};
use triage_demo::audit::{Acknowledged, Audit, audit, logs_from_store};
use triage_domain::{Agent, Command, CommandEnvelope, Event, Policy, Priority, Role, State, TicketId, event_id};
use triage_event_store::EventStore;
use uuid::Uuid;

/// What a race run is made of.
#[derive(Clone, Copy, Debug)]
pub struct RaceConfig {
    /// Agents racing (split across classifiers, drafters, escalators and
    /// operators), besides one lease sweeper.
    pub agents: usize,
    /// Tickets they share.
    pub tickets: usize,
    /// Commands each agent tries.
    pub steps_per_agent: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Command handlers the agents are spread over, as over processes:
    /// within one, commands on a ticket take turns; between them, only
    /// the store's expected revision stands between racing writers.
    pub processes: usize,
}

impl Default for RaceConfig {
    fn default() -> Self {
        RaceConfig {
            agents: 32,
            tickets: 10,
            steps_per_agent: 40,
            seed: 7,
            processes: 3,
        }
    }
}

/// What the agents saw, counted as they went.
#[derive(Debug, Default)]
pub struct RaceReport {
    /// Every acknowledged outcome (first deliveries and retries).
    pub acknowledged: Vec<Accepted>,
    /// Completions an agent sent after its lease ran out.
    pub late_writes_attempted: u64,
    /// Of those, how many were accepted. Must be 0.
    pub late_writes_accepted: u64,
    /// Retries of an already-sent command id.
    pub retries_sent: u64,
    /// Commands refused because their decided-on revision was stale.
    pub stale_decisions: u64,
    /// Appends the store refused because the stream had moved on, over
    /// all the handlers.
    pub store_conflicts: u64,
    /// Commands the domain refused.
    pub rejections: u64,
    /// Unexpected errors (store failures, exhausted retries), as text.
    pub errors: Vec<String>,
}

/// What the event log says: the demo's auditor (the same one `triage demo`
/// runs) plus checks only a test can make.
#[derive(Debug, Default)]
pub struct LogAudit {
    /// Lost updates, invalid transitions, duplicate and missing events.
    pub audit: Audit,
    /// Ticket streams read.
    pub streams: usize,
    /// Acknowledged commands whose last event is not at the acknowledged
    /// revision.
    pub misplaced_acknowledged: Vec<Uuid>,
    /// Stored events of commands whose ids do not match the deterministic
    /// scheme (event i of command c must be UUIDv5(c, i)).
    pub foreign_event_ids: usize,
    /// Stored commands that no agent was told were accepted.
    pub unacknowledged_commands: Vec<Uuid>,
    /// Tickets per final state.
    pub final_states: HashMap<State, usize>,
    /// Claims expired by the sweeper.
    pub claims_expired: usize,
}

impl LogAudit {
    /// True when every invariant holds.
    pub fn passed(&self) -> bool {
        self.audit.passed()
            && self.misplaced_acknowledged.is_empty()
            && self.foreign_event_ids == 0
            && self.unacknowledged_commands.is_empty()
    }
}

/// How long an agent looks for work and finds none before it stops.
const MAX_IDLE: Duration = Duration::from_millis(500);

fn role_of(agent: usize) -> Role {
    match agent % 16 {
        0..=4 => Role::Classifier,
        5..=9 => Role::Drafter,
        10..=14 => Role::Escalator,
        _ => Role::Operator,
    }
}

/// What an agent decides to send, given the ticket it looked at.
fn choose(
    role: Role,
    me: &str,
    state: State,
    ticket: &triage_domain::Ticket,
    rng: &mut fastrand::Rng,
) -> Option<Command> {
    let my_claim = ticket
        .claim
        .as_ref()
        .filter(|claim| claim.agent_id == me)
        .map(|claim| claim.claim_id);
    // Completing someone else's claim is a mistake agents make now and then
    // (a stale cache, a mixed-up ticket); fencing must refuse it.
    if state.is_claim() && my_claim.is_none() && role != Role::Operator && rng.u8(0..20) != 0 {
        return None;
    }
    let lease_secs = Some(rng.u32(20..40));
    match (role, state) {
        (Role::Classifier, State::New) => Some(Command::StartClassification { lease_secs }),
        (Role::Classifier, State::Classifying) => {
            let claim_id = my_claim.unwrap_or_else(Uuid::new_v4);
            // One answer in eight is a hallucination: an unknown category.
            let category = if rng.u8(0..8) == 0 { "astrology" } else { "billing" };
            Some(Command::Classify {
                claim_id,
                category: category.into(),
                priority: Priority::Normal,
                confidence: rng.f64(),
            })
        }
        (Role::Drafter, State::Classified) => Some(Command::StartDrafting { lease_secs }),
        (Role::Drafter, State::Drafting) => Some(Command::SubmitDraft {
            claim_id: my_claim.unwrap_or_else(Uuid::new_v4),
            body: if rng.u8(0..10) == 0 {
                String::new()
            } else {
                "Here is what happened.".into()
            },
        }),
        (Role::Escalator, State::DraftReady) => Some(Command::StartEscalation { lease_secs }),
        (Role::Escalator, State::Escalating) => {
            let claim_id = my_claim.unwrap_or_else(Uuid::new_v4);
            Some(match rng.u8(0..10) {
                0..=6 => Command::Resolve {
                    claim_id: Some(claim_id),
                    resolution: "sent the draft".into(),
                },
                7..=8 => Command::RejectDraft {
                    claim_id: Some(claim_id),
                    reason: "too vague".into(),
                },
                _ => Command::EscalateToHuman {
                    claim_id,
                    reason: "angry customer".into(),
                },
            })
        }
        (Role::Operator, State::NeedsHuman) => Some(Command::Resolve {
            claim_id: None,
            resolution: "called the customer".into(),
        }),
        (Role::Operator, State::Classifying | State::Drafting | State::Escalating) if rng.u8(0..6) == 0 => {
            Some(Command::TakeOver { lease_secs })
        }
        _ => None,
    }
}

fn is_completion(command: &Command) -> bool {
    matches!(
        command,
        Command::Classify { .. }
            | Command::SubmitDraft { .. }
            | Command::Resolve { claim_id: Some(_), .. }
            | Command::RejectDraft { claim_id: Some(_), .. }
            | Command::EscalateToHuman { .. }
    )
}

/// Runs the race. Returns what the agents saw; audit the store afterwards
/// with [`audit_store`].
pub async fn race(store: Arc<dyn EventStore>, config: RaceConfig) -> RaceReport {
    let clock = Arc::new(ManualClock::new(Utc.with_ymd_and_hms(2026, 4, 1, 9, 0, 0).unwrap()));
    let policy = Policy {
        max_attempts: 3,
        ..Policy::default()
    };
    let handlers: Vec<CommandHandler> = (0..config.processes.max(1))
        .map(|_| {
            CommandHandler::new(store.clone())
                .with_clock(clock.clone())
                .with_policy(policy.clone())
        })
        .collect();
    let handler = handlers[0].clone();
    let report = Arc::new(Mutex::new(RaceReport::default()));
    let intake = Agent::new("intake-1", Role::Intake);
    let mut tickets = Vec::with_capacity(config.tickets);
    for n in 0..config.tickets {
        let envelope = CommandEnvelope::new(
            TicketId::new(),
            intake.clone(),
            Command::OpenTicket {
                subject: format!("Ticket {n}"),
                body: "Something is wrong.".into(),
                customer: None,
            },
        );
        let accepted = handler.handle(envelope).await.expect("tickets open");
        tickets.push(accepted.ticket_id);
        report.lock().unwrap().acknowledged.push(accepted);
    }
    let tickets = Arc::new(tickets);
    let done = Arc::new(AtomicBool::new(false));

    // Time moves one simulated second per real millisecond, so leases of
    // 20–40 s run out while agents work.
    let ticker = {
        let clock = clock.clone();
        let done = done.clone();
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(1)).await;
                clock.advance(chrono::Duration::seconds(1));
            }
        })
    };
    let sweeper = {
        let handler = handler.clone();
        let tickets = tickets.clone();
        let done = done.clone();
        let report = report.clone();
        tokio::spawn(async move {
            let agent = Agent::new("sweeper", Role::System);
            while !done.load(Ordering::Relaxed) {
                for &ticket in tickets.iter() {
                    let Ok(loaded) = handler.load(ticket).await else {
                        continue;
                    };
                    let Some(claim) = loaded.ticket.claim else { continue };
                    if handler.clock().now() < claim.lease_expires_at {
                        continue;
                    }
                    let envelope = CommandEnvelope::new(
                        ticket,
                        agent.clone(),
                        Command::ExpireClaim {
                            claim_id: claim.claim_id,
                        },
                    );
                    record(&report, handler.handle(envelope).await, false);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let late_attempted = Arc::new(AtomicU64::new(0));
    let first_late_taken = Arc::new(AtomicBool::new(false));
    // Steps sent by all the agents: an agent is idle only while nobody
    // makes progress (see below).
    let progress = Arc::new(AtomicU64::new(0));
    let mut agents = Vec::with_capacity(config.agents);
    for index in 0..config.agents {
        let progress = progress.clone();
        let handler = handlers[index % handlers.len()].clone();
        let tickets = tickets.clone();
        let report = report.clone();
        let late_attempted = late_attempted.clone();
        let first_late_taken = first_late_taken.clone();
        let clock = clock.clone();
        agents.push(tokio::spawn(async move {
            let role = role_of(index);
            let me = format!("{role}-{index}");
            let agent = Agent::new(me.clone(), role);
            let mut rng = fastrand::Rng::with_seed(config.seed.wrapping_mul(1000) + index as u64);
            // A step is a command sent. Looking and finding no work is not
            // one: an escalator whose steps ran out before any draft was
            // ready would leave tickets unresolved on a loaded machine. An
            // agent that finds no work while no agent makes progress for a
            // while stops instead: on a slow machine an escalator may wait
            // longer than that for the first draft, while the others work.
            let mut steps = 0;
            let mut idle_since: Option<std::time::Instant> = None;
            let mut progress_seen = progress.load(Ordering::Relaxed);
            while steps < config.steps_per_agent && idle_since.is_none_or(|since| since.elapsed() < MAX_IDLE) {
                // Look through the tickets in random order for work this
                // agent can do, as a worker polling its queue would.
                let mut order: Vec<TicketId> = tickets.to_vec();
                rng.shuffle(&mut order);
                let mut work = None;
                for ticket in order {
                    let loaded = match handler.load(ticket).await {
                        Ok(loaded) => loaded,
                        Err(error) => {
                            report.lock().unwrap().errors.push(error.to_string());
                            continue;
                        }
                    };
                    let (Some(state), Some(_)) = (loaded.ticket.state, loaded.revision) else {
                        continue;
                    };
                    if let Some(command) = choose(role, &me, state, &loaded.ticket, &mut rng) {
                        work = Some((ticket, loaded, command));
                        break;
                    }
                }
                let Some((ticket, loaded, command)) = work else {
                    let progress_now = progress.load(Ordering::Relaxed);
                    if progress_now != progress_seen {
                        progress_seen = progress_now;
                        idle_since = None;
                    }
                    idle_since.get_or_insert_with(std::time::Instant::now);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                idle_since = None;
                steps += 1;
                progress.fetch_add(1, Ordering::Relaxed);
                let revision = loaded.revision.expect("the ticket exists");
                // Think: a simulated model call.
                tokio::time::sleep(Duration::from_micros(rng.u64(0..1500))).await;
                let mut late = false;
                // One in five completions under the agent's own claim is
                // late, and the run's first one always: the hazard happens
                // in every run, however few steps a loaded machine allows.
                if is_completion(&command)
                    && let Some(claim) = loaded.ticket.claim.as_ref().filter(|claim| claim.agent_id == me)
                    && (!first_late_taken.swap(true, Ordering::Relaxed) || rng.u8(0..5) == 0)
                {
                    // A model call that times out: write after the lease ran out.
                    while clock.now() < claim.lease_expires_at {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    late = true;
                    late_attempted.fetch_add(1, Ordering::Relaxed);
                }
                let mut envelope = CommandEnvelope::new(ticket, agent.clone(), command);
                // Most agents send the revision they decided on; some leave
                // it to the handler to decide again on fresh state.
                if rng.u8(0..10) < 7 {
                    envelope = envelope.at_revision(revision);
                }
                let result = handler.handle(envelope.clone()).await;
                let accepted = result.is_ok();
                record(&report, result, late);
                // A retry after a (simulated) timeout: the same command id.
                if accepted && rng.u8(0..6) == 0 {
                    report.lock().unwrap().retries_sent += 1;
                    let retry = handler.handle(envelope).await;
                    // Its original was accepted: the retry gets that answer,
                    // never a refusal (which `record` would count as an
                    // ordinary rejection).
                    match &retry {
                        Ok(outcome) => assert!(outcome.duplicate, "a retry must be answered as a duplicate"),
                        Err(error) => panic!("a retry of an accepted command was refused: {error}"),
                    }
                    record(&report, retry, false);
                }
            }
        }));
    }
    for agent in agents {
        agent.await.expect("agent task");
    }
    done.store(true, Ordering::Relaxed);
    ticker.await.expect("ticker task");
    sweeper.await.expect("sweeper task");
    let mut report = Arc::try_unwrap(report)
        .expect("all tasks finished")
        .into_inner()
        .unwrap();
    report.late_writes_attempted = late_attempted.load(Ordering::Relaxed);
    report.store_conflicts = handlers.iter().map(|handler| handler.stats().store_conflicts).sum();
    report
}

fn record(report: &Mutex<RaceReport>, result: Result<Accepted, CommandError>, late: bool) {
    let mut report = report.lock().unwrap();
    match result {
        Ok(accepted) => {
            if late {
                report.late_writes_accepted += 1;
            }
            report.acknowledged.push(accepted);
        }
        Err(CommandError::Rejected { .. }) => report.rejections += 1,
        Err(CommandError::StaleRevision { .. }) => report.stale_decisions += 1,
        Err(error) => report.errors.push(error.to_string()),
    }
}

/// Reads the whole log and checks every invariant against it and against
/// the acknowledgements the agents received.
pub async fn audit_store(store: &dyn EventStore, acknowledged: &[Accepted]) -> LogAudit {
    let logs = logs_from_store(store).await.expect("the log is readable");
    let acks: Vec<Acknowledged> = acknowledged
        .iter()
        .map(|accepted| Acknowledged {
            ticket_id: accepted.ticket_id,
            command_id: accepted.command_id,
            events: accepted.events.len(),
        })
        .collect();
    let mut result = LogAudit {
        audit: audit(&logs, &acks),
        streams: logs.len(),
        ..LogAudit::default()
    };
    let mut stored_commands = HashSet::new();
    for log in logs.values() {
        let mut index_in_command = 0u32;
        for (revision, logged) in log.iter().enumerate() {
            let same_command = revision > 0 && log[revision - 1].metadata.command_id == logged.metadata.command_id;
            index_in_command = if same_command { index_in_command + 1 } else { 0 };
            let command_id = logged.metadata.command_id;
            // Logs written before event ids were time-ordered hold the former id.
            if logged.id != event_id(command_id, index_in_command)
                && Some(logged.id) != triage_domain::former_event_id(command_id, index_in_command)
            {
                result.foreign_event_ids += 1;
            }
            if matches!(logged.event, Event::ClaimExpired { .. }) {
                result.claims_expired += 1;
            }
            stored_commands.insert(logged.metadata.command_id);
        }
        let state = triage_domain::Ticket::from_events(log.iter().map(|logged| &logged.event)).state;
        if let Some(state) = state {
            *result.final_states.entry(state).or_default() += 1;
        }
    }
    // Every acknowledged command's last event sits at the acknowledged
    // revision, under its deterministic id.
    for accepted in acknowledged {
        let expected_id = event_id(accepted.command_id, accepted.events.len() as u32 - 1);
        let stored = logs
            .get(&accepted.ticket_id)
            .and_then(|log| log.get(accepted.revision as usize));
        if stored.is_none_or(|logged| logged.id != expected_id) {
            result.misplaced_acknowledged.push(accepted.command_id);
        }
    }
    let acknowledged_ids: HashSet<Uuid> = acknowledged.iter().map(|accepted| accepted.command_id).collect();
    result.unacknowledged_commands = stored_commands.difference(&acknowledged_ids).copied().collect();
    result
}

/// Runs [`race`] with the default configuration on `store`, audits the log
/// with [`audit_store`], and asserts every invariant, and that the hazards
/// (late writes, retries, collisions, expired claims) really happened. The
/// one check every backend's race test shares.
pub async fn race_and_audit(store: Arc<dyn EventStore>) {
    let report = race(store.clone(), RaceConfig::default()).await;
    assert!(report.errors.is_empty(), "unexpected errors: {:?}", report.errors);
    let audit = audit_store(store.as_ref(), &report.acknowledged).await;
    eprintln!(
        "{}: {} events in {} streams; {} acknowledged, {} rejections, {} stale decisions, {} retries, \
         {} late writes attempted, {} claims expired, {} store conflicts; final states {:?}",
        store.describe(),
        audit.audit.events,
        audit.streams,
        report.acknowledged.len(),
        report.rejections,
        report.stale_decisions,
        report.retries_sent,
        report.late_writes_attempted,
        audit.claims_expired,
        report.store_conflicts,
        audit.final_states,
    );
    // The handlers are spread as over processes: writers must have met at
    // the store, or the run says nothing about its expected revisions.
    assert!(report.store_conflicts > 0, "no append was refused for a moved stream");
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
