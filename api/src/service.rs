//! The operations both front doors offer, on [`AppState`]: authorization by
//! the transition table, idempotency keys, decided-on revisions, claims.
//!
//! HTTP handlers and MCP tools are thin wrappers around these methods, so
//! the two doors cannot drift apart.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use triage_command_handler::{Accepted, CommandError, CommandHandler, LoadedTicket};
use triage_domain::{
    Agent, ClaimRule, Command, CommandEnvelope, CommandKind, Event, Role, State, TRANSITIONS, TicketId, queue_states,
    transitions_from,
};
use triage_projections::{ListCursor, ProjectionError, ReadModels};
use uuid::Uuid;

use crate::auth::{Authenticator, Principal};

/// The most events one page of a ticket's events holds.
pub const MAX_EVENTS_PAGE: usize = 500;

/// Which events of a ticket to return.
#[derive(Clone, Copy, Debug, Default)]
pub struct EventPage {
    /// The first revision.
    pub from_revision: u64,
    /// At most this many (at most [`MAX_EVENTS_PAGE`], the default).
    pub limit: Option<usize>,
}

/// The event type of a claim index record (see [`AppState::index_claim`]).
pub const CLAIM_INDEXED: &str = "ClaimIndexed";

/// The stream that records which ticket a keyed claim took, on stores
/// without an index of event ids.
pub fn claim_index_stream(claim_id: Uuid) -> String {
    format!("claim-{claim_id}")
}

/// A claim index record's data.
#[derive(Debug, serde::Deserialize)]
struct ClaimIndexed {
    claim_id: Uuid,
    ticket_id: TicketId,
}
use crate::error::ApiError;
use crate::model::{
    ClaimRequest, ClaimResponse, CommandResponse, EventList, EventView, OpenTicketRequest, TicketList, TicketView,
};

/// Namespace of command ids derived from idempotency keys that are not
/// UUIDs (UUIDv5 of `agent id` + NUL + key).
const KEY_NAMESPACE: Uuid = Uuid::from_u128(0x7f1c_3c56_0d2e_4b8a_9a4e_5d1f_2b6c_8e01);

/// Request limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest request body, in bytes; more is a `413`.
    pub max_body_bytes: usize,
    /// The longest `Idempotency-Key`, in bytes.
    pub max_key_bytes: usize,
    /// The most tickets one list returns.
    pub max_list: usize,
    /// The longest a client may pause while sending a request body; a
    /// body that stalls that long is refused, so a stalled client holds
    /// nothing open for longer. (A client that keeps sending, however
    /// slowly, is bounded by `max_body_bytes` instead.)
    pub body_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // Above the domain's largest texts (a 64 KiB message, a 16 KiB
            // draft), which the domain checks field by field (422).
            max_body_bytes: 256 * 1024,
            max_key_bytes: 200,
            max_list: 500,
            body_timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// Everything a request needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    handler: CommandHandler,
    read_models: ReadModels,
    auth: Authenticator,
    limits: Limits,
    catch_up: tokio::sync::Mutex<()>,
    /// Claim → ticket, a cache in front of the log (see
    /// `ticket_of_claim`). The pairs never change, so the cache is never
    /// stale. Bounded.
    claims: std::sync::Mutex<HashMap<Uuid, TicketId>>,
    /// The copies of one keyed work claim take turns (see `claim`).
    claim_turns: triage_command_handler::Turns<Uuid>,
    /// Commands in flight: shutdown waits for them.
    commands: tokio_util::task::TaskTracker,
    stopping: AtomicBool,
    /// Cancelled when shutdown begins: ends MCP sessions and the sweeper.
    shutdown: tokio_util::sync::CancellationToken,
}

const MAX_REMEMBERED_CLAIMS: usize = 100_000;

