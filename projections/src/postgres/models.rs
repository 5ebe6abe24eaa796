//! The `tickets` and `stats` models in PostgreSQL: their tables, how a
//! batch folded by the shared folding code is written, their digests, and
//! the statistics summary.
//!
//! Every batch first loads the rows it touches in one statement
//! (`= ANY($1)`), folds in memory, then sends its writes pipelined (all
//! statements in flight at once on the one connection) inside the batch's
//! transaction.

use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;

use futures::future::try_join_all;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Row, Transaction};
use triage_domain::{Claim, Classification, State, Ticket, TicketId};
use uuid::Uuid;

use super::{PgReadModels, SlotKind};
use crate::ProjectionError;
use crate::projection::{Fnv, Payload, ProjectedEvent, Projection};
use crate::stats::{STAGES, StageLatency, StatsDelta, StatsProjection, StatsSummary};
use crate::tickets::{TicketRow, TicketsProjection, from_micros, micros};

/// The columns of a `tickets` row, in [`ticket_from_row`]'s order: the
/// SQLite model's columns.
pub(crate) const TICKET_COLUMNS: &str = "ticket_id, state, subject, body, customer, category, priority, confidence, \
    draft, claim_id, claim_agent, lease_expires_at, attempts, resolution, last_reason, revision, events_applied, \
    created_at, updated_at, state_entered_at, drafts_rejected";

/// A read model this backend keeps: Triage's two projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Model {
    Tickets,
    Stats,
}

