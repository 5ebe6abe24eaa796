//! The real-socket test: many concurrent HTTP clients race on the same
//! tickets — claims, submissions, retries with the same key, stale
//! decisions, late writes after the sweeper expired a claim — then the
//! event log is audited: no lost update, no invalid transition, no
//! duplicate, every acknowledged command stored where it was acknowledged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use triage_api::{AgentsFile, AppState, Authenticator, ServeOptions};
use triage_command_handler::CommandHandler;
use triage_demo::audit::{Acknowledged, audit, logs_from_store};
use triage_domain::{Role, State, TicketId};
use triage_event_store::EventStore;
use triage_projections::{Projector, ReadModelDb};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions};
use uuid::Uuid;

const TICKETS: usize = 12;
const PER_ROLE: usize = 4;

/// What a client was told was accepted, and at which revision.
#[derive(Clone, Debug)]
struct Ack {
    ticket_id: TicketId,
    command_id: Uuid,
    events: usize,
    revision: u64,
}

#[derive(Default)]
struct Tally {
    acks: Vec<Ack>,
    conflicts: usize,
    duplicates: usize,
    late_writes_refused: usize,
    stale_refused: usize,
    unexpected: Vec<String>,
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    tally: Arc<Mutex<Tally>>,
}

impl Client {
    async fn post(&self, path: &str, key: Option<&str>, if_match: Option<u64>, body: Value) -> (StatusCode, Value) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        if let Some(revision) = if_match {
            request = request.header("if-match", format!("\"{revision}\""));
        }
        let response = request.send().await.expect("the server answers");
        let status = response.status();
        let json = if status == StatusCode::NO_CONTENT {
            Value::Null
        } else {
            response.json().await.expect("a JSON body")
        };
        (status, json)
    }

    fn ack(&self, ticket: &Value, command_id: &Value, events: usize, revision: &Value) {
        let ack = Ack {
            ticket_id: ticket.as_str().unwrap().parse().unwrap(),
            command_id: command_id.as_str().unwrap().parse().unwrap(),
            events,
            revision: revision.as_u64().unwrap(),
        };
        self.tally.lock().unwrap().acks.push(ack);
    }

    fn note(&self, what: impl FnOnce(&mut Tally)) {
        what(&mut self.tally.lock().unwrap());
    }

    /// Records a command response; returns it when accepted.
    fn outcome(&self, status: StatusCode, json: &Value) -> Option<Value> {
        match status {
            StatusCode::OK | StatusCode::CREATED => {
                let events = json["events"].as_array().map_or(1, Vec::len);
                self.ack(&json["ticket"]["id"], &json["command_id"], events, &json["revision"]);
                if json["duplicate"] == true {
                    self.note(|t| t.duplicates += 1);
                }
                Some(json.clone())
            }
            StatusCode::CONFLICT => {
                let code = json["code"].as_str().unwrap_or_default().to_owned();
                self.note(|t| match code.as_str() {
                    "lease_expired" | "stale_claim" => t.late_writes_refused += 1,
                    "stale_revision" => t.stale_refused += 1,
                    _ => t.conflicts += 1,
                });
                None
            }
            other => {
                self.note(|t| t.unexpected.push(format!("{other}: {json}")));
                None
            }
        }
    }
}

