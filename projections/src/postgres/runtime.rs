//! [`PgProjector`]: catch-up, live following under leadership, rebuilds
//! into a shadow generation, and status, for read models in PostgreSQL.
//!
//! Every write to a projection's slot happens on a [`Session`] that holds
//! the slot's advisory lock (`…/live` for the live generation, `…/build`
//! for a rebuild): see the module docs of [`crate::postgres`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, IsolationLevel, Transaction};
use triage_event_store::{EventFilter, EventStore, Position, ReadAll, SubscribeToAll};
use uuid::Uuid;

use super::{LEADER_LOCK_CLASS, Model, PgReadModels, REGISTRY_LOCK_CLASS, read_slot};
use crate::ProjectionError;
use crate::db::{Slot, SlotKind};
use crate::projection::{ProjectedEvent, STREAM_PREFIXES};
use crate::runtime::{Page, Replayed, diff, distinct, read_pages};
use crate::{ProjectionStatus, ProjectorOptions, RebuildOptions, RebuildProgress, RebuildReport};

/// How long a one-shot [`PgProjector::catch_up`] waits for another
/// instance that leads a projection to reach the head of the log.
const FOLLOWER_WAIT: Duration = Duration::from_secs(5);

/// When [`PgProjector::warn_behind_leaders`] last warned, in seconds since
/// the epoch.
static LAST_BEHIND_WARNING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A projection slot: what a lock covers and a batch writes.
type Target = (Model, SlotKind);

/// Runs Triage's projections from an event store into [`PgReadModels`].
///
/// Any number of instances may run against one schema:
/// [`PgProjector::run_live`] applies only the projections whose leadership
/// it holds and takes over the others' when their leader's session ends.
#[derive(Clone, Debug)]
pub struct PgProjector {
    events: Arc<dyn EventStore>,
    models: PgReadModels,
    options: ProjectorOptions,
    instance: String,
}

/// A dedicated connection (never pooled: the locks live exactly as long as
/// it) and the slots whose locks it holds.
struct Session {
    client: Client,
    driver: JoinHandle<()>,
    held: BTreeSet<Target>,
    /// The live projections another instance led when this session last
    /// said so: said again only when that changes.
    followed: Vec<Model>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // Closing the socket ends the server session, which releases its
        // advisory locks at once.
        self.driver.abort();
    }
}

impl Session {
    async fn open(projector: &PgProjector) -> Result<Session, ProjectionError> {
        let mut config = projector.models.config().clone();
        config.application_name(format!("triage-projector {}", projector.instance));
        detect_a_vanished_peer(&mut config);
        let (client, connection) = config
            .connect(projector.models.tls().clone())
            .await
            .map_err(|error| super::connect_failed(projector.models.describe(), &error))?;
        let driver = tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(error = %super::describe_error(&error), "a projector session ended");
            }
        });
        Ok(Session {
            client,
            driver,
            held: BTreeSet::new(),
            followed: Vec::new(),
        })
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Takes the lock of `target` if it is free; `false` if another session
    /// holds it. Locks already held are not taken twice (advisory locks
    /// count).
    async fn try_lock(&mut self, models: &PgReadModels, target: Target) -> Result<bool, ProjectionError> {
        if self.held.contains(&target) {
            return Ok(true);
        }
        let acquired: bool = self
            .client
            .query_one(
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                &[&LEADER_LOCK_CLASS, &lock_key(models, target)],
            )
            .await
            .map_err(|error| ProjectionError::postgres("try the leadership lock", error))?
            .get(0);
        if acquired {
            self.held.insert(target);
        }
        Ok(acquired)
    }

    fn holds(&self, kind: SlotKind) -> Vec<Model> {
        self.held
            .iter()
            .filter(|(_, held)| *held == kind)
            .map(|(model, _)| *model)
            .collect()
    }
}

/// Idle time before the first keepalive probe on a leadership session.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// Time between keepalive probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// Unanswered probes after which the peer is taken for gone.
const KEEPALIVE_PROBES: u32 = 3;
/// Time sent data may stay unacknowledged before the peer is taken for gone.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// A leader whose machine dies, or drops off the network, never closes its
/// socket: the server would keep its session, and with it the advisory
/// locks that are its leadership, until the kernel's default keepalive
/// gives up (over two hours), and no follower could take over. Both ends
/// probe instead. The server ends a vanished leader's session, releasing
/// its locks, about 11 s after it last heard from it (5 s idle, then 3
/// probes 2 s apart; 10 s for unacknowledged data); the leader likewise
/// notices a vanished server and reconnects. Only TCP sessions probe; a
/// Unix socket has no peer machine to lose.
fn detect_a_vanished_peer(config: &mut tokio_postgres::Config) {
    config
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(KEEPALIVE_PROBES)
        .tcp_user_timeout(TCP_USER_TIMEOUT);
    super::add_server_settings(
        config,
        &format!(
            "-c tcp_keepalives_idle={} -c tcp_keepalives_interval={} -c tcp_keepalives_count={} -c tcp_user_timeout={}",
            KEEPALIVE_IDLE.as_secs(),
            KEEPALIVE_INTERVAL.as_secs(),
            KEEPALIVE_PROBES,
            TCP_USER_TIMEOUT.as_millis()
        ),
    );
}

/// The second key of a slot's advisory lock, hashed by the server.
fn lock_key(models: &PgReadModels, (model, kind): Target) -> String {
    format!("{}/{}/{}", models.schema(), model.name(), kind.as_str())
}

fn names(models: &[Model]) -> String {
    models.iter().map(|model| model.name()).collect::<Vec<_>>().join(", ")
}

impl PgProjector {
    /// A projector of Triage's read models (`tickets`, `stats`) from
    /// `events` into `models`.
    pub fn new(events: Arc<dyn EventStore>, models: PgReadModels) -> Self {
        PgProjector {
            events,
            models,
            options: ProjectorOptions::default(),
            instance: format!(
                "pid {} {}",
                std::process::id(),
                &Uuid::new_v4().simple().to_string()[..8]
            ),
        }
    }

    /// Uses `options` (batch size, event types to skip).
    pub fn with_options(mut self, options: ProjectorOptions) -> Self {
        self.options = options;
        self
    }

    /// Names this runner in the registry's `leader` column, in
    /// [`ProjectionStatus::leader`] and in `pg_stat_activity`. By default
    /// `pid <pid> <random>`.
    pub fn with_instance(mut self, instance: impl Into<String>) -> Self {
        self.instance = instance.into();
        self
    }

    /// This runner's name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The read models.
    pub fn models(&self) -> &PgReadModels {
        &self.models
    }

