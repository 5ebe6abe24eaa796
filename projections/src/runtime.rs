//! The runtime: catch up from checkpoints, follow the log live, rebuild
//! into a shadow generation and swap it in.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use serde::Serialize;
use tokio::sync::mpsc;
use triage_event_store::{AllStart, EventFilter, EventStore, Position, ReadAll, SubscribeToAll};
use uuid::Uuid;

use crate::ProjectionError;
use crate::db::{self, ReadModelDb, Slot, SlotKind};
use crate::projection::{ProjectedEvent, Projection, STREAM_PREFIXES, decode_skipping};
use crate::stats::StatsProjection;
use crate::tickets::TicketsProjection;

/// How the runtime reads and applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectorOptions {
    /// Events per read page and per read-model transaction.
    pub batch_size: usize,
    /// Event types to skip instead of stopping on them (types this build
    /// does not know, written by a newer one). Empty by default: an unknown
    /// type stops the projection with an error naming it.
    pub skip_event_types: BTreeSet<String>,
}

impl Default for ProjectorOptions {
    fn default() -> Self {
        ProjectorOptions {
            batch_size: 4096,
            skip_event_types: BTreeSet::new(),
        }
    }
}

/// Progress of a rebuild, reported after every batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RebuildProgress {
    /// Positions replayed so far (events, on stores with dense positions).
    pub done: u64,
    /// Positions to replay, as of the start.
    pub total: u64,
    /// Replay rate so far.
    pub events_per_s: f64,
    /// Time left at that rate.
    pub eta: Duration,
}

/// How often a rebuild catches its shadow generation up to a live one that
/// moved ahead before swapping it in anyway (see `swap_once_caught_up`).
pub(crate) const SWAP_ATTEMPTS: usize = 20;

/// What [`Projector::rebuild`] did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RebuildReport {
    /// The projection.
    pub name: String,
    /// The version it was rebuilt at.
    pub version: u32,
    /// The new live generation.
    pub generation: u32,
    /// Events replayed.
    pub events: u64,
    /// Wall time of the replay.
    pub wall_s: f64,
    /// Replay rate.
    pub events_per_s: f64,
    /// Seconds of `wall_s` spent writing the read model. The log is read
    /// and decoded meanwhile, so when this is close to `wall_s` the
    /// read-model writes are what limits the rebuild, and otherwise the
    /// reads are.
    pub write_s: f64,
    /// With verification: keys whose rows differ between the rebuilt and
    /// the previous live model (tickets, counters, …). Empty when they
    /// match.
    pub differences: Option<Vec<String>>,
    /// Rows compared when verifying.
    pub compared: Option<usize>,
}

/// A position as its text, the form every other JSON output of Triage uses.
fn position_as_text<S: serde::Serializer>(position: &Option<Position>, serializer: S) -> Result<S::Ok, S::Error> {
    match position {
        Some(position) => serializer.collect_str(position),
        None => serializer.serialize_none(),
    }
}

/// A projection's state, for `triage projections status`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProjectionStatus {
    /// The projection.
    pub name: String,
    /// The version this build of Triage has.
    pub code_version: u32,
    /// The version of the live tables, if built.
    pub live_version: Option<u32>,
    /// The live generation.
    pub generation: Option<u32>,
    /// The last position applied; in JSON as `triage events` prints
    /// positions (`"1795"`, or `"C:1/P:2"`).
    #[serde(serialize_with = "position_as_text")]
    pub checkpoint: Option<Position>,
    /// Events applied to the live generation.
    pub events_applied: u64,
    /// How far behind the log's head it is, in positions (events, on stores
    /// with dense positions such as SQLite).
    pub lag: u64,
    /// The last error, if the projection stopped on one.
    pub last_error: Option<String>,
    /// Whether a rebuild is needed before serving (the live model is of an
    /// older version, or of a replaced log). A model of a newer version
    /// needs a newer Triage instead (`live_version > code_version`).
    pub needs_rebuild: bool,
    /// Whether a rebuild is under way. SQLite read models also report one
    /// that was abandoned (its tables stay until the next rebuild drops
    /// them); PostgreSQL ones only while the rebuild holds its lock.
    pub build_in_progress: bool,
    /// PostgreSQL read models only: the runner instance that holds the
    /// projection's leadership lock right now (`None` when no runner
    /// leads it, and always for SQLite read models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

/// Runs projections from an event store into a read-model database.
#[derive(Clone, Debug)]
pub struct Projector {
    events: Arc<dyn EventStore>,
    db: ReadModelDb,
    projections: Vec<Arc<dyn Projection>>,
    options: ProjectorOptions,
    /// Set once a catch-up found the read models built from this log (see
    /// `catch_up_to`): a store does not change logs under an open handle,
    /// so later catch-ups of this projector skip the check.
    log_confirmed: Arc<AtomicBool>,
}

/// One projection and the slot it writes.
#[derive(Clone, Debug)]
struct Target {
    projection: Arc<dyn Projection>,
    kind: SlotKind,
}

/// What a verification reports, comparing nothing, when the live model was
/// built by another version of the projection than this build's: that
/// version's tables may not even have this version's columns, and this
/// version's code must never write into them.
pub(crate) fn other_version(live: u32, code: u32) -> Option<(Vec<String>, usize)> {
    (live != code).then(|| {
        let note = format!(
            "(the live model was built by version {live} of the projection, this build has version {code}: \
             nothing to compare)"
        );
        (vec![note], 0)
    })
}

impl Projector {
    /// A projector with Triage's read models: `tickets` and `stats`.
    pub fn new(events: Arc<dyn EventStore>, db: ReadModelDb) -> Self {
        Self::with_projections(events, db, vec![Arc::new(TicketsProjection), Arc::new(StatsProjection)])
    }

