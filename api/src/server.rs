//! Running the API: the listener, the live projector, the lease sweeper and
//! graceful shutdown.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;

use crate::service::AppState;

/// How the server runs its background work.
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// How often the lease sweeper looks for expired claims; `None` turns
    /// it off.
    pub sweep_interval: Option<Duration>,
    /// How long shutdown waits for open requests. After it, [`serve`]
    /// stops waiting for them and returns; their connections end when the
    /// runtime does (as when `triage serve` exits). It bounds how long a
    /// client still sending its request, or not reading its answer, can
    /// keep the server from stopping.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            sweep_interval: Some(Duration::from_secs(1)),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Why a server did not start serving: the read models could not be
/// brought up to date. The projections' error stays reachable as the
/// source, for callers that act on its kind (the CLI undoes a store it
/// created for a start refused as `EmptyLog`).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the read models: {source}")]
pub struct ReadModelsNotBuilt {
    /// What the projections said.
    pub source: triage_projections::ProjectionError,
}

/// Serves `state` on `listener` until `shutdown` completes, then shuts
/// down gracefully: stops accepting, lets in-flight requests and the
/// commands they started finish (each command's append is atomic, so
/// nothing is half-written), stops the sweeper and the live projector, and
/// catches the read models up one last time.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Before serving, and before the live runner leads anything: a full
    // catch-up (on PostgreSQL it applies what no other instance leads).
    state
        .read_models()
        .catch_up()
        .await
        .map_err(|source| std::io::Error::other(ReadModelsNotBuilt { source }))?;
    let projector = LiveProjector::start(&state);
    let sweeper = options
        .sweep_interval
        .map(|interval| tokio::spawn(crate::sweeper::run(state.clone(), interval)));
    let token = state.shutdown_token();
    let app = crate::router(state.clone());
    let graceful = {
        let token = token.clone();
        axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight requests");
            // Ends MCP sessions and the sweeper; requests in flight go on.
            token.cancel();
        })
    };
    // A client that stops sending halfway through its request would hold
    // the graceful shutdown open for as long as it likes: after the grace
    // period this stops waiting for its connection, which ends with the
    // runtime. Commands run in tasks of their own, which `drain` below
    // waits for; a handler still running then may start one after that
    // wait, which is then cut short only if the process exits first, as in
    // a crash (an append is atomic, so nothing is half-written).
    let served = tokio::select! {
        served = graceful.into_future() => served,
        () = async {
            token.cancelled().await;
            tokio::time::sleep(options.shutdown_grace).await;
        } => {
            tracing::warn!(
                grace = ?options.shutdown_grace,
                "requests still open after the grace period; no longer waiting for them"
            );
            Ok(())
        }
    };
    // The sweeper first: its refusals (another sweeper got there first)
    // are recorded in the background too, and `drain` waits for those.
    if let Some(sweeper) = sweeper {
        let _ = sweeper.await;
    }
    state.drain().await;
    projector.stop().await;
    if let Err(error) = state.read_models().catch_up().await {
        tracing::warn!(%error, "the last read-model catch-up failed; the next start catches up");
    }
    served
}

/// The read models of a state, followed live in the background: what a
/// serving process runs beside its queries. On PostgreSQL the runner
/// competes for the projections' leadership, and the state's queries
/// wait for the leaders (see [`AppState::catch_up`]), so a process that
/// answers queries must run one, or lead nothing and wait in vain when no
/// other instance does. A runner that fails (a lost connection) starts
/// again a second later.
#[derive(Debug)]
pub struct LiveProjector {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl LiveProjector {
    /// Starts following the log.
    pub fn start(state: &AppState) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let read_models = state.read_models().clone();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Err(error) = read_models.run_live(stop.clone()).await {
                        tracing::warn!(%error, "the live projector stopped; restarting");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        LiveProjector { stop, task }
    }

    /// Stops following and waits for the runner to end (on PostgreSQL its
    /// leadership ends with it).
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
    }
}
