//! The MCP front door (rmcp): the API's operations as tools for LLM agents,
//! over stdio (`triage mcp`) or streamable HTTP (`/mcp`).
//!
//! The agent's token decides its role, as over HTTP: on stdio the token is
//! given once when the server starts; over HTTP every request carries
//! `Authorization: Bearer …`, checked before MCP sees the request. Tool
//! failures are tool results with `isError` set and the problem document as
//! their content, so the model can read why and decide again.

use axum::body::Body;
use axum::extract::{Request, State as AxumState};
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, Extensions, JsonObject, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler, schemars, tool, tool_handler, tool_router};
use serde::{Deserialize, Serialize};
use triage_domain::{Command, TicketId};
use triage_projections::list_request;
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::model::{
    ClaimRequest, ClassificationRequest, DraftRequest, EscalationRequest, OpenTicketRequest, RejectionRequest,
    ReleaseRequest, ResolutionRequest, RoleName,
};
use crate::service::AppState;

const INSTRUCTIONS: &str = "Triage: support tickets worked by agents. Loop: claim_work for your role; read the \
ticket; do the work; complete it with the tool for your stage (submit_classification, submit_draft, resolve_ticket, \
escalate_to_human or reject_draft), naming the claim_id and, as expected_revision, the revision you decided on. \
If a result is an error with code stale_revision, the ticket changed: read it again and decide anew. Send a \
heartbeat for long work, or release_claim if you cannot finish. Reuse an idempotency_key only to retry the same call.";

/// The MCP server: one per connection (stdio) or session (HTTP).
#[derive(Clone, Debug)]
pub struct TriageMcp {
    state: AppState,
    sender: Sender,
    tool_router: ToolRouter<TriageMcp>,
}

/// Who sends a server's tool calls.
#[derive(Clone)]
enum Sender {
    /// HTTP: each request brings its own token, checked by the router.
    PerRequest,
    /// A principal fixed by the embedding program.
    Fixed(Principal),
    /// stdio: the token given at start, checked again on every call, so
    /// that `triage agents revoke` takes effect on a running server.
    Token(String),
}

impl std::fmt::Debug for Sender {
    // Never the token itself: it is a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sender::PerRequest => f.write_str("PerRequest"),
            Sender::Fixed(principal) => f.debug_tuple("Fixed").field(principal).finish(),
            Sender::Token(_) => f.write_str("Token(..)"),
        }
    }
}

/// Arguments naming a ticket.
#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
pub struct TicketArgs {
    /// The ticket id (a UUID).
    pub ticket_id: String,
}

/// Arguments of `ticket_events`.
#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
pub struct TicketEventsArgs {
    /// The ticket id (a UUID).
    pub ticket_id: String,
    /// The first revision (default 0): the `next_revision` of the page
    /// before.
    #[serde(default)]
    pub from_revision: Option<u64>,
}

/// Arguments of `list_tickets`.
#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
pub struct ListArgs {
    /// Only tickets in this state: NEW, CLASSIFYING, CLASSIFIED, DRAFTING,
    /// DRAFT_READY, ESCALATING, NEEDS_HUMAN or RESOLVED.
    #[serde(default)]
    pub state: Option<String>,
    /// At most this many, from 1 (default 50, at most 500).
    #[serde(default)]
    #[schemars(range(min = 1, max = 500))]
    pub limit: Option<usize>,
    /// The `next` of the page before: the page after it.
    #[serde(default)]
    pub after: Option<String>,
}

/// Arguments common to commands.
#[derive(Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
pub struct CommandOptions {
    /// Reuse only to retry the very same call; a new key for a new decision.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// The ticket revision your decision was based on. If the ticket changed
    /// since, the call fails with stale_revision and the events since.
    #[serde(default)]
    pub expected_revision: Option<u64>,
}