impl Model {
    pub(crate) const ALL: [Model; 2] = [Model::Tickets, Model::Stats];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Model::Tickets => TicketsProjection.name(),
            Model::Stats => StatsProjection.name(),
        }
    }

    /// The SQLite projection's version: the folding is shared, so a change
    /// to it bumps both.
    pub(crate) fn version(self) -> u32 {
        match self {
            Model::Tickets => TicketsProjection.version(),
            Model::Stats => StatsProjection.version(),
        }
    }

    pub(crate) fn tables(self) -> &'static [&'static str] {
        match self {
            Model::Tickets => TicketsProjection.tables(),
            Model::Stats => StatsProjection.tables(),
        }
    }

    pub(crate) fn by_name(name: &str) -> Result<Model, ProjectionError> {
        Model::ALL
            .into_iter()
            .find(|model| model.name() == name)
            .ok_or_else(|| ProjectionError::UnknownProjection {
                name: name.to_owned(),
                known: Model::ALL.iter().map(|model| model.name().to_owned()).collect(),
            })
    }

    /// Creates the secondary indexes of `generation`: with its tables for a
    /// generation made live at once, and at the swap for a rebuild's, each
    /// built once from the finished table (as `Projection::create_indexes`
    /// does in SQLite).
    pub(crate) async fn create_indexes(
        self,
        tx: &Transaction<'_>,
        models: &PgReadModels,
        generation: u32,
    ) -> Result<(), ProjectionError> {
        let table = |base: &str| models.generation_table(base, generation);
        let sql = match self {
            Model::Tickets => format!(
                "{}
                 CREATE INDEX ON {t} (lease_expires_at) WHERE lease_expires_at IS NOT NULL;",
                list_indexes(models, generation),
                t = table("tickets")
            ),
            // The percentiles of the summary sort by it.
            Model::Stats => format!("CREATE INDEX ON {} (stage, ms);", table("stats_latency")),
        };
        tx.batch_execute(&sql)
            .await
            .map_err(|error| ProjectionError::postgres("index the projection's tables", error))
    }

    /// Adds the list indexes (see [`list_indexes`]) to the live `tickets`
    /// generation when it was built before they existed. Best effort: they
    /// only make pages cheaper, so a failure (another process adding them
    /// at the same moment, a role without the right) is logged and the
    /// lists keep working, slower.
    pub(crate) async fn add_missing_list_indexes(models: &PgReadModels) {
        let added = async {
            let Some(live) = models.slot(Model::Tickets.name(), SlotKind::Live).await? else {
                return Ok(());
            };
            let client = models.client().await?;
            // Looked up first: CREATE INDEX IF NOT EXISTS locks the table
            // against writes before it finds the index there.
            let present: bool = client
                .query_one(
                    "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
                    &[
                        &models.qualified(&format!("tickets_g{}_state_list", live.generation)),
                        &models.qualified(&format!("tickets_g{}_created_list", live.generation)),
                    ],
                )
                .await
                .map_err(|error| ProjectionError::postgres("look for the tickets list indexes", error))?
                .get(0);
            if present {
                return Ok(());
            }
            client
                .batch_execute(&list_indexes(models, live.generation))
                .await
                .map_err(|error| ProjectionError::postgres("add the tickets list indexes", error))
        };
        if let Err(error) = added.await {
            tracing::warn!(%error, "could not add the tickets list indexes; lists stay slower");
        }
    }

    /// Creates the tables of `generation` (dropping leftovers of an
    /// abandoned one with the same number first), without their secondary
    /// indexes ([`Model::create_indexes`]).
    pub(crate) async fn create(
        self,
        tx: &Transaction<'_>,
        models: &PgReadModels,
        generation: u32,
    ) -> Result<(), ProjectionError> {
        let table = |base: &str| models.generation_table(base, generation);
        let mut sql = String::new();
        for base in self.tables() {
            sql.push_str(&format!("DROP TABLE IF EXISTS {};\n", table(base)));
        }
        sql.push_str(&match self {
            Model::Tickets => format!(
                "CREATE TABLE {t} (
                    ticket_id        uuid    PRIMARY KEY,
                    state            text    NOT NULL,
                    subject          text    NOT NULL,
                    body             text    NOT NULL,
                    customer         text,
                    category         text,
                    priority         text,
                    confidence       double precision,
                    draft            text,
                    claim_id         uuid,
                    claim_agent      text,
                    lease_expires_at bigint,
                    attempts         bigint  NOT NULL,
                    resolution       text,
                    last_reason      text,
                    revision         bigint  NOT NULL,
                    events_applied   bigint  NOT NULL,
                    created_at       bigint  NOT NULL,
                    updated_at       bigint  NOT NULL,
                    state_entered_at bigint  NOT NULL,
                    drafts_rejected  bigint  NOT NULL
                );",
                t = table("tickets")
            ),
            Model::Stats => format!(
                "CREATE TABLE {counters} (name text PRIMARY KEY, value bigint NOT NULL);
                 CREATE TABLE {tickets} (
                     ticket_id uuid PRIMARY KEY, state text NOT NULL, opened_at bigint NOT NULL,
                     stage_started_at bigint NOT NULL, claim_agent text, claim_role text);
                 CREATE TABLE {latency} (stage text NOT NULL, ticket_id uuid NOT NULL, ms bigint NOT NULL);
                 CREATE TABLE {agents} (
                     agent_id text NOT NULL, role text NOT NULL, outcome text NOT NULL, count bigint NOT NULL,
                     PRIMARY KEY (agent_id, role, outcome));",
                counters = table("stats_counters"),
                tickets = table("stats_tickets"),
                latency = table("stats_latency"),
                agents = table("stats_agents"),
            ),
        });
        tx.batch_execute(&sql)
            .await
            .map_err(|error| ProjectionError::postgres("create the projection's tables", error))
    }

    /// Applies a batch to `generation` inside the caller's transaction.
    pub(crate) async fn apply(
        self,
        tx: &Transaction<'_>,
        models: &PgReadModels,
        generation: u32,
        events: &[ProjectedEvent],
    ) -> Result<(), ProjectionError> {
        match self {
            Model::Tickets => apply_tickets(tx, models, generation, events).await,
            Model::Stats => apply_stats(tx, models, generation, events).await,
        }
    }

    /// A digest per key of `generation`'s rows (FNV-1a of every column as
    /// text, tagged so that NULL and "" differ).
    pub(crate) async fn digest(
        self,
        client: &impl GenericClient,
        models: &PgReadModels,
        generation: u32,
    ) -> Result<BTreeMap<String, u64>, ProjectionError> {
        let table = |base: &str| models.generation_table(base, generation);
        let queries = match self {
            Model::Tickets => {
                let columns: Vec<String> = TICKET_COLUMNS.split(", ").map(|c| format!("{c}::text")).collect();
                vec![format!(
                    "SELECT {} FROM {} ORDER BY ticket_id",
                    columns.join(", "),
                    table("tickets")
                )]
            }
            Model::Stats => vec![
                format!(
                    "SELECT 'ticket ' || ticket_id, state, opened_at::text, stage_started_at::text, claim_agent, \
                     claim_role FROM {} ORDER BY ticket_id",
                    table("stats_tickets")
                ),
                format!(
                    "SELECT 'latency ' || ticket_id, stage, ms::text FROM {} ORDER BY ticket_id, stage, ms",
                    table("stats_latency")
                ),
                format!(
                    "SELECT 'counter ' || name, value::text FROM {} ORDER BY name",
                    table("stats_counters")
                ),
                format!(
                    "SELECT 'agent ' || agent_id || ' ' || role || ' ' || outcome, count::text FROM {} \
                     ORDER BY agent_id, role, outcome",
                    table("stats_agents")
                ),
            ],
        };
        let mut digests = BTreeMap::new();
        for sql in queries {
            let rows = client
                .query(&sql, &[])
                .await
                .map_err(|error| ProjectionError::postgres("digest the read model", error))?;
            for row in rows {
                let mut hash = Fnv::default();
                for column in 0..row.len() {
                    match row.get::<_, Option<&str>>(column) {
                        None => hash.write(&[0]),
                        Some(text) => {
                            hash.write(&[3]);
                            hash.write(&(text.len() as u64).to_le_bytes());
                            hash.write(text.as_bytes());
                        }
                    }
                }
                let key = row.get::<_, Option<String>>(0).unwrap_or_default();
                // Rows that share a key (latencies) combine in order.
                let entry = digests.entry(key).or_insert(0u64);
                *entry = entry.rotate_left(5) ^ hash.finish();
            }
        }
        Ok(digests)
    }
}

