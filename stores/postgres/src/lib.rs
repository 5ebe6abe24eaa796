//! The PostgreSQL backend of Triage's event store (`postgres://…`), for
//! production and for running several command handlers against one log.
//!
//! [`PostgresEventStore`] implements the port [`triage_event_store::EventStore`]
//! and passes its conformance suite.
//!
//! # Main decision: a transaction-id watermark keeps subscribers gap-free
//! Positions come from a `bigint` identity ([`Position::from_sequence`]),
//! and in PostgreSQL a sequence value is taken at insert time, not at
//! commit: a slow transaction can commit position 5 after position 6 is
//! already visible, and a reader that went on from 6 would skip 5 forever.
//! Every event therefore records the transaction id that wrote it (`tx_id`,
//! an `xid8`), and reads of `$all` stop below
//! `pg_snapshot_xmin(pg_current_snapshot())`: only transactions that have
//! finished are read. The `triage_append` function takes the transaction id
//! and the positions under one short advisory lock, which makes position
//! order and transaction-id order the same, so what lies below the
//! watermark is a gap-free prefix of the log (see `reader.rs` and
//! `schema.rs`). [`EventStore::read_all`], [`EventStore::head_position`]
//! and the subscriptions all obey it; stream reads do not need it.
//!
//! A read of `$all` waits (at most [`PostgresOptions::visibility_wait`])
//! until everything committed when it started is below the watermark, so a
//! caller reads its own appends even while other appends are in flight.
//! The price: xmin is cluster-wide, so a long writing transaction anywhere
//! on the cluster delays subscribers until it ends. A long page that lies
//! wholly below the visible head (a rebuild catching up) is read as two
//! halves at once on two pooled connections, and answered only when the
//! halves hold every position of the page; otherwise it is read in one
//! query (see `reader.rs`). When such a page is answered and the page the
//! reader will ask for next lies below the visible head too, that page is
//! read ahead in the background, and kept only if it holds every position
//! it covers (see `read_ahead.rs`).
//!
//! # Appends: group commit
//! Appends of concurrent callers are grouped into one call of
//! `triage_append`, one transaction (see `batcher.rs`): a batch costs one
//! round trip, one pass through the append lock and one WAL flush however
//! many appends it holds, and a lone append goes out at once. The function
//! checks each append's expected revision itself, under a lock on its
//! stream held until commit, and writes those that hold. An append that
//! does not hold, or a batch that failed, leaves the caller to read the
//! stream's last revision and where its ids are stored, decide with
//! [`plan_append`] (a conflict with the actual revision, the original
//! result of a retry, or a write after the new last revision for `Any` and
//! `StreamExists`), and write alone, checked at the revision it read. The
//! unique constraints `(stream, revision)` and `(event_id)` stay as the
//! last guard; a violation is recognised by its typed
//! [`SqlState::UNIQUE_VIOLATION`] and decided again. No append notifies in
//! its own transaction, because PostgreSQL serializes the commits of
//! notifying transactions, WAL flush included; the store announces its
//! appends after they commit instead (see `notify.rs`).
//!
//! # Subscriptions
//! [`Subscription::catch_up`] over the watermarked reads, woken by a watch
//! of the visible head. A dedicated connection LISTENs for the
//! notifications that stores send after their appends commit; a poll every
//! [`PostgresOptions::poll_interval`] is the fallback (see `notify.rs`).
//! Notifications only wake readers up; what is delivered always comes from
//! the watermarked reads, so a lost or late one costs latency only.
//!
//! # Schema and migrations
//! The tables (`triage_schema`, `triage_events`) and the append function
//! live in one PostgreSQL schema ([`PostgresOptions::schema`], default
//! `public`). On connect, versioned migrations run in one transaction under
//! a schema-level advisory lock; a store from a newer Triage is refused
//! with [`Error::Incompatible`] and left unchanged.
//!
//! # Tests
//! [`PostgresEventStore::connect_temporary`] puts each store in a fresh
//! schema named `triage_tmp_<random>`, dropped with the store, so tests
//! share one database without seeing each other. Every test reads the
//! server from `TRIAGE_PG_URL` and is skipped, saying so, without it.
//!
//! # Layout
//! - `options`: [`PostgresOptions`].
//! - `schema`: the tables, `triage_append`, migrations and version checks.
//! - `batcher`: group commit of concurrent appends.
//! - `reader`: the SQL and the reads, and the watermark.
//! - `read_ahead`: the next page of a reader far behind the head.
//! - `notify`: LISTEN and the head refresher.
//!
//! Dependencies: `tokio-postgres` (not sqlx, whose `libsqlite3-sys` clashes
//! with the bundled one of `rusqlite`) and `deadpool-postgres` for the pool:
//! maintained, made for tokio-postgres, with a per-connection statement
//! cache, and licensed MIT OR Apache-2.0 like the workspace (`bb8-postgres`
//! is MIT only).
//! TLS (`tls`): rustls, with libpq's `sslmode` (`disable`, `prefer` as
//! the default, `require`, `verify-ca`, `verify-full`) and `sslrootcert`.

