//! Given/when/then tests of `decide`: every row of the transition table,
//! every rejection, and property tests over random command sequences.

use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestCaseError;
use uuid::Uuid;

use crate::audit::audit_history;
use crate::testing::{Scenario, claim, opened, t0, ticket_id};
use crate::*;

const HOLDER: &str = "agent-1";

fn started(state: State, claim: Claim) -> Event {
    match state {
        State::Classifying => Event::ClassificationStarted { claim },
        State::Drafting => Event::DraftingStarted { claim },
        State::Escalating => Event::EscalationStarted { claim },
        other => panic!("{other} is not a claim state"),
    }
}

/// A history that ends in `state` with `attempts` failed attempts at the
/// current stage; a claim state's claim is `claim(9, holder, 60)`.
fn history_to(state: State, attempts: u32, holder: &str) -> Vec<Event> {
    let claim_states = [State::Classifying, State::Drafting, State::Escalating];
    let completions = [
        Event::TicketClassified {
            claim_id: Uuid::from_u128(1),
            category: "billing".into(),
            priority: Priority::High,
            confidence: 0.9,
        },
        Event::DraftSubmitted {
            claim_id: Uuid::from_u128(2),
            body: "We refunded the second charge.".into(),
        },
    ];
    let (completed_stages, in_claim) = match state {
        State::New => (0, false),
        State::Classifying => (0, true),
        State::Classified => (1, false),
        State::Drafting => (1, true),
        State::DraftReady | State::NeedsHuman | State::Resolved => (2, false),
        State::Escalating => (2, true),
    };
    let mut history = vec![opened()];
    for (index, completion) in completions.iter().take(completed_stages).enumerate() {
        history.push(started(claim_states[index], claim(index as u128 + 1, "agent-0", 60)));
        history.push(completion.clone());
    }
    let stage = claim_states[completed_stages];
    for attempt in 1..=attempts {
        history.push(started(stage, claim(100 + u128::from(attempt), "someone", 60)));
        history.push(Event::ClaimExpired {
            claim_id: Uuid::from_u128(100 + u128::from(attempt)),
            lease_expired_at: t0() + Duration::seconds(60),
            attempts: attempt,
        });
    }
    if in_claim {
        history.push(started(stage, claim(9, holder, 60)));
    }
    match state {
        State::NeedsHuman => history.push(Event::EscalatedToHuman {
            claim_id: None,
            reason: "customer asked for a person".into(),
        }),
        State::Resolved => history.push(Event::TicketResolved {
            claim_id: None,
            resolution: "done".into(),
        }),
        _ => {}
    }
    let ticket = Ticket::from_events(&history);
    assert_eq!(ticket.state, Some(state), "fixture history for {state}");
    assert_eq!(ticket.attempts, attempts, "fixture attempts for {state}");
    history
}

/// [`history_to`] `state` (`DraftReady` or `Escalating`), after `rejected`
/// drafts were sent back by review: each a whole drafting and review
/// round that ends in `DraftRejected`.
fn history_with_rejected_drafts(state: State, rejected: u32, holder: &str) -> Vec<Event> {
    let mut history = history_to(State::Classified, 0, "agent-0");
    for round in 0..u128::from(rejected) {
        history.push(started(State::Drafting, claim(200 + round * 2, "agent-0", 60)));
        history.push(Event::DraftSubmitted {
            claim_id: Uuid::from_u128(200 + round * 2),
            body: "We refunded the second charge.".into(),
        });
        history.push(started(State::Escalating, claim(201 + round * 2, "agent-0", 60)));
        history.push(Event::DraftRejected {
            claim_id: Some(Uuid::from_u128(201 + round * 2)),
            reason: "wrong tone".into(),
        });
    }
    history.push(started(State::Drafting, claim(2, "agent-0", 60)));
    history.push(Event::DraftSubmitted {
        claim_id: Uuid::from_u128(2),
        body: "We refunded the second charge.".into(),
    });
    match state {
        State::DraftReady => {}
        State::Escalating => history.push(started(State::Escalating, claim(9, holder, 60))),
        other => panic!("no rejected-drafts fixture for {other}"),
    }
    let ticket = Ticket::from_events(&history);
    assert_eq!(ticket.state, Some(state), "fixture history for {state}");
    assert_eq!(ticket.drafts_rejected, rejected, "fixture rejections for {state}");
    history
}

/// A valid command of `kind` acting under claim 9.
fn valid_command(kind: CommandKind) -> Command {
    let claim_id = Uuid::from_u128(9);
    match kind {
        CommandKind::OpenTicket => Command::OpenTicket {
            subject: "Cannot log in".into(),
            body: "The reset link has expired twice.".into(),
            customer: None,
        },
        CommandKind::StartClassification => Command::StartClassification { lease_secs: None },
        CommandKind::Classify => Command::Classify {
            claim_id,
            category: "account_access".into(),
            priority: Priority::Urgent,
            confidence: 0.8,
        },
        CommandKind::StartDrafting => Command::StartDrafting { lease_secs: Some(30) },
        CommandKind::SubmitDraft => Command::SubmitDraft {
            claim_id,
            body: "Here is a new reset link.".into(),
        },
        CommandKind::StartEscalation => Command::StartEscalation { lease_secs: None },
        CommandKind::Resolve => Command::Resolve {
            claim_id: Some(claim_id),
            resolution: "sent the draft".into(),
        },
        CommandKind::RejectDraft => Command::RejectDraft {
            claim_id: Some(claim_id),
            reason: "wrong tone".into(),
        },
        CommandKind::EscalateToHuman => Command::EscalateToHuman {
            claim_id,
            reason: "legal threat".into(),
        },
        CommandKind::ReleaseClaim => Command::ReleaseClaim {
            claim_id,
            reason: "model timed out".into(),
        },
        CommandKind::ExtendLease => Command::ExtendLease {
            claim_id,
            lease_secs: Some(120),
        },
        CommandKind::ExpireClaim => Command::ExpireClaim { claim_id },
        CommandKind::TakeOver => Command::TakeOver { lease_secs: None },
    }
}

