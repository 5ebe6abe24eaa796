//! The read side of Triage: projections, their runtime and the ticket read
//! models.
//!
//! # Layout
//! - [`Projection`]: a name, a version, tables and a batch handler.
//! - [`Projector`]: subscribes/catches up from each projection's saved
//!   checkpoint and applies events in batches, each batch in one read-model
//!   transaction that also writes the checkpoint (exactly once after a
//!   crash); rebuilds into a shadow generation and swaps it in atomically.
//! - [`ReadModelDb`]: the SQLite file the read models live in.
//! - [`postgres`]: the same read models in PostgreSQL ([`PgReadModels`])
//!   and their runtime with projection leadership ([`PgProjector`]).
//! - [`ReadModels`]: either of the two, chosen by location (`PATH` or
//!   `postgres://…`), with the queries the CLI serves.
//! - [`TicketsProjection`] / [`TicketsView`]: current ticket state and the
//!   work queues; [`StatsProjection`] / [`stats::summary`]: statistics.
//!
//! # Main decisions
//! - **Generations, not renames.** A projection's tables are named
//!   `<table>_g<N>`. A rebuild fills generation N+1 while N keeps serving;
//!   the swap is one transaction that points the registry (and the `<table>`
//!   views) at N+1 and drops N. A crash or Ctrl-C mid-rebuild leaves N
//!   untouched, and the next rebuild discards the half-built N+1.
//! - **Read models in a sibling file** (`triage.db` → `triage.read.db`), not
//!   in the event store's file: SQLite has one writer per file, so in the
//!   same file projection batches and the event writer's group commits take
//!   turns on one lock. Measured with `triage-bench commands --agents 32
//!   --projector sibling|same-file` on the 2-vCPU development machine: in
//!   the same file the live projections fell 17,000–22,000 events behind
//!   within 5 s (they rarely got the lock), while in a sibling file they
//!   stayed within 63 events; the sibling layout costs event throughput
//!   only through the CPU the projections use (5,600 against 10,300
//!   commands/s with no projections running, on 2 cores). The read models
//!   are rebuildable, so their file runs with `synchronous=NORMAL`.
//! - **Batches fold in memory**: a batch loads each touched ticket once,
//!   folds its events with the domain's own `evolve`, and writes it once.

use std::path::PathBuf;

use triage_event_store::Position;

mod db;
pub mod postgres;
mod projection;
pub mod query;
mod read_models;
mod runtime;
pub mod stats;
mod tickets;

pub use db::{APPLICATION_ID, FROZEN_SCHEMA_VERSION, ReadModelDb, SCHEMA_VERSION, Slot, generation_table};
pub use postgres::{PgProjector, PgReadModelOptions, PgReadModels};
pub use projection::{Fnv, Payload, ProjectedEvent, Projection, STREAM_PREFIXES, decode, decode_skipping, digest_rows};
pub use read_models::{ReadModels, sqlite_path};
pub use runtime::{ProjectionStatus, Projector, ProjectorOptions, RebuildOptions, RebuildProgress, RebuildReport};
pub use stats::{StatsProjection, StatsSummary};
pub use tickets::{ListCursor, TicketRow, TicketsProjection, TicketsView, list_request};

/// What to do about an event that did not decode.
fn undecodable_advice(source: &triage_domain::DecodeError, event_type: &str) -> String {
    if written_by_a_newer_build(source) {
        format!("upgrade Triage, or skip this type explicitly (--skip-event-type {event_type})")
    } else {
        "the stored event is damaged (its type is one this Triage reads); restore the log from a backup. \
         It is not skipped: that would drop it from the read models for good"
            .to_owned()
    }
}

/// Whether a decode failure is a type or schema version this build does
/// not know, as a newer Triage writes, rather than damage.
fn written_by_a_newer_build(source: &triage_domain::DecodeError) -> bool {
    matches!(
        source,
        triage_domain::DecodeError::UnknownType { .. } | triage_domain::DecodeError::NewerVersion { .. }
    )
}

impl ProjectionError {
    /// Whether a database did not answer or lost its connection (the event
    /// store's, or the PostgreSQL read models'): a retry may well succeed,
    /// unlike after a damaged event or a missing table.
    pub fn is_unavailable(&self) -> bool {
        match self {
            ProjectionError::Store(error) => error.is_unavailable(),
            ProjectionError::PostgresConnect { .. } => true,
            ProjectionError::Postgres { source, .. } => postgres::is_connection_failure(source),
            _ => false,
        }
    }

    /// Whether this is an event of a type (or schema version) that this
    /// build does not know, which `--skip-event-type` may pass over; not
    /// a damaged one.
    pub fn written_by_a_newer_build(&self) -> bool {
        matches!(self, ProjectionError::Undecodable { source, .. } if written_by_a_newer_build(source))
    }
}

