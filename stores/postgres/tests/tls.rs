//! TLS to a real server: what each `sslmode` does to the store's sessions,
//! and that the verifying modes refuse a certificate they cannot trust.
//!
//! Needs `TRIAGE_PG_URL` and a server with `ssl = on` whose certificate file
//! this process can read (Debian's PostgreSQL package turns TLS on with its
//! self-signed "snakeoil" certificate for `localhost`); says plainly that it
//! is skipped otherwise.

mod common;

use std::path::PathBuf;

use rustls::client::verify_server_name;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::ParsedCertificate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::Client;
use triage_event_store::{AllStart, Direction, EventStore, ExpectedRevision, ReadAll, StreamName};
use triage_store_postgres::{PostgresEventStore, PostgresOptions};

/// A CA certificate that signed nothing: a root no server here chains to.
fn unrelated_ca() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/unrelated-ca.pem")
}

/// The server's certificate file, when the server offers TLS and the file
/// can be read here; otherwise says why `test` is skipped.
async fn server_certificate(raw: &Client, test: &str) -> Option<PathBuf> {
    let setting = |name: &'static str| async move {
        raw.query_one(&format!("SHOW {name}"), &[])
            .await
            .ok()
            .map(|row| row.get::<_, String>(0))
    };
    if setting("ssl").await.as_deref() != Some("on") {
        eprintln!("skipped: {test} (the server at TRIAGE_PG_URL has ssl = off)");
        return None;
    }
    let path = setting("ssl_cert_file").await.map(PathBuf::from);
    match path {
        Some(path) if std::fs::read(&path).is_ok() => Some(path),
        other => {
            eprintln!("skipped: {test} (the server's certificate file {other:?} cannot be read here)");
            None
        }
    }
}

/// The server, a plain session on it and its certificate file, when it
/// offers TLS; otherwise `None`, after saying why `test` is skipped.
async fn tls_server(test: &str) -> Option<(String, Client, PathBuf)> {
    let url = common::url(test)?;
    let raw = common::raw_client(&url).await;
    let certificate = server_certificate(&raw, test).await?;
    Some((url, raw, certificate))
}

/// `url` with `params` added to its query.
fn with_params(url: &str, params: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{params}")
}

/// A path as a URL query value.
fn encoded(path: &std::path::Path) -> String {
    path.display()
        .to_string()
        .replace('%', "%25")
        .replace('/', "%2F")
        .replace(' ', "%20")
}

/// Whether each of the store's sessions is encrypted, seen by the server.
async fn encrypted_sessions(raw: &Client, store: &PostgresEventStore) -> Vec<bool> {
    raw.query(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1",
        &[&format!("triage {}", store.schema())],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| row.get(0))
    .collect()
}

/// Appends one event and reads it back through `$all`: the store works.
async fn round_trip(store: &PostgresEventStore) {
    let stream = StreamName::new("ticket-tls").unwrap();
    let event = common::event("TicketOpened");
    store
        .append(&stream, ExpectedRevision::NoStream, vec![event.clone()])
        .await
        .unwrap();
    let read = store
        .read_all(ReadAll {
            direction: Direction::Forwards,
            from: AllStart::Boundary,
            max_count: 10,
        })
        .await
        .unwrap();
    assert_eq!(read.iter().map(|record| record.id).collect::<Vec<_>>(), vec![event.id]);
}

async fn open(url: &str) -> Result<PostgresEventStore, triage_event_store::Error> {
    PostgresEventStore::connect_temporary(url, PostgresOptions::default()).await
}

