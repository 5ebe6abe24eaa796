//! `triage serve`, `triage mcp` and `triage agents …`: the agent API and
//! its tokens.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use triage_api::{AgentsFile, AppState, Authenticator, ServeOptions};
use triage_command_handler::CommandHandler;
use triage_domain::Role;
use triage_event_store::EventStore as _;
use triage_projections::ProjectionError;

use crate::GlobalArgs;
use crate::output;

/// Where tokens live unless told otherwise.
const DEFAULT_AGENTS: &str = "./agents.toml";

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// The address to listen on; port 0 picks a free port (printed on start).
    #[arg(long, default_value = "127.0.0.1:8080", env = "TRIAGE_LISTEN", value_name = "ADDR")]
    listen: SocketAddr,
    /// The agents file: each token's hash, agent id and roles. Re-read when
    /// it changes, so `triage agents revoke` takes effect at once.
    #[arg(long, default_value = DEFAULT_AGENTS, env = "TRIAGE_AGENTS", value_name = "PATH")]
    agents: PathBuf,
    /// How often the lease sweeper expires claims whose lease ran out, in
    /// milliseconds; 0 turns it off (another instance may run it).
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    sweep_every_ms: u64,
}

#[derive(Debug, Args)]
pub(crate) struct McpArgs {
    /// The agents file.
    #[arg(long, default_value = DEFAULT_AGENTS, env = "TRIAGE_AGENTS", value_name = "PATH")]
    agents: PathBuf,
    /// The agent's token; its roles decide what the tools may do. Prefer
    /// the TRIAGE_TOKEN variable, which does not show in process lists.
    #[arg(long, env = "TRIAGE_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    token: String,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AgentsCommand {
    /// Create an agent with a new token. The token is printed once and only
    /// its SHA-256 is stored.
    Add {
        /// The agent id, recorded in every event it causes.
        id: String,
        /// A role: classifier, drafter, escalator, operator, intake or
        /// analyst. Repeat for several.
        #[arg(long = "role", required = true, value_parser = parse_role)]
        roles: Vec<Role>,
        /// The agents file.
        #[arg(long, default_value = DEFAULT_AGENTS, env = "TRIAGE_AGENTS", value_name = "PATH")]
        agents: PathBuf,
    },
    /// List agents (never tokens).
    List {
        /// The agents file.
        #[arg(long, default_value = DEFAULT_AGENTS, env = "TRIAGE_AGENTS", value_name = "PATH")]
        agents: PathBuf,
    },
    /// Revoke an agent's token; a running server refuses it at once.
    Revoke {
        /// The agent id.
        id: String,
        /// The agents file.
        #[arg(long, default_value = DEFAULT_AGENTS, env = "TRIAGE_AGENTS", value_name = "PATH")]
        agents: PathBuf,
    },
}

/// A role a token may carry: every role but `system`, which is Triage's
/// own (the lease sweeper), named as such instead of listed as a choice.
fn parse_role(value: &str) -> Result<Role, String> {
    let tokens: Vec<&str> = triage_api::auth::TOKEN_ROLES.iter().map(|role| role.as_str()).collect();
    match value.parse::<Role>() {
        Ok(Role::System) => Err(format!(
            "system is Triage's own role (the lease sweeper), not a token's; use one of {}",
            tokens.join(", ")
        )),
        Ok(role) => Ok(role),
        Err(_) => Err(format!("unknown role {value:?}; use one of {}", tokens.join(", "))),
    }
}

async fn state(global: &GlobalArgs, agents: PathBuf) -> anyhow::Result<AppState> {
    if !agents.exists() {
        bail!(
            "no agents file at {}; create a token first: triage agents add ID --role ROLE --agents {}",
            agents.display(),
            agents.display()
        );
    }
    let auth = Authenticator::from_file(&agents)?;
    let opened = global.open().await?;
    // A long-running server: a refused agent is answered before its
    // refusal's record is written; draining waits for the records.
    let handler = CommandHandler::new(opened.events.clone()).with_rejections_recorded_in_background();
    Ok(AppState::new(handler, opened.read_models, auth))
}

/// The embedded store file a server or MCP session is about to create (it
/// is not there yet), if that is what it opens.
fn store_to_be_created(global: &GlobalArgs) -> Option<PathBuf> {
    match global.location() {
        Ok(crate::store::StoreLocation::Sqlite(path)) if !path.exists() => Some(path),
        _ => None,
    }
}