    /// The names of the projections.
    pub fn projection_names(&self) -> Vec<&'static str> {
        Model::ALL.iter().map(|model| model.name()).collect()
    }

    /// Brings the read models up to the head of the log once: applies the
    /// projections no other instance leads (creating them, or rebuilding
    /// those whose version changed, first), and waits a little (at most
    /// 5 s) for the leaders of the others to reach the head, taking over a
    /// projection whose leader goes away meanwhile. Returns the lowest
    /// checkpoint of the live models.
    pub async fn catch_up(&self) -> Result<Option<Position>, ProjectionError> {
        if !self.models.may_write().await? {
            // An analyst's role that may only read: the leaders apply, it
            // reads what they applied (leading would fail on the first
            // write, and every read command with it).
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::info!(
                    schema = self.models.schema(),
                    "this role may only read the read models: reading what their leaders applied"
                );
            });
            return self.wait_for_leaders().await;
        }
        let head = self.events.head_position().await?;
        let mut session = Session::open(self).await?;
        let deadline = Instant::now() + FOLLOWER_WAIT;
        let mut applied: Vec<Model> = Vec::new();
        loop {
            for model in Model::ALL {
                session.try_lock(&self.models, (model, SlotKind::Live)).await?;
            }
            let newly_led: Vec<Model> = session
                .holds(SlotKind::Live)
                .into_iter()
                .filter(|model| !applied.contains(model))
                .collect();
            if !newly_led.is_empty() {
                self.prepare(&mut session, &newly_led).await?;
                let targets: Vec<Target> = newly_led.iter().map(|model| (*model, SlotKind::Live)).collect();
                self.replay_recording_errors(&mut session, &targets).await?;
                applied.extend(newly_led);
            }
            if applied.len() == Model::ALL.len() {
                break;
            }
            // The others are led elsewhere: read what their leader has
            // applied, once it has the log as of the start. A leader that
            // has just died (its session not ended yet when the locks were
            // first tried) is taken over at a later look, instead of being
            // waited for in vain.
            if self.lowest_checkpoint().await? >= head || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(session);
        let lowest = self.lowest_checkpoint().await?;
        if lowest < head {
            self.warn_behind_leaders().await;
        }
        Ok(lowest)
    }

    /// Waits (at most 5 s) until the live models hold the log as of the
    /// call, applied by their leaders (a [`PgProjector::run_live`] of this
    /// process or of another instance), and returns their lowest
    /// checkpoint. Unlike [`PgProjector::catch_up`] it opens no leadership
    /// session (a connection of its own), so a server can call it before
    /// every query. When no instance leads a projection, it returns at the
    /// deadline with what is there.
    pub async fn wait_for_leaders(&self) -> Result<Option<Position>, ProjectionError> {
        let head = self.events.head_position().await?;
        let deadline = Instant::now() + FOLLOWER_WAIT;
        // A leader that is just behind is usually there within a few
        // milliseconds: look again soon, then less and less often.
        let mut pause = Duration::from_millis(2);
        loop {
            let lowest = self.lowest_checkpoint().await?;
            if lowest >= head {
                return Ok(lowest);
            }
            if Instant::now() >= deadline {
                self.warn_behind_leaders().await;
                return Ok(lowest);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Says, at most every 30 s per process, that a read gave up waiting
    /// for the leaders and answers from models behind the log, naming the
    /// projections and who leads them. A leader that is alive but stuck (a
    /// stopped process, a hung machine whose kernel still answers) keeps
    /// its session and so its leadership, and no one takes over: silent,
    /// this looked like writes that never arrived.
    async fn warn_behind_leaders(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let last = LAST_BEHIND_WARNING.load(Ordering::Relaxed);
        if now < last + 30
            || LAST_BEHIND_WARNING
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            tracing::debug!("a read stopped waiting for the projections' leaders");
            return;
        }
        let (behind, led) = match self.status().await {
            Ok(statuses) => {
                let behind: Vec<_> = statuses.iter().filter(|status| status.lag > 0).collect();
                let led = behind.iter().any(|status| status.leader.is_some());
                let text = behind
                    .iter()
                    .map(|status| {
                        // A projection stopped at an event it cannot apply is
                        // behind whoever leads it, this process included.
                        let stopped = status
                            .last_error
                            .as_deref()
                            .map(|error| format!(", stopped by: {error}"))
                            .unwrap_or_default();
                        format!(
                            "{} {} events behind, led by {}{stopped}",
                            status.name,
                            status.lag,
                            status.leader.as_deref().unwrap_or("no one")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                (text, led)
            }
            Err(error) => (format!("their status could not be read: {error}"), true),
        };
        if led {
            tracing::warn!(
                waited = ?FOLLOWER_WAIT,
                %behind,
                "answering from read models behind the log: they did not catch up in time. A leader that is \
                 stopped or hung (not dead) keeps its leadership: resume or kill it, and another instance takes \
                 over; one stopped by an error says which; `triage projections status` shows who leads"
            );
        } else {
            // Nothing to resume or kill: no instance that may write the
            // models is running (a dead leader is replaced within a second).
            tracing::warn!(
                waited = ?FOLLOWER_WAIT,
                %behind,
                "answering from read models behind the log: no instance leads them, so nothing brings them up \
                 to date. Start one that may write them (`triage serve`, or any command run by a role with write \
                 access to the read models)"
            );
        }
    }

    /// The lowest checkpoint of the live models (`None` while one is not
    /// built), in one query: a server asks before every read.
    async fn lowest_checkpoint(&self) -> Result<Option<Position>, ProjectionError> {
        let client = self.models.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT name, checkpoint_commit, checkpoint_prepare FROM {} WHERE slot = 'live'",
                    self.models.qualified("triage_read_models")
                ),
                &[],
            )
            .await
            .map_err(|error| ProjectionError::postgres("read the registry", error))?;
        let mut lowest: Option<Option<Position>> = None;
        for model in Model::ALL {
            let checkpoint = rows
                .iter()
                .find(|row| row.get::<_, &str>(0) == model.name())
                .and_then(|row| super::position(row.get(1), row.get(2)));
            lowest = Some(lowest.map_or(checkpoint, |lowest| lowest.min(checkpoint)));
        }
        Ok(lowest.flatten())
    }

    /// Follows the log until `stop` is set: leads what it can, applies what
    /// it leads in batches, and tries every
    /// [`super::PgReadModelOptions::retry_interval`] to take over the
    /// projections another instance leads. A lost session (its leadership
    /// gone with it) is reopened and the leadership tried for again.
    pub async fn run_live(&self, stop: Arc<AtomicBool>) -> Result<(), ProjectionError> {
        let retry = self.models.options().retry_interval;
        let mut session: Option<Session> = None;
        let mut options = SubscribeToAll::default().filtered(EventFilter::StreamPrefix(
            STREAM_PREFIXES.iter().map(|prefix| (*prefix).to_owned()).collect(),
        ));
        options.from = self.events.head_position().await?;
        // The subscription only wakes the leader; batches read from the
        // checkpoints, so nothing is skipped or applied twice.
        let mut subscription = self.events.clone().subscribe_to_all(options);
        while !stop.load(Ordering::Relaxed) {
            if session.as_ref().is_none_or(Session::is_closed) {
                if let Some(lost) = session.take()
                    && !lost.held.is_empty()
                {
                    tracing::warn!(
                        instance = %self.instance,
                        "the leadership session ended; its locks are released; reconnecting"
                    );
                }
                match Session::open(self).await {
                    Ok(opened) => session = Some(opened),
                    Err(error) => {
                        tracing::warn!(instance = %self.instance, %error, "cannot open a leadership session");
                        tokio::time::sleep(retry).await;
                        continue;
                    }
                }
            }
            let Some(current) = session.as_mut() else { continue };
            match self.lead_and_apply(current).await {
                Ok(()) => {}
                Err(error) if current.is_closed() => {
                    tracing::warn!(instance = %self.instance, %error, "lost the leadership session");
                    session = None;
                    continue;
                }
                Err(error) => return Err(error),
            }
            let leading = session.as_ref().is_some_and(|session| !session.held.is_empty());
            if leading {
                match tokio::time::timeout(retry, subscription.next()).await {
                    Ok(Some(Ok(_))) | Err(_) => {}
                    Ok(Some(Err(error))) => return Err(ProjectionError::Store(error)),
                    Ok(None) => tokio::time::sleep(retry).await,
                }
            } else {
                tokio::time::sleep(retry).await;
            }
            // Everything delivered so far is covered by the next catch-up.
            while let Some(message) = subscription.try_next() {
                message.map_err(ProjectionError::Store)?;
            }
        }
        Ok(())
    }

    /// Tries to lead what this session does not lead yet, then applies the
    /// log to everything it leads.
    async fn lead_and_apply(&self, session: &mut Session) -> Result<(), ProjectionError> {
        let mut newly = Vec::new();
        for model in Model::ALL {
            let target = (model, SlotKind::Live);
            if !session.held.contains(&target) && session.try_lock(&self.models, target).await? {
                newly.push(model);
            }
        }
        let followed: Vec<Model> = Model::ALL
            .into_iter()
            .filter(|model| !session.held.contains(&(*model, SlotKind::Live)))
            .collect();
        if followed != session.followed {
            if !followed.is_empty() {
                // Not silent: an operator looking at this instance's log
                // learns why it applies nothing.
                tracing::info!(
                    instance = %self.instance,
                    projections = %names(&followed),
                    "standing by: another instance leads these; this one serves reads and takes over if it goes"
                );
            }
            session.followed = followed;
        }
        if !newly.is_empty() {
            tracing::info!(instance = %self.instance, projections = %names(&newly), "leading");
            self.prepare(session, &newly).await?;
            for model in &newly {
                session
                    .client
                    .execute(
                        &format!(
                            "UPDATE {} SET leader = $2, updated_at = now() WHERE name = $1 AND slot = 'live'",
                            self.models.qualified("triage_read_models")
                        ),
                        &[&model.name(), &self.instance],
                    )
                    .await
                    .map_err(|error| ProjectionError::postgres("record the leader", error))?;
            }
        }
        let led: Vec<Target> = session
            .holds(SlotKind::Live)
            .into_iter()
            .map(|model| (model, SlotKind::Live))
            .collect();
        if !led.is_empty() {
            self.replay_recording_errors(session, &led).await?;
        }
        Ok(())
    }

    /// Makes the projections in `led` (whose live locks the session holds)
    /// servable: creates missing ones, and rebuilds those built by another
    /// version or from another log (a checkpoint past the head).
    async fn prepare(&self, session: &mut Session, led: &[Model]) -> Result<(), ProjectionError> {
        // Which log the models describe (see the SQLite runtime): another
        // first event means the log was replaced under them.
        let first_event = self
            .events
            .read_all(ReadAll::forwards(1))
            .await?
            .first()
            .map(|event| event.id);
        let recorded_log = match first_event {
            Some(_) => self.models.log_identity().await?,
            None => None,
        };
        let other_log = recorded_log.is_some() && first_event.is_some() && recorded_log != first_event;
        for model in led {
            let live = self.models.slot(model.name(), SlotKind::Live).await?;
            // Read after the checkpoint: a checkpoint is never past the head
            // when it is written and the head only grows, so only a replaced
            // log puts it past a head read later (a rebuild swapping in
            // between the two reads would otherwise look the same).
            let head = self.events.head_position().await?;
            match live {
                None => self.create_live(session, *model).await?,
                Some(slot) if slot.checkpoint.is_some() && head.is_none() => {
                    return Err(ProjectionError::EmptyLog {
                        models: self.models.describe(),
                        applied: slot.events_applied,
                        remedy: format!(
                            "drop the read models' schema ({}), which the next start makes anew",
                            self.models.schema()
                        ),
                    });
                }
                Some(slot) if slot.checkpoint > head => {
                    tracing::warn!(projection = model.name(), checkpoint = ?slot.checkpoint, head = ?head,
                        "the read model is ahead of the event log; rebuilding");
                    self.rebuild(model.name(), RebuildOptions::default()).await?;
                }
                // Built by a newer Triage: see the SQLite runtime.
                Some(slot) if slot.version > model.version() => {
                    return Err(ProjectionError::OtherVersion {
                        name: model.name().to_owned(),
                        live: slot.version,
                        code: model.version(),
                    });
                }
                Some(slot) if other_log && slot.checkpoint.is_some() => {
                    tracing::warn!(projection = model.name(), recorded = ?recorded_log, first_event = ?first_event,
                        "the read model was built from another event log; rebuilding");
                    self.rebuild(model.name(), RebuildOptions::default()).await?;
                }
                Some(slot) if slot.version != model.version() => {
                    tracing::info!(
                        projection = model.name(),
                        from = slot.version,
                        to = model.version(),
                        "version changed; rebuilding before serving"
                    );
                    self.rebuild(model.name(), RebuildOptions::default()).await?;
                }
                Some(_) => {}
            }
        }
        // Recorded once every model was checked against this log: a model
        // led elsewhere is checked when its leader prepares it.
        if let Some(first_event) = first_event
            && recorded_log != Some(first_event)
            && Model::ALL.iter().all(|model| led.contains(model))
        {
            self.models.record_log(first_event).await?;
        }
        Ok(())
    }

    async fn create_live(&self, session: &mut Session, model: Model) -> Result<(), ProjectionError> {
        let tx = begin(&mut session.client).await?;
        let _ = super::as_the_owner(&tx, self.models.schema()).await?;
        lock_registry(&tx, &self.models, model).await?;
        // A rebuild may have swapped a generation in meanwhile.
        if read_slot(&tx, &self.models, model.name(), SlotKind::Live, "")
            .await?
            .is_none()
        {
            let slot = new_generation(&tx, &self.models, model, SlotKind::Live).await?;
            let grants = view_grants(&tx, &self.models, model).await?;
            create_views(&tx, &self.models, model, slot.generation, &grants).await?;
        }
        commit(tx).await
    }

    /// Replays into `targets` up to the head, recording an error in the
    /// registry (unless the session died: then the next leader goes on).
    async fn replay_recording_errors(&self, session: &mut Session, targets: &[Target]) -> Result<(), ProjectionError> {
        let result = self.replay(&mut session.client, targets, None, &mut |_| {}, None).await;
        if result.is_ok() {
            // A failure that passed, on a log with nothing new to write a
            // checkpoint for, stayed recorded until the next event.
            let names: Vec<&str> = targets.iter().map(|(model, _)| model.name()).collect();
            session
                .client
                .execute(
                    &format!(
                        "UPDATE {} SET last_error = NULL, updated_at = now() \
                         WHERE name = ANY($1) AND slot = 'live' AND last_error IS NOT NULL",
                        self.models.qualified("triage_read_models")
                    ),
                    &[&names],
                )
                .await
                .map_err(|error| ProjectionError::postgres("clear recorded errors", error))?;
        }
        if let Err(error) = &result
            && !session.is_closed()
        {
            for (model, _) in targets {
                let _ = session
                    .client
                    .execute(
                        &format!(
                            "UPDATE {} SET last_error = $2, updated_at = now() WHERE name = $1 AND slot = 'live'",
                            self.models.qualified("triage_read_models")
                        ),
                        &[&model.name(), &error.to_string()],
                    )
                    .await;
            }
        }
        result.map(|_| ())
    }

    /// Replays the log into `targets` from their checkpoints, up to `until`
    /// (inclusive) or the head, one transaction per page on `client`.
    async fn replay(
        &self,
        client: &mut Client,
        targets: &[Target],
        until: Option<Position>,
        progress: &mut (dyn FnMut(u64) + Send),
        cancel: Option<&AtomicBool>,
    ) -> Result<Replayed, ProjectionError> {
        let mut writing = Duration::ZERO;
        loop {
            let (replayed, fell_behind) = self.replay_pass(client, targets, until, progress, cancel).await?;
            writing += replayed.writing;
            if !fell_behind {
                return Ok(Replayed { writing, ..replayed });
            }
            // A swap put a target's checkpoint back behind the pages being
            // read: read again from the checkpoints as they are now, so
            // that what this replay reports as reached was applied.
            tracing::debug!("a checkpoint went back during the replay; reading again from the checkpoints");
        }
    }

    /// One pass of [`PgProjector::replay`]: from the targets' lowest
    /// checkpoint, until the end or until a target is found behind the
    /// page being applied (then `true`).
    async fn replay_pass(
        &self,
        client: &mut Client,
        targets: &[Target],
        until: Option<Position>,
        progress: &mut (dyn FnMut(u64) + Send),
        cancel: Option<&AtomicBool>,
    ) -> Result<(Replayed, bool), ProjectionError> {
        let mut start: Option<Option<Position>> = None;
        for (model, kind) in targets {
            let checkpoint = read_slot(&*client, &self.models, model.name(), *kind, "")
                .await?
                .ok_or_else(|| ProjectionError::NotBuilt {
                    name: model.name().to_owned(),
                })?
                .checkpoint;
            start = Some(start.map_or(checkpoint, |start| start.min(checkpoint)));
        }
        let start = start.flatten();
        let (pages, mut receiver) = mpsc::channel::<Result<Page, ProjectionError>>(2);
        let reader = tokio::spawn(read_pages(
            self.events.clone(),
            start,
            until,
            self.options.batch_size,
            self.options.skip_event_types.clone(),
            pages,
        ));
        let mut last = start;
        let mut writing = Duration::ZERO;
        let mut done = 0u64;
        while let Some(page) = receiver.recv().await {
            if cancel.is_some_and(|cancel| cancel.load(Ordering::Relaxed)) {
                reader.abort();
                return Err(ProjectionError::Cancelled);
            }
            let page = match page {
                Ok(page) => page,
                Err(error) => {
                    reader.abort();
                    return Err(error);
                }
            };
            let applying = Instant::now();
            let behind = match self.apply_page(client, targets, &page).await {
                Ok(behind) => behind,
                Err(error) => {
                    reader.abort();
                    return Err(error);
                }
            };
            writing += applying.elapsed();
            if behind {
                reader.abort();
                return Ok((Replayed { last, writing }, true));
            }
            last = Some(page.end);
            done += page.considered;
            progress(page.end.commit.max(done));
        }
        reader
            .await
            .map_err(|error| ProjectionError::Internal(format!("the reader panicked: {error}")))?;
        Ok((Replayed { last, writing }, false))
    }

    /// Applies one page to every target in one transaction that also moves
    /// their checkpoints. Each target's registry row is locked and read
    /// inside the transaction, and what it already has is skipped: a page
    /// is applied exactly once even when it races a swap.
    ///
    /// The targets are applied at once, their statements interleaved on the
    /// transaction's connection (which pipelines them), so that one's round
    /// trips do not wait for the other's. That needs distinct targets: each
    /// touches its own tables and registry row. (Two copies of one target
    /// would both read the old checkpoint and apply the page twice; the
    /// callers pass sets, and `rebuild_many` drops repeated names.) The
    /// futures are first polled in order, so the registry rows are locked in
    /// the targets' order, as when they ran one after the other.
    /// Returns whether a target was found behind where the page starts (it
    /// is left as it was; the others hold the page).
    async fn apply_page(&self, client: &mut Client, targets: &[Target], page: &Page) -> Result<bool, ProjectionError> {
        debug_assert!(
            targets
                .iter()
                .enumerate()
                .all(|(index, target)| !targets[..index].contains(target)),
            "apply_page needs distinct targets"
        );
        let transaction = begin(client).await?;
        let tx = &transaction;
        let apply = |&(model, kind): &Target| async move {
            let name = model.name();
            let Some(mut slot) = read_slot(tx, &self.models, name, kind, "FOR UPDATE").await? else {
                return Err(ProjectionError::NotBuilt { name: name.to_owned() });
            };
            // Another instance swapped in a generation of another version
            // while this one led: its tables are not this code's.
            if slot.version != model.version() {
                return Err(ProjectionError::OtherVersion {
                    name: name.to_owned(),
                    live: slot.version,
                    code: model.version(),
                });
            }
            if slot.checkpoint >= Some(page.end) {
                return Ok(false);
            }
            if slot.checkpoint < page.start {
                // A swap put in a generation built up to an earlier
                // position: applying this page would skip the events in
                // between. The replay reads again from its checkpoint.
                tracing::debug!(projection = name, checkpoint = ?slot.checkpoint, page_start = ?page.start,
                    "checkpoint behind the page; reading again from it");
                return Ok(true);
            }
            let skip = page
                .events
                .iter()
                .take_while(|event| Some(event.position) <= slot.checkpoint)
                .count();
            let fresh: &[ProjectedEvent] = &page.events[skip..];
            model.apply(tx, &self.models, slot.generation, fresh).await?;
            slot.events_applied += fresh.len() as u64;
            slot.checkpoint = Some(page.end);
            write_checkpoint(tx, &self.models, kind, &slot, &self.instance).await?;
            Ok(false)
        };
        let results = futures::future::join_all(targets.iter().map(apply)).await;
        // After a failed statement the others in flight fail with "current
        // transaction is aborted": report the failure that caused it.
        let aborted = |error: &ProjectionError| {
            matches!(error, ProjectionError::Postgres { source, .. }
                if source.code() == Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION))
        };
        let mut behind = false;
        let mut errors = Vec::new();
        for result in results {
            match result {
                Ok(target_behind) => behind |= target_behind,
                Err(error) => errors.push(error),
            }
        }
        if !errors.is_empty() {
            let cause = errors.iter().position(|error| !aborted(error)).unwrap_or(0);
            return Err(errors.swap_remove(cause));
        }
        commit(transaction).await?;
        Ok(behind)
    }

    /// Rebuilds `name` from the start of the log into a new generation
    /// while the live one keeps serving (and its leader keeps applying),
    /// optionally verifies it, and swaps it in atomically.
    pub async fn rebuild(&self, name: &str, options: RebuildOptions) -> Result<RebuildReport, ProjectionError> {
        let mut reports = self.rebuild_many(&[name], options).await?;
        Ok(reports.remove(0))
    }

    /// Rebuilds several projections in one pass over the log, as
    /// [`crate::Projector::rebuild_many`]. Fails with
    /// [`ProjectionError::RebuildInProgress`] when another process is
    /// rebuilding one of them.
    pub async fn rebuild_many(
        &self,
        names: &[&str],
        mut options: RebuildOptions,
    ) -> Result<Vec<RebuildReport>, ProjectionError> {
        let models: Vec<Model> = distinct(names)
            .iter()
            .map(|name| Model::by_name(name))
            .collect::<Result<_, _>>()?;
        let mut session = Session::open(self).await?;
        for model in &models {
            if !session.try_lock(&self.models, (*model, SlotKind::Build)).await? {
                return Err(ProjectionError::RebuildInProgress {
                    name: model.name().to_owned(),
                });
            }
        }
        let mut slots = Vec::with_capacity(models.len());
        {
            let tx = begin(&mut session.client).await?;
            // A rebuild by a role that may not act as the owner would
            // replay the whole log and then fail at the swap, which must
            // replace the owner's views: refused before it starts.
            if let Some(owner) = super::as_the_owner(&tx, self.models.schema()).await? {
                return Err(ProjectionError::NotOwner {
                    schema: self.models.schema().to_owned(),
                    owner,
                });
            }
            for model in &models {
                // Not a model a newer Triage built, unless told to (see
                // `RebuildOptions::replace_newer`).
                if !options.replace_newer
                    && let Some(live) = read_slot(&tx, &self.models, model.name(), SlotKind::Live, "").await?
                    && live.version > model.version()
                {
                    return Err(ProjectionError::OtherVersion {
                        name: model.name().to_owned(),
                        live: live.version,
                        code: model.version(),
                    });
                }
                discard_build(&tx, &self.models, *model).await?;
                slots.push(new_generation(&tx, &self.models, *model, SlotKind::Build).await?);
            }
            commit(tx).await?;
        }
        let build: Vec<Target> = models.iter().map(|model| (*model, SlotKind::Build)).collect();
        let total = match self.events.head_position().await {
            Ok(head) => head.map_or(0, |head| head.commit),
            Err(error) => {
                self.discard_builds(&mut session, &models).await;
                return Err(error.into());
            }
        };
        let started = Instant::now();
        let mut report_progress = |done: u64| {
            if let Some(progress) = options.progress.as_mut() {
                let elapsed = started.elapsed().as_secs_f64().max(1e-6);
                let rate = done as f64 / elapsed;
                let left = total.saturating_sub(done) as f64;
                progress(RebuildProgress {
                    done,
                    total,
                    events_per_s: rate,
                    eta: Duration::from_secs_f64(if rate > 0.0 { left / rate } else { 0.0 }),
                });
            }
        };
        let replayed = self
            .replay(
                &mut session.client,
                &build,
                None,
                &mut report_progress,
                options.cancel.as_deref(),
            )
            .await;
        let writing = match replayed {
            Ok(replayed) => replayed.writing,
            Err(error) => {
                self.discard_builds(&mut session, &models).await;
                return Err(error);
            }
        };
        let wall = started.elapsed().as_secs_f64();
        let mut reports = Vec::with_capacity(models.len());
        for (model, slot) in models.iter().zip(&slots) {
            let (differences, compared) = if options.verify {
                match self.verify(&mut session, *model).await {
                    Ok((differences, compared)) => (Some(differences), Some(compared)),
                    Err(error) => {
                        self.discard_builds(&mut session, &models).await;
                        return Err(crate::runtime::partly_rebuilt(&reports, error));
                    }
                }
            } else {
                (None, None)
            };
            // Once one projection is swapped in, the others follow: a cancel
            // then would leave the live models half rebuilt while saying
            // they are untouched.
            if reports.is_empty()
                && options
                    .cancel
                    .as_deref()
                    .is_some_and(|cancel| cancel.load(Ordering::Relaxed))
            {
                self.discard_builds(&mut session, &models).await;
                return Err(ProjectionError::Cancelled);
            }
            let events = match self.swap_once_caught_up(&mut session, *model).await {
                Ok(swapped) => swapped.events_applied,
                Err(error) => {
                    // This one and the rest keep their live models; their
                    // builds are not left behind.
                    self.discard_builds(&mut session, &models).await;
                    return Err(crate::runtime::partly_rebuilt(&reports, error));
                }
            };
            tracing::info!(
                projection = model.name(),
                generation = slot.generation,
                events,
                "rebuilt and swapped in"
            );
            reports.push(RebuildReport {
                name: model.name().to_owned(),
                version: model.version(),
                generation: slot.generation,
                events,
                wall_s: wall,
                events_per_s: events as f64 / wall.max(1e-6),
                write_s: writing.as_secs_f64(),
                differences,
                compared,
            });
        }
        Ok(reports)
    }

    async fn discard_builds(&self, session: &mut Session, models: &[Model]) {
        if let Ok(tx) = begin(&mut session.client).await {
            let _ = super::as_the_owner(&tx, self.models.schema()).await;
            for model in models {
                let _ = discard_build(&tx, &self.models, *model).await;
            }
            let _ = commit(tx).await;
        }
    }

    /// Brings the live and the rebuilt generation to the same position and
    /// compares their digests, key by key, in one snapshot.
    ///
    /// A live leader elsewhere keeps moving the live generation on, so the
    /// build could chase it forever: instead, once the live generation is
    /// at least as far as the build, it is frozen by holding its registry
    /// row `FOR SHARE` on a pooled connection (the leader's next batch
    /// waits for that row), the build is brought to the same position, and
    /// both are digested. The live generation is moved on here only when
    /// no other instance leads it.
    async fn verify(&self, session: &mut Session, model: Model) -> Result<(Vec<String>, usize), ProjectionError> {
        let name = model.name();
        let not_built = || ProjectionError::NotBuilt { name: name.to_owned() };
        for _ in 0..200 {
            let Some(live) = self.models.slot(name, SlotKind::Live).await? else {
                return Ok((vec!["(no live model to compare with)".to_owned()], 0));
            };
            if let Some(nothing) = crate::runtime::other_version(live.version, model.version()) {
                return Ok(nothing);
            }
            let build = self.models.slot(name, SlotKind::Build).await?.ok_or_else(not_built)?;
            if live.checkpoint >= build.checkpoint {
                break;
            }
            if session.try_lock(&self.models, (model, SlotKind::Live)).await? {
                let target = [(model, SlotKind::Live)];
                self.replay(&mut session.client, &target, build.checkpoint, &mut |_| {}, None)
                    .await?;
            } else {
                // Its leader is applying the events the build already has.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let mut freezer = self.models.client().await?;
        let freezer: &mut Client = &mut freezer;
        let freeze = begin(freezer).await?;
        let live = read_slot(&freeze, &self.models, name, SlotKind::Live, "FOR SHARE")
            .await?
            .ok_or_else(not_built)?;
        let target = [(model, SlotKind::Build)];
        self.replay(&mut session.client, &target, live.checkpoint, &mut |_| {}, None)
            .await?;
        let compared = self.compare_in_snapshot(session, model).await;
        commit(freeze).await?;
        compared
    }

    /// Digests both generations of `model` in one repeatable-read snapshot
    /// and compares them.
    async fn compare_in_snapshot(
        &self,
        session: &mut Session,
        model: Model,
    ) -> Result<(Vec<String>, usize), ProjectionError> {
        let tx = session
            .client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|error| ProjectionError::postgres("begin", error))?;
        let not_built = || ProjectionError::NotBuilt {
            name: model.name().to_owned(),
        };
        let live = read_slot(&tx, &self.models, model.name(), SlotKind::Live, "")
            .await?
            .ok_or_else(not_built)?;
        let build = read_slot(&tx, &self.models, model.name(), SlotKind::Build, "")
            .await?
            .ok_or_else(not_built)?;
        let live_rows = model.digest(&tx, &self.models, live.generation).await?;
        let build_rows = model.digest(&tx, &self.models, build.generation).await?;
        commit(tx).await?;
        let mut differences = diff(&live_rows, &build_rows);
        if live.checkpoint != build.checkpoint {
            differences.push(format!(
                "(compared at different positions: live {:?}, rebuilt {:?}; the live leader did not catch up)",
                live.checkpoint, build.checkpoint
            ));
        }
        Ok((differences, live_rows.len().max(build_rows.len())))
    }

    /// Swaps the build generation in once it has caught up with the live
    /// one, which its leader kept applying to during the rebuild: readers
    /// never see the model move back. A build that is behind is caught up
    /// and tried again; after [`crate::runtime::SWAP_ATTEMPTS`] tries it is
    /// swapped in behind, and the live catch-up brings it forward.
    /// Answers the registry row of what was swapped in.
    async fn swap_once_caught_up(&self, session: &mut Session, model: Model) -> Result<Slot, ProjectionError> {
        let build = [(model, SlotKind::Build)];
        for _ in 0..crate::runtime::SWAP_ATTEMPTS {
            if let Some(swapped) = self.swap(session, model, true).await? {
                return Ok(swapped);
            }
            self.replay(&mut session.client, &build, None, &mut |_| {}, None)
                .await?;
        }
        tracing::warn!(
            projection = model.name(),
            attempts = crate::runtime::SWAP_ATTEMPTS,
            "the live model kept moving ahead of the rebuilt one; swapping it in behind, the live catch-up brings it forward"
        );
        self.swap(session, model, false)
            .await?
            .ok_or_else(|| ProjectionError::Internal("an unconditional swap did not swap".to_owned()))
    }

    /// Makes the build generation live and drops the old one, in one
    /// transaction that holds both registry rows, and answers the build's
    /// row. With `only_if_caught_up`, does nothing and answers `None` while
    /// the live generation's checkpoint is past the build's.
    async fn swap(
        &self,
        session: &mut Session,
        model: Model,
        only_if_caught_up: bool,
    ) -> Result<Option<Slot>, ProjectionError> {
        let tx = begin(&mut session.client).await?;
        let _ = super::as_the_owner(&tx, self.models.schema()).await?;
        lock_registry(&tx, &self.models, model).await?;
        let build = read_slot(&tx, &self.models, model.name(), SlotKind::Build, "FOR UPDATE")
            .await?
            .ok_or_else(|| ProjectionError::NotBuilt {
                name: model.name().to_owned(),
            })?;
        let old = read_slot(&tx, &self.models, model.name(), SlotKind::Live, "FOR UPDATE").await?;
        if only_if_caught_up && old.as_ref().is_some_and(|old| old.checkpoint > build.checkpoint) {
            // Dropping the transaction rolls it back.
            return Ok(None);
        }
        // The views are replaced below; what was granted on them is granted
        // again on the new ones, or a rebuild would lock out every role
        // that reads the models.
        let grants = view_grants(&tx, &self.models, model).await?;
        drop_views(&tx, &self.models, model).await?;
        if let Some(old) = old {
            drop_tables(&tx, &self.models, model, old.generation).await?;
        }
        // Deferred from the start of the rebuild; only a swap makes a build
        // live.
        model.create_indexes(&tx, &self.models, build.generation).await?;
        tx.execute(
            &format!(
                "INSERT INTO {registry} (name, slot, version, generation, checkpoint_commit, checkpoint_prepare, \
                 events_applied) \
                 SELECT name, 'live', version, generation, checkpoint_commit, checkpoint_prepare, events_applied \
                 FROM {registry} WHERE name = $1 AND slot = 'build' \
                 ON CONFLICT (name, slot) DO UPDATE SET version = EXCLUDED.version, generation = EXCLUDED.generation, \
                 checkpoint_commit = EXCLUDED.checkpoint_commit, checkpoint_prepare = EXCLUDED.checkpoint_prepare, \
                 events_applied = EXCLUDED.events_applied, last_error = NULL, updated_at = now()",
                registry = self.models.qualified("triage_read_models")
            ),
            &[&model.name()],
        )
        .await
        .map_err(|error| ProjectionError::postgres("swap the rebuilt model in", error))?;
        tx.execute(
            &format!(
                "DELETE FROM {} WHERE name = $1 AND slot = 'build'",
                self.models.qualified("triage_read_models")
            ),
            &[&model.name()],
        )
        .await
        .map_err(|error| ProjectionError::postgres("swap the rebuilt model in", error))?;
        create_views(&tx, &self.models, model, build.generation, &grants).await?;
        commit(tx).await?;
        Ok(Some(build))
    }

    /// Each projection's status, with the instance leading it right now.
    pub async fn status(&self) -> Result<Vec<ProjectionStatus>, ProjectionError> {
        let client = self.models.client().await?;
        let mut statuses = Vec::new();
        for model in Model::ALL {
            let name = model.name();
            let live = read_slot(&**client, &self.models, name, SlotKind::Live, "").await?;
            let build = read_slot(&**client, &self.models, name, SlotKind::Build, "").await?;
            // The recorded leader counts only while its lock is held; so
            // does a build (one whose rebuild was killed leaves its row
            // until the next rebuild drops it).
            let held = |key: &str| {
                format!(
                    "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
                     AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                     AND classid = $2::int8::oid AND objid = (hashtext({key})::int8 & 4294967295)::oid \
                     AND objsubid = 2)"
                )
            };
            // One row whether or not the live slot exists: a first build
            // has no live row yet, and its lock counts all the same.
            let row = client
                .query_opt(
                    &format!(
                        "SELECT live.last_error, live.leader, {}, {} \
                         FROM (SELECT 1) AS one LEFT JOIN {} AS live ON live.name = $1 AND live.slot = 'live'",
                        held("$3"),
                        held("$4"),
                        self.models.qualified("triage_read_models")
                    ),
                    &[
                        &name,
                        &i64::from(LEADER_LOCK_CLASS),
                        &lock_key(&self.models, (model, SlotKind::Live)),
                        &lock_key(&self.models, (model, SlotKind::Build)),
                    ],
                )
                .await
                .map_err(|error| ProjectionError::postgres("read the registry", error))?;
            let (last_error, leader, building) = match row {
                Some(row) => (
                    row.get::<_, Option<String>>(0),
                    row.get::<_, Option<String>>(1).filter(|_| row.get::<_, bool>(2)),
                    row.get::<_, bool>(3),
                ),
                None => (None, None, false),
            };
            let checkpoint = live.as_ref().and_then(|slot| slot.checkpoint);
            statuses.push(ProjectionStatus {
                name: name.to_owned(),
                code_version: model.version(),
                live_version: live.as_ref().map(|slot| slot.version),
                generation: live.as_ref().map(|slot| slot.generation),
                checkpoint,
                events_applied: live.as_ref().map_or(0, |slot| slot.events_applied),
                last_error,
                // Filled in below, from a head read after every checkpoint.
                lag: 0,
                needs_rebuild: live.as_ref().is_some_and(|slot| slot.version < model.version()),
                build_in_progress: build.is_some() && building,
                leader,
            });
        }
        // After the checkpoints, as in `prepare`: only a replaced log puts a
        // checkpoint past a head read later.
        let head = self.events.head_position().await?;
        for status in &mut statuses {
            let checkpoint = status.checkpoint;
            status.lag = head.map_or(0, |head| head.commit.saturating_sub(checkpoint.map_or(0, |c| c.commit)));
            status.needs_rebuild |= status.live_version.is_some() && checkpoint > head;
        }
        Ok(statuses)
    }
}

async fn begin(client: &mut Client) -> Result<Transaction<'_>, ProjectionError> {
    client
        .transaction()
        .await
        .map_err(|error| ProjectionError::postgres("begin a transaction", error))
}

