//! `triage demo`: the main job.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use triage_demo::{DemoConfig, DemoReport, Progress};
use triage_domain::State;
use triage_event_store::EventStore;
use triage_projections::{ProjectorOptions, ReadModelDb};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions};

use crate::output;
use crate::{GlobalArgs, Interrupted};

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Support tickets to generate (at most 1,000,000).
    #[arg(long, default_value_t = DemoConfig::default().tickets)]
    tickets: usize,
    /// Seed of the tickets and of every agent's choices.
    #[arg(long, default_value_t = DemoConfig::default().seed)]
    seed: u64,
    /// Classifier agents.
    #[arg(long, default_value_t = DemoConfig::default().classifiers)]
    classifiers: usize,
    /// Drafter agents.
    #[arg(long, default_value_t = DemoConfig::default().drafters)]
    drafters: usize,
    /// Escalator agents (they review drafts: send, reject, or hand to a human).
    #[arg(long, default_value_t = DemoConfig::default().escalators)]
    escalators: usize,
    /// Human operators (they resolve tickets handed to a human).
    #[arg(long, default_value_t = DemoConfig::default().operators)]
    operators: usize,
    /// Real seconds per simulated second. Model calls take 2–10 simulated
    /// seconds; 0.01 runs them in 20–100 ms. Events are stamped with the
    /// simulated clock, which starts at the real time: in a store kept with
    /// --db, a run's times end ahead of the wall clock.
    #[arg(long, default_value_t = DemoConfig::default().time_scale)]
    time_scale: f64,
    /// Claim lease, in simulated seconds.
    #[arg(long, default_value_t = DemoConfig::default().lease_secs)]
    lease_secs: u32,
    /// Share of tasks whose agent crashes holding the claim.
    #[arg(long, default_value_t = DemoConfig::default().crash_rate)]
    crash_rate: f64,
    /// Share of tasks whose model call outlives the lease (a late write).
    #[arg(long, default_value_t = DemoConfig::default().timeout_rate)]
    timeout_rate: f64,
    /// Share of tasks whose output fails validation (a hallucination).
    #[arg(long, default_value_t = DemoConfig::default().invalid_rate)]
    invalid_rate: f64,
    /// Share of accepted submissions sent again with the same command id.
    #[arg(long, default_value_t = DemoConfig::default().retry_rate)]
    retry_rate: f64,
    /// Stop after this many real seconds, opening the tickets included,
    /// even if tickets remain.
    #[arg(long, default_value_t = DemoConfig::default().max_seconds)]
    max_seconds: f64,
    /// Also run the same workload against another design and print both.
    #[arg(long, value_enum)]
    compare: Option<Baseline>,
    /// No live progress output.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Baseline {
    /// Agents read-modify-write one shared record per ticket, with no
    /// revision check.
    Naive,
}

impl DemoArgs {
    fn config(&self) -> DemoConfig {
        DemoConfig {
            tickets: self.tickets,
            seed: self.seed,
            classifiers: self.classifiers,
            drafters: self.drafters,
            escalators: self.escalators,
            operators: self.operators,
            time_scale: self.time_scale,
            lease_secs: self.lease_secs,
            crash_rate: self.crash_rate,
            timeout_rate: self.timeout_rate,
            invalid_rate: self.invalid_rate,
            retry_rate: self.retry_rate,
            max_seconds: self.max_seconds,
            ..DemoConfig::default()
        }
    }
}

