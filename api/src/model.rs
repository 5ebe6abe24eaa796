//! The API's request and response bodies: their JSON keys are the contract.
//!
//! They derive both `utoipa::ToSchema` (the OpenAPI document) and
//! `schemars::JsonSchema` (the MCP tools' input schemas), so the HTTP and
//! MCP front doors describe the same shapes from the same code.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use triage_command_handler::{LoadedTicket, StoredEvent};
use triage_domain::{Priority, Role, State, Ticket, TicketId};
use triage_projections::TicketRow;
use utoipa::ToSchema;
use uuid::Uuid;

/// A role a token can act in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RoleName {
    /// Classifies NEW tickets.
    Classifier,
    /// Drafts replies to CLASSIFIED tickets.
    Drafter,
    /// Reviews DRAFT_READY tickets: resolves, rejects or hands to a human.
    Escalator,
    /// A human: opens, takes over and resolves at any point.
    Operator,
    /// Opens tickets.
    Intake,
    /// Reads only.
    Analyst,
}

impl From<RoleName> for Role {
    fn from(role: RoleName) -> Role {
        match role {
            RoleName::Classifier => Role::Classifier,
            RoleName::Drafter => Role::Drafter,
            RoleName::Escalator => Role::Escalator,
            RoleName::Operator => Role::Operator,
            RoleName::Intake => Role::Intake,
            RoleName::Analyst => Role::Analyst,
        }
    }
}

/// How urgent a ticket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PriorityName {
    /// Can wait.
    Low,
    /// The usual.
    Normal,
    /// Soon.
    High,
    /// Now.
    Urgent,
}

impl From<PriorityName> for Priority {
    fn from(priority: PriorityName) -> Priority {
        match priority {
            PriorityName::Low => Priority::Low,
            PriorityName::Normal => Priority::Normal,
            PriorityName::High => Priority::High,
            PriorityName::Urgent => Priority::Urgent,
        }
    }
}

/// `POST /v1/tickets`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenTicketRequest {
    /// The subject line (at most 200 characters).
    pub subject: String,
    /// The customer's message (at most 64 KiB).
    pub body: String,
    /// Who wrote in, e.g. an email address.
    #[serde(default)]
    pub customer: Option<String>,
}

/// `POST /v1/work/claim`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// The role to claim work for; the token must carry it.
    pub role: RoleName,
    /// The lease to ask for, in seconds (default 60, at most 3600).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3600)]
    pub lease_secs: Option<u32>,
}

/// `POST /v1/tickets/{id}/classification`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassificationRequest {
    /// The claim being completed, from the claim response.
    pub claim_id: Uuid,
    /// One of: billing, outage, account_access, bug, feature_request, other.
    pub category: String,
    /// How urgent the ticket is.
    pub priority: PriorityName,
    /// Confidence in [0, 1].
    pub confidence: f64,
}

/// `POST /v1/tickets/{id}/draft`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DraftRequest {
    /// The claim being completed.
    pub claim_id: Uuid,
    /// The draft reply to the customer (non-empty, at most 16 KiB).
    pub body: String,
}

/// `POST /v1/tickets/{id}/escalation`: hand the ticket to a human.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EscalationRequest {
    /// The review claim.
    pub claim_id: Uuid,
    /// Why a human is needed.
    pub reason: String,
}

/// `POST /v1/tickets/{id}/resolution`: send the answer and close the
/// ticket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolutionRequest {
    /// The review claim (escalators); operators may resolve without one.
    #[serde(default)]
    pub claim_id: Option<Uuid>,
    /// What was done.
    pub resolution: String,
}

/// `POST /v1/tickets/{id}/rejection`: send the draft back for another (or,
/// the rejection that reaches the policy's max attempts, to a human).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RejectionRequest {
    /// The review claim (escalators); operators may reject a waiting draft
    /// without one.
    #[serde(default)]
    pub claim_id: Option<Uuid>,
    /// Why the draft is not good enough.
    pub reason: String,
}

