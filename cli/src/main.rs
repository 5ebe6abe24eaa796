//! The `triage` command.
//!
//! A thin layer: clap parses, [`store::StoreLocation`] picks the backend by
//! URL, the command handler does the work, and [`output`] prints tables for
//! people or JSON for programs. Errors are `anyhow` here and only here; the
//! libraries keep typed errors.

/// `println!` for the command's output: when the reader goes away (`triage
/// … | head`), the process ends quietly instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_line(format_args!($($arg)*))
    };
}

/// A line on stderr. Unlike `eprintln!`, a closed stderr (`2>&1 | head`)
/// does not panic: the message is lost, and the exit status stays the
/// command's own.
macro_rules! err {
    ($($arg:tt)*) => {
        $crate::output::write_error_line(format_args!($($arg)*))
    };
}

mod demo;
mod events;
mod output;
mod projections;
mod serve;
mod store;
mod ticket;

use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc, not the system allocator: a rebuild or a replay allocates and
/// frees several small objects per event (rows, strings, decoded events)
/// from several threads at once, and glibc's malloc spent about a tenth of
/// a PostgreSQL rebuild's CPU time on it (with mimalloc that rebuild ran
/// about 25% faster, at about twice the peak RSS: 80-93 MB against 43-45
/// MB for 1,000,006 events). The benchmark harness uses the same
/// allocator, so that it measures what this binary does.
///
/// Built with `no_thp`: mimalloc otherwise asks the kernel for transparent
/// huge pages (`madvise(MADV_HUGEPAGE)`) for its arenas, and every 2 MiB
/// region a thread touches then becomes resident whole. A 1M-event rebuild
/// held 55 MB of huge pages and peaked at 88.6-102.5 MB; without them it
/// peaks at 79.0-87.7 MB at the same speed, and the commands benchmark
/// runs as fast.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions, Synchronous};

use std::sync::Arc;

use anyhow::Context as _;
use triage_event_store::{EventStore, Position};
use triage_projections::{ProjectorOptions, ReadModels};

use crate::store::StoreLocation;

/// An event store and its read models, as chosen on the command line.
#[derive(Debug)]
struct Opened {
    location: StoreLocation,
    events: Arc<dyn EventStore>,
    read_models: ReadModels,
}

/// An event store without its read models.
struct OpenedLog {
    location: StoreLocation,
    events: Arc<dyn EventStore>,
}

/// Triage: many AI agents and humans work the same support tickets without
/// lost updates or impossible transitions.
///
/// Agents send commands; each is checked against the ticket's state machine
/// and the sender's role, then appended as events with an expected stream
/// revision. Events live in an embedded SQLite file by default
/// (./triage.db).
#[derive(Debug, Parser)]
#[command(name = "triage", version, propagate_version = true, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Debug, Args)]
struct GlobalArgs {
    /// Set by [`GlobalArgs::require_existing_store`]: the store is opened
    /// without creating one (PostgreSQL: no schema or tables are made).
    #[arg(skip)]
    existing_store_only: Arc<std::sync::atomic::AtomicBool>,
    /// Where events live: sqlite://PATH or a plain file path (the embedded
    /// default), postgres://USER@HOST/DB[?schema=NAME] (schema= keeps the
    /// store in a schema of its own; TLS by sslmode=disable|prefer (the
    /// default)|require|verify-ca|verify-full and sslrootcert=FILE|system,
    /// as with psql; what the URL leaves out comes from PGHOST, PGUSER,
    /// PGPASSWORD, PGSSLMODE and the like, so postgres:// alone works
    /// where psql does),
    /// esdb://HOST:2113?tls=false (also kurrentdb://, a cluster as
    /// esdb://h1:2113,h2:2113,h3:2113, and namespace=NAME to share a
    /// server), or memory://. Overrides --db.
    #[arg(long, global = true, env = "TRIAGE_STORE", value_name = "URL")]
    store: Option<String>,

    /// The embedded SQLite store file; the same as --store sqlite://PATH.
    /// Default: ./triage.db (`demo` uses a fresh temporary store instead,
    /// unless --db or --store is on its command line: it ignores TRIAGE_DB,
    /// TRIAGE_STORE and TRIAGE_READ_MODEL).
    #[arg(long, global = true, env = "TRIAGE_DB", value_name = "PATH", value_parser = parse_db_path)]
    db: Option<PathBuf>,