    /// A projector with the given projections.
    pub fn with_projections(
        events: Arc<dyn EventStore>,
        db: ReadModelDb,
        projections: Vec<Arc<dyn Projection>>,
    ) -> Self {
        Projector {
            events,
            db,
            projections,
            options: ProjectorOptions::default(),
            log_confirmed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Uses `options`.
    pub fn with_options(mut self, options: ProjectorOptions) -> Self {
        self.options = options;
        self
    }

    /// The projections.
    pub fn projections(&self) -> &[Arc<dyn Projection>] {
        &self.projections
    }

    /// The read-model database.
    pub fn db(&self) -> &ReadModelDb {
        &self.db
    }

    fn projection(&self, name: &str) -> Result<Arc<dyn Projection>, ProjectionError> {
        self.projections
            .iter()
            .find(|projection| projection.name() == name)
            .cloned()
            .ok_or_else(|| ProjectionError::UnknownProjection {
                name: name.to_owned(),
                known: self.projections.iter().map(|p| p.name().to_owned()).collect(),
            })
    }

    /// Runs `query` against the live generation of `name`.
    ///
    /// The registry lookup and the query run in one read transaction, so
    /// they see one snapshot of the file: a rebuild in another process
    /// (`triage projections rebuild` beside `triage serve`) may swap the
    /// live generation and drop the old one at any moment, and a read must
    /// never find the registry from before the swap and the tables from
    /// after it. It also keeps a query of several statements (the
    /// statistics summary) at one moment.
    pub fn read<T>(
        &self,
        name: &str,
        query: impl FnOnce(&Connection, &Slot) -> rusqlite::Result<T>,
    ) -> Result<T, ProjectionError> {
        let conn = self.db.lock();
        let snapshot = conn
            .unchecked_transaction()
            .map_err(|error| ProjectionError::sqlite("begin a read", error))?;
        let slot = db::read_slot(&snapshot, SlotKind::Live, name)
            .map_err(|error| ProjectionError::sqlite("read the registry", error))?
            .ok_or_else(|| ProjectionError::NotBuilt { name: name.to_owned() })?;
        // Tables another version of the projection made may differ in their
        // columns or their meaning: this code's queries do not read them.
        if let Ok(projection) = self.projection(name)
            && slot.version != projection.version()
        {
            return Err(ProjectionError::OtherVersion {
                name: name.to_owned(),
                live: slot.version,
                code: projection.version(),
            });
        }
        let result = query(&snapshot, &slot).map_err(|error| ProjectionError::sqlite("query the read model", error))?;
        // Nothing was written: ending the read either way is the same.
        snapshot
            .rollback()
            .map_err(|error| ProjectionError::sqlite("end a read", error))?;
        Ok(result)
    }

    /// Makes every projection servable: creates missing ones empty and
    /// rebuilds those whose version changed, then catches all up to the
    /// head of the log.
    pub async fn catch_up(&self) -> Result<Option<Position>, ProjectionError> {
        self.catch_up_to(None).await
    }

    /// [`Projector::catch_up`], but only up to `until` (inclusive): the
    /// read models as of that moment, for time travel into a scratch
    /// read-model file.
    pub async fn catch_up_to(&self, until: Option<Position>) -> Result<Option<Position>, ProjectionError> {
        // A `triage replay` file stays at the moment it was made.
        let until = match (self.db.frozen_at()?, until) {
            (Some(frozen), Some(until)) if until < frozen => Some(until),
            (Some(frozen), _) => Some(frozen),
            (None, until) => until,
        };
        // The log's first event names the log: a model recorded for
        // another one (a store file deleted and made anew, whose positions
        // start again at 1) is rebuilt, as one ahead of the head is.
        let first_event = if self.log_confirmed.load(Ordering::Relaxed) {
            None
        } else {
            self.events
                .read_all(ReadAll::forwards(1))
                .await?
                .first()
                .map(|event| event.id.to_string())
        };
        let mut recorded_log = None;
        for projection in &self.projections {
            let live = {
                let conn = self.db.lock();
                db::read_slot(&conn, SlotKind::Live, projection.name())
                    .map_err(|error| ProjectionError::sqlite("read the registry", error))?
            };
            // Read after the slot, and again for each projection: another
            // process sharing the file records the log once it has made
            // every model one of this log, so a record that is current
            // here means the slot read before it is one too (or was
            // replaced meanwhile, and apply_page reads the registry anew).
            recorded_log = match first_event {
                Some(_) => self.db.log_identity()?,
                None => None,
            };
            let other_log = recorded_log.is_some() && first_event.is_some() && recorded_log != first_event;
            // Read after the checkpoint: a checkpoint is never past the head
            // when it is written and the head only grows, so a checkpoint
            // past a head read later means the log is another one. Read
            // before it, a rebuild swapping in meanwhile looked the same.
            let head = match live {
                Some(_) => self.events.head_position().await?,
                None => None,
            };
            // The log must still hold, at the checkpoint, the event the
            // model last applied. One restored from a backup and written
            // to since has a head past the checkpoint again, but another
            // event there, or none: the model describes events it lost.
            // Checked once per process, with the log's identity.
            let lost_events = match &live {
                Some(slot)
                    if !self.log_confirmed.load(Ordering::Relaxed)
                        && !other_log
                        && slot.checkpoint.is_some()
                        && slot.checkpoint <= head =>
                {
                    self.checkpoint_event_gone(projection.name()).await
                }
                _ => false,
            };
            match live {
                None => self.create_live(projection)?,
                Some(slot) if slot.checkpoint.is_some() && head.is_none() => {
                    return Err(ProjectionError::EmptyLog {
                        models: self.db.path().display().to_string(),
                        applied: slot.events_applied,
                        remedy: format!("move {} aside", self.db.path().display()),
                    });
                }
                // A checkpoint past the head means the events were replaced
                // (a deleted or swapped store file): this model describes
                // another log. Rebuild rather than silently skip.
                Some(slot) if slot.checkpoint > head || (other_log && slot.checkpoint.is_some()) || lost_events => {
                    if slot.checkpoint > head {
                        tracing::warn!(
                            projection = projection.name(),
                            checkpoint = ?slot.checkpoint,
                            head = ?head,
                            "the read model is ahead of the event log; rebuilding"
                        );
                    } else if lost_events {
                        tracing::warn!(
                            projection = projection.name(),
                            checkpoint = ?slot.checkpoint,
                            "the event log no longer holds the event the read model last applied (a store restored \
                             from a backup?); rebuilding"
                        );
                    } else {
                        tracing::warn!(
                            projection = projection.name(),
                            recorded = ?recorded_log,
                            first_event = ?first_event,
                            "the read model was built from another event log; rebuilding"
                        );
                    }
                    self.rebuild_many_with(
                        &[projection.name()],
                        RebuildOptions::default(),
                        LiveModel::Foreign {
                            generation: slot.generation,
                        },
                    )
                    .await?;
                }
                // Built by a newer Triage: rebuilding it with this version
                // would undo the newer instance's work, and it would undo
                // ours in turn.
                Some(slot) if slot.version > projection.version() => {
                    return Err(ProjectionError::OtherVersion {
                        name: projection.name().to_owned(),
                        live: slot.version,
                        code: projection.version(),
                    });
                }
                Some(slot) if slot.version != projection.version() => {
                    tracing::info!(
                        projection = projection.name(),
                        from = slot.version,
                        to = projection.version(),
                        "version changed; rebuilding before serving"
                    );
                    self.rebuild(projection.name(), RebuildOptions::default()).await?;
                }
                Some(_) => {}
            }
        }
        let targets: Vec<Target> = self
            .projections
            .iter()
            .map(|projection| Target {
                projection: projection.clone(),
                kind: SlotKind::Live,
            })
            .collect();
        // Every model is one of this log now (kept, made, or rebuilt from
        // it): recorded before the catch-up, so that another process
        // sharing the file sees it as soon as it can be true.
        if let Some(first_event) = &first_event
            && recorded_log.as_ref() != Some(first_event)
        {
            self.db.record_log(first_event)?;
        }
        let result = self.replay(&targets, until, &mut |_| {}, None).await;
        if result.is_ok() && first_event.is_some() {
            self.log_confirmed.store(true, Ordering::Relaxed);
        }
        if result.is_ok() {
            let names: Vec<&str> = self.projections.iter().map(|projection| projection.name()).collect();
            let conn = self.db.lock();
            db::clear_errors(&conn, &names).map_err(|error| ProjectionError::sqlite("clear recorded errors", error))?;
        }
        if let Err(error) = &result {
            let conn = self.db.lock();
            for target in &targets {
                let _ = db::record_error(&conn, target.projection.name(), &error.to_string());
            }
        }
        result.map(|replayed| replayed.last)
    }

    /// Whether the event recorded at `name`'s live checkpoint is no longer
    /// the log's event at that position. `false` when nothing was
    /// recorded for the checkpoint it has (files from before the record,
    /// or moved by a Triage from before it), and when either could not be
    /// read: that is no evidence of a replaced log, and the catch-up that
    /// follows reads from the same place and reports its own error.
    async fn checkpoint_event_gone(&self, name: &str) -> bool {
        let recorded = {
            let conn = self.db.lock();
            db::live_checkpoint_event(&conn, name)
        };
        let (position, id) = match recorded {
            Ok(Some(recorded)) => recorded,
            Ok(None) => return false,
            Err(error) => {
                tracing::debug!(projection = name, %error, "cannot read the event recorded at the checkpoint");
                return false;
            }
        };
        let read = ReadAll {
            direction: triage_event_store::Direction::Forwards,
            from: AllStart::Position(position),
            max_count: 1,
        };
        match self.events.read_all(read).await {
            Ok(found) => found
                .first()
                .is_none_or(|event| event.position != position || event.id != id),
            Err(error) => {
                tracing::debug!(projection = name, %error, "cannot read the event at the checkpoint");
                false
            }
        }
    }

    /// Follows the log until `stop` is set, applying new events in batches.
    pub async fn run_live(&self, stop: Arc<AtomicBool>) -> Result<(), ProjectionError> {
        self.catch_up().await?;
        let from = self.min_checkpoint(SlotKind::Live)?;
        let mut options = SubscribeToAll::default().filtered(EventFilter::StreamPrefix(
            STREAM_PREFIXES.iter().map(|prefix| (*prefix).to_owned()).collect(),
        ));
        options.from = from;
        let mut subscription = self.events.clone().subscribe_to_all(options);
        while !stop.load(Ordering::Relaxed) {
            // The subscription only wakes us; the catch-up reads from the
            // checkpoints, so nothing is applied twice or skipped.
            match tokio::time::timeout(Duration::from_millis(200), subscription.next()).await {
                Ok(Some(Ok(_))) => {
                    while let Some(message) = subscription.try_next() {
                        message.map_err(ProjectionError::Store)?;
                    }
                    self.catch_up().await?;
                }
                Ok(Some(Err(error))) => return Err(ProjectionError::Store(error)),
                Ok(None) => return Ok(()),
                Err(_) => {}
            }
        }
        Ok(())
    }

    fn min_checkpoint(&self, kind: SlotKind) -> Result<Option<Position>, ProjectionError> {
        let conn = self.db.lock();
        let mut min: Option<Option<Position>> = None;
        for projection in &self.projections {
            let checkpoint = db::read_slot(&conn, kind, projection.name())
                .map_err(|error| ProjectionError::sqlite("read the registry", error))?
                .and_then(|slot| slot.checkpoint);
            min = Some(match min {
                None => checkpoint,
                Some(current) => current.min(checkpoint),
            });
        }
        Ok(min.flatten())
    }

    /// Creates the live generation of `projection`, unless another process
    /// sharing the file did since the caller found none: replacing that one
    /// would orphan its tables and show readers an empty model.
    fn create_live(&self, projection: &Arc<dyn Projection>) -> Result<(), ProjectionError> {
        let mut conn = self.db.lock();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|error| ProjectionError::sqlite("begin", error))?;
        if db::read_slot(&tx, SlotKind::Live, projection.name())
            .map_err(|error| ProjectionError::sqlite("read the registry", error))?
            .is_some()
        {
            return Ok(());
        }
        new_generation(&tx, projection.as_ref(), SlotKind::Live)
            .and_then(|slot| create_views(&tx, projection.as_ref(), &slot))
            .and_then(|()| tx.commit())
            .map_err(|error| ProjectionError::sqlite("create the projection's tables", error))
    }

    /// Rebuilds `name` from the start of the log into a new generation
    /// while the live one keeps serving, optionally verifies it against the
    /// live one, and swaps it in atomically.
    pub async fn rebuild(&self, name: &str, options: RebuildOptions) -> Result<RebuildReport, ProjectionError> {
        let mut reports = self.rebuild_many(&[name], options).await?;
        Ok(reports.remove(0))
    }

    /// Rebuilds several projections in one pass over the log: each event is
    /// read and decoded once and applied to every shadow generation in the
    /// same transaction. Then each is verified (if asked) and swapped in.
    pub async fn rebuild_many(
        &self,
        names: &[&str],
        options: RebuildOptions,
    ) -> Result<Vec<RebuildReport>, ProjectionError> {
        self.rebuild_many_with(names, options, LiveModel::OfThisLog).await
    }

    async fn rebuild_many_with(
        &self,
        names: &[&str],
        mut options: RebuildOptions,
        live_model: LiveModel,
    ) -> Result<Vec<RebuildReport>, ProjectionError> {
        if let Some(frozen) = self.db.frozen_at()? {
            return Err(ProjectionError::Incompatible {
                path: self.db.path().to_path_buf(),
                reason: format!(
                    "it holds the read models as of log position {frozen}, made by `triage replay`, and a rebuild \
                     would move it to the present; make a new one with `triage replay --until … --into …`"
                ),
            });
        }
        let projections: Vec<Arc<dyn Projection>> = distinct(names)
            .iter()
            .map(|name| self.projection(name))
            .collect::<Result<_, _>>()?;
        if live_model == LiveModel::OfThisLog && !options.replace_newer {
            let conn = self.db.lock();
            for projection in &projections {
                let live = db::read_slot(&conn, SlotKind::Live, projection.name())
                    .map_err(|error| ProjectionError::sqlite("read the registry", error))?;
                if let Some(live) = live.filter(|live| live.version > projection.version()) {
                    return Err(ProjectionError::OtherVersion {
                        name: projection.name().to_owned(),
                        live: live.version,
                        code: projection.version(),
                    });
                }
            }
        }
        // Held to the end: the build generations below are this rebuild's.
        let _claims = match live_model {
            LiveModel::OfThisLog => projections
                .iter()
                .map(|projection| self.db.claim_rebuild(projection.name()))
                .collect::<Result<Vec<_>, _>>()?,
            // Found by a start, not asked for: another process that found
            // the same and is rebuilding is waited for (its rebuild then
            // stands, see below), instead of failing this start.
            LiveModel::Foreign { .. } => {
                let mut claims = Vec::with_capacity(projections.len());
                for projection in &projections {
                    claims.push(self.claim_rebuild_waiting(projection.name()).await?);
                }
                claims
            }
        };
        if let LiveModel::Foreign { generation } = live_model
            && self.replaced_since(&projections, generation)?
        {
            // Another process sharing the file rebuilt it from this log
            // between our look at the live model and our claim: rebuilding
            // again would only redo that work, and swapping in at once
            // could put the model behind where that process took it.
            return Ok(Vec::new());
        }
        let mut slots = Vec::with_capacity(projections.len());
        {
            let mut conn = self.db.lock();
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(|error| ProjectionError::sqlite("begin", error))?;
            for projection in &projections {
                let slot = discard_build(&tx, projection.as_ref())
                    .and_then(|()| new_generation(&tx, projection.as_ref(), SlotKind::Build))
                    .map_err(|error| ProjectionError::sqlite("create the shadow tables", error))?;
                slots.push(slot);
            }
            tx.commit()
                .map_err(|error| ProjectionError::sqlite("create the shadow tables", error))?;
        }
        let build: Vec<Target> = projections
            .iter()
            .map(|projection| Target {
                projection: projection.clone(),
                kind: SlotKind::Build,
            })
            .collect();
        let total = match self.events.head_position().await {
            Ok(head) => head.map_or(0, |head| head.commit),
            Err(error) => {
                self.discard_builds(&projections);
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
            .replay(&build, None, &mut report_progress, options.cancel.as_deref())
            .await;
        let writing = match replayed {
            Ok(replayed) => replayed.writing,
            Err(error) => {
                self.discard_builds(&projections);
                return Err(error);
            }
        };
        let wall = started.elapsed().as_secs_f64();
        let mut reports = Vec::with_capacity(projections.len());
        for (projection, slot) in projections.iter().zip(&slots) {
            let name = projection.name();
            let (differences, compared) = if options.verify {
                match self.verify(projection).await {
                    Ok((differences, compared)) => (Some(differences), Some(compared)),
                    Err(error) => {
                        self.discard_builds(&projections);
                        return Err(partly_rebuilt(&reports, error));
                    }
                }
            } else {
                (None, None)
            };
            // Verification can take a while: a cancel during it still
            // leaves the live models untouched. Once one projection is
            // swapped in, the others follow: a cancel then would leave the
            // live models half rebuilt while saying they are untouched.
            if reports.is_empty()
                && options
                    .cancel
                    .as_deref()
                    .is_some_and(|cancel| cancel.load(Ordering::Relaxed))
            {
                self.discard_builds(&projections);
                return Err(ProjectionError::Cancelled);
            }
            let swapped = match live_model {
                LiveModel::OfThisLog => self.swap_once_caught_up(projection).await,
                // Its checkpoint is a position in another log: waiting for
                // the build to pass it could only wait in vain.
                LiveModel::Foreign { generation } => match self.swap(projection, SwapIf::LiveIs(generation)) {
                    Ok(Some(swapped)) => Ok(swapped),
                    Ok(None) => {
                        // Rebuilt by another process while this one built:
                        // see `replaced_since`.
                        tracing::info!(
                            projection = name,
                            "another process swapped in a rebuilt model meanwhile; dropping this one"
                        );
                        self.discard_builds(&projections);
                        return Ok(reports);
                    }
                    Err(error) => Err(error),
                },
            };
            let events = match swapped {
                Ok(swapped) => swapped.events_applied,
                Err(error) => {
                    // This one and the rest keep their live models; their
                    // builds are not left behind to fill the file.
                    self.discard_builds(&projections);
                    return Err(partly_rebuilt(&reports, error));
                }
            };
            tracing::info!(
                projection = name,
                generation = slot.generation,
                events,
                "rebuilt and swapped in"
            );
            reports.push(RebuildReport {
                name: name.to_owned(),
                version: projection.version(),
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

    /// Claims the rebuild of `name`, waiting while another process holds
    /// it (a crashed one releases it with its lock file).
    async fn claim_rebuild_waiting(&self, name: &str) -> Result<db::RebuildClaim, ProjectionError> {
        let mut said = false;
        loop {
            match self.db.claim_rebuild(name) {
                Err(ProjectionError::RebuildInProgress { .. }) => {
                    if !said {
                        tracing::info!(
                            projection = name,
                            "another process is rebuilding it; waiting for that rebuild"
                        );
                        said = true;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                claimed => return claimed,
            }
        }
    }

    /// Whether a live model of `projections` is no longer `generation`: a
    /// rebuild swapped another one in.
    fn replaced_since(&self, projections: &[Arc<dyn Projection>], generation: u32) -> Result<bool, ProjectionError> {
        let conn = self.db.lock();
        for projection in projections {
            let live = db::read_slot(&conn, SlotKind::Live, projection.name())
                .map_err(|error| ProjectionError::sqlite("read the registry", error))?;
            if live.is_none_or(|live| live.generation != generation) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Drops the build generations of `projections`, best effort: after a
    /// failed or cancelled rebuild the live model stays as it was.
    fn discard_builds(&self, projections: &[Arc<dyn Projection>]) {
        let mut conn = self.db.lock();
        // Immediate: a deferred transaction that read, then tried to write
        // after another process wrote, would fail at once (SQLite does not
        // wait for a stale snapshot), and the builds would stay.
        if let Ok(tx) = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
            for projection in projections {
                let _ = discard_build(&tx, projection.as_ref());
            }
            let _ = tx.commit();
        }
    }

    /// Brings the live and the rebuilt generation to the same position and
    /// compares their digests, key by key.
    async fn verify(&self, projection: &Arc<dyn Projection>) -> Result<(Vec<String>, usize), ProjectionError> {
        let head = self.events.head_position().await?;
        let live = {
            let conn = self.db.lock();
            db::read_slot(&conn, SlotKind::Live, projection.name())
                .map_err(|error| ProjectionError::sqlite("read the registry", error))?
        };
        let Some(live) = live else {
            return Ok((vec!["(no live model to compare with)".to_owned()], 0));
        };
        if let Some(nothing) = other_version(live.version, projection.version()) {
            return Ok(nothing);
        }
        for kind in [SlotKind::Live, SlotKind::Build] {
            let target = [Target {
                projection: projection.clone(),
                kind,
            }];
            self.replay(&target, head, &mut |_| {}, None).await?;
        }
        // A live projector running alongside (`triage serve`) may move the
        // live generation on meanwhile: bring the one behind up to the other
        // and compare only when both are at the same position, in one read
        // transaction: one snapshot of the file, also when that projector
        // is another process with a connection of its own.
        let mut attempts = 0;
        let (live_rows, build_rows) = loop {
            attempts += 1;
            let behind = {
                let held = self.db.lock();
                let conn = held
                    .unchecked_transaction()
                    .map_err(|error| ProjectionError::sqlite("begin a read", error))?;
                let slot = |kind| {
                    db::read_slot(&conn, kind, projection.name())
                        .map_err(|error| ProjectionError::sqlite("read the registry", error))?
                        .ok_or_else(|| ProjectionError::NotBuilt {
                            name: projection.name().to_owned(),
                        })
                };
                let (live, build) = (slot(SlotKind::Live)?, slot(SlotKind::Build)?);
                if live.checkpoint == build.checkpoint || attempts >= 100 {
                    let digest = |slot: &Slot| {
                        projection
                            .digest(&conn, slot)
                            .map_err(|error| ProjectionError::sqlite("digest the read model", error))
                    };
                    Err((digest(&live)?, digest(&build)?))
                } else if build.checkpoint < live.checkpoint {
                    Ok((SlotKind::Build, live.checkpoint))
                } else {
                    Ok((SlotKind::Live, build.checkpoint))
                }
            };
            let (kind, until) = match behind {
                Ok(behind) => behind,
                Err(digests) => break digests,
            };
            let target = [Target {
                projection: projection.clone(),
                kind,
            }];
            self.replay(&target, until, &mut |_| {}, None).await?;
        };
        Ok((diff(&live_rows, &build_rows), build_rows.len().max(live_rows.len())))
    }

    /// Makes the build generation live and drops the old one, in one
    /// transaction, when `condition` holds; otherwise does nothing and
    /// answers `None`.
    fn swap(&self, projection: &Arc<dyn Projection>, condition: SwapIf) -> Result<Option<Slot>, ProjectionError> {
        let mut conn = self.db.lock();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|error| ProjectionError::sqlite("begin", error))?;
        let swap = || -> rusqlite::Result<Option<Slot>> {
            let Some(build) = db::read_slot(&tx, SlotKind::Build, projection.name())? else {
                return Err(rusqlite::Error::QueryReturnedNoRows);
            };
            let live = db::read_slot(&tx, SlotKind::Live, projection.name())?;
            let wanted = match condition {
                SwapIf::Always => true,
                SwapIf::CaughtUp => live.as_ref().is_none_or(|live| live.checkpoint <= build.checkpoint),
                SwapIf::LiveIs(generation) => live.as_ref().is_some_and(|live| live.generation == generation),
            };
            if !wanted {
                return Ok(None);
            }
            if let Some(old) = live {
                drop_views(&tx, projection.as_ref())?;
                drop_tables(&tx, projection.as_ref(), &old)?;
            }
            // Deferred from the start of the rebuild (see
            // `Projection::create_indexes`); only a swap makes a build live.
            projection.create_indexes(&tx, &build)?;
            db::insert_slot(&tx, SlotKind::Live, &build)?;
            db::move_checkpoint_event(&tx, projection.name(), SlotKind::Build, SlotKind::Live)?;
            db::delete_slot(&tx, SlotKind::Build, projection.name())?;
            create_views(&tx, projection.as_ref(), &build)?;
            Ok(Some(build))
        };
        // Not swapped: the transaction rolls back when dropped.
        let swapped = swap().and_then(|swapped| match swapped {
            Some(build) => tx.commit().map(|()| Some(build)),
            None => Ok(None),
        });
        swapped.map_err(|error| ProjectionError::sqlite("swap the rebuilt model in", error))
    }

    /// Swaps the build generation in once it is at least as far along as
    /// the live one, so that readers never see the live model go back: a
    /// live projector running alongside (`triage serve`) keeps applying
    /// while the build replays. A build found behind catches up to the head
    /// and is tried again. After [`SWAP_ATTEMPTS`] tries it is swapped in as
    /// it is, which is still correct (the live catch-up goes on from its
    /// checkpoint), only no longer monotonic for readers. Answers the
    /// registry row of what was swapped in.
    async fn swap_once_caught_up(&self, projection: &Arc<dyn Projection>) -> Result<Slot, ProjectionError> {
        let build = [Target {
            projection: projection.clone(),
            kind: SlotKind::Build,
        }];
        for _ in 0..SWAP_ATTEMPTS {
            if let Some(swapped) = self.swap(projection, SwapIf::CaughtUp)? {
                return Ok(swapped);
            }
            self.replay(&build, None, &mut |_| {}, None).await?;
        }
        tracing::warn!(
            projection = projection.name(),
            attempts = SWAP_ATTEMPTS,
            "the live model kept moving ahead of the rebuilt one; swapping it in behind, the live catch-up brings it forward"
        );
        self.swap(projection, SwapIf::Always)?
            .ok_or_else(|| ProjectionError::Internal("an unconditional swap did not swap".to_owned()))
    }

    /// What SQLite's `quick_check` finds wrong in the read-model file
    /// (`None`: nothing): a file damaged where its registry is not still
    /// opens, and answered "ok" until a query reached the damage. It reads
    /// the whole file: for `projections status`, not for probes.
    pub fn damage(&self) -> Result<Option<String>, ProjectionError> {
        let conn = self.db.lock();
        let mut statement = conn
            .prepare("PRAGMA quick_check(5)")
            .map_err(|error| ProjectionError::sqlite("check the read-model file", error))?;
        let found = statement
            .query_map([], |row| row.get::<_, String>(0))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<String>>>());
        match found {
            Ok(found) if found == ["ok"] => Ok(None),
            // One line: the check's own lines are a header and findings.
            Ok(found) => Ok(Some(found.join("; ").replace('\n', "; "))),
            // A check that cannot even run found damage too.
            Err(error) => Ok(Some(error.to_string())),
        }
    }

    /// Each projection's status.
    pub async fn status(&self) -> Result<Vec<ProjectionStatus>, ProjectionError> {
        let mut registry = Vec::new();
        {
            let conn = self.db.lock();
            for projection in &self.projections {
                let name = projection.name();
                let sql = |error| ProjectionError::sqlite("read the registry", error);
                let live = db::read_slot(&conn, SlotKind::Live, name).map_err(sql)?;
                let build = db::read_slot(&conn, SlotKind::Build, name).map_err(sql)?;
                let last_error = db::last_error(&conn, name).map_err(sql)?;
                registry.push((projection, live, build, last_error));
            }
        }
        // After the checkpoints, as in `catch_up_to`: only a replaced log
        // puts a checkpoint past a head read later.
        let head = self.events.head_position().await?;
        let mut statuses = Vec::new();
        for (projection, live, build, last_error) in registry {
            let name = projection.name();
            let checkpoint = live.as_ref().and_then(|slot| slot.checkpoint);
            // As in `catch_up_to`, once per process: after a catch-up
            // confirmed the log, the models are this log's.
            let lost_events = match &live {
                Some(slot)
                    if !self.log_confirmed.load(Ordering::Relaxed)
                        && slot.checkpoint.is_some()
                        && slot.checkpoint <= head =>
                {
                    self.checkpoint_event_gone(name).await
                }
                _ => false,
            };
            statuses.push(ProjectionStatus {
                name: name.to_owned(),
                code_version: projection.version(),
                live_version: live.as_ref().map(|slot| slot.version),
                generation: live.as_ref().map(|slot| slot.generation),
                checkpoint,
                events_applied: live.as_ref().map_or(0, |slot| slot.events_applied),
                lag: head.map_or(0, |head| head.commit.saturating_sub(checkpoint.map_or(0, |c| c.commit))),
                last_error,
                // A model a newer Triage built needs a newer Triage, not a
                // rebuild by this one.
                needs_rebuild: live
                    .as_ref()
                    .is_some_and(|slot| slot.version < projection.version() || slot.checkpoint > head || lost_events),
                build_in_progress: build.is_some(),
                leader: None,
            });
        }
        Ok(statuses)
    }

    /// Replays the log into `targets` from their checkpoints, up to `until`
    /// (inclusive) or the head. Pages are read and decoded one ahead of the
    /// batch being applied.
    async fn replay(
        &self,
        targets: &[Target],
        until: Option<Position>,
        progress: &mut (dyn FnMut(u64) + Send),
        cancel: Option<&AtomicBool>,
    ) -> Result<Replayed, ProjectionError> {
        let mut writing = Duration::ZERO;
        loop {
            let pass = self.replay_pass(targets, until, progress, cancel).await?;
            writing += pass.replayed.writing;
            if !pass.fell_behind {
                return Ok(Replayed {
                    writing,
                    ..pass.replayed
                });
            }
            // A target's checkpoint went back behind the pages being read
            // (a rebuild swapped in a generation built up to an earlier
            // position): read again from the checkpoints as they are now,
            // so that what this replay reports as reached was applied.
            tracing::debug!("a checkpoint went back during the replay; reading again from the checkpoints");
        }
    }

    /// One pass of [`Projector::replay`]: from the targets' lowest
    /// checkpoint, until the end or until a target is found behind the
    /// page being applied.
    async fn replay_pass(
        &self,
        targets: &[Target],
        until: Option<Position>,
        progress: &mut (dyn FnMut(u64) + Send),
        cancel: Option<&AtomicBool>,
    ) -> Result<ReplayPass, ProjectionError> {
        let start = {
            let conn = self.db.lock();
            let mut start: Option<Option<Position>> = None;
            for target in targets {
                let checkpoint = db::read_slot(&conn, target.kind, target.projection.name())
                    .map_err(|error| ProjectionError::sqlite("read the registry", error))?
                    .ok_or_else(|| ProjectionError::NotBuilt {
                        name: target.projection.name().to_owned(),
                    })?
                    .checkpoint;
                start = Some(match start {
                    None => checkpoint,
                    Some(current) => current.min(checkpoint),
                });
            }
            start.flatten()
        };
        // One page waiting, besides the one being written and the one
        // being read: measured on 1M events from PostgreSQL, two waiting
        // pages made no rebuild faster (301,000–332,000 events/s either
        // way) but raised its peak RSS from 81–86 MB to 86–121 MB.
        let (pages, mut receiver) = mpsc::channel::<Result<Page, ProjectionError>>(1);
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
            let page = page?;
            let db = self.db.clone();
            let batch_targets = targets.to_vec();
            let page_end = page.end;
            let count = page.considered;
            let applying = Instant::now();
            let applied = tokio::task::spawn_blocking(move || apply_page(&db, &batch_targets, &page))
                .await
                .map_err(|error| ProjectionError::Internal(format!("a batch panicked: {error}")))??;
            writing += applying.elapsed();
            if applied == Applied::SomeBehind {
                reader.abort();
                return Ok(ReplayPass {
                    replayed: Replayed { last, writing },
                    fell_behind: true,
                });
            }
            last = Some(page_end);
            done += count;
            progress(page_end.commit.max(done));
        }
        reader
            .await
            .map_err(|error| ProjectionError::Internal(format!("the reader panicked: {error}")))?;
        Ok(ReplayPass {
            replayed: Replayed { last, writing },
            fell_behind: false,
        })
    }
}

/// What one pass of a replay did.
struct ReplayPass {
    replayed: Replayed,
    /// A target was found behind a page: the pass stopped there.
    fell_behind: bool,
}

/// What [`apply_page`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Applied {
    /// Every target holds the page now.
    All,
    /// A target's checkpoint is behind where the page starts; the others
    /// hold the page, that one was left as it was.
    SomeBehind,
}

/// What a replay did.
#[derive(Debug)]
pub(crate) struct Replayed {
    /// The last position applied (the start, when there was nothing new).
    pub(crate) last: Option<Position>,
    /// Time spent applying pages to the read model.
    pub(crate) writing: Duration,
}

/// `error`, saying which projections of the rebuild were swapped in before
/// it (none: `error` as it is).
pub(crate) fn partly_rebuilt(reports: &[RebuildReport], error: ProjectionError) -> ProjectionError {
    if reports.is_empty() {
        return error;
    }
    ProjectionError::PartlyRebuilt {
        rebuilt: reports.iter().map(|report| report.name.clone()).collect(),
        source: Box::new(error),
    }
}

/// `names` without repeats, in their first order: a projection named twice
/// in one rebuild is rebuilt once.
pub(crate) fn distinct<'a>(names: &[&'a str]) -> Vec<&'a str> {
    let mut seen = BTreeSet::new();
    names.iter().copied().filter(|name| seen.insert(*name)).collect()
}

/// Options of [`Projector::rebuild`].
#[derive(Default)]
pub struct RebuildOptions {
    /// Compare the rebuilt model with the live one before swapping.
    pub verify: bool,
    /// Called after every batch.
    pub progress: Option<Box<dyn FnMut(RebuildProgress) + Send>>,
    /// Set to stop the rebuild between batches; the live model is untouched.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Rebuild even a projection whose live model a newer Triage built
    /// (a higher projection version), replacing it with this build's
    /// version. Without it such a rebuild is refused
    /// ([`ProjectionError::OtherVersion`]): an older instance in a rolling
    /// upgrade must not take the model back from the newer ones.
    pub replace_newer: bool,
}

impl std::fmt::Debug for RebuildOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RebuildOptions")
            .field("verify", &self.verify)
            .field("progress", &self.progress.is_some())
            .field("cancel", &self.cancel)
            .field("replace_newer", &self.replace_newer)
            .finish()
    }
}

/// What the live model being rebuilt describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LiveModel {
    /// This log: the build is swapped in once it is at least as far along,
    /// so that readers never see the model go back.
    OfThisLog,
    /// Another log (a replaced store file): the build replaces it at once,
    /// if the live model is still `generation`, the one found to describe
    /// another log. Another process sharing the file may have rebuilt it
    /// meanwhile; then that rebuild stands and this one is dropped.
    Foreign { generation: u32 },
}

