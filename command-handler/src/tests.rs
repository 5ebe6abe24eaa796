use std::sync::Arc;

use chrono::{Duration, TimeZone, Utc};
use triage_domain::{Agent, Command, CommandEnvelope, CommandKind, Priority, Rejection, Role, State, TicketId};
use triage_event_store::testing::CountingStore;
use triage_event_store::{EventData, EventStore, ExpectedRevision, InMemoryEventStore, ReadStream, StreamName};
use uuid::Uuid;

use super::*;

struct Fixture {
    store: Arc<InMemoryEventStore>,
    clock: Arc<ManualClock>,
    handler: CommandHandler,
}

fn fixture() -> Fixture {
    let store = Arc::new(InMemoryEventStore::new());
    let clock = Arc::new(ManualClock::new(Utc.with_ymd_and_hms(2026, 2, 1, 8, 0, 0).unwrap()));
    let handler = CommandHandler::new(store.clone()).with_clock(clock.clone());
    Fixture { store, clock, handler }
}

/// Waits until `count` commands hold or wait for `ticket`'s turn.
async fn until_queued(handler: &CommandHandler, ticket: TicketId, count: usize) {
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while handler.turns.queued(ticket) < count {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the commands queue for the turn");
}

fn intake() -> Agent {
    Agent::new("intake-1", Role::Intake)
}

fn classifier(n: u32) -> Agent {
    Agent::new(format!("classifier-{n}"), Role::Classifier)
}

/// A draft for a ticket that was never classified: refused.
fn draft_too_early(ticket: TicketId) -> CommandEnvelope {
    CommandEnvelope::new(
        ticket,
        Agent::new("drafter-1", Role::Drafter),
        Command::SubmitDraft {
            claim_id: Uuid::new_v4(),
            body: "too early".into(),
        },
    )
}

async fn open(handler: &CommandHandler) -> TicketId {
    let accepted = handler
        .handle(open_ticket(intake(), "Charged twice", "Twice in March.", None))
        .await
        .unwrap();
    assert_eq!(accepted.revision, 0);
    accepted.ticket_id
}

fn start(ticket: TicketId, agent: Agent) -> CommandEnvelope {
    CommandEnvelope::new(ticket, agent, Command::StartClassification { lease_secs: Some(30) })
}

fn classify(ticket: TicketId, agent: Agent, claim_id: Uuid) -> CommandEnvelope {
    CommandEnvelope::new(
        ticket,
        agent,
        Command::Classify {
            claim_id,
            category: "billing".into(),
            priority: Priority::High,
            confidence: 0.9,
        },
    )
}

async fn stored(store: &InMemoryEventStore, ticket: TicketId) -> Vec<triage_event_store::RecordedEvent> {
    let stream = StreamName::new(ticket.stream_name()).unwrap();
    store.read_stream(&stream, ReadStream::forwards()).await.unwrap()
}

#[tokio::test]
async fn an_accepted_command_is_stored_with_deterministic_ids_and_metadata() {
    let f = fixture();
    let ticket = open(&f.handler).await;
    let mut envelope = start(ticket, classifier(1)).at_revision(0);
    envelope.correlation_id = Some(Uuid::from_u128(5));
    envelope.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    let accepted = f.handler.handle(envelope.clone()).await.unwrap();
    assert_eq!(accepted.revision, 1);
    assert_eq!(accepted.state, State::Classifying);
    assert!(!accepted.duplicate);
    let records = stored(&f.store, ticket).await;
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].id, event_id(envelope.command_id, 0));
    assert_eq!(records[1].event_type, "ClassificationStarted");
    let (_, metadata) = decode_recorded(&records[1]).unwrap();
    assert_eq!(metadata.command_id, envelope.command_id);
    assert_eq!(metadata.correlation_id, Uuid::from_u128(5));
    assert_eq!(metadata.causation_id, envelope.command_id);
    assert_eq!(metadata.agent, classifier(1));
    assert_eq!(metadata.traceparent, envelope.traceparent);
    assert_eq!(metadata.recorded_at, f.clock.now());
    assert_eq!(f.handler.stats().accepted, 2);
}

#[tokio::test]
async fn a_retried_command_id_returns_the_original_outcome_and_writes_nothing() {
    let f = fixture();
    let ticket = open(&f.handler).await;
    let envelope = start(ticket, classifier(1)).at_revision(0);
    let original = f.handler.handle(envelope.clone()).await.unwrap();
    let claim_id = envelope.command_id;
    // The ticket moves on before the retry arrives.
    f.handler
        .handle(classify(ticket, classifier(1), claim_id))
        .await
        .unwrap();
    f.clock.advance(Duration::seconds(5));
    let retry = f.handler.handle(envelope).await.unwrap();
    assert!(retry.duplicate);
    assert_eq!(
        (retry.revision, retry.position, retry.state, &retry.events),
        (original.revision, original.position, original.state, &original.events)
    );
    assert_eq!(stored(&f.store, ticket).await.len(), 3, "the retry wrote nothing");
    assert_eq!(f.handler.stats().duplicates, 1);
}

/// Copies of one command sent to two handlers (separate caches, one store),
/// the second copy getting in while the first is on its way to the store:
/// the store's idempotent append, not a cache, makes the first a no-op,
/// and both report what is stored.
#[tokio::test]
async fn racing_copies_of_one_command_store_its_events_once() {
    let memory = Arc::new(InMemoryEventStore::new());
    let store = Arc::new(CountingStore::new(memory.clone()));
    let first = CommandHandler::new(store.clone() as Arc<dyn EventStore>);
    let second = CommandHandler::new(store.clone() as Arc<dyn EventStore>);
    let ticket = open(&first).await;
    let envelope = start(ticket, classifier(1));
    let copy = envelope.clone();
    let other = second.clone();
    store.before_next_append(async move {
        let accepted = other.handle(copy).await.unwrap();
        assert!(!accepted.duplicate, "the copy that got in first wrote");
    });
    let late = first.handle(envelope).await.unwrap();
    assert!(late.duplicate, "the copy that arrived second wrote nothing: {late:?}");
    assert_eq!((late.revision, late.state), (1, State::Classifying));
    let events = stored(&memory, ticket).await;
    assert_eq!(events.len(), 2, "the claim is stored once");
    let types: Vec<&str> = late.events.iter().map(Event::event_type).collect();
    assert_eq!(
        types,
        [events[1].event_type.as_str()],
        "the late copy reports what is stored"
    );
    assert_eq!(first.stats().duplicates, 1);
    assert_eq!(second.stats().accepted, 1);
}

/// Many copies at once on a multi-threaded runtime: still one write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_copies_of_one_command_store_its_events_once() {
    let f = fixture();
    let ticket = open(&f.handler).await;
    let envelope = start(ticket, classifier(1));
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let handler = CommandHandler::new(f.store.clone() as Arc<dyn EventStore>);
        let (envelope, barrier) = (envelope.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            handler.handle(envelope).await
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap().unwrap());
    }
    assert!(
        outcomes
            .iter()
            .all(|o| o.revision == 1 && o.state == State::Classifying)
    );
    assert_eq!(
        outcomes.iter().filter(|o| !o.duplicate).count(),
        1,
        "exactly one copy wrote"
    );
    assert!(
        outcomes.iter().all(|o| o.events == outcomes[0].events),
        "every copy reports what is stored"
    );
    assert_eq!(stored(&f.store, ticket).await.len(), 2);
}

