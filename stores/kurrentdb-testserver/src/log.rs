//! The in-memory transaction log behind the double, with the server's append
//! rules.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use uuid::Uuid;

/// An event as the double stores it.
#[derive(Debug)]
pub(crate) struct StoredEvent {
    pub(crate) stream: Vec<u8>,
    pub(crate) revision: u64,
    pub(crate) commit: u64,
    pub(crate) prepare: u64,
    pub(crate) id: Uuid,
    /// The `type`, `content-type` and `created` entries the client reads.
    pub(crate) metadata: HashMap<String, String>,
    pub(crate) custom_metadata: Vec<u8>,
    pub(crate) data: Vec<u8>,
}

impl StoredEvent {
    pub(crate) fn position(&self) -> (u64, u64) {
        (self.commit, self.prepare)
    }

    pub(crate) fn event_type(&self) -> &str {
        self.metadata.get("type").map_or("", String::as_str)
    }
}

/// An event proposed in an append.
#[derive(Debug)]
pub(crate) struct Proposed {
    pub(crate) id: Uuid,
    pub(crate) event_type: String,
    pub(crate) content_type: String,
    pub(crate) custom_metadata: Vec<u8>,
    pub(crate) data: Vec<u8>,
}

/// What the writer expected of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Expected {
    Any,
    NoStream,
    StreamExists,
    Exact(u64),
}

/// The answer to an append.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AppendOutcome {
    Success {
        current_revision: u64,
        position: (u64, u64),
    },
    WrongExpectedVersion {
        current: Option<u64>,
        expected: Expected,
    },
}

#[derive(Debug, Default)]
struct State {
    events: Vec<Arc<StoredEvent>>,
    /// Indexes into `events` per stream, in revision order.
    streams: HashMap<Vec<u8>, Vec<usize>>,
    /// The next free offset in the imaginary transaction file.
    next_offset: u64,
}

/// The log: every event of every stream, in commit order.
#[derive(Debug)]
pub struct Log {
    state: Mutex<State>,
    /// The number of events stored; subscriptions wait on it.
    appended: watch::Sender<usize>,
}

impl Default for Log {
    fn default() -> Self {
        Self::new()
    }
}

/// Bytes an imaginary prepare record takes before its payload; only makes
/// positions sparse, as a real transaction file's are.
const RECORD_HEADER: u64 = 64;

impl Log {
    /// An empty log.
    pub fn new() -> Self {
        Log {
            state: Mutex::new(State {
                // Position 0 is "the start"; real logs begin after a header.
                next_offset: 128,
                ..State::default()
            }),
            appended: watch::channel(0).0,
        }
    }

    /// The number of events stored.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug in this file; the
        // state is only changed after every check passed, so it stays valid.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<usize> {
        self.appended.subscribe()
    }

    /// Appends with the server's rules (see the crate docs).
    pub(crate) fn append(&self, stream: &[u8], expected: Expected, proposed: Vec<Proposed>) -> AppendOutcome {
        let mut state = self.lock();
        let indexes = state.streams.get(stream).cloned().unwrap_or_default();
        let current = indexes.len().checked_sub(1).map(|last| last as u64);
        if let Some(outcome) = idempotent_replay(&state, &indexes, expected, &proposed) {
            return outcome;
        }
        let satisfied = match expected {
            Expected::Any => true,
            Expected::NoStream => current.is_none(),
            Expected::StreamExists => current.is_some(),
            Expected::Exact(n) => current == Some(n),
        };
        if !satisfied {
            return AppendOutcome::WrongExpectedVersion { current, expected };
        }
        if proposed.is_empty() {
            // An empty append succeeds and writes nothing, as on the server.
            let position = indexes.last().map_or((0, 0), |&i| state.events[i].position());
            return AppendOutcome::Success {
                current_revision: current.unwrap_or(0),
                position,
            };
        }
        // Prepares first, then the commit record after them: every event of
        // the append shares the commit position.
        let mut prepare = state.next_offset;
        let sizes: Vec<u64> = proposed
            .iter()
            .map(|p| RECORD_HEADER + (p.data.len() + p.custom_metadata.len() + p.event_type.len()) as u64)
            .collect();
        let commit = prepare + sizes.iter().sum::<u64>();
        state.next_offset = commit + RECORD_HEADER;
        let created = ticks_now().to_string();
        let mut revision = current.map_or(0, |r| r + 1);
        let mut last_position = (commit, prepare);
        for (event, size) in proposed.into_iter().zip(sizes) {
            let metadata = HashMap::from([
                ("type".to_owned(), event.event_type),
                ("content-type".to_owned(), event.content_type),
                ("created".to_owned(), created.clone()),
            ]);
            let index = state.events.len();
            state.events.push(Arc::new(StoredEvent {
                stream: stream.to_vec(),
                revision,
                commit,
                prepare,
                id: event.id,
                metadata,
                custom_metadata: event.custom_metadata,
                data: event.data,
            }));
            state.streams.entry(stream.to_vec()).or_default().push(index);
            last_position = (commit, prepare);
            revision += 1;
            prepare += size;
        }
        let count = state.events.len();
        drop(state);
        self.appended.send_replace(count);
        AppendOutcome::Success {
            current_revision: revision - 1,
            position: last_position,
        }
    }

    /// The events of one stream, in revision order; `None` if it has none.
    pub(crate) fn stream(&self, stream: &[u8]) -> Option<Vec<Arc<StoredEvent>>> {
        let state = self.lock();
        let indexes = state.streams.get(stream)?;
        Some(indexes.iter().map(|&i| state.events[i].clone()).collect())
    }

    /// Up to `limit` events of `$all` starting at index `from`, forwards.
    pub(crate) fn page_from(&self, from: usize, limit: usize) -> Vec<Arc<StoredEvent>> {
        let state = self.lock();
        state.events.iter().skip(from).take(limit).cloned().collect()
    }

    /// Every event of `$all`, in order (reads of a test double are small).
    pub(crate) fn all(&self) -> Vec<Arc<StoredEvent>> {
        self.lock().events.clone()
    }
}

