//! The command handler over the KurrentDB backend, through the protocol
//! test double: agents racing on shared tickets (audited from the log), and
//! an outage (the server stopped, then restarted on the same port). The race
//! also runs against a real server, in a fresh namespace, when
//! `TRIAGE_ESDB_URL` is set.

use std::sync::Arc;
use std::time::Duration;

use triage_command_handler::{CommandError, CommandHandler, open_ticket};
use triage_domain::{Agent, Command, CommandEnvelope, Role};
use triage_event_store::{Error as StoreError, EventStore};
use triage_kurrentdb_testserver::TestServer;
use triage_store_kurrentdb::{KurrentDbEventStore, KurrentDbOptions};
use triage_tests::race_and_audit;

fn connect(url: &str) -> Arc<dyn EventStore> {
    connect_in(url, None)
}

fn connect_in(url: &str, namespace: Option<String>) -> Arc<dyn EventStore> {
    let options = KurrentDbOptions {
        namespace,
        deadline: Duration::from_secs(5),
        max_backoff: Duration::from_millis(500),
        ..KurrentDbOptions::default()
    };
    Arc::new(KurrentDbEventStore::connect(url, options).expect("client"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_racing_on_the_kurrentdb_store() {
    let server = TestServer::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    race_and_audit(connect(&server.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_racing_on_a_real_kurrentdb_server() {
    let Ok(url) = std::env::var("TRIAGE_ESDB_URL") else {
        eprintln!("skipped: agents_racing_on_a_real_kurrentdb_server (TRIAGE_ESDB_URL is not set)");
        return;
    };
    let namespace = format!("race_{}", uuid::Uuid::new_v4().simple());
    race_and_audit(connect_in(&url, Some(namespace))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_fail_clearly_during_an_outage_and_succeed_after_it() {
    let server = TestServer::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let address = server.address();
    let store = connect(&server.url());
    let handler = CommandHandler::new(store.clone());
    let intake = Agent::new("intake", Role::Intake);
    let first = handler
        .handle(open_ticket(intake.clone(), "Charged twice", "March invoice", None))
        .await
        .expect("the server is up");

    let log = server.stop().await;
    let during = handler
        .handle(open_ticket(intake.clone(), "Cannot log in", "Reset link expired", None))
        .await;
    match &during {
        Err(CommandError::Store(StoreError::Backend { message, .. })) => {
            assert!(message.contains("unavailable"), "a clear message: {message}");
            assert!(
                message.contains(&address.port().to_string()),
                "names the server: {message}"
            );
        }
        other => panic!("expected a store error during the outage, got {other:?}"),
    }
    // A second command in the outage fails the same way, without hanging.
    let started = std::time::Instant::now();
    assert!(
        handler
            .handle(open_ticket(intake.clone(), "Again", "Still down", None))
            .await
            .is_err()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "failed within the deadline"
    );

    let restarted = TestServer::restart(address, log).await.expect("same port again");
    // Once the server is back, commands succeed with the same store object,
    // and what was written before the outage is still there.
    let mut recovered = None;
    for _ in 0..50 {
        match handler
            .handle(CommandEnvelope::new(
                first.ticket_id,
                Agent::new("c1", Role::Classifier),
                Command::StartClassification { lease_secs: None },
            ))
            .await
        {
            Ok(accepted) => {
                recovered = Some(accepted);
                break;
            }
            Err(CommandError::Store(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(other) => panic!("unexpected error after the restart: {other}"),
        }
    }
    let accepted = recovered.expect("commands succeed after the server is back");
    assert_eq!(accepted.ticket_id, first.ticket_id);
    assert_eq!(accepted.revision, first.revision + 1);
    assert_eq!(
        restarted.log().len(),
        2,
        "one event before the outage, one after; none during"
    );
}

/// A retried refusal queued with new ones. On KurrentDB an `Any` append
/// whose ids are only partly stored is written, not refused, so refusal
/// records are appended one by one there, where the retried one is an
/// idempotent no-op: each refusal is recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_refusal_in_a_burst_is_recorded_once_on_kurrentdb() {
    use triage_event_store::testing::CountingStore;
    use triage_event_store::{ReadStream, StreamName};
    let server = TestServer::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let store = Arc::new(CountingStore::new(connect(&server.url())));
    let handler = CommandHandler::new(store.clone() as Arc<dyn EventStore>).with_rejections_recorded_in_background();
    let intake = Agent::new("intake", Role::Intake);
    let ticket = handler
        .handle(open_ticket(intake, "Charged twice", "March invoice", None))
        .await
        .unwrap()
        .ticket_id;
    let too_early = || {
        CommandEnvelope::new(
            ticket,
            Agent::new("drafter-1", Role::Drafter),
            Command::SubmitDraft {
                claim_id: uuid::Uuid::new_v4(),
                body: "too early".into(),
            },
        )
    };
    let first = too_early();
    assert!(handler.handle(first.clone()).await.is_err());
    handler.rejections_recorded().await;

    let (release, released) = tokio::sync::oneshot::channel::<()>();
    store.before_next_append(async move {
        let _ = released.await;
    });
    let (held, later) = (too_early(), too_early());
    for envelope in [held.clone(), first.clone(), later.clone()] {
        assert!(matches!(
            handler.handle(envelope).await,
            Err(CommandError::Rejected { .. })
        ));
    }
    release.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), handler.rejections_recorded())
        .await
        .expect("the records land");
    let rejections = StreamName::new(triage_domain::CommandRejected::stream_name(ticket)).unwrap();
    let records = store.read_stream(&rejections, ReadStream::forwards()).await.unwrap();
    let recorded: Vec<uuid::Uuid> = records.iter().map(|record| record.id).collect();
    let expected: Vec<uuid::Uuid> = [&first, &held, &later]
        .iter()
        .map(|envelope| triage_domain::CommandRejected::record_id(envelope.command_id, ticket))
        .collect();
    assert_eq!(recorded, expected, "each refusal recorded once");
}

/// A load caught up from a cache entry the handler wrote (appended, not
/// read) equals a whole read, on KurrentDB and on SQLite: the positions
/// and ids it remembered are the ones the store gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_caught_up_from_an_appended_entry_matches_a_whole_read() {
    let server = TestServer::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let sqlite: Arc<dyn EventStore> = Arc::new(
        triage_store_sqlite::SqliteEventStore::open_temporary_with(triage_store_sqlite::SqliteOptions::default())
            .unwrap(),
    );
    for store in [connect(&server.url()), sqlite] {
        let handler = CommandHandler::new(store.clone());
        let intake = Agent::new("intake", Role::Intake);
        let ticket = handler
            .handle(open_ticket(intake, "a", "b", None))
            .await
            .unwrap()
            .ticket_id;
        let claim = CommandEnvelope::new(
            ticket,
            Agent::new("c-1", Role::Classifier),
            Command::StartClassification { lease_secs: Some(30) },
        );
        let claim_id = claim.command_id;
        handler.handle(claim).await.unwrap();
        let other = CommandHandler::new(store.clone());
        other
            .handle(CommandEnvelope::new(
                ticket,
                Agent::new("c-1", Role::Classifier),
                Command::ExtendLease {
                    claim_id,
                    lease_secs: Some(30),
                },
            ))
            .await
            .unwrap();
        let whole = CommandHandler::new(store.clone())
            .with_cache_capacity(0)
            .load(ticket)
            .await
            .unwrap();
        let caught_up = handler.load(ticket).await.unwrap();
        assert_eq!(caught_up.history, whole.history, "{}", store.describe());
        assert_eq!(caught_up.revision, whole.revision);
    }
}
