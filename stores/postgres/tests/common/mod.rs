//! Shared by the PostgreSQL tests: the server comes from `TRIAGE_PG_URL`,
//! and every store lives in a fresh schema of its own
//! ([`PostgresEventStore::connect_temporary`]), dropped with it.

#![allow(dead_code, unreachable_pub)]

use tokio_postgres::{Client, NoTls};
use triage_event_store::EventData;
use triage_store_postgres::{PostgresEventStore, PostgresOptions};
use uuid::Uuid;

/// The server URL, or `None` after saying plainly that `test` is skipped.
pub fn url(test: &str) -> Option<String> {
    match std::env::var("TRIAGE_PG_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipped: {test} (TRIAGE_PG_URL is not set; e.g. postgres://postgres@127.0.0.1:5432/postgres)");
            None
        }
    }
}

/// A fresh store in a schema of its own.
pub async fn temporary_store(url: &str, options: PostgresOptions) -> PostgresEventStore {
    PostgresEventStore::connect_temporary(url, options)
        .await
        .expect("a temporary store opens")
}

/// A plain connection for looking at and tampering with the tables.
pub async fn raw_client(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("raw connection");
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            eprintln!("raw connection ended: {error}");
        }
    });
    client
}

/// Another session that appends `event` to `stream` of the store in
/// `schema` and keeps its transaction open, holding the stream's lock:
/// the store's appends to that stream wait behind it until it ends
/// (`ROLLBACK` or `COMMIT` on the returned client).
pub async fn hold_stream_lock(url: &str, schema: &str, stream: &str, event: &EventData) -> Client {
    let locker = raw_client(url).await;
    locker.batch_execute("BEGIN").await.unwrap();
    locker
        .query_one(
            &format!(
                r#"SELECT last_position FROM "{schema}".triage_append(
                       ARRAY[$1], ARRAY[NULL]::bigint[], ARRAY[1], ARRAY[0], $2, $3, $4, $5)"#
            ),
            &[
                &stream,
                &vec![event.id],
                &vec![event.event_type.as_str()],
                &vec![event.data.as_slice()],
                &vec![event.metadata.as_slice()],
            ],
        )
        .await
        .unwrap();
    locker
}

/// A small event with a fresh id.
pub fn event(event_type: &str) -> EventData {
    EventData {
        id: Uuid::new_v4(),
        event_type: event_type.to_owned(),
        data: br#"{"test":true}"#.to_vec(),
        metadata: b"{}".to_vec(),
    }
}

/// Runs `sql` when dropped, on a connection of its own made in a thread of
/// its own: also when the test fails and unwinds, so that what a test
/// made on the server outside its database (roles are the cluster's) is
/// removed whatever happens.
pub struct CleanUp {
    url: String,
    sql: String,
}

impl CleanUp {
    pub fn new(url: &str, sql: String) -> Self {
        CleanUp {
            url: url.to_owned(),
            sql,
        }
    }
}

impl Drop for CleanUp {
    fn drop(&mut self) {
        let (url, sql) = (self.url.clone(), self.sql.clone());
        let cleaned = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the clean-up");
            runtime.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(30), async {
                    let client = raw_client(&url).await;
                    client.batch_execute(&sql).await.map_err(|error| error.to_string())
                })
                .await
                .unwrap_or_else(|_| Err("no answer in 30 s".to_owned()))
            })
        })
        .join();
        let failure = match cleaned {
            Ok(Ok(())) => return,
            Ok(Err(error)) => format!("clean-up failed: {error}: {}", self.sql),
            Err(_) => format!("clean-up panicked: {}", self.sql),
        };
        // A test that passed must not leave roles behind unnoticed; one
        // that is failing already says why.
        if std::thread::panicking() {
            eprintln!("{failure}");
        } else {
            panic!("{failure}");
        }
    }
}
