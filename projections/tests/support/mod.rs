//! Shared by the projection test binaries: digests of live models, clean
//! rebuilds to compare with, and a deterministic workload that drives the
//! command handler through every kind of event the projections read
//! (refusals, stale decisions, take-overs, expired claims, …).

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use triage_command_handler::{CommandHandler, ManualClock};
use triage_domain::{Agent, Command, CommandEnvelope, Priority, Role, State, TicketId};
use triage_event_store::{EventStore, ReadAll};
use triage_projections::{Projector, ProjectorOptions, ReadModelDb, decode};
use uuid::Uuid;

/// The digest of the live generation of `name`, per key.
pub fn digest(projector: &Projector, name: &str) -> BTreeMap<String, u64> {
    let projection = projector
        .projections()
        .iter()
        .find(|projection| projection.name() == name)
        .unwrap_or_else(|| panic!("the projector has no projection {name}"))
        .clone();
    projector
        .read(name, |conn, slot| projection.digest(conn, slot))
        .unwrap_or_else(|error| panic!("digest of {name}: {error}"))
}

/// Digests of `tickets` and `stats` after a rebuild from scratch into a
/// fresh in-memory read-model database.
pub async fn clean_digests(store: Arc<dyn EventStore>) -> [BTreeMap<String, u64>; 2] {
    clean_digests_with(store, ProjectorOptions::default()).await
}

/// [`clean_digests`] with projector options.
pub async fn clean_digests_with(store: Arc<dyn EventStore>, options: ProjectorOptions) -> [BTreeMap<String, u64>; 2] {
    let fresh = Projector::new(store, ReadModelDb::in_memory().unwrap()).with_options(options);
    fresh.catch_up().await.expect("a clean rebuild succeeds");
    [digest(&fresh, "tickets"), digest(&fresh, "stats")]
}

/// Records in the log that projections read and can decode (ticket and
/// rejection streams), and the last position of the log.
pub async fn projected_events(store: &dyn EventStore) -> (u64, Option<triage_event_store::Position>) {
    let mut count = 0;
    let mut from = None;
    loop {
        let mut options = ReadAll::forwards(1000);
        if let Some(position) = from {
            options = options.from_position(position);
        }
        let page = store.read_all(options).await.unwrap();
        let fresh: Vec<_> = page.into_iter().filter(|record| Some(record.position) > from).collect();
        let Some(last) = fresh.last() else { break };
        from = Some(last.position);
        count += fresh
            .iter()
            .filter(|record| matches!(decode(record), Ok(Some(_))))
            .count() as u64;
    }
    (count, from)
}

/// One step of a workload.
#[derive(Clone, Debug)]
pub enum Step {
    /// Open a ticket.
    Open,
    /// Send a command to ticket `ticket % tickets`; `pick` chooses which
    /// (mostly the right one for its state, sometimes a wrong or stale one).
    Act { ticket: usize, pick: u8 },
    /// Move the clock forward, in seconds.
    Advance(u32),
    /// Expire every claim whose lease ran out, as the lease sweeper does.
    Sweep,
}

/// Drives a command handler with a manual clock.
#[derive(Debug)]
pub struct Workload {
    pub handler: CommandHandler,
    pub clock: Arc<ManualClock>,
    pub tickets: Vec<TicketId>,
    /// Commands accepted, refused (any error).
    pub accepted: u64,
    pub refused: u64,
}

fn agent(id: impl Into<String>, role: Role) -> Agent {
    Agent::new(id, role)
}

/// The role of an agent named by [`Workload`].
fn role_of(agent_id: &str) -> Role {
    match agent_id.split('-').next() {
        Some("classifier") => Role::Classifier,
        Some("drafter") => Role::Drafter,
        Some("escalator") => Role::Escalator,
        Some("operator") => Role::Operator,
        _ => Role::System,
    }
}