async fn commit(tx: Transaction<'_>) -> Result<(), ProjectionError> {
    tx.commit()
        .await
        .map_err(|error| ProjectionError::postgres("commit", error))
}

/// Serializes creating and swapping in a projection's live generation.
async fn lock_registry(tx: &Transaction<'_>, models: &PgReadModels, model: Model) -> Result<(), ProjectionError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&REGISTRY_LOCK_CLASS, &format!("{}/{}", models.schema(), model.name())],
    )
    .await
    .map_err(|error| ProjectionError::postgres("lock the registry", error))?;
    Ok(())
}

async fn write_checkpoint(
    tx: &Transaction<'_>,
    models: &PgReadModels,
    kind: SlotKind,
    slot: &Slot,
    instance: &str,
) -> Result<(), ProjectionError> {
    // Typed parameters: one round trip, as `read_slot`.
    let updated = tx
        .execute_typed(
            &format!(
                "UPDATE {} SET checkpoint_commit = $3, checkpoint_prepare = $4, events_applied = $5, \
                 leader = $6, last_error = NULL, updated_at = now() WHERE name = $1 AND slot = $2",
                models.qualified("triage_read_models")
            ),
            &[
                (&slot.name, Type::TEXT),
                (&kind.as_str(), Type::TEXT),
                (&slot.checkpoint.map(|p| p.commit as i64), Type::INT8),
                (&slot.checkpoint.map(|p| p.prepare as i64), Type::INT8),
                (&(slot.events_applied as i64), Type::INT8),
                (&instance, Type::TEXT),
            ],
        )
        .await
        .map_err(|error| ProjectionError::postgres("write a checkpoint", error))?;
    debug_assert_eq!(updated, 1, "the row was locked by this transaction");
    Ok(())
}