fn column<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, index: usize) -> Result<T, ProjectionError> {
    row.try_get(index)
        .map_err(|error| ProjectionError::postgres("read a ticket row", error))
}

fn parsed<T: std::str::FromStr<Err = String>>(text: &str, what: &str) -> Result<T, ProjectionError> {
    text.parse()
        .map_err(|reason| ProjectionError::Internal(format!("unreadable {what} in the tickets model: {reason}")))
}

/// A `tickets` row ([`TICKET_COLUMNS`]) as the domain sees it.
pub(crate) fn ticket_from_row(row: &Row) -> Result<TicketRow, ProjectionError> {
    let classification = match column::<Option<String>>(row, 5)? {
        Some(category) => Some(Classification {
            category,
            priority: parsed(column::<&str>(row, 6)?, "priority")?,
            confidence: column(row, 7)?,
        }),
        None => None,
    };
    let claim = match column::<Option<Uuid>>(row, 9)? {
        Some(claim_id) => Some(Claim {
            claim_id,
            agent_id: column(row, 10)?,
            lease_expires_at: from_micros(column(row, 11)?),
        }),
        None => None,
    };
    Ok(TicketRow {
        ticket: Ticket {
            id: Some(TicketId(column(row, 0)?)),
            state: Some(parsed(column::<&str>(row, 1)?, "state")?),
            subject: column(row, 2)?,
            body: column(row, 3)?,
            customer: column(row, 4)?,
            classification,
            draft: column(row, 8)?,
            claim,
            attempts: column::<i64>(row, 12)? as u32,
            resolution: column(row, 13)?,
            last_reason: column(row, 14)?,
            events_applied: column::<i64>(row, 16)? as u64,
            drafts_rejected: column::<i64>(row, 20)? as u32,
        },
        revision: column::<i64>(row, 15)? as u64,
        created_at: from_micros(column(row, 17)?),
        updated_at: from_micros(column(row, 18)?),
        state_entered_at: from_micros(column(row, 19)?),
    })
}

/// The tickets of `events`, each once, in first-touch order.
fn touched(events: &[ProjectedEvent]) -> Vec<TicketId> {
    let mut seen = HashSet::new();
    events
        .iter()
        .filter(|event| matches!(event.payload, Payload::Ticket(_)))
        .map(|event| event.ticket_id)
        .filter(|id| seen.insert(*id))
        .collect()
}

