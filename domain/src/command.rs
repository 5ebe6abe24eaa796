//! Commands: what agents ask for. Each is checked against the transition
//! table before it becomes events.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{Agent, Priority, TicketId};

/// The kind of a command, without its payload: the key of the transition
/// table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// Open a new ticket.
    OpenTicket,
    /// Claim a new ticket for classification.
    StartClassification,
    /// Complete a classification claim.
    Classify,
    /// Claim a classified ticket for drafting.
    StartDrafting,
    /// Complete a drafting claim.
    SubmitDraft,
    /// Claim a draft for review and sending.
    StartEscalation,
    /// Send the answer and close the ticket.
    Resolve,
    /// Send the draft back to drafting.
    RejectDraft,
    /// Hand the ticket to a human operator.
    EscalateToHuman,
    /// Give a claim back.
    ReleaseClaim,
    /// Extend a claim's lease.
    ExtendLease,
    /// Expire a claim whose lease ran out.
    ExpireClaim,
    /// Replace another agent's claim with one's own.
    TakeOver,
}

impl CommandKind {
    /// Every command kind.
    pub const ALL: [CommandKind; 13] = [
        CommandKind::OpenTicket,
        CommandKind::StartClassification,
        CommandKind::Classify,
        CommandKind::StartDrafting,
        CommandKind::SubmitDraft,
        CommandKind::StartEscalation,
        CommandKind::Resolve,
        CommandKind::RejectDraft,
        CommandKind::EscalateToHuman,
        CommandKind::ReleaseClaim,
        CommandKind::ExtendLease,
        CommandKind::ExpireClaim,
        CommandKind::TakeOver,
    ];

    /// The name used in tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::OpenTicket => "open_ticket",
            CommandKind::StartClassification => "start_classification",
            CommandKind::Classify => "classify",
            CommandKind::StartDrafting => "start_drafting",
            CommandKind::SubmitDraft => "submit_draft",
            CommandKind::StartEscalation => "start_escalation",
            CommandKind::Resolve => "resolve",
            CommandKind::RejectDraft => "reject_draft",
            CommandKind::EscalateToHuman => "escalate_to_human",
            CommandKind::ReleaseClaim => "release_claim",
            CommandKind::ExtendLease => "extend_lease",
            CommandKind::ExpireClaim => "expire_claim",
            CommandKind::TakeOver => "take_over",
        }
    }
}

impl fmt::Display for CommandKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command with its payload.
///
/// Claim ids are the ids of the commands that took the claims, so a retried
/// claim command yields the same claim.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Open a ticket.
    OpenTicket {
        /// The subject line.
        subject: String,
        /// The customer's message.
        body: String,
        /// Who wrote in, if known.
        #[serde(default)]
        customer: Option<String>,
    },
    /// Claim a `NEW` ticket for classification.
    StartClassification {
        /// Requested lease; the policy's default when absent.
        #[serde(default)]
        lease_secs: Option<u32>,
    },
    /// Complete a classification claim.
    Classify {
        /// The claim being completed.
        claim_id: Uuid,
        /// One of the configured categories.
        category: String,
        /// How urgent.
        priority: Priority,
        /// Confidence in [0, 1].
        confidence: f64,
    },
    /// Claim a `CLASSIFIED` ticket for drafting.
    StartDrafting {
        /// Requested lease; the policy's default when absent.
        #[serde(default)]
        lease_secs: Option<u32>,
    },
    /// Complete a drafting claim with a draft reply.
    SubmitDraft {
        /// The claim being completed.
        claim_id: Uuid,
        /// The draft reply.
        body: String,
    },
    /// Claim a `DRAFT_READY` ticket for review.
    StartEscalation {
        /// Requested lease; the policy's default when absent.
        #[serde(default)]
        lease_secs: Option<u32>,
    },
    /// Close the ticket. An escalator sends the draft under its claim; an
    /// operator may resolve at any point without one.
    Resolve {
        /// The claim being completed (escalators).
        #[serde(default)]
        claim_id: Option<Uuid>,
        /// What was done.
        resolution: String,
    },
    /// Send the draft back to `CLASSIFIED` for another draft; the rejection
    /// that reaches the policy's `max_attempts` hands the ticket to a human.
    RejectDraft {
        /// The review claim (escalators).
        #[serde(default)]
        claim_id: Option<Uuid>,
        /// Why the draft is not good enough.
        reason: String,
    },
    /// Hand the ticket to a human operator.
    EscalateToHuman {
        /// The review claim.
        claim_id: Uuid,
        /// Why a human is needed.
        reason: String,
    },
    /// Give a claim back; counts as a failed attempt.
    ReleaseClaim {
        /// The claim given back.
        claim_id: Uuid,
        /// Why.
        reason: String,
    },
    /// Extend a claim's lease (a heartbeat).
    ExtendLease {
        /// The claim extended.
        claim_id: Uuid,
        /// New lease from now; the policy's default when absent.
        #[serde(default)]
        lease_secs: Option<u32>,
    },
    /// Expire a claim whose lease ran out. Sent by the lease sweeper.
    ExpireClaim {
        /// The claim expired.
        claim_id: Uuid,
    },
    /// Replace the current claim with the sender's own (operators).
    TakeOver {
        /// Requested lease; the policy's default when absent.
        #[serde(default)]
        lease_secs: Option<u32>,
    },
}

