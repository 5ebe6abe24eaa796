//! The `tickets` read model: each ticket's current state, and the work
//! queues that are views of it.

use rustc_hash::FxHashMap;
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row};
use serde::Serialize;
use triage_domain::{Claim, Classification, Role, State, Ticket, TicketId, evolve, queue_states};
use uuid::Uuid;

use crate::ProjectionError;
use crate::db::Slot;
use crate::projection::{Payload, ProjectedEvent, Projection, digest_rows};

/// The `tickets` projection.
#[derive(Clone, Copy, Debug, Default)]
pub struct TicketsProjection;

/// One ticket as the read model holds it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TicketRow {
    /// The ticket, folded with the domain's own `evolve`.
    pub ticket: Ticket,
    /// The stream revision this row reflects.
    pub revision: u64,
    /// When it was opened.
    pub created_at: DateTime<Utc>,
    /// When its last event was recorded.
    pub updated_at: DateTime<Utc>,
    /// When it entered its current state.
    pub state_entered_at: DateTime<Utc>,
}

const COLUMNS: &str = "ticket_id, state, subject, body, customer, category, priority, confidence, draft, \
    claim_id, claim_agent, lease_expires_at, attempts, resolution, last_reason, revision, events_applied, \
    created_at, updated_at, state_entered_at, drafts_rejected";

/// The statement that writes a whole row: an update in place when the
/// ticket has one (`INSERT OR REPLACE` deleted the row and inserted it
/// again, with every index entry).
fn upsert(table: &str) -> String {
    let assignments = COLUMNS
        .split(", ")
        .skip(1)
        .map(|column| format!("{column} = excluded.{column}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO {table} ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21) \
         ON CONFLICT (ticket_id) DO UPDATE SET {assignments}"
    )
}

pub(crate) fn micros(time: DateTime<Utc>) -> i64 {
    time.timestamp_micros()
}

pub(crate) fn from_micros(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

fn parse<T: std::str::FromStr<Err = String>>(row: &Row<'_>, column: usize) -> rusqlite::Result<T> {
    let text: String = row.get(column)?;
    text.parse().map_err(|error: String| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, error.into())
    })
}

fn uuid(row: &Row<'_>, column: usize) -> rusqlite::Result<Option<Uuid>> {
    let text: Option<String> = row.get(column)?;
    text.map(|text| {
        Uuid::parse_str(&text).map_err(|error| {
            rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, error.into())
        })
    })
    .transpose()
}

impl TicketRow {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<TicketRow> {
        let id: TicketId = parse(row, 0)?;
        let classification = match row.get::<_, Option<String>>(5)? {
            Some(category) => Some(Classification {
                category,
                priority: parse(row, 6)?,
                confidence: row.get(7)?,
            }),
            None => None,
        };
        let claim = match uuid(row, 9)? {
            Some(claim_id) => Some(Claim {
                claim_id,
                agent_id: row.get(10)?,
                lease_expires_at: from_micros(row.get(11)?),
            }),
            None => None,
        };
        Ok(TicketRow {
            ticket: Ticket {
                id: Some(id),
                state: Some(parse(row, 1)?),
                subject: row.get(2)?,
                body: row.get(3)?,
                customer: row.get(4)?,
                classification,
                draft: row.get(8)?,
                claim,
                attempts: row.get(12)?,
                resolution: row.get(13)?,
                last_reason: row.get(14)?,
                events_applied: row.get::<_, i64>(16)? as u64,
                drafts_rejected: row.get(20)?,
            },
            revision: row.get::<_, i64>(15)? as u64,
            created_at: from_micros(row.get(17)?),
            updated_at: from_micros(row.get(18)?),
            state_entered_at: from_micros(row.get(19)?),
        })
    }

