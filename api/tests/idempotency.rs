//! Idempotency keys and expected revisions at the API's edges: a keyed
//! retry gets its original outcome whatever role a principal with several
//! roles sends it in, and `If-Match` on a ticket that does not exist is
//! "not found", like the same request without it; and copies of one keyed
//! claim racing each other get one claim.

mod support;

use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::json;
use support::{Harness, Req};
use triage_domain::Role;
use triage_event_store::InMemoryEventStore;

/// The usual harness plus one agent holding two roles.
fn harness_with_multi_role() -> Harness {
    Harness::with_agents(
        Arc::new(InMemoryEventStore::new()),
        &[("worker", &[Role::Drafter, Role::Classifier])],
    )
}

/// A command with `If-Match` on a ticket that does not exist is a 404,
/// like the same command without `If-Match`, not a 409 "stale revision".
#[tokio::test]
async fn if_match_on_an_unknown_ticket_is_404_not_409() {
    let h = Harness::new();
    let ticket = uuid::Uuid::new_v4();
    let body = json!({"claim_id": uuid::Uuid::new_v4(), "category": "bug", "priority": "high", "confidence": 0.5});
    let without = h
        .send(
            Some("classifier"),
            Req::post(format!("/v1/tickets/{ticket}/classification"), body.clone()),
        )
        .await;
    without.assert_problem(StatusCode::NOT_FOUND, "ticket_not_found");
    let with = h
        .send(
            Some("classifier"),
            Req::post(format!("/v1/tickets/{ticket}/classification"), body).header("if-match", "\"3\""),
        )
        .await;
    // The refusal of a command to a ticket that does not exist is not
    // recorded (TicketNotFound is skipped): no rejections stream at all.
    let rejections = triage_event_store::StreamName::new(format!("rejections-{ticket}")).unwrap();
    let recorded = h
        .store
        .read_stream(&rejections, triage_event_store::ReadStream::forwards())
        .await;
    with.assert_problem(StatusCode::NOT_FOUND, "ticket_not_found");
    assert!(
        matches!(recorded, Err(triage_event_store::Error::StreamNotFound { .. })),
        "a refusal was recorded for a ticket that does not exist: {recorded:?}"
    );
}

/// A keyed heartbeat retried by a two-role token after the ticket moved on
/// gets the original outcome, as a one-role token does; not a 422 saying
/// the key was used for a different request.
#[tokio::test]
async fn a_multi_role_tokens_retried_heartbeat_returns_the_original_outcome() {
    let h = harness_with_multi_role();
    h.open("Cannot log in").await;
    let claim = h.claim("worker", "classifier").await;
    assert_eq!(claim.status, StatusCode::OK, "{}", claim.json);
    let claim_id = claim.json["claim_id"].as_str().unwrap().to_owned();
    let ticket = claim.json["ticket"]["id"].as_str().unwrap().to_owned();
    let beat = || Req::post(format!("/v1/claims/{claim_id}/heartbeat"), json!({})).header("idempotency-key", "hb-1");
    let first = h.send(Some("worker"), beat()).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.json);
    // The same retry at once is answered as a duplicate already.
    let again = h.send(Some("worker"), beat()).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.json);
    let done = h
        .send(
            Some("worker"),
            Req::post(
                format!("/v1/tickets/{ticket}/classification"),
                json!({"claim_id": claim_id, "category": "bug", "priority": "high", "confidence": 0.5}),
            ),
        )
        .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.json);
    let retried = h.send(Some("worker"), beat()).await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.json);
    assert_eq!(retried.json["duplicate"], true);
}

/// Same for a keyed release, the retry the existing tests care most about.
#[tokio::test]
async fn a_multi_role_tokens_retried_release_returns_the_original_outcome() {
    let h = harness_with_multi_role();
    h.open("Cannot log in").await;
    let claim = h.claim("worker", "classifier").await;
    assert_eq!(claim.status, StatusCode::OK, "{}", claim.json);
    let claim_id = claim.json["claim_id"].as_str().unwrap().to_owned();
    let release = || {
        Req::post(
            format!("/v1/claims/{claim_id}/release"),
            json!({"reason": "model timed out"}),
        )
        .header("idempotency-key", "release-1")
    };
    let first = h.send(Some("worker"), release()).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.json);
    let retried = h.send(Some("worker"), release()).await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.json);
    assert_eq!(retried.json["duplicate"], true);
}