/// Creates the next generation's tables and registers them as `kind`. A
/// build gets its secondary indexes when it is swapped in, a live one at
/// once.
async fn new_generation(
    tx: &Transaction<'_>,
    models: &PgReadModels,
    model: Model,
    kind: SlotKind,
) -> Result<Slot, ProjectionError> {
    let generation: i32 = tx
        .query_one(
            &format!(
                "INSERT INTO {} AS g (name, last) VALUES ($1, 1) \
                 ON CONFLICT (name) DO UPDATE SET last = g.last + 1 RETURNING last",
                models.qualified("triage_read_generations")
            ),
            &[&model.name()],
        )
        .await
        .map_err(|error| ProjectionError::postgres("number a new generation", error))?
        .get(0);
    let slot = Slot {
        name: model.name().to_owned(),
        version: model.version(),
        generation: generation as u32,
        checkpoint: None,
        events_applied: 0,
    };
    model.create(tx, models, slot.generation).await?;
    if kind == SlotKind::Live {
        model.create_indexes(tx, models, slot.generation).await?;
    }
    tx.execute(
        &format!(
            "INSERT INTO {} (name, slot, version, generation) VALUES ($1, $2, $3, $4)",
            models.qualified("triage_read_models")
        ),
        &[&model.name(), &kind.as_str(), &(model.version() as i32), &generation],
    )
    .await
    .map_err(|error| ProjectionError::postgres("register a new generation", error))?;
    Ok(slot)
}