#[test]
fn every_row_of_the_table_is_enforced() {
    let policy = Policy::default();
    for row in TRANSITIONS {
        let attempts = match row.guard {
            Guard::AttemptsExhausted => policy.max_attempts - 1,
            Guard::Always | Guard::AttemptsRemain => 0,
        };
        for &role in row.roles {
            let history = match (row.from, row.command) {
                (None, _) => Vec::new(),
                (Some(from), CommandKind::RejectDraft) => history_with_rejected_drafts(from, attempts, HOLDER),
                (Some(from), _) => history_to(from, attempts, HOLDER),
            };
            let now = match row.claim {
                ClaimRule::Expired => t0() + Duration::seconds(61),
                _ => t0() + Duration::seconds(1),
            };
            // Where no claim is needed, the valid command names none: one
            // named must be the ticket's current claim (see below).
            let command = match (row.claim, valid_command(row.command)) {
                (ClaimRule::None | ClaimRule::Overrides, Command::Resolve { resolution, .. }) => Command::Resolve {
                    claim_id: None,
                    resolution,
                },
                (ClaimRule::None | ClaimRule::Overrides, Command::RejectDraft { reason, .. }) => {
                    Command::RejectDraft { claim_id: None, reason }
                }
                (_, command) => command,
            };
            Scenario::given(history.clone())
                .as_role(HOLDER, role)
                .at(now)
                .when(command)
                .then_state(row.to);
            // Every role not in any row for this state and command is refused.
            let allowed: Vec<Role> = transitions_from(row.from, row.command)
                .flat_map(|r| r.roles.iter().copied())
                .collect();
            for outsider in Role::ALL.into_iter().filter(|r| !allowed.contains(r)) {
                Scenario::given(history.clone())
                    .as_role(HOLDER, outsider)
                    .at(now)
                    .when(valid_command(row.command))
                    .then_rejected_with("role_not_allowed");
            }
        }
    }
}

#[test]
fn every_command_missing_from_the_table_is_an_invalid_transition() {
    for from in State::ALL {
        for kind in CommandKind::ALL {
            if kind == CommandKind::OpenTicket || transitions_from(Some(from), kind).next().is_some() {
                continue;
            }
            Scenario::given(history_to(from, 0, HOLDER))
                .as_role(HOLDER, Role::Operator)
                .when(valid_command(kind))
                .then_rejected(Rejection::InvalidTransition { from, command: kind });
        }
    }
}

#[test]
fn a_draft_for_a_ticket_that_was_never_classified_is_refused() {
    Scenario::given([opened()])
        .as_role("drafter-1", Role::Drafter)
        .when(valid_command(CommandKind::SubmitDraft))
        .then_rejected(Rejection::InvalidTransition {
            from: State::New,
            command: CommandKind::SubmitDraft,
        });
}

#[test]
fn opening_a_ticket() {
    Scenario::given([])
        .as_role("intake-1", Role::Intake)
        .when(Command::OpenTicket {
            subject: "Charged twice".into(),
            body: "My card was charged twice for March.".into(),
            customer: Some("dana@example.com".into()),
        })
        .then([opened()]);
    Scenario::given([opened()])
        .as_role("intake-1", Role::Intake)
        .when(valid_command(CommandKind::OpenTicket))
        .then_rejected(Rejection::TicketAlreadyExists);
}

#[test]
fn commands_on_a_missing_ticket_are_not_found() {
    Scenario::given([])
        .as_role("classifier-1", Role::Classifier)
        .when(valid_command(CommandKind::StartClassification))
        .then_rejected(Rejection::TicketNotFound);
}

#[test]
fn claims_take_the_command_id_and_the_policy_lease() {
    Scenario::given([opened()])
        .as_role("classifier-1", Role::Classifier)
        .with_command_id(77)
        .when(Command::StartClassification { lease_secs: None })
        .then([Event::ClassificationStarted {
            claim: claim(77, "classifier-1", 60),
        }]);
}

#[test]
fn a_wrong_role_is_refused_with_the_allowed_roles() {
    Scenario::given([opened()])
        .as_role("drafter-1", Role::Drafter)
        .when(valid_command(CommandKind::StartClassification))
        .then_rejected(Rejection::RoleNotAllowed {
            role: Role::Drafter,
            command: CommandKind::StartClassification,
            allowed: vec![Role::Classifier, Role::Operator],
        });
}

#[test]
fn completing_without_naming_the_claim_is_refused() {
    Scenario::given(history_to(State::Escalating, 0, HOLDER))
        .as_role(HOLDER, Role::Escalator)
        .when(Command::Resolve {
            claim_id: None,
            resolution: "sent".into(),
        })
        .then_rejected(Rejection::ClaimRequired {
            command: CommandKind::Resolve,
        });
}

#[test]
fn fencing_refuses_a_stale_claim() {
    let stale = Uuid::from_u128(8);
    Scenario::given(history_to(State::Classifying, 0, HOLDER))
        .as_role(HOLDER, Role::Classifier)
        .when(Command::Classify {
            claim_id: stale,
            category: "bug".into(),
            priority: Priority::Low,
            confidence: 0.5,
        })
        .then_rejected(Rejection::StaleClaim {
            claim_id: stale,
            current: Some(Uuid::from_u128(9)),
        });
}

#[test]
fn fencing_refuses_another_agents_claim() {
    Scenario::given(history_to(State::Drafting, 0, HOLDER))
        .as_role("drafter-2", Role::Drafter)
        .when(valid_command(CommandKind::SubmitDraft))
        .then_rejected(Rejection::NotClaimHolder {
            claim_id: Uuid::from_u128(9),
            holder: HOLDER.into(),
        });
}