impl Workload {
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        let clock = Arc::new(ManualClock::new(Utc.with_ymd_and_hms(2026, 4, 1, 9, 0, 0).unwrap()));
        Workload {
            handler: CommandHandler::new(store).with_clock(clock.clone()),
            clock,
            tickets: Vec::new(),
            accepted: 0,
            refused: 0,
        }
    }

    /// `rounds` pseudo-random steps from `seed` (opening a ticket every
    /// `open_every` rounds), without proptest.
    pub async fn random(&mut self, rounds: usize, open_every: usize, seed: u64) {
        let mut rng = seed | 1;
        for round in 0..rounds {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let step = match round % 10 {
                _ if round % open_every == 0 => Step::Open,
                0 => Step::Advance((rng % 60) as u32 + 1),
                1 => Step::Sweep,
                _ => Step::Act {
                    // Mostly the newest tickets, so that most get finished.
                    ticket: self.tickets.len().saturating_sub(1 + (rng >> 8) as usize % 8),
                    pick: rng as u8,
                },
            };
            self.run(&step).await;
        }
    }

    async fn send(&mut self, envelope: CommandEnvelope) {
        match self.handler.handle(envelope).await {
            Ok(_) => self.accepted += 1,
            Err(_) => self.refused += 1,
        }
    }

    pub async fn open(&mut self) -> TicketId {
        let envelope = CommandEnvelope::new(
            TicketId::new(),
            agent("intake-1", Role::Intake),
            Command::OpenTicket {
                subject: format!("Ticket {}", self.tickets.len()),
                body: "Something is wrong.".into(),
                customer: Some("ada@example.com".into()),
            },
        );
        let id = envelope.ticket_id;
        self.send(envelope).await;
        self.tickets.push(id);
        id
    }

    pub async fn run(&mut self, step: &Step) {
        match *step {
            Step::Open => {
                self.open().await;
            }
            Step::Advance(seconds) => self.clock.advance(chrono::Duration::seconds(i64::from(seconds))),
            Step::Sweep => {
                // The newest tickets: the older ones are mostly finished.
                let recent: Vec<TicketId> = self.tickets.iter().rev().take(16).copied().collect();
                for ticket in recent {
                    let Ok(loaded) = self.handler.load(ticket).await else {
                        continue;
                    };
                    let Some(claim) = loaded.ticket.claim else { continue };
                    if self.clock.now_utc() < claim.lease_expires_at {
                        continue;
                    }
                    let envelope = CommandEnvelope::new(
                        ticket,
                        agent("sweeper", Role::System),
                        Command::ExpireClaim {
                            claim_id: claim.claim_id,
                        },
                    );
                    self.send(envelope).await;
                }
            }
            Step::Act { ticket, pick } => {
                if self.tickets.is_empty() {
                    self.open().await;
                }
                let ticket = self.tickets[ticket % self.tickets.len()];
                // A ticket whose stream this build cannot read is skipped.
                let Ok(loaded) = self.handler.load(ticket).await else {
                    return;
                };
                let (Some(state), Some(revision)) = (loaded.ticket.state, loaded.revision) else {
                    return;
                };
                let claim = loaded.ticket.claim.clone();
                let holder = claim.as_ref().map(|claim| claim.agent_id.clone());
                let claim_id = claim.as_ref().map_or_else(Uuid::new_v4, |claim| claim.claim_id);
                let who = |stage: &str| format!("{stage}-{}", (pick >> 4) & 1);
                let lease_secs = Some(20 + u32::from(pick % 40));
                let holder_or = |stage: &str| holder.clone().unwrap_or_else(|| who(stage));
                let (agent_id, command) = match (pick % 8, state) {
                    // A command that does not fit the state: refused.
                    (0, _) => (who("drafter"), Command::StartDrafting { lease_secs }),
                    // A completion under someone else's (made-up) claim.
                    (1, _) => (
                        who("classifier"),
                        Command::Classify {
                            claim_id: Uuid::new_v4(),
                            category: "billing".into(),
                            priority: Priority::Normal,
                            confidence: 0.5,
                        },
                    ),
                    (2, _) => (who("operator"), Command::TakeOver { lease_secs }),
                    (3, _) if holder.is_some() => (
                        holder_or("classifier"),
                        if pick & 0x80 == 0 {
                            Command::ReleaseClaim {
                                claim_id,
                                reason: "model timed out".into(),
                            }
                        } else {
                            Command::ExtendLease { claim_id, lease_secs }
                        },
                    ),
                    (_, State::New) => (who("classifier"), Command::StartClassification { lease_secs }),
                    (_, State::Classifying) => (
                        holder_or("classifier"),
                        Command::Classify {
                            claim_id,
                            category: if pick > 240 { "astrology" } else { "billing" }.into(),
                            priority: if pick & 0x40 == 0 {
                                Priority::Normal
                            } else {
                                Priority::High
                            },
                            confidence: f64::from(pick) / 255.0,
                        },
                    ),
                    (_, State::Classified) => (who("drafter"), Command::StartDrafting { lease_secs }),
                    (_, State::Drafting) => (
                        holder_or("drafter"),
                        Command::SubmitDraft {
                            claim_id,
                            body: "Here is what happened.".into(),
                        },
                    ),
                    (_, State::DraftReady) => (who("escalator"), Command::StartEscalation { lease_secs }),
                    (_, State::Escalating) => (
                        holder_or("escalator"),
                        match pick % 3 {
                            0 => Command::Resolve {
                                claim_id: Some(claim_id),
                                resolution: "sent the draft".into(),
                            },
                            1 => Command::RejectDraft {
                                claim_id: Some(claim_id),
                                reason: "too vague".into(),
                            },
                            _ => Command::EscalateToHuman {
                                claim_id,
                                reason: "angry customer".into(),
                            },
                        },
                    ),
                    (_, State::NeedsHuman | State::Resolved) => (
                        who("operator"),
                        Command::Resolve {
                            claim_id: None,
                            resolution: "called the customer".into(),
                        },
                    ),
                };
                let role = role_of(&agent_id);
                let mut envelope = CommandEnvelope::new(ticket, agent(agent_id, role), command);
                envelope = match pick % 16 {
                    // A decision on a revision the ticket has moved past.
                    5 if revision > 0 => envelope.at_revision(revision - 1),
                    6 | 7 | 13 => envelope,
                    _ => envelope.at_revision(revision),
                };
                let retry = pick % 32 == 9;
                self.send(envelope.clone()).await;
                if retry {
                    // A retry with the same command id: answered as a duplicate.
                    self.send(envelope).await;
                }
            }
        }
    }
}

