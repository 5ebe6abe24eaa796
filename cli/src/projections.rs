//! `triage projections …` and `triage stats`.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
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
        /// live one and report every ticket (or counter) that differs. The
        /// rebuilt model, which is what the log says, is swapped in either
        /// way; the exit status is 4 when the live one differed from it.
        #[arg(long)]
        verify: bool,
        /// Rebuild also a projection whose live model a newer Triage built,
        /// replacing it with this version's. Without it that is refused: in
        /// a rolling upgrade the newer instances could not serve the older
        /// model.
        #[arg(long)]
        replace_newer: bool,
        /// No progress output (a bar on a terminal, log lines otherwise).
        #[arg(long)]
        no_progress: bool,
    },
}

pub(crate) async fn run(command: ProjectionsCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    if matches!(command, ProjectionsCommand::List) {
        return list(global);
    }
    // Checked before anything is opened (and perhaps made).
    if let ProjectionsCommand::Rebuild { name: Some(name), .. } = &command {
        let known = catalog()?
            .projections()
            .iter()
            .map(|projection| projection.name())
            .collect::<Vec<_>>();
        if !known.contains(&name.as_str()) {
            return Err(crate::events::BadArguments(format!(
                "no projection named {name:?}; known: {}",
                known.join(", ")
            ))
            .into());
        }
    }
    global.require_existing_store()?;
    let opened = global.open().await?;
    let read_models = &opened.read_models;
    match command {
        ProjectionsCommand::List => list(global),
        ProjectionsCommand::Status => {
            let mut statuses = read_models.status().await?;
            // A SQLite file damaged where its registry is not opened and
            // said "ok": the whole file is checked here.
            let damage = match read_models {
                triage_projections::ReadModels::Sqlite(projector) => projector
                    .damage()?
                    .map(|found| (projector.db().path().display().to_string(), found)),
                _ => None,
            };
            if let Some((_, found)) = &damage {
                for status in &mut statuses {
                    status.last_error = Some(format!("the read-model file is damaged: {found}"));
                }
            }
            let verdict = || -> anyhow::Result<()> {
                match &damage {
                    Some((path, found)) => bail!(
                        "the read-model file {path} is damaged ({found}); it holds only what the event log says: \
                         move it (with its -wal and -shm files) aside, and the next command rebuilds it from the log"
                    ),
                    None => Ok(()),
                }
            };
            if global.json {
                for status in &statuses {
                    output::print_json(&serde_json::to_value(status)?);
                }
                return verdict();
            }
            // PostgreSQL read models have leaders; a SQLite file has none,
            // and no column for them.
            let led = matches!(read_models, triage_projections::ReadModels::Postgres(_));
            let mut header = vec![
                "Projection",
                "Version",
                "Generation",
                "Checkpoint",
                "Lag",
                "Events applied",
                "State",
            ];
            if led {
                header.push("Leader");
            }
            let mut out = output::table(&header);
            for status in &statuses {
                let version = match status.live_version {
                    Some(live) if live != status.code_version => format!("{live} (build has {})", status.code_version),
                    Some(live) => live.to_string(),
                    None => format!("- (build has {})", status.code_version),
                };
                let state = match (&status.last_error, status.needs_rebuild, status.live_version) {
                    (Some(error), _, _) => format!("stopped: {error}"),
                    (None, _, Some(live)) if live > status.code_version => {
                        "built by a newer Triage: upgrade this instance".to_owned()
                    }
                    (None, true, _) => "needs rebuild".to_owned(),
                    (None, false, None) => "not built yet".to_owned(),
                    (None, false, Some(_)) if status.build_in_progress => {
                        if led {
                            "ok; a rebuild is under way".to_owned()
                        } else {
                            "ok; a rebuild is under way or was abandoned".to_owned()
                        }
                    }
                    (None, false, Some(_)) => "ok".to_owned(),
                };
                let mut row = vec![
                    status.name.clone(),
                    version,
                    status.generation.map_or_else(|| "-".to_owned(), |g| g.to_string()),
                    status.checkpoint.map_or_else(|| "-".to_owned(), |c| c.to_string()),
                    status.lag.to_string(),
                    status.events_applied.to_string(),
                    state,
                ];
                if led {
                    row.push(status.leader.clone().unwrap_or_else(|| "none".to_owned()));
                }
                out.add_row(row);
            }
            out!("{out}");
            verdict()
        }
        ProjectionsCommand::Rebuild {
            name,
            all,
            verify,
            replace_newer,
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
                replace_newer,
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
            let drifted: Vec<&str> = reports
                .iter()
                .filter(|report| {
                    report.compared.is_some_and(|compared| compared > 0)
                        && report
                            .differences
                            .as_ref()
                            .is_some_and(|differences| !differences.is_empty())
                })
                .map(|report| report.name.as_str())
                .collect();
            if !drifted.is_empty() {
                return Err(Drifted(drifted.join(", ")).into());
            }
            Ok(())
        }
    }
}