#[tokio::test]
async fn a_stale_decided_on_revision_is_rejected_with_the_current_state() {
    let f = fixture();
    let ticket = open(&f.handler).await;
    f.handler.handle(start(ticket, classifier(1))).await.unwrap();
    let result = f.handler.handle(start(ticket, classifier(2)).at_revision(0)).await;
    match result {
        Err(CommandError::StaleRevision {
            expected,
            actual,
            state,
            ..
        }) => {
            assert_eq!(expected, 0);
            assert_eq!(actual, Some(1));
            assert_eq!(state, Some(State::Classifying));
        }
        other => panic!("expected StaleRevision, got {other:?}"),
    }
    assert_eq!(stored(&f.store, ticket).await.len(), 2, "nothing was written");
    assert_eq!(f.handler.stats().stale_revisions, 1);
}

#[tokio::test]
async fn a_rejection_carries_the_current_state_and_revision() {
    let f = fixture();
    let ticket = open(&f.handler).await;
    let drafter = Agent::new("drafter-1", Role::Drafter);
    let result = f
        .handler
        .handle(CommandEnvelope::new(
            ticket,
            drafter,
            Command::SubmitDraft {
                claim_id: Uuid::new_v4(),
                body: "Refund on its way".into(),
            },
        ))
        .await;
    match result {
        Err(CommandError::Rejected {
            rejection,
            state,
            revision,
            ..
        }) => {
            assert_eq!(
                rejection,
                Rejection::InvalidTransition {
                    from: State::New,
                    command: CommandKind::SubmitDraft
                }
            );
            assert_eq!((state, revision), (Some(State::New), Some(0)));
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(stored(&f.store, ticket).await.len(), 1);
}

#[tokio::test]
async fn an_unknown_ticket_is_not_found_and_nothing_is_written() {
    let f = fixture();
    let ticket = TicketId::new();
    let result = f.handler.handle(start(ticket, classifier(1))).await;
    assert!(matches!(
        result,
        Err(CommandError::Rejected {
            rejection: Rejection::TicketNotFound,
            state: None,
            revision: None,
            ..
        })
    ));
    assert_eq!(f.store.head_position().await.unwrap(), None);
}

/// A command without a decided-on revision that loses its append to
/// another handler's is decided again on the state the store reports, and
/// refused by the table (the ticket is claimed now), not by a raw store
/// conflict.
#[tokio::test]
async fn conflicts_without_a_decided_on_revision_are_decided_again() {
    let memory = Arc::new(InMemoryEventStore::new());
    let store = Arc::new(CountingStore::new(memory.clone()));
    let handler = CommandHandler::new(store.clone() as Arc<dyn EventStore>);
    let other = CommandHandler::new(store.clone() as Arc<dyn EventStore>);
    let ticket = open(&handler).await;
    store.before_next_append(async move {
        other.handle(start(ticket, classifier(2))).await.unwrap();
    });
    // The claim was decided on revision 0 and the other one got in before
    // its append: only deciding again, on revision 1, refuses it.
    match handler.handle(start(ticket, classifier(1))).await {
        Err(CommandError::Rejected {
            rejection,
            state,
            revision,
            ..
        }) => {
            assert_eq!((state, revision), (Some(State::Classifying), Some(1)));
            assert_eq!(rejection.code(), "invalid_transition");
        }
        other => panic!("expected the claim to be refused on fresh state, got {other:?}"),
    }
    assert_eq!(stored(&memory, ticket).await.len(), 2);
}

/// Sixteen claims at once on a multi-threaded runtime: one wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_without_a_decided_on_revision_leave_one_winner() {
    let f = fixture();
    let ticket = open(&f.handler).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for n in 0..16 {
        let handler = CommandHandler::new(f.store.clone() as Arc<dyn EventStore>);
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            handler.handle(start(ticket, classifier(n))).await
        }));
    }
    let mut winners = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(accepted) => {
                assert_eq!(accepted.state, State::Classifying);
                winners += 1;
            }
            Err(CommandError::Rejected { rejection, state, .. }) => {
                assert_eq!(state, Some(State::Classifying));
                assert_eq!(rejection.code(), "invalid_transition");
            }
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    assert_eq!(winners, 1);
    assert_eq!(stored(&f.store, ticket).await.len(), 2);
}

#[tokio::test]
async fn a_late_write_under_an_expired_lease_is_refused() {
    let f = fixture();
    let ticket = open(&f.handler).await;
    let claim = f.handler.handle(start(ticket, classifier(1))).await.unwrap();
    f.clock.advance(Duration::seconds(31));
    let result = f
        .handler
        .handle(classify(ticket, classifier(1), claim.command_id))
        .await;
    assert!(
        matches!(
            result,
            Err(CommandError::Rejected {
                rejection: Rejection::LeaseExpired { .. },
                ..
            })
        ),
        "{result:?}"
    );
    // The sweeper expires it; the late writer is then fenced as stale.
    let sweeper = Agent::new("sweeper", Role::System);
    f.handler
        .handle(CommandEnvelope::new(
            ticket,
            sweeper,
            Command::ExpireClaim {
                claim_id: claim.command_id,
            },
        ))
        .await
        .unwrap();
    let result = f
        .handler
        .handle(classify(ticket, classifier(1), claim.command_id))
        .await;
    assert!(matches!(result, Err(CommandError::Rejected { .. })), "{result:?}");
    // Sent with the revision it decided on (the claim's), as agents send
    // it, the late write is told its lease expired, not only that the
    // ticket moved on: it must not decide again under that claim. Through
    // a handler without a cache as well, which reads the ticket first.
    let uncached = CommandHandler::new(f.store.clone()).with_clock(f.clock.clone());
    for handler in [&f.handler, &uncached] {
        let result = handler
            .handle(classify(ticket, classifier(1), claim.command_id).at_revision(claim.revision))
            .await;
        assert!(
            matches!(
                result,
                Err(CommandError::Rejected {
                    rejection: Rejection::LeaseExpired { .. },
                    state: Some(State::New),
                    revision: Some(2),
                    ..
                })
            ),
            "{result:?}"
        );
    }
    // A decision on an old revision under the claim the ticket still has
    // is stale, as before.
    let again = f.handler.handle(start(ticket, classifier(1))).await.unwrap();
    let result = f
        .handler
        .handle(classify(ticket, classifier(1), again.command_id).at_revision(claim.revision))
        .await;
    assert!(matches!(result, Err(CommandError::StaleRevision { .. })), "{result:?}");
    assert_eq!(stored(&f.store, ticket).await.len(), 4);
}

