//! A connection that stops answering without closing (a network black hole,
//! a hung proxy) costs its callers the query timeout, not hours: the append
//! fails saying its outcome is unknown, the store closes the connection,
//! and once the network is back it appends again with nothing lost or
//! written twice.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_postgres::config::Host;
use triage_event_store::{Error, EventStore, ExpectedRevision, ReadStream, StreamName};
use triage_store_postgres::PostgresOptions;

/// Forwards bytes until the proxy is frozen; then swallows them, keeping
/// both sockets open, as a black hole does.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, frozen: watch::Receiver<bool>) {
    let mut buffer = vec![0_u8; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if *frozen.borrow() {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// A TCP proxy to `server`; returns its port and the switch that freezes it.
async fn proxy(server: String) -> (u16, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (freeze, frozen) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            let (client, _) = listener.accept().await.unwrap();
            let Ok(server) = TcpStream::connect(&server).await else {
                continue;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(pump(client_read, server_write, frozen.clone()));
            tokio::spawn(pump(server_read, client_write, frozen.clone()));
        }
    });
    (port, freeze)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_append_over_a_silent_connection_fails_in_time_and_the_store_recovers() {
    let test = "an_append_over_a_silent_connection_fails_in_time_and_the_store_recovers";
    let Some(url) = common::url(test) else {
        return;
    };
    let config: tokio_postgres::Config = url.parse().unwrap();
    let (Some(Host::Tcp(host)), Some(port)) = (config.get_hosts().first(), config.get_ports().first()) else {
        eprintln!("skipped: {test} (TRIAGE_PG_URL is not a TCP address)");
        return;
    };
    let (proxy_port, freeze) = proxy(format!("{host}:{port}")).await;
    let password = config
        .get_password()
        .map(|password| format!(":{}", String::from_utf8_lossy(password)))
        .unwrap_or_default();
    let proxied = format!(
        "postgres://{}{password}@127.0.0.1:{proxy_port}/{}",
        config.get_user().unwrap_or("postgres"),
        config.get_dbname().unwrap_or("postgres")
    );
    let options = PostgresOptions {
        query_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        ..PostgresOptions::default()
    };
    let store = Arc::new(common::temporary_store(&proxied, options).await);
    let ticket = StreamName::new("ticket-silent").unwrap();
    store
        .append(&ticket, ExpectedRevision::NoStream, vec![common::event("Opened")])
        .await
        .unwrap();

    freeze.send_replace(true);
    let started = Instant::now();
    let lost = tokio::time::timeout(
        Duration::from_secs(20),
        store.append(&ticket, ExpectedRevision::Exact(0), vec![common::event("Lost")]),
    )
    .await
    .expect("the append returned instead of waiting for the silent connection");
    match &lost {
        // The batch got no answer, and the try alone found no connection
        // (or none that answered): the server may have the append.
        Err(Error::Backend { message, .. }) => {
            assert!(message.contains("whether it was stored is unknown"), "{message}")
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
    eprintln!("the append failed after {:?}: {lost:?}", started.elapsed());
    let read = tokio::time::timeout(
        Duration::from_secs(20),
        store.read_stream(&ticket, ReadStream::forwards()),
    )
    .await
    .expect("the read returned instead of waiting for the silent connection");
    assert!(matches!(read, Err(Error::Backend { .. })), "{read:?}");

    freeze.send_replace(false);
    let again = store
        .append(&ticket, ExpectedRevision::Exact(0), vec![common::event("Again")])
        .await
        .expect("the store appends once the network is back");
    assert_eq!(again.current_revision, 1);
    let stored: Vec<String> = store
        .read_stream(&ticket, ReadStream::forwards())
        .await
        .unwrap()
        .into_iter()
        .map(|event| event.event_type)
        .collect();
    // The proxy swallowed the lost append before the server saw it.
    assert_eq!(stored, ["Opened", "Again"]);
}

/// An append that never got a connection (the only one is busy past the
/// connect timeout) was not sent: its error must not say it may be stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_append_that_got_no_connection_is_not_reported_as_maybe_stored() {
    let Some(url) = common::url("an_append_that_got_no_connection_is_not_reported_as_maybe_stored") else {
        return;
    };
    let options = PostgresOptions {
        pool_size: 1,
        connect_timeout: Duration::from_secs(1),
        ..PostgresOptions::default()
    };
    let store = Arc::new(common::temporary_store(&url, options).await);
    let schema = store.schema().to_owned();
    let hot = StreamName::new("ticket-hot").unwrap();
    store
        .append(&hot, ExpectedRevision::NoStream, vec![common::event("First")])
        .await
        .unwrap();
    // Another session holds the stream's lock: the store's one connection
    // waits behind it with an append to that stream.
    let held = common::event("Held");
    let locker = common::hold_stream_lock(&url, &schema, hot.as_str(), &held).await;
    let waiting = tokio::spawn({
        let store = Arc::clone(&store);
        let hot = hot.clone();
        async move {
            store
                .append(&hot, ExpectedRevision::Any, vec![common::event("Waiting")])
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = StreamName::new("ticket-other").unwrap();
    let refused = store
        .append(&other, ExpectedRevision::NoStream, vec![common::event("NoConnection")])
        .await;
    match &refused {
        Err(Error::Backend { message, .. }) => {
            assert!(message.contains("getting a connection"), "{message}");
            assert!(!message.contains("unknown"), "{message}");
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
    locker.batch_execute("ROLLBACK").await.unwrap();
    waiting
        .await
        .unwrap()
        .expect("the waiting append lands once the lock is free");
    assert!(matches!(
        store
            .read_stream(&other, triage_event_store::ReadStream::forwards())
            .await,
        Err(Error::StreamNotFound { .. })
    ));
}