    /// Whether `store` came from TRIAGE_STORE rather than --store: an
    /// explicit --db then wins over it (flags over the environment).
    #[arg(skip)]
    store_from_env: bool,

    /// Whether `db` came from TRIAGE_DB rather than --db.
    #[arg(skip)]
    db_from_env: bool,

    /// Whether `read_model` came from TRIAGE_READ_MODEL rather than
    /// --read-model.
    #[arg(skip)]
    read_model_from_env: bool,

    /// Where read models live: a SQLite file PATH, or
    /// postgres://USER@HOST/DB[?schema=NAME] (with projection leadership:
    /// one running instance applies each projection). Default: next to a
    /// SQLite event file (`triage.db` → `triage.read.db`); in memory for
    /// memory://; the same database, schema `triage_read` (`NAME_read` for
    /// a store in schema NAME), for a PostgreSQL store;
    /// ./triage.esdb.read.db for EventStoreDB.
    #[arg(long, global = true, env = "TRIAGE_READ_MODEL", value_name = "PATH|URL")]
    read_model: Option<String>,

    /// Event types projections skip instead of stopping on them (types a
    /// newer Triage wrote). Repeat for several.
    #[arg(long, global = true, value_name = "TYPE")]
    skip_event_type: Vec<String>,

    /// Print JSON for programs: one object, or one object per line for lists.
    #[arg(long, global = true)]
    json: bool,

    /// SQLite durability: `full` fsyncs every commit before acknowledging it;
    /// `normal` may lose the last commits on power loss (never on a crash).
    #[arg(long, global = true, value_enum, default_value_t = SyncMode::Full, env = "TRIAGE_SQLITE_SYNC")]
    sync: SyncMode,

    /// More log output on stderr (-v: info, -vv: debug, -vvv: trace; `serve`
    /// and `mcp` log at info already). RUST_LOG also works.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SyncMode {
    Full,
    Normal,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The main job: simulated AI agents work support tickets end to end (on
    /// a temporary embedded store, unless --db or --store on its command
    /// line names one), with the failures real agents have (slow model
    /// calls, timeouts and late writes, crashes, hallucinated output, retries,
    /// two agents grabbing one ticket); then an audit computed from the event
    /// log alone. Exits non-zero if the audit fails.
    Demo(demo::DemoArgs),
    /// Print the transition table: every allowed transition, the command that
    /// makes it and the roles allowed to send it.
    States {
        /// Print a Mermaid state diagram generated from the same table.
        #[arg(long)]
        mermaid: bool,
    },
    /// Query the event log for analysts: filter by ticket, stream, type,
    /// agent, role, command, correlation, time or position; print a table,
    /// JSON lines or CSV, in constant memory; --follow tails live events.
    Events(events::EventsArgs),
    /// Open, show and list tickets, see their history and work queues; send
    /// commands as an agent.
    #[command(subcommand)]
    Ticket(ticket::TicketCommand),
    /// List, inspect and rebuild the read models (projections).
    #[command(subcommand)]
    Projections(projections::ProjectionsCommand),
    /// Time travel: build the read models as of a moment into a scratch
    /// read-model file, for what-if analysis; the live store and read models
    /// are not touched. Query the file with SQL (views `tickets`,
    /// `stats_counters`, …) or with `--read-model PATH`.
    Replay {
        /// The moment: a log position (as printed by `triage events`) or a
        /// time (RFC 3339). A time ends the replay before the first event
        /// recorded after it, so no later decision is in the file.
        #[arg(long, value_name = "POSITION|TIME")]
        until: String,
        /// The scratch read-model file to create; it must not exist yet.
        /// It is built beside it under a hidden name and appears only once
        /// complete: a failed or interrupted (Ctrl-C) replay leaves no file,
        /// and of two replays into one path the second is refused. One
        /// killed outright leaves its hidden `.NAME.partial-PID` files,
        /// which the next replay into NAME clears.
        #[arg(long, value_name = "PATH")]
        into: PathBuf,
    },
    /// Serve the agent API: HTTP JSON under /v1 (OpenAPI at /openapi.json),
    /// MCP over streamable HTTP at /mcp, /healthz and /readyz; runs the
    /// lease sweeper; stops gracefully on Ctrl-C or SIGTERM.
    Serve(serve::ServeArgs),
    /// Serve the agent API's tools over MCP on stdin/stdout, for a desktop
    /// LLM client; the token decides the agent and its roles.
    Mcp(serve::McpArgs),
    /// Add, list and revoke agent tokens (the agents file stores only
    /// their hashes).
    #[command(subcommand)]
    Agents(serve::AgentsCommand),
    /// Statistics: tickets per state, stage latency percentiles, refusals
    /// and conflicts, expired claims, outcomes per agent. From the live read
    /// model, or, with --since/--until/--by, computed from the events of any
    /// period.
    Stats(projections::StatsArgs),
}

impl GlobalArgs {
    /// Refuses a position in KurrentDB's form (`C:…/P:…`, two parts that
    /// differ) for a store whose positions are plain numbers: taken as it
    /// was, it named a place no event of that store has.
    fn check_position_form(&self, option: &str, position: Position) -> anyhow::Result<()> {
        if position.commit != position.prepare && !matches!(self.location()?, StoreLocation::Kurrent(_)) {
            return Err(events::BadArguments(format!(
                "{option} {position} is a KurrentDB position; this store's positions are plain numbers, as \
                 `triage events` prints them (e.g. 1795)"
            ))
            .into());
        }
        Ok(())
    }