#[tokio::test]
async fn a_command_id_reused_on_another_ticket_is_refused() {
    let f = fixture();
    let first = open(&f.handler).await;
    let second = open(&f.handler).await;
    let envelope = start(first, classifier(1));
    f.handler.handle(envelope.clone()).await.unwrap();
    let mut reused = start(second, classifier(1));
    reused.command_id = envelope.command_id;
    assert!(matches!(
        f.handler.handle(reused).await,
        Err(CommandError::CommandIdReused { .. })
    ));
    assert_eq!(stored(&f.store, second).await.len(), 1);
}

#[tokio::test]
async fn a_command_id_reused_for_another_command_on_the_ticket_is_refused() {
    let f = fixture();
    let ticket = open(&f.handler).await;
    // The lease is the policy's default.
    let claim = CommandEnvelope::new(ticket, classifier(1), Command::StartClassification { lease_secs: None });
    f.handler.handle(claim.clone()).await.unwrap();
    f.clock.advance(Duration::seconds(5));

    // Another command under the claim's id: not a retry, and nothing new.
    let mut other = classify(ticket, classifier(1), claim.command_id);
    other.command_id = claim.command_id;
    // The same command from another sender.
    let mut other_sender = start(ticket, classifier(2));
    other_sender.command_id = claim.command_id;
    for reused in [other, other_sender] {
        let fresh = CommandHandler::new(f.store.clone()).with_clock(f.clock.clone());
        for handler in [&f.handler, &fresh] {
            let result = handler.handle(reused.clone()).await;
            assert!(
                matches!(result, Err(CommandError::CommandIdReused { command_id }) if command_id == claim.command_id),
                "{reused:?}: {result:?}"
            );
        }
    }
    assert_eq!(stored(&f.store, ticket).await.len(), 2);

    // The real retry, later and through a handler whose default lease
    // differs, still gets the original outcome.
    let later = CommandHandler::new(f.store.clone())
        .with_clock(f.clock.clone())
        .with_policy(Policy {
            default_lease_secs: 600,
            ..Policy::default()
        });
    let retried = later.handle(claim).await.unwrap();
    assert!(retried.duplicate);
    assert_eq!(retried.revision, 1);
    assert_eq!(retried.state, State::Classifying);
}

#[tokio::test]
async fn a_retry_after_the_policy_changed_is_still_a_retry() {
    let f = fixture();
    let ticket = open(&f.handler).await;
    let claim = start(ticket, classifier(1));
    f.handler.handle(claim.clone()).await.unwrap();
    let classified = classify(ticket, classifier(1), claim.command_id);
    let first = f.handler.handle(classified.clone()).await.unwrap();
    // The categories change before the retry comes: deciding the retry
    // again would refuse "billing"; the recorded digest knows the command.
    let later = CommandHandler::new(f.store.clone())
        .with_clock(f.clock.clone())
        .with_policy(Policy {
            categories: vec!["other".into()],
            ..Policy::default()
        });
    let retried = later.handle(classified.clone()).await.unwrap();
    assert!(retried.duplicate);
    assert_eq!((retried.revision, retried.state), (first.revision, State::Classified));
    // Another command under the id is still no retry.
    let mut other = classified.clone();
    other.command = Command::Classify {
        claim_id: claim.command_id,
        category: "other".into(),
        priority: Priority::High,
        confidence: 0.9,
    };
    assert!(matches!(
        later.handle(other).await,
        Err(CommandError::CommandIdReused { .. })
    ));
    assert_eq!(stored(&f.store, ticket).await.len(), 3);
}

#[tokio::test]
async fn an_undecodable_stored_event_is_a_clear_error() {
    let f = fixture();
    let ticket = open(&f.handler).await;
    let stream = StreamName::new(ticket.stream_name()).unwrap();
    f.store
        .append(
            &stream,
            ExpectedRevision::Exact(0),
            vec![EventData {
                id: Uuid::new_v4(),
                event_type: "TicketTeleported".into(),
                data: b"{}".to_vec(),
                metadata: br#"{"schema_version":1}"#.to_vec(),
            }],
        )
        .await
        .unwrap();
    let error = f.handler.load(ticket).await.unwrap_err();
    assert!(
        matches!(error, CommandError::Undecodable { revision: 1, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("revision 1"), "{error}");
}

#[test]
fn backoff_is_capped_and_jittered() {
    let retry = RetryPolicy::default();
    for attempt in 0..40 {
        assert!(retry.delay(attempt) <= retry.max_delay);
    }
    let delays: std::collections::HashSet<_> = (0..20).map(|_| retry.delay(6)).collect();
    assert!(delays.len() > 1, "jitter varies the delay");
}

/// Commands of one process racing for one ticket take turns: the store
/// sees the winner's append only, and every loser is refused on the
/// ticket as the winner left it, never on an append of its own that the
/// store refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_of_one_process_on_one_ticket_take_turns() {
    let store = Arc::new(CountingStore::new(Arc::new(InMemoryEventStore::new())));
    let handler = CommandHandler::new(store.clone()).with_rejection_log(false);
    let ticket = open(&handler).await;
    let appends_before = store.appends();
    // The first append waits: without turns the others would decide on the
    // same cached revision and append meanwhile.
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    store.before_next_append(async move {
        let _ = released.await;
    });
    let racers: Vec<_> = (0..8)
        .map(|n| {
            let handler = handler.clone();
            tokio::spawn(async move { handler.handle(start(ticket, classifier(n))).await })
        })
        .collect();
    until_queued(&handler, ticket, 8).await;
    release.send(()).unwrap();
    let mut accepted = 0;
    for racer in racers {
        match racer.await.unwrap() {
            Ok(_) => accepted += 1,
            Err(CommandError::Rejected {
                rejection: Rejection::InvalidTransition { .. },
                revision: Some(1),
                ..
            }) => {}
            other => panic!("expected a refusal at revision 1, got {other:?}"),
        }
    }
    assert_eq!(accepted, 1);
    assert_eq!(
        store.appends() - appends_before,
        1,
        "only the winner's append reached the store"
    );
    let stream = StreamName::new(ticket.stream_name()).unwrap();
    let stored = store.read_stream(&stream, ReadStream::forwards()).await.unwrap();
    assert_eq!(stored.len(), 2, "opened, then one classification started");
}

/// A command that waited for its turn is refused on the ticket as a read
/// or append that began after it arrived left it in the cache, without a
/// read of its own; a command that arrived after that read must read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_command_decides_on_what_was_seen_after_it_arrived() {
    let memory = Arc::new(InMemoryEventStore::new());
    let store = Arc::new(CountingStore::new(memory.clone()));
    let mut handler = CommandHandler::new(store.clone() as Arc<dyn EventStore>).with_rejection_log(false);
    // A window no busy test machine misses (the default is 100 ms).
    handler.cache = Arc::new(cache::StreamCache::with_current_for(
        DEFAULT_CACHE_TICKETS,
        std::time::Duration::from_secs(30),
    ));
    let ticket = open(&handler).await;

    // A command of this process holds the ticket's turn while another
    // process claims the ticket and this process reads it.
    let turn = handler.turns.take(ticket).await;
    let waiting = tokio::spawn({
        let handler = handler.clone();
        async move { handler.handle(start(ticket, classifier(2))).await }
    });
    until_queued(&handler, ticket, 2).await;
    let other = CommandHandler::new(memory.clone() as Arc<dyn EventStore>);
    other.handle(start(ticket, classifier(1))).await.unwrap();
    assert_eq!(handler.load(ticket).await.unwrap().revision, Some(1));
    let reads_before = store.stream_reads();
    drop(turn);

    let refused = waiting.await.unwrap();
    assert!(
        matches!(
            refused,
            Err(CommandError::Rejected {
                rejection: Rejection::InvalidTransition { .. },
                revision: Some(1),
                ..
            })
        ),
        "{refused:?}"
    );
    assert_eq!(
        store.stream_reads(),
        reads_before,
        "decided on the read made after it arrived"
    );

    let late = handler.handle(start(ticket, classifier(3))).await;
    assert!(
        matches!(late, Err(CommandError::Rejected { revision: Some(1), .. })),
        "{late:?}"
    );
    assert_eq!(
        store.stream_reads(),
        reads_before + 1,
        "the read was made before this command arrived: confirmed by a read of its own"
    );
}