/// When [`Projector::swap`] makes the build live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SwapIf {
    /// Whatever the live model is.
    Always,
    /// When the build is at least as far along as the live model.
    CaughtUp,
    /// When the live model is still this generation.
    LiveIs(u32),
}

/// One page of the log, decoded.
#[derive(Debug)]
pub(crate) struct Page {
    /// The position the page was read after (`None`: from the start).
    pub(crate) start: Option<Position>,
    pub(crate) events: Vec<ProjectedEvent>,
    /// The last position considered (projected or not).
    pub(crate) end: Position,
    /// The id of the event at `end`.
    pub(crate) end_event: Uuid,
    /// Records considered.
    pub(crate) considered: u64,
}

/// Reads the log after `start` (up to `until`) page by page into `pages`,
/// decoded; shared by the SQLite and the PostgreSQL runtimes.
///
/// The read of the next page is started as soon as a page arrives, before
/// the page is decoded: the store (a database server, or the embedded
/// store's blocking thread) then produces the next rows while this task
/// decodes, instead of each waiting for the other. The next page starts
/// at the last record of this one, so one read ahead is as far as the
/// reader can go. At most one page is read ahead; a read-ahead still
/// running when the reader stops (an error, the receiver gone, or the
/// reader aborted) is aborted with it.
pub(crate) async fn read_pages(
    events: Arc<dyn EventStore>,
    start: Option<Position>,
    until: Option<Position>,
    batch_size: usize,
    skip: BTreeSet<String>,
    pages: mpsc::Sender<Result<Page, ProjectionError>>,
) {
    let read = |after: Option<Position>| {
        let events = Arc::clone(&events);
        async move {
            events
                .read_all(ReadAll {
                    direction: triage_event_store::Direction::Forwards,
                    from: after.map_or(AllStart::Boundary, AllStart::Position),
                    max_count: batch_size + 1,
                })
                .await
        }
    };
    // Dropping the set aborts the read ahead.
    let mut read_ahead = tokio::task::JoinSet::new();
    let mut after = start;
    loop {
        let records = match read_ahead.join_next().await {
            Some(Ok(records)) => records,
            Some(Err(error)) => {
                let error = ProjectionError::Internal(format!("a page read panicked: {error}"));
                let _ = pages.send(Err(error)).await;
                return;
            }
            None => read(after).await,
        };
        let records = match records {
            Ok(records) => records,
            Err(error) => {
                let _ = pages.send(Err(ProjectionError::Store(error))).await;
                return;
            }
        };
        // Reads include their start, so the next page starts at the last
        // record of this one, if this one got further and `until` is not
        // reached yet (then this page is the last with anything new).
        if let Some(last) = records.last().map(|record| record.position)
            && Some(last) > after
            && until.is_none_or(|until| last < until)
        {
            read_ahead.spawn(read(Some(last)));
        }
        let mut page = Page {
            start: after,
            events: Vec::with_capacity(records.len()),
            end: Position::START,
            end_event: Uuid::nil(),
            considered: 0,
        };
        for record in records {
            // Reads include their start; it was applied already.
            if Some(record.position) <= after {
                continue;
            }
            if until.is_some_and(|until| record.position > until) {
                break;
            }
            page.end = record.position;
            page.end_event = record.id;
            page.considered += 1;
            match decode_skipping(&record, &skip) {
                Ok(Some(event)) => page.events.push(event),
                Ok(None) => {}
                Err(error) => {
                    let _ = pages.send(Err(error)).await;
                    return;
                }
            }
        }
        if page.considered == 0 {
            return;
        }
        after = Some(page.end);
        if pages.send(Ok(page)).await.is_err() {
            return;
        }
    }
}

