//! The command handler: load → evolve → decide → append with
//! `Exact(revision)`.
//!
//! Handlers hold no state that correctness depends on (a cache and the
//! turns below save work only), so any number of them, in any number of
//! processes, can run against one store: correctness comes from the
//! expected revision alone.
//!
//! # Main decisions
//! - **A command that carries the revision its sender decided on is never
//!   re-applied to newer state.** If the ticket moved on, the sender gets
//!   [`CommandError::StaleRevision`] with the current state and revision and
//!   must decide again.
//! - **Other commands are re-decided** against fresh state after a conflict,
//!   with bounded retries and full jitter ([`RetryPolicy`]).
//! - **Retries are harmless.** Event ids derive from the command id and the
//!   event's index alone (`triage_domain::event_id`: time-ordered for a
//!   UUIDv7 command id), so a retried command finds its own events in the stream
//!   (and returns the original outcome, marked `duplicate`), or, when two
//!   copies race, the store's idempotent append makes the second a no-op.
//! - **A bounded stream cache** saves the read before most appends; a
//!   decision on cached state is still appended with `Exact(revision)`, and
//!   rejections are only ever given on fresh state: a read, or the cached
//!   ticket at exactly the revision a refused append found the stream at
//!   (a race lost to another process, whose result a read of this one
//!   cached).
//! - **Commands of one process on one ticket take turns** (clones of a
//!   handler share them): the second waits for the first's append and
//!   decides on its result instead of racing it to a conflict in the
//!   store. A refusal may be decided on a cache entry seen by a read or
//!   append that began after the command arrived, and at most 100 ms ago:
//!   the ticket as the store had it during the command's lifetime. Another
//!   process is still a racer, met by the expected revision.
//! - **A load with the ticket cached reads only the events from the cached
//!   revision on** and folds them onto the cached state, checking that the
//!   event stored at that revision is the cached one.
//! - **Conflicts stay typed** from the store's `WrongExpectedVersion` to the
//!   retry loop; the domain's [`Rejection`] reaches the caller unchanged.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::{Instrument, debug, info, info_span, warn};
use triage_domain::{
    Command, CommandEnvelope, CommandRejected, Context, DecodeError, Event, EventMetadata, Policy, Rejection, State,
    Ticket, TicketId, decide, event_id, evolve,
};
use triage_event_store::{
    AppendResult, Error as StoreError, EventData, EventStore, ExpectedRevision, Position, ReadStream, RecordedEvent,
    StreamName,
};
use uuid::Uuid;

/// The handler's clock, injected so that tests can move time.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told to, for tests and simulations.
#[derive(Debug)]
pub struct ManualClock {
    now: std::sync::Mutex<DateTime<Utc>>,
}

impl ManualClock {
    /// A clock stopped at `now`.
    pub fn new(now: DateTime<Utc>) -> Self {
        ManualClock {
            now: std::sync::Mutex::new(now),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: chrono::Duration) {
        let mut now = self.now.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// How conflicts of commands without a decided-on revision are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// The backoff cap of the first retry; it doubles per retry.
    pub base_delay: Duration,
    /// The largest backoff cap.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(50),
        }
    }
}

impl RetryPolicy {
    /// Full jitter: a random delay up to the capped exponential backoff.
    fn delay(&self, retry: u32) -> Duration {
        let cap = self
            .base_delay
            .saturating_mul(1u32 << retry.min(16))
            .min(self.max_delay);
        cap.mul_f64(fastrand::f64())
    }
}

/// A command that was accepted, or the original outcome of a retried one.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Accepted {
    /// The ticket.
    pub ticket_id: TicketId,
    /// The command.
    pub command_id: Uuid,
    /// The stream revision of the command's last event: what to send as the
    /// decided-on revision next.
    pub revision: u64,
    /// The global position of the command's last event.
    pub position: Position,
    /// The ticket's state right after the command.
    pub state: State,
    /// The events the command produced.
    pub events: Vec<Event>,
    /// True when this is a retry of a command already stored: nothing new
    /// was written.
    pub duplicate: bool,
}

