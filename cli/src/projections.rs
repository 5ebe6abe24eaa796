//! `triage projections …` and `triage stats`.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use triage_projections::{ProjectionError, ReadModelDb, RebuildOptions, RebuildProgress, RebuildReport, stats};

use crate::GlobalArgs;
use crate::output;

#[derive(Debug, Subcommand)]
pub(crate) enum ProjectionsCommand {
    /// List the projections this build has, with their versions and tables.
    List,
    /// Show each projection's live version, checkpoint, lag and last error.
    Status,
    /// Rebuild from the start of the log into a shadow copy while the live
    /// copy keeps serving, then swap atomically. Ctrl-C leaves the live copy
    /// untouched.
    Rebuild {
        /// The projection to rebuild (see `triage projections list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Rebuild every projection.
        #[arg(long)]
        all: bool,
        /// Before swapping, compare a digest of the rebuilt model with the
        /// live one and report every ticket (or counter) that differs.
        #[arg(long)]
        verify: bool,
        /// No progress output (a bar on a terminal, log lines otherwise).
        #[arg(long)]
        no_progress: bool,
    },
}

pub(crate) async fn run(command: ProjectionsCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    if matches!(command, ProjectionsCommand::List) {
        return list(global);
    }
    global.require_existing_store()?;
    let opened = global.open().await?;
    let read_models = &opened.read_models;
    match command {
        ProjectionsCommand::List => list(global),
        ProjectionsCommand::Status => {
            let statuses = read_models.status().await?;
            if global.json {
                for status in &statuses {
                    output::print_json(&serde_json::to_value(status)?);
                }
                return Ok(());
            }
            let mut out = output::table(&[
                "Projection",
                "Version",
                "Generation",
                "Checkpoint",
                "Lag",
                "Events applied",
                "State",
            ]);
            for status in &statuses {
                let version = match status.live_version {
                    Some(live) if live != status.code_version => format!("{live} (build has {})", status.code_version),
                    Some(live) => live.to_string(),
                    None => format!("- (build has {})", status.code_version),
                };
                let state = match (&status.last_error, status.needs_rebuild, status.live_version) {
                    (Some(error), _, _) => format!("stopped: {error}"),
                    (None, true, _) => "needs rebuild".to_owned(),
                    (None, false, None) => "not built yet".to_owned(),
                    (None, false, Some(_)) if status.build_in_progress => {
                        "ok; a rebuild is under way or was abandoned".to_owned()
                    }
                    (None, false, Some(_)) => "ok".to_owned(),
                };
                out.add_row(vec![
                    status.name.clone(),
                    version,
                    status.generation.map_or_else(|| "-".to_owned(), |g| g.to_string()),
                    status.checkpoint.map_or_else(|| "-".to_owned(), |c| c.to_string()),
                    status.lag.to_string(),
                    status.events_applied.to_string(),
                    state,
                ]);
            }
            out!("{out}");
            Ok(())
        }
        ProjectionsCommand::Rebuild {
            name,
            all,
            verify,
            no_progress,
        } => {
            let names: Vec<String> = match (name, all) {
                (Some(name), false) => vec![name],
                (None, true) => read_models.projection_names().into_iter().map(str::to_owned).collect(),
                _ => bail!("name a projection or pass --all"),
            };
            let cancel = Arc::new(AtomicBool::new(false));
            let on_signal = cancel.clone();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    on_signal.store(true, Ordering::Relaxed);
                }
            });
            // One pass over the log for all of them.
            let label = names.join("+");
            let options = RebuildOptions {
                verify,
                progress: (!no_progress).then(|| progress_reporter(&label)),
                cancel: Some(cancel.clone()),
            };
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let reports = read_models.rebuild_many(&names, options).await.map_err(|error| {
                // The error says whether Ctrl-C stopped it: a rebuild that
                // failed for another reason after Ctrl-C came too late to
                // stop it is that failure.
                let cancelled = match &error {
                    ProjectionError::Cancelled => true,
                    ProjectionError::PartlyRebuilt { source, .. } => matches!(**source, ProjectionError::Cancelled),
                    _ => false,
                };
                if cancelled {
                    anyhow::Error::new(error).context(crate::Interrupted("the rebuild stopped"))
                } else {
                    error.into()
                }
            })?;
            if global.json {
                for report in &reports {
                    output::print_json(&serde_json::to_value(report)?);
                }
            }
            if !global.json {
                print_reports(&reports);
            }
            Ok(())
        }
    }
}