/// `text` as PostgreSQL can store it: U+0000, which its `text` cannot
/// hold, becomes U+FFFD. New commands cannot carry it (the domain refuses
/// it), but an event stored earlier, or by another writer, must not stop
/// the read models for good: every catch-up would fail on the same page.
fn pg_text(text: &str) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text.to_owned()
    }
}

/// The owned values of one `tickets` row, in [`TICKET_COLUMNS`] order.
struct TicketValues {
    id: Uuid,
    state: Option<&'static str>,
    subject: String,
    body: String,
    customer: Option<String>,
    category: Option<String>,
    priority: Option<&'static str>,
    confidence: Option<f64>,
    draft: Option<String>,
    claim_id: Option<Uuid>,
    claim_agent: Option<String>,
    lease_expires_at: Option<i64>,
    attempts: i64,
    resolution: Option<String>,
    last_reason: Option<String>,
    revision: i64,
    events_applied: i64,
    created_at: i64,
    updated_at: i64,
    state_entered_at: i64,
    drafts_rejected: i64,
}

impl TicketValues {
    fn new(id: TicketId, row: &TicketRow) -> Self {
        let ticket = &row.ticket;
        let classification = ticket.classification.as_ref();
        let claim = ticket.claim.as_ref();
        TicketValues {
            id: ticket.id.unwrap_or(id).0,
            state: ticket.state.map(State::as_str),
            subject: pg_text(&ticket.subject),
            body: pg_text(&ticket.body),
            customer: ticket.customer.as_deref().map(pg_text),
            category: classification.map(|c| pg_text(&c.category)),
            priority: classification.map(|c| c.priority.as_str()),
            confidence: classification.map(|c| c.confidence),
            draft: ticket.draft.as_deref().map(pg_text),
            claim_id: claim.map(|c| c.claim_id),
            claim_agent: claim.map(|c| pg_text(&c.agent_id)),
            lease_expires_at: claim.map(|c| micros(c.lease_expires_at)),
            attempts: i64::from(ticket.attempts),
            resolution: ticket.resolution.as_deref().map(pg_text),
            last_reason: ticket.last_reason.as_deref().map(pg_text),
            revision: row.revision as i64,
            events_applied: ticket.events_applied as i64,
            created_at: micros(row.created_at),
            updated_at: micros(row.updated_at),
            state_entered_at: micros(row.state_entered_at),
            drafts_rejected: i64::from(ticket.drafts_rejected),
        }
    }
}

/// Element types of [`TICKET_COLUMNS`], in order, for the arrays a page's
/// rows are sent in.
const TICKET_COLUMN_TYPES: [&str; 21] = [
    "uuid", "text", "text", "text", "text", "text", "text", "float8", "text", "uuid", "text", "int8", "int8", "text",
    "text", "int8", "int8", "int8", "int8", "int8", "int8",
];

/// Runs `statement` with one array per column of `values`, in
/// [`TICKET_COLUMNS`] order.
async fn write_ticket_columns(
    tx: &Transaction<'_>,
    statement: &tokio_postgres::Statement,
    values: &[TicketValues],
) -> Result<u64, tokio_postgres::Error> {
    fn column<'a, T>(values: &'a [TicketValues], get: impl Fn(&'a TicketValues) -> T) -> Vec<T> {
        values.iter().map(get).collect()
    }
    tx.execute(
        statement,
        &[
            &column(values, |v| v.id),
            &column(values, |v| v.state),
            &column(values, |v| v.subject.as_str()),
            &column(values, |v| v.body.as_str()),
            &column(values, |v| v.customer.as_deref()),
            &column(values, |v| v.category.as_deref()),
            &column(values, |v| v.priority),
            &column(values, |v| v.confidence),
            &column(values, |v| v.draft.as_deref()),
            &column(values, |v| v.claim_id),
            &column(values, |v| v.claim_agent.as_deref()),
            &column(values, |v| v.lease_expires_at),
            &column(values, |v| v.attempts),
            &column(values, |v| v.resolution.as_deref()),
            &column(values, |v| v.last_reason.as_deref()),
            &column(values, |v| v.revision),
            &column(values, |v| v.events_applied),
            &column(values, |v| v.created_at),
            &column(values, |v| v.updated_at),
            &column(values, |v| v.state_entered_at),
            &column(values, |v| v.drafts_rejected),
        ],
    )
    .await
}