/// Arguments of `open_ticket`.
#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
pub struct OpenArgs {
    /// The ticket.
    #[serde(flatten)]
    pub ticket: OpenTicketRequest,
    /// Retry key.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// Arguments of `claim_work`.
#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
pub struct ClaimArgs {
    /// The role to claim work for: classifier, drafter or escalator (or
    /// operator); the token must carry it.
    pub role: RoleName,
    /// The lease in seconds (default 60).
    #[serde(default)]
    #[schemars(range(min = 1, max = 3600))]
    pub lease_secs: Option<u32>,
    /// Retry key: the same key returns the same claim.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// A command on a ticket: its id, the body, and the options.
#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
pub struct OnTicket<T> {
    /// The ticket id (a UUID).
    pub ticket_id: String,
    /// The command's fields.
    #[serde(flatten)]
    pub body: T,
    /// Retry key and decided-on revision.
    #[serde(flatten)]
    pub options: CommandOptions,
}

/// Arguments of `release_claim`.
#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
pub struct ReleaseArgs {
    /// The claim to give back.
    pub claim_id: Uuid,
    /// Why.
    #[serde(flatten)]
    pub body: ReleaseRequest,
    /// Retry key and decided-on revision.
    #[serde(flatten)]
    pub options: CommandOptions,
}

/// Arguments of `heartbeat`.
#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
pub struct HeartbeatArgs {
    /// The claim to extend.
    pub claim_id: Uuid,
    /// The lease from now, in seconds (default 60); a lease that already
    /// ends later is kept. The answer's revision is the one to decide on
    /// next.
    #[serde(default)]
    #[schemars(range(min = 1, max = 3600))]
    pub lease_secs: Option<u32>,
    /// Retry key and decided-on revision.
    #[serde(flatten)]
    pub options: CommandOptions,
}

fn done<T: Serialize>(result: Result<T, ApiError>) -> Result<CallToolResult, ErrorData> {
    Ok(match result {
        Ok(value) => CallToolResult::structured(
            serde_json::to_value(value).map_err(|e| ErrorData::internal_error(e.to_string(), None))?,
        ),
        Err(error) => {
            if let ApiError::Internal(detail) = &error {
                tracing::error!(%detail, "internal error in an MCP tool");
            }
            let problem = serde_json::to_value(error.problem()).unwrap_or_default();
            CallToolResult::structured_error(problem)
        }
    })
}

fn parse_ticket(id: &str) -> Result<TicketId, ApiError> {
    id.parse()
        .map_err(|error: String| ApiError::unprocessable("invalid_body", error))
}

#[tool_router]
impl TriageMcp {
    /// A server for `state`. `principal` sends every call when given (an
    /// embedding program's own agent); `None` for HTTP, where each request
    /// brings its token.
    pub fn new(state: AppState, principal: Option<Principal>) -> Self {
        TriageMcp {
            state,
            sender: principal.map_or(Sender::PerRequest, Sender::Fixed),
            tool_router: Self::tool_router(),
        }
    }

    /// A server whose calls are sent by the holder of `token`, checked on
    /// every call (a revoked token stops working at once), as `triage mcp`
    /// serves over stdio.
    pub fn with_token(state: AppState, token: String) -> Self {
        TriageMcp {
            state,
            sender: Sender::Token(token),
            tool_router: Self::tool_router(),
        }
    }

    fn principal(&self, extensions: &Extensions) -> Result<Principal, ApiError> {
        match &self.sender {
            Sender::Fixed(principal) => Ok(principal.clone()),
            Sender::Token(token) => self.state.authenticate(Some(token)),
            Sender::PerRequest => extensions
                .get::<Parts>()
                .and_then(|parts| parts.extensions.get::<Principal>())
                .cloned()
                .ok_or_else(|| ApiError::Unauthorized("send `Authorization: Bearer <token>`".to_owned())),
        }
    }

