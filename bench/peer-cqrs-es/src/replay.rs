//! `--replay-events N`: the peer's replay rate, for `triage-bench
//! pg-rebuild --peer`.
//!
//! Writes whole ticket lifecycles (the same seven commands and payloads as
//! the command runs, decided by this crate's aggregate, with the same
//! metadata) into postgres-es's `events` table of a fresh schema, then
//! replays every event through cqrs-es's own replay (`QueryReplay::
//! replay_all`: postgres-es streams the rows, cqrs-es deserializes each
//! envelope) into a query that folds each ticket in memory, as Triage's
//! rebuild folds its tickets. The query keeps no view in the database:
//! postgres-es's `GenericQuery` would load and save a view per event,
//! which measures round trips, not replay, and would flatter Triage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cqrs_es::persist::QueryReplay;
use cqrs_es::{Aggregate, EventEnvelope, Query};
use postgres_es::PostgresEventRepository;
use serde_json::json;
use sqlx::QueryBuilder;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::ticket::{Agent, Ticket, TicketCommand, TicketEvent};
use crate::{in_fresh_schema, round, workload};

/// Rows per INSERT while generating: 7 parameters each, well under
/// PostgreSQL's 65,535.
const ROWS_PER_INSERT: usize = 2_000;

/// Folds every replayed event into its ticket, in memory. Clones share
/// the tickets and the count.
#[derive(Clone, Debug, Default)]
struct Fold {
    tickets: Arc<Mutex<HashMap<String, Ticket>>>,
    events: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl Query<Ticket> for Fold {
    async fn dispatch(&self, aggregate_id: &str, events: &[EventEnvelope<Ticket>]) {
        let mut tickets = self.tickets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let ticket = tickets.entry(aggregate_id.to_owned()).or_default();
        for envelope in events {
            ticket.apply(envelope.payload.clone());
        }
        self.events.fetch_add(events.len() as u64, Ordering::Relaxed);
    }
}

/// One postgres-es row: aggregate id, sequence, event type, payload,
/// metadata.
type Row = (String, i64, String, serde_json::Value, serde_json::Value);

/// One ticket's lifecycle as postgres-es rows.
fn lifecycle(agents: &[Agent; 7]) -> anyhow::Result<Vec<Row>> {
    let ticket_id = Uuid::now_v7();
    let mut ticket = Ticket::default();
    let mut claim = None;
    let mut rows = Vec::with_capacity(agents.len());
    for (step, agent) in agents.iter().enumerate() {
        let command = TicketCommand {
            command_id: Uuid::new_v4(),
            ticket_id,
            agent: agent.clone(),
            kind: workload::command(step, claim),
        };
        let event: TicketEvent = ticket
            .decide(&command, chrono::Utc::now())
            .map_err(|rejection| anyhow::anyhow!("step {step}: {rejection}"))?;
        if workload::takes_claim(step) {
            claim = Some(command.command_id);
        }
        let metadata = json!({
            "schema_version": "1",
            "command_id": command.command_id.to_string(),
            "correlation_id": command.command_id.to_string(),
            "causation_id": command.command_id.to_string(),
            "agent_id": agent.id,
            "agent_role": format!("{:?}", agent.role).to_lowercase(),
            "recorded_at": chrono::Utc::now().to_rfc3339(),
        });
        let event_type = cqrs_es::DomainEvent::event_type(&event);
        let payload = serde_json::to_value(&event)?;
        ticket.apply(event);
        rows.push((ticket_id.to_string(), step as i64 + 1, event_type, payload, metadata));
    }
    Ok(rows)
}

/// Generates about `events` events, replays them all, and prints one JSON
/// line.
pub(crate) async fn run(url: &str, pool_size: u32, events: u64) -> anyhow::Result<serde_json::Value> {
    in_fresh_schema(url, async |schema| measure(url, pool_size, events, schema).await).await
}

async fn measure(url: &str, pool_size: u32, events: u64, schema: &str) -> anyhow::Result<serde_json::Value> {
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await?;
    let agents = workload::LIFECYCLE.map(|role| Agent {
        id: format!("{}-1", format!("{role:?}").to_lowercase()),
        role,
    });

    let generating = Instant::now();
    let tickets = events.div_ceil(7);
    let mut rows = Vec::with_capacity(ROWS_PER_INSERT);
    let mut written = 0u64;
    for n in 0..tickets {
        rows.extend(lifecycle(&agents)?);
        if rows.len() >= ROWS_PER_INSERT || n + 1 == tickets {
            let mut insert = QueryBuilder::new(format!(
                "INSERT INTO {schema}.events \
                 (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) "
            ));
            insert.push_values(
                rows.drain(..),
                |mut row, (id, sequence, event_type, payload, metadata)| {
                    row.push_bind(Ticket::TYPE)
                        .push_bind(id)
                        .push_bind(sequence)
                        .push_bind(event_type)
                        .push_bind("1")
                        .push_bind(payload)
                        .push_bind(metadata);
                },
            );
            written += insert.build().execute(&pool).await?.rows_affected();
        }
    }
    let generate_s = generating.elapsed().as_secs_f64();
    // As Triage's side is measured: the table vacuumed (hint bits set, so
    // that the timed read does not write pages back) and read whole once
    // before the timed replay (Triage's round reads its log twice first).
    sqlx::raw_sql(&format!("VACUUM (ANALYZE) {schema}.events"))
        .execute(&pool)
        .await?;
    let repository = || {
        PostgresEventRepository::new(pool.clone())
            .with_tables(&format!("{schema}.events"), &format!("{schema}.snapshots"))
    };
    QueryReplay::new(repository(), Fold::default())
        .replay_all()
        .await
        .map_err(|error| anyhow::anyhow!("warm-up replay: {error}"))?;

    let fold = Fold::default();
    let mut replay = QueryReplay::new(repository(), fold.clone());
    let failed = Arc::new(AtomicU64::new(0));
    let failures = failed.clone();
    replay.use_error_handler(Box::new(move |_| {
        failures.fetch_add(1, Ordering::Relaxed);
    }));
    let started = Instant::now();
    replay
        .replay_all()
        .await
        .map_err(|error| anyhow::anyhow!("replay: {error}"))?;
    let wall = started.elapsed().as_secs_f64();
    pool.close().await;
    anyhow::ensure!(failed.load(Ordering::Relaxed) == 0, "events failed to replay");
    let replayed = fold.events.load(Ordering::Relaxed);
    anyhow::ensure!(replayed == written, "{replayed} events replayed of {written}");
    let folded = fold.tickets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    anyhow::ensure!(
        folded.len() as u64 == tickets,
        "{} tickets folded of {tickets}",
        folded.len()
    );
    anyhow::ensure!(
        folded
            .values()
            .all(|ticket| ticket.state == Some(crate::ticket::State::Resolved)),
        "every ticket folds to resolved"
    );
    Ok(json!({
        "bench": "pg-replay",
        "system": "cqrs-es",
        "events": written,
        "generate_s": round(generate_s, 3),
        "wall_s": round(wall, 3),
        "events_per_s": round(written as f64 / wall, 0),
        "pool_size": pool_size,
    }))
}
