//! What the KurrentDB backend adds over the port: deadlines, namespaces, and
//! the replay flag a server cannot give directly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use triage_event_store::testing::event;
use triage_event_store::{Error, EventStore, ExpectedRevision, Position, ReadAll, ReadStream, StreamName};
use triage_kurrentdb_testserver::TestServer;
use triage_store_kurrentdb::{KurrentDbEventStore, KurrentDbOptions};

async fn server() -> TestServer {
    TestServer::start("127.0.0.1:0".parse().unwrap()).await.unwrap()
}

fn stream(name: &str) -> StreamName {
    StreamName::new(format!("{name}-{}", uuid::Uuid::new_v4().simple())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_is_a_deadline_error_naming_the_wait() {
    let server = server().await;
    let options = KurrentDbOptions {
        deadline: Duration::from_millis(300),
        ..KurrentDbOptions::default()
    };
    let store = KurrentDbEventStore::connect(&server.url(), options).unwrap();
    let s = stream("ticket");
    store
        .append(&s, ExpectedRevision::NoStream, vec![event("A")])
        .await
        .unwrap();
    server.set_append_delay(Duration::from_secs(2));
    let slow = vec![event("B")];
    let started = Instant::now();
    let error = store
        .append(&s, ExpectedRevision::Exact(0), slow.clone())
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "gave up at the deadline"
    );
    let message = error.to_string();
    assert!(message.contains("did not answer within 300ms"), "{message}");
    server.set_append_delay(Duration::ZERO);
    // Whether or not the timed-out append landed, retrying it with the same
    // ids is harmless: the stream ends up with it exactly once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let retried = store
        .append(&s, ExpectedRevision::Exact(0), slow.clone())
        .await
        .unwrap();
    assert_eq!(retried.current_revision, 1);
    let stored = store.read_stream(&s, ReadStream::forwards()).await.unwrap();
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[1].id, slow[0].id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_share_a_server_without_seeing_each_other() {
    let server = server().await;
    let in_namespace = |namespace: &str| {
        Arc::new(
            KurrentDbEventStore::connect(
                &format!("{}&namespace={namespace}", server.url()),
                KurrentDbOptions::default(),
            )
            .unwrap(),
        )
    };
    let blue = in_namespace("blue");
    let green = in_namespace("green");
    let s = stream("ticket");
    blue.append(&s, ExpectedRevision::NoStream, vec![event("A"), event("B")])
        .await
        .unwrap();
    // The same stream name in another namespace is another stream.
    green
        .append(&s, ExpectedRevision::NoStream, vec![event("C")])
        .await
        .unwrap();
    assert_eq!(blue.read_stream(&s, ReadStream::forwards()).await.unwrap().len(), 2);
    assert_eq!(green.read_stream(&s, ReadStream::forwards()).await.unwrap().len(), 1);
    let blue_log = blue.read_all(ReadAll::forwards(100)).await.unwrap();
    assert_eq!(blue_log.len(), 2);
    assert!(
        blue_log.iter().all(|e| e.stream == s),
        "names come back without the namespace"
    );
    assert_eq!(
        green.head_position().await.unwrap(),
        Some(green.read_all(ReadAll::forwards(10)).await.unwrap()[0].position)
    );
    assert_eq!(server.log().len(), 3, "all three events are on the one server");
    assert!(blue.describe().contains("namespace blue"), "{}", blue.describe());
    let invalid = KurrentDbEventStore::connect(&format!("{}&namespace=a.b", server.url()), KurrentDbOptions::default());
    assert!(matches!(invalid, Err(Error::Incompatible(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_reports_a_replay_only_when_what_is_stored_is_not_what_it_sent() {
    let server = server().await;
    let store = KurrentDbEventStore::connect(&server.url(), KurrentDbOptions::default()).unwrap();
    let s = stream("ticket");
    let mine = vec![event("A")];
    let first = store
        .append(&s, ExpectedRevision::NoStream, mine.clone())
        .await
        .unwrap();
    assert!(!first.replayed);
    // Another copy of the same command (same ids) decided at another moment.
    let mut other_copy = mine.clone();
    other_copy[0].metadata = br#"{"decided":"later"}"#.to_vec();
    let second = store.append(&s, ExpectedRevision::NoStream, other_copy).await.unwrap();
    assert!(second.replayed, "the stored events are the first copy's");
    assert_eq!(
        (second.current_revision, second.position),
        (first.current_revision, first.position)
    );
    assert_eq!(server.log().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_connection_strings_are_refused_up_front() {
    for url in ["esdb://", "esdb://host:notaport", "esdb://h:2113?tls=maybe"] {
        match KurrentDbEventStore::connect(url, KurrentDbOptions::default()) {
            Err(Error::Incompatible(message)) => {
                assert!(message.contains("not a KurrentDB connection string"), "{message}")
            }
            other => panic!("{url}: expected a clear refusal, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_streams_on_the_server_are_not_part_of_the_store() {
    let server = server().await;
    let store = KurrentDbEventStore::connect(&server.url(), KurrentDbOptions::default()).unwrap();
    // What a real server writes on its own: `$`-streams between ours.
    let raw = kurrentdb::Client::new(server.url().parse().unwrap()).unwrap();
    let system_events = |count: usize| {
        (0..count)
            .map(|_| kurrentdb::EventData::binary("$statsCollected", vec![1].into()).id(uuid::Uuid::new_v4()))
            .collect::<Vec<_>>()
    };
    let any = kurrentdb::AppendToStreamOptions::default();
    let s = stream("ticket");
    store
        .append(&s, ExpectedRevision::NoStream, vec![event("A")])
        .await
        .unwrap();
    raw.append_to_stream("$stats-node", &any, system_events(5))
        .await
        .unwrap();
    store
        .append(&s, ExpectedRevision::Exact(0), vec![event("B")])
        .await
        .unwrap();
    raw.append_to_stream("$stats-node", &any, system_events(5))
        .await
        .unwrap();

    let ours = store.read_all(ReadAll::forwards(100)).await.unwrap();
    assert_eq!(ours.iter().map(|e| e.revision).collect::<Vec<_>>(), [0, 1]);
    // Pages of one event step over the system events in both directions.
    let one = store
        .read_all(ReadAll::forwards(1).from_position(ours[0].position))
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    let second = store
        .read_all(ReadAll::forwards(1).from_position(Position {
            commit: ours[0].position.commit,
            prepare: ours[0].position.prepare + 1,
        }))
        .await
        .unwrap();
    assert_eq!(second.iter().map(|e| e.revision).collect::<Vec<_>>(), [1]);
    let backwards = store.read_all(ReadAll::backwards(10)).await.unwrap();
    assert_eq!(backwards.iter().map(|e| e.revision).collect::<Vec<_>>(), [1, 0]);
    // The head is our last event, not the server's last system event.
    assert_eq!(store.head_position().await.unwrap(), Some(ours[1].position));
    assert_eq!(server.log().len(), 12);
}

/// A URL naming one node that turns out to be a follower: the client
/// follows the "not leader" answer to the leader it names, and the store
/// must let it, not start over from the follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sends_the_store_to_its_leader() {
    let leader = server().await;
    let follower = server().await;
    follower.set_leader(Some(leader.address()));
    let store = KurrentDbEventStore::connect(&follower.url(), KurrentDbOptions::default()).unwrap();
    let s = stream("ticket");
    let first = store
        .append(&s, ExpectedRevision::NoStream, vec![event("A")])
        .await
        .expect("the append reaches the leader");
    assert_eq!(first.current_revision, 0);
    store
        .append(&s, ExpectedRevision::Exact(0), vec![event("B")])
        .await
        .expect("later calls go to the leader too");
    assert_eq!(store.read_stream(&s, ReadStream::forwards()).await.unwrap().len(), 2);
    assert_eq!(leader.log().len(), 2, "the leader holds the events");
    assert!(follower.log().is_empty(), "the follower wrote nothing");
}

/// Another application's stream, named as no Triage stream can be, shares
/// `$all` without a namespace: readers pass over its events instead of
/// failing at them for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_a_stream_triage_cannot_name_are_passed_over() {
    let server = server().await;
    let store = KurrentDbEventStore::connect(&server.url(), KurrentDbOptions::default()).unwrap();
    let before = stream("ticket");
    store
        .append(&before, ExpectedRevision::NoStream, vec![event("Before")])
        .await
        .unwrap();
    let settings: kurrentdb::ClientSettings = server.url().parse().unwrap();
    let other_app = kurrentdb::Client::new(settings).unwrap();
    let foreign = "x".repeat(300);
    other_app
        .append_to_stream(
            foreign.as_str(),
            &kurrentdb::AppendToStreamOptions::default(),
            kurrentdb::EventData::binary("Foreign", vec![1, 2, 3].into()),
        )
        .await
        .unwrap();
    let after = stream("ticket");
    store
        .append(&after, ExpectedRevision::NoStream, vec![event("After")])
        .await
        .unwrap();
    let all = store
        .read_all(ReadAll::forwards(100))
        .await
        .expect("$all reads past the foreign event");
    let types: Vec<&str> = all.iter().map(|event| event.event_type.as_str()).collect();
    assert_eq!(types, ["Before", "After"]);
    assert_eq!(server.log().len(), 3, "the foreign event is in the log");
}

/// A stretch of system events (links a server projection writes) between
/// two events costs a reader of the next event a page or two, not a round
/// trip per event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_past_system_events_takes_pages_not_one_request_each() {
    let server = server().await;
    let store = KurrentDbEventStore::connect(&server.url(), KurrentDbOptions::default()).unwrap();
    let first = stream("ticket");
    store
        .append(&first, ExpectedRevision::NoStream, vec![event("First")])
        .await
        .unwrap();
    let settings: kurrentdb::ClientSettings = server.url().parse().unwrap();
    let projection = kurrentdb::Client::new(settings).unwrap();
    let links: Vec<_> = (0..300)
        .map(|index| kurrentdb::EventData::binary("$>", format!("{index}@ticket").into_bytes().into()))
        .collect();
    projection
        .append_to_stream("$ce-ticket", &kurrentdb::AppendToStreamOptions::default(), links)
        .await
        .unwrap();
    let second = stream("ticket");
    store
        .append(&second, ExpectedRevision::NoStream, vec![event("Second")])
        .await
        .unwrap();
    let head = store.read_all(ReadAll::forwards(1)).await.unwrap();
    assert_eq!(head[0].event_type, "First");
    let reads = server.reads();
    let next = store
        .read_all(ReadAll::forwards(1).from_position(head[0].position))
        .await
        .unwrap();
    let next: Vec<&str> = next.iter().map(|event| event.event_type.as_str()).collect();
    // From the first event, inclusive: the first, then (past the links)
    // nothing more fits in a page of one.
    assert_eq!(next, ["First"]);
    let after_first = store
        .read_all(ReadAll::forwards(2).from_position(head[0].position))
        .await
        .unwrap();
    let types: Vec<&str> = after_first.iter().map(|event| event.event_type.as_str()).collect();
    assert_eq!(types, ["First", "Second"]);
    let used = server.reads() - reads;
    assert!(
        used <= 4,
        "{used} read requests for two short reads past 300 system events"
    );
}