/// Applies one page to every target in one transaction that also moves
/// their checkpoints. Each target reads its checkpoint inside the
/// transaction and skips what it already has: a page is applied exactly
/// once even when two runners (or a swap) race.
fn apply_page(db: &ReadModelDb, targets: &[Target], page: &Page) -> Result<Applied, ProjectionError> {
    let mut applied = Applied::All;
    let mut conn = db.lock();
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|error| ProjectionError::sqlite("begin a batch", error))?;
    for target in targets {
        let name = target.projection.name();
        let Some(mut slot) = db::read_slot(&tx, target.kind, name)
            .map_err(|error| ProjectionError::sqlite("read a checkpoint", error))?
        else {
            return Err(ProjectionError::NotBuilt { name: name.to_owned() });
        };
        // Another instance swapped in a generation of another version
        // while this one was applying: its tables are not this code's.
        if slot.version != target.projection.version() {
            return Err(ProjectionError::OtherVersion {
                name: name.to_owned(),
                live: slot.version,
                code: target.projection.version(),
            });
        }
        if slot.checkpoint >= Some(page.end) {
            continue;
        }
        if slot.checkpoint < page.start {
            // The slot is behind where this page starts: a rebuild swapped
            // in a generation built up to an earlier position while this
            // replay was running. Applying the page would skip the events in
            // between; the replay reads again from the checkpoint.
            tracing::debug!(
                projection = name,
                checkpoint = ?slot.checkpoint,
                page_start = ?page.start,
                "checkpoint behind the page; reading again from it"
            );
            applied = Applied::SomeBehind;
            continue;
        }
        let fresh: &[ProjectedEvent] = {
            let skip = page
                .events
                .iter()
                .take_while(|event| Some(event.position) <= slot.checkpoint)
                .count();
            &page.events[skip..]
        };
        target.projection.apply(&tx, &slot, fresh)?;
        slot.events_applied += fresh.len() as u64;
        slot.checkpoint = Some(page.end);
        db::write_checkpoint(&tx, target.kind, &slot)
            .and_then(|()| db::write_checkpoint_event(&tx, target.kind, name, page.end, page.end_event))
            .map_err(|error| ProjectionError::sqlite("write a checkpoint", error))?;
    }
    tx.commit()
        .map_err(|error| ProjectionError::sqlite("commit a batch", error))?;
    Ok(applied)
}

