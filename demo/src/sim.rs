//! Simulated agents: claim from the queue, "think" like an LLM call, fail
//! the way real agents fail, and submit through the design under test.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use triage_command_handler::Clock;
use triage_domain::{Agent, Command, CommandEnvelope, Priority, Role, State, TicketId};
use uuid::Uuid;

use crate::DemoConfig;
use crate::backend::{Backend, Refused, Snapshot};
use crate::workload::{GeneratedTicket, draft_for};

/// A clock that runs `speed` times faster than the wall clock, so that
/// LLM calls of seconds and leases of a minute fit in a short demo.
#[derive(Debug)]
pub struct ScaledClock {
    origin: Instant,
    origin_sim: DateTime<Utc>,
    speed: f64,
}

impl ScaledClock {
    /// A clock starting now, running `speed` times faster than real time.
    pub fn new(speed: f64) -> Self {
        ScaledClock {
            origin: Instant::now(),
            origin_sim: Utc::now(),
            speed,
        }
    }

    /// The real time `simulated` seconds take.
    pub fn real(&self, simulated: f64) -> Duration {
        Duration::from_secs_f64((simulated / self.speed).max(0.0))
    }
}

impl Clock for ScaledClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = self.origin.elapsed().as_secs_f64() * self.speed;
        self.origin_sim + chrono::Duration::microseconds((elapsed * 1e6) as i64)
    }
}

/// Counters the agents keep as they go.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) tasks: AtomicU64,
    pub(crate) crashes: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) invalid_outputs: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) claim_races_lost: AtomicU64,
    pub(crate) stale_decisions: AtomicU64,
    pub(crate) late_writes_attempted: AtomicU64,
    pub(crate) late_writes_rejected: AtomicU64,
    pub(crate) late_writes_accepted: AtomicU64,
    pub(crate) retries_sent: AtomicU64,
    pub(crate) duplicates_suppressed: AtomicU64,
    pub(crate) duplicates_applied: AtomicU64,
    pub(crate) claims_expired: AtomicU64,
    pub(crate) errors: AtomicU64,
    /// Tickets whose opening was sent: the first this many of
    /// [`Shared::tickets`]. A run that `max_seconds` ends during the intake
    /// never writes the rest.
    pub(crate) openings_sent: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What every task records about acknowledged commands, for the auditor.
pub(crate) type Acks = Arc<std::sync::Mutex<Vec<crate::audit::Acknowledged>>>;

/// Shared by every simulated agent.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) clock: Arc<ScaledClock>,
    pub(crate) config: DemoConfig,
    pub(crate) tickets: Arc<Vec<(TicketId, GeneratedTicket)>>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) acks: Acks,
    pub(crate) stop: Arc<AtomicBool>,
}

impl Shared {
    /// Sleeps `simulated` seconds, waking early when the run stops, so
    /// that `--max-seconds` bounds the run even with long simulated waits.
    /// False if the run stopped.
    pub(crate) async fn pause(&self, simulated: f64) -> bool {
        let until = tokio::time::Instant::now() + self.clock.real(simulated);
        while !self.stop.load(Ordering::Relaxed) {
            let now = tokio::time::Instant::now();
            if now >= until {
                return true;
            }
            tokio::time::sleep((until - now).min(Duration::from_millis(100))).await;
        }
        false
    }

    pub(crate) async fn submit(
        &self,
        envelope: CommandEnvelope,
        snapshot: &Snapshot,
    ) -> Result<crate::backend::Accepted, Refused> {
        let ticket_id = envelope.ticket_id;
        let command_id = envelope.command_id;
        let result = self.backend.submit(envelope, snapshot).await;
        if let Ok(accepted) = &result {
            self.acks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(crate::audit::Acknowledged {
                    ticket_id,
                    command_id,
                    events: accepted.events.len(),
                });
        }
        if let Err(Refused::Failed(error)) = &result {
            tracing::warn!(%error, "a command failed");
            bump(&self.counters.errors);
        }
        result
    }

    fn generated(&self, ticket: TicketId) -> Option<&GeneratedTicket> {
        self.tickets
            .iter()
            .find(|(id, _)| *id == ticket)
            .map(|(_, generated)| generated)
    }

