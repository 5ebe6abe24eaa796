//! The HTTP front door: routes, header conventions and the OpenAPI
//! document generated from these handlers.
//!
//! - `Authorization: Bearer <token>` → the agent and its roles.
//! - `Idempotency-Key` → the command id.
//! - `If-Match: "<revision>"` → the revision the agent decided on.
//! - `ETag: "<revision>"` on tickets and command outcomes.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State as AxumState};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, body::Bytes};
use serde::Deserialize;
use triage_domain::{Command, TicketId};
use triage_projections::list_request;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi};
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::{ApiError, Problem};
use crate::model::{
    ClaimRequest, ClaimResponse, ClaimView, ClassificationRequest, ClassificationView, CommandResponse, DraftRequest,
    EscalationRequest, EventList, EventView, HeartbeatRequest, OpenTicketRequest, OpenedTicket, PriorityName,
    RejectionRequest, ReleaseRequest, ResolutionRequest, RoleName, TicketList, TicketView,
};
use crate::service::AppState;

/// The whole HTTP application: the JSON API, `/openapi.json`, `/healthz`,
/// `/readyz` and MCP over streamable HTTP at `/mcp`.
pub fn router(state: AppState) -> Router {
    let limit = state.limits().max_body_bytes;
    let mcp = crate::mcp::http_service(state.clone());
    Router::new()
        .route("/v1/tickets", post(open_ticket).get(list_tickets))
        .route("/v1/tickets/{id}", get(get_ticket))
        .route("/v1/tickets/{id}/events", get(ticket_events))
        .route("/v1/tickets/{id}/classification", post(classify))
        .route("/v1/tickets/{id}/draft", post(draft))
        .route("/v1/tickets/{id}/escalation", post(escalate))
        .route("/v1/tickets/{id}/resolution", post(resolve))
        .route("/v1/tickets/{id}/rejection", post(reject_draft))
        .route("/v1/work/claim", post(claim))
        .route("/v1/claims/{claim_id}/release", post(release))
        .route("/v1/claims/{claim_id}/heartbeat", post(heartbeat))
        .route("/v1/stats", get(stats))
        .route("/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .nest_service("/mcp", crate::mcp::authenticated(state.clone(), mcp))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(plain_bodies_only))
        .layer(DefaultBodyLimit::max(limit))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            state.limits().body_timeout,
        ))
        .with_state(state)
}

/// A path segment (a ticket or claim id) as text. A segment axum cannot
/// decode (not UTF-8, say) is answered with a problem document, like every
/// other error, instead of axum's plain-text reply.
pub(crate) struct PathId(pub(crate) String);

impl FromRequestParts<AppState> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(PathId(id)),
            Err(rejection) => Err(ApiError::bad_request("invalid_path", rejection.body_text())),
        }
    }
}

/// The authenticated sender of a request.
#[derive(Clone, Debug)]
pub(crate) struct Auth(pub(crate) Principal);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        state.authenticate(bearer(&parts.headers)).map(Auth)
    }
}

/// The token of an `Authorization: Bearer …` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Refuses a compressed (or otherwise encoded) body with 415 before
/// anything reads it: read as JSON it failed as "malformed", which sends
/// the client looking for a fault in JSON it never sent. `/mcp` answers
/// the same in JSON-RPC terms (see `mcp::json_rpc_only`).
async fn plain_bodies_only(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = request.uri().path();
    let mcp = path == "/mcp" || path.starts_with("/mcp/");
    if !mcp && let Some(coding) = body_encoding(request.headers()) {
        return ApiError::UnsupportedEncoding(coding).into_response();
    }
    next.run(request).await
}

