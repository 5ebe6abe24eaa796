//! The analysts' query: every filter agrees with brute-force filtering of
//! the same log, and scans hold one page at a time.

use std::ops::ControlFlow;
use std::sync::Arc;

use chrono::{Duration, TimeZone, Utc};
use proptest::prelude::*;
use triage_domain::{Agent, CommandRejected, EventMetadata, Role, TicketId};
use triage_event_store::{
    EventData, EventStore, ExpectedRevision, InMemoryEventStore, Position, ReadAll, RecordedEvent, StreamName,
};
use triage_projections::query::EventQuery;
use uuid::Uuid;

const TYPES: [&str; 4] = ["TicketOpened", "TicketClassified", "DraftSubmitted", "CommandRejected"];
const AGENTS: [&str; 3] = ["a-1", "a-2", "a-3"];
const ROLES: [Role; 3] = [Role::Classifier, Role::Drafter, Role::Operator];

fn tickets() -> Vec<TicketId> {
    (1..=3).map(|n| TicketId(Uuid::from_u128(n))).collect()
}

fn commands() -> Vec<Uuid> {
    (100..104).map(Uuid::from_u128).collect()
}

/// One random write: (ticket, rejection stream?, type, agent, role, command, minute).
type Write = (usize, bool, usize, usize, usize, usize, i64);

fn write() -> impl Strategy<Value = Write> {
    (
        0..3usize,
        any::<bool>(),
        0..TYPES.len(),
        0..AGENTS.len(),
        0..ROLES.len(),
        0..4usize,
        0..120i64,
    )
}

async fn store_with(writes: &[Write]) -> Arc<InMemoryEventStore> {
    let store = Arc::new(InMemoryEventStore::new());
    let base = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
    for &(ticket, rejection, kind, agent, role, command, minute) in writes {
        let ticket = tickets()[ticket];
        let stream = if rejection {
            CommandRejected::stream_name(ticket)
        } else {
            ticket.stream_name()
        };
        let command_id = commands()[command];
        let metadata = EventMetadata {
            schema_version: 1,
            command_id,
            correlation_id: commands()[(command + 1) % 4],
            causation_id: command_id,
            agent: Agent::new(AGENTS[agent], ROLES[role]),
            traceparent: None,
            recorded_at: base + Duration::minutes(minute),
            decided_at_revision: None,
            sender_saw_revision: None,
            command_digest: None,
        };
        let event = EventData {
            id: Uuid::new_v4(),
            event_type: TYPES[kind].to_owned(),
            data: b"{}".to_vec(),
            metadata: metadata.encode(),
        };
        store
            .append(&StreamName::new(stream).unwrap(), ExpectedRevision::Any, vec![event])
            .await
            .unwrap();
    }
    store
}

/// How often each filter is set.
const SET: f64 = 0.2;

/// A random query: each filter set or not, a fifth of the time each, so
/// that a query usually sets a few filters and still matches something.
fn query() -> impl Strategy<Value = EventQuery> {
    (
        proptest::option::weighted(SET, 0..3usize),
        proptest::option::weighted(SET, (0..3usize, any::<bool>())),
        // Two types a third of the time, else none.
        proptest::collection::vec(0..TYPES.len(), 0..3).prop_map(|types| if types.len() > 1 { types } else { vec![] }),
        proptest::option::weighted(SET, 0..AGENTS.len()),
        proptest::option::weighted(SET, 0..ROLES.len()),
        proptest::option::weighted(SET, 0..4usize),
        proptest::option::weighted(SET, 0..4usize),
        proptest::option::weighted(SET, 0..120i64),
        proptest::option::weighted(SET, 0..120i64),
        proptest::option::weighted(SET, 1..40u64),
        proptest::option::weighted(SET, 1..40u64),
    )
        .prop_map(
            |(ticket, stream, types, agent, role, command, correlation, since, until, from, to)| {
                let base = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
                EventQuery {
                    ticket: ticket.map(|t| tickets()[t]),
                    stream: stream.map(|(t, rejection)| {
                        if rejection {
                            CommandRejected::stream_name(tickets()[t])
                        } else {
                            tickets()[t].stream_name()
                        }
                    }),
                    event_types: types.into_iter().map(|t| TYPES[t].to_owned()).collect(),
                    agent: agent.map(|a| AGENTS[a].to_owned()),
                    role: role.map(|r| ROLES[r]),
                    command_id: command.map(|c| commands()[c]),
                    correlation_id: correlation.map(|c| commands()[c]),
                    since: since.map(|m| base + Duration::minutes(m)),
                    until: until.map(|m| base + Duration::minutes(m)),
                    from_position: from.map(Position::from_sequence),
                    to_position: to.map(Position::from_sequence),
                }
            },
        )
}

