//! Router-level tests: every endpoint and every error, through
//! `router(state).oneshot(request)`.

mod support;

use axum::http::StatusCode;
use serde_json::{Value, json};
use support::{Harness, Req};

fn id(ticket: &Value) -> String {
    ticket["ticket"]["id"].as_str().expect("ticket id").to_owned()
}

/// Opens a ticket and claims it for classification.
async fn claimed(h: &Harness) -> (String, Value) {
    h.open("Cannot log in").await;
    let claim = h.claim("classifier", "classifier").await;
    assert_eq!(claim.status, StatusCode::OK, "{}", claim.json);
    (id(&claim.json), claim.json)
}

/// A ticket with a draft waiting for review: claimed and classified, then
/// claimed and drafted.
async fn draft_ready(h: &Harness) -> String {
    let (ticket, claim) = claimed(h).await;
    let classified = h
        .send(
            Some("classifier"),
            Req::post(format!("/v1/tickets/{ticket}/classification"), classification(&claim)),
        )
        .await;
    assert_eq!(classified.status, StatusCode::OK, "{}", classified.json);
    let drafting = h.claim("drafter", "drafter").await;
    let drafted = h
        .send(
            Some("drafter"),
            Req::post(
                format!("/v1/tickets/{ticket}/draft"),
                json!({"claim_id": drafting.json["claim_id"], "body": "Draft one"}),
            ),
        )
        .await;
    assert_eq!(drafted.json["ticket"]["state"], "DRAFT_READY", "{}", drafted.json);
    ticket
}

/// Resolves `ticket` as `agent` without naming a claim (an operator's
/// override) and checks that it is resolved.
async fn resolve_without_a_claim(h: &Harness, agent: &str, ticket: &str) {
    let resolved = h
        .send(
            Some(agent),
            Req::post(
                format!("/v1/tickets/{ticket}/resolution"),
                json!({"resolution": "called them"}),
            ),
        )
        .await;
    assert_eq!(resolved.json["ticket"]["state"], "RESOLVED", "{}", resolved.json);
}

fn classification(claim: &Value) -> Value {
    json!({"claim_id": claim["claim_id"], "category": "account_access", "priority": "high", "confidence": 0.9})
}

#[tokio::test]
async fn opening_a_ticket_returns_201_with_id_state_and_revision() {
    let h = Harness::new();
    let reply = h
        .send(
            Some("intake"),
            Req::post(
                "/v1/tickets",
                json!({"subject": "Refund", "body": "Charged twice", "customer": "a@example.com"}),
            ),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.json);
    let ticket = &reply.json;
    assert_eq!(ticket["state"], "NEW");
    assert_eq!(ticket["revision"], 0);
    assert_eq!(ticket["customer"], "a@example.com");
    assert_eq!(reply.json["duplicate"], false);
    assert_eq!(reply.headers["etag"], "\"0\"");
    assert_eq!(
        reply.headers["location"].to_str().unwrap(),
        format!("/v1/tickets/{}", ticket["id"].as_str().unwrap())
    );
    // Operators may open tickets too.
    let by_operator = h
        .send(
            Some("operator"),
            Req::post("/v1/tickets", json!({"subject": "s", "body": "b"})),
        )
        .await;
    assert_eq!(by_operator.status, StatusCode::CREATED);
}

