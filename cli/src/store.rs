//! Choosing a backend by URL: one option parser for every command.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use triage_event_store::url::{redact_password, take_query_parameter};
use triage_event_store::{EventStore, InMemoryEventStore};
use triage_store_kurrentdb::{KurrentDbEventStore, KurrentDbOptions};
use triage_store_postgres::{PostgresEventStore, PostgresOptions};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions, Synchronous};

/// The URL schemes `--store` accepts.
pub(crate) const URL_SCHEMES: &[&str] = &[
    "sqlite://PATH",
    "postgres://USER@HOST/DB",
    "esdb://HOST:2113?tls=false",
    "kurrentdb://…",
    "memory://",
];

/// The schemes of [`URL_SCHEMES`] by name, longest first where one begins
/// another.
const SCHEME_NAMES: &[&str] = &[
    "sqlite",
    "postgresql",
    "postgres",
    "esdb+discover",
    "esdb",
    "kurrentdb+discover",
    "kurrentdb",
    "kdb+discover",
    "kdb",
    "memory",
];

/// Where events live, parsed from `--store` or `--db`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StoreLocation {
    /// The embedded SQLite store at this path.
    Sqlite(PathBuf),
    /// A throwaway in-memory store (for trying commands out).
    Memory,
    /// PostgreSQL, by connection URL.
    Postgres(String),
    /// EventStoreDB / KurrentDB, by connection string (`esdb://`,
    /// `kurrentdb://`, `kdb://`, and their `+discover` forms).
    Kurrent(String),
}

impl StoreLocation {
    /// Parses `--store`: a URL with a known scheme, or a plain path, which
    /// means SQLite. `--db PATH` is the same as `--store sqlite://PATH`.
    pub(crate) fn parse(value: &str) -> anyhow::Result<Self> {
        if let Some(path) = value.strip_prefix("sqlite://") {
            if path.is_empty() {
                bail!("{value:?} names no file; use sqlite://PATH, e.g. sqlite://./triage.db");
            }
            return Ok(StoreLocation::Sqlite(PathBuf::from(path)));
        }
        if value == "memory://" || value == "memory" {
            return Ok(StoreLocation::Memory);
        }
        if let Some((scheme, _)) = value.split_once("://") {
            return match scheme {
                "postgres" | "postgresql" => Ok(StoreLocation::Postgres(value.to_owned())),
                "esdb" | "esdb+discover" | "kurrentdb" | "kurrentdb+discover" | "kdb" | "kdb+discover" => {
                    Ok(StoreLocation::Kurrent(value.to_owned()))
                }
                _ => bail!(
                    "unsupported store URL scheme {scheme:?}; supported: {}, or a plain file path",
                    URL_SCHEMES.join(", ")
                ),
            };
        }
        if value.is_empty() {
            bail!("the store is an empty path; name a file, e.g. ./triage.db, or a URL");
        }
        // A URL with a slip (`postgres:db`, `postgres//host/db`) would
        // otherwise be a SQLite file of that name, made in silence.
        if let Some(slip) = triage_event_store::url::url_slip(value, SCHEME_NAMES) {
            bail!("{slip}");
        }
        Ok(StoreLocation::Sqlite(PathBuf::from(value)))
    }

    /// Opens the store. Servers are contacted here (PostgreSQL) or on first
    /// use (KurrentDB connects lazily). Without `create`, a PostgreSQL
    /// database or schema that holds no store is an error, not a new store
    /// (SQLite files are checked before, by `require_existing_store`;
    /// KurrentDB has nothing to create).
    pub(crate) async fn open(&self, synchronous: Synchronous, create: bool) -> anyhow::Result<Arc<dyn EventStore>> {
        match self {
            StoreLocation::Sqlite(path) => {
                if path.is_dir() {
                    bail!(
                        "cannot open the event store {}: it is a directory; name a file, e.g. {}",
                        path.display(),
                        path.join("triage.db").display()
                    );
                }
                let options = SqliteOptions {
                    synchronous,
                    ..SqliteOptions::default()
                };
                let store = SqliteEventStore::open(path, options)
                    .with_context(|| format!("cannot open the event store {self}"))?;
                Ok(Arc::new(store))
            }
            StoreLocation::Memory => Ok(Arc::new(InMemoryEventStore::new())),
            StoreLocation::Postgres(url) => {
                // `schema=NAME` places the store in a schema of its own.
                let (url, schema) = take_query_parameter(url, "schema")?;
                let options = PostgresOptions {
                    create_if_missing: create,
                    ..schema.map_or_else(PostgresOptions::default, PostgresOptions::in_schema)
                };
                let store = PostgresEventStore::connect(&url, options)
                    .await
                    .with_context(|| format!("cannot open the event store {self}"))?;
                Ok(Arc::new(store))
            }
            StoreLocation::Kurrent(url) => {
                let store = KurrentDbEventStore::connect(url, KurrentDbOptions::default())
                    .with_context(|| format!("cannot open the event store {self}"))?;
                Ok(Arc::new(store))
            }
        }
    }

