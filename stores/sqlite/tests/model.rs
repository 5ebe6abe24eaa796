//! Property test: random operation sequences give the same answers and the
//! same final contents on the SQLite store as on the in-memory reference
//! store.
//!
//! Operations come in bursts. The in-memory store applies them one by one;
//! the SQLite store gets a whole burst at once, each append sent to the
//! writer in order before any is awaited, so bursts land in group-commit
//! batches. Batches must still answer exactly as the sequential model does:
//! each append sees the ones before it, and one failing append changes
//! nothing for the others.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use proptest::prelude::*;
use triage_event_store::{
    AppendResult, Error, EventData, EventStore, ExpectedRevision, InMemoryEventStore, ReadAll, ReadStream, Result,
    StreamName,
};
use triage_store_sqlite::{SqliteEventStore, SqliteOptions};
use uuid::Uuid;

const STREAMS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    /// Fresh events.
    Append {
        stream: usize,
        expected: ExpectedRevision,
        count: usize,
    },
    /// The events of an earlier operation again, to its stream, with its
    /// expected revision or another one.
    Retry {
        of: usize,
        expected: Option<ExpectedRevision>,
    },
    /// An earlier operation's events followed by fresh ones: a partial match.
    Extend { of: usize, count: usize },
    /// A fresh event followed by an earlier operation's events, maybe to
    /// another stream: the first id is new, a later one may be stored.
    Shifted {
        of: usize,
        stream: usize,
        expected: ExpectedRevision,
    },
}

/// An operation with its events made concrete, the same for both stores.
#[derive(Clone, Debug)]
struct Append {
    stream: StreamName,
    expected: ExpectedRevision,
    events: Vec<EventData>,
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Ok(AppendResult),
    Conflict {
        expected: ExpectedRevision,
        actual: Option<u64>,
    },
    Other(String),
}

impl From<Result<AppendResult>> for Outcome {
    fn from(result: Result<AppendResult>) -> Self {
        match result {
            Ok(result) => Outcome::Ok(result),
            Err(Error::WrongExpectedVersion { expected, actual, .. }) => Outcome::Conflict { expected, actual },
            Err(other) => Outcome::Other(format!("{other:?}")),
        }
    }
}

fn expected_revision() -> impl Strategy<Value = ExpectedRevision> {
    prop_oneof![
        Just(ExpectedRevision::Any),
        Just(ExpectedRevision::NoStream),
        Just(ExpectedRevision::StreamExists),
        (0u64..6).prop_map(ExpectedRevision::Exact),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..STREAMS, expected_revision(), 1usize..4)
            .prop_map(|(stream, expected, count)| Op::Append { stream, expected, count }),
        2 => (any::<usize>(), proptest::option::of(expected_revision()))
            .prop_map(|(of, expected)| Op::Retry { of, expected }),
        1 => (any::<usize>(), 1usize..3).prop_map(|(of, count)| Op::Extend { of, count }),
        1 => (any::<usize>(), 0..STREAMS, expected_revision())
            .prop_map(|(of, stream, expected)| Op::Shifted { of, stream, expected }),
    ]
}

fn bursts() -> impl Strategy<Value = Vec<Vec<Op>>> {
    prop::collection::vec(prop::collection::vec(op(), 1..8), 1..6)
}

fn stream_name(index: usize) -> StreamName {
    StreamName::new(format!("ticket-{index}")).unwrap()
}

/// Gives every operation concrete, deterministic events.
fn resolve(bursts: &[Vec<Op>]) -> Vec<Vec<Append>> {
    let mut next_id = 0u128;
    let mut fresh = |count: usize| -> Vec<EventData> {
        (0..count)
            .map(|_| {
                next_id += 1;
                EventData {
                    id: Uuid::from_u128(next_id),
                    event_type: format!("Type{}", next_id % 3),
                    data: next_id.to_be_bytes().to_vec(),
                    metadata: vec![next_id as u8],
                }
            })
            .collect()
    };
    let mut done: Vec<Append> = Vec::new();
    let mut resolved = Vec::new();
    for burst in bursts {
        let mut out = Vec::new();
        for op in burst {
            let earlier = |of: usize| (!done.is_empty()).then(|| done[of % done.len()].clone());
            let append = match op.clone() {
                Op::Append {
                    stream,
                    expected,
                    count,
                } => Append {
                    stream: stream_name(stream),
                    expected,
                    events: fresh(count),
                },
                Op::Retry { of, expected } => match earlier(of) {
                    Some(previous) => Append {
                        expected: expected.unwrap_or(previous.expected),
                        ..previous
                    },
                    None => Append {
                        stream: stream_name(0),
                        expected: ExpectedRevision::Any,
                        events: fresh(1),
                    },
                },
                Op::Extend { of, count } => match earlier(of) {
                    Some(mut previous) => {
                        previous.events.extend(fresh(count));
                        previous
                    }
                    None => Append {
                        stream: stream_name(1),
                        expected: ExpectedRevision::NoStream,
                        events: fresh(count),
                    },
                },
                Op::Shifted { of, stream, expected } => {
                    let mut events = fresh(1);
                    if let Some(previous) = earlier(of) {
                        events.extend(previous.events);
                    }
                    Append {
                        stream: stream_name(stream),
                        expected,
                        events,
                    }
                }
            };
            done.push(append.clone());
            out.push(append);
        }
        resolved.push(out);
    }
    resolved
}

