//! `decide`: a command against a ticket, checked against the transition
//! table, the claim and the policy, becomes events or a typed rejection.

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::command::{Command, CommandKind};
use crate::event::Event;
use crate::model::{Agent, Claim, Role, State, TicketId};
use crate::table::{ClaimRule, Guard, Transition, transitions_from};
use crate::ticket::Ticket;

/// The configured rules that are not part of the lifecycle itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// The categories a classifier may choose.
    pub categories: Vec<String>,
    /// Failed attempts at one stage (released or expired claims), and drafts
    /// rejected over the ticket's life, after which it goes to a human.
    pub max_attempts: u32,
    /// The lease a claim gets when the command asks for none.
    pub default_lease_secs: u32,
    /// The longest lease a command may ask for.
    pub max_lease_secs: u32,
    /// The largest draft reply, in bytes.
    pub max_draft_bytes: usize,
    /// The largest subject line, in characters.
    pub max_subject_chars: usize,
    /// The largest customer message, in bytes.
    pub max_body_bytes: usize,
    /// The largest reason, resolution or customer name, in bytes.
    pub max_note_bytes: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            categories: ["billing", "outage", "account_access", "bug", "feature_request", "other"]
                .map(str::to_owned)
                .to_vec(),
            max_attempts: 3,
            default_lease_secs: 60,
            max_lease_secs: 3600,
            max_draft_bytes: 16 * 1024,
            max_subject_chars: 200,
            max_body_bytes: 64 * 1024,
            max_note_bytes: 4 * 1024,
        }
    }
}

/// What `decide` knows besides the ticket and the command, gathered by the
/// command handler beforehand so that `decide` stays pure.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    /// The handler's clock reading.
    pub now: DateTime<Utc>,
    /// The ticket the command is for.
    pub ticket_id: TicketId,
    /// The sender.
    pub agent: &'a Agent,
    /// The command id; new claims take it as their claim id.
    pub command_id: Uuid,
    /// The configured rules.
    pub policy: &'a Policy,
}

/// Agent output or command input that fails validation. Never stored: a
/// hallucinated answer is bad input, not a state.
#[derive(Clone, Debug, PartialEq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ValidationError {
    /// The category is not one of the configured set.
    #[error("category {category:?} is not one of: {}", allowed.join(", "))]
    UnknownCategory {
        /// The category given.
        category: String,
        /// The configured set.
        allowed: Vec<String>,
    },
    /// Confidence is not a number in [0, 1].
    #[error("confidence {confidence} is not in [0, 1]")]
    ConfidenceOutOfRange {
        /// The confidence given.
        confidence: f64,
    },
    /// A required text is empty or only white space.
    #[error("{field} must not be empty")]
    Empty {
        /// Which field.
        field: &'static str,
    },
    /// A text is longer than allowed.
    #[error("{field} is {len} {} long, more than the limit of {max}", length_unit(field))]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length (bytes, or characters for the subject).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A text holds U+0000, which no text column of the read models (nor
    /// PostgreSQL's `text`) can store, and which no ticket means.
    #[error("{field} must not contain the character U+0000")]
    NulCharacter {
        /// Which field.
        field: &'static str,
    },
    /// A text holds an ASCII control character other than a tab or (outside
    /// a subject) a line break: terminal escapes and the like, which would
    /// reach every screen that shows the ticket.
    #[error("{field} must not contain the control character U+{code:04X}")]
    ControlCharacter {
        /// Which field.
        field: &'static str,
        /// The character's code point.
        code: u32,
    },
    /// The requested lease is zero or longer than allowed.
    #[error("a lease of {secs}s is not in [1, {max}]")]
    LeaseOutOfRange {
        /// The lease asked for.
        secs: u32,
        /// The limit.
        max: u32,
    },
    /// The lease would end after the last instant a timestamp can hold:
    /// the handler's clock is wrong.
    #[error("a lease of {secs}s from {now} ends past the last representable time")]
    LeaseEndsPastTime {
        /// The lease asked for.
        secs: u32,
        /// When it was asked for.
        now: DateTime<Utc>,
    },
}

