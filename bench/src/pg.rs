//! The PostgreSQL benchmarks: `pg-commands`, `pg-compare` and `pg-rebuild`.
//!
//! `pg-commands` runs the `commands` workload through the real command
//! handler on [`PostgresEventStore`], in a fresh schema per run
//! (`connect_temporary`). Two ticket sets:
//! - `disjoint`: every agent opens its own tickets and drives each through
//!   the seven-command lifecycle, sending the revision it decided on, as
//!   `commands` does. No two agents touch one ticket.
//! - `hot`: all agents race for the work on a few shared tickets (4 by
//!   default). An agent loads a ticket and sends the command that takes
//!   its next claim (or opens it), without a decided-on revision, so a lost
//!   race is a conflict that the handler re-decides on fresh state, which
//!   usually ends in a rejection (the claim is taken). The winner completes
//!   its claim. Hot ticket ids are UUIDv5 of the run and `slot:generation`,
//!   so every agent names the same next ticket without talking to the
//!   others, and racing `OpenTicket`s conflict too.
//!
//! `pg-compare` measures the same workload on the peer, cqrs-es with
//! postgres-es (`bench/peer-cqrs-es`, a crate of its own: see its docs for
//! why), alternating the two per round, and prints medians and ratios.
//! The peer is a separate process; it gets the same database, pool size,
//! agents, tickets and duration.
//!
//! What counts: `commands` are accepted commands; `rejected` and
//! `contended` are the other answers. Latency covers every command sent,
//! accepted or not, retries included. `conflicts` are expected-revision
//! conflicts that were retried by deciding again on fresh state;
//! `store_conflicts` counts every conflict the store answered, including
//! those of a decision made on a cached state, which the handler decides
//! again at once (a stale cache is not contention, so it does not back
//! off). The peer has no cache: its `conflicts` are all contention, each
//! retried after a backoff, and compare with `store_conflicts`.
//!
//! The summary's `p50_ms` and `p99_ms` are medians over the rounds of each
//! round's percentile (the peer reports percentiles, not its samples).
//!
//! The handler is set up as `triage serve` sets it up, so it also records
//! every refusal in the ticket's `rejections-<uuid>` stream (one more
//! event per rejection in `hot`; the refusals of one ticket that arrive
//! while one of its records is being written share the next append),
//! which the peer does not do, after answering it (the run waits for the
//! last records before it ends);
//! `--no-rejection-log` turns that off, for the same work on both sides.
//! Its stream cache saves most reads before an append, which the peer does
//! not have.

use std::path::PathBuf;
use std::process::Command as Process;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::ValueEnum;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use triage_command_handler::{CommandError, CommandHandler};
use triage_domain::{Agent, CommandEnvelope, State, TicketId};
use triage_event_store::EventStore;
use triage_store_postgres::{PostgresEventStore, PostgresOptions};
use uuid::Uuid;

use crate::{round, workload};

/// Which tickets the agents work on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum TicketsMode {
    /// Every agent opens its own tickets and drives them end to end.
    Disjoint,
    /// All agents race for the work on a few shared tickets.
    Hot,
}

impl TicketsMode {
    fn name(self) -> &'static str {
        match self {
            TicketsMode::Disjoint => "disjoint",
            TicketsMode::Hot => "hot",
        }
    }
}

/// One configuration of a command run, the same for Triage and the peer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RunConfig {
    pub(crate) agents: usize,
    pub(crate) tickets: TicketsMode,
    pub(crate) hot_tickets: usize,
    pub(crate) seconds: f64,
    pub(crate) pool_size: usize,
    /// Whether Triage's handler records refusals (its default); the peer
    /// never does.
    pub(crate) rejection_log: bool,
}

/// The ticket set of one run.
#[derive(Clone, Debug)]
struct Tickets {
    hot: usize,
    namespace: Uuid,
}

impl Tickets {
    fn hot_ticket(&self, slot: usize, generation: u64) -> TicketId {
        TicketId(Uuid::new_v5(&self.namespace, format!("{slot}:{generation}").as_bytes()))
    }
}

