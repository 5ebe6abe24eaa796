//! The agent API: HTTP (axum) and MCP (rmcp) front doors to the Triage
//! command handler and read models.
//!
//! # Layout
//! - [`router`]`(state) -> Router`: the JSON API under `/v1`, the OpenAPI
//!   3.1 document at `/openapi.json` (generated with utoipa from the
//!   handlers), `/healthz`, `/readyz`, and MCP over streamable HTTP at `/mcp`.
//! - [`AppState`] ([`service`]): the operations both doors share —
//!   authorization by the transition table, idempotency keys, decided-on
//!   revisions, claiming work.
//! - [`error`]: the one place errors become RFC 9457 problem documents.
//! - [`auth`]: bearer tokens from `agents.toml`, stored as SHA-256 hashes.
//! - [`mcp`]: the same operations as MCP tools, over stdio or `/mcp`.
//! - [`sweeper`]: expires claims whose lease ran out.
//! - [`server`]: [`serve`] with the live projector, the sweeper and
//!   graceful shutdown.
//!
//! # Main decision
//! The API holds no state of its own that correctness depends on. An
//! `Idempotency-Key` *is* the command id, so a retry is recognised by the
//! event store's deterministic event ids, on any instance; a key reused
//! with another body is told apart by comparing the stored events with the
//! request. `If-Match` *is* the command's expected revision. Claiming work
//! is a `Start…` command decided on the revision the queue showed, so two
//! claimers racing for one ticket cannot both win. Any number of instances
//! can therefore serve one store.
//!
//! Single tickets and their events are read from the ticket's stream, so an
//! `ETag` is exactly the revision an `If-Match` is checked against; lists,
//! work queues and statistics come from the read models, caught up before
//! each read.

pub mod auth;
pub mod error;
mod http;
pub mod mcp;
pub mod model;
pub mod server;
pub mod service;
pub mod sweeper;

pub use auth::{AgentsFile, Authenticator, Principal};
pub use error::{ApiError, Problem};
pub use http::{ApiDoc, router};
pub use server::{LiveProjector, ServeOptions, serve};
pub use service::{AppState, Limits};
