//! The MCP front door through a real MCP client (rmcp's): over streamable
//! HTTP at `/mcp` on a real socket, and over an in-process pipe standing in
//! for stdio. The client lists the tools and takes a ticket from NEW to
//! RESOLVED; the token decides what it may do.

use std::sync::Arc;

use rmcp::model::{CallToolRequestParams, CallToolResult, ClientConfig};
use rmcp::service::{Peer, RoleClient};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ServiceExt, service::RunningService};
use serde_json::{Value, json};
use triage_api::mcp::TriageMcp;
use triage_api::{AgentsFile, AppState, Authenticator, Principal, ServeOptions};
use triage_command_handler::CommandHandler;
use triage_domain::Role;
use triage_event_store::{EventStore, InMemoryEventStore};
use triage_projections::{Projector, ReadModelDb};

const TOOLS: [&str; 13] = [
    "open_ticket",
    "claim_work",
    "get_ticket",
    "list_tickets",
    "ticket_events",
    "stats",
    "submit_classification",
    "submit_draft",
    "resolve_ticket",
    "escalate_to_human",
    "reject_draft",
    "release_claim",
    "heartbeat",
];

fn state() -> (AppState, String, String) {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut file = AgentsFile::default();
    let worker = file
        .add(
            "llm-1",
            &[Role::Intake, Role::Classifier, Role::Drafter, Role::Escalator],
        )
        .unwrap();
    let drafter = file.add("drafter", &[Role::Drafter]).unwrap();
    let state = AppState::new(
        CommandHandler::new(store.clone()),
        Projector::new(store, ReadModelDb::in_memory().unwrap()),
        Authenticator::Fixed(file),
    );
    (state, worker, drafter)
}

async fn call(peer: &Peer<RoleClient>, tool: &str, arguments: Value) -> CallToolResult {
    let arguments = arguments.as_object().cloned().expect("an object");
    peer.call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments))
        .await
        .unwrap_or_else(|error| panic!("{tool} failed at the protocol level: {error}"))
}

fn ok(result: &CallToolResult) -> Value {
    assert_ne!(result.is_error, Some(true), "{result:?}");
    result.structured_content.clone().expect("structured content")
}

