//! How a store is opened: the schema it lives in, the pool, and how long
//! reads wait for slower writers.

use std::time::Duration;

use triage_event_store::Error;

/// Longest accepted schema name, in bytes. PostgreSQL identifiers have at
/// most 63 bytes and the notification channel is `triage_events_<schema>`,
/// which must fit too.
pub const MAX_SCHEMA_BYTES: usize = 48;

/// Options of [`crate::PostgresEventStore::connect`].
/// `PostgresOptions::default()` is what Triage ships with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresOptions {
    /// The PostgreSQL schema holding the store's tables (default `public`).
    /// The tables are named `triage_*`, so they can share a schema with read
    /// models. Lowercase ASCII letters, digits and `_`, not starting with a
    /// digit, at most [`MAX_SCHEMA_BYTES`] bytes.
    pub schema: String,
    /// Most pooled connections (default 16; at least 1). While batches of
    /// appends are in flight, their writers hold one each (two at most; see
    /// `batcher.rs`). A read of a long page of `$all` far behind the head
    /// may take a second one for half of the page, only while more than
    /// three would stay free (see `reader.rs`). The store opens two more,
    /// outside the pool: one for LISTEN, and at its first append one for
    /// NOTIFY.
    pub pool_size: usize,
    /// How often the head is re-read when no notification arrives (default
    /// 500 ms). Notifications are the fast path; polling covers a lost
    /// LISTEN or NOTIFY connection, a notification lost with its process,
    /// and a watermark held back by a transaction that does not notify (one
    /// that is not an append of a Triage store).
    pub poll_interval: Duration,
    /// How long a read of `$all` (and `head_position`) waits for older
    /// transactions that are still in flight before it answers with what is
    /// visible below the watermark (default 2 s). See the crate docs.
    pub visibility_wait: Duration,
    /// How long getting a connection may take: connecting, or waiting for a
    /// free pooled one (default 10 s).
    pub connect_timeout: Duration,
    /// How long an append or a read waits for the server's answer (default
    /// 30 s). A connection that stops answering without closing (a network
    /// black hole, a hung proxy, a failover that left the socket open) would
    /// otherwise hold its caller, and a batch writer with every append
    /// behind it, for as long as the operating system keeps the socket
    /// (hours). On expiry the connection is closed; an append is then
    /// reported with its outcome unknown, because the server may still
    /// commit it.
    pub query_timeout: Duration,
    /// Whether opening may create the store where there is none (default
    /// true). Off, opening a schema without a Triage store fails with
    /// [`triage_event_store::Error::Incompatible`] and creates nothing:
    /// for commands that only read, so that a mistyped database or schema
    /// name does not get a store made in it.
    pub create_if_missing: bool,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            schema: "public".to_owned(),
            pool_size: 16,
            poll_interval: Duration::from_millis(500),
            visibility_wait: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(10),
            query_timeout: Duration::from_secs(30),
            create_if_missing: true,
        }
    }
}

impl PostgresOptions {
    /// The default options with the store in `schema`.
    pub fn in_schema(schema: impl Into<String>) -> Self {
        PostgresOptions {
            schema: schema.into(),
            ..Self::default()
        }
    }

    /// Checks the schema name. Only plain lowercase names are accepted, so
    /// that the name means the same quoted and unquoted and never needs
    /// escaping in SQL or in a channel name.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        triage_event_store::url::check_pg_schema_name(&self.schema, MAX_SCHEMA_BYTES)
            .map_err(|message| Error::Refused { message, source: None })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_validated() {
        for good in ["public", "triage", "_x", "triage_tmp_0123456789abcdef"] {
            assert!(
                PostgresOptions::in_schema(good).validate().is_ok(),
                "{good} was refused"
            );
        }
        let too_long = "a".repeat(MAX_SCHEMA_BYTES + 1);
        for bad in ["", "Public", "1abc", "a-b", "a\"b", "pg_catalog", too_long.as_str()] {
            assert!(
                matches!(
                    PostgresOptions::in_schema(bad).validate(),
                    Err(Error::Refused { source: None, .. })
                ),
                "{bad:?} was accepted"
            );
        }
    }
}
