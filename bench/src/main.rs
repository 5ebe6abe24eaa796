//! The Triage benchmark harness.
//!
//! Every run prints one JSON line; a comparison prints its ratio as one
//! more line. Peers are measured in the same process, one after the other,
//! on the same machine, so that ratios do not depend on the day's noise.
//! Latency goes into HDR histograms (microseconds).
//!
//! `triage-bench commands`: durable SQLite command throughput with 1, 8 and
//! 32 concurrent agents on disjoint tickets, with group commit and with one
//! commit per append (the peer). Each agent drives tickets through the
//! whole lifecycle, every command through the real command handler: load
//! the stream, decide, append with `Exact(revision)`.
//!
//! `triage-bench pg-commands`, `pg-compare` and `pg-rebuild`: the same on
//! PostgreSQL, against cqrs-es with postgres-es as the peer (see `pg.rs`).
//! The peer is the one exception to "in the same process": its crate
//! cannot share the workspace's dependency graph, so it runs as its own
//! binary, alternated with Triage's runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The allocator of the `triage` binary (see cli/src/main.rs), so that the
/// harness measures what users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::json;
use triage_command_handler::CommandHandler;
use triage_domain::{Agent, CommandEnvelope, TicketId};
use triage_event_store::EventStore;
use triage_projections::{Projector, ReadModelDb};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions, Synchronous};
mod pg;
mod replay;
mod workload;

#[derive(Debug, Parser)]
#[command(name = "triage-bench", about = "Triage benchmarks: one JSON line per run")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Command throughput and latency on the embedded SQLite store, group
    /// commit against one commit per append.
    Commands {
        /// Concurrent agents, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        agents: Vec<usize>,
        /// Commit modes to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "group,single")]
        modes: Vec<Mode>,
        /// Seconds each run lasts.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// SQLite durability.
        #[arg(long, value_enum, default_value_t = Sync::Full)]
        sync: Sync,
        /// Page size of the store files, in bytes.
        #[arg(long, default_value_t = 2048)]
        page_size: u32,
        /// Keep the read models live during the run: none, in a sibling
        /// file (what Triage does), or in the event store's own file.
        #[arg(long, value_enum, default_value_t = ProjectorPlacement::None)]
        projector: ProjectorPlacement,
    },
    /// Projection rebuild: generate realistic ticket events into a fresh
    /// SQLite store, then rebuild every projection from position 0.
    Rebuild {
        /// Events to generate (whole ticket lifecycles of 7 events).
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Events per read page and read-model transaction.
        #[arg(long, default_value_t = 4096)]
        batch_size: usize,
        /// Also keep a copy of the generated store at this path, to rebuild
        /// it with `triage projections rebuild` in a process of its own
        /// (whose peak RSS, say `/usr/bin/time -v`, is what a user sees).
        #[arg(long, value_name = "PATH")]
        keep_store: Option<std::path::PathBuf>,
    },
    /// `triage events --format jsonl` over the whole log: the analysts'
    /// query, each event serialized as a JSON line (to a sink).
    Events {
        /// Events to generate (whole ticket lifecycles of 7 events).
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
    },
    /// Replay speed of the SQLite store: read the whole log in pages and
    /// decode and fold every event, as a projection rebuild does.
    Replay {
        /// Events to generate (whole ticket lifecycles of 7 events).
        #[arg(long, default_value_t = 210_000)]
        events: u64,
        /// Page sizes to compare, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "2048")]
        page_sizes: Vec<u32>,
    },
    /// Command throughput and latency on PostgreSQL (a fresh schema per
    /// run), disjoint or hot tickets.
    PgCommands {
        #[command(flatten)]
        pg: PgArgs,
    },
    /// `pg-commands` against the peer (cqrs-es + postgres-es), alternating
    /// the two per round; medians and ratios per configuration.
    PgCompare {
        #[command(flatten)]
        pg: PgArgs,
        /// Runs of each system per configuration.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// The peer's binary; built from bench/peer-cqrs-es when absent.
        #[arg(long)]
        peer: Option<std::path::PathBuf>,
    },
    /// Projection rebuild from PostgreSQL: generate ticket events into a
    /// fresh schema, then rebuild every projection from position 0.
    PgRebuild {
        /// The PostgreSQL database. Without `sslmode` in it, connections are
        /// made without TLS (the peer has none), not `prefer` as in `triage`.
        #[arg(long, env = "TRIAGE_PG_URL", default_value = DEFAULT_PG_URL)]
        url: String,
        /// Events to generate (whole ticket lifecycles of 7 events).
        #[arg(long, default_value_t = 210_000)]
        events: u64,
        /// Events per read page and read-model transaction.
        #[arg(long, default_value_t = 4096)]
        batch_size: usize,
        /// Most pooled connections of the store.
        #[arg(long, default_value_t = 16)]
        pool_size: usize,
        /// Where the rebuilt read models go: a SQLite file (as `triage`'s
        /// default) or a fresh schema of the same PostgreSQL database.
        #[arg(long, value_enum, default_value_t = pg::ReadModelPlace::Sqlite)]
        read_model: pg::ReadModelPlace,
        /// Rebuilds of the one generated log, a JSON line each.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
        /// After each round, the peer's replay (cqrs-es + postgres-es) of as
        /// many events of its own, then medians and ratios.
        #[arg(long)]
        compare: bool,
        /// The peer's binary; built from bench/peer-cqrs-es when absent.
        #[arg(long, requires = "compare")]
        peer: Option<std::path::PathBuf>,
    },
}