async fn discard_build(tx: &Transaction<'_>, models: &PgReadModels, model: Model) -> Result<(), ProjectionError> {
    if let Some(build) = read_slot(tx, models, model.name(), SlotKind::Build, "FOR UPDATE").await? {
        drop_tables(tx, models, model, build.generation).await?;
        tx.execute(
            &format!(
                "DELETE FROM {} WHERE name = $1 AND slot = 'build'",
                models.qualified("triage_read_models")
            ),
            &[&model.name()],
        )
        .await
        .map_err(|error| ProjectionError::postgres("discard a build", error))?;
    }
    Ok(())
}

async fn drop_tables(
    tx: &Transaction<'_>,
    models: &PgReadModels,
    model: Model,
    generation: u32,
) -> Result<(), ProjectionError> {
    let sql: String = model
        .tables()
        .iter()
        .map(|table| format!("DROP TABLE IF EXISTS {};", models.generation_table(table, generation)))
        .collect();
    tx.batch_execute(&sql)
        .await
        .map_err(|error| ProjectionError::postgres("drop a generation", error))
}

async fn drop_views(tx: &Transaction<'_>, models: &PgReadModels, model: Model) -> Result<(), ProjectionError> {
    let sql: String = model
        .tables()
        .iter()
        .map(|table| format!("DROP VIEW IF EXISTS {};", models.qualified(table)))
        .collect();
    tx.batch_execute(&sql)
        .await
        .map_err(|error| ProjectionError::postgres("drop the views", error))
}