    /// Folds a ticket's events, oldest first, the way the projection does;
    /// `None` when none of them is a ticket event.
    pub fn fold<'a>(events: impl IntoIterator<Item = &'a ProjectedEvent>) -> Option<TicketRow> {
        let mut row: Option<TicketRow> = None;
        for event in events {
            if !matches!(event.payload, Payload::Ticket(_)) {
                continue;
            }
            row.get_or_insert_with(|| TicketRow::empty(event.recorded_at))
                .apply(event);
        }
        row
    }

    /// A ticket that does not exist yet, first seen at `at`.
    pub(crate) fn empty(at: DateTime<Utc>) -> TicketRow {
        TicketRow {
            ticket: Ticket::default(),
            revision: 0,
            created_at: at,
            updated_at: at,
            state_entered_at: at,
        }
    }

    /// Folds one event into the row (events of other kinds are ignored).
    /// The one place the read model's ticket logic lives: both the SQLite
    /// and the PostgreSQL read models call it.
    pub(crate) fn apply(&mut self, event: &ProjectedEvent) {
        let Payload::Ticket(domain_event) = &event.payload else {
            return;
        };
        let first = self.ticket.events_applied == 0;
        let before = self.ticket.state;
        self.ticket = evolve(std::mem::take(&mut self.ticket), domain_event);
        self.revision = event.revision;
        if first {
            self.created_at = event.recorded_at;
            self.state_entered_at = event.recorded_at;
        }
        if self.ticket.state != before {
            self.state_entered_at = event.recorded_at;
        }
        self.updated_at = event.recorded_at;
    }

    /// Writes the row with `statement`, prepared from [`upsert`].
    fn write(&self, statement: &mut rusqlite::CachedStatement<'_>) -> rusqlite::Result<()> {
        let ticket = &self.ticket;
        let classification = ticket.classification.as_ref();
        let claim = ticket.claim.as_ref();
        statement.execute(rusqlite::params![
            ticket.id.map(|id| id.to_string()),
            ticket.state.map(State::as_str),
            ticket.subject,
            ticket.body,
            ticket.customer,
            classification.map(|c| c.category.as_str()),
            classification.map(|c| c.priority.as_str()),
            classification.map(|c| c.confidence),
            ticket.draft,
            claim.map(|c| c.claim_id.to_string()),
            claim.map(|c| c.agent_id.as_str()),
            claim.map(|c| micros(c.lease_expires_at)),
            ticket.attempts,
            ticket.resolution,
            ticket.last_reason,
            self.revision as i64,
            ticket.events_applied as i64,
            micros(self.created_at),
            micros(self.updated_at),
            micros(self.state_entered_at),
            ticket.drafts_rejected,
        ])?;
        Ok(())
    }
}

impl Projection for TicketsProjection {
    fn name(&self) -> &'static str {
        "tickets"
    }

    /// 3: version 2's `claims` table is gone again; claims are found in
    /// the log. 4: `drafts_rejected`, the count that ends a draft-rejection
    /// loop, and indexes for paging lists in their own order.
    fn version(&self) -> u32 {
        4
    }

    fn tables(&self) -> &'static [&'static str] {
        &["tickets"]
    }

    /// Version 2 kept the claims in a `claims` table.
    fn former_tables(&self) -> &'static [&'static str] {
        &["claims"]
    }

    fn create(&self, conn: &Connection, slot: &Slot) -> rusqlite::Result<()> {
        let table = slot.table("tickets");
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                ticket_id        TEXT    PRIMARY KEY,
                state            TEXT    NOT NULL,
                subject          TEXT    NOT NULL,
                body             TEXT    NOT NULL,
                customer         TEXT,
                category         TEXT,
                priority         TEXT,
                confidence       REAL,
                draft            TEXT,
                claim_id         TEXT,
                claim_agent      TEXT,
                lease_expires_at INTEGER,
                attempts         INTEGER NOT NULL,
                resolution       TEXT,
                last_reason      TEXT,
                revision         INTEGER NOT NULL,
                events_applied   INTEGER NOT NULL,
                created_at       INTEGER NOT NULL,
                updated_at       INTEGER NOT NULL,
                state_entered_at INTEGER NOT NULL,
                drafts_rejected  INTEGER NOT NULL
            ) STRICT;"
        ))
    }

    fn create_indexes(&self, conn: &Connection, slot: &Slot) -> rusqlite::Result<()> {
        let table = slot.table("tickets");
        conn.execute_batch(&format!(
            "CREATE INDEX IF NOT EXISTS {table}_queue ON {table} (state, state_entered_at, ticket_id);
             CREATE INDEX IF NOT EXISTS {table}_created ON {table} (created_at, ticket_id);
             CREATE INDEX IF NOT EXISTS {table}_lease ON {table} (lease_expires_at) WHERE lease_expires_at IS NOT NULL;"
        ))
    }

    fn apply(&self, conn: &Connection, slot: &Slot, events: &[ProjectedEvent]) -> Result<(), ProjectionError> {
        let table = slot.table("tickets");
        // Fold the batch in memory and write each touched ticket once.
        let mut rows: FxHashMap<TicketId, TicketRow> = FxHashMap::default();
        let mut order = Vec::new();
        for event in events {
            if !matches!(event.payload, Payload::Ticket(_)) {
                continue;
            }
            let row = match rows.entry(event.ticket_id) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    order.push(event.ticket_id);
                    let stored = if event.opens_ticket() {
                        None
                    } else {
                        load(conn, &table, event.ticket_id)
                            .map_err(|error| ProjectionError::sqlite("load a ticket row", error))?
                    };
                    entry.insert(stored.unwrap_or_else(|| TicketRow::empty(event.recorded_at)))
                }
            };
            row.apply(event);
        }
        let write_failed = |error| ProjectionError::sqlite("write a ticket row", error);
        // Prepared once per page, not looked up per row.
        let mut write = conn.prepare_cached(&upsert(&table)).map_err(write_failed)?;
        for id in order {
            let row = &rows[&id];
            if row.ticket.exists() {
                row.write(&mut write).map_err(write_failed)?;
            }
        }
        Ok(())
    }

    fn digest(&self, conn: &Connection, slot: &Slot) -> rusqlite::Result<BTreeMap<String, u64>> {
        digest_rows(
            conn,
            &format!("SELECT {COLUMNS} FROM {} ORDER BY ticket_id", slot.table("tickets")),
        )
    }
}

