//! The `stats` read model: tickets per state, stage latencies, refusals and
//! conflicts, expired claims and outcomes per agent.

use rustc_hash::FxHashMap;
use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;
use triage_domain::{Event, State, TicketId};

use crate::ProjectionError;
use crate::db::Slot;
use crate::projection::{Payload, ProjectedEvent, Projection, digest_rows};

/// The `stats` projection.
#[derive(Clone, Copy, Debug, Default)]
pub struct StatsProjection;

/// The stages whose latency is measured: from the moment a ticket became
/// available for the stage to the moment the stage completed.
pub const STAGES: [&str; 5] = ["classify", "draft", "review", "human", "end_to_end"];

/// Per-ticket progress the projection needs to time stages.
#[derive(Clone, Debug, Default)]
pub(crate) struct Progress {
    pub(crate) state: Option<State>,
    /// Decision time (µs) of `TicketOpened`.
    pub(crate) opened_at: i64,
    /// Decision time (µs) the current stage became available.
    pub(crate) stage_started_at: i64,
    pub(crate) claim_agent: Option<String>,
    /// The role the claim was taken in: an expiry or a takeover is
    /// charged to the holder in that role.
    pub(crate) claim_role: Option<String>,
    /// Stage durations completed in this batch: (stage, milliseconds).
    pub(crate) finished: Vec<(&'static str, i64)>,
}

impl Projection for StatsProjection {
    fn name(&self) -> &'static str {
        "stats"
    }

    /// 2: outcomes are kept per (agent, role): an agent with several
    /// roles had all of them counted under its last one. Claims remember
    /// their role (`claim_role`).
    fn version(&self) -> u32 {
        2
    }

    fn tables(&self) -> &'static [&'static str] {
        &["stats_counters", "stats_tickets", "stats_latency", "stats_agents"]
    }

    fn create(&self, conn: &Connection, slot: &Slot) -> rusqlite::Result<()> {
        let counters = slot.table("stats_counters");
        let tickets = slot.table("stats_tickets");
        let latency = slot.table("stats_latency");
        let agents = slot.table("stats_agents");
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {counters} (name TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT, WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS {tickets} (
                 ticket_id TEXT PRIMARY KEY, state TEXT NOT NULL, opened_at INTEGER NOT NULL,
                 stage_started_at INTEGER NOT NULL, claim_agent TEXT, claim_role TEXT) STRICT, WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS {latency} (
                 stage TEXT NOT NULL, ticket_id TEXT NOT NULL, ms INTEGER NOT NULL) STRICT;
             CREATE TABLE IF NOT EXISTS {agents} (
                 agent_id TEXT NOT NULL, role TEXT NOT NULL, outcome TEXT NOT NULL, count INTEGER NOT NULL,
                 PRIMARY KEY (agent_id, role, outcome)) STRICT, WITHOUT ROWID;"
        ))
    }

    fn create_indexes(&self, conn: &Connection, slot: &Slot) -> rusqlite::Result<()> {
        // The percentiles of `summary` walk this index.
        let latency = slot.table("stats_latency");
        conn.execute_batch(&format!(
            "CREATE INDEX IF NOT EXISTS {latency}_stage ON {latency} (stage, ms);"
        ))
    }

    fn apply(&self, conn: &Connection, slot: &Slot, events: &[ProjectedEvent]) -> Result<(), ProjectionError> {
        let sql = |error| ProjectionError::sqlite("update statistics", error);
        let tickets_table = slot.table("stats_tickets");
        let StatsDelta {
            counters,
            agents,
            tickets,
        } = StatsDelta::fold(events, |id| load_progress(conn, &tickets_table, id)).map_err(sql)?;
        // Each statement is prepared once per page: looking one up in the
        // statement cache per row (its SQL formatted and hashed each time)
        // cost a sixth of a rebuild's writing.
        let mut add_to_counter = conn
            .prepare_cached(&format!(
                "INSERT INTO {} (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET value = value + ?2",
                slot.table("stats_counters")
            ))
            .map_err(sql)?;
        for (name, delta) in counters {
            add_to_counter.execute((name, delta)).map_err(sql)?;
        }
        let mut add_to_agent = conn
            .prepare_cached(&format!(
                "INSERT INTO {} (agent_id, role, outcome, count) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (agent_id, role, outcome) DO UPDATE SET count = count + ?4",
                slot.table("stats_agents")
            ))
            .map_err(sql)?;
        for ((agent, role, what), delta) in agents {
            add_to_agent.execute((agent, role, what, delta)).map_err(sql)?;
        }
        let mut put_ticket = conn.prepare_cached(&put_progress(&tickets_table)).map_err(sql)?;
        let latency_table = slot.table("stats_latency");
        let mut latencies: Vec<(&'static str, &str, i64)> = Vec::new();
        let ids: Vec<String> = tickets.iter().map(|(id, _)| id.to_string()).collect();
        for ((_, ticket), id) in tickets.iter().zip(&ids) {
            let Some(state) = ticket.state else { continue };
            put_ticket
                .execute((
                    id,
                    state.as_str(),
                    ticket.opened_at,
                    ticket.stage_started_at,
                    ticket.claim_agent.as_deref(),
                    ticket.claim_role.as_deref(),
                ))
                .map_err(sql)?;
            latencies.extend(ticket.finished.iter().map(|&(stage, ms)| (stage, id.as_str(), ms)));
        }
        insert_latencies(conn, &latency_table, &latencies).map_err(sql)?;
        Ok(())
    }

    fn digest(&self, conn: &Connection, slot: &Slot) -> rusqlite::Result<BTreeMap<String, u64>> {
        let mut digests = digest_rows(
            conn,
            &format!(
                "SELECT 'ticket ' || ticket_id, state, opened_at, stage_started_at, claim_agent, claim_role FROM {} \
                 ORDER BY ticket_id",
                slot.table("stats_tickets")
            ),
        )?;
        digests.extend(digest_rows(
            conn,
            &format!(
                "SELECT 'latency ' || ticket_id, stage, ms FROM {} ORDER BY ticket_id, stage, ms",
                slot.table("stats_latency")
            ),
        )?);
        digests.extend(digest_rows(
            conn,
            &format!(
                "SELECT 'counter ' || name, value FROM {} ORDER BY name",
                slot.table("stats_counters")
            ),
        )?);
        digests.extend(digest_rows(
            conn,
            &format!(
                "SELECT 'agent ' || agent_id || ' ' || role || ' ' || outcome, count FROM {} \
                 ORDER BY agent_id, role, outcome",
                slot.table("stats_agents")
            ),
        )?);
        Ok(digests)
    }
}