/// `POST /v1/claims/{claim_id}/release`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// Why the claim is given back (counts as a failed attempt).
    pub reason: String,
}

/// `POST /v1/claims/{claim_id}/heartbeat`; the body may be empty.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// The new lease from now, in seconds (default 60, at most 3600).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3600)]
    pub lease_secs: Option<u32>,
}

/// A classification.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct ClassificationView {
    /// The category.
    pub category: String,
    /// The priority.
    #[schema(value_type = PriorityName)]
    pub priority: Priority,
    /// The classifier's confidence.
    pub confidence: f64,
}

/// A work claim.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct ClaimView {
    /// The claim id: the id of the command that took it.
    pub claim_id: Uuid,
    /// The agent holding it.
    pub agent_id: String,
    /// When its lease runs out.
    pub lease_expires_at: DateTime<Utc>,
}

/// A ticket.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct TicketView {
    /// The ticket id.
    #[schema(value_type = String, format = Uuid)]
    pub id: TicketId,
    /// NEW, CLASSIFYING, CLASSIFIED, DRAFTING, DRAFT_READY, ESCALATING,
    /// NEEDS_HUMAN or RESOLVED.
    #[schema(value_type = String, example = "NEW")]
    pub state: State,
    /// The stream revision this view reflects; send it as `If-Match`.
    pub revision: u64,
    /// The subject line.
    pub subject: String,
    /// The customer's message.
    pub body: String,
    /// Who wrote in.
    pub customer: Option<String>,
    /// The latest classification.
    pub classification: Option<ClassificationView>,
    /// The latest draft reply.
    pub draft: Option<String>,
    /// The current claim, in a CLASSIFYING, DRAFTING or ESCALATING state.
    pub claim: Option<ClaimView>,
    /// Failed attempts at the current stage.
    pub attempts: u32,
    /// Drafts sent back by review; the one that reaches the policy's
    /// maximum attempts hands the ticket to a human.
    pub drafts_rejected: u32,
    /// How it was resolved.
    pub resolution: Option<String>,
    /// Why it was last sent back or handed to a human.
    pub last_reason: Option<String>,
    /// When it was opened.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// A ticket's time as the API gives it: to the microsecond, as the read
/// models keep it (see [`TicketView`]).
pub(crate) fn to_micros(time: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::SubsecRound as _;
    time.trunc_subsecs(6)
}

impl TicketView {
    /// Times are given to the microsecond, as the read models keep them,
    /// so that a ticket folded from its stream (`GET /v1/tickets/{id}`, a
    /// command's answer) reads exactly as the same ticket in a list.
    fn from_ticket(
        id: TicketId,
        ticket: &Ticket,
        revision: u64,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
    ) -> Option<Self> {
        let (created_at, updated_at) = (to_micros(created_at), to_micros(updated_at));
        Some(TicketView {
            id,
            state: ticket.state?,
            revision,
            subject: ticket.subject.clone(),
            body: ticket.body.clone(),
            customer: ticket.customer.clone(),
            classification: ticket.classification.as_ref().map(|c| ClassificationView {
                category: c.category.clone(),
                priority: c.priority,
                confidence: c.confidence,
            }),
            draft: ticket.draft.clone(),
            claim: ticket.claim.as_ref().map(|claim| ClaimView {
                claim_id: claim.claim_id,
                agent_id: claim.agent_id.clone(),
                lease_expires_at: to_micros(claim.lease_expires_at),
            }),
            attempts: ticket.attempts,
            drafts_rejected: ticket.drafts_rejected,
            resolution: ticket.resolution.clone(),
            last_reason: ticket.last_reason.clone(),
            created_at,
            updated_at,
        })
    }

    /// The view of a ticket loaded from its stream; `None` if it does not
    /// exist.
    pub fn from_loaded(id: TicketId, loaded: &LoadedTicket) -> Option<Self> {
        let first = loaded.history.first()?;
        let last = loaded.history.last()?;
        Self::from_ticket(
            id,
            &loaded.ticket,
            loaded.revision?,
            first.metadata.recorded_at,
            last.metadata.recorded_at,
        )
    }

