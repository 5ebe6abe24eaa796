//! Read models in PostgreSQL (`postgres://…`), and projection leadership,
//! for running several Triage processes against one database.
//!
//! [`PgReadModels`] holds the `tickets` and `stats` models in a PostgreSQL
//! schema and answers the queries; [`PgProjector`] keeps them up to date
//! from an event store (any backend), rebuilds them and reports their
//! status.
//!
//! # Main decisions
//! - **The same projections, folded by the same code.** A batch is folded
//!   in memory by [`TicketRow`]'s and the statistics' own folding (the code
//!   the SQLite read models run), and only the rows it produces are written
//!   here. The tables have the SQLite tables' columns (times as `bigint`
//!   microseconds), so a row means the same in both, and the projection
//!   versions are the SQLite projections' versions: a change to the
//!   folding bumps both and triggers a rebuild in both.
//! - **One transaction per batch** writes the rows and the checkpoint row.
//!   The checkpoint row is read `FOR UPDATE` first, inside the transaction,
//!   and the batch skips what it already holds: a batch is applied exactly
//!   once, also when it races a swap or a second writer.
//! - **Leadership is a session advisory lock, and the leader writes through
//!   that very session.** A runner takes
//!   `pg_try_advisory_lock(<class>, hashtext('<schema>/<projection>/live'))`
//!   on a dedicated connection (not a pooled one) and then runs every batch
//!   transaction of that projection on the same connection. The server
//!   releases the lock when the session ends (a killed process, a cut
//!   network), and a session that has ended cannot commit: a runner that
//!   lost the lock cannot write any more, so no fencing token is needed.
//!   Followers try again every [`PgReadModelOptions::retry_interval`]
//!   (500 ms), so one takes over within that interval of the server
//!   noticing the dead session (at once for a killed process; for a dead
//!   host, after the server's TCP keepalive gives up).
//! - **Generations, as in SQLite.** Tables are named `<table>_g<N>`; the
//!   registry (`triage_read_models`) has a `live` and possibly a `build` row
//!   per projection, and views named `<table>` point at the live
//!   generation. A rebuild holds a second lock (`…/build`) and runs beside
//!   the live leader; the swap locks both registry rows, so it waits for a
//!   batch in flight, and PostgreSQL's DDL is transactional, so the swap
//!   (drop the old generation, repoint the views) is atomic.
//! - **Queries read the views** in one statement, or in one transaction
//!   that starts by locking the view: a statement holds its lock on the
//!   view, so a swap waits for the query instead of dropping its table
//!   under it.
//!
//! # Layout
//! - this module: [`PgReadModels`] (connect, migrate, queries) and
//!   [`PgReadModelOptions`];
//! - `models`: the tables, batch writes and digests of `tickets` and
//!   `stats`;
//! - `runtime`: [`PgProjector`] and the leadership session.
//!
//! Dependencies: `tokio-postgres` and `deadpool-postgres`, as in the
//! PostgreSQL event store (not sqlx: its `libsqlite3-sys` clashes with the
//! bundled one of `rusqlite`).

mod models;
mod runtime;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Client, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::Config;
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use triage_domain::{Role, State, TicketId, queue_states};
use triage_event_store::Position;
use triage_store_postgres::tls::{PgTls, PgUrl};
use uuid::Uuid;

use crate::ProjectionError;
use crate::db::{Slot, SlotKind};
use crate::stats::StatsSummary;
use crate::tickets::{ListCursor, TicketRow};

pub(crate) use models::Model;
pub use runtime::PgProjector;

/// Longest accepted schema name, in bytes (PostgreSQL identifiers have at
/// most 63, and table names add a suffix).
pub const MAX_SCHEMA_BYTES: usize = 48;

/// The newest registry schema this build knows.
const LATEST_VERSION: i32 = 1;

