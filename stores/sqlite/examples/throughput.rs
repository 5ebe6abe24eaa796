//! A rough throughput check, not the benchmark harness: `agents` tasks each
//! run commands (read a short stream, append one event with `Exact`) against
//! a fresh temporary store, with group commit and then with one commit per
//! append.
//!
//! `cargo run --release -p triage-store-sqlite --example throughput [agents] [commands]`

use std::sync::Arc;
use std::time::Instant;

use triage_event_store::{Error, EventData, EventStore, ExpectedRevision, ReadStream, StreamName};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions};
use uuid::Uuid;

/// Commands per stream before an agent opens the next one: tickets are short.
const STREAM_LENGTH: usize = 8;

async fn command(store: &SqliteEventStore, stream: &StreamName) -> Result<(), Error> {
    let expected = match store.read_stream(stream, ReadStream::forwards()).await {
        Ok(events) => ExpectedRevision::Exact(events.last().map_or(0, |event| event.revision)),
        Err(Error::StreamNotFound { .. }) => ExpectedRevision::NoStream,
        Err(other) => return Err(other),
    };
    let event = EventData {
        id: Uuid::new_v4(),
        event_type: "TicketTouched".to_owned(),
        data: br#"{"note":"a typical small JSON payload of about a hundred bytes, give or take a few"}"#.to_vec(),
        metadata: br#"{"agent":"bench","command_id":"00000000-0000-0000-0000-000000000000"}"#.to_vec(),
    };
    store.append(stream, expected, vec![event]).await.map(|_| ())
}

async fn run(options: SqliteOptions, agents: usize, commands: usize) -> Result<f64, Error> {
    let store = Arc::new(SqliteEventStore::open_temporary_with(options)?);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for agent in 0..agents {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for index in 0..commands / agents {
                let stream = StreamName::new(format!("ticket-{agent}-{}", index / STREAM_LENGTH))?;
                command(&store, &stream).await?;
            }
            Ok::<(), Error>(())
        }));
    }
    for task in tasks {
        task.await.expect("agent task")?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let stats = store.stats();
    println!(
        "  {} appends in {} transactions (largest batch {}), {elapsed:.2} s",
        stats.appends_answered, stats.transactions, stats.largest_batch
    );
    Ok((commands / agents * agents) as f64 / elapsed)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let agents: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(32);
    let commands: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(40_000);
    println!("group commit, synchronous=FULL, {agents} agents:");
    let grouped = run(SqliteOptions::default(), agents, commands).await?;
    println!("  {grouped:.0} commands/s");
    println!("one commit per append, synchronous=FULL, {agents} agents:");
    let single = run(SqliteOptions::single_commit(), agents, commands / 10).await?;
    println!("  {single:.0} commands/s");
    println!("ratio: {:.1}x", grouped / single);
    Ok(())
}
