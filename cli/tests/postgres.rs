//! The CLI on PostgreSQL: events and read models in one database, each in a
//! schema of its own. Skipped, saying so, without `TRIAGE_PG_URL`.

mod common;

use common::{request, succeed};
use serde_json::Value;

/// The watermark is server-wide: while the test that holds a transaction
/// open runs, no other test here may expect to see its own writes. It
/// takes this lock for writing, the others for reading.
static WATERMARK: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// `TRIAGE_PG_URL`, or `None` after saying that `test` is skipped.
fn pg_url(test: &str) -> Option<String> {
    let url = std::env::var("TRIAGE_PG_URL").ok();
    if url.is_none() {
        eprintln!("skipped: {test} (TRIAGE_PG_URL is not set)");
    }
    url
}

/// A store of the test's own: `url` with a fresh schema; the schema and
/// the store's URL.
fn fresh_store(url: &str) -> (String, String) {
    let schema = format!("cli_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let separator = if url.contains('?') { '&' } else { '?' };
    let store = format!("{url}{separator}schema={schema}");
    (schema, store)
}

/// `args` after `--store store`.
fn on_store<'a>(store: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["--store", store];
    all.extend_from_slice(args);
    all
}

/// Each projection's leader ("" for none) in `projections status --json`.
fn leaders_in(status_lines: &str) -> Vec<String> {
    status_lines
        .lines()
        .map(|line| {
            let status: Value = serde_json::from_str(line).unwrap();
            status["leader"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

fn sharing_the_watermark() -> std::sync::RwLockReadGuard<'static, ()> {
    WATERMARK.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn tickets_and_read_models_live_in_postgresql() {
    let Some(url) = pg_url("tickets_and_read_models_live_in_postgresql") else {
        return;
    };
    let _shared = sharing_the_watermark();
    let (schema, store) = fresh_store(&url);
    let dir = tempfile::tempdir().unwrap();
    let with_store = |args: &[&str]| succeed(dir.path(), &on_store(&store, args));

    let opened: Value = serde_json::from_str(&with_store(&[
        "ticket",
        "open",
        "--subject",
        "Charged twice",
        "--body",
        "March invoice",
        "--json",
    ]))
    .unwrap();
    let id = opened["id"].as_str().unwrap().to_owned();
    assert_eq!(opened["revision"], 0);

    let listed = with_store(&["ticket", "list", "--json"]);
    assert_eq!(listed.lines().count(), 1, "{listed}");
    let row: Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    assert_eq!(row["id"], id.as_str());
    assert_eq!(row["state"], "NEW");

    let statuses = with_store(&["projections", "status", "--json"]);
    for line in statuses.lines() {
        let status: Value = serde_json::from_str(line).unwrap();
        assert_eq!(status["events_applied"], 1, "{status}");
        assert_eq!(status["lag"], 0, "{status}");
    }
    let rebuilt = with_store(&["projections", "rebuild", "--all", "--verify", "--no-progress", "--json"]);
    for line in rebuilt.lines() {
        let report: Value = serde_json::from_str(line).unwrap();
        assert_eq!(report["events"], 1, "{report}");
        assert_eq!(
            report["differences"],
            serde_json::json!([]),
            "verified equal to the live model: {report}"
        );
    }
    assert_eq!(rebuilt.lines().count(), 2, "tickets and stats were rebuilt");

    // Both schemas exist: the events' and the read models' beside them.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let read_schema = format!("{schema}_read");
        let found: i64 = client
            .query_one(
                "SELECT count(*) FROM information_schema.schemata WHERE schema_name IN ($1, $2)",
                &[&schema, &read_schema],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(found, 2);
        client
            .batch_execute(&format!(
                "DROP SCHEMA {schema} CASCADE; DROP SCHEMA {read_schema} CASCADE"
            ))
            .await
            .unwrap();
    });
}

/// Two `triage serve` processes on one PostgreSQL store, with the read
/// models there too (the default): each projection is led by one of them
/// (one may lead both) and both answer from them; SIGKILL a leader and the
/// other takes its projections over and serves what is written afterwards;
/// the live models then equal a clean rebuild.
#[test]
fn two_servers_share_postgresql_read_models_and_the_survivor_takes_over_from_a_killed_leader() {
    let Some(url) = pg_url("two_servers_share_postgresql_read_models_and_the_survivor_takes_over_from_a_killed_leader")
    else {
        return;
    };
    let _shared = sharing_the_watermark();
    let (_, store) = fresh_store(&url);
    let dir = tempfile::tempdir().unwrap();
    let token = succeed(
        dir.path(),
        &["agents", "add", "in", "--role", "intake", "--agents", "a.toml"],
    );
    let token = token.trim();
    let mut servers: Vec<(common::Server, String)> = (0..2)
        .map(|_| common::start_server(dir.path(), &["--store", &store]))
        .collect();
    let subjects = |address: &str| -> Vec<String> {
        let (status, body) = request(address, "GET", "/v1/tickets", token, "");
        assert!(status.contains("200"), "{status} {body}");
        let list: Value = serde_json::from_str(&body).unwrap();
        let mut subjects: Vec<String> = list["tickets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ticket| ticket["subject"].as_str().unwrap().to_owned())
            .collect();
        subjects.sort();
        subjects
    };
    let open = |address: &str, subject: &str| {
        let (status, body) = request(
            address,
            "POST",
            "/v1/tickets",
            token,
            &format!(r#"{{"subject":"{subject}","body":"b"}}"#),
        );
        assert!(status.contains("201"), "{status} {body}");
    };
    open(&servers[0].1, "first");
    for (_, address) in &servers {
        assert_eq!(subjects(address), ["first"], "read through {address}");
    }

    let with_store = |args: &[&str]| succeed(dir.path(), &on_store(&store, args));
    let leaders = || leaders_in(&with_store(&["projections", "status", "--json"]));
    let started = std::time::Instant::now();
    let leader_pid = loop {
        let now = leaders();
        let pids: Vec<u32> = servers.iter().map(|(server, _)| server.0.id()).collect();
        let led_by: Vec<Option<u32>> = now
            .iter()
            .map(|leader| {
                pids.iter()
                    .copied()
                    .find(|pid| leader.starts_with(&format!("pid {pid} ")))
            })
            .collect();
        // Each projection has its own lock: two servers starting together
        // may each take one. Whichever way they split, the survivor of a
        // kill of the first projection's leader must lead them all.
        if let [Some(first), Some(_)] = led_by[..] {
            break first;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "no server leads the projections: {now:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let at = servers
        .iter()
        .position(|(server, _)| server.0.id() == leader_pid)
        .unwrap();
    let (mut leader, _) = servers.remove(at);
    let (mut survivor, address) = servers.remove(0);
    leader.0.kill().unwrap();
    leader.0.wait().unwrap();

    open(&address, "second");
    let started = std::time::Instant::now();
    while subjects(&address) != ["first", "second"] {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the survivor never served the ticket opened after the kill"
        );
    }
    let survivor_prefix = format!("pid {} ", survivor.0.id());
    assert!(
        leaders().iter().all(|leader| leader.starts_with(&survivor_prefix)),
        "the survivor leads: {:?}",
        leaders()
    );
    let table = with_store(&["projections", "status"]);
    assert!(
        table.contains("Leader") && table.contains(survivor_prefix.trim_end()),
        "the table names the leader: {table}"
    );
    let rebuilt = with_store(&["projections", "rebuild", "--all", "--verify", "--no-progress", "--json"]);
    for line in rebuilt.lines() {
        let report: Value = serde_json::from_str(line).unwrap();
        assert_eq!(report["differences"], serde_json::json!([]), "{report}");
    }
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &survivor.0.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(survivor.0.wait().unwrap().success(), "the survivor stops gracefully");
}

/// A leader that is stopped, not dead, keeps its session and so its
/// leadership, and no one takes over: a read then waits for it in vain and
/// answers from models behind the log. It says so on stderr, naming the
/// stuck leader, instead of passing the old answer off as current; once
/// the leader runs again, reads are current again.
#[test]
fn a_read_behind_a_stopped_leader_says_who_leads() {
    let Some(url) = pg_url("a_read_behind_a_stopped_leader_says_who_leads") else {
        return;
    };
    let _shared = sharing_the_watermark();
    let (_, store) = fresh_store(&url);
    let dir = tempfile::tempdir().unwrap();
    succeed(
        dir.path(),
        &["agents", "add", "in", "--role", "intake", "--agents", "a.toml"],
    );
    let with_store = |args: &[&str]| common::triage(dir.path(), &on_store(&store, args));
    assert!(
        with_store(&["ticket", "open", "--subject", "first", "--body", "b"])
            .status
            .success()
    );

    /// Resumes the server however the test ends, before `common::Server`
    /// kills it: a stopped child left behind would hold its leadership
    /// locks for good.
    struct Resumed(common::Server);
    impl Drop for Resumed {
        fn drop(&mut self) {
            let pid = self.0.0.id().to_string();
            let _ = std::process::Command::new("kill").args(["-CONT", &pid]).status();
        }
    }
    let server = Resumed(common::start_server(dir.path(), &["--store", &store]).0);
    let leader = format!("pid {} ", server.0.0.id());
    let started = std::time::Instant::now();
    loop {
        let leaders = leaders_in(&common::stdout(&with_store(&["projections", "status", "--json"])));
        if leaders.len() == 2 && leaders.iter().all(|name| name.starts_with(&leader)) {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "the server never led the projections: {leaders:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let stop = |signal: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([signal, &server.0.0.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    stop("-STOP");
    assert!(
        with_store(&["ticket", "open", "--subject", "second", "--body", "b"])
            .status
            .success()
    );
    let listed = with_store(&["ticket", "list", "--json"]);
    assert!(listed.status.success(), "{}", common::stderr(&listed));
    let stderr = common::stderr(&listed);
    eprintln!("warned: {stderr}");
    assert!(stderr.contains("behind the log"), "{stderr}");
    assert!(stderr.contains(leader.trim_end()), "names the stuck leader: {stderr}");
    assert_eq!(
        common::stdout(&listed).lines().count(),
        1,
        "the answer is from before the stop: {}",
        common::stdout(&listed)
    );

    stop("-CONT");
    let listed = with_store(&["ticket", "list", "--json"]);
    assert_eq!(
        common::stdout(&listed).lines().count(),
        2,
        "current once the leader runs"
    );
    assert!(
        !common::stderr(&listed).contains("behind the log"),
        "{}",
        common::stderr(&listed)
    );
}

/// A transaction left open on the server holds back what readers see (the
/// watermark is server-wide): a read that gives up waiting says so on
/// stderr, with the transaction that holds it back, instead of answering
/// as if nothing had been written.
#[test]
fn a_read_held_back_by_an_open_transaction_says_which_one() {
    let Some(url) = pg_url("a_read_held_back_by_an_open_transaction_says_which_one") else {
        return;
    };
    let _alone = WATERMARK.write().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (_, store) = fresh_store(&url);
    let dir = tempfile::tempdir().unwrap();
    let with_store = |args: &[&str]| common::triage(dir.path(), &on_store(&store, args));
    // The store exists before the transaction begins.
    assert!(
        with_store(&["ticket", "open", "--subject", "before", "--body", "b"])
            .status
            .success()
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let blocker = runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client.batch_execute("BEGIN; SELECT txid_current();").await.unwrap();
        let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
        (client, pid)
    });
    assert!(
        with_store(&["ticket", "open", "--subject", "after", "--body", "b"])
            .status
            .success()
    );
    let listed = with_store(&["events", "--format", "jsonl"]);
    let stderr = common::stderr(&listed);
    assert!(
        stderr.contains("an older transaction on the PostgreSQL server is still open"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {}", blocker.1)),
        "names the blocker: {stderr}"
    );
    assert_eq!(
        common::stdout(&listed).lines().count(),
        1,
        "the event committed after the transaction began is not visible yet"
    );
    runtime.block_on(blocker.0.batch_execute("COMMIT")).unwrap();
    let listed = with_store(&["events", "--format", "jsonl"]);
    assert_eq!(common::stdout(&listed).lines().count(), 2, "visible once it ended");
    assert!(!common::stderr(&listed).contains("still open"));
}

/// A command that only reads does not make a store in a database or
/// schema that has none (a mistyped name would otherwise get one).
#[test]
fn a_reading_command_makes_no_store_where_there_is_none() {
    let Some(url) = pg_url("a_reading_command_makes_no_store_where_there_is_none") else {
        return;
    };
    let _shared = sharing_the_watermark();
    let (schema, store) = fresh_store(&url);
    let dir = tempfile::tempdir().unwrap();
    for args in [&["events"][..], &["ticket", "list"][..], &["stats"][..]] {
        let mut all = vec!["--store", store.as_str()];
        all.extend_from_slice(args);
        let refused = common::fail(dir.path(), &all);
        assert!(
            refused.contains("there is no Triage event store"),
            "{args:?}: {refused}"
        );
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let exists = runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                &[&schema],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    });
    assert!(!exists, "no schema {schema} was made");
    // A schema named twice is refused, by a command that would create.
    let twice = format!("{store}&schema=other");
    let refused = common::fail(
        dir.path(),
        &["--store", &twice, "ticket", "open", "--subject", "S", "--body", "B"],
    );
    assert!(refused.contains("schema= more than once"), "{refused}");
    // Opening a ticket makes the store; then the same commands read it.
    succeed(
        dir.path(),
        &["--store", &store, "ticket", "open", "--subject", "S", "--body", "B"],
    );
    succeed(dir.path(), &["--store", &store, "events"]);
}

/// `triage mcp` on PostgreSQL read models follows the log as `serve` does:
/// with no server running it leads the projections itself, so what it
/// writes is in what it lists.
#[test]
fn mcp_over_stdio_leads_the_postgresql_projections_it_reads() {
    use std::io::{BufRead, BufReader, Write};
    let Some(url) = pg_url("mcp_over_stdio_leads_the_postgresql_projections_it_reads") else {
        return;
    };
    let _shared = sharing_the_watermark();
    let (_, store) = fresh_store(&url);
    let dir = tempfile::tempdir().unwrap();
    let token = succeed(
        dir.path(),
        &["agents", "add", "llm", "--role", "intake", "--agents", "a.toml"],
    );
    let mut child = common::command(dir.path())
        .args(["--store", &store, "mcp", "--agents", "a.toml"])
        .env("TRIAGE_TOKEN", token.trim())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut call = |message: Value| -> Option<Value> {
        writeln!(stdin, "{message}").unwrap();
        stdin.flush().unwrap();
        message.get("id")?;
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        Some(serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON-RPC: {line:?}")))
    };
    call(
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}),
    );
    call(serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    let opened = call(
        serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "open_ticket", "arguments": {"subject": "Over stdio on PostgreSQL", "body": "b"}}}),
    )
    .unwrap();
    assert_eq!(opened["result"]["structuredContent"]["state"], "NEW", "{opened}");
    let listed = call(
        serde_json::json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
        "name": "list_tickets", "arguments": {}}}),
    )
    .unwrap();
    assert!(listed.to_string().contains("Over stdio on PostgreSQL"), "{listed}");

    let prefix = format!("pid {} ", child.id());
    let started = std::time::Instant::now();
    loop {
        let statuses = succeed(dir.path(), &["--store", &store, "projections", "status", "--json"]);
        let leaders: Vec<String> = statuses
            .lines()
            .map(|line| {
                serde_json::from_str::<Value>(line).unwrap()["leader"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        if leaders.iter().all(|leader| leader.starts_with(&prefix)) {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "triage mcp does not lead its projections: {leaders:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(stdin);
    assert!(child.wait().unwrap().success(), "triage mcp ends when stdin closes");
}

/// `demo` on a PostgreSQL store keeps its read models in memory and leaves
/// no read-model schema behind (it made `<schema>_read` with four empty
/// tables); a PostgreSQL --read-model is refused, not ignored.
#[test]
fn the_demo_on_postgresql_makes_no_read_model_schema() {
    let Some(url) = pg_url("the_demo_on_postgresql_makes_no_read_model_schema") else {
        return;
    };
    let _shared = sharing_the_watermark();
    let dir = tempfile::tempdir().unwrap();
    let (schema, store) = fresh_store(&url);
    let out = succeed(
        dir.path(),
        &on_store(
            &store,
            &[
                "demo",
                "--tickets",
                "6",
                "--time-scale",
                "0.002",
                "--no-progress",
                "--json",
            ],
        ),
    );
    let summary: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(summary["audit_passed"], true, "{summary}");
    let refused = common::fail(
        dir.path(),
        &on_store(
            &store,
            &[
                "--read-model",
                &store,
                "demo",
                "--tickets",
                "6",
                "--time-scale",
                "0.002",
                "--no-progress",
            ],
        ),
    );
    assert!(refused.contains("keeps its read models in SQLite"), "{refused}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let read_schema = format!("{schema}_read");
        let found: Vec<String> = client
            .query(
                "SELECT schema_name::text FROM information_schema.schemata WHERE schema_name IN ($1, $2)",
                &[&schema, &read_schema],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; DROP SCHEMA IF EXISTS {read_schema} CASCADE"
            ))
            .await
            .unwrap();
        assert_eq!(found, std::slice::from_ref(&schema), "only the events' schema");
    });
}

/// A URL that leaves the server out is completed from libpq's variables,
/// as `psql` completes it: `--store postgres://?schema=…` with `PGHOST`,
/// `PGPORT`, `PGUSER` and `PGDATABASE` reaches the store the full URL
/// reaches.
#[test]
fn libpq_variables_complete_a_url_that_leaves_the_server_out() {
    let Some(url) = pg_url("libpq_variables_complete_a_url_that_leaves_the_server_out") else {
        return;
    };
    let _shared = sharing_the_watermark();
    let (schema, store) = fresh_store(&url);
    let dir = tempfile::tempdir().unwrap();
    let opened: Value = serde_json::from_str(&succeed(
        dir.path(),
        &on_store(&store, &["ticket", "open", "--subject", "S", "--body", "B", "--json"]),
    ))
    .unwrap();
    let id = opened["id"].as_str().unwrap().to_owned();

    let config: tokio_postgres::Config = url.parse().unwrap();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(name) => name.clone(),
        tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432).to_string();
    // The test URL's own settings (its sslmode, say) stay in the URL.
    let query = url
        .split_once('?')
        .map(|(_, query)| format!("{query}&"))
        .unwrap_or_default();
    let bare = format!("postgres://?{query}schema={schema}");
    let mut command = common::command(dir.path());
    command
        .args(["--store", &bare, "events", "--json"])
        .env("PGHOST", &host)
        .env("PGPORT", &port)
        .env("PGUSER", config.get_user().unwrap_or("postgres"))
        .env("PGDATABASE", config.get_dbname().unwrap_or("postgres"));
    if let Some(password) = config.get_password() {
        command.env("PGPASSWORD", String::from_utf8_lossy(password).as_ref());
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{}", common::stderr(&output));
    let events = common::stdout(&output);
    assert_eq!(events.lines().count(), 1, "{events}");
    let event: Value = serde_json::from_str(events.lines().next().unwrap()).unwrap();
    assert_eq!(event["stream"], format!("ticket-{id}"), "{event}");

    // Without them the same URL names no server, and says so.
    let refused = common::fail(dir.path(), &["--store", &bare, "events"]);
    assert!(refused.contains("host"), "{refused}");
    // A variable that cannot be read is named, not skipped.
    let mut command = common::command(dir.path());
    command.args(["--store", &bare, "events"]).env("PGPORT", "fivefour");
    let output = command.output().unwrap();
    assert!(!output.status.success());
    assert!(
        common::stderr(&output).contains("PGPORT"),
        "{}",
        common::stderr(&output)
    );
}