/// A load with the ticket cached reads only from the cached revision on,
/// and gives what a load of the whole stream gives; a cached fold that
/// does not match the stored stream (its last event is not the one
/// stored at its revision) is ignored and the stream read whole.
#[tokio::test]
async fn a_load_catches_up_from_the_cache_and_matches_a_whole_read() {
    let memory = Arc::new(InMemoryEventStore::new());
    let handler = CommandHandler::new(memory.clone() as Arc<dyn EventStore>);
    let ticket = open(&handler).await;
    let claim = start(ticket, classifier(1));
    let claim_id = claim.command_id;
    handler.handle(claim).await.unwrap();
    // Moved on by another process: the cache is at revision 1.
    let other = CommandHandler::new(memory.clone() as Arc<dyn EventStore>);
    other.handle(classify(ticket, classifier(1), claim_id)).await.unwrap();

    let whole = CommandHandler::new(memory.clone() as Arc<dyn EventStore>)
        .with_cache_capacity(0)
        .load(ticket)
        .await
        .unwrap();
    let caught_up = handler.load(ticket).await.unwrap();
    assert_eq!(whole.revision, Some(2));
    assert_eq!(caught_up.revision, whole.revision);
    assert_eq!(caught_up.ticket, whole.ticket);
    assert_eq!(caught_up.history, whole.history);

    // A cached fold of some other stream at revision 0.
    let foreign = LoadedTicket {
        revision: Some(0),
        history: vec![StoredEvent {
            id: Uuid::new_v4(),
            ..whole.history[0].clone()
        }],
        ticket: whole.ticket.clone(),
    };
    handler.cache.remove(ticket);
    handler.cache.put(ticket, Arc::new(foreign), std::time::Instant::now());
    let reread = handler.load(ticket).await.unwrap();
    assert_eq!(reread.history, whole.history);
    assert_eq!(reread.ticket, whole.ticket);
}

/// A cache entry found to be a fold of another stream at the same
/// revision (a store replaced under the handler) is replaced by the read
/// that found it, not stamped as seen: a waiting command decides on what
/// the store holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_fold_at_the_same_revision_is_replaced_not_restamped() {
    let memory = Arc::new(InMemoryEventStore::new());
    let handler = CommandHandler::new(memory.clone() as Arc<dyn EventStore>).with_rejection_log(false);
    let ticket = open(&handler).await;
    // Another process claims the ticket: revision 1, classifier-1's claim.
    let other = CommandHandler::new(memory.clone() as Arc<dyn EventStore>);
    let claim = start(ticket, classifier(1));
    let claim_id = claim.command_id;
    other.handle(claim).await.unwrap();

    // The cache holds a fold at revision 1 of another history: claimed by
    // classifier-9.
    let elsewhere = CommandHandler::new(Arc::new(InMemoryEventStore::new()) as Arc<dyn EventStore>);
    elsewhere
        .handle(CommandEnvelope::new(
            ticket,
            intake(),
            Command::OpenTicket {
                subject: "x".into(),
                body: "y".into(),
                customer: None,
            },
        ))
        .await
        .unwrap();
    elsewhere.handle(start(ticket, classifier(9))).await.unwrap();
    let foreign = elsewhere.load(ticket).await.unwrap();
    assert_eq!(foreign.revision, Some(1));
    let long_ago = std::time::Instant::now() - std::time::Duration::from_secs(10);
    handler.cache.remove(ticket);
    handler.cache.put(ticket, Arc::new(foreign), long_ago);

    // classifier-1's classification waits for its turn; meanwhile this
    // process reads the ticket (a read that began after it arrived).
    let turn = handler.turns.take(ticket).await;
    let waiting = tokio::spawn({
        let handler = handler.clone();
        async move { handler.handle(classify(ticket, classifier(1), claim_id)).await }
    });
    until_queued(&handler, ticket, 2).await;
    let read = handler.load(ticket).await.unwrap();
    assert_eq!(read.history[1].metadata.agent, classifier(1));
    assert_eq!(
        handler.cache.get(ticket).unwrap().loaded.history[1].metadata.agent,
        classifier(1),
        "the cache holds what was read"
    );
    drop(turn);
    let outcome = waiting.await.unwrap();
    assert!(outcome.is_ok(), "decided on the stored stream: {outcome:?}");
}

/// A lease found run out on a cache entry seen after the command arrived
/// is confirmed on a read: another process may have extended it between
/// that moment and the decision's clock, and here it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_seen_expired_on_a_waiting_command_is_confirmed_on_a_read() {
    let memory = Arc::new(InMemoryEventStore::new());
    let clock = Arc::new(ManualClock::new(Utc.with_ymd_and_hms(2026, 2, 1, 8, 0, 0).unwrap()));
    let handler = CommandHandler::new(memory.clone() as Arc<dyn EventStore>)
        .with_clock(clock.clone())
        .with_rejection_log(false);
    let ticket = open(&handler).await;
    let holder = classifier(1);
    let claim = start(ticket, holder.clone());
    let claim_id = claim.command_id;
    handler.handle(claim).await.unwrap(); // lease until 08:00:30

    let turn = handler.turns.take(ticket).await;
    let waiting = tokio::spawn({
        let handler = handler.clone();
        let holder = holder.clone();
        async move { handler.handle(classify(ticket, holder, claim_id)).await }
    });
    until_queued(&handler, ticket, 2).await;
    // Seen after the command arrived: revision 1, lease until 08:00:30.
    assert_eq!(handler.load(ticket).await.unwrap().revision, Some(1));
    // Then another process extends the lease (until 08:01:20), and the
    // clock passes the old end.
    clock.advance(Duration::seconds(20));
    let other = CommandHandler::new(memory.clone() as Arc<dyn EventStore>).with_clock(clock.clone());
    other
        .handle(CommandEnvelope::new(
            ticket,
            holder.clone(),
            Command::ExtendLease {
                claim_id,
                lease_secs: Some(60),
            },
        ))
        .await
        .unwrap();
    clock.advance(Duration::seconds(20));
    drop(turn);
    let accepted = waiting.await.unwrap().expect("the lease had been extended");
    assert_eq!(accepted.state, State::Classified);
    assert_eq!(accepted.revision, 3);
}