/// After a start refused because the read models beside the store hold an
/// event log's work while the store is empty (a wrong or moved store,
/// [`ProjectionError::EmptyLog`]): removes the store file this start
/// created, if it is still empty, so that the refusal changes nothing.
/// Left behind, the next command took it for a replaced log and rebuilt
/// the models from it, which the refusal is there to prevent.
async fn undo_created_store(created: Option<PathBuf>, error: &anyhow::Error) {
    let Some(path) = created else { return };
    let empty_log = error
        .chain()
        .any(|cause| matches!(cause.downcast_ref(), Some(ProjectionError::EmptyLog { .. })));
    if !empty_log {
        return;
    }
    let still_empty = match triage_store_sqlite::SqliteEventStore::open_read_only(&path, Default::default()) {
        Ok(store) => matches!(store.head_position().await, Ok(None)),
        Err(_) => false,
    };
    if !still_empty {
        return;
    }
    let mut removed = true;
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        if let Err(error) = std::fs::remove_file(&file)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            removed = false;
            err!(
                "note: cannot remove {}, which this start created: {error}",
                file.display()
            );
        }
    }
    if removed {
        err!(
            "note: removed the empty event store {} that this start had created",
            path.display()
        );
    }
}

/// Runs `start` (a server or an MCP session, not begun yet), undoing the
/// store it creates if it is refused for an empty store (see
/// [`undo_created_store`]).
async fn undoing_a_refused_start(
    global: &GlobalArgs,
    start: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let created = store_to_be_created(global);
    let result = start.await;
    if let Err(error) = &result {
        undo_created_store(created, error).await;
    }
    result
}

pub(crate) async fn serve(args: ServeArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    undoing_a_refused_start(global, serve_created(args, global)).await
}

async fn serve_created(args: ServeArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let location = global.location()?;
    let state = state(global, args.agents).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    // Tests and scripts read this line to find a port chosen with :0.
    out!("listening on http://{address} (store {location})");
    let options = ServeOptions {
        sweep_interval: (args.sweep_every_ms > 0).then(|| Duration::from_millis(args.sweep_every_ms)),
        ..ServeOptions::default()
    };
    triage_api::serve(listener, state, options, shutdown_signal()).await?;
    err!("stopped");
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

pub(crate) async fn mcp(args: McpArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    undoing_a_refused_start(global, mcp_created(args, global)).await
}

async fn mcp_created(args: McpArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let state = state(global, args.agents).await?;
    let token = args.token.trim().to_owned();
    state
        .authenticate(Some(&token))
        .map_err(|_| anyhow::anyhow!("the token is unknown or revoked"))?;
    // As `triage serve`: catch up, then follow the log while serving (on
    // PostgreSQL the queries wait for the projections' leaders, and this
    // process may be the only candidate).
    state.read_models().catch_up().await?;
    let projector = triage_api::LiveProjector::start(&state);
    // stdout carries the protocol: nothing else may be printed there.
    let served = triage_api::mcp::serve_stdio(state.clone(), token).await;
    state.drain().await;
    projector.stop().await;
    served?;
    Ok(())
}

/// The agents file at `path`, which must exist: listing or revoking from
/// a mistyped path would otherwise look like a file with no agents.
fn existing_agents(path: &std::path::Path) -> anyhow::Result<AgentsFile> {
    if !path.exists() {
        anyhow::bail!(
            "there is no agents file at {}: `triage agents add` creates one",
            path.display()
        );
    }
    Ok(AgentsFile::load(path)?)
}

pub(crate) fn agents(command: AgentsCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    match command {
        AgentsCommand::Add { id, roles, agents } => {
            let token = AgentsFile::update(&agents, |file| file.add(&id, &roles))?;
            if global.json {
                output::print_json(&json!({ "id": id, "roles": roles, "token": token }));
            } else {
                out!("{token}");
                err!(
                    "agent {id} added to {}; the token above is shown only this once",
                    agents.display()
                );
            }
            Ok(())
        }
        AgentsCommand::List { agents } => {
            let file = existing_agents(&agents)?;
            if global.json {
                for agent in &file.agents {
                    output::print_json(&json!({
                        "id": agent.id,
                        "roles": agent.roles,
                        "created_at": agent.created_at,
                        "revoked_at": agent.revoked_at,
                    }));
                }
            } else {
                let mut table = output::table(&["agent", "roles", "created", "revoked"]);
                for agent in &file.agents {
                    let roles: Vec<&str> = agent.roles.iter().map(|role| role.as_str()).collect();
                    table.add_row(vec![
                        agent.id.clone(),
                        roles.join(", "),
                        agent.created_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        agent
                            .revoked_at
                            .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                            .unwrap_or_default(),
                    ]);
                }
                out!("{table}");
            }
            Ok(())
        }
        AgentsCommand::Revoke { id, agents } => {
            existing_agents(&agents)?;
            AgentsFile::update(&agents, |file| file.revoke(&id))?;
            if global.json {
                output::print_json(&serde_json::json!({ "agent": id, "revoked": true }));
            } else {
                err!("agent {id} revoked");
            }
            Ok(())
        }
    }
}
