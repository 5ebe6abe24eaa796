//! The workload, a copy of `triage-bench`'s (`bench/src/workload.rs` and
//! `bench/src/pg.rs`): the same commands, the same ticket sets, the same
//! retries. Keep the two in step.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cqrs_es::{AggregateError, EventStore as _};
use hdrhistogram::Histogram;
use uuid::Uuid;

use crate::ticket::{Agent, CommandKind, Priority, Role, State, Ticket, TicketCommand};

/// Which tickets the agents work on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum TicketsMode {
    /// Every agent opens its own tickets and drives them end to end.
    Disjoint,
    /// All agents race for the work on a few shared tickets.
    Hot,
}

impl TicketsMode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            TicketsMode::Disjoint => "disjoint",
            TicketsMode::Hot => "hot",
        }
    }
}

/// The ticket set of one run.
#[derive(Clone, Debug)]
pub(crate) struct Tickets {
    mode: TicketsMode,
    hot: usize,
    /// Hot tickets are UUIDv5 of this run's namespace and `slot:generation`:
    /// every agent names the same next ticket without talking to the others.
    namespace: Uuid,
}

impl Tickets {
    pub(crate) fn new(mode: TicketsMode, hot: usize) -> Self {
        Tickets {
            mode,
            hot: hot.max(1),
            namespace: Uuid::new_v4(),
        }
    }

    fn hot_ticket(&self, slot: usize, generation: u64) -> Uuid {
        Uuid::new_v5(&self.namespace, format!("{slot}:{generation}").as_bytes())
    }
}

/// The roles of the seven lifecycle commands, as in Triage's workload.
pub(crate) const LIFECYCLE: [Role; 7] = [
    Role::Intake,
    Role::Classifier,
    Role::Classifier,
    Role::Drafter,
    Role::Drafter,
    Role::Escalator,
    Role::Escalator,
];

/// The `step`-th command of the lifecycle (0-based); Triage's payloads.
pub(crate) fn command(step: usize, claim: Option<Uuid>) -> CommandKind {
    let claim_id = || claim.expect("a claim was taken by the previous step");
    match step {
        0 => CommandKind::OpenTicket {
            subject: "Charged twice for the March invoice".into(),
            body: "Hello, my card was charged twice for the March invoice (order 4411). Please refund one of them."
                .into(),
            customer: Some("dana@example.com".into()),
        },
        1 => CommandKind::StartClassification { lease_secs: None },
        2 => CommandKind::Classify {
            claim_id: claim_id(),
            category: "billing".into(),
            priority: Priority::High,
            confidence: 0.93,
        },
        3 => CommandKind::StartDrafting { lease_secs: None },
        4 => CommandKind::SubmitDraft {
            claim_id: claim_id(),
            body: "Hi Dana, sorry about that. We refunded the duplicate charge; it will show within 5 days.".into(),
        },
        5 => CommandKind::StartEscalation { lease_secs: None },
        6 => CommandKind::Resolve {
            claim_id: Some(claim_id()),
            resolution: "sent the draft".into(),
        },
        _ => panic!("the lifecycle has 7 steps"),
    }
}

pub(crate) fn takes_claim(step: usize) -> bool {
    matches!(step, 1 | 3 | 5)
}

/// What one agent (or all of them) did.
#[derive(Debug)]
pub(crate) struct AgentTotals {
    pub(crate) accepted: u64,
    pub(crate) rejected: u64,
    pub(crate) contended: u64,
    pub(crate) conflicts: u64,
    pub(crate) loads: u64,
    /// Every command sent, accepted or not, retries included.
    pub(crate) latency_us: Histogram<u64>,
}

impl AgentTotals {
    pub(crate) fn new() -> anyhow::Result<Self> {
        Ok(AgentTotals {
            accepted: 0,
            rejected: 0,
            contended: 0,
            conflicts: 0,
            loads: 0,
            latency_us: crate::histogram()?,
        })
    }