/// The statement that writes a ticket's progress: an update in place when
/// the row exists (`INSERT OR REPLACE` deleted it and inserted it again,
/// key and index entries included).
fn put_progress(table: &str) -> String {
    format!(
        "INSERT INTO {table} (ticket_id, state, opened_at, stage_started_at, claim_agent, claim_role) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
         ON CONFLICT (ticket_id) DO UPDATE SET state = excluded.state, opened_at = excluded.opened_at, \
         stage_started_at = excluded.stage_started_at, claim_agent = excluded.claim_agent, \
         claim_role = excluded.claim_role"
    )
}

/// Latency rows per `INSERT` statement. One statement per row spent most
/// of each row's cost in running the statement itself, not in its row.
const LATENCY_ROWS_PER_INSERT: usize = 64;

/// Appends `rows` (stage, ticket id, milliseconds) to `table`, many rows per
/// statement.
fn insert_latencies(conn: &Connection, table: &str, rows: &[(&'static str, &str, i64)]) -> rusqlite::Result<()> {
    let statement = |count: usize| {
        let values = vec!["(?, ?, ?)"; count].join(", ");
        format!("INSERT INTO {table} (stage, ticket_id, ms) VALUES {values}")
    };
    let mut chunks = rows.chunks_exact(LATENCY_ROWS_PER_INSERT);
    if chunks.len() > 0 {
        let mut full = conn.prepare_cached(&statement(LATENCY_ROWS_PER_INSERT))?;
        for chunk in &mut chunks {
            let params = chunk
                .iter()
                .flat_map(|(stage, id, ms)| [stage as &dyn rusqlite::ToSql, id, ms]);
            full.execute(rusqlite::params_from_iter(params))?;
        }
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        // Not cached: up to 63 different statements, one run each per page.
        let params = rest
            .iter()
            .flat_map(|(stage, id, ms)| [stage as &dyn rusqlite::ToSql, id, ms]);
        conn.execute(&statement(rest.len()), rusqlite::params_from_iter(params))?;
    }
    Ok(())
}

/// What one batch changes in the `stats` model, folded in memory: the
/// one place the statistics logic lives, written out by the SQLite and the
/// PostgreSQL read models alike.
#[derive(Debug, Default)]
pub(crate) struct StatsDelta {
    /// Counter name → increment.
    pub(crate) counters: BTreeMap<String, i64>,
    /// (agent, role, outcome) → increment. The role is the one the
    /// agent acted in ("" when no event says, as for a claim taken before
    /// a window of statistics began and not seeded).
    pub(crate) agents: BTreeMap<(String, String, String), i64>,
    /// Each ticket the batch touched, in first-touch order, with its
    /// progress after the batch (and the stage durations it completed).
    pub(crate) tickets: Vec<(TicketId, Progress)>,
}

impl StatsDelta {
    /// Folds a batch. `load` gives a ticket's stored progress; it is called
    /// once per ticket, the first time the batch touches it.
    pub(crate) fn fold<E>(
        events: &[ProjectedEvent],
        mut load: impl FnMut(TicketId) -> Result<Option<Progress>, E>,
    ) -> Result<StatsDelta, E> {
        let mut counters: BTreeMap<String, i64> = BTreeMap::new();
        let mut agents: BTreeMap<(String, String, String), i64> = BTreeMap::new();
        let mut progress: FxHashMap<TicketId, Progress> = FxHashMap::default();
        let mut order = Vec::new();
        // Looked up before a key is allocated: nearly every event finds its
        // counters there already.
        let mut count = |name: &str| match counters.get_mut(name) {
            Some(value) => *value += 1,
            None => {
                counters.insert(name.to_owned(), 1);
            }
        };
        // Counted under the role the agent acted in: a page applied at
        // once and the same events applied one by one (a rebuild and the
        // live model) add up to the same rows.
        let mut outcome = |agent: &str, role: &str, what: &str| {
            *agents
                .entry((agent.to_owned(), role.to_owned(), what.to_owned()))
                .or_insert(0) += 1;
        };
        for event in events {
            count("events");
            let agent = event.agent.id.as_str();
            let role = event.agent.role.as_str();
            let at = event.recorded_at.timestamp_micros();
            let domain_event = match &event.payload {
                Payload::Rejected(rejected) => {
                    count("rejections");
                    count(&format!("rejections.{}", rejected.code));
                    if rejected.code == "stale_revision" {
                        count("conflicts");
                    }
                    outcome(agent, role, "refused");
                    continue;
                }
                Payload::Ticket(domain_event) => domain_event,
            };
            let ticket = match progress.entry(event.ticket_id) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    order.push(event.ticket_id);
                    let stored = if event.opens_ticket() {
                        None
                    } else {
                        load(event.ticket_id)?
                    };
                    entry.insert(stored.unwrap_or_default())
                }
            };
            // A stage whose start is not in the events seen (a window that
            // begins mid-ticket) has no duration to record.
            let finish = |ticket: &mut Progress, stage: &'static str, since: i64| {
                if since > 0 {
                    ticket.finished.push((stage, (at - since).max(0) / 1000));
                }
            };
            match domain_event {
                Event::TicketOpened { .. } => {
                    count("tickets_opened");
                    ticket.opened_at = at;
                    ticket.stage_started_at = at;
                    ticket.state = Some(State::New);
                }
                Event::ClassificationStarted { claim }
                | Event::DraftingStarted { claim }
                | Event::EscalationStarted { claim } => {
                    count("claims_taken");
                    outcome(agent, role, "claimed");
                    ticket.hold(&claim.agent_id, role);
                }
                Event::ClaimTakenOver { claim, .. } => {
                    count("claims_taken_over");
                    if let Some((previous, previous_role)) = ticket.release() {
                        outcome(&previous, &previous_role, "taken_over");
                    }
                    outcome(agent, role, "claimed");
                    ticket.hold(&claim.agent_id, role);
                }
                Event::TicketClassified { .. } => {
                    outcome(agent, role, "completed");
                    finish(ticket, "classify", ticket.stage_started_at);
                    ticket.stage_started_at = at;
                    ticket.release();
                }
                Event::DraftSubmitted { .. } => {
                    outcome(agent, role, "completed");
                    finish(ticket, "draft", ticket.stage_started_at);
                    ticket.stage_started_at = at;
                    ticket.release();
                }
                Event::DraftRejected { .. } => {
                    count("drafts_rejected");
                    outcome(agent, role, "rejected_draft");
                    finish(ticket, "review", ticket.stage_started_at);
                    ticket.stage_started_at = at;
                    ticket.release();
                }
                Event::EscalatedToHuman { claim_id, .. } => {
                    count("escalated_to_human");
                    if claim_id.is_some() {
                        outcome(agent, role, "handed_to_human");
                        finish(ticket, "review", ticket.stage_started_at);
                    } else {
                        count("poison_tickets");
                    }
                    ticket.stage_started_at = at;
                    ticket.release();
                }
                Event::TicketResolved { .. } => {
                    count("tickets_resolved");
                    outcome(agent, role, "resolved");
                    match ticket.state {
                        Some(State::NeedsHuman) => finish(ticket, "human", ticket.stage_started_at),
                        Some(State::Escalating | State::DraftReady) => {
                            finish(ticket, "review", ticket.stage_started_at)
                        }
                        _ => {}
                    }
                    finish(ticket, "end_to_end", ticket.opened_at);
                    ticket.release();
                }
                Event::ClaimReleased { .. } => {
                    count("claims_released");
                    outcome(agent, role, "released");
                    ticket.release();
                }
                Event::ClaimExpired { .. } => {
                    count("claims_expired");
                    if let Some((holder, holder_role)) = ticket.release() {
                        outcome(&holder, &holder_role, "expired");
                    }
                }
                Event::LeaseExtended { .. } => count("leases_extended"),
            }
            ticket.state = next_state(ticket.state, domain_event);
        }
        let tickets = order
            .into_iter()
            .map(|id| {
                let ticket = progress.remove(&id).unwrap_or_default();
                (id, ticket)
            })
            .collect();
        Ok(StatsDelta {
            counters,
            agents,
            tickets,
        })
    }
}