/// Why a command was refused. Nothing is written for a rejected command.
#[derive(Clone, Debug, PartialEq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Rejection {
    /// The ticket does not exist.
    #[error("the ticket does not exist")]
    TicketNotFound,
    /// `OpenTicket` for a ticket that exists.
    #[error("the ticket already exists")]
    TicketAlreadyExists,
    /// No row of the transition table leaves this state with this command.
    #[error("{command} is not allowed in state {from}")]
    InvalidTransition {
        /// The ticket's state.
        from: State,
        /// The command.
        command: CommandKind,
    },
    /// The sender's role may not send this command in this state.
    #[error("role {role} may not {command} here; allowed: {}", allowed.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", "))]
    RoleNotAllowed {
        /// The sender's role.
        role: Role,
        /// The command.
        command: CommandKind,
        /// The roles that may.
        allowed: Vec<Role>,
    },
    /// The command must name the claim it completes.
    #[error("{command} must name the claim it acts under")]
    ClaimRequired {
        /// The command.
        command: CommandKind,
    },
    /// Fencing: the claim named is not the ticket's current claim (it was
    /// released, expired, completed or taken over).
    #[error("claim {claim_id} is not the current claim{}", current.map_or_else(String::new, |c| format!(" ({c} is)")))]
    StaleClaim {
        /// The claim named.
        claim_id: Uuid,
        /// The current claim, if any.
        current: Option<Uuid>,
    },
    /// Fencing: the claim belongs to another agent.
    #[error("claim {claim_id} is held by {holder}")]
    NotClaimHolder {
        /// The claim named.
        claim_id: Uuid,
        /// The agent holding it.
        holder: String,
    },
    /// Fencing: the claim's lease ran out; the late write is refused.
    #[error("the lease of claim {claim_id} expired at {}", expired_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))]
    LeaseExpired {
        /// The claim named.
        claim_id: Uuid,
        /// When its lease ran out.
        expired_at: DateTime<Utc>,
    },
    /// The sweeper tried to expire a claim whose lease still runs.
    #[error("the lease of claim {claim_id} runs until {}", expires_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))]
    LeaseNotExpired {
        /// The claim named.
        claim_id: Uuid,
        /// When its lease runs out.
        expires_at: DateTime<Utc>,
    },
    /// The command's content failed validation.
    #[error("invalid input: {0}")]
    Invalid(ValidationError),
}

impl Rejection {
    /// A stable machine-readable code, such as `stale_claim`.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::TicketNotFound => "ticket_not_found",
            Rejection::TicketAlreadyExists => "ticket_already_exists",
            Rejection::InvalidTransition { .. } => "invalid_transition",
            Rejection::RoleNotAllowed { .. } => "role_not_allowed",
            Rejection::ClaimRequired { .. } => "claim_required",
            Rejection::StaleClaim { .. } => "stale_claim",
            Rejection::NotClaimHolder { .. } => "not_claim_holder",
            Rejection::LeaseExpired { .. } => "lease_expired",
            Rejection::LeaseNotExpired { .. } => "lease_not_expired",
            Rejection::Invalid(_) => "invalid_input",
        }
    }
}

/// Decides a command against a ticket: the events to append, or why not.
///
/// The transition table is the only source of what is allowed: `decide`
/// finds the rows for the ticket's state and the command, keeps those that
/// allow the sender's role, checks the claim rule, picks the row whose guard
/// holds, and produces the events that [`crate::evolve`] folds into that
/// row's target state.
pub fn decide(ticket: &Ticket, command: &Command, context: &Context<'_>) -> Result<Vec<Event>, Rejection> {
    let kind = command.kind();
    match (ticket.state, kind) {
        (None, CommandKind::OpenTicket) => {}
        (None, _) => return Err(Rejection::TicketNotFound),
        (Some(_), CommandKind::OpenTicket) => return Err(Rejection::TicketAlreadyExists),
        (Some(_), _) => {}
    }
    let rows: Vec<&Transition> = transitions_from(ticket.state, kind).collect();
    let Some(first) = rows.first() else {
        return Err(Rejection::InvalidTransition {
            from: ticket.state.unwrap_or(State::New),
            command: kind,
        });
    };
    check_agent_id(&context.agent.id).map_err(Rejection::Invalid)?;
    let role = context.agent.role;
    let allowed_rows: Vec<&Transition> = rows.iter().copied().filter(|row| row.roles.contains(&role)).collect();
    if allowed_rows.is_empty() {
        let mut allowed: Vec<Role> = rows.iter().flat_map(|row| row.roles.iter().copied()).collect();
        allowed.sort();
        allowed.dedup();
        return Err(Rejection::RoleNotAllowed {
            role,
            command: kind,
            allowed,
        });
    }
    debug_assert!(allowed_rows.iter().all(|row| row.claim == allowed_rows[0].claim));
    check_claim(ticket, command, allowed_rows[0].claim, kind, context)?;
    // Saturating: the counts come from stored events, and a wrapped count
    // would send a poison ticket back to its queue.
    let attempts = match kind {
        CommandKind::RejectDraft => ticket.drafts_rejected,
        _ => ticket.attempts,
    }
    .saturating_add(1);
    let exhausted = attempts >= context.policy.max_attempts;
    let row = allowed_rows
        .iter()
        .find(|row| match row.guard {
            Guard::Always => true,
            Guard::AttemptsRemain => !exhausted,
            Guard::AttemptsExhausted => exhausted,
        })
        .unwrap_or(first);
    let events = events_for(ticket, command, context, attempts)?;
    // `evolve` must land where the table says; the property tests check the
    // same from the outside.
    debug_assert_eq!(
        events.iter().fold(ticket.clone(), crate::evolve).state,
        Some(row.to),
        "{kind} from {:?} must lead to {}",
        ticket.state,
        row.to
    );
    Ok(events)
}