/// `rebuild --verify` found live models that differed from the rebuild
/// (which replaced them): exit status 4, so that a scheduled check sees
/// drift without reading the report.
#[derive(Debug, thiserror::Error)]
#[error("the live model of {0} differed from what the log gives (listed above); the rebuilt model replaced it")]
pub(crate) struct Drifted(pub(crate) String);

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
            // Cleared once at the end: batches after it (a log that grew
            // during the rebuild) would draw the bar again.
            if bar.is_finished() {
                return;
            }
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
        let mut reached_the_end = false;
        Box::new(move |progress: RebuildProgress| {
            // The log may grow while the rebuild runs (a live writer): the
            // rebuild then goes past the head it started from, and the
            // figures show that as the end, not as more than 100 %.
            let total = progress.total.max(progress.done);
            let at_the_end = progress.done >= total;
            if last.elapsed() >= Duration::from_secs(2) || (at_the_end && !reached_the_end) {
                last = Instant::now();
                reached_the_end |= at_the_end;
                let percent = if total == 0 {
                    100.0
                } else {
                    progress.done as f64 * 100.0 / total as f64
                };
                err!(
                    "rebuild {name}: {}/{total} positions ({percent:.0}%), {:.0} events/s, ETA {}s",
                    progress.done,
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
    /// Break the figures down: `agent` lists each agent's outcomes (as
    /// every `stats` does), `role` sums them per role (each outcome under
    /// the role the agent acted in for it, so an agent with several roles
    /// counts under each), `category` gives
    /// every figure per ticket category (a ticket's category at the end of
    /// the period; `unclassified` until it has one).
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
    if args.since.is_none() && args.until.is_none() && args.by.is_none() {
        let opened = global.open().await?;
        opened.read_models.catch_up().await?;
        let summary = opened.read_models.stats_summary().await?;
        if global.json {
            output::print_json(&serde_json::to_value(&summary)?);
        } else {
            print_summary(&summary, None);
        }
        return Ok(());
    }
    // A period is computed from the log alone: the read models are not
    // opened (a damaged read-model file does not stop it).
    let opened = global.open_log_to_read().await?;
    let windows = stats_windows(&opened, &args, &global.skipped_event_types()).await?;
    if windows.is_empty() {
        return Err(
            crate::events::NothingMatched(format!("no events in {} fall in that period", opened.location)).into(),
        );
    }
    let (from, to) = stats_period(&opened, &args, &windows).await?;
    for (group, window) in windows {
        let (summary, rates) = window.finish_over(from, to)?;
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
                "{} over {} ({:.1}/s)",
                rates.events,
                seconds(rates.span_s),
                rates.events_per_s
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

/// The period the rates of `stats --since/--until` are over, one for every
/// group: from `--since` (else the first event of the period) to `--until`
/// (else its last event). An `--until` in time still to come is cut back
/// to now, or to the log's newest event when that is later (events decided
/// by a clock ahead of this machine's, as the demo's simulated one).
async fn stats_period(
    opened: &crate::OpenedLog,
    args: &StatsArgs,
    windows: &std::collections::BTreeMap<String, stats::StatsWindow>,
) -> anyhow::Result<(
    Option<chrono::DateTime<chrono::Utc>>,
    Option<chrono::DateTime<chrono::Utc>>,
)> {
    let from = args
        .since
        .or_else(|| windows.values().filter_map(stats::StatsWindow::first_event).min());
    let to = match args.until {
        Some(until) => {
            let newest = opened
                .events
                .read_all(triage_event_store::ReadAll::backwards(1))
                .await?
                .first()
                .map(triage_projections::query::decision_time);
            let now = chrono::Utc::now();
            Some(until.min(newest.map_or(now, |newest| newest.max(now))))
        }
        None => windows.values().filter_map(stats::StatsWindow::last_event).max(),
    };
    Ok((from, to))
}

/// What the first pass over a `stats` window learns of a ticket it touches.
#[derive(Debug)]
struct Touched {
    /// Where the window's first event (or refusal) of the ticket is.
    first_position: triage_event_store::Position,
    /// Whether the window holds an event of the ticket's own stream, not
    /// only refusals.
    has_events: bool,
    /// Whether the first of those opens the ticket: then nothing of it
    /// came before the window.
    opened_inside: bool,
    /// The category of its last classification in the window.
    category: Option<String>,
    /// The group its figures go to: its category at the end of the window
    /// (for `--by category`), else `all`.
    group: String,
}

/// Ticket streams read at once for the tickets a window begins mid-way.
const PRIOR_READS_IN_FLIGHT: usize = 16;

/// The statistics of the events recorded from `--since` to `--until`,
/// one window per group. Three steps, in bounded memory (one small entry
/// per ticket touched):
/// 1. The window's events are scanned for the tickets they touch.
/// 2. Each touched ticket the window begins mid-way is read up to the
///    window, so that its state, its current stage's start and its claim's
///    holder are known (see [`stats::StatsWindow::seed`]), and so is its
///    category at the end of the window.
/// 3. The window's events are scanned again, up to where the first scan
///    ended (events appended since belong to no ticket it saw), into each
///    ticket's group.
async fn stats_windows(
    opened: &crate::OpenedLog,
    args: &StatsArgs,
    skipped: &std::collections::BTreeSet<String>,
) -> anyhow::Result<std::collections::BTreeMap<String, stats::StatsWindow>> {
    use futures::StreamExt as _;
    let by_category = args.by == Some(By::Category);
    let mut query = triage_projections::query::EventQuery {
        since: args.since,
        until: args.until,
        ..Default::default()
    };
    let mut touched: std::collections::HashMap<triage_domain::TicketId, Touched> = Default::default();
    let mut failure = None;
    let last = query
        .scan(opened.events.as_ref(), 1024, |record| {
            let event = match triage_projections::decode_skipping(record, skipped) {
                Ok(Some(event)) => event,
                Ok(None) => return std::ops::ControlFlow::Continue(()),
                Err(error) => {
                    failure = Some(error);
                    return std::ops::ControlFlow::Break(());
                }
            };
            let ticket = touched.entry(event.ticket_id).or_insert_with(|| Touched {
                first_position: event.position,
                has_events: false,
                opened_inside: false,
                category: None,
                group: String::new(),
            });
            if let triage_projections::Payload::Ticket(domain_event) = &event.payload {
                if !ticket.has_events {
                    ticket.has_events = true;
                    ticket.opened_inside = event.opens_ticket();
                }
                if let triage_domain::Event::TicketClassified { category, .. } = domain_event {
                    ticket.category = Some(category.clone());
                }
            }
            std::ops::ControlFlow::Continue(())
        })
        .await?;
    if let Some(error) = failure {
        return Err(error.into());
    }
    let mut windows: std::collections::BTreeMap<String, stats::StatsWindow> = Default::default();
    // Step 2: what came before the window, for the tickets it begins
    // mid-way (a window from the start of the log has none).
    let needs_prior =
        |ticket: &Touched| !ticket.opened_inside && ((ticket.has_events) || (by_category && ticket.category.is_none()));
    let prior_reads: Vec<(triage_domain::TicketId, triage_event_store::Position)> = touched
        .iter()
        .filter(|(_, ticket)| needs_prior(ticket))
        .map(|(id, ticket)| (*id, ticket.first_position))
        .collect();
    let events = &opened.events;
    let mut reads = futures::stream::iter(prior_reads)
        .map(|(id, before)| async move { (id, read_before(events.as_ref(), id, before, skipped).await) })
        .buffer_unordered(PRIOR_READS_IN_FLIGHT);
    while let Some((id, prior)) = reads.next().await {
        let prior = prior?;
        let Some(ticket) = touched.get_mut(&id) else { continue };
        if ticket.category.is_none() {
            ticket.category = prior.iter().rev().find_map(|event| match &event.payload {
                triage_projections::Payload::Ticket(triage_domain::Event::TicketClassified { category, .. }) => {
                    Some(category.clone())
                }
                _ => None,
            });
        }
        ticket.group = group_of(ticket, by_category);
        if ticket.has_events {
            window_of(&mut windows, &ticket.group)?.seed(&prior)?;
        }
    }
    drop(reads);
    for ticket in touched.values_mut().filter(|ticket| ticket.group.is_empty()) {
        ticket.group = group_of(ticket, by_category);
    }
    // Step 3, from the window's first event: nothing before it is in it.
    query.from_position = touched.values().map(|ticket| ticket.first_position).min();
    query.to_position = last;
    let mut failure = None;
    query
        .scan(opened.events.as_ref(), 1024, |record| {
            let pushed = (|| -> anyhow::Result<()> {
                let Some(event) = triage_projections::decode_skipping(record, skipped)? else {
                    return Ok(());
                };
                let group = touched
                    .get(&event.ticket_id)
                    .map_or_else(|| group_of_unseen(by_category), |ticket| ticket.group.clone());
                window_of(&mut windows, &group)?.push(event)?;
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
    Ok(windows)
}

/// The window of `group`, made on first use.
fn window_of<'a>(
    windows: &'a mut std::collections::BTreeMap<String, stats::StatsWindow>,
    group: &str,
) -> anyhow::Result<&'a mut stats::StatsWindow> {
    Ok(match windows.entry(group.to_owned()) {
        std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
        std::collections::btree_map::Entry::Vacant(entry) => entry.insert(stats::StatsWindow::new()?),
    })
}

/// The group of a ticket's figures.
fn group_of(ticket: &Touched, by_category: bool) -> String {
    match (&ticket.category, by_category) {
        (Some(category), true) => category.clone(),
        (None, true) => "unclassified".to_owned(),
        (_, false) => "all".to_owned(),
    }
}

/// The group of a ticket the first scan did not see (none, as the second
/// scan ends where the first did; kept for safety).
fn group_of_unseen(by_category: bool) -> String {
    if by_category { "unclassified" } else { "all" }.to_owned()
}

/// The events of `ticket`'s stream before position `before`, decoded.
async fn read_before(
    events: &dyn triage_event_store::EventStore,
    ticket: triage_domain::TicketId,
    before: triage_event_store::Position,
    skipped: &std::collections::BTreeSet<String>,
) -> anyhow::Result<Vec<triage_projections::ProjectedEvent>> {
    let stream = triage_event_store::StreamName::new(ticket.stream_name())?;
    let records = match events
        .read_stream(&stream, triage_event_store::ReadStream::forwards())
        .await
    {
        Ok(records) => records,
        Err(triage_event_store::Error::StreamNotFound { .. }) => Vec::new(),
        Err(error) => return Err(error.into()),
    };
    let mut prior = Vec::new();
    for record in records.iter().take_while(|record| record.position < before) {
        if let Some(event) = triage_projections::decode_skipping(record, skipped)? {
            prior.push(event);
        }
    }
    Ok(prior)
}

/// A span of seconds, with as many decimals as a short one needs.
fn seconds(span_s: f64) -> String {
    match span_s {
        s if s < 10.0 => format!("{s:.3} s"),
        s if s < 100.0 => format!("{s:.1} s"),
        s => format!("{s:.0} s"),
    }
}

/// Outcomes summed over the agents of each role.
fn outcomes_by_role(
    summary: &stats::StatsSummary,
) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>> {
    let mut roles: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>> = Default::default();
    for agent in summary.agents.values() {
        for (role, outcomes) in &agent.roles {
            let entry = roles.entry(role.clone()).or_default();
            for (outcome, count) in outcomes {
                *entry.entry(outcome.clone()).or_default() += count;
            }
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
            output::duration(i64::try_from(figures.p50_ms).unwrap_or(i64::MAX)),
            output::duration(i64::try_from(figures.p90_ms).unwrap_or(i64::MAX)),
            output::duration(i64::try_from(figures.p99_ms).unwrap_or(i64::MAX)),
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

/// Where `triage replay --until` ends.
enum Moment {
    /// At a log position.
    Position(triage_event_store::Position),
    /// Before the first event recorded after a time.
    Time(chrono::DateTime<chrono::Utc>),
}

/// `triage replay --until … --into …`.
pub(crate) async fn replay(until: &str, into: &std::path::Path, global: &GlobalArgs) -> anyhow::Result<()> {
    if into.exists() && std::fs::metadata(into).map(|m| m.len() > 0).unwrap_or(true) {
        bail!(
            "{} already exists; choose a new file for the scratch read models",
            into.display()
        );
    }
    if let Some(directory) = into.parent().filter(|parent| !parent.as_os_str().is_empty())
        && !directory.is_dir()
    {
        bail!(
            "cannot make {}: there is no directory {}",
            into.display(),
            directory.display()
        );
    }
    // The moment is read before any store is opened: a mistake in it is
    // told first, as a bad argument.
    let moment = match until.parse::<triage_event_store::Position>() {
        Ok(position) => Moment::Position(position),
        Err(_) => Moment::Time(crate::events::parse_time(until).map_err(|error| {
            crate::events::BadArguments(format!(
                "--until {until:?} is neither a log position nor a time: {error}"
            ))
        })?),
    };
    if let Moment::Position(position) = moment {
        global.check_position_form("--until", position)?;
    }
    global.require_existing_store()?;
    let opened = global.open_log_to_read().await?;
    let position = match moment {
        Moment::Position(position) => position,
        Moment::Time(time) => {
            // The log up to its first event recorded after that moment:
            // the replay holds no decision made later. Concurrent writers
            // can commit in another order than they decided, so an event
            // recorded at or before the moment that comes after that one in
            // the log is left out too; `ticket show --at` and `events
            // --until`, which filter each event by its own time, can then
            // differ from the replay by such events.
            let mut last = None;
            triage_projections::query::EventQuery::default()
                .scan(opened.events.as_ref(), 1024, |record| {
                    if triage_projections::query::decision_time(record) > time {
                        return std::ops::ControlFlow::Break(());
                    }
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
    // Before the first event (position 0, say) the read models are empty:
    // told as a time before the first event is, not made into a file.
    let first = opened
        .events
        .read_all(triage_event_store::ReadAll::forwards(1))
        .await?
        .first()
        .map(|event| event.position);
    if first.is_some_and(|first| position < first) {
        return Err(
            crate::events::NothingMatched(format!("no events are at or before log position {position}")).into(),
        );
    }
    // Built under another name beside `into` and put in place whole once
    // done: a replay that fails or is interrupted leaves no file that
    // looks finished, and of two replays into one path exactly one wins.
    let partial = partial_path(into);
    remove_with_sidecars(&partial);
    remove_abandoned_partials(into);
    // Said plainly here: SQLite's own refusal names the hidden file and an
    // error code ("unable to open database file: …/.x.db.partial-42").
    if let Err(error) = std::fs::OpenOptions::new().write(true).create_new(true).open(&partial) {
        let directory = partial.parent().filter(|dir| !dir.as_os_str().is_empty());
        anyhow::bail!(
            "cannot write the replay's file in {}: {error}; it is built there and then renamed to {}",
            directory.map_or_else(|| ".".to_owned(), |dir| dir.display().to_string()),
            into.display()
        );
    }
    let build = async {
        let db = ReadModelDb::open(&partial)?;
        // Frozen before it is built: reading the file later (`--read-model
        // PATH`) never takes it past the position.
        db.freeze_at(position)?;
        let scratch = triage_projections::Projector::new(opened.events.clone(), db.clone())
            .with_options(global.projector_options());
        let reached = scratch.catch_up_to(Some(position)).await?;
        let counts = scratch.read("tickets", |conn, slot| {
            triage_projections::TicketsView::new(conn, slot).counts()
        })?;
        db.seal()?;
        anyhow::Ok((reached, counts))
    };
    let built = tokio::select! {
        built = build => built,
        _ = tokio::signal::ctrl_c() => Err(crate::Interrupted("the replay stopped; no file was made").into()),
    };
    let published = built.and_then(|built| publish(&partial, into).map(|()| built));
    remove_with_sidecars(&partial);
    let (reached, counts) = published?;
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

/// Where `triage replay` builds the file it puts at `into`: a hidden name
/// in the same directory (a link or rename across file systems fails),
/// unique to this process.
fn partial_path(into: &std::path::Path) -> std::path::PathBuf {
    let name = into
        .file_name()
        .map_or_else(|| "replay".into(), |name| name.to_string_lossy());
    into.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Removes the files that replays into `into` by processes that are gone
/// (killed mid-replay) left beside it, best effort. Linux only: elsewhere
/// there is no cheap way to tell that a process is gone.
fn remove_abandoned_partials(into: &std::path::Path) {
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    let name = into
        .file_name()
        .map_or_else(|| "replay".into(), |name| name.to_string_lossy());
    let prefix = format!(".{name}.partial-");
    let directory = into
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let Ok(entries) = std::fs::read_dir(directory) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name.to_str().and_then(|file| file.strip_prefix(&prefix)) else {
            continue;
        };
        // Only the file itself: its sidecars go with it.
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            remove_with_sidecars(&entry.path());
        }
    }
}

/// Removes `path` and the files SQLite keeps beside it, best effort.
fn remove_with_sidecars(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut with_suffix = path.as_os_str().to_owned();
        with_suffix.push(suffix);
        let _ = std::fs::remove_file(with_suffix);
    }
}

/// Puts the finished file `partial` at `into`, which must not exist (or be
/// empty, as a file made by `mktemp` is). A hard link is made only where
/// nothing is: of two replays into one path, the second is refused even
/// when both finished at once.
fn publish(partial: &std::path::Path, into: &std::path::Path) -> anyhow::Result<()> {
    let taken = || {
        anyhow::anyhow!(
            "{} already exists (made while this replay ran); choose a new file for the scratch read models",
            into.display()
        )
    };
    if std::fs::metadata(into).is_ok_and(|metadata| metadata.is_file() && metadata.len() == 0) {
        // Replaced under an exclusive lock on the empty file, checked to be
        // still the one at `into` and still empty: of two replays into it,
        // the second finds it locked, or replaced by the first.
        use std::os::unix::fs::MetadataExt as _;
        let empty = std::fs::File::open(into).with_context(|| format!("cannot open {}", into.display()))?;
        match empty.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(taken()),
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(error).with_context(|| format!("cannot lock {}", into.display()));
            }
        }
        let locked = empty.metadata()?;
        let still = std::fs::metadata(into).ok();
        if still.is_none_or(|now| now.ino() != locked.ino() || now.dev() != locked.dev() || now.len() != 0) {
            return Err(taken());
        }
        return std::fs::rename(partial, into)
            .with_context(|| format!("cannot put the read models at {}", into.display()));
    }
    match std::fs::hard_link(partial, into) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Err(taken()),
        // A file system without hard links: renamed, once more checked
        // not to replace anything.
        Err(_) if !into.exists() => {
            std::fs::rename(partial, into).with_context(|| format!("cannot put the read models at {}", into.display()))
        }
        Err(_) => Err(taken()),
    }
}

/// `projections list`: this build's projections, their versions and
/// tables. It reads no store: they are the same wherever the read models
/// live.
/// This build's projections, on nothing: what they are does not depend
/// on where they live.
fn catalog() -> anyhow::Result<triage_projections::Projector> {
    Ok(triage_projections::Projector::new(
        Arc::new(triage_event_store::InMemoryEventStore::new()),
        ReadModelDb::in_memory()?,
    ))
}

fn list(global: &GlobalArgs) -> anyhow::Result<()> {
    let catalog = catalog()?;
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
