//! Long pages of `$all` far behind the head are read as two halves at
//! once, on two connections, and the page a reader will ask for next is
//! read ahead. Either way they must answer exactly what one read of the
//! page answers, also where the log's positions have a gap; pages that
//! reach the head or hold a gap must be read in one query, and a read-ahead
//! must never answer for a part of the log that was not visible yet.

mod common;

use triage_event_store::{
    AllStart, Direction, EventStore, ExpectedRevision, Position, ReadAll, RecordedEvent, StreamName,
};
use triage_store_postgres::{PostgresEventStore, PostgresOptions};
use uuid::Uuid;

/// The watermark is the cluster's: a test here that holds a transaction
/// open holds back what the others see. They take turns.
static WATERMARK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn append_events(store: &PostgresEventStore, streams: usize, appends: usize, events_per_append: usize) {
    for _ in 0..streams {
        let stream = StreamName::new(format!("pages-{}", Uuid::new_v4().simple())).unwrap();
        for _ in 0..appends {
            let events = (0..events_per_append).map(|_| common::event("Paged")).collect();
            store.append(&stream, ExpectedRevision::Any, events).await.unwrap();
        }
    }
}

/// Fills `store` with positions 1..=3000, then five taken by a transaction
/// that rolls back, then 3006..=4505, and returns the whole log.
async fn log_with_a_gap(store: &PostgresEventStore, url: &str) -> Vec<RecordedEvent> {
    append_events(store, 20, 3, 50).await;
    let raw = common::raw_client(url).await;
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
    append_events(store, 10, 3, 50).await;
    let all = page(store, 1, 10_000).await;
    assert_eq!(all.len(), 4500);
    assert_eq!(all[2999].position, Position::from_sequence(3000));
    assert_eq!(all[3000].position, Position::from_sequence(3006));
    assert_eq!(all[4499].position, Position::from_sequence(4505));
    all
}

/// The schema of `store` through a pool of one connection: never a spare
/// connection, so every page is one query and nothing is read ahead.
async fn single_connection(url: &str, store: &PostgresEventStore) -> PostgresEventStore {
    PostgresEventStore::connect(
        url,
        PostgresOptions {
            pool_size: 1,
            ..PostgresOptions::in_schema(store.schema())
        },
    )
    .await
    .unwrap()
}

/// A store holding positions 1..=4500 whose watermark is held at 3000 by
/// an open transaction on the returned connection (`COMMIT` ends it): the
/// events appended after it began stay invisible until it ends. Reads give
/// up waiting for it after 200 ms.
async fn held_at_3000(url: &str) -> (PostgresEventStore, tokio_postgres::Client) {
    let options = PostgresOptions {
        visibility_wait: std::time::Duration::from_millis(200),
        ..PostgresOptions::default()
    };
    let store = common::temporary_store(url, options).await;
    append_events(&store, 20, 3, 50).await;
    let raw = common::raw_client(url).await;
    raw.batch_execute("BEGIN; SELECT pg_current_xact_id();").await.unwrap();
    append_events(&store, 10, 3, 50).await;
    (store, raw)
}