/// The Content-Encoding of a request's body, unless it is none or
/// `identity`: the server takes bodies only as they are.
pub(crate) fn body_encoding(headers: &HeaderMap) -> Option<String> {
    let coding = String::from_utf8_lossy(headers.get(header::CONTENT_ENCODING)?.as_bytes())
        .trim()
        .to_owned();
    (!coding.eq_ignore_ascii_case("identity")).then_some(coding)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    // Two keys make a retry ambiguous: which one names the command?
    if headers.get_all("idempotency-key").iter().nth(1).is_some() {
        return Err(ApiError::bad_request(
            "invalid_header",
            "send one Idempotency-Key header, not several",
        ));
    }
    headers
        .get("idempotency-key")
        .map(|value| {
            value
                .to_str()
                .map(str::trim)
                .map_err(|_| ApiError::bad_request("invalid_header", "Idempotency-Key must be visible ASCII"))
        })
        .transpose()
}

/// `If-Match: "7"` (or `7`, or `W/"7"`) → 7; `*` or no header → none.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let bad = || ApiError::bad_request("invalid_header", "If-Match must be a ticket revision, such as \"3\"");
    let text = value.to_str().map_err(|_| bad())?.trim();
    if text == "*" {
        return Ok(None);
    }
    let text = text.strip_prefix("W/").unwrap_or(text);
    let text = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')).unwrap_or(text);
    text.parse().map(Some).map_err(|_| bad())
}

fn ticket_id(id: &str) -> Result<TicketId, ApiError> {
    id.parse()
        .map_err(|error: String| ApiError::bad_request("invalid_path", error))
}

fn claim_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::bad_request("invalid_path", format!("{id:?} is not a claim id (a UUID)")))
}

/// Whether the request's Content-Type is JSON (`application/json`, or a
/// `+json` type), as axum's `Json` extractor requires it.
fn declares_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A request body that must be a JSON object, as the OpenAPI document
/// declares every one. serde reads a struct from an array too (its fields
/// in order), so `["subject", "body"]` opened a ticket, and `[]` was
/// refused as "expected struct … with 3 elements"; anything but an object
/// is now `invalid_body`, "expected a JSON object".
pub(crate) struct Object<T>(pub(crate) T);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectOnly<T>(std::marker::PhantomData<T>);

        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for ObjectOnly<T> {
            type Value = T;

            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }

        deserializer
            .deserialize_map(ObjectOnly(std::marker::PhantomData))
            .map(Object)
    }
}

fn json_body<T>(body: Result<Json<Object<T>>, JsonRejection>) -> Result<T, ApiError> {
    match body {
        Ok(Json(Object(body))) => Ok(body),
        Err(JsonRejection::JsonDataError(error)) => Err(ApiError::unprocessable("invalid_body", error.body_text())),
        Err(JsonRejection::JsonSyntaxError(error)) => Err(ApiError::bad_request("malformed_json", error.body_text())),
        Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::UnsupportedMediaType),
        Err(JsonRejection::BytesRejection(error)) if error.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::PayloadTooLarge { limit: 0 })
        }
        Err(JsonRejection::BytesRejection(error)) if timed_out(&error) => Err(ApiError::BodyTimeout {
            after: std::time::Duration::ZERO,
        }),
        Err(other) => Err(ApiError::bad_request("malformed_json", other.body_text())),
    }
}

/// Whether the body failed to arrive because the client paused longer
/// than `body_timeout` while sending it.
pub(crate) fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |error| error.source())
        .any(|error| error.is::<tower_http::timeout::TimeoutError>())
}

fn etag(revision: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{revision}\"")).expect("digits and quotes are a valid header value")
}

fn with_etag(status: StatusCode, revision: u64, body: impl serde::Serialize) -> Response {
    let mut response = (status, Json(body)).into_response();
    response.headers_mut().insert(header::ETAG, etag(revision));
    response
}

fn command_response(status: StatusCode, outcome: CommandResponse) -> Response {
    let revision = outcome.revision;
    with_etag(status, revision, outcome)
}