fn check_claim(
    ticket: &Ticket,
    command: &Command,
    rule: ClaimRule,
    kind: CommandKind,
    context: &Context<'_>,
) -> Result<(), Rejection> {
    match rule {
        ClaimRule::Takes | ClaimRule::Replaces => Ok(()),
        // No claim needed (an operator overriding, or rejecting a draft
        // nobody holds). One who names a claim all the same acts under
        // it, and fencing holds as for anyone: it must be the ticket's
        // current claim, with its lease not run out. Otherwise a late
        // write (an escalator's token that also holds the operator role,
        // say) would be accepted after its claim expired, and the event
        // would record a claim that was never handed out.
        ClaimRule::None | ClaimRule::Overrides => match command.claim_id() {
            None => Ok(()),
            Some(claim_id) => {
                let claim = current_claim(ticket, claim_id)?;
                if context.now >= claim.lease_expires_at {
                    return Err(Rejection::LeaseExpired {
                        claim_id,
                        expired_at: claim.lease_expires_at,
                    });
                }
                Ok(())
            }
        },
        ClaimRule::Holder => {
            let claim_id = command.claim_id().ok_or(Rejection::ClaimRequired { command: kind })?;
            let claim = current_claim(ticket, claim_id)?;
            if claim.agent_id != context.agent.id {
                return Err(Rejection::NotClaimHolder {
                    claim_id,
                    holder: claim.agent_id.clone(),
                });
            }
            if context.now >= claim.lease_expires_at {
                return Err(Rejection::LeaseExpired {
                    claim_id,
                    expired_at: claim.lease_expires_at,
                });
            }
            Ok(())
        }
        ClaimRule::Expired => {
            let claim_id = command.claim_id().ok_or(Rejection::ClaimRequired { command: kind })?;
            let claim = current_claim(ticket, claim_id)?;
            if context.now < claim.lease_expires_at {
                return Err(Rejection::LeaseNotExpired {
                    claim_id,
                    expires_at: claim.lease_expires_at,
                });
            }
            Ok(())
        }
    }
}

/// Why a command refused as an invalid transition really failed, when it
/// names a claim that was handed out on this ticket and has ended since: a
/// late write after the sweeper expired its claim (the ticket went back
/// to a queue, where completing the stage is no transition) is told that
/// its lease expired, and one after a release, completion or take-over
/// that its claim is stale. `None` for a claim this ticket never had, or
/// its current one: then the transition is what is wrong.
pub fn ended_claim<'a>(
    ticket: &Ticket,
    history: impl IntoIterator<Item = &'a Event>,
    claim_id: Uuid,
) -> Option<Rejection> {
    let current = ticket.claim.as_ref().map(|claim| claim.claim_id);
    if current == Some(claim_id) {
        return None;
    }
    let mut handed_out = false;
    for event in history {
        if event.new_claim().is_some_and(|claim| claim.claim_id == claim_id) {
            handed_out = true;
        }
        if let Event::ClaimExpired {
            claim_id: expired,
            lease_expired_at,
            ..
        } = event
            && *expired == claim_id
            && handed_out
        {
            return Some(Rejection::LeaseExpired {
                claim_id,
                expired_at: *lease_expired_at,
            });
        }
    }
    handed_out.then_some(Rejection::StaleClaim { claim_id, current })
}

fn current_claim(ticket: &Ticket, claim_id: Uuid) -> Result<&Claim, Rejection> {
    match &ticket.claim {
        Some(claim) if claim.claim_id == claim_id => Ok(claim),
        other => Err(Rejection::StaleClaim {
            claim_id,
            current: other.as_ref().map(|claim| claim.claim_id),
        }),
    }
}