fn positions(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(|event| event.position.commit).collect()
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
    let _turn = WATERMARK.lock().await;
    let store = common::temporary_store(&url, PostgresOptions::default()).await;
    let all = log_with_a_gap(&store, &url).await;
    let single = single_connection(&url, &store).await;

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
        // A handle of its own for each case: a page read ahead after one
        // case must not answer a later one (then not read in halves).
        let reader = PostgresEventStore::connect(&url, PostgresOptions::in_schema(store.schema()))
            .await
            .unwrap();
        let answered = page(&reader, from, max_count).await;
        assert_eq!(
            reader.stats().pages_read_in_halves,
            u64::from(in_halves),
            "page of {max_count} from {from}"
        );
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
    assert_eq!(single.stats().pages_read_ahead, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_read_in_halves_never_passes_an_open_transaction() {
    let Some(url) = common::url("a_page_read_in_halves_never_passes_an_open_transaction") else {
        return;
    };
    let _turn = WATERMARK.lock().await;
    let (store, raw) = held_at_3000(&url).await;

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

/// Pages through the log from its start as a catch-up reader does: each
/// page starts at the last position of the one before (reads include their
/// start). Returns every page.
async fn page_through(store: &PostgresEventStore, page_length: usize) -> Vec<Vec<RecordedEvent>> {
    let mut pages = Vec::new();
    let mut from = AllStart::Boundary;
    loop {
        let page = store
            .read_all(ReadAll {
                direction: Direction::Forwards,
                from,
                max_count: page_length,
            })
            .await
            .unwrap();
        let Some(last) = page.last().map(|event| event.position) else {
            break;
        };
        let done = page.len() < page_length;
        pages.push(page);
        if done {
            break;
        }
        from = AllStart::Position(last);
    }
    pages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_paging_through_history_is_read_ahead_only_where_the_pages_are_exact() {
    let Some(url) = common::url("a_reader_paging_through_history_is_read_ahead_only_where_the_pages_are_exact") else {
        return;
    };
    let _turn = WATERMARK.lock().await;
    let store = common::temporary_store(&url, PostgresOptions::default()).await;
    let all = log_with_a_gap(&store, &url).await;
    let single = single_connection(&url, &store).await;
    let reader = PostgresEventStore::connect(&url, PostgresOptions::in_schema(store.schema()))
        .await
        .unwrap();

    // Pages of 1025 from the start: 1..=1025 (read), then 1025..=2049 (read
    // ahead: exact), 2049..=3078 (its read-ahead held the gap, so it was
    // read again), 3078..=4102 (read ahead), 4102..=4505 (reaches past the
    // head: nothing was read ahead).
    let pages = page_through(&reader, 1025).await;
    let expected = page_through(&single, 1025).await;
    assert_eq!(pages.len(), 5);
    assert!(pages == expected, "the pages differ from those read without read-ahead");
    let firsts: Vec<u64> = pages.iter().map(|page| page[0].position.commit).collect();
    assert_eq!(firsts, [1, 1025, 2049, 3078, 4102]);
    let mut joined: Vec<RecordedEvent> = pages[0].clone();
    for page in &pages[1..] {
        assert_eq!(
            page[0],
            *joined.last().unwrap(),
            "each page starts at the last of the one before"
        );
        joined.extend_from_slice(&page[1..]);
    }
    assert!(joined == all, "the pages together are not the log");
    assert_eq!(reader.stats().pages_read_ahead, 2);
    assert_eq!(single.stats().pages_read_ahead, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_ahead_never_answers_for_events_that_were_not_visible() {
    let Some(url) = common::url("a_read_ahead_never_answers_for_events_that_were_not_visible") else {
        return;
    };
    let _turn = WATERMARK.lock().await;
    let (store, raw) = held_at_3000(&url).await;

    // 1024..=2047 lies below the watermark: read ahead.
    assert_eq!(positions(&page(&store, 1, 1024).await), (1..=1024).collect::<Vec<_>>());
    assert_eq!(
        positions(&page(&store, 1024, 1024).await),
        (1024..=2047).collect::<Vec<_>>()
    );
    assert_eq!(store.stats().pages_read_ahead, 1);
    // 2047..=3070 reaches past it: read when asked for, and only the
    // visible part.
    assert_eq!(
        positions(&page(&store, 2047, 1024).await),
        (2047..=3000).collect::<Vec<_>>()
    );
    assert_eq!(store.stats().pages_read_ahead, 1);
    // Once it ends, the same page holds the events appended meanwhile.
    raw.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        positions(&page(&store, 2047, 1024).await),
        (2047..=3070).collect::<Vec<_>>()
    );
    assert_eq!(store.stats().pages_read_ahead, 1);
    // And the reader goes on from there, read ahead again.
    assert_eq!(
        positions(&page(&store, 3070, 1024).await),
        (3070..=4093).collect::<Vec<_>>()
    );
    assert_eq!(store.stats().pages_read_ahead, 2);
}

/// A store dropped while a read-ahead still runs, on a runtime with one
/// thread (as `#[tokio::test]` gives): the drop blocks that thread, so the
/// read-ahead's connection is never read again, and its session keeps its
/// lock on the events table while the drop's `DROP SCHEMA` waits. The drop
/// must end that session rather than wait for ever.
#[tokio::test]
async fn a_temporary_store_dropped_while_it_reads_ahead_drops_its_schema() {
    let Some(url) = common::url("a_temporary_store_dropped_while_it_reads_ahead_drops_its_schema") else {
        return;
    };
    let _turn = WATERMARK.lock().await;
    let store = common::temporary_store(&url, PostgresOptions::default()).await;
    let schema = store.schema().to_owned();
    // Positions 1..=1024 small; 1025..=2048 of 64 KiB each, so that the
    // read-ahead of 1024..=2047 is 64 MiB to send, far more than a socket
    // holds. (Stored compressed: it is all one byte.)
    append_events(&store, 1, 8, 128).await;
    let stream = StreamName::new("pages-heavy").unwrap();
    for _ in 0..64 {
        let events = (0..16)
            .map(|_| {
                let mut event = common::event("Heavy");
                event.data = vec![b'x'; 64 * 1024 - 512];
                event
            })
            .collect();
        store.append(&stream, ExpectedRevision::Any, events).await.unwrap();
    }
    assert_eq!(page(&store, 1, 1024).await.len(), 1024);
    // Let the read-ahead start its query, then block this thread (the
    // runtime's only one) until its session is stuck sending rows.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let application = format!("triage {schema}");
    let watch = {
        let url = url.clone();
        let application = application.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async {
                let raw = common::raw_client(&url).await;
                for _ in 0..500 {
                    let stuck: i64 = raw
                        .query_one(
                            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
                             AND wait_event = 'ClientWrite'",
                            &[&application],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    if stuck > 0 {
                        return true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                false
            })
        })
    };
    assert!(
        watch.join().unwrap(),
        "the read-ahead never got stuck sending rows, so this test shows nothing"
    );
    // A watchdog ends the sessions itself after 30 s, so that a drop that
    // would wait for ever fails the test instead of hanging it.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rescued = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let (url, done, rescued) = (url.clone(), done.clone(), rescued.clone());
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if started.elapsed() > std::time::Duration::from_secs(30) {
                    rescued.store(true, std::sync::atomic::Ordering::SeqCst);
                    let runtime = tokio::runtime::Runtime::new().unwrap();
                    runtime.block_on(async {
                        let raw = common::raw_client(&url).await;
                        raw.execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                            &[&application],
                        )
                        .await
                        .unwrap();
                    });
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        })
    };
    drop(store);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    watchdog.join().unwrap();
    assert!(
        !rescued.load(std::sync::atomic::Ordering::SeqCst),
        "dropping the store waited on its own read-ahead"
    );
    let raw = common::raw_client(&url).await;
    let left: i64 = raw
        .query_one("SELECT count(*) FROM pg_namespace WHERE nspname = $1", &[&schema])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the temporary schema is still there");
}

/// A store whose reads wait up to 5 s for transactions in flight, and a
/// plain connection for holding the watermark back.
async fn read_your_writes_store(url: &str) -> (PostgresEventStore, tokio_postgres::Client) {
    let options = PostgresOptions {
        visibility_wait: std::time::Duration::from_secs(5),
        ..PostgresOptions::default()
    };
    let store = common::temporary_store(url, options).await;
    let raw = common::raw_client(url).await;
    (store, raw)
}

/// Commits `raw`'s open transaction after 300 ms.
fn end_after_300_ms(raw: tokio_postgres::Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        raw.batch_execute("COMMIT").await.unwrap();
    })
}