    fn location(&self) -> anyhow::Result<StoreLocation> {
        // Flags before the environment: --store, then --db, then
        // TRIAGE_STORE, then TRIAGE_DB.
        let store = self
            .store
            .as_ref()
            .filter(|_| !(self.store_from_env && self.db_given()));
        match store {
            Some(url) => StoreLocation::parse(url),
            None => Ok(StoreLocation::Sqlite(
                self.db.clone().unwrap_or_else(|| PathBuf::from("./triage.db")),
            )),
        }
    }

    /// For every command but those that open a ticket: an embedded store
    /// file that does not exist is an error, not a new empty store (a
    /// mistyped `--db` would otherwise print nothing, successfully, or not
    /// find its ticket, and leave a new file behind).
    fn require_existing_store(&self) -> anyhow::Result<()> {
        if let StoreLocation::Sqlite(path) = self.location()?
            && !path.exists()
        {
            anyhow::bail!(
                "there is no event store at {}: only opening a ticket (`triage ticket open`, or `ticket send` \
                 of an open_ticket command), `triage serve`, `triage mcp` or `triage demo --db` creates one",
                path.display()
            );
        }
        // A PostgreSQL store is looked for when it is opened (see
        // `open_log`), with the flag set here.
        self.existing_store_only
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // SQLite takes an empty file for an empty database and would make a
        // store of it: a command that only reads must not write one into a
        // file that was meant as something else (or was truncated).
        if let StoreLocation::Sqlite(path) = self.location()?
            && std::fs::metadata(&path).is_ok_and(|metadata| metadata.is_file() && metadata.len() == 0)
        {
            anyhow::bail!(
                "{} is an empty file, not an event store: only opening a ticket (`triage ticket open`, or `ticket \
                 send` of an open_ticket command), `triage serve`, `triage mcp` or `triage demo --db` makes a store \
                 of it",
                path.display()
            );
        }
        Ok(())
    }

    /// Opens the event store alone, for commands that use only the log
    /// (`demo --db`, and through [`GlobalArgs::open_log_to_read`] `events`,
    /// `replay` and `stats --since/--until`): a damaged read-model file
    /// does not stop them.
    async fn open_log(&self) -> anyhow::Result<OpenedLog> {
        self.open_log_or_read_only(false).await
    }

    /// [`GlobalArgs::open_log`] for commands that only read the log: an
    /// embedded store this process may not write (an analyst's view of a
    /// file owned by another account, a copy on read-only media) is read
    /// read-only, with a note on stderr.
    async fn open_log_to_read(&self) -> anyhow::Result<OpenedLog> {
        self.open_log_or_read_only(true).await
    }

