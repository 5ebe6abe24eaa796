//! `triage-bench replay`: how fast the whole log streams back out.
//!
//! Generates realistic ticket histories with the real domain (`decide`)
//! straight into a fresh store, then reads `$all` in pages and decodes and
//! folds every event per ticket, as a projection rebuild does, in bounded
//! memory: only the folded tickets are kept.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use chrono::Utc;
use serde_json::{Value, json};
use triage_command_handler::decode_recorded;
use triage_domain::{
    Agent, CommandEnvelope, Context, EventMetadata, Policy, Ticket, TicketId, decide, event_id, evolve,
};
use triage_event_store::{EventData, EventStore, ExpectedRevision, StreamName};
use triage_projections::query::EventQuery;
use triage_projections::{Projector, ProjectorOptions, ReadModelDb, RebuildOptions};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions, Synchronous};
use uuid::Uuid;

use crate::round;

/// One ticket's whole lifecycle as serialized records, decided by the real
/// domain.
fn lifecycle(ticket_id: TicketId, policy: &Policy) -> Vec<EventData> {
    let now = Utc::now();
    let agents = crate::workload::LIFECYCLE.map(|role| Agent::new(format!("{role}-1"), role));
    let mut ticket = Ticket::default();
    let mut claim = None;
    let mut records = Vec::with_capacity(agents.len());
    for (step, agent) in agents.iter().enumerate() {
        let command_id = Uuid::new_v4();
        let command = crate::workload::command(step, claim);
        let context = Context {
            now,
            ticket_id,
            agent,
            command_id,
            policy,
        };
        let events = decide(&ticket, &command, &context).expect("the lifecycle is valid");
        // Recorded with every event, as the handler does.
        let digest = triage_command_handler::command_digest(&CommandEnvelope {
            command_id,
            ..CommandEnvelope::new(ticket_id, agent.clone(), command.clone())
        });
        if crate::workload::takes_claim(step) {
            claim = Some(command_id);
        }
        for (index, event) in events.iter().enumerate() {
            let metadata = EventMetadata {
                schema_version: event.schema_version(),
                command_id,
                correlation_id: command_id,
                causation_id: command_id,
                agent: agent.clone(),
                traceparent: Some(format!(
                    "00-{}-{}-01",
                    Uuid::new_v4().simple(),
                    &Uuid::new_v4().simple().to_string()[..16]
                )),
                recorded_at: now,
                decided_at_revision: None,
                sender_saw_revision: None,
                command_digest: Some(digest),
            };
            records.push(EventData {
                id: event_id(command_id, index as u32),
                event_type: event.event_type().to_owned(),
                data: event.encode(),
                metadata: metadata.encode(),
            });
            ticket = evolve(ticket, event);
        }
    }
    records
}

/// Peak resident memory of this process, from /proc (Linux), in MB
/// (10^6 bytes, the unit of DESIGN.md's targets; /proc counts KiB).
pub(crate) fn peak_rss_mb() -> Option<f64> {
    proc_status_mb("VmHWM:")
}

/// Resident memory of this process now, from /proc (Linux), in MB. Read
/// where the peak is reset, it says how much of the peak was there before
/// (the generated store's cache, the allocator's free pages).
pub(crate) fn rss_mb() -> Option<f64> {
    proc_status_mb("VmRSS:")
}

fn proc_status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0 / 1e6)
}

/// CPU time used, from /proc (Linux): this process's, and the whole
/// machine's busy and total time, all in clock ticks. Two readings around
/// a run tell whether it was limited by the CPUs (the machine busy all
/// along) or by waiting, and how much of the machine was this process's
/// and how much the rest's (a database server on the same host).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CpuReading {
    process: u64,
    machine_busy: u64,
    machine_total: u64,
}

/// `USER_HZ`: the unit of /proc's tick counts, 100 on every Linux
/// architecture the bench runs on.
const TICKS_PER_S: f64 = 100.0;