/// One agent: claim, think, submit; with the failures real agents have.
async fn agent(client: Client, role: Role, index: usize, deadline: Instant) {
    let mut round = 0u64;
    while Instant::now() < deadline {
        round += 1;
        // Every fifth round, a slow agent: a one-second lease it overruns.
        let slow = role != Role::Escalator && (round + index as u64).is_multiple_of(5);
        let claim_key = Uuid::new_v4().to_string();
        let body = json!({"role": role.as_str(), "lease_secs": if slow { 1 } else { 30 }});
        let (status, claim) = client
            .post("/v1/work/claim", Some(&claim_key), None, body.clone())
            .await;
        if status == StatusCode::NO_CONTENT {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if done(&client).await {
                return;
            }
            continue;
        }
        assert_eq!(status, StatusCode::OK, "claim: {claim}");
        client.ack(&claim["ticket"]["id"], &claim["claim_id"], 1, &claim["revision"]);
        // Every third claim is retried with the same key: the same claim.
        if round.is_multiple_of(3) {
            let (again_status, again) = client.post("/v1/work/claim", Some(&claim_key), None, body).await;
            assert_eq!(again_status, StatusCode::OK, "claim retry: {again}");
            assert_eq!(
                again["claim_id"], claim["claim_id"],
                "a retried claim is the same claim"
            );
            assert_eq!(again["duplicate"], true);
            client.note(|t| t.duplicates += 1);
        }
        let ticket = claim["ticket"]["id"].as_str().unwrap().to_owned();
        let revision = claim["revision"].as_u64().unwrap();
        let claim_id = claim["claim_id"].clone();
        // Think.
        if slow {
            tokio::time::sleep(Duration::from_millis(1400)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..15))).await;
        }
        let (path, body) = match role {
            Role::Classifier => (
                "classification",
                json!({"claim_id": claim_id, "category": "billing", "priority": "normal", "confidence": 0.8}),
            ),
            Role::Drafter => (
                "draft",
                json!({"claim_id": claim_id, "body": format!("Draft by {index}")}),
            ),
            _ => ("resolution", json!({"claim_id": claim_id, "resolution": "sent"})),
        };
        let path = format!("/v1/tickets/{ticket}/{path}");
        if slow {
            // The lease ran out while thinking: the late write is refused,
            // whether the sweeper got there first (stale revision) or not
            // (expired lease).
            let (status, json) = client.post(&path, None, Some(revision), body).await;
            assert_eq!(status, StatusCode::CONFLICT, "a late write was accepted: {json}");
            assert!(
                ["stale_revision", "lease_expired", "stale_claim"].contains(&json["code"].as_str().unwrap_or_default()),
                "{json}"
            );
            client.note(|t| t.late_writes_refused += 1);
            continue;
        }
        // A stale decision first, now and then: refused, never applied.
        if round % 4 == 1 && revision > 0 {
            let (status, json) = client.post(&path, None, Some(revision - 1), body.clone()).await;
            assert_eq!(status, StatusCode::CONFLICT, "{json}");
            client.outcome(status, &json);
        }
        let key = Uuid::new_v4().to_string();
        if round.is_multiple_of(2) {
            // The same submission twice at once (a client retry racing the
            // original): both get the one outcome.
            let (a, b) = tokio::join!(
                client.post(&path, Some(&key), Some(revision), body.clone()),
                client.post(&path, Some(&key), Some(revision), body.clone())
            );
            // One is decided and the other answered with its outcome,
            // accepted or refused alike (a refusal, say a stale revision,
            // is recorded under the key too).
            assert_eq!(
                a.0, b.0,
                "two copies of one submission, two answers: {} and {}",
                a.1, b.1
            );
            match (client.outcome(a.0, &a.1), client.outcome(b.0, &b.1)) {
                (Some(first), Some(second)) => {
                    assert_eq!(first["revision"], second["revision"]);
                    assert_eq!(first["command_id"], second["command_id"]);
                }
                (None, None) => assert_eq!(a.1["code"], b.1["code"], "{} and {}", a.1, b.1),
                (first, second) => panic!("two copies of one submission, two answers: {first:?} and {second:?}"),
            }
        } else {
            let (status, json) = client.post(&path, Some(&key), Some(revision), body).await;
            client.outcome(status, &json);
        }
    }
}

async fn list(client: &Client, state: &str) -> Vec<Value> {
    let response = client
        .http
        .get(format!("{}/v1/tickets?state={state}&limit=500", client.base))
        .bearer_auth(&client.token)
        .send()
        .await
        .expect("list");
    let json: Value = response.json().await.expect("json");
    json["tickets"].as_array().cloned().unwrap_or_default()
}

async fn done(client: &Client) -> bool {
    list(client, "RESOLVED").await.len() == TICKETS
}

