//! Serves the KurrentDB protocol test double until Ctrl-C, for trying
//! `triage --store esdb://…` by hand. It keeps events in memory only: it is a
//! protocol test double, not a database.

use std::net::SocketAddr;

use clap::Parser;
use triage_kurrentdb_testserver::TestServer;

/// A KurrentDB protocol test double (in memory, not a database).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:2113")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let server = TestServer::start(args.listen).await?;
    println!("KurrentDB protocol test double listening; connect with:");
    println!("  {}", server.url());
    println!("It keeps events in memory only. Ctrl-C stops it.");
    tokio::signal::ctrl_c().await?;
    let log = server.stop().await;
    eprintln!("stopped; {} events discarded", log.len());
    Ok(())
}