/// A progress bar on a terminal; plain lines every two seconds otherwise.
fn progress_reporter(name: &str) -> Box<dyn FnMut(RebuildProgress) + Send> {
    if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>10} [{bar:40.cyan/blue}] {pos}/{len} positions  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(name.to_owned());
        Box::new(move |progress: RebuildProgress| {
            bar.set_length(progress.total.max(progress.done));
            bar.set_position(progress.done);
            bar.set_message(format!(
                "{:.0} events/s, ETA {}s",
                progress.events_per_s,
                progress.eta.as_secs()
            ));
            if progress.done >= progress.total {
                bar.finish_and_clear();
            }
        })
    } else {
        let name = name.to_owned();
        let mut last = Instant::now();
        Box::new(move |progress: RebuildProgress| {
            if last.elapsed() >= Duration::from_secs(2) || progress.done >= progress.total {
                last = Instant::now();
                let percent = if progress.total == 0 {
                    100.0
                } else {
                    progress.done as f64 * 100.0 / progress.total as f64
                };
                eprintln!(
                    "rebuild {name}: {}/{} positions ({percent:.0}%), {:.0} events/s, ETA {}s",
                    progress.done,
                    progress.total,
                    progress.events_per_s,
                    progress.eta.as_secs()
                );
            }
        })
    }
}

fn print_reports(reports: &[RebuildReport]) {
    let mut out = output::table(&["Projection", "Version", "Generation", "Events", "Verification"]);
    for report in reports {
        let verification = match (&report.differences, report.compared) {
            (None, _) => "not asked for".to_owned(),
            (Some(differences), Some(compared)) if differences.is_empty() => {
                format!("matches the live model ({compared} rows compared)")
            }
            // Nothing was compared: the one entry says why (no live model,
            // or one of another version), it is not a difference.
            (Some(_), Some(0)) => "nothing to compare".to_owned(),
            (Some(differences), _) => format!("{} difference(s)", differences.len()),
        };
        out.add_row(vec![
            report.name.clone(),
            report.version.to_string(),
            report.generation.to_string(),
            report.events.to_string(),
            verification,
        ]);
    }
    out!("{out}");
    for report in reports {
        if let (Some(notes), Some(0)) = (report.differences.as_ref(), report.compared) {
            for note in notes {
                out!("{}: not verified {note}", report.name);
            }
        } else if let Some(differences) = report.differences.as_ref().filter(|d| !d.is_empty()) {
            out!(
                "{}: the rebuilt model differs from the previous live one in:",
                report.name
            );
            for difference in differences.iter().take(50) {
                out!("  {difference}");
            }
            if differences.len() > 50 {
                out!("  … and {} more", differences.len() - 50);
            }
        }
        out!(
            "{}: replayed {} events in {:.2} s ({:.0} events/s, {:.2} s of it writing the read model); generation {} is live",
            report.name,
            report.events,
            report.wall_s,
            report.events_per_s,
            report.write_s,
            report.generation
        );
    }
}

