//! `triage agents` and `triage serve` through the real binary.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use common::{fail, request, succeed};
use serde_json::Value;

/// A mistyped agents file is an error, not a file with no agents.
#[test]
fn listing_or_revoking_from_a_missing_agents_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["agents", "list", "--agents", "tpyo.toml"][..],
        &["agents", "revoke", "op", "--agents", "tpyo.toml"][..],
    ] {
        let refused = fail(dir.path(), args);
        assert!(
            refused.contains("there is no agents file at tpyo.toml"),
            "{args:?}: {refused}"
        );
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no file was created");
}

#[test]
fn agents_add_list_and_revoke_store_only_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let token = succeed(
        dir.path(),
        &["agents", "add", "drafter-1", "--role", "drafter", "--agents", "a.toml"],
    );
    let token = token.trim();
    assert!(token.starts_with("trg_"), "{token}");
    let file = std::fs::read_to_string(dir.path().join("a.toml")).unwrap();
    assert!(!file.contains(token), "the token itself is never stored");
    assert!(file.contains("drafter-1"));
    let added: Value = serde_json::from_str(&succeed(
        dir.path(),
        &[
            "agents", "add", "op", "--role", "operator", "--role", "intake", "--agents", "a.toml", "--json",
        ],
    ))
    .unwrap();
    assert_eq!(added["roles"], serde_json::json!(["operator", "intake"]));
    let listed = succeed(dir.path(), &["agents", "list", "--agents", "a.toml", "--json"]);
    let rows: Vec<Value> = listed.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    assert!(!listed.contains("trg_"), "list never shows tokens");
    assert!(
        fail(
            dir.path(),
            &["agents", "add", "op", "--role", "operator", "--agents", "a.toml"]
        )
        .contains("exists")
    );
    assert!(
        fail(
            dir.path(),
            &["agents", "add", "x", "--role", "system", "--agents", "a.toml"]
        )
        .contains("system")
    );
    let revoked: Value = serde_json::from_str(&succeed(
        dir.path(),
        &["agents", "revoke", "op", "--agents", "a.toml", "--json"],
    ))
    .unwrap();
    assert_eq!(revoked, serde_json::json!({"agent": "op", "revoked": true}));
    let listed = succeed(dir.path(), &["agents", "list", "--agents", "a.toml", "--json"]);
    assert!(
        listed
            .lines()
            .any(|l| l.contains("\"op\"") && !l.contains("\"revoked_at\":null"))
    );
    assert!(fail(dir.path(), &["agents", "revoke", "nobody", "--agents", "a.toml"]).contains("nobody"));
}

