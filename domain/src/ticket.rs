//! The ticket as folded from its events, and `evolve`.

use serde::Serialize;

use crate::event::Event;
use crate::model::{Claim, Classification, State, TicketId};

/// A ticket's state, folded from its events by [`evolve`].
///
/// `Ticket::default()` is a ticket that does not exist yet: its `state` is
/// `None` and only `OpenTicket` applies to it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Ticket {
    /// The ticket's id, once opened.
    pub id: Option<TicketId>,
    /// Where it is in its lifecycle; `None` before it is opened.
    pub state: Option<State>,
    /// The subject line.
    pub subject: String,
    /// The customer's message.
    pub body: String,
    /// Who wrote in.
    pub customer: Option<String>,
    /// The latest classification.
    pub classification: Option<Classification>,
    /// The latest draft reply.
    pub draft: Option<String>,
    /// The current work claim, in an `-ING` state.
    pub claim: Option<Claim>,
    /// Failed attempts (released or expired claims) at the current stage.
    pub attempts: u32,
    /// Drafts sent back by review (`DraftRejected`), over the ticket's whole
    /// life: a rejected draft sends the ticket back to `CLASSIFIED`, where
    /// the stage's `attempts` start again, so without this count a reviewer
    /// and a drafter could pass a ticket back and forth for ever. The
    /// rejection that reaches the policy's `max_attempts` hands the ticket
    /// to a human instead.
    pub drafts_rejected: u32,
    /// How it was resolved.
    pub resolution: Option<String>,
    /// Why it was last sent back or handed to a human.
    pub last_reason: Option<String>,
    /// How many events were folded in.
    pub events_applied: u64,
}

impl Ticket {
    /// Whether the ticket exists.
    pub fn exists(&self) -> bool {
        self.state.is_some()
    }

    /// Folds a whole history.
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a Event>) -> Ticket {
        events.into_iter().fold(Ticket::default(), evolve)
    }
}

/// Applies one event. Total: it never fails and never panics, so a read
/// model can fold any stored history; `decide` is what keeps histories valid.
pub fn evolve(mut ticket: Ticket, event: &Event) -> Ticket {
    ticket.events_applied += 1;
    match event {
        Event::TicketOpened {
            ticket_id,
            subject,
            body,
            customer,
        } => {
            ticket.id = Some(*ticket_id);
            ticket.state = Some(State::New);
            ticket.subject.clone_from(subject);
            ticket.body.clone_from(body);
            ticket.customer.clone_from(customer);
        }
        Event::ClassificationStarted { claim } => start_claim(&mut ticket, State::Classifying, claim),
        Event::DraftingStarted { claim } => start_claim(&mut ticket, State::Drafting, claim),
        Event::EscalationStarted { claim } => start_claim(&mut ticket, State::Escalating, claim),
        Event::TicketClassified {
            category,
            priority,
            confidence,
            ..
        } => {
            ticket.classification = Some(Classification {
                category: category.clone(),
                priority: *priority,
                confidence: *confidence,
            });
            complete_stage(&mut ticket, State::Classified);
        }
        Event::DraftSubmitted { body, .. } => {
            ticket.draft = Some(body.clone());
            complete_stage(&mut ticket, State::DraftReady);
        }
        Event::DraftRejected { reason, .. } => {
            ticket.last_reason = Some(reason.clone());
            // Saturating: the count comes from stored events.
            ticket.drafts_rejected = ticket.drafts_rejected.saturating_add(1);
            complete_stage(&mut ticket, State::Classified);
        }
        Event::EscalatedToHuman { reason, .. } => {
            ticket.last_reason = Some(reason.clone());
            ticket.claim = None;
            ticket.state = Some(State::NeedsHuman);
        }
        Event::TicketResolved { resolution, .. } => {
            ticket.resolution = Some(resolution.clone());
            ticket.claim = None;
            ticket.state = Some(State::Resolved);
        }
        Event::ClaimReleased { attempts, .. } | Event::ClaimExpired { attempts, .. } => {
            ticket.attempts = *attempts;
            ticket.claim = None;
            if let Some(resting) = ticket.state.and_then(State::resting_state) {
                ticket.state = Some(resting);
            }
        }
        Event::LeaseExtended { lease_expires_at, .. } => {
            if let Some(claim) = &mut ticket.claim {
                claim.lease_expires_at = *lease_expires_at;
            }
        }
        Event::ClaimTakenOver { claim, .. } => ticket.claim = Some(claim.clone()),
    }
    ticket
}

fn start_claim(ticket: &mut Ticket, state: State, claim: &Claim) {
    ticket.state = Some(state);
    ticket.claim = Some(claim.clone());
}

fn complete_stage(ticket: &mut Ticket, state: State) {
    ticket.state = Some(state);
    ticket.claim = None;
    ticket.attempts = 0;
}