/// Creates the tables of the projection's next generation and registers
/// them as `kind`, with no events applied. Generations only grow, so a new
/// one never reuses the table names of a live or abandoned one. A build
/// gets its secondary indexes when it is swapped in, a live one at once.
fn new_generation(conn: &Connection, projection: &dyn Projection, kind: SlotKind) -> rusqlite::Result<Slot> {
    let slot = Slot {
        name: projection.name().to_owned(),
        version: projection.version(),
        generation: db::max_generation(conn, projection.name())? + 1,
        checkpoint: None,
        events_applied: 0,
    };
    projection.create(conn, &slot)?;
    if kind == SlotKind::Live {
        projection.create_indexes(conn, &slot)?;
    }
    db::insert_slot(conn, kind, &slot)?;
    Ok(slot)
}

fn discard_build(conn: &Connection, projection: &dyn Projection) -> rusqlite::Result<()> {
    if let Some(build) = db::read_slot(conn, SlotKind::Build, projection.name())? {
        drop_tables(conn, projection, &build)?;
        db::delete_slot(conn, SlotKind::Build, projection.name())?;
    }
    Ok(())
}

/// Drops `slot`'s tables: those of this version of the projection and
/// those earlier versions had ([`Projection::former_tables`]), since the
/// slot may be a generation an earlier version made.
fn drop_tables(conn: &Connection, projection: &dyn Projection, slot: &Slot) -> rusqlite::Result<()> {
    for table in projection.tables().iter().chain(projection.former_tables()) {
        conn.execute_batch(&format!("DROP TABLE IF EXISTS {}", slot.table(table)))?;
    }
    Ok(())
}