#[test]
fn fencing_refuses_a_late_write_after_the_lease_expired() {
    Scenario::given(history_to(State::Drafting, 0, HOLDER))
        .as_role(HOLDER, Role::Drafter)
        .at(t0() + Duration::seconds(60))
        .when(valid_command(CommandKind::SubmitDraft))
        .then_rejected(Rejection::LeaseExpired {
            claim_id: Uuid::from_u128(9),
            expired_at: t0() + Duration::seconds(60),
        });
}

#[test]
fn a_late_write_after_the_sweeper_expired_the_claim_is_stale() {
    let mut history = history_to(State::Drafting, 0, HOLDER);
    history.push(Event::ClaimExpired {
        claim_id: Uuid::from_u128(9),
        lease_expired_at: t0() + Duration::seconds(60),
        attempts: 1,
    });
    Scenario::given(history)
        .as_role(HOLDER, Role::Drafter)
        .at(t0() + Duration::seconds(30))
        .when(valid_command(CommandKind::SubmitDraft))
        .then_rejected(Rejection::InvalidTransition {
            from: State::Classified,
            command: CommandKind::SubmitDraft,
        });
}

#[test]
fn the_sweeper_may_not_expire_a_running_lease() {
    Scenario::given(history_to(State::Escalating, 0, HOLDER))
        .as_role("sweeper", Role::System)
        .at(t0() + Duration::seconds(59))
        .when(valid_command(CommandKind::ExpireClaim))
        .then_rejected(Rejection::LeaseNotExpired {
            claim_id: Uuid::from_u128(9),
            expires_at: t0() + Duration::seconds(60),
        });
}

#[test]
fn an_expired_claim_returns_to_rest_and_counts_the_attempt() {
    let ticket = Scenario::given(history_to(State::Drafting, 0, HOLDER))
        .as_role("sweeper", Role::System)
        .at(t0() + Duration::seconds(61))
        .when(valid_command(CommandKind::ExpireClaim))
        .then([Event::ClaimExpired {
            claim_id: Uuid::from_u128(9),
            lease_expired_at: t0() + Duration::seconds(60),
            attempts: 1,
        }]);
    assert_eq!(ticket.state, Some(State::Classified));
    assert_eq!(ticket.attempts, 1);
    assert!(ticket.claim.is_none());
}

#[test]
fn a_poison_ticket_goes_to_a_human_after_the_last_attempt() {
    let ticket = Scenario::given(history_to(State::Classifying, 2, HOLDER))
        .as_role("sweeper", Role::System)
        .at(t0() + Duration::seconds(61))
        .when(valid_command(CommandKind::ExpireClaim))
        .then([
            Event::ClaimExpired {
                claim_id: Uuid::from_u128(9),
                lease_expired_at: t0() + Duration::seconds(60),
                attempts: 3,
            },
            Event::EscalatedToHuman {
                claim_id: None,
                reason: "poison ticket: 3 failed attempts at one stage".into(),
            },
        ]);
    assert_eq!(ticket.state, Some(State::NeedsHuman));
}

#[test]
fn a_rejected_draft_goes_back_to_classified_while_attempts_remain() {
    let ticket = Scenario::given(history_with_rejected_drafts(State::Escalating, 1, HOLDER))
        .as_role(HOLDER, Role::Escalator)
        .when(valid_command(CommandKind::RejectDraft))
        .then([Event::DraftRejected {
            claim_id: Some(Uuid::from_u128(9)),
            reason: "wrong tone".into(),
        }]);
    assert_eq!(ticket.state, Some(State::Classified));
    assert_eq!(ticket.drafts_rejected, 2);
    assert_eq!(ticket.attempts, 0, "the drafting stage starts again");
}

#[test]
fn the_draft_rejection_that_exhausts_the_attempts_hands_the_ticket_to_a_human() {
    // Drafting and review passing a ticket back and forth is a poison
    // loop too: the stage's attempts start again after every rejection,
    // so only the ticket's own count of rejected drafts can end it.
    for (state, role, claim_id) in [
        (State::Escalating, Role::Escalator, Some(Uuid::from_u128(9))),
        (State::DraftReady, Role::Operator, None),
    ] {
        let ticket = Scenario::given(history_with_rejected_drafts(state, 2, HOLDER))
            .as_role(HOLDER, role)
            .when(Command::RejectDraft {
                claim_id,
                reason: "wrong tone".into(),
            })
            .then([
                Event::DraftRejected {
                    claim_id,
                    reason: "wrong tone".into(),
                },
                Event::EscalatedToHuman {
                    claim_id: None,
                    reason: "poison ticket: 3 drafts rejected".into(),
                },
            ]);
        assert_eq!(ticket.state, Some(State::NeedsHuman), "from {state}");
        assert_eq!(ticket.drafts_rejected, 3);
    }
}