    async fn on_ticket(
        &self,
        extensions: &Extensions,
        ticket_id: &str,
        options: CommandOptions,
        command: Command,
    ) -> Result<crate::model::CommandResponse, ApiError> {
        let principal = self.principal(extensions)?;
        self.state
            .ticket_command(
                &principal,
                parse_ticket(ticket_id)?,
                options.idempotency_key.as_deref(),
                options.expected_revision,
                command,
            )
            .await
    }

    #[tool(
        description = "Open a new support ticket (roles intake or operator). Returns the ticket with its id, \
        state NEW and revision 0."
    )]
    async fn open_ticket(
        &self,
        extensions: Extensions,
        Parameters(args): Parameters<OpenArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let result = match self.principal(&extensions) {
            Ok(principal) => self
                .state
                .open_ticket(&principal, args.idempotency_key.as_deref(), args.ticket)
                .await
                .map(crate::model::OpenedTicket::from),
            Err(error) => Err(error),
        };
        done(result)
    }

    #[tool(
        description = "Claim the next ticket waiting for your role (classifier: NEW tickets; drafter: \
        CLASSIFIED; escalator: DRAFT_READY). Returns {ticket, claim_id, lease_expires_at, revision}, or \
        {claimed: false} when there is no work. Complete the work before the lease expires."
    )]
    async fn claim_work(
        &self,
        extensions: Extensions,
        Parameters(args): Parameters<ClaimArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        // An operator's hand-offs (NEEDS_HUMAN) are its work too, but no
        // claim takes them: the answer says where they are.
        let nothing = if matches!(args.role, RoleName::Operator) {
            "no ticket can be claimed as operator; hand-offs waiting in NEEDS_HUMAN take no claim: find them with \
             list_tickets (state NEEDS_HUMAN) and resolve_ticket them"
        } else {
            "no ticket is waiting for this role"
        };
        let result = match self.principal(&extensions) {
            Ok(principal) => self
                .state
                .claim(
                    &principal,
                    args.idempotency_key.as_deref(),
                    ClaimRequest {
                        role: args.role,
                        lease_secs: args.lease_secs,
                    },
                )
                .await
                .map(|claimed| match claimed {
                    Some(claimed) => serde_json::to_value(claimed).unwrap_or_default(),
                    None => serde_json::json!({ "claimed": false, "detail": nothing }),
                }),
            Err(error) => Err(error),
        };
        done(result)
    }

    #[tool(
        description = "Read a ticket as it is now: state, subject, body, classification, draft, current \
        claim and revision."
    )]
    async fn get_ticket(
        &self,
        extensions: Extensions,
        Parameters(args): Parameters<TicketArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let result = match (self.principal(&extensions), parse_ticket(&args.ticket_id)) {
            (Ok(principal), Ok(id)) => self.state.ticket(&principal, id).await,
            (Err(error), _) | (_, Err(error)) => Err(error),
        };
        done(result)
    }

    #[tool(
        description = "List tickets, optionally only those in one state, oldest first, a page at a time: while the answer's next is set, pass it as after for the next page."
    )]
    async fn list_tickets(
        &self,
        extensions: Extensions,
        Parameters(args): Parameters<ListArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let result = async {
            let principal = self.principal(&extensions)?;
            let (state, after) = list_request(args.state.as_deref(), args.after.as_deref())
                .map_err(|error| ApiError::unprocessable("invalid_body", error))?;
            self.state.list(&principal, state, after, args.limit).await
        }
        .await;
        done(result)
    }

    #[tool(
        description = "A ticket's history: its events in revision order with the agent behind each, up to 500 from from_revision (default 0); next_revision says where more start: pass it as from_revision for the next page."
    )]
    async fn ticket_events(
        &self,
        extensions: Extensions,
        Parameters(args): Parameters<TicketEventsArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let result = match (self.principal(&extensions), parse_ticket(&args.ticket_id)) {
            (Ok(principal), Ok(id)) => {
                let page = crate::service::EventPage {
                    from_revision: args.from_revision.unwrap_or(0),
                    limit: None,
                };
                self.state.events(&principal, id, page).await
            }
            (Err(error), _) | (_, Err(error)) => Err(error),
        };
        done(result)
    }

    #[tool(description = "Statistics: tickets per state, stage latencies, refusals, conflicts, per-agent outcomes.")]
    async fn stats(&self, extensions: Extensions) -> Result<CallToolResult, ErrorData> {
        let result = match self.principal(&extensions) {
            Ok(principal) => self.state.stats(&principal).await,
            Err(error) => Err(error),
        };
        done(result)
    }

    #[tool(
        description = "Complete a classification claim: category (billing, outage, account_access, bug, \
        feature_request, other), priority (low, normal, high, urgent) and confidence in [0, 1]."
    )]
    async fn submit_classification(
        &self,
        extensions: Extensions,
        Parameters(args): Parameters<OnTicket<ClassificationRequest>>,
    ) -> Result<CallToolResult, ErrorData> {
        let command = Command::Classify {
            claim_id: args.body.claim_id,
            category: args.body.category,
            priority: args.body.priority.into(),
            confidence: args.body.confidence,
        };
        done(
            self.on_ticket(&extensions, &args.ticket_id, args.options, command)
                .await,
        )
    }

    #[tool(description = "Complete a drafting claim with the draft reply to the customer (non-empty).")]
    async fn submit_draft(
        &self,
        extensions: Extensions,
        Parameters(args): Parameters<OnTicket<DraftRequest>>,
    ) -> Result<CallToolResult, ErrorData> {
        let command = Command::SubmitDraft {
            claim_id: args.body.claim_id,
            body: args.body.body,
        };
        done(
            self.on_ticket(&extensions, &args.ticket_id, args.options, command)
                .await,
        )
    }

    #[tool(
        description = "Send the reviewed draft and close the ticket (RESOLVED): an escalator under its \
        review claim, or an operator without a claim."
    )]
    async fn resolve_ticket(
        &self,
        extensions: Extensions,
        Parameters(args): Parameters<OnTicket<ResolutionRequest>>,
    ) -> Result<CallToolResult, ErrorData> {
        let command = Command::Resolve {
            claim_id: args.body.claim_id,
            resolution: args.body.resolution,
        };
        done(
            self.on_ticket(&extensions, &args.ticket_id, args.options, command)
                .await,
        )
    }

    #[tool(description = "Hand the ticket to a human operator (NEEDS_HUMAN), under a review claim, with a reason.")]
    async fn escalate_to_human(
        &self,
        extensions: Extensions,
        Parameters(args): Parameters<OnTicket<EscalationRequest>>,
    ) -> Result<CallToolResult, ErrorData> {
        let command = Command::EscalateToHuman {
            claim_id: args.body.claim_id,
            reason: args.body.reason,
        };
        done(
            self.on_ticket(&extensions, &args.ticket_id, args.options, command)
                .await,
        )
    }

    #[tool(
        description = "Send the draft back for another draft (CLASSIFIED), with a reason. The rejected draft that reaches the policy's max attempts hands the ticket to a human (NEEDS_HUMAN) instead."
    )]
    async fn reject_draft(
        &self,
        extensions: Extensions,
        Parameters(args): Parameters<OnTicket<RejectionRequest>>,
    ) -> Result<CallToolResult, ErrorData> {
        let command = Command::RejectDraft {
            claim_id: args.body.claim_id,
            reason: args.body.reason,
        };
        done(
            self.on_ticket(&extensions, &args.ticket_id, args.options, command)
                .await,
        )
    }

    #[tool(description = "Give a claim back when you cannot finish (counts as a failed attempt).")]
    async fn release_claim(
        &self,
        extensions: Extensions,
        Parameters(args): Parameters<ReleaseArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let result = async {
            let principal = self.principal(&extensions)?;
            let command = Command::ReleaseClaim {
                claim_id: args.claim_id,
                reason: args.body.reason,
            };
            self.state
                .claim_command(
                    &principal,
                    args.claim_id,
                    args.options.idempotency_key.as_deref(),
                    args.options.expected_revision,
                    command,
                )
                .await
        }
        .await;
        done(result)
    }

    #[tool(description = "Extend a claim's lease while you keep working on it.")]
    async fn heartbeat(
        &self,
        extensions: Extensions,
        Parameters(args): Parameters<HeartbeatArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let result = async {
            let principal = self.principal(&extensions)?;
            let command = Command::ExtendLease {
                claim_id: args.claim_id,
                lease_secs: args.lease_secs,
            };
            self.state
                .claim_command(
                    &principal,
                    args.claim_id,
                    args.options.idempotency_key.as_deref(),
                    args.options.expected_revision,
                    command,
                )
                .await
        }
        .await;
        done(result)
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for TriageMcp {
    fn get_info(&self) -> ServerConfig {
        // Without a name of its own the server calls itself by the MCP
        // library's name and version, which is what clients show.
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(
                rmcp::model::Implementation::new("triage", env!("CARGO_PKG_VERSION"))
                    .with_title("Triage")
                    .with_description("Support tickets worked by agents, through an event-sourced state machine"),
            )
            .with_instructions(INSTRUCTIONS)
    }

    /// Refuses an argument the tool does not take, as the HTTP API refuses
    /// an unknown field, before the tool runs. serde passes over unknown
    /// fields next to a flattened struct, so without this a misspelt
    /// `expected_revision` (say `expectedRevision`) would be dropped and the
    /// command applied without its stale-revision check.
    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if let (Some(tool), Some(arguments)) = (self.tool_router.get(&request.name), &request.arguments)
            && let Some(refusal) = unknown_argument(&request.name, &tool.input_schema, arguments)
        {
            return done::<()>(Err(refusal)).map(Into::into);
        }
        let response = self
            .tool_router
            .call(ToolCallContext::new(self, request, context))
            .await?;
        Ok(match response {
            CallToolResponse::Complete(result) => as_problem(result).into(),
            other => other,
        })
    }
}