/// Fills in the body limit and the body timeout, which only the state
/// knows.
fn sized(state: &AppState, error: ApiError) -> ApiError {
    match error {
        ApiError::PayloadTooLarge { .. } => ApiError::PayloadTooLarge {
            limit: state.limits().max_body_bytes,
        },
        ApiError::BodyTimeout { .. } => ApiError::BodyTimeout {
            after: state.limits().body_timeout,
        },
        other => other,
    }
}

/// Open a ticket (intake, operator).
#[utoipa::path(post, path = "/v1/tickets", tag = "tickets",
    params(("Idempotency-Key" = Option<String>, Header, description = "The command id: a retry with the same key and body opens nothing new and answers 201 with the same ticket as it is now and duplicate: true; with another body, 422.")),
    request_body = OpenTicketRequest,
    responses(
        (status = 201, description = "Opened; a retry with the same Idempotency-Key and body answers the same ticket as it is now, with duplicate: true", body = OpenedTicket),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token's roles may not open tickets", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid input or reused key", body = Problem, content_type = "application/problem+json"),
    ))]
async fn open_ticket(
    AxumState(state): AxumState<AppState>,
    Auth(principal): Auth,
    headers: HeaderMap,
    body: Result<Json<Object<OpenTicketRequest>>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_body(body).map_err(|e| sized(&state, e))?;
    let outcome = state
        .open_ticket(&principal, idempotency_key(&headers)?, request)
        .await?;
    let location = format!("/v1/tickets/{}", outcome.ticket.id);
    let opened = OpenedTicket::from(outcome);
    let mut response = with_etag(StatusCode::CREATED, opened.ticket.revision, opened);
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

/// `GET /v1/tickets` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Only tickets in this state: NEW, CLASSIFYING, CLASSIFIED, DRAFTING,
    /// DRAFT_READY, ESCALATING, NEEDS_HUMAN or RESOLVED.
    state: Option<String>,
    /// At most this many, from 1 (default 50, at most 500).
    #[param(minimum = 1)]
    limit: Option<usize>,
    /// The `next` of the page before: the page after it.
    after: Option<String>,
}

/// List tickets, oldest in their state first (any token), a page at a time:
/// while `next` is set, more follow.
#[utoipa::path(get, path = "/v1/tickets", tag = "tickets", params(ListQuery),
    responses(
        (status = 200, body = TicketList),
        (status = 400, description = "An unknown state, a cursor of another list or a malformed one, or a limit of 0", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
    ))]