    /// The view of a read-model row.
    pub fn from_row(row: &TicketRow) -> Option<Self> {
        Self::from_ticket(
            row.ticket.id?,
            &row.ticket,
            row.revision,
            row.created_at,
            row.updated_at,
        )
    }
}

/// One stored event of a ticket.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct EventView {
    /// Its stream revision (the first event is 0).
    pub revision: u64,
    /// Its position in the global log, `commit/prepare`.
    pub position: String,
    /// The event id.
    pub id: Uuid,
    /// Its type, e.g. `TicketClassified`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The event as stored (JSON).
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    /// The command that caused it.
    pub command_id: Uuid,
    /// The agent behind the command.
    pub agent_id: String,
    /// The role it acted in.
    #[schema(value_type = String)]
    pub role: Role,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
}

impl EventView {
    /// The view of a decoded stored event.
    pub fn from_stored(stored: &StoredEvent) -> Self {
        EventView {
            revision: stored.revision,
            position: format!("{}/{}", stored.position.commit, stored.position.prepare),
            id: stored.id,
            event_type: stored.event.event_type().to_owned(),
            data: serde_json::to_value(&stored.event).unwrap_or(serde_json::Value::Null),
            command_id: stored.metadata.command_id,
            agent_id: stored.metadata.agent.id.clone(),
            role: stored.metadata.agent.role,
            recorded_at: stored.metadata.recorded_at,
        }
    }
}

/// `200` of `POST /v1/work/claim`.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct ClaimResponse {
    /// The claimed ticket.
    pub ticket: TicketView,
    /// The claim id: name it when completing, releasing or extending.
    pub claim_id: Uuid,
    /// When the lease runs out unless extended by a heartbeat.
    pub lease_expires_at: DateTime<Utc>,
    /// The ticket's revision right after the claim: send it as `If-Match`.
    pub revision: u64,
    /// True when this answers a retry with the same Idempotency-Key.
    pub duplicate: bool,
}

/// The outcome of a command on a ticket.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct CommandResponse {
    /// The ticket as it is now.
    pub ticket: TicketView,
    /// The revision of the command's last event: send it as `If-Match` next.
    pub revision: u64,
    /// The command id (the Idempotency-Key, or a fresh one).
    pub command_id: Uuid,
    /// True when this answers a retry: nothing new was written.
    pub duplicate: bool,
    /// The types of the events the command produced.
    pub events: Vec<String>,
}

/// `201` of `POST /v1/tickets`: the ticket itself (`id`, `state`,
/// `revision`, …) with the command's id and whether this was a retry.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct OpenedTicket {
    /// The ticket.
    #[serde(flatten)]
    pub ticket: TicketView,
    /// The command id (the Idempotency-Key, or a fresh one).
    pub command_id: Uuid,
    /// True when this answers a retry: nothing new was written.
    pub duplicate: bool,
}

impl From<CommandResponse> for OpenedTicket {
    fn from(outcome: CommandResponse) -> Self {
        OpenedTicket {
            ticket: outcome.ticket,
            command_id: outcome.command_id,
            duplicate: outcome.duplicate,
        }
    }
}

/// `GET /v1/tickets`.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct TicketList {
    /// The tickets, oldest in their state first.
    pub tickets: Vec<TicketView>,
    /// When more follow: pass it back as `after` for the next page.
    pub next: Option<String>,
}

/// `GET /v1/tickets/{id}/events`.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct EventList {
    /// The ticket.
    #[schema(value_type = String, format = Uuid)]
    pub ticket_id: TicketId,
    /// Its events in revision order.
    pub events: Vec<EventView>,
    /// Where the next page starts (`from_revision`), when there are more.
    pub next_revision: Option<u64>,
}
