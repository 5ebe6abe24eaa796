//! A bounded cache of folded ticket streams, so that a command usually
//! needs no read before its append.
//!
//! The cache is an optimization only; correctness still comes from the
//! expected revision. A decision made on a cached ticket is appended with
//! `Exact(cached revision)`: if another writer moved the stream on, the
//! append fails, the entry is dropped and the command is decided again on
//! a fresh read. A rejection or a stale-revision answer is never given on
//! an entry merely found in the cache: the handler reads the stream first
//! and decides again, unless the entry is as good as a read of its own
//! (see [`Cached::current_for`]), or a refused append just reported the
//! stream at exactly the entry's revision (see
//! `CommandHandler::handle_inner`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use triage_domain::TicketId;

use crate::LoadedTicket;

/// How long after the read or append that saw it an entry still counts as
/// the ticket "now" for a command that arrived before that read or append
/// began ([`Cached::current_for`]): about as old as the result of a read
/// is by the time it is decided on, when the store is slow to answer. A
/// command that waited longer for its turn reads.
pub(crate) const CURRENT_FOR: Duration = Duration::from_millis(100);

/// A cached fold and when it was seen.
#[derive(Clone, Debug)]
pub(crate) struct Cached {
    pub(crate) loaded: Arc<LoadedTicket>,
    /// When the read or append that found the stream at this revision
    /// began: the stream was at this revision at some moment after it.
    pub(crate) seen_after: Instant,
    /// The cache's [`CURRENT_FOR`].
    current_for: Duration,
}

impl Cached {
    /// Whether the entry tells `arrived`'s command the ticket as a read of
    /// its own would: the store had the stream at this revision at some
    /// moment after the command arrived (the read or append that saw it
    /// began later), and that moment is recent. A refusal decided on it is
    /// then one the command could have been given at that moment, like a
    /// refusal decided on a read.
    pub(crate) fn current_for(&self, arrived: Instant) -> bool {
        self.seen_after > arrived && self.seen_after.elapsed() <= self.current_for
    }
}

/// Folded streams by ticket, at most `capacity` of them.
#[derive(Debug)]
pub(crate) struct StreamCache {
    capacity: usize,
    /// [`CURRENT_FOR`], but for tests that cannot count on a busy
    /// machine to answer within it.
    current_for: Duration,
    entries: Mutex<HashMap<TicketId, Cached>>,
}

impl StreamCache {
    pub(crate) fn new(capacity: usize) -> Self {
        StreamCache {
            capacity,
            current_for: CURRENT_FOR,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<TicketId, Cached>> {
        // The map holds only immutable snapshots; a panic elsewhere cannot
        // leave it half-updated.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A cache whose entries count as current for `current_for` (tests).
    #[cfg(test)]
    pub(crate) fn with_current_for(capacity: usize, current_for: Duration) -> Self {
        StreamCache {
            current_for,
            ..StreamCache::new(capacity)
        }
    }

    pub(crate) fn get(&self, ticket: TicketId) -> Option<Cached> {
        if self.capacity == 0 {
            return None;
        }
        self.entries().get(&ticket).map(|entry| Cached {
            current_for: self.current_for,
            ..entry.clone()
        })
    }

    /// Stores `loaded`, seen by a read or append that began at
    /// `seen_after`, unless the cache already holds a newer revision: a
    /// slow task must never put an older snapshot over a newer one. The
    /// same revision seen later only moves `seen_after` on when the two
    /// end with the same event (stored events never change, so it is the
    /// same fold); a fold of another stream at that revision (a store
    /// replaced under the handler) is replaced, never stamped as seen.
    pub(crate) fn put(&self, ticket: TicketId, loaded: Arc<LoadedTicket>, seen_after: Instant) {
        if self.capacity == 0 || loaded.revision.is_none() {
            return;
        }
        let mut entries = self.entries();
        if let Some(existing) = entries.get_mut(&ticket) {
            if existing.loaded.revision > loaded.revision {
                return;
            }
            let last_id = |fold: &LoadedTicket| fold.history.last().map(|stored| stored.id);
            if existing.loaded.revision == loaded.revision {
                if last_id(&existing.loaded) == last_id(&loaded) {
                    existing.seen_after = existing.seen_after.max(seen_after);
                } else {
                    *existing = Cached {
                        loaded,
                        seen_after,
                        current_for: self.current_for,
                    };
                }
                return;
            }
        }
        if entries.len() >= self.capacity && !entries.contains_key(&ticket) {
            // Drop about a quarter, in the map's arbitrary order: cheaper
            // than tracking recency on every hit, and a miss costs one read.
            let evict: Vec<TicketId> = entries.keys().take(self.capacity / 4 + 1).copied().collect();
            for key in evict {
                entries.remove(&key);
            }
        }
        entries.insert(
            ticket,
            Cached {
                loaded,
                seen_after,
                current_for: self.current_for,
            },
        );
    }

    pub(crate) fn remove(&self, ticket: TicketId) {
        self.entries().remove(&ticket);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(revision: u64) -> Arc<LoadedTicket> {
        Arc::new(LoadedTicket {
            revision: Some(revision),
            ..LoadedTicket::default()
        })
    }

    #[test]
    fn an_older_snapshot_never_replaces_a_newer_one() {
        let cache = StreamCache::new(8);
        let ticket = TicketId::new();
        cache.put(ticket, at(5), Instant::now());
        cache.put(ticket, at(3), Instant::now());
        assert_eq!(cache.get(ticket).unwrap().loaded.revision, Some(5));
        cache.put(ticket, at(6), Instant::now());
        assert_eq!(cache.get(ticket).unwrap().loaded.revision, Some(6));
        cache.remove(ticket);
        assert!(cache.get(ticket).is_none());
    }

    #[test]
    fn the_cache_stays_within_its_capacity() {
        let cache = StreamCache::new(16);
        for _ in 0..100 {
            cache.put(TicketId::new(), at(0), Instant::now());
            assert!(cache.len() <= 16);
        }
        let disabled = StreamCache::new(0);
        let ticket = TicketId::new();
        disabled.put(ticket, at(0), Instant::now());
        assert!(disabled.get(ticket).is_none());
    }

    #[test]
    fn an_entry_is_current_only_for_commands_that_arrived_before_it_was_seen() {
        // A window no busy test machine misses.
        let cache = StreamCache::with_current_for(8, Duration::from_secs(30));
        let ticket = TicketId::new();
        let now = Instant::now();
        let (before, seen, after) = (
            now - Duration::from_secs(3),
            now - Duration::from_secs(2),
            now - Duration::from_secs(1),
        );
        cache.put(ticket, at(4), seen);
        let entry = cache.get(ticket).unwrap();
        assert!(entry.current_for(before));
        assert!(!entry.current_for(after), "seen before the command arrived");
        // The same revision seen again later is current for later arrivals.
        cache.put(ticket, at(4), now);
        assert!(cache.get(ticket).unwrap().current_for(after));
    }

    #[test]
    fn an_entry_seen_too_long_ago_is_current_for_nobody() {
        let cache = StreamCache::new(8);
        let ticket = TicketId::new();
        let now = Instant::now();
        cache.put(ticket, at(1), now - CURRENT_FOR - Duration::from_millis(50));
        let arrived = now - CURRENT_FOR - Duration::from_millis(100);
        assert!(!cache.get(ticket).unwrap().current_for(arrived));
    }
}