/// `<table>` views onto the live generation: what queries and SQL users
/// read, with `grants` (what the views they replace had) granted again.
async fn create_views(
    tx: &Transaction<'_>,
    models: &PgReadModels,
    model: Model,
    generation: u32,
    grants: &[ViewGrant],
) -> Result<(), ProjectionError> {
    drop_views(tx, models, model).await?;
    let mut sql: String = model
        .tables()
        .iter()
        .map(|table| {
            format!(
                "CREATE VIEW {} AS SELECT * FROM {};",
                models.qualified(table),
                models.generation_table(table, generation)
            )
        })
        .collect();
    for grant in grants {
        sql.push_str(&grant.statement(models));
    }
    tx.batch_execute(&sql)
        .await
        .map_err(|error| ProjectionError::postgres("create the views", error))
}

/// One privilege granted on one of a model's views to a role other than
/// its owner (whose own privileges come with the view).
#[derive(Clone, Debug, PartialEq, Eq)]
struct ViewGrant {
    view: String,
    /// `None` for `PUBLIC`.
    grantee: Option<String>,
    privilege: String,
    grantable: bool,
}

impl ViewGrant {
    /// The `GRANT` that gives it again, on the view of the same name.
    fn statement(&self, models: &PgReadModels) -> String {
        let grantee = match &self.grantee {
            Some(role) => format!("\"{}\"", role.replace('"', "\"\"")),
            None => "PUBLIC".to_owned(),
        };
        format!(
            "GRANT {} ON {} TO {grantee}{};",
            self.privilege,
            models.qualified(&self.view),
            if self.grantable { " WITH GRANT OPTION" } else { "" }
        )
    }
}