/// The idempotency check: if the first proposed id is stored in this stream
/// right after the expected revision, the append is a retry. All ids in
/// order → the original success; otherwise a conflict. With `Any` and
/// `StreamExists` the server only consults recent ids, which this double
/// models as "anywhere in the stream".
fn idempotent_replay(
    state: &State,
    indexes: &[usize],
    expected: Expected,
    proposed: &[Proposed],
) -> Option<AppendOutcome> {
    let first = proposed.first()?;
    let start = indexes.iter().position(|&i| state.events[i].id == first.id)?;
    let current = indexes.len().checked_sub(1).map(|last| last as u64);
    let right_after_expected = match expected {
        Expected::Exact(n) => n.checked_add(1) == Some(start as u64),
        Expected::NoStream => start == 0,
        Expected::Any | Expected::StreamExists => true,
    };
    let all_in_order = proposed.len() <= indexes.len() - start
        && proposed
            .iter()
            .zip(&indexes[start..])
            .all(|(p, &i)| state.events[i].id == p.id);
    if right_after_expected && all_in_order {
        let last = &state.events[indexes[start + proposed.len() - 1]];
        return Some(AppendOutcome::Success {
            current_revision: last.revision,
            position: last.position(),
        });
    }
    if matches!(expected, Expected::Any | Expected::StreamExists) {
        // The recent-ids check found no full match: the server appends.
        return None;
    }
    Some(AppendOutcome::WrongExpectedVersion { current, expected })
}

/// 100 ns ticks since the Unix epoch: the server's `created` format.
fn ticks_now() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() / 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proposed(count: usize) -> Vec<Proposed> {
        (0..count)
            .map(|_| Proposed {
                id: Uuid::new_v4(),
                event_type: "Tested".to_owned(),
                content_type: "application/json".to_owned(),
                custom_metadata: Vec::new(),
                data: b"{}".to_vec(),
            })
            .collect()
    }

    fn copy(events: &[Proposed]) -> Vec<Proposed> {
        events
            .iter()
            .map(|p| Proposed {
                id: p.id,
                event_type: p.event_type.clone(),
                content_type: p.content_type.clone(),
                custom_metadata: p.custom_metadata.clone(),
                data: p.data.clone(),
            })
            .collect()
    }

    #[test]
    fn events_of_one_append_share_the_commit_position_and_positions_increase() {
        let log = Log::new();
        log.append(b"a", Expected::NoStream, proposed(3));
        log.append(b"b", Expected::NoStream, proposed(1));
        let all = log.all();
        assert_eq!(all[0].commit, all[2].commit);
        assert!(all[0].prepare < all[1].prepare && all[1].prepare < all[2].prepare);
        assert!(all.windows(2).all(|pair| pair[0].position() < pair[1].position()));
        assert!(all[3].commit > all[2].commit);
    }

    #[test]
    fn retries_replay_and_partial_matches_conflict() {
        let log = Log::new();
        let batch = proposed(2);
        let original = log.append(b"s", Expected::NoStream, copy(&batch));
        assert_eq!(log.append(b"s", Expected::NoStream, copy(&batch)), original);
        let mut longer = copy(&batch);
        longer.extend(proposed(1));
        assert_eq!(
            log.append(b"s", Expected::NoStream, longer),
            AppendOutcome::WrongExpectedVersion {
                current: Some(1),
                expected: Expected::NoStream
            }
        );
        assert_eq!(log.len(), 2);
    }

    #[test]
    fn event_ids_may_repeat_across_streams() {
        let log = Log::new();
        let batch = proposed(1);
        log.append(b"a", Expected::NoStream, copy(&batch));
        assert!(matches!(
            log.append(b"b", Expected::NoStream, batch),
            AppendOutcome::Success {
                current_revision: 0,
                ..
            }
        ));
    }
}