/// Without `sslmode`, the PostgreSQL benchmarks connect without TLS (see
/// `pg::plain_unless_asked`).
const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/triage_bench";

/// What `pg-commands` and `pg-compare` share.
#[derive(Debug, clap::Args)]
struct PgArgs {
    /// The PostgreSQL database. Without `sslmode` in it, connections are
    /// made without TLS (the peer has none), not `prefer` as in `triage`.
    #[arg(long, env = "TRIAGE_PG_URL", default_value = DEFAULT_PG_URL)]
    url: String,
    /// Concurrent agents, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    agents: Vec<usize>,
    /// Ticket sets, comma-separated: disjoint (own tickets per agent) or hot
    /// (all agents on a few shared tickets).
    #[arg(long, value_delimiter = ',', default_value = "disjoint,hot")]
    tickets: Vec<pg::TicketsMode>,
    /// Shared tickets in the hot set.
    #[arg(long, default_value_t = 4)]
    hot_tickets: usize,
    /// Seconds each run lasts.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Most pooled connections, the same for Triage and the peer.
    #[arg(long, default_value_t = 16)]
    pool_size: usize,
    /// Run Triage's handler without its rejection log (`rejections-<uuid>`
    /// records of refused commands), which the peer does not keep: the same
    /// work on both sides. By default the handler runs as Triage ships it.
    #[arg(long)]
    no_rejection_log: bool,
}