impl Progress {
    /// The claim is `agent`'s now, taken in `role`.
    fn hold(&mut self, agent: &str, role: &str) {
        self.claim_agent = Some(agent.to_owned());
        self.claim_role = Some(role.to_owned());
    }

    /// No one holds the claim now: who held it and in which role ("" when
    /// the events seen do not say).
    fn release(&mut self) -> Option<(String, String)> {
        let role = self.claim_role.take().unwrap_or_default();
        self.claim_agent.take().map(|agent| (agent, role))
    }
}

/// The state after an event, as the statistics track it.
fn next_state(state: Option<State>, event: &Event) -> Option<State> {
    let ticket = triage_domain::Ticket {
        state,
        ..triage_domain::Ticket::default()
    };
    triage_domain::evolve(ticket, event).state
}

fn load_progress(conn: &Connection, table: &str, id: TicketId) -> rusqlite::Result<Option<Progress>> {
    conn.prepare_cached(&format!(
        "SELECT state, opened_at, stage_started_at, claim_agent, claim_role FROM {table} WHERE ticket_id = ?1"
    ))?
    .query_row([id.to_string()], |row| {
        let state: String = row.get(0)?;
        Ok(Progress {
            state: state.parse().ok(),
            opened_at: row.get(1)?,
            stage_started_at: row.get(2)?,
            claim_agent: row.get(3)?,
            claim_role: row.get(4)?,
            finished: Vec::new(),
        })
    })
    .optional()
}