/// The same filters, written out the long way over decoded fields.
fn brute_force(query: &EventQuery, record: &RecordedEvent) -> bool {
    let metadata = EventMetadata::decode(&record.metadata).unwrap();
    let stream = record.stream.as_str();
    let ticket_ok = query
        .ticket
        .is_none_or(|ticket| stream == ticket.stream_name() || stream == CommandRejected::stream_name(ticket));
    ticket_ok
        && query.stream.as_deref().is_none_or(|s| s == stream)
        && (query.event_types.is_empty() || query.event_types.contains(&record.event_type))
        && query.agent.as_deref().is_none_or(|a| a == metadata.agent.id)
        && query.role.is_none_or(|r| r == metadata.agent.role)
        && query.command_id.is_none_or(|c| c == metadata.command_id)
        && query.correlation_id.is_none_or(|c| c == metadata.correlation_id)
        && query.since.is_none_or(|t| metadata.recorded_at >= t)
        && query.until.is_none_or(|t| metadata.recorded_at < t)
        && query.from_position.is_none_or(|p| record.position >= p)
        && query.to_position.is_none_or(|p| record.position <= p)
}

/// What the scan finds and what brute force finds, in log order.
fn scan_and_brute_force(writes: &[Write], query: &EventQuery, page: usize) -> (Vec<Uuid>, Vec<Uuid>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = store_with(writes).await;
        let mut scanned = Vec::new();
        query
            .scan(store.as_ref(), page, |record| {
                scanned.push(record.id);
                ControlFlow::Continue(())
            })
            .await
            .unwrap();
        let all = store.read_all(ReadAll::forwards(usize::MAX)).await.unwrap();
        let expected: Vec<Uuid> = all.iter().filter(|r| brute_force(query, r)).map(|r| r.id).collect();
        (scanned, expected)
    })
}

fn cases() -> impl Strategy<Value = (Vec<Write>, EventQuery, usize)> {
    (proptest::collection::vec(write(), 0..40), query(), 1..7usize)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn every_filter_agrees_with_brute_force((writes, query, page) in cases()) {
        let (scanned, expected) = scan_and_brute_force(&writes, &query, page);
        prop_assert_eq!(scanned, expected);
    }
}

/// The property above says little if its queries match nothing: most of
/// its cases must find events, and each filter must be set in cases that
/// still find some.
#[test]
fn the_random_queries_match_events_and_exercise_every_filter() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = cases();
    let mut matching = 0;
    let mut filters_seen_matching = std::collections::BTreeSet::new();
    const CASES: usize = 96;
    for _ in 0..CASES {
        let (writes, query, page) = strategy.new_tree(&mut runner).unwrap().current();
        let (scanned, expected) = scan_and_brute_force(&writes, &query, page);
        assert_eq!(scanned, expected);
        if expected.is_empty() {
            continue;
        }
        matching += 1;
        let set = [
            ("ticket", query.ticket.is_some()),
            ("stream", query.stream.is_some()),
            ("event_types", !query.event_types.is_empty()),
            ("agent", query.agent.is_some()),
            ("role", query.role.is_some()),
            ("command_id", query.command_id.is_some()),
            ("correlation_id", query.correlation_id.is_some()),
            ("since", query.since.is_some()),
            ("until", query.until.is_some()),
            ("from_position", query.from_position.is_some()),
            ("to_position", query.to_position.is_some()),
        ];
        filters_seen_matching.extend(set.iter().filter(|(_, set)| *set).map(|(name, _)| *name));
    }
    assert!(
        matching * 2 >= CASES,
        "only {matching} of {CASES} queries matched an event"
    );
    assert_eq!(
        filters_seen_matching.len(),
        11,
        "filters set in matching queries: {filters_seen_matching:?}"
    );
}

#[tokio::test]
async fn a_scan_stops_when_the_sink_says_so() {
    let writes: Vec<Write> = (0..30).map(|n| (n % 3, false, 0, 0, 0, 0, n as i64)).collect();
    let store = store_with(&writes).await;
    let mut seen = 0;
    let last = EventQuery::default()
        .scan(store.as_ref(), 4, |_| {
            seen += 1;
            if seen == 5 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .await
        .unwrap();
    assert_eq!(seen, 5);
    assert_eq!(last, Some(Position::from_sequence(5)));
}
