//! Reading ahead of a reader that pages through `$all` far behind the head.
//!
//! A catch-up reader (a projection rebuild, a subscription catching up, an
//! analyst's scan) asks for a page, works on it, then asks for the page
//! that starts at this one's last position (reads include their start).
//! Until it asks, the database has nothing to do; while the database reads,
//! the reader may have nothing to do. So when the store answers a long,
//! full forward page whose successor lies wholly at or below the visible
//! head, it starts reading that successor at once, in the background, on a
//! spare connection of the pool: same start, same length. A request with
//! exactly that start and length takes it.
//!
//! # Why the answer is the same as reading then
//! The successor covers positions `from ..= from + limit - 1`, all at or
//! below a visible head the store had read. A read-ahead is answered only
//! when it holds exactly those positions, all of them. Those never change: events are never
//! updated or deleted, no later commit can take a position at or below a
//! visible one (see `triage_append`), and the watermark only rises. So a
//! read of the page when the reader asks returns exactly these events. A
//! shorter answer (a position missing from the range: an identity value
//! taken by a transaction that rolled back) could differ from a later read,
//! and is thrown away; so is a failed one. The reader's request is then
//! read as if there had been no read-ahead.
//!
//! # What it costs
//! A read-ahead nobody takes is one page read for nothing. It is started
//! only after a long page (at least [`SPLIT_PAGE_MIN`] events, at most
//! [`MAX_PAGE`]) far behind the head, and holds one page of events. A
//! store keeps at most [`SLOTS`] of them, one per reader paging at the same
//! time; one nobody took for [`UNCLAIMED_FOR`] is dropped at the store's
//! next `$all` read, and while all slots hold fresh pages no more are
//! started (a reader then reads its pages itself, as without read-ahead).
//! It takes a connection only while the pool has one to spare (see
//! `reader::spare_client`), so appends do not queue behind it; a reader
//! that asks for its page while the read-ahead still runs waits for it,
//! as it would for its own read.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use deadpool_postgres::{Client, Pool};
use tokio::task::JoinHandle;
use triage_event_store::RecordedEvent;

use crate::Target;
use crate::reader::{self, SPLIT_PAGE_MIN, Spare, Sql};

/// Read-aheads a store keeps at once: one per reader paging through
/// history at the same time (a rebuild of several projections reads once).
pub(crate) const SLOTS: usize = 4;

/// A read-ahead nobody took for this long is dropped.
pub(crate) const UNCLAIMED_FOR: Duration = Duration::from_secs(10);

/// The longest page read ahead, in events: what a slot may hold.
pub(crate) const MAX_PAGE: usize = 65_536;

/// The read-aheads of one store.
#[derive(Debug, Default)]
pub(crate) struct ReadAhead {
    slots: Mutex<Vec<Slot>>,
}

/// One page being read, or read, for the request `(from, limit)`.
#[derive(Debug)]
struct Slot {
    from: i64,
    limit: i64,
    /// The visible head that allowed it.
    visible: i64,
    started: Instant,
    page: AbortOnDrop,
}

/// What a read-ahead answers: the events, and the visible head that
/// allowed it (still a lower bound of the visible head).
pub(crate) struct ReadPage {
    pub(crate) events: Vec<RecordedEvent>,
    pub(crate) visible: i64,
}

/// A read-ahead's task, stopped when nobody can take it any more.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<Option<Vec<RecordedEvent>>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a read-ahead needs of its store (cloned into its task).
#[derive(Clone, Copy)]
pub(crate) struct Source<'a> {
    pub(crate) pool: &'a Pool,
    pub(crate) sql: &'a Arc<Sql>,
    pub(crate) target: &'a Arc<Target>,
}

impl ReadAhead {
    /// The read-ahead for the page `(from, limit)`, if one was started:
    /// its events if they are exactly the `limit` positions from `from`,
    /// else `None` (read the page as usual). Waits for a read-ahead still
    /// running.
    pub(crate) async fn take(&self, from: i64, limit: i64) -> Option<ReadPage> {
        let mut slot = {
            let mut slots = self.lock();
            drop_unclaimed(&mut slots, Instant::now());
            let index = slots.iter().position(|slot| slot.from == from && slot.limit == limit)?;
            slots.swap_remove(index)
        };
        // A panicked or aborted task is no answer; neither is a short one.
        let events = (&mut slot.page.0).await.ok().flatten()?;
        let last = reader::to_sql_int(events.last()?.position.commit);
        let exact = usize::try_from(limit).is_ok_and(|limit| events.len() == limit)
            && from.checked_add(limit - 1) == Some(last);
        exact.then_some(ReadPage {
            events,
            visible: slot.visible,
        })
    }

    /// Stops every read-ahead, and lets go of what they read: the store is
    /// going away.
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// After answering a forward page `events` of a request for `limit`
    /// events, with the visible head known to be at least `visible`:
    /// starts reading the page the reader will ask for next, when that is
    /// worth it and safe (see the module docs).
    pub(crate) fn after(&self, source: Source<'_>, events: &[RecordedEvent], limit: i64, visible: Option<i64>) {
        let long = usize::try_from(limit)
            .is_ok_and(|limit| (SPLIT_PAGE_MIN..=MAX_PAGE).contains(&limit) && events.len() == limit);
        let (Some(last), Some(visible)) = (events.last(), visible) else {
            return;
        };
        let from = reader::to_sql_int(last.position.commit);
        // Not past the visible head: a read-ahead there would mostly come
        // back short, read for nothing. (Answers stay exact without this
        // test; `take` sees to that.)
        if !long || from.checked_add(limit - 1).is_none_or(|end| end > visible) {
            return;
        }
        let mut slots = self.lock();
        let now = Instant::now();
        drop_unclaimed(&mut slots, now);
        if slots.len() >= SLOTS || slots.iter().any(|slot| slot.from == from && slot.limit == limit) {
            return;
        }
        let pool = source.pool.clone();
        let sql = Arc::clone(source.sql);
        let target = Arc::clone(source.target);
        let task = tokio::spawn(async move {
            let client = reader::spare_client(&pool).await?;
            // Halves read here are not the store's `pages_read_in_halves`,
            // which counts the pages asked for; `pages_read_ahead` counts
            // those answered from here.
            let halves = AtomicU64::new(0);
            let spare = Spare {
                pool: &pool,
                pages_read_in_halves: &halves,
            };
            target
                .bounded(client, "reading ahead in $all", false, async |client: &Client| {
                    reader::read_visible_page(client, spare, &sql, &target, from, limit).await
                })
                .await
                .inspect_err(
                    |error| tracing::debug!(%error, from, "a read-ahead of $all failed; the reader will read again"),
                )
                .ok()
        });
        slots.push(Slot {
            from,
            limit,
            visible,
            started: now,
            page: AbortOnDrop(task),
        });
    }
}

/// Drops the read-aheads nobody took for [`UNCLAIMED_FOR`].
fn drop_unclaimed(slots: &mut Vec<Slot>, now: Instant) {
    slots.retain(|slot| now.duration_since(slot.started) < UNCLAIMED_FOR);
}
