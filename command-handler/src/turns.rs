//! One command at a time per ticket, within a process.
//!
//! Two commands of one process on one ticket would both decide on the same
//! revision and append with `Exact(revision)`: the store takes one and
//! refuses the other, which then decides again. The refused append still
//! cost a trip through the store's write path (on PostgreSQL, a stream
//! lock and a lookup of the stream's last revision in the writer's
//! transaction). Taking turns instead, the second command waits until the
//! first is decided and appended, and then decides on its result, which
//! the stream cache holds.
//!
//! A command that waited is usually refused (the claim it raced for is
//! taken), and the refusal needs no read of its own when the cache entry
//! was seen by a read or append that began after the command arrived
//! (`Cached::current_for`): that is the ticket as the store had it during
//! the command's lifetime. Without that, the losers of a race would each
//! read in turn, and a queue of them would hold up the ticket's next
//! command.
//!
//! Turns are an optimization only, like the cache: they order the commands
//! of clones of one handler, not those of other processes, so correctness
//! still comes from the expected revision. A command gives up its turn
//! while it waits to retry after a conflict, so a pause never holds up the
//! ticket's other commands.
//!
//! Measured with `triage-bench pg-compare --tickets hot` (agents racing for
//! the claims of 4 tickets, 3 rounds): 2,200 commands/s with 8 agents and
//! 1,248 with 32, against 1,856 and 1,048 without turns, and no conflict
//! left in the store.
//!
//! The map is keyed by anything: the API also gives the copies of one
//! keyed work claim turns, by claim id.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::OwnedMutexGuard;

/// Sweeps start at this many tickets in the map.
const FIRST_SWEEP_AT: usize = 1024;

/// The turn of one key; held while it is alive.
pub type Turn = OwnedMutexGuard<()>;

/// The keys (tickets, claims) that were asked for recently, each with its
/// queue.
#[derive(Debug)]
pub struct Turns<K> {
    queues: Mutex<Queues<K>>,
}

#[derive(Debug)]
struct Queues<K> {
    by_ticket: HashMap<K, Arc<tokio::sync::Mutex<()>>>,
    /// The next sweep: when the map reaches this size.
    sweep_at: usize,
}

impl<K: Hash + Eq> Default for Turns<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Hash + Eq> Turns<K> {
    /// An empty map.
    pub fn new() -> Self {
        Turns {
            queues: Mutex::new(Queues {
                by_ticket: HashMap::new(),
                sweep_at: FIRST_SWEEP_AT,
            }),
        }
    }

    fn queues(&self) -> MutexGuard<'_, Queues<K>> {
        // Every change to the map is a single insert or a retain: a panic
        // elsewhere cannot leave it half-updated.
        self.queues.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for `ticket`'s turn, in the order it was asked for. Dropping
    /// the future gives up the place in the queue.
    pub async fn take(&self, ticket: K) -> Turn {
        let queue = {
            let mut queues = self.queues();
            if queues.by_ticket.len() >= queues.sweep_at {
                // A queue only the map holds has no command holding or
                // waiting for it, and none can take it while the map is
                // locked. Sweeping when the map has doubled keeps the cost
                // at a constant per turn taken.
                queues.by_ticket.retain(|_, queue| Arc::strong_count(queue) > 1);
                queues.sweep_at = (queues.by_ticket.len() * 2).max(FIRST_SWEEP_AT);
            }
            Arc::clone(queues.by_ticket.entry(ticket).or_default())
        };
        queue.lock_owned().await
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.queues().by_ticket.len()
    }

    /// Commands holding or waiting for `ticket`'s turn (tests).
    #[cfg(test)]
    pub(crate) fn queued(&self, ticket: K) -> usize {
        // The map's reference, then one per holder or waiter.
        self.queues()
            .by_ticket
            .get(&ticket)
            .map_or(0, |queue| Arc::strong_count(queue) - 1)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use triage_domain::TicketId;

    use super::*;

    #[tokio::test]
    async fn one_ticket_is_one_turn_at_a_time_and_others_are_free() {
        let turns = Arc::new(Turns::new());
        let ticket = TicketId::new();
        let first = turns.take(ticket).await;
        let second = tokio::spawn({
            let turns = Arc::clone(&turns);
            async move { turns.take(ticket).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!second.is_finished(), "waits while the first holds the turn");
        // Another ticket is not held up.
        let other = tokio::time::timeout(Duration::from_secs(1), turns.take(TicketId::new())).await;
        assert!(other.is_ok());
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), second)
            .await
            .expect("the turn passes on")
            .unwrap();
    }

    #[tokio::test]
    async fn the_map_forgets_tickets_nobody_waits_for() {
        let turns = Turns::new();
        let held = TicketId::new();
        let _turn = turns.take(held).await;
        for _ in 0..10 * FIRST_SWEEP_AT {
            drop(turns.take(TicketId::new()).await);
        }
        assert!(turns.len() <= 2 * FIRST_SWEEP_AT, "{} tickets kept", turns.len());
        // The held ticket survived every sweep: a second command still
        // waits for it.
        let waiting = tokio::time::timeout(Duration::from_millis(20), turns.take(held)).await;
        assert!(waiting.is_err(), "the held turn is still held");
    }
}