async fn list_tickets(
    AxumState(state): AxumState<AppState>,
    Auth(principal): Auth,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<TicketList>, ApiError> {
    let Query(query) = query.map_err(|error| ApiError::bad_request("invalid_query", error.body_text()))?;
    let (wanted, after) = list_request(query.state.as_deref(), query.after.as_deref())
        .map_err(|error| ApiError::bad_request("invalid_query", error))?;
    Ok(Json(state.list(&principal, wanted, after, query.limit).await?))
}

/// A ticket as it is now, read from its stream (any token). The `ETag` is
/// its revision.
#[utoipa::path(get, path = "/v1/tickets/{id}", tag = "tickets",
    params(("id" = String, Path, description = "The ticket id")),
    responses(
        (status = 200, body = TicketView, headers(("ETag" = String, description = "The stream revision, quoted"))),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
async fn get_ticket(
    AxumState(state): AxumState<AppState>,
    Auth(principal): Auth,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let view = state.ticket(&principal, ticket_id(&id)?).await?;
    Ok(with_etag(StatusCode::OK, view.revision, view))
}

/// `GET /v1/tickets/{id}/events` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// The first revision to return (default 0).
    from_revision: Option<u64>,
    /// At most this many events, from 1 (default and most: 500); `next_revision`
    /// in the answer says where the rest start.
    #[param(minimum = 1)]
    limit: Option<usize>,
}

/// A ticket's events in revision order, a page at a time (any token).
#[utoipa::path(get, path = "/v1/tickets/{id}/events", tag = "tickets",
    params(("id" = String, Path, description = "The ticket id"), EventsQuery),
    responses(
        (status = 200, body = EventList),
        (status = 400, description = "A query parameter that does not parse, or a limit of 0", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
async fn ticket_events(
    AxumState(state): AxumState<AppState>,
    Auth(principal): Auth,
    PathId(id): PathId,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<EventList>, ApiError> {
    let Query(query) = query.map_err(|error| ApiError::bad_request("invalid_query", error.body_text()))?;
    let page = crate::service::EventPage {
        from_revision: query.from_revision.unwrap_or(0),
        limit: query.limit,
    };
    Ok(Json(state.events(&principal, ticket_id(&id)?, page).await?))
}

/// Statistics from the read model (any token).
#[utoipa::path(get, path = "/v1/stats", tag = "tickets",
    responses((status = 200, body = Object), (status = 401, body = Problem, content_type = "application/problem+json")))]
async fn stats(
    AxumState(state): AxumState<AppState>,
    Auth(principal): Auth,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(state.stats(&principal).await?))
}

/// Claim the next ticket in a role's work queue, atomically.
#[utoipa::path(post, path = "/v1/work/claim", tag = "work",
    params(("Idempotency-Key" = Option<String>, Header, description = "The claim's command id; a retry returns the same claim.")),
    request_body = ClaimRequest,
    responses(
        (status = 200, description = "Claimed", body = ClaimResponse),
        (status = 204, description = "Nothing to claim"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token lacks the role, or the role claims nothing", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
async fn claim(
    AxumState(state): AxumState<AppState>,
    Auth(principal): Auth,
    headers: HeaderMap,
    body: Result<Json<Object<ClaimRequest>>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_body(body).map_err(|e| sized(&state, e))?;
    match state.claim(&principal, idempotency_key(&headers)?, request).await? {
        Some(claimed) => Ok(with_etag(StatusCode::OK, claimed.revision, claimed)),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

async fn ticket_command(
    state: &AppState,
    principal: &Principal,
    id: &str,
    headers: &HeaderMap,
    command: Command,
) -> Result<Response, ApiError> {
    let outcome = state
        .ticket_command(
            principal,
            ticket_id(id)?,
            idempotency_key(headers)?,
            if_match(headers)?,
            command,
        )
        .await?;
    Ok(command_response(StatusCode::OK, outcome))
}

/// Complete a classification claim.
#[utoipa::path(post, path = "/v1/tickets/{id}/classification", tag = "work",
    params(("id" = String, Path, description = "The ticket id"),
        ("Idempotency-Key" = Option<String>, Header, description = "The command id"),
        ("If-Match" = Option<String>, Header, description = "The revision the decision was made on, e.g. \"1\"")),
    request_body = ClassificationRequest,
    responses(
        (status = 200, body = CommandResponse),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Stale If-Match (with the events since), stale or expired claim, or not allowed in this state", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
async fn classify(
    AxumState(state): AxumState<AppState>,
    Auth(principal): Auth,
    PathId(id): PathId,
    headers: HeaderMap,
    body: Result<Json<Object<ClassificationRequest>>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_body(body).map_err(|e| sized(&state, e))?;
    let command = Command::Classify {
        claim_id: request.claim_id,
        category: request.category,
        priority: request.priority.into(),
        confidence: request.confidence,
    };
    ticket_command(&state, &principal, &id, &headers, command).await
}

/// Complete a drafting claim with a draft reply.
#[utoipa::path(post, path = "/v1/tickets/{id}/draft", tag = "work",
    params(("id" = String, Path, description = "The ticket id"),
        ("Idempotency-Key" = Option<String>, Header, description = "The command id"),
        ("If-Match" = Option<String>, Header, description = "The revision the decision was made on")),
    request_body = DraftRequest,
    responses(
        (status = 200, body = CommandResponse),
        (status = 400, description = "Malformed JSON, a path id that is not a UUID, or a bad header", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such ticket", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Stale If-Match (with the events since), stale or expired claim, or not allowed in this state", body = Problem, content_type = "application/problem+json"),
        (status = 413, body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not declared as JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
async fn draft(
    AxumState(state): AxumState<AppState>,
    Auth(principal): Auth,
    PathId(id): PathId,
    headers: HeaderMap,
    body: Result<Json<Object<DraftRequest>>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_body(body).map_err(|e| sized(&state, e))?;
    let command = Command::SubmitDraft {
        claim_id: request.claim_id,
        body: request.body,
    };
    ticket_command(&state, &principal, &id, &headers, command).await
}

/// Hand the ticket to a human, under a review claim.
#[utoipa::path(post, path = "/v1/tickets/{id}/escalation", tag = "work",
    params(("id" = String, Path, description = "The ticket id"),
        ("Idempotency-Key" = Option<String>, Header, description = "The command id"),
        ("If-Match" = Option<String>, Header, description = "The revision the decision was made on")),
    request_body = EscalationRequest,
    responses(
        (status = 200, body = CommandResponse),
        (status = 400, description = "Malformed JSON, a path id that is not a UUID, or a bad header", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such ticket", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Stale If-Match (with the events since), stale or expired claim, or not allowed in this state", body = Problem, content_type = "application/problem+json"),
        (status = 413, body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not declared as JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
async fn escalate(
    AxumState(state): AxumState<AppState>,
    Auth(principal): Auth,
    PathId(id): PathId,
    headers: HeaderMap,
    body: Result<Json<Object<EscalationRequest>>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_body(body).map_err(|e| sized(&state, e))?;
    let command = Command::EscalateToHuman {
        claim_id: request.claim_id,
        reason: request.reason,
    };
    ticket_command(&state, &principal, &id, &headers, command).await
}

/// Resolve: an escalator under its review claim, or an operator at any
/// point without one.
#[utoipa::path(post, path = "/v1/tickets/{id}/resolution", tag = "work",
    params(("id" = String, Path, description = "The ticket id"),
        ("Idempotency-Key" = Option<String>, Header, description = "The command id"),
        ("If-Match" = Option<String>, Header, description = "The revision the decision was made on")),
    request_body = ResolutionRequest,
    responses(
        (status = 200, body = CommandResponse),
        (status = 400, description = "Malformed JSON, a path id that is not a UUID, or a bad header", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such ticket", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Stale If-Match (with the events since), stale or expired claim, or not allowed in this state", body = Problem, content_type = "application/problem+json"),
        (status = 413, body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not declared as JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
async fn resolve(
    AxumState(state): AxumState<AppState>,
    Auth(principal): Auth,
    PathId(id): PathId,
    headers: HeaderMap,
    body: Result<Json<Object<ResolutionRequest>>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_body(body).map_err(|e| sized(&state, e))?;
    let command = Command::Resolve {
        claim_id: request.claim_id,
        resolution: request.resolution,
    };
    ticket_command(&state, &principal, &id, &headers, command).await
}

/// Send the draft back for another one; the rejected draft that reaches
/// the policy's max attempts hands the ticket to a human (NEEDS_HUMAN).
#[utoipa::path(post, path = "/v1/tickets/{id}/rejection", tag = "work",
    params(("id" = String, Path, description = "The ticket id"),
        ("Idempotency-Key" = Option<String>, Header, description = "The command id"),
        ("If-Match" = Option<String>, Header, description = "The revision the decision was made on")),
    request_body = RejectionRequest,
    responses(
        (status = 200, body = CommandResponse),
        (status = 400, description = "Malformed JSON, a path id that is not a UUID, or a bad header", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such ticket", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Stale If-Match (with the events since), stale or expired claim, or not allowed in this state", body = Problem, content_type = "application/problem+json"),
        (status = 413, body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not declared as JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
async fn reject_draft(
    AxumState(state): AxumState<AppState>,
    Auth(principal): Auth,
    PathId(id): PathId,
    headers: HeaderMap,
    body: Result<Json<Object<RejectionRequest>>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_body(body).map_err(|e| sized(&state, e))?;
    let command = Command::RejectDraft {
        claim_id: request.claim_id,
        reason: request.reason,
    };
    ticket_command(&state, &principal, &id, &headers, command).await
}

/// Give a claim back (counts as a failed attempt).
#[utoipa::path(post, path = "/v1/claims/{claim_id}/release", tag = "work",
    params(("claim_id" = String, Path, description = "The claim id"),
        ("Idempotency-Key" = Option<String>, Header, description = "The command id"),
        ("If-Match" = Option<String>, Header, description = "The revision the decision was made on")),
    request_body = ReleaseRequest,
    responses(
        (status = 200, body = CommandResponse),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, body = Problem, content_type = "application/problem+json"),
    ))]
async fn release(
    AxumState(state): AxumState<AppState>,
    Auth(principal): Auth,
    PathId(id): PathId,
    headers: HeaderMap,
    body: Result<Json<Object<ReleaseRequest>>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_body(body).map_err(|e| sized(&state, e))?;
    let claim_id = claim_id(&id)?;
    let command = Command::ReleaseClaim {
        claim_id,
        reason: request.reason,
    };
    let outcome = state
        .claim_command(
            &principal,
            claim_id,
            idempotency_key(&headers)?,
            if_match(&headers)?,
            command,
        )
        .await?;
    Ok(command_response(StatusCode::OK, outcome))
}

/// Extend a claim's lease (the body may be empty).
#[utoipa::path(post, path = "/v1/claims/{claim_id}/heartbeat", tag = "work",
    params(("claim_id" = String, Path, description = "The claim id"),
        ("Idempotency-Key" = Option<String>, Header, description = "The command id"),
        ("If-Match" = Option<String>, Header, description = "The revision the agent last saw")),
    request_body(content = Option<HeartbeatRequest>),
    responses(
        (status = 200, body = CommandResponse),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The claim is stale or its lease expired", body = Problem, content_type = "application/problem+json"),
    ))]
async fn heartbeat(
    AxumState(state): AxumState<AppState>,
    Auth(principal): Auth,
    PathId(id): PathId,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|error| {
        if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
            sized(&state, ApiError::PayloadTooLarge { limit: 0 })
        } else if timed_out(&error) {
            sized(
                &state,
                ApiError::BodyTimeout {
                    after: std::time::Duration::ZERO,
                },
            )
        } else {
            ApiError::bad_request("malformed_json", error.body_text())
        }
    })?;
    // No body at all, or JSON `null` (as the OpenAPI document allows), is
    // a heartbeat with the default lease; a body is JSON, declared as such
    // and with nothing after it, as on every other endpoint.
    let request: HeartbeatRequest = if body.iter().all(u8::is_ascii_whitespace) {
        HeartbeatRequest::default()
    } else {
        if !declares_json(&headers) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let mut deserializer = serde_json::Deserializer::from_slice(&body);
        let as_problem = |error: serde_json::Error| {
            if error.is_data() {
                ApiError::unprocessable("invalid_body", error.to_string())
            } else {
                ApiError::bad_request("malformed_json", error.to_string())
            }
        };
        let request: Option<Object<HeartbeatRequest>> =
            serde::Deserialize::deserialize(&mut deserializer).map_err(as_problem)?;
        deserializer.end().map_err(as_problem)?;
        request.map_or_else(HeartbeatRequest::default, |Object(request)| request)
    };
    let claim_id = claim_id(&id)?;
    let command = Command::ExtendLease {
        claim_id,
        lease_secs: request.lease_secs,
    };
    let outcome = state
        .claim_command(
            &principal,
            claim_id,
            idempotency_key(&headers)?,
            if_match(&headers)?,
            command,
        )
        .await?;
    Ok(command_response(StatusCode::OK, outcome))
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health", security(()), responses((status = 200, body = Object)))]
async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: the event store answers and takes writes, and the read
/// models can be read; `503` while starting or shutting down, or when any
/// of that fails. The body
/// says `degraded` (still 200) when a projection stopped on an error or,
/// with PostgreSQL read models, is behind with no instance leading it:
/// reads are stale until an operator acts, on every instance alike.
#[utoipa::path(get, path = "/readyz", tag = "health", security(()),
    responses((status = 200, description = "`{\"status\": \"ready\" | \"degraded\", \"projections\": [{\"name\", \"behind\", \"stopped\", \"unled\"}]}`", body = Object),
        (status = 503, body = Problem, content_type = "application/problem+json")))]
async fn readyz(AxumState(state): AxumState<AppState>) -> Result<Json<crate::service::Readiness>, ApiError> {
    Ok(Json(state.ready().await?))
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn unknown_route() -> ApiError {
    ApiError::NotFound {
        code: "not_found",
        detail: "no such resource; see /openapi.json".to_owned(),
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token made by `triage agents add`; it carries the agent id and roles.",
                    ))
                    .build(),
            ),
        );
    }
}

/// Adds the problems every operation of the JSON API can answer with to
/// each one that does not list them itself: a client generated from the
/// document then knows them all.
#[derive(Debug)]
struct CommonProblems;

impl Modify for CommonProblems {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{Content, Ref, ResponseBuilder};
        let problem = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/problem+json",
                    Content::new(Some(Ref::from_schema_name("Problem"))),
                )
                .build()
        };
        let every: [(&str, &str); 3] = [
            (
                "400",
                "Malformed: JSON syntax (malformed_json), a header (invalid_header), the query (invalid_query) \
                 or a path id (invalid_path)",
            ),
            ("401", "No bearer token, or one that is unknown or revoked"),
            (
                "503",
                "The server is starting, shutting down, or cannot reach its store",
            ),
        ];
        let with_body: [(&str, &str); 4] = [
            ("408", "The body stalled (body_timeout)"),
            ("413", "The body is larger than allowed (payload_too_large)"),
            ("415", "The body is not declared as JSON (unsupported_media_type)"),
            ("422", "The body does not match the schema, or fails validation"),
        ];
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") {
                continue;
            }
            for (operation, has_body) in [(item.get.as_mut(), false), (item.post.as_mut(), true)] {
                let Some(operation) = operation else { continue };
                let listed = &mut operation.responses.responses;
                for (status, description) in every.iter().chain(with_body.iter().filter(|_| has_body)) {
                    listed
                        .entry((*status).to_owned())
                        .or_insert_with(|| problem(description).into());
                }
            }
        }
    }
}

