//! The peer of `triage-bench pg-compare`: Triage's ticket workload on
//! [cqrs-es] 0.5 with [postgres-es] 0.5, against the same PostgreSQL
//! database, printing the same JSON lines with `"system":"cqrs-es"`.
//!
//! # Main decision: its own crate, its own lockfile
//! postgres-es pulls sqlx 0.8, whose optional `sqlx-sqlite` needs
//! `libsqlite3-sys` 0.28; the Triage workspace has rusqlite's 0.35, and
//! both declare `links = "sqlite3"`, so cargo refuses to resolve them in one
//! graph ("Only one package in the dependency graph may specify the same
//! links value"). This crate is therefore a workspace of its own, excluded
//! from Triage's, and `pg-compare` runs it as a separate binary.
//!
//! # What is the same as Triage's side
//! - The workload (`workload.rs`): each agent drives fresh tickets through
//!   the seven-command lifecycle (`disjoint`), or all agents race for work
//!   on a few shared tickets (`hot`), with the same command payloads.
//! - The aggregate (`ticket.rs`): the same commands, roles, validation,
//!   claims and fencing, and one event per command.
//! - Concurrency: postgres-es's optimistic check (the primary key
//!   `(aggregate_type, aggregate_id, sequence)`, a unique violation becomes
//!   `AggregateConflict`). On a conflict the command is executed again on a
//!   fresh load, at most 8 attempts with full-jitter backoff from 1 ms to
//!   50 ms: Triage's default `RetryPolicy`.
//! - Pool size: `--pool-size`, the same number `pg-compare` gives Triage.
//!
//! Its `conflicts` are every conflict it met, all contention; they compare
//! with Triage's `store_conflicts`, not with its `conflicts` (see
//! `bench/src/pg.rs`).
//!
//! What differs, by design of the peer: cqrs-es loads the aggregate's
//! events before every command (no stream cache), stores JSON with string
//! metadata, and has no global position or subscription machinery.
//! Each run uses tables in a fresh schema `peer_tmp_<random>`, dropped
//! afterwards.
//!
//! [cqrs-es]: https://crates.io/crates/cqrs-es
//! [postgres-es]: https://crates.io/crates/postgres-es

mod replay;
mod ticket;
mod workload;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use cqrs_es::CqrsFramework;
use cqrs_es::persist::PersistedEventStore;
use hdrhistogram::Histogram;
use postgres_es::PostgresEventRepository;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, PgConnection};

use crate::workload::{Tickets, TicketsMode};

#[derive(Debug, Parser)]
#[command(
    name = "peer-cqrs-es",
    about = "Triage's ticket workload on cqrs-es + postgres-es: one JSON line per run"
)]
struct Cli {
    /// The PostgreSQL database (`postgres://USER@HOST:PORT/DATABASE`).
    #[arg(long)]
    url: String,
    /// Concurrent agents, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    agents: Vec<usize>,
    /// Ticket sets, comma-separated: disjoint (own tickets per agent) or hot
    /// (all agents on a few shared tickets).
    #[arg(long, value_delimiter = ',', default_value = "disjoint")]
    tickets: Vec<TicketsMode>,
    /// Shared tickets in the hot set.
    #[arg(long, default_value_t = 4)]
    hot_tickets: usize,
    /// Seconds each run lasts.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Most pooled connections.
    #[arg(long, default_value_t = 16)]
    pool_size: u32,
    /// Instead of command runs: write about this many events (whole
    /// lifecycles) and time cqrs-es's replay of all of them (see
    /// `replay.rs`), as `triage-bench pg-rebuild --peer` does.
    #[arg(long)]
    replay_events: Option<u64>,
}

pub(crate) type Cqrs = CqrsFramework<ticket::Ticket, workload::PersistedStore>;

