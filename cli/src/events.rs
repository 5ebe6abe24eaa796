//! `triage events`: query and tail the event log.

use std::io::{IsTerminal as _, Write as _};
use std::ops::ControlFlow;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::{Args, ValueEnum};
use triage_domain::{EventMetadata, Role, TicketId};
use triage_event_store::{Position, RecordedEvent, SubscribeToAll, SubscriptionMessage};
use triage_projections::query::{EventQuery, EventRow};
use uuid::Uuid;

use crate::GlobalArgs;

#[derive(Debug, Args)]
#[command(
    after_help = "Exit status: 0 when events were printed, 3 when none matched, 1 on errors, 2 on bad arguments."
)]
pub(crate) struct EventsArgs {
    /// Only this ticket's events and its recorded refusals.
    #[arg(long, value_name = "ID")]
    ticket: Option<TicketId>,
    /// Only this stream, e.g. ticket-<uuid> or rejections-<uuid> (the
    /// uuid in any case, as --ticket takes it).
    #[arg(long, value_parser = parse_stream)]
    stream: Option<String>,
    /// Only these event types (repeat, or separate with commas), as
    /// `triage states` and the log name them: TicketOpened, …,
    /// CommandRejected (refusals), ClaimIndexed (KurrentDB claim index).
    #[arg(long = "type", value_name = "TYPE", value_delimiter = ',', value_parser = parse_event_type)]
    event_types: Vec<String>,
    /// Only events sent by this agent id.
    #[arg(long)]
    agent: Option<String>,
    /// Only events sent in this role.
    #[arg(long, value_parser = parse_role)]
    role: Option<Role>,
    /// Only the events of this command.
    #[arg(long, value_name = "UUID")]
    command_id: Option<Uuid>,
    /// Only the events of this correlation id.
    #[arg(long, value_name = "UUID")]
    correlation_id: Option<Uuid>,
    /// Only events recorded at or after this time (RFC 3339, e.g. 2026-11-28T02:00:00Z).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    since: Option<DateTime<Utc>>,
    /// Only events recorded before this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    until: Option<DateTime<Utc>>,
    /// Only events at or after this position (as printed: 42 or C:1/P:2;
    /// or 1/2, as the HTTP API writes it).
    #[arg(long, value_name = "POSITION", value_parser = parse_position)]
    from_position: Option<Position>,
    /// Only events at or before this position.
    #[arg(long, value_name = "POSITION", value_parser = parse_position)]
    to_position: Option<Position>,
    /// Output format. Default: a table on a terminal, JSON lines otherwise.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// In the table, whole stream names and command ids (to copy them
    /// into another command), not shortened ones.
    #[arg(long)]
    wide: bool,
    /// After the history, keep printing new matching events until Ctrl-C
    /// (or until the log passes --to-position).
    #[arg(long)]
    follow: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Aligned columns for people.
    Table,
    /// One JSON object per line.
    Jsonl,
    /// CSV with a header; `data` and `metadata` as JSON text.
    Csv,
}

/// A stream name as the stores write it: the uuid of a `ticket-` or
/// `rejections-` stream in its canonical form (lower case, hyphenated), so
/// that `ticket-<UPPER-CASE UUID>` finds the same stream as `--ticket`
/// does. Other names are taken as they are.
fn parse_stream(text: &str) -> Result<String, String> {
    for prefix in ["ticket-", "rejections-"] {
        if let Some(id) = text.strip_prefix(prefix)
            && let Ok(id) = uuid::Uuid::parse_str(id)
        {
            return Ok(format!("{prefix}{}", id.hyphenated()));
        }
    }
    Ok(text.to_owned())
}

/// The event types this build writes.
fn known_event_types() -> impl Iterator<Item = &'static str> {
    triage_domain::Event::TYPES.into_iter().chain([
        triage_domain::CommandRejected::EVENT_TYPE,
        triage_api::service::CLAIM_INDEXED,
    ])
}

/// An event type this build knows, spaces around it ignored: a type that
/// is not one (a slip of case, a typo) matched nothing and said only "no
/// events match".
fn parse_event_type(value: &str) -> Result<String, String> {
    let value = value.trim();
    if let Some(known) = known_event_types().find(|known| *known == value) {
        return Ok(known.to_owned());
    }
    let hint = known_event_types()
        .find(|known| known.eq_ignore_ascii_case(value))
        .map(|known| format!("did you mean {known}? "))
        .unwrap_or_default();
    Err(format!(
        "{value:?} is not an event type; {hint}the types are {}",
        known_event_types().collect::<Vec<_>>().join(", ")
    ))
}

fn parse_role(value: &str) -> Result<Role, String> {
    value.parse()
}