mod batcher;
mod notify;
mod options;
mod pgpass;
mod read_ahead;
mod reader;
mod schema;
pub mod tls;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Client, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;
use tokio_postgres::Config;
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use triage_event_store::{
    AppendPlan, AppendResult, Direction, Error, EventData, EventStore, ExpectedRevision, Position, ReadAll, ReadStream,
    RecordedEvent, Result, StoredEventRef, StreamName, SubscribeToAll, Subscription, plan_append, validate_append,
};
use uuid::Uuid;

pub use options::{MAX_SCHEMA_BYTES, PostgresOptions};

use batcher::{Append, Batcher, Written};
use read_ahead::ReadAhead;
use reader::Sql;

/// How often an `Any` or `StreamExists` append tries again after losing a
/// race for its revision. Every lost race means another append won, so
/// the log always moves on; the bound only stops one unlucky caller.
const MAX_APPEND_ATTEMPTS: u32 = 200;

/// An event store in a PostgreSQL schema.
///
/// Dropping it stops its background tasks and closes its connections. A
/// store from [`PostgresEventStore::connect_temporary`] also drops its
/// schema; that drop blocks for one round trip to the server.
pub struct PostgresEventStore {
    target: Arc<Target>,
    options: PostgresOptions,
    pool: Pool,
    sql: Arc<Sql>,
    /// The visible head; see `notify.rs`.
    head: Arc<watch::Sender<Option<Position>>>,
    /// Wakes the head refresher after an append of this process.
    wake: Arc<Notify>,
    /// Asks for a NOTIFY to the other processes after an append of this
    /// process; see `notify.rs`.
    announce: Arc<Notify>,
    /// Groups concurrent appends into one transaction; see `batcher.rs`.
    batcher: Batcher,
    tasks: Vec<AbortHandle>,
    counters: Counters,
    /// Pages of `$all` read ahead of a reader far behind the head; see
    /// `read_ahead.rs`.
    read_ahead: ReadAhead,
    temporary: bool,
}

/// Where a store lives, for connecting and for messages: never prints the
/// password.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) config: Config,
    /// How every connection is secured (see [`tls`]).
    pub(crate) tls: tls::PgTls,
    pub(crate) schema: String,
    /// [`PostgresOptions::query_timeout`].
    pub(crate) query_timeout: Duration,
}

impl Target {
    /// `postgres://user@host:port/database (schema s)`, without a password.
    pub(crate) fn describe(&self) -> String {
        let config = &self.config;
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
        format!(
            "postgres://{user}@{}/{database} (schema {})",
            hosts.join(","),
            self.schema
        )
    }

