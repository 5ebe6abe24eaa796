//! `triage ticket …`: open, show and history.

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde_json::json;
use std::ops::ControlFlow;
use triage_command_handler::{CommandError, CommandHandler};
use triage_domain::{Agent, Command, CommandEnvelope, Rejection, Role, State, TicketId};

use triage_projections::TicketRow;
use triage_projections::query::EventQuery;
use uuid::Uuid;

use crate::GlobalArgs;
use crate::output;

#[derive(Debug, Subcommand)]
pub(crate) enum TicketCommand {
    /// Open a ticket and print its id.
    Open {
        /// The subject line (at most 200 characters).
        #[arg(long)]
        subject: String,
        /// The customer's message.
        #[arg(long)]
        body: String,
        /// Who wrote in, e.g. an email address.
        #[arg(long)]
        customer: Option<String>,
        /// The id of the person or program opening it, recorded in every
        /// event's metadata.
        #[arg(long, default_value = "cli", value_name = "ID", value_parser = parse_agent_id)]
        agent: String,
        /// The role to act in: intake or operator.
        #[arg(long, default_value = "operator", value_parser = parse_role)]
        role: Role,
        /// Use this ticket id instead of a new one (or, with --command-id,
        /// one derived from the command id).
        #[arg(long, value_name = "UUID")]
        id: Option<TicketId>,
        /// The command id; sending the same id again is a harmless retry.
        #[arg(long, value_name = "UUID")]
        command_id: Option<Uuid>,
    },
    /// Send any command to a ticket, as an agent would: the command is JSON
    /// such as '{"type":"start_classification"}' or
    /// '{"type":"classify","claim_id":"…","category":"billing","priority":"high","confidence":0.9}'.
    /// `triage states` lists the commands and the roles allowed to send them.
    Send {
        /// The ticket id.
        id: TicketId,
        /// The command as JSON, or `-` to read it from stdin.
        command: String,
        /// The sender's id, recorded in the event metadata.
        #[arg(long, value_name = "ID", value_parser = parse_agent_id)]
        agent: String,
        /// The role the sender acts in.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// The ticket revision this command was decided on. If the ticket has
        /// moved on, the command is refused instead of being re-applied.
        #[arg(long, value_name = "REVISION")]
        at_revision: Option<u64>,
        /// The command id; sending the same id again is a harmless retry.
        #[arg(long, value_name = "UUID")]
        command_id: Option<Uuid>,
    },
    /// Show a ticket's current state from the read model, and the revision
    /// it reflects.
    Show {
        /// The ticket id (a UUID, optionally prefixed with `ticket-`).
        id: TicketId,
        /// Time travel: the ticket as it was at this revision (a number) or
        /// moment (RFC 3339), folded from its events.
        #[arg(long, value_name = "REVISION|TIME", value_parser = parse_moment)]
        at: Option<Moment>,
    },
    /// List tickets from the read model: with --state, the longest in that
    /// state first; otherwise the oldest opened first.
    List {
        /// Only tickets in this state (NEW, CLASSIFYING, …, RESOLVED).
        #[arg(long, value_parser = parse_state)]
        state: Option<State>,
        /// At most this many (at least 1).
        #[arg(long, default_value_t = 50, value_parser = parse_limit)]
        limit: usize,
    },
    /// Show a role's work queue, oldest first: the tickets it can claim,
    /// and for operators also the hand-offs in NEEDS_HUMAN (which take no
    /// claim: an operator resolves them with `ticket send`).
    Queue {
        /// The role: classifier, drafter, escalator or operator.
        #[arg(long, value_parser = parse_queue_role)]
        role: Role,
        /// At most this many (at least 1).
        #[arg(long, default_value_t = 20, value_parser = parse_limit)]
        limit: usize,
    },
    /// The ticket's timeline: every transition with its agent, time, time
    /// spent in the previous state and command id, and the refused or
    /// conflicting attempts that were recorded.
    History {
        /// The ticket id (a UUID, optionally prefixed with `ticket-`).
        id: TicketId,
    },
}

fn parse_role(value: &str) -> Result<Role, String> {
    value.parse()
}

/// A role that has a work queue (the others never claim work).
fn parse_queue_role(value: &str) -> Result<Role, String> {
    let role = parse_role(value)?;
    match role {
        Role::Classifier | Role::Drafter | Role::Escalator | Role::Operator => Ok(role),
        _ => Err(format!(
            "{role} has no work queue; the roles with one are classifier, drafter, escalator and operator"
        )),
    }
}

fn parse_state(value: &str) -> Result<State, String> {
    value.parse()
}

/// A point in a ticket's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Moment {
    /// After this stream revision.
    Revision(u64),
    /// At this time.
    Time(chrono::DateTime<chrono::Utc>),
}