fn events_for(
    ticket: &Ticket,
    command: &Command,
    context: &Context<'_>,
    attempts: u32,
) -> Result<Vec<Event>, Rejection> {
    let policy = context.policy;
    let new_claim = |lease_secs: Option<u32>| -> Result<Claim, Rejection> {
        Ok(Claim {
            claim_id: context.command_id,
            agent_id: context.agent.id.clone(),
            lease_expires_at: lease_until(policy, lease_secs, context.now)?,
        })
    };
    let poison_after = |failed: Event| -> Vec<Event> {
        if attempts >= policy.max_attempts {
            let reason = if matches!(failed, Event::DraftRejected { .. }) {
                format!("poison ticket: {attempts} drafts rejected")
            } else {
                format!("poison ticket: {attempts} failed attempts at one stage")
            };
            vec![failed, Event::EscalatedToHuman { claim_id: None, reason }]
        } else {
            vec![failed]
        }
    };
    let events = match command {
        Command::OpenTicket {
            subject,
            body,
            customer,
        } => {
            check_text("subject", subject, policy.max_subject_chars, subject.chars().count())?;
            check_text("body", body, policy.max_body_bytes, body.len())?;
            if let Some(customer) = customer {
                check_text("customer", customer, policy.max_note_bytes, customer.len())?;
            }
            vec![Event::TicketOpened {
                ticket_id: context.ticket_id,
                subject: subject.clone(),
                body: body.clone(),
                customer: customer.clone(),
            }]
        }
        Command::StartClassification { lease_secs } => vec![Event::ClassificationStarted {
            claim: new_claim(*lease_secs)?,
        }],
        Command::Classify {
            claim_id,
            category,
            priority,
            confidence,
        } => {
            if !policy.categories.iter().any(|allowed| allowed == category) {
                return Err(Rejection::Invalid(ValidationError::UnknownCategory {
                    category: excerpt(category, MAX_ECHOED_CHARS),
                    allowed: policy.categories.clone(),
                }));
            }
            if !(0.0..=1.0).contains(confidence) {
                return Err(Rejection::Invalid(ValidationError::ConfidenceOutOfRange {
                    confidence: *confidence,
                }));
            }
            vec![Event::TicketClassified {
                claim_id: *claim_id,
                category: category.clone(),
                priority: *priority,
                confidence: *confidence,
            }]
        }
        Command::StartDrafting { lease_secs } => vec![Event::DraftingStarted {
            claim: new_claim(*lease_secs)?,
        }],
        Command::SubmitDraft { claim_id, body } => {
            check_text("draft", body, policy.max_draft_bytes, body.len())?;
            vec![Event::DraftSubmitted {
                claim_id: *claim_id,
                body: body.clone(),
            }]
        }
        Command::StartEscalation { lease_secs } => vec![Event::EscalationStarted {
            claim: new_claim(*lease_secs)?,
        }],
        Command::Resolve { claim_id, resolution } => {
            check_text("resolution", resolution, policy.max_note_bytes, resolution.len())?;
            vec![Event::TicketResolved {
                claim_id: *claim_id,
                resolution: resolution.clone(),
            }]
        }
        Command::RejectDraft { claim_id, reason } => {
            check_text("reason", reason, policy.max_note_bytes, reason.len())?;
            poison_after(Event::DraftRejected {
                claim_id: *claim_id,
                reason: reason.clone(),
            })
        }
        Command::EscalateToHuman { claim_id, reason } => {
            check_text("reason", reason, policy.max_note_bytes, reason.len())?;
            vec![Event::EscalatedToHuman {
                claim_id: Some(*claim_id),
                reason: reason.clone(),
            }]
        }
        Command::ReleaseClaim { claim_id, reason } => {
            check_text("reason", reason, policy.max_note_bytes, reason.len())?;
            poison_after(Event::ClaimReleased {
                claim_id: *claim_id,
                reason: reason.clone(),
                attempts,
            })
        }
        // An extension never ends a lease sooner than it would have ended:
        // an agent that claimed for an hour and heartbeats with the
        // default lease keeps its hour.
        Command::ExtendLease { claim_id, lease_secs } => {
            let requested = lease_until(policy, *lease_secs, context.now)?;
            let current = ticket.claim.as_ref().map(|claim| claim.lease_expires_at);
            vec![Event::LeaseExtended {
                claim_id: *claim_id,
                lease_expires_at: current.map_or(requested, |current| current.max(requested)),
            }]
        }
        Command::ExpireClaim { claim_id } => {
            let lease_expired_at = ticket
                .claim
                .as_ref()
                .map_or(context.now, |claim| claim.lease_expires_at);
            poison_after(Event::ClaimExpired {
                claim_id: *claim_id,
                lease_expired_at,
                attempts,
            })
        }
        Command::TakeOver { lease_secs } => {
            let previous = ticket.claim.as_ref().map(|claim| claim.claim_id);
            vec![Event::ClaimTakenOver {
                previous_claim_id: previous.unwrap_or(Uuid::nil()),
                claim: new_claim(*lease_secs)?,
            }]
        }
    };
    Ok(events)
}