/// What is granted on `model`'s views now. Privilege names come from the
/// server's `aclexplode` and are kept only when they are ones a view can
/// carry, so nothing else reaches the `GRANT` text.
async fn view_grants(
    tx: &Transaction<'_>,
    models: &PgReadModels,
    model: Model,
) -> Result<Vec<ViewGrant>, ProjectionError> {
    const VIEW_PRIVILEGES: [&str; 7] = [
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "TRUNCATE",
        "REFERENCES",
        "TRIGGER",
    ];
    let views: Vec<&str> = model.tables().to_vec();
    let rows = tx
        .query(
            "SELECT c.relname::text, CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee)::text END, \
             a.privilege_type, a.is_grantable \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a \
             WHERE n.nspname = $1 AND c.relname = ANY ($2) AND c.relkind = 'v' AND a.grantee <> c.relowner \
             ORDER BY 1, 2, 3",
            &[&models.schema(), &views],
        )
        .await
        .map_err(|error| ProjectionError::postgres("read what is granted on the views", error))?;
    Ok(rows
        .iter()
        .map(|row| ViewGrant {
            view: row.get(0),
            grantee: row.get(1),
            privilege: row.get(2),
            grantable: row.get(3),
        })
        .filter(|grant| VIEW_PRIVILEGES.contains(&grant.privilege.as_str()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::PgReadModelOptions;

    /// A leadership session asks the server to probe it: without that, a
    /// leader that vanished without closing its socket would keep its locks
    /// for hours. Read back from the server itself.
    #[tokio::test]
    async fn a_leadership_session_is_probed_by_the_server() {
        let Some(url) = std::env::var("TRIAGE_PG_URL").ok().filter(|url| !url.is_empty()) else {
            eprintln!("skipped: a_leadership_session_is_probed_by_the_server (TRIAGE_PG_URL is not set)");
            return;
        };
        let models = PgReadModels::connect_temporary(&url, PgReadModelOptions::default())
            .await
            .expect("temporary read models open");
        let events: Arc<dyn EventStore> = Arc::new(triage_event_store::InMemoryEventStore::new());
        let projector = PgProjector::new(events, models);
        let session = Session::open(&projector).await.expect("a session opens");
        let setting = |name: &'static str| {
            let client = &session.client;
            async move {
                client
                    .query_one(&format!("SELECT current_setting('{name}')"), &[])
                    .await
                    .expect("the setting reads")
                    .get::<_, String>(0)
            }
        };
        // Over a Unix socket the server reports 0 whatever was asked.
        let over_tcp: bool = session
            .client
            .query_one("SELECT inet_client_addr() IS NOT NULL", &[])
            .await
            .unwrap()
            .get(0);
        if !over_tcp {
            eprintln!("skipped: a_leadership_session_is_probed_by_the_server (TRIAGE_PG_URL is not a TCP address)");
            return;
        }
        assert_eq!(setting("tcp_keepalives_idle").await, "5");
        assert_eq!(setting("tcp_keepalives_interval").await, "2");
        assert_eq!(setting("tcp_keepalives_count").await, "3");
        assert_eq!(setting("tcp_user_timeout").await, "10000");
        // The session still starts its transactions READ COMMITTED.
        assert_eq!(setting("default_transaction_isolation").await, "read committed");
    }
}
