//! Graceful shutdown on a real socket: a command in flight when shutdown
//! begins still finishes and is stored; then the port closes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use triage_api::{AgentsFile, AppState, Authenticator, Limits, ServeOptions};
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

/// A server whose agent holds `token`, with `limits`, on a fresh port.
async fn start(
    limits: Limits,
    options: ServeOptions,
) -> (
    std::net::SocketAddr,
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut file = AgentsFile::default();
    let token = file.add("intake", &[Role::Intake]).unwrap();
    let state = AppState::with_limits(
        CommandHandler::new(store.clone()),
        Projector::new(store, ReadModelDb::in_memory().unwrap()),
        Authenticator::Fixed(file),
        limits,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(triage_api::serve(listener, state, options, async {
        let _ = stopped.await;
    }));
    (address, token, stop, server)
}

/// Sends the head of a `POST /v1/tickets` whose body never arrives whole.
async fn stall(address: std::net::SocketAddr, token: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /v1/tickets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"sub"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket
}

/// A client that stops sending halfway through its request cannot hold
/// the server open after shutdown for longer than the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_does_not_hold_shutdown_open() {
    let (address, token, stop, server) = start(
        Limits {
            body_timeout: Duration::from_secs(600),
            ..Limits::default()
        },
        ServeOptions {
            shutdown_grace: Duration::from_millis(300),
            ..ServeOptions::default()
        },
    )
    .await;
    let _stalled = stall(address, &token).await;
    // The request has reached the server before shutdown begins.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops once the grace period is over")
        .unwrap()
        .expect("a clean stop");
}

/// A body still arriving after `body_timeout` is refused with a problem
/// document, and the server goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_takes_too_long_is_refused() {
    use tokio::io::AsyncReadExt;
    let (address, token, stop, server) = start(
        Limits {
            body_timeout: Duration::from_millis(300),
            ..Limits::default()
        },
        ServeOptions::default(),
    )
    .await;
    let mut stalled = stall(address, &token).await;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut answer))
        .await
        .expect("answered well before the client would finish")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    let ready = reqwest::get(format!("http://{address}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