/// Why a command was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The domain refused the command; nothing was written.
    #[error("rejected: {rejection}")]
    Rejected {
        /// Why.
        rejection: Rejection,
        /// The ticket.
        ticket_id: TicketId,
        /// The ticket's current state (`None` if it does not exist).
        state: Option<State>,
        /// The ticket's current revision (`None` if it does not exist).
        revision: Option<u64>,
    },
    /// The command was decided on a revision the ticket has moved past; it
    /// is not re-applied. Decide again from `state` at `actual`.
    #[error("{}", stale_message(*expected, *actual))]
    StaleRevision {
        /// The ticket.
        ticket_id: TicketId,
        /// The revision the command was decided on.
        expected: u64,
        /// The current revision.
        actual: Option<u64>,
        /// The current state.
        state: Option<State>,
    },
    /// Concurrent writers kept winning; retries were exhausted.
    #[error(
        "gave up after {attempts} attempts: other writers kept changing ticket {ticket_id}; the command was not \
         applied, and sending it again with the same command id is safe"
    )]
    Contended {
        /// The ticket.
        ticket_id: TicketId,
        /// Attempts made.
        attempts: u32,
    },
    /// The command id was already used for a different command: on another
    /// ticket, or for another command or sender on this one. Not a retry.
    #[error("command id {command_id} was already used for a different command; this one was not applied")]
    CommandIdReused {
        /// The reused id.
        command_id: Uuid,
    },
    /// A stored event of the ticket could not be decoded.
    #[error("ticket {ticket_id} revision {revision} cannot be read: {source}")]
    Undecodable {
        /// The ticket.
        ticket_id: TicketId,
        /// The stored revision.
        revision: u64,
        /// What failed.
        #[source]
        source: DecodeError,
    },
    /// The event store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CommandError {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            CommandError::Rejected { rejection, .. } => rejection.code(),
            CommandError::StaleRevision { .. } => "stale_revision",
            CommandError::Contended { .. } => "contended",
            CommandError::CommandIdReused { .. } => "command_id_reused",
            CommandError::Undecodable { .. } => "undecodable_event",
            CommandError::Store(_) => "store_error",
        }
    }
}

/// A ticket loaded from its stream.
#[derive(Clone, Debug, Default)]
pub struct LoadedTicket {
    /// The folded state.
    pub ticket: Ticket,
    /// The last revision; `None` when the stream does not exist.
    pub revision: Option<u64>,
    /// The decoded history with its metadata, in revision order.
    pub history: Vec<StoredEvent>,
}

/// One decoded stored event.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    /// The domain event.
    pub event: Event,
    /// Its envelope metadata.
    pub metadata: EventMetadata,
    /// Its stream revision.
    pub revision: u64,
    /// Its global position.
    pub position: Position,
    /// Its event id.
    pub id: Uuid,
}

/// Decodes a stored record into a domain event and its metadata.
pub fn decode_recorded(record: &RecordedEvent) -> Result<(Event, EventMetadata), DecodeError> {
    triage_domain::decode_stored(&record.event_type, &record.data, &record.metadata)
}

/// Counters of what the handler did, for the demo and for metrics.
#[derive(Debug, Default)]
pub struct HandlerStats {
    accepted: AtomicU64,
    rejected: AtomicU64,
    duplicates: AtomicU64,
    conflicts_retried: AtomicU64,
    store_conflicts: AtomicU64,
    stale_revisions: AtomicU64,
}

/// A snapshot of [`HandlerStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HandlerCounts {
    /// Commands accepted and written.
    pub accepted: u64,
    /// Commands the domain refused.
    pub rejected: u64,
    /// Retried commands answered with their original outcome.
    pub duplicates: u64,
    /// Expected-revision conflicts resolved by deciding again.
    pub conflicts_retried: u64,
    /// Appends the store refused because the stream had moved on, whatever
    /// came of them (decided again, refused as stale, a reused id): races
    /// with another process, or decisions on a cached ticket that was
    /// behind.
    pub store_conflicts: u64,
    /// Commands refused because their decided-on revision was stale.
    pub stale_revisions: u64,
}

impl HandlerStats {
    /// The current counts.
    pub fn snapshot(&self) -> HandlerCounts {
        HandlerCounts {
            accepted: self.accepted.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            conflicts_retried: self.conflicts_retried.load(Ordering::Relaxed),
            store_conflicts: self.store_conflicts.load(Ordering::Relaxed),
            stale_revisions: self.stale_revisions.load(Ordering::Relaxed),
        }
    }
}

/// Folded ticket streams a handler keeps by default.
pub const DEFAULT_CACHE_TICKETS: usize = 4096;

/// Turns commands into events. Cheap to clone; clones share the store,
/// clock, counters and stream cache.
#[derive(Clone)]
pub struct CommandHandler {
    store: Arc<dyn EventStore>,
    policy: Arc<Policy>,
    clock: Arc<dyn Clock>,
    retry: RetryPolicy,
    stats: Arc<HandlerStats>,
    cache: Arc<cache::StreamCache>,
    turns: Arc<turns::Turns<TicketId>>,
    record_rejections: bool,
    /// Set: refusals are recorded after the caller has its answer. A
    /// record being written holds a permit: past [`BACKGROUND_RECORDS`]
    /// a refusal is recorded before it is answered again, so a storm of
    /// refusals on a slow store cannot pile up without bound, and all
    /// permits back means none is in flight.
    background: Option<Background>,
}

/// Background recording: the permits and the writer.
#[derive(Clone)]
struct Background {
    slots: Arc<tokio::sync::Semaphore>,
    recorder: Arc<recorder::Recorder>,
}

/// Refusal records written in the background at most at once.
const BACKGROUND_RECORDS: usize = 1024;