impl fmt::Debug for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppState")
            .field("handler", &self.inner.handler)
            .field("auth", &self.inner.auth)
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// State over a command handler, the read models of its store (a
    /// SQLite [`triage_projections::Projector`] or a PostgreSQL
    /// [`triage_projections::PgProjector`]), and the tokens of `auth`.
    pub fn new(handler: CommandHandler, read_models: impl Into<ReadModels>, auth: Authenticator) -> Self {
        Self::with_limits(handler, read_models, auth, Limits::default())
    }

    /// [`AppState::new`] with other limits.
    pub fn with_limits(
        handler: CommandHandler,
        read_models: impl Into<ReadModels>,
        auth: Authenticator,
        limits: Limits,
    ) -> Self {
        AppState {
            inner: Arc::new(Inner {
                handler,
                read_models: read_models.into(),
                auth,
                limits,
                catch_up: tokio::sync::Mutex::new(()),
                claims: std::sync::Mutex::new(HashMap::new()),
                claim_turns: triage_command_handler::Turns::new(),
                commands: tokio_util::task::TaskTracker::new(),
                stopping: AtomicBool::new(false),
                shutdown: tokio_util::sync::CancellationToken::new(),
            }),
        }
    }

    /// The command handler.
    pub fn handler(&self) -> &CommandHandler {
        &self.inner.handler
    }

    /// The read models the queries are answered from.
    pub fn read_models(&self) -> &ReadModels {
        &self.inner.read_models
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// The principal behind a bearer token.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Principal, ApiError> {
        let token = token.ok_or_else(|| ApiError::Unauthorized("send `Authorization: Bearer <token>`".to_owned()))?;
        self.inner
            .auth
            .authenticate(token)
            .ok_or_else(|| ApiError::Unauthorized("the token is unknown or revoked".to_owned()))
    }

    /// Cancelled when shutdown begins.
    pub fn shutdown_token(&self) -> tokio_util::sync::CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Stops taking new commands, then waits for those in flight and for
    /// the records of refusals already answered.
    pub async fn drain(&self) {
        self.inner.shutdown.cancel();
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.commands.close();
        self.inner.commands.wait().await;
        self.inner.handler.rejections_recorded().await;
    }

    /// Whether [`AppState::drain`] was called.
    pub fn is_stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::SeqCst)
    }

    /// Brings the read models up to the head of the log, for a query (see
    /// [`ReadModels::catch_up_while_live`]). Callers of a SQLite read model
    /// queue rather than replay the same tail side by side; PostgreSQL
    /// read models are applied by their leaders, which callers only wait
    /// for.
    pub async fn catch_up(&self) -> Result<(), ApiError> {
        let _turn = match self.inner.read_models {
            ReadModels::Postgres(_) => None,
            _ => Some(self.inner.catch_up.lock().await),
        };
        self.inner.read_models.catch_up_while_live().await?;
        Ok(())
    }

    /// The command id for an idempotency key: the key itself when it is a
    /// UUID, otherwise a UUIDv5 of the agent and the key.
    pub fn command_id(&self, principal: &Principal, key: Option<&str>) -> Result<Uuid, ApiError> {
        let Some(key) = key else {
            // Time-ordered, as `CommandEnvelope::new` makes them: see
            // `triage_domain::event_id`.
            return Ok(Uuid::now_v7());
        };
        if key.is_empty() || key.len() > self.inner.limits.max_key_bytes || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ApiError::bad_request(
                "invalid_header",
                format!(
                    "Idempotency-Key must be 1 to {} visible ASCII characters",
                    self.inner.limits.max_key_bytes
                ),
            ));
        }
        if let Ok(uuid) = Uuid::parse_str(key) {
            return Ok(uuid);
        }
        let name = format!("{}\0{key}", principal.agent_id);
        Ok(Uuid::new_v5(&KEY_NAMESPACE, name.as_bytes()))
    }

    /// The role `principal` acts in to send `kind`: one of its roles that
    /// the transition table allows for `kind`; an operator when no claim is
    /// named (operators override), otherwise the first in grant order.
    pub fn acting_agent(&self, principal: &Principal, kind: CommandKind, has_claim: bool) -> Result<Agent, ApiError> {
        let mut allowed: Vec<Role> = TRANSITIONS
            .iter()
            .filter(|row| row.command == kind)
            .flat_map(|row| row.roles.iter().copied())
            .collect();
        allowed.sort();
        allowed.dedup();
        let candidates: Vec<Role> = principal
            .roles
            .iter()
            .copied()
            .filter(|role| allowed.contains(role))
            .collect();
        let role = if !has_claim && candidates.contains(&Role::Operator) {
            Role::Operator
        } else {
            *candidates.first().ok_or_else(|| ApiError::Forbidden {
                detail: format!(
                    "agent {} ({}) may not {kind}",
                    principal.agent_id,
                    roles_text(&principal.roles)
                ),
                allowed: allowed.clone(),
            })?
        };
        Ok(Agent::new(principal.agent_id.clone(), role))
    }

    /// Runs a command to completion even if the client goes away, and
    /// turns refusals into API errors (a stale decision with the events
    /// since the revision it was decided on).
    async fn run(&self, envelope: CommandEnvelope) -> Result<Accepted, ApiError> {
        self.run_recording(envelope, true).await
    }

    /// `run`; `record` false records no refusal (see
    /// `CommandHandler::handle_unrecorded`).
    async fn run_recording(&self, envelope: CommandEnvelope, record: bool) -> Result<Accepted, ApiError> {
        if self.is_stopping() {
            return Err(ApiError::Unavailable("the server is shutting down".to_owned()));
        }
        let handler = self.inner.handler.clone();
        let ticket_id = envelope.ticket_id;
        let expected = envelope.expected_revision;
        let result = self
            .inner
            .commands
            .spawn(async move {
                if record {
                    handler.handle(envelope).await
                } else {
                    handler.handle_unrecorded(envelope).await
                }
            })
            .await
            .map_err(|error| ApiError::Internal(format!("the command task failed: {error}")))?;
        match result {
            Ok(accepted) => Ok(accepted),
            Err(error @ CommandError::StaleRevision { .. }) => {
                // A revision past the last one has nothing after it (and
                // no revision follows u64::MAX).
                let since = expected.map_or(Some(0), |revision| revision.checked_add(1));
                let (events, more_from) = match (since, self.inner.handler.load(ticket_id).await) {
                    // The first page of them: the rest are a GET of the
                    // ticket's events from `more_from`.
                    (Some(since), Ok(loaded)) => {
                        let mut after = loaded
                            .history
                            .iter()
                            .filter(|stored| stored.revision >= since)
                            .peekable();
                        let page: Vec<EventView> = after
                            .by_ref()
                            .take(MAX_EVENTS_PAGE)
                            .map(EventView::from_stored)
                            .collect();
                        (page, after.peek().map(|stored| stored.revision))
                    }
                    _ => (Vec::new(), None),
                };
                Err(ApiError::from_command(error).with_events(events, more_from))
            }
            Err(error) => Err(ApiError::from_command(error)),
        }
    }

    /// The ticket's stream, folded (see `CommandHandler::load`).
    async fn load(&self, ticket_id: TicketId) -> Result<LoadedTicket, ApiError> {
        self.inner.handler.load(ticket_id).await.map_err(ApiError::from_command)
    }

    async fn view(&self, ticket_id: TicketId) -> Result<TicketView, ApiError> {
        let loaded = self.load(ticket_id).await?;
        TicketView::from_loaded(ticket_id, &loaded).ok_or_else(|| not_found(ticket_id))
    }

    async fn respond(&self, command: &Command, accepted: Accepted) -> Result<CommandResponse, ApiError> {
        if accepted.duplicate && !same_request(command, &accepted.events) {
            return Err(ApiError::key_reused(format!(
                "the Idempotency-Key (command {}) was already used with a different request",
                accepted.command_id
            )));
        }
        Ok(CommandResponse {
            ticket: self.view(accepted.ticket_id).await?,
            revision: accepted.revision,
            command_id: accepted.command_id,
            duplicate: accepted.duplicate,
            events: accepted.events.iter().map(|e| e.event_type().to_owned()).collect(),
        })
    }

    /// Opens a ticket. With an idempotency key the ticket id derives from
    /// the command id ([`TicketId::for_command`]), so a retry with the same
    /// key reaches the same ticket; without one every request is a command
    /// of its own, and its ticket gets a fresh id.
    pub async fn open_ticket(
        &self,
        principal: &Principal,
        key: Option<&str>,
        request: OpenTicketRequest,
    ) -> Result<CommandResponse, ApiError> {
        let agent = self.acting_agent(principal, CommandKind::OpenTicket, false)?;
        let command_id = self.command_id(principal, key)?;
        let ticket_id = match key {
            Some(_) => TicketId::for_command(command_id),
            None => TicketId::new(),
        };
        let command = Command::OpenTicket {
            subject: request.subject,
            body: request.body,
            customer: request.customer,
        };
        let envelope = CommandEnvelope::new(ticket_id, agent, command.clone()).with_id(command_id);
        let accepted = match self.run(envelope).await {
            Ok(accepted) => accepted,
            // A refused opening created nothing: the id this server picked
            // for it names no ticket, so the problem does not carry it.
            Err(ApiError::Unprocessable { code, detail, .. }) => {
                return Err(ApiError::Unprocessable {
                    code,
                    detail,
                    ticket_id: None,
                });
            }
            Err(error) => return Err(error),
        };
        self.respond(&command, accepted).await
    }

    /// Sends `command` to a ticket, decided on `if_match` when given.
    pub async fn ticket_command(
        &self,
        principal: &Principal,
        ticket_id: TicketId,
        key: Option<&str>,
        if_match: Option<u64>,
        command: Command,
    ) -> Result<CommandResponse, ApiError> {
        let kind = command.kind();
        let has_claim = command.claim_id().is_some();
        let mut agent = self.acting_agent(principal, kind, has_claim)?;
        if principal.roles.len() > 1 {
            // A token with several roles acts in the one the table allows
            // from the ticket's current state (a drafter's heartbeat, not a
            // classifier's); the handler still decides on fresh state.
            let loaded = self.load(ticket_id).await?;
            if let Some(state) = loaded.ticket.state {
                let fits: Vec<Role> = transitions_from(Some(state), kind)
                    .flat_map(|row| row.roles.iter().copied())
                    .filter(|role| principal.roles.contains(role))
                    .collect();
                let role = if !has_claim && fits.contains(&Role::Operator) {
                    Some(Role::Operator)
                } else {
                    principal.roles.iter().copied().find(|role| fits.contains(role))
                };
                if let Some(role) = role {
                    agent.role = role;
                }
            }
        }
        let command_id = self.command_id(principal, key)?;
        let mut envelope = CommandEnvelope::new(ticket_id, agent, command.clone()).with_id(command_id);
        envelope.expected_revision = if_match;
        let accepted = match self.run(envelope).await {
            Ok(accepted) => accepted,
            // A key already used on another ticket is the client's mistake
            // to hear about (422), not the refusal its reuse ran into here.
            Err(refused @ (ApiError::Conflict { .. } | ApiError::Unprocessable { .. }))
                if key.is_some() && self.used_on_another_ticket(command_id, ticket_id).await? =>
            {
                drop(refused);
                return Err(ApiError::key_reused(format!(
                    "the Idempotency-Key (command {command_id}) was already used on another ticket"
                )));
            }
            Err(error) => return Err(error),
        };
        self.respond(&command, accepted).await
    }

    /// Whether the command `command_id` is stored on a ticket other than
    /// `ticket_id`, as far as the log's index of event ids tells (a store
    /// without one, KurrentDB, cannot say: `false`).
    async fn used_on_another_ticket(&self, command_id: Uuid, ticket_id: TicketId) -> Result<bool, ApiError> {
        let record = self.first_event_of(command_id).await?;
        Ok(record.is_some_and(|record| TicketId::from_stream_name(record.stream.as_str()) != Some(ticket_id)))
    }

    /// The stored first event of the command `command_id`, found by its
    /// id, or by the id it had before event ids were time-ordered
    /// ([`triage_domain::former_event_id`]).
    async fn first_event_of(&self, command_id: Uuid) -> Result<Option<triage_event_store::RecordedEvent>, ApiError> {
        let store = self.inner.handler.store();
        let ids = std::iter::once(triage_domain::event_id(command_id, 0))
            .chain(triage_domain::former_event_id(command_id, 0));
        for id in ids {
            let record = store
                .read_event(id)
                .await
                .map_err(|error| ApiError::from_command(CommandError::Store(error)))?;
            if record.is_some() {
                return Ok(record);
            }
        }
        Ok(None)
    }

    /// Sends a command that names a claim (release, heartbeat) to the
    /// ticket that claim is on.
    pub async fn claim_command(
        &self,
        principal: &Principal,
        claim_id: Uuid,
        key: Option<&str>,
        if_match: Option<u64>,
        command: Command,
    ) -> Result<CommandResponse, ApiError> {
        // Authorize before looking anything up.
        self.acting_agent(principal, command.kind(), true)?;
        let ticket_id = self
            .ticket_of_claim(claim_id)
            .await?
            .ok_or_else(|| ApiError::NotFound {
                code: "claim_not_found",
                detail: format!("claim {claim_id} was never handed out"),
            })?;
        self.ticket_command(principal, ticket_id, key, if_match, command).await
    }

    /// The ticket `claim_id` was handed out on, whether or not it still
    /// holds it: a retried release or claim names a claim that may have
    /// ended, on this instance or another, before or after a restart.
    ///
    /// A claim's id is the id of the command that took it, and that
    /// command's first event, the claim itself, has the id
    /// [`triage_domain::event_id`]`(claim_id, 0)`: the log finds it through
    /// its index of event ids. A store without one (KurrentDB) looks in
    /// the claim's own index stream (see [`AppState::index_claim`]), then
    /// in the read model, which knows current claims only.
    async fn ticket_of_claim(&self, claim_id: Uuid) -> Result<Option<TicketId>, ApiError> {
        if let Some(ticket) = self.remembered_claim(claim_id) {
            return Ok(Some(ticket));
        }
        let store = self.inner.handler.store();
        let record = self.first_event_of(claim_id).await?;
        let found = match record {
            Some(record) => {
                let (event, _) = triage_command_handler::decode_recorded(&record)
                    .map_err(|error| ApiError::Internal(format!("cannot decode {}: {error}", record.stream)))?;
                TicketId::from_stream_name(record.stream.as_str())
                    .filter(|_| event.new_claim().is_some_and(|claim| claim.claim_id == claim_id))
            }
            None if store.enforces_unique_event_ids() => None,
            None if let Some(ticket_id) = self.indexed_claim(claim_id).await? => Some(ticket_id),
            None => {
                self.catch_up().await?;
                self.inner.read_models.holder_of_claim(claim_id).await?
            }
        };
        if let Some(ticket_id) = found {
            self.remember_claim(claim_id, ticket_id);
        }
        Ok(found)
    }

    /// On a store without an index of event ids (KurrentDB), records which
    /// ticket a keyed claim took, in the claim's own stream
    /// (`claim-<claim id>`, one event): a retry of the claim after its
    /// ticket moved on (the claim completed or released, so the read model
    /// no longer lists it) and after a restart (nothing remembered) still
    /// finds its ticket, instead of claiming a second one. Written once,
    /// with a fixed event id, so a repeat is a no-op. Best effort, after
    /// the claim: if it fails, or the process stops in between, a retry
    /// still finds the claim in the read model while it is current.
    async fn index_claim(&self, claim_id: Uuid, ticket_id: TicketId) {
        let store = self.inner.handler.store();
        if store.enforces_unique_event_ids() {
            return;
        }
        let record = triage_event_store::EventData {
            id: Uuid::new_v5(&claim_id, b"triage claim index"),
            event_type: CLAIM_INDEXED.to_owned(),
            data: serde_json::json!({ "claim_id": claim_id, "ticket_id": ticket_id })
                .to_string()
                .into_bytes(),
            metadata: b"{}".to_vec(),
        };
        let appended = match triage_event_store::StreamName::new(claim_index_stream(claim_id)) {
            Ok(stream) => store
                .append(&stream, triage_event_store::ExpectedRevision::NoStream, vec![record])
                .await
                .map(|_| ()),
            Err(error) => Err(error),
        };
        if let Err(error) = appended {
            tracing::warn!(%claim_id, ticket = %ticket_id, %error, "could not index the claim");
        }
    }

    /// The ticket [`AppState::index_claim`] recorded for `claim_id`.
    async fn indexed_claim(&self, claim_id: Uuid) -> Result<Option<TicketId>, ApiError> {
        let store = self.inner.handler.store();
        let stream = triage_event_store::StreamName::new(claim_index_stream(claim_id))
            .map_err(|error| ApiError::Internal(format!("claim index stream: {error}")))?;
        let options = triage_event_store::ReadStream {
            max_count: 1,
            ..triage_event_store::ReadStream::forwards()
        };
        let records = match store.read_stream(&stream, options).await {
            Ok(records) => records,
            Err(triage_event_store::Error::StreamNotFound { .. }) => return Ok(None),
            Err(error) => return Err(ApiError::from_command(CommandError::Store(error))),
        };
        let Some(record) = records.first() else {
            return Ok(None);
        };
        let indexed: ClaimIndexed = serde_json::from_slice(&record.data)
            .map_err(|error| ApiError::Internal(format!("cannot read {stream}: {error}")))?;
        Ok((indexed.claim_id == claim_id).then_some(indexed.ticket_id))
    }

    fn remembered_claim(&self, claim_id: Uuid) -> Option<TicketId> {
        let claims = self
            .inner
            .claims
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        claims.get(&claim_id).copied()
    }

    fn remember_claim(&self, claim_id: Uuid, ticket_id: TicketId) {
        let mut claims = self
            .inner
            .claims
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if claims.len() >= MAX_REMEMBERED_CLAIMS {
            claims.clear();
        }
        claims.insert(claim_id, ticket_id);
    }

    /// Claims the next ticket in `role`'s work queue: tries the queue's
    /// tickets, each with the revision it was seen at, until one claim is
    /// accepted. `None` when the queue is empty or every try lost its race.
    ///
    /// The copies of one keyed claim on this server take turns, and each
    /// runs to its end even when its client hangs up. A copy sent while an
    /// earlier one is still at work (a client's retry after a timeout) then
    /// answers with the claim the earlier one took. Without turns it could
    /// look at the queue before work appeared that the earlier copy then
    /// claimed, and answer "nothing to claim": the client would never hear
    /// of that claim, and its lease would expire against the ticket's
    /// attempts. Copies sent to different servers are not ordered.
    pub async fn claim(
        &self,
        principal: &Principal,
        key: Option<&str>,
        request: ClaimRequest,
    ) -> Result<Option<ClaimResponse>, ApiError> {
        let Some(key) = key else {
            return self.claim_now(principal, None, request).await;
        };
        let claim_id = self.command_id(principal, Some(key))?;
        // Waited for here, where a client that hangs up still cancels its
        // place in the queue; from the turn on, the claim runs to its end.
        let turn = self.inner.claim_turns.take(claim_id).await;
        if self.is_stopping() {
            return Err(ApiError::Unavailable("the server is shutting down".to_owned()));
        }
        let state = self.clone();
        let principal = principal.clone();
        let key = key.to_owned();
        self.inner
            .commands
            .spawn(async move {
                let _turn = turn;
                state.claim_now(&principal, Some(&key), request).await
            })
            .await
            .map_err(|error| ApiError::Internal(format!("the claim task failed: {error}")))?
    }

    /// [`AppState::claim`], at once.
    async fn claim_now(
        &self,
        principal: &Principal,
        key: Option<&str>,
        request: ClaimRequest,
    ) -> Result<Option<ClaimResponse>, ApiError> {
        let role: Role = request.role.into();
        let claimable: Vec<Role> = TRANSITIONS
            .iter()
            .filter(|row| row.claim == ClaimRule::Takes)
            .flat_map(|row| row.roles.iter().copied())
            .collect();
        if !principal.roles.contains(&role) || !claimable.contains(&role) {
            // The roles that may do this, as everywhere else: claiming as
            // `role` takes a token with that role; a role that claims
            // nothing is answered with the roles that do.
            let allowed: Vec<Role> = if claimable.contains(&role) {
                vec![role]
            } else {
                let mut claimers = claimable.clone();
                claimers.sort_by_key(|role| role.as_str());
                claimers.dedup();
                claimers
            };
            return Err(ApiError::Forbidden {
                detail: format!(
                    "agent {} ({}) may not claim work as {role}",
                    principal.agent_id,
                    roles_text(&principal.roles)
                ),
                allowed,
            });
        }
        let agent = Agent::new(principal.agent_id.clone(), role);
        let keyed = key.map(|key| self.command_id(principal, Some(key))).transpose()?;
        // A retried claim: answer from the ticket the key already claimed.
        if let Some(claim_id) = keyed
            && let Some(response) = self.claimed_before(claim_id, &agent, role, request.lease_secs).await?
        {
            return Ok(Some(response));
        }
        // A lease out of range is the request's fault, whatever waits: it
        // is refused before a ticket is picked (not 204 on an empty queue,
        // nor a refusal recorded against whichever ticket came first).
        let policy = self.inner.handler.policy();
        if let Some(secs) = request.lease_secs
            && (secs == 0 || secs > policy.max_lease_secs)
        {
            return Err(ApiError::unprocessable(
                "invalid_input",
                triage_domain::ValidationError::LeaseOutOfRange {
                    secs,
                    max: policy.max_lease_secs,
                }
                .to_string(),
            ));
        }
        for _round in 0..3 {
            self.catch_up().await?;
            let mut queue = self.inner.read_models.work_queue(role, 32).await?;
            queue.retain(|row| row.ticket.state.and_then(|state| start_kind(state, role)).is_some());
            if queue.is_empty() {
                // Another copy of this keyed claim may be what emptied the
                // queue (it took the last ticket after the look above):
                // then its claim is the answer, not "nothing to claim".
                return match keyed {
                    Some(claim_id) => self.claimed_before(claim_id, &agent, role, request.lease_secs).await,
                    None => Ok(None),
                };
            }
            // Claimers that all start at the oldest ticket would all race
            // for it; start each at a random place instead.
            let offset = fastrand::usize(..queue.len());
            queue.rotate_left(offset);
            for row in &queue {
                let (Some(ticket_id), Some(state)) = (row.ticket.id, row.ticket.state) else {
                    continue;
                };
                let Some(kind) = start_kind(state, role) else { continue };
                let command = start_command(kind, request.lease_secs);
                let envelope = CommandEnvelope::new(ticket_id, agent.clone(), command)
                    .with_id(keyed.unwrap_or_else(Uuid::now_v7))
                    .at_revision(row.revision);
                // Not recorded when refused: the client is answered with
                // another ticket's claim or with "no work", never with this
                // try's refusal (a lost race, a queue behind the log), and a
                // record would count it as a refusal of this agent. What
                // ends the loop with an error is the store's failure or the
                // request's, not a decision on this ticket.
                match self.run_recording(envelope, false).await {
                    Ok(accepted) => {
                        if let Some(claim_id) = keyed {
                            self.index_claim(claim_id, ticket_id).await;
                        }
                        return self.claim_response(role, accepted).await.map(Some);
                    }
                    // Lost the race for this one, or the read model was
                    // behind: try the next.
                    Err(ApiError::Conflict { .. }) => continue,
                    Err(ApiError::NotFound { .. }) => continue,
                    // Another copy of this keyed claim (a retry sent while
                    // the first was still running) took a ticket meanwhile
                    // under the same command id: answer with its claim.
                    Err(error) if error.code() == "idempotency_key_reused" => {
                        if let Some(claim_id) = keyed
                            && let Some(response) =
                                self.claimed_before(claim_id, &agent, role, request.lease_secs).await?
                        {
                            return Ok(Some(response));
                        }
                        return Err(error);
                    }
                    Err(other) => return Err(other),
                }
            }
        }
        match keyed {
            Some(claim_id) => self.claimed_before(claim_id, &agent, role, request.lease_secs).await,
            None => Ok(None),
        }
    }

    /// The answer to a keyed claim whose key already claimed a ticket: that
    /// claim, as the command that took it answers a retry. `None` when the
    /// key claimed nothing yet.
    async fn claimed_before(
        &self,
        claim_id: Uuid,
        agent: &Agent,
        role: Role,
        lease_secs: Option<u32>,
    ) -> Result<Option<ClaimResponse>, ApiError> {
        let Some(ticket_id) = self.ticket_of_claim(claim_id).await? else {
            return Ok(None);
        };
        let loaded = self.load(ticket_id).await?;
        let Some(command) = loaded
            .history
            .iter()
            .find(|stored| stored.metadata.command_id == claim_id)
            .and_then(|stored| start_command_for(&stored.event, lease_secs))
        else {
            return Ok(None);
        };
        let envelope = CommandEnvelope::new(ticket_id, agent.clone(), command).with_id(claim_id);
        let accepted = self.run(envelope).await?;
        // Found some other way than its index (the read model, after the
        // index was not written): index it now.
        self.index_claim(claim_id, ticket_id).await;
        self.claim_response(role, accepted).await.map(Some)
    }

    async fn claim_response(&self, role: Role, accepted: Accepted) -> Result<ClaimResponse, ApiError> {
        let claim = accepted.events.iter().find_map(|event| match event {
            Event::ClassificationStarted { claim }
            | Event::DraftingStarted { claim }
            | Event::EscalationStarted { claim } => Some(claim.clone()),
            _ => None,
        });
        let Some(claim) = claim else {
            return Err(ApiError::key_reused(format!(
                "this Idempotency-Key was already used for a different request (command {}); this one was not \
                 applied",
                accepted.command_id
            )));
        };
        let matches_role = accepted
            .state
            .resting_state()
            .and_then(|resting| start_kind(resting, role))
            .is_some();
        if accepted.duplicate && !matches_role {
            return Err(ApiError::key_reused(format!(
                "the Idempotency-Key (command {}) was already used to claim work as another role",
                accepted.command_id
            )));
        }
        self.remember_claim(claim.claim_id, accepted.ticket_id);
        Ok(ClaimResponse {
            ticket: self.view(accepted.ticket_id).await?,
            claim_id: claim.claim_id,
            lease_expires_at: crate::model::to_micros(claim.lease_expires_at),
            revision: accepted.revision,
            duplicate: accepted.duplicate,
        })
    }

    /// A ticket, read from its stream: exactly the revision it is at.
    pub async fn ticket(&self, _principal: &Principal, ticket_id: TicketId) -> Result<TicketView, ApiError> {
        self.view(ticket_id).await
    }

    /// Tickets in `state` (all when `None`), from the read model.
    pub async fn list(
        &self,
        _principal: &Principal,
        state: Option<State>,
        after: Option<ListCursor>,
        limit: Option<usize>,
    ) -> Result<TicketList, ApiError> {
        // At least one: an empty page would read as the end of the list.
        let limit = at_least_one(limit)?
            .unwrap_or(50)
            .min(self.inner.limits.max_list.max(1));
        self.catch_up().await?;
        // One more than asked, to tell whether another page follows.
        let mut rows = self
            .inner
            .read_models
            .list_after(state, after.as_ref(), limit.saturating_add(1))
            .await?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next = more
            .then(|| rows.last().and_then(|row| ListCursor::after(row, state)))
            .flatten()
            .map(|cursor| cursor.to_string());
        Ok(TicketList {
            tickets: rows.iter().filter_map(TicketView::from_row).collect(),
            next,
        })
    }

    /// A ticket's events, from its stream.
    pub async fn events(
        &self,
        _principal: &Principal,
        ticket_id: TicketId,
        page: EventPage,
    ) -> Result<EventList, ApiError> {
        let loaded = self.load(ticket_id).await?;
        if loaded.history.is_empty() {
            return Err(not_found(ticket_id));
        }
        let limit = at_least_one(page.limit)?
            .unwrap_or(MAX_EVENTS_PAGE)
            .min(MAX_EVENTS_PAGE);
        let mut from = loaded
            .history
            .iter()
            .filter(|stored| stored.revision >= page.from_revision)
            .peekable();
        let events: Vec<EventView> = from.by_ref().take(limit).map(EventView::from_stored).collect();
        Ok(EventList {
            ticket_id,
            events,
            next_revision: from.peek().map(|stored| stored.revision),
        })
    }

    /// The statistics read model.
    pub async fn stats(&self, _principal: &Principal) -> Result<serde_json::Value, ApiError> {
        self.catch_up().await?;
        let summary = self.inner.read_models.stats_summary().await?;
        serde_json::to_value(summary).map_err(|error| ApiError::Internal(error.to_string()))
    }

    /// Whether the store answers and the read models can be served.
    pub async fn ready(&self) -> Result<Readiness, ApiError> {
        if self.is_stopping() {
            return Err(ApiError::Unavailable("the server is shutting down".to_owned()));
        }
        self.inner.handler.store().head_position().await.map_err(|error| {
            // The driver's message (hosts, internals) stays in the log.
            tracing::warn!(%error, "readiness: the event store does not answer");
            ApiError::Unavailable("the event store does not answer".to_owned())
        })?;
        // A standby, or a database whose sessions are read-only, answers
        // reads and refuses every command: not ready for agents.
        let writable = self.inner.handler.store().accepts_writes().await.map_err(|error| {
            tracing::warn!(%error, "readiness: the event store does not say whether it takes writes");
            ApiError::Unavailable("the event store does not answer".to_owned())
        })?;
        if !writable {
            tracing::warn!("readiness: the event store takes no writes");
            return Err(ApiError::Unavailable(
                "the event store takes no writes (a read-only database, a standby, or a role that may not \
                 append)"
                    .to_owned(),
            ));
        }
        self.inner
            .read_models
            .check_readable()
            .await
            .map_err(|error| match error {
                ProjectionError::NotBuilt { .. } => ApiError::from(error),
                // Not a 500: whatever it is, this server cannot answer reads.
                error => {
                    tracing::warn!(%error, "readiness: the read models cannot be read");
                    ApiError::Unavailable("the read models cannot be read".to_owned())
                }
            })?;
        // Ready: commands are taken and reads answered. Read models that
        // stopped, or that no instance is moving on, make reads stale, not
        // impossible, and that on every instance alike: said in the body
        // ("degraded"), not with a status that would take every instance
        // out of a load balancer.
        let led = matches!(&self.inner.read_models, ReadModels::Postgres(_));
        let projections: Vec<ProjectionReadiness> = match self.inner.read_models.status().await {
            Ok(statuses) => statuses
                .into_iter()
                .map(|status| ProjectionReadiness {
                    // An error recorded by a catch-up that later succeeded
                    // is cleared; one that still holds the projection back
                    // leaves it behind.
                    stopped: (status.last_error.is_some() && status.lag > 0) || status.needs_rebuild,
                    unled: led && status.leader.is_none(),
                    name: status.name,
                    behind: status.lag > 0,
                })
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "readiness: the projections' status cannot be read");
                return Err(ApiError::Unavailable(
                    "the read models' status cannot be read".to_owned(),
                ));
            }
        };
        let degraded = projections
            .iter()
            .any(|projection| projection.stopped || (projection.unled && projection.behind));
        Ok(Readiness {
            status: if degraded { "degraded" } else { "ready" },
            projections,
        })
    }
}

