//! States, roles, command kinds and the values they carry.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where a ticket is in its lifecycle.
///
/// The `-ING` states are work claims: a ticket in one of them is held by one
/// agent until the claim completes, is released, expires or is taken over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    /// Opened, waiting for a classifier.
    New,
    /// Claimed by a classifier.
    Classifying,
    /// Category, priority and confidence are known; waiting for a drafter.
    Classified,
    /// Claimed by a drafter.
    Drafting,
    /// A draft reply waits for review.
    DraftReady,
    /// Claimed by an escalator, who sends the draft, rejects it or hands the
    /// ticket to a human.
    Escalating,
    /// Waiting for a human operator: handed over by an escalator, or a poison
    /// ticket whose claims kept failing or whose drafts kept being rejected.
    NeedsHuman,
    /// Done. No command leaves this state.
    Resolved,
}

impl State {
    /// Every state, in lifecycle order.
    pub const ALL: [State; 8] = [
        State::New,
        State::Classifying,
        State::Classified,
        State::Drafting,
        State::DraftReady,
        State::Escalating,
        State::NeedsHuman,
        State::Resolved,
    ];

    /// The name used in tables, diagrams and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            State::New => "NEW",
            State::Classifying => "CLASSIFYING",
            State::Classified => "CLASSIFIED",
            State::Drafting => "DRAFTING",
            State::DraftReady => "DRAFT_READY",
            State::Escalating => "ESCALATING",
            State::NeedsHuman => "NEEDS_HUMAN",
            State::Resolved => "RESOLVED",
        }
    }

    /// Whether this state is a work claim.
    pub fn is_claim(self) -> bool {
        self.resting_state().is_some()
    }

    /// For a claim state, the resting state a released or expired claim
    /// returns to.
    pub fn resting_state(self) -> Option<State> {
        match self {
            State::Classifying => Some(State::New),
            State::Drafting => Some(State::Classified),
            State::Escalating => Some(State::DraftReady),
            _ => None,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_uppercase().replace('-', "_");
        State::ALL
            .into_iter()
            .find(|state| state.as_str() == wanted)
            .ok_or_else(|| {
                let names: Vec<_> = State::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown state {s:?}; expected one of {}", names.join(", "))
            })
    }
}

/// Who sends a command. The transition table lists the roles allowed for
/// each transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Opens tickets from incoming mail or chat.
    Intake,
    /// An agent that sets category, priority and confidence.
    Classifier,
    /// An agent that writes the draft reply.
    Drafter,
    /// An agent that reviews the draft: sends it, rejects it or hands the
    /// ticket to a human.
    Escalator,
    /// A human: may open, take over and resolve at any point.
    Operator,
    /// Triage itself: expires claims whose lease ran out.
    System,
    /// Reads and replays history; sends no commands.
    Analyst,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 7] = [
        Role::Intake,
        Role::Classifier,
        Role::Drafter,
        Role::Escalator,
        Role::Operator,
        Role::System,
        Role::Analyst,
    ];

    /// The name used in tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Intake => "intake",
            Role::Classifier => "classifier",
            Role::Drafter => "drafter",
            Role::Escalator => "escalator",
            Role::Operator => "operator",
            Role::System => "system",
            Role::Analyst => "analyst",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == wanted)
            .ok_or_else(|| {
                let names: Vec<_> = Role::ALL.iter().map(|r| r.as_str()).collect();
                format!("unknown role {s:?}; expected one of {}", names.join(", "))
            })
    }
}

/// A ticket's identity. Its stream is `ticket-<uuid>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TicketId(pub Uuid);

impl TicketId {
    /// The stream category of tickets.
    pub const CATEGORY: &'static str = "ticket";

    /// A fresh id: a UUIDv7, which begins with its creation time, so that
    /// tickets sort in the order they were opened and the indexes keyed by
    /// them (read models, stream names) grow at one end.
    pub fn new() -> Self {
        TicketId(Uuid::now_v7())
    }

    /// The ticket that opening a ticket with `command_id` creates: derived
    /// from the command id alone, so that a retry of the command reaches
    /// the same ticket. A UUIDv5 of the command id; when the command id is
    /// a UUIDv7, a UUIDv7 of the same millisecond with the UUIDv5's bits
    /// after it, so that such tickets still sort by when they were opened.
    pub fn for_command(command_id: Uuid) -> Self {
        let derived = Uuid::new_v5(&command_id, b"triage ticket");
        if command_id.get_version() != Some(uuid::Version::SortRand) {
            return TicketId(derived);
        }
        // A UUIDv7's first 48 bits are its Unix time in milliseconds.
        let mut millis = [0u8; 8];
        millis[2..].copy_from_slice(&command_id.as_bytes()[..6]);
        let rest: [u8; 10] = derived.as_bytes()[6..].try_into().expect("16 - 6 bytes");
        TicketId(uuid::Builder::from_unix_timestamp_millis(u64::from_be_bytes(millis), &rest).into_uuid())
    }

    /// The ticket's stream name.
    pub fn stream_name(&self) -> String {
        format!("{}-{}", Self::CATEGORY, self.0)
    }