/// Extension: the manual clock's time without importing the `Clock` trait
/// into every test.
trait NowUtc {
    fn now_utc(&self) -> chrono::DateTime<Utc>;
}

impl NowUtc for ManualClock {
    fn now_utc(&self) -> chrono::DateTime<Utc> {
        triage_command_handler::Clock::now(self)
    }
}

/// A rebuild's progress callback that holds the rebuild once it has
/// replayed everything there was, runs `move_on` (more events, applied to
/// the live model by someone else) and only then lets the rebuild go on to
/// its swap. Needs a multi-threaded runtime. The handle ends with
/// `move_on`.
pub fn hold_at_head(
    move_on: impl std::future::Future<Output = ()> + Send + 'static,
) -> (
    impl FnMut(triage_projections::RebuildProgress) + Send + 'static,
    tokio::task::JoinHandle<()>,
) {
    let (moved_on, wait_for_it) = std::sync::mpsc::channel::<()>();
    let (go, mut started) = tokio::sync::mpsc::channel::<()>(1);
    let helper = tokio::spawn(async move {
        started.recv().await.expect("the rebuild reached the head");
        move_on.await;
        moved_on.send(()).unwrap();
    });
    let mut fired = false;
    let progress = move |progress: triage_projections::RebuildProgress| {
        if !fired && progress.done >= progress.total {
            fired = true;
            go.try_send(()).unwrap();
            tokio::task::block_in_place(|| wait_for_it.recv().unwrap());
        }
    };
    (progress, helper)
}
