//! A protocol test double of KurrentDB (EventStoreDB): the gRPC
//! `streams.Streams` service, in memory, for tests. **Not a database.**
//!
//! No KurrentDB server can be installed where Triage is built and tested, so
//! this crate lets the real `kurrentdb` client talk to something real over
//! HTTP/2: Triage's KurrentDB backend is then tested end to end, wire format
//! included. The same tests run against a real server when `TRIAGE_ESDB_URL`
//! is set, which is what proves the semantics; this double only has to agree
//! with them.
//!
//! # Main decision: mirror the server, not Triage
//! The service is generated from the protos that ship in the `kurrentdb`
//! client crate (copied into `protos/`) and follows the server's rules as
//! documented for KurrentDB, not the rules of Triage's port:
//! - expected revisions `Any`, `NoStream`, `StreamExists` and `Exact(n)`; a
//!   mismatch is a normal `AppendResp.wrong_expected_version`, not a gRPC
//!   error;
//! - idempotency: with `Exact`/`NoStream`, event ids already stored in order
//!   right after the expected revision return the original success, a partial
//!   match is a conflict; event ids are **not** unique across streams;
//! - `$all` positions are `(commit, prepare)` pairs that behave like offsets
//!   in a transaction file: not dense, and all events of one append share the
//!   commit position;
//! - reading `$all` forwards from a position includes it, backwards excludes
//!   it; a subscription from a position starts after it;
//! - filtered subscriptions send a checkpoint every `32 × multiplier`
//!   considered events (or `max` with a max window), one when they go live,
//!   then `CaughtUp`;
//! - a missing stream is a `StreamNotFound` message on reads; an append
//!   larger than 1 MiB is `InvalidArgument` with the
//!   `maximum-append-size-exceeded` exception.
//!
//! What it does not do: persistence, deletes and tombstones, `BatchAppend`,
//! stream (non-`$all`) subscriptions, regex filters, links, ACLs, clustering.
//! Those methods answer `Unimplemented` with a message saying so.
//!
//! [`TestServer::start`] binds (port 0 for tests) and serves until
//! [`TestServer::stop`]; [`TestServer::restart`] brings a stopped server's
//! data back on the same port, which is how tests simulate an outage. The
//! `kurrentdb-testserver` binary serves one for manual use.

mod log;
mod net;
mod service;

/// Code generated from the protos.
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    rust_2018_idioms
)]
pub mod proto {
    /// `event_store.client`.
    pub mod event_store {
        /// `event_store.client`.
        pub mod client {
            tonic::include_proto!("event_store.client");
            /// `event_store.client.streams`.
            pub mod streams {
                tonic::include_proto!("event_store.client.streams");
            }
        }
    }
    /// `google.rpc`.
    pub mod google {
        /// `google.rpc`.
        pub mod rpc {
            tonic::include_proto!("google.rpc");
        }
    }
}

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use log::Log;
use service::{Faults, StreamsService};

/// The largest append request the double accepts, as KurrentDB up to v25.0.
pub const MAX_APPEND_SIZE: usize = 1024 * 1024;

/// A running test server.
#[derive(Debug)]
pub struct TestServer {
    address: SocketAddr,
    log: Arc<Log>,
    faults: Arc<Faults>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl TestServer {
    /// Starts a server with an empty log on `address` (port 0 picks a free
    /// port).
    pub async fn start(address: SocketAddr) -> std::io::Result<Self> {
        Self::serve(address, Arc::new(Log::new())).await
    }

    /// Starts a server on `address` over an existing log: after
    /// [`TestServer::stop`], this brings the same data back, as a real
    /// server restarting would.
    pub async fn restart(address: SocketAddr, log: Arc<Log>) -> std::io::Result<Self> {
        Self::serve(address, log).await
    }

    async fn serve(address: SocketAddr, log: Arc<Log>) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let (shutdown, mut shutdown_signal) = watch::channel(false);
        let faults = Arc::new(Faults::default());
        let service = StreamsService::new(log.clone(), shutdown.subscribe(), faults.clone());
        let incoming = net::incoming(listener);
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service.into_server())
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = shutdown_signal.wait_for(|stopped| *stopped).await;
                })
                .await
        });
        Ok(TestServer {
            address,
            log,
            faults,
            shutdown,
            task,
        })
    }

    /// The address the server listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// A connection string for the `kurrentdb` client: insecure, and without
    /// the client's discovery pause before its first call.
    pub fn url(&self) -> String {
        format!(
            "esdb://{}:{}?tls=false&discoveryInterval=0",
            self.address.ip(),
            self.address.port()
        )
    }

    /// The log the server serves.
    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }

    /// Makes every append wait `delay` before it is applied (zero turns
    /// this off): how tests exercise the client's deadlines.
    pub fn set_append_delay(&self, delay: Duration) {
        let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.faults
            .append_delay_ms
            .store(millis, std::sync::atomic::Ordering::Relaxed);
    }

    /// Makes this server a follower of the leader at `leader` (`None`: the
    /// leader again): reads and appends get KurrentDB's "not leader"
    /// answer naming it, as a cluster's followers give.
    pub fn set_leader(&self, leader: Option<SocketAddr>) {
        *self
            .faults
            .leader
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = leader;
    }

    /// Read requests (`Streams.Read`: stream and `$all` reads, and
    /// subscriptions) served so far.
    pub fn reads(&self) -> u64 {
        self.faults.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the server: subscriptions end with `Unavailable`, the listener
    /// closes and open connections are dropped. Returns the log, for
    /// [`TestServer::restart`].
    pub async fn stop(self) -> Arc<Log> {
        let _ = self.shutdown.send(true);
        let mut task = self.task;
        // In-flight unary calls finish; anything still open after a moment
        // (an idle HTTP/2 connection) is cut, as a crashed server would.
        if tokio::time::timeout(Duration::from_secs(2), &mut task).await.is_err() {
            task.abort();
            let _ = task.await;
        }
        self.log
    }
}