/// Lists the tools and works one ticket from NEW to RESOLVED.
async fn new_to_resolved(peer: &Peer<RoleClient>) {
    let tools = peer.list_all_tools().await.expect("tools listed");
    for name in TOOLS {
        let tool = tools
            .iter()
            .find(|tool| tool.name == name)
            .unwrap_or_else(|| panic!("tool {name} is missing"));
        assert!(
            tool.description.as_ref().is_some_and(|d| d.len() > 20),
            "{name} is described"
        );
        assert_eq!(
            tool.input_schema.get("type"),
            Some(&json!("object")),
            "{name} has a JSON schema"
        );
    }
    let claim_schema = &tools
        .iter()
        .find(|t| t.name == "submit_classification")
        .unwrap()
        .input_schema;
    let properties = claim_schema["properties"].as_object().unwrap();
    for field in [
        "ticket_id",
        "claim_id",
        "category",
        "priority",
        "confidence",
        "expected_revision",
    ] {
        assert!(properties.contains_key(field), "submit_classification lacks {field}");
    }

    let opened = ok(&call(
        peer,
        "open_ticket",
        json!({"subject": "Refund", "body": "Charged twice"}),
    )
    .await);
    assert_eq!(opened["state"], "NEW");
    let ticket = opened["id"].as_str().unwrap().to_owned();
    let nothing = ok(&call(peer, "claim_work", json!({"role": "drafter"})).await);
    assert_eq!(nothing["claimed"], false);
    let claim = ok(&call(peer, "claim_work", json!({"role": "classifier"})).await);
    assert_eq!(claim["ticket"]["id"], ticket.as_str());
    // A stale decision is an error result the model can read.
    let stale = call(
        peer,
        "submit_classification",
        json!({"ticket_id": ticket, "claim_id": claim["claim_id"], "category": "billing", "priority": "high",
               "confidence": 0.9, "expected_revision": 0}),
    )
    .await;
    assert_eq!(stale.is_error, Some(true));
    assert_eq!(stale.structured_content.as_ref().unwrap()["code"], "stale_revision");
    let classified = ok(&call(
        peer,
        "submit_classification",
        json!({"ticket_id": ticket, "claim_id": claim["claim_id"], "category": "billing", "priority": "high",
               "confidence": 0.9, "expected_revision": claim["revision"]}),
    )
    .await);
    assert_eq!(classified["ticket"]["state"], "CLASSIFIED");
    let claim = ok(&call(peer, "claim_work", json!({"role": "drafter"})).await);
    let beat = ok(&call(peer, "heartbeat", json!({"claim_id": claim["claim_id"]})).await);
    assert_eq!(beat["events"], json!(["LeaseExtended"]));
    // A heartbeat takes the options every command takes (it refused them
    // as unknown arguments): the decided-on revision, and a retry key.
    let stale = call(
        peer,
        "heartbeat",
        json!({"claim_id": claim["claim_id"], "expected_revision": claim["revision"]}),
    )
    .await;
    assert_eq!(
        stale.structured_content.as_ref().unwrap()["code"],
        "stale_revision",
        "{stale:?}"
    );
    let keyed =
        json!({"claim_id": claim["claim_id"], "expected_revision": beat["revision"], "idempotency_key": "beat-2"});
    let beat = ok(&call(peer, "heartbeat", keyed.clone()).await);
    let retried = ok(&call(peer, "heartbeat", keyed).await);
    assert_eq!(retried["duplicate"], true, "{retried}");
    assert_eq!(retried["revision"], beat["revision"]);
    // So does a release.
    let stale = call(
        peer,
        "release_claim",
        json!({"claim_id": claim["claim_id"], "reason": "x", "expected_revision": claim["revision"]}),
    )
    .await;
    assert_eq!(
        stale.structured_content.as_ref().unwrap()["code"],
        "stale_revision",
        "{stale:?}"
    );
    let drafted = ok(&call(
        peer,
        "submit_draft",
        json!({"ticket_id": ticket, "claim_id": claim["claim_id"], "body": "We refunded the second charge."}),
    )
    .await);
    assert_eq!(drafted["ticket"]["state"], "DRAFT_READY");
    let claim = ok(&call(peer, "claim_work", json!({"role": "escalator"})).await);
    let resolved = ok(&call(
        peer,
        "resolve_ticket",
        json!({"ticket_id": ticket, "claim_id": claim["claim_id"], "resolution": "sent",
               "idempotency_key": "resolve-1"}),
    )
    .await);
    assert_eq!(resolved["ticket"]["state"], "RESOLVED");
    let shown = ok(&call(peer, "get_ticket", json!({"ticket_id": ticket})).await);
    assert_eq!(shown["state"], "RESOLVED");
    let history = ok(&call(peer, "ticket_events", json!({"ticket_id": ticket})).await);
    assert_eq!(
        history["events"].as_array().unwrap().len(),
        9,
        "two heartbeats stored, one retried"
    );
    let later = ok(&call(peer, "ticket_events", json!({"ticket_id": ticket, "from_revision": 7})).await);
    let revisions: Vec<Value> = later["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["revision"].clone())
        .collect();
    assert_eq!(revisions, [json!(7), json!(8)], "a page from a revision");
    let listed = ok(&call(peer, "list_tickets", json!({"state": "RESOLVED"})).await);
    assert_eq!(listed["tickets"].as_array().unwrap().len(), 1);
    let stats = ok(&call(peer, "stats", json!({})).await);
    assert_eq!(stats["tickets_per_state"]["RESOLVED"], 1);
}

async fn http_client(address: std::net::SocketAddr, token: &str) -> RunningService<RoleClient, ClientConfig> {
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(format!("http://{address}/mcp")).auth_header(token.to_owned()),
    );
    ClientConfig::default()
        .serve(transport)
        .await
        .expect("the MCP client connects")
}

