//! The ticket aggregate, modelled minimally but faithfully on Triage's
//! domain: the same seven happy-path commands with the same roles, the
//! same validation (categories, confidence, draft size, leases), the same
//! claims with fencing (only the holder, before its lease runs out), and
//! one event per command, with the same fields as Triage's events.

use chrono::{DateTime, Duration, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Configured categories, as in Triage's default policy.
const CATEGORIES: [&str; 6] = ["billing", "outage", "account_access", "bug", "feature_request", "other"];
const DEFAULT_LEASE_SECS: u32 = 60;
const MAX_LEASE_SECS: u32 = 3600;
const MAX_DRAFT_BYTES: usize = 16 * 1024;
const MAX_SUBJECT_CHARS: usize = 200;
const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Role {
    Intake,
    Classifier,
    Drafter,
    Escalator,
    Operator,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Agent {
    pub(crate) id: String,
    pub(crate) role: Role,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum State {
    New,
    Classifying,
    Classified,
    Drafting,
    DraftReady,
    Escalating,
    Resolved,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Priority {
    High,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Claim {
    pub(crate) claim_id: Uuid,
    pub(crate) agent_id: String,
    pub(crate) lease_expires_at: DateTime<Utc>,
}

/// What an agent asks for. The command id travels with the command, as in
/// Triage: a `Start…` command's id becomes the claim id.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TicketCommand {
    pub(crate) command_id: Uuid,
    pub(crate) ticket_id: Uuid,
    pub(crate) agent: Agent,
    pub(crate) kind: CommandKind,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum CommandKind {
    OpenTicket {
        subject: String,
        body: String,
        customer: Option<String>,
    },
    StartClassification {
        lease_secs: Option<u32>,
    },
    Classify {
        claim_id: Uuid,
        category: String,
        priority: Priority,
        confidence: f64,
    },
    StartDrafting {
        lease_secs: Option<u32>,
    },
    SubmitDraft {
        claim_id: Uuid,
        body: String,
    },
    StartEscalation {
        lease_secs: Option<u32>,
    },
    Resolve {
        claim_id: Option<Uuid>,
        resolution: String,
    },
}

/// One event per command, with the payload Triage's events carry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum TicketEvent {
    TicketOpened {
        ticket_id: Uuid,
        subject: String,
        body: String,
        customer: Option<String>,
    },
    ClassificationStarted {
        claim: Claim,
    },
    TicketClassified {
        claim_id: Uuid,
        category: String,
        priority: Priority,
        confidence: f64,
    },
    DraftingStarted {
        claim: Claim,
    },
    DraftSubmitted {
        claim_id: Uuid,
        body: String,
    },
    EscalationStarted {
        claim: Claim,
    },
    TicketResolved {
        claim_id: Option<Uuid>,
        resolution: String,
    },
}

impl DomainEvent for TicketEvent {
    fn event_type(&self) -> String {
        match self {
            TicketEvent::TicketOpened { .. } => "TicketOpened",
            TicketEvent::ClassificationStarted { .. } => "ClassificationStarted",
            TicketEvent::TicketClassified { .. } => "TicketClassified",
            TicketEvent::DraftingStarted { .. } => "DraftingStarted",
            TicketEvent::DraftSubmitted { .. } => "DraftSubmitted",
            TicketEvent::EscalationStarted { .. } => "EscalationStarted",
            TicketEvent::TicketResolved { .. } => "TicketResolved",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

/// Why a command was refused; nothing is written then.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Rejection {
    #[error("the ticket already exists")]
    AlreadyExists,
    #[error("the ticket does not exist")]
    NotFound,
    #[error("{command} is not allowed in state {state:?}")]
    InvalidTransition { command: &'static str, state: State },
    #[error("role {role:?} may not send {command}")]
    RoleNotAllowed { command: &'static str, role: Role },
    #[error("claim {0} is not the current claim")]
    StaleClaim(Uuid),
    #[error("the lease of claim {0} expired")]
    LeaseExpired(Uuid),
    #[error("invalid input: {0}")]
    Invalid(&'static str),
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Ticket {
    pub(crate) state: Option<State>,
    claim: Option<Claim>,
    category: Option<String>,
    confidence: Option<f64>,
    draft: Option<String>,
    resolution: Option<String>,
}

impl Ticket {
    /// The current claim, checked for holder and lease (fencing).
    fn check_claim(&self, claim_id: Uuid, now: DateTime<Utc>) -> Result<(), Rejection> {
        match &self.claim {
            Some(claim) if claim.claim_id == claim_id && now < claim.lease_expires_at => Ok(()),
            Some(claim) if claim.claim_id == claim_id => Err(Rejection::LeaseExpired(claim_id)),
            _ => Err(Rejection::StaleClaim(claim_id)),
        }
    }

    fn require(&self, command: &'static str, from: State, role: Role, roles: &[Role]) -> Result<(), Rejection> {
        let state = self.state.ok_or(Rejection::NotFound)?;
        if state != from {
            return Err(Rejection::InvalidTransition { command, state });
        }
        if !roles.contains(&role) {
            return Err(Rejection::RoleNotAllowed { command, role });
        }
        Ok(())
    }
}

fn new_claim(command: &TicketCommand, lease_secs: Option<u32>, now: DateTime<Utc>) -> Result<Claim, Rejection> {
    let secs = lease_secs.unwrap_or(DEFAULT_LEASE_SECS);
    if secs == 0 || secs > MAX_LEASE_SECS {
        return Err(Rejection::Invalid("lease out of range"));
    }
    Ok(Claim {
        claim_id: command.command_id,
        agent_id: command.agent.id.clone(),
        lease_expires_at: now + Duration::seconds(i64::from(secs)),
    })
}

impl Ticket {
    /// Triage's `decide` for the happy path: the event the command makes,
    /// or why not.
    pub(crate) fn decide(&self, command: &TicketCommand, now: DateTime<Utc>) -> Result<TicketEvent, Rejection> {
        use Role as R;
        let role = command.agent.role;
        Ok(match &command.kind {
            CommandKind::OpenTicket {
                subject,
                body,
                customer,
            } => {
                if self.state.is_some() {
                    return Err(Rejection::AlreadyExists);
                }
                if ![R::Intake, R::Operator].contains(&role) {
                    return Err(Rejection::RoleNotAllowed {
                        command: "open_ticket",
                        role,
                    });
                }
                if subject.trim().is_empty() || subject.chars().count() > MAX_SUBJECT_CHARS {
                    return Err(Rejection::Invalid("subject"));
                }
                if body.trim().is_empty() || body.len() > MAX_BODY_BYTES {
                    return Err(Rejection::Invalid("body"));
                }
                TicketEvent::TicketOpened {
                    ticket_id: command.ticket_id,
                    subject: subject.clone(),
                    body: body.clone(),
                    customer: customer.clone(),
                }
            }
            CommandKind::StartClassification { lease_secs } => {
                self.require("start_classification", State::New, role, &[R::Classifier, R::Operator])?;
                TicketEvent::ClassificationStarted {
                    claim: new_claim(command, *lease_secs, now)?,
                }
            }
            CommandKind::Classify {
                claim_id,
                category,
                priority,
                confidence,
            } => {
                self.require("classify", State::Classifying, role, &[R::Classifier, R::Operator])?;
                self.check_claim(*claim_id, now)?;
                if !CATEGORIES.contains(&category.as_str()) {
                    return Err(Rejection::Invalid("unknown category"));
                }
                if !(0.0..=1.0).contains(confidence) {
                    return Err(Rejection::Invalid("confidence not in [0, 1]"));
                }
                TicketEvent::TicketClassified {
                    claim_id: *claim_id,
                    category: category.clone(),
                    priority: *priority,
                    confidence: *confidence,
                }
            }
            CommandKind::StartDrafting { lease_secs } => {
                self.require("start_drafting", State::Classified, role, &[R::Drafter, R::Operator])?;
                TicketEvent::DraftingStarted {
                    claim: new_claim(command, *lease_secs, now)?,
                }
            }
            CommandKind::SubmitDraft { claim_id, body } => {
                self.require("submit_draft", State::Drafting, role, &[R::Drafter, R::Operator])?;
                self.check_claim(*claim_id, now)?;
                if body.trim().is_empty() || body.len() > MAX_DRAFT_BYTES {
                    return Err(Rejection::Invalid("draft empty or too long"));
                }
                TicketEvent::DraftSubmitted {
                    claim_id: *claim_id,
                    body: body.clone(),
                }
            }
            CommandKind::StartEscalation { lease_secs } => {
                self.require(
                    "start_escalation",
                    State::DraftReady,
                    role,
                    &[R::Escalator, R::Operator],
                )?;
                TicketEvent::EscalationStarted {
                    claim: new_claim(command, *lease_secs, now)?,
                }
            }
            CommandKind::Resolve { claim_id, resolution } => {
                self.require("resolve", State::Escalating, role, &[R::Escalator])?;
                let claim_id = claim_id.ok_or(Rejection::Invalid("an escalator resolves under its claim"))?;
                self.check_claim(claim_id, now)?;
                TicketEvent::TicketResolved {
                    claim_id: Some(claim_id),
                    resolution: resolution.clone(),
                }
            }
        })
    }
}

impl Aggregate for Ticket {
    const TYPE: &'static str = "ticket";
    type Command = TicketCommand;
    type Event = TicketEvent;
    type Error = Rejection;
    type Services = ();

    async fn handle(&mut self, command: TicketCommand, _: &(), sink: &EventSink<Self>) -> Result<(), Rejection> {
        let event = self.decide(&command, Utc::now())?;
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: TicketEvent) {
        match event {
            TicketEvent::TicketOpened { .. } => self.state = Some(State::New),
            TicketEvent::ClassificationStarted { claim } => {
                self.state = Some(State::Classifying);
                self.claim = Some(claim);
            }
            TicketEvent::TicketClassified {
                category, confidence, ..
            } => {
                self.state = Some(State::Classified);
                self.claim = None;
                self.category = Some(category);
                self.confidence = Some(confidence);
            }
            TicketEvent::DraftingStarted { claim } => {
                self.state = Some(State::Drafting);
                self.claim = Some(claim);
            }
            TicketEvent::DraftSubmitted { body, .. } => {
                self.state = Some(State::DraftReady);
                self.claim = None;
                self.draft = Some(body);
            }
            TicketEvent::EscalationStarted { claim } => {
                self.state = Some(State::Escalating);
                self.claim = Some(claim);
            }
            TicketEvent::TicketResolved { resolution, .. } => {
                self.state = Some(State::Resolved);
                self.claim = None;
                self.resolution = Some(resolution);
            }
        }
    }
}