/// A human operator: resolves the tickets handed to a human (poison
/// tickets whose claims kept expiring), deciding on the revision it saw.
async fn operator(client: Client, deadline: Instant) {
    while Instant::now() < deadline && !done(&client).await {
        for ticket in list(&client, "NEEDS_HUMAN").await {
            let path = format!("/v1/tickets/{}/resolution", ticket["id"].as_str().unwrap());
            let revision = ticket["revision"].as_u64();
            let (status, json) = client
                .post(
                    &path,
                    Some(&Uuid::new_v4().to_string()),
                    revision,
                    json!({"resolution": "called"}),
                )
                .await;
            client.outcome(status, &json);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_http_clients_race_and_the_log_stays_clean() {
    let sqlite = SqliteEventStore::open_temporary_with(SqliteOptions::default()).expect("store");
    let store: Arc<dyn EventStore> = Arc::new(sqlite);
    let projector = Projector::new(store.clone(), ReadModelDb::in_memory().expect("read model"));
    let mut file = AgentsFile::default();
    let mut tokens = HashMap::new();
    let mut roster = vec![
        ("intake".to_owned(), Role::Intake),
        ("operator".to_owned(), Role::Operator),
    ];
    for role in [Role::Classifier, Role::Drafter, Role::Escalator] {
        for index in 0..PER_ROLE {
            roster.push((format!("{role}-{index}"), role));
        }
    }
    for (id, role) in &roster {
        tokens.insert(id.clone(), file.add(id, &[*role]).expect("agent"));
    }
    let state = AppState::new(
        CommandHandler::new(store.clone()),
        projector,
        Authenticator::Fixed(file),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = ServeOptions {
        sweep_interval: Some(Duration::from_millis(100)),
        ..ServeOptions::default()
    };
    let server = tokio::spawn(triage_api::serve(listener, state, options, async {
        let _ = stopped.await;
    }));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let http = reqwest::Client::new();
    let client = |id: &str| Client {
        http: http.clone(),
        base: base.clone(),
        token: tokens[id].clone(),
        tally: tally.clone(),
    };

    // Open the tickets, each retried with its key: one ticket each.
    let intake = client("intake");
    for n in 0..TICKETS {
        let key = format!("open-{n}");
        let body = json!({"subject": format!("Ticket {n}"), "body": "Please help."});
        let (status, first) = intake.post("/v1/tickets", Some(&key), None, body.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "{first}");
        let (_, again) = intake.post("/v1/tickets", Some(&key), None, body).await;
        assert_eq!(again["id"], first["id"]);
        assert_eq!(again["duplicate"], true);
        intake.ack(&first["id"], &first["command_id"], 1, &first["revision"]);
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut agents = Vec::new();
    agents.push(tokio::spawn(operator(client("operator"), deadline)));
    for (index, (id, role)) in roster.iter().enumerate().skip(2) {
        agents.push(tokio::spawn(agent(client(id), *role, index, deadline)));
    }
    for agent in agents {
        agent.await.expect("an agent panicked");
    }
    let all_resolved = done(&intake).await;
    stop.send(()).expect("the server is running");
    server.await.expect("server task").expect("server stopped cleanly");

    drop(intake);
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let logs = logs_from_store(store.as_ref()).await.expect("log readable");
    let acknowledged: Vec<Acknowledged> = tally
        .acks
        .iter()
        .map(|ack| Acknowledged {
            ticket_id: ack.ticket_id,
            command_id: ack.command_id,
            events: ack.events,
        })
        .collect();
    let report = audit(&logs, &acknowledged);
    assert!(report.passed(), "audit failed: {report:#?}");
    assert_eq!(report.lost_updates, 0);
    assert_eq!(report.invalid_transitions, 0);
    assert_eq!(report.duplicate_events, 0);
    assert_eq!(report.missing_events, 0);
    assert_eq!(logs.len(), TICKETS, "a retried open made no second ticket");
    // Every acknowledged command's last event is at the acknowledged
    // revision.
    for ack in &tally.acks {
        let stored = &logs[&ack.ticket_id][ack.revision as usize];
        assert_eq!(stored.metadata.command_id, ack.command_id, "{ack:?}");
    }
    let expired = logs
        .values()
        .flatten()
        .filter(|logged| logged.event.event_type() == "ClaimExpired")
        .count();
    let resolved = logs
        .values()
        .filter(|log| {
            triage_domain::Ticket::from_events(log.iter().map(|logged| &logged.event)).state == Some(State::Resolved)
        })
        .count();
    eprintln!(
        "{} acknowledged, {} duplicates answered, {} stale decisions and {} late writes refused, \
         {} other conflicts, {expired} claims expired, {resolved}/{TICKETS} resolved",
        tally.acks.len(),
        tally.duplicates,
        tally.stale_refused,
        tally.late_writes_refused,
        tally.conflicts
    );
    assert!(
        tally.unexpected.is_empty(),
        "unexpected answers: {:?}",
        tally.unexpected
    );
    assert!(all_resolved, "every ticket was resolved before the deadline");
    assert!(
        tally.duplicates > 0 && tally.stale_refused > 0,
        "the races were exercised"
    );
    assert!(
        expired > 0 && tally.late_writes_refused > 0,
        "slow agents' late writes were refused"
    );
}