/// The error's whole chain, as one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sslmode_secures_the_store_sessions_as_libpq_does() {
    let test = "each_sslmode_secures_the_store_sessions_as_libpq_does";
    let Some((url, raw, certificate)) = tls_server(test).await else {
        return;
    };
    let cases = [
        ("sslmode=disable", false),
        // No sslmode: `prefer`, and this server offers TLS.
        ("application_name=x", true),
        ("sslmode=require", true),
        (
            &*format!("sslmode=verify-ca&sslrootcert={}", encoded(&certificate)),
            true,
        ),
    ];
    for (params, encrypted) in cases {
        let store = open(&with_params(&url, params))
            .await
            .unwrap_or_else(|error| panic!("{params}: {}", chain(&error)));
        round_trip(&store).await;
        let sessions = encrypted_sessions(&raw, &store).await;
        assert!(
            !sessions.is_empty(),
            "{params}: the server shows no session of the store"
        );
        assert!(
            sessions.iter().all(|&ssl| ssl == encrypted),
            "{params}: sessions encrypted {sessions:?}, expected all {encrypted}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_name_and_the_root_of_the_certificate() {
    let test = "verify_full_checks_the_name_and_the_root_of_the_certificate";
    let Some((url, raw, certificate)) = tls_server(test).await else {
        return;
    };
    let config: tokio_postgres::Config = url.parse().unwrap();
    let Some(tokio_postgres::config::Host::Tcp(host)) = config.get_hosts().first().cloned() else {
        eprintln!("skipped: {test} (TRIAGE_PG_URL does not name a TCP host)");
        return;
    };

    // The server's own certificate as the root: its chain holds, so
    // verify-ca connects (above); verify-full also wants the host's name
    // in it. Debian's certificate names `localhost`, never an address.
    let trusted = format!("sslmode=verify-full&sslrootcert={}", encoded(&certificate));
    if host.parse::<std::net::IpAddr>().is_ok() {
        let error = open(&with_params(&url, &trusted)).await.unwrap_err();
        let text = chain(&error);
        assert!(text.contains("certificate not valid for name"), "{text}");
        assert!(!error.is_unavailable(), "a refused certificate is no outage: {text}");
    }
    if host == "127.0.0.1" {
        // By the name in the certificate (Debian's names localhost), the
        // same check passes.
        let pem = std::fs::read(&certificate).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let parsed = ParsedCertificate::try_from(&der).unwrap();
        let names_localhost = verify_server_name(&parsed, &ServerName::try_from("localhost").unwrap()).is_ok();
        let by_name = url.replacen("@127.0.0.1", "@localhost", 1);
        if names_localhost && by_name != url {
            let store = open(&with_params(&by_name, &trusted))
                .await
                .unwrap_or_else(|error| panic!("verify-full by the certificate's name: {}", chain(&error)));
            round_trip(&store).await;
            let sessions = encrypted_sessions(&raw, &store).await;
            assert!(!sessions.is_empty() && sessions.iter().all(|&ssl| ssl), "{sessions:?}");
        } else {
            eprintln!("note: {test} did not connect by name (the certificate does not name localhost)");
        }
    }

    // A root that signed nothing the server has: refused, whatever the name.
    let unrelated = unrelated_ca();
    for mode in ["verify-full", "verify-ca", "require"] {
        let params = format!("sslmode={mode}&sslrootcert={}", encoded(&unrelated));
        let error = open(&with_params(&url, &params))
            .await
            .err()
            .unwrap_or_else(|| panic!("{mode} with an unrelated root connected"));
        let text = chain(&error);
        assert!(
            text.contains("invalid peer certificate: UnknownIssuer"),
            "{mode}: {text}"
        );
        assert!(!text.contains("BEGIN CERTIFICATE"), "{text}");
    }
}

/// libpq never uses TLS over a Unix socket: neither does the store, under
/// the default `prefer` or under `require` (the server would decline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_connects_without_tls_whatever_the_sslmode() {
    let test = "a_unix_socket_connects_without_tls_whatever_the_sslmode";
    let Some(url) = common::url(test) else { return };
    let raw = common::raw_client(&url).await;
    let directories: String = raw.query_one("SHOW unix_socket_directories", &[]).await.unwrap().get(0);
    let Some(directory) = directories
        .split(',')
        .map(str::trim)
        .find(|directory| std::path::Path::new(directory).join(".s.PGSQL.5432").exists())
    else {
        eprintln!("skipped: {test} (no socket of the server on port 5432 here)");
        return;
    };
    let config: tokio_postgres::Config = url.parse().unwrap();
    let (Some(user), Some(database)) = (config.get_user(), config.get_dbname()) else {
        eprintln!("skipped: {test} (TRIAGE_PG_URL names no user and database)");
        return;
    };
    for params in ["", "?sslmode=require"] {
        let socket_url = format!(
            "postgres://{user}@{}/{database}{params}",
            encoded(std::path::Path::new(directory))
        );
        let store = open(&socket_url)
            .await
            .unwrap_or_else(|error| panic!("socket{params}: {}", chain(&error)));
        round_trip(&store).await;
        let sessions = encrypted_sessions(&raw, &store).await;
        assert!(
            !sessions.is_empty() && sessions.iter().all(|&ssl| !ssl),
            "{params}: {sessions:?}"
        );
    }
}

