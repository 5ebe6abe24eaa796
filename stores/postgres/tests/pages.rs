//! Long pages of `$all` far behind the head are read as two halves at
//! once, on two connections. They must answer exactly what one read of the
//! page answers, also where the log's positions have a gap, and pages that
//! reach the head or hold a gap must be read in one query.

mod common;

use triage_event_store::{EventStore, ExpectedRevision, Position, ReadAll, RecordedEvent, StreamName};
use triage_store_postgres::{PostgresEventStore, PostgresOptions};
use uuid::Uuid;

async fn append_events(store: &PostgresEventStore, streams: usize, appends: usize, events_per_append: usize) {
    for _ in 0..streams {
        let stream = StreamName::new(format!("pages-{}", Uuid::new_v4().simple())).unwrap();
        for _ in 0..appends {
            let events = (0..events_per_append).map(|_| common::event("Paged")).collect();
            store.append(&stream, ExpectedRevision::Any, events).await.unwrap();
        }
    }
}

async fn page(store: &PostgresEventStore, from: u64, max_count: usize) -> Vec<RecordedEvent> {
    store
        .read_all(ReadAll::forwards(max_count).from_position(Position::from_sequence(from)))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_pages_read_in_halves_answer_as_one_read_does() {
    let Some(url) = common::url("long_pages_read_in_halves_answer_as_one_read_does") else {
        return;
    };
    let store = common::temporary_store(&url, PostgresOptions::default()).await;
    // Positions 1..=3000, then five taken by a transaction that rolls back,
    // then 3006..=4505.
    append_events(&store, 20, 3, 50).await;
    let raw = common::raw_client(&url).await;
    raw.batch_execute(&format!(
        r#"BEGIN;
           INSERT INTO "{schema}".triage_events (tx_id, stream, revision, event_id, event_type, data, metadata)
           SELECT pg_current_xact_id(), 'rolled-back-' || g, 0, gen_random_uuid(), 'Gone', '\x00', '\x00'
           FROM generate_series(1, 5) g;
           ROLLBACK;"#,
        schema = store.schema()
    ))
    .await
    .unwrap();
    append_events(&store, 10, 3, 50).await;
    let all = page(&store, 1, 10_000).await;
    assert_eq!(all.len(), 4500);
    assert_eq!(all[2999].position, Position::from_sequence(3000));
    assert_eq!(all[3000].position, Position::from_sequence(3006));
    assert_eq!(all[4499].position, Position::from_sequence(4505));

    // The same schema through a pool of one connection: never a spare
    // connection, so every page is one query.
    let single = PostgresEventStore::connect(
        &url,
        PostgresOptions {
            pool_size: 1,
            ..PostgresOptions::in_schema(store.schema())
        },
    )
    .await
    .unwrap();

    // (from, page length, read in halves?)
    let cases = [
        // Far behind the head, no gap: halves.
        (1, 2049, true),
        (1, 1024, true),
        (700, 2000, true),
        (1001, 2000, true),
        (3006, 1024, true),
        // Too short to split.
        (1, 1023, false),
        // A gap inside the page: one query.
        (2000, 2000, false),
        (3000, 1024, false),
        // Reaching past the head: one query, as a live reader's pages.
        (3500, 1024, false),
        (1, 10_000, false),
    ];
    for (from, max_count, in_halves) in cases {
        let before = store.stats().pages_read_in_halves;
        let answered = page(&store, from, max_count).await;
        let split = store.stats().pages_read_in_halves - before;
        assert_eq!(split, u64::from(in_halves), "page of {max_count} from {from}");
        let expected = page(&single, from, max_count).await;
        assert_eq!(answered.len(), expected.len(), "page of {max_count} from {from}");
        assert!(
            answered == expected,
            "page of {max_count} from {from} differs from one read of it"
        );
        let start = all
            .iter()
            .position(|event| event.position >= Position::from_sequence(from))
            .unwrap();
        let end = (start + max_count).min(all.len());
        assert!(
            answered == all[start..end],
            "page of {max_count} from {from} is not that part of the log"
        );
    }
    assert_eq!(single.stats().pages_read_in_halves, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_read_in_halves_never_passes_an_open_transaction() {
    let Some(url) = common::url("a_page_read_in_halves_never_passes_an_open_transaction") else {
        return;
    };
    let options = PostgresOptions {
        // Reads give up waiting for the open transaction quickly.
        visibility_wait: std::time::Duration::from_millis(200),
        ..PostgresOptions::default()
    };
    let store = common::temporary_store(&url, options).await;
    append_events(&store, 20, 3, 50).await;
    // A transaction with an id holds the watermark at 3000: the events
    // appended after it began stay invisible until it ends.
    let raw = common::raw_client(&url).await;
    raw.batch_execute("BEGIN; SELECT pg_current_xact_id();").await.unwrap();
    append_events(&store, 10, 3, 50).await;
    let positions = |events: &[RecordedEvent]| events.iter().map(|event| event.position.commit).collect::<Vec<_>>();

    // Wholly below the watermark: read in halves, and exactly those rows.
    let before = store.stats().pages_read_in_halves;
    let below = page(&store, 1001, 2000).await;
    assert_eq!(store.stats().pages_read_in_halves, before + 1);
    assert_eq!(positions(&below), (1001..=3000).collect::<Vec<_>>());

    // Across it: only the visible part, read in one query.
    let across = page(&store, 2500, 2048).await;
    assert_eq!(store.stats().pages_read_in_halves, before + 1);
    assert_eq!(positions(&across), (2500..=3000).collect::<Vec<_>>());

    // Once it ends, the same part of the log splits again and goes on
    // past 3000 without a gap.
    raw.batch_execute("COMMIT").await.unwrap();
    let after = page(&store, 2500, 1024).await;
    assert_eq!(store.stats().pages_read_in_halves, before + 2);
    assert_eq!(positions(&after), (2500..=3523).collect::<Vec<_>>());
}