/// A writer of refusal records that dies (here the store panics) leaves
/// no stream behind without a writer: a later refusal of the ticket is
/// recorded, and `rejections_recorded` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_after_a_writer_died_are_still_written() {
    let store = Arc::new(CountingStore::new(Arc::new(InMemoryEventStore::new())));
    let handler = CommandHandler::new(store.clone()).with_rejections_recorded_in_background();
    let ticket = open(&handler).await;
    store.before_next_append(async { panic!("the store panics once") });
    assert!(handler.handle(draft_too_early(ticket)).await.is_err());
    // Returns once the dead writer's record has given its permit back.
    tokio::time::timeout(std::time::Duration::from_secs(5), handler.rejections_recorded())
        .await
        .expect("the dead writer's record is let go");
    let later = draft_too_early(ticket);
    assert!(handler.handle(later.clone()).await.is_err());
    tokio::time::timeout(std::time::Duration::from_secs(5), handler.rejections_recorded())
        .await
        .expect("the later record lands");
    let rejections = StreamName::new(triage_domain::CommandRejected::stream_name(ticket)).unwrap();
    let records = store.read_stream(&rejections, ReadStream::forwards()).await.unwrap();
    let ids: Vec<Uuid> = records.iter().map(|record| record.id).collect();
    assert_eq!(
        ids,
        vec![triage_domain::CommandRejected::record_id(later.command_id, ticket)]
    );
}

/// With the store failing, a burst of refusal records is tried once per
/// append, not once more per record: an outage must not cost each record
/// its own deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_records_on_a_failing_store_is_tried_once() {
    let store = Arc::new(CountingStore::new(Arc::new(InMemoryEventStore::new())));
    let handler = CommandHandler::new(store.clone()).with_rejections_recorded_in_background();
    let ticket = open(&handler).await;
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let (held, holding) = tokio::sync::oneshot::channel::<()>();
    store.before_next_append(async move {
        let _ = held.send(());
        let _ = released.await;
    });
    store.fail_appends(true);
    assert!(handler.handle(draft_too_early(ticket)).await.is_err());
    holding.await.unwrap();
    for _ in 0..5 {
        assert!(handler.handle(draft_too_early(ticket)).await.is_err());
    }
    let appends_before = store.appends();
    release.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), handler.rejections_recorded())
        .await
        .expect("given up on");
    assert_eq!(
        store.appends() - appends_before,
        2,
        "the first, then the five together, once"
    );
}

/// An escalator's resolve or rejection after the sweeper expired its
/// claim (the ticket is back in DRAFT_READY, where only an operator may
/// resolve) is a late write: told that its lease ran out, not that its
/// role may not resolve. Another escalator sending that claim id is still
/// told about its role.
#[tokio::test]
async fn a_late_review_after_the_sweeper_is_told_its_lease_ran_out() {
    let f = fixture();
    let ticket = open(&f.handler).await;
    let claim = start(ticket, classifier(1));
    let claim_id = claim.command_id;
    f.handler.handle(claim).await.unwrap();
    f.handler
        .handle(classify(ticket, classifier(1), claim_id))
        .await
        .unwrap();
    let drafter = Agent::new("drafter-1", Role::Drafter);
    let drafting = CommandEnvelope::new(ticket, drafter.clone(), Command::StartDrafting { lease_secs: Some(30) });
    let drafting_id = drafting.command_id;
    f.handler.handle(drafting).await.unwrap();
    f.handler
        .handle(CommandEnvelope::new(
            ticket,
            drafter,
            Command::SubmitDraft {
                claim_id: drafting_id,
                body: "Refunded.".into(),
            },
        ))
        .await
        .unwrap();
    let escalator = Agent::new("escalator-1", Role::Escalator);
    let review = CommandEnvelope::new(
        ticket,
        escalator.clone(),
        Command::StartEscalation { lease_secs: Some(30) },
    );
    let review_id = review.command_id;
    f.handler.handle(review).await.unwrap();
    f.clock.advance(Duration::seconds(31));
    let expired = f
        .handler
        .handle(CommandEnvelope::new(
            ticket,
            Agent::new("sweeper", Role::System),
            Command::ExpireClaim { claim_id: review_id },
        ))
        .await
        .unwrap();
    assert_eq!(expired.state, State::DraftReady);

    for command in [
        Command::Resolve {
            claim_id: Some(review_id),
            resolution: "late".into(),
        },
        Command::RejectDraft {
            claim_id: Some(review_id),
            reason: "late".into(),
        },
    ] {
        let late = f
            .handler
            .handle(CommandEnvelope::new(ticket, escalator.clone(), command.clone()))
            .await;
        assert!(
            matches!(
                late,
                Err(CommandError::Rejected {
                    rejection: Rejection::LeaseExpired { claim_id, .. },
                    ..
                }) if claim_id == review_id
            ),
            "{late:?}"
        );
        let other = f
            .handler
            .handle(CommandEnvelope::new(
                ticket,
                Agent::new("escalator-2", Role::Escalator),
                command,
            ))
            .await;
        assert!(
            matches!(
                other,
                Err(CommandError::Rejected {
                    rejection: Rejection::RoleNotAllowed { .. },
                    ..
                })
            ),
            "{other:?}"
        );
    }
    // A holder of an earlier claim whose role never may resolve is told
    // about its role, not about its claim.
    let by_classifier = f
        .handler
        .handle(CommandEnvelope::new(
            ticket,
            classifier(1),
            Command::Resolve {
                claim_id: Some(claim_id),
                resolution: "not mine to resolve".into(),
            },
        ))
        .await;
    assert!(
        matches!(
            by_classifier,
            Err(CommandError::Rejected {
                rejection: Rejection::RoleNotAllowed { .. },
                ..
            })
        ),
        "{by_classifier:?}"
    );
}

#[tokio::test]
async fn a_stale_cache_never_causes_a_rejection_or_a_lost_write() {
    // Two handlers with their own caches, as two processes would have.
    let f = fixture();
    let other = CommandHandler::new(f.store.clone()).with_clock(f.clock.clone());
    let ticket = open(&f.handler).await;
    // `f.handler` caches the ticket at revision 0 (NEW).
    assert_eq!(f.handler.load(ticket).await.unwrap().revision, Some(0));
    let claim = other.handle(start(ticket, classifier(1))).await.unwrap();
    // The cached ticket says NEW, where Classify is invalid; the handler must
    // read again and accept it.
    let accepted = f
        .handler
        .handle(classify(ticket, classifier(1), claim.command_id).at_revision(1))
        .await
        .unwrap();
    assert_eq!((accepted.revision, accepted.state), (2, State::Classified));
    // And the other handler's cache (revision 1) is now behind: its next
    // command is decided on a fresh read and appended after revision 2.
    let drafter = Agent::new("drafter-1", Role::Drafter);
    let drafting = other
        .handle(CommandEnvelope::new(
            ticket,
            drafter,
            Command::StartDrafting { lease_secs: None },
        ))
        .await
        .unwrap();
    assert_eq!(drafting.revision, 3);
    let records = stored(&f.store, ticket).await;
    assert_eq!(
        records.iter().map(|r| r.event_type.as_str()).collect::<Vec<_>>(),
        [
            "TicketOpened",
            "ClassificationStarted",
            "TicketClassified",
            "DraftingStarted"
        ]
    );
}