type AppendFuture<'a> = Pin<Box<dyn Future<Output = Result<AppendResult>> + Send + 'a>>;

/// Submits a burst: polls every append once, in order (each sends its
/// request to the writer on that first poll), then awaits them all.
async fn submit_burst(store: &dyn EventStore, burst: &[Append]) -> Vec<Outcome> {
    let mut futures: Vec<AppendFuture<'_>> = burst
        .iter()
        .map(|append| store.append(&append.stream, append.expected, append.events.clone()))
        .collect();
    let mut early: Vec<Option<Result<AppendResult>>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (future, slot) in futures.iter_mut().zip(early.iter_mut()) {
            if let Poll::Ready(result) = future.as_mut().poll(cx) {
                *slot = Some(result);
            }
        }
        Poll::Ready(())
    })
    .await;
    let mut outcomes = Vec::with_capacity(burst.len());
    for (future, slot) in futures.into_iter().zip(early) {
        let result = match slot {
            Some(result) => result,
            None => future.await,
        };
        outcomes.push(Outcome::from(result));
    }
    outcomes
}

type Row = (StreamName, u64, u64, Uuid, String, Vec<u8>, Vec<u8>);

async fn contents(store: &dyn EventStore) -> (Vec<Row>, Vec<Option<Vec<Row>>>) {
    let to_rows = |events: Vec<triage_event_store::RecordedEvent>| -> Vec<Row> {
        events
            .into_iter()
            .map(|e| {
                (
                    e.stream,
                    e.revision,
                    e.position.commit,
                    e.id,
                    e.event_type,
                    e.data,
                    e.metadata,
                )
            })
            .collect()
    };
    let log = to_rows(store.read_all(ReadAll::forwards(10_000)).await.unwrap());
    let mut streams = Vec::new();
    for index in 0..STREAMS {
        let stream = match store.read_stream(&stream_name(index), ReadStream::forwards()).await {
            Ok(events) => Some(to_rows(events)),
            Err(Error::StreamNotFound { .. }) => None,
            Err(other) => panic!("reading stream {index} failed: {other}"),
        };
        streams.push(stream);
    }
    (log, streams)
}

fn check(bursts: Vec<Vec<Op>>, group_commit: bool) -> std::result::Result<(), TestCaseError> {
    let resolved = resolve(&bursts);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let model = Arc::new(InMemoryEventStore::new());
        let options = SqliteOptions {
            group_commit,
            ..SqliteOptions::default()
        };
        let sqlite = Arc::new(SqliteEventStore::open_temporary_with(options).unwrap());
        for burst in &resolved {
            let mut expected = Vec::new();
            for append in burst {
                let result = model
                    .append(&append.stream, append.expected, append.events.clone())
                    .await;
                expected.push(Outcome::from(result));
            }
            let actual = submit_burst(sqlite.as_ref(), burst).await;
            prop_assert_eq!(actual, expected, "answers to burst {:?}", burst);
        }
        prop_assert_eq!(contents(sqlite.as_ref()).await, contents(model.as_ref()).await);
        prop_assert_eq!(
            sqlite.head_position().await.unwrap(),
            model.head_position().await.unwrap()
        );
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn group_commit_matches_the_in_memory_model(bursts in bursts()) {
        check(bursts, true)?;
    }

    #[test]
    fn single_commit_matches_the_in_memory_model(bursts in bursts()) {
        check(bursts, false)?;
    }
}