/// Two copies of one keyed claim in flight at once (a client's retry after
/// a timeout, while the first is still running) with several tickets
/// waiting: both get the one claim the key took, not "key reused" for the
/// copy that lost the race.
#[tokio::test]
async fn concurrent_copies_of_one_keyed_claim_get_the_same_claim() {
    for trial in 0..10 {
        let h = Harness::new();
        for n in 0..4 {
            h.open(&format!("ticket {n}")).await;
        }
        let key = format!("claim-{trial}");
        let claim =
            || Req::post("/v1/work/claim", json!({"role": "classifier"})).header("idempotency-key", key.clone());
        let (a, b) = tokio::join!(h.send(Some("classifier"), claim()), h.send(Some("classifier"), claim()));
        for reply in [&a, &b] {
            assert_eq!(reply.status, StatusCode::OK, "trial {trial}: {}", reply.json);
        }
        assert_eq!(a.json["claim_id"], b.json["claim_id"], "trial {trial}");
        assert_eq!(a.json["ticket"]["id"], b.json["ticket"]["id"], "trial {trial}");
    }
}

/// Many copies of one keyed claim at once with a single ticket waiting:
/// once the first copy has claimed it the queue is empty, and a copy that
/// looks then must still answer the key's claim, not 204 "nothing to
/// claim" (the agent would drop a claim it holds, and the lease would
/// expire against the ticket's attempts).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_of_a_keyed_claim_that_emptied_the_queue_get_its_claim() {
    for trial in 0..10 {
        let h = Harness::new();
        h.open("the only ticket").await;
        let key = format!("claim-{trial}");
        let claim =
            || Req::post("/v1/work/claim", json!({"role": "classifier"})).header("idempotency-key", key.clone());
        let (a, b, c, d, e, f, g, i) = tokio::join!(
            h.send(Some("classifier"), claim()),
            h.send(Some("classifier"), claim()),
            h.send(Some("classifier"), claim()),
            h.send(Some("classifier"), claim()),
            h.send(Some("classifier"), claim()),
            h.send(Some("classifier"), claim()),
            h.send(Some("classifier"), claim()),
            h.send(Some("classifier"), claim()),
        );
        let replies = [a, b, c, d, e, f, g, i];
        for reply in &replies {
            assert_eq!(reply.status, StatusCode::OK, "trial {trial}: {}", reply.json);
            assert_eq!(reply.json["claim_id"], replies[0].json["claim_id"], "trial {trial}");
        }
        let fresh = replies.iter().filter(|reply| reply.json["duplicate"] == false).count();
        assert_eq!(fresh, 1, "trial {trial}: one copy claimed, the others replayed it");
    }
}

/// A copy of a keyed claim sent while the first copy is still at work (a
/// client's retry after a timeout) answers with the claim the first one
/// takes, also when work appears only after the second copy was sent: not
/// 204 "nothing to claim" from a look before that, which would leave the
/// first copy's claim unknown to the client until its lease expired
/// against the ticket's attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_sent_while_the_first_is_at_work_gets_its_claim_not_204() {
    use std::time::Duration;

    use triage_command_handler::CommandHandler;
    use triage_domain::{Agent, Command, CommandEnvelope, TicketId};
    use triage_event_store::EventStore;
    use triage_event_store::testing::CountingStore;

    let store = Arc::new(CountingStore::new(Arc::new(InMemoryEventStore::new())));
    let h = Harness::on(store.clone());
    let claim = || {
        Req::post("/v1/work/claim", json!({"role": "classifier"})).header("idempotency-key", "claim-as-work-appears")
    };
    // The first copy is held up at its first look for the key's claim.
    // Meanwhile the second copy is sent and, once it has answered or
    // waited a while, another process opens a ticket; then the first
    // copy goes on and finds it.
    let (second_sent, second) = tokio::sync::oneshot::channel();
    let sender = h.clone();
    let second_copy = claim();
    let opener = CommandHandler::new(store.clone() as Arc<dyn EventStore>);
    store.before_next_read_event(async move {
        let mut copy = tokio::spawn(async move { sender.send(Some("classifier"), second_copy).await });
        let answered_early = tokio::time::timeout(Duration::from_millis(300), &mut copy).await.ok();
        let open = Command::OpenTicket {
            subject: "Appeared meanwhile".to_owned(),
            body: "It broke.".to_owned(),
            customer: None,
        };
        opener
            .handle(CommandEnvelope::new(
                TicketId::new(),
                Agent::new("intake-elsewhere", Role::Intake),
                open,
            ))
            .await
            .expect("the ticket opens");
        let _ = second_sent.send((copy, answered_early));
    });
    let first = h.send(Some("classifier"), claim()).await;
    let (copy, answered_early) = second.await.expect("the second copy was sent");
    let second = match answered_early {
        Some(joined) => joined.expect("the second copy ran"),
        None => copy.await.expect("the second copy ran"),
    };
    assert_eq!(first.status, StatusCode::OK, "the first copy: {}", first.json);
    assert_eq!(second.status, StatusCode::OK, "the second copy: {}", second.json);
    assert_eq!(first.json["claim_id"], second.json["claim_id"]);
    assert_eq!(second.json["duplicate"], true, "{}", second.json);
}