/// What the agents did.
#[derive(Debug)]
struct Totals {
    accepted: u64,
    rejected: u64,
    contended: u64,
    loads: u64,
    latency_us: Histogram<u64>,
}

impl Totals {
    fn new() -> anyhow::Result<Self> {
        Ok(Totals {
            accepted: 0,
            rejected: 0,
            contended: 0,
            loads: 0,
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        })
    }

    fn add(&mut self, other: Totals) -> anyhow::Result<()> {
        self.accepted += other.accepted;
        self.rejected += other.rejected;
        self.contended += other.contended;
        self.loads += other.loads;
        self.latency_us.add(other.latency_us)?;
        Ok(())
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Accepted { revision: u64 },
    Rejected,
    Contended,
}

/// Sends one command through the handler and times it.
async fn send(handler: &CommandHandler, totals: &mut Totals, envelope: CommandEnvelope) -> anyhow::Result<Outcome> {
    let ticket = envelope.ticket_id;
    let started = Instant::now();
    let result = handler.handle(envelope).await;
    totals.latency_us.record(started.elapsed().as_micros().max(1) as u64)?;
    let outcome = match result {
        Ok(accepted) => {
            totals.accepted += 1;
            Outcome::Accepted {
                revision: accepted.revision,
            }
        }
        Err(CommandError::Rejected { .. }) => {
            totals.rejected += 1;
            Outcome::Rejected
        }
        Err(CommandError::Contended { .. }) => {
            totals.contended += 1;
            Outcome::Contended
        }
        Err(error) => return Err(anyhow::Error::new(error).context(format!("ticket {ticket}"))),
    };
    Ok(outcome)
}

/// One agent until `deadline`.
async fn agent_loop(
    handler: CommandHandler,
    mode: TicketsMode,
    tickets: Tickets,
    index: usize,
    deadline: Instant,
) -> anyhow::Result<Totals> {
    let mut totals = Totals::new()?;
    let agents = workload::LIFECYCLE.map(|role| Agent::new(format!("{role}-{index}"), role));
    match mode {
        TicketsMode::Disjoint => {
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
                    match send(&handler, &mut totals, envelope).await? {
                        Outcome::Accepted { revision: now } => revision = Some(now),
                        other => anyhow::bail!("agent {index} ticket {ticket} step {step}: {other:?}"),
                    }
                    if workload::takes_claim(step) {
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
                let loaded = handler
                    .load(ticket)
                    .await
                    .with_context(|| format!("loading ticket {ticket}"))?;
                totals.loads += 1;
                let step = match loaded.ticket.state {
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
                    Some(State::NeedsHuman) => anyhow::bail!("ticket {ticket} went to a human"),
                };
                let envelope = CommandEnvelope::new(ticket, agents[step].clone(), workload::command(step, None));
                let command_id = envelope.command_id;
                let outcome = send(&handler, &mut totals, envelope).await?;
                if let Outcome::Accepted { revision } = outcome
                    && workload::takes_claim(step)
                {
                    // The claim is ours: complete it.
                    let next = step + 1;
                    let envelope =
                        CommandEnvelope::new(ticket, agents[next].clone(), workload::command(next, Some(command_id)))
                            .at_revision(revision);
                    let done = send(&handler, &mut totals, envelope).await?;
                    anyhow::ensure!(
                        matches!(done, Outcome::Accepted { .. }),
                        "agent {index} ticket {ticket} step {next}: {done:?}"
                    );
                }
                slot = (slot + 1) % tickets.hot;
            }
        }
    }
    Ok(totals)
}

/// `triage-bench pg-commands`: one run of Triage on PostgreSQL.
pub(crate) async fn commands(url: &str, config: RunConfig) -> anyhow::Result<Value> {
    let options = PostgresOptions {
        pool_size: config.pool_size,
        ..PostgresOptions::default()
    };
    let store = Arc::new(
        PostgresEventStore::connect_temporary(url, options)
            .await
            .with_context(|| format!("cannot open a temporary store at {url}"))?,
    );
    // As `triage serve` runs it: refusals recorded after they are answered.
    let handler = CommandHandler::new(store.clone() as Arc<dyn EventStore>)
        .with_rejection_log(config.rejection_log)
        .with_rejections_recorded_in_background();
    let tickets = Tickets {
        hot: config.hot_tickets.max(1),
        namespace: Uuid::new_v4(),
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(config.seconds);
    let tasks: Vec<_> = (0..config.agents)
        .map(|index| {
            tokio::spawn(agent_loop(
                handler.clone(),
                config.tickets,
                tickets.clone(),
                index,
                deadline,
            ))
        })
        .collect();
    let mut totals = Totals::new()?;
    for task in tasks {
        totals.add(task.await??)?;
    }
    let wall = started.elapsed();
    // The last records land before the run ends, not in the next one's
    // (the peer's, in pg-compare).
    handler.rejections_recorded().await;
    let handled = handler.stats();
    let stored = store.stats();
    let ms = |quantile: f64| round(totals.latency_us.value_at_quantile(quantile) as f64 / 1000.0, 3);
    Ok(json!({
        "bench": "pg-commands",
        "system": "triage",
        "sslmode": sslmode(url),
        "agents": config.agents,
        "tickets": config.tickets.name(),
        "hot_tickets": (config.tickets == TicketsMode::Hot).then_some(config.hot_tickets),
        "commands": totals.accepted,
        "rejected": totals.rejected,
        "contended": totals.contended,
        "loads": totals.loads,
        "wall_s": round(wall.as_secs_f64(), 3),
        "commands_per_s": round(totals.accepted as f64 / wall.as_secs_f64(), 1),
        "p50_ms": ms(0.50),
        "p99_ms": ms(0.99),
        "max_ms": round(totals.latency_us.max() as f64 / 1000.0, 3),
        "conflicts": handled.conflicts_retried,
        "store_conflicts": stored.conflicts,
        "lost_races": stored.lost_races,
        "appends": stored.appends_written,
        "pool_size": config.pool_size,
        "rejection_log": config.rejection_log,
    }))
}

/// The peer's binary: built with cargo (its own workspace and lockfile)
/// unless `--peer` names one.
pub(crate) fn peer_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peer-cqrs-es/Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!(
        "building the peer: cargo build --release --manifest-path {}",
        manifest.display()
    );
    let output = Process::new(cargo)
        .args(["build", "--release", "--message-format=json", "--manifest-path"])
        .arg(&manifest)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo to build the peer")?;
    anyhow::ensure!(output.status.success(), "building the peer failed");
    // Cargo names the binary it built, wherever CARGO_TARGET_DIR points.
    let executable = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .context("cargo built no peer executable")?;
    Ok(executable)
}

/// One run of the peer, its JSON line.
fn peer_run(peer: &PathBuf, url: &str, config: RunConfig) -> anyhow::Result<Value> {
    run_peer(
        peer,
        url,
        &[
            "--agents",
            &config.agents.to_string(),
            "--tickets",
            config.tickets.name(),
            "--hot-tickets",
            &config.hot_tickets.to_string(),
            "--seconds",
            &config.seconds.to_string(),
            "--pool-size",
            &config.pool_size.to_string(),
        ],
    )
}

/// Runs the peer on `url` with `args`; its last line, as JSON.
fn run_peer(peer: &PathBuf, url: &str, args: &[&str]) -> anyhow::Result<Value> {
    let output = Process::new(peer)
        .args(["--url", url])
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run the peer {}", peer.display()))?;
    anyhow::ensure!(output.status.success(), "the peer failed: {}", output.status);
    let stdout = String::from_utf8(output.stdout)?;
    let line = stdout.lines().last().context("the peer printed nothing")?;
    Ok(serde_json::from_str(line)?)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

/// `triage-bench pg-compare`: for each configuration, Triage and the peer
/// in turn (A B A B …), every run's line, then one summary line.
pub(crate) async fn compare(url: &str, peer: &PathBuf, config: RunConfig, rounds: usize) -> anyhow::Result<()> {
    let mut triage = Vec::new();
    let mut peers = Vec::new();
    for round in 0..rounds.max(1) {
        // Each goes first in every other round, so that neither always
        // meets the other's leftovers (dirty pages, autovacuum, the WAL).
        if round % 2 == 1 {
            let line = peer_run(peer, url, config)?;
            println!("{line}");
            peers.push(line);
        }
        let line = commands(url, config).await?;
        println!("{line}");
        triage.push(line);
        if round % 2 == 0 {
            let line = peer_run(peer, url, config)?;
            println!("{line}");
            peers.push(line);
        }
    }
    let medians = |lines: &[Value], key: &str| median(lines.iter().filter_map(|line| line[key].as_f64()).collect());
    let (triage_rate, peer_rate) = (medians(&triage, "commands_per_s"), medians(&peers, "commands_per_s"));
    let (triage_p99, peer_p99) = (medians(&triage, "p99_ms"), medians(&peers, "p99_ms"));
    let ratio_rate = triage_rate / peer_rate.max(f64::MIN_POSITIVE);
    let ratio_p99 = triage_p99 / peer_p99.max(f64::MIN_POSITIVE);
    // DESIGN.md's targets are for 8 to 32 agents.
    let targeted = (8..=32).contains(&config.agents);
    println!(
        "{}",
        json!({
            "bench": "pg-compare",
            "agents": config.agents,
            "tickets": config.tickets.name(),
            "rounds": triage.len(),
            "seconds": config.seconds,
            "pool_size": config.pool_size,
            "triage_rejection_log": config.rejection_log,
            "triage_commands_per_s": round(triage_rate, 1),
            "peer_commands_per_s": round(peer_rate, 1),
            "triage_p50_ms": round(medians(&triage, "p50_ms"), 3),
            "peer_p50_ms": round(medians(&peers, "p50_ms"), 3),
            "triage_p99_ms": round(triage_p99, 3),
            "peer_p99_ms": round(peer_p99, 3),
            "ratio_commands_per_s": round(ratio_rate, 2),
            "ratio_p99": round(ratio_p99, 2),
            "target_ratio_commands_per_s": targeted.then_some(1.5),
            "target_ratio_p99": targeted.then_some(0.75),
            "targets_met": targeted.then_some(ratio_rate >= 1.5 && ratio_p99 <= 0.75),
        })
    );
    Ok(())
}

/// Reads the whole log in pages and decodes every event, as a rebuild's
/// reader does; returns the seconds taken and the CPU used meanwhile.
async fn read_all(
    store: &dyn EventStore,
    total: u64,
    batch_size: usize,
) -> anyhow::Result<(f64, serde_json::Map<String, Value>)> {
    let cpu = crate::replay::CpuReading::now();
    let started = Instant::now();
    let mut decoded = 0u64;
    let mut failure = None;
    triage_projections::query::EventQuery::default()
        .scan(
            store,
            batch_size,
            |record| match triage_command_handler::decode_recorded(record) {
                Ok(_) => {
                    decoded += 1;
                    std::ops::ControlFlow::Continue(())
                }
                Err(error) => {
                    failure = Some(error);
                    std::ops::ControlFlow::Break(())
                }
            },
        )
        .await?;
    if let Some(error) = failure {
        return Err(error.into());
    }
    anyhow::ensure!(decoded == total, "read {decoded} of {total} events");
    let elapsed = started.elapsed().as_secs_f64();
    Ok((elapsed, cpu.map(crate::replay::CpuReading::since).unwrap_or_default()))
}

/// Where `pg-rebuild` puts the read models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ReadModelPlace {
    /// A SQLite read-model file in a temporary directory.
    Sqlite,
    /// A fresh schema of the same PostgreSQL database, dropped afterwards.
    Postgres,
}

/// Rebuilds `tickets` and `stats` from position 0 of `store`, which holds
/// `total` events of whole lifecycles, into fresh PostgreSQL read models in
/// a temporary schema, and checks the result.
async fn rebuild_into_postgres(
    url: &str,
    store: Arc<dyn EventStore>,
    total: u64,
    batch_size: usize,
) -> anyhow::Result<Value> {
    use triage_projections::{PgProjector, PgReadModelOptions, PgReadModels, ProjectorOptions, RebuildOptions};
    let models = PgReadModels::connect_temporary(url, PgReadModelOptions::default())
        .await
        .with_context(|| format!("cannot open temporary read models at {url}"))?;
    let projector = PgProjector::new(store, models).with_options(ProjectorOptions {
        batch_size,
        ..ProjectorOptions::default()
    });
    crate::replay::reset_peak_rss();
    let rss_at_start = crate::replay::rss_mb();
    let cpu = crate::replay::CpuReading::now();
    let started = Instant::now();
    let reports = projector
        .rebuild_many(&["tickets", "stats"], RebuildOptions::default())
        .await?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu.map(crate::replay::CpuReading::since).unwrap_or_default();
    let read_models = triage_projections::ReadModels::Postgres(projector);
    let tickets: u64 = read_models.counts().await?.values().sum();
    anyhow::ensure!(
        tickets == total.div_ceil(7),
        "the rebuilt model holds {tickets} tickets, expected {}",
        total.div_ceil(7)
    );
    let mut result = json!({
        "read_model": "postgres",
        "events": total,
        "projections": reports.iter().map(|report| json!({ "projection": report.name, "events": report.events })).collect::<Vec<_>>(),
        "wall_s": round(wall, 3),
        // Of the wall time, the replay; the rest is the swap, which
        // builds the secondary indexes.
        "replay_s": round(reports.first().map_or(0.0, |report| report.wall_s), 3),
        // Of the wall time, the read-model writes; the reads overlap them.
        "write_s": round(reports.first().map_or(0.0, |report| report.write_s), 3),
        "events_per_s": round(total as f64 / wall, 0),
        "peak_rss_mb": crate::replay::peak_rss_mb().map(|m| round(m, 1)),
        "rss_at_start_mb": rss_at_start.map(|m| round(m, 1)),
        "batch_size": batch_size,
    });
    if let Value::Object(fields) = &mut result {
        fields.extend(cpu);
    }
    Ok(result)
}

/// Creates the database `url` names if the server says it does not exist
/// (a fresh machine has no `triage_bench`), connecting to the server's
/// `postgres` database to do so, and says so on stderr. The benches then
/// make and drop their own schemas inside it.
pub(crate) async fn ensure_database(url: &str) -> anyhow::Result<()> {
    let server = parse(url)?;
    match server.config.connect(server.tls.clone()).await {
        Err(error) if error.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) => {}
        // Connected, or failed for another reason, which the bench's own
        // connection then reports.
        _ => return Ok(()),
    }
    let mut config = server.config.clone();
    let Some(name) = config.get_dbname().map(str::to_owned) else {
        return Ok(());
    };
    config.dbname("postgres");
    let (client, connection) = config
        .connect(server.tls.clone())
        .await
        .with_context(|| format!("database {name:?} does not exist, and the server's \"postgres\" database to create it from cannot be reached"))?;
    let connection = tokio::spawn(connection);
    client
        .batch_execute(&format!(r#"CREATE DATABASE "{}""#, name.replace('"', "\"\"")))
        .await
        .with_context(|| format!("database {name:?} does not exist and cannot be created"))?;
    drop(client);
    let _ = connection.await;
    eprintln!("created the database {name:?} for the benchmarks");
    Ok(())
}

/// `url` as the benchmarks use it: without TLS unless its `sslmode` asks
/// for it. The peer's sqlx is built without TLS, so both sides of a
/// comparison then do the same work; and Triage's own default (`prefer`,
/// as libpq's) would encrypt on a server that offers TLS, which costs a
/// rebuild about a tenth of its speed here.
pub(crate) fn plain_unless_asked(url: &str) -> String {
    if url.contains("sslmode") {
        url.to_owned()
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}sslmode=disable")
    } else {
        format!("{url} sslmode=disable")
    }
}

/// The `sslmode` the stores connect with, for the JSON lines.
fn sslmode(url: &str) -> &'static str {
    parse(url).map_or("?", |server| server.tls.mode().as_str())
}