/// When a lease asked for at `now` ends; checked, so that a clock near
/// the end of representable time is a refusal, not a panic.
fn lease_until(policy: &Policy, requested: Option<u32>, now: DateTime<Utc>) -> Result<DateTime<Utc>, Rejection> {
    let secs = requested.unwrap_or(policy.default_lease_secs);
    if secs == 0 || secs > policy.max_lease_secs {
        return Err(Rejection::Invalid(ValidationError::LeaseOutOfRange {
            secs,
            max: policy.max_lease_secs,
        }));
    }
    now.checked_add_signed(Duration::seconds(i64::from(secs)))
        .ok_or(Rejection::Invalid(ValidationError::LeaseEndsPastTime { secs, now }))
}

/// The most characters of a refused input a refusal quotes. A refusal is
/// recorded in the ticket's rejections stream: output that failed must
/// not get into the log through the reason that refuses it.
const MAX_ECHOED_CHARS: usize = 64;

/// `text` cut to `max` characters, with `…` when cut.
fn excerpt(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// What a text's length is counted in: characters for the subject (what
/// a person sees in a list), bytes for the rest (what is stored).
fn length_unit(field: &str) -> &'static str {
    if matches!(field, "subject" | "agent id") {
        "characters"
    } else {
        "bytes"
    }
}

/// The longest agent id, in characters (as the CLI always counted them).
pub const MAX_AGENT_ID_CHARS: usize = 200;

/// Whether `id` can name an agent: it is recorded in every event the agent
/// writes and printed in every table that lists them, so it holds 1 to
/// [`MAX_AGENT_ID_CHARS`] characters, not all blank, and no control character
/// (a line break would split a table row, an escape sequence would reach
/// the terminal of whoever reads the log; U+0000 no read model can store).
pub fn check_agent_id(id: &str) -> Result<(), ValidationError> {
    const FIELD: &str = "agent id";
    if id.trim().is_empty() {
        return Err(ValidationError::Empty { field: FIELD });
    }
    let chars = id.chars().count();
    if chars > MAX_AGENT_ID_CHARS {
        return Err(ValidationError::TooLong {
            field: FIELD,
            len: chars,
            max: MAX_AGENT_ID_CHARS,
        });
    }
    if id.contains('\0') {
        return Err(ValidationError::NulCharacter { field: FIELD });
    }
    if let Some(control) = id.chars().find(|c| c.is_control()) {
        return Err(ValidationError::ControlCharacter {
            field: FIELD,
            code: u32::from(control),
        });
    }
    Ok(())
}

fn check_text(field: &'static str, value: &str, max: usize, len: usize) -> Result<(), Rejection> {
    // Blank also when only invisible: white space, zero-width spaces and
    // joiners, the byte-order mark, soft hyphens.
    let invisible =
        |c: char| c.is_whitespace() || matches!(c, '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}');
    if value.chars().all(invisible) {
        return Err(Rejection::Invalid(ValidationError::Empty { field }));
    }
    if len > max {
        return Err(Rejection::Invalid(ValidationError::TooLong { field, len, max }));
    }
    if value.contains('\0') {
        return Err(Rejection::Invalid(ValidationError::NulCharacter { field }));
    }
    // C0 controls and DEL: escape sequences start with ESC. Tabs are
    // allowed everywhere, line breaks outside the subject. C1 (U+0080 to
    // U+009F) stays allowed: mail decoded as Latin-1 is full of it.
    let single_line = field == "subject";
    let refused = |c: char| (c < ' ' || c == '\u{7f}') && c != '\t' && (single_line || !matches!(c, '\n' | '\r'));
    if let Some(control) = value.chars().find(|&c| refused(c)) {
        return Err(Rejection::Invalid(ValidationError::ControlCharacter {
            field,
            code: u32::from(control),
        }));
    }
    Ok(())
}