/// rmcp answers arguments it cannot deserialize (a string for a number,
/// say) with an error result in plain text; this makes it the problem
/// document every other failure is.
fn as_problem(result: CallToolResult) -> CallToolResult {
    const PREFIX: &str = "failed to deserialize parameters: ";
    let detail = match (result.is_error, &result.structured_content, result.content.as_slice()) {
        (Some(true), None, [only]) => only
            .as_text()
            .and_then(|text| text.text.strip_prefix(PREFIX))
            .map(str::to_owned),
        _ => None,
    };
    match detail {
        Some(detail) => {
            let problem =
                serde_json::to_value(ApiError::unprocessable("invalid_body", detail).problem()).unwrap_or_default();
            CallToolResult::structured_error(problem)
        }
        None => result,
    }
}

/// The refusal of the first argument that `schema` (a tool's input schema)
/// does not name, if there is one.
fn unknown_argument(tool: &str, schema: &JsonObject, arguments: &JsonObject) -> Option<ApiError> {
    let known = schema.get("properties").and_then(|properties| properties.as_object());
    let unknown = arguments
        .keys()
        .find(|name| known.is_none_or(|known| !known.contains_key(name.as_str())))?;
    let takes = match known.map(|known| known.keys().map(String::as_str).collect::<Vec<_>>()) {
        Some(names) if !names.is_empty() => format!("{tool} takes {}", names.join(", ")),
        _ => format!("{tool} takes no arguments"),
    };
    Some(ApiError::unprocessable(
        "invalid_body",
        format!("unknown argument `{unknown}`: {takes}"),
    ))
}

