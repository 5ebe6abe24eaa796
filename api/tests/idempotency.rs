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
