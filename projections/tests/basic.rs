//! The read models follow the events: tickets, queues and statistics.

use std::sync::Arc;

use triage_command_handler::{CommandHandler, open_ticket};
use triage_domain::{Agent, Command, CommandEnvelope, Priority, Role, State};
use triage_event_store::{EventStore, InMemoryEventStore};
use triage_projections::{Projector, ReadModelDb, TicketsView, stats};

fn agent(id: &str, role: Role) -> Agent {
    Agent::new(id, role)
}

#[tokio::test]
async fn tickets_queues_and_stats_follow_the_events() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let handler = CommandHandler::new(store.clone());
    let projector = Projector::new(store.clone(), ReadModelDb::in_memory().unwrap());

    let first = handler
        .handle(open_ticket(
            agent("intake", Role::Intake),
            "Charged twice",
            "Twice in March",
            None,
        ))
        .await
        .unwrap();
    let second = handler
        .handle(open_ticket(
            agent("intake", Role::Intake),
            "Cannot log in",
            "Reset link expired",
            None,
        ))
        .await
        .unwrap();
    let claim = handler
        .handle(CommandEnvelope::new(
            first.ticket_id,
            agent("c1", Role::Classifier),
            Command::StartClassification { lease_secs: None },
        ))
        .await
        .unwrap();
    handler
        .handle(CommandEnvelope::new(
            first.ticket_id,
            agent("c1", Role::Classifier),
            Command::Classify {
                claim_id: claim.command_id,
                category: "billing".into(),
                priority: Priority::High,
                confidence: 0.9,
            },
        ))
        .await
        .unwrap();
    // A refusal, recorded for the statistics.
    let refused = handler
        .handle(CommandEnvelope::new(
            second.ticket_id,
            agent("d1", Role::Drafter),
            Command::StartDrafting { lease_secs: None },
        ))
        .await;
    assert!(refused.is_err());

    projector.catch_up().await.unwrap();
    let (row, queue, counts) = projector
        .read("tickets", |conn, slot| {
            let view = TicketsView::new(conn, slot);
            Ok((
                view.get(first.ticket_id)?,
                view.work_queue(Role::Drafter, 10)?,
                view.counts()?,
            ))
        })
        .unwrap();
    let row = row.expect("the ticket is in the read model");
    assert_eq!(row.ticket.state, Some(State::Classified));
    assert_eq!(row.revision, 2);
    assert_eq!(row.ticket.classification.unwrap().category, "billing");
    assert_eq!(queue.len(), 1);
    assert_eq!(queue[0].ticket.id, Some(first.ticket_id));
    assert_eq!(counts.get(&State::New), Some(&1));

    let summary = projector.read("stats", stats::summary).unwrap();
    assert_eq!(summary.counters.get("tickets_opened"), Some(&2));
    assert_eq!(summary.counters.get("rejections"), Some(&1));
    assert_eq!(summary.counters.get("rejections.invalid_transition"), Some(&1));
    assert_eq!(summary.stage_latency.get("classify").map(|s| s.count), Some(1));
    assert_eq!(summary.agents["c1"].outcomes.get("completed"), Some(&1));
    assert_eq!(summary.agents["d1"].outcomes.get("refused"), Some(&1));
    assert_eq!(summary.tickets_per_state.get("NEW"), Some(&1));

    // A rebuild with verification finds the same model.
    let report = projector
        .rebuild(
            "tickets",
            triage_projections::RebuildOptions {
                verify: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(report.differences, Some(vec![]));
    assert_eq!(report.generation, 2);
    let status = projector.status().await.unwrap();
    assert!(
        status.iter().all(|s| s.lag == 0 && s.last_error.is_none()),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_read_model_ahead_of_its_event_log_is_rebuilt_not_trusted() {
    // The read models were built from one log …
    let db = ReadModelDb::in_memory().unwrap();
    let old: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let old_handler = CommandHandler::new(old.clone());
    for n in 0..3 {
        old_handler
            .handle(open_ticket(
                agent("intake", Role::Intake),
                format!("old {n}"),
                "b",
                None,
            ))
            .await
            .unwrap();
    }
    Projector::new(old.clone(), db.clone()).catch_up().await.unwrap();
    // … and the events were then replaced (a deleted or swapped file).
    let counting = Arc::new(triage_event_store::testing::CountingStore::new(Arc::new(
        InMemoryEventStore::new(),
    )));
    let new: Arc<dyn EventStore> = counting.clone();
    let fresh = CommandHandler::new(new.clone())
        .handle(open_ticket(agent("intake", Role::Intake), "new", "b", None))
        .await
        .unwrap();
    let projector = Projector::new(new.clone(), db);
    let before = projector.status().await.unwrap();
    assert!(before.iter().all(|status| status.needs_rebuild), "{before:?}");
    projector.catch_up().await.unwrap();
    // The rebuilt models replace the old log's at once: their checkpoints
    // are positions in another log, which no build of this one is waited
    // for to pass (that took 20 replays each, then a warning that the live
    // model "kept moving ahead").
    let reads = counting.all_reads();
    eprintln!("reads of the log: {reads}");
    assert!(reads <= 8, "{reads} reads of a one-event log");
    let rows = projector
        .read("tickets", |conn, slot| TicketsView::new(conn, slot).list(None, 10))
        .unwrap();
    assert_eq!(rows.len(), 1, "only the new log's ticket");
    assert_eq!(rows[0].ticket.id, Some(fresh.ticket_id));
    let after = projector.status().await.unwrap();
    assert!(
        after.iter().all(|status| !status.needs_rebuild && status.lag == 0),
        "{after:?}"
    );
}

/// Two processes sharing a read-model file start on a replaced log. The
/// second found the models foreign; by the time it claims the rebuild,
/// the first has rebuilt them and moved on. The second must not rebuild
/// again and swap its own model in over the first one's.
#[tokio::test]
async fn a_replaced_log_is_rebuilt_once_when_two_processes_find_it() {
    let db = ReadModelDb::in_memory().unwrap();
    let old: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let old_handler = CommandHandler::new(old.clone());
    for n in 0..3 {
        old_handler
            .handle(open_ticket(
                agent("intake", Role::Intake),
                format!("old {n}"),
                "b",
                None,
            ))
            .await
            .unwrap();
    }
    Projector::new(old, db.clone()).catch_up().await.unwrap();
    let new: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let handler = CommandHandler::new(new.clone());
    handler
        .handle(open_ticket(agent("intake", Role::Intake), "new 1", "b", None))
        .await
        .unwrap();
    let second_store = Arc::new(triage_event_store::testing::CountingStore::new(new.clone()));
    let second = Projector::new(second_store.clone(), db.clone());
    let first = Projector::new(new.clone(), db.clone());
    // The second process has read the live models (foreign) and asks for
    // the head; meanwhile the first rebuilds, a ticket is opened, and the
    // first catches up with it.
    second_store.before_next_head_position({
        let first = first.clone();
        async move {
            first.catch_up().await.unwrap();
            handler
                .handle(open_ticket(agent("intake", Role::Intake), "new 2", "b", None))
                .await
                .unwrap();
            first.catch_up().await.unwrap();
        }
    });
    second.catch_up().await.unwrap();
    let after_first: Vec<_> = first.status().await.unwrap();
    let reads_by_second = second_store.all_reads();
    for status in &after_first {
        assert_eq!(
            status.generation,
            Some(2),
            "the first process's rebuild stands, not replaced by another: {status:?}"
        );
        assert_eq!(status.events_applied, 2, "{status:?}");
        assert!(!status.needs_rebuild && status.lag == 0, "{status:?}");
    }
    assert!(
        reads_by_second <= 3,
        "the second process replayed the log again: {reads_by_second} reads"
    );
    let rows = second
        .read("tickets", |conn, slot| TicketsView::new(conn, slot).list(None, 10))
        .unwrap();
    let mut subjects: Vec<_> = rows.iter().map(|row| row.ticket.subject.clone()).collect();
    subjects.sort();
    assert_eq!(subjects, ["new 1", "new 2"]);
}

/// A catch-up that failed (the store did not answer) records its error;
/// the next one that succeeds clears it, though the log has nothing new
/// to write a checkpoint for. It stayed, and `projections status` and
/// `/readyz` called a healthy projection stopped.
#[tokio::test]
async fn a_failure_that_passed_is_not_reported_once_a_catch_up_succeeds() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let db = ReadModelDb::in_memory().unwrap();
    CommandHandler::new(store.clone())
        .handle(open_ticket(agent("intake", Role::Intake), "s", "b", None))
        .await
        .unwrap();
    let healthy = Projector::new(store.clone(), db.clone());
    let checkpoint = healthy.catch_up().await.unwrap().expect("one event applied");
    let failing = Projector::new(
        Arc::new(
            triage_event_store::testing::CountingStore::new(store.clone())
                .failing_read_all_from(triage_event_store::AllStart::Position(checkpoint)),
        ),
        db.clone(),
    );
    assert!(failing.catch_up().await.is_err());
    let stopped = healthy.status().await.unwrap();
    assert!(stopped.iter().all(|status| status.last_error.is_some()), "{stopped:?}");
    healthy.catch_up().await.unwrap();
    let after = healthy.status().await.unwrap();
    assert!(
        after
            .iter()
            .all(|status| status.last_error.is_none() && status.lag == 0),
        "{after:?}"
    );
}

/// An agent with two roles (claims as a classifier, then as a drafter,
/// and an operator takes its draft over): its outcomes are counted per
/// role, the takeover in the role it held the claim in. The live model,
/// applied an event at a time, and a rebuild, applied in one page, agree,
/// so `rebuild --verify` finds no difference on a model that is right.
#[tokio::test]
async fn a_multi_role_agents_statistics_verify_equal_after_a_rebuild() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let clock = Arc::new(triage_command_handler::ManualClock::new(chrono::Utc::now()));
    let handler = CommandHandler::new(store.clone()).with_clock(clock.clone());
    let projector = Projector::new(store.clone(), ReadModelDb::in_memory().unwrap());
    let opened = handler
        .handle(open_ticket(agent("intake", Role::Intake), "Refund", "Twice", None))
        .await
        .unwrap();
    let ticket = opened.ticket_id;
    let send = async |role: Role, command: Command| {
        let accepted = handler
            .handle(CommandEnvelope::new(ticket, agent("w1", role), command))
            .await
            .unwrap();
        // The live model applies each event in a batch of its own.
        projector.catch_up().await.unwrap();
        accepted.command_id
    };
    let claim = send(Role::Classifier, Command::StartClassification { lease_secs: None }).await;
    send(
        Role::Classifier,
        Command::Classify {
            claim_id: claim,
            category: "billing".into(),
            priority: Priority::High,
            confidence: 0.9,
        },
    )
    .await;
    send(Role::Drafter, Command::StartDrafting { lease_secs: None }).await;
    handler
        .handle(CommandEnvelope::new(
            ticket,
            agent("op", Role::Operator),
            Command::TakeOver { lease_secs: None },
        ))
        .await
        .unwrap();
    projector.catch_up().await.unwrap();
    // A second ticket: w1 classifies it, and its lease runs out.
    let other = handler
        .handle(open_ticket(agent("intake", Role::Intake), "Login", "Locked out", None))
        .await
        .unwrap()
        .ticket_id;
    let claim = handler
        .handle(CommandEnvelope::new(
            other,
            agent("w1", Role::Classifier),
            Command::StartClassification { lease_secs: Some(30) },
        ))
        .await
        .unwrap()
        .command_id;
    projector.catch_up().await.unwrap();
    clock.advance(chrono::Duration::seconds(31));
    handler
        .handle(CommandEnvelope::new(
            other,
            agent("sweeper", Role::System),
            Command::ExpireClaim { claim_id: claim },
        ))
        .await
        .unwrap();
    projector.catch_up().await.unwrap();
    let report = projector
        .rebuild(
            "stats",
            triage_projections::RebuildOptions {
                verify: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(report.differences, Some(vec![]), "{report:?}");
    let summary = projector.read("stats", stats::summary).unwrap();
    let w1 = &summary.agents["w1"];
    assert_eq!(w1.outcomes.get("claimed"), Some(&3), "{w1:?}");
    assert_eq!(w1.role, "classifier, drafter");
    let outcomes = |pairs: &[(&str, u64)]| -> std::collections::BTreeMap<String, u64> {
        pairs.iter().map(|(name, count)| ((*name).to_owned(), *count)).collect()
    };
    assert_eq!(
        w1.roles["classifier"],
        outcomes(&[("claimed", 2), ("completed", 1), ("expired", 1)]),
        "the expiry is charged to the classifier's claim"
    );
    assert_eq!(
        w1.roles["drafter"],
        outcomes(&[("claimed", 1), ("taken_over", 1)]),
        "the takeover is charged to the drafter's claim"
    );
    assert_eq!(w1.roles.len(), 2, "{w1:?}");
    assert_eq!(summary.agents["op"].roles["operator"], outcomes(&[("claimed", 1)]));
}