#[test]
fn the_audit_accepts_the_rejection_that_hands_a_ticket_to_a_human() {
    // Decided for real, then audited: the rejection and the hand-off are
    // one command's step, through the table's exhausted row.
    let policy = Policy::default();
    let mut ticket = Ticket::default();
    let mut history: Vec<(Event, EventMetadata)> = Vec::new();
    let mut send = |role: Role, command: Command, seconds: i64| -> Uuid {
        let agent = Agent::new(format!("{role}-1"), role);
        let command_id = Uuid::new_v4();
        let now = t0() + Duration::seconds(seconds);
        let context = Context {
            now,
            ticket_id: ticket_id(),
            agent: &agent,
            command_id,
            policy: &policy,
        };
        let events = decide(&ticket, &command, &context).unwrap_or_else(|rejection| panic!("{command:?}: {rejection}"));
        for event in events {
            ticket = evolve(std::mem::take(&mut ticket), &event);
            history.push((event, metadata(&agent, command_id, now)));
        }
        command_id
    };
    send(Role::Intake, valid_command(CommandKind::OpenTicket), 0);
    let classifying = send(Role::Classifier, Command::StartClassification { lease_secs: None }, 1);
    send(
        Role::Classifier,
        Command::Classify {
            claim_id: classifying,
            category: "billing".into(),
            priority: Priority::High,
            confidence: 0.9,
        },
        2,
    );
    for round in 0..3 {
        let at = 10 + round * 10;
        let drafting = send(Role::Drafter, Command::StartDrafting { lease_secs: None }, at);
        send(
            Role::Drafter,
            Command::SubmitDraft {
                claim_id: drafting,
                body: "We refunded the second charge.".into(),
            },
            at + 1,
        );
        let reviewing = send(Role::Escalator, Command::StartEscalation { lease_secs: None }, at + 2);
        send(
            Role::Escalator,
            Command::RejectDraft {
                claim_id: Some(reviewing),
                reason: "wrong tone".into(),
            },
            at + 3,
        );
    }
    let last_two: Vec<&Event> = history.iter().rev().take(2).map(|(event, _)| event).collect();
    assert!(
        matches!(
            last_two[..],
            [
                Event::EscalatedToHuman { claim_id: None, .. },
                Event::DraftRejected { .. }
            ]
        ),
        "{last_two:?}"
    );
    assert_eq!(audit_history(&history), []);

    // The hand-off under another command's id is not that step.
    let (handoff, mut other) = history.pop().unwrap();
    other.command_id = Uuid::new_v4();
    history.push((handoff, other));
    assert!(!audit_history(&history).is_empty());
}

#[test]
fn failed_drafting_attempts_and_rejected_drafts_are_counted_apart() {
    // Two rejected drafts, then a drafting claim that expires: the stage's
    // first failed attempt, not the third failure of the ticket.
    let mut history = history_with_rejected_drafts(State::DraftReady, 2, HOLDER);
    history.truncate(history.len() - 2);
    history.push(started(State::Drafting, claim(9, HOLDER, 60)));
    let ticket = Scenario::given(history)
        .as_role("sweeper", Role::System)
        .at(t0() + Duration::seconds(61))
        .when(valid_command(CommandKind::ExpireClaim))
        .then_state(State::Classified);
    assert_eq!((ticket.attempts, ticket.drafts_rejected), (1, 2));
}

#[test]
fn releasing_counts_as_a_failed_attempt() {
    let policy = Policy {
        max_attempts: 1,
        ..Policy::default()
    };
    Scenario::given(history_to(State::Escalating, 0, HOLDER))
        .as_role(HOLDER, Role::Escalator)
        .with_policy(policy)
        .when(valid_command(CommandKind::ReleaseClaim))
        .then_state(State::NeedsHuman);
}

#[test]
fn an_operator_take_over_fences_the_previous_holder() {
    let mut history = history_to(State::Drafting, 0, HOLDER);
    let taken = Scenario::given(history.clone())
        .as_role("alice", Role::Operator)
        .with_command_id(50)
        .when(valid_command(CommandKind::TakeOver))
        .then([Event::ClaimTakenOver {
            previous_claim_id: Uuid::from_u128(9),
            claim: claim(50, "alice", 60),
        }]);
    assert_eq!(taken.claim.as_ref().map(|c| c.agent_id.as_str()), Some("alice"));
    history.push(Event::ClaimTakenOver {
        previous_claim_id: Uuid::from_u128(9),
        claim: claim(50, "alice", 60),
    });
    Scenario::given(history)
        .as_role(HOLDER, Role::Drafter)
        .when(valid_command(CommandKind::SubmitDraft))
        .then_rejected(Rejection::StaleClaim {
            claim_id: Uuid::from_u128(9),
            current: Some(Uuid::from_u128(50)),
        });
}

#[test]
fn extending_a_lease_moves_its_expiry() {
    let ticket = Scenario::given(history_to(State::Classifying, 0, HOLDER))
        .as_role(HOLDER, Role::Classifier)
        .at(t0() + Duration::seconds(30))
        .when(valid_command(CommandKind::ExtendLease))
        .then_state(State::Classifying);
    assert_eq!(
        ticket.claim.unwrap().lease_expires_at,
        t0() + Duration::seconds(30 + 120)
    );
}

/// A heartbeat extends; it never ends a longer lease sooner. The claim of
/// `history_to` runs 60 s from t0; one asked for a shorter time from now
/// keeps it.
#[test]
fn extending_a_lease_never_shortens_it() {
    let ticket = Scenario::given(history_to(State::Classifying, 0, HOLDER))
        .as_role(HOLDER, Role::Classifier)
        .at(t0() + Duration::seconds(10))
        .when(Command::ExtendLease {
            claim_id: Uuid::from_u128(9),
            lease_secs: Some(5),
        })
        .then_state(State::Classifying);
    assert_eq!(ticket.claim.unwrap().lease_expires_at, t0() + Duration::seconds(60));
}

fn classify(category: &str, confidence: f64) -> Command {
    Command::Classify {
        claim_id: Uuid::from_u128(9),
        category: category.into(),
        priority: Priority::Normal,
        confidence,
    }
}

#[test]
fn hallucinated_classifications_are_invalid_input() {
    let given = || Scenario::given(history_to(State::Classifying, 0, HOLDER)).as_role(HOLDER, Role::Classifier);
    given()
        .when(classify("refund_fraud", 0.9))
        .then_rejected(Rejection::Invalid(ValidationError::UnknownCategory {
            category: "refund_fraud".into(),
            allowed: Policy::default().categories,
        }));
    for confidence in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
        given()
            .when(classify("bug", confidence))
            .then_rejected_with("invalid_input");
    }
    given().when(classify("bug", 0.0)).then_state(State::Classified);
    given().when(classify("bug", 1.0)).then_state(State::Classified);
}