pub(crate) fn parse_time(value: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(value.trim())
        .map(|time| time.with_timezone(&Utc))
        .map_err(|error| format!("{value:?} is not an RFC 3339 time such as 2026-11-28T02:00:00Z ({error})"))
}

pub(crate) fn parse_position(value: &str) -> Result<Position, String> {
    value.parse()
}

/// Whether output failed because the reader went away (`triage events | head`).
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || cause.downcast_ref::<csv::Error>().is_some_and(
                |csv| matches!(csv.kind(), csv::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe),
            )
    })
}

/// Arguments that parse but ask for nothing sensible (an empty range):
/// exit status 2, as for arguments that do not parse.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BadArguments(pub(crate) String);

/// No event matched: a distinct exit status for scripts.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct NothingMatched(pub(crate) String);

/// The CSV columns. The last four repeat fields of `metadata`, for
/// spreadsheets that cannot take JSON apart (empty when the metadata does
/// not decode); new columns go at the end, so that existing ones keep
/// their places.
const CSV_HEADER: [&str; 13] = [
    "position",
    "stream",
    "ticket_id",
    "revision",
    "id",
    "type",
    "recorded_at",
    "data",
    "metadata",
    "agent_id",
    "role",
    "command_id",
    "correlation_id",
];

/// `text` for a cell a spreadsheet shows as text: one that begins with
/// `=`, `+`, `-`, `@`, a tab or a carriage return would be taken for a
/// formula, so it gets a leading `'`, which spreadsheets hide (OWASP's
/// advice on CSV injection). Only the agent id column needs it: the
/// others are numbers, ids, JSON or a fixed vocabulary.
fn spreadsheet_text(text: String) -> String {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text
    }
}

/// Writes rows in the chosen format as they come.
struct Printer {
    format: Format,
    /// Whole ids in the table.
    wide: bool,
    csv: Option<csv::Writer<std::io::Stdout>>,
    printed: u64,
}

impl Printer {
    fn new(format: Format, wide: bool) -> anyhow::Result<Printer> {
        let csv = match format {
            Format::Csv => {
                let mut writer = csv::Writer::from_writer(std::io::stdout());
                writer.write_record(CSV_HEADER)?;
                Some(writer)
            }
            _ => None,
        };
        if format == Format::Table {
            let (stream, command) = Printer::id_widths(wide);
            writeln!(
                std::io::stdout().lock(),
                "{:<10} {:<24} {:<stream$} {:>4} {:<22} {:<26} {:<command$}",
                "POSITION",
                "RECORDED",
                "STREAM",
                "REV",
                "TYPE",
                "AGENT",
                "COMMAND"
            )?;
        }
        Ok(Printer {
            format,
            wide,
            csv,
            printed: 0,
        })
    }

    /// The widths of the stream and command columns.
    fn id_widths(wide: bool) -> (usize, usize) {
        // A rejections- stream of a UUID, and a hyphenated UUID.
        if wide { (47, 36) } else { (25, 13) }
    }

