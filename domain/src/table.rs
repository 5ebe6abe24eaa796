//! THE transition table: the only source for enforcement, for the Mermaid
//! diagram and for the API documentation.

use std::fmt::Write as _;

use serde::Serialize;

use crate::command::CommandKind;
use crate::model::{Role, State};

/// What a transition requires of, or does to, the ticket's work claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimRule {
    /// No claim is involved.
    None,
    /// Takes a new claim with a lease.
    Takes,
    /// Only the current holder, naming its claim, before the lease expires.
    Holder,
    /// Only after the lease expired: the lease sweeper.
    Expired,
    /// Replaces the current claim with the sender's own.
    Replaces,
    /// Cancels any current claim: an operator's override.
    Overrides,
}

/// An extra condition on a transition, for rows that share a state and
/// command but lead to different states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Guard {
    /// No condition.
    Always,
    /// This failed attempt stays below the policy's maximum. For a released
    /// or expired claim, the attempt is one at the current stage (the
    /// ticket's `attempts`); for a rejected draft, one of all the drafts
    /// rejected (`drafts_rejected`), which no stage resets.
    AttemptsRemain,
    /// This failed attempt reaches the policy's maximum: the ticket is poison
    /// and goes to a human.
    AttemptsExhausted,
}

/// One row of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Transition {
    /// The state the ticket must be in; `None` for a ticket that does not
    /// exist yet.
    pub from: Option<State>,
    /// The command that makes the transition.
    pub command: CommandKind,
    /// The roles allowed to send it.
    pub roles: &'static [Role],
    /// The state the ticket is in afterwards.
    pub to: State,
    /// What it needs of the work claim.
    pub claim: ClaimRule,
    /// An extra condition.
    pub guard: Guard,
}

use ClaimRule as C;
use CommandKind as K;
use Guard as G;
use Role as R;
use State as S;

const fn row(
    from: Option<State>,
    command: CommandKind,
    roles: &'static [Role],
    to: State,
    claim: ClaimRule,
    guard: Guard,
) -> Transition {
    Transition {
        from,
        command,
        roles,
        to,
        claim,
        guard,
    }
}