    /// Runs `operation` on `client`, waiting at most the query timeout for
    /// it. On expiry the connection is closed, not pooled: its answer may
    /// still come, and whoever used it next would wait behind it.
    /// `unknown_outcome` is for writes, which the server may still commit.
    pub(crate) async fn bounded<T>(
        &self,
        client: Client,
        what: &str,
        unknown_outcome: bool,
        operation: impl AsyncFnOnce(&Client) -> Result<T>,
    ) -> Result<T> {
        let answer = tokio::time::timeout(self.query_timeout, operation(&client)).await;
        answer.unwrap_or_else(|_elapsed| {
            drop(deadpool_postgres::Object::take(client));
            Err(self.unanswered(what, unknown_outcome))
        })
    }

    /// The error for an operation the server did not answer in time.
    pub(crate) fn unanswered(&self, what: &str, unknown_outcome: bool) -> Error {
        let outcome = if unknown_outcome {
            "; the server may still commit it, so whether it was stored is unknown: read the stream, or retry \
             it with the same event ids"
        } else {
            ""
        };
        Error::Backend {
            message: format!(
                "{what}: {} did not answer within {:?}, and the connection was closed{outcome}",
                self.describe(),
                self.query_timeout
            ),
            source: None,
        }
    }

    /// Maps a driver error. What retrying cannot change (a missing
    /// privilege, table or database, a bad password) is
    /// [`Error::Refused`], with a message that says what is wrong where;
    /// the rest is [`Error::Backend`]. A server that takes no writes is
    /// `Backend`, with a message saying so: it may be a standby that a
    /// failover is about to replace, which a retry then reaches. Each
    /// refusal is an ERROR the server answered to a statement, which
    /// rolled back its transaction, so a refused append stored nothing.
    pub(crate) fn db_error(&self, what: &str, error: tokio_postgres::Error) -> Error {
        if let Some(refusal) = tls::refused_certificate(&error) {
            return Error::Refused {
                message: format!("{what} at {}: {refusal}", self.describe()),
                source: Some(Box::new(error)),
            };
        }
        let Some(code) = error.code() else {
            return Error::backend(format!("{what} ({})", self.describe()), error);
        };
        let detail = error
            .as_db_error()
            .map_or_else(|| error.to_string(), |db| db.message().to_owned());
        let role = self.config.get_user().unwrap_or("");
        let problem = if *code == SqlState::INSUFFICIENT_PRIVILEGE {
            format!(
                "the role {role:?} lacks a privilege the event store needs on {} ({detail}); \
                 it needs USAGE and CREATE on the schema (or CREATE on the database to create the schema) \
                 and SELECT, INSERT on its tables",
                self.describe()
            )
        } else if [
            SqlState::UNDEFINED_TABLE,
            SqlState::UNDEFINED_FUNCTION,
            SqlState::UNDEFINED_COLUMN,
            SqlState::INVALID_SCHEMA_NAME,
        ]
        .contains(code)
        {
            format!(
                "{} lacks part of the event store's schema ({detail}); was it dropped or altered by hand? \
                 Restore it from a backup",
                self.describe()
            )
        } else if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
            return Error::backend(
                format!(
                    "{what}: {} accepts no writes ({detail}): a standby (during a failover, retry), or \
                     default_transaction_read_only is on for the role {role:?} or the database; point the store \
                     at the primary",
                    self.describe()
                ),
                error,
            );
        } else if [
            SqlState::INVALID_CATALOG_NAME,
            SqlState::INVALID_PASSWORD,
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        ]
        .contains(code)
        {
            format!("{} refused the connection ({detail})", self.describe())
        } else {
            return Error::backend(format!("{what} ({})", self.describe()), error);
        };
        Error::refused(format!("{what}: {problem}"), error)
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

pub(crate) fn pool_error(target: &Target, error: PoolError) -> Error {
    match error {
        PoolError::Backend(error) => target.db_error("cannot connect", error),
        PoolError::Timeout(kind) => Error::Backend {
            message: format!("timed out ({kind:?}) getting a connection to {}", target.describe()),
            source: None,
        },
        PoolError::Closed => Error::Closed,
        other => Error::backend(format!("cannot get a connection to {}", target.describe()), other),
    }
}

/// What the store has done so far; see [`PostgresEventStore::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostgresStats {
    /// Appends that wrote their events.
    pub appends_written: u64,
    /// Events written.
    pub events_written: u64,
    /// Appends answered with the original result of an earlier append.
    pub appends_replayed: u64,
    /// Appends answered with [`Error::WrongExpectedVersion`].
    pub conflicts: u64,
    /// Writes refused by a unique constraint (a lost race) and decided again.
    pub lost_races: u64,
    /// Pages of `$all` asked for and read as two halves at once (far behind
    /// the head); read-aheads are not counted here.
    pub pages_read_in_halves: u64,
    /// Pages of `$all` answered from a read-ahead (far behind the head).
    pub pages_read_ahead: u64,
}