    /// With `read_only_fallback` false, a store that cannot be written is
    /// an error.
    async fn open_log_or_read_only(&self, read_only_fallback: bool) -> anyhow::Result<OpenedLog> {
        let location = self.location()?;
        let create = !self.existing_store_only.load(std::sync::atomic::Ordering::Relaxed);
        let events = match location.open(self.synchronous(), create).await {
            Ok(events) => events,
            Err(error) => {
                let not_writable = error
                    .chain()
                    .find_map(|cause| cause.downcast_ref::<triage_event_store::Error>())
                    .is_some_and(SqliteEventStore::is_not_writable);
                let StoreLocation::Sqlite(path) = &location else {
                    return Err(error);
                };
                if !not_writable {
                    return Err(error);
                }
                if !read_only_fallback {
                    return Err(error.context(format!(
                        "{} cannot be written here, and this command writes to the store or keeps its read models \
                         up to date; `triage events`, `triage stats --since …` and `triage replay` read a store \
                         read-only",
                        path.display()
                    )));
                }
                let store = SqliteEventStore::open_read_only(path, SqliteOptions::default()).map_err(|read_only| {
                    error.context(format!(
                        "{} cannot be written here, and reading it read-only failed too: {read_only}",
                        path.display()
                    ))
                })?;
                eprintln!(
                    "note: {} or its directory cannot be written here; reading the store read-only",
                    path.display()
                );
                Arc::new(store)
            }
        };
        Ok(OpenedLog { location, events })
    }

    /// Opens the event store and the read models that go with it.
    async fn open(&self) -> anyhow::Result<Opened> {
        // The read models are kept up to date on opening, in a file beside
        // the store: a store this process cannot write is an error.
        let OpenedLog { location, events } = self.open_log().await?;
        let options = self.projector_options();
        let explicit = self.read_model.is_some();
        let place = self.read_model.clone().or_else(|| location.default_read_model());
        // A read-model file is made only once the store has answered, so a
        // command that fails on a store it cannot reach (a KurrentDB that
        // is down: its client connects on the first read) leaves no file.
        if let Some(file) = place
            .as_deref()
            .and_then(|place| triage_projections::sqlite_path(place).ok())
            && !std::path::Path::new(file).exists()
        {
            events.head_position().await?;
        }
        let read_models = match place {
            Some(place) => ReadModels::open(&place, events.clone(), options)
                .await
                .with_context(|| {
                    let path = std::path::Path::new(&place);
                    // Only a read-model file may be moved aside: the advice
                    // given for an event log or another program's database
                    // would lose what it holds.
                    let hint = if place.contains("://") {
                        ""
                    } else if path.is_dir() {
                        "; it is a directory: name a file"
                    } else if match sqlite_application_id(path) {
                        Some(id) => id == triage_projections::APPLICATION_ID,
                        // Not a SQLite file (any more): damage, if Triage
                        // chose the place; if the user named it, it may be
                        // anything.
                        None => !explicit,
                    } {
                        "; the file holds only what the event log says: move it aside, and the next \
                         command rebuilds it from the log"
                    } else {
                        // The cause says what the file is, and that it was
                        // left unchanged.
                        ""
                    };
                    format!(
                        "cannot open the read models at {}{hint}",
                        triage_event_store::url::redact_password(&place)
                    )
                })?,
            None => ReadModels::Sqlite(
                triage_projections::Projector::new(events.clone(), triage_projections::ReadModelDb::in_memory()?)
                    .with_options(options),
            ),
        };
        Ok(Opened {
            location,
            events,
            read_models,
        })
    }

    /// Whether --db was given on the command line (not by TRIAGE_DB).
    fn db_given(&self) -> bool {
        self.db.is_some() && !self.db_from_env
    }

    /// These settings without what came from TRIAGE_STORE, TRIAGE_DB and
    /// TRIAGE_READ_MODEL, and the names of those variables.
    fn without_places_from_env(&self) -> (GlobalArgs, Vec<&'static str>) {
        let mut flags_only = self.clone();
        let mut ignored = Vec::new();
        if self.store_from_env && flags_only.store.take().is_some() {
            ignored.push("TRIAGE_STORE");
        }
        if self.db_from_env && flags_only.db.take().is_some() {
            ignored.push("TRIAGE_DB");
        }
        if self.read_model_from_env && flags_only.read_model.take().is_some() {
            ignored.push("TRIAGE_READ_MODEL");
        }
        flags_only.store_from_env = false;
        flags_only.db_from_env = false;
        flags_only.read_model_from_env = false;
        (flags_only, ignored)
    }

    fn projector_options(&self) -> ProjectorOptions {
        ProjectorOptions {
            skip_event_types: self.skipped_event_types(),
            ..ProjectorOptions::default()
        }
    }

