//! The two designs the simulated agents can work against: Triage (events
//! with expected revisions) and the naive shared record.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use triage_command_handler::{Clock, CommandError, CommandHandler};
use triage_domain::{
    CommandEnvelope, Context, Event, EventMetadata, Policy, Role, State, Ticket, TicketId, decide, event_id, evolve,
    queue_states,
};
use triage_projections::{Projector, TicketRow, TicketsView};

use crate::audit::LoggedEvent;

/// A ticket as an agent saw it.
#[derive(Clone, Debug)]
pub(crate) struct Snapshot {
    pub(crate) ticket_id: TicketId,
    /// The revision the agent decides on.
    pub(crate) revision: u64,
    pub(crate) ticket: Ticket,
    /// When the agent read it.
    pub(crate) read_at: DateTime<Utc>,
}

/// An accepted command, as the agent learns it.
#[derive(Clone, Debug)]
pub(crate) struct Accepted {
    pub(crate) revision: u64,
    pub(crate) events: Vec<Event>,
    pub(crate) duplicate: bool,
}

/// Why a command was not accepted.
#[derive(Clone, Debug)]
pub(crate) enum Refused {
    /// The ticket moved on since the agent looked (Triage only).
    Stale,
    /// The domain refused it, with the rejection code.
    Rejected(&'static str),
    /// Something else failed.
    Failed(String),
}

#[async_trait]
pub(crate) trait Backend: Send + Sync {
    /// Tickets waiting for `role`, oldest first.
    async fn queue(&self, role: Role, limit: usize) -> Vec<Snapshot>;
    /// Tickets whose claim lease ran out by `now`.
    async fn expired_claims(&self, now: DateTime<Utc>, limit: usize) -> Vec<Snapshot>;
    /// Sends a command the agent decided on `snapshot`.
    async fn submit(&self, envelope: CommandEnvelope, snapshot: &Snapshot) -> Result<Accepted, Refused>;
    /// The states of these tickets (this run's), counted.
    async fn counts(&self, tickets: &[TicketId]) -> BTreeMap<State, u64>;
    /// From now on, queues and expired claims hold only these tickets (this
    /// run's): a store given to the demo may hold other tickets, and the
    /// simulated agents must never work those.
    fn keep_to(&self, _tickets: &[TicketId]) {}
}

/// Triage: the command handler for writes, the read model for queues.
pub(crate) struct TriageBackend {
    pub(crate) handler: CommandHandler,
    pub(crate) projector: Projector,
    /// This run's tickets, once known; see [`Backend::keep_to`].
    pub(crate) own: std::sync::OnceLock<HashSet<TicketId>>,
}

impl TriageBackend {
    /// `read(limit)` narrowed to this run's tickets, at most `limit` of
    /// them, in `read`'s order. A first read of `limit` rows is enough
    /// unless it holds other tickets; then the whole list is read and
    /// filtered, which only a store shared with other tickets pays for.
    fn own_rows(
        &self,
        limit: usize,
        read: impl Fn(&TicketsView<'_>, usize) -> rusqlite::Result<Vec<TicketRow>>,
    ) -> Vec<TicketRow> {
        let read = |limit| {
            self.projector
                .read("tickets", |conn, slot| read(&TicketsView::new(conn, slot), limit))
                .unwrap_or_default()
        };
        let rows = read(limit);
        let Some(own) = self.own.get() else { return rows };
        let is_own = |row: &TicketRow| row.ticket.id.is_some_and(|id| own.contains(&id));
        if rows.iter().all(is_own) {
            return rows;
        }
        read(usize::MAX).into_iter().filter(is_own).take(limit).collect()
    }
}

fn snapshot(row: triage_projections::TicketRow, read_at: DateTime<Utc>) -> Option<Snapshot> {
    Some(Snapshot {
        ticket_id: row.ticket.id?,
        revision: row.revision,
        ticket: row.ticket,
        read_at,
    })
}

#[async_trait]
impl Backend for TriageBackend {
    async fn queue(&self, role: Role, limit: usize) -> Vec<Snapshot> {
        let rows = self.own_rows(limit, |view, limit| {
            if role == Role::Operator {
                view.list(Some(State::NeedsHuman), limit)
            } else {
                view.work_queue(role, limit)
            }
        });
        let now = self.handler.clock().now();
        rows.into_iter().filter_map(|row| snapshot(row, now)).collect()
    }