#[tokio::test]
async fn no_token_or_an_unknown_token_is_401() {
    let h = Harness::new();
    let reply = h.send(None, Req::get("/v1/tickets")).await;
    reply.assert_problem(StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(reply.headers["www-authenticate"], "Bearer");
    let bad = h
        .send(
            None,
            Req::get("/v1/stats").header("authorization", "Bearer trg_not_a_token"),
        )
        .await;
    bad.assert_problem(StatusCode::UNAUTHORIZED, "unauthorized");
    let opened = h
        .send(None, Req::post("/v1/tickets", json!({"subject": "s", "body": "b"})))
        .await;
    opened.assert_problem(StatusCode::UNAUTHORIZED, "unauthorized");
}

#[tokio::test]
async fn roles_follow_the_transition_table() {
    let h = Harness::new();
    for agent in ["analyst", "drafter", "classifier"] {
        let reply = h
            .send(
                Some(agent),
                Req::post("/v1/tickets", json!({"subject": "s", "body": "b"})),
            )
            .await;
        reply.assert_problem(StatusCode::FORBIDDEN, "role_not_allowed");
        assert_eq!(reply.json["allowed_roles"], json!(["intake", "operator"]));
    }
    let (ticket, claim) = claimed(&h).await;
    // A drafter cannot classify.
    let reply = h
        .send(
            Some("drafter"),
            Req::post(format!("/v1/tickets/{ticket}/classification"), classification(&claim)),
        )
        .await;
    reply.assert_problem(StatusCode::FORBIDDEN, "role_not_allowed");
    // An analyst is read-only: it may read but claims nothing; the roles
    // that claim work are named.
    let analyst = h.claim("analyst", "analyst").await;
    analyst.assert_problem(StatusCode::FORBIDDEN, "role_not_allowed");
    assert_eq!(
        analyst.json["allowed_roles"],
        json!(["classifier", "drafter", "escalator", "operator"])
    );
    let read = h.send(Some("analyst"), Req::get(format!("/v1/tickets/{ticket}"))).await;
    assert_eq!(read.status, StatusCode::OK);
    // A token cannot claim for a role it does not carry: claiming as a
    // classifier takes a classifier's token.
    let drafter = h.claim("drafter", "classifier").await;
    drafter.assert_problem(StatusCode::FORBIDDEN, "role_not_allowed");
    assert_eq!(drafter.json["allowed_roles"], json!(["classifier"]));
}

#[tokio::test]
async fn malformed_json_is_400_a_wrong_shape_422_and_no_json_415() {
    let h = Harness::new();
    let reply = h
        .send(
            Some("intake"),
            Req::raw("POST", "/v1/tickets", b"{\"subject\": ".to_vec()),
        )
        .await;
    reply.assert_problem(StatusCode::BAD_REQUEST, "malformed_json");
    let reply = h
        .send(
            Some("intake"),
            Req::post("/v1/tickets", json!({"subject": 5, "body": "b"})),
        )
        .await;
    reply.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
    let reply = h
        .send(
            Some("intake"),
            Req::post("/v1/tickets", json!({"subject": "s", "body": "b", "extra": 1})),
        )
        .await;
    reply.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
    // Every body is an object: serde would read a struct from an array of
    // its fields, and open a ticket from ["s", "b", null].
    for body in [json!(["s", "b", null]), json!([]), json!("s"), json!(null)] {
        let reply = h.send(Some("intake"), Req::post("/v1/tickets", body.clone())).await;
        reply.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
        let detail = reply.json["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("expected a JSON object"), "{body}: {}", reply.json);
    }
    let reply = h
        .send(
            Some("intake"),
            Req::post("/v1/claims/6b1d0d0e-0000-4000-8000-000000000000/heartbeat", json!([30])),
        )
        .await;
    reply.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
    let reply = h
        .send(
            Some("intake"),
            Req::raw("POST", "/v1/tickets", b"subject=s".to_vec()).header("content-type", "text/plain"),
        )
        .await;
    reply.assert_problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    // A compressed body is an encoding the API does not take, not
    // malformed JSON.
    let reply = h
        .send(
            Some("intake"),
            Req::raw("POST", "/v1/tickets", vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3])
                .header("content-type", "application/json")
                .header("content-encoding", "gzip"),
        )
        .await;
    reply.assert_problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    assert!(
        reply.json["detail"]
            .as_str()
            .unwrap()
            .contains("Content-Encoding \"gzip\""),
        "{}",
        reply.json
    );
    // Two retry keys are ambiguous.
    let reply = h
        .send(
            Some("intake"),
            Req::post("/v1/tickets", json!({"subject": "s", "body": "b"}))
                .header("idempotency-key", "first")
                .header("idempotency-key", "second"),
        )
        .await;
    reply.assert_problem(StatusCode::BAD_REQUEST, "invalid_header");
    let listed = h.send(Some("analyst"), Req::get("/v1/tickets")).await;
    assert_eq!(listed.json["tickets"], json!([]), "nothing was opened");
}

#[tokio::test]
async fn an_oversized_body_is_413_and_overlong_strings_422() {
    let h = Harness::new();
    let huge = "x".repeat(h.state.limits().max_body_bytes + 1);
    let reply = h
        .send(
            Some("intake"),
            Req::post("/v1/tickets", json!({"subject": "s", "body": huge})),
        )
        .await;
    reply.assert_problem(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert!(
        reply.json["detail"]
            .as_str()
            .unwrap()
            .contains(&h.state.limits().max_body_bytes.to_string())
    );
    let long_subject = "s".repeat(201);
    let reply = h
        .send(
            Some("intake"),
            Req::post("/v1/tickets", json!({"subject": long_subject, "body": "b"})),
        )
        .await;
    reply.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
    // The refused opening created no ticket, and the problem names none.
    assert!(reply.json.get("ticket_id").is_none_or(Value::is_null), "{}", reply.json);
    let reply = h
        .send(
            Some("intake"),
            Req::post("/v1/tickets", json!({"subject": "s", "body": "b"})).header("idempotency-key", "k".repeat(201)),
        )
        .await;
    reply.assert_problem(StatusCode::BAD_REQUEST, "invalid_header");
}

#[tokio::test]
async fn get_a_ticket_with_its_revision_as_etag_and_unknown_tickets_are_404() {
    let h = Harness::new();
    let opened = h.open("Hello").await;
    let ticket = opened["id"].as_str().unwrap().to_owned();
    let reply = h.send(Some("analyst"), Req::get(format!("/v1/tickets/{ticket}"))).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json["subject"], "Hello");
    assert_eq!(reply.headers["etag"], "\"0\"");
    let unknown = uuid::Uuid::new_v4();
    h.send(Some("analyst"), Req::get(format!("/v1/tickets/{unknown}")))
        .await
        .assert_problem(StatusCode::NOT_FOUND, "ticket_not_found");
    h.send(Some("analyst"), Req::get(format!("/v1/tickets/{unknown}/events")))
        .await
        .assert_problem(StatusCode::NOT_FOUND, "ticket_not_found");
    h.send(Some("analyst"), Req::get("/v1/tickets/not-a-uuid"))
        .await
        .assert_problem(StatusCode::BAD_REQUEST, "invalid_path");
    // A segment that does not decode to UTF-8 is a problem document too,
    // on reads and on commands.
    h.send(Some("analyst"), Req::get("/v1/tickets/%FF"))
        .await
        .assert_problem(StatusCode::BAD_REQUEST, "invalid_path");
    h.send(
        Some("operator"),
        Req::post("/v1/tickets/%FF/resolution", serde_json::json!({"resolution": "done"})),
    )
    .await
    .assert_problem(StatusCode::BAD_REQUEST, "invalid_path");
    // Commands on an unknown ticket are 404 too.
    h.send(
        Some("operator"),
        Req::post(
            format!("/v1/tickets/{unknown}/resolution"),
            json!({"resolution": "done"}),
        ),
    )
    .await
    .assert_problem(StatusCode::NOT_FOUND, "ticket_not_found");
}

#[tokio::test]
async fn list_by_state_events_and_stats() {
    let h = Harness::new();
    h.open("one").await;
    h.open("two").await;
    let (ticket, _claim) = claimed(&h).await;
    let new = h.send(Some("analyst"), Req::get("/v1/tickets?state=NEW")).await;
    assert_eq!(new.status, StatusCode::OK);
    assert_eq!(new.json["tickets"].as_array().unwrap().len(), 2);
    let claimed_list = h.send(Some("analyst"), Req::get("/v1/tickets?state=classifying")).await;
    assert_eq!(claimed_list.json["tickets"].as_array().unwrap().len(), 1);
    let all = h.send(Some("analyst"), Req::get("/v1/tickets?limit=2")).await;
    assert_eq!(all.json["tickets"].as_array().unwrap().len(), 2);
    h.send(Some("analyst"), Req::get("/v1/tickets?state=SLEEPING"))
        .await
        .assert_problem(StatusCode::BAD_REQUEST, "invalid_query");
    h.send(Some("analyst"), Req::get("/v1/tickets?limit=many"))
        .await
        .assert_problem(StatusCode::BAD_REQUEST, "invalid_query");
    let events = h
        .send(Some("analyst"), Req::get(format!("/v1/tickets/{ticket}/events")))
        .await;
    assert_eq!(events.status, StatusCode::OK);
    let types: Vec<&str> = events.json["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["TicketOpened", "ClassificationStarted"]);
    assert_eq!(events.json["events"][1]["agent_id"], "classifier");
    let stats = h.send(Some("analyst"), Req::get("/v1/stats")).await;
    assert_eq!(stats.status, StatusCode::OK);
    assert_eq!(stats.json["tickets_per_state"]["NEW"], 2);
    assert_eq!(stats.json["tickets_per_state"]["CLASSIFYING"], 1);
}

#[tokio::test]
async fn long_lists_come_in_pages_that_miss_and_repeat_nothing() {
    let h = Harness::new();
    // One clock reading for all: the pages are told apart by ticket id.
    let mut opened = Vec::new();
    for subject in ["a", "b", "c", "d", "e"] {
        opened.push(h.open(subject).await["id"].as_str().unwrap().to_owned());
    }
    let page = |uri: String| {
        let h = &h;
        async move {
            let reply = h.send(Some("analyst"), Req::get(uri)).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.json);
            let ids: Vec<String> = reply.json["tickets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|ticket| ticket["id"].as_str().expect("ticket id").to_owned())
                .collect();
            (ids, reply.json["next"].as_str().map(str::to_owned))
        }
    };
    for query in ["state=NEW&", ""] {
        let mut seen = Vec::new();
        let (first, mut next) = page(format!("/v1/tickets?{query}limit=2")).await;
        assert_eq!(first.len(), 2);
        seen.extend(first);
        let mut pages = 1;
        while let Some(cursor) = next {
            if pages == 1 && query.is_empty() {
                // Opened while paging, later than the others: it comes at
                // the end, once.
                h.clock.advance(chrono::Duration::seconds(1));
                opened.push(h.open("f").await["id"].as_str().unwrap().to_owned());
            }
            let (ids, after) = page(format!("/v1/tickets?{query}limit=2&after={cursor}")).await;
            assert!(!ids.is_empty(), "a cursor was given for an empty page");
            seen.extend(ids);
            next = after;
            pages += 1;
        }
        let mut expected = opened.clone();
        expected.sort();
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(sorted, expected, "every ticket once ({query})");
        assert_eq!(pages, expected.len().div_ceil(2), "{query}");
    }
    let (all, next) = page("/v1/tickets?limit=500".to_owned()).await;
    assert_eq!((all.len(), next), (6, None), "one page holds them all");
    for bad in [
        "nonsense",
        "all.12.not-a-uuid",
        "all.x.0a7b2f2e-3f59-4c8e-9a39-7d7f8f0f4c11",
        "SLEEPING.12.0a7b2f2e-3f59-4c8e-9a39-7d7f8f0f4c11",
        // Another list's cursor: its list is sorted on another time.
        "NEW.12.0a7b2f2e-3f59-4c8e-9a39-7d7f8f0f4c11",
    ] {
        h.send(Some("analyst"), Req::get(format!("/v1/tickets?after={bad}")))
            .await
            .assert_problem(StatusCode::BAD_REQUEST, "invalid_query");
    }
    // A page of none would say the list is empty: refused.
    h.send(Some("analyst"), Req::get("/v1/tickets?limit=0"))
        .await
        .assert_problem(StatusCode::BAD_REQUEST, "invalid_query");
}

#[tokio::test]
async fn claiming_is_200_with_the_claim_then_204_when_nothing_waits() {
    let h = Harness::new();
    h.claim("classifier", "classifier").await.assert_problem_or_204();
    let opened = h.open("Work").await;
    let reply = h.claim("classifier", "classifier").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json);
    assert_eq!(reply.json["ticket"]["id"], opened["id"]);
    assert_eq!(reply.json["ticket"]["state"], "CLASSIFYING");
    assert_eq!(reply.json["revision"], 1);
    assert_eq!(reply.json["ticket"]["claim"]["claim_id"], reply.json["claim_id"]);
    assert!(reply.json["lease_expires_at"].is_string());
    assert_eq!(
        h.claim("classifier-2", "classifier").await.status,
        StatusCode::NO_CONTENT
    );
    h.send(
        Some("classifier"),
        Req::post("/v1/work/claim", json!({"role": "wizard"})),
    )
    .await
    .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
}

/// Claimers racing for one ticket: one gets it, the others are told
/// there is no work, and no refusal is recorded for the tries they lost,
/// which no client was ever answered with. (The winner's append is held
/// for 100 ms, time for the other claimers to read the queue and try.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claimers_racing_for_one_ticket_leave_no_refusal_records() {
    use triage_event_store::testing::CountingStore;
    use triage_event_store::{EventStore, InMemoryEventStore, ReadStream, StreamName};
    let store = std::sync::Arc::new(CountingStore::new(std::sync::Arc::new(InMemoryEventStore::new())));
    let h = std::sync::Arc::new(Harness::on(store.clone() as std::sync::Arc<dyn EventStore>));
    let opened = h.open("Work").await;
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    store.before_next_append(async move {
        let _ = released.await;
    });
    let racing: Vec<_> = (0..8)
        .map(|n| {
            let h = h.clone();
            let agent = if n % 2 == 0 { "classifier" } else { "classifier-2" };
            tokio::spawn(async move { h.claim(agent, "classifier").await })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    release.send(()).unwrap();
    let mut claimed = 0;
    for racer in racing {
        let reply = racer.await.unwrap();
        match reply.status {
            StatusCode::OK => claimed += 1,
            StatusCode::NO_CONTENT => {}
            other => panic!("{other}: {}", reply.json),
        }
    }
    assert_eq!(claimed, 1);
    let ticket: triage_domain::TicketId = opened["id"].as_str().unwrap().parse().unwrap();
    let rejections = StreamName::new(triage_domain::CommandRejected::stream_name(ticket)).unwrap();
    let records = store.read_stream(&rejections, ReadStream::forwards()).await;
    assert!(records.is_err(), "refusals recorded: {records:?}");
}

trait NoContent {
    fn assert_problem_or_204(&self);
}

impl NoContent for support::Reply {
    fn assert_problem_or_204(&self) {
        assert_eq!(self.status, StatusCode::NO_CONTENT, "{}", self.json);
        assert_eq!(self.json, Value::Null);
    }
}

#[tokio::test]
async fn a_ticket_goes_from_new_to_resolved_through_the_api() {
    let h = Harness::new();
    let (ticket, claim) = claimed(&h).await;
    let classified = h
        .send(
            Some("classifier"),
            Req::post(format!("/v1/tickets/{ticket}/classification"), classification(&claim))
                .header("if-match", "\"1\""),
        )
        .await;
    assert_eq!(classified.status, StatusCode::OK, "{}", classified.json);
    assert_eq!(classified.json["ticket"]["state"], "CLASSIFIED");
    assert_eq!(classified.json["events"], json!(["TicketClassified"]));
    assert_eq!(classified.headers["etag"], "\"2\"");
    let drafting = h.claim("drafter", "drafter").await;
    assert_eq!(drafting.status, StatusCode::OK, "{}", drafting.json);
    let drafted = h
        .send(
            Some("drafter"),
            Req::post(
                format!("/v1/tickets/{ticket}/draft"),
                json!({"claim_id": drafting.json["claim_id"], "body": "Reset your password here."}),
            ),
        )
        .await;
    assert_eq!(drafted.json["ticket"]["state"], "DRAFT_READY", "{}", drafted.json);
    let review = h.claim("escalator", "escalator").await;
    assert_eq!(review.status, StatusCode::OK);
    let resolved = h
        .send(
            Some("escalator"),
            Req::post(
                format!("/v1/tickets/{ticket}/resolution"),
                json!({"claim_id": review.json["claim_id"], "resolution": "sent"}),
            )
            .header("if-match", review.json["revision"].to_string()),
        )
        .await;
    assert_eq!(resolved.status, StatusCode::OK, "{}", resolved.json);
    assert_eq!(resolved.json["ticket"]["state"], "RESOLVED");
    // Nothing leaves RESOLVED: a rejected transition is a 409 with the state.
    let again = h
        .send(
            Some("operator"),
            Req::post(
                format!("/v1/tickets/{ticket}/resolution"),
                json!({"resolution": "again"}),
            ),
        )
        .await;
    again.assert_problem(StatusCode::CONFLICT, "invalid_transition");
    assert_eq!(again.json["state"], "RESOLVED");
    assert_eq!(again.json["revision"], 6);
}

#[tokio::test]
async fn escalation_rejection_and_operator_resolution() {
    let h = Harness::new();
    let ticket = draft_ready(&h).await;
    let review = h.claim("escalator", "escalator").await;
    let rejected = h
        .send(
            Some("escalator"),
            Req::post(
                format!("/v1/tickets/{ticket}/rejection"),
                json!({"claim_id": review.json["claim_id"], "reason": "too terse"}),
            ),
        )
        .await;
    assert_eq!(rejected.json["ticket"]["state"], "CLASSIFIED", "{}", rejected.json);
    assert_eq!(rejected.json["ticket"]["drafts_rejected"], 1, "{}", rejected.json);
    let drafting = h.claim("drafter", "drafter").await;
    h.send(
        Some("drafter"),
        Req::post(
            format!("/v1/tickets/{ticket}/draft"),
            json!({"claim_id": drafting.json["claim_id"], "body": "Draft two"}),
        ),
    )
    .await;
    let review = h.claim("escalator", "escalator").await;
    // An escalation without a reason field is a shape error.
    h.send(
        Some("escalator"),
        Req::post(
            format!("/v1/tickets/{ticket}/escalation"),
            json!({"claim_id": review.json["claim_id"]}),
        ),
    )
    .await
    .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
    let escalated = h
        .send(
            Some("escalator"),
            Req::post(
                format!("/v1/tickets/{ticket}/escalation"),
                json!({"claim_id": review.json["claim_id"], "reason": "legal question"}),
            ),
        )
        .await;
    assert_eq!(escalated.json["ticket"]["state"], "NEEDS_HUMAN", "{}", escalated.json);
    // An escalator cannot resolve without a claim; an operator can.
    h.send(
        Some("escalator"),
        Req::post(format!("/v1/tickets/{ticket}/resolution"), json!({"resolution": "x"})),
    )
    .await
    .assert_problem(StatusCode::FORBIDDEN, "role_not_allowed");
    resolve_without_a_claim(&h, "operator", &ticket).await;
}

/// A token with the escalator and the operator role, whose escalator
/// claim the sweeper expired: its late resolution under that claim is 409
/// lease_expired, not an operator's override (which names no claim).
#[tokio::test]
async fn a_late_write_by_a_token_that_is_also_an_operator_is_still_fenced() {
    const BOTH: &[triage_domain::Role] = &[triage_domain::Role::Escalator, triage_domain::Role::Operator];
    let h = Harness::with_agents(
        std::sync::Arc::new(triage_event_store::InMemoryEventStore::new()),
        &[("opesc", BOTH)],
    );
    let ticket = draft_ready(&h).await;
    let review = h.claim("opesc", "escalator").await;
    assert_eq!(review.status, StatusCode::OK, "{}", review.json);
    h.clock.advance(chrono::Duration::seconds(3_600));
    assert_eq!(triage_api::sweeper::sweep_once(&h.state, 10).await.unwrap(), 1);
    let late = h
        .send(
            Some("opesc"),
            Req::post(
                format!("/v1/tickets/{ticket}/resolution"),
                json!({"claim_id": review.json["claim_id"], "resolution": "late answer"}),
            ),
        )
        .await;
    late.assert_problem(StatusCode::CONFLICT, "lease_expired");
    // Without a claim it is the operator's override, and it resolves.
    resolve_without_a_claim(&h, "opesc", &ticket).await;
}

/// An Idempotency-Key replays its request; the same key asking for another
/// lease is another request (422), on a claim as on a heartbeat.
#[tokio::test]
async fn the_same_key_with_another_lease_is_422() {
    let h = Harness::new();
    h.open("Cannot log in").await;
    let claim = |lease: u32| {
        Req::post("/v1/work/claim", json!({"role": "classifier", "lease_secs": lease}))
            .header("idempotency-key", "claim-a")
    };
    let first = h.send(Some("classifier"), claim(5)).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.json);
    let again = h.send(Some("classifier"), claim(5)).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.json);
    assert_eq!(again.json["duplicate"], true);
    assert_eq!(again.json["lease_expires_at"], first.json["lease_expires_at"]);
    let reused = h.send(Some("classifier"), claim(50)).await;
    reused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    // The key is not a UUID: the detail does not pass the command id
    // derived from it off as the key, and says nothing was applied.
    let detail = reused.json["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("this Idempotency-Key was already used for a different request (command ")
            && detail.ends_with("this one was not applied"),
        "{detail}"
    );
    let claim_id = first.json["claim_id"].as_str().unwrap().to_owned();
    let heartbeat = |lease: u32| {
        Req::post(format!("/v1/claims/{claim_id}/heartbeat"), json!({"lease_secs": lease}))
            .header("idempotency-key", "beat-1")
    };
    let beat = h.send(Some("classifier"), heartbeat(30)).await;
    assert_eq!(beat.status, StatusCode::OK, "{}", beat.json);
    h.send(Some("classifier"), heartbeat(300))
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
}

/// A key used on one ticket and sent to another is 422, not the refusal the
/// other ticket's state would give.
#[tokio::test]
async fn a_key_used_on_another_ticket_is_422() {
    let h = Harness::new();
    let (first, claim) = claimed(&h).await;
    let classify = |ticket: &str| {
        Req::post(format!("/v1/tickets/{ticket}/classification"), classification(&claim))
            .header("idempotency-key", "ck1")
    };
    let done = h.send(Some("classifier"), classify(&first)).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.json);
    let other = h.open("Refund").await;
    let other = other["id"].as_str().unwrap();
    h.send(Some("classifier"), classify(other))
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    // The first ticket still replays it.
    let replayed = h.send(Some("classifier"), classify(&first)).await;
    assert_eq!(replayed.status, StatusCode::OK, "{}", replayed.json);
    assert_eq!(replayed.json["duplicate"], true);
}