/// `triage agents` commands run at once (a provisioning script in
/// parallel) each keep the others' changes: every added agent is stored,
/// and a revocation among them holds.
#[test]
fn agents_commands_at_once_lose_no_change() {
    let dir = tempfile::tempdir().unwrap();
    succeed(
        dir.path(),
        &["agents", "add", "victim", "--role", "intake", "--agents", "a.toml"],
    );
    let mut running: Vec<std::process::Child> = (0..16)
        .map(|n| {
            common::command(dir.path())
                .args([
                    "agents",
                    "add",
                    &format!("agent-{n}"),
                    "--role",
                    "drafter",
                    "--agents",
                    "a.toml",
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    running.push(
        common::command(dir.path())
            .args(["agents", "revoke", "victim", "--agents", "a.toml"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    for mut child in running {
        assert!(child.wait().unwrap().success());
    }
    let listed = succeed(dir.path(), &["--json", "agents", "list", "--agents", "a.toml"]);
    let agents: Vec<Value> = listed.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(agents.len(), 17, "{listed}");
    let victim = agents.iter().find(|agent| agent["id"] == "victim").unwrap();
    assert!(!victim["revoked_at"].is_null(), "the revocation holds: {victim}");
}

#[test]
fn serve_refuses_to_start_without_an_agents_file() {
    let dir = tempfile::tempdir().unwrap();
    let error = fail(
        dir.path(),
        &["serve", "--listen", "127.0.0.1:0", "--agents", "none.toml"],
    );
    assert!(error.contains("triage agents add"), "{error}");
}

#[test]
fn serve_answers_on_a_free_port_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let token = succeed(
        dir.path(),
        &["agents", "add", "in", "--role", "intake", "--agents", "a.toml"],
    );
    let (mut server, address) = common::start_server(dir.path(), &[]);
    let (status, body) = request(
        &address,
        "POST",
        "/v1/tickets",
        token.trim(),
        r#"{"subject":"Hello","body":"It broke"}"#,
    );
    assert!(status.contains("201"), "{status} {body}");
    let (status, _) = request(&address, "GET", "/v1/tickets", "trg_wrong", "");
    assert!(status.contains("401"), "{status}");
    let (status, _) = request(&address, "GET", "/readyz", "", "");
    assert!(status.contains("200"), "{status}");
    let pid = server.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let exit = server.0.wait().unwrap();
    assert!(exit.success(), "graceful shutdown exits 0: {exit:?}");
    // The ticket is in the store the CLI reads.
    let listed = succeed(dir.path(), &["ticket", "list", "--json"]);
    assert!(listed.contains("Hello"), "{listed}");
}

#[test]
fn mcp_over_stdio_lists_the_tools_as_the_tokens_agent() {
    let dir = tempfile::tempdir().unwrap();
    let token = succeed(
        dir.path(),
        &["agents", "add", "llm", "--role", "intake", "--agents", "a.toml"],
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_triage"))
        .current_dir(dir.path())
        .args(["mcp", "--agents", "a.toml"])
        .env("TRIAGE_TOKEN", token.trim())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut send = |message: Value| {
        writeln!(stdin, "{message}").unwrap();
        stdin.flush().unwrap();
    };
    let mut receive = || {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        serde_json::from_str::<Value>(&line).unwrap_or_else(|_| panic!("not JSON-RPC: {line:?}"))
    };
    send(
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "cli-test", "version": "0"}}}),
    );
    let initialized = receive();
    assert_eq!(initialized["id"], 1, "{initialized}");
    assert!(
        initialized["result"]["capabilities"]["tools"].is_object(),
        "{initialized}"
    );
    send(serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    send(serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}));
    let tools = receive();
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("{tools}"))
        .iter()
        .map(|tool| tool["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"claim_work") && names.contains(&"open_ticket"),
        "{names:?}"
    );
    send(
        serde_json::json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
        "name": "open_ticket", "arguments": {"subject": "Over stdio", "body": "b"}}}),
    );
    let opened = receive();
    assert_eq!(opened["result"]["structuredContent"]["state"], "NEW", "{opened}");
    // Closing stdin is how the client hangs up.
    drop(stdin);
    let status = child.wait().unwrap();
    assert!(status.success(), "triage mcp ends when stdin closes: {status:?}");
    assert!(succeed(dir.path(), &["ticket", "list", "--json"]).contains("Over stdio"));
    // Opened as the token's agent, not as the CLI's.
    let ticket = opened["result"]["structuredContent"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{opened}"))
        .to_owned();
    let history = succeed(dir.path(), &["ticket", "history", &ticket, "--json"]);
    let first: Value = serde_json::from_str(history.lines().next().expect("the opening is in the history")).unwrap();
    assert_eq!(
        first["agent"],
        serde_json::json!({"id": "llm", "role": "intake"}),
        "{first}"
    );
}

#[test]
fn mcp_refuses_an_unknown_token() {
    let dir = tempfile::tempdir().unwrap();
    succeed(
        dir.path(),
        &["agents", "add", "x", "--role", "intake", "--agents", "a.toml"],
    );
    let output = Command::new(env!("CARGO_BIN_EXE_triage"))
        .current_dir(dir.path())
        .args(["mcp", "--agents", "a.toml", "--token", "trg_nope"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown or revoked"));
}
