//! The Triage ticket model: states, the one transition table, commands,
//! events, `decide` and `evolve`.
//!
//! Pure and synchronous: no I/O, no async, no storage types. The command
//! handler gathers the clock and configuration into a [`Context`] before it
//! calls [`decide`], so the same inputs always give the same events.
//!
//! # Layout
//! - [`State`], [`Role`], [`Claim`] and friends: the vocabulary.
//! - [`TRANSITIONS`]: the transition table, the only source for enforcement,
//!   for the Mermaid diagram ([`mermaid`]) and for API documentation.
//! - [`Command`] / [`CommandEnvelope`]: what agents ask for.
//! - [`Event`] / [`EventMetadata`]: what happened, versioned, with
//!   deterministic ids ([`event_id`]).
//! - [`decide`] and [`evolve`]; [`Rejection`] and [`ValidationError`] say
//!   why a command was refused.
//! - `testing` (feature `testing`): the given/when/then harness.
//!
//! # Main decision
//! Claims are part of the state machine, not a side table: entering an
//! `-ING` state records `{claim_id, agent, lease_expires_at}` in an event,
//! so fencing (only the current holder, before expiry, may complete) is
//! checked by `decide` against the same history the store serializes with
//! its expected revision.

mod by_type;
mod command;
mod decide;
mod event;
mod model;
mod table;
mod ticket;
mod timestamp;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use command::{Command, CommandEnvelope, CommandKind};
pub use decide::{
    Context, MAX_AGENT_ID_CHARS, Policy, Rejection, ValidationError, check_agent_id, decide, ended_claim,
};
pub use event::{
    CommandRejected, DecodeError, Event, EventHeader, EventMetadata, decode_stored, decode_stored_header, event_id,
    former_event_id,
};
pub use model::{Agent, Claim, Classification, Priority, Role, State, TicketId};
pub use table::{ClaimRule, Guard, TRANSITIONS, Transition, commands_for, mermaid, queue_states, transitions_from};
pub use ticket::{Ticket, evolve};

pub mod audit;

#[cfg(test)]
mod scenarios;