impl PgArgs {
    /// Every configuration, ticket set by ticket set.
    fn configs(&self) -> Vec<pg::RunConfig> {
        self.tickets
            .iter()
            .flat_map(|&tickets| {
                self.agents.iter().map(move |&agents| pg::RunConfig {
                    agents,
                    tickets,
                    hot_tickets: self.hot_tickets,
                    seconds: self.seconds,
                    pool_size: self.pool_size,
                    rejection_log: !self.no_rejection_log,
                })
            })
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Group commit: one transaction and fsync for every append queued.
    Group,
    /// One transaction and fsync per append.
    Single,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Group => "group_commit",
            Mode::Single => "commit_per_append",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ProjectorPlacement {
    /// No projections run.
    None,
    /// Read models in a sibling file.
    Sibling,
    /// Read models in the event store's own file.
    SameFile,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Sync {
    Full,
    Normal,
}

/// One run's measurements.
#[derive(Debug)]
struct RunResult {
    commands: u64,
    wall: Duration,
    latency_us: Histogram<u64>,
}

impl RunResult {
    fn per_second(&self) -> f64 {
        self.commands as f64 / self.wall.as_secs_f64()
    }
}

/// Drives tickets through the lifecycle until `deadline`, timing every
/// command.
async fn agent_loop(handler: CommandHandler, index: usize, deadline: Instant) -> anyhow::Result<(u64, Histogram<u64>)> {
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut commands = 0u64;
    let agents = workload::LIFECYCLE.map(|role| Agent::new(format!("{role}-{index}"), role));
    while Instant::now() < deadline {
        let ticket = TicketId::new();
        let mut revision = None;
        let mut claim = None;
        for (step, agent) in agents.iter().enumerate() {
            let mut envelope = CommandEnvelope::new(ticket, agent.clone(), workload::command(step, claim));
            if let Some(revision) = revision {
                envelope = envelope.at_revision(revision);
            }
            let command_id = envelope.command_id;
            let started = Instant::now();
            let accepted = handler
                .handle(envelope)
                .await
                .with_context(|| format!("agent {index} ticket {ticket}"))?;
            latency.record(started.elapsed().as_micros().max(1) as u64)?;
            commands += 1;
            revision = Some(accepted.revision);
            if workload::takes_claim(step) {
                claim = Some(command_id);
            }
        }
    }
    Ok((commands, latency))
}

async fn run_commands(
    agents: usize,
    mode: Mode,
    sync: Sync,
    seconds: f64,
    page_size: u32,
    placement: ProjectorPlacement,
) -> anyhow::Result<(RunResult, serde_json::Value)> {
    let options = SqliteOptions {
        page_size,
        group_commit: mode == Mode::Group,
        synchronous: match sync {
            Sync::Full => Synchronous::Full,
            Sync::Normal => Synchronous::Normal,
        },
        ..SqliteOptions::default()
    };
    let store = Arc::new(SqliteEventStore::open_temporary_with(options)?);
    let handler = CommandHandler::new(store.clone() as Arc<dyn EventStore>);
    let read_models = match placement {
        ProjectorPlacement::None => None,
        ProjectorPlacement::Sibling => Some(ReadModelDb::open(ReadModelDb::sibling_of(store.path()))?),
        ProjectorPlacement::SameFile => Some(ReadModelDb::open_in_event_store_file(store.path())?),
    };
    let stop_projector = Arc::new(AtomicBool::new(false));
    let projector = read_models.map(|db| Projector::new(store.clone() as Arc<dyn EventStore>, db));
    let projector_task = projector.clone().map(|projector| {
        let stop = stop_projector.clone();
        tokio::spawn(async move { projector.run_live(stop).await })
    });
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..agents)
        .map(|index| tokio::spawn(agent_loop(handler.clone(), index, deadline)))
        .collect();
    let mut commands = 0;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for task in tasks {
        let (count, histogram) = task.await??;
        commands += count;
        latency.add(histogram)?;
    }
    let wall = started.elapsed();
    // How far the live projections kept up: their lag when the agents stop.
    let projection_lag = match &projector {
        Some(projector) => projector.status().await?.iter().map(|status| status.lag).max(),
        None => None,
    };
    stop_projector.store(true, Ordering::Relaxed);
    if let Some(task) = projector_task {
        task.await??;
    }
    let stats = store.stats();
    let result = RunResult {
        commands,
        wall,
        latency_us: latency,
    };
    let line = json!({
        "bench": "commands",
        "store": "sqlite",
        "mode": mode.name(),
        "synchronous": format!("{sync:?}").to_uppercase(),
        "page_size": page_size,
        "projector": format!("{placement:?}").to_lowercase(),
        "projection_lag_events": projection_lag,
        "agents": agents,
        "commands": result.commands,
        "wall_s": round(wall.as_secs_f64(), 3),
        "commands_per_s": round(result.per_second(), 1),
        "p50_us": result.latency_us.value_at_quantile(0.50),
        "p99_us": result.latency_us.value_at_quantile(0.99),
        "max_us": result.latency_us.max(),
        "transactions": stats.transactions,
        "appends_per_transaction": round(stats.appends_answered as f64 / stats.transactions.max(1) as f64, 2),
        "careful_reruns": stats.careful_reruns,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    Ok((result, line))
}

/// `value` rounded to `digits` decimals, for the JSON lines.
pub(crate) fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.bench {
        Bench::Rebuild {
            events,
            batch_size,
            keep_store,
        } => {
            println!("{}", replay::rebuild(events, batch_size, keep_store.as_deref()).await?);
        }
        Bench::PgCommands { mut pg } => {
            pg.url = pg::plain_unless_asked(&pg.url);
            pg::ensure_database(&pg.url).await?;
            for config in pg.configs() {
                println!("{}", pg::commands(&pg.url, config).await?);
            }
        }
        Bench::PgCompare { mut pg, rounds, peer } => {
            pg.url = pg::plain_unless_asked(&pg.url);
            let peer = pg::peer_binary(peer)?;
            pg::ensure_database(&pg.url).await?;
            for config in pg.configs() {
                pg::compare(&pg.url, &peer, config, rounds).await?;
            }
        }
        Bench::PgRebuild {
            url,
            events,
            batch_size,
            pool_size,
            read_model,
            rounds,
            compare,
            peer,
        } => {
            let options = pg::RebuildBench {
                batch_size,
                pool_size,
                read_model,
                rounds,
                peer: if compare { Some(pg::peer_binary(peer)?) } else { None },
            };
            let url = pg::plain_unless_asked(&url);
            pg::ensure_database(&url).await?;
            pg::rebuild(&url, events, options, |line| println!("{line}")).await?;
        }
        Bench::Events { events } => {
            println!("{}", replay::events_jsonl(events).await?);
        }
        Bench::Replay { events, page_sizes } => {
            for page_size in page_sizes {
                println!("{}", replay::run(events, page_size).await?);
            }
        }
        Bench::Commands {
            agents,
            modes,
            seconds,
            sync,
            page_size,
            projector,
        } => {
            for &count in &agents {
                let mut rates = Vec::new();
                for &mode in &modes {
                    let (result, line) = run_commands(count, mode, sync, seconds, page_size, projector).await?;
                    println!("{line}");
                    rates.push((mode, result.per_second(), result.latency_us.value_at_quantile(0.99)));
                }
                let group = rates.iter().find(|(mode, _, _)| *mode == Mode::Group);
                let single = rates.iter().find(|(mode, _, _)| *mode == Mode::Single);
                if let (Some(group), Some(single)) = (group, single) {
                    println!(
                        "{}",
                        json!({
                            "bench": "commands_ratio",
                            "agents": count,
                            "group_commit_per_s": round(group.1, 1),
                            "commit_per_append_per_s": round(single.1, 1),
                            "throughput_ratio": round(group.1 / single.1, 2),
                            "p99_ratio": round(group.2 as f64 / single.2.max(1) as f64, 2),
                        })
                    );
                }
            }
        }
    }
    Ok(())
}