/// `url` read as the stores read it, TLS settings included.
fn parse(url: &str) -> anyhow::Result<triage_store_postgres::tls::PgUrl> {
    triage_store_postgres::tls::parse_url(url).map_err(anyhow::Error::msg)
}

/// A session of its own on `url`, secured as the stores' sessions are (the
/// URL's `sslmode`), and the task driving it.
async fn session(url: &str) -> anyhow::Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
    let server = parse(url)?;
    let (client, connection) = server
        .config
        .connect(server.tls)
        .await
        .context("cannot connect to the benchmark database")?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((client, driver))
}

/// Vacuums the freshly filled log, as autovacuum does to a log at rest
/// (an insert-only table is vacuumed once enough rows were added): the
/// first reads of a just-loaded table otherwise also set every row's
/// hint bits and write the pages back, which is loading, not rebuilding.
/// Returns the seconds taken.
async fn settle(url: &str, schema: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let (client, connection) = session(url).await?;
    client
        .batch_execute(&format!(r#"VACUUM (ANALYZE) "{schema}".triage_events"#))
        .await
        .context("cannot vacuum the generated log")?;
    drop(client);
    let _ = connection.await;
    Ok(started.elapsed().as_secs_f64())
}

/// How fast the server alone hands the whole log to a client that does
/// nothing with it: `COPY (the rebuild's columns, in position order) TO
/// STDOUT` in the binary format, every byte received and dropped. No
/// rebuild from this server on this machine can be faster, since it needs
/// the same rows and must also decode and apply them; the figure tells how
/// much of a rebuild's time is the server's. Returns the seconds taken and
/// the bytes received.
async fn copy_floor(url: &str, schema: &str) -> anyhow::Result<(f64, u64)> {
    use futures::StreamExt as _;
    let (client, connection) = session(url).await?;
    let started = Instant::now();
    let copy = client
        .copy_out(&format!(
            r#"COPY (SELECT position, stream, revision, event_id, event_type, data, metadata, recorded_at
                     FROM "{schema}".triage_events ORDER BY position) TO STDOUT (FORMAT binary)"#
        ))
        .await
        .context("cannot copy the log out")?;
    let mut copy = std::pin::pin!(copy);
    let mut bytes = 0u64;
    while let Some(chunk) = copy.next().await {
        bytes += chunk.context("the copy of the log broke off")?.len() as u64;
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(client);
    let _ = connection.await;
    Ok((elapsed, bytes))
}

/// What `pg-rebuild` runs besides the log's size.
#[derive(Clone, Debug)]
pub(crate) struct RebuildBench {
    pub(crate) batch_size: usize,
    pub(crate) pool_size: usize,
    pub(crate) read_model: ReadModelPlace,
    /// Rebuilds of the one generated log: generating it takes ten times as
    /// long as a rebuild, and several rounds show the spread of one run.
    pub(crate) rounds: u32,
    /// The peer's binary: after each round, its replay of as many events
    /// of its own (`--replay-events`), then medians and ratios.
    pub(crate) peer: Option<PathBuf>,
}

/// `triage-bench pg-rebuild`: appends `events` events of whole ticket
/// lifecycles to a fresh PostgreSQL schema, then, `rounds` times, rebuilds
/// the projections from it into a SQLite read-model database (as `rebuild`
/// does for SQLite) or into PostgreSQL read models, and gives `line` one
/// JSON line per round. What is measured is the rebuild: reading `$all`
/// from PostgreSQL in pages, decoding, and applying.
pub(crate) async fn rebuild(
    url: &str,
    events: u64,
    bench: RebuildBench,
    mut line: impl FnMut(Value),
) -> anyhow::Result<()> {
    let options = PostgresOptions {
        pool_size: bench.pool_size,
        ..PostgresOptions::default()
    };
    let store = Arc::new(
        PostgresEventStore::connect_temporary(url, options)
            .await
            .with_context(|| format!("cannot open a temporary store at {url}"))?,
    );
    let (total, generate_s) = crate::replay::fill(store.clone(), events).await?;
    let settle_s = settle(url, store.schema()).await?;
    let (mut triage_rates, mut read_rates, mut peer_rates) = (Vec::new(), Vec::new(), Vec::new());
    for number in 1..=bench.rounds {
        let (floor, copied_bytes) = copy_floor(url, store.schema()).await?;
        let (read, read_cpu) = read_all(store.as_ref(), total, bench.batch_size).await?;
        let mut result = match bench.read_model {
            ReadModelPlace::Sqlite => crate::replay::rebuild_from(store.clone(), total, bench.batch_size).await?,
            ReadModelPlace::Postgres => rebuild_into_postgres(url, store.clone(), total, bench.batch_size).await?,
        };
        result["bench"] = json!("pg-rebuild");
        result["sslmode"] = json!(sslmode(url));
        result["round"] = json!(number);
        // The read side alone, to tell the PostgreSQL reads from the
        // read-model writes: `$all` in pages, every event decoded.
        result["read_only_events_per_s"] = json!(round(total as f64 / read, 0));
        result["read_only_wall_s"] = json!(round(read, 3));
        for (field, value) in read_cpu {
            result[format!("read_only_{field}")] = value;
        }
        // The server's share: the log copied out and dropped unread.
        result["copy_only_events_per_s"] = json!(round(total as f64 / floor, 0));
        result["copy_only_wall_s"] = json!(round(floor, 3));
        result["copy_bytes_per_event"] = json!(round(copied_bytes as f64 / total.max(1) as f64, 0));
        result["store"] = json!("postgres");
        result["generate_s"] = json!(round(generate_s, 3));
        result["settle_s"] = json!(round(settle_s, 3));
        // DESIGN.md: projection rebuild from PostgreSQL ≥ 500,000 events/s.
        result["target_events_per_s"] = json!(500_000);
        result["target_met"] = json!(result["events_per_s"].as_f64().is_some_and(|rate| rate >= 500_000.0));
        triage_rates.push(result["events_per_s"].as_f64().unwrap_or(0.0));
        read_rates.push(total as f64 / read);
        line(result);
        if let Some(peer) = &bench.peer {
            let mut replayed = peer_replay(peer, url, total, bench.pool_size)?;
            replayed["round"] = json!(number);
            peer_rates.push(replayed["events_per_s"].as_f64().unwrap_or(0.0));
            line(replayed);
        }
    }
    if bench.peer.is_some() {
        let (triage, read, peer) = (median(triage_rates), median(read_rates), median(peer_rates));
        // DESIGN.md: a rebuild ≥ 5× the peer's replay rate. Judged on the
        // ratio as measured, not as printed: 4.999 is not 5.
        let exact_ratio = |rate: f64| rate / peer.max(1.0);
        let ratio = |rate: f64| round(exact_ratio(rate), 3);
        line(json!({
            "bench": "pg-rebuild-compare",
            "events": total,
            "rounds": bench.rounds,
            "read_model": match bench.read_model {
                ReadModelPlace::Sqlite => "sqlite",
                ReadModelPlace::Postgres => "postgres",
            },
            "triage_events_per_s": round(triage, 0),
            "triage_read_only_events_per_s": round(read, 0),
            "peer_replay_events_per_s": round(peer, 0),
            "ratio_events_per_s": ratio(triage),
            "ratio_read_only": ratio(read),
            "target_ratio": 5.0,
            "target_met": exact_ratio(triage) >= 5.0,
        }));
    }
    Ok(())
}

/// One replay run of the peer (see `bench/peer-cqrs-es/src/replay.rs`),
/// its JSON line.
fn peer_replay(peer: &PathBuf, url: &str, events: u64, pool_size: usize) -> anyhow::Result<Value> {
    run_peer(
        peer,
        url,
        &[
            "--replay-events",
            &events.to_string(),
            "--pool-size",
            &pool_size.to_string(),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn every_agent_names_the_same_hot_tickets() {
        let tickets = Tickets {
            hot: 4,
            namespace: Uuid::new_v4(),
        };
        let again = tickets.clone();
        assert_eq!(tickets.hot_ticket(2, 7), again.hot_ticket(2, 7));
        assert_ne!(tickets.hot_ticket(2, 7), tickets.hot_ticket(2, 8));
        assert_ne!(tickets.hot_ticket(1, 7), tickets.hot_ticket(2, 7));
    }
}