/// What `/readyz` answers when the server can take commands and answer
/// reads.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Readiness {
    /// `ready`, or `degraded` when a projection stopped on an error, needs
    /// a rebuild, or (PostgreSQL) is behind with no instance leading it:
    /// reads are then stale until an operator acts.
    pub status: &'static str,
    /// Each projection, as far as readiness goes.
    pub projections: Vec<ProjectionReadiness>,
}

/// A projection in [`Readiness`]: no error text (the probe needs no token;
/// the log and `triage projections status` have the details).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProjectionReadiness {
    /// The projection.
    pub name: String,
    /// It has not applied the whole log yet (how far behind is for
    /// `triage projections status`: the probe needs no token).
    pub behind: bool,
    /// It stopped on an error, or needs a rebuild.
    pub stopped: bool,
    /// PostgreSQL read models only: no running instance leads it.
    pub unled: bool,
}

fn not_found(ticket_id: TicketId) -> ApiError {
    ApiError::NotFound {
        code: "ticket_not_found",
        detail: format!("ticket {ticket_id} does not exist"),
    }
}

fn roles_text(roles: &[Role]) -> String {
    roles.iter().map(|role| role.as_str()).collect::<Vec<_>>().join(", ")
}

/// The command with which `role` claims a ticket resting in `state`.
fn start_kind(state: State, role: Role) -> Option<CommandKind> {
    TRANSITIONS
        .iter()
        .find(|row| row.from == Some(state) && row.claim == ClaimRule::Takes && row.roles.contains(&role))
        .map(|row| row.command)
        .filter(|_| queue_states(role).contains(&state))
}