    fn print(&mut self, record: &RecordedEvent) -> anyhow::Result<()> {
        let row = EventRow::from_record(record);
        self.printed += 1;
        match self.format {
            Format::Jsonl => {
                let mut line = serde_json::to_string(&row)?;
                line.push('\n');
                std::io::stdout().lock().write_all(line.as_bytes())?;
            }
            Format::Csv => {
                let writer = self.csv.as_mut().expect("a CSV writer for CSV output");
                let metadata = EventMetadata::decode(&record.metadata).ok();
                let field = |pick: fn(&EventMetadata) -> String| metadata.as_ref().map(pick).unwrap_or_default();
                writer.write_record([
                    row.position.clone(),
                    row.stream.clone(),
                    row.ticket_id.map(|id| id.to_string()).unwrap_or_default(),
                    row.revision.to_string(),
                    row.id.to_string(),
                    row.event_type.clone(),
                    row.recorded_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                    row.data.to_string(),
                    row.metadata.to_string(),
                    spreadsheet_text(field(|m| m.agent.id.clone())),
                    field(|m| m.agent.role.to_string()),
                    field(|m| m.command_id.to_string()),
                    field(|m| m.correlation_id.to_string()),
                ])?;
            }
            Format::Table => {
                let metadata = EventMetadata::decode(&record.metadata).ok();
                let agent = metadata
                    .as_ref()
                    .map_or_else(String::new, |m| format!("{} ({})", m.agent.id, m.agent.role));
                let command = metadata.as_ref().map_or_else(String::new, |m| {
                    if self.wide {
                        m.command_id.to_string()
                    } else {
                        crate::output::abbreviated(&m.command_id.simple().to_string())
                    }
                });
                let stream = match row.stream.split_once('-') {
                    Some(_) if self.wide => row.stream.clone(),
                    Some((category, id)) => format!("{category}-{}", crate::output::abbreviated(&id.replace('-', ""))),
                    None => row.stream.clone(),
                };
                let (stream_width, command_width) = Printer::id_widths(self.wide);
                // Columns are padded by the width text takes on a terminal
                // (an agent id may be CJK or long), and cut with "…" to fit
                // unless `--wide` asked for whole values.
                let fit = |text: &str, width: usize| fit_column(text, width, !self.wide);
                writeln!(
                    std::io::stdout().lock(),
                    "{:<10} {:<24} {} {:>4} {} {} {:<command_width$}",
                    row.position,
                    row.recorded_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    fit(&stream, stream_width),
                    row.revision,
                    fit(&row.event_type, 22),
                    fit(&agent, 26),
                    command
                )?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if let Some(writer) = self.csv.as_mut() {
            writer.flush()?;
        }
        std::io::stdout().flush()?;
        Ok(())
    }
}

pub(crate) async fn run(args: EventsArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    if let (Some(since), Some(until)) = (args.since, args.until)
        && since >= until
    {
        return Err(BadArguments(format!(
            "--since {since} is not before --until {until}: that range holds no time"
        ))
        .into());
    }
    if let (Some(from), Some(to)) = (args.from_position, args.to_position)
        && from > to
    {
        return Err(BadArguments(format!(
            "--from-position {from} is after --to-position {to}: that range holds no position"
        ))
        .into());
    }
    for (option, position) in [
        ("--from-position", args.from_position),
        ("--to-position", args.to_position),
    ] {
        if let Some(position) = position {
            global.check_position_form(option, position)?;
        }
    }
    global.require_existing_store()?;
    let opened = global.open_log_to_read().await?;
    let query = EventQuery {
        ticket: args.ticket,
        stream: args.stream.clone(),
        event_types: args.event_types.clone(),
        agent: args.agent.clone(),
        role: args.role,
        command_id: args.command_id,
        correlation_id: args.correlation_id,
        since: args.since,
        until: args.until,
        from_position: args.from_position,
        to_position: args.to_position,
    };
    let format = match (args.format, global.json) {
        // Which of the two was meant cannot be told.
        (Some(format), true) if format != Format::Jsonl => {
            return Err(BadArguments(format!(
                "--json asks for JSON lines and --format for {}: give one of them",
                format
                    .to_possible_value()
                    .map_or_else(String::new, |value| value.get_name().to_owned())
            ))
            .into());
        }
        (Some(format), _) => format,
        (None, true) => Format::Jsonl,
        (None, false) if std::io::stdout().is_terminal() => Format::Table,
        (None, false) => Format::Jsonl,
    };
    let mut printer = match Printer::new(format, args.wide) {
        Ok(printer) => printer,
        // The table's header found the pipe closed already.
        Err(error) if is_broken_pipe(&error) => return Ok(()),
        Err(error) => return Err(error),
    };
    // A tail runs until Ctrl-C, which ends it cleanly, history included.
    // One listener for the whole command, made before the first read: a
    // listener made afresh in each turn of the live loop did not hear a
    // Ctrl-C that arrived between two turns (while an event was printed),
    // and once one was made the default handler no longer ends the process.
    let mut interrupted = std::pin::pin!(async {
        if args.follow {
            let _ = tokio::signal::ctrl_c().await;
        } else {
            std::future::pending::<()>().await;
        }
    });
    // Registers the listener now (a first poll), not at the first `select!`.
    let already = std::future::poll_fn(|cx| std::task::Poll::Ready(interrupted.as_mut().poll(cx).is_ready())).await;
    if already {
        return Ok(());
    }
    let mut failure = None;
    let scan = query.scan(opened.events.as_ref(), 1024, |record| match printer.print(record) {
        Ok(()) => ControlFlow::Continue(()),
        Err(error) => {
            failure = Some(error);
            ControlFlow::Break(())
        }
    });
    let last = tokio::select! {
        biased;
        () = &mut interrupted => return Ok(()),
        last = scan => last.context("cannot read the event log")?,
    };
    if let Some(error) = failure {
        // A closed pipe (`| head`) ends the output quietly.
        if is_broken_pipe(&error) {
            return Ok(());
        }
        return Err(error);
    }
    // The last of the output may still be buffered: a closed pipe found
    // here ends it as quietly as one found by a row's write. (Only here,
    // where the error can only be stdout's: a broken pipe to the store
    // is a failure.)
    match printer.flush() {
        Ok(()) => {}
        Err(error) if is_broken_pipe(&error) => return Ok(()),
        Err(error) => return Err(error),
    }
    // A tail bounded by --to-position ends once the log is past it: nothing
    // later can match.
    let past_the_end = |position: Position| args.to_position.is_some_and(|end| position >= end);
    if args.follow && !last.is_some_and(past_the_end) {
        let mut subscription = opened.events.clone().subscribe_to_all(SubscribeToAll {
            from: last,
            ..SubscribeToAll::default()
        });
        loop {
            tokio::select! {
                biased;
                () = &mut interrupted => return Ok(()),
                message = subscription.next() => match message {
                    Some(Ok(SubscriptionMessage::Event(record))) => {
                        if query.matches(&record) {
                            match printer.print(&record).and_then(|()| printer.flush()) {
                                Ok(()) => {}
                                // A closed pipe (`| head`) ends the tail quietly.
                                Err(error) if is_broken_pipe(&error) => return Ok(()),
                                Err(error) => return Err(error),
                            }
                        }
                        if past_the_end(record.position) {
                            break;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Err(error).context("the live tail failed"),
                    None => return Ok(()),
                },
            }
        }
    }
    if printer.printed == 0 {
        let what = match (args.ticket, &args.stream) {
            (Some(ticket), _) => format!("ticket {ticket} has no matching events in {}", opened.location),
            (None, Some(stream)) => format!("stream {stream} has no matching events in {}", opened.location),
            (None, None) => format!("no events in {} match", opened.location),
        };
        return Err(NothingMatched(what).into());
    }
    Ok(())
}

/// `text` in a column `width` wide on a terminal: padded with spaces to
/// that width, and, with `cut`, cut to it with a closing "…" when longer.
/// Widths are display widths (a CJK character takes two columns), not
/// characters or bytes.
fn fit_column(text: &str, width: usize, cut: bool) -> String {
    use unicode_width::{UnicodeWidthChar as _, UnicodeWidthStr as _};
    let mut shown = String::with_capacity(text.len());
    let mut used = text.width();
    if cut && used > width {
        // Room for the "…", which takes one column.
        used = 0;
        for c in text.chars() {
            let w = c.width().unwrap_or(0);
            if used + w + 1 > width {
                break;
            }
            shown.push(c);
            used += w;
        }
        shown.push('…');
        used += 1;
    } else {
        shown.push_str(text);
    }
    shown.extend(std::iter::repeat_n(' ', width.saturating_sub(used)));
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_fitted_by_display_width() {
        use unicode_width::UnicodeWidthStr as _;
        // Two columns per CJK character: 18 wide, padded to 26.
        let agent = fit_column("分類器エージェント", 26, true);
        assert_eq!(agent.width(), 26);
        assert!(agent.starts_with("分類器エージェント "));
        // Too long: cut to the width, "…" last.
        let long = fit_column(
            "averyveryveryveryverylongagentnamethatgoesonandon (classifier)",
            26,
            true,
        );
        assert_eq!(long, "averyveryveryveryverylong…");
        // A wide character never straddles the edge.
        let cjk = fit_column("分類器エージェントの名前が長い", 10, true);
        assert_eq!(cjk, "分類器エ… ");
        assert_eq!(cjk.width(), 10);
        // --wide: whole, however long.
        let whole = fit_column("averyveryveryveryverylongagentname", 10, false);
        assert_eq!(whole, "averyveryveryveryverylongagentname");
        assert_eq!(fit_column("ok", 4, true), "ok  ");
    }

    #[test]
    fn a_cell_a_spreadsheet_would_run_as_a_formula_is_made_text() {
        for formula in ["=HYPERLINK(\"x\")", "+1", "-2+3", "@SUM(A1)", "\tx", "\rx"] {
            assert_eq!(spreadsheet_text(formula.to_owned()), format!("'{formula}"));
        }
        for plain in ["classifier-1", "", "a=b", "ops@example"] {
            assert_eq!(spreadsheet_text(plain.to_owned()), plain);
        }
    }

    #[test]
    fn durations_read_as_a_person_says_them() {
        let said: Vec<String> = [850, 12_500, 237_855, 9_000_000]
            .into_iter()
            .map(crate::output::duration)
            .collect();
        assert_eq!(said, ["850 ms", "12.5 s", "4.0 min", "2.5 h"]);
    }

    #[test]
    fn event_types_are_trimmed_and_checked() {
        assert_eq!(parse_event_type(" TicketOpened ").unwrap(), "TicketOpened");
        assert!(
            parse_event_type("ticketopened")
                .unwrap_err()
                .contains("did you mean TicketOpened?")
        );
    }
}
