//! Projections over the KurrentDB backend (through the protocol test
//! double): a projector following the log live is stopped mid-way and a new
//! one resumes from the saved checkpoint, a `(commit, prepare)` position.
//! Nothing is skipped and nothing applied twice: the counts equal the log's
//! and the model equals a clean rebuild. Against a real server too, in a
//! fresh namespace, when `TRIAGE_ESDB_URL` is set.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use triage_event_store::EventStore;
use triage_kurrentdb_testserver::TestServer;
use triage_projections::{Projector, ReadModelDb};
use triage_store_kurrentdb::{KurrentDbEventStore, KurrentDbOptions};

use support::{Workload, clean_digests, digest, projected_events};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_projection_resumes_from_its_checkpoint_on_kurrentdb() {
    let server = TestServer::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let store: Arc<dyn EventStore> =
        Arc::new(KurrentDbEventStore::connect(&server.url(), KurrentDbOptions::default()).unwrap());
    stop_and_resume(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_projection_resumes_from_its_checkpoint_on_a_real_kurrentdb_server() {
    let Ok(url) = std::env::var("TRIAGE_ESDB_URL") else {
        eprintln!("skipped: projection resume on a real KurrentDB server (TRIAGE_ESDB_URL is not set)");
        return;
    };
    let options = KurrentDbOptions {
        namespace: Some(format!("projections_{}", uuid::Uuid::new_v4().simple())),
        ..KurrentDbOptions::default()
    };
    stop_and_resume(Arc::new(KurrentDbEventStore::connect(&url, options).unwrap())).await;
}

async fn stop_and_resume(store: Arc<dyn EventStore>) {
    let dir = tempfile::tempdir().unwrap();
    let read_models = dir.path().join("triage.read.db");

    let mut workload = Workload::new(store.clone());
    workload.random(40, 4, 11).await;

    // The first projector follows the log live while commands keep coming.
    let first = Projector::new(store.clone(), ReadModelDb::open(&read_models).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let live = tokio::spawn({
        let (first, stop) = (first.clone(), stop.clone());
        async move { first.run_live(stop).await }
    });
    workload.random(40, 4, 12).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    live.await.unwrap().expect("the live projector stops cleanly");
    let stopped = first.status().await.unwrap();
    let stopped_at = stopped[0].checkpoint.expect("the first projector saved a checkpoint");
    drop(first);

    // More history arrives while no projector runs.
    workload.random(40, 4, 13).await;
    let (projected, head) = projected_events(store.as_ref()).await;
    assert!(head > Some(stopped_at), "events arrived after the stop");

    // A new projector on the same file starts from the saved checkpoint.
    let second = Projector::new(store.clone(), ReadModelDb::open(&read_models).unwrap());
    let before = second.status().await.unwrap();
    assert_eq!(
        before[0].checkpoint,
        Some(stopped_at),
        "the checkpoint survived the restart"
    );
    second.catch_up().await.unwrap();
    for status in second.status().await.unwrap() {
        assert_eq!(status.checkpoint, head, "{status:?}");
        assert_eq!(
            status.events_applied, projected,
            "every event applied exactly once: {status:?}"
        );
    }
    let clean = clean_digests(store.clone()).await;
    assert_eq!(digest(&second, "tickets"), clean[0], "tickets equal a clean rebuild");
    assert_eq!(digest(&second, "stats"), clean[1], "stats equal a clean rebuild");
    assert!(
        workload.accepted > 50,
        "the workload did real work: {}",
        workload.accepted
    );
}
