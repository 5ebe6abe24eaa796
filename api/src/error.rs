//! The one place where errors become HTTP responses: RFC 9457 problem
//! documents with a stable `type` per kind of failure.
//!
//! Validation → 400/422; a stale decision or a rejected transition → 409
//! with the ticket's current state and revision; auth → 401/403; limits →
//! 413; internal errors → 500 with a generic body, the detail going to
//! tracing only.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use triage_command_handler::CommandError;
use triage_domain::{Rejection, Role, State, TicketId};
use triage_projections::ProjectionError;
use utoipa::ToSchema;

use crate::model::EventView;

/// The `type` of every problem is `urn:triage:problem:<code>`.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:triage:problem:";

/// An RFC 9457 problem document, with Triage's extension members.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct Problem {
    /// `urn:triage:problem:<code>`; stable, for programs to match on.
    #[serde(rename = "type")]
    pub problem_type: String,
    /// A short, human-readable summary of the type.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong this time, for people.
    pub detail: String,
    /// The code alone, e.g. `stale_revision`.
    pub code: String,
    /// The ticket concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Uuid)]
    pub ticket_id: Option<TicketId>,
    /// The ticket's current state (conflicts).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub state: Option<State>,
    /// The ticket's current revision (conflicts): decide again from here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// The events after the revision the request was decided on (stale
    /// `If-Match`), at most 500: the first of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<EventView>>,
    /// With `events`, when more followed than fit: the revision they start
    /// at (`GET /v1/tickets/{id}/events?from_revision=…`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_revision: Option<u64>,
    /// When the claim's lease ran out (409 `lease_expired`), RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_expired_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The roles that may do this (403).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<String>>)]
    pub allowed_roles: Option<Vec<Role>>,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// No token, or one that is unknown or revoked.
    #[error("{0}")]
    Unauthorized(String),
    /// The token's roles may not do this.
    #[error("{detail}")]
    Forbidden {
        /// What was refused.
        detail: String,
        /// The roles that may.
        allowed: Vec<Role>,
    },
    /// The ticket or claim does not exist.
    #[error("{detail}")]
    NotFound {
        /// A stable code.
        code: &'static str,
        /// What was not found.
        detail: String,
    },
    /// The request is malformed: bad JSON syntax, a bad header or query.
    #[error("{detail}")]
    BadRequest {
        /// A stable code.
        code: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The request is well-formed but its content is not acceptable.
    #[error("{detail}")]
    Unprocessable {
        /// A stable code.
        code: &'static str,
        /// What is wrong.
        detail: String,
        /// The ticket concerned.
        ticket_id: Option<TicketId>,
    },
    /// The body is larger than allowed.
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The body stalled for longer than allowed
    /// ([`crate::Limits::body_timeout`]).
    #[error("the request body stalled for more than {} s", .after.as_secs_f64())]
    BodyTimeout {
        /// The time allowed.
        after: std::time::Duration,
    },
    /// The route exists, but not with this method.
    #[error("this method is not allowed here; see /openapi.json")]
    MethodNotAllowed,
    /// The body is not JSON.
    #[error("the request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    /// The body is compressed or otherwise encoded.
    #[error(
        "request bodies are taken as they are: Content-Encoding {0:?} is not supported; send the JSON uncompressed"
    )]
    UnsupportedEncoding(String),
    /// The request conflicts with the ticket's current state: a stale
    /// decision, a rejected transition, a stale or expired claim.
    #[error("{detail}")]
    Conflict {
        /// A stable code.
        code: &'static str,
        /// What conflicts.
        detail: String,
        /// The ticket.
        ticket_id: Option<TicketId>,
        /// Its current state.
        state: Option<State>,
        /// Its current revision.
        revision: Option<u64>,
        /// The events since the revision the request was decided on.
        events: Option<Vec<EventView>>,
        /// Where the events after `events` start, when there are more.
        next_revision: Option<u64>,
        /// When the claim's lease ran out (`lease_expired`).
        lease_expired_at: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// The server is starting, stopping or cannot reach its store.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else; the detail is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 with `code`.
    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            detail: detail.into(),
        }
    }

    /// A 422 with `code`.
    pub fn unprocessable(code: &'static str, detail: impl Into<String>) -> Self {
        ApiError::Unprocessable {
            code,
            detail: detail.into(),
            ticket_id: None,
        }
    }

    /// The reused-idempotency-key problem.
    pub fn key_reused(detail: impl Into<String>) -> Self {
        ApiError::unprocessable("idempotency_key_reused", detail)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType | ApiError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden { .. } => "role_not_allowed",
            ApiError::NotFound { code, .. }
            | ApiError::BadRequest { code, .. }
            | ApiError::Unprocessable { code, .. }
            | ApiError::Conflict { code, .. } => code,
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::BodyTimeout { .. } => "body_timeout",
            ApiError::UnsupportedMediaType | ApiError::UnsupportedEncoding(_) => "unsupported_media_type",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The problem document. Internal errors get a generic detail.
    pub fn problem(&self) -> Problem {
        let status = self.status();
        let code = self.code();
        let mut problem = Problem {
            problem_type: format!("{PROBLEM_TYPE_PREFIX}{code}"),
            title: title(code).to_owned(),
            status: status.as_u16(),
            detail: match self {
                ApiError::Internal(_) => "the server failed; the error was logged".to_owned(),
                other => other.to_string(),
            },
            code: code.to_owned(),
            ticket_id: None,
            state: None,
            revision: None,
            events: None,
            next_revision: None,
            lease_expired_at: None,
            allowed_roles: None,
        };
        match self {
            ApiError::Forbidden { allowed, .. } => problem.allowed_roles = Some(allowed.clone()),
            ApiError::Unprocessable { ticket_id, .. } => problem.ticket_id = *ticket_id,
            ApiError::Conflict {
                ticket_id,
                state,
                revision,
                events,
                next_revision,
                lease_expired_at,
                ..
            } => {
                problem.ticket_id = *ticket_id;
                problem.state = *state;
                problem.revision = *revision;
                problem.events = events.clone();
                problem.next_revision = *next_revision;
                problem.lease_expired_at = *lease_expired_at;
            }
            _ => {}
        }
        problem
    }

    /// Maps the command handler's errors. The stale-revision conflict has
    /// no events yet; the caller adds them ([`ApiError::with_events`]).
    pub fn from_command(error: CommandError) -> Self {
        match error {
            CommandError::Rejected {
                rejection,
                ticket_id,
                state,
                revision,
            } => {
                let code = rejection.code();
                let detail = rejection.to_string();
                let lease_expired_at = match rejection {
                    Rejection::LeaseExpired { expired_at, .. } => Some(expired_at),
                    _ => None,
                };
                match rejection {
                    Rejection::TicketNotFound => ApiError::NotFound {
                        code,
                        detail: format!("ticket {ticket_id} does not exist"),
                    },
                    Rejection::RoleNotAllowed { allowed, .. } => ApiError::Forbidden { detail, allowed },
                    Rejection::Invalid(_) | Rejection::ClaimRequired { .. } => ApiError::Unprocessable {
                        code,
                        detail,
                        ticket_id: Some(ticket_id),
                    },
                    _ => ApiError::Conflict {
                        code,
                        detail,
                        ticket_id: Some(ticket_id),
                        state,
                        revision,
                        events: None,
                        next_revision: None,
                        lease_expired_at,
                    },
                }
            }
            error @ CommandError::StaleRevision { .. } => {
                let detail = format!("{error}; look at the ticket again and decide anew");
                let CommandError::StaleRevision {
                    ticket_id,
                    actual,
                    state,
                    ..
                } = error
                else {
                    unreachable!("matched above")
                };
                ApiError::Conflict {
                    code: "stale_revision",
                    detail,
                    ticket_id: Some(ticket_id),
                    state,
                    revision: actual,
                    events: Some(Vec::new()),
                    next_revision: None,
                    lease_expired_at: None,
                }
            }
            CommandError::Contended { ticket_id, attempts } => ApiError::Conflict {
                code: "contended",
                detail: format!(
                    "gave up after {attempts} attempts: other writers kept changing ticket {ticket_id}; the command \
                     was not applied: retry it (with the same Idempotency-Key, a retry is safe)"
                ),
                ticket_id: None,
                state: None,
                revision: None,
                events: None,
                next_revision: None,
                lease_expired_at: None,
            },
            // The command id is the key itself only when the key is a
            // UUID, so the detail names it as the command id.
            CommandError::CommandIdReused { command_id } => ApiError::key_reused(format!(
                "this Idempotency-Key was already used for a different request (command {command_id}); this one \
                 was not applied"
            )),
            CommandError::Store(error) if error.is_unavailable() => {
                // The driver's message stays in the log: it can name hosts
                // and internals the client has no business with.
                tracing::error!(%error, "the event store failed a command");
                ApiError::Unavailable(
                    "the event store failed or did not answer, so the command may or may not have been stored: \
                     retry it with the same Idempotency-Key (a stored command is answered with its original outcome)"
                        .to_owned(),
                )
            }
            other => ApiError::Internal(other.to_string()),
        }
    }

    /// Adds the events since the decided-on revision to a stale conflict,
    /// and where the rest start when those are only the first of them.
    pub fn with_events(mut self, since: Vec<EventView>, more_from: Option<u64>) -> Self {
        if let ApiError::Conflict {
            events, next_revision, ..
        } = &mut self
        {
            *events = Some(since);
            *next_revision = more_from;
        }
        self
    }
}