/// First key of the migration lock, "TRRM" in ASCII (the event store's are
/// "TRIA" and "TRIM"); the second is the hash of the schema name.
const MIGRATION_LOCK_CLASS: i32 = 0x5452_524D;
/// First key of the leadership locks, "TRRL"; the second is the hash of
/// `<schema>/<projection>/<live|build>`.
pub(crate) const LEADER_LOCK_CLASS: i32 = 0x5452_524C;
/// First key of the transaction-scoped lock that serializes creating and
/// swapping a projection's live generation, "TRRS".
pub(crate) const REGISTRY_LOCK_CLASS: i32 = 0x5452_5253;

/// How PostgreSQL read models are opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgReadModelOptions {
    /// The PostgreSQL schema of the read models (default `public`). Their
    /// tables are `triage_read_*`, `tickets_g<N>`, `stats_*_g<N>` and the
    /// views `tickets`, `stats_*`, so they can share a schema with the
    /// event store (`triage_events`, `triage_schema`). Lowercase ASCII
    /// letters, digits and `_`, not starting with a digit, not `pg_…` or
    /// `information_schema`.
    pub schema: String,
    /// Most pooled connections for queries (default 4). Each running
    /// projector opens one more, outside the pool, for its leadership.
    pub pool_size: usize,
    /// How long connecting may take (default 10 s).
    pub connect_timeout: Duration,
    /// How often a follower tries to take the leadership over, and how often
    /// a leader looks for new events when no notification woke it
    /// (default 500 ms).
    pub retry_interval: Duration,
}

impl Default for PgReadModelOptions {
    fn default() -> Self {
        PgReadModelOptions {
            schema: "public".to_owned(),
            pool_size: 4,
            connect_timeout: Duration::from_secs(10),
            retry_interval: Duration::from_millis(500),
        }
    }
}

impl PgReadModelOptions {
    /// The default options with the read models in `schema`.
    pub fn in_schema(schema: impl Into<String>) -> Self {
        PgReadModelOptions {
            schema: schema.into(),
            ..Self::default()
        }
    }

    /// Only plain lowercase names: they mean the same quoted and unquoted
    /// and never need escaping in SQL.
    fn validate(&self) -> Result<(), ProjectionError> {
        triage_event_store::url::check_pg_schema_name(&self.schema, MAX_SCHEMA_BYTES)
            .map_err(|reason| ProjectionError::InvalidLocation { reason })?;
        Ok(())
    }
}

/// The read models in one PostgreSQL schema: a pool for queries, and what
/// the runtime needs to open leadership sessions. Cheap to clone.
#[derive(Clone)]
pub struct PgReadModels {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    /// How every connection is secured: the URL's `sslmode`.
    tls: PgTls,
    options: PgReadModelOptions,
    pool: Pool,
    /// Drop the schema with the last clone (tests).
    temporary: bool,
}