/// A lease out of range is refused before a ticket is picked: 422 also
/// when nothing waits, and no refusal is recorded against a ticket.
#[tokio::test]
async fn a_claim_with_a_lease_out_of_range_is_422_before_any_ticket_is_picked() {
    let h = Harness::new();
    let claim = |lease: u32| Req::post("/v1/work/claim", json!({"role": "drafter", "lease_secs": lease}));
    h.send(Some("drafter"), claim(0))
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
    h.open("Cannot log in").await;
    let refused = h
        .send(
            Some("classifier"),
            Req::post("/v1/work/claim", json!({"role": "classifier", "lease_secs": 100_000})),
        )
        .await;
    refused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
    assert!(
        refused.json.get("ticket_id").is_none_or(Value::is_null),
        "{}",
        refused.json
    );
    let rejections = h
        .store
        .read_all(triage_event_store::ReadAll::forwards(1000))
        .await
        .unwrap()
        .into_iter()
        .filter(|record| record.stream.as_str().starts_with("rejections-"))
        .count();
    assert_eq!(rejections, 0);
}

/// A heartbeat's body is JSON as on every endpoint: declared as such, with
/// nothing after it; no body at all, or `null`, is the default lease.
#[tokio::test]
async fn a_heartbeat_body_is_json_or_nothing() {
    let h = Harness::new();
    let (_, claim) = claimed(&h).await;
    let claim_id = claim["claim_id"].as_str().unwrap();
    let uri = format!("/v1/claims/{claim_id}/heartbeat");
    h.send(
        Some("classifier"),
        Req::raw("POST", uri.clone(), br#"{"lease_secs":30}"#.to_vec()).header("content-type", "text/plain"),
    )
    .await
    .assert_problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    h.send(
        Some("classifier"),
        Req::raw("POST", uri.clone(), br#"{"lease_secs":30} and more"#.to_vec())
            .header("content-type", "application/json"),
    )
    .await
    .assert_problem(StatusCode::BAD_REQUEST, "malformed_json");
    let fine = h
        .send(
            Some("classifier"),
            Req::raw("POST", uri.clone(), br#"{"lease_secs":30}"#.to_vec())
                .header("content-type", "application/json; charset=utf-8"),
        )
        .await;
    assert_eq!(fine.status, StatusCode::OK, "{}", fine.json);
    let empty = h
        .send(Some("classifier"), Req::raw("POST", uri.clone(), Vec::new()))
        .await;
    assert_eq!(empty.status, StatusCode::OK, "{}", empty.json);
    // JSON null, which the OpenAPI document allows, is the default lease too.
    let null = h
        .send(
            Some("classifier"),
            Req::raw("POST", uri, b"null".to_vec()).header("content-type", "application/json"),
        )
        .await;
    assert_eq!(null.status, StatusCode::OK, "{}", null.json);
    assert_eq!(null.json["events"], json!(["LeaseExtended"]));
}

/// A ticket's events come a page at a time: 500 at most, with where the
/// next page starts.
#[tokio::test]
async fn a_tickets_events_come_in_pages() {
    let h = Harness::new();
    let (ticket, claim) = claimed(&h).await;
    let claim_id = claim["claim_id"].as_str().unwrap();
    for _ in 0..510 {
        let beat = h
            .send(
                Some("classifier"),
                Req::post(format!("/v1/claims/{claim_id}/heartbeat"), json!({"lease_secs": 60})),
            )
            .await;
        assert_eq!(beat.status, StatusCode::OK, "{}", beat.json);
    }
    let first = h
        .send(Some("analyst"), Req::get(format!("/v1/tickets/{ticket}/events")))
        .await;
    assert_eq!(first.json["events"].as_array().unwrap().len(), 500);
    assert_eq!(first.json["next_revision"], 500);
    let rest = h
        .send(
            Some("analyst"),
            Req::get(format!("/v1/tickets/{ticket}/events?from_revision=500")),
        )
        .await;
    // Opened, claimed, 510 heartbeats: revisions 0 to 511.
    assert_eq!(rest.json["events"].as_array().unwrap().len(), 12, "{}", rest.json);
    assert_eq!(rest.json["events"][0]["revision"], 500);
    assert!(rest.json["next_revision"].is_null());
    let few = h
        .send(
            Some("analyst"),
            Req::get(format!("/v1/tickets/{ticket}/events?from_revision=2&limit=3")),
        )
        .await;
    let revisions: Vec<_> = few.json["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["revision"].clone())
        .collect();
    assert_eq!(revisions, [json!(2), json!(3), json!(4)]);
    assert_eq!(few.json["next_revision"], 5);
    // A stale If-Match far behind gets the first page of the events since,
    // and where the rest start.
    let stale = h
        .send(
            Some("classifier"),
            Req::post(format!("/v1/tickets/{ticket}/classification"), classification(&claim))
                .header("if-match", "\"0\""),
        )
        .await;
    stale.assert_problem(StatusCode::CONFLICT, "stale_revision");
    assert_eq!(stale.json["revision"], 511);
    let since = stale.json["events"].as_array().unwrap();
    assert_eq!(since.len(), 500);
    assert_eq!(since[0]["revision"], 1);
    assert_eq!(stale.json["next_revision"], 501, "the rest start there");
    h.send(
        Some("analyst"),
        Req::get(format!("/v1/tickets/{ticket}/events?limit=many")),
    )
    .await
    .assert_problem(StatusCode::BAD_REQUEST, "invalid_query");
    h.send(
        Some("analyst"),
        Req::get(format!("/v1/tickets/{ticket}/events?limit=0")),
    )
    .await
    .assert_problem(StatusCode::BAD_REQUEST, "invalid_query");
}

#[tokio::test]
async fn a_stale_if_match_is_409_with_state_revision_and_the_events_since() {
    let h = Harness::new();
    let (ticket, claim) = claimed(&h).await;
    // Decided on revision 0 (before the claim): stale.
    let reply = h
        .send(
            Some("classifier"),
            Req::post(format!("/v1/tickets/{ticket}/classification"), classification(&claim))
                .header("if-match", "\"0\""),
        )
        .await;
    reply.assert_problem(StatusCode::CONFLICT, "stale_revision");
    assert_eq!(reply.json["state"], "CLASSIFYING");
    assert_eq!(reply.json["revision"], 1);
    assert_eq!(reply.json["ticket_id"], ticket);
    let events = reply.json["events"].as_array().expect("events since");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "ClassificationStarted");
    assert_eq!(events[0]["revision"], 1);
    assert!(reply.json["next_revision"].is_null(), "all of them fit");
    // A revision the ticket has not reached is no old decision: said so,
    // with nothing since (and no revision follows the largest one).
    for ahead in ["\"5\"", "\"18446744073709551615\""] {
        let reply = h
            .send(
                Some("classifier"),
                Req::post(format!("/v1/tickets/{ticket}/classification"), classification(&claim))
                    .header("if-match", ahead),
            )
            .await;
        reply.assert_problem(StatusCode::CONFLICT, "stale_revision");
        assert_eq!(reply.json["revision"], 1);
        assert_eq!(reply.json["events"], json!([]), "{ahead}: {}", reply.json);
        let detail = reply.json["detail"].as_str().unwrap();
        assert!(detail.contains("a revision the ticket has not reached"), "{detail}");
    }
    h.send(
        Some("classifier"),
        Req::post(format!("/v1/tickets/{ticket}/classification"), classification(&claim)).header("if-match", "soon"),
    )
    .await
    .assert_problem(StatusCode::BAD_REQUEST, "invalid_header");
    // Nothing was written.
    let now = h.send(Some("analyst"), Req::get(format!("/v1/tickets/{ticket}"))).await;
    assert_eq!(now.json["revision"], 1);
}

#[tokio::test]
async fn a_write_under_an_expired_claim_is_409_and_fencing_holds() {
    let h = Harness::new();
    let (ticket, claim) = claimed(&h).await;
    // Another classifier cannot complete someone else's claim.
    h.send(
        Some("classifier-2"),
        Req::post(format!("/v1/tickets/{ticket}/classification"), classification(&claim)),
    )
    .await
    .assert_problem(StatusCode::CONFLICT, "not_claim_holder");
    h.clock.advance(chrono::Duration::seconds(61));
    let reply = h
        .send(
            Some("classifier"),
            Req::post(format!("/v1/tickets/{ticket}/classification"), classification(&claim)),
        )
        .await;
    reply.assert_problem(StatusCode::CONFLICT, "lease_expired");
    assert_eq!(reply.json["state"], "CLASSIFYING");
    // When the lease ran out: a field for programs, RFC 3339 in the detail
    // too. The claim's lease was 60 s from the claim, 61 s ago.
    let expired_at: chrono::DateTime<chrono::Utc> = reply.json["lease_expired_at"]
        .as_str()
        .unwrap_or_else(|| panic!("no lease_expired_at: {}", reply.json))
        .parse()
        .unwrap();
    let now = triage_command_handler::Clock::now(&*h.clock);
    assert_eq!(now - expired_at, chrono::Duration::seconds(1), "{}", reply.json);
    let detail = reply.json["detail"].as_str().unwrap();
    assert!(
        detail.contains(&expired_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        "{detail}"
    );
    // A claim that is not the current one is stale.
    let mut other = classification(&claim);
    other["claim_id"] = json!(uuid::Uuid::new_v4());
    h.send(
        Some("classifier"),
        Req::post(format!("/v1/tickets/{ticket}/classification"), other),
    )
    .await
    .assert_problem(StatusCode::CONFLICT, "stale_claim");
}

/// After the sweeper expired the claim (the ticket is back in the queue),
/// the late write is still told its lease expired, and when; a release
/// then a late write is told the claim is stale. Nothing is appended.
#[tokio::test]
async fn a_late_write_after_the_claim_ended_says_how_it_ended() {
    let h = Harness::new();
    let (ticket, claim) = claimed(&h).await;
    h.clock.advance(chrono::Duration::seconds(61));
    assert_eq!(triage_api::sweeper::sweep_once(&h.state, 10).await.unwrap(), 1);
    let late = h
        .send(
            Some("classifier"),
            Req::post(format!("/v1/tickets/{ticket}/classification"), classification(&claim)),
        )
        .await;
    late.assert_problem(StatusCode::CONFLICT, "lease_expired");
    assert_eq!(late.json["state"], "NEW");
    let detail = late.json["detail"].as_str().unwrap();
    assert!(
        detail.contains(claim["claim_id"].as_str().unwrap()) && detail.contains("expired at"),
        "{detail}"
    );

    let again = h.claim("classifier", "classifier").await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.json);
    let again_id = again.json["claim_id"].as_str().unwrap().to_owned();
    let released = h
        .send(
            Some("classifier"),
            Req::post(
                format!("/v1/claims/{again_id}/release"),
                json!({"reason": "model down"}),
            ),
        )
        .await;
    assert_eq!(released.status, StatusCode::OK, "{}", released.json);
    h.send(
        Some("classifier"),
        Req::post(
            format!("/v1/tickets/{ticket}/classification"),
            classification(&again.json),
        ),
    )
    .await
    .assert_problem(StatusCode::CONFLICT, "stale_claim");
    // A claim this ticket never had: the transition is what is wrong.
    let mut unknown = classification(&claim);
    unknown["claim_id"] = json!(uuid::Uuid::new_v4());
    h.send(
        Some("classifier"),
        Req::post(format!("/v1/tickets/{ticket}/classification"), unknown),
    )
    .await
    .assert_problem(StatusCode::CONFLICT, "invalid_transition");
    let events = h
        .send(Some("analyst"), Req::get(format!("/v1/tickets/{ticket}/events")))
        .await;
    assert_eq!(events.json["events"].as_array().unwrap().len(), 5, "{}", events.json);
}

#[tokio::test]
async fn the_same_key_and_body_replays_and_a_different_body_is_422() {
    let h = Harness::new();
    let open = |subject: &str| {
        Req::post("/v1/tickets", json!({"subject": subject, "body": "b"})).header("idempotency-key", "open-1")
    };
    let first = h.send(Some("intake"), open("Same")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = h.send(Some("intake"), open("Same")).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.json["id"], first.json["id"]);
    assert_eq!(again.json["command_id"], first.json["command_id"]);
    assert_eq!(again.json["duplicate"], true);
    h.send(Some("intake"), open("Different"))
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");

    let (ticket, claim) = claimed(&h).await;
    let key = uuid::Uuid::new_v4().to_string();
    let send = |body: Value| {
        Req::post(format!("/v1/tickets/{ticket}/classification"), body).header("idempotency-key", key.clone())
    };
    let first = h.send(Some("classifier"), send(classification(&claim))).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.json);
    assert_eq!(first.json["command_id"], key);
    let retry = h.send(Some("classifier"), send(classification(&claim))).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(retry.json["duplicate"], true);
    assert_eq!(retry.json["revision"], first.json["revision"]);
    let mut different = classification(&claim);
    different["category"] = json!("billing");
    h.send(Some("classifier"), send(different))
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    // The same key on another ticket is a reuse too.
    let other = h.open("Other").await["id"].as_str().unwrap().to_owned();
    h.send(
        Some("operator"),
        Req::post(format!("/v1/tickets/{other}/resolution"), json!({"resolution": "x"}))
            .header("idempotency-key", key.clone()),
    )
    .await
    .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    // A keyed claim retried returns the same claim.
    let claim_req = || Req::post("/v1/work/claim", json!({"role": "drafter"})).header("idempotency-key", "claim-7");
    let claimed = h.send(Some("drafter"), claim_req()).await;
    assert_eq!(claimed.status, StatusCode::OK, "{}", claimed.json);
    let retried = h.send(Some("drafter"), claim_req()).await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.json);
    assert_eq!(retried.json["claim_id"], claimed.json["claim_id"]);
    assert_eq!(retried.json["duplicate"], true);
    let events = h
        .send(Some("analyst"), Req::get(format!("/v1/tickets/{ticket}/events")))
        .await;
    assert_eq!(events.json["events"].as_array().unwrap().len(), 4, "one claim, not two");
}

#[tokio::test]
async fn release_and_heartbeat_act_on_the_claims_ticket() {
    let h = Harness::new();
    let (ticket, claim) = claimed(&h).await;
    let claim_id = claim["claim_id"].as_str().unwrap();
    let before = claim["lease_expires_at"].as_str().unwrap().to_owned();
    h.clock.advance(chrono::Duration::seconds(30));
    let beat = h
        .send(
            Some("classifier"),
            Req::raw("POST", format!("/v1/claims/{claim_id}/heartbeat"), Vec::new()),
        )
        .await;
    assert_eq!(beat.status, StatusCode::OK, "{}", beat.json);
    assert_eq!(beat.json["events"], json!(["LeaseExtended"]));
    let after = beat.json["ticket"]["claim"]["lease_expires_at"].as_str().unwrap();
    assert!(after > before.as_str(), "{after} should be after {before}");
    let beat = h
        .send(
            Some("classifier"),
            Req::post(format!("/v1/claims/{claim_id}/heartbeat"), json!({"lease_secs": 120})),
        )
        .await;
    assert_eq!(beat.status, StatusCode::OK, "{}", beat.json);
    // A heartbeat moves the ticket on; If-Match is checked on it as on
    // every command (it was ignored, even when not a revision at all).
    let revision = beat.json["revision"].as_u64().unwrap();
    let with_if_match =
        |tag: String| Req::raw("POST", format!("/v1/claims/{claim_id}/heartbeat"), Vec::new()).header("If-Match", tag);
    h.send(Some("classifier"), with_if_match(format!("\"{}\"", revision - 1)))
        .await
        .assert_problem(StatusCode::CONFLICT, "stale_revision");
    h.send(Some("classifier"), with_if_match("soon".to_owned()))
        .await
        .assert_problem(StatusCode::BAD_REQUEST, "invalid_header");
    let beat = h
        .send(Some("classifier"), with_if_match(format!("\"{revision}\"")))
        .await;
    assert_eq!(beat.status, StatusCode::OK, "{}", beat.json);
    assert_eq!(beat.json["revision"], revision + 1);
    // Someone else's heartbeat is fenced off.
    h.send(
        Some("classifier-2"),
        Req::raw("POST", format!("/v1/claims/{claim_id}/heartbeat"), Vec::new()),
    )
    .await
    .assert_problem(StatusCode::CONFLICT, "not_claim_holder");
    h.send(
        Some("drafter"),
        Req::post(format!("/v1/claims/{claim_id}/release"), json!({"reason": "x"})),
    )
    .await
    .assert_problem(StatusCode::FORBIDDEN, "role_not_allowed");
    let released = h
        .send(
            Some("classifier"),
            Req::post(
                format!("/v1/claims/{claim_id}/release"),
                json!({"reason": "model timed out"}),
            ),
        )
        .await;
    assert_eq!(released.status, StatusCode::OK, "{}", released.json);
    assert_eq!(released.json["ticket"]["state"], "NEW");
    assert_eq!(released.json["ticket"]["attempts"], 1);
    assert_eq!(released.json["ticket"]["id"], ticket);
    let unknown = uuid::Uuid::new_v4();
    h.send(
        Some("classifier"),
        Req::post(format!("/v1/claims/{unknown}/release"), json!({"reason": "x"})),
    )
    .await
    .assert_problem(StatusCode::NOT_FOUND, "claim_not_found");
    h.send(
        Some("classifier"),
        Req::raw("POST", format!("/v1/claims/{unknown}/heartbeat"), b"{nope".to_vec()),
    )
    .await
    .assert_problem(StatusCode::BAD_REQUEST, "malformed_json");
}

/// A keyed release whose answer was lost is retried after the server
/// restarted (a new instance over the same log): the claim has ended, and
/// the retry still gets the original outcome, not a 404.
#[tokio::test]
async fn a_retried_release_after_a_restart_returns_the_original_outcome() {
    let first = Harness::new();
    let (ticket, claim) = claimed(&first).await;
    let claim_id = claim["claim_id"].as_str().unwrap();
    let release = || {
        Req::post(
            format!("/v1/claims/{claim_id}/release"),
            json!({"reason": "model timed out"}),
        )
        .header("idempotency-key", "release-1")
    };
    let released = first.send(Some("classifier"), release()).await;
    assert_eq!(released.status, StatusCode::OK, "{}", released.json);
    assert_eq!(released.json["duplicate"], false);

    let restarted = Harness::on(first.store.clone());
    let retried = restarted.send(Some("classifier"), release()).await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.json);
    assert_eq!(retried.json["duplicate"], true);
    assert_eq!(retried.json["ticket"]["id"], ticket);
    assert_eq!(retried.json["revision"], released.json["revision"]);
}

