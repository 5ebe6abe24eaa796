//! Printing: tables for people, JSON for programs.

use std::io::Write as _;

use chrono::SecondsFormat;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
use serde_json::{Value, json};
use triage_domain::{ClaimRule, Event, Guard, TRANSITIONS, mermaid};
use triage_event_store::Position;
use triage_projections::TicketRow;

pub(crate) fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(header.to_vec());
    let arrangement = arrangement_for(table.width());
    table.set_content_arrangement(arrangement);
    table
}

/// Terminals narrower than this are taken to have reported no real width.
const NARROWEST_TERMINAL: u16 = 20;

/// Columns wrap to fit a terminal's width, unless the terminal reports
/// next to none: some pseudo-terminals (containers run with `-t`, CI
/// runners) say 0×0, and fitting to that squeezed every column to one
/// character. Then, as in a pipe, rows are as wide as they need.
fn arrangement_for(terminal_width: Option<u16>) -> ContentArrangement {
    match terminal_width {
        Some(width) if width < NARROWEST_TERMINAL => ContentArrangement::Disabled,
        _ => ContentArrangement::Dynamic,
    }
}

/// Writes one line to stdout. A closed pipe (`triage … | head`) ends the
/// process quietly: the reader has what it wanted.
pub(crate) fn write_line(line: std::fmt::Arguments<'_>) {
    if let Err(error) = writeln!(std::io::stdout().lock(), "{line}") {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        err!("error: cannot write the output: {error}");
        std::process::exit(1);
    }
}

/// Writes one line to stderr, ignoring a failure: there is nowhere left
/// to report it.
pub(crate) fn write_error_line(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Prints one JSON value on one line.
pub(crate) fn print_json(value: &Value) {
    out!("{value}");
}

fn claim_rule(rule: ClaimRule) -> &'static str {
    match rule {
        ClaimRule::None => "",
        ClaimRule::Takes => "takes a claim",
        ClaimRule::Holder => "claim holder, lease running",
        ClaimRule::Expired => "lease expired",
        ClaimRule::Replaces => "replaces the claim",
        ClaimRule::Overrides => "cancels any claim",
    }
}

fn guard(guard: Guard) -> &'static str {
    match guard {
        Guard::Always => "",
        Guard::AttemptsRemain => "attempts remain",
        Guard::AttemptsExhausted => "attempts exhausted",
    }
}

/// `triage states`.
pub(crate) fn print_states(as_mermaid: bool, as_json: bool) {
    if as_mermaid {
        out!("{}", mermaid().trim_end());
        return;
    }
    if as_json {
        for row in TRANSITIONS {
            print_json(&json!({
                "from": row.from,
                "command": row.command,
                "roles": row.roles,
                "to": row.to,
                "claim": row.claim,
                "guard": row.guard,
            }));
        }
        return;
    }
    let mut out = table(&["From", "Command", "Roles", "To", "Claim", "Condition"]);
    for row in TRANSITIONS {
        let roles: Vec<_> = row.roles.iter().map(|role| role.as_str()).collect();
        out.add_row(vec![
            row.from.map_or("(none)", |state| state.as_str()).to_owned(),
            row.command.as_str().to_owned(),
            roles.join(", "),
            row.to.as_str().to_owned(),
            claim_rule(row.claim).to_owned(),
            guard(row.guard).to_owned(),
        ]);
    }
    out!("{out}");
}

/// The JSON form of a ticket row.
pub(crate) fn ticket_json(row: &TicketRow) -> Value {
    let ticket = &row.ticket;
    json!({
        "id": ticket.id,
        "state": ticket.state,
        "revision": row.revision,
        "subject": ticket.subject,
        "body": ticket.body,
        "customer": ticket.customer,
        "classification": ticket.classification,
        "draft": ticket.draft,
        "claim": ticket.claim,
        "attempts": ticket.attempts,
        "drafts_rejected": ticket.drafts_rejected,
        "resolution": ticket.resolution,
        "last_reason": ticket.last_reason,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "state_entered_at": row.state_entered_at,
    })
}