/// Latency percentiles of one stage, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StageLatency {
    /// Completed stage instances.
    pub count: u64,
    /// Median.
    pub p50_ms: u64,
    /// 90th percentile.
    pub p90_ms: u64,
    /// 99th percentile.
    pub p99_ms: u64,
}

/// One agent's outcomes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AgentOutcomes {
    /// The roles it acted in, comma-separated ("" when no event says).
    pub role: String,
    /// Outcome name → count over all its roles (claimed, completed,
    /// resolved, released, expired, refused, …).
    pub outcomes: BTreeMap<String, u64>,
    /// Role → outcome name → count: what it did in each role. A role no
    /// event names (a claim taken before a window of statistics began) is
    /// `unknown`.
    pub roles: BTreeMap<String, BTreeMap<String, u64>>,
}

impl AgentOutcomes {
    /// Adds `count` outcomes `what` in `role` ("" when unknown). Rows come
    /// in any order; the sums and the role list do not depend on it.
    pub(crate) fn add(&mut self, role: &str, what: &str, count: u64) {
        let role = if role.is_empty() { UNKNOWN_ROLE } else { role };
        *self.outcomes.entry(what.to_owned()).or_default() += count;
        *self
            .roles
            .entry(role.to_owned())
            .or_default()
            .entry(what.to_owned())
            .or_default() += count;
        self.role = self
            .roles
            .keys()
            .filter(|role| role.as_str() != UNKNOWN_ROLE)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ");
    }
}

