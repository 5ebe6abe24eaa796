//! The append rules every backend shares: expected revision and idempotent
//! retries, written once so that backends cannot drift apart.

use uuid::Uuid;

use crate::{AppendResult, Error, EventData, ExpectedRevision, Position, StreamName};

/// Where an already-stored event id lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEventRef {
    /// The stream holding it.
    pub stream: StreamName,
    /// Its revision there.
    pub revision: u64,
    /// Its global position.
    pub position: Position,
}

/// What an append must do, decided before any write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendPlan {
    /// Write the events at revisions `first_revision..`.
    Write {
        /// The revision the first new event gets.
        first_revision: u64,
    },
    /// The same events are already stored right after the expected revision:
    /// answer with the original result and write nothing.
    AlreadyAppended(AppendResult),
}

/// Decides an append from the stream's current last revision and a lookup of
/// stored event ids.
///
/// EventStoreDB's rules: if the append's event ids are already stored, in
/// order, in this stream, starting right after the expected revision, the
/// append succeeds again with the original result. If only some of them are,
/// or they sit elsewhere, it is a [`Error::WrongExpectedVersion`]. With `Any`
/// and `StreamExists` the ids only need to be stored in order.
///
/// `lookup` is called for the first id and, when it is stored, for the rest.
/// Backends must still enforce unique event ids on insert: an append whose
/// first id is new but a later id is stored fails there, and must report
/// [`Error::WrongExpectedVersion`] too.
pub fn plan_append(
    stream: &StreamName,
    expected: ExpectedRevision,
    current: Option<u64>,
    events: &[EventData],
    mut lookup: impl FnMut(Uuid) -> Result<Option<StoredEventRef>, Error>,
) -> Result<AppendPlan, Error> {
    let conflict = || Error::WrongExpectedVersion {
        stream: stream.clone(),
        expected,
        actual: current,
    };
    let Some(first) = events.first() else {
        return Err(Error::EmptyAppend { stream: stream.clone() });
    };
    if let Some(stored_first) = lookup(first.id)? {
        if &stored_first.stream != stream {
            return Err(conflict());
        }
        let starts_right_after_expected = match expected {
            // Checked: `Exact(u64::MAX)` names a revision no stream reaches,
            // and must be a conflict, not an overflow.
            ExpectedRevision::Exact(n) => n.checked_add(1) == Some(stored_first.revision),
            ExpectedRevision::NoStream => stored_first.revision == 0,
            ExpectedRevision::Any | ExpectedRevision::StreamExists => true,
        };
        if !starts_right_after_expected {
            return Err(conflict());
        }
        let mut last = stored_first;
        for event in &events[1..] {
            match lookup(event.id)? {
                Some(stored) if &stored.stream == stream && last.revision.checked_add(1) == Some(stored.revision) => {
                    last = stored;
                }
                _ => return Err(conflict()),
            }
        }
        return Ok(AppendPlan::AlreadyAppended(AppendResult {
            current_revision: last.revision,
            position: last.position,
            replayed: true,
        }));
    }
    if !expected.is_satisfied_by(current) {
        return Err(conflict());
    }
    Ok(AppendPlan::Write {
        first_revision: current.map_or(0, |revision| revision + 1),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn stream() -> StreamName {
        StreamName::new("ticket-1").unwrap()
    }

    fn event(id: u128) -> EventData {
        EventData {
            id: Uuid::from_u128(id),
            event_type: "E".into(),
            data: vec![],
            metadata: vec![],
        }
    }

    fn stored(entries: &[(u128, u64)]) -> HashMap<Uuid, StoredEventRef> {
        entries
            .iter()
            .map(|&(id, revision)| {
                (
                    Uuid::from_u128(id),
                    StoredEventRef {
                        stream: stream(),
                        revision,
                        position: Position::from_sequence(revision + 100),
                    },
                )
            })
            .collect()
    }

    fn plan(
        expected: ExpectedRevision,
        current: Option<u64>,
        ids: &[u128],
        existing: &HashMap<Uuid, StoredEventRef>,
    ) -> Result<AppendPlan, Error> {
        let events: Vec<_> = ids.iter().map(|&id| event(id)).collect();
        plan_append(&stream(), expected, current, &events, |id| {
            Ok(existing.get(&id).cloned())
        })
    }

    #[test]
    fn new_events_are_written_after_the_current_revision() {
        let none = HashMap::new();
        assert_eq!(
            plan(ExpectedRevision::NoStream, None, &[1], &none).unwrap(),
            AppendPlan::Write { first_revision: 0 }
        );
        assert_eq!(
            plan(ExpectedRevision::Exact(4), Some(4), &[1], &none).unwrap(),
            AppendPlan::Write { first_revision: 5 }
        );
        let err = plan(ExpectedRevision::Exact(3), Some(4), &[1], &none).unwrap_err();
        assert!(matches!(err, Error::WrongExpectedVersion { actual: Some(4), .. }));
    }

    #[test]
    fn a_full_match_right_after_expected_returns_the_original_result() {
        let existing = stored(&[(1, 3), (2, 4)]);
        assert_eq!(
            plan(ExpectedRevision::Exact(2), Some(7), &[1, 2], &existing).unwrap(),
            AppendPlan::AlreadyAppended(AppendResult {
                current_revision: 4,
                position: Position::from_sequence(104),
                replayed: true,
            })
        );
    }

    #[test]
    fn partial_or_misplaced_matches_conflict() {
        let existing = stored(&[(1, 3), (2, 4)]);
        // Only the first of three is stored.
        assert!(
            plan(ExpectedRevision::Exact(2), Some(4), &[1, 2, 3], &existing)
                .unwrap_err()
                .is_wrong_expected_version()
        );
        // Stored, but not right after the expected revision.
        assert!(
            plan(ExpectedRevision::Exact(1), Some(4), &[1, 2], &existing)
                .unwrap_err()
                .is_wrong_expected_version()
        );
        // Stored out of order.
        assert!(
            plan(ExpectedRevision::Any, Some(4), &[2, 1], &existing)
                .unwrap_err()
                .is_wrong_expected_version()
        );
    }

    #[test]
    fn a_stored_id_under_the_largest_expected_revision_conflicts() {
        // No stream reaches revision u64::MAX, so nothing can be stored right
        // after it; the check must not overflow on the way to saying so.
        let existing = stored(&[(1, 0)]);
        let err = plan(ExpectedRevision::Exact(u64::MAX), Some(0), &[1], &existing).unwrap_err();
        assert!(err.is_wrong_expected_version(), "{err:?}");
    }
}