    /// Where read models live when `--read-model` is not given: next to a
    /// SQLite store; in memory for memory://; in the same PostgreSQL
    /// database (schema `triage_read`) for a PostgreSQL store; in a SQLite
    /// file in the working directory for EventStoreDB.
    pub(crate) fn default_read_model(&self) -> Option<String> {
        match self {
            StoreLocation::Sqlite(path) => {
                Some(triage_projections::ReadModelDb::sibling_of(path).display().to_string())
            }
            StoreLocation::Memory => None,
            StoreLocation::Postgres(url) => {
                // Beside the events: `<schema>_read`, or `triage_read`.
                // A repeated schema= fails when the store is opened, before
                // this is asked; the URL is then passed on as it is.
                let Ok((base, schema)) = take_query_parameter(url, "schema") else {
                    return Some(url.clone());
                };
                let read_schema = schema.map_or_else(|| "triage_read".to_owned(), |schema| format!("{schema}_read"));
                let separator = if base.contains('?') { '&' } else { '?' };
                Some(format!("{base}{separator}schema={read_schema}"))
            }
            StoreLocation::Kurrent(_) => Some("./triage.esdb.read.db".to_owned()),
        }
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            StoreLocation::Memory => f.write_str("memory://"),
            StoreLocation::Postgres(url) | StoreLocation::Kurrent(url) => f.write_str(&redact_password(url)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths_choose_a_backend() {
        assert_eq!(
            StoreLocation::parse("sqlite:///tmp/t.db").unwrap(),
            StoreLocation::Sqlite("/tmp/t.db".into())
        );
        assert_eq!(
            StoreLocation::parse("./t.db").unwrap(),
            StoreLocation::Sqlite("./t.db".into())
        );
        assert_eq!(StoreLocation::parse("memory://").unwrap(), StoreLocation::Memory);
        // A URL with a slip is not taken for a file name.
        for slip in [
            "postgres:triage",
            "postgres//db/triage",
            "POSTGRESQL:/x",
            "esdb:localhost:2113",
            "sqlite:t.db",
        ] {
            let error = StoreLocation::parse(slip).unwrap_err().to_string();
            assert!(
                error.contains("looks like a") && error.contains("://"),
                "{slip}: {error}"
            );
        }
        assert_eq!(
            StoreLocation::parse("./postgres:triage").unwrap(),
            StoreLocation::Sqlite("./postgres:triage".into())
        );
        assert_eq!(
            StoreLocation::parse("postgresfiles/t.db").unwrap(),
            StoreLocation::Sqlite("postgresfiles/t.db".into())
        );
        assert_eq!(
            StoreLocation::parse("esdb://localhost:2113?tls=false").unwrap(),
            StoreLocation::Kurrent("esdb://localhost:2113?tls=false".into())
        );
        assert!(matches!(
            StoreLocation::parse("kurrentdb+discover://h:2113").unwrap(),
            StoreLocation::Kurrent(_)
        ));
        let postgres = StoreLocation::parse("postgres://triage:secret@db/triage").unwrap();
        assert_eq!(postgres.to_string(), "postgres://triage:***@db/triage");
        let error = StoreLocation::parse("mysql://x").unwrap_err().to_string();
        assert!(error.contains("unsupported store URL scheme \"mysql\""), "{error}");
        assert!(StoreLocation::parse("sqlite://").is_err());
    }
}