/// A keyed claim retried after a restart, once the work it claimed has
/// moved on, answers with that claim: it never claims a second ticket
/// under the same claim id.
#[tokio::test]
async fn a_retried_claim_after_a_restart_never_claims_a_second_ticket() {
    retry_a_completed_claim_after_a_restart(std::sync::Arc::new(triage_event_store::InMemoryEventStore::new())).await;
}

/// A ticket whose stream holds an event this version cannot read (one
/// the projector was told to skip) cannot have its claim expired; the
/// sweep passes it over and still expires the claims behind it.
#[tokio::test]
async fn the_sweeper_passes_over_a_ticket_it_cannot_read() {
    let options = triage_projections::ProjectorOptions {
        skip_event_types: ["TicketTeleported".to_owned()].into(),
        ..triage_projections::ProjectorOptions::default()
    };
    let h = Harness::with_options(
        std::sync::Arc::new(triage_event_store::InMemoryEventStore::new()),
        &[],
        options,
    );
    // Claimed first, so its lease runs out first and a sweep meets it first.
    let (unreadable, _) = claimed(&h).await;
    h.clock.advance(chrono::Duration::seconds(1));
    let (readable, _) = claimed(&h).await;
    let stream = triage_event_store::StreamName::new(format!("ticket-{unreadable}")).unwrap();
    // An event of a type this version does not know, with the metadata
    // every event carries (as a newer Triage would write it).
    let metadata = h
        .store
        .read_stream(&stream, triage_event_store::ReadStream::forwards())
        .await
        .unwrap()
        .pop()
        .unwrap()
        .metadata;
    h.store
        .append(
            &stream,
            triage_event_store::ExpectedRevision::Any,
            vec![triage_event_store::EventData {
                id: uuid::Uuid::new_v4(),
                event_type: "TicketTeleported".to_owned(),
                data: br#"{"to":"elsewhere"}"#.to_vec(),
                metadata,
            }],
        )
        .await
        .unwrap();
    h.clock.advance(chrono::Duration::seconds(61));
    assert_eq!(triage_api::sweeper::sweep_once(&h.state, 10).await.unwrap(), 1);
    let now = h
        .send(Some("analyst"), Req::get(format!("/v1/tickets/{readable}")))
        .await;
    assert_eq!(now.json["state"], "NEW", "{}", now.json);
    // Nothing was written to the ticket it could not read.
    let stored = h
        .store
        .read_stream(&stream, triage_event_store::ReadStream::forwards())
        .await
        .unwrap();
    assert_eq!(stored.last().unwrap().event_type, "TicketTeleported");
}