async fn apply_tickets(
    tx: &Transaction<'_>,
    models: &PgReadModels,
    generation: u32,
    events: &[ProjectedEvent],
) -> Result<(), ProjectionError> {
    let table = models.generation_table("tickets", generation);
    let order = touched(events);
    if order.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = order.iter().map(|id| id.0).collect();
    // One statement for the whole page: the rows go as one array per
    // column (each ticket once, so no row is updated twice), instead of a
    // statement per row, which cost the server a statement's overhead each.
    let arrays: Vec<String> = TICKET_COLUMN_TYPES
        .iter()
        .enumerate()
        .map(|(index, element)| format!("${}::{element}[]", index + 1))
        .collect();
    let updates: Vec<String> = TICKET_COLUMNS
        .split(", ")
        .skip(1)
        .map(|column| format!("{column} = EXCLUDED.{column}"))
        .collect();
    let upsert = format!(
        "INSERT INTO {table} ({TICKET_COLUMNS}) SELECT * FROM unnest({}) \
         ON CONFLICT (ticket_id) DO UPDATE SET {}",
        arrays.join(", "),
        updates.join(", ")
    );
    let load = format!("SELECT {TICKET_COLUMNS} FROM {table} WHERE ticket_id = ANY($1)");
    // The load (typed parameters: no separate preparation) and the
    // upsert's preparation go out together: one round trip instead of
    // three. During a rebuild each cost about a millisecond here.
    let (stored, upsert) = futures::try_join!(
        async {
            tx.query_typed(&load, &[(&ids, Type::UUID_ARRAY)])
                .await
                .map_err(|error| ProjectionError::postgres("load ticket rows", error))
        },
        async {
            tx.prepare(&upsert)
                .await
                .map_err(|error| ProjectionError::postgres("prepare a ticket write", error))
        }
    )?;
    let mut rows: FxHashMap<TicketId, TicketRow> = FxHashMap::with_capacity_and_hasher(order.len(), Default::default());
    for row in &stored {
        let row = ticket_from_row(row)?;
        if let Some(id) = row.ticket.id {
            rows.insert(id, row);
        }
    }
    for event in events {
        if !matches!(event.payload, Payload::Ticket(_)) {
            continue;
        }
        rows.entry(event.ticket_id)
            .or_insert_with(|| TicketRow::empty(event.recorded_at))
            .apply(event);
    }
    let values: Vec<TicketValues> = order
        .iter()
        .filter_map(|id| rows.get(id).filter(|row| row.ticket.exists()).map(|row| (id, row)))
        .map(|(id, row)| TicketValues::new(*id, row))
        .collect();
    if values.is_empty() {
        return Ok(());
    }
    write_ticket_columns(tx, &upsert, &values)
        .await
        .map_err(|error| ProjectionError::postgres("write ticket rows", error))?;
    Ok(())
}