/// The role of outcomes whose events do not say it.
pub const UNKNOWN_ROLE: &str = "unknown";

/// Everything the `stats` read model knows.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StatsSummary {
    /// Tickets per state.
    pub tickets_per_state: BTreeMap<String, u64>,
    /// Latency per stage.
    pub stage_latency: BTreeMap<String, StageLatency>,
    /// Counters: events, tickets_opened, tickets_resolved, claims_expired,
    /// rejections, rejections.<code>, conflicts, …
    pub counters: BTreeMap<String, u64>,
    /// Outcomes per agent.
    pub agents: BTreeMap<String, AgentOutcomes>,
}

/// Reads the summary of `slot`'s generation.
pub fn summary(conn: &Connection, slot: &Slot) -> rusqlite::Result<StatsSummary> {
    let mut summary = StatsSummary::default();
    let mut statement = conn.prepare(&format!(
        "SELECT state, count(*) FROM {} GROUP BY state ORDER BY state",
        slot.table("stats_tickets")
    ))?;
    for row in statement.query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))? {
        let (state, count) = row?;
        summary.tickets_per_state.insert(state, count as u64);
    }
    let latency = slot.table("stats_latency");
    for stage in STAGES {
        let count: i64 = conn.query_row(
            &format!("SELECT count(*) FROM {latency} WHERE stage = ?1"),
            [stage],
            |row| row.get(0),
        )?;
        if count == 0 {
            continue;
        }
        // Nearest-rank percentiles over the stage's index.
        let at = |q: f64| -> rusqlite::Result<u64> {
            let rank = ((q * count as f64).ceil() as i64).clamp(1, count) - 1;
            conn.query_row(
                &format!("SELECT ms FROM {latency} WHERE stage = ?1 ORDER BY ms LIMIT 1 OFFSET ?2"),
                (stage, rank),
                |row| row.get::<_, i64>(0),
            )
            .map(|ms| ms as u64)
        };
        summary.stage_latency.insert(
            stage.to_owned(),
            StageLatency {
                count: count as u64,
                p50_ms: at(0.50)?,
                p90_ms: at(0.90)?,
                p99_ms: at(0.99)?,
            },
        );
    }
    let mut statement = conn.prepare(&format!(
        "SELECT name, value FROM {} ORDER BY name",
        slot.table("stats_counters")
    ))?;
    for row in statement.query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))? {
        let (name, value) = row?;
        summary.counters.insert(name, value as u64);
    }
    let mut statement = conn.prepare(&format!(
        "SELECT agent_id, role, outcome, count FROM {}",
        slot.table("stats_agents")
    ))?;
    for row in statement.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, i64>(3)?,
        ))
    })? {
        let (agent, role, outcome, count) = row?;
        summary
            .agents
            .entry(agent)
            .or_default()
            .add(&role, &outcome, count as u64);
    }
    Ok(summary)
}

/// Rates and throughput over a window of events.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WindowRates {
    /// Events in the window (refusal records included).
    pub events: u64,
    /// Where the period the rates are over begins (see
    /// [`StatsWindow::finish_over`]).
    pub from: Option<chrono::DateTime<chrono::Utc>>,
    /// Where it ends.
    pub to: Option<chrono::DateTime<chrono::Utc>>,
    /// Seconds from `from` to `to`.
    pub span_s: f64,
    /// Events per second over that span.
    pub events_per_s: f64,
    /// Tickets resolved per hour over that span.
    pub resolved_per_hour: f64,
    /// Claims that failed (released or expired) per claim taken.
    pub failure_rate: f64,
    /// Refused commands per command (accepted or refused).
    pub rejection_rate: f64,
    /// Stale-revision conflicts per command.
    pub conflict_rate: f64,
}

/// Statistics over any set of events (a time window, one category, …),
/// computed by the `stats` projection into a private in-memory database,
/// batch by batch.
///
/// A window that begins after some of its tickets were opened learns where
/// each such ticket stood from [`StatsWindow::seed`], given the ticket's
/// earlier events: its state, when its current stage began and who holds
/// its claim. A stage begun before the window and completed inside it then
/// counts with its whole duration, and a claim taken before the window and
/// expiring inside it is charged to its holder.
#[derive(Debug)]
pub struct StatsWindow {
    conn: Connection,
    slot: Slot,
    pending: Vec<ProjectedEvent>,
    /// The earliest decision time pushed.
    first: Option<chrono::DateTime<chrono::Utc>>,
    /// The latest decision time pushed.
    last: Option<chrono::DateTime<chrono::Utc>>,
}