/// The streamable HTTP service, stopped by the state's shutdown token.
pub fn http_service(state: AppState) -> StreamableHttpService<TriageMcp, LocalSessionManager> {
    // Every /mcp request must carry a bearer token (see `authenticated`),
    // which a DNS-rebinding page cannot send, so the Host allow-list that
    // protects unauthenticated local servers is not needed, and keeping it
    // would refuse clients that reach a deployed server by its name.
    let config = StreamableHttpServerConfig::default()
        .disable_allowed_hosts()
        .with_cancellation_token(state.shutdown_token().child_token())
        .with_max_request_body_bytes(state.limits().max_body_bytes);
    StreamableHttpService::new(
        move || Ok(TriageMcp::new(state.clone(), None)),
        Default::default(),
        config,
    )
}

/// `service` behind bearer authentication: `401` without a valid token;
/// otherwise the principal rides in the request's extensions.
pub fn authenticated(state: AppState, service: StreamableHttpService<TriageMcp, LocalSessionManager>) -> axum::Router {
    let limit = state.limits().max_body_bytes;
    axum::Router::new()
        .fallback_service(service)
        .layer(middleware::from_fn(transport_errors_as_json_rpc))
        .layer(middleware::from_fn_with_state(limit, json_rpc_only))
        .layer(middleware::from_fn_with_state(state, require_token))
}