impl fmt::Debug for CommandHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandHandler")
            .field("store", &self.store.describe())
            .field("policy", &self.policy)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl CommandHandler {
    /// A handler with the default policy, the system clock and default
    /// retries.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        CommandHandler {
            store,
            policy: Arc::new(Policy::default()),
            clock: Arc::new(SystemClock),
            retry: RetryPolicy::default(),
            stats: Arc::new(HandlerStats::default()),
            cache: Arc::new(cache::StreamCache::new(DEFAULT_CACHE_TICKETS)),
            turns: Arc::new(turns::Turns::new()),
            record_rejections: true,
            background: None,
        }
    }

    /// Records refusals after answering them instead of before: a refused
    /// caller (one that lost a race, typically) is not kept waiting for
    /// the write of an audit record that changes nothing it could act on.
    /// For long-running servers, which call
    /// [`CommandHandler::rejections_recorded`] before they stop; a one-shot
    /// process would exit before the write. Measured with `triage-bench
    /// pg-compare --tickets hot --agents 8`: p99 3.7 ms against 5.7 ms.
    /// The records of one ticket that pile up while one of its appends is
    /// in flight are written together in the next (see `recorder.rs`).
    /// Clones share the background writes.
    pub fn with_rejections_recorded_in_background(mut self) -> Self {
        self.background = Some(Background {
            slots: Arc::new(tokio::sync::Semaphore::new(BACKGROUND_RECORDS)),
            recorder: recorder::Recorder::new(Arc::clone(&self.store)),
        });
        self
    }

    /// Waits until every refusal answered so far is recorded (or failed
    /// to be, which is logged). Immediate without background recording.
    pub async fn rejections_recorded(&self) {
        if let Some(Background { slots, .. }) = &self.background {
            // Every permit back: no record in flight. Held for a moment,
            // during which a refusal is recorded in the foreground.
            let all = u32::try_from(BACKGROUND_RECORDS).expect("a small constant");
            drop(slots.acquire_many(all).await);
        }
    }

    /// Whether refused commands are recorded as `CommandRejected` in the
    /// ticket's `rejections-<uuid>` stream (default on), for statistics and
    /// analysts. The ticket stream is never touched by a refusal.
    pub fn with_rejection_log(mut self, record: bool) -> Self {
        self.record_rejections = record;
        self
    }

    /// Caches up to `tickets` folded streams (0 turns the cache off).
    /// Handlers cloned from this one share the cache.
    pub fn with_cache_capacity(mut self, tickets: usize) -> Self {
        self.cache = Arc::new(cache::StreamCache::new(tickets));
        self
    }

    /// Uses `policy`.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// Uses `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Uses `retry`.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The counters.
    pub fn stats(&self) -> HandlerCounts {
        self.stats.snapshot()
    }

    /// Loads and folds a ticket's stream. A missing stream is a default
    /// (non-existent) ticket with no revision.
    ///
    /// What was read is also what the next command on the ticket decides on
    /// first: a sender that looks at a ticket and then sends a command
    /// (agents do) is not answered from an older cached snapshot, which
    /// would cost a conflict and a second read.
    pub async fn load(&self, ticket_id: TicketId) -> Result<LoadedTicket, CommandError> {
        Ok(Arc::unwrap_or_clone(self.load_fresh(ticket_id).await?))
    }

    /// [`CommandHandler::load`], kept in the stream cache.
    async fn load_fresh(&self, ticket_id: TicketId) -> Result<Arc<LoadedTicket>, CommandError> {
        let seen_after = Instant::now();
        let known = self.cache.get(ticket_id).map(|cached| cached.loaded);
        let loaded = Arc::new(self.read_and_fold(ticket_id, known).await?);
        self.cache.put(ticket_id, Arc::clone(&loaded), seen_after);
        Ok(loaded)
    }

    /// Reads the stream as it is now and folds it. With `known`, a fold of
    /// the stream up to some revision (a cache entry), only the events from
    /// that revision on are read and folded onto it: stored events never
    /// change, so the result is the fold of the whole stream, as a read of
    /// all of it would give, for a fraction of the rows and decoding. The
    /// read starts at `known`'s last revision, not after it, and that
    /// event's id must match: a stream that is not the one `known` was
    /// folded from (a store replaced under the handler) is read whole.
    async fn read_and_fold(
        &self,
        ticket_id: TicketId,
        known: Option<Arc<LoadedTicket>>,
    ) -> Result<LoadedTicket, CommandError> {
        let stream = stream_of(ticket_id)?;
        if let Some(known) = known
            && let (Some(revision), Some(last)) = (known.revision, known.history.last())
        {
            let since = ReadStream::forwards().from_revision(revision);
            match self.store.read_stream(&stream, since).await {
                Ok(records)
                    if records
                        .first()
                        .is_some_and(|first| first.revision == revision && first.id == last.id) =>
                {
                    let mut loaded = Arc::unwrap_or_clone(known);
                    fold_onto(&mut loaded, ticket_id, records.into_iter().skip(1))?;
                    return Ok(loaded);
                }
                Ok(_) | Err(StoreError::StreamNotFound { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        let records = match self.store.read_stream(&stream, ReadStream::forwards()).await {
            Ok(records) => records,
            Err(StoreError::StreamNotFound { .. }) => return Ok(LoadedTicket::default()),
            Err(error) => return Err(error.into()),
        };
        let mut loaded = LoadedTicket {
            history: Vec::with_capacity(records.len()),
            ..LoadedTicket::default()
        };
        fold_onto(&mut loaded, ticket_id, records)?;
        Ok(loaded)
    }

    /// Handles one command.
    pub async fn handle(&self, envelope: CommandEnvelope) -> Result<Accepted, CommandError> {
        self.handle_recording(envelope, self.record_rejections).await
    }

    /// [`CommandHandler::handle`], without recording a refusal: for a
    /// caller that tries a command on one ticket after another and answers
    /// with the one that was accepted (a work claim), so that its lost tries
    /// are not recorded as refusals that nobody was given.
    pub async fn handle_unrecorded(&self, envelope: CommandEnvelope) -> Result<Accepted, CommandError> {
        self.handle_recording(envelope, false).await
    }

    async fn handle_recording(&self, envelope: CommandEnvelope, record: bool) -> Result<Accepted, CommandError> {
        let span = info_span!(
            "command",
            ticket = %envelope.ticket_id,
            command_id = %envelope.command_id,
            command = %envelope.command.kind(),
            agent = %envelope.agent.id,
            role = %envelope.agent.role,
        );
        let result = self.handle_inner(&envelope).instrument(span.clone()).await;
        if record
            && let Err(error) = &result
            && let Some(record) = self.rejection_record(&envelope, error)
        {
            let (stream, data) = record;
            let background = self
                .background
                .as_ref()
                .and_then(|background| Some((Arc::clone(&background.slots).try_acquire_owned().ok()?, background)));
            match background {
                Some((slot, background)) => {
                    let _entered = span.enter();
                    background.recorder.record(stream, data, slot);
                }
                None => {
                    recorder::append(&*self.store, &stream, vec![data])
                        .instrument(span.clone())
                        .await
                }
            }
        }
        let _entered = span.enter();
        match &result {
            Ok(accepted) if accepted.duplicate => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                debug!(
                    revision = accepted.revision,
                    "duplicate command answered with its original outcome"
                );
            }
            Ok(accepted) => {
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                debug!(revision = accepted.revision, state = %accepted.state, "accepted");
            }
            Err(CommandError::Rejected { rejection, .. }) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                debug!(reason = %rejection, "rejected");
            }
            Err(CommandError::StaleRevision { .. }) => {
                self.stats.stale_revisions.fetch_add(1, Ordering::Relaxed);
                debug!("stale decided-on revision");
            }
            // The sender's mistake, answered to it: not the operator's
            // concern, like a refusal.
            Err(error @ CommandError::CommandIdReused { .. }) => debug!(%error, "command id reused"),
            // Answered to the sender, who may retry; news for a server's
            // log (info), not a warning next to the CLI's own error.
            Err(error @ CommandError::Contended { .. }) => info!(%error, "gave up on a contended ticket"),
            Err(error) => warn!(%error, "command failed"),
        }
        result
    }

    async fn handle_inner(&self, envelope: &CommandEnvelope) -> Result<Accepted, CommandError> {
        let ticket_id = envelope.ticket_id;
        let stream = stream_of(ticket_id)?;
        let first_event_id = event_id(envelope.command_id, 0);
        let mut attempt = 0;
        let arrived = Instant::now();
        // Other commands of this process on the ticket wait until this one
        // is decided and appended (see `turns.rs`), and then decide on what
        // it left in the cache.
        let mut turn = Some(self.turns.take(ticket_id).await);
        // The stream as the store found it after this command arrived: as
        // good as a fresh read. That is a cache entry seen by a read or an
        // append that began after this command arrived (one of the commands
        // it waited for, typically), or what a refused append of this
        // command found (see the conflict below).
        let mut current: Option<Arc<LoadedTicket>> = None;
        // Otherwise decide on the cached ticket first; anything but an
        // accepted append is then confirmed on fresh state before it is
        // reported.
        let mut cached = None;
        // Whether `current` is such a cache entry, not a refused append's
        // answer.
        let mut seen_for_this_command = false;
        match self.cache.get(ticket_id) {
            Some(entry) if entry.current_for(arrived) => {
                current = Some(entry.loaded);
                seen_for_this_command = true;
            }
            Some(entry) => cached = Some(entry.loaded),
            None => {}
        }
        // A ticket being opened is almost always new: decide on "no ticket"
        // without reading it, and let the append's "no stream" expectation
        // check that. A ticket that exists comes back as a conflict and is
        // decided again on a fresh read, as on a stale cache entry; a
        // retried open finds its events stored and gets its original answer.
        if current.is_none() && cached.is_none() && matches!(envelope.command, Command::OpenTicket { .. }) {
            cached = Some(Arc::new(LoadedTicket::default()));
        }
        loop {
            attempt += 1;
            if turn.is_none() {
                turn = Some(self.turns.take(ticket_id).await);
            }
            let from_cache = cached.is_some() && current.is_none();
            let seen_before_now = std::mem::take(&mut seen_for_this_command) && current.is_some();
            let loaded = match (current.take(), cached.take()) {
                (Some(loaded), _) | (None, Some(loaded)) => loaded,
                (None, None) => self.load_fresh(ticket_id).await?,
            };
            if let Some(original) = original_outcome(&loaded, envelope, first_event_id, &self.policy)? {
                return Ok(original);
            }
            // A ticket that does not exist is not found, whatever revision
            // the sender expected (decide says so below); only an opening
            // can be stale on a stream that is not there.
            if let Some(expected) = envelope.expected_revision
                && loaded.revision != Some(expected)
                && (loaded.revision.is_some() || matches!(envelope.command, Command::OpenTicket { .. }))
            {
                if from_cache {
                    continue;
                }
                return Err(stale(ticket_id, expected, &loaded, &envelope.command));
            }
            let now = self.clock.now();
            let context = Context {
                now,
                ticket_id,
                agent: &envelope.agent,
                command_id: envelope.command_id,
                policy: &self.policy,
            };
            let events = match decide(&loaded.ticket, &envelope.command, &context) {
                Ok(events) => events,
                Err(_) if from_cache => continue,
                // A lease found run out now, on the ticket as it was up to
                // `CURRENT_FOR` ago: another process may have extended it
                // since. Confirmed on a read, as after a retry's pause.
                Err(Rejection::LeaseExpired { .. }) if seen_before_now => continue,
                Err(rejection) => {
                    // A late write under a claim that has ended since is
                    // told how it ended, not only that the stage is over.
                    let ended = |claim_id| {
                        triage_domain::ended_claim(
                            &loaded.ticket,
                            loaded.history.iter().map(|stored| &stored.event),
                            claim_id,
                        )
                    };
                    let rejection = match (&rejection, envelope.command.claim_id()) {
                        (Rejection::InvalidTransition { .. } | Rejection::StaleClaim { .. }, Some(claim_id)) => {
                            ended(claim_id).unwrap_or(rejection)
                        }
                        // The claim's own holder, refused for its role in the
                        // state its ended claim left the ticket in (an
                        // escalator's resolve after the sweeper returned the
                        // ticket to DRAFT_READY): a late write too, when its
                        // role could have sent the command under the claim.
                        (Rejection::RoleNotAllowed { .. }, Some(claim_id))
                            if late_under_own_claim(&loaded, envelope, claim_id) =>
                        {
                            ended(claim_id).unwrap_or(rejection)
                        }
                        _ => rejection,
                    };
                    return Err(CommandError::Rejected {
                        rejection,
                        ticket_id,
                        state: loaded.ticket.state,
                        revision: loaded.revision,
                    });
                }
            };
            let digest = command_digest(envelope);
            let records = serialize(envelope, &events, now, loaded.revision, digest);
            let expected = loaded
                .revision
                .map_or(ExpectedRevision::NoStream, ExpectedRevision::Exact);
            let appending_from = Instant::now();
            match self.store.append(&stream, expected, records).await {
                Ok(result) if result.replayed => {
                    // Another copy of this command got there first: what is
                    // stored is its decision, not ours (a lease decided at
                    // another moment, say). Answer with what is stored.
                    self.cache.remove(ticket_id);
                    let fresh = self.load(ticket_id).await?;
                    return original_outcome(&fresh, envelope, first_event_id, &self.policy)?.ok_or(
                        CommandError::Contended {
                            ticket_id,
                            attempts: attempt,
                        },
                    );
                }
                Ok(result) => {
                    let appended = Appended {
                        result,
                        began: appending_from,
                    };
                    let accepted = self.remember(&loaded, envelope, events, now, digest, appended);
                    return Ok(accepted);
                }
                Err(StoreError::WrongExpectedVersion { actual, .. }) => {
                    self.stats.store_conflicts.fetch_add(1, Ordering::Relaxed);
                    if actual == loaded.revision {
                        // The stream did not move: the event ids are stored
                        // in another stream.
                        self.cache.remove(ticket_id);
                        return Err(CommandError::CommandIdReused {
                            command_id: envelope.command_id,
                        });
                    }
                    // The store found the stream at `actual`. When the race
                    // was lost to a command of this process, the cache may
                    // hold the stream at exactly that revision already: a
                    // cached ticket is the fold of the stored events up to
                    // its revision (read, or appended with `Exact`), and
                    // stored events never change, so it is the stream as
                    // it was at the conflict, within this command's
                    // lifetime: deciding on it, a refusal included, is as
                    // sound as deciding on a read made then, and saves it.
                    let at_conflict = self
                        .cache
                        .get(ticket_id)
                        .map(|cached| cached.loaded)
                        .filter(|cached| actual.is_some() && cached.revision == actual);
                    if at_conflict.is_none() {
                        self.cache.remove(ticket_id);
                    }
                    if from_cache {
                        // The cached ticket was behind: not a race with
                        // another writer, so decide again at once.
                        current = at_conflict;
                        continue;
                    }
                    if let Some(expected) = envelope.expected_revision {
                        let fresh = match at_conflict {
                            Some(current) => current,
                            None => self.load_fresh(ticket_id).await?,
                        };
                        if let Some(original) = original_outcome(&fresh, envelope, first_event_id, &self.policy)? {
                            return Ok(original);
                        }
                        return Err(stale(ticket_id, expected, &fresh, &envelope.command));
                    }
                    if attempt >= self.retry.max_attempts {
                        return Err(CommandError::Contended {
                            ticket_id,
                            attempts: attempt,
                        });
                    }
                    self.stats.conflicts_retried.fetch_add(1, Ordering::Relaxed);
                    debug!(attempt, ?actual, "conflict; deciding again on fresh state");
                    // Then a fresh read: the state found at the conflict is
                    // not used after the pause. On a busy ticket it is out of
                    // date by then (each retry would conflict again and use
                    // up an attempt), and a refusal would pair it with a
                    // later clock (a lease extended during the pause would
                    // read as expired).
                    // Not holding up the ticket's other commands meanwhile.
                    turn = None;
                    tokio::time::sleep(self.retry.delay(attempt)).await;
                }
                Err(error) => {
                    self.cache.remove(ticket_id);
                    return Err(error.into());
                }
            }
        }
    }

    /// The `CommandRejected` record of a refusal decided on fresh state,
    /// and its stream; `None` for what is not recorded.
    fn rejection_record(&self, envelope: &CommandEnvelope, error: &CommandError) -> Option<(StreamName, EventData)> {
        // A record names its sender: one whose id is refused (a line
        // break, an escape sequence) would carry it into every report.
        if triage_domain::check_agent_id(&envelope.agent.id).is_err() {
            return None;
        }
        let (state, revision) = match error {
            CommandError::Rejected {
                rejection: Rejection::TicketNotFound,
                ..
            } => return None,
            CommandError::Rejected { state, revision, .. } => (*state, *revision),
            // Nothing to record against a ticket that does not exist.
            CommandError::StaleRevision { actual: None, .. } => return None,
            CommandError::StaleRevision { state, actual, .. } => (*state, *actual),
            _ => return None,
        };
        let record = CommandRejected {
            ticket_id: envelope.ticket_id,
            command: envelope.command.kind(),
            code: error.code().to_owned(),
            reason: error.to_string(),
            state,
            revision,
        };
        let metadata = metadata_for(
            envelope,
            CommandRejected::SCHEMA_VERSION,
            self.clock.now(),
            revision,
            command_digest(envelope),
        );
        let data = EventData {
            id: CommandRejected::record_id(envelope.command_id, envelope.ticket_id),
            event_type: CommandRejected::EVENT_TYPE.to_owned(),
            data: record.encode(),
            metadata: metadata.encode(),
        };
        match StreamName::new(CommandRejected::stream_name(envelope.ticket_id)) {
            Ok(stream) => Some((stream, data)),
            Err(error) => {
                warn!(%error, "could not record the rejection");
                None
            }
        }
    }

    /// Builds the accepted outcome and caches the ticket as it is now.
    fn remember(
        &self,
        loaded: &LoadedTicket,
        envelope: &CommandEnvelope,
        events: Vec<Event>,
        now: DateTime<Utc>,
        digest: Uuid,
        Appended { result, began }: Appended,
    ) -> Accepted {
        let ticket = events.iter().fold(loaded.ticket.clone(), evolve);
        let state = ticket.state.expect("an accepted command leaves the ticket existing");
        if let [event] = events.as_slice() {
            let mut history = loaded.history.clone();
            history.push(StoredEvent {
                event: event.clone(),
                metadata: metadata_for(envelope, event.schema_version(), now, loaded.revision, digest),
                revision: result.current_revision,
                position: result.position,
                id: event_id(envelope.command_id, 0),
            });
            let updated = LoadedTicket {
                ticket,
                revision: Some(result.current_revision),
                history,
            };
            self.cache.put(envelope.ticket_id, Arc::new(updated), began);
        } else {
            // Only the last event's position is known; read it back next time.
            self.cache.remove(envelope.ticket_id);
        }
        Accepted {
            ticket_id: envelope.ticket_id,
            command_id: envelope.command_id,
            revision: result.current_revision,
            position: result.position,
            state,
            events,
            duplicate: false,
        }
    }
}

/// Decodes `records`, the events that follow `loaded`'s revision in
/// order, and folds them onto it.
fn fold_onto(
    loaded: &mut LoadedTicket,
    ticket_id: TicketId,
    records: impl IntoIterator<Item = RecordedEvent>,
) -> Result<(), CommandError> {
    for record in records {
        let (event, metadata) = decode_recorded(&record).map_err(|source| CommandError::Undecodable {
            ticket_id,
            revision: record.revision,
            source,
        })?;
        loaded.ticket = evolve(std::mem::take(&mut loaded.ticket), &event);
        loaded.revision = Some(record.revision);
        loaded.history.push(StoredEvent {
            event,
            metadata,
            revision: record.revision,
            position: record.position,
            id: record.id,
        });
    }
    Ok(())
}

/// Whether `envelope`'s sender took the claim `claim_id` on this ticket
/// and its role may send the command in the stage the claim began (an
/// escalator's resolve under its review claim): then a refusal for its role
/// now is the claim having ended, not the role.
fn late_under_own_claim(loaded: &LoadedTicket, envelope: &CommandEnvelope, claim_id: Uuid) -> bool {
    let Some(taken) = loaded.history.iter().position(|stored| {
        stored
            .event
            .new_claim()
            .is_some_and(|claim| claim.claim_id == claim_id && claim.agent_id == envelope.agent.id)
    }) else {
        return false;
    };
    let stage = loaded.history[..=taken]
        .iter()
        .fold(Ticket::default(), |ticket, stored| evolve(ticket, &stored.event))
        .state;
    triage_domain::transitions_from(stage, envelope.command.kind()).any(|row| row.roles.contains(&envelope.agent.role))
}

/// A successful append, and when it began: the stream was at its revision
/// at some moment after that.
struct Appended {
    result: AppendResult,
    began: Instant,
}

fn stream_of(ticket_id: TicketId) -> Result<StreamName, CommandError> {
    Ok(StreamName::new(ticket_id.stream_name())?)
}

/// The text of [`CommandError::StaleRevision`]. A revision the ticket has
/// not reached was never seen by anyone: a wrong number, not an old one.
fn stale_message(expected: u64, actual: Option<u64>) -> String {
    match actual {
        Some(actual) if expected > actual => format!(
            "stale decision: decided on revision {expected}, a revision the ticket has not reached (it is at {actual})"
        ),
        Some(actual) => format!("stale decision: decided on revision {expected}, the ticket is at {actual}"),
        None => format!("stale decision: decided on revision {expected}, the ticket is at no revision"),
    }
}

/// A decision made on a revision the ticket has moved past. When the
/// command names a claim that has ended since (the sweeper expired it, it
/// was released or taken over), the sender is told that, as a command
/// without `If-Match` is: its claim, not only its view of the ticket, is
/// gone, so it must not decide again under it.
fn stale(ticket_id: TicketId, expected: u64, loaded: &LoadedTicket, command: &Command) -> CommandError {
    let ended = command.claim_id().and_then(|claim_id| {
        triage_domain::ended_claim(
            &loaded.ticket,
            loaded.history.iter().map(|stored| &stored.event),
            claim_id,
        )
    });
    match ended {
        Some(rejection) => CommandError::Rejected {
            rejection,
            ticket_id,
            state: loaded.ticket.state,
            revision: loaded.revision,
        },
        None => CommandError::StaleRevision {
            ticket_id,
            expected,
            actual: loaded.revision,
            state: loaded.ticket.state,
        },
    }
}

/// The outcome of this command id if its events are already in the stream.
///
/// Only a retry of the same command gets it: the stored events carry this
/// command's [`command_digest`] (the same command from the same agent), or,
/// without one or with another, they must be what this command, from this
/// sender (its agent id, in the role it sent the original in), decides on
/// the ticket as it was then, at the moment it was decided (lease expiries
/// aside, as they follow a policy that may have changed since). Anything
/// else is
/// [`CommandError::CommandIdReused`], never a "harmless retry" that did
/// nothing.
fn original_outcome(
    loaded: &LoadedTicket,
    envelope: &CommandEnvelope,
    first_event_id: Uuid,
    policy: &Policy,
) -> Result<Option<Accepted>, CommandError> {
    // Events stored before event ids were time-ordered carry the former id.
    let former = triage_domain::former_event_id(envelope.command_id, 0);
    let Some(start) = loaded
        .history
        .iter()
        .position(|stored| stored.id == first_event_id || Some(stored.id) == former)
    else {
        return Ok(None);
    };
    let own: Vec<&StoredEvent> = loaded.history[start..]
        .iter()
        .take_while(|stored| stored.metadata.command_id == envelope.command_id)
        .collect();
    let Some((first, last)) = own.first().zip(own.last()) else {
        return Ok(None);
    };
    let before = loaded.history[..start]
        .iter()
        .fold(Ticket::default(), |ticket, stored| evolve(ticket, &stored.event));
    // Decided again as its original sender: a principal with several roles
    // may send the retry in another of them (the API picks the role from
    // the ticket's state, which has moved on since). Its command ids are
    // its own (the API derives them from the agent id and the key), so the
    // agent id is what must match.
    let context = Context {
        now: first.metadata.recorded_at,
        ticket_id: envelope.ticket_id,
        agent: &first.metadata.agent,
        command_id: envelope.command_id,
        policy,
    };
    // Decided at the original's moment, a lease the command names comes
    // out at exactly the stored expiry: it is compared as it is, so a
    // reused id that asks for another lease is not a retry. A default
    // lease is the policy's, which may have changed since: its expiry is
    // left out of the comparison.
    let compared = |event: &Event| match envelope.command.lease_secs() {
        Some(_) => event.clone(),
        None => without_leases(event),
    };
    // The recorded digest recognises the same command from the same sender
    // whatever the policy says now; without one (older events), or when
    // it differs, the command is decided again as it was then.
    let same_digest = first.metadata.command_digest == Some(command_digest(envelope));
    let same_command = same_digest
        || first.metadata.agent.id == envelope.agent.id
            && decide(&before, &envelope.command, &context).is_ok_and(|events| {
                events.len() == own.len()
                    && events
                        .iter()
                        .zip(&own)
                        .all(|(decided, stored)| compared(decided) == compared(&stored.event))
            });
    if !same_command {
        return Err(CommandError::CommandIdReused {
            command_id: envelope.command_id,
        });
    }
    let Some(state) = own
        .iter()
        .fold(before, |ticket, stored| evolve(ticket, &stored.event))
        .state
    else {
        return Ok(None);
    };
    Ok(Some(Accepted {
        ticket_id: envelope.ticket_id,
        command_id: envelope.command_id,
        revision: last.revision,
        position: last.position,
        state,
        events: own.iter().map(|stored| stored.event.clone()).collect(),
        duplicate: true,
    }))
}

/// `event` with every lease expiry it carries set to one fixed time.
fn without_leases(event: &Event) -> Event {
    let mut event = event.clone();
    match &mut event {
        Event::ClassificationStarted { claim }
        | Event::DraftingStarted { claim }
        | Event::EscalationStarted { claim }
        | Event::ClaimTakenOver { claim, .. } => claim.lease_expires_at = DateTime::UNIX_EPOCH,
        Event::LeaseExtended { lease_expires_at, .. } => *lease_expires_at = DateTime::UNIX_EPOCH,
        _ => {}
    }
    event
}

/// The namespace of command digests.
const COMMAND_DIGEST_NAMESPACE: Uuid = Uuid::from_u128(0x3d0c_52a1_7f4e_4b8a_a1c6_58e2_9b07_d4f3);

/// A digest of a command and its sender: UUIDv5 (SHA-1) of the agent id
/// and the command's JSON. Recorded with its events, it recognises a retry
/// of the command without deciding it again, so a retry is still one after
/// the policy changed (another category set, say), which deciding again
/// could refuse. Stable while the command's JSON is; a digest that does
/// not match falls back to deciding again (see [`original_outcome`]).
pub fn command_digest(envelope: &CommandEnvelope) -> Uuid {
    let mut name = envelope.agent.id.as_bytes().to_vec();
    // The command's JSON holds no raw NUL (serde_json escapes it), so the
    // last NUL ends the agent id: the two parts cannot run into each other.
    name.push(0);
    serde_json::to_writer(&mut name, &envelope.command).expect("commands always serialize");
    Uuid::new_v5(&COMMAND_DIGEST_NAMESPACE, &name)
}

fn metadata_for(
    envelope: &CommandEnvelope,
    schema_version: u16,
    now: DateTime<Utc>,
    decided_at_revision: Option<u64>,
    command_digest: Uuid,
) -> EventMetadata {
    EventMetadata {
        command_digest: Some(command_digest),
        decided_at_revision,
        sender_saw_revision: envelope.expected_revision,
        schema_version,
        command_id: envelope.command_id,
        correlation_id: envelope.correlation_id.unwrap_or(envelope.command_id),
        causation_id: envelope.causation_id.unwrap_or(envelope.command_id),
        agent: envelope.agent.clone(),
        traceparent: envelope.traceparent.clone(),
        recorded_at: now,
    }
}

fn serialize(
    envelope: &CommandEnvelope,
    events: &[Event],
    now: DateTime<Utc>,
    decided_at_revision: Option<u64>,
    digest: Uuid,
) -> Vec<EventData> {
    events
        .iter()
        .enumerate()
        .map(|(index, event)| EventData {
            id: event_id(envelope.command_id, index as u32),
            event_type: event.event_type().to_owned(),
            data: event.encode(),
            metadata: metadata_for(envelope, event.schema_version(), now, decided_at_revision, digest).encode(),
        })
        .collect()
}

/// A command that needs no claim id from a previous outcome.
pub fn open_ticket(
    agent: triage_domain::Agent,
    subject: impl Into<String>,
    body: impl Into<String>,
    customer: Option<String>,
) -> CommandEnvelope {
    CommandEnvelope::new(
        TicketId::new(),
        agent,
        Command::OpenTicket {
            subject: subject.into(),
            body: body.into(),
            customer,
        },
    )
}

mod cache;
mod recorder;
mod turns;

pub use turns::{Turn, Turns};

#[cfg(test)]
mod tests;