    /// `--skip-event-type`, for every command that decodes events, not
    /// only the projectors.
    fn skipped_event_types(&self) -> std::collections::BTreeSet<String> {
        self.skip_event_type.iter().cloned().collect()
    }

    fn synchronous(&self) -> Synchronous {
        match self.sync {
            SyncMode::Full => Synchronous::Full,
            SyncMode::Normal => Synchronous::Normal,
        }
    }
}

/// Logs on stderr: warnings for one-shot commands, what a server does
/// (starting, expiring claims, stopping) for `serve` and `mcp`, more with
/// each `-v`.
fn init_tracing(verbose: u8, serving: bool) {
    let level = verbose + u8::from(serving && verbose == 0);
    let default = match level {
        // The KurrentDB client logs every failed connection attempt at
        // ERROR; the error Triage reports carries the cause once.
        // PostgreSQL's notices ("relation … already exists, skipping")
        // come through tokio-postgres at INFO: not a server's news.
        0 => "warn,kurrentdb=off",
        1 => "info,kurrentdb=off,tokio_postgres=warn",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal, not escape codes in a log
        // file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The application id in the header of the SQLite file at `path` (Triage
/// marks its read models and its event logs apart); `None` when it is not
/// a readable SQLite file.
fn sqlite_application_id(path: &std::path::Path) -> Option<i32> {
    use std::io::Read as _;
    let mut header = [0u8; 72];
    std::fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut header))
        .ok()?;
    header
        .starts_with(b"SQLite format 3\0")
        .then(|| i32::from_be_bytes([header[68], header[69], header[70], header[71]]))
}

/// The error and its causes, each cause once: many errors already quote
/// their source in their own text, and `{:#}` would repeat it.
fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// The user pressed Ctrl-C: exit status 130, as a shell gives. It says
/// what was left as it was.
#[derive(Debug, thiserror::Error)]
#[error("interrupted; {0}")]
pub(crate) struct Interrupted(pub(crate) &'static str);

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let from_env = |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::EnvVariable);
    cli.global.store_from_env = from_env("store");
    cli.global.db_from_env = from_env("db");
    cli.global.read_model_from_env = from_env("read_model");
    init_tracing(
        cli.global.verbose,
        matches!(cli.command, Command::Serve(_) | Command::Mcp(_)),
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            err!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.downcast_ref::<events::BadArguments>().is_some() => {
            err!("error: {}", describe(&error));
            ExitCode::from(2)
        }
        Err(error) if error.downcast_ref::<Interrupted>().is_some() => {
            err!("{}", describe(&error));
            ExitCode::from(130)
        }
        Err(error) if error.downcast_ref::<projections::Drifted>().is_some() => {
            err!("{}", describe(&error));
            ExitCode::from(4)
        }
        Err(error) if error.downcast_ref::<events::NothingMatched>().is_some() => {
            err!("{}", describe(&error));
            ExitCode::from(3)
        }
        Err(error) => {
            err!("error: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::States { mermaid } => {
            output::print_states(mermaid, cli.global.json);
            Ok(())
        }
        Command::Demo(args) => demo::run(args, &cli.global).await,
        Command::Events(args) => events::run(args, &cli.global).await,
        Command::Ticket(command) => ticket::run(command, &cli.global).await,
        Command::Projections(command) => projections::run(command, &cli.global).await,
        Command::Stats(args) => projections::stats(args, &cli.global).await,
        Command::Serve(args) => serve::serve(args, &cli.global).await,
        Command::Mcp(args) => serve::mcp(args, &cli.global).await,
        Command::Agents(command) => serve::agents(command, &cli.global),
        Command::Replay { until, into } => projections::replay(&until, &into, &cli.global).await,
    }
}

/// `--db`/`TRIAGE_DB`: a path, not nothing. clap's own refusal of an
/// empty value ("a value is required for '--db <PATH>'") blamed a flag that
/// an empty `TRIAGE_DB=` had set.
fn parse_db_path(value: &str) -> Result<PathBuf, String> {
    if value.is_empty() {
        return Err(
            "the store file is an empty path (if TRIAGE_DB is set to nothing, unset it or name a file)".to_owned(),
        );
    }
    Ok(PathBuf::from(value))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