fn parse_moment(value: &str) -> Result<Moment, String> {
    match value.trim().parse::<u64>() {
        Ok(revision) => Ok(Moment::Revision(revision)),
        Err(_) => crate::events::parse_time(value)
            .map(Moment::Time)
            .map_err(|error| format!("neither a revision number nor a time: {error}")),
    }
}

/// A list's `--limit`: a list of none would look empty.
fn parse_limit(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err("at least 1: a list of none would look empty".to_owned()),
        Ok(limit) => Ok(limit),
        Err(error) => Err(error.to_string()),
    }
}

pub(crate) async fn run(command: TicketCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    // Parsed first: only a command that opens a ticket may create the store.
    let mut to_send = match &command {
        TicketCommand::Send { command, .. } => Some(parse_command(command)?),
        _ => None,
    };
    let opens = matches!(command, TicketCommand::Open { .. }) || matches!(to_send, Some(Command::OpenTicket { .. }));
    if !opens {
        global.require_existing_store()?;
    }
    let opened = global.open().await?;
    let location = opened.location.clone();
    let handler = CommandHandler::new(opened.events.clone());
    match command {
        TicketCommand::Open {
            subject,
            body,
            customer,
            agent,
            role,
            id,
            command_id,
        } => {
            // A retry with the same --command-id must reach the same ticket:
            // without --id, derive the ticket id from the command id.
            let ticket_id = match (id, command_id) {
                (Some(id), _) => id,
                (None, Some(command_id)) => TicketId::for_command(command_id),
                (None, None) => TicketId::new(),
            };
            let envelope = CommandEnvelope::new(
                ticket_id,
                Agent::new(agent, role),
                Command::OpenTicket {
                    subject,
                    body,
                    customer,
                },
            );
            let accepted = send(&handler, envelope, command_id, &location).await?;
            if global.json {
                output::print_json(&json!({
                    "id": accepted.ticket_id,
                    "stream": accepted.ticket_id.stream_name(),
                    "revision": accepted.revision,
                    "state": accepted.state,
                    "duplicate": accepted.duplicate,
                }));
            } else {
                out!("{}", accepted.ticket_id);
            }
            Ok(())
        }
        TicketCommand::Send {
            id,
            agent,
            role,
            at_revision,
            command_id,
            ..
        } => {
            let command = to_send
                .take()
                .expect("a sent command is parsed before the store is opened");
            let mut envelope = CommandEnvelope::new(id, Agent::new(agent, role), command);
            envelope.expected_revision = at_revision;
            let accepted = send(&handler, envelope, command_id, &location).await?;
            if global.json {
                output::print_json(&json!({
                    "id": accepted.ticket_id,
                    "command_id": accepted.command_id,
                    "revision": accepted.revision,
                    "state": accepted.state,
                    "events": accepted.events,
                    "duplicate": accepted.duplicate,
                }));
            } else {
                let types: Vec<_> = accepted.events.iter().map(|event| event.event_type()).collect();
                let note = if accepted.duplicate {
                    " (a retry: nothing new was written)"
                } else {
                    ""
                };
                out!(
                    "{} at revision {}: {}{note}",
                    accepted.state,
                    accepted.revision,
                    types.join(", ")
                );
            }
            Ok(())
        }
        TicketCommand::Show { id, at: Some(moment) } => {
            let records = ticket_records(&opened, id).await?;
            let mut events = Vec::with_capacity(records.len());
            let skipped = global.skipped_event_types();
            for record in &records {
                if let Some(event) = triage_projections::decode_skipping(record, &skipped)? {
                    events.push(event);
                }
            }
            let upto: Vec<_> = events
                .into_iter()
                .filter(|event| matches!(event.payload, triage_projections::Payload::Ticket(_)))
                .filter(|event| match moment {
                    Moment::Revision(revision) => event.revision <= revision,
                    Moment::Time(time) => event.recorded_at <= time,
                })
                .collect();
            let row = TicketRow::fold(&upto).ok_or_else(|| match moment {
                Moment::Time(time) => anyhow::anyhow!("ticket {id} did not exist yet at {time}"),
                Moment::Revision(_) => anyhow::anyhow!("ticket {id} has no events"),
            })?;
            if let Moment::Revision(revision) = moment
                && row.revision < revision
            {
                bail!("ticket {id} has no revision {revision}; its last is {}", row.revision);
            }
            if global.json {
                output::print_json(&output::ticket_json(&row));
            } else {
                output::print_ticket(&row, None);
                out!("as of revision {} ({})", row.revision, row.updated_at.to_rfc3339());
            }
            Ok(())
        }
        TicketCommand::Show { id, at: None } => {
            let checkpoint = opened.read_models.catch_up().await?;
            let row = opened
                .read_models
                .ticket(id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("ticket {id} not found in {location}"))?;
            if global.json {
                output::print_json(&output::ticket_json(&row));
            } else {
                output::print_ticket(&row, checkpoint);
            }
            Ok(())
        }
        TicketCommand::List { state, limit } => {
            opened.read_models.catch_up().await?;
            // One more than asked for, to say whether the list goes on.
            let mut rows = opened.read_models.list(state, limit.saturating_add(1)).await?;
            let more = rows.len() > limit;
            rows.truncate(limit);
            output::print_ticket_list(&rows, global.json);
            if more {
                // On stderr: JSON lines on stdout stay one ticket each.
                err!("more tickets follow; --limit N shows more");
            }
            Ok(())
        }
        TicketCommand::Queue { role, limit } => {
            opened.read_models.catch_up().await?;
            let mut rows = opened.read_models.work_queue(role, limit.saturating_add(1)).await?;
            let more = rows.len() > limit;
            rows.truncate(limit);
            output::print_ticket_list(&rows, global.json);
            if more {
                err!("more tickets are waiting; --limit N shows more");
            }
            Ok(())
        }
        TicketCommand::History { id } => {
            let records = ticket_records(&opened, id).await?;
            let entries = output::timeline(&records, &global.skipped_event_types())?;
            output::print_timeline(&entries, global.json)
        }
    }
}