/// The OpenAPI 3.1 document, generated from the handlers and bodies above.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Triage agent API",
        description = "Agents and operators work support tickets. Every error is an RFC 9457 problem document \
            (application/problem+json) whose `type` is `urn:triage:problem:<code>`. `Idempotency-Key` is the \
            command id; `If-Match` is the revision a decision was made on; `ETag` is a ticket's revision."
    ),
    paths(open_ticket, list_tickets, get_ticket, ticket_events, stats, claim, classify, draft, escalate, resolve,
        reject_draft, release, heartbeat, healthz, readyz),
    components(schemas(Problem, TicketView, ClaimView, ClassificationView, EventView, CommandResponse, ClaimResponse,
        TicketList, EventList, OpenedTicket, OpenTicketRequest, ClaimRequest, ClassificationRequest, DraftRequest, EscalationRequest,
        ResolutionRequest, RejectionRequest, ReleaseRequest, HeartbeatRequest, RoleName, PriorityName)),
    modifiers(&BearerAuth, &CommonProblems),
    security(("bearer" = [])),
    tags((name = "tickets", description = "Open and read tickets"),
        (name = "work", description = "Claim work and complete it under the claim"),
        (name = "health", description = "Liveness and readiness"))
)]
#[derive(Debug)]
pub struct ApiDoc;
