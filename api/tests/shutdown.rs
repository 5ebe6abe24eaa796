//! Graceful shutdown on a real socket: a command in flight when shutdown
//! begins still finishes and is stored; then the port closes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use triage_api::{AgentsFile, AppState, Authenticator, ServeOptions};
use triage_command_handler::CommandHandler;
use triage_domain::{Role, TicketId};
use triage_event_store::{
    AppendResult, EventData, EventStore, ExpectedRevision, InMemoryEventStore, Position, ReadAll, ReadStream,
    RecordedEvent, Result, StreamName, SubscribeToAll, Subscription,
};
use triage_projections::{Projector, ReadModelDb};

/// The in-memory store, with appends that take half a second when asked,
/// saying when one has started.
#[derive(Debug)]
struct SlowStore {
    inner: Arc<InMemoryEventStore>,
    slow: AtomicBool,
    append_started: tokio::sync::Notify,
}

#[async_trait]
impl EventStore for SlowStore {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedRevision,
        events: Vec<EventData>,
    ) -> Result<AppendResult> {
        if self.slow.load(Ordering::SeqCst) {
            self.append_started.notify_one();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.inner.append(stream, expected, events).await
    }

    async fn read_stream(&self, stream: &StreamName, options: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.inner.read_stream(stream, options).await
    }

    async fn read_all(&self, options: ReadAll) -> Result<Vec<RecordedEvent>> {
        self.inner.read_all(options).await
    }

    async fn head_position(&self) -> Result<Option<Position>> {
        self.inner.head_position().await
    }

    async fn read_event(&self, event_id: uuid::Uuid) -> Result<Option<RecordedEvent>> {
        self.inner.read_event(event_id).await
    }

    fn subscribe_to_all(self: Arc<Self>, options: SubscribeToAll) -> Subscription {
        self.inner.clone().subscribe_to_all(options)
    }

    fn describe(&self) -> String {
        "slow memory".to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_commands_finish_before_the_server_stops() {
    let slow = Arc::new(SlowStore {
        inner: Arc::new(InMemoryEventStore::new()),
        slow: AtomicBool::new(false),
        append_started: tokio::sync::Notify::new(),
    });
    let store: Arc<dyn EventStore> = slow.clone();
    let mut file = AgentsFile::default();
    let token = file.add("intake", &[Role::Intake]).unwrap();
    let state = AppState::new(
        CommandHandler::new(store.clone()),
        Projector::new(store.clone(), ReadModelDb::in_memory().unwrap()),
        Authenticator::Fixed(file),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(triage_api::serve(listener, state, ServeOptions::default(), async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let ready = http.get(format!("http://{address}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    slow.slow.store(true, Ordering::SeqCst);
    let request = tokio::spawn({
        let http = http.clone();
        async move {
            http.post(format!("http://{address}/v1/tickets"))
                .bearer_auth(token)
                .json(&json!({"subject": "In flight", "body": "b"}))
                .send()
                .await
        }
    });
    // The command is in flight: its append has begun.
    tokio::time::timeout(Duration::from_secs(10), slow.append_started.notified())
        .await
        .expect("the request reached the store");
    stop.send(()).unwrap();
    let response = request.await.unwrap().expect("the in-flight request is answered");
    assert_eq!(response.status(), 201);
    let opened: Value = response.json().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stops")
        .unwrap()
        .expect("a clean stop");
    let id: TicketId = opened["id"].as_str().unwrap().parse().unwrap();
    let stored = store
        .read_stream(&StreamName::new(id.stream_name()).unwrap(), ReadStream::forwards())
        .await
        .expect("the command's event was stored");
    assert_eq!(stored.len(), 1);
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "the port is closed after shutdown"
    );
}