/// The restart case above on a store without an index of event ids
/// (KurrentDB): the claim completed, so the read model no longer lists it,
/// and the restarted server remembers nothing; the retry still answers
/// with the first ticket, found through the claim's index stream.
#[tokio::test]
async fn a_retried_claim_after_a_restart_never_claims_a_second_ticket_without_an_id_index() {
    let store: std::sync::Arc<dyn triage_event_store::EventStore> = std::sync::Arc::new(
        triage_event_store::testing::CountingStore::new(std::sync::Arc::new(
            triage_event_store::InMemoryEventStore::new(),
        ))
        .without_id_index(),
    );
    retry_a_completed_claim_after_a_restart(store).await;
}

#[tokio::test]
async fn the_sweeper_expires_claims_through_the_domain() {
    let h = Harness::new();
    let (ticket, _claim) = claimed(&h).await;
    assert_eq!(triage_api::sweeper::sweep_once(&h.state, 10).await.unwrap(), 0);
    h.clock.advance(chrono::Duration::seconds(61));
    assert_eq!(triage_api::sweeper::sweep_once(&h.state, 10).await.unwrap(), 1);
    // A second sweep (another instance, say) finds nothing to do.
    assert_eq!(triage_api::sweeper::sweep_once(&h.state, 10).await.unwrap(), 0);
    let now = h.send(Some("analyst"), Req::get(format!("/v1/tickets/{ticket}"))).await;
    assert_eq!(now.json["state"], "NEW");
    assert_eq!(now.json["attempts"], 1);
    let events = h
        .send(Some("analyst"), Req::get(format!("/v1/tickets/{ticket}/events")))
        .await;
    assert_eq!(events.json["events"][2]["type"], "ClaimExpired");
    assert_eq!(events.json["events"][2]["role"], "system");
}