/// The longest plain-text error of the MCP transport read back to be
/// re-sent as JSON-RPC; its texts are one line.
const TRANSPORT_ERROR_BYTES: usize = 4096;

/// Sends the MCP transport's own refusals (a 406 for an `Accept` without
/// `text/event-stream`, a 405, a 415, a 400 "Session ID is required", a 404
/// for an unknown session) as JSON-RPC error objects, as the reference
/// TypeScript SDK sends them: -32001 for an unknown session, -32000 for
/// the rest. The transport writes them as bare text, without a
/// content type, which a client parsing JSON cannot read. The status and
/// the other headers (a 405's `Allow`) stay as they were.
async fn transport_errors_as_json_rpc(request: Request<Body>, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json") || value.starts_with("text/event-stream"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, TRANSPORT_ERROR_BYTES).await {
        Ok(bytes) if !bytes.is_empty() => String::from_utf8_lossy(&bytes).trim().to_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    let code = if status == axum::http::StatusCode::NOT_FOUND {
        -32001
    } else {
        -32000
    };
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.remove(axum::http::header::CONTENT_TYPE);
    let body = axum::Json(json_rpc_error_body(serde_json::Value::Null, code, text));
    (parts, body).into_response()
}

/// A JSON-RPC error object for a message that could not be taken: `id` is
/// the message's when it could be read, otherwise null.
fn json_rpc_error_body(id: serde_json::Value, code: i32, message: String) -> serde_json::Value {
    serde_json::json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn json_rpc_error(status: axum::http::StatusCode, id: serde_json::Value, code: i32, message: String) -> Response {
    (status, axum::Json(json_rpc_error_body(id, code, message))).into_response()
}

/// Why `params` are not `method`'s params, if they are not.
fn invalid_params<P: serde::de::DeserializeOwned>(method: &str, params: &serde_json::Value) -> Option<String> {
    P::deserialize(params)
        .err()
        .map(|error| format!("invalid {method} params: {error}"))
}

fn json_rpc_problem(message: &serde_json::Value) -> Option<(serde_json::Value, i32, String)> {
    let fields = match message {
        serde_json::Value::Object(fields) => fields,
        serde_json::Value::Array(_) => {
            return Some((
                serde_json::Value::Null,
                -32600,
                "batches are not supported (MCP 2025-06-18 removed them): send one message at a time".to_owned(),
            ));
        }
        _ => {
            return Some((
                serde_json::Value::Null,
                -32600,
                "a JSON-RPC message is a JSON object".to_owned(),
            ));
        }
    };
    let id = match fields.get("id") {
        Some(id @ (serde_json::Value::String(_) | serde_json::Value::Number(_))) => id.clone(),
        _ => serde_json::Value::Null,
    };
    // Params that the method's own type refuses are invalid params
    // (-32602), said here: the transport takes an initialize with bad
    // params for a message that needs a session ("Session ID is
    // required"), a tools/call whose params are not an object for no
    // JSON-RPC message at all, and one whose name is not a string for an
    // unknown method (-32601 "tools/call").
    let params = fields.get("params");
    let refused = match fields.get("method").and_then(serde_json::Value::as_str) {
        Some(method @ "initialize") => {
            invalid_params::<rmcp::model::InitializeRequestParams>(method, params.unwrap_or(&serde_json::Value::Null))
        }
        Some(method @ "tools/call") => {
            invalid_params::<rmcp::model::CallToolRequestParams>(method, params.unwrap_or(&serde_json::Value::Null))
        }
        // Optional: absent or null params are no params.
        Some(method @ "tools/list") => params
            .filter(|params| !params.is_null())
            .and_then(|params| invalid_params::<rmcp::model::PaginatedRequestParams>(method, params)),
        _ => None,
    };
    if let Some(message) = refused {
        return Some((id, -32602, message));
    }
    // Unknown methods parse (as custom requests) and are the server's to
    // answer; this is the shape: jsonrpc "2.0", an id, a method, a result.
    // Checked in place: the transport parses the message again anyway.
    if let Err(error) = <rmcp::model::ClientJsonRpcMessage as Deserialize>::deserialize(message) {
        return Some((id, -32600, format!("not a JSON-RPC 2.0 message: {error}")));
    }
    None
}

/// Answers a POST that is not one JSON-RPC message in JSON-RPC terms (a
/// parse error -32700, an invalid request -32600, invalid params of
/// `initialize`, `tools/call` or `tools/list` -32602), with status 400; an
/// encoded (compressed) body with -32600 and 415, before it is read. The MCP transport would answer some
/// with a plain-text 415, and an `initialize` whose params are wrong with
/// "Session ID is required", which sends a client looking for the wrong
/// cause. Batches are refused: MCP 2025-06-18 removed them.
async fn json_rpc_only(AxumState(limit): AxumState<usize>, request: Request<Body>, next: Next) -> Response {
    use axum::http::{Method, StatusCode};
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    if let Some(coding) = crate::http::body_encoding(request.headers()) {
        return json_rpc_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            serde_json::Value::Null,
            -32600,
            format!(
                "messages are taken as they are: Content-Encoding {coding:?} is not supported; send the JSON uncompressed"
            ),
        );
    }
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => bytes,
        Err(error) if crate::http::timed_out(&error) => {
            return json_rpc_error(
                StatusCode::REQUEST_TIMEOUT,
                serde_json::Value::Null,
                -32600,
                "the message did not arrive in time".to_owned(),
            );
        }
        Err(_) => {
            return json_rpc_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                serde_json::Value::Null,
                -32600,
                format!("the message is larger than {limit} bytes"),
            );
        }
    };
    let message: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(message) => message,
        Err(error) => {
            return json_rpc_error(
                StatusCode::BAD_REQUEST,
                serde_json::Value::Null,
                -32700,
                format!("parse error: {error}"),
            );
        }
    };
    if let Some((id, code, text)) = json_rpc_problem(&message) {
        return json_rpc_error(StatusCode::BAD_REQUEST, id, code, text);
    }
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