/// A keyed claim whose client hangs up still runs to its end, and the
/// client's retry answers with the claim it took: the claim is not left
/// for its lease to expire unknown, nor a second ticket claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyed_claim_whose_client_hung_up_is_answered_to_the_retry() {
    use triage_event_store::testing::CountingStore;

    let store = Arc::new(CountingStore::new(Arc::new(InMemoryEventStore::new())));
    let h = Harness::on(store.clone());
    h.open("the only ticket").await;
    let claim = || Req::post("/v1/work/claim", json!({"role": "classifier"})).header("idempotency-key", "hung-up");
    let (reached, at_first_look) = tokio::sync::oneshot::channel::<()>();
    let (go_on, go) = tokio::sync::oneshot::channel::<()>();
    store.before_next_read_event(async move {
        let _ = reached.send(());
        let _ = go.await;
    });
    let first = tokio::spawn({
        let h = h.clone();
        async move { h.send(Some("classifier"), claim()).await }
    });
    at_first_look.await.expect("the first copy looks for its claim");
    // The client hangs up: its request is dropped.
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    go_on.send(()).expect("the first copy is still at work");
    let retried = h.send(Some("classifier"), claim()).await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.json);
    assert_eq!(
        retried.json["duplicate"], true,
        "the retry answers with the claim the first copy took: {}",
        retried.json
    );
}

/// Copies `store`'s log into a new store as builds before time-ordered
/// event ids wrote it: each event of a UUIDv7 command with its former id.
async fn with_former_event_ids(store: &Arc<dyn triage_event_store::EventStore>) -> Arc<InMemoryEventStore> {
    use triage_event_store::{EventData, EventStore, ExpectedRevision, ReadAll, StreamName};
    let former = Arc::new(InMemoryEventStore::new());
    let mut next_index: std::collections::HashMap<(String, uuid::Uuid), u32> = Default::default();
    let mut changed = 0;
    for record in store.read_all(ReadAll::forwards(10_000)).await.unwrap() {
        let mut id = record.id;
        if let Ok((_, metadata)) = triage_command_handler::decode_recorded(&record) {
            let index = next_index
                .entry((record.stream.to_string(), metadata.command_id))
                .or_default();
            assert_eq!(id, triage_domain::event_id(metadata.command_id, *index));
            if let Some(former_id) = triage_domain::former_event_id(metadata.command_id, *index) {
                id = former_id;
                changed += 1;
            }
            *index += 1;
        }
        let stream = StreamName::new(record.stream.to_string()).unwrap();
        let expected = match record.revision {
            0 => ExpectedRevision::NoStream,
            revision => ExpectedRevision::Exact(revision - 1),
        };
        let event = EventData {
            id,
            event_type: record.event_type,
            data: record.data,
            metadata: record.metadata,
        };
        former.append(&stream, expected, vec![event]).await.unwrap();
    }
    assert!(changed > 0, "no event of a UUIDv7 command");
    former
}

/// A claim taken with a UUIDv7 key (its claim id) before event ids were
/// time-ordered is found by its id after the upgrade: its release is
/// answered on its ticket, not "claim not found", and a retry of the
/// keyed claim gets the same claim.
#[tokio::test]
async fn a_claim_stored_with_former_event_ids_is_found_after_the_upgrade() {
    let before = Harness::new();
    before.open("first").await;
    before.open("second").await;
    let key = uuid::Uuid::now_v7().to_string();
    let claim = || Req::post("/v1/work/claim", json!({"role": "classifier"})).header("idempotency-key", key.clone());
    let claimed = before.send(Some("classifier"), claim()).await;
    assert_eq!(claimed.status, StatusCode::OK, "{}", claimed.json);
    assert_eq!(claimed.json["claim_id"], json!(key));

    let after = Harness::on(with_former_event_ids(&before.store).await);
    let retried = after.send(Some("classifier"), claim()).await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.json);
    assert_eq!(retried.json["claim_id"], claimed.json["claim_id"]);
    assert_eq!(retried.json["ticket"]["id"], claimed.json["ticket"]["id"]);
    let released = after
        .send(
            Some("classifier"),
            Req::post(
                format!("/v1/claims/{key}/release"),
                json!({"reason": "model timed out"}),
            ),
        )
        .await;
    assert_eq!(released.status, StatusCode::OK, "{}", released.json);
    assert_eq!(released.json["ticket"]["id"], claimed.json["ticket"]["id"]);
    assert_eq!(released.json["ticket"]["state"], "NEW");
}