impl Command {
    /// The command's kind.
    pub fn kind(&self) -> CommandKind {
        match self {
            Command::OpenTicket { .. } => CommandKind::OpenTicket,
            Command::StartClassification { .. } => CommandKind::StartClassification,
            Command::Classify { .. } => CommandKind::Classify,
            Command::StartDrafting { .. } => CommandKind::StartDrafting,
            Command::SubmitDraft { .. } => CommandKind::SubmitDraft,
            Command::StartEscalation { .. } => CommandKind::StartEscalation,
            Command::Resolve { .. } => CommandKind::Resolve,
            Command::RejectDraft { .. } => CommandKind::RejectDraft,
            Command::EscalateToHuman { .. } => CommandKind::EscalateToHuman,
            Command::ReleaseClaim { .. } => CommandKind::ReleaseClaim,
            Command::ExtendLease { .. } => CommandKind::ExtendLease,
            Command::ExpireClaim { .. } => CommandKind::ExpireClaim,
            Command::TakeOver { .. } => CommandKind::TakeOver,
        }
    }

    /// The lease the command asks for, in seconds, if it names one
    /// (`None`: the policy's default, or a command that takes no lease).
    pub fn lease_secs(&self) -> Option<u32> {
        match self {
            Command::StartClassification { lease_secs }
            | Command::StartDrafting { lease_secs }
            | Command::StartEscalation { lease_secs }
            | Command::TakeOver { lease_secs }
            | Command::ExtendLease { lease_secs, .. } => *lease_secs,
            _ => None,
        }
    }

    /// The claim the command acts under, if it names one.
    pub fn claim_id(&self) -> Option<Uuid> {
        match self {
            Command::Classify { claim_id, .. }
            | Command::SubmitDraft { claim_id, .. }
            | Command::EscalateToHuman { claim_id, .. }
            | Command::ReleaseClaim { claim_id, .. }
            | Command::ExtendLease { claim_id, .. }
            | Command::ExpireClaim { claim_id } => Some(*claim_id),
            Command::Resolve { claim_id, .. } | Command::RejectDraft { claim_id, .. } => *claim_id,
            Command::OpenTicket { .. }
            | Command::StartClassification { .. }
            | Command::StartDrafting { .. }
            | Command::StartEscalation { .. }
            | Command::TakeOver { .. } => None,
        }
    }
}

/// A command with everything the handler needs around it: who sends it, for
/// which ticket, under which id, and the revision it was decided on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandEnvelope {
    /// The command id: retries reuse it, and event ids derive from it.
    pub command_id: Uuid,
    /// The ticket it acts on.
    pub ticket_id: TicketId,
    /// The sender.
    pub agent: Agent,
    /// The ticket revision the sender decided on. When present and the ticket
    /// has moved on, the command is rejected rather than re-applied.
    #[serde(default)]
    pub expected_revision: Option<u64>,
    /// Groups every command of one conversation or workflow.
    #[serde(default)]
    pub correlation_id: Option<Uuid>,
    /// The command or event that caused this one.
    #[serde(default)]
    pub causation_id: Option<Uuid>,
    /// The W3C `traceparent` of the sender's trace.
    #[serde(default)]
    pub traceparent: Option<String>,
    /// The command itself.
    pub command: Command,
}

impl CommandEnvelope {
    /// A command with a fresh, time-ordered (UUIDv7) id and no optional
    /// context. Time-ordered, so that its events' ids are too (see
    /// [`crate::event_id`]).
    pub fn new(ticket_id: TicketId, agent: Agent, command: Command) -> Self {
        CommandEnvelope {
            command_id: Uuid::now_v7(),
            ticket_id,
            agent,
            expected_revision: None,
            correlation_id: None,
            causation_id: None,
            traceparent: None,
            command,
        }
    }

    /// Sets the revision the command was decided on.
    pub fn at_revision(mut self, revision: u64) -> Self {
        self.expected_revision = Some(revision);
        self
    }

    /// Sets the command id.
    pub fn with_id(mut self, command_id: Uuid) -> Self {
        self.command_id = command_id;
        self
    }
}