#[derive(Debug, Default)]
struct Counters {
    appends_written: AtomicU64,
    events_written: AtomicU64,
    appends_replayed: AtomicU64,
    conflicts: AtomicU64,
    lost_races: AtomicU64,
    pages_read_in_halves: AtomicU64,
    pages_read_ahead: AtomicU64,
}

impl PostgresEventStore {
    /// Connects to the database at `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`)
    /// and opens the store in `options.schema`, creating or migrating it.
    ///
    /// Errors: [`Error::Incompatible`] when the schema holds a store from a
    /// newer Triage, or tables that are not a Triage store; nothing is
    /// modified then. [`Error::Backend`] when the URL is invalid, the server
    /// cannot be reached, or the role lacks privileges (the message says
    /// which).
    pub async fn connect(url: &str, options: PostgresOptions) -> Result<Self> {
        options.validate()?;
        let url = parse_url(url)?;
        Self::open(url, options, false).await
    }

    /// Opens a fresh, empty store in a new schema named
    /// `triage_tmp_<random>` (replacing `options.schema`); the schema is
    /// dropped with the store, after the store's sessions (named
    /// `triage <schema>`, whatever the URL says) are ended. For tests:
    /// stores made this way never see each other, so tests can run in
    /// parallel on one database.
    pub async fn connect_temporary(url: &str, options: PostgresOptions) -> Result<Self> {
        let schema = format!("triage_tmp_{}", &Uuid::new_v4().simple().to_string()[..16]);
        let options = PostgresOptions { schema, ..options };
        options.validate()?;
        let mut url = parse_url(url)?;
        // The schema's name in every session of the store: the drop ends
        // the sessions still open (see `Drop`).
        url.config.application_name(format!("triage {}", options.schema));
        Self::open(url, options, true).await
    }

    async fn open(url: tls::PgUrl, options: PostgresOptions, temporary: bool) -> Result<Self> {
        let tls::PgUrl { mut config, tls } = url;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("triage");
        }
        read_committed(&mut config);
        let mut server = tls::PgUrl { config, tls };
        let settled = tls::settle_prefer(&mut server).await;
        let target = Arc::new(Target {
            config: server.config,
            tls: server.tls,
            schema: options.schema.clone(),
            query_timeout: options.query_timeout,
        });
        settled.map_err(|error| target.db_error("cannot connect", error))?;
        let manager = Manager::from_config(
            target.config.clone(),
            target.tls.clone(),
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
            .map_err(|error| Error::backend(format!("cannot build the pool for {}", target.describe()), error))?;
        let mut client = pool.get().await.map_err(|error| pool_error(&target, error))?;
        schema::migrate(&mut client, &target, options.create_if_missing).await?;
        let sql = Arc::new(Sql::new(&target.schema));
        let initial = reader::heads(&client, &sql, &target).await?.visible_position();
        drop(client);
        let head = Arc::new(watch::Sender::new(initial));
        let wake = Arc::new(Notify::new());
        let announce = Arc::new(Notify::new());
        let mut tasks = notify::start(
            Arc::clone(&target),
            pool.clone(),
            Arc::clone(&sql),
            Arc::clone(&head),
            Arc::clone(&wake),
            Arc::clone(&announce),
            options.poll_interval,
        );
        let (batcher, writers) = Batcher::start(Arc::clone(&target), pool.clone(), Arc::clone(&sql));
        tasks.extend(writers);
        tracing::debug!(store = %target.describe(), ?options, "opened PostgreSQL event store");
        Ok(PostgresEventStore {
            target,
            options,
            pool,
            sql,
            head,
            wake,
            announce,
            batcher,
            tasks,
            counters: Counters::default(),
            read_ahead: ReadAhead::default(),
            temporary,
        })
    }

