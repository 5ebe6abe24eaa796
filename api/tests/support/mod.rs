//! Shared set-up: an in-memory store, a manual clock and one token per role.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use triage_api::{AgentsFile, AppState, Authenticator};
use triage_command_handler::{CommandHandler, ManualClock};
use triage_domain::Role;
use triage_event_store::{EventStore, InMemoryEventStore};
use triage_projections::{Projector, ProjectorOptions, ReadModelDb};

#[derive(Clone)]
pub struct Harness {
    pub state: AppState,
    pub clock: Arc<ManualClock>,
    pub tokens: HashMap<&'static str, String>,
    pub store: Arc<dyn EventStore>,
}

pub const AGENTS: [(&str, &[Role]); 7] = [
    ("classifier", &[Role::Classifier]),
    ("classifier-2", &[Role::Classifier]),
    ("drafter", &[Role::Drafter]),
    ("escalator", &[Role::Escalator]),
    ("operator", &[Role::Operator]),
    ("intake", &[Role::Intake]),
    ("analyst", &[Role::Analyst]),
];

impl Harness {
    pub fn new() -> Self {
        let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
        Self::on(store)
    }

    pub fn on(store: Arc<dyn EventStore>) -> Self {
        Self::with_agents(store, &[])
    }

    /// [`AGENTS`] and `extra` agents, on `store`.
    pub fn with_agents(store: Arc<dyn EventStore>, extra: &[(&'static str, &'static [Role])]) -> Self {
        Self::with_options(store, extra, ProjectorOptions::default())
    }

    /// [`AGENTS`] and `extra` agents, on `store`, the projector run with
    /// `options`.
    pub fn with_options(
        store: Arc<dyn EventStore>,
        extra: &[(&'static str, &'static [Role])],
        options: ProjectorOptions,
    ) -> Self {
        let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
        let handler = CommandHandler::new(store.clone()).with_clock(clock.clone());
        let projector =
            Projector::new(store.clone(), ReadModelDb::in_memory().expect("read model")).with_options(options);
        let mut file = AgentsFile::default();
        let mut tokens = HashMap::new();
        for &(id, roles) in AGENTS.iter().chain(extra) {
            tokens.insert(id, file.add(id, roles).expect("agent added"));
        }
        let state = AppState::new(handler, projector, Authenticator::Fixed(file));
        Harness {
            state,
            clock,
            tokens,
            store,
        }
    }

    pub fn token(&self, agent: &str) -> &str {
        &self.tokens[agent]
    }

    /// Sends a request through the router, as `agent` (no token for `None`).
    pub async fn send(&self, agent: Option<&str>, request: Req) -> Reply {
        let mut builder = Request::builder().method(request.method).uri(request.uri);
        if let Some(agent) = agent {
            builder = builder.header("authorization", format!("Bearer {}", self.token(agent)));
        }
        for (name, value) in &request.headers {
            builder = builder.header(*name, value);
        }
        let body = match request.body {
            Some(body) => {
                if !request
                    .headers
                    .iter()
                    .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
                {
                    builder = builder.header("content-type", "application/json");
                }
                Body::from(body)
            }
            None => Body::empty(),
        };
        let response = triage_api::router(self.state.clone())
            .oneshot(builder.body(body).expect("request"))
            .await
            .expect("infallible");
        Reply::read(response).await
    }

    pub async fn open(&self, subject: &str) -> Value {
        let reply = self
            .send(
                Some("intake"),
                Req::post(
                    "/v1/tickets",
                    serde_json::json!({"subject": subject, "body": "It broke."}),
                ),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.json);
        reply.json
    }

    pub async fn claim(&self, agent: &str, role: &str) -> Reply {
        self.send(
            Some(agent),
            Req::post("/v1/work/claim", serde_json::json!({ "role": role })),
        )
        .await
    }
}

pub struct Req {
    pub method: &'static str,
    pub uri: String,
    pub body: Option<Vec<u8>>,
    pub headers: Vec<(&'static str, String)>,
}

impl Req {
    pub fn get(uri: impl Into<String>) -> Self {
        Req {
            method: "GET",
            uri: uri.into(),
            body: None,
            headers: Vec::new(),
        }
    }

    pub fn post(uri: impl Into<String>, body: Value) -> Self {
        Self::raw("POST", uri, body.to_string().into_bytes())
    }

    pub fn raw(method: &'static str, uri: impl Into<String>, body: Vec<u8>) -> Self {
        Req {
            method,
            uri: uri.into(),
            body: Some(body),
            headers: Vec::new(),
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub json: Value,
}

impl Reply {
    async fn read(response: Response<Body>) -> Self {
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Reply { status, headers, json }
    }

    /// Asserts a problem document with `status` and code `code`.
    pub fn assert_problem(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{}", self.json);
        assert_eq!(
            self.headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json")
        );
        assert_eq!(self.json["type"], format!("urn:triage:problem:{code}"), "{}", self.json);
        assert_eq!(self.json["code"], code);
        assert_eq!(self.json["status"], status.as_u16());
        assert!(self.json["title"].as_str().is_some_and(|t| !t.is_empty()));
    }
}
