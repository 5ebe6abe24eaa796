//! A bounded cache of folded ticket streams, so that a command usually
//! needs no read before its append.
//!
//! The cache is an optimization only; correctness still comes from the
//! expected revision. A decision made on a cached ticket is appended with
//! `Exact(cached revision)`: if another writer moved the stream on, the
//! append fails, the entry is dropped and the command is decided again on
//! a fresh read. A rejection or a stale-revision answer is never given on
//! an entry merely found in the cache: the handler reads the stream first
//! and decides again, unless a refused append just reported the stream at
//! exactly the entry's revision (see `CommandHandler::handle_inner`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use triage_domain::TicketId;

use crate::LoadedTicket;

/// Folded streams by ticket, at most `capacity` of them.
#[derive(Debug)]
pub(crate) struct StreamCache {
    capacity: usize,
    entries: Mutex<HashMap<TicketId, Arc<LoadedTicket>>>,
}

impl StreamCache {
    pub(crate) fn new(capacity: usize) -> Self {
        StreamCache {
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<TicketId, Arc<LoadedTicket>>> {
        // The map holds only immutable snapshots; a panic elsewhere cannot
        // leave it half-updated.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn get(&self, ticket: TicketId) -> Option<Arc<LoadedTicket>> {
        if self.capacity == 0 {
            return None;
        }
        self.entries().get(&ticket).cloned()
    }

    /// Stores `loaded` unless the cache already holds a newer revision: a
    /// slow task must never put an older snapshot over a newer one.
    pub(crate) fn put(&self, ticket: TicketId, loaded: Arc<LoadedTicket>) {
        if self.capacity == 0 || loaded.revision.is_none() {
            return;
        }
        let mut entries = self.entries();
        if let Some(existing) = entries.get(&ticket)
            && existing.revision >= loaded.revision
        {
            return;
        }
        if entries.len() >= self.capacity && !entries.contains_key(&ticket) {
            // Drop about a quarter, in the map's arbitrary order: cheaper
            // than tracking recency on every hit, and a miss costs one read.
            let evict: Vec<TicketId> = entries.keys().take(self.capacity / 4 + 1).copied().collect();
            for key in evict {
                entries.remove(&key);
            }
        }
        entries.insert(ticket, loaded);
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
        cache.put(ticket, at(5));
        cache.put(ticket, at(3));
        assert_eq!(cache.get(ticket).unwrap().revision, Some(5));
        cache.put(ticket, at(6));
        assert_eq!(cache.get(ticket).unwrap().revision, Some(6));
        cache.remove(ticket);
        assert!(cache.get(ticket).is_none());
    }

    #[test]
    fn the_cache_stays_within_its_capacity() {
        let cache = StreamCache::new(16);
        for _ in 0..100 {
            cache.put(TicketId::new(), at(0));
            assert!(cache.len() <= 16);
        }
        let disabled = StreamCache::new(0);
        let ticket = TicketId::new();
        disabled.put(ticket, at(0));
        assert!(disabled.get(ticket).is_none());
    }
}