fn load(conn: &Connection, table: &str, id: TicketId) -> rusqlite::Result<Option<TicketRow>> {
    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM {table} WHERE ticket_id = ?1"))?
        .query_row([id.to_string()], TicketRow::from_row)
        .optional()
}

/// Where a page of [`TicketsView::list_after`] ends: the list and the sort
/// key of its last row. As text, `<STATE or all>.<microseconds>.<ticket
/// id>`; clients treat it as opaque.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListCursor {
    /// The list: one state's, or all states' (`None`). A cursor continues
    /// only its own list: the lists are sorted on different times.
    pub state: Option<State>,
    /// The row's `state_entered_at` (a list of one state) or `created_at`
    /// (all states), in microseconds.
    pub at: i64,
    /// The row's ticket.
    pub ticket_id: TicketId,
}

impl ListCursor {
    /// The cursor after `row` in a list of `state` (`None`: all states).
    pub fn after(row: &TicketRow, state: Option<State>) -> Option<Self> {
        Some(ListCursor {
            state,
            at: micros(if state.is_some() {
                row.state_entered_at
            } else {
                row.created_at
            }),
            ticket_id: row.ticket.id?,
        })
    }

    /// Whether this cursor continues the list of `state` (`None`: all
    /// states); `Err` says why not.
    pub fn check_list(&self, state: Option<State>) -> Result<(), String> {
        if self.state == state {
            return Ok(());
        }
        let name = |state: Option<State>| state.map_or_else(|| "all states".to_owned(), |state| state.to_string());
        Err(format!(
            "this cursor continues the list of {}, not of {}",
            name(self.state),
            name(state)
        ))
    }
}

/// Reads the `state` and `after` of a request for a page of a list: the
/// state's name, and a cursor that must continue that state's list (`Err`
/// says what is wrong with either).
pub fn list_request(state: Option<&str>, after: Option<&str>) -> Result<(Option<State>, Option<ListCursor>), String> {
    let state = state.map(str::parse::<State>).transpose()?;
    let after = after.map(str::parse::<ListCursor>).transpose()?;
    if let Some(cursor) = &after {
        cursor.check_list(state)?;
    }
    Ok((state, after))
}

impl std::fmt::Display for ListCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = self.state.map_or("all", State::as_str);
        write!(f, "{list}.{}.{}", self.at, self.ticket_id)
    }
}

impl std::str::FromStr for ListCursor {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = || format!("invalid cursor {text:?}: pass back the `next` of the page before");
        let mut parts = text.splitn(3, '.');
        let (Some(list), Some(at), Some(ticket_id)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(invalid());
        };
        Ok(ListCursor {
            state: match list {
                "all" => None,
                state => Some(state.parse().map_err(|_| invalid())?),
            },
            at: at.parse().map_err(|_| invalid())?,
            ticket_id: TicketId(Uuid::parse_str(ticket_id).map_err(|_| invalid())?),
        })
    }
}