pub(crate) async fn run(args: DemoArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let config = args.config();
    // Before any store is opened: a refused run leaves no file behind.
    triage_demo::validate(&config)?;
    // The environment names the user's own store and read models; the demo
    // writes simulated tickets, which an append-only log cannot take back.
    // Only places named on its command line receive them.
    let (global, ignored) = global.without_places_from_env();
    if !ignored.is_empty() {
        err!(
            "triage demo: ignoring {} (the demo writes simulated tickets; name a store with --db or --store to \
             keep them)",
            ignored.join(", ")
        );
    }
    let global = &global;
    // A fresh temporary store unless one was named; it is deleted at exit.
    let (events, read_models, place): (Arc<dyn EventStore>, ReadModelDb, String) = if global.db.is_some()
        || global.store.is_some()
    {
        // Refused before the store is opened, which may create it (a
        // PostgreSQL schema, a file) only for the run to stop at once.
        let postgres = |place: &str| place.starts_with("postgres://") || place.starts_with("postgresql://");
        if global.read_model.as_deref().is_some_and(postgres) {
            anyhow::bail!(
                "the demo keeps its read models in SQLite: give --read-model a file path, or leave it out for read \
                 models in memory"
            );
        }
        let opened = global.open_log().await?;
        let place = opened.location.to_string();
        // The demo's own checks read SQLite read models. PostgreSQL ones
        // are not opened at all: opening them made their schema and tables
        // in the user's database, which the run then left empty.
        let read_models = match global
            .read_model
            .clone()
            .or_else(|| opened.location.default_read_model())
        {
            // Only the default beside a PostgreSQL store gets here.
            Some(place) if postgres(&place) => {
                err!("triage demo: read models for this run are kept in memory (SQLite)");
                ReadModelDb::in_memory()?
            }
            Some(place) => ReadModelDb::open(triage_projections::sqlite_path(&place)?)?,
            None => ReadModelDb::in_memory()?,
        };
        (opened.events, read_models, place)
    } else {
        let options = SqliteOptions {
            synchronous: global.synchronous(),
            ..SqliteOptions::default()
        };
        let store = SqliteEventStore::open_temporary_with(options).context("cannot create a temporary event store")?;
        let read_models = match &global.read_model {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                anyhow::bail!("the demo keeps its read models in SQLite: give --read-model a file path, not {url:?}")
            }
            Some(path) => ReadModelDb::open(triage_projections::sqlite_path(path)?)?,
            None => ReadModelDb::open(store.path().with_file_name("triage.read.db"))?,
        };
        let place = format!(
            "a fresh temporary store (sqlite://{}, deleted at exit)",
            store.path().display()
        );
        (Arc::new(store), read_models, place)
    };
    if !global.json {
        err!(
            "triage demo: {} tickets, {} classifiers, {} drafters, {} escalators, {} operator(s) on {place}",
            config.tickets,
            config.classifiers,
            config.drafters,
            config.escalators,
            config.operators
        );
    }
    let show = !args.no_progress;
    let projector_options = ProjectorOptions {
        skip_event_types: global.skip_event_type.iter().cloned().collect(),
        ..ProjectorOptions::default()
    };
    let run = triage_demo::run_triage(
        events,
        read_models,
        projector_options,
        config,
        progress("triage", config.tickets, show),
    );
    // On Ctrl-C the run is dropped, and the runtime with its agents when
    // main returns: the last handle on a temporary store goes, and with it
    // the store's directory, as promised above.
    let triage = tokio::select! {
        report = run => report?,
        _ = tokio::signal::ctrl_c() => return Err(Interrupted("nothing was audited").into()),
    };
    // Listening for Ctrl-C above took it over for the whole process: the
    // naive run must listen too, or it could not be stopped.
    let naive = match args.compare {
        Some(Baseline::Naive) => {
            let run = triage_demo::run_naive(config, progress("naive", config.tickets, show));
            Some(tokio::select! {
                report = run => report?,
                _ = tokio::signal::ctrl_c() => {
                    // Triage's run was finished and audited: shown, then
                    // the interruption is reported.
                    if global.json {
                        output::print_json(&serde_json::to_value(&triage)?);
                    } else {
                        print_summary(&triage, None, &config);
                    }
                    return Err(Interrupted("the naive baseline was cut short; Triage's run above was audited").into());
                }
            })
        }
        None => None,
    };
    if global.json {
        let value = match &naive {
            Some(naive) => json!({ "triage": triage, "naive": naive }),
            None => serde_json::to_value(&triage)?,
        };
        output::print_json(&value);
    } else {
        print_summary(&triage, naive.as_ref(), &config);
    }
    if !triage.audit_passed {
        bail!("the audit of the event log failed: {}", triage.findings.join("; "));
    }
    if !triage.completed {
        bail!(
            "only {} of {} tickets were resolved within {} s; try a larger --max-seconds",
            triage.resolved,
            triage.tickets,
            config.max_seconds
        );
    }
    Ok(())
}

fn state_line(states: &std::collections::BTreeMap<State, u64>) -> String {
    State::ALL
        .iter()
        .filter_map(|state| states.get(state).map(|count| format!("{state} {count}")))
        .collect::<Vec<_>>()
        .join(" · ")
}