async fn apply_stats(
    tx: &Transaction<'_>,
    models: &PgReadModels,
    generation: u32,
    events: &[ProjectedEvent],
) -> Result<(), ProjectionError> {
    let table = |base: &str| models.generation_table(base, generation);
    let failed = |action| move |error| ProjectionError::postgres(action, error);
    let ids: Vec<Uuid> = touched(events).into_iter().map(|id| id.0).collect();
    let load = format!(
        "SELECT ticket_id, state, opened_at, stage_started_at, claim_agent, claim_role FROM {} \
         WHERE ticket_id = ANY($1)",
        table("stats_tickets")
    );
    let counters = format!(
        "INSERT INTO {} AS c (name, value) VALUES ($1, $2) \
         ON CONFLICT (name) DO UPDATE SET value = c.value + EXCLUDED.value",
        table("stats_counters")
    );
    let agents = format!(
        "INSERT INTO {} AS a (agent_id, role, outcome, count) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (agent_id, role, outcome) DO UPDATE SET count = a.count + EXCLUDED.count",
        table("stats_agents")
    );
    // The per-ticket rows go as one array per column, one statement per
    // table for the whole page (each ticket once in `delta.tickets`).
    let tickets = format!(
        "INSERT INTO {} (ticket_id, state, opened_at, stage_started_at, claim_agent, claim_role) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::int8[], $5::text[], $6::text[]) \
         ON CONFLICT (ticket_id) DO UPDATE SET state = EXCLUDED.state, opened_at = EXCLUDED.opened_at, \
         stage_started_at = EXCLUDED.stage_started_at, claim_agent = EXCLUDED.claim_agent, \
         claim_role = EXCLUDED.claim_role",
        table("stats_tickets")
    );
    let latency = format!(
        "INSERT INTO {} (stage, ticket_id, ms) SELECT * FROM unnest($1::text[], $2::uuid[], $3::int8[])",
        table("stats_latency")
    );
    // The load and the four preparations go out together: one round trip
    // instead of six.
    let load_rows = async {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        tx.query_typed(&load, &[(&ids, Type::UUID_ARRAY)])
            .await
            .map_err(failed("load statistics rows"))
    };
    let prepare = |sql| async move { tx.prepare(sql).await.map_err(failed("prepare a statistics write")) };
    let (rows, counters, agents, tickets, latency) = futures::try_join!(
        load_rows,
        prepare(&counters),
        prepare(&agents),
        prepare(&tickets),
        prepare(&latency)
    )?;
    let mut stored: FxHashMap<TicketId, crate::stats::Progress> =
        FxHashMap::with_capacity_and_hasher(rows.len(), Default::default());
    for row in rows {
        let state: String = row.get(1);
        stored.insert(
            TicketId(row.get(0)),
            crate::stats::Progress {
                // As in SQLite: an unknown state reads as none.
                state: state.parse().ok(),
                opened_at: row.get(2),
                stage_started_at: row.get(3),
                claim_agent: row.get(4),
                claim_role: row.get(5),
                finished: Vec::new(),
            },
        );
    }
    let delta =
        StatsDelta::fold(events, |id| Ok::<_, Infallible>(stored.remove(&id))).unwrap_or_else(|never| match never {});

    // A ticket whose opening the model never saw has no state: skipped, as
    // in SQLite.
    let progressed: Vec<(Uuid, &'static str, &crate::stats::Progress)> = delta
        .tickets
        .iter()
        .filter_map(|(id, ticket)| ticket.state.map(|state| (id.0, state.as_str(), ticket)))
        .collect();
    let ticket_ids: Vec<Uuid> = progressed.iter().map(|(id, _, _)| *id).collect();
    let states: Vec<&str> = progressed.iter().map(|(_, state, _)| *state).collect();
    let opened: Vec<i64> = progressed.iter().map(|(_, _, ticket)| ticket.opened_at).collect();
    let stage_started: Vec<i64> = progressed
        .iter()
        .map(|(_, _, ticket)| ticket.stage_started_at)
        .collect();
    let claim_agents: Vec<Option<String>> = progressed
        .iter()
        .map(|(_, _, ticket)| ticket.claim_agent.as_deref().map(pg_text))
        .collect();
    let claim_roles: Vec<Option<&str>> = progressed
        .iter()
        .map(|(_, _, ticket)| ticket.claim_role.as_deref())
        .collect();
    let finished = || {
        progressed
            .iter()
            .flat_map(|(id, _, ticket)| ticket.finished.iter().map(move |(stage, ms)| (*stage, *id, *ms)))
    };
    let stages: Vec<&str> = finished().map(|(stage, _, _)| stage).collect();
    let latency_ids: Vec<Uuid> = finished().map(|(_, id, _)| id).collect();
    let ms: Vec<i64> = finished().map(|(_, _, ms)| ms).collect();

    // Every statement's parameters first, so that they outlive the
    // pipelined writes that borrow them.
    let mut params: Vec<(&tokio_postgres::Statement, Vec<&(dyn ToSql + Sync)>)> = Vec::new();
    for (name, delta) in &delta.counters {
        params.push((&counters, vec![name, delta]));
    }
    let agent_rows: Vec<(String, String, &String, &i64)> = delta
        .agents
        .iter()
        .map(|((agent, role, what), count)| (pg_text(agent), pg_text(role), what, count))
        .collect();
    for (agent, role, what, count) in &agent_rows {
        params.push((&agents, vec![agent, role, *what, *count]));
    }
    if !ticket_ids.is_empty() {
        params.push((
            &tickets,
            vec![
                &ticket_ids,
                &states,
                &opened,
                &stage_started,
                &claim_agents,
                &claim_roles,
            ],
        ));
    }
    if !stages.is_empty() {
        params.push((&latency, vec![&stages, &latency_ids, &ms]));
    }
    let writes = params
        .iter()
        .map(|(statement, params)| tx.execute(*statement, params.as_slice()));
    try_join_all(writes).await.map_err(failed("write statistics"))?;
    Ok(())
}

/// The live `stats` model's summary, read through the views in one
/// transaction that locks them first: a swap waits for it.
pub(crate) async fn stats_summary(
    client: &mut tokio_postgres::Client,
    models: &PgReadModels,
) -> Result<StatsSummary, ProjectionError> {
    let view = |base: &str| models.qualified(base);
    let failed = |action| move |error| super::not_built_or("stats", action, error);
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .map_err(|error| ProjectionError::postgres("begin", error))?;
    tx.batch_execute(&format!(
        "LOCK TABLE {}, {}, {}, {} IN ACCESS SHARE MODE",
        view("stats_tickets"),
        view("stats_latency"),
        view("stats_counters"),
        view("stats_agents")
    ))
    .await
    .map_err(failed("lock the statistics"))?;
    let mut summary = StatsSummary::default();
    for row in tx
        .query(
            &format!("SELECT state, count(*) FROM {} GROUP BY state", view("stats_tickets")),
            &[],
        )
        .await
        .map_err(failed("read the statistics"))?
    {
        summary
            .tickets_per_state
            .insert(row.get::<_, String>(0), row.get::<_, i64>(1) as u64);
    }
    // percentile_disc is the nearest rank, ceil(q * n), as in SQLite's
    // summary.
    for row in tx
        .query(
            &format!(
                "SELECT stage, count(*), percentile_disc(0.50) WITHIN GROUP (ORDER BY ms), \
                 percentile_disc(0.90) WITHIN GROUP (ORDER BY ms), percentile_disc(0.99) WITHIN GROUP (ORDER BY ms) \
                 FROM {} GROUP BY stage",
                view("stats_latency")
            ),
            &[],
        )
        .await
        .map_err(failed("read the statistics"))?
    {
        let stage: String = row.get(0);
        if !STAGES.contains(&stage.as_str()) {
            continue;
        }
        summary.stage_latency.insert(
            stage,
            StageLatency {
                count: row.get::<_, i64>(1) as u64,
                p50_ms: row.get::<_, i64>(2) as u64,
                p90_ms: row.get::<_, i64>(3) as u64,
                p99_ms: row.get::<_, i64>(4) as u64,
            },
        );
    }
    for row in tx
        .query(&format!("SELECT name, value FROM {}", view("stats_counters")), &[])
        .await
        .map_err(failed("read the statistics"))?
    {
        summary
            .counters
            .insert(row.get::<_, String>(0), row.get::<_, i64>(1) as u64);
    }
    for row in tx
        .query(
            &format!("SELECT agent_id, role, outcome, count FROM {}", view("stats_agents")),
            &[],
        )
        .await
        .map_err(failed("read the statistics"))?
    {
        summary.agents.entry(row.get::<_, String>(0)).or_default().add(
            row.get::<_, &str>(1),
            row.get::<_, &str>(2),
            row.get::<_, i64>(3) as u64,
        );
    }
    tx.commit()
        .await
        .map_err(|error| ProjectionError::postgres("end a read", error))?;
    Ok(summary)
}

/// The indexes the ticket lists page through, in their own order (see
/// `TicketsView::list_after`): one state's tickets by `(state_entered_at,
/// ticket_id)`, all tickets by `(created_at, ticket_id)`. Named, so that
/// a generation built before them can get them later
/// ([`Model::add_missing_list_indexes`]).
fn list_indexes(models: &PgReadModels, generation: u32) -> String {
    let table = models.generation_table("tickets", generation);
    format!(
        "CREATE INDEX IF NOT EXISTS tickets_g{generation}_state_list ON {table} (state, state_entered_at, ticket_id);
         CREATE INDEX IF NOT EXISTS tickets_g{generation}_created_list ON {table} (created_at, ticket_id);"
    )
}