fn start_command(kind: CommandKind, lease_secs: Option<u32>) -> Command {
    match kind {
        CommandKind::StartDrafting => Command::StartDrafting { lease_secs },
        CommandKind::StartEscalation => Command::StartEscalation { lease_secs },
        _ => Command::StartClassification { lease_secs },
    }
}

/// The claim command that produced `event`, to replay a keyed claim.
fn start_command_for(event: &Event, lease_secs: Option<u32>) -> Option<Command> {
    match event {
        Event::ClassificationStarted { .. } => Some(Command::StartClassification { lease_secs }),
        Event::DraftingStarted { .. } => Some(Command::StartDrafting { lease_secs }),
        Event::EscalationStarted { .. } => Some(Command::StartEscalation { lease_secs }),
        _ => None,
    }
}

/// The type of the first event `kind` produces.
fn first_event_type(kind: CommandKind) -> &'static str {
    match kind {
        CommandKind::OpenTicket => "TicketOpened",
        CommandKind::StartClassification => "ClassificationStarted",
        CommandKind::Classify => "TicketClassified",
        CommandKind::StartDrafting => "DraftingStarted",
        CommandKind::SubmitDraft => "DraftSubmitted",
        CommandKind::StartEscalation => "EscalationStarted",
        CommandKind::Resolve => "TicketResolved",
        CommandKind::RejectDraft => "DraftRejected",
        CommandKind::EscalateToHuman => "EscalatedToHuman",
        CommandKind::ReleaseClaim => "ClaimReleased",
        CommandKind::ExtendLease => "LeaseExtended",
        CommandKind::ExpireClaim => "ClaimExpired",
        CommandKind::TakeOver => "ClaimTakenOver",
    }
}