/// Queries over a live `tickets` generation.
#[derive(Debug)]
pub struct TicketsView<'a> {
    conn: &'a Connection,
    table: String,
}

impl<'a> TicketsView<'a> {
    /// The view of `slot`'s generation.
    pub fn new(conn: &'a Connection, slot: &Slot) -> Self {
        TicketsView {
            conn,
            table: slot.table("tickets"),
        }
    }

    /// One ticket.
    pub fn get(&self, id: TicketId) -> rusqlite::Result<Option<TicketRow>> {
        load(self.conn, &self.table, id)
    }

    /// The ticket that holds `claim_id` now, if one does.
    pub fn holder_of_claim(&self, claim_id: Uuid) -> rusqlite::Result<Option<TicketId>> {
        self.conn
            .prepare_cached(&format!("SELECT ticket_id FROM {} WHERE claim_id = ?1", self.table))?
            .query_row([claim_id.to_string()], |row| parse(row, 0))
            .optional()
    }

    /// Tickets in `state` (all states when `None`), oldest in that state
    /// first.
    pub fn list(&self, state: Option<State>, limit: usize) -> rusqlite::Result<Vec<TicketRow>> {
        self.list_after(state, None, limit)
    }

    /// [`TicketsView::list`] from just after `after`, the [`ListCursor`] of
    /// the last row of the page before: a page of a long list. Keyed on
    /// the order itself, so a page is neither shifted nor repeated by
    /// tickets opened meanwhile; a ticket that changes state between pages
    /// leaves a state's list, or moves to its end.
    ///
    /// # Panics
    ///
    /// When `after` is a cursor of another list; see
    /// [`ListCursor::check_list`].
    pub fn list_after(
        &self,
        state: Option<State>,
        after: Option<&ListCursor>,
        limit: usize,
    ) -> rusqlite::Result<Vec<TicketRow>> {
        assert!(
            after.is_none_or(|cursor| cursor.state == state),
            "a cursor of another list"
        );
        let limit = limit.min(i64::MAX as usize) as i64;
        // Before every row: `ticket_id` is text and never empty.
        let (at, id) = after.map_or((i64::MIN, String::new()), |cursor| {
            (cursor.at, cursor.ticket_id.to_string())
        });
        match state {
            Some(state) => self
                .conn
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM {} WHERE state = ?1 AND (state_entered_at, ticket_id) > (?2, ?3) \
                     ORDER BY state_entered_at, ticket_id LIMIT ?4",
                    self.table
                ))?
                .query_map((state.as_str(), at, id, limit), TicketRow::from_row)?
                .collect(),
            None => self
                .conn
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM {} WHERE (created_at, ticket_id) > (?1, ?2) \
                     ORDER BY created_at, ticket_id LIMIT ?3",
                    self.table
                ))?
                .query_map((at, id, limit), TicketRow::from_row)?
                .collect(),
        }
    }

    /// The work queue of `role`: tickets it can claim, oldest first. Claimed
    /// tickets are never in a queue: their state is an `-ING` state.
    pub fn work_queue(&self, role: Role, limit: usize) -> rusqlite::Result<Vec<TicketRow>> {
        let states = queue_states(role);
        let mut queue = Vec::new();
        for state in &states {
            queue.extend(self.list(Some(*state), limit)?);
        }
        queue.sort_by_key(|row| (row.state_entered_at, row.ticket.id));
        queue.truncate(limit);
        Ok(queue)
    }

    /// Claims whose lease ran out by `now`: the lease sweeper's queue.
    pub fn expired_claims(&self, now: DateTime<Utc>, limit: usize) -> rusqlite::Result<Vec<TicketRow>> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM {} WHERE lease_expires_at IS NOT NULL AND lease_expires_at <= ?1 \
                 ORDER BY lease_expires_at LIMIT ?2",
                self.table
            ))?
            .query_map((micros(now), limit.min(i64::MAX as usize) as i64), TicketRow::from_row)?
            .collect()
    }

    /// Tickets per state.
    pub fn counts(&self) -> rusqlite::Result<BTreeMap<State, u64>> {
        let mut statement = self
            .conn
            .prepare_cached(&format!("SELECT state, count(*) FROM {} GROUP BY state", self.table))?;
        let rows = statement.query_map([], |row| Ok((parse::<State>(row, 0)?, row.get::<_, i64>(1)? as u64)))?;
        rows.collect()
    }
}