fn time(at: chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `triage ticket show`.
pub(crate) fn print_ticket(row: &TicketRow, checkpoint: Option<Position>) {
    let ticket = &row.ticket;
    let mut out = table(&["Field", "Value"]);
    let mut line = |field: &str, value: String| {
        out.add_row(vec![field.to_owned(), value]);
    };
    line("id", ticket.id.map_or_else(String::new, |id| id.to_string()));
    line("state", ticket.state.map_or_else(String::new, |s| s.to_string()));
    line("revision", row.revision.to_string());
    line("subject", ticket.subject.clone());
    line("customer", ticket.customer.clone().unwrap_or_default());
    line("body", ticket.body.clone());
    if let Some(classification) = &ticket.classification {
        line(
            "classification",
            format!(
                "{} / {} (confidence {:.2})",
                classification.category, classification.priority, classification.confidence
            ),
        );
    }
    if let Some(draft) = &ticket.draft {
        line("draft", draft.clone());
    }
    if let Some(claim) = &ticket.claim {
        line(
            "claim",
            format!(
                "{} by {}, lease until {}",
                claim.claim_id,
                claim.agent_id,
                claim.lease_expires_at.to_rfc3339_opts(SecondsFormat::Secs, true)
            ),
        );
    }
    line("failed attempts", ticket.attempts.to_string());
    line("drafts rejected", ticket.drafts_rejected.to_string());
    if let Some(resolution) = &ticket.resolution {
        line("resolution", resolution.clone());
    }
    if let Some(reason) = &ticket.last_reason {
        line("last reason", reason.clone());
    }
    line("opened", time(row.created_at));
    line("in state since", time(row.state_entered_at));
    line("updated", time(row.updated_at));
    out!("{out}");
    if let Some(checkpoint) = checkpoint {
        out!(
            "read model at log position {checkpoint}; this ticket at revision {}",
            row.revision
        );
    }
}

/// `triage ticket list` and `triage ticket queue`.
pub(crate) fn print_ticket_list(rows: &[TicketRow], as_json: bool) {
    if as_json {
        for row in rows {
            print_json(&ticket_json(row));
        }
        return;
    }
    let mut out = table(&[
        "Ticket",
        "State",
        "Rev",
        "Subject",
        "Category",
        "Claim",
        "In state since",
    ]);
    for row in rows {
        let ticket = &row.ticket;
        out.add_row(vec![
            ticket.id.map_or_else(String::new, |id| id.to_string()),
            ticket.state.map_or_else(String::new, |s| s.to_string()),
            row.revision.to_string(),
            ticket.subject.clone(),
            ticket
                .classification
                .as_ref()
                .map_or_else(String::new, |c| format!("{} / {}", c.category, c.priority)),
            ticket.claim.as_ref().map_or_else(String::new, |c| c.agent_id.clone()),
            time(row.state_entered_at),
        ]);
    }
    out!("{out}");
    out!("{} ticket(s)", rows.len());
}

/// An id shortened for a table column: its first 8 and last 4 characters.
/// Both ends: ids that are UUIDv7 (tickets, commands, claims) made within
/// the same minute or so share their first 8, which are time; the last 4
/// are random.
pub(crate) fn abbreviated(id: &str) -> String {
    match (id.get(..8), id.len().checked_sub(4).and_then(|tail| id.get(tail..))) {
        (Some(head), Some(tail)) if id.len() > 12 => format!("{head}…{tail}"),
        _ => id.to_owned(),
    }
}

/// A one-line summary of an event's payload.
fn summarize(event: &Event) -> String {
    let short = |id: &uuid::Uuid| abbreviated(&id.simple().to_string());
    match event {
        Event::TicketOpened { subject, customer, .. } => match customer {
            Some(customer) => format!("{subject:?} from {customer}"),
            None => format!("{subject:?}"),
        },
        Event::ClassificationStarted { claim }
        | Event::DraftingStarted { claim }
        | Event::EscalationStarted { claim } => {
            format!(
                "claim {} by {} until {}",
                short(&claim.claim_id),
                claim.agent_id,
                claim.lease_expires_at.to_rfc3339_opts(SecondsFormat::Secs, true)
            )
        }
        Event::TicketClassified {
            category,
            priority,
            confidence,
            ..
        } => format!("{category} / {priority} (confidence {confidence:.2})"),
        Event::DraftSubmitted { body, .. } => format!("{} bytes", body.len()),
        Event::DraftRejected { reason, .. } | Event::EscalatedToHuman { reason, .. } => reason.clone(),
        Event::TicketResolved { resolution, .. } => resolution.clone(),
        Event::ClaimReleased {
            claim_id,
            reason,
            attempts,
        } => format!("claim {}: {reason} (attempt {attempts})", short(claim_id)),
        Event::ClaimExpired { claim_id, attempts, .. } => format!("claim {} (attempt {attempts})", short(claim_id)),
        Event::LeaseExtended {
            claim_id,
            lease_expires_at,
        } => format!(
            "claim {} until {}",
            short(claim_id),
            lease_expires_at.to_rfc3339_opts(SecondsFormat::Secs, true)
        ),
        Event::ClaimTakenOver {
            previous_claim_id,
            claim,
        } => format!(
            "claim {} replaced by {} ({})",
            short(previous_claim_id),
            short(&claim.claim_id),
            claim.agent_id
        ),
    }
}

/// One line of a ticket's timeline.
#[derive(Debug, serde::Serialize)]
pub(crate) struct TimelineEntry {
    position: String,
    stream: String,
    /// The ticket's revision: the event's own, or, for a refusal, the
    /// revision the refusal was decided on (the ticket did not move; the
    /// record's own revision in the `rejections-` stream says nothing
    /// about the ticket).
    revision: Option<u64>,
    recorded_at: chrono::DateTime<chrono::Utc>,
    #[serde(rename = "type")]
    event_type: String,
    agent: triage_domain::Agent,
    command_id: uuid::Uuid,
    correlation_id: uuid::Uuid,
    /// The state before; for a refusal, the state the command was refused in.
    from: Option<triage_domain::State>,
    /// The state after; `None` for a refusal, which moves nothing.
    to: Option<triage_domain::State>,
    /// For a transition: how long the ticket had been in `from`.
    time_in_from_state_ms: Option<i64>,
    /// Whether this was a refused or conflicting attempt (nothing changed).
    refused: bool,
    /// The refusal's code, such as `stale_revision`.
    code: Option<String>,
    details: String,
    data: Value,
}

/// Builds a ticket's timeline from its events and recorded refusals, in
/// log order.
pub(crate) fn timeline(
    records: &[triage_event_store::RecordedEvent],
    skipped: &std::collections::BTreeSet<String>,
) -> anyhow::Result<Vec<TimelineEntry>> {
    let mut ticket = triage_domain::Ticket::default();
    let mut entered_at: Option<chrono::DateTime<chrono::Utc>> = None;
    let mut entries = Vec::with_capacity(records.len());
    for record in records {
        let Some(projected) = triage_projections::decode_skipping(record, skipped)? else {
            continue;
        };
        let at = projected.recorded_at;
        // The command and correlation ids, which projections check but do
        // not keep. The record decoded above, so this reads too.
        let metadata = triage_domain::EventMetadata::decode(&record.metadata).map_err(|source| {
            triage_projections::ProjectionError::Undecodable {
                position: record.position,
                stream: record.stream.to_string(),
                event_type: record.event_type.clone(),
                source: triage_domain::DecodeError::Payload {
                    event_type: format!("{} metadata", record.event_type),
                    source,
                },
            }
        })?;
        let entry = match &projected.payload {
            triage_projections::Payload::Ticket(event) => {
                let from = ticket.state;
                ticket = triage_domain::evolve(std::mem::take(&mut ticket), event);
                let to = ticket.state;
                let time_in_from_state_ms = (from != to)
                    .then(|| entered_at.map(|since| (at - since).num_milliseconds()))
                    .flatten();
                if from != to {
                    entered_at = Some(at);
                }
                TimelineEntry {
                    position: record.position.to_string(),
                    stream: record.stream.to_string(),
                    revision: Some(record.revision),
                    recorded_at: at,
                    event_type: event.event_type().to_owned(),
                    agent: projected.agent.clone(),
                    command_id: metadata.command_id,
                    correlation_id: metadata.correlation_id,
                    from,
                    to,
                    time_in_from_state_ms,
                    refused: false,
                    code: None,
                    details: summarize(event),
                    data: serde_json::to_value(event)?,
                }
            }
            triage_projections::Payload::Rejected(rejected) => TimelineEntry {
                position: record.position.to_string(),
                stream: record.stream.to_string(),
                revision: rejected.revision,
                recorded_at: at,
                event_type: format!("refused {}", rejected.command),
                agent: projected.agent.clone(),
                command_id: metadata.command_id,
                correlation_id: metadata.correlation_id,
                from: rejected.state,
                to: None,
                time_in_from_state_ms: None,
                refused: true,
                code: Some(rejected.code.clone()),
                details: rejected.reason.clone(),
                data: serde_json::to_value(rejected)?,
            },
        };
        entries.push(entry);
    }
    Ok(entries)
}

/// A span of milliseconds as a person reads it: `850 ms`, `12.5 s`,
/// `6.2 min`, `3.4 h`.
pub(crate) fn duration(ms: i64) -> String {
    match ms {
        ms if ms < 1_000 => format!("{ms} ms"),
        ms if ms < 120_000 => format!("{:.1} s", ms as f64 / 1000.0),
        ms if ms < 7_200_000 => format!("{:.1} min", ms as f64 / 60_000.0),
        ms => format!("{:.1} h", ms as f64 / 3_600_000.0),
    }
}

/// `triage ticket history`.
pub(crate) fn print_timeline(entries: &[TimelineEntry], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        for entry in entries {
            print_json(&serde_json::to_value(entry)?);
        }
        return Ok(());
    }
    let mut out = table(&[
        "Rev",
        "Recorded",
        "Event",
        "Agent",
        "Transition",
        "Time in state",
        "Command",
        "Details",
    ]);
    for entry in entries {
        let transition = match (entry.from, entry.to, entry.refused) {
            (_, _, true) => format!("✗ {}", entry.code.as_deref().unwrap_or("refused")),
            (Some(from), Some(to), false) if from != to => format!("{from} → {to}"),
            (None, Some(to), false) => format!("→ {to}"),
            _ => String::new(),
        };
        out.add_row(vec![
            match (entry.refused, entry.revision) {
                (false, Some(revision)) => revision.to_string(),
                _ => "-".to_owned(),
            },
            entry.recorded_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            entry.event_type.clone(),
            format!("{} ({})", entry.agent.id, entry.agent.role),
            transition,
            entry.time_in_from_state_ms.map(duration).unwrap_or_default(),
            abbreviated(&entry.command_id.simple().to_string()),
            entry.details.clone(),
        ]);
    }
    out!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_that_reports_no_width_gets_rows_as_wide_as_they_need() {
        assert!(matches!(arrangement_for(Some(0)), ContentArrangement::Disabled));
        assert!(matches!(
            arrangement_for(Some(NARROWEST_TERMINAL - 1)),
            ContentArrangement::Disabled
        ));
        assert!(matches!(
            arrangement_for(Some(NARROWEST_TERMINAL)),
            ContentArrangement::Dynamic
        ));
        assert!(matches!(arrangement_for(Some(120)), ContentArrangement::Dynamic));
        assert!(matches!(arrangement_for(None), ContentArrangement::Dynamic));
    }
}