impl CpuReading {
    pub(crate) fn now() -> Option<Self> {
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which may hold spaces, start at
        // state (field 3); utime and stime are fields 14 and 15.
        let after_name = &own[own.rfind(')')? + 2..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let process = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        let all = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks: Vec<u64> = all
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .map(|field| field.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal (guest time is
        // already inside user): idle and iowait are the idle ones.
        let machine_total: u64 = ticks.iter().take(8).sum();
        let idle = ticks.get(3)? + ticks.get(4)?;
        Some(Self {
            process,
            machine_busy: machine_total - idle,
            machine_total,
        })
    }

    /// From `self` to now: `process_cpu_s` (this process's CPU seconds),
    /// `machine_cpu_s` (all processes', this one's included) and
    /// `machine_busy` (the share of all CPUs' time that was busy), as JSON
    /// fields; empty where /proc cannot be read.
    pub(crate) fn since(self) -> serde_json::Map<String, Value> {
        let mut fields = serde_json::Map::new();
        if let Some(now) = Self::now() {
            let process = now.process.saturating_sub(self.process) as f64 / TICKS_PER_S;
            let busy = now.machine_busy.saturating_sub(self.machine_busy) as f64;
            let total = now.machine_total.saturating_sub(self.machine_total) as f64;
            fields.insert("process_cpu_s".into(), json!(round(process, 2)));
            // The first line of /proc/stat sums every CPU.
            fields.insert("machine_cpu_s".into(), json!(round(busy / TICKS_PER_S, 2)));
            if total > 0.0 {
                fields.insert("machine_busy".into(), json!(round(busy / total, 3)));
            }
        }
        fields
    }
}

/// Resets the peak-RSS mark (Linux), so that a later reading covers only
/// what follows.
pub(crate) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A generated store at rest, and the directory that holds it (deleted
/// when this is dropped).
struct Generated {
    store: Arc<SqliteEventStore>,
    total: u64,
    generate_s: f64,
    _dir: tempfile::TempDir,
}

/// Fills a fresh store with `events` events of whole ticket lifecycles,
/// closes it and opens it again: what is measured then reads a file at rest,
/// as `triage projections rebuild` finds one, not one whose write-ahead log
/// is still being copied back by the generation's checkpoints (that took CPU
/// from the measured reads).
async fn generate(events: u64, page_size: u32) -> anyhow::Result<Generated> {
    let dir = tempfile::Builder::new().prefix("triage-bench-").tempdir()?;
    let path = dir.path().join("triage.db");
    let options = SqliteOptions {
        page_size,
        // Generation only: what is measured reads committed data either way.
        synchronous: Synchronous::Normal,
        ..SqliteOptions::default()
    };
    let store = Arc::new(SqliteEventStore::open(&path, options)?);
    let (total, generate_s) = fill(store.clone(), events).await?;
    // Closing the store checkpoints its log into the file.
    let store = Arc::into_inner(store).ok_or_else(|| anyhow::anyhow!("the generated store is still shared"))?;
    drop(store);
    let store = Arc::new(SqliteEventStore::open(&path, SqliteOptions::default())?);
    Ok(Generated {
        store,
        total,
        generate_s,
        _dir: dir,
    })
}

/// Appends `events` events of whole ticket lifecycles to `store` from 16
/// concurrent writers; returns the events written and the seconds taken.
pub(crate) async fn fill(store: Arc<dyn EventStore>, events: u64) -> anyhow::Result<(u64, f64)> {
    let policy = Policy::default();
    let tickets = events.div_ceil(7);
    let writers = 16u64;
    let generated = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let store = store.clone();
        let policy = policy.clone();
        tasks.push(tokio::spawn(async move {
            let mut written = 0u64;
            let mut ticket = writer;
            while ticket < tickets {
                let ticket_id = TicketId::new();
                let stream = StreamName::new(ticket_id.stream_name())?;
                let records = lifecycle(ticket_id, &policy);
                written += records.len() as u64;
                store.append(&stream, ExpectedRevision::NoStream, records).await?;
                ticket += writers;
            }
            anyhow::Ok(written)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok((total, generated.elapsed().as_secs_f64()))
}

/// `triage-bench rebuild`: every projection rebuilt from position 0 through
/// the real runtime.
pub(crate) async fn rebuild(events: u64, batch_size: usize, keep_store: Option<&Path>) -> anyhow::Result<Value> {
    let Generated {
        store,
        total,
        generate_s,
        _dir,
    } = generate(events, SqliteOptions::default().page_size).await?;
    if let Some(keep) = keep_store {
        // The file is at rest (see `generate`): one file, no WAL to copy.
        std::fs::copy(store.path(), keep).with_context(|| format!("cannot copy the store to {}", keep.display()))?;
    }
    let mut line = rebuild_from(store, total, batch_size).await?;
    line["bench"] = json!("rebuild");
    line["store"] = json!("sqlite");
    line["generate_s"] = json!(round(generate_s, 3));
    Ok(line)
}

/// Rebuilds the `tickets` and `stats` projections from position 0 of
/// `store`, which holds `total` events of whole lifecycles, into a fresh
/// SQLite read-model database, and checks the result.
pub(crate) async fn rebuild_from(store: Arc<dyn EventStore>, total: u64, batch_size: usize) -> anyhow::Result<Value> {
    let read_dir = tempfile::tempdir()?;
    let db = ReadModelDb::open(read_dir.path().join("triage.read.db"))?;
    let projector = Projector::new(store, db).with_options(ProjectorOptions {
        batch_size,
        ..ProjectorOptions::default()
    });
    reset_peak_rss();
    let rss_at_start = rss_mb();
    let cpu = CpuReading::now();
    let started = Instant::now();
    let reports = projector
        .rebuild_many(&["tickets", "stats"], RebuildOptions::default())
        .await?;
    let cpu = cpu.map(CpuReading::since).unwrap_or_default();
    let per_projection: Vec<Value> = reports
        .iter()
        .map(|report| json!({ "projection": report.name, "events": report.events }))
        .collect();
    let wall = started.elapsed().as_secs_f64();
    let tickets = projector.read("tickets", |conn, slot| {
        triage_projections::TicketsView::new(conn, slot).counts()
    })?;
    anyhow::ensure!(
        tickets.values().sum::<u64>() == total.div_ceil(7),
        "the rebuilt model holds {} tickets, expected {}",
        tickets.values().sum::<u64>(),
        total.div_ceil(7)
    );
    let mut result = json!({
        "read_model": "sqlite",
        "events": total,
        "projections": per_projection,
        "wall_s": round(wall, 3),
        // Of the wall time, the replay; the rest is the swap, which
        // builds the secondary indexes.
        "replay_s": round(reports.first().map_or(0.0, |report| report.wall_s), 3),
        // Of the wall time, the read-model writes; the reads overlap them.
        "write_s": round(reports.first().map_or(0.0, |report| report.write_s), 3),
        "events_per_s": round(total as f64 / wall, 0),
        "peak_rss_mb": peak_rss_mb().map(|m| round(m, 1)),
        "rss_at_start_mb": rss_at_start.map(|m| round(m, 1)),
        "batch_size": batch_size,
    });
    if let Value::Object(fields) = &mut result {
        fields.extend(cpu);
    }
    Ok(result)
}

/// `triage-bench events`: the query `triage events --format jsonl` runs,
/// over the whole log, each row serialized as a JSON line into a sink.
pub(crate) async fn events_jsonl(events: u64) -> anyhow::Result<Value> {
    use std::io::Write as _;
    let Generated {
        store,
        total,
        generate_s,
        _dir,
    } = generate(events, SqliteOptions::default().page_size).await?;
    reset_peak_rss();
    let started = Instant::now();
    let mut out = std::io::BufWriter::new(std::io::sink());
    let mut written = 0u64;
    let mut bytes = 0usize;
    let mut failure = None;
    EventQuery::default()
        .scan(store.as_ref(), 1024, |record| {
            let row = triage_projections::query::EventRow::from_record(record);
            match serde_json::to_vec(&row) {
                Ok(line) => {
                    bytes += line.len() + 1;
                    written += 1;
                    let _ = out.write_all(&line).and_then(|()| out.write_all(b"\n"));
                    ControlFlow::Continue(())
                }
                Err(error) => {
                    failure = Some(error);
                    ControlFlow::Break(())
                }
            }
        })
        .await?;
    if let Some(error) = failure {
        return Err(error.into());
    }
    out.flush()?;
    let wall = started.elapsed().as_secs_f64();
    anyhow::ensure!(written == total, "wrote {written} of {total} events");
    Ok(json!({
        "bench": "events_jsonl",
        "store": "sqlite",
        "events": written,
        "bytes": bytes,
        "generate_s": round(generate_s, 3),
        "wall_s": round(wall, 3),
        "events_per_s": round(written as f64 / wall, 0),
        "peak_rss_mb": peak_rss_mb().map(|m| round(m, 1)),
    }))
}

pub(crate) async fn run(events: u64, page_size: u32) -> anyhow::Result<Value> {
    let Generated {
        store,
        total,
        generate_s,
        _dir,
    } = generate(events, page_size).await?;
    let bytes = std::fs::metadata(store.path()).map(|m| m.len()).unwrap_or(0);

    let started = Instant::now();
    let mut folded: HashMap<TicketId, Ticket> = HashMap::new();
    let mut replayed = 0u64;
    let mut failure = None;
    EventQuery::default()
        .scan(store.as_ref(), 4096, |record| match decode_recorded(record) {
            Ok((event, _metadata)) => {
                replayed += 1;
                let ticket_id = TicketId::from_stream_name(record.stream.as_str()).expect("a ticket stream");
                let ticket = folded.remove(&ticket_id).unwrap_or_default();
                folded.insert(ticket_id, evolve(ticket, &event));
                ControlFlow::Continue(())
            }
            Err(error) => {
                failure = Some(error);
                ControlFlow::Break(())
            }
        })
        .await?;
    if let Some(error) = failure {
        return Err(error.into());
    }
    let wall = started.elapsed().as_secs_f64();
    anyhow::ensure!(replayed == total, "replayed {replayed} of {total} events");
    Ok(json!({
        "bench": "replay",
        "store": "sqlite",
        "page_size": page_size,
        "events": replayed,
        "tickets": folded.len(),
        "db_bytes": bytes,
        "generate_s": round(generate_s, 3),
        "wall_s": round(wall, 3),
        "events_per_s": round(replayed as f64 / wall, 0),
        "peak_rss_mb": peak_rss_mb().map(|m| round(m, 1)),
    }))
}
