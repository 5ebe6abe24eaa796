//! The auditor: checks a design's write log against what its writers were
//! told, trusting neither.
//!
//! It is the same function for Triage and for the naive baseline; only the
//! source of the log differs. For Triage the log is the event store itself
//! (read back through `$all`, or only the run's own ticket streams); for the
//! naive design it is the sequence of writes to the shared records.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::Arc;

use serde::Serialize;
use triage_command_handler::decode_recorded;
use triage_domain::audit::audit_history;
use triage_domain::{Event, EventMetadata, TicketId, event_id};
use triage_event_store::{EventStore, ReadStream, RecordedEvent, StreamName};
use triage_projections::query::EventQuery;
use uuid::Uuid;

/// One write as it stands in a log.
#[derive(Clone, Debug, PartialEq)]
pub struct LoggedEvent {
    /// The event id.
    pub id: Uuid,
    /// What happened.
    pub event: Event,
    /// Who did it, under which command, when.
    pub metadata: EventMetadata,
    /// How many of the ticket's earlier events the writer had seen when it
    /// decided. In an event store with expected revisions this is always the
    /// event's own index; a writer that saw fewer overwrote what it did not
    /// see.
    pub seen: u64,
}

/// What a writer was told: its command was accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acknowledged {
    /// The ticket.
    pub ticket_id: TicketId,
    /// The command.
    pub command_id: Uuid,
    /// How many events it produced.
    pub events: usize,
}

/// The auditor's findings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Audit {
    /// Tickets audited.
    pub tickets: usize,
    /// Events in the log.
    pub events: usize,
    /// Acknowledged updates that a later write overwrote without having
    /// seen them.
    pub lost_updates: usize,
    /// Steps that are not a path through the transition table, or break a
    /// claim rule.
    pub invalid_transitions: usize,
    /// Event ids stored more than once.
    pub duplicate_events: usize,
    /// Acknowledged commands whose events are not all in the log.
    pub missing_events: usize,
    /// The first findings, in words.
    pub findings: Vec<String>,
}

impl Audit {
    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.lost_updates == 0
            && self.invalid_transitions == 0
            && self.duplicate_events == 0
            && self.missing_events == 0
    }

    fn note(&mut self, finding: String) {
        if self.findings.len() < 20 {
            self.findings.push(finding);
        }
    }
}

/// Audits per-ticket logs (each in write order) against acknowledgements.
pub fn audit(logs: &BTreeMap<TicketId, Vec<LoggedEvent>>, acknowledged: &[Acknowledged]) -> Audit {
    let mut audit = Audit {
        tickets: logs.len(),
        ..Audit::default()
    };
    let mut seen_ids: HashSet<Uuid> = HashSet::new();
    for (ticket, log) in logs {
        audit.events += log.len();
        for logged in log {
            if !seen_ids.insert(logged.id) {
                audit.duplicate_events += 1;
                audit.note(format!(
                    "ticket {ticket}: event {} ({}) stored more than once",
                    logged.id,
                    logged.event.event_type()
                ));
            }
        }
        let pairs: Vec<(Event, EventMetadata)> = log
            .iter()
            .map(|logged| (logged.event.clone(), logged.metadata.clone()))
            .collect();
        for violation in audit_history(&pairs) {
            audit.invalid_transitions += 1;
            audit.note(format!("ticket {ticket}: {violation}"));
        }
        // Lost updates: a write that had seen fewer events than stood before
        // it overwrote the commands behind the ones it did not see.
        let mut lost: HashSet<Uuid> = HashSet::new();
        for (index, logged) in log.iter().enumerate() {
            let first_of_command = index == 0 || log[index - 1].metadata.command_id != logged.metadata.command_id;
            if !first_of_command || logged.seen >= index as u64 {
                continue;
            }
            for unseen in &log[logged.seen as usize..index] {
                if unseen.metadata.command_id != logged.metadata.command_id && lost.insert(unseen.metadata.command_id) {
                    audit.note(format!(
                        "ticket {ticket}: {} by {} was overwritten by {} by {}, which never saw it",
                        unseen.event.event_type(),
                        unseen.metadata.agent.id,
                        logged.event.event_type(),
                        logged.metadata.agent.id
                    ));
                }
            }
        }
        audit.lost_updates += lost.len();
    }
    let stored: HashMap<Uuid, TicketId> = logs
        .iter()
        .flat_map(|(ticket, log)| log.iter().map(move |logged| (logged.id, *ticket)))
        .collect();
    let mut checked = HashSet::new();
    for ack in acknowledged {
        if !checked.insert(ack.command_id) {
            continue;
        }
        let complete =
            (0..ack.events as u32).all(|index| stored.get(&event_id(ack.command_id, index)) == Some(&ack.ticket_id));
        if !complete {
            audit.missing_events += 1;
            audit.note(format!(
                "ticket {}: acknowledged command {} is missing from the log",
                ack.ticket_id, ack.command_id
            ));
        }
    }
    audit
}