/// Drops the projection's views, former ones included: a view left onto
/// a dropped generation's table would answer with frozen rows, or fail.
fn drop_views(conn: &Connection, projection: &dyn Projection) -> rusqlite::Result<()> {
    for table in projection.tables().iter().chain(projection.former_tables()) {
        conn.execute_batch(&format!("DROP VIEW IF EXISTS {table}"))?;
    }
    Ok(())
}

/// `<table>` views onto the live generation, for people querying with SQL.
fn create_views(conn: &Connection, projection: &dyn Projection, slot: &Slot) -> rusqlite::Result<()> {
    drop_views(conn, projection)?;
    for table in projection.tables() {
        conn.execute_batch(&format!("CREATE VIEW {table} AS SELECT * FROM {}", slot.table(table)))?;
    }
    Ok(())
}

/// Keys whose digests differ, or that exist on one side only.
pub(crate) fn diff(live: &BTreeMap<String, u64>, rebuilt: &BTreeMap<String, u64>) -> Vec<String> {
    let keys: BTreeSet<&String> = live.keys().chain(rebuilt.keys()).collect();
    keys.into_iter()
        .filter(|key| live.get(*key) != rebuilt.get(*key))
        .map(|key| match (live.contains_key(key), rebuilt.contains_key(key)) {
            (true, false) => format!("{key} (only in the live model)"),
            (false, true) => format!("{key} (only in the rebuilt model)"),
            _ => format!("{key} (differs)"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use triage_command_handler::{CommandHandler, open_ticket};
    use triage_domain::{Agent, Role};
    use triage_event_store::testing::CountingStore;
    use triage_event_store::{EventData, ExpectedRevision, InMemoryEventStore, StreamName};
    use uuid::Uuid;

    use super::*;

    /// An in-memory store with `events` events in streams projections do
    /// not read (each is considered, none decoded), and their positions.
    async fn memory_with(events: usize) -> (Arc<InMemoryEventStore>, Vec<Position>) {
        let memory = Arc::new(InMemoryEventStore::new());
        for index in 0..events {
            let stream = StreamName::new(format!("other-{index}")).unwrap();
            let event = EventData {
                id: Uuid::new_v4(),
                event_type: "Noted".to_owned(),
                data: b"{}".to_vec(),
                metadata: b"{}".to_vec(),
            };
            memory
                .append(&stream, ExpectedRevision::NoStream, vec![event])
                .await
                .unwrap();
        }
        let all = memory.read_all(ReadAll::forwards(events + 1)).await.unwrap();
        (memory, all.iter().map(|record| record.position).collect())
    }

    /// Runs the reader over `store` in pages of 3 into a channel of
    /// `capacity` pages.
    fn reader(
        store: &Arc<CountingStore>,
        until: Option<Position>,
        capacity: usize,
    ) -> (
        tokio::task::JoinHandle<()>,
        mpsc::Receiver<Result<Page, ProjectionError>>,
    ) {
        let (pages, receiver) = mpsc::channel(capacity);
        let reader = tokio::spawn(read_pages(
            store.clone() as Arc<dyn EventStore>,
            None,
            until,
            3,
            BTreeSet::new(),
            pages,
        ));
        (reader, receiver)
    }

    async fn reads_settle_at(store: &CountingStore, expected: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.all_reads() < expected {
            assert!(
                Instant::now() < deadline,
                "only {} reads started, expected {expected}",
                store.all_reads()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // And no further: the reader waits on the full channel with one
        // page read ahead, not more.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(store.all_reads(), expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reader_reads_exactly_one_page_ahead_and_delivers_every_record_once_in_order() {
        let (memory, all) = memory_with(10).await;
        let store = Arc::new(CountingStore::new(memory));
        let (reader, mut receiver) = reader(&store, None, 1);
        // Nothing is received yet: page 1 waits in the channel, page 2 is
        // decoded and waits to be sent, and the read of page 3 is the read
        // ahead. Without the read ahead it stays at 2 reads.
        reads_settle_at(&store, 3).await;
        let mut seen = Vec::new();
        let mut previous_end = None;
        while let Some(page) = receiver.recv().await {
            let page = page.unwrap();
            assert_eq!(page.start, previous_end, "pages are contiguous");
            seen.push((page.start, page.end, page.considered));
            previous_end = Some(page.end);
        }
        reader.await.unwrap();
        // Reads ask for one more than a page: the first read has no start
        // to repeat, so its page has 4 records; the others 3.
        assert_eq!(
            seen,
            vec![(None, all[3], 4), (Some(all[3]), all[6], 3), (Some(all[6]), all[9], 3),]
        );
        // The last read, from the last record, found nothing new.
        assert_eq!(store.all_reads(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_read_ahead_is_reported_after_the_pages_before_it() {
        let (memory, all) = memory_with(10).await;
        let store = Arc::new(CountingStore::new(memory).failing_read_all_from(AllStart::Position(all[6])));
        let (reader, mut receiver) = reader(&store, None, 1);
        let mut delivered = Vec::new();
        while let Some(page) = receiver.recv().await {
            match page {
                Ok(page) => delivered.push(page.considered),
                Err(error) => {
                    assert!(
                        matches!(error, ProjectionError::Store(_)),
                        "a store error, got {error:?}"
                    );
                    delivered.push(0);
                }
            }
        }
        reader.await.unwrap();
        // Pages 1 and 2, then the error of the read ahead, then nothing.
        assert_eq!(delivered, vec![4, 3, 0]);
        assert_eq!(store.all_reads(), 3, "no read after the failed one");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn until_stops_the_reader_without_reading_past_it() {
        let (memory, all) = memory_with(10).await;
        let store = Arc::new(CountingStore::new(memory));
        let until = all[5];
        let (reader, mut receiver) = reader(&store, Some(until), 4);
        let mut considered = 0;
        let mut last = None;
        while let Some(page) = receiver.recv().await {
            let page = page.unwrap();
            considered += page.considered;
            last = Some(page.end);
        }
        reader.await.unwrap();
        assert_eq!((considered, last), (6, Some(until)));
        // Two pages, and one read that finds nothing new: the page that
        // ends at `until` starts no read ahead.
        assert_eq!(store.all_reads(), 3);
    }

    /// Two processes on a fresh file both find no live model and both
    /// create one: the second finds the first's and keeps it (its tables
    /// and its progress), instead of replacing it with an empty one.
    #[tokio::test]
    async fn a_live_model_created_meanwhile_is_kept() {
        let (memory, positions) = memory_with(20).await;
        let store: Arc<dyn EventStore> = memory;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("triage.read.db");
        let first = Projector::new(store.clone(), ReadModelDb::open(&path).unwrap());
        let second = Projector::new(store.clone(), ReadModelDb::open(&path).unwrap());
        let tickets = second.projection("tickets").unwrap();
        first.catch_up().await.unwrap();
        // The second had looked before the first created it.
        second.create_live(&tickets).unwrap();
        let conn = second.db.lock();
        let slot = db::read_slot(&conn, SlotKind::Live, "tickets").unwrap().unwrap();
        assert_eq!(slot.generation, 1);
        assert_eq!(slot.checkpoint, positions.last().copied());
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name LIKE 'tickets_g%'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(tables, 1, "no orphaned generation");
    }

    /// A start that finds its read models describing a replaced log waits
    /// for another process that is rebuilding them already (and then
    /// starts), instead of failing with "a rebuild is in progress".
    #[tokio::test]
    async fn a_start_that_finds_a_replaced_log_waits_for_a_rebuild_in_progress() {
        let db = ReadModelDb::in_memory().unwrap();
        let intake = || Agent::new("intake", Role::Intake);
        let old: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
        for n in 0..2 {
            CommandHandler::new(old.clone())
                .handle(open_ticket(intake(), format!("old {n}"), "b", None))
                .await
                .unwrap();
        }
        Projector::new(old, db.clone()).catch_up().await.unwrap();
        let new: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
        CommandHandler::new(new.clone())
            .handle(open_ticket(intake(), "new", "b", None))
            .await
            .unwrap();
        // Another process is rebuilding the tickets.
        let held = db.claim_rebuild("tickets").unwrap();
        let projector = Projector::new(new, db.clone());
        let starting = tokio::spawn(async move { projector.catch_up().await });
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!starting.is_finished(), "it waits for the rebuild in progress");
        drop(held);
        let started = tokio::time::timeout(Duration::from_secs(10), starting)
            .await
            .expect("it goes on once the other rebuild ends")
            .unwrap();
        assert!(started.is_ok(), "{started:?}");
    }
}