/// The server of `TRIAGE_PG_URL`, for a stand-in in front of it.
struct RealServer {
    url: String,
    /// `host:port`, over TCP.
    address: String,
    user: String,
    database: String,
}

/// The real server, when `TRIAGE_PG_URL` names one over TCP with a user
/// and a database; otherwise `None`, after saying why `test` is skipped.
fn real_server(test: &str) -> Option<RealServer> {
    let url = common::url(test)?;
    let config: tokio_postgres::Config = url.parse().unwrap();
    let (Some(tokio_postgres::config::Host::Tcp(host)), Some(user), Some(database)) = (
        config.get_hosts().first().cloned(),
        config.get_user(),
        config.get_dbname(),
    ) else {
        eprintln!("skipped: {test} (TRIAGE_PG_URL names no TCP host, user and database)");
        return None;
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    Some(RealServer {
        address: format!("{host}:{port}"),
        user: user.to_owned(),
        database: database.to_owned(),
        url,
    })
}

/// The protocol's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 47];

/// `prefer` as libpq: a server that offers TLS but cannot complete the
/// handshake is reached without TLS. The server here is a stand-in in
/// front of the real one: it answers every TLS request with "yes" and
/// then with bytes that are no TLS, and passes every connection that
/// starts without one through to the real server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_connects_without_tls_when_the_handshake_fails() {
    let test = "prefer_connects_without_tls_when_the_handshake_fails";
    let Some(RealServer {
        url,
        address: real,
        user,
        database,
    }) = real_server(test)
    else {
        return;
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stand_in = listener.local_addr().unwrap();
    let proxy = tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let real = real.clone();
            tokio::spawn(async move {
                let mut opening = [0u8; 8];
                if client.read_exact(&mut opening).await.is_err() {
                    return;
                }
                if opening == SSL_REQUEST {
                    // "S": TLS offered; then an HTTP answer, which no TLS
                    // client can read as a handshake.
                    let _ = client.write_all(b"SHTTP/1.1 400 Bad Request\r\n\r\n").await;
                    return;
                }
                if let Ok(mut server) = tokio::net::TcpStream::connect(&real).await
                    && server.write_all(&opening).await.is_ok()
                {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    let through = format!("postgres://{user}@{stand_in}/{database}");
    let store = open(&through)
        .await
        .unwrap_or_else(|error| panic!("prefer after a failed handshake: {}", chain(&error)));
    round_trip(&store).await;
    let raw = common::raw_client(&url).await;
    let sessions = encrypted_sessions(&raw, &store).await;
    assert!(!sessions.is_empty() && sessions.iter().all(|&ssl| !ssl), "{sessions:?}");
    drop(store);

    // `require` refuses such a server instead.
    let error = open(&format!("postgres://{user}@{stand_in}/{database}?sslmode=require"))
        .await
        .err();
    proxy.abort();
    let error = error.expect("require connected to a server that cannot do TLS");
    assert!(chain(&error).contains("TLS"), "{}", chain(&error));
}

/// The `prefer` probe is bounded by the connect timeout: a server that
/// accepts and never answers fails the open, as with `disable`, instead
/// of holding it for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_fails_the_open_under_prefer_too() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = listener.local_addr().unwrap();
    let accepted = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let options = PostgresOptions {
        connect_timeout: std::time::Duration::from_millis(500),
        ..PostgresOptions::default()
    };
    for params in ["", "?sslmode=disable"] {
        let url = format!("postgres://nobody@{silent}/nothing{params}");
        let opened = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            PostgresEventStore::connect(&url, options.clone()),
        )
        .await;
        let error = opened
            .unwrap_or_else(|_| panic!("{params:?}: the open still waits after 30 s"))
            .err()
            .unwrap_or_else(|| panic!("{params:?}: a silent server was opened"));
        assert!(error.is_unavailable(), "{params:?}: {}", chain(&error));
    }
    accepted.abort();
}

/// A test file of `tests/data`.
fn test_data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// A directory of its own, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let path = std::env::temp_dir().join(format!("triage-client-cert-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).unwrap();
        Scratch(path)
    }

    /// `name` of `tests/data`, copied here readable by its owner only (git
    /// checks every file out readable by all, and a client key must not
    /// be).
    fn private_copy(&self, name: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.0.join(name);
        std::fs::copy(test_data(name), &path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server that requires a client certificate gets the one `sslcert` and
/// `sslkey` name. The server is a stand-in in front of the real one: it
/// ends TLS itself, as `localhost` (`tests/data/stand-in.pem`), takes
/// only clients whose certificate the test CA signed
/// (`tests/data/client-ca.pem`), and passes each such session through to
/// the real server; it turns away connections without TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_reaches_a_server_that_requires_one() {
    use std::sync::{Arc, Mutex};
    let test = "a_client_certificate_reaches_a_server_that_requires_one";
    let Some(RealServer {
        address: real,
        user,
        database,
        ..
    }) = real_server(test)
    else {
        return;
    };

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut client_roots = rustls::RootCertStore::empty();
    client_roots
        .add(CertificateDer::from_pem_file(test_data("client-ca.pem")).unwrap())
        .unwrap();
    let client_verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(client_roots), Arc::clone(&provider))
            .build()
            .unwrap();
    let server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_file(test_data("stand-in.pem")).unwrap()],
            rustls::pki_types::PrivateKeyDer::from_pem_file(test_data("stand-in.key")).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));

    // What the stand-in saw: the client certificate of each handshake it
    // took, and why it refused others (rustls's reason).
    let taken = Arc::new(Mutex::new(Vec::<Option<Vec<u8>>>::new()));
    let refused = Arc::new(Mutex::new(Vec::<String>::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stand_in = {
        let (taken, refused) = (Arc::clone(&taken), Arc::clone(&refused));
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (acceptor, real) = (acceptor.clone(), real.clone());
                let (taken, refused) = (Arc::clone(&taken), Arc::clone(&refused));
                tokio::spawn(async move {
                    let mut opening = [0u8; 8];
                    if client.read_exact(&mut opening).await.is_err() || opening != SSL_REQUEST {
                        return;
                    }
                    if client.write_all(b"S").await.is_err() {
                        return;
                    }
                    let mut tls = match acceptor.accept(client).await {
                        Ok(tls) => tls,
                        Err(error) => {
                            // A TLS refusal, not a client that went away
                            // mid-handshake (a store closing while its pool
                            // was still opening a connection).
                            if let Some(refusal) =
                                error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
                            {
                                refused.lock().unwrap().push(refusal.to_string());
                            }
                            return;
                        }
                    };
                    let presented = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|der| der.as_ref().to_vec());
                    taken.lock().unwrap().push(presented);
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&real).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                    }
                });
            }
        })
    };

    let scratch = Scratch::new();
    let (cert, key) = (scratch.private_copy("client.pem"), scratch.private_copy("client.key"));
    let through = format!(
        "postgres://{user}@localhost:{port}/{database}?sslmode=verify-full&sslrootcert={}",
        encoded(&test_data("client-ca.pem"))
    );
    let with_certificate = format!("{through}&sslcert={}&sslkey={}", encoded(&cert), encoded(&key));
    let store = open(&with_certificate)
        .await
        .unwrap_or_else(|error| panic!("with the client certificate: {}", chain(&error)));
    round_trip(&store).await;
    drop(store);
    let client_der = CertificateDer::from_pem_file(test_data("client.pem")).unwrap();
    {
        let taken = taken.lock().unwrap();
        assert!(!taken.is_empty(), "no session went through the stand-in");
        assert!(
            taken
                .iter()
                .all(|presented| presented.as_deref() == Some(client_der.as_ref())),
            "a session presented another certificate, or none"
        );
    }
    assert!(refused.lock().unwrap().is_empty(), "{:?}", refused.lock().unwrap());

    // Without one (unless this HOME has libpq's default files): refused by
    // the server, which a retry does not change, and said so.
    let home_default =
        std::env::var_os("HOME").is_some_and(|home| PathBuf::from(home).join(".postgresql/postgresql.crt").exists());
    if home_default {
        eprintln!("note: {test} did not connect without a certificate (~/.postgresql/postgresql.crt exists)");
    } else {
        let Err(error) = open(&through).await else {
            panic!("a server that requires a client certificate took a client without one");
        };
        let text = chain(&error);
        assert!(!error.is_unavailable(), "a refused client is no outage: {text}");
        assert!(
            text.contains("refused this client's certificate, or requires one"),
            "{text}"
        );
        assert!(text.contains("sslcert"), "{text}");
        let refused = refused.lock().unwrap();
        assert!(
            refused
                .iter()
                .any(|reason| reason.contains("peer sent no certificates")),
            "{refused:?}"
        );
    }
    stand_in.abort();
}