#[tokio::test]
async fn the_cache_can_be_turned_off() {
    let f = fixture();
    let uncached = f.handler.clone().with_cache_capacity(0);
    let ticket = open(&uncached).await;
    let accepted = uncached
        .handle(start(ticket, classifier(1)).at_revision(0))
        .await
        .unwrap();
    assert_eq!(accepted.revision, 1);
}

#[tokio::test]
async fn refusals_are_recorded_outside_the_ticket_stream_once() {
    let f = fixture();
    let ticket = open(&f.handler).await;
    let refused = draft_too_early(ticket);
    for _ in 0..2 {
        assert!(f.handler.handle(refused.clone()).await.is_err());
    }
    assert!(
        f.handler
            .handle(start(ticket, classifier(1)).at_revision(7))
            .await
            .is_err()
    );
    let rejections = StreamName::new(triage_domain::CommandRejected::stream_name(ticket)).unwrap();
    let records = f.store.read_stream(&rejections, ReadStream::forwards()).await.unwrap();
    assert_eq!(records.len(), 2, "a retried refusal is recorded once");
    let first = triage_domain::CommandRejected::decode(1, &records[0].data).unwrap();
    assert_eq!(first.code, "invalid_transition");
    assert_eq!(first.command, CommandKind::SubmitDraft);
    assert_eq!((first.state, first.revision), (Some(State::New), Some(0)));
    let second = triage_domain::CommandRejected::decode(1, &records[1].data).unwrap();
    assert_eq!(second.code, "stale_revision");
    assert_eq!(
        stored(&f.store, ticket).await.len(),
        1,
        "the ticket stream is untouched"
    );
    // Unknown tickets leave no rejection stream behind.
    let missing = TicketId::new();
    assert!(f.handler.handle(start(missing, classifier(1))).await.is_err());
    let missing_rejections = StreamName::new(triage_domain::CommandRejected::stream_name(missing)).unwrap();
    assert!(
        f.store
            .read_stream(&missing_rejections, ReadStream::forwards())
            .await
            .is_err()
    );
}

/// One command id refused on two tickets (a keyed work claim tries one
/// ticket after another under its one id) is recorded on each: the second
/// record was refused as a conflict (its id was stored in the first
/// ticket's stream) and dropped with a warning.
#[tokio::test]
async fn a_command_id_refused_on_two_tickets_is_recorded_on_both() {
    let f = fixture();
    let command_id = Uuid::new_v4();
    let tickets = [open(&f.handler).await, open(&f.handler).await];
    for ticket in tickets {
        let refused = draft_too_early(ticket).with_id(command_id);
        assert!(f.handler.handle(refused).await.is_err());
    }
    for ticket in tickets {
        let rejections = StreamName::new(triage_domain::CommandRejected::stream_name(ticket)).unwrap();
        let records = f.store.read_stream(&rejections, ReadStream::forwards()).await;
        assert_eq!(records.map(|records| records.len()).ok(), Some(1), "ticket {ticket}");
    }
}

/// A server's handler answers a refusal before its record is written, and
/// `rejections_recorded` waits for the record: the refused caller is not
/// kept waiting on a write of the audit trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_recorded_in_the_background_is_answered_first_and_waited_for() {
    let store = Arc::new(CountingStore::new(Arc::new(InMemoryEventStore::new())));
    let handler = CommandHandler::new(store.clone()).with_rejections_recorded_in_background();
    let ticket = open(&handler).await;
    // The next append (the refusal's record) waits for `release`.
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    store.before_next_append(async move {
        let _ = released.await;
    });
    let refused = draft_too_early(ticket);
    let answer = tokio::time::timeout(std::time::Duration::from_secs(5), handler.handle(refused))
        .await
        .expect("answered while its record waits");
    assert!(matches!(answer, Err(CommandError::Rejected { .. })), "{answer:?}");
    let rejections = StreamName::new(triage_domain::CommandRejected::stream_name(ticket)).unwrap();
    assert!(
        store.read_stream(&rejections, ReadStream::forwards()).await.is_err(),
        "not recorded yet"
    );

    let waiting = tokio::spawn({
        let handler = handler.clone();
        async move { handler.rejections_recorded().await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "waits for the record in flight");
    release.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
        .await
        .expect("the record lands")
        .unwrap();
    let records = store.read_stream(&rejections, ReadStream::forwards()).await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(
        triage_domain::CommandRejected::decode(1, &records[0].data)
            .unwrap()
            .code,
        "invalid_transition"
    );
}

/// Refusals that arrive while their ticket's last record is being written
/// are written together, in one append, and every one of them is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_refusals_is_recorded_in_one_append() {
    let store = Arc::new(CountingStore::new(Arc::new(InMemoryEventStore::new())));
    let handler = CommandHandler::new(store.clone()).with_rejections_recorded_in_background();
    let ticket = open(&handler).await;
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let (held, holding) = tokio::sync::oneshot::channel::<()>();
    let mut holding = Some(holding);
    store.before_next_append(async move {
        let _ = held.send(());
        let _ = released.await;
    });
    let mut refused = Vec::new();
    for _ in 0..6 {
        let envelope = draft_too_early(ticket);
        refused.push(envelope.command_id);
        assert!(matches!(
            handler.handle(envelope).await,
            Err(CommandError::Rejected { .. })
        ));
        if let Some(holding) = holding.take() {
            holding.await.unwrap();
            // Held at the store: the other five wait for it.
        }
    }
    let appends_before = store.appends();
    release.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), handler.rejections_recorded())
        .await
        .expect("the records land");
    assert_eq!(
        store.appends() - appends_before,
        2,
        "the first alone, then the five together"
    );
    let rejections = StreamName::new(triage_domain::CommandRejected::stream_name(ticket)).unwrap();
    let records = store.read_stream(&rejections, ReadStream::forwards()).await.unwrap();
    let recorded: Vec<Uuid> = records.iter().map(|record| record.id).collect();
    let expected: Vec<Uuid> = refused
        .iter()
        .map(|command_id| triage_domain::CommandRejected::record_id(*command_id, ticket))
        .collect();
    assert_eq!(recorded, expected, "each refusal once, in the order they were answered");
}