/// postgres-es's tables (its `db/init.sql`), in a schema of their own.
fn schema_sql(schema: &str) -> String {
    format!(
        "CREATE SCHEMA {schema};
CREATE TABLE {schema}.events (
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text NOT NULL,
    event_version  text NOT NULL,
    payload        json NOT NULL,
    metadata       json NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE TABLE {schema}.snapshots (
    aggregate_type   text NOT NULL,
    aggregate_id     text NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0) NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);"
    )
}

async fn run(cli: &Cli, agents: usize, mode: TicketsMode) -> anyhow::Result<serde_json::Value> {
    in_fresh_schema(&cli.url, async |schema| measure(cli, agents, mode, schema).await).await
}

/// Runs `work` on postgres-es's tables in a fresh schema `peer_tmp_<random>`,
/// dropped afterwards whatever happened, so a failed run leaves nothing
/// behind.
pub(crate) async fn in_fresh_schema<T>(
    url: &str,
    work: impl AsyncFnOnce(&str) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let schema = format!("peer_tmp_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let mut admin = PgConnection::connect(url).await.context("cannot connect")?;
    sqlx::raw_sql(&schema_sql(&schema)).execute(&mut admin).await?;
    let result = work(&schema).await;
    sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    result
}

async fn measure(cli: &Cli, agents: usize, mode: TicketsMode, schema: &str) -> anyhow::Result<serde_json::Value> {
    let pool = PgPoolOptions::new()
        .max_connections(cli.pool_size)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&cli.url)
        .await?;
    let repo = || {
        PostgresEventRepository::new(pool.clone())
            .with_tables(&format!("{schema}.events"), &format!("{schema}.snapshots"))
    };
    // `postgres_cqrs` without queries: plain event sourcing, every command
    // loads the aggregate's events, as postgres-es does by default.
    let cqrs = std::sync::Arc::new(CqrsFramework::new(
        PersistedEventStore::new_event_store(repo()),
        vec![],
        (),
    ));
    // The hot workload reads a ticket before choosing its command.
    let loader = std::sync::Arc::new(PersistedEventStore::new_event_store(repo()));
    let tickets = Tickets::new(mode, cli.hot_tickets);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(cli.seconds);
    let tasks: Vec<_> = (0..agents)
        .map(|index| {
            let cqrs = cqrs.clone();
            let loader = loader.clone();
            let tickets = tickets.clone();
            tokio::spawn(async move { workload::agent_loop(&cqrs, &loader, &tickets, index, deadline).await })
        })
        .collect();
    let mut totals = workload::AgentTotals::new()?;
    for task in tasks {
        totals.add(task.await??)?;
    }
    let wall = started.elapsed();
    pool.close().await;
    let ms = |quantile: f64| round(totals.latency_us.value_at_quantile(quantile) as f64 / 1000.0, 3);
    Ok(json!({
        "bench": "pg-commands",
        "system": "cqrs-es",
        "agents": agents,
        "tickets": mode.name(),
        "hot_tickets": (mode == TicketsMode::Hot).then_some(cli.hot_tickets),
        "commands": totals.accepted,
        "rejected": totals.rejected,
        "contended": totals.contended,
        "loads": totals.loads,
        "wall_s": round(wall.as_secs_f64(), 3),
        "commands_per_s": round(totals.accepted as f64 / wall.as_secs_f64(), 1),
        "p50_ms": ms(0.50),
        "p99_ms": ms(0.99),
        "max_ms": round(totals.latency_us.max() as f64 / 1000.0, 3),
        "conflicts": totals.conflicts,
        "pool_size": cli.pool_size,
    }))
}

/// `value` rounded to `digits` decimals, for the JSON lines.
fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

/// A latency histogram in microseconds, up to a minute.
pub(crate) fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(events) = cli.replay_events {
        println!("{}", replay::run(&cli.url, cli.pool_size, events).await?);
        return Ok(());
    }
    for &mode in &cli.tickets {
        for &agents in &cli.agents {
            println!("{}", run(&cli, agents, mode).await?);
        }
    }
    Ok(())
}