async fn require_token(AxumState(state): AxumState<AppState>, mut request: Request<Body>, next: Next) -> Response {
    match state.authenticate(crate::http::bearer(request.headers())) {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(error) => error.into_response(),
    }
}

/// Serves MCP over stdin/stdout as the holder of `token` until the client
/// hangs up; the token is checked on every call.
pub async fn serve_stdio(state: AppState, token: String) -> Result<(), std::io::Error> {
    serve_lines(state, token, tokio::io::stdin(), tokio::io::stdout()).await
}

/// Serves MCP over newline-delimited JSON-RPC on `input` and `output` (the
/// stdio transport) as the holder of `token`, until `input` ends.
///
/// A line that is not one JSON-RPC message (not UTF-8, not JSON, a batch,
/// not of JSON-RPC's shape) is answered here, as JSON-RPC 2.0 asks, with an
/// error (-32700 or -32600; its id when it has one, else null); the MCP
/// transport would drop it without a word, leaving the client waiting, and
/// a line that is not UTF-8 ended its session. Good lines go on to the
/// transport unchanged, and the two streams of answers are written whole
/// lines at a time, so they never interleave mid-line.
pub async fn serve_lines<R, W>(state: AppState, token: String, input: R, output: W) -> Result<(), std::io::Error>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use rmcp::ServiceExt;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    const PIPE_BYTES: usize = 1 << 20;
    let (mut to_server, server_input) = tokio::io::duplex(PIPE_BYTES);
    let (server_output, from_server) = tokio::io::duplex(PIPE_BYTES);
    // Bounded: a client that sends bad lines and reads no answers is held
    // up, as one that sends good lines is by the pipe.
    let (errors, mut error_lines) = tokio::sync::mpsc::channel::<String>(64);

    let reading = tokio::spawn(async move {
        let mut input = BufReader::new(input);
        let mut line = Vec::new();
        loop {
            line.clear();
            if input.read_until(b'\n', &mut line).await? == 0 {
                break;
            }
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match line_error(text) {
                Some(error) => {
                    if errors.send(error.to_string()).await.is_err() {
                        break;
                    }
                }
                None => {
                    to_server.write_all(text).await?;
                    to_server.write_all(b"\n").await?;
                }
            }
        }
        // The client hung up: the transport sees the end of its input.
        to_server.shutdown().await
    });
    let writing = tokio::spawn(async move {
        let mut output = output;
        let mut answers = BufReader::new(from_server).lines();
        let mut errors_open = true;
        loop {
            let line = tokio::select! {
                answer = answers.next_line() => match answer? {
                    Some(line) => line,
                    None => break,
                },
                error = error_lines.recv(), if errors_open => match error {
                    Some(line) => line,
                    None => {
                        errors_open = false;
                        continue;
                    }
                },
            };
            output.write_all(line.as_bytes()).await?;
            output.write_all(b"\n").await?;
            output.flush().await?;
        }
        // Errors for lines sent after the transport's last answer.
        while let Ok(line) = error_lines.try_recv() {
            output.write_all(line.as_bytes()).await?;
            output.write_all(b"\n").await?;
        }
        output.flush().await
    });

    let server = match TriageMcp::with_token(state, token)
        .serve((server_input, server_output))
        .await
    {
        Ok(server) => server,
        Err(error) => {
            reading.abort();
            writing.abort();
            return Err(std::io::Error::other(error));
        }
    };
    let served = server.waiting().await.map_err(std::io::Error::other);
    // The session may end before the client hangs up (a revoked token):
    // stop reading then. The transport's end of the answers is closed, so
    // the writer ends once it has written them.
    reading.abort();
    if let Ok(Err(error)) = reading.await {
        tracing::warn!(%error, "reading the MCP client's input failed");
    }
    writing.await.map_err(std::io::Error::other)??;
    served.map(|_| ())
}

/// The JSON-RPC error for a line that is not one JSON-RPC message.
fn line_error(line: &[u8]) -> Option<serde_json::Value> {
    let (id, code, message) = match serde_json::from_slice::<serde_json::Value>(line) {
        Err(error) => (serde_json::Value::Null, -32700, format!("parse error: {error}")),
        Ok(message) => json_rpc_problem(&message)?,
    };
    Some(json_rpc_error_body(id, code, message))
}