    /// A simulated LLM call: 2–10 s, mostly short.
    fn llm_latency(&self, rng: &mut fastrand::Rng) -> f64 {
        2.0 + rng.f64().powi(2) * 8.0
    }
}

fn start_command(role: Role) -> Command {
    match role {
        Role::Classifier => Command::StartClassification { lease_secs: None },
        Role::Drafter => Command::StartDrafting { lease_secs: None },
        _ => Command::StartEscalation { lease_secs: None },
    }
}

/// The result an agent of `role` produces for a ticket, valid or not.
fn result_command(
    role: Role,
    claim_id: Uuid,
    generated: Option<&GeneratedTicket>,
    valid: bool,
    rng: &mut fastrand::Rng,
) -> Command {
    match role {
        Role::Classifier => {
            let category = match (valid, generated) {
                (true, Some(ticket)) => ticket.category.to_owned(),
                (true, None) => "other".to_owned(),
                // A hallucinated answer: a category nobody configured, or a
                // confidence outside [0, 1].
                (false, _) if rng.bool() => "refund_fraud_probably".to_owned(),
                (false, _) => "billing".to_owned(),
            };
            let confidence = if valid || category != "billing" {
                0.55 + rng.f64() * 0.45
            } else {
                1.7
            };
            Command::Classify {
                claim_id,
                category,
                priority: Priority::ALL[rng.usize(0..Priority::ALL.len())],
                confidence,
            }
        }
        Role::Drafter => Command::SubmitDraft {
            claim_id,
            body: match (valid, generated) {
                (true, Some(ticket)) => draft_for(ticket),
                (true, None) => "Hi, thanks for writing; we are on it.".to_owned(),
                (false, _) => "   ".to_owned(),
            },
        },
        _ => match rng.u8(0..100) {
            0..=84 => Command::Resolve {
                claim_id: Some(claim_id),
                resolution: "sent the draft".to_owned(),
            },
            85..=92 => Command::RejectDraft {
                claim_id: Some(claim_id),
                reason: "the draft promises a refund policy we do not have".to_owned(),
            },
            _ => Command::EscalateToHuman {
                claim_id,
                reason: "the customer threatens legal action".to_owned(),
            },
        },
    }
}

/// One AI agent: claim, think, maybe fail, submit.
pub(crate) async fn agent(shared: Shared, role: Role, index: usize) {
    let me = Agent {
        id: format!("{role}-{index}"),
        role,
        model: Some("sim-llm-1".to_owned()),
        prompt_version: Some(format!("{role}-v3")),
    };
    let mut rng = fastrand::Rng::with_seed(shared.config.seed ^ ((index as u64 + 1) * 0x9e37_79b9) ^ role as u64);
    let config = &shared.config;
    while !shared.stop.load(Ordering::Relaxed) {
        let queue = shared.backend.queue(role, 4).await;
        if queue.is_empty() {
            shared.pause(0.5).await;
            continue;
        }
        // Agents pick among the oldest few: two of them often pick the same.
        let snapshot = &queue[rng.usize(0..queue.len().min(3))];
        // Reading the ticket into the prompt takes a moment.
        shared.pause(0.2 + rng.f64()).await;
        let start = CommandEnvelope::new(snapshot.ticket_id, me.clone(), start_command(role));
        let claim_id = start.command_id;
        let claimed = match shared.submit(start, snapshot).await {
            Ok(accepted) => accepted,
            Err(Refused::Stale) => {
                bump(&shared.counters.claim_races_lost);
                continue;
            }
            // Another agent claimed it first (the read model had not shown
            // it yet): the table refuses the second claim.
            Err(Refused::Rejected("invalid_transition")) => {
                bump(&shared.counters.claim_races_lost);
                continue;
            }
            Err(Refused::Rejected(_)) => continue,
            Err(Refused::Failed(_)) => continue,
        };
        bump(&shared.counters.tasks);
        let mut ticket = snapshot.ticket.clone();
        for event in &claimed.events {
            ticket = triage_domain::evolve(ticket, event);
        }
        let held = Snapshot {
            ticket_id: snapshot.ticket_id,
            revision: claimed.revision,
            ticket,
            read_at: shared.clock.now(),
        };
        let roll = rng.f64();
        let crash = roll < config.crash_rate;
        let timeout = !crash && roll < config.crash_rate + config.timeout_rate;
        let invalid = !crash && !timeout && roll < config.crash_rate + config.timeout_rate + config.invalid_rate;
        if crash {
            // The agent process dies holding the claim; the sweeper reclaims it.
            bump(&shared.counters.crashes);
            continue;
        }
        let think = if timeout {
            // The model call hangs past the lease; the agent writes late.
            bump(&shared.counters.timeouts);
            f64::from(config.lease_secs) + 5.0 + rng.f64() * 20.0
        } else {
            shared.llm_latency(&mut rng)
        };
        if !shared.pause(think).await {
            // The run is over: the result would come after its end.
            break;
        }
        let generated = shared.generated(snapshot.ticket_id);
        let result = CommandEnvelope::new(
            snapshot.ticket_id,
            me.clone(),
            result_command(role, claim_id, generated, !invalid, &mut rng),
        );
        if timeout {
            bump(&shared.counters.late_writes_attempted);
        }
        match shared.submit(result.clone(), &held).await {
            Ok(_) if timeout => {
                bump(&shared.counters.late_writes_accepted);
            }
            Ok(_) => {
                bump(&shared.counters.completed);
                // The acknowledgement got lost on the way back: send the
                // same command (same id) again.
                if rng.f64() < config.retry_rate {
                    bump(&shared.counters.retries_sent);
                    match shared.submit(result, &held).await {
                        Ok(again) if again.duplicate => bump(&shared.counters.duplicates_suppressed),
                        Ok(_) => bump(&shared.counters.duplicates_applied),
                        Err(_) => {}
                    }
                }
            }
            Err(_) if timeout => bump(&shared.counters.late_writes_rejected),
            Err(Refused::Rejected("invalid_input")) => {
                bump(&shared.counters.invalid_outputs);
                // Give the claim back so another attempt can be made.
                let release = CommandEnvelope::new(
                    snapshot.ticket_id,
                    me.clone(),
                    Command::ReleaseClaim {
                        claim_id,
                        reason: "the model's output failed validation".to_owned(),
                    },
                );
                let _ = shared.submit(release, &held).await;
            }
            Err(Refused::Stale) => bump(&shared.counters.stale_decisions),
            Err(_) => {}
        }
    }
}