impl fmt::Debug for PgReadModels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgReadModels")
            .field("target", &self.describe())
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl PgReadModels {
    /// Connects to `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`)
    /// and opens the read models in `options.schema`, creating the schema
    /// and the registry if needed. Read models from a newer Triage are
    /// refused and left unchanged.
    pub async fn connect(url: &str, options: PgReadModelOptions) -> Result<Self, ProjectionError> {
        options.validate()?;
        Self::open(parse_url(url)?, options, false).await
    }

    /// Opens fresh, empty read models in a new schema named
    /// `triage_rm_tmp_<random>` (replacing `options.schema`), dropped with
    /// the last clone. For tests that share one database.
    pub async fn connect_temporary(url: &str, options: PgReadModelOptions) -> Result<Self, ProjectionError> {
        let schema = format!("triage_rm_tmp_{}", &Uuid::new_v4().simple().to_string()[..16]);
        let options = PgReadModelOptions { schema, ..options };
        options.validate()?;
        Self::open(parse_url(url)?, options, true).await
    }

    async fn open(url: PgUrl, options: PgReadModelOptions, temporary: bool) -> Result<Self, ProjectionError> {
        let PgUrl { mut config, tls } = url;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("triage-read-models");
        }
        read_committed(&mut config);
        let mut server = PgUrl { config, tls };
        if let Err(error) = triage_store_postgres::tls::settle_prefer(&mut server).await {
            return Err(connect_failed(describe(&server.config, &options.schema), &error));
        }
        let PgUrl { config, tls } = server;
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.connect_timeout))
            .create_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|error| ProjectionError::PostgresConnect {
                target: describe(&config, &options.schema),
                reason: error.to_string(),
            })?;
        let models = PgReadModels {
            inner: Arc::new(Inner {
                config,
                tls,
                options,
                pool,
                temporary,
            }),
        };
        let mut client = models.client().await?;
        migrate(&mut client, models.schema()).await?;
        drop(client);
        Model::add_missing_list_indexes(&models).await;
        Ok(models)
    }

    /// Whether this connection's role may write the read models: update
    /// their registry, in a database that takes writes. A role that may
    /// only read them (an analyst's, or any role on a standby) reads what
    /// the leaders applied instead of applying.
    pub(crate) async fn may_write(&self) -> Result<bool, ProjectionError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT has_table_privilege(format('%I.triage_read_models', $1::text), 'UPDATE') \
                 AND current_setting('transaction_read_only') = 'off'",
                &[&self.schema()],
            )
            .await
            .map_err(|error| ProjectionError::postgres("look up the role's privileges", error))?;
        Ok(row.get(0))
    }

    /// The PostgreSQL schema of the read models.
    pub fn schema(&self) -> &str {
        &self.inner.options.schema
    }

    /// The options they were opened with.
    pub fn options(&self) -> &PgReadModelOptions {
        &self.inner.options
    }

    /// `postgres://user@host:port/database (schema s)`, never with the
    /// password.
    pub fn describe(&self) -> String {
        describe(&self.inner.config, self.schema())
    }

    pub(crate) fn config(&self) -> &Config {
        &self.inner.config
    }

    /// How the read models' connections are secured.
    pub(crate) fn tls(&self) -> &PgTls {
        &self.inner.tls
    }

    pub(crate) async fn client(&self) -> Result<Client, ProjectionError> {
        self.inner.pool.get().await.map_err(|error| match error {
            deadpool_postgres::PoolError::Backend(error) => connect_failed(self.describe(), &error),
            other => ProjectionError::PostgresConnect {
                target: self.describe(),
                reason: other.to_string(),
            },
        })
    }

    /// `"<schema>".<name>`.
    pub(crate) fn qualified(&self, name: &str) -> String {
        format!(r#""{}".{name}"#, self.schema())
    }

    /// The table `base` of `generation`, qualified: `"<schema>".<base>_g<n>`.
    /// The live model is a view of the same name without the suffix.
    pub(crate) fn generation_table(&self, base: &str, generation: u32) -> String {
        self.qualified(&format!("{base}_g{generation}"))
    }

    /// One ticket, from the live `tickets` model.
    pub async fn ticket(&self, id: TicketId) -> Result<Option<TicketRow>, ProjectionError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {} FROM {} WHERE ticket_id = $1",
            models::TICKET_COLUMNS,
            self.qualified("tickets")
        );
        let rows = client
            .query(&sql, &[&id.0])
            .await
            .map_err(|error| not_built_or("tickets", "read a ticket", error))?;
        rows.first().map(models::ticket_from_row).transpose()
    }

    /// Tickets in `state` (all states when `None`), oldest in that state
    /// first (all: oldest first), as [`crate::TicketsView::list`].
    pub async fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<TicketRow>, ProjectionError> {
        self.list_after(state, None, limit).await
    }

    /// [`PgReadModels::list`] from just after `after`, the cursor of the
    /// last row of the page before, as [`crate::TicketsView::list_after`]
    /// (the same order: a `uuid` compares as its lower-case text does).
    ///
    /// # Panics
    ///
    /// When `after` is a cursor of another list; see
    /// [`crate::ListCursor::check_list`].
    pub async fn list_after(
        &self,
        state: Option<State>,
        after: Option<&ListCursor>,
        limit: usize,
    ) -> Result<Vec<TicketRow>, ProjectionError> {
        assert!(
            after.is_none_or(|cursor| cursor.state == state),
            "a cursor of another list"
        );
        // Before every row, without a cursor: no time is i64::MIN, and the
        // nil uuid is the lowest.
        let (at, id) = after.map_or((i64::MIN, Uuid::nil()), |cursor| (cursor.at, cursor.ticket_id.0));
        let client = self.client().await?;
        let limit = limit.min(i64::MAX as usize) as i64;
        let table = self.qualified("tickets");
        let columns = models::TICKET_COLUMNS;
        let rows = match state {
            Some(state) => client
                .query(
                    &format!(
                        "SELECT {columns} FROM {table} WHERE state = $1 AND (state_entered_at, ticket_id) > ($2, $3) \
                             ORDER BY state_entered_at, ticket_id LIMIT $4"
                    ),
                    &[&state.as_str(), &at, &id, &limit],
                )
                .await,
            None => {
                client
                    .query(
                        &format!(
                            "SELECT {columns} FROM {table} WHERE (created_at, ticket_id) > ($1, $2) \
                             ORDER BY created_at, ticket_id LIMIT $3"
                        ),
                        &[&at, &id, &limit],
                    )
                    .await
            }
        }
        .map_err(|error| not_built_or("tickets", "list tickets", error))?;
        rows.iter().map(models::ticket_from_row).collect()
    }

    /// The ticket that holds `claim_id` now, if one does, as
    /// [`crate::TicketsView::holder_of_claim`].
    pub async fn holder_of_claim(&self, claim_id: Uuid) -> Result<Option<TicketId>, ProjectionError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT ticket_id FROM {} WHERE claim_id = $1",
                    self.qualified("tickets")
                ),
                &[&claim_id],
            )
            .await
            .map_err(|error| not_built_or("tickets", "look up a claim", error))?;
        Ok(row.map(|row| TicketId(row.get(0))))
    }

    /// Claims whose lease ran out by `now`, soonest expired first: the
    /// lease sweeper's queue, as [`crate::TicketsView::expired_claims`].
    pub async fn expired_claims(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<TicketRow>, ProjectionError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {} FROM {} WHERE lease_expires_at IS NOT NULL AND lease_expires_at <= $1 \
                     ORDER BY lease_expires_at LIMIT $2",
                    models::TICKET_COLUMNS,
                    self.qualified("tickets")
                ),
                &[&now.timestamp_micros(), &(limit.min(i64::MAX as usize) as i64)],
            )
            .await
            .map_err(|error| not_built_or("tickets", "find expired claims", error))?;
        rows.iter().map(models::ticket_from_row).collect()
    }

    /// Whether the live `tickets` model can be read: one query that reads
    /// no row.
    pub async fn check_readable(&self) -> Result<(), ProjectionError> {
        let client = self.client().await?;
        client
            .query(&format!("SELECT 1 FROM {} LIMIT 0", self.qualified("tickets")), &[])
            .await
            .map_err(|error| not_built_or("tickets", "read the tickets model", error))?;
        Ok(())
    }

    /// The work queue of `role`, oldest first, as
    /// [`crate::TicketsView::work_queue`].
    pub async fn work_queue(&self, role: Role, limit: usize) -> Result<Vec<TicketRow>, ProjectionError> {
        self.tickets_in(&queue_states(role), limit).await
    }

    async fn tickets_in(&self, states: &[State], limit: usize) -> Result<Vec<TicketRow>, ProjectionError> {
        let client = self.client().await?;
        let limit = limit.min(i64::MAX as usize) as i64;
        let states: Vec<&str> = states.iter().map(|state| state.as_str()).collect();
        let rows = client
            .query(
                &format!(
                    "SELECT {} FROM {} WHERE state = ANY($1) ORDER BY state_entered_at, ticket_id LIMIT $2",
                    models::TICKET_COLUMNS,
                    self.qualified("tickets")
                ),
                &[&states, &limit],
            )
            .await
            .map_err(|error| not_built_or("tickets", "list tickets", error))?;
        rows.iter().map(models::ticket_from_row).collect()
    }

    /// Tickets per state.
    pub async fn counts(&self) -> Result<BTreeMap<State, u64>, ProjectionError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT state, count(*) FROM {} GROUP BY state",
                    self.qualified("tickets")
                ),
                &[],
            )
            .await
            .map_err(|error| not_built_or("tickets", "count tickets", error))?;
        rows.iter()
            .map(|row| {
                let state: String = row.get(0);
                let state = state.parse().map_err(|reason: String| {
                    ProjectionError::Internal(format!("unreadable state in the tickets model: {reason}"))
                })?;
                Ok((state, row.get::<_, i64>(1) as u64))
            })
            .collect()
    }

    /// Everything the live `stats` model knows, as [`crate::stats::summary`].
    pub async fn stats_summary(&self) -> Result<StatsSummary, ProjectionError> {
        let mut client = self.client().await?;
        models::stats_summary(&mut client, self).await
    }

    /// The digest of the live generation of `name` per key, for comparing
    /// models (see [`crate::Projection::digest`]).
    pub async fn digest(&self, name: &str) -> Result<BTreeMap<String, u64>, ProjectionError> {
        let model = Model::by_name(name)?;
        let mut client = self.client().await?;
        let client: &mut tokio_postgres::Client = &mut client;
        let tx = client
            .transaction()
            .await
            .map_err(|error| ProjectionError::postgres("begin", error))?;
        // FOR SHARE: a swap cannot drop the generation before the digest
        // is read.
        let slot = read_slot(&tx, self, model.name(), SlotKind::Live, "FOR SHARE")
            .await?
            .ok_or_else(|| ProjectionError::NotBuilt { name: name.to_owned() })?;
        let digest = model.digest(&tx, self, slot.generation).await?;
        tx.commit()
            .await
            .map_err(|error| ProjectionError::postgres("end a read", error))?;
        Ok(digest)
    }

    /// The registry row of `name` in `kind`'s slot.
    pub(crate) async fn slot(&self, name: &str, kind: SlotKind) -> Result<Option<Slot>, ProjectionError> {
        let client = self.client().await?;
        read_slot(&**client, self, name, kind, "").await
    }

    /// The id of the first event of the log the read models were built
    /// from, if recorded (see the SQLite read models' `log_identity`).
    pub(crate) async fn log_identity(&self) -> Result<Option<Uuid>, ProjectionError> {
        let client = self.client().await?;
        client
            .query_opt(
                &format!("SELECT first_event_id FROM {}", self.qualified("triage_read_log")),
                &[],
            )
            .await
            .map(|row| row.map(|row| row.get(0)))
            .map_err(|error| ProjectionError::postgres("read the log identity", error))
    }

    /// Records the id of the log's first event as the log the read models
    /// describe.
    pub(crate) async fn record_log(&self, first_event_id: Uuid) -> Result<(), ProjectionError> {
        let client = self.client().await?;
        client
            .execute(
                &format!(
                    "INSERT INTO {} (first_event_id) VALUES ($1) \
                     ON CONFLICT (only_row) DO UPDATE SET first_event_id = EXCLUDED.first_event_id",
                    self.qualified("triage_read_log")
                ),
                &[&first_event_id],
            )
            .await
            .map(|_| ())
            .map_err(|error| ProjectionError::postgres("record the log identity", error))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.temporary {
            return;
        }
        self.pool.close();
        // Drop cannot await, and the runtime may be shutting down: drop the
        // schema from a thread with a runtime of its own.
        let config = self.config.clone();
        let tls = self.tls.clone();
        let schema = self.options.schema.clone();
        let cleanup = std::thread::Builder::new()
            .name("triage-rm-cleanup".to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(async {
                    let (client, connection) = config.connect(tls).await.map_err(std::io::Error::other)?;
                    let driver = tokio::spawn(connection);
                    let result = client
                        .batch_execute(&format!(r#"DROP SCHEMA IF EXISTS "{schema}" CASCADE"#))
                        .await;
                    drop(client);
                    let _ = driver.await;
                    result.map_err(std::io::Error::other)
                })
            });
        match cleanup.map(|thread| thread.join()) {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => {
                tracing::warn!(schema = %self.options.schema, %error, "cannot drop a temporary schema")
            }
            Ok(Err(_)) => tracing::warn!(schema = %self.options.schema, "dropping a temporary schema panicked"),
            Err(error) => tracing::warn!(%error, "cannot start the thread that drops a temporary schema"),
        }
    }
}