/// A server of `state` on a free loopback port: its address, what stops
/// it, and its task.
async fn serve_on_a_socket(
    state: AppState,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(triage_api::serve(listener, state, ServeOptions::default(), async {
        let _ = stopped.await;
    }));
    (address, stop, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_client_over_streamable_http_takes_a_ticket_to_resolved() {
    let (state, worker, drafter) = state();
    let (address, stop, server) = serve_on_a_socket(state).await;

    let client = http_client(address, &worker).await;
    new_to_resolved(client.peer()).await;

    // The token decides the role: a drafter may not classify or open.
    let limited = http_client(address, &drafter).await;
    let refused = call(limited.peer(), "open_ticket", json!({"subject": "s", "body": "b"})).await;
    assert_eq!(refused.is_error, Some(true));
    assert_eq!(refused.structured_content.unwrap()["code"], "role_not_allowed");

    // Without a valid token the endpoint answers 401 before MCP sees it.
    let response = reqwest::Client::new()
        .post(format!("http://{address}/mcp"))
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    client.cancel().await.ok();
    limited.cancel().await.ok();
    stop.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("the server stops with MCP sessions open")
        .unwrap()
        .unwrap();
}

/// What is not one JSON-RPC message is answered in JSON-RPC terms with
/// 400, not with a plain-text 415 or "Session ID is required"; the tools'
/// schemas say what the server takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_over_http_answers_bad_messages_as_json_rpc_errors() {
    let (state, worker, _) = state();
    let (address, stop, server) = serve_on_a_socket(state).await;
    let post = |body: &'static str| {
        reqwest::Client::new()
            .post(format!("http://{address}/mcp"))
            .header("authorization", format!("Bearer {worker}"))
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (body, id, code) in [
        (r#"{"jsonrpc":"#, Value::Null, -32700),
        (
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]"#,
            Value::Null,
            -32600,
        ),
        (r#""tools/list""#, Value::Null, -32600),
        ("{}", Value::Null, -32600),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#,
            json!(1),
            -32602,
        ),
        (
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":42}}"#,
            json!(2),
            -32602,
        ),
    ] {
        let response = post(body).await.unwrap();
        assert_eq!(response.status(), 400, "{body}");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{body}"
        );
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["jsonrpc"], "2.0", "{body}: {answer}");
        assert_eq!(answer["id"], id, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
    }

    // A compressed message is an encoding the server does not take, said
    // in JSON-RPC terms like every other refusal of /mcp.
    let response = reqwest::Client::new()
        .post(format!("http://{address}/mcp"))
        .header("authorization", format!("Bearer {worker}"))
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["jsonrpc"], "2.0", "{answer}");
    assert_eq!(answer["error"]["code"], -32600, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Content-Encoding \"gzip\""),
        "{answer}"
    );

    // The transport's own refusals come as JSON-RPC errors too, with
    // their status (and a 405's Allow), as the reference SDK sends them.
    let client = reqwest::Client::new();
    let bearer = format!("Bearer {worker}");
    let url = format!("http://{address}/mcp");
    let tools_list = r#"{"jsonrpc":"2.0","id":3,"method":"tools/list"}"#;
    for (request, status, code, says) in [
        // An Accept without text/event-stream.
        (
            client
                .post(&url)
                .header("accept", "application/json")
                .header("content-type", "application/json")
                .body(tools_list),
            406,
            -32000,
            "text/event-stream",
        ),
        (client.put(&url), 405, -32000, "Method Not Allowed"),
        // A message that needs a session, sent without one.
        (
            client
                .post(&url)
                .header("accept", "application/json, text/event-stream")
                .header("content-type", "application/json")
                .body(tools_list),
            400,
            -32000,
            "Session ID is required",
        ),
        (
            client
                .post(&url)
                .header("accept", "application/json, text/event-stream")
                .header("content-type", "application/json")
                .header("mcp-session-id", "no-such-session")
                .body(tools_list),
            404,
            -32001,
            "Session not found",
        ),
    ] {
        let response = request.header("authorization", &bearer).send().await.unwrap();
        assert_eq!(response.status(), status, "{says}");
        if status == 405 {
            assert!(response.headers().contains_key("allow"), "{:?}", response.headers());
        }
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{says}: {:?}",
            response.headers()
        );
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["jsonrpc"], "2.0", "{answer}");
        assert_eq!(answer["id"], Value::Null, "{answer}");
        assert_eq!(answer["error"]["code"], code, "{answer}");
        assert!(
            answer["error"]["message"].as_str().unwrap().contains(says),
            "{says}: {answer}"
        );
    }

    // A good client still works, and the schemas carry the server's limits.
    let client = http_client(address, &worker).await;
    let tools = client.peer().list_all_tools().await.unwrap();
    let schema =
        |tool: &str| serde_json::to_value(&tools.iter().find(|t| t.name == tool).unwrap().input_schema).unwrap();
    for tool in ["claim_work", "heartbeat"] {
        let lease = &schema(tool)["properties"]["lease_secs"];
        assert_eq!(lease["minimum"], 1, "{tool}: {lease}");
        assert_eq!(lease["maximum"], 3600, "{tool}: {lease}");
    }
    assert_eq!(schema("list_tickets")["properties"]["limit"]["minimum"], 1);
    client.cancel().await.ok();
    stop.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();
}