/// A live line on a terminal; a plain line every two seconds otherwise.
fn progress(design: &'static str, tickets: usize, show: bool) -> impl FnMut(&Progress) + Send {
    let bar = (show && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(tickets as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>6} [{bar:30.green/white}] {pos}/{len} resolved  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(design);
        bar
    });
    let mut last = Instant::now() - Duration::from_secs(10);
    move |progress: &Progress| {
        let resolved = progress.states.get(&State::Resolved).copied().unwrap_or(0);
        let message = format!(
            "{:.0} events/s · {}",
            progress.events_per_s,
            state_line(&progress.states)
        );
        match &bar {
            Some(bar) => {
                bar.set_position(resolved);
                bar.set_message(message);
                if resolved as usize >= tickets {
                    bar.finish_and_clear();
                }
            }
            None if show && last.elapsed() >= Duration::from_secs(2) => {
                last = Instant::now();
                err!(
                    "{design:>6} {:>5.1}s  {resolved}/{tickets} resolved  {message}",
                    progress.elapsed_s
                );
            }
            None => {}
        }
    }
}

fn print_summary(triage: &DemoReport, naive: Option<&DemoReport>, config: &DemoConfig) {
    let mut header = vec!["", "Triage"];
    if naive.is_some() {
        header.push("Naive shared record");
    }
    let mut out = output::table(&header);
    let mut row = |label: &str, value: &dyn Fn(&DemoReport) -> String| {
        let mut cells = vec![label.to_owned(), value(triage)];
        if let Some(naive) = naive {
            cells.push(value(naive));
        }
        out.add_row(cells);
    };
    row("tickets resolved", &|r| format!("{} / {}", r.resolved, r.tickets));
    row("wall time", &|r| format!("{:.1} s", r.wall_s));
    row("events written", &|r| {
        format!(
            "{} ({} by the agents, {:.0}/s)",
            r.events,
            r.events - r.intake_events,
            r.events_per_s
        )
    });
    row("agent tasks (claims taken)", &|r| r.tasks.to_string());
    row("task failure rate", &|r| format!("{:.1}%", r.task_failure_rate * 100.0));
    row("  crashed / timed out / invalid output", &|r| {
        format!(
            "{} / {} / {}",
            r.failures.crashes, r.failures.timeouts, r.failures.invalid_outputs
        )
    });
    row("end-to-end latency, mean / p99", &|r| {
        format!(
            "{:.0} s / {:.0} s simulated",
            r.latency_mean_ms / 1000.0,
            r.latency_p99_ms as f64 / 1000.0
        )
    });
    row("conflicts detected", &|r| r.conflicts_detected.to_string());
    row("  claim race lost → took other work", &|r| {
        r.conflicts.claim_races_lost.to_string()
    });
    row("  stale decision refused → looked again", &|r| {
        r.conflicts.stale_decisions_refused.to_string()
    });
    row("  decided again on fresh state", &|r| {
        r.conflicts.decided_again.to_string()
    });
    row("late writes (lease ran out)", &|r| {
        format!(
            "{} sent → {} rejected, {} accepted",
            r.late_writes_attempted, r.late_writes_rejected, r.late_writes_accepted
        )
    });
    row("retries (same command id)", &|r| {
        format!(
            "{} sent → {} suppressed, {} applied twice",
            r.retries_sent, r.duplicates_suppressed, r.duplicates_applied
        )
    });
    row("claims expired (on tickets) → tickets resolved", &|r| {
        format!(
            "{} ({}) → {}",
            r.claims_expired, r.tickets_with_expired_claims, r.claims_recovered
        )
    });
    row("AUDIT (from the log alone)", &|_| String::new());
    row("  lost updates", &|r| r.lost_updates.to_string());
    row("  invalid transitions", &|r| r.invalid_transitions.to_string());
    row("  acknowledged but missing", &|r| r.missing_events.to_string());
    row("  duplicated events", &|r| r.duplicate_events.to_string());
    row("  read model = rebuild from the log", &|r| {
        if r.read_model_matches_rebuild { "yes" } else { "NO" }.to_owned()
    });
    row("  audit", &|r| {
        if r.audit_passed { "PASSED" } else { "FAILED" }.to_owned()
    });
    out!("{out}");
    out!(
        "model calls take 2–10 simulated seconds, run at {}× speed; claims lease {} simulated seconds",
        (1.0 / config.time_scale).round(),
        config.lease_secs
    );
    for (report, name) in std::iter::once((triage, "Triage")).chain(naive.map(|n| (n, "Naive"))) {
        if !report.findings.is_empty() {
            out!("{name}: first findings of the audit:");
            for finding in report.findings.iter().take(5) {
                out!("  - {finding}");
            }
        }
    }
}