impl From<ProjectionError> for ApiError {
    fn from(error: ProjectionError) -> Self {
        match error {
            ProjectionError::NotBuilt { name } => {
                ApiError::Unavailable(format!("the read model {name} is not built yet; retry shortly"))
            }
            error if error.is_unavailable() => {
                tracing::error!(%error, "a read model could not be read");
                ApiError::Unavailable(
                    "a database of the read models failed or did not answer; retry shortly".to_owned(),
                )
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

fn title(code: &str) -> &'static str {
    match code {
        "unauthorized" => "Missing or invalid bearer token",
        "forbidden" | "role_not_allowed" => "The token's roles may not do this",
        "ticket_not_found" => "No such ticket",
        "claim_not_found" => "No such claim",
        "malformed_json" => "The body is not valid JSON",
        "invalid_header" => "A header is not valid",
        "invalid_query" => "The query string is not valid",
        "invalid_path" => "The path is not valid",
        "invalid_body" => "The body does not match the schema",
        "invalid_input" => "The input failed validation",
        "claim_required" => "The command must name its claim",
        "idempotency_key_reused" => "The Idempotency-Key was used for a different request",
        "payload_too_large" => "The body is too large",
        "body_timeout" => "The body stalled",
        "unsupported_media_type" => "The body must be JSON",
        "stale_revision" => "The ticket changed since the revision you decided on",
        "invalid_transition" => "Not allowed in the ticket's current state",
        "stale_claim" => "The claim is not the ticket's current claim",
        "not_claim_holder" => "The claim belongs to another agent",
        "lease_expired" => "The claim's lease expired",
        "lease_not_expired" => "The claim's lease still runs",
        "ticket_already_exists" => "The ticket exists already",
        "contended" => "Too many concurrent writers; retry",
        "unavailable" => "Service unavailable",
        "not_found" => "Not found",
        "method_not_allowed" => "Method not allowed",
        _ => "Internal server error",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let problem = self.problem();
        let mut response = (self.status(), axum::Json(problem)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if matches!(self, ApiError::Unauthorized(_)) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if matches!(self, ApiError::Unavailable(_)) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed store is the server's trouble, answered 503 with
    /// Retry-After and what the client may do; the driver's message (hosts,
    /// internals) stays in the log.
    #[tokio::test]
    async fn a_failed_store_is_503_with_retry_advice_and_no_driver_detail() {
        let failed = CommandError::Store(triage_event_store::Error::backend(
            "cannot append to ticket-x",
            std::io::Error::other("FATAL: terminating connection due to administrator command on db.internal:5432"),
        ));
        let response = ApiError::from_command(failed).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(problem["code"], "unavailable", "{problem}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains("same Idempotency-Key"), "{detail}");
        assert!(!detail.contains("db.internal"), "{detail}");

        let closed = ApiError::from_command(CommandError::Store(triage_event_store::Error::Closed));
        assert_eq!(closed.status(), StatusCode::SERVICE_UNAVAILABLE);
        // A refusal of the request itself is not unavailability.
        let empty = ApiError::from_command(CommandError::Store(triage_event_store::Error::EmptyAppend {
            stream: triage_event_store::StreamName::new("ticket-x").unwrap(),
        }));
        assert_ne!(empty.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    /// A store that refuses for good (a revoked privilege, a read-only
    /// server) is not told to the client as a passing outage: a retry in a
    /// second would fail the same way. It is a server error, logged, with
    /// no driver detail and no Retry-After.
    #[tokio::test]
    async fn a_refusing_store_is_500_without_retry_advice() {
        let refused = CommandError::Store(triage_event_store::Error::refused(
            "appending to ticket-x: the role \"agent\" lacks a privilege on db.internal",
            std::io::Error::other("permission denied for table triage_events"),
        ));
        let response = ApiError::from_command(refused).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(problem["code"], "internal", "{problem}");
        assert!(
            !problem["detail"].as_str().unwrap().contains("db.internal"),
            "{problem}"
        );

        let read_model = ApiError::from(ProjectionError::Store(triage_event_store::Error::refused(
            "reading the log",
            std::io::Error::other("permission denied"),
        )));
        assert_eq!(read_model.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