/// A client connected over an in-process pipe (standing in for stdio) to
/// a server whose calls are sent by agent `llm-stdio` with `roles`, and
/// the server's task.
async fn over_a_pipe(roles: &[Role]) -> (RunningService<RoleClient, ClientConfig>, tokio::task::JoinHandle<()>) {
    let (state, _, _) = state();
    state.catch_up().await.unwrap();
    let principal = Principal::new("llm-stdio", roles.iter().copied());
    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let running = TriageMcp::new(state, Some(principal))
            .serve(server_io)
            .await
            .expect("server starts");
        running.waiting().await.ok();
    });
    let client = ClientConfig::default().serve(client_io).await.expect("client connects");
    (client, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_client_over_a_pipe_acts_as_the_stdio_agent() {
    let (client, server) = over_a_pipe(&[Role::Intake, Role::Classifier, Role::Drafter, Role::Escalator]).await;
    new_to_resolved(client.peer()).await;
    client.cancel().await.ok();
    server.await.unwrap();
}

/// `triage mcp` over stdio checks its token on every call: revoking the
/// agent (`triage agents revoke`, which rewrites the agents file) stops a
/// running session at its next call, as it does over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_stops_a_running_stdio_session() {
    let dir = tempfile::tempdir().unwrap();
    let agents = dir.path().join("agents.toml");
    let mut file = AgentsFile::default();
    let token = file.add("llm-stdio", &[Role::Intake, Role::Classifier]).unwrap();
    file.save(&agents).unwrap();
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let state = AppState::new(
        CommandHandler::new(store.clone()),
        Projector::new(store, ReadModelDb::in_memory().unwrap()),
        Authenticator::from_file(&agents).unwrap(),
    );
    state.catch_up().await.unwrap();
    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    // The stdio transport's own code, on a pipe.
    let server = tokio::spawn(async move {
        let (input, output) = tokio::io::split(server_io);
        triage_api::mcp::serve_lines(state, token, input, output).await.ok();
    });
    let client = ClientConfig::default().serve(client_io).await.expect("client connects");
    let opened = call(client.peer(), "open_ticket", json!({"subject": "s", "body": "b"})).await;
    ok(&opened);

    let mut file = AgentsFile::load(&agents).unwrap();
    assert_eq!(file.revoke("llm-stdio").unwrap(), 1);
    file.save(&agents).unwrap();
    // A later modification time than the file the session started with,
    // whatever the file system's timestamp resolution.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(2);
    std::fs::File::options()
        .write(true)
        .open(&agents)
        .and_then(|saved| saved.set_modified(later))
        .expect("the agents file's modification time can be set");
    let refused = call(client.peer(), "open_ticket", json!({"subject": "s", "body": "b"})).await;
    assert_eq!(refused.is_error, Some(true), "{refused:?}");
    assert_eq!(refused.structured_content.unwrap()["code"], "unauthorized");
    client.cancel().await.ok();
    server.await.unwrap();
}