    pub(crate) fn add(&mut self, other: AgentTotals) -> anyhow::Result<()> {
        self.accepted += other.accepted;
        self.rejected += other.rejected;
        self.contended += other.contended;
        self.conflicts += other.conflicts;
        self.loads += other.loads;
        self.latency_us.add(other.latency_us)?;
        Ok(())
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Accepted,
    Rejected,
    Contended,
}

/// Triage's default `RetryPolicy`: 8 attempts, full jitter up to a cap
/// that starts at 1 ms, doubles per retry and stops at 50 ms.
const MAX_ATTEMPTS: u32 = 8;

fn retry_delay(retry: u32) -> Duration {
    let cap = Duration::from_millis(1)
        .saturating_mul(1u32 << retry.min(16))
        .min(Duration::from_millis(50));
    cap.mul_f64(fastrand::f64())
}

/// Sends one command, executing it again on a fresh load after a conflict,
/// and times it.
async fn send(
    cqrs: &crate::Cqrs,
    totals: &mut AgentTotals,
    ticket_id: Uuid,
    agent: &Agent,
    kind: CommandKind,
) -> anyhow::Result<(Outcome, Uuid)> {
    let command = TicketCommand {
        command_id: Uuid::new_v4(),
        ticket_id,
        agent: agent.clone(),
        kind,
    };
    let command_id = command.command_id;
    let aggregate_id = ticket_id.to_string();
    let started = Instant::now();
    let mut attempt = 0;
    let outcome = loop {
        attempt += 1;
        // Triage's envelope metadata: ids for tracing, the agent, the time.
        let metadata = HashMap::from([
            ("schema_version".to_owned(), "1".to_owned()),
            ("command_id".to_owned(), command_id.to_string()),
            ("correlation_id".to_owned(), command_id.to_string()),
            ("causation_id".to_owned(), command_id.to_string()),
            ("agent_id".to_owned(), agent.id.clone()),
            ("agent_role".to_owned(), format!("{:?}", agent.role).to_lowercase()),
            ("recorded_at".to_owned(), chrono::Utc::now().to_rfc3339()),
        ]);
        match cqrs
            .execute_with_metadata(&aggregate_id, command.clone(), metadata)
            .await
        {
            Ok(()) => break Outcome::Accepted,
            Err(AggregateError::UserError(_)) => break Outcome::Rejected,
            Err(AggregateError::AggregateConflict) => {
                totals.conflicts += 1;
                if attempt >= MAX_ATTEMPTS {
                    break Outcome::Contended;
                }
                tokio::time::sleep(retry_delay(attempt)).await;
            }
            Err(error) => return Err(anyhow::anyhow!("ticket {ticket_id}: {error}")),
        }
    };
    totals.latency_us.record(started.elapsed().as_micros().max(1) as u64)?;
    match outcome {
        Outcome::Accepted => totals.accepted += 1,
        Outcome::Rejected => totals.rejected += 1,
        Outcome::Contended => totals.contended += 1,
    }
    Ok((outcome, command_id))
}

/// Drives tickets until `deadline`.
pub(crate) async fn agent_loop(
    cqrs: &crate::Cqrs,
    loader: &PersistedStore,
    tickets: &Tickets,
    index: usize,
    deadline: Instant,
) -> anyhow::Result<AgentTotals> {
    let mut totals = AgentTotals::new()?;
    let agents = LIFECYCLE.map(|role| Agent {
        id: format!("{}-{index}", format!("{role:?}").to_lowercase()),
        role,
    });
    match tickets.mode {
        TicketsMode::Disjoint => {
            while Instant::now() < deadline {
                // Time-ordered, as Triage's `TicketId::new()`.
                let ticket = Uuid::now_v7();
                let mut claim = None;
                for (step, agent) in agents.iter().enumerate() {
                    let (outcome, command_id) = send(cqrs, &mut totals, ticket, agent, command(step, claim)).await?;
                    anyhow::ensure!(
                        outcome == Outcome::Accepted,
                        "agent {index} ticket {ticket} step {step}: {outcome:?}"
                    );
                    if takes_claim(step) {
                        claim = Some(command_id);
                    }
                }
            }
        }
        TicketsMode::Hot => {
            let mut generation = vec![0u64; tickets.hot];
            let mut slot = index % tickets.hot;
            while Instant::now() < deadline {
                let ticket = tickets.hot_ticket(slot, generation[slot]);
                let loaded = loader
                    .load_aggregate(&ticket.to_string())
                    .await
                    .map_err(|error| anyhow::anyhow!("ticket {ticket}: {error}"))?;
                totals.loads += 1;
                let step = match loaded.aggregate.state {
                    None => 0,
                    Some(State::New) => 1,
                    Some(State::Classified) => 3,
                    Some(State::DraftReady) => 5,
                    Some(State::Resolved) => {
                        generation[slot] += 1;
                        continue;
                    }
                    // Another agent holds the claim: look again later, as a
                    // poller would, and try the next ticket.
                    Some(State::Classifying | State::Drafting | State::Escalating) => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        slot = (slot + 1) % tickets.hot;
                        continue;
                    }
                };
                let (outcome, command_id) = send(cqrs, &mut totals, ticket, &agents[step], command(step, None)).await?;
                if outcome == Outcome::Accepted && takes_claim(step) {
                    // The claim is ours: complete it.
                    let next = step + 1;
                    let (done, _) = send(
                        cqrs,
                        &mut totals,
                        ticket,
                        &agents[next],
                        command(next, Some(command_id)),
                    )
                    .await?;
                    anyhow::ensure!(
                        done == Outcome::Accepted,
                        "agent {index} ticket {ticket} step {next}: {done:?}"
                    );
                }
                slot = (slot + 1) % tickets.hot;
            }
        }
    }
    Ok(totals)
}

pub(crate) type PersistedStore = cqrs_es::persist::PersistedEventStore<postgres_es::PostgresEventRepository, Ticket>;
