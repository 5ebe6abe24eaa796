//! The CLI on PostgreSQL: events and read models in one database, each in a
//! schema of its own. Skipped, saying so, without `TRIAGE_PG_URL`.

mod common;

use common::succeed;
use serde_json::Value;

#[test]
fn tickets_and_read_models_live_in_postgresql() {
    let Ok(url) = std::env::var("TRIAGE_PG_URL") else {
        eprintln!("skipped: tickets_and_read_models_live_in_postgresql (TRIAGE_PG_URL is not set)");
        return;
    };
    let schema = format!("cli_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let separator = if url.contains('?') { '&' } else { '?' };
    let store = format!("{url}{separator}schema={schema}");
    let dir = tempfile::tempdir().unwrap();
    let with_store = |args: &[&str]| {
        let mut all = vec!["--store", store.as_str()];
        all.extend_from_slice(args);
        succeed(dir.path(), &all)
    };

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