/// A retried refusal queued with new ones: their joint append fails (one id
/// is stored already), so each is appended on its own, and every refusal is
/// stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_refusal_in_a_burst_neither_duplicates_nor_loses_records() {
    let store = Arc::new(CountingStore::new(Arc::new(InMemoryEventStore::new())));
    let handler = CommandHandler::new(store.clone()).with_rejections_recorded_in_background();
    let ticket = open(&handler).await;
    let first = draft_too_early(ticket);
    assert!(handler.handle(first.clone()).await.is_err());
    handler.rejections_recorded().await;

    let (release, released) = tokio::sync::oneshot::channel::<()>();
    store.before_next_append(async move {
        let _ = released.await;
    });
    let held = draft_too_early(ticket);
    let later = draft_too_early(ticket);
    for envelope in [held.clone(), first.clone(), first.clone(), later.clone()] {
        assert!(matches!(
            handler.handle(envelope).await,
            Err(CommandError::Rejected { .. })
        ));
    }
    release.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), handler.rejections_recorded())
        .await
        .expect("the records land");
    let rejections = StreamName::new(triage_domain::CommandRejected::stream_name(ticket)).unwrap();
    let records = store.read_stream(&rejections, ReadStream::forwards()).await.unwrap();
    let recorded: Vec<Uuid> = records.iter().map(|record| record.id).collect();
    let expected: Vec<Uuid> = [&first, &held, &later]
        .iter()
        .map(|envelope| triage_domain::CommandRejected::record_id(envelope.command_id, ticket))
        .collect();
    assert_eq!(recorded, expected);
}

#[tokio::test]
async fn a_copy_that_lost_the_race_caches_what_is_stored_not_its_own_decision() {
    // Two handlers (two processes) with their own caches; the same command
    // reaches both, 20 s apart.
    let f = fixture();
    let other = CommandHandler::new(f.store.clone()).with_clock(f.clock.clone());
    let ticket = open(&f.handler).await;
    // f.handler caches the ticket at revision 0.
    assert_eq!(f.handler.load(ticket).await.unwrap().revision, Some(0));
    let envelope = start(ticket, classifier(1));
    other.handle(envelope.clone()).await.unwrap();
    f.clock.advance(Duration::seconds(20));
    // f.handler decides on its cached revision 0 with a later lease, appends
    // with Exact(0), and finds the original stored.
    let retry = f.handler.handle(envelope.clone()).await.unwrap();
    assert!(retry.duplicate, "the retry is answered as a duplicate");
    // The stored lease (30 s from the first copy) ran out at +30 s: a
    // completion at +35 s must be refused by the handler that cached too.
    f.clock.advance(Duration::seconds(15));
    let late = f
        .handler
        .handle(classify(ticket, classifier(1), envelope.command_id))
        .await;
    assert!(
        matches!(
            late,
            Err(CommandError::Rejected {
                rejection: Rejection::LeaseExpired { .. },
                ..
            })
        ),
        "{late:?}"
    );
}

#[tokio::test]
async fn opening_a_new_ticket_reads_nothing_and_an_existing_one_is_refused_on_a_fresh_read() {
    let memory = Arc::new(InMemoryEventStore::new());
    let store = Arc::new(CountingStore::new(memory.clone()));
    let reads = || store.stream_reads();
    let handler = CommandHandler::new(store.clone() as Arc<dyn EventStore>);
    let first = open_ticket(intake(), "Charged twice", "Twice in March.", None);
    let ticket = first.ticket_id;
    let accepted = handler.handle(first.clone()).await.unwrap();
    assert_eq!((accepted.revision, accepted.duplicate), (0, false));
    assert_eq!(reads(), 0, "a new ticket is opened without reading its stream");

    // Another open of the same ticket, by a handler that has never seen it:
    // refused with the state read afresh, nothing written.
    let other_handler = CommandHandler::new(store.clone() as Arc<dyn EventStore>);
    let second = CommandEnvelope::new(
        ticket,
        intake(),
        Command::OpenTicket {
            subject: "Charged twice".into(),
            body: "Again.".into(),
            customer: None,
        },
    );
    match other_handler.handle(second).await {
        Err(CommandError::Rejected {
            rejection: Rejection::TicketAlreadyExists,
            state,
            revision,
            ..
        }) => assert_eq!((state, revision), (Some(State::New), Some(0))),
        other => panic!("expected TicketAlreadyExists, got {other:?}"),
    }
    assert!(reads() >= 1, "the refusal was confirmed on a fresh read");

    // A retry of the first open, by a third handler: its original answer.
    let retry = CommandHandler::new(store.clone() as Arc<dyn EventStore>)
        .handle(first)
        .await
        .unwrap();
    assert_eq!((retry.revision, retry.duplicate), (0, true));
    assert_eq!(stored(&memory, ticket).await.len(), 1);
}

#[tokio::test]
async fn a_race_lost_is_decided_without_a_read_when_the_cache_holds_the_winners_state() {
    let memory = Arc::new(InMemoryEventStore::new());
    let store = Arc::new(CountingStore::new(memory.clone()));
    let handler = CommandHandler::new(store.clone() as Arc<dyn EventStore>);
    let ticket = open(&handler).await;
    handler.load(ticket).await.unwrap();
    let reads_before = store.stream_reads();

    // The claim is decided on the loaded ticket (revision 0); its append
    // lets another process's claim in first, and then a read of this
    // process (through a clone of the handler, which shares its cache)
    // caches the ticket as that claim left it. (A clone's own command
    // would not race it: commands of one process take turns.)
    let other = CommandHandler::new(memory.clone() as Arc<dyn EventStore>);
    let reader = handler.clone();
    let winning_claim = start(ticket, classifier(1));
    let winning_claim_id = winning_claim.command_id;
    store.before_next_append(async move {
        let accepted = other.handle(winning_claim).await.unwrap();
        assert_eq!(accepted.revision, 1);
        assert_eq!(reader.load(ticket).await.unwrap().revision, Some(1));
    });
    let lost = handler.handle(start(ticket, classifier(2))).await;
    match lost {
        Err(CommandError::Rejected {
            rejection: Rejection::InvalidTransition { .. },
            state,
            revision,
            ..
        }) => assert_eq!((state, revision), (Some(State::Classifying), Some(1))),
        other => panic!("expected the claim to be held, got {other:?}"),
    }
    assert_eq!(
        store.stream_reads(),
        reads_before + 1,
        "the reader's only: the refusal was decided on the state the store reported at the conflict, which the cache held"
    );
    let events = stored(&memory, ticket).await;
    assert_eq!(events.len(), 2, "only the winner's claim was written");
    assert_eq!(events[1].id, event_id(winning_claim_id, 0));
}

