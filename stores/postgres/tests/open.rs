//! Opening safety and bad input: a store from a newer Triage or tables that
//! are not a store are refused with `Error::Incompatible` and left
//! unchanged; a role without privileges is `Error::Refused` and an
//! unreachable server `Error::Backend`, each with a clear message; a
//! privilege revoked or writes turned off while the store runs are refused,
//! not passed off as an outage; migrations run once even when several
//! processes start at once; the password never shows.

mod common;

use std::time::Duration;

use tokio_postgres::Client;
use triage_event_store::{Error, EventStore, ExpectedRevision, ReadStream, StreamName};
use triage_store_postgres::{PostgresEventStore, PostgresOptions};
use uuid::Uuid;

fn fresh_schema() -> String {
    format!("triage_test_{}", &Uuid::new_v4().simple().to_string()[..16])
}

async fn drop_schema(client: &Client, schema: &str) {
    client
        .batch_execute(&format!(r#"DROP SCHEMA IF EXISTS "{schema}" CASCADE"#))
        .await
        .unwrap();
}

/// Everything in `schema` that a refused open must not change: its
/// objects, the version row and the events.
/// What a test that made `schema` and `role` runs at its end: drops
/// both, and whatever the role still owns or was granted.
fn drop_schema_and_role(schema: &str, role: &str) -> String {
    format!(
        r#"DROP SCHEMA IF EXISTS "{schema}" CASCADE;
           DO $$ BEGIN
               IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN
                   DROP OWNED BY "{role}"; DROP ROLE "{role}";
               END IF;
           END $$;"#
    )
}

async fn snapshot(client: &Client, schema: &str) -> Vec<String> {
    let mut state: Vec<String> = client
        .query(
            "SELECT c.relname || ':' || c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1
             UNION ALL
             SELECT p.proname::text || ':function' FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = $1
             ORDER BY 1",
            &[&schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    for table in ["triage_schema", "triage_events"] {
        let exists: bool = client
            .query_one(&format!("SELECT to_regclass('\"{schema}\".{table}') IS NOT NULL"), &[])
            .await
            .unwrap()
            .get(0);
        if exists {
            let rows = client
                .query(
                    &format!(r#"SELECT row_to_json(t)::text FROM "{schema}".{table} t"#),
                    &[],
                )
                .await
                .unwrap();
            state.extend(rows.iter().map(|row| row.get::<_, String>(0)));
        }
    }
    state
}

/// `url` with its user (and password) replaced by `userinfo`, for a URL of
/// the form `postgres://[userinfo@]host…`.
fn with_userinfo(url: &str, userinfo: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let host_part = match rest[..authority_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    Some(format!("{scheme}://{userinfo}@{host_part}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_from_a_newer_version_is_refused_and_left_unchanged() {
    let Some(url) = common::url("a_store_from_a_newer_version_is_refused_and_left_unchanged") else {
        return;
    };
    let admin = common::raw_client(&url).await;
    let schema = fresh_schema();
    let store = PostgresEventStore::connect(&url, PostgresOptions::in_schema(&schema))
        .await
        .unwrap();
    let stream = StreamName::new("ticket-1").unwrap();
    store
        .append(
            &stream,
            ExpectedRevision::NoStream,
            vec![common::event("A"), common::event("B")],
        )
        .await
        .unwrap();
    drop(store);
    admin
        .batch_execute(&format!(r#"UPDATE "{schema}".triage_schema SET version = 999"#))
        .await
        .unwrap();
    let before = snapshot(&admin, &schema).await;

    let refused = PostgresEventStore::connect(&url, PostgresOptions::in_schema(&schema)).await;
    let message = match refused {
        Err(Error::Incompatible(message)) => message,
        other => panic!("expected Error::Incompatible, got {other:?}"),
    };
    eprintln!("refused: {message}");
    for needle in ["newer", "999", "up to 5", schema.as_str(), "nothing was modified"] {
        assert!(message.contains(needle), "message says {needle:?}: {message}");
    }
    assert_eq!(snapshot(&admin, &schema).await, before, "the schema is unchanged");
    drop_schema(&admin, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_that_are_not_a_store_are_refused_and_left_unchanged() {
    let Some(url) = common::url("tables_that_are_not_a_store_are_refused_and_left_unchanged") else {
        return;
    };
    let admin = common::raw_client(&url).await;
    let schema = fresh_schema();
    admin
        .batch_execute(&format!(
            r#"CREATE SCHEMA "{schema}"; CREATE TABLE "{schema}".triage_events (note text);
               INSERT INTO "{schema}".triage_events VALUES ('someone else''s');"#
        ))
        .await
        .unwrap();
    let before = snapshot(&admin, &schema).await;
    match PostgresEventStore::connect(&url, PostgresOptions::in_schema(&schema)).await {
        Err(Error::Incompatible(message)) => {
            assert!(message.contains("not a Triage event store"), "{message}");
            assert!(message.contains(&schema), "{message}");
        }
        other => panic!("expected Error::Incompatible, got {other:?}"),
    }
    assert_eq!(snapshot(&admin, &schema).await, before, "the schema is unchanged");
    drop_schema(&admin, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_privileges_fails_with_a_clear_error() {
    let Some(url) = common::url("a_role_without_privileges_fails_with_a_clear_error") else {
        return;
    };
    let admin = common::raw_client(&url).await;
    let role = format!("triage_noprivs_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let Some(role_url) = with_userinfo(&url, &role) else {
        eprintln!(
            "skipped: a_role_without_privileges_fails_with_a_clear_error (TRIAGE_PG_URL is not a postgres:// URL)"
        );
        return;
    };
    // LOGIN but no privileges at all: only what PUBLIC has (CONNECT).
    admin
        .batch_execute(&format!(r#"CREATE ROLE "{role}" LOGIN"#))
        .await
        .unwrap();
    // A store it would have to create, and one that exists.
    let (fresh, existing) = (fresh_schema(), fresh_schema());
    let _clean_up = common::CleanUp::new(
        &url,
        format!(
            r#"DROP SCHEMA IF EXISTS "{fresh}" CASCADE; DROP SCHEMA IF EXISTS "{existing}" CASCADE;
               DROP ROLE IF EXISTS "{role}";"#
        ),
    );

    let error = PostgresEventStore::connect(&role_url, PostgresOptions::in_schema(&fresh))
        .await
        .expect_err("a role without privileges cannot create a store");
    let message = error.to_string();
    eprintln!("refused: {message}");
    assert!(matches!(error, Error::Refused { .. }), "{error:?}");
    assert!(
        message.contains(&role) && message.contains("lacks a privilege"),
        "{message}"
    );
    let created: bool = admin
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&fresh],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!created, "nothing was created");

    // A store that exists but that it may not use.
    drop(
        PostgresEventStore::connect(&url, PostgresOptions::in_schema(&existing))
            .await
            .unwrap(),
    );
    let before = snapshot(&admin, &existing).await;
    let error = PostgresEventStore::connect(&role_url, PostgresOptions::in_schema(&existing))
        .await
        .expect_err("a role without privileges cannot open a store");
    let message = error.to_string();
    eprintln!("refused: {message}");
    assert!(
        message.contains(&role) && message.contains("lacks a privilege"),
        "{message}"
    );
    assert!(message.contains(&existing), "{message}");
    assert_eq!(snapshot(&admin, &existing).await, before);
}

/// What retrying cannot change, once the store is open: a privilege
/// revoked. The append is `Refused` (not `Backend`, which callers retry as
/// an outage), says what is wrong, and stored nothing. A server that takes
/// no writes says so, as an outage (it may be a standby mid-failover).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_privilege_or_a_read_only_server_is_refused_while_running() {
    let Some(url) = common::url("a_revoked_privilege_or_a_read_only_server_is_refused_while_running") else {
        return;
    };
    let admin = common::raw_client(&url).await;
    let role = format!("triage_revoked_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let Some(role_url) = with_userinfo(&url, &role) else {
        eprintln!(
            "skipped: a_revoked_privilege_or_a_read_only_server_is_refused_while_running \
             (TRIAGE_PG_URL is not a postgres:// URL)"
        );
        return;
    };
    let schema = fresh_schema();
    let _clean_up = common::CleanUp::new(&url, drop_schema_and_role(&schema, &role));
    let owner = PostgresEventStore::connect(&url, PostgresOptions::in_schema(&schema))
        .await
        .expect("the store is created");
    admin
        .batch_execute(&format!(
            r#"CREATE ROLE "{role}" LOGIN;
               GRANT USAGE ON SCHEMA "{schema}" TO "{role}";
               GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA "{schema}" TO "{role}";"#
        ))
        .await
        .unwrap();
    let stream = StreamName::new("ticket-refused").unwrap();
    let store = PostgresEventStore::connect(&role_url, PostgresOptions::in_schema(&schema))
        .await
        .expect("a role with USAGE, SELECT and INSERT opens the store");
    store
        .append(&stream, ExpectedRevision::NoStream, vec![common::event("Opened")])
        .await
        .expect("the role may append");

    assert!(store.accepts_writes().await.unwrap(), "the role may append");
    admin
        .batch_execute(&format!(r#"REVOKE INSERT ON "{schema}".triage_events FROM "{role}""#))
        .await
        .unwrap();
    // Readiness probes see it without writing.
    assert!(
        !store.accepts_writes().await.unwrap(),
        "a role that may not append says the store takes no writes"
    );
    let error = store
        .append(&stream, ExpectedRevision::Exact(0), vec![common::event("Classified")])
        .await
        .expect_err("the privilege is gone");
    eprintln!("refused: {error}");
    assert!(matches!(error, Error::Refused { .. }), "{error:?}");
    assert!(!error.is_unavailable(), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains(&role) && message.contains("lacks a privilege"),
        "{message}"
    );

    // Writes turned off for the role's sessions: a new store's connections.
    admin
        .batch_execute(&format!(
            r#"GRANT INSERT ON "{schema}".triage_events TO "{role}";
               ALTER ROLE "{role}" SET default_transaction_read_only = on;"#
        ))
        .await
        .unwrap();
    drop(store);
    let read_only = match PostgresEventStore::connect(&role_url, PostgresOptions::in_schema(&schema)).await {
        Ok(store) => {
            // Readiness probes can tell without writing.
            assert!(
                !store.accepts_writes().await.unwrap(),
                "the store says it takes no writes"
            );
            store
                .append(&stream, ExpectedRevision::Exact(0), vec![common::event("Classified")])
                .await
                .expect_err("the server takes no writes from the role")
        }
        // Opening may already have to write (the migration check).
        Err(error) => error,
    };
    eprintln!("refused: {read_only}");
    // Perhaps a standby during a failover: an outage, which a retry may
    // get past, said as what it is.
    assert!(matches!(read_only, Error::Backend { .. }), "{read_only:?}");
    assert!(read_only.is_unavailable());
    assert!(read_only.to_string().contains("accepts no writes"), "{read_only}");

    assert!(
        owner.accepts_writes().await.unwrap(),
        "the owner's sessions take writes"
    );
    let stored = owner
        .read_stream(&stream, ReadStream::forwards())
        .await
        .expect("the stream reads");
    assert_eq!(stored.len(), 1, "only the first append was stored: {stored:?}");
    drop(owner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processes_starting_at_once_migrate_once_and_reopening_keeps_the_events() {
    let Some(url) = common::url("processes_starting_at_once_migrate_once_and_reopening_keeps_the_events") else {
        return;
    };
    let admin = common::raw_client(&url).await;
    let schema = fresh_schema();
    let mut opening = Vec::new();
    for _ in 0..6 {
        let url = url.clone();
        let schema = schema.clone();
        opening.push(tokio::spawn(async move {
            PostgresEventStore::connect(&url, PostgresOptions::in_schema(schema)).await
        }));
    }
    let mut stores = Vec::new();
    for task in opening {
        stores.push(task.await.unwrap().expect("every concurrent open succeeds"));
    }
    let version: i32 = admin
        .query_one(&format!(r#"SELECT version FROM "{schema}".triage_schema"#), &[])
        .await
        .unwrap()
        .get(0);
    // Version 4: triage_append takes batches, with a path of its own for
    // a batch of one append.
    assert_eq!(version, 5);

    let stream = StreamName::new("ticket-reopen").unwrap();
    let events = vec![common::event("A"), common::event("B")];
    let written = stores[0]
        .append(&stream, ExpectedRevision::NoStream, events.clone())
        .await
        .unwrap();
    // Another "process" on the same schema sees it at once.
    let seen = stores[3].read_stream(&stream, ReadStream::forwards()).await.unwrap();
    assert_eq!(
        seen.iter().map(|e| e.id).collect::<Vec<_>>(),
        [events[0].id, events[1].id]
    );
    drop(stores);

    let reopened = PostgresEventStore::connect(&url, PostgresOptions::in_schema(&schema))
        .await
        .unwrap();
    let read = reopened.read_stream(&stream, ReadStream::forwards()).await.unwrap();
    assert_eq!(
        read.iter().map(|e| e.id).collect::<Vec<_>>(),
        [events[0].id, events[1].id]
    );
    assert_eq!(reopened.head_position().await.unwrap(), Some(written.position));
    drop(reopened);
    drop_schema(&admin, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_is_never_described() {
    let Some(url) = common::url("the_password_is_never_described") else {
        return;
    };
    let config: tokio_postgres::Config = url.parse().unwrap();
    // With a password in the URL already, that one must not show; without
    // one, the server (trust auth) ignores the one added here.
    let (url, password) = match config.get_password() {
        Some(password) => (url.clone(), String::from_utf8_lossy(password).into_owned()),
        None => {
            let user = config.get_user().unwrap_or("postgres");
            let Some(url) = with_userinfo(&url, &format!("{user}:s3cret-pw")) else {
                eprintln!("skipped: the_password_is_never_described (TRIAGE_PG_URL is not a postgres:// URL)");
                return;
            };
            (url, "s3cret-pw".to_owned())
        }
    };
    let store = PostgresEventStore::connect_temporary(&url, PostgresOptions::default())
        .await
        .unwrap();
    let described = store.describe();
    assert!(described.starts_with("postgres://"), "{described}");
    assert!(described.contains(store.schema()), "{described}");
    assert!(!described.contains(&password), "{described}");
    assert!(!format!("{store:?}").contains(&password));
}

#[tokio::test]
async fn an_unreachable_server_fails_with_a_clear_error() {
    // Port 1 on the loopback: nothing listens there.
    let options = PostgresOptions {
        connect_timeout: Duration::from_secs(3),
        ..PostgresOptions::default()
    };
    let error = PostgresEventStore::connect("postgres://triage:pw-not-shown@127.0.0.1:1/triage", options)
        .await
        .expect_err("nothing listens on port 1");
    let message = error.to_string();
    assert!(matches!(error, Error::Backend { .. }), "{error:?}");
    assert!(message.contains("127.0.0.1:1"), "{message}");
    assert!(!message.contains("pw-not-shown"), "{message}");
}

#[tokio::test]
async fn invalid_urls_and_schema_names_are_refused() {
    let bad_url = PostgresEventStore::connect("postgres://a:b@h/db?no_such_option=1", PostgresOptions::default()).await;
    assert!(matches!(bad_url, Err(Error::Refused { .. })), "{bad_url:?}");
    let bad_schema = PostgresEventStore::connect(
        "postgres://a@127.0.0.1:1/db",
        PostgresOptions::in_schema("Robert'); DROP TABLE students;--"),
    )
    .await;
    match bad_schema {
        Err(Error::Refused { message, .. }) => assert!(message.contains("invalid PostgreSQL schema name"), "{message}"),
        other => panic!("expected a refused schema name, got {other:?}"),
    }
}

/// A role whose transactions default to SERIALIZABLE (a database setting
/// some teams use) changes nothing: the store's sessions run READ
/// COMMITTED, so stores starting together all open the one schema, and
/// appends racing on shared streams either land or conflict, never fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stricter_default_isolation_changes_nothing() {
    let Some(url) = common::url("a_stricter_default_isolation_changes_nothing") else {
        return;
    };
    let admin = common::raw_client(&url).await;
    let role = format!("triage_serial_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let Some(role_url) = with_userinfo(&url, &role) else {
        eprintln!("skipped: a_stricter_default_isolation_changes_nothing (TRIAGE_PG_URL is not a postgres:// URL)");
        return;
    };
    let database: String = admin.query_one("SELECT current_database()", &[]).await.unwrap().get(0);
    let schema = fresh_schema();
    let _clean_up = common::CleanUp::new(&url, drop_schema_and_role(&schema, &role));
    admin
        .batch_execute(&format!(
            r#"CREATE ROLE "{role}" LOGIN;
               GRANT CREATE ON DATABASE "{database}" TO "{role}";
               ALTER ROLE "{role}" SET default_transaction_isolation = 'serializable';"#
        ))
        .await
        .unwrap();
    // The setting is in force for the role's ordinary sessions.
    let plain = common::raw_client(&role_url).await;
    let isolation: String = plain
        .query_one("SHOW default_transaction_isolation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(isolation, "serializable");

    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (role_url, schema) = (role_url.clone(), schema.clone());
        opening.spawn(async move { PostgresEventStore::connect(&role_url, PostgresOptions::in_schema(schema)).await });
    }
    let mut stores = Vec::new();
    while let Some(opened) = opening.join_next().await {
        stores.push(std::sync::Arc::new(
            opened.unwrap().expect("every store opens the schema"),
        ));
    }

    const STREAMS: usize = 3;
    const APPENDS: usize = 40;
    let mut racing = tokio::task::JoinSet::new();
    for (index, store) in stores.iter().enumerate() {
        let store = store.clone();
        racing.spawn(async move {
            let mut exact_written = 0usize;
            for n in 0..APPENDS {
                let stream = StreamName::new(format!("iso-{}", n % STREAMS)).unwrap();
                store
                    .append(&stream, ExpectedRevision::Any, vec![common::event("Any")])
                    .await
                    .unwrap_or_else(|error| panic!("store {index}: an Any append failed: {error}"));
                let last = match store.read_stream(&stream, ReadStream::backwards().limit(1)).await {
                    Ok(records) => records[0].revision,
                    Err(error) => panic!("store {index}: a read failed: {error}"),
                };
                match store
                    .append(&stream, ExpectedRevision::Exact(last), vec![common::event("Exact")])
                    .await
                {
                    Ok(_) => exact_written += 1,
                    Err(Error::WrongExpectedVersion { .. }) => {}
                    Err(error) => panic!("store {index}: an Exact append failed: {error}"),
                }
            }
            exact_written
        });
    }
    let mut exact_written = 0;
    while let Some(written) = racing.join_next().await {
        exact_written += written.unwrap();
    }
    let mut stored = 0;
    for n in 0..STREAMS {
        let stream = StreamName::new(format!("iso-{n}")).unwrap();
        let records = stores[0].read_stream(&stream, ReadStream::forwards()).await.unwrap();
        for (revision, record) in records.iter().enumerate() {
            assert_eq!(record.revision, revision as u64, "revisions without gaps");
        }
        stored += records.len();
    }
    assert_eq!(
        stored,
        stores.len() * APPENDS + exact_written,
        "every append that landed, once"
    );
    assert!(exact_written > 0, "some Exact appends landed");
    drop(stores);
    drop(plain);
}

/// A store that is fine but cannot be checked right now (here the events
/// table is locked by another session past the opener's lock_timeout) is
/// not called damaged: the error says what failed, and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_checked_now_is_not_called_damaged() {
    let Some(url) = common::url("a_store_that_cannot_be_checked_now_is_not_called_damaged") else {
        return;
    };
    let admin = common::raw_client(&url).await;
    let schema = fresh_schema();
    PostgresEventStore::connect(&url, PostgresOptions::in_schema(&schema))
        .await
        .expect("the store is created");
    let mut locker = common::raw_client(&url).await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute(&format!(
        r#"LOCK TABLE "{schema}".triage_events IN ACCESS EXCLUSIVE MODE"#
    ))
    .await
    .unwrap();
    let separator = if url.contains('?') { '&' } else { '?' };
    let impatient = format!("{url}{separator}options=-c%20lock_timeout%3D200");
    match PostgresEventStore::connect(&impatient, PostgresOptions::in_schema(&schema)).await {
        Err(Error::Backend { message, .. }) => {
            assert!(!message.contains("damaged"), "{message}");
            assert!(message.contains("events table"), "{message}");
        }
        other => panic!("expected Error::Backend, got {other:?}"),
    }
    lock.rollback().await.unwrap();
    PostgresEventStore::connect(&url, PostgresOptions::in_schema(&schema))
        .await
        .expect("once the lock is gone the store opens");
    drop_schema(&admin, &schema).await;
}

/// An events table that lost a column is a damaged store, said with the
/// server's own words, and left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_table_of_the_wrong_shape_is_called_damaged() {
    let Some(url) = common::url("an_events_table_of_the_wrong_shape_is_called_damaged") else {
        return;
    };
    let admin = common::raw_client(&url).await;
    let schema = fresh_schema();
    PostgresEventStore::connect(&url, PostgresOptions::in_schema(&schema))
        .await
        .expect("the store is created");
    admin
        .batch_execute(&format!(r#"ALTER TABLE "{schema}".triage_events DROP COLUMN metadata"#))
        .await
        .unwrap();
    let before = snapshot(&admin, &schema).await;
    match PostgresEventStore::connect(&url, PostgresOptions::in_schema(&schema)).await {
        Err(Error::Incompatible(message)) => {
            assert!(message.contains("damaged"), "{message}");
            assert!(message.contains("\"metadata\" does not exist"), "{message}");
        }
        other => panic!("expected Error::Incompatible, got {other:?}"),
    }
    assert_eq!(snapshot(&admin, &schema).await, before, "the schema is unchanged");
    drop_schema(&admin, &schema).await;
}