/// Whether the events stored under a reused command id came from this same
/// request: the first event is of the type the command produces, and every
/// field the command carries (but the requested lease, which is resolved
/// against the clock) is stored with the same value.
pub(crate) fn same_request(command: &Command, events: &[Event]) -> bool {
    let Some(first) = events.first() else { return false };
    if first.event_type() != first_event_type(command.kind()) {
        return false;
    }
    let (Ok(serde_json::Value::Object(sent)), Ok(serde_json::Value::Object(stored))) =
        (serde_json::to_value(command), serde_json::to_value(first))
    else {
        return false;
    };
    sent.iter()
        .filter(|(field, _)| !matches!(field.as_str(), "type" | "lease_secs"))
        .all(|(field, value)| stored.get(field).unwrap_or(&serde_json::Value::Null) == value)
}

/// A page `limit` as given, refusing 0: a page of nothing would read as
/// the end of the list.
fn at_least_one(limit: Option<usize>) -> Result<Option<usize>, ApiError> {
    match limit {
        Some(0) => Err(ApiError::bad_request(
            "invalid_query",
            "limit must be at least 1: a page of nothing would read as the end of the list",
        )),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use triage_domain::Priority;

    #[test]
    fn a_reused_key_matches_only_the_same_request() {
        let claim_id = Uuid::new_v4();
        let classify = |category: &str| Command::Classify {
            claim_id,
            category: category.to_owned(),
            priority: Priority::High,
            confidence: 0.5,
        };
        let stored = [Event::TicketClassified {
            claim_id,
            category: "billing".to_owned(),
            priority: Priority::High,
            confidence: 0.5,
        }];
        assert!(same_request(&classify("billing"), &stored));
        assert!(!same_request(&classify("bug"), &stored));
        let draft = Command::SubmitDraft {
            claim_id,
            body: "hello".to_owned(),
        };
        assert!(!same_request(&draft, &stored));
        assert!(!same_request(&draft, &[]));
    }

    #[test]
    fn only_claiming_roles_have_start_commands() {
        assert_eq!(
            start_kind(State::New, Role::Classifier),
            Some(CommandKind::StartClassification)
        );
        assert_eq!(
            start_kind(State::Classified, Role::Drafter),
            Some(CommandKind::StartDrafting)
        );
        assert_eq!(start_kind(State::New, Role::Drafter), None);
        assert_eq!(start_kind(State::NeedsHuman, Role::Operator), None);
        assert_eq!(start_kind(State::New, Role::Analyst), None);
    }
}