/// Where a database is, for messages: never with the password.
pub(crate) fn describe(config: &Config, schema: &str) -> String {
    let user = config.get_user().unwrap_or("");
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(index, host)| {
            let port = ports.get(index).or(ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]:{port}"),
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    let database = config.get_dbname().unwrap_or(user);
    format!("postgres://{user}@{}/{database} (schema {schema})", hosts.join(","))
}

/// A failed connection to `target`: a refused certificate (the server's,
/// or this client's) is a setup problem that retrying does not fix (an
/// invalid location, not an unavailable server); anything else is reported
/// as unavailable.
pub(crate) fn connect_failed(target: String, error: &tokio_postgres::Error) -> ProjectionError {
    match triage_store_postgres::tls::refused_certificate(error) {
        Some(refusal) => ProjectionError::InvalidLocation {
            reason: format!("{target}: {refusal}"),
        },
        None => ProjectionError::PostgresConnect {
            target,
            reason: describe_error(error),
        },
    }
}

/// The driver's error with the server's message and code, which its own
/// `Display` leaves out ("db error").
pub(crate) fn describe_error(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    // The driver's own text is only the kind ("error performing TLS
    // handshake"); what went wrong is in its sources.
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Whether `error` is a lost or refused connection, or a server shutting
/// down, rather than a failure of the statement itself.
pub(crate) fn is_connection_failure(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    match error.code() {
        // No SQLSTATE: the socket failed (an I/O error underneath), or the
        // client did (a value of the wrong type: a bug, not an outage).
        None => std::error::Error::source(error).is_some_and(|source| source.is::<std::io::Error>()),
        Some(code) => [
            SqlState::CONNECTION_EXCEPTION,
            SqlState::CONNECTION_DOES_NOT_EXIST,
            SqlState::CONNECTION_FAILURE,
            SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
        ]
        .contains(code),
    }
}

/// A missing view means the projection has not been built yet.
fn not_built_or(name: &str, action: &'static str, error: tokio_postgres::Error) -> ProjectionError {
    if error.code() == Some(&SqlState::UNDEFINED_TABLE) {
        ProjectionError::NotBuilt { name: name.to_owned() }
    } else {
        ProjectionError::postgres(action, error)
    }
}

fn parse_url(url: &str) -> Result<PgUrl, ProjectionError> {
    // The message names the bad part, never the URL, so the password
    // cannot leak through it.
    triage_store_postgres::tls::parse_url(url).map_err(|reason| ProjectionError::InvalidLocation { reason })
}

impl SlotKind {
    /// The registry's `slot` column.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SlotKind::Live => "live",
            SlotKind::Build => "build",
        }
    }
}