fn new_stream() -> StreamName {
    StreamName::new(format!("ticket-{}", Uuid::new_v4().simple())).unwrap()
}

/// Positions start at 1, so a page of n from the start ends at position n,
/// and must wait for it like any page that reaches past the watermark: a
/// caller reads its own append there. It answered at position n - 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_from_the_start_waits_for_its_last_position() {
    let Some(url) = common::url("a_page_from_the_start_waits_for_its_last_position") else {
        return;
    };
    let _turn = WATERMARK.lock().await;
    let (store, raw) = read_your_writes_store(&url).await;
    let stream = new_stream();
    store
        .append(&stream, ExpectedRevision::NoStream, vec![common::event("First")])
        .await
        .unwrap();
    raw.batch_execute("BEGIN; SELECT pg_current_xact_id();").await.unwrap();
    let mine = store
        .append(&stream, ExpectedRevision::Exact(0), vec![common::event("Mine")])
        .await
        .unwrap();
    assert_eq!(mine.position, Position::from_sequence(2));
    let ends = end_after_300_ms(raw);
    let read = store.read_all(ReadAll::forwards(2)).await.unwrap();
    ends.await.unwrap();
    assert_eq!(
        positions(&read),
        vec![1, 2],
        "a page from the start missed the caller's own append"
    );
}

/// A page whose range lies below the watermark but holds a position that
/// was never written (taken by a batch that rolled back) reaches past its
/// range: it must wait for the events there like any page that does. It
/// answered short, without the caller's own append.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_with_a_gap_waits_for_the_events_past_its_range() {
    let Some(url) = common::url("a_page_with_a_gap_waits_for_the_events_past_its_range") else {
        return;
    };
    let _turn = WATERMARK.lock().await;
    let (store, raw) = read_your_writes_store(&url).await;
    store
        .append(&new_stream(), ExpectedRevision::NoStream, vec![common::event("First")])
        .await
        .unwrap();
    raw.batch_execute(&format!(
        r#"BEGIN;
           INSERT INTO "{schema}".triage_events (tx_id, stream, revision, event_id, event_type, data, metadata)
           VALUES (pg_current_xact_id(), 'rolled-back', 0, gen_random_uuid(), 'Gone', '\x00', '\x00');
           ROLLBACK;"#,
        schema = store.schema()
    ))
    .await
    .unwrap();
    store
        .append(&new_stream(), ExpectedRevision::NoStream, vec![common::event("Third")])
        .await
        .unwrap();
    raw.batch_execute("BEGIN; SELECT pg_current_xact_id();").await.unwrap();
    let mine = store
        .append(&new_stream(), ExpectedRevision::NoStream, vec![common::event("Mine")])
        .await
        .unwrap();
    assert_eq!(mine.position, Position::from_sequence(4));
    let ends = end_after_300_ms(raw);
    // Positions 1..=3 are below the watermark; the page of 3 is 1, 3, 4.
    let read = store.read_all(ReadAll::forwards(3)).await.unwrap();
    ends.await.unwrap();
    assert_eq!(
        positions(&read),
        vec![1, 3, 4],
        "a page over a gap missed the caller's own append"
    );
}
