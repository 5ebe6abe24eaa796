//! An independent check of a stored history: is it a path through the
//! transition table, with every claim rule honoured?
//!
//! `decide` keeps histories valid on the way in; the auditor checks them on
//! the way out, from the events and their metadata alone, so that tests and
//! the demo can prove the invariants instead of trusting the writer.

use std::fmt;

use serde::Serialize;

use crate::command::CommandKind;
use crate::event::{Event, EventMetadata};
use crate::model::State;
use crate::table::{ClaimRule, TRANSITIONS};
use crate::ticket::{Ticket, evolve};

/// One way a history breaks the rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The index (revision) of the first event of the offending step.
    pub index: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "event {}: {}", self.index, self.message)
    }
}

/// The command kind that produced an event.
pub fn command_of(event: &Event) -> CommandKind {
    match event {
        Event::TicketOpened { .. } => CommandKind::OpenTicket,
        Event::ClassificationStarted { .. } => CommandKind::StartClassification,
        Event::TicketClassified { .. } => CommandKind::Classify,
        Event::DraftingStarted { .. } => CommandKind::StartDrafting,
        Event::DraftSubmitted { .. } => CommandKind::SubmitDraft,
        Event::EscalationStarted { .. } => CommandKind::StartEscalation,
        Event::DraftRejected { .. } => CommandKind::RejectDraft,
        Event::EscalatedToHuman { .. } => CommandKind::EscalateToHuman,
        Event::TicketResolved { .. } => CommandKind::Resolve,
        Event::ClaimReleased { .. } => CommandKind::ReleaseClaim,
        Event::ClaimExpired { .. } => CommandKind::ExpireClaim,
        Event::LeaseExtended { .. } => CommandKind::ExtendLease,
        Event::ClaimTakenOver { .. } => CommandKind::TakeOver,
    }
}

/// Checks one ticket's history, in revision order. Returns every violation
/// found; an empty list means the history is a valid path.
///
/// A step is one command's events: normally one event, or a failed attempt
/// followed by the `EscalatedToHuman` of a poison ticket (both carry the
/// same command id).
pub fn audit_history(history: &[(Event, EventMetadata)]) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut ticket = Ticket::default();
    let mut index = 0;
    while index < history.len() {
        let (event, metadata) = &history[index];
        let poison_follows = matches!(event, Event::ClaimReleased { .. } | Event::ClaimExpired { .. })
            && history.get(index + 1).is_some_and(|(next, next_metadata)| {
                matches!(next, Event::EscalatedToHuman { claim_id: None, .. })
                    && next_metadata.command_id == metadata.command_id
            });
        let step = if poison_follows { 2 } else { 1 };
        let kind = command_of(event);
        let from = ticket.state;
        let before = ticket.clone();
        for (event, _) in &history[index..index + step] {
            ticket = evolve(ticket, event);
        }
        let to = ticket.state;
        let role = metadata.agent.role;
        let row = TRANSITIONS
            .iter()
            .find(|row| row.from == from && row.command == kind && Some(row.to) == to && row.roles.contains(&role));
        let mut fail = |message: String| violations.push(Violation { index, message });
        match row {
            None => fail(format!(
                "{kind} by {role} {agent} from {} to {} is not in the transition table",
                from.map_or("(no ticket)", State::as_str),
                to.map_or("(no ticket)", State::as_str),
                agent = metadata.agent.id,
            )),
            Some(row) => {
                let named_claim = claim_named_by(event);
                let current = before.claim.as_ref();
                match row.claim {
                    ClaimRule::Holder => match current {
                        None => fail(format!("{kind} completed a claim, but none was held")),
                        Some(claim) => {
                            if named_claim.is_some_and(|named| named != claim.claim_id) {
                                fail(format!("{kind} used a stale claim, not {}", claim.claim_id));
                            }
                            if claim.agent_id != metadata.agent.id {
                                fail(format!(
                                    "{kind} by {} under a claim held by {}",
                                    metadata.agent.id, claim.agent_id
                                ));
                            }
                            if metadata.recorded_at >= claim.lease_expires_at {
                                fail(format!(
                                    "{kind} at {} after the lease expired at {} (a late write)",
                                    metadata.recorded_at, claim.lease_expires_at
                                ));
                            }
                        }
                    },
                    ClaimRule::Expired => match current {
                        None => fail(format!("{kind} expired a claim, but none was held")),
                        Some(claim) => {
                            if metadata.recorded_at < claim.lease_expires_at {
                                fail(format!(
                                    "{kind} at {} before the lease ran out at {}",
                                    metadata.recorded_at, claim.lease_expires_at
                                ));
                            }
                        }
                    },
                    ClaimRule::None | ClaimRule::Takes | ClaimRule::Replaces | ClaimRule::Overrides => {}
                }
            }
        }
        index += step;
    }
    violations
}

fn claim_named_by(event: &Event) -> Option<uuid::Uuid> {
    match event {
        Event::TicketClassified { claim_id, .. }
        | Event::DraftSubmitted { claim_id, .. }
        | Event::ClaimReleased { claim_id, .. }
        | Event::ClaimExpired { claim_id, .. }
        | Event::LeaseExtended { claim_id, .. } => Some(*claim_id),
        Event::DraftRejected { claim_id, .. }
        | Event::EscalatedToHuman { claim_id, .. }
        | Event::TicketResolved { claim_id, .. } => *claim_id,
        _ => None,
    }
}