    async fn expired_claims(&self, now: DateTime<Utc>, limit: usize) -> Vec<Snapshot> {
        self.own_rows(limit, |view, limit| view.expired_claims(now, limit))
            .into_iter()
            .filter_map(|row| snapshot(row, now))
            .collect()
    }

    async fn submit(&self, envelope: CommandEnvelope, snapshot: &Snapshot) -> Result<Accepted, Refused> {
        // The agent says which revision it decided on, so a decision on a
        // ticket that moved on is refused instead of re-applied.
        let envelope = if snapshot.ticket.exists() {
            envelope.at_revision(snapshot.revision)
        } else {
            envelope
        };
        match self.handler.handle(envelope).await {
            Ok(accepted) => Ok(Accepted {
                revision: accepted.revision,
                events: accepted.events,
                duplicate: accepted.duplicate,
            }),
            Err(CommandError::StaleRevision { .. }) => Err(Refused::Stale),
            Err(CommandError::Rejected { rejection, .. }) => Err(Refused::Rejected(rejection.code())),
            Err(other) => Err(Refused::Failed(other.to_string())),
        }
    }

    fn keep_to(&self, tickets: &[TicketId]) {
        // Set once, by the one run that owns this backend.
        let _ = self.own.set(tickets.iter().copied().collect());
    }

    async fn counts(&self, tickets: &[TicketId]) -> BTreeMap<State, u64> {
        self.projector
            .read("tickets", |conn, slot| {
                let view = TicketsView::new(conn, slot);
                let mut counts = BTreeMap::new();
                for id in tickets {
                    if let Some(state) = view.get(*id)?.and_then(|row| row.ticket.state) {
                        *counts.entry(state).or_default() += 1;
                    }
                }
                Ok(counts)
            })
            .unwrap_or_default()
    }
}

/// One shared mutable record per ticket, read and written whole, with no
/// revision check: the design Triage replaces.
#[derive(Debug)]
pub(crate) struct NaiveBackend {
    records: Mutex<HashMap<TicketId, NaiveRecord>>,
    /// Every write, in the order it landed, for the auditor.
    log: Mutex<BTreeMap<TicketId, Vec<LoggedEvent>>>,
    clock: Arc<dyn Clock>,
    policy: Policy,
}

#[derive(Clone, Debug)]
struct NaiveRecord {
    ticket: Ticket,
    /// Writes so far, counted in events.
    version: u64,
    since: DateTime<Utc>,
}

impl NaiveBackend {
    pub(crate) fn new(clock: Arc<dyn Clock>, policy: Policy) -> Self {
        NaiveBackend {
            records: Mutex::new(HashMap::new()),
            log: Mutex::new(BTreeMap::new()),
            clock,
            policy,
        }
    }