/// A human operator: resolves tickets handed to a human.
pub(crate) async fn operator(shared: Shared, index: usize) {
    let me = Agent::new(format!("operator-{index}"), Role::Operator);
    let mut rng = fastrand::Rng::with_seed(shared.config.seed ^ 0x0be7_a70e ^ index as u64);
    while !shared.stop.load(Ordering::Relaxed) {
        let queue = shared.backend.queue(Role::Operator, 4).await;
        let Some(snapshot) = queue.first() else {
            shared.pause(1.0).await;
            continue;
        };
        // A human reads the thread and calls the customer.
        shared.pause(5.0 + rng.f64() * 10.0).await;
        let resolve = CommandEnvelope::new(
            snapshot.ticket_id,
            me.clone(),
            Command::Resolve {
                claim_id: None,
                resolution: "called the customer and sorted it out".to_owned(),
            },
        );
        if let Err(Refused::Stale) = shared.submit(resolve, snapshot).await {
            bump(&shared.counters.stale_decisions);
        }
    }
}

/// The lease sweeper: expires claims whose lease ran out.
pub(crate) async fn sweeper(shared: Shared) {
    let me = Agent::new("lease-sweeper", Role::System);
    while !shared.stop.load(Ordering::Relaxed) {
        let now = shared.clock.now();
        for snapshot in shared.backend.expired_claims(now, 32).await {
            let Some(claim) = &snapshot.ticket.claim else { continue };
            let expire = CommandEnvelope::new(
                snapshot.ticket_id,
                me.clone(),
                Command::ExpireClaim {
                    claim_id: claim.claim_id,
                },
            );
            match shared.submit(expire, &snapshot).await {
                Ok(_) => bump(&shared.counters.claims_expired),
                Err(Refused::Stale) => bump(&shared.counters.stale_decisions),
                Err(_) => {}
            }
        }
        shared.pause(2.0).await;
    }
}

/// Whether every ticket is resolved.
pub(crate) fn all_resolved(counts: &std::collections::BTreeMap<State, u64>, tickets: usize) -> bool {
    counts.get(&State::Resolved).copied().unwrap_or(0) as usize >= tickets
}