impl StatsWindow {
    /// An empty window.
    pub fn new() -> rusqlite::Result<Self> {
        let conn = Connection::open_in_memory()?;
        let slot = Slot {
            name: "stats".to_owned(),
            version: StatsProjection.version(),
            generation: 1,
            checkpoint: None,
            events_applied: 0,
        };
        StatsProjection.create(&conn, &slot)?;
        Ok(StatsWindow {
            conn,
            slot,
            pending: Vec::new(),
            first: None,
            last: None,
        })
    }

    /// Starts a ticket where `before`, its events from before the window
    /// (oldest first), left it, without counting any of them. Call it before
    /// pushing any event of that ticket.
    pub fn seed(&mut self, before: &[ProjectedEvent]) -> Result<(), ProjectionError> {
        let sql = |error| ProjectionError::sqlite("seed a ticket", error);
        let folded = StatsDelta::fold(before, |_| Ok::<_, std::convert::Infallible>(None))
            .unwrap_or_else(|never| match never {});
        let mut put = self
            .conn
            .prepare_cached(&put_progress(&self.slot.table("stats_tickets")))
            .map_err(sql)?;
        for (id, progress) in folded.tickets {
            let Some(state) = progress.state else { continue };
            put.execute((
                id.to_string(),
                state.as_str(),
                progress.opened_at,
                progress.stage_started_at,
                progress.claim_agent.as_deref(),
                progress.claim_role.as_deref(),
            ))
            .map_err(sql)?;
        }
        Ok(())
    }

    /// Adds one event, in log order.
    pub fn push(&mut self, event: ProjectedEvent) -> Result<(), ProjectionError> {
        // Decision times of concurrent writers need not follow log order:
        // keep the earliest and the latest.
        self.first = Some(
            self.first
                .map_or(event.recorded_at, |first| first.min(event.recorded_at)),
        );
        self.last = Some(self.last.map_or(event.recorded_at, |last| last.max(event.recorded_at)));
        self.pending.push(event);
        if self.pending.len() >= 4096 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ProjectionError> {
        let tx = self
            .conn
            .transaction()
            .map_err(|error| ProjectionError::sqlite("begin", error))?;
        StatsProjection.apply(&tx, &self.slot, &self.pending)?;
        tx.commit().map_err(|error| ProjectionError::sqlite("commit", error))?;
        self.pending.clear();
        Ok(())
    }

    /// The statistics and rates of everything pushed.
    pub fn finish(self) -> Result<(StatsSummary, WindowRates), ProjectionError> {
        let (from, to) = (self.first, self.last);
        self.finish_over(from, to)
    }

    /// The decision time of the earliest event pushed.
    pub fn first_event(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.first
    }

    /// The decision time of the latest event pushed.
    pub fn last_event(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.last
    }

    /// The statistics, with the rates over the period from `from` to `to`
    /// (the windows of one period, one per group, share it, so that their
    /// rates compare) rather than over the span of this window's events.
    pub fn finish_over(
        mut self,
        from: Option<chrono::DateTime<chrono::Utc>>,
        to: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<(StatsSummary, WindowRates), ProjectionError> {
        self.flush()?;
        let summary = summary(&self.conn, &self.slot).map_err(|error| ProjectionError::sqlite("summarize", error))?;
        let counter = |name: &str| summary.counters.get(name).copied().unwrap_or(0) as f64;
        let span_s = match (from, to) {
            (Some(from), Some(to)) if to > from => (to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6,
            _ => 0.0,
        };
        let per = |numerator: f64, denominator: f64| {
            if denominator > 0.0 {
                numerator / denominator
            } else {
                0.0
            }
        };
        let commands = counter("events");
        let rates = WindowRates {
            events: commands as u64,
            from,
            to,
            span_s,
            events_per_s: per(commands, span_s),
            resolved_per_hour: per(counter("tickets_resolved") * 3600.0, span_s),
            failure_rate: per(
                counter("claims_released") + counter("claims_expired"),
                counter("claims_taken"),
            ),
            rejection_rate: per(counter("rejections"), commands),
            conflict_rate: per(counter("conflicts"), commands),
        };
        Ok((summary, rates))
    }
}