/// Reads every ticket stream of an event store, in revision order, with
/// what each writer had seen taken from the event metadata.
pub async fn logs_from_store(
    store: &dyn EventStore,
) -> Result<BTreeMap<TicketId, Vec<LoggedEvent>>, triage_event_store::Error> {
    let mut logs: BTreeMap<TicketId, Vec<(u64, LoggedEvent)>> = BTreeMap::new();
    let mut failure = None;
    EventQuery::default()
        .scan(store, 2048, |record| {
            let Some(ticket) = TicketId::from_stream_name(record.stream.as_str()) else {
                return ControlFlow::Continue(());
            };
            match logged(record) {
                Ok(event) => {
                    logs.entry(ticket).or_default().push((record.revision, event));
                    ControlFlow::Continue(())
                }
                Err(error) => {
                    failure = Some(error);
                    ControlFlow::Break(())
                }
            }
        })
        .await?;
    if let Some(error) = failure {
        return Err(error);
    }
    Ok(logs
        .into_iter()
        .map(|(ticket, mut log)| {
            log.sort_by_key(|(revision, _)| *revision);
            (ticket, log.into_iter().map(|(_, logged)| logged).collect())
        })
        .collect())
}

/// Streams read at once by [`logs_of_tickets`].
const CONCURRENT_STREAM_READS: usize = 16;

/// Reads the streams of `tickets` only, as [`logs_from_store`] reads every
/// one: auditing one run in a store that also holds other tickets then
/// costs what the run wrote, not what the store holds. A ticket without a
/// stream has no log (the auditor reports its acknowledged events as
/// missing).
pub async fn logs_of_tickets(
    store: Arc<dyn EventStore>,
    tickets: &[TicketId],
) -> Result<BTreeMap<TicketId, Vec<LoggedEvent>>, triage_event_store::Error> {
    let read = |ticket: TicketId| {
        let store = Arc::clone(&store);
        async move {
            let stream = StreamName::new(ticket.stream_name())?;
            match store.read_stream(&stream, ReadStream::forwards()).await {
                // Read oldest first: already in revision order.
                Ok(records) => Ok((ticket, records.iter().map(logged).collect::<Result<Vec<_>, _>>()?)),
                Err(triage_event_store::Error::StreamNotFound { .. }) => Ok((ticket, Vec::new())),
                Err(error) => Err(error),
            }
        }
    };
    let mut logs = BTreeMap::new();
    let mut reads = tokio::task::JoinSet::new();
    let mut pending = tickets.iter().copied();
    loop {
        while reads.len() < CONCURRENT_STREAM_READS
            && let Some(ticket) = pending.next()
        {
            reads.spawn(read(ticket));
        }
        let Some(done) = reads.join_next().await else {
            break;
        };
        let (ticket, log) = done.map_err(|error| triage_event_store::Error::Backend {
            message: format!("a stream read panicked: {error}"),
            source: None,
        })??;
        if !log.is_empty() {
            logs.insert(ticket, log);
        }
    }
    Ok(logs)
}

/// One record of a ticket stream as the auditor reads it.
fn logged(record: &RecordedEvent) -> Result<LoggedEvent, triage_event_store::Error> {
    let (event, metadata) = decode_recorded(record).map_err(|error| triage_event_store::Error::Backend {
        message: format!("cannot decode {} at {}: {error}", record.event_type, record.position),
        source: None,
    })?;
    Ok(LoggedEvent {
        id: record.id,
        seen: seen_by_writers(record.revision, &metadata),
        event,
        metadata,
    })
}

