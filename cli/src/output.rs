//! Printing: tables for people, JSON for programs.

use std::io::Write as _;

use chrono::SecondsFormat;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
use serde_json::{Value, json};
use triage_command_handler::LoadedTicket;
use triage_domain::{ClaimRule, Event, Guard, TRANSITIONS, TicketId, mermaid};

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    table
}

/// Prints one JSON value on one line.
pub(crate) fn print_json(value: &Value) {
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`triage … | head`) is not an error worth a panic.
    let _ = writeln!(stdout, "{value}");
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
        print!("{}", mermaid());
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
    println!("{out}");
}

/// The JSON form of `triage ticket show`.
pub(crate) fn ticket_json(id: TicketId, loaded: &LoadedTicket) -> Value {
    let ticket = &loaded.ticket;
    json!({
        "id": id,
        "state": ticket.state,
        "revision": loaded.revision,
        "subject": ticket.subject,
        "body": ticket.body,
        "customer": ticket.customer,
        "classification": ticket.classification,
        "draft": ticket.draft,
        "claim": ticket.claim,
        "attempts": ticket.attempts,
        "resolution": ticket.resolution,
        "last_reason": ticket.last_reason,
        "opened_at": loaded.history.first().map(|stored| stored.metadata.recorded_at),
        "updated_at": loaded.history.last().map(|stored| stored.metadata.recorded_at),
    })
}

/// `triage ticket show`.
pub(crate) fn print_ticket(id: TicketId, loaded: &LoadedTicket) {
    let ticket = &loaded.ticket;
    let mut out = table(&["Field", "Value"]);
    let mut row = |field: &str, value: String| {
        out.add_row(vec![field.to_owned(), value]);
    };
    row("id", id.to_string());
    row("state", ticket.state.map_or_else(String::new, |s| s.to_string()));
    row("revision", loaded.revision.map_or_else(String::new, |r| r.to_string()));
    row("subject", ticket.subject.clone());
    row("customer", ticket.customer.clone().unwrap_or_default());
    row("body", ticket.body.clone());
    if let Some(classification) = &ticket.classification {
        row(
            "classification",
            format!(
                "{} / {} (confidence {:.2})",
                classification.category, classification.priority, classification.confidence
            ),
        );
    }
    if let Some(draft) = &ticket.draft {
        row("draft", draft.clone());
    }
    if let Some(claim) = &ticket.claim {
        row(
            "claim",
            format!(
                "{} by {}, lease until {}",
                claim.claim_id,
                claim.agent_id,
                claim.lease_expires_at.to_rfc3339_opts(SecondsFormat::Secs, true)
            ),
        );
    }
    row("failed attempts", ticket.attempts.to_string());
    if let Some(resolution) = &ticket.resolution {
        row("resolution", resolution.clone());
    }
    if let Some(reason) = &ticket.last_reason {
        row("last reason", reason.clone());
    }
    if let (Some(first), Some(last)) = (loaded.history.first(), loaded.history.last()) {
        row(
            "opened",
            first.metadata.recorded_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        );
        row(
            "updated",
            last.metadata.recorded_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        );
    }
    println!("{out}");
}

/// A one-line summary of an event's payload.
fn summarize(event: &Event) -> String {
    let short = |id: &uuid::Uuid| id.simple().to_string()[..8].to_owned();
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

/// `triage ticket history`.
pub(crate) fn print_history(loaded: &LoadedTicket, as_json: bool) {
    if as_json {
        for stored in &loaded.history {
            print_json(&json!({
                "revision": stored.revision,
                "position": stored.position,
                "id": stored.id,
                "type": stored.event.event_type(),
                "recorded_at": stored.metadata.recorded_at,
                "agent": stored.metadata.agent,
                "command_id": stored.metadata.command_id,
                "correlation_id": stored.metadata.correlation_id,
                "causation_id": stored.metadata.causation_id,
                "data": stored.event,
            }));
        }
        return;
    }
    let mut out = table(&["Rev", "Recorded", "Event", "Agent", "Command", "Details"]);
    for stored in &loaded.history {
        out.add_row(vec![
            stored.revision.to_string(),
            stored.metadata.recorded_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            stored.event.event_type().to_owned(),
            format!("{} ({})", stored.metadata.agent.id, stored.metadata.agent.role),
            stored.metadata.command_id.simple().to_string()[..8].to_owned(),
            summarize(&stored.event),
        ]);
    }
    println!("{out}");
}