/// `triage stats` options.
#[derive(Debug, clap::Args)]
pub(crate) struct StatsArgs {
    /// Only events recorded at or after this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = crate::events::parse_time)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Only events recorded before this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = crate::events::parse_time)]
    until: Option<chrono::DateTime<chrono::Utc>>,
    /// Break the figures down by agent, role or ticket category.
    #[arg(long, value_enum)]
    by: Option<By>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum By {
    Agent,
    Role,
    Category,
}

/// `triage stats`.
pub(crate) async fn stats(args: StatsArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    // Arguments first: a mistake is told before any store is opened.
    if let (Some(since), Some(until)) = (args.since, args.until)
        && since >= until
    {
        return Err(crate::events::BadArguments(format!(
            "--since {since} is not before --until {until}: that range holds no time"
        ))
        .into());
    }
    global.require_existing_store()?;
    let opened = global.open().await?;
    opened.read_models.catch_up().await?;
    if args.since.is_none() && args.until.is_none() && args.by.is_none() {
        let summary = opened.read_models.stats_summary().await?;
        if global.json {
            output::print_json(&serde_json::to_value(&summary)?);
        } else {
            print_summary(&summary, None);
        }
        return Ok(());
    }
    // Each ticket's category, from the read model, for --by category.
    let categories: std::collections::HashMap<triage_domain::TicketId, String> = if args.by == Some(By::Category) {
        opened
            .read_models
            .list(None, usize::MAX)
            .await?
            .into_iter()
            .filter_map(|row| {
                let category = row
                    .ticket
                    .classification
                    .map(|c| c.category)
                    .unwrap_or_else(|| "unclassified".to_owned());
                Some((row.ticket.id?, category))
            })
            .collect()
    } else {
        Default::default()
    };
    let query = triage_projections::query::EventQuery {
        since: args.since,
        until: args.until,
        ..Default::default()
    };
    let mut windows: std::collections::BTreeMap<String, stats::StatsWindow> = std::collections::BTreeMap::new();
    let skipped = global.skipped_event_types();
    let mut failure = None;
    query
        .scan(opened.events.as_ref(), 1024, |record| {
            let pushed = (|| -> anyhow::Result<()> {
                let Some(event) = triage_projections::decode_skipping(record, &skipped)? else {
                    return Ok(());
                };
                let group = match args.by {
                    Some(By::Category) => categories
                        .get(&event.ticket_id)
                        .cloned()
                        .unwrap_or_else(|| "unclassified".to_owned()),
                    _ => "all".to_owned(),
                };
                let window = match windows.entry(group) {
                    std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
                    std::collections::btree_map::Entry::Vacant(entry) => entry.insert(stats::StatsWindow::new()?),
                };
                window.push(event)?;
                Ok(())
            })();
            match pushed {
                Ok(()) => std::ops::ControlFlow::Continue(()),
                Err(error) => {
                    failure = Some(error);
                    std::ops::ControlFlow::Break(())
                }
            }
        })
        .await?;
    if let Some(error) = failure {
        return Err(error);
    }
    if windows.is_empty() {
        return Err(
            crate::events::NothingMatched(format!("no events in {} fall in that period", opened.location)).into(),
        );
    }
    for (group, window) in windows {
        let (summary, rates) = window.finish()?;
        let by_role = (args.by == Some(By::Role)).then(|| outcomes_by_role(&summary));
        if global.json {
            output::print_json(&json!({
                "since": args.since,
                "until": args.until,
                "by": args.by,
                "group": group,
                "rates": rates,
                "summary": summary,
                "roles": by_role,
            }));
            continue;
        }
        if args.by == Some(By::Category) {
            out!("category {group}:");
        }
        let mut out = output::table(&["Rate", "Value"]);
        out.add_row(vec![
            "events".to_owned(),
            format!(
                "{} over {:.0} s ({:.1}/s)",
                rates.events, rates.span_s, rates.events_per_s
            ),
        ]);
        out.add_row(vec![
            "tickets resolved per hour".to_owned(),
            format!("{:.1}", rates.resolved_per_hour),
        ]);
        out.add_row(vec![
            "failed claims / claims taken".to_owned(),
            format!("{:.1}%", rates.failure_rate * 100.0),
        ]);
        out.add_row(vec![
            "refused / commands".to_owned(),
            format!("{:.1}%", rates.rejection_rate * 100.0),
        ]);
        out.add_row(vec![
            "stale-revision conflicts / commands".to_owned(),
            format!("{:.1}%", rates.conflict_rate * 100.0),
        ]);
        out!("{out}");
        print_summary(&summary, by_role.as_ref());
    }
    Ok(())
}

/// Outcomes summed over the agents of each role.
fn outcomes_by_role(
    summary: &stats::StatsSummary,
) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>> {
    let mut roles: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>> = Default::default();
    for outcomes in summary.agents.values() {
        let role = if outcomes.role.is_empty() {
            "unknown".to_owned()
        } else {
            outcomes.role.clone()
        };
        let entry = roles.entry(role).or_default();
        for (outcome, count) in &outcomes.outcomes {
            *entry.entry(outcome.clone()).or_default() += count;
        }
    }
    roles
}

fn print_summary(
    summary: &stats::StatsSummary,
    by_role: Option<&std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>>,
) {
    let mut states = output::table(&["State", "Tickets"]);
    for (state, count) in &summary.tickets_per_state {
        states.add_row(vec![state.clone(), count.to_string()]);
    }
    out!("{states}");
    let mut latency = output::table(&["Stage", "Done", "p50", "p90", "p99"]);
    for (stage, figures) in &summary.stage_latency {
        latency.add_row(vec![
            stage.clone(),
            figures.count.to_string(),
            format!("{} ms", figures.p50_ms),
            format!("{} ms", figures.p90_ms),
            format!("{} ms", figures.p99_ms),
        ]);
    }
    out!("{latency}");
    let mut counters = output::table(&["Counter", "Value"]);
    for (name, value) in &summary.counters {
        counters.add_row(vec![name.clone(), value.to_string()]);
    }
    out!("{counters}");
    match by_role {
        Some(roles) => {
            let mut out = output::table(&["Role", "Outcomes"]);
            for (role, outcomes) in roles {
                let listed: Vec<String> = outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect();
                out.add_row(vec![role.clone(), listed.join(", ")]);
            }
            out!("{out}");
        }
        None => {
            let mut agents = output::table(&["Agent", "Role", "Outcomes"]);
            for (agent, outcomes) in &summary.agents {
                let listed: Vec<String> = outcomes.outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect();
                agents.add_row(vec![agent.clone(), outcomes.role.clone(), listed.join(", ")]);
            }
            out!("{agents}");
        }
    }
}

/// `triage replay --until … --into …`.
pub(crate) async fn replay(until: &str, into: &std::path::Path, global: &GlobalArgs) -> anyhow::Result<()> {
    if into.exists() && std::fs::metadata(into).map(|m| m.len() > 0).unwrap_or(true) {
        bail!(
            "{} already exists; choose a new file for the scratch read models",
            into.display()
        );
    }
    global.require_existing_store()?;
    let opened = global.open_log().await?;
    let position = match until.parse::<triage_event_store::Position>() {
        Ok(position) => position,
        Err(_) => {
            let time = crate::events::parse_time(until)
                .map_err(|error| anyhow::anyhow!("--until {until:?} is neither a log position nor a time: {error}"))?;
            // The last event recorded at or before that moment.
            let query = triage_projections::query::EventQuery {
                until: Some(time + chrono::Duration::microseconds(1)),
                ..Default::default()
            };
            let mut last = None;
            query
                .scan(opened.events.as_ref(), 1024, |record| {
                    last = Some(record.position);
                    std::ops::ControlFlow::Continue(())
                })
                .await?;
            last.ok_or_else(|| crate::events::NothingMatched(format!("no events were recorded by {time}")))?
        }
    };
    // A position past the end of the log is the log as it is now: the
    // file is frozen at its last event, or later appends up to the
    // position asked for would move it on.
    let head = opened
        .events
        .head_position()
        .await?
        .ok_or_else(|| crate::events::NothingMatched("the log has no events yet".to_owned()))?;
    let position = position.min(head);
    let build = async {
        let db = ReadModelDb::open(into)?;
        // Frozen before it is built: reading the file later (`--read-model
        // PATH`), also after an interrupted replay, never takes it past the
        // position.
        db.freeze_at(position)?;
        let scratch =
            triage_projections::Projector::new(opened.events.clone(), db).with_options(global.projector_options());
        let reached = scratch.catch_up_to(Some(position)).await?;
        let counts = scratch.read("tickets", |conn, slot| {
            triage_projections::TicketsView::new(conn, slot).counts()
        })?;
        anyhow::Ok((reached, counts))
    };
    let (reached, counts) = match build.await {
        Ok(built) => built,
        Err(error) => {
            // The file is this command's own (it did not exist, or was
            // empty): a failed replay leaves nothing behind, so the same
            // command can run again once the cause is mended.
            for suffix in ["", "-wal", "-shm"] {
                let mut path = into.as_os_str().to_owned();
                path.push(suffix);
                let _ = std::fs::remove_file(path);
            }
            return Err(error);
        }
    };
    if global.json {
        output::print_json(&json!({
            "into": into.display().to_string(),
            "until": position.to_string(),
            "reached": reached.map(|p| p.to_string()),
            "tickets_per_state": counts.iter().map(|(state, count)| (state.as_str(), *count)).collect::<std::collections::BTreeMap<_, _>>(),
        }));
        return Ok(());
    }
    let mut out = output::table(&["State", "Tickets"]);
    for (state, count) in &counts {
        out.add_row(vec![state.to_string(), count.to_string()]);
    }
    out!("{out}");
    out!(
        "read models as of log position {position} are in {} (views: tickets, stats_counters, stats_tickets, stats_latency, stats_agents)",
        into.display()
    );
    Ok(())
}

/// `projections list`: this build's projections, their versions and
/// tables. It reads no store: they are the same wherever the read models
/// live.
fn list(global: &GlobalArgs) -> anyhow::Result<()> {
    let catalog = triage_projections::Projector::new(
        Arc::new(triage_event_store::InMemoryEventStore::new()),
        ReadModelDb::in_memory()?,
    );
    let rows: Vec<_> = catalog
        .projections()
        .iter()
        .map(|projection| {
            json!({
                "name": projection.name(),
                "version": projection.version(),
                "tables": projection.tables(),
            })
        })
        .collect();
    if global.json {
        rows.iter().for_each(output::print_json);
    } else {
        let mut out = output::table(&["Projection", "Version", "Tables (views onto the live generation)"]);
        for projection in catalog.projections() {
            out.add_row(vec![
                projection.name().to_owned(),
                projection.version().to_string(),
                projection.tables().join(", "),
            ]);
        }
        out!("{out}");
    }
    Ok(())
}