    /// The ticket id in a stream name such as `ticket-<uuid>`.
    pub fn from_stream_name(stream: &str) -> Option<Self> {
        let uuid = stream.strip_prefix("ticket-")?;
        Uuid::parse_str(uuid).ok().map(TicketId)
    }
}

impl Default for TicketId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TicketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TicketId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let uuid = s.strip_prefix("ticket-").unwrap_or(s);
        Uuid::parse_str(uuid)
            .map(TicketId)
            .map_err(|_| format!("{s:?} is not a ticket id (a UUID, optionally prefixed with 'ticket-')"))
    }
}

/// How urgent a ticket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Can wait.
    Low,
    /// The usual.
    Normal,
    /// Soon.
    High,
    /// Now.
    Urgent,
}

impl Priority {
    /// Every priority, lowest first.
    pub const ALL: [Priority; 4] = [Priority::Low, Priority::Normal, Priority::High, Priority::Urgent];

    /// The name used in tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Urgent => "urgent",
        }
    }
}

impl FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        Priority::ALL
            .into_iter()
            .find(|priority| priority.as_str() == wanted)
            .ok_or_else(|| format!("unknown priority {s:?}; expected one of low, normal, high, urgent"))
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A work claim on a ticket in an `-ING` state.
///
/// Fencing: only `agent_id` may complete, release or extend it, using
/// `claim_id`, and only before `lease_expires_at`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The id of the command that took the claim.
    pub claim_id: Uuid,
    /// The agent holding it.
    pub agent_id: String,
    /// When the lease runs out.
    #[serde(deserialize_with = "crate::timestamp::deserialize")]
    pub lease_expires_at: DateTime<Utc>,
}

/// What a classifier decided.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Classification {
    /// One of the configured categories.
    pub category: String,
    /// How urgent.
    pub priority: Priority,
    /// The classifier's confidence, in [0, 1].
    pub confidence: f64,
}

/// The agent or person behind a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    /// A stable id, such as `classifier-2` or `alice@example.com`.
    pub id: String,
    /// The role it acts in.
    pub role: Role,
    /// The model behind an AI agent, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The prompt version behind an AI agent, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_version: Option<String>,
}

impl Agent {
    /// An agent with no model information.
    pub fn new(id: impl Into<String>, role: Role) -> Self {
        Agent {
            id: id.into(),
            role,
            model: None,
            prompt_version: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ticket ids are UUIDv7: ids made one after the other sort in the
    /// order they were made, so the read models' and the stores' indexes
    /// on them grow at one end instead of at random places.
    #[test]
    fn ticket_ids_sort_in_the_order_they_were_made() {
        let ids: Vec<TicketId> = (0..10_000).map(|_| TicketId::new()).collect();
        assert!(ids.iter().all(|id| id.0.get_version_num() == 7));
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "ids in creation order");
        // The same order as text, as the read models and streams hold them.
        let names: Vec<String> = ids.iter().map(TicketId::stream_name).collect();
        assert!(names.windows(2).all(|pair| pair[0] < pair[1]));
    }

    /// A retry of an open reaches the same ticket: the id depends on the
    /// command id alone. A UUIDv4 command id gives the UUIDv5 earlier
    /// builds gave (retries across an upgrade still meet); a UUIDv7 one a
    /// UUIDv7 of the command's millisecond, so tickets opened in later
    /// milliseconds sort after.
    #[test]
    fn a_ticket_opened_by_a_command_has_an_id_derived_from_it() {
        let random = Uuid::new_v4();
        assert_eq!(TicketId::for_command(random), TicketId::for_command(random));
        assert_eq!(TicketId::for_command(random).0, Uuid::new_v5(&random, b"triage ticket"));
        let made_at = |millis: u64| uuid::Builder::from_unix_timestamp_millis(millis, &[0x5a; 10]).into_uuid();
        let start = 1_764_979_200_000; // 2025-12-06T00:00:00Z
        let tickets: Vec<TicketId> = (0..1_000).map(|n| TicketId::for_command(made_at(start + n))).collect();
        for (n, ticket) in (0..).zip(&tickets) {
            assert_eq!(ticket.0.get_version_num(), 7);
            assert_eq!(
                ticket,
                &TicketId::for_command(made_at(start + n)),
                "the same command, the same ticket"
            );
            let (seconds, nanos) = ticket.0.get_timestamp().expect("a v7 has a time").to_unix();
            assert_eq!(seconds * 1_000 + u64::from(nanos) / 1_000_000, start + n);
            assert_ne!(ticket.0, made_at(start + n), "not the command id itself");
        }
        assert!(
            tickets.windows(2).all(|pair| pair[0] < pair[1]),
            "in the order of their commands"
        );
        // Two commands of one millisecond open two tickets.
        let (first, second) = (
            uuid::Builder::from_unix_timestamp_millis(start, &[0x11; 10]).into_uuid(),
            uuid::Builder::from_unix_timestamp_millis(start, &[0x22; 10]).into_uuid(),
        );
        assert_ne!(TicketId::for_command(first), TicketId::for_command(second));
    }
}