/// A ticket's events and recorded refusals, in log order; an error naming
/// the store when the ticket does not exist.
async fn ticket_records(
    opened: &crate::Opened,
    id: TicketId,
) -> anyhow::Result<Vec<triage_event_store::RecordedEvent>> {
    let query = EventQuery {
        ticket: Some(id),
        ..EventQuery::default()
    };
    let mut records = Vec::new();
    query
        .scan(opened.events.as_ref(), 1024, |record| {
            records.push(record.clone());
            ControlFlow::Continue(())
        })
        .await
        .with_context(|| format!("cannot read ticket {id}"))?;
    if !records.iter().any(|record| record.stream.as_str() == id.stream_name()) {
        bail!("ticket {id} not found in {}", opened.location);
    }
    Ok(records)
}

/// Reads a command from JSON text, or from stdin for `-`.
fn parse_command(text: &str) -> anyhow::Result<Command> {
    let text = if text == "-" {
        let mut input = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut input)
            .context("cannot read the command from stdin")?;
        input
    } else {
        text.to_owned()
    };
    serde_json::from_str(&text).map_err(|error| {
        anyhow::anyhow!(
            "the command is not valid: {error}; expected JSON such as {{\"type\":\"start_classification\"}} (see `triage states` for the commands)"
        )
    })
}

/// Sends a command (under `command_id` when given, so that a retry is
/// harmless) and explains a refusal.
async fn send(
    handler: &CommandHandler,
    mut envelope: CommandEnvelope,
    command_id: Option<Uuid>,
    location: &crate::StoreLocation,
) -> anyhow::Result<triage_command_handler::Accepted> {
    if let Some(command_id) = command_id {
        envelope.command_id = command_id;
    }
    handler.handle(envelope).await.map_err(|error| explain(error, location))
}

/// Turns a handler error into a message that says what to do.
fn explain(error: CommandError, location: &crate::StoreLocation) -> anyhow::Error {
    match error {
        CommandError::Rejected {
            rejection: Rejection::TicketAlreadyExists,
            ticket_id,
            ..
        } => anyhow::anyhow!("ticket {ticket_id} already exists in {location}"),
        CommandError::Rejected {
            rejection: Rejection::TicketNotFound,
            ticket_id,
            ..
        } => anyhow::anyhow!("ticket {ticket_id} not found in {location}"),
        CommandError::Rejected {
            rejection,
            ticket_id,
            state,
            revision,
        } => {
            let at = match (state, revision) {
                (Some(state), Some(revision)) => format!(" (ticket {ticket_id} is {state} at revision {revision})"),
                _ => String::new(),
            };
            anyhow::anyhow!(
                "rejected [{}]: {rejection}{at}; the ticket was not changed",
                rejection.code()
            )
        }
        CommandError::StaleRevision {
            ticket_id,
            expected,
            actual,
            state,
        } => anyhow::anyhow!(
            "stale decision: the command was decided on revision {expected}, but ticket {ticket_id} is {} at revision {}; \
             the ticket was not changed; look at it again and decide anew",
            state.map_or_else(|| "missing".to_owned(), |s| s.to_string()),
            actual.map_or_else(|| "none".to_owned(), |r| r.to_string()),
        ),
        other => anyhow::Error::new(other),
    }
}

/// An agent id as the agents file takes it: 1 to 200 characters, not only
/// spaces. It is recorded in every event's metadata, and a claim names it.
/// An agent id as the command handler takes it (see
/// `triage_domain::check_agent_id`): refused here, before anything is
/// sent, so that no refusal record carries it into the log.
fn parse_agent_id(value: &str) -> Result<String, String> {
    let id = value.trim();
    triage_domain::check_agent_id(id).map_err(|error| error.to_string())?;
    Ok(id.to_owned())
}