    /// The PostgreSQL schema holding the store.
    pub fn schema(&self) -> &str {
        &self.target.schema
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &PostgresOptions {
        &self.options
    }

    /// A snapshot of the store's counters, for benchmarks and logs.
    pub fn stats(&self) -> PostgresStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PostgresStats {
            appends_written: load(&self.counters.appends_written),
            events_written: load(&self.counters.events_written),
            appends_replayed: load(&self.counters.appends_replayed),
            conflicts: load(&self.counters.conflicts),
            lost_races: load(&self.counters.lost_races),
            pages_read_in_halves: load(&self.counters.pages_read_in_halves),
            pages_read_ahead: load(&self.counters.pages_read_ahead),
        }
    }

    async fn client(&self) -> Result<Client> {
        self.pool.get().await.map_err(|error| pool_error(&self.target, error))
    }

    fn read_ahead_source(&self) -> read_ahead::Source<'_> {
        read_ahead::Source {
            pool: &self.pool,
            sql: &self.sql,
            target: &self.target,
        }
    }

    fn count(&self, counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}

/// The driver's error with the server's message and code, which its own
/// `Display` leaves out ("db error"): for logs.
pub(crate) fn describe_error(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// Makes every session of `config` start its transactions READ COMMITTED,
/// whatever the database's or role's default: `triage_append` and the
/// migrations take their snapshots after their locks, which only READ
/// COMMITTED does. Under REPEATABLE READ a process that waited for the
/// migration lock saw no schema row, and under SERIALIZABLE racing appends
/// failed with serialization errors. Added after any options of the URL,
/// so that it wins over a setting there too.
pub fn read_committed(config: &mut Config) {
    const SETTING: &str = r"-c default_transaction_isolation=read\ committed";
    let options = match config.get_options() {
        Some(options) if !options.trim().is_empty() => format!("{options} {SETTING}"),
        _ => SETTING.to_owned(),
    };
    config.options(&options);
}

fn parse_url(url: &str) -> Result<tls::PgUrl> {
    // The message names the bad part, never the URL, so the password
    // cannot leak through it.
    tls::parse_url(url).map_err(|message| Error::Refused { message, source: None })
}

impl Drop for PostgresEventStore {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.read_ahead.clear();
        if !self.temporary {
            return;
        }
        self.pool.close();
        // Drop cannot await, and the runtime may be shutting down: drop the
        // schema from a thread with a runtime of its own.
        let target = Arc::clone(&self.target);
        let cleanup = std::thread::Builder::new()
            .name("triage-pg-cleanup".to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(async {
                    let (client, connection) = target
                        .config
                        .connect(target.tls.clone())
                        .await
                        .map_err(std::io::Error::other)?;
                    let driver = tokio::spawn(connection);
                    // A session of the store may still be running a query
                    // whose rows nobody reads: a read-ahead, aborted above,
                    // whose task cannot run while this drop blocks its
                    // runtime. It keeps its lock on the events table, and
                    // the DROP would wait for it for ever; so the store's
                    // sessions end first. (Allowed for the role's own
                    // sessions; if refused, the DROP tries anyway.)
                    let ended = client
                        .execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                             WHERE application_name = $1 AND pid <> pg_backend_pid()",
                            &[&target.config.get_application_name().unwrap_or_default()],
                        )
                        .await;
                    if let Err(error) = ended {
                        tracing::debug!(%error, "cannot end the sessions of a temporary store");
                    }
                    let result = client
                        .batch_execute(&format!(r#"DROP SCHEMA IF EXISTS "{}" CASCADE"#, target.schema))
                        .await;
                    drop(client);
                    let _ = driver.await;
                    result.map_err(std::io::Error::other)
                })
            });
        match cleanup.map(|thread| thread.join()) {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => {
                tracing::warn!(schema = %self.target.schema, %error, "cannot drop a temporary schema")
            }
            Ok(Err(_)) => tracing::warn!(schema = %self.target.schema, "dropping a temporary schema panicked"),
            Err(error) => tracing::warn!(%error, "cannot start the thread that drops a temporary schema"),
        }
    }
}