#[tokio::test]
async fn openapi_health_and_unknown_routes() {
    let h = Harness::new();
    let doc = h.send(None, Req::get("/openapi.json")).await;
    assert_eq!(doc.status, StatusCode::OK);
    assert!(doc.json["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in [
        "/v1/tickets",
        "/v1/tickets/{id}",
        "/v1/tickets/{id}/events",
        "/v1/stats",
        "/v1/work/claim",
        "/v1/tickets/{id}/classification",
        "/v1/tickets/{id}/draft",
        "/v1/tickets/{id}/escalation",
        "/v1/tickets/{id}/resolution",
        "/v1/claims/{claim_id}/release",
        "/v1/claims/{claim_id}/heartbeat",
    ] {
        assert!(
            doc.json["paths"][path].is_object(),
            "{path} is missing from the OpenAPI document"
        );
    }
    assert!(doc.json["components"]["schemas"]["Problem"].is_object());
    assert!(doc.json["components"]["securitySchemes"]["bearer"].is_object());
    // What the command endpoints answer for an unknown ticket or a body
    // that is not JSON is in the document.
    for path in ["draft", "escalation", "resolution", "rejection"] {
        let responses = &doc.json["paths"][format!("/v1/tickets/{{id}}/{path}")]["post"]["responses"];
        for status in ["400", "404", "413", "415"] {
            assert!(responses[status].is_object(), "{path}: no {status} in {responses}");
        }
    }
    // A page of none is refused, and the document says so.
    let limit = doc.json["paths"]["/v1/tickets"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|parameter| parameter["name"] == "limit")
        .unwrap()
        .clone();
    assert_eq!(limit["schema"]["minimum"], 1, "{limit}");
    // Every operation of the JSON API lists the problems any request can
    // get, and every one with a body those of bodies.
    for (path, item) in doc.json["paths"].as_object().unwrap() {
        if !path.starts_with("/v1/") {
            continue;
        }
        for (method, operation) in item.as_object().unwrap() {
            let responses = &operation["responses"];
            let with_body = ["408", "413", "415", "422"];
            let expected = ["400", "401", "503"]
                .iter()
                .chain(with_body.iter().filter(|_| method == "post"));
            for status in expected {
                assert_eq!(
                    responses[status]["content"]["application/problem+json"]["schema"]["$ref"],
                    "#/components/schemas/Problem",
                    "{method} {path}: no {status} problem in {responses}"
                );
            }
        }
    }
    // The health probes need no token.
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(doc.json["paths"][probe]["get"]["security"], json!([{}]), "{probe}");
    }
    let health = h.send(None, Req::get("/healthz")).await;
    assert_eq!(health.status, StatusCode::OK);
    let ready = h.send(None, Req::get("/readyz")).await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "read models not built yet"
    );
    h.state.catch_up().await.unwrap();
    let ready = h.send(None, Req::get("/readyz")).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.json);
    assert_eq!(ready.json["status"], "ready", "{}", ready.json);
    let names: Vec<&str> = ready.json["projections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|projection| projection["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tickets", "stats"], "{}", ready.json);
    // A projection stopped on an event it cannot read: reads go on, stale,
    // and the probe says so in its body (it said "ready").
    h.store
        .append(
            &triage_event_store::StreamName::new(format!("ticket-{}", uuid::Uuid::now_v7())).unwrap(),
            triage_event_store::ExpectedRevision::NoStream,
            vec![triage_event_store::testing::event("FromANewerTriage")],
        )
        .await
        .unwrap();
    assert!(h.state.catch_up().await.is_err(), "the projection stops on it");
    let ready = h.send(None, Req::get("/readyz")).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.json);
    assert_eq!(ready.json["status"], "degraded", "{}", ready.json);
    assert_eq!(ready.json["projections"][0]["stopped"], true, "{}", ready.json);
    assert_eq!(ready.json["projections"][0]["behind"], true, "{}", ready.json);
    h.send(Some("analyst"), Req::get("/v2/nothing"))
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");
    h.send(Some("analyst"), Req::raw("DELETE", "/v1/tickets", Vec::new()))
        .await
        .assert_problem(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    h.state.drain().await;
    let ready = h.send(None, Req::get("/readyz")).await;
    ready.assert_problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    h.send(
        Some("intake"),
        Req::post("/v1/tickets", json!({"subject": "s", "body": "b"})),
    )
    .await
    .assert_problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
}

