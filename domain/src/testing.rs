//! A given/when/then harness for `decide`, with typed rejections.
//!
//! ```
//! use triage_domain::testing::{Scenario, opened};
//! use triage_domain::{Agent, Command, Rejection, Role};
//!
//! Scenario::given([opened()])
//!     .as_agent(Agent::new("drafter-1", Role::Drafter))
//!     .when(Command::StartClassification { lease_secs: None })
//!     .then_rejected(Rejection::RoleNotAllowed {
//!         role: Role::Drafter,
//!         command: triage_domain::CommandKind::StartClassification,
//!         allowed: vec![Role::Classifier, Role::Operator],
//!     });
//! ```

use chrono::{DateTime, Duration, TimeZone, Utc};
use uuid::Uuid;

use crate::{Agent, Claim, Command, Context, Event, Policy, Rejection, Role, State, Ticket, TicketId, decide, evolve};

/// The fixed "now" of scenarios unless [`Scenario::at`] says otherwise.
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 9, 0, 0).unwrap()
}

/// The ticket id of scenarios.
pub fn ticket_id() -> TicketId {
    TicketId(Uuid::from_u128(0x7157))
}

/// The `TicketOpened` event of scenarios.
pub fn opened() -> Event {
    Event::TicketOpened {
        ticket_id: ticket_id(),
        subject: "Charged twice".into(),
        body: "My card was charged twice for March.".into(),
        customer: Some("dana@example.com".into()),
    }
}

/// A claim held by `agent_id` with claim id `claim`, expiring `lease_secs`
/// after [`t0`].
pub fn claim(claim: u128, agent_id: &str, lease_secs: i64) -> Claim {
    Claim {
        claim_id: Uuid::from_u128(claim),
        agent_id: agent_id.into(),
        lease_expires_at: t0() + Duration::seconds(lease_secs),
    }
}

/// A scenario: a history, a sender, a clock and a policy.
#[derive(Clone, Debug)]
pub struct Scenario {
    history: Vec<Event>,
    agent: Agent,
    now: DateTime<Utc>,
    policy: Policy,
    command_id: Uuid,
}

impl Scenario {
    /// Starts from a history (empty for a ticket that does not exist).
    pub fn given(history: impl IntoIterator<Item = Event>) -> Self {
        Scenario {
            history: history.into_iter().collect(),
            agent: Agent::new("operator-1", Role::Operator),
            now: t0(),
            policy: Policy::default(),
            command_id: Uuid::from_u128(0xc0),
        }
    }

    /// Sends as `agent`.
    pub fn as_agent(mut self, agent: Agent) -> Self {
        self.agent = agent;
        self
    }

    /// Sends as a new agent `id` in `role`.
    pub fn as_role(self, id: &str, role: Role) -> Self {
        self.as_agent(Agent::new(id, role))
    }

    /// Decides at `now`.
    pub fn at(mut self, now: DateTime<Utc>) -> Self {
        self.now = now;
        self
    }

    /// Decides under `policy`.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the command id (and so the id of any claim it takes).
    pub fn with_command_id(mut self, command_id: u128) -> Self {
        self.command_id = Uuid::from_u128(command_id);
        self
    }

    /// Decides `command`.
    pub fn when(self, command: Command) -> Decided {
        let ticket = Ticket::from_events(&self.history);
        let context = Context {
            now: self.now,
            ticket_id: ticket_id(),
            agent: &self.agent,
            command_id: self.command_id,
            policy: &self.policy,
        };
        let result = decide(&ticket, &command, &context);
        Decided {
            ticket,
            command,
            result,
        }
    }
}

/// The result of [`Scenario::when`].
#[derive(Debug)]
pub struct Decided {
    ticket: Ticket,
    command: Command,
    result: Result<Vec<Event>, Rejection>,
}

impl Decided {
    /// Asserts the command was accepted with exactly these events; returns
    /// the ticket after them.
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = Event>) -> Ticket {
        let expected: Vec<Event> = expected.into_iter().collect();
        match self.result {
            Ok(events) => {
                assert_eq!(events, expected, "events of {:?}", self.command);
                events.iter().fold(self.ticket, evolve)
            }
            Err(rejection) => panic!("{:?} was rejected: {rejection}", self.command),
        }
    }

    /// Asserts the command was accepted and the ticket is then in `state`.
    #[track_caller]
    pub fn then_state(self, state: State) -> Ticket {
        match self.result {
            Ok(events) => {
                let ticket = events.iter().fold(self.ticket, evolve);
                assert_eq!(ticket.state, Some(state), "state after {:?}", self.command);
                ticket
            }
            Err(rejection) => panic!("{:?} was rejected: {rejection}", self.command),
        }
    }

    /// Asserts the command was rejected with exactly `expected`.
    #[track_caller]
    pub fn then_rejected(self, expected: Rejection) {
        match self.result {
            Ok(events) => panic!("{:?} was accepted with {events:?}, expected {expected}", self.command),
            Err(rejection) => assert_eq!(rejection, expected, "rejection of {:?}", self.command),
        }
    }

    /// Asserts the command was rejected with the code `code`.
    #[track_caller]
    pub fn then_rejected_with(self, code: &str) {
        match self.result {
            Ok(events) => panic!("{:?} was accepted with {events:?}, expected {code}", self.command),
            Err(rejection) => assert_eq!(rejection.code(), code, "rejection of {:?}: {rejection}", self.command),
        }
    }
}
