//! [`ReadModels`]: the read models wherever they live, SQLite or
//! PostgreSQL, chosen by location, with the queries the CLI serves.
//!
//! One enum rather than a trait object: there are two backends, and the
//! SQLite one keeps its richer API ([`Projector`] with custom projections
//! and SQL access) for callers that want it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use chrono::{DateTime, Utc};
use triage_domain::{Role, State, TicketId};
use triage_event_store::{EventStore, Position};
use uuid::Uuid;

use crate::postgres::{PgProjector, PgReadModelOptions, PgReadModels};
use crate::stats::{self, StatsSummary};
use crate::{
    ListCursor, ProjectionError, ProjectionStatus, Projector, ProjectorOptions, ReadModelDb, RebuildOptions,
    RebuildReport, TicketRow, TicketsView,
};

/// The read models of one event store, in SQLite or in PostgreSQL.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ReadModels {
    /// In a SQLite file (or in memory).
    Sqlite(Projector),
    /// In a PostgreSQL schema, with projection leadership.
    Postgres(PgProjector),
}

impl From<Projector> for ReadModels {
    fn from(projector: Projector) -> Self {
        ReadModels::Sqlite(projector)
    }
}

impl From<PgProjector> for ReadModels {
    fn from(projector: PgProjector) -> Self {
        ReadModels::Postgres(projector)
    }
}

/// The schema query parameter of a read-model URL: `postgres://…?schema=NAME`.
const SCHEMA_PARAMETER: &str = "schema";

/// The path of a SQLite read-model location: a plain path, or
/// `sqlite://PATH`. Any other URL, or one with a slip (`postgres:db`),
/// is refused rather than taken for a file name and made in silence.
pub fn sqlite_path(location: &str) -> Result<&str, ProjectionError> {
    let invalid = |reason: String| ProjectionError::InvalidLocation { reason };
    if let Some(path) = location.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(invalid(format!(
                "{location:?} names no file; use sqlite://PATH or a path"
            )));
        }
        return Ok(path);
    }
    if let Some((scheme, _)) = location.split_once("://") {
        return Err(invalid(format!(
            "read models live in a SQLite file (a path, or sqlite://PATH) or in PostgreSQL (postgres://…), \
             not at a {scheme}:// URL"
        )));
    }
    match triage_event_store::url::url_slip(location, &["sqlite", "postgresql", "postgres"]) {
        Some(slip) => Err(invalid(slip)),
        None => Ok(location),
    }
}

impl ReadModels {
    /// Opens the read models at `location` for `events`:
    /// - `postgres://…` or `postgresql://…`: PostgreSQL, in the schema given
    ///   by an optional `schema=NAME` query parameter (default `public`);
    ///   the other parameters are the driver's;
    /// - anything else: a SQLite read-model file at that path (see
    ///   [`ReadModelDb::open`]).
    pub async fn open(
        location: &str,
        events: Arc<dyn EventStore>,
        options: ProjectorOptions,
    ) -> Result<ReadModels, ProjectionError> {
        if location.starts_with("postgres://") || location.starts_with("postgresql://") {
            let (url, schema) =
                triage_event_store::url::take_query_parameter(location, SCHEMA_PARAMETER).map_err(|error| {
                    ProjectionError::InvalidLocation {
                        reason: error.to_string(),
                    }
                })?;
            let pg_options = schema.map_or_else(PgReadModelOptions::default, PgReadModelOptions::in_schema);
            let models = PgReadModels::connect(&url, pg_options).await?;
            Ok(ReadModels::Postgres(
                PgProjector::new(events, models).with_options(options),
            ))
        } else {
            let path = sqlite_path(location)?;
            let db = ReadModelDb::open(Path::new(path))?;
            Ok(ReadModels::Sqlite(Projector::new(events, db).with_options(options)))
        }
    }