/// Over stdio, a line that is not one JSON-RPC message gets a JSON-RPC
/// error with a null id (the transport alone dropped it, and the client
/// waited for an answer that never came); the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_line_over_stdio_gets_a_json_rpc_error_and_the_session_goes_on() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let agents = dir.path().join("agents.toml");
    let mut file = AgentsFile::default();
    let token = file.add("llm-stdio", &[Role::Intake]).unwrap();
    file.save(&agents).unwrap();
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let state = AppState::new(
        CommandHandler::new(store.clone()),
        Projector::new(store, ReadModelDb::in_memory().unwrap()),
        Authenticator::from_file(&agents).unwrap(),
    );
    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let (input, output) = tokio::io::split(server_io);
        triage_api::mcp::serve_lines(state, token, input, output).await
    });
    let (client_out, mut client_in) = tokio::io::split(client_io);
    let mut answers = BufReader::new(client_out).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(std::time::Duration::from_secs(5), answers.next_line())
            .await
            .expect("an answer within 5 s")
            .unwrap()
            .expect("a line");
        serde_json::from_str(&line).unwrap()
    };
    for (line, id, code) in [
        (&br#"{"jsonrpc":"#[..], Value::Null, -32700),
        (&b"{\"x\":\"\xff\xfe\"}"[..], Value::Null, -32700),
        (
            &br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#[..],
            Value::Null,
            -32600,
        ),
        (&b"42"[..], Value::Null, -32600),
        (&b"{}"[..], Value::Null, -32600),
        (&br#"{"jsonrpc":"2.0","id":7}"#[..], json!(7), -32600),
        // Params the method does not take: invalid params, not "no
        // message" or "no such method".
        (
            &br#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":"oops"}"#[..],
            json!(8),
            -32602,
        ),
        (
            &br#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":42}}"#[..],
            json!(9),
            -32602,
        ),
        (
            &br#"{"jsonrpc":"2.0","id":10,"method":"tools/list","params":[1]}"#[..],
            json!(10),
            -32602,
        ),
    ] {
        client_in.write_all(line).await.unwrap();
        client_in.write_all(b"\n").await.unwrap();
        let answer = next().await;
        let shown = String::from_utf8_lossy(line);
        assert_eq!(answer["id"], id, "{shown}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{shown}: {answer}");
    }
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    client_in.write_all(format!("{initialize}\n").as_bytes()).await.unwrap();
    let answer = next().await;
    assert_eq!(answer["id"], 1, "{answer}");
    assert_eq!(answer["result"]["serverInfo"]["name"], "triage", "{answer}");
    assert_eq!(
        answer["result"]["serverInfo"]["version"],
        env!("CARGO_PKG_VERSION"),
        "{answer}"
    );
    client_in.shutdown().await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .expect("the server ends when the client hangs up")
        .unwrap()
        .unwrap();
}

/// An argument a tool does not take is refused before the tool runs, as
/// the HTTP API refuses an unknown field: a misspelt `expected_revision`
/// must not quietly turn off the stale-revision check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_argument_a_tool_does_not_take_is_refused_not_dropped() {
    let (client, server) = over_a_pipe(&[Role::Intake, Role::Classifier]).await;
    let peer = client.peer();
    let refused = call(
        peer,
        "open_ticket",
        json!({"subject": "Refund", "body": "Twice", "priority": "high"}),
    )
    .await;
    assert_eq!(refused.is_error, Some(true), "{refused:?}");
    let problem = refused.structured_content.clone().unwrap();
    assert_eq!(problem["code"], "invalid_body");
    assert!(problem["detail"].as_str().unwrap().contains("`priority`"), "{problem}");
    let listed = ok(&call(peer, "list_tickets", json!({})).await);
    assert_eq!(listed["tickets"], json!([]), "the refused call opened a ticket");
    let stray = call(peer, "stats", json!({"since": "yesterday"})).await;
    let problem = stray.structured_content.clone().unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .ends_with("stats takes no arguments"),
        "{problem}"
    );

    let opened = ok(&call(peer, "open_ticket", json!({"subject": "Refund", "body": "Twice"})).await);
    let ticket = opened["id"].as_str().unwrap().to_owned();
    let claim = ok(&call(peer, "claim_work", json!({"role": "classifier"})).await);
    let misspelt = call(
        peer,
        "submit_classification",
        json!({"ticket_id": ticket, "claim_id": claim["claim_id"], "category": "billing", "priority": "high",
               "confidence": 0.9, "expectedRevision": 0}),
    )
    .await;
    assert_eq!(misspelt.is_error, Some(true), "{misspelt:?}");
    let problem = misspelt.structured_content.clone().unwrap();
    assert_eq!(problem["code"], "invalid_body");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("`expectedRevision`") && detail.contains("expected_revision"),
        "{detail}"
    );
    // An argument of the wrong type is a problem document too.
    let mistyped = call(
        peer,
        "submit_classification",
        json!({"ticket_id": ticket, "claim_id": claim["claim_id"], "category": "billing", "priority": "high",
               "confidence": "very"}),
    )
    .await;
    assert_eq!(mistyped.is_error, Some(true), "{mistyped:?}");
    let problem = mistyped.structured_content.clone().expect("a problem document");
    assert_eq!(problem["code"], "invalid_body", "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("invalid type"),
        "{problem}"
    );
    let shown = ok(&call(peer, "get_ticket", json!({"ticket_id": ticket})).await);
    assert_eq!(shown["state"], "CLASSIFYING", "a refused classification was applied");
    client.cancel().await.ok();
    server.await.unwrap();
}