#[test]
fn empty_and_oversized_drafts_are_invalid_input() {
    let given = || Scenario::given(history_to(State::Drafting, 0, HOLDER)).as_role(HOLDER, Role::Drafter);
    let draft = |body: String| Command::SubmitDraft {
        claim_id: Uuid::from_u128(9),
        body,
    };
    given()
        .when(draft("  \n ".into()))
        .then_rejected(Rejection::Invalid(ValidationError::Empty { field: "draft" }));
    let max = Policy::default().max_draft_bytes;
    given()
        .when(draft("x".repeat(max + 1)))
        .then_rejected(Rejection::Invalid(ValidationError::TooLong {
            field: "draft",
            len: max + 1,
            max,
        }));
    given().when(draft("x".repeat(max))).then_state(State::DraftReady);
}

/// U+0000 cannot be stored in PostgreSQL's `text`, where the read models
/// may live: refused in every text a command carries, and in the agent id.
#[test]
fn a_nul_character_in_a_text_or_the_agent_id_is_invalid_input() {
    let open = |subject: &str, body: &str, customer: Option<&str>| Command::OpenTicket {
        subject: subject.into(),
        body: body.into(),
        customer: customer.map(str::to_owned),
    };
    for (command, field) in [
        (open("Refund\0please", "b", None), "subject"),
        (open("s", "charged\0twice", None), "body"),
        (open("s", "b", Some("ana\0@example.com")), "customer"),
    ] {
        Scenario::given([])
            .as_role("intake-1", Role::Intake)
            .when(command)
            .then_rejected(Rejection::Invalid(ValidationError::NulCharacter { field }));
    }
    Scenario::given([])
        .as_role("intake\0-1", Role::Intake)
        .when(open("s", "b", None))
        .then_rejected(Rejection::Invalid(ValidationError::NulCharacter { field: "agent id" }));
    // Line breaks and escapes in an agent id would reach every table and
    // terminal that lists its events.
    for (id, code) in [("bad\nagent", 0x0a), ("red\u{1b}[31m", 0x1b), ("c1\u{85}", 0x85)] {
        Scenario::given([])
            .as_role(id, Role::Intake)
            .when(open("s", "b", None))
            .then_rejected(Rejection::Invalid(ValidationError::ControlCharacter {
                field: "agent id",
                code,
            }));
    }
    Scenario::given([])
        .as_role(" ", Role::Intake)
        .when(open("s", "b", None))
        .then_rejected(Rejection::Invalid(ValidationError::Empty { field: "agent id" }));
    // Counted in characters, as the CLI always did: 200 CJK characters
    // (600 bytes) are an id, 201 are not.
    let long = "工".repeat(200);
    Scenario::given([])
        .as_role(&long, Role::Intake)
        .when(open("s", "b", None))
        .then_state(State::New);
    Scenario::given([])
        .as_role(&format!("{long}工"), Role::Intake)
        .when(open("s", "b", None))
        .then_rejected(Rejection::Invalid(ValidationError::TooLong {
            field: "agent id",
            len: 201,
            max: 200,
        }));
    Scenario::given(history_to(State::Drafting, 0, HOLDER))
        .as_role(HOLDER, Role::Drafter)
        .when(Command::SubmitDraft {
            claim_id: Uuid::from_u128(9),
            body: "Dear\0customer".into(),
        })
        .then_rejected(Rejection::Invalid(ValidationError::NulCharacter { field: "draft" }));
    // Other control characters, line breaks above all, stay allowed.
    Scenario::given([])
        .as_role("intake-1", Role::Intake)
        .when(open("s", "line one\r\n\tline two", None))
        .then_state(State::New);
}

#[test]
fn invalid_ticket_fields_and_leases_are_refused() {
    Scenario::given([])
        .as_role("intake-1", Role::Intake)
        .when(Command::OpenTicket {
            subject: "x".repeat(201),
            body: "b".into(),
            customer: None,
        })
        .then_rejected(Rejection::Invalid(ValidationError::TooLong {
            field: "subject",
            len: 201,
            max: 200,
        }));
    Scenario::given([])
        .as_role("intake-1", Role::Intake)
        .when(Command::OpenTicket {
            subject: "s".into(),
            body: String::new(),
            customer: None,
        })
        .then_rejected(Rejection::Invalid(ValidationError::Empty { field: "body" }));
    for lease_secs in [0, 3601] {
        Scenario::given([opened()])
            .as_role("classifier-1", Role::Classifier)
            .when(Command::StartClassification {
                lease_secs: Some(lease_secs),
            })
            .then_rejected(Rejection::Invalid(ValidationError::LeaseOutOfRange {
                secs: lease_secs,
                max: 3600,
            }));
    }
}

#[test]
fn a_lease_past_the_end_of_time_is_refused_not_a_panic() {
    let now = DateTime::<Utc>::MAX_UTC - Duration::seconds(10);
    Scenario::given([opened()])
        .as_role("classifier-1", Role::Classifier)
        .at(now)
        .when(Command::StartClassification { lease_secs: None })
        .then_rejected(Rejection::Invalid(ValidationError::LeaseEndsPastTime {
            secs: Policy::default().default_lease_secs,
            now,
        }));
}

#[test]
fn a_stored_attempt_count_at_its_limit_does_not_wrap() {
    // Whatever the stored count, one more failure is not zero failures:
    // the ticket goes to a human.
    Scenario::given([
        opened(),
        Event::ClassificationStarted {
            claim: claim(1, "classifier-1", 300),
        },
        Event::ClaimReleased {
            claim_id: Uuid::from_u128(1),
            reason: "r".into(),
            attempts: u32::MAX,
        },
        Event::ClassificationStarted {
            claim: claim(2, "classifier-1", 300),
        },
    ])
    .as_role("classifier-1", Role::Classifier)
    .when(Command::ReleaseClaim {
        claim_id: Uuid::from_u128(2),
        reason: "again".into(),
    })
    .then_state(State::NeedsHuman);
}