pub(crate) fn position(commit: Option<i64>, prepare: Option<i64>) -> Option<Position> {
    Some(Position {
        commit: commit? as u64,
        prepare: prepare? as u64,
    })
}

/// Reads a registry row; `lock` is `""`, `FOR SHARE` or `FOR UPDATE`.
pub(crate) async fn read_slot(
    client: &impl tokio_postgres::GenericClient,
    models: &PgReadModels,
    name: &str,
    kind: SlotKind,
    lock: &str,
) -> Result<Option<Slot>, ProjectionError> {
    // Typed parameters: parsed, bound and run in one round trip, which
    // counts for a rebuild that reads the registry for every page.
    let row = client
        .query_typed_opt(
            &format!(
                "SELECT version, generation, checkpoint_commit, checkpoint_prepare, events_applied \
                 FROM {} WHERE name = $1 AND slot = $2 {lock}",
                models.qualified("triage_read_models")
            ),
            &[(&name, Type::TEXT), (&kind.as_str(), Type::TEXT)],
        )
        .await
        .map_err(|error| ProjectionError::postgres("read the registry", error))?;
    Ok(row.map(|row| Slot {
        name: name.to_owned(),
        version: row.get::<_, i32>(0) as u32,
        generation: row.get::<_, i32>(1) as u32,
        checkpoint: position(row.get(2), row.get(3)),
        events_applied: row.get::<_, i64>(4) as u64,
    }))
}