/// Every allowed transition. A command that matches no row for the ticket's
/// state is an invalid transition; a sender whose role is in no matching row
/// is refused.
#[rustfmt::skip]
pub static TRANSITIONS: &[Transition] = &[
    row(None, K::OpenTicket, &[R::Intake, R::Operator], S::New, C::None, G::Always),
    // The happy path: claim, complete, claim, complete, …
    row(Some(S::New), K::StartClassification, &[R::Classifier, R::Operator], S::Classifying, C::Takes, G::Always),
    row(Some(S::Classifying), K::Classify, &[R::Classifier, R::Operator], S::Classified, C::Holder, G::Always),
    row(Some(S::Classified), K::StartDrafting, &[R::Drafter, R::Operator], S::Drafting, C::Takes, G::Always),
    row(Some(S::Drafting), K::SubmitDraft, &[R::Drafter, R::Operator], S::DraftReady, C::Holder, G::Always),
    row(Some(S::DraftReady), K::StartEscalation, &[R::Escalator, R::Operator], S::Escalating, C::Takes, G::Always),
    row(Some(S::Escalating), K::Resolve, &[R::Escalator], S::Resolved, C::Holder, G::Always),
    // Review exits.
    // A rejected draft is a failed attempt that no stage resets: the one
    // that exhausts the attempts hands the ticket to a human.
    row(Some(S::Escalating), K::RejectDraft, &[R::Escalator, R::Operator], S::Classified, C::Holder, G::AttemptsRemain),
    row(Some(S::Escalating), K::RejectDraft, &[R::Escalator, R::Operator], S::NeedsHuman, C::Holder, G::AttemptsExhausted),
    row(Some(S::DraftReady), K::RejectDraft, &[R::Operator], S::Classified, C::None, G::AttemptsRemain),
    row(Some(S::DraftReady), K::RejectDraft, &[R::Operator], S::NeedsHuman, C::None, G::AttemptsExhausted),
    row(Some(S::Escalating), K::EscalateToHuman, &[R::Escalator, R::Operator], S::NeedsHuman, C::Holder, G::Always),
    // Claims given back count as failed attempts.
    row(Some(S::Classifying), K::ReleaseClaim, &[R::Classifier, R::Operator], S::New, C::Holder, G::AttemptsRemain),
    row(Some(S::Classifying), K::ReleaseClaim, &[R::Classifier, R::Operator], S::NeedsHuman, C::Holder, G::AttemptsExhausted),
    row(Some(S::Drafting), K::ReleaseClaim, &[R::Drafter, R::Operator], S::Classified, C::Holder, G::AttemptsRemain),
    row(Some(S::Drafting), K::ReleaseClaim, &[R::Drafter, R::Operator], S::NeedsHuman, C::Holder, G::AttemptsExhausted),
    row(Some(S::Escalating), K::ReleaseClaim, &[R::Escalator, R::Operator], S::DraftReady, C::Holder, G::AttemptsRemain),
    row(Some(S::Escalating), K::ReleaseClaim, &[R::Escalator, R::Operator], S::NeedsHuman, C::Holder, G::AttemptsExhausted),
    // Expired leases: back to rest, or to a human once attempts run out.
    row(Some(S::Classifying), K::ExpireClaim, &[R::System], S::New, C::Expired, G::AttemptsRemain),
    row(Some(S::Classifying), K::ExpireClaim, &[R::System], S::NeedsHuman, C::Expired, G::AttemptsExhausted),
    row(Some(S::Drafting), K::ExpireClaim, &[R::System], S::Classified, C::Expired, G::AttemptsRemain),
    row(Some(S::Drafting), K::ExpireClaim, &[R::System], S::NeedsHuman, C::Expired, G::AttemptsExhausted),
    row(Some(S::Escalating), K::ExpireClaim, &[R::System], S::DraftReady, C::Expired, G::AttemptsRemain),
    row(Some(S::Escalating), K::ExpireClaim, &[R::System], S::NeedsHuman, C::Expired, G::AttemptsExhausted),
    // Heartbeats.
    row(Some(S::Classifying), K::ExtendLease, &[R::Classifier, R::Operator], S::Classifying, C::Holder, G::Always),
    row(Some(S::Drafting), K::ExtendLease, &[R::Drafter, R::Operator], S::Drafting, C::Holder, G::Always),
    row(Some(S::Escalating), K::ExtendLease, &[R::Escalator, R::Operator], S::Escalating, C::Holder, G::Always),
    // Operators take over claims and resolve at any point.
    row(Some(S::Classifying), K::TakeOver, &[R::Operator], S::Classifying, C::Replaces, G::Always),
    row(Some(S::Drafting), K::TakeOver, &[R::Operator], S::Drafting, C::Replaces, G::Always),
    row(Some(S::Escalating), K::TakeOver, &[R::Operator], S::Escalating, C::Replaces, G::Always),
    row(Some(S::New), K::Resolve, &[R::Operator], S::Resolved, C::Overrides, G::Always),
    row(Some(S::Classifying), K::Resolve, &[R::Operator], S::Resolved, C::Overrides, G::Always),
    row(Some(S::Classified), K::Resolve, &[R::Operator], S::Resolved, C::Overrides, G::Always),
    row(Some(S::Drafting), K::Resolve, &[R::Operator], S::Resolved, C::Overrides, G::Always),
    row(Some(S::DraftReady), K::Resolve, &[R::Operator], S::Resolved, C::Overrides, G::Always),
    row(Some(S::Escalating), K::Resolve, &[R::Operator], S::Resolved, C::Overrides, G::Always),
    row(Some(S::NeedsHuman), K::Resolve, &[R::Operator], S::Resolved, C::Overrides, G::Always),
];

/// The rows for a state and command, in table order.
pub fn transitions_from(from: Option<State>, command: CommandKind) -> impl Iterator<Item = &'static Transition> {
    TRANSITIONS
        .iter()
        .filter(move |row| row.from == from && row.command == command)
}

/// The commands a role may send in a state, in table order, without
/// repeats: what a work queue offers that role.
pub fn commands_for(from: State, role: Role) -> Vec<CommandKind> {
    let mut commands = Vec::new();
    for row in TRANSITIONS {
        if row.from == Some(from) && row.roles.contains(&role) && !commands.contains(&row.command) {
            commands.push(row.command);
        }
    }
    commands
}

/// The states whose tickets wait in `role`'s work queue: those from which
/// the role may take a claim, and, for operators, tickets handed to a human.
pub fn queue_states(role: Role) -> Vec<State> {
    let mut states: Vec<State> = TRANSITIONS
        .iter()
        .filter(|row| row.claim == ClaimRule::Takes && row.roles.contains(&role))
        .filter_map(|row| row.from)
        .collect();
    if role == Role::Operator {
        states.push(State::NeedsHuman);
    }
    states.dedup();
    states
}