/// How many of the ticket's earlier events the writers of the event at
/// `revision` had seen: the handler, by the revision it decided on, and the
/// sender, by the revision it said it decided on. The lower counts: a
/// handler that appended over a revision its sender never saw lost an
/// update just the same, and the log, not the handler, must show it did not.
/// (Metadata written before the handler recorded its revision says nothing;
/// the append's expected revision then vouches for the event's own.)
fn seen_by_writers(revision: u64, metadata: &EventMetadata) -> u64 {
    let handler = match metadata.decided_at_revision {
        Some(decided) => decided.saturating_add(1),
        None if revision == 0 => 0,
        None => revision,
    };
    match metadata.sender_saw_revision {
        Some(sender) => handler.min(sender.saturating_add(1)),
        None => handler,
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use triage_domain::{Agent, Claim, Priority, Role};

    use super::*;

    fn logged(command: u128, index: u32, event: Event, role: Role, agent: &str, seen: u64) -> LoggedEvent {
        let command_id = Uuid::from_u128(command);
        LoggedEvent {
            id: event_id(command_id, index),
            event,
            metadata: EventMetadata {
                schema_version: 1,
                command_id,
                correlation_id: command_id,
                causation_id: command_id,
                agent: Agent::new(agent, role),
                traceparent: None,
                recorded_at: Utc.with_ymd_and_hms(2026, 5, 1, 10, 0, command as u32 % 50).unwrap(),
                decided_at_revision: None,
                sender_saw_revision: None,
                command_digest: None,
            },
            seen,
        }
    }

    fn ticket() -> TicketId {
        TicketId(Uuid::from_u128(77))
    }

    fn clean_log() -> Vec<LoggedEvent> {
        let lease = Utc.with_ymd_and_hms(2026, 5, 1, 11, 0, 0).unwrap();
        vec![
            logged(
                1,
                0,
                Event::TicketOpened {
                    ticket_id: ticket(),
                    subject: "s".into(),
                    body: "b".into(),
                    customer: None,
                },
                Role::Intake,
                "intake",
                0,
            ),
            logged(
                2,
                0,
                Event::ClassificationStarted {
                    claim: Claim {
                        claim_id: Uuid::from_u128(2),
                        agent_id: "c1".into(),
                        lease_expires_at: lease,
                    },
                },
                Role::Classifier,
                "c1",
                1,
            ),
            logged(
                3,
                0,
                Event::TicketClassified {
                    claim_id: Uuid::from_u128(2),
                    category: "bug".into(),
                    priority: Priority::Low,
                    confidence: 0.5,
                },
                Role::Classifier,
                "c1",
                2,
            ),
        ]
    }

    fn acks() -> Vec<Acknowledged> {
        (1..=3)
            .map(|command| Acknowledged {
                ticket_id: ticket(),
                command_id: Uuid::from_u128(command),
                events: 1,
            })
            .collect()
    }

    #[test]
    fn a_clean_log_passes() {
        let logs = BTreeMap::from([(ticket(), clean_log())]);
        let audit = audit(&logs, &acks());
        assert!(audit.passed(), "{audit:?}");
        assert_eq!((audit.tickets, audit.events), (1, 3));
    }

    #[test]
    fn an_injected_invalid_transition_is_reported() {
        let mut log = clean_log();
        // A draft for a ticket that is only being classified.
        log.insert(
            2,
            logged(
                9,
                0,
                Event::DraftSubmitted {
                    claim_id: Uuid::from_u128(2),
                    body: "draft".into(),
                },
                Role::Drafter,
                "d1",
                2,
            ),
        );
        for (index, entry) in log.iter_mut().enumerate() {
            entry.seen = index as u64;
        }
        let audit = audit(&BTreeMap::from([(ticket(), log)]), &acks());
        assert!(audit.invalid_transitions >= 1, "{audit:?}");
        assert!(!audit.passed());
        assert!(
            audit.findings.iter().any(|f| f.contains("not in the transition table")),
            "{audit:?}"
        );
    }

    #[test]
    fn a_dropped_acknowledged_event_is_reported() {
        let mut log = clean_log();
        log.pop();
        let audit = audit(&BTreeMap::from([(ticket(), log)]), &acks());
        assert_eq!(audit.missing_events, 1, "{audit:?}");
        assert!(audit.findings[0].contains("missing from the log"));
    }

    #[test]
    fn a_duplicated_event_is_reported() {
        let mut log = clean_log();
        let mut again = log[2].clone();
        again.seen = 3;
        log.push(again);
        let audit = audit(&BTreeMap::from([(ticket(), log)]), &acks());
        assert_eq!(audit.duplicate_events, 1, "{audit:?}");
        assert!(!audit.passed());
    }

    #[test]
    fn an_overwrite_of_unseen_writes_is_a_lost_update() {
        let mut log = clean_log();
        // The classification was decided having seen only the opening: it
        // overwrote the claim it never saw.
        log[2].seen = 1;
        let audit = audit(&BTreeMap::from([(ticket(), log)]), &acks());
        assert_eq!(audit.lost_updates, 1, "{audit:?}");
        assert!(audit.findings.iter().any(|f| f.contains("never saw it")), "{audit:?}");
    }

    #[test]
    fn a_sender_that_saw_less_than_the_handler_counts() {
        let mut metadata = logged(1, 0, clean_log()[0].event.clone(), Role::Classifier, "c1", 0).metadata;
        metadata.decided_at_revision = Some(4);
        assert_eq!(seen_by_writers(5, &metadata), 5, "the handler decided on revision 4");
        metadata.sender_saw_revision = Some(4);
        assert_eq!(seen_by_writers(5, &metadata), 5, "both saw revision 4");
        // A handler that ignored a stale at_revision: the sender saw only
        // revisions 0 to 2, so revisions 3 and 4 were overwritten unseen.
        metadata.sender_saw_revision = Some(2);
        assert_eq!(seen_by_writers(5, &metadata), 3);
        let mut log = clean_log();
        log[2].seen = seen_by_writers(2, &{
            let mut stale = log[2].metadata.clone();
            stale.decided_at_revision = Some(1);
            stale.sender_saw_revision = Some(0);
            stale
        });
        let audit = audit(&BTreeMap::from([(ticket(), log)]), &acks());
        assert_eq!(audit.lost_updates, 1, "{audit:?}");
        // Metadata from before either field: the event's own revision.
        let old = logged(1, 0, clean_log()[0].event.clone(), Role::Intake, "i", 0).metadata;
        assert_eq!((seen_by_writers(0, &old), seen_by_writers(7, &old)), (0, 7));
    }
}
