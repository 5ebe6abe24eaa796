//! A statement of `triage_append` cancelled at the worst moment must not
//! leave the schema's append lock behind. The lock is a session lock, held
//! only around taking the transaction id and the positions; a pooled
//! connection that kept it would stop every append of every process for as
//! long as the connection lives.

mod common;

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use triage_event_store::{EventData, EventStore, ExpectedRevision, StreamName};
use triage_store_postgres::PostgresOptions;
use uuid::Uuid;

/// The first key of the schema's append lock ("TRIA").
const APPEND_LOCK_CLASS: i32 = 0x5452_4941;

fn stream() -> StreamName {
    StreamName::new(format!("ticket-{}", Uuid::new_v4().simple())).unwrap()
}

/// One append of one event to a new stream, straight through the function.
async fn call_triage_append(client: &Client, schema: &str, event: &EventData) -> Result<(), tokio_postgres::Error> {
    client
        .query_one(
            &format!(
                r#"SELECT last_position FROM "{schema}".triage_append(
                       ARRAY[$1], ARRAY[-1]::bigint[], ARRAY[1], ARRAY[0], $2, $3, $4, $5)"#
            ),
            &[
                &stream().as_str(),
                &vec![event.id],
                &vec![event.event_type.as_str()],
                &vec![event.data.as_slice()],
                &vec![event.metadata.as_slice()],
            ],
        )
        .await
        .map(|_| ())
}

async fn holds_append_lock(observer: &Client, pid: i32, granted: bool) -> bool {
    observer
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND locktype = 'advisory' \
             AND classid = $2::int::oid AND granted = $3)",
            &[&pid, &APPEND_LOCK_CLASS, &granted],
        )
        .await
        .unwrap()
        .get(0)
}

/// The lock is granted and the statement cancelled in one step, as a
/// `statement_timeout` or `lock_timeout` firing at the grant does. Until
/// schema version 5 every trial left the lock with the idle session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_at_the_grant_of_the_append_lock_does_not_keep_it() {
    let Some(url) = common::url("a_cancel_at_the_grant_of_the_append_lock_does_not_keep_it") else {
        return;
    };
    let store = common::temporary_store(&url, PostgresOptions::default()).await;
    let schema = store.schema().to_owned();
    let holder = common::raw_client(&url).await;
    let observer = common::raw_client(&url).await;
    let trials = 10;
    let mut cancelled = 0;
    for trial in 0..trials {
        let victim = Arc::new(common::raw_client(&url).await);
        let victim_pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
        holder
            .execute(
                "SELECT pg_advisory_lock($1, hashtext($2))",
                &[&APPEND_LOCK_CLASS, &schema],
            )
            .await
            .unwrap();
        let call = {
            let victim = Arc::clone(&victim);
            let schema = schema.clone();
            tokio::spawn(async move { call_triage_append(&victim, &schema, &common::event("Opened")).await })
        };
        while !holds_append_lock(&observer, victim_pid, false).await {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        holder
            .execute(
                "SELECT pg_advisory_unlock($1, hashtext($2)), pg_cancel_backend($3)",
                &[&APPEND_LOCK_CLASS, &schema, &victim_pid],
            )
            .await
            .unwrap();
        if call.await.unwrap().is_err() {
            cancelled += 1;
        }
        assert!(
            !holds_append_lock(&observer, victim_pid, true).await,
            "trial {trial}: a cancelled triage_append left the append lock with its idle session"
        );
    }
    // The trials exercised the cancel, not only appends that got through.
    assert!(cancelled > 0, "no trial was cancelled");
    // And the store still appends.
    tokio::time::timeout(
        Duration::from_secs(10),
        store.append(&stream(), ExpectedRevision::NoStream, vec![common::event("Opened")]),
    )
    .await
    .expect("an append finishes after the cancels")
    .unwrap();
}