/// Why a projection could not do its work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// A stored event could not be decoded: an unknown type (written by a
    /// newer Triage) or a damaged payload. The projection stops here rather
    /// than skip it silently. Only the first kind may be skipped on
    /// request, so only it is told how.
    #[error(
        "stopped at position {position}: cannot apply {event_type:?} from {stream}: {source}; {}",
        undecodable_advice(source, event_type)
    )]
    Undecodable {
        /// Where.
        position: Position,
        /// Its stream.
        stream: String,
        /// Its type.
        event_type: String,
        /// Why.
        #[source]
        source: triage_domain::DecodeError,
    },
    /// A rebuild of several projections swapped some in, then failed on
    /// another: those are rebuilt and live; the one that failed and the
    /// ones after it keep their live models.
    #[error("rebuilt and swapped in: {}; the others keep their live models: {source}", rebuilt.join(", "))]
    PartlyRebuilt {
        /// The projections rebuilt and swapped in.
        rebuilt: Vec<String>,
        /// What stopped the rest.
        #[source]
        source: Box<ProjectionError>,
    },
    /// No projection has that name.
    #[error("no projection named {name:?}; known: {}", known.join(", "))]
    UnknownProjection {
        /// The name asked for.
        name: String,
        /// The known names.
        known: Vec<String>,
    },
    /// The live tables were built by another version of the projection
    /// than this build's: their columns or meaning may differ, so this
    /// instance does not write to them. A newer model needs a newer Triage
    /// (a rebuild by this one refuses to replace it unless told to); an
    /// older one is rebuilt by the next catch-up of this one.
    #[error(
        "projection {name}: the live model was built by version {live} of the projection, this Triage has version {code}; it leaves the model alone ({})",
        if live > code {
            "upgrade this instance to serve it; `triage projections rebuild --replace-newer` would replace it with \
             this version's model, which the newer instances sharing it could then not serve"
        } else {
            "its next catch-up rebuilds it"
        }
    )]
    OtherVersion {
        /// The projection.
        name: String,
        /// The version of the live tables.
        live: u32,
        /// This build's version.
        code: u32,
    },
    /// The projection has no live tables yet.
    #[error("projection {name} has not been built yet")]
    NotBuilt {
        /// The projection.
        name: String,
    },
    /// The read-model file is not one Triage can use; it was left unchanged.
    #[error("{} cannot be used as a read-model file: {reason}; the file was left unchanged", path.display())]
    Incompatible {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The read models hold an event log's work, but the event store is
    /// empty: deleted or emptied, or the wrong one named. Rebuilding them
    /// from it would wipe the last copy of the tickets' state without a
    /// word, and a server would go on writing a new log beside them.
    /// Nothing was changed.
    #[error(
        "the read models in {models} were built from an event log ({applied} events applied), but the event \
         store is empty: was it deleted, or is this the wrong store? Nothing was changed. To start afresh on an \
         empty store, {remedy}"
    )]
    EmptyLog {
        /// Where the read models are.
        models: String,
        /// Events the live model had applied.
        applied: u64,
        /// How to start afresh.
        remedy: String,
    },
    /// The rebuild was cancelled; the live model is untouched.
    #[error("cancelled; the live read model is untouched")]
    Cancelled,
    /// The event store failed.
    #[error(transparent)]
    Store(#[from] triage_event_store::Error),
    /// The read-model database failed.
    #[error("read-model database error while trying to {action}: {source}{}", damage_hint(.source))]
    Sqlite {
        /// What was being done.
        action: &'static str,
        /// The driver's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The PostgreSQL read-model database failed.
    #[error("PostgreSQL read-model error while trying to {action}: {}", postgres::describe_error(.source))]
    Postgres {
        /// What was being done.
        action: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// No connection to the PostgreSQL read models could be had.
    #[error("cannot get a connection to the PostgreSQL read models ({target}): {reason}")]
    PostgresConnect {
        /// Where, without the password.
        target: String,
        /// Why.
        reason: String,
    },
    /// The read-model location (a path or a `postgres://` URL) or its
    /// options cannot be used.
    #[error("invalid read-model location: {reason}")]
    InvalidLocation {
        /// Why (never contains a password).
        reason: String,
    },
    /// The PostgreSQL read models belong to a role this session's role may
    /// not act as: a rebuild could not replace the owner's views.
    #[error(
        "the read models in schema {schema} belong to the role {owner}, which this role may not act as (SET ROLE \
         is refused): run the rebuild as {owner}, or as a member of it; nothing was changed"
    )]
    NotOwner {
        /// The read models' schema.
        schema: String,
        /// The role that owns them.
        owner: String,
    },
    /// Another process is rebuilding this projection right now.
    #[error("another process is rebuilding {name} right now; try again when it has finished")]
    RebuildInProgress {
        /// The projection.
        name: String,
    },
    /// A task failed unexpectedly.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What to do about a damaged read-model file, after its error.
fn damage_hint(error: &rusqlite::Error) -> &'static str {
    match error {
        rusqlite::Error::SqliteFailure(failure, _)
            if matches!(
                failure.code,
                rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase
            ) =>
        {
            "; the read-model file is damaged: it holds only what the event log says, so move it (with its -wal \
             and -shm files) aside, and the next command rebuilds it from the log"
        }
        rusqlite::Error::SqliteFailure(failure, _) if failure.code == rusqlite::ErrorCode::ReadOnly => {
            "; this user may not write the read-model file (or its -wal and -shm files, or their directory), which \
             commands that read tickets or statistics keep up to date: run as its owner, or use the commands that \
             read the event log alone (events, stats --since/--until, replay), or name a read-model file this \
             user may write with --read-model"
        }
        _ => "",
    }
}

impl ProjectionError {
    pub(crate) fn sqlite(action: &'static str, source: rusqlite::Error) -> Self {
        ProjectionError::Sqlite { action, source }
    }

    pub(crate) fn postgres(action: &'static str, source: tokio_postgres::Error) -> Self {
        ProjectionError::Postgres { action, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write refused because the file is read-only for this user says
    /// so and what to do (it was only "attempt to write a readonly
    /// database").
    #[test]
    fn a_read_only_read_model_file_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("models.db");
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let read_only =
            rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let error = read_only.execute("INSERT INTO t VALUES (1)", []).unwrap_err();
        let message = ProjectionError::sqlite("write a ticket row", error).to_string();
        assert!(message.contains("may not write the read-model file"), "{message}");
        assert!(message.contains("--read-model"), "{message}");
    }
}