/// Creates the schema and the registry, or checks their version, in one
/// transaction under a lock on the schema: two processes starting at once
/// take turns, and the second finds the work done.
async fn migrate(client: &mut Client, schema: &str) -> Result<(), ProjectionError> {
    let failed = |action| move |error| ProjectionError::postgres(action, error);
    let tx = client.transaction().await.map_err(failed("begin the migration"))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&MIGRATION_LOCK_CLASS, &schema],
    )
    .await
    .map_err(failed("take the migration lock"))?;
    let exists: bool = tx
        .query_one(
            "SELECT to_regclass(format('%I.triage_read_schema', $1::text)) IS NOT NULL",
            &[&schema],
        )
        .await
        .map_err(failed("inspect the schema"))?
        .get(0);
    if exists {
        let version: i32 = tx
            .query_one(
                &format!(r#"SELECT max(version) FROM "{schema}".triage_read_schema"#),
                &[],
            )
            .await
            .map_err(failed("read the read-model schema version"))?
            .get::<_, Option<i32>>(0)
            .unwrap_or(0);
        if version > LATEST_VERSION {
            return Err(ProjectionError::InvalidLocation {
                reason: format!(
                    "the read models in schema {schema} were written by a newer Triage (read-model schema \
                     {version}, this build reads up to {LATEST_VERSION}); they were left unchanged"
                ),
            });
        }
    } else {
        tx.batch_execute(&format!(
            r#"CREATE SCHEMA IF NOT EXISTS "{schema}";
            CREATE TABLE "{schema}".triage_read_schema (version integer NOT NULL);
            INSERT INTO "{schema}".triage_read_schema (version) VALUES ({LATEST_VERSION});
            CREATE TABLE "{schema}".triage_read_models (
                name               text    NOT NULL,
                slot               text    NOT NULL CHECK (slot IN ('live', 'build')),
                version            integer NOT NULL,
                generation         integer NOT NULL,
                checkpoint_commit  bigint,
                checkpoint_prepare bigint,
                events_applied     bigint  NOT NULL DEFAULT 0,
                last_error         text,
                -- The runner instance that last took the leadership or
                -- wrote a batch.
                leader             text,
                updated_at         timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (name, slot)
            );
            -- Generations only grow, so a new one never reuses the table
            -- names of a live or abandoned one.
            CREATE TABLE "{schema}".triage_read_generations (
                name text PRIMARY KEY,
                last integer NOT NULL
            );"#
        ))
        .await
        .map_err(failed("create the read-model registry"))?;
    }
    // Added after version 1 of the registry, and only added to: older
    // builds never read it, so the version stays. Looked up first: CREATE
    // TABLE IF NOT EXISTS needs the right to create in the schema even
    // when the table is there (a role that may only use the read models
    // failed here), and says so in a notice on every start.
    let log_table_exists: bool = tx
        .query_one(
            "SELECT to_regclass(format('%I.triage_read_log', $1::text)) IS NOT NULL",
            &[&schema],
        )
        .await
        .map_err(failed("inspect the schema"))?
        .get(0);
    if !log_table_exists {
        // Made by the registry's owner, whoever opens the models first
        // (an administrator's `projections status`, say): as any other
        // role, the owner's servers could no longer read it.
        let _ = as_the_owner(&tx, schema).await?;
        tx.batch_execute(&format!(
            r#"CREATE TABLE IF NOT EXISTS "{schema}".triage_read_log (
                only_row       boolean PRIMARY KEY DEFAULT true CHECK (only_row),
                first_event_id uuid    NOT NULL
            );"#
        ))
        .await
        .map_err(failed("create the log identity table"))?;
    }
    tx.commit().await.map_err(failed("commit the migration"))
}