#[test]
fn invisible_text_is_empty_and_control_characters_are_refused() {
    let open = |subject: &str, body: &str| {
        Scenario::given([])
            .as_role("intake-1", Role::Intake)
            .when(Command::OpenTicket {
                subject: subject.into(),
                body: body.into(),
                customer: None,
            })
    };
    open("s", "\u{200B}\u{FEFF} \u{2060}").then_rejected(Rejection::Invalid(ValidationError::Empty { field: "body" }));
    open("\u{1b}[31mred", "b").then_rejected(Rejection::Invalid(ValidationError::ControlCharacter {
        field: "subject",
        code: 0x1b,
    }));
    open("two\nlines", "b").then_rejected(Rejection::Invalid(ValidationError::ControlCharacter {
        field: "subject",
        code: 0x0a,
    }));
    open("s", "ok\u{7}").then_rejected(Rejection::Invalid(ValidationError::ControlCharacter {
        field: "body",
        code: 0x07,
    }));
    // Line breaks and tabs are a body's own, a tab may be in a subject
    // (an unfolded mail header), C1 characters come with Latin-1 mail, and
    // a zero-width space inside text is text.
    open("Charged\u{200B}twice\tagain", "line one\r\nline\ttwo \u{92}s").then_state(State::New);
}

#[test]
fn commands_and_rejections_serialize_for_programs() {
    let json = serde_json::to_value(valid_command(CommandKind::Classify)).unwrap();
    assert_eq!(json["type"], "classify");
    let back: Command = serde_json::from_value(json).unwrap();
    assert_eq!(back, valid_command(CommandKind::Classify));
    assert!(serde_json::from_str::<Command>(r#"{"type":"classify","claim_id":"x"}"#).is_err());
    let rejection = serde_json::to_value(Rejection::InvalidTransition {
        from: State::New,
        command: CommandKind::SubmitDraft,
    })
    .unwrap();
    assert_eq!(rejection["kind"], "invalid_transition");
    assert_eq!(rejection["from"], "NEW");
}

// ---- properties -----------------------------------------------------------

fn metadata(agent: &Agent, command_id: Uuid, now: chrono::DateTime<chrono::Utc>) -> EventMetadata {
    EventMetadata {
        schema_version: 1,
        command_id,
        correlation_id: command_id,
        causation_id: command_id,
        agent: agent.clone(),
        traceparent: None,
        recorded_at: now,
        decided_at_revision: None,
        sender_saw_revision: None,
        command_digest: None,
    }
}

/// A random command: its kind, the sender's role (mostly one the table
/// allows for that kind somewhere, so that sequences get far), whether it
/// names the current claim, whether its payload is valid, and the seconds
/// that pass before it.
fn any_command() -> impl Strategy<Value = (Role, CommandKind, bool, bool, u8)> {
    prop::sample::select(CommandKind::ALL.to_vec()).prop_flat_map(|kind| {
        let table_roles: Vec<Role> = TRANSITIONS
            .iter()
            .filter(|row| row.command == kind)
            .flat_map(|row| row.roles.iter().copied())
            .collect();
        let role = prop_oneof![
            4 => prop::sample::select(table_roles),
            1 => prop::sample::select(Role::ALL.to_vec()),
        ];
        (
            role,
            Just(kind),
            prop::bool::weighted(0.85),
            prop::bool::weighted(0.85),
            prop_oneof![4 => 0u8..10, 1 => 50u8..90],
        )
    })
}

fn concrete(kind: CommandKind, ticket: &Ticket, use_current_claim: bool, valid: bool) -> Command {
    let claim_id = match (&ticket.claim, use_current_claim) {
        (Some(claim), true) => claim.claim_id,
        _ => Uuid::from_u128(0xdead),
    };
    let command = valid_command(kind);
    let command = match command {
        Command::Classify { .. } => classify(if valid { "billing" } else { "astrology" }, 0.7),
        Command::SubmitDraft { .. } => Command::SubmitDraft {
            claim_id,
            body: if valid { "draft".into() } else { String::new() },
        },
        other => other,
    };
    match command {
        Command::Classify {
            category,
            priority,
            confidence,
            ..
        } => Command::Classify {
            claim_id,
            category,
            priority,
            confidence,
        },
        Command::Resolve { resolution, .. } => Command::Resolve {
            claim_id: Some(claim_id),
            resolution,
        },
        Command::RejectDraft { reason, .. } => Command::RejectDraft {
            claim_id: Some(claim_id),
            reason,
        },
        Command::EscalateToHuman { reason, .. } => Command::EscalateToHuman { claim_id, reason },
        Command::ReleaseClaim { reason, .. } => Command::ReleaseClaim { claim_id, reason },
        Command::ExtendLease { lease_secs, .. } => Command::ExtendLease { claim_id, lease_secs },
        Command::ExpireClaim { .. } => Command::ExpireClaim { claim_id },
        other => other,
    }
}

type RandomCommand = (Role, CommandKind, bool, bool, u8);

/// Runs one random sequence and checks it; returns every state visited.
fn run_sequence(commands: Vec<RandomCommand>) -> Result<Vec<State>, TestCaseError> {
    let policy = Policy::default();
    let mut ticket = Ticket::default();
    let mut history: Vec<(Event, EventMetadata)> = Vec::new();
    let mut visited = Vec::new();
    let mut now = t0();
    let opener = Agent::new("intake-1", Role::Intake);
    let open_id = Uuid::from_u128(1);
    let context = Context {
        now,
        ticket_id: ticket_id(),
        agent: &opener,
        command_id: open_id,
        policy: &policy,
    };
    for event in decide(&ticket, &valid_command(CommandKind::OpenTicket), &context).unwrap() {
        ticket = evolve(ticket, &event);
        history.push((event, metadata(&opener, open_id, now)));
    }
    for (index, (role, kind, use_claim, valid, wait)) in commands.into_iter().enumerate() {
        now += Duration::seconds(i64::from(wait));
        // The agent acting is the claim holder when `use_claim` says so.
        let agent_id = match (&ticket.claim, use_claim) {
            (Some(claim), true) => claim.agent_id.clone(),
            _ => format!("{role}-{index}"),
        };
        let agent = Agent::new(agent_id, role);
        let command = concrete(kind, &ticket, use_claim, valid);
        let command_id = Uuid::from_u128(1000 + index as u128);
        let context = Context {
            now,
            ticket_id: ticket_id(),
            agent: &agent,
            command_id,
            policy: &policy,
        };
        let before = ticket.state;
        if let Ok(events) = decide(&ticket, &command, &context) {
            prop_assert!(!events.is_empty());
            for event in events {
                ticket = evolve(ticket, &event);
                history.push((event, metadata(&agent, command_id, now)));
            }
            prop_assert!(
                transitions_from(before, kind).any(|row| Some(row.to) == ticket.state && row.roles.contains(&role)),
                "{kind} by {role} from {before:?} reached {:?}",
                ticket.state
            );
            visited.extend(ticket.state);
        }
    }
    let violations = audit_history(&history);
    prop_assert!(violations.is_empty(), "violations: {violations:?}");
    let events: Vec<Event> = history.iter().map(|(event, _)| event.clone()).collect();
    prop_assert_eq!(Ticket::from_events(&events), ticket);
    for event in &events {
        let decoded = Event::decode(event.event_type(), event.schema_version(), &event.encode()).unwrap();
        prop_assert_eq!(&decoded, event);
    }
    Ok(visited)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random commands from random roles (some holding the claim, some not,
    /// some late, some hallucinating): every accepted command lands where
    /// the table says, the history stays a valid path, and replaying the
    /// events gives the same ticket.
    #[test]
    fn random_command_sequences_keep_every_stream_a_path_through_the_table(
        commands in prop::collection::vec(any_command(), 1..60)
    ) {
        run_sequence(commands)?;
    }
}

/// The property above is only as good as the states its sequences reach.
#[test]
fn random_sequences_reach_every_state() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = prop::collection::vec(any_command(), 1..60);
    let mut visited = std::collections::BTreeSet::new();
    for _ in 0..256 {
        let commands = strategy.new_tree(&mut runner).unwrap().current();
        visited.extend(run_sequence(commands).unwrap());
    }
    assert_eq!(visited.into_iter().collect::<Vec<_>>(), State::ALL.to_vec());
}

/// Metadata of an event by `id` in `role`, `seconds` after `t0()`.
fn by(id: &str, role: Role, seconds: i64) -> EventMetadata {
    metadata(&Agent::new(id, role), Uuid::new_v4(), t0() + Duration::seconds(seconds))
}

/// A stored history: opened, classified, then drafting under claim 2 of
/// drafter-1, whose lease ends at `t0() + 60 s`.
fn drafting_history() -> Vec<(Event, EventMetadata)> {
    vec![
        (opened(), by("intake-1", Role::Intake, 0)),
        (
            Event::ClassificationStarted {
                claim: claim(1, "classifier-1", 60),
            },
            by("classifier-1", Role::Classifier, 0),
        ),
        (
            Event::TicketClassified {
                claim_id: Uuid::from_u128(1),
                category: "bug".into(),
                priority: Priority::Low,
                confidence: 0.4,
            },
            by("classifier-1", Role::Classifier, 1),
        ),
        (
            Event::DraftingStarted {
                claim: claim(2, "drafter-1", 60),
            },
            by("drafter-1", Role::Drafter, 2),
        ),
    ]
}

#[test]
fn the_auditor_catches_an_invalid_transition_and_a_late_write() {
    let valid = drafting_history();
    assert_eq!(audit_history(&valid), []);

    let mut late = valid.clone();
    late.push((
        Event::DraftSubmitted {
            claim_id: Uuid::from_u128(2),
            body: "late".into(),
        },
        by("drafter-1", Role::Drafter, 61),
    ));
    let violations = audit_history(&late);
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!(violations[0].index, 4);
    assert!(violations[0].message.contains("late write"), "{}", violations[0]);

    let mut wrong_holder = valid.clone();
    wrong_holder.push((
        Event::DraftSubmitted {
            claim_id: Uuid::from_u128(2),
            body: "not mine".into(),
        },
        by("drafter-2", Role::Drafter, 5),
    ));
    assert!(audit_history(&wrong_holder)[0].message.contains("held by drafter-1"));

    // A draft for a ticket that was never classified.
    let skipped = vec![
        valid[0].clone(),
        (
            Event::DraftSubmitted {
                claim_id: Uuid::from_u128(9),
                body: "draft".into(),
            },
            by("drafter-1", Role::Drafter, 1),
        ),
    ];
    let violations = audit_history(&skipped);
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(violations[0].message.contains("not in the transition table"));
}

/// What `decide` refuses, the auditor finds in a stored history: fencing
/// under a named claim, expiry of another claim, counts of failed attempts,
/// claims handed to someone else or born expired, take-overs of a claim
/// that was not current.
#[test]
fn the_auditor_checks_claims_as_decide_does() {
    let drafting = drafting_history();
    assert_eq!(audit_history(&drafting), []);
    let found = |last: (Event, EventMetadata)| -> String {
        let mut history = drafting.clone();
        history.push(last);
        let violations = audit_history(&history);
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert_eq!(violations[0].index, 4);
        violations[0].message.clone()
    };
    let resolved = |claim_id: u128| Event::TicketResolved {
        claim_id: Some(Uuid::from_u128(claim_id)),
        resolution: "done".into(),
    };
    // An operator naming a claim: not the current one, or after its lease.
    let message = found((resolved(0xdead), by("operator-1", Role::Operator, 5)));
    assert!(message.contains("not the ticket's current one"), "{message}");
    let message = found((resolved(2), by("operator-1", Role::Operator, 61)));
    assert!(message.contains("late write"), "{message}");
    // The sweeper expiring a claim that is not the current one.
    let message = found((
        Event::ClaimExpired {
            claim_id: Uuid::from_u128(0xdead),
            lease_expired_at: t0() + Duration::seconds(60),
            attempts: 1,
        },
        by("sweeper", Role::System, 61),
    ));
    assert!(message.contains("other than the current"), "{message}");
    // A release that resets the count of failed attempts.
    let message = found((
        Event::ClaimReleased {
            claim_id: Uuid::from_u128(2),
            reason: "r".into(),
            attempts: 0,
        },
        by("drafter-1", Role::Drafter, 3),
    ));
    assert!(message.contains("counted 0 failed attempts, not 1"), "{message}");
    // A take-over naming a claim that was not current, and one handing the
    // new claim to someone else, already expired.
    let message = found((
        Event::ClaimTakenOver {
            previous_claim_id: Uuid::from_u128(0xdead),
            claim: Claim {
                claim_id: Uuid::from_u128(3),
                agent_id: "operator-1".into(),
                lease_expires_at: t0() + Duration::seconds(100),
            },
        },
        by("operator-1", Role::Operator, 5),
    ));
    assert!(message.contains("but the current one was"), "{message}");
    let mut history = drafting.clone();
    history.push((
        Event::ClaimTakenOver {
            previous_claim_id: Uuid::from_u128(2),
            claim: Claim {
                claim_id: Uuid::from_u128(3),
                agent_id: "someone-else".into(),
                lease_expires_at: t0() + Duration::seconds(4),
            },
        },
        by("operator-1", Role::Operator, 5),
    ));
    let messages: Vec<String> = audit_history(&history).into_iter().map(|v| v.message).collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(messages[0].contains("handed claim"), "{messages:?}");
    assert!(messages[1].contains("handed out a lease that expired"), "{messages:?}");
    // A holder's command that names no claim: the escalator resolving.
    let mut escalating = drafting.clone();
    escalating.push((
        Event::DraftSubmitted {
            claim_id: Uuid::from_u128(2),
            body: "draft".into(),
        },
        by("drafter-1", Role::Drafter, 3),
    ));
    escalating.push((
        Event::EscalationStarted {
            claim: claim(4, "escalator-1", 60),
        },
        by("escalator-1", Role::Escalator, 4),
    ));
    assert_eq!(audit_history(&escalating), []);
    escalating.push((
        Event::TicketResolved {
            claim_id: None,
            resolution: "done".into(),
        },
        by("escalator-1", Role::Escalator, 5),
    ));
    let violations = audit_history(&escalating);
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(violations[0].message.contains("without naming it"), "{violations:?}");
}

/// An operator may resolve without a claim; one who names a claim acts
/// under it, and fencing holds: the claim must be the ticket's current one
/// and its lease must not have run out.
#[test]
fn an_operator_who_names_a_claim_is_fenced_by_it() {
    let escalating = history_to(State::Escalating, 0, HOLDER);
    let resolve = |claim_id: Option<u128>| Command::Resolve {
        claim_id: claim_id.map(Uuid::from_u128),
        resolution: "answered by phone".into(),
    };
    // The current claim (9, leased for 60 s), in time: resolved.
    Scenario::given(escalating.clone())
        .as_role(HOLDER, Role::Operator)
        .at(t0() + Duration::seconds(1))
        .when(resolve(Some(9)))
        .then_state(State::Resolved);
    // The same claim after its lease ran out: a late write.
    Scenario::given(escalating.clone())
        .as_role(HOLDER, Role::Operator)
        .at(t0() + Duration::seconds(61))
        .when(resolve(Some(9)))
        .then_rejected_with("lease_expired");
    // A claim this ticket never had, on a ticket nobody holds.
    Scenario::given(history_to(State::New, 0, HOLDER))
        .as_role("operator-1", Role::Operator)
        .at(t0() + Duration::seconds(1))
        .when(resolve(Some(0xdead)))
        .then_rejected_with("stale_claim");
    // Naming none is the override.
    Scenario::given(escalating)
        .as_role("operator-1", Role::Operator)
        .at(t0() + Duration::seconds(61))
        .when(resolve(None))
        .then_state(State::Resolved);
    // Rejecting a draft nobody holds: the same rule.
    Scenario::given(history_to(State::DraftReady, 0, HOLDER))
        .as_role("operator-1", Role::Operator)
        .at(t0() + Duration::seconds(1))
        .when(Command::RejectDraft {
            claim_id: Some(Uuid::from_u128(0xdead)),
            reason: "wrong tone".into(),
        })
        .then_rejected_with("stale_claim");
}

/// A refusal quotes at most a short excerpt of the input it refuses: the
/// reason is recorded, and output that failed must not get into the log.
#[test]
fn an_unknown_category_is_quoted_only_in_part() {
    let quoted = Rejection::Invalid(ValidationError::UnknownCategory {
        category: format!("{}…", "x".repeat(64)),
        allowed: Policy::default().categories,
    });
    assert!(quoted.to_string().len() < 400, "{quoted}");
    Scenario::given(history_to(State::Classifying, 0, HOLDER))
        .as_role(HOLDER, Role::Classifier)
        .at(t0() + Duration::seconds(1))
        .when(Command::Classify {
            claim_id: Uuid::from_u128(9),
            category: "x".repeat(10_000),
            priority: Priority::Low,
            confidence: 0.5,
        })
        .then_rejected(quoted);
}