/// A retry after the backoff pause decides on a fresh read: the state a
/// refused append found is out of date by then. Here the holder's lease,
/// as the conflict found it, ran out during the pause, but the holder had
/// extended it meanwhile: the command is accepted, not refused as late.
/// (Time is paused: the pause ends only once the test's other task, which
/// extends the lease and moves the clock, is done.)
#[tokio::test(start_paused = true)]
async fn a_retry_after_the_pause_decides_on_a_read_made_after_it() {
    let memory = Arc::new(InMemoryEventStore::new());
    let store = Arc::new(CountingStore::new(memory.clone()));
    let clock = Arc::new(ManualClock::new(Utc.with_ymd_and_hms(2026, 2, 1, 8, 0, 0).unwrap()));
    let new_handler = || CommandHandler::new(store.clone() as Arc<dyn EventStore>).with_clock(clock.clone());
    // Opened and claimed (lease 30 s) by another handler, so that this
    // one decides its command on a read.
    let other = new_handler();
    let ticket = open(&other).await;
    let holder = classifier(1);
    let claim = start(ticket, holder.clone());
    let claim_id = claim.command_id;
    other.handle(claim).await.unwrap();
    let extend = |lease_secs| {
        CommandEnvelope::new(
            ticket,
            holder.clone(),
            Command::ExtendLease {
                claim_id,
                lease_secs: Some(lease_secs),
            },
        )
    };

    let handler = new_handler().with_retry(RetryPolicy {
        max_attempts: 8,
        base_delay: std::time::Duration::from_secs(1),
        max_delay: std::time::Duration::from_secs(1),
    });
    // The classification races a heartbeat from another process (lease
    // until 08:00:10), which wins, and which a read of this process (a
    // clone of the handler) caches: the conflict finds the cache at the
    // stream's revision.
    let (heartbeat, reader) = (new_handler(), handler.clone());
    let first_extension = extend(10);
    store.before_next_append(async move {
        let extended = heartbeat.handle(first_extension).await.unwrap();
        assert_eq!(reader.load(ticket).await.unwrap().revision, Some(extended.revision));
    });
    // During the pause that follows the conflict: another heartbeat
    // (until 08:00:39), then the clock passes 08:00:10.
    let during_the_pause = {
        let (handler, other, clock) = (handler.clone(), new_handler(), clock.clone());
        let second_extension = extend(30);
        tokio::spawn(async move {
            while handler.stats().conflicts_retried == 0 {
                tokio::task::yield_now().await;
            }
            clock.advance(Duration::seconds(9));
            other.handle(second_extension).await.unwrap();
            clock.advance(Duration::seconds(2));
        })
    };
    let accepted = handler
        .handle(classify(ticket, holder.clone(), claim_id))
        .await
        .expect("the lease had been extended when the retry decided");
    during_the_pause.await.unwrap();
    assert_eq!(accepted.state, State::Classified);
    assert_eq!(accepted.revision, 4);
    assert_eq!(handler.stats().conflicts_retried, 1);
}

/// A sender whose id holds a line break or an escape sequence is refused,
/// and the refusal is not recorded: its record would carry the id into
/// every report and table. A refusal of a good sender is recorded.
#[tokio::test]
async fn a_sender_with_control_characters_in_its_id_is_refused_unrecorded() {
    let f = fixture();
    let ticket = open(&f.handler).await;
    let rejections = StreamName::new(triage_domain::CommandRejected::stream_name(ticket)).unwrap();
    for id in ["bad\nagent", "red\u{1b}[31m"] {
        let result = f.handler.handle(start(ticket, Agent::new(id, Role::Classifier))).await;
        assert!(
            matches!(
                &result,
                Err(CommandError::Rejected {
                    rejection: Rejection::Invalid(triage_domain::ValidationError::ControlCharacter {
                        field: "agent id",
                        ..
                    }),
                    ..
                })
            ),
            "{result:?}"
        );
    }
    assert!(
        f.store.read_stream(&rejections, ReadStream::forwards()).await.is_err(),
        "no refusal recorded"
    );
    assert!(f.handler.handle(draft_too_early(ticket)).await.is_err());
    assert_eq!(
        f.store
            .read_stream(&rejections, ReadStream::forwards())
            .await
            .unwrap()
            .len(),
        1,
        "a good sender's refusal is recorded"
    );
}

/// A command sent with a UUIDv7 id (an API `Idempotency-Key` that is one,
/// or `--command-id`) before event ids were time-ordered has events with
/// the former ids; its retry after the upgrade is still recognised.
#[tokio::test]
async fn a_time_ordered_command_stored_with_former_event_ids_is_recognised_when_retried() {
    // Write the history with this build...
    let f = fixture();
    let ticket = open(&f.handler).await;
    let start = start(ticket, classifier(1));
    let claim_id = start.command_id;
    f.handler.handle(start).await.unwrap();
    let extend = CommandEnvelope::new(
        ticket,
        classifier(1),
        Command::ExtendLease {
            claim_id,
            lease_secs: Some(60),
        },
    );
    assert_eq!(extend.command_id.get_version_num(), 7);
    f.handler.handle(extend.clone()).await.unwrap();
    // ...and copy it into a store as builds before wrote it.
    let old_store = Arc::new(InMemoryEventStore::new());
    let stream = StreamName::new(ticket.stream_name()).unwrap();
    for (revision, record) in stored(&f.store, ticket).await.into_iter().enumerate() {
        let (_, metadata) = decode_recorded(&record).unwrap();
        // Every command here wrote one event.
        let former = triage_domain::former_event_id(metadata.command_id, 0).expect("UUIDv7 command ids");
        assert_ne!(former, record.id);
        let expected = match revision {
            0 => ExpectedRevision::NoStream,
            _ => ExpectedRevision::Exact(revision as u64 - 1),
        };
        let event = EventData {
            id: former,
            event_type: record.event_type,
            data: record.data,
            metadata: record.metadata,
        };
        old_store.append(&stream, expected, vec![event]).await.unwrap();
    }
    let upgraded = CommandHandler::new(old_store.clone()).with_clock(f.clock.clone());
    let retry = upgraded.handle(extend).await.unwrap();
    assert!(retry.duplicate, "the retry was applied again: {retry:?}");
    assert_eq!(retry.revision, 2);
    assert_eq!(stored(&old_store, ticket).await.len(), 3, "the retry wrote nothing");
}

/// A command that keeps losing its append to other writers gives up after
/// its attempts, writes nothing, and says so (and that a retry is safe).
#[tokio::test]
async fn a_command_that_keeps_losing_gives_up_and_says_nothing_was_applied() {
    let memory = Arc::new(InMemoryEventStore::new());
    let store = Arc::new(CountingStore::new(memory.clone()));
    // Without a cache, every attempt reads the ticket: a conflict is a
    // race lost, not a cached ticket behind.
    let handler = CommandHandler::new(store.clone() as Arc<dyn EventStore>)
        .with_cache_capacity(0)
        .with_retry(RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        });
    let other = CommandHandler::new(store.clone() as Arc<dyn EventStore>);
    let ticket = open(&handler).await;
    let claim = start(ticket, classifier(1));
    let claim_id = claim.command_id;
    handler.handle(claim).await.unwrap();
    let extend = || {
        CommandEnvelope::new(
            ticket,
            classifier(1),
            Command::ExtendLease {
                claim_id,
                lease_secs: Some(60),
            },
        )
    };
    let interloper = extend();
    store.before_next_append(async move {
        other.handle(interloper).await.unwrap();
    });
    let ours = extend();
    let error = handler.handle(ours.clone()).await.unwrap_err();
    assert!(
        matches!(error, CommandError::Contended { attempts: 1, ticket_id } if ticket_id == ticket),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.ends_with("the command was not applied, and sending it again with the same command id is safe"),
        "{message}"
    );
    let history = stored(&memory, ticket).await;
    assert_eq!(history.len(), 3, "open, claim and the other writer's extension");
    // And it is: sent again, it is applied once.
    let retried = handler.handle(ours).await.unwrap();
    assert_eq!((retried.revision, retried.duplicate), (3, false));
}
