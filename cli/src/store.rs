//! Choosing a backend by URL: one option parser for every command.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use triage_event_store::{EventStore, InMemoryEventStore};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions, Synchronous};

/// The URL schemes `--store` accepts.
pub(crate) const URL_SCHEMES: &[&str] = &["sqlite://PATH", "memory://"];

/// Where events live, parsed from `--store` or `--db`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StoreLocation {
    /// The embedded SQLite store at this path.
    Sqlite(PathBuf),
    /// A throwaway in-memory store (for trying commands out).
    Memory,
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
            let hint = match scheme {
                "postgres" | "postgresql" | "esdb" | "kurrentdb" | "kdb" => {
                    " (this build of triage has no such backend yet)"
                }
                _ => "",
            };
            bail!(
                "unsupported store URL scheme {scheme:?}{hint}; supported: {}, or a plain file path",
                URL_SCHEMES.join(", ")
            );
        }
        Ok(StoreLocation::Sqlite(PathBuf::from(value)))
    }

    /// Opens the store.
    pub(crate) fn open(&self, synchronous: Synchronous) -> anyhow::Result<Arc<dyn EventStore>> {
        match self {
            StoreLocation::Sqlite(path) => {
                let options = SqliteOptions {
                    synchronous,
                    ..SqliteOptions::default()
                };
                let store = SqliteEventStore::open(path, options)
                    .with_context(|| format!("cannot open the event store {self}"))?;
                Ok(Arc::new(store))
            }
            StoreLocation::Memory => Ok(Arc::new(InMemoryEventStore::new())),
        }
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            StoreLocation::Memory => f.write_str("memory://"),
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
        let error = StoreLocation::parse("mysql://x").unwrap_err().to_string();
        assert!(error.contains("unsupported store URL scheme \"mysql\""), "{error}");
        assert!(StoreLocation::parse("sqlite://").is_err());
    }
}