/// The table as a Mermaid state diagram.
pub fn mermaid() -> String {
    let mut out = String::from("stateDiagram-v2\n");
    for row in TRANSITIONS {
        let from = row.from.map_or("[*]", State::as_str);
        let roles: Vec<_> = row.roles.iter().map(|role| role.as_str()).collect();
        let guard = match row.guard {
            Guard::Always => "",
            Guard::AttemptsRemain => " [attempts remain]",
            Guard::AttemptsExhausted => " [attempts exhausted]",
        };
        let _ = writeln!(
            out,
            "    {from} --> {} : {}{guard} ({})",
            row.to.as_str(),
            row.command.as_str(),
            roles.join(", ")
        );
    }
    out.push_str("    RESOLVED --> [*]\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_is_reachable_from_open() {
        let mut reached = vec![State::New];
        let mut changed = true;
        while changed {
            changed = false;
            for row in TRANSITIONS {
                if row.from.is_some_and(|from| reached.contains(&from)) && !reached.contains(&row.to) {
                    reached.push(row.to);
                    changed = true;
                }
            }
        }
        for state in State::ALL {
            assert!(reached.contains(&state), "{state} is unreachable");
        }
    }

    #[test]
    fn resolved_is_terminal_and_every_other_state_can_be_resolved_by_an_operator() {
        assert!(TRANSITIONS.iter().all(|row| row.from != Some(State::Resolved)));
        for state in State::ALL.into_iter().filter(|s| *s != State::Resolved) {
            assert!(
                transitions_from(Some(state), CommandKind::Resolve).any(|row| row.roles.contains(&Role::Operator)),
                "an operator cannot resolve from {state}"
            );
        }
    }

    #[test]
    fn only_claim_states_hold_claims() {
        for row in TRANSITIONS {
            if row.claim == ClaimRule::Takes {
                assert!(row.to.is_claim(), "{row:?} takes a claim into a resting state");
            }
            if matches!(row.claim, ClaimRule::Holder | ClaimRule::Expired | ClaimRule::Replaces) {
                assert!(row.from.is_some_and(State::is_claim), "{row:?} needs a claim state");
            }
        }
    }

    #[test]
    fn rows_sharing_a_state_and_command_are_told_apart_by_guards() {
        for (index, row) in TRANSITIONS.iter().enumerate() {
            for other in &TRANSITIONS[index + 1..] {
                if row.from == other.from && row.command == other.command {
                    let shared_role = row.roles.iter().any(|role| other.roles.contains(role));
                    assert!(
                        !shared_role || row.guard != other.guard,
                        "ambiguous rows: {row:?} and {other:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn work_queues_hold_the_states_a_role_can_claim_from() {
        assert_eq!(queue_states(Role::Classifier), [State::New]);
        assert_eq!(queue_states(Role::Drafter), [State::Classified]);
        assert_eq!(queue_states(Role::Escalator), [State::DraftReady]);
        assert!(queue_states(Role::Operator).contains(&State::NeedsHuman));
        assert!(queue_states(Role::Analyst).is_empty());
    }

    #[test]
    fn analysts_send_no_commands() {
        assert!(TRANSITIONS.iter().all(|row| !row.roles.contains(&Role::Analyst)));
    }

    #[test]
    fn the_diagram_has_one_edge_per_row() {
        let diagram = mermaid();
        assert!(diagram.starts_with("stateDiagram-v2\n"));
        assert_eq!(
            diagram.lines().filter(|line| line.contains("-->")).count(),
            TRANSITIONS.len() + 1
        );
        assert!(diagram.contains("    [*] --> NEW : open_ticket (intake, operator)"));
        assert!(diagram.contains("CLASSIFYING --> NEEDS_HUMAN : expire_claim [attempts exhausted] (system)"));
    }

    #[test]
    fn work_queues_follow_the_table() {
        assert_eq!(
            commands_for(State::New, Role::Classifier),
            [CommandKind::StartClassification]
        );
        assert_eq!(
            commands_for(State::Escalating, Role::Escalator),
            [
                CommandKind::Resolve,
                CommandKind::RejectDraft,
                CommandKind::EscalateToHuman,
                CommandKind::ReleaseClaim,
                CommandKind::ExtendLease
            ]
        );
        assert!(commands_for(State::Resolved, Role::Operator).is_empty());
    }
}
