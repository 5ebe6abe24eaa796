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
