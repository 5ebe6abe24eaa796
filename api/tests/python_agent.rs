//! The Python example agent (`examples/agent.py`, standard library only)
//! against a live server on port 0: one agent per role takes three tickets
//! from NEW to RESOLVED. Skipped, with a plain message, without python3.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use triage_api::{AgentsFile, AppState, Authenticator, ServeOptions};
use triage_command_handler::CommandHandler;
use triage_domain::Role;
use triage_event_store::{EventStore, InMemoryEventStore};
use triage_projections::{Projector, ReadModelDb};

const TICKETS: usize = 3;

fn python_available() -> bool {
    std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_agents_finish_tickets() {
    if !python_available() {
        eprintln!("skipped: python3 is not installed, so examples/agent.py cannot run");
        return;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/agent.py");
    assert!(script.exists(), "{} is missing", script.display());
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut file = AgentsFile::default();
    let mut tokens = HashMap::new();
    for (id, role) in [
        ("intake", Role::Intake),
        ("classifier", Role::Classifier),
        ("drafter", Role::Drafter),
        ("escalator", Role::Escalator),
    ] {
        tokens.insert(id, file.add(id, &[role]).unwrap());
    }
    let state = AppState::new(
        CommandHandler::new(store.clone()),
        Projector::new(store.clone(), ReadModelDb::in_memory().unwrap()),
        Authenticator::Fixed(file),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(triage_api::serve(listener, state, ServeOptions::default(), async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    for (subject, body) in [
        ("Charged twice", "I see two charges on my invoice."),
        ("Cannot log in", "My password reset link does not work."),
        ("Site down", "The dashboard is not loading at all."),
    ] {
        let response = http
            .post(format!("{base}/v1/tickets"))
            .bearer_auth(&tokens["intake"])
            .json(&json!({"subject": subject, "body": body}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }
    let mut agents = Vec::new();
    for role in ["classifier", "drafter", "escalator"] {
        let child = tokio::process::Command::new("python3")
            .arg(&script)
            .args(["--url", &base, "--role", role, "--max-tickets", &TICKETS.to_string()])
            .args(["--idle-exit", "20"])
            .env("TRIAGE_TOKEN", &tokens[role])
            .kill_on_drop(true)
            .output();
        agents.push((role, child));
    }
    for (role, child) in agents {
        let output = tokio::time::timeout(Duration::from_secs(60), child)
            .await
            .unwrap_or_else(|_| panic!("the {role} agent did not finish in time"))
            .expect("python3 runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "the {role} agent failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains(&format!("{role} finished {TICKETS} ticket(s)")),
            "{stdout}"
        );
    }
    let resolved: Value = http
        .get(format!("{base}/v1/tickets?state=RESOLVED"))
        .bearer_auth(&tokens["intake"])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let tickets = resolved["tickets"].as_array().unwrap();
    assert_eq!(tickets.len(), TICKETS, "{resolved}");
    assert!(
        tickets
            .iter()
            .all(|t| t["draft"].as_str().is_some_and(|d| d.contains("Thank you")))
    );
    let categories: Vec<&str> = tickets
        .iter()
        .map(|t| t["classification"]["category"].as_str().unwrap())
        .collect();
    for expected in ["billing", "account_access", "outage"] {
        assert!(categories.contains(&expected), "{categories:?}");
    }
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