    fn records(&self) -> MutexGuard<'_, HashMap<TicketId, NaiveRecord>> {
        self.records.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The write log, per ticket.
    pub(crate) fn log(&self) -> BTreeMap<TicketId, Vec<LoggedEvent>> {
        self.log.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Whether each record equals the fold of its own write log.
    pub(crate) fn records_match_log(&self) -> bool {
        let log = self.log();
        self.records().iter().all(|(id, record)| {
            let folded = log.get(id).map(|events| {
                events
                    .iter()
                    .fold(Ticket::default(), |ticket, logged| evolve(ticket, &logged.event))
            });
            folded
                .as_ref()
                .map(|ticket| (ticket.state, &ticket.claim, ticket.attempts, ticket.drafts_rejected))
                == Some((
                    record.ticket.state,
                    &record.ticket.claim,
                    record.ticket.attempts,
                    record.ticket.drafts_rejected,
                ))
        })
    }

    fn list(&self, keep: impl Fn(&NaiveRecord) -> bool, limit: usize) -> Vec<Snapshot> {
        let records = self.records();
        let mut found: Vec<(DateTime<Utc>, Snapshot)> = records
            .iter()
            .filter(|(_, record)| keep(record))
            .map(|(id, record)| {
                (
                    record.since,
                    Snapshot {
                        ticket_id: *id,
                        revision: record.version.saturating_sub(1),
                        ticket: record.ticket.clone(),
                        read_at: self.clock.now(),
                    },
                )
            })
            .collect();
        found.sort_by_key(|(since, snapshot)| (*since, snapshot.ticket_id));
        found.into_iter().take(limit).map(|(_, snapshot)| snapshot).collect()
    }
}

#[async_trait]
impl Backend for NaiveBackend {
    async fn queue(&self, role: Role, limit: usize) -> Vec<Snapshot> {
        let states = if role == Role::Operator {
            vec![State::NeedsHuman]
        } else {
            queue_states(role)
        };
        self.list(|record| record.ticket.state.is_some_and(|s| states.contains(&s)), limit)
    }

    async fn expired_claims(&self, now: DateTime<Utc>, limit: usize) -> Vec<Snapshot> {
        self.list(
            |record| {
                record
                    .ticket
                    .claim
                    .as_ref()
                    .is_some_and(|claim| claim.lease_expires_at <= now)
            },
            limit,
        )
    }

    async fn submit(&self, envelope: CommandEnvelope, snapshot: &Snapshot) -> Result<Accepted, Refused> {
        // The agent checks the transition, but on the copy it read earlier,
        // as of when it read it: nothing on the write path checks anything.
        let now = self.clock.now();
        let context = Context {
            now: snapshot.read_at,
            ticket_id: envelope.ticket_id,
            agent: &envelope.agent,
            command_id: envelope.command_id,
            policy: &self.policy,
        };
        let events = decide(&snapshot.ticket, &envelope.command, &context)
            .map_err(|rejection| Refused::Rejected(rejection.code()))?;
        let written = events.iter().fold(snapshot.ticket.clone(), evolve);
        let seen = if snapshot.ticket.exists() {
            snapshot.revision + 1
        } else {
            0
        };
        // Read-modify-write with no check: whatever landed since the agent
        // read is overwritten. The write log is appended under the same lock,
        // so it holds the writes in the order they landed.
        let mut records = self.records();
        let record = records.entry(envelope.ticket_id).or_insert(NaiveRecord {
            ticket: Ticket::default(),
            version: 0,
            since: now,
        });
        if record.ticket.state != written.state {
            record.since = now;
        }
        record.ticket = written;
        record.version += events.len() as u64;
        let version = record.version;
        let mut log = self.log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let entries = log.entry(envelope.ticket_id).or_default();
        for (index, event) in events.iter().enumerate() {
            entries.push(LoggedEvent {
                id: event_id(envelope.command_id, index as u32),
                event: event.clone(),
                metadata: EventMetadata {
                    schema_version: event.schema_version(),
                    command_id: envelope.command_id,
                    correlation_id: envelope.command_id,
                    causation_id: envelope.command_id,
                    agent: envelope.agent.clone(),
                    traceparent: None,
                    recorded_at: now,
                    decided_at_revision: snapshot.ticket.exists().then_some(snapshot.revision),
                    sender_saw_revision: None,
                    command_digest: None,
                },
                seen,
            });
        }
        drop(log);
        drop(records);
        Ok(Accepted {
            revision: version.saturating_sub(1),
            events,
            duplicate: false,
        })
    }

    async fn counts(&self, tickets: &[TicketId]) -> BTreeMap<State, u64> {
        let records = self.records();
        let mut counts = BTreeMap::new();
        for state in tickets.iter().filter_map(|id| records.get(id)?.ticket.state) {
            *counts.entry(state).or_default() += 1;
        }
        counts
    }
}