impl fmt::Debug for PostgresEventStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresEventStore")
            .field("target", &self.target)
            .field("options", &self.options)
            .field("temporary", &self.temporary)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl EventStore for PostgresEventStore {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedRevision,
        events: Vec<EventData>,
    ) -> Result<AppendResult> {
        validate_append(stream, &events)?;
        let failed = |what: &str, error| self.target.db_error(what, error);
        let events = Arc::new(events);
        let written = |first_revision: u64, position: i64| {
            self.count(&self.counters.appends_written, 1);
            self.count(&self.counters.events_written, events.len() as u64);
            // Committed: wake this process's subscribers, and the other
            // processes' through one coalesced NOTIFY.
            self.wake.notify_one();
            self.announce.notify_one();
            AppendResult {
                current_revision: first_revision + events.len() as u64 - 1,
                position: Position::from_sequence(reader::from_sql_int(position)),
                replayed: false,
            }
        };
        // The usual case: with the next batch, where `triage_append` checks
        // the expected revision itself, under the stream's lock. It writes
        // nothing when the stream is elsewhere (a conflict) or an id is
        // stored already; then the store reads and decides below.
        let fast = Append {
            stream: stream.clone(),
            expected: batcher::expectation(expected),
            events: Arc::clone(&events),
        };
        let batched = self.batcher.append(fast).await;
        match batched {
            Written::Yes {
                first_revision,
                last_position,
            } => return Ok(written(first_revision, last_position)),
            // Decided under the stream's lock, with none of the ids stored:
            // what plan_append would answer after a read.
            Written::Conflict { actual } => {
                self.count(&self.counters.conflicts, 1);
                return Err(Error::WrongExpectedVersion {
                    stream: stream.clone(),
                    expected,
                    actual,
                });
            }
            Written::No | Written::Unknown => {}
        }
        let alone = async || {
            let client = self.client().await?;
            let what = format!("appending to {stream}");
            self.target
                .bounded(client, &what, true, async |client: &Client| {
                    let ids: Vec<Uuid> = events.iter().map(|event| event.id).collect();
                    let read_state = client
                        .prepare_cached(&self.sql.append_state)
                        .await
                        .map_err(|e| failed("cannot prepare an append", e))?;
                    let mut attempt = 0;
                    loop {
                        attempt += 1;
                        // One statement, so one snapshot: the last committed revision
                        // and where the append's ids are already stored.
                        let rows = client
                            .query(&read_state, &[&stream.as_str(), &ids])
                            .await
                            .map_err(|e| failed("cannot read the stream's revision", e))?;
                        let current: Option<u64> = rows
                            .first()
                            .and_then(|row| row.get::<_, Option<i64>>(0))
                            .map(reader::from_sql_int);
                        let mut stored = HashMap::new();
                        for row in &rows {
                            let Some(id) = row.get::<_, Option<Uuid>>(1) else {
                                continue;
                            };
                            let name: String = row.get(2);
                            stored.insert(
                                id,
                                StoredEventRef {
                                    stream: StreamName::new(name).map_err(|error| {
                                        Error::backend(
                                            format!("{} holds an invalid stream name", self.target.describe()),
                                            error,
                                        )
                                    })?,
                                    revision: reader::from_sql_int(row.get(3)),
                                    position: Position::from_sequence(reader::from_sql_int(row.get(4))),
                                },
                            );
                        }
                        let conflict = || Error::WrongExpectedVersion {
                            stream: stream.clone(),
                            expected,
                            actual: current,
                        };
                        let plan = plan_append(stream, expected, current, &events, |id| Ok(stored.get(&id).cloned()));
                        match plan {
                            Ok(AppendPlan::Write { .. }) => {}
                            Ok(AppendPlan::AlreadyAppended(original)) => {
                                self.count(&self.counters.appends_replayed, 1);
                                // Announced like an append that wrote: a retry is often
                                // the only append of its events that returns (the
                                // original's process stopped after its commit, before
                                // its NOTIFY), and every append that returns is followed
                                // by a NOTIFY, so that other processes do not wait for
                                // their poll to see it.
                                self.wake.notify_one();
                                self.announce.notify_one();
                                return Ok(original);
                            }
                            Err(error) => {
                                if error.is_wrong_expected_version() {
                                    self.count(&self.counters.conflicts, 1);
                                }
                                return Err(error);
                            }
                        }
                        // The first id is new but a later one is stored: the unique
                        // event_id would refuse the insert, and no re-read can change
                        // that. A conflict, as plan_append asks of every backend.
                        if events.iter().any(|event| stored.contains_key(&event.id)) {
                            self.count(&self.counters.conflicts, 1);
                            return Err(conflict());
                        }
                        // Write after the revision just read, and only there.
                        let only_here = Append {
                            stream: stream.clone(),
                            expected: Some(current.map_or(schema::EXPECT_NO_STREAM, reader::to_sql_int)),
                            events: Arc::clone(&events),
                        };
                        // Not written: another append moved the stream, or stored one
                        // of these ids, after our read.
                        let lost = match batcher::write(client, &self.sql, &[&only_here]).await {
                            Ok(answers) => match answers.as_slice() {
                                [
                                    Written::Yes {
                                        first_revision,
                                        last_position,
                                    },
                                ] => return Ok(written(*first_revision, *last_position)),
                                _ => None,
                            },
                            // One of the ids was written to another stream after our read.
                            Err(error) if error.code() == Some(&SqlState::UNIQUE_VIOLATION) => Some(error),
                            Err(error) => return Err(failed("cannot append", error)),
                        };
                        // Read again and decide again: `Exact` and `NoStream` now see the
                        // conflict or, for a retry racing its original, the original
                        // result; `Any` and `StreamExists` write after the new last
                        // revision.
                        self.count(&self.counters.lost_races, 1);
                        if attempt >= MAX_APPEND_ATTEMPTS {
                            let message = format!(
                                "gave up an append to {stream} after losing {attempt} races for its revision ({})",
                                self.target.describe()
                            );
                            return Err(match lost {
                                Some(error) => Error::backend(message, error),
                                None => Error::Backend { message, source: None },
                            });
                        }
                        tokio::task::yield_now().await;
                    }
                })
                .await
        };
        match alone().await {
            // A conflict or a replay was decided by reading the stream,
            // which holds the batch's events if it committed. A failure
            // decided nothing.
            // A refusal of the lone try says nothing of the batch before
            // it, which may have committed: unknown too, not "refused".
            Err(error @ (Error::Backend { .. } | Error::Refused { .. })) if batched == Written::Unknown => {
                Err(Error::backend(
                    format!(
                        "appending to {stream}: the batch it went out in failed, perhaps after it committed, and \
                     trying it alone failed too, so whether it was stored is unknown: read the stream, or \
                     retry it with the same event ids"
                    ),
                    error,
                ))
            }
            outcome => outcome,
        }
    }

    async fn read_stream(&self, stream: &StreamName, options: ReadStream) -> Result<Vec<RecordedEvent>> {
        let client = self.client().await?;
        let what = format!("reading {stream}");
        self.target
            .bounded(client, &what, false, async |client: &Client| {
                reader::read_stream(client, &self.sql, &self.target, stream, options).await
            })
            .await
    }

    async fn read_all(&self, options: ReadAll) -> Result<Vec<RecordedEvent>> {
        let forwards = options.direction == Direction::Forwards;
        let limit = reader::to_sql_int(options.max_count as u64);
        if forwards && let Some(page) = self.read_ahead.take(reader::forward_from(options.from), limit).await {
            self.count(&self.counters.pages_read_ahead, 1);
            self.read_ahead
                .after(self.read_ahead_source(), &page.events, limit, Some(page.visible));
            return Ok(page.events);
        }
        // Waiting for older transactions takes no connection, except for
        // each look; the page's read then waits at most what is left.
        let (heads, wait_left) = reader::settled_heads_pooled(
            &self.pool,
            &self.sql,
            &self.target,
            self.options.visibility_wait,
            reader::page_end(options),
        )
        .await?;
        let client = self.client().await?;
        // The connection goes back (or is closed) first: the read-ahead may
        // want it.
        let page = self
            .target
            .bounded(client, "reading $all", false, async |client: &Client| {
                reader::read_all(
                    client,
                    &self.sql,
                    &self.target,
                    options,
                    Some(reader::Settled { heads, wait_left }),
                    Some(reader::Spare {
                        pool: &self.pool,
                        pages_read_in_halves: &self.counters.pages_read_in_halves,
                    }),
                )
                .await
            })
            .await?;
        if forwards {
            self.read_ahead
                .after(self.read_ahead_source(), &page.events, limit, page.visible);
        }
        Ok(page.events)
    }

    async fn read_event(&self, event_id: Uuid) -> Result<Option<RecordedEvent>> {
        let client = self.client().await?;
        let what = format!("reading event {event_id}");
        self.target
            .bounded(client, &what, false, async |client: &Client| {
                reader::read_event(client, &self.sql, &self.target, event_id).await
            })
            .await
    }

    async fn head_position(&self) -> Result<Option<Position>> {
        let (heads, _) =
            reader::settled_heads_pooled(&self.pool, &self.sql, &self.target, self.options.visibility_wait, None)
                .await?;
        Ok(heads.visible_position())
    }

    fn subscribe_to_all(self: Arc<Self>, options: SubscribeToAll) -> Subscription {
        // The catch-up reader pages through `read_all`, which never reads
        // past the watermark, and sleeps on the visible head, which moves
        // only when more of the log became visible.
        let head = self.head.subscribe();
        Subscription::catch_up(self, options, head)
    }

    fn describe(&self) -> String {
        self.target.describe()
    }

    async fn accepts_writes(&self) -> Result<bool> {
        let client =
            self.pool.get().await.map_err(|error| {
                Error::backend("cannot get a connection to ask whether the server takes writes", error)
            })?;
        // A role that may only read the log (SELECT without INSERT) is
        // refused every append, as surely as a standby.
        let events = format!(r#""{}".triage_events"#, self.target.schema.replace('"', "\"\""));
        let row = client
            .query_one(
                "SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off' \
                 AND has_table_privilege($1::text, 'INSERT')",
                &[&events],
            )
            .await
            .map_err(|error| Error::backend("cannot ask whether the server takes writes", error))?;
        Ok(row.get(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> Target {
        let url = parse_url(url).unwrap();
        Target {
            config: url.config,
            tls: url.tls,
            schema: "triage".to_owned(),
            query_timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn describe_never_prints_the_password() {
        let url = target("postgres://alice:s3cret@db.example:6543/tickets");
        assert_eq!(
            url.describe(),
            "postgres://alice@db.example:6543/tickets (schema triage)"
        );
        assert!(!format!("{url:?}").contains("s3cret"));
        let key_value = target("host=h1,h2 port=1,2 user=bob password=s3cret dbname=d");
        assert_eq!(key_value.describe(), "postgres://bob@h1:1,h2:2/d (schema triage)");
    }

    #[test]
    fn invalid_urls_are_refused_without_the_url() {
        let error = parse_url("postgres://alice:s3cret@host/db?bogus=1").unwrap_err();
        assert!(matches!(error, Error::Refused { .. }));
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        assert!(!text.contains("s3cret"), "{text}");
    }
}
