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
        let poison_follows = matches!(
            event,
            Event::ClaimReleased { .. } | Event::ClaimExpired { .. } | Event::DraftRejected { .. }
        ) && history.get(index + 1).is_some_and(|(next, next_metadata)| {
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
                            match named_claim {
                                None => fail(format!("{kind} completed claim {} without naming it", claim.claim_id)),
                                Some(named) if named != claim.claim_id => {
                                    fail(format!("{kind} used a stale claim, not {}", claim.claim_id));
                                }
                                Some(_) => {}
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
                            if named_claim != Some(claim.claim_id) {
                                fail(format!(
                                    "{kind} named a claim other than the current {}",
                                    claim.claim_id
                                ));
                            }
                            if metadata.recorded_at < claim.lease_expires_at {
                                fail(format!(
                                    "{kind} at {} before the lease ran out at {}",
                                    metadata.recorded_at, claim.lease_expires_at
                                ));
                            }
                        }
                    },
                    // One who needs no claim but names one acts under it:
                    // fenced like a holder, except that it may be anyone's.
                    ClaimRule::None | ClaimRule::Overrides => {
                        if let Some(named) = named_claim {
                            match current {
                                Some(claim) if claim.claim_id == named => {
                                    if metadata.recorded_at >= claim.lease_expires_at {
                                        fail(format!(
                                            "{kind} at {} under claim {named}, whose lease expired at {} (a late write)",
                                            metadata.recorded_at, claim.lease_expires_at
                                        ));
                                    }
                                }
                                _ => fail(format!(
                                    "{kind} named claim {named}, which is not the ticket's current one"
                                )),
                            }
                        }
                    }
                    ClaimRule::Takes | ClaimRule::Replaces => {
                        if let Event::ClaimTakenOver { previous_claim_id, .. } = event {
                            let replaced = current.map_or(uuid::Uuid::nil(), |claim| claim.claim_id);
                            if *previous_claim_id != replaced {
                                fail(format!(
                                    "{kind} says it replaced claim {previous_claim_id}, but the current one was {replaced}"
                                ));
                            }
                        }
                    }
                }
                // A claim handed out is the sender's, with a lease that has
                // not run out as it is handed out; an extension likewise.
                if let Some(claim) = claim_started_by(event) {
                    if claim.agent_id != metadata.agent.id {
                        fail(format!(
                            "{kind} by {} handed claim {} to {}",
                            metadata.agent.id, claim.claim_id, claim.agent_id
                        ));
                    }
                    if claim.lease_expires_at <= metadata.recorded_at {
                        fail(format!(
                            "{kind} at {} handed out a lease that expired at {}",
                            metadata.recorded_at, claim.lease_expires_at
                        ));
                    }
                }
                if let Event::LeaseExtended { lease_expires_at, .. } = event
                    && *lease_expires_at <= metadata.recorded_at
                {
                    fail(format!(
                        "{kind} at {} extended the lease to {lease_expires_at}, already past",
                        metadata.recorded_at
                    ));
                }
                // Each failed attempt counts one more than the ticket had.
                if let Event::ClaimReleased { attempts, .. } | Event::ClaimExpired { attempts, .. } = event {
                    let expected = before.attempts.saturating_add(1);
                    if *attempts != expected {
                        fail(format!("{kind} counted {attempts} failed attempts, not {expected}"));
                    }
                }
            }
        }
        index += step;
    }
    violations
}

fn claim_started_by(event: &Event) -> Option<&crate::model::Claim> {
    match event {
        Event::ClassificationStarted { claim }
        | Event::DraftingStarted { claim }
        | Event::EscalationStarted { claim }
        | Event::ClaimTakenOver { claim, .. } => Some(claim),
        _ => None,
    }
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