    /// The names of the projections.
    pub fn projection_names(&self) -> Vec<&'static str> {
        match self {
            ReadModels::Sqlite(projector) => projector.projections().iter().map(|p| p.name()).collect(),
            ReadModels::Postgres(projector) => projector.projection_names(),
        }
    }

    /// Brings the read models up to the head of the log (see
    /// [`Projector::catch_up`] and [`PgProjector::catch_up`]).
    pub async fn catch_up(&self) -> Result<Option<Position>, ProjectionError> {
        match self {
            ReadModels::Sqlite(projector) => projector.catch_up().await,
            ReadModels::Postgres(projector) => projector.catch_up().await,
        }
    }

    /// [`ReadModels::catch_up`] for a query of a process that also runs
    /// [`ReadModels::run_live`] (a server): SQLite applies what is missing
    /// itself; PostgreSQL waits (at most 5 s) for the projections' leaders
    /// to apply it (see [`PgProjector::wait_for_leaders`]) rather than open
    /// a leadership session per query.
    pub async fn catch_up_while_live(&self) -> Result<Option<Position>, ProjectionError> {
        match self {
            ReadModels::Sqlite(projector) => projector.catch_up().await,
            ReadModels::Postgres(projector) => projector.wait_for_leaders().await,
        }
    }

    /// Follows the log until `stop` is set. In PostgreSQL, only while this
    /// instance leads a projection does it apply it.
    pub async fn run_live(&self, stop: Arc<AtomicBool>) -> Result<(), ProjectionError> {
        match self {
            ReadModels::Sqlite(projector) => projector.run_live(stop).await,
            ReadModels::Postgres(projector) => projector.run_live(stop).await,
        }
    }

    /// Each projection's status.
    pub async fn status(&self) -> Result<Vec<ProjectionStatus>, ProjectionError> {
        match self {
            ReadModels::Sqlite(projector) => projector.status().await,
            ReadModels::Postgres(projector) => projector.status().await,
        }
    }

    /// Rebuilds projections into shadow generations and swaps them in.
    pub async fn rebuild_many(
        &self,
        names: &[&str],
        options: RebuildOptions,
    ) -> Result<Vec<RebuildReport>, ProjectionError> {
        match self {
            ReadModels::Sqlite(projector) => projector.rebuild_many(names, options).await,
            ReadModels::Postgres(projector) => projector.rebuild_many(names, options).await,
        }
    }

    /// One ticket.
    pub async fn ticket(&self, id: TicketId) -> Result<Option<TicketRow>, ProjectionError> {
        match self {
            ReadModels::Sqlite(projector) => {
                projector.read("tickets", |conn, slot| TicketsView::new(conn, slot).get(id))
            }
            ReadModels::Postgres(projector) => projector.models().ticket(id).await,
        }
    }

    /// Tickets in `state` (all when `None`), oldest first.
    pub async fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<TicketRow>, ProjectionError> {
        match self {
            ReadModels::Sqlite(projector) => {
                projector.read("tickets", |conn, slot| TicketsView::new(conn, slot).list(state, limit))
            }
            ReadModels::Postgres(projector) => projector.models().list(state, limit).await,
        }
    }

    /// [`ReadModels::list`] from just after `after`, the cursor of the last
    /// row of the page before (see [`TicketsView::list_after`]).
    ///
    /// # Panics
    ///
    /// When `after` is a cursor of another list; see
    /// [`ListCursor::check_list`].
    pub async fn list_after(
        &self,
        state: Option<State>,
        after: Option<&ListCursor>,
        limit: usize,
    ) -> Result<Vec<TicketRow>, ProjectionError> {
        match self {
            ReadModels::Sqlite(projector) => projector.read("tickets", |conn, slot| {
                TicketsView::new(conn, slot).list_after(state, after, limit)
            }),
            ReadModels::Postgres(projector) => projector.models().list_after(state, after, limit).await,
        }
    }

    /// The ticket that holds `claim_id` now, if one does.
    pub async fn holder_of_claim(&self, claim_id: Uuid) -> Result<Option<TicketId>, ProjectionError> {
        match self {
            ReadModels::Sqlite(projector) => projector.read("tickets", |conn, slot| {
                TicketsView::new(conn, slot).holder_of_claim(claim_id)
            }),
            ReadModels::Postgres(projector) => projector.models().holder_of_claim(claim_id).await,
        }
    }

    /// Claims whose lease ran out by `now`: the lease sweeper's queue.
    pub async fn expired_claims(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<TicketRow>, ProjectionError> {
        match self {
            ReadModels::Sqlite(projector) => projector.read("tickets", |conn, slot| {
                TicketsView::new(conn, slot).expired_claims(now, limit)
            }),
            ReadModels::Postgres(projector) => projector.models().expired_claims(now, limit).await,
        }
    }

    /// Whether the `tickets` model can be read (built, and its database
    /// answering): a readiness check.
    pub async fn check_readable(&self) -> Result<(), ProjectionError> {
        match self {
            ReadModels::Sqlite(projector) => projector.read("tickets", |_, _| Ok(())),
            ReadModels::Postgres(projector) => projector.models().check_readable().await,
        }
    }

    /// The work queue of `role`, oldest first.
    pub async fn work_queue(&self, role: Role, limit: usize) -> Result<Vec<TicketRow>, ProjectionError> {
        match self {
            ReadModels::Sqlite(projector) => projector.read("tickets", |conn, slot| {
                TicketsView::new(conn, slot).work_queue(role, limit)
            }),
            ReadModels::Postgres(projector) => projector.models().work_queue(role, limit).await,
        }
    }

    /// Tickets per state.
    pub async fn counts(&self) -> Result<BTreeMap<State, u64>, ProjectionError> {
        match self {
            ReadModels::Sqlite(projector) => {
                projector.read("tickets", |conn, slot| TicketsView::new(conn, slot).counts())
            }
            ReadModels::Postgres(projector) => projector.models().counts().await,
        }
    }

    /// The statistics.
    pub async fn stats_summary(&self) -> Result<StatsSummary, ProjectionError> {
        match self {
            ReadModels::Sqlite(projector) => projector.read("stats", stats::summary),
            ReadModels::Postgres(projector) => projector.models().stats_summary().await,
        }
    }
}
