//! The double through the real `kurrentdb` client, with no Triage code in
//! between: the answers have the shapes the client expects of a server.

use std::time::Duration;

use kurrentdb::{
    AppendToStreamOptions, Client, CurrentRevision, DeleteStreamOptions, EventData, ReadStreamOptions, StreamPosition,
    StreamState, SubscribeToAllOptions, SubscriptionEvent, SubscriptionFilter,
};
use triage_kurrentdb_testserver::TestServer;

async fn start() -> (TestServer, Client) {
    let server = TestServer::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let client = Client::new(server.url().parse().unwrap()).unwrap();
    (server, client)
}

fn events(count: usize) -> Vec<EventData> {
    (0..count)
        .map(|i| {
            EventData::json("Tested", &serde_json::json!({ "i": i }))
                .unwrap()
                .id(uuid::Uuid::new_v4())
        })
        .collect()
}

#[tokio::test]
async fn appends_answer_success_or_wrong_expected_version() {
    let (_server, client) = start().await;
    let options = AppendToStreamOptions::default().stream_state(StreamState::NoStream);
    let written = client.append_to_stream("ticket-1", &options, events(3)).await.unwrap();
    assert_eq!(written.next_expected_version, 2);
    let stale = AppendToStreamOptions::default().stream_state(StreamState::StreamRevision(0));
    match client.append_to_stream("ticket-1", &stale, events(1)).await {
        Err(kurrentdb::Error::WrongExpectedVersion { expected, current }) => {
            assert_eq!(expected, StreamState::StreamRevision(0));
            assert_eq!(current, CurrentRevision::Current(2));
        }
        other => panic!("expected WrongExpectedVersion, got {other:?}"),
    }
    let exists = AppendToStreamOptions::default().stream_state(StreamState::StreamExists);
    match client.append_to_stream("ticket-2", &exists, events(1)).await {
        Err(kurrentdb::Error::WrongExpectedVersion { current, .. }) => assert_eq!(current, CurrentRevision::NoStream),
        other => panic!("expected WrongExpectedVersion, got {other:?}"),
    }
}

#[tokio::test]
async fn a_missing_stream_is_not_found_on_the_first_read() {
    let (_server, client) = start().await;
    let mut read = client
        .read_stream("ticket-missing", &ReadStreamOptions::default())
        .await
        .expect("the read starts");
    assert!(matches!(read.next().await, Err(kurrentdb::Error::ResourceNotFound)));
}

#[tokio::test]
async fn an_oversized_append_is_refused_and_writes_nothing() {
    let (server, client) = start().await;
    let big = EventData::binary("Big", vec![b'x'; 700 * 1024].into()).id(uuid::Uuid::new_v4());
    let bigger = EventData::binary("Big", vec![b'y'; 700 * 1024].into()).id(uuid::Uuid::new_v4());
    let result = client
        .append_to_stream("ticket-big", &AppendToStreamOptions::default(), vec![big, bigger])
        .await;
    match result {
        Err(kurrentdb::Error::Grpc { code, message }) => {
            assert_eq!(code, tonic::Code::InvalidArgument);
            assert!(message.contains("Maximum Append Size"), "{message}");
        }
        other => panic!("expected an invalid-argument refusal, got {other:?}"),
    }
    assert!(server.log().is_empty());
}

#[tokio::test]
async fn filtered_subscriptions_confirm_checkpoint_and_catch_up() {
    let (_server, client) = start().await;
    let any = AppendToStreamOptions::default();
    client.append_to_stream("ticket-a", &any, events(2)).await.unwrap();
    client.append_to_stream("noise-a", &any, events(10)).await.unwrap();
    let filter = SubscriptionFilter::on_stream_name().add_prefix("ticket-").max(4);
    let mut subscription = client
        .subscribe_to_all(&SubscribeToAllOptions::default().filter(filter))
        .await;
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(5), subscription.next_subscription_event())
            .await
            .expect("the subscription answers")
            .expect("no error");
        match event {
            SubscriptionEvent::Confirmed(_) => seen.push("confirmed".to_owned()),
            SubscriptionEvent::EventAppeared(event) => seen.push(event.get_original_event().stream_id().to_owned()),
            SubscriptionEvent::Checkpoint(_) => seen.push("checkpoint".to_owned()),
            SubscriptionEvent::CaughtUp(_) => {
                seen.push("caught up".to_owned());
                break;
            }
            _ => {}
        }
    }
    // 12 considered events with a window of 4: three checkpoints, then one
    // when going live, then CaughtUp.
    assert_eq!(
        seen,
        [
            "confirmed",
            "ticket-a",
            "ticket-a",
            "checkpoint",
            "checkpoint",
            "checkpoint",
            "checkpoint",
            "caught up"
        ]
    );
    // Live: a new matching event arrives.
    client.append_to_stream("ticket-b", &any, events(1)).await.unwrap();
    let live = loop {
        match subscription.next_subscription_event().await.unwrap() {
            SubscriptionEvent::EventAppeared(event) => break event,
            _ => continue,
        }
    };
    assert_eq!(live.get_original_event().stream_id(), "ticket-b");
}

#[tokio::test]
async fn what_the_double_does_not_implement_says_so() {
    let (_server, client) = start().await;
    let deleted = client.delete_stream("ticket-1", &DeleteStreamOptions::default()).await;
    assert!(
        matches!(deleted, Err(kurrentdb::Error::UnsupportedFeature)),
        "{deleted:?}"
    );
    let options = ReadStreamOptions::default().position(StreamPosition::Start);
    let mut read = client.read_stream("ticket-1", &options).await.unwrap();
    assert!(matches!(read.next().await, Err(kurrentdb::Error::ResourceNotFound)));
}

#[tokio::test]
async fn a_restarted_server_keeps_its_events() {
    let (server, client) = start().await;
    client
        .append_to_stream("ticket-1", &AppendToStreamOptions::default(), events(2))
        .await
        .unwrap();
    let address = server.address();
    let log = server.stop().await;
    let restarted = TestServer::restart(address, log).await.unwrap();
    let fresh = Client::new(restarted.url().parse().unwrap()).unwrap();
    let mut read = fresh
        .read_stream("ticket-1", &ReadStreamOptions::default())
        .await
        .unwrap();
    let mut count = 0;
    while read.next().await.unwrap().is_some() {
        count += 1;
    }
    assert_eq!(count, 2);
}
