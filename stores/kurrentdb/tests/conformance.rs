//! The port's conformance suite against the KurrentDB backend: through the
//! protocol test double (a fresh server per case), and against a real server
//! when `TRIAGE_ESDB_URL` is set (a fresh namespace per case, so that the
//! server's other streams stay out of each case's `$all`).

use std::sync::Arc;

use triage_event_store::EventStore;
use triage_kurrentdb_testserver::TestServer;
use triage_store_kurrentdb::{KurrentDbEventStore, KurrentDbOptions};

async fn store() -> Option<Arc<dyn EventStore>> {
    let server = TestServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("test server starts");
    let store = KurrentDbEventStore::connect(&server.url(), KurrentDbOptions::default()).expect("client");
    // The server lives as long as the test process; each case has its own.
    std::mem::forget(server);
    Some(Arc::new(store))
}

triage_event_store::conformance_suite!(store);

mod real_server {
    use super::*;

    async fn store() -> Option<Arc<dyn EventStore>> {
        let url = std::env::var("TRIAGE_ESDB_URL").ok()?;
        let options = KurrentDbOptions {
            namespace: Some(format!("conformance_{}", uuid::Uuid::new_v4().simple())),
            ..KurrentDbOptions::default()
        };
        Some(Arc::new(KurrentDbEventStore::connect(&url, options).expect("client")))
    }

    triage_event_store::conformance_suite!(store);
}