/// A store that takes no writes (a standby, a read-only database) answers
/// reads and refuses every command: `/readyz` says 503, not ready.
#[tokio::test]
async fn readyz_is_unavailable_on_a_store_that_takes_no_writes() {
    let memory: std::sync::Arc<dyn triage_event_store::EventStore> =
        std::sync::Arc::new(triage_event_store::InMemoryEventStore::new());
    let h = Harness::on(std::sync::Arc::new(
        triage_event_store::testing::CountingStore::new(memory).read_only(),
    ));
    h.state.catch_up().await.unwrap();
    let ready = h.send(None, Req::get("/readyz")).await;
    ready.assert_problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(
        ready.json["detail"].as_str().unwrap().contains("takes no writes"),
        "{}",
        ready.json
    );
}

/// Claims with a key, completes the claim, restarts the server on
/// `store` and retries the claim: the retry answers with the first ticket
/// and never claims the other one waiting.
async fn retry_a_completed_claim_after_a_restart(store: std::sync::Arc<dyn triage_event_store::EventStore>) {
    let first = Harness::on(store.clone());
    first.open("Cannot log in").await;
    let claim = || Req::post("/v1/work/claim", json!({"role": "classifier"})).header("idempotency-key", "claim-1");
    let claimed = first.send(Some("classifier"), claim()).await;
    assert_eq!(claimed.status, StatusCode::OK, "{}", claimed.json);
    let ticket = id(&claimed.json);
    let classified = first
        .send(
            Some("classifier"),
            Req::post(
                format!("/v1/tickets/{ticket}/classification"),
                classification(&claimed.json),
            ),
        )
        .await;
    assert_eq!(classified.status, StatusCode::OK, "{}", classified.json);
    let other = first.open("Refund").await;

    let restarted = Harness::on(store);
    let retried = restarted.send(Some("classifier"), claim()).await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.json);
    assert_eq!(retried.json["claim_id"], claimed.json["claim_id"]);
    assert_eq!(retried.json["duplicate"], true);
    assert_eq!(id(&retried.json), ticket);
    let other = other["id"].as_str().unwrap();
    let events = restarted
        .send(Some("analyst"), Req::get(format!("/v1/tickets/{other}/events")))
        .await;
    assert_eq!(events.json["events"].as_array().unwrap().len(), 1, "{}", events.json);
}

/// A ticket reads the same folded from its stream as in a list from the
/// read models, times included (both to the microsecond).
#[tokio::test]
async fn a_ticket_reads_the_same_alone_and_in_a_list() {
    let h = Harness::new();
    let (ticket, claim) = claimed(&h).await;
    assert_eq!(
        claim["lease_expires_at"], claim["ticket"]["claim"]["lease_expires_at"],
        "the claim's lease reads the same in the claim and in its ticket"
    );
    let alone = h.send(Some("analyst"), Req::get(format!("/v1/tickets/{ticket}"))).await;
    assert_eq!(alone.status, StatusCode::OK);
    let listed = h.send(Some("analyst"), Req::get("/v1/tickets")).await;
    assert_eq!(listed.status, StatusCode::OK);
    let in_list = listed.json["tickets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["id"] == ticket.as_str())
        .expect("listed")
        .clone();
    for field in ["created_at", "updated_at", "revision", "state"] {
        assert_eq!(alone.json[field], in_list[field], "{field}");
    }
    assert_eq!(alone.json["claim"], in_list["claim"], "the claim and its lease");
}