/// Makes the rest of `tx`, which creates or drops tables and views of the
/// read models in `schema`, act as the role that owns them (the owner of
/// their registry, who set them up), when the session's role is another
/// one that may (a member of it with the right to SET it, or a
/// superuser). Tables an administrator's `projections rebuild` made would
/// otherwise belong to the administrator, and the servers running as the
/// owner could no longer read or write them. A role that may not act as
/// the owner goes on as itself, warned: what it makes is its own. Tried
/// in a savepoint, so that a refused `SET ROLE` (PostgreSQL 16 can make a
/// member without the right to SET the role) leaves `tx` usable. Answers
/// the owner this role could not act as, if so.
pub(crate) async fn as_the_owner(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
) -> Result<Option<String>, ProjectionError> {
    let row = tx
        .query_opt(
            "SELECT r.rolname::text, r.rolname = current_user \
             FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner \
             WHERE c.oid = to_regclass(format('%I.triage_read_models', $1::text))",
            &[&schema],
        )
        .await
        .map_err(|error| ProjectionError::postgres("look up the owner of the read models", error))?;
    let Some(row) = row else { return Ok(None) };
    let (owner, is_owner): (String, bool) = (row.get(0), row.get(1));
    if is_owner {
        return Ok(None);
    }
    let set_role = format!(
        r#"SAVEPOINT triage_as_owner; SET LOCAL ROLE "{}"; RELEASE SAVEPOINT triage_as_owner"#,
        owner.replace('"', r#""""#)
    );
    if let Err(error) = tx.batch_execute(&set_role).await {
        tx.batch_execute("ROLLBACK TO SAVEPOINT triage_as_owner; RELEASE SAVEPOINT triage_as_owner")
            .await
            .map_err(|error| ProjectionError::postgres("go on after a refused SET ROLE", error))?;
        tracing::warn!(
            schema,
            owner = %owner,
            error = %describe_error(&error),
            "the read models belong to another role, which this one may not act as: the tables it makes are its \
             own, and the owner's processes may not reach them; run this as the owner or a member of it"
        );
        return Ok(Some(owner));
    }
    Ok(None)
}

/// Makes every session start its transactions READ COMMITTED, whatever the
/// database's or role's default, as the event store does: batches and
/// swaps lock their checkpoint rows and then read, and are written for
/// READ COMMITTED, where a read after a lock sees what committed before it.
/// Added after any options of the URL, so that it wins over a setting
/// there too.
fn read_committed(config: &mut Config) {
    add_server_settings(config, r"-c default_transaction_isolation=read\ committed");
}

/// Appends `settings` (`-c name=value` pairs) to the options sent to the
/// server, after the URL's own.
pub(crate) fn add_server_settings(config: &mut Config, settings: &str) {
    let options = config.get_options().filter(|options| !options.trim().is_empty());
    config.options(options.map_or_else(|| settings.to_owned(), |options| format!("{options} {settings}")));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_validated() {
        for good in ["public", "triage", "_x", "triage_rm_tmp_0123456789abcdef"] {
            assert!(PgReadModelOptions::in_schema(good).validate().is_ok(), "{good}");
        }
        let too_long = "a".repeat(MAX_SCHEMA_BYTES + 1);
        for bad in ["", "Public", "1abc", "a-b", "a\"b", "pg_catalog", too_long.as_str()] {
            assert!(
                matches!(
                    PgReadModelOptions::in_schema(bad).validate(),
                    Err(ProjectionError::InvalidLocation { .. })
                ),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn urls_are_described_without_their_password() {
        let url = parse_url("postgres://ada:secret@db.example:6543/triage").unwrap();
        let text = describe(&url.config, "rm");
        assert_eq!(text, "postgres://ada@db.example:6543/triage (schema rm)");
        let error = parse_url("postgres://ada:secret@db.example:notaport/triage").unwrap_err();
        assert!(!error.to_string().contains("secret"), "{error}");
    }
}
