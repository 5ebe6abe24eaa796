//! TLS to PostgreSQL, with libpq's `sslmode` and `sslrootcert`.
//!
//! A URL's `sslmode` means what it means to `psql` (libpq):
//! - `disable`: no TLS.
//! - `prefer` (without `sslmode`): TLS when the server offers it, plain
//!   otherwise, and plain after a handshake that failed (see
//!   [`settle_prefer`]); the server's certificate is not checked.
//! - `require`: TLS or no connection; the certificate is not checked,
//!   unless a root certificate file is named or `~/.postgresql/root.crt`
//!   exists (then as `verify-ca`).
//! - `verify-ca`: TLS, and the certificate must chain to a trusted root.
//! - `verify-full`: `verify-ca`, and the certificate must be issued for the
//!   host connected to.
//!
//! The trusted roots: `sslrootcert=FILE` (PEM), `sslrootcert=system` (the
//! system's trusted roots, which need `verify-full`, and are its default
//! mode), else `~/.postgresql/root.crt`. A verifying mode without any of
//! them is refused at once, as libpq refuses it.
//!
//! The driver (tokio-postgres) reads the rest of the URL. It knows only
//! `disable`, `prefer` and `require`, and refuses `sslrootcert`, so
//! [`parse_url`] takes both out first and tells the driver `require` for
//! the verifying modes; the checks are this module's certificate
//! verifiers. Connections over a Unix socket never use TLS, as with libpq.
//!
//! A client certificate is sent as libpq sends it: `sslcert=FILE` (PEM, the
//! client's certificate first, then any intermediates) with its key in
//! `sslkey=FILE` (PEM: PKCS#8, PKCS#1 or SEC1), else
//! `~/.postgresql/postgresql.crt` and `postgresql.key` when the certificate
//! file exists. The key file must not be readable by others, as libpq
//! requires. Encrypted keys (`sslpassword`) and certificate revocation
//! lists (`sslcrl`, `~/.postgresql/root.crl`) are not supported: a URL or
//! a home that names one is refused, rather than connecting without it.
//!
//! rustls, with the `ring` provider named explicitly (rather than a
//! process-wide default): the kurrentdb client's dependencies enable a
//! second provider, and with two rustls cannot pick one by itself.
//! Channel binding (SCRAM-SHA-256-PLUS) is not offered, so password
//! authentication is SCRAM-SHA-256, as with a libpq built without it.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::Config;
use tokio_postgres::config::{Host, SslMode as DriverSslMode};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// libpq's `sslmode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, unchecked.
    Prefer,
    /// TLS, unchecked (checked as `VerifyCa` when roots are given).
    Require,
    /// TLS, the certificate chained to a trusted root.
    VerifyCa,
    /// `VerifyCa`, and issued for the host.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq's `allow` (plain first, TLS if the server insists) has
            // no equivalent in the driver.
            other => {
                return Err(format!(
                    "invalid sslmode {other:?} in the PostgreSQL URL (expected disable, prefer, require, verify-ca \
                     or verify-full)"
                ));
            }
        })
    }

    /// The value as written in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What the driver is told: it negotiates, the verifiers check.
    fn for_driver(self) -> DriverSslMode {
        match self {
            SslMode::Disable => DriverSslMode::Disable,
            SslMode::Prefer => DriverSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => DriverSslMode::Require,
        }
    }
}

/// How a server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verification {
    /// Not at all (`prefer`, `require`): the connection is encrypted, but
    /// anyone in between could answer instead of the server.
    None,
    /// Its chain to a trusted root, not its name (`verify-ca`).
    Chain,
    /// Its chain and the host's name (`verify-full`).
    Full,
}

/// A PostgreSQL URL, read: the driver's settings and the TLS to connect
/// with.
#[derive(Clone, Debug)]
pub struct PgUrl {
    /// Everything but the TLS settings.
    pub config: Config,
    /// The TLS the URL asks for.
    pub tls: PgTls,
}

/// Reads a PostgreSQL URL (`postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE?…`,
/// or libpq's `key=value …` form), its TLS settings included, and loads
/// the root certificates they name. The error never holds the URL, so a
/// password in it cannot leak.
///
/// Without a password in the URL, the password is `PGPASSWORD`'s, or the
/// password file's (see `pgpass.rs`), as with libpq.
///
/// What the URL leaves out is taken from libpq's environment variables,
/// so that `postgres://` alone connects where `psql` does: `PGHOST`,
/// `PGHOSTADDR`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGAPPNAME`,
/// `PGOPTIONS`, `PGCONNECT_TIMEOUT`, `PGSSLMODE`, `PGSSLROOTCERT`,
/// `PGSSLCERT` and `PGSSLKEY` (an empty one counts as unset). `PGSSLCRL`
/// and `PGSSLCRLDIR` are refused, as `sslcrl` in the URL is.
///
/// As with libpq, connections over a Unix socket never use TLS, whatever
/// `sslmode` says; and `prefer` without a host name to start TLS with
/// (only `hostaddr`) connects without it.
pub fn parse_url(url: &str) -> Result<PgUrl, String> {
    parse_url_in(url, &|name| std::env::var(name).ok().filter(|value| !value.is_empty()))
}

/// [`parse_url`] with the environment read through `env`.
fn parse_url_in(url: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<PgUrl, String> {
    let (rest, mut settings) = take_tls_settings(url)?;
    let mut config = rest.parse::<Config>().map_err(|error| {
        // The driver's message and its cause name the bad part (a key, or
        // "invalid value for option `port`"), never the URL.
        let cause = std::error::Error::source(&error).map_or_else(String::new, |cause| format!(": {cause}"));
        format!("invalid PostgreSQL URL (expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE): {error}{cause}")
    })?;
    fill_from_environment(&mut config, &mut settings, env)?;
    let mode = settings.effective_mode();
    // What each server entry of the URL is to the driver: a socket, or TCP
    // (to `hostaddr` when given) with the host's name for TLS, or without
    // one (a bare `hostaddr`, or one beside a socket path).
    let (hosts, addresses) = (config.get_hosts(), config.get_hostaddrs());
    let entries = hosts.len().max(addresses.len());
    let socket = |i: usize| addresses.get(i).is_none() && matches!(hosts.get(i), Some(Host::Unix(_)));
    let named = |i: usize| matches!(hosts.get(i), Some(Host::Tcp(_)));
    let driver_mode = if entries > 0 && (0..entries).all(socket) {
        DriverSslMode::Disable
    } else if mode == SslMode::Prefer && !(0..entries).any(named) {
        // TLS over TCP needs a name to start with.
        DriverSslMode::Disable
    } else if mode != SslMode::Prefer && mode != SslMode::Disable && !(0..entries).all(named) {
        return Err(format!(
            "sslmode={} needs a host name for every server in the PostgreSQL URL, to start TLS with and check \
             its certificate against: a Unix socket beside TCP hosts, or a hostaddr without a host name, cannot \
             be used with it (name the host with host=, keeping hostaddr= for its address)",
            mode.as_str()
        ));
    } else {
        mode.for_driver()
    };
    config.ssl_mode(driver_mode);
    crate::pgpass::fill_password(&mut config);
    let tls = PgTls::new(settings)?;
    Ok(PgUrl { config, tls })
}

/// Fills in what the URL left out from libpq's variables (see [`parse_url`]),
/// as libpq does: each one only where the URL gives nothing of its kind
/// (a URL with a host takes no `PGHOST`, nor `PGHOSTADDR`). A value that
/// does not parse is an error naming the variable, never silently ignored.
fn fill_from_environment(
    config: &mut Config,
    settings: &mut TlsSettings,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), String> {
    let invalid = |name: &str, what: &str| format!("{name} in the environment is not {what}");
    for name in ["PGSSLCRL", "PGSSLCRLDIR"] {
        if env(name).is_some() {
            return Err(format!(
                "{name} is set: certificate revocation lists are not supported, and a connection that ignored \
                 one would trust a revoked certificate (unset it to connect without revocation checks)"
            ));
        }
    }
    if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
        if let Some(hosts) = env("PGHOST") {
            for host in hosts.split(',') {
                config.host(host);
            }
        }
        if let Some(addresses) = env("PGHOSTADDR") {
            for address in addresses.split(',') {
                let address = address
                    .trim()
                    .parse()
                    .map_err(|_| invalid("PGHOSTADDR", "a comma-separated list of IP addresses"))?;
                config.hostaddr(address);
            }
        }
    }
    if config.get_ports().is_empty()
        && let Some(ports) = env("PGPORT")
    {
        for port in ports.split(',') {
            let port = port
                .trim()
                .parse()
                .map_err(|_| invalid("PGPORT", "a comma-separated list of port numbers"))?;
            config.port(port);
        }
    }
    if config.get_user().is_none()
        && let Some(user) = env("PGUSER")
    {
        config.user(user);
    }
    if config.get_dbname().is_none()
        && let Some(database) = env("PGDATABASE")
    {
        config.dbname(database);
    }
    if config.get_application_name().is_none()
        && let Some(name) = env("PGAPPNAME")
    {
        config.application_name(name);
    }
    if config.get_options().is_none()
        && let Some(options) = env("PGOPTIONS")
    {
        config.options(options);
    }
    if config.get_connect_timeout().is_none()
        && let Some(seconds) = env("PGCONNECT_TIMEOUT")
    {
        // As libpq reads it: whole seconds, 0 (or less) for no limit.
        let seconds: i64 = seconds
            .trim()
            .parse()
            .map_err(|_| invalid("PGCONNECT_TIMEOUT", "a whole number of seconds"))?;
        if seconds > 0 {
            config.connect_timeout(Duration::from_secs(seconds.unsigned_abs()));
        }
    }
    if settings.mode.is_none()
        && let Some(mode) = env("PGSSLMODE")
    {
        settings.mode = Some(SslMode::parse(&mode).map_err(|_| {
            format!(
                "PGSSLMODE in the environment is {mode:?}, not one of disable, prefer, require, verify-ca or \
                 verify-full"
            )
        })?);
    }
    for (field, name) in [
        (&mut settings.root_cert, "PGSSLROOTCERT"),
        (&mut settings.cert, "PGSSLCERT"),
        (&mut settings.key, "PGSSLKEY"),
    ] {
        if field.is_none() {
            *field = env(name);
        }
    }
    Ok(())
}

/// The TLS parameters of a URL, as written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct TlsSettings {
    mode: Option<SslMode>,
    root_cert: Option<String>,
    /// The client certificate file, as written (empty: the default).
    cert: Option<String>,
    /// Its private key file, as written (empty: the default).
    key: Option<String>,
}

/// Splits the TLS settings off `url`: the URL for the driver, without
/// them (its `sslmode` is set on the parsed config), and the settings.
fn take_tls_settings(url: &str) -> Result<(String, TlsSettings), String> {
    let mut settings = TlsSettings::default();
    // Whether `key` (decoded) is a TLS setting, taken into `settings`.
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => settings.mode = Some(SslMode::parse(&percent_decode(value)?)?),
            // Empty: libpq's default file, as if not given.
            "sslrootcert" => settings.root_cert = Some(percent_decode(value)?).filter(|path| !path.is_empty()),
            "sslcrl" | "sslcrldir" => {
                return Err(format!(
                    "{key} in the PostgreSQL URL: certificate revocation lists are not supported, and a connection \
                     that ignored one would trust a revoked certificate"
                ));
            }
            "sslcert" => settings.cert = Some(percent_decode(value)?).filter(|path| !path.is_empty()),
            "sslkey" => settings.key = Some(percent_decode(value)?).filter(|path| !path.is_empty()),
            "sslpassword" => {
                return Err(
                    "sslpassword in the PostgreSQL URL: encrypted private keys are not supported; decrypt the key \
                     (openssl pkey -in KEY -out PLAIN) and keep the file readable by its owner only"
                        .to_owned(),
                );
            }
            _ => return Ok(false),
        }
        Ok(true)
    };
    let scheme = ["postgres://", "postgresql://"]
        .into_iter()
        .find(|scheme| url.starts_with(scheme));
    let rest = if let Some(scheme) = scheme {
        // Where the driver finds the query: after the credentials, which
        // end at the first `@` (a password may hold a `?`), at the first
        // `?` after them.
        let after_scheme = &url[scheme.len()..];
        let credentials = after_scheme.find('@').map_or(0, |at| at + 1);
        let Some(query_at) = after_scheme[credentials..]
            .find('?')
            .map(|at| scheme.len() + credentials + at)
        else {
            return Ok((url.to_owned(), settings));
        };
        let (base, query) = (&url[..query_at], &url[query_at + 1..]);
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(&percent_decode(key)?, value)? {
                kept.push(pair);
            }
        }
        if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        let mut kept = Vec::new();
        for (key, value) in key_value_pairs(url)? {
            // Values of this form are not percent-encoded: `take` decodes
            // this back to the value.
            if !take(&key, &value.replace('%', "%25"))? {
                kept.push(format!("{key}={}", quote(&value)));
            }
        }
        kept.join(" ")
    };
    Ok((rest, settings))
}

impl TlsSettings {
    /// The mode in force: as given, else `verify-full` for the system's
    /// roots (libpq's rule), else `prefer`.
    fn effective_mode(&self) -> SslMode {
        match (self.mode, self.root_cert.as_deref()) {
            (Some(mode), _) => mode,
            (None, Some("system")) => SslMode::VerifyFull,
            (None, _) => SslMode::Prefer,
        }
    }
}

/// `%XX` decoded, as the driver decodes URL parts: a `%` not followed by
/// two hex digits stays as it is.
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escape = bytes
            .get(index + 1..index + 3)
            .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit));
        match (bytes[index], escape) {
            (b'%', Some(hex)) => {
                let digit = |byte: u8| (byte as char).to_digit(16).unwrap_or(0) as u8;
                decoded.push(digit(hex[0]) * 16 + digit(hex[1]));
                index += 3;
            }
            (byte, _) => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8(decoded).map_err(|_| "the PostgreSQL URL's parameters are not UTF-8".to_owned())
}

/// The pairs of libpq's `key=value key='quoted value' …` form (spaces
/// around `=` allowed; `\` escapes the next character).
fn key_value_pairs(text: &str) -> Result<Vec<(String, String)>, String> {
    let malformed = || "invalid PostgreSQL connection string (expected key=value pairs)".to_owned();
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') || key.is_empty() {
            return Err(malformed());
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let quoted = chars.next_if_eq(&'\'').is_some();
        loop {
            match chars.next() {
                Some('\\') => value.push(chars.next().ok_or_else(malformed)?),
                Some('\'') if quoted => break,
                Some(c) if quoted || !c.is_whitespace() => value.push(c),
                Some(_) => break,
                None if quoted => return Err(malformed()),
                None => break,
            }
        }
        pairs.push((key, value));
    }
}

/// `value` quoted for the `key=value` form.
fn quote(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('\'');
    quoted
}

/// The TLS of a store's or read model's connections: what
/// `tokio-postgres` and its pool are given in place of `NoTls`.
#[derive(Clone)]
pub struct PgTls {
    mode: SslMode,
    verification: Verification,
    /// `None` when TLS is disabled: the driver still makes a connector
    /// for each host, but never uses it.
    config: Option<Arc<ClientConfig>>,
    /// The client certificate file sent to servers that ask for one.
    client_certificate: Option<PathBuf>,
}

impl fmt::Debug for PgTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTls")
            .field("mode", &self.mode)
            .field("verification", &self.verification)
            .field("client_certificate", &self.client_certificate)
            .finish_non_exhaustive()
    }
}

impl PgTls {
    fn new(settings: TlsSettings) -> Result<PgTls, String> {
        let mode = settings.effective_mode();
        if mode == SslMode::Disable {
            return Ok(PgTls {
                mode,
                verification: Verification::None,
                config: None,
                client_certificate: None,
            });
        }
        let system = settings.root_cert.as_deref() == Some("system");
        if system && mode != SslMode::VerifyFull {
            return Err(format!(
                "sslrootcert=system needs sslmode=verify-full (it is {}): the system's roots trust any host \
                 with a public certificate, so only the host's name makes the check worth anything",
                mode.as_str()
            ));
        }
        let default_file = home_root_cert();
        let root_file = match settings.root_cert.as_deref() {
            Some("system") => None,
            Some(path) => Some(PathBuf::from(path)),
            None => default_file.filter(|path| path.exists()),
        };
        let verification = match mode {
            SslMode::Disable | SslMode::Prefer => Verification::None,
            SslMode::Require if root_file.is_some() => Verification::Chain,
            SslMode::Require => Verification::None,
            SslMode::VerifyCa => Verification::Chain,
            SslMode::VerifyFull => Verification::Full,
        };
        // libpq checks a revocation list there by default; ignoring it
        // would trust what it revokes.
        if verification != Verification::None
            && let Some(crl) = home_postgresql_file("root.crl").filter(|path| path.exists())
        {
            return Err(format!(
                "{} exists, and certificate revocation lists are not supported: move it away to connect with \
                 sslmode={} without it",
                crl.display(),
                mode.as_str()
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match verification {
            Verification::None => Arc::new(NameBlind {
                roots: None,
                provider: Arc::clone(&provider),
            }),
            Verification::Chain | Verification::Full => {
                let roots = match &root_file {
                    Some(path) => roots_from_file(path)?,
                    None if system => system_roots()?,
                    None => {
                        return Err(format!(
                            "sslmode={} needs trusted root certificates: name a PEM file with sslrootcert=FILE, \
                             use the system's with sslrootcert=system, or put them in ~/.postgresql/root.crt",
                            mode.as_str()
                        ));
                    }
                };
                let roots = Arc::new(roots);
                if verification == Verification::Full {
                    WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                        .build()
                        .map_err(|error| format!("cannot use the root certificates: {error}"))?
                } else {
                    Arc::new(NameBlind {
                        roots: Some(roots),
                        provider: Arc::clone(&provider),
                    })
                }
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| format!("cannot set TLS up: {error}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let identity = ClientIdentity::load(&settings)?;
        let client_certificate = identity.as_ref().map(|identity| identity.cert_path.clone());
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some(identity) => builder
                .with_client_auth_cert(identity.chain, identity.key)
                .map_err(|error| {
                    format!(
                        "cannot use the client certificate {} with the private key {}: {error}",
                        identity.cert_path.display(),
                        identity.key_path.display()
                    )
                })?,
        };
        // What libpq 17 sends; servers that do not know ALPN ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(PgTls {
            mode,
            verification,
            config: Some(Arc::new(config)),
            client_certificate,
        })
    }

    /// The `sslmode` in force.
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// How the server's certificate is checked.
    pub fn verification(&self) -> Verification {
        self.verification
    }

    /// The client certificate file sent when a server asks for one.
    pub fn client_certificate(&self) -> Option<&Path> {
        self.client_certificate.as_deref()
    }
}

/// A client certificate chain and its private key, as libpq finds them.
struct ClientIdentity {
    cert_path: PathBuf,
    key_path: PathBuf,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl ClientIdentity {
    /// The certificate `sslcert` names, else `~/.postgresql/postgresql.crt`
    /// when it exists (none otherwise), with its key from `sslkey`, else
    /// `~/.postgresql/postgresql.key`.
    ///
    /// libpq goes on without a certificate when even a named `sslcert` is
    /// missing; here a named file must exist, since the server would refuse
    /// the connection anyway, with a reason that does not name the file.
    fn load(settings: &TlsSettings) -> Result<Option<ClientIdentity>, String> {
        let cert_path = match &settings.cert {
            Some(path) => {
                let path = PathBuf::from(path);
                if !path.exists() {
                    return Err(format!(
                        "sslcert: the client certificate file {} does not exist",
                        path.display()
                    ));
                }
                path
            }
            None => match home_postgresql_file("postgresql.crt").filter(|path| path.exists()) {
                Some(path) => path,
                None => return Ok(None),
            },
        };
        let key_path = match &settings.key {
            Some(path) => PathBuf::from(path),
            None => home_postgresql_file("postgresql.key").ok_or_else(|| {
                format!(
                    "the client certificate {} needs its private key: name it with sslkey=FILE",
                    cert_path.display()
                )
            })?,
        };
        let chain = CertificateDer::pem_file_iter(&cert_path)
            .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
            .map_err(|error| format!("cannot read the client certificate {}: {error}", cert_path.display()))?;
        if chain.is_empty() {
            return Err(format!(
                "no certificate in the client certificate file {} (expected PEM)",
                cert_path.display()
            ));
        }
        let key = read_private_key(&key_path, &cert_path)?;
        Ok(Some(ClientIdentity {
            cert_path,
            key_path,
            chain,
            key,
        }))
    }
}

/// The private key of the client certificate `cert_path`, from `path`,
/// refused (as libpq refuses it) when others may read it.
fn read_private_key(path: &Path, cert_path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let shown = path.display();
    let metadata = std::fs::metadata(path).map_err(|error| {
        if error.kind() == io::ErrorKind::NotFound {
            format!(
                "the client certificate {} is there, but its private key file {shown} is not (name it with \
                 sslkey=FILE)",
                cert_path.display()
            )
        } else {
            format!("cannot read the private key file {shown}: {error}")
        }
    })?;
    if let Some(rule) = key_access_refusal(&metadata) {
        return Err(format!("the private key file {shown} can be read by others: {rule}"));
    }
    let pem = std::fs::read(path).map_err(|error| format!("cannot read the private key file {shown}: {error}"))?;
    if pem.windows(b"ENCRYPTED".len()).any(|window| window == b"ENCRYPTED") {
        return Err(format!(
            "the private key in {shown} is encrypted, which is not supported: decrypt it (openssl pkey -in KEY \
             -out PLAIN) and keep the file readable by its owner only"
        ));
    }
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|error| format!("no usable private key in {shown} (expected PEM: PKCS#8, PKCS#1 or SEC1): {error}"))
}

/// libpq's rule for key files: the owner's may be read by the owner only
/// (`u=rw`, 0600), and root's (for a process of another user) by its group
/// too (`u=rw,g=r`, 0640). `Some(the rule)` when the file breaks it.
#[cfg(unix)]
fn key_access_refusal(metadata: &std::fs::Metadata) -> Option<&'static str> {
    use std::os::unix::fs::MetadataExt as _;
    let me = rustix::process::geteuid().as_raw();
    let mode = metadata.mode();
    if metadata.uid() == me && mode & 0o077 != 0 {
        Some("a key file of its own user must have permissions u=rw (0600) or less")
    } else if metadata.uid() == 0 && mode & 0o037 != 0 {
        Some("a key file owned by root must have permissions u=rw,g=r (0640) or less")
    } else {
        None
    }
}

/// libpq checks no permissions where files have no Unix modes.
#[cfg(not(unix))]
fn key_access_refusal(_metadata: &std::fs::Metadata) -> Option<&'static str> {
    None
}

/// A certificate refused in the TLS handshake behind a failed connection:
/// a setup problem that retrying does not fix. Its `Display` says what to
/// check.
#[derive(Debug)]
pub enum CertificateRefusal<'a> {
    /// This client refused the server's (roots, host name, `sslmode`).
    Server(&'a rustls::Error),
    /// The server refused this client's certificate, or its lack of one.
    Client(&'a rustls::Error),
}

impl fmt::Display for CertificateRefusal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertificateRefusal::Server(error) => write!(
                f,
                "the server's certificate is not trusted ({error}); check sslrootcert and the host name \
                 (verify-full wants the name the certificate was issued for)"
            ),
            CertificateRefusal::Client(error) => write!(
                f,
                "the server refused this client's certificate, or requires one ({error}); name it with sslcert \
                 and sslkey (or put it in ~/.postgresql/postgresql.crt and postgresql.key), issued by a CA the \
                 server trusts"
            ),
        }
    }
}

/// The refusal of a certificate behind a failed connection, if that is
/// what failed.
pub fn refused_certificate<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<CertificateRefusal<'a>> {
    use rustls::AlertDescription as Alert;
    match handshake_error(error)? {
        refusal @ rustls::Error::InvalidCertificate(_) => Some(CertificateRefusal::Server(refusal)),
        // What a server answers about the client's certificate (TLS 1.3
        // sends it after the client's half of the handshake).
        refusal @ rustls::Error::AlertReceived(
            Alert::CertificateRequired
            | Alert::BadCertificate
            | Alert::UnsupportedCertificate
            | Alert::CertificateRevoked
            | Alert::CertificateExpired
            | Alert::CertificateUnknown
            | Alert::UnknownCA
            | Alert::AccessDenied,
        ) => Some(CertificateRefusal::Client(refusal)),
        _ => None,
    }
}

/// What rustls said when a TLS handshake failed, if that is what failed.
/// Found by type in the error's sources (the driver's TLS error wraps the
/// I/O error that carries rustls's).
fn handshake_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(error);
    while let Some(error) = current {
        let tls = error.downcast_ref::<rustls::Error>().or_else(|| {
            error
                .downcast_ref::<io::Error>()
                .and_then(io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if tls.is_some() {
            return tls;
        }
        current = error.source();
    }
    None
}

/// `prefer` as libpq has it. The driver connects without TLS only when the
/// server declines it; libpq also does when the server offers TLS but the
/// handshake fails (a certificate key or cipher suite that rustls does not
/// support, such as P-521 or CBC). So with `prefer` one connection is made
/// first, and when its handshake fails `url` is set to connect without
/// TLS, with a warning. Any other failure is returned: the server cannot
/// be reached either way.
pub async fn settle_prefer(url: &mut PgUrl) -> Result<(), tokio_postgres::Error> {
    if url.tls.mode != SslMode::Prefer || url.config.get_ssl_mode() == DriverSslMode::Disable {
        return Ok(());
    }
    // The driver's connect timeout bounds only the TCP connect; a server
    // that accepts and never answers must not hold the open for ever. On
    // expiry the pool tries, bounded by its own timeout, and reports.
    let bound = url
        .config
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(10));
    let probe = async {
        let (client, connection) = url.config.connect(url.tls.clone()).await?;
        // Dropping the client ends the session, and the connection.
        drop(client);
        let _ = connection.await;
        Ok::<(), tokio_postgres::Error>(())
    };
    match tokio::time::timeout(bound, probe).await {
        Ok(Ok(())) => Ok(()),
        Err(_elapsed) => {
            tracing::debug!(?bound, "no answer to the TLS probe; the pool's connection will tell");
            Ok(())
        }
        Ok(Err(error)) => match handshake_error(&error) {
            Some(refusal) => {
                tracing::warn!(
                    error = %refusal,
                    hosts = ?url.config.get_hosts(),
                    "the PostgreSQL server offers TLS, but TLS with it failed; connecting without TLS from now \
                     on, as sslmode=prefer (the default) allows: set sslmode=disable to skip the attempt, or \
                     require to refuse such a server"
                );
                url.config.ssl_mode(DriverSslMode::Disable);
                Ok(())
            }
            None => Err(error),
        },
    }
}

/// libpq's default root certificate file, `~/.postgresql/root.crt`.
fn home_root_cert() -> Option<PathBuf> {
    home_postgresql_file("root.crt")
}

/// `~/.postgresql/<name>`, where libpq looks for its TLS files.
fn home_postgresql_file(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("HOME").filter(|home| !home.is_empty())?;
    Some(Path::new(&home).join(".postgresql").join(name))
}

fn roots_from_file(path: &Path) -> Result<RootCertStore, String> {
    let shown = path.display();
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|error| format!("cannot read the root certificates in {shown}: {error}"))?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(format!(
            "no usable root certificate in {shown} (expected PEM certificates)"
        ));
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(format!(
            "sslrootcert=system: no trusted root certificates found on this system{}",
            if errors.is_empty() {
                String::new()
            } else {
                format!(" ({})", errors.join("; "))
            }
        ));
    }
    Ok(roots)
}

/// The certificate check of the modes that do not check the host's name:
/// none (`prefer`, `require`: any certificate, as libpq), or the chain to
/// `roots` (`verify-ca`). Either way the handshake's signatures are
/// checked, so the server holds the key of the certificate it shows.
#[derive(Debug)]
struct NameBlind {
    /// `None`: any certificate.
    roots: Option<Arc<RootCertStore>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NameBlind {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let certificate = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &certificate,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> io::Result<PgTlsConnect> {
        // The driver names no host for a Unix socket, where the server
        // declines TLS (and `parse_url` does not ask for it when every
        // host is one).
        let Some(config) = self.config.clone().filter(|_| !host.is_empty()) else {
            return Ok(PgTlsConnect(None));
        };
        let name = ServerName::try_from(host.to_owned())
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, format!("host {host:?}: {error}")))?;
        Ok(PgTlsConnect(Some((config, name))))
    }
}

/// One connection's TLS handshake, to the named host; `None` with
/// `sslmode=disable`, where the driver never starts one.
#[derive(Debug)]
pub struct PgTlsConnect(Option<(Arc<ClientConfig>, ServerName<'static>)>);

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let Some((config, name)) = self.0 else {
            return Box::pin(async { Err(io::Error::other("TLS was started with sslmode=disable")) });
        };
        let connector = tokio_rustls::TlsConnector::from(config);
        Box::pin(async move { connector.connect(name, stream).await.map(PgTlsStream) })
    }
}

/// A connection to the server over TLS.
#[derive(Debug)]
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> tokio_postgres::tls::TlsStream for PgTlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S> AsyncRead for PgTlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S> AsyncWrite for PgTlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA certificate that signed nothing.
    const SOME_CA: &str = include_str!("../tests/data/unrelated-ca.pem");

    fn split(url: &str) -> (String, TlsSettings) {
        take_tls_settings(url).unwrap()
    }

    /// `parse_url` with exactly these environment variables set.
    fn parse_with(url: &str, env: &[(&str, &str)]) -> Result<PgUrl, String> {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        parse_url_in(url, &|name| {
            env.iter()
                .find(|(key, value)| key == name && !value.is_empty())
                .map(|(_, value)| value.clone())
        })
    }

    const LIBPQ_ENV: [(&str, &str); 8] = [
        ("PGHOST", "db.example,/run/postgresql"),
        ("PGPORT", "5433,5434"),
        ("PGUSER", "alice"),
        ("PGDATABASE", "tickets"),
        ("PGAPPNAME", "triage-agent"),
        ("PGOPTIONS", "-c statement_timeout=5s"),
        ("PGCONNECT_TIMEOUT", "7"),
        ("PGSSLMODE", "disable"),
    ];

    #[test]
    fn libpq_variables_fill_in_what_the_url_leaves_out() {
        let url = parse_with("postgres://", &LIBPQ_ENV).unwrap();
        let config = &url.config;
        assert_eq!(
            config.get_hosts(),
            [Host::Tcp("db.example".to_owned()), Host::Unix("/run/postgresql".into())]
        );
        assert_eq!(config.get_ports(), [5433, 5434]);
        assert_eq!(config.get_user(), Some("alice"));
        assert_eq!(config.get_dbname(), Some("tickets"));
        assert_eq!(config.get_application_name(), Some("triage-agent"));
        assert_eq!(config.get_options(), Some("-c statement_timeout=5s"));
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(7)));
        assert_eq!(url.tls.mode(), SslMode::Disable);
        assert_eq!(config.get_ssl_mode(), DriverSslMode::Disable);
        // The libpq key=value form too; an address with no host name.
        let url = parse_with("dbname=other", &[("PGHOSTADDR", "127.0.0.1"), ("PGSSLMODE", "prefer")]).unwrap();
        assert_eq!(
            url.config.get_hostaddrs(),
            ["127.0.0.1".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(url.config.get_dbname(), Some("other"));
        // Unset, and empty as unset: the URL's own defaults.
        for env in [&[][..], &[("PGSSLMODE", ""), ("PGUSER", "")][..]] {
            let url = parse_with("postgres://h/d", env).unwrap();
            assert_eq!(url.tls.mode(), SslMode::Prefer);
            assert_eq!(url.config.get_user(), None);
        }
    }

    #[test]
    fn the_url_wins_over_the_environment() {
        let url = parse_with(
            "postgres://bob@h:6000/d?sslmode=require&application_name=mine&connect_timeout=3&options=-c%20x%3Dy",
            &LIBPQ_ENV,
        )
        .unwrap();
        let config = &url.config;
        assert_eq!(config.get_hosts(), [Host::Tcp("h".to_owned())]);
        assert_eq!(config.get_ports(), [6000]);
        assert_eq!(config.get_user(), Some("bob"));
        assert_eq!(config.get_dbname(), Some("d"));
        assert_eq!(config.get_application_name(), Some("mine"));
        assert_eq!(config.get_options(), Some("-c x=y"));
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(url.tls.mode(), SslMode::Require);
        // A host in the URL also keeps PGHOSTADDR out (libpq would pair
        // the URL's host with the variable's address).
        let url = parse_with("postgres://h/d", &[("PGHOSTADDR", "10.1.2.3")]).unwrap();
        assert!(url.config.get_hostaddrs().is_empty());
    }

    #[test]
    fn libpq_tls_files_from_the_environment_are_used_and_checked() {
        let (dir, _) = file_with("ca.pem", SOME_CA);
        let root = dir.0.join("ca.pem");
        let root = root.to_str().unwrap();
        let url = parse_with(
            "postgres://u@h/d",
            &[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", root)],
        )
        .unwrap();
        assert_eq!(url.tls.verification(), Verification::Full);
        // sslrootcert=system alone means verify-full, from the variable too.
        let url = parse_with("postgres://u@h/d", &[("PGSSLROOTCERT", "system")]).unwrap();
        assert_eq!(url.tls.mode(), SslMode::VerifyFull);
        let missing = parse_with(
            "postgres://u@h/d",
            &[("PGSSLMODE", "verify-ca"), ("PGSSLROOTCERT", "/nonexistent/root.crt")],
        )
        .unwrap_err();
        assert!(missing.contains("/nonexistent/root.crt"), "{missing}");
        let missing = parse_with("postgres://u@h/d", &[("PGSSLCERT", "/nonexistent/client.crt")]).unwrap_err();
        assert!(missing.contains("/nonexistent/client.crt"), "{missing}");
    }

    #[test]
    fn bad_libpq_variables_are_named_not_ignored() {
        for (name, value) in [
            ("PGPORT", "fivefour"),
            ("PGHOSTADDR", "db.example"),
            ("PGCONNECT_TIMEOUT", "soon"),
            ("PGSSLMODE", "allow"),
            ("PGSSLCRL", "/etc/ssl/crl.pem"),
            ("PGSSLCRLDIR", "/etc/ssl/crls"),
        ] {
            let error = parse_with("postgres://u:s3cret@/d", &[(name, value)]).unwrap_err();
            assert!(error.contains(name), "{name}: {error}");
            assert!(!error.contains("s3cret"), "{name}: {error}");
        }
        // No limit, as libpq reads 0.
        let url = parse_with("postgres://u@h/d", &[("PGCONNECT_TIMEOUT", "0")]).unwrap();
        assert_eq!(url.config.get_connect_timeout(), None);
    }

    fn driver_mode(url: &str) -> DriverSslMode {
        parse_url(url).unwrap().config.get_ssl_mode()
    }

    /// A file of this test's own holding `contents`, as a URL query value.
    fn file_with(name: &str, contents: &str) -> (tempfile_dir::Dir, String) {
        let dir = tempfile_dir::Dir::new();
        let path = dir.0.join(name);
        std::fs::write(&path, contents).unwrap();
        let encoded = path.display().to_string().replace('%', "%25").replace('/', "%2F");
        (dir, encoded)
    }

    mod tempfile_dir {
        /// A directory removed on drop.
        pub(super) struct Dir(pub(super) std::path::PathBuf);

        impl Dir {
            pub(super) fn new() -> Dir {
                let path = std::env::temp_dir().join(format!("triage-tls-{}", uuid::Uuid::new_v4()));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn the_driver_is_told_require_for_the_verifying_modes_and_never_sees_the_root_file() {
        let (rest, settings) = split(
            "postgres://u:p@db.example:5433/triage?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(rest, "postgres://u:p@db.example:5433/triage?application_name=x");
        assert_eq!(settings.mode, Some(SslMode::VerifyFull));
        assert_eq!(settings.root_cert.as_deref(), Some("/etc/ca.pem"));
        let (rest, settings) = split("postgres://u@h/d?sslmode=verify-ca");
        assert_eq!(rest, "postgres://u@h/d");
        assert_eq!(settings.mode, Some(SslMode::VerifyCa));
        let (_dir, root) = file_with("ca.pem", SOME_CA);
        for mode in ["require", "verify-ca", "verify-full"] {
            let url = format!("postgres://u@h/d?application_name=x&sslmode={mode}&sslrootcert={root}");
            let parsed = parse_url(&url).unwrap();
            assert_eq!(parsed.config.get_ssl_mode(), DriverSslMode::Require, "{mode}");
            assert_eq!(parsed.config.get_application_name(), Some("x"));
        }
        // A percent-encoded key is still the key; the last sslmode wins.
        let (_, settings) = split("postgres://u@h/d?ssl%6Dode=disable&sslmode=require");
        assert_eq!(settings.mode, Some(SslMode::Require));
    }

    #[test]
    fn without_sslmode_the_mode_is_prefer_as_with_libpq_or_verify_full_for_the_system_roots() {
        let (rest, settings) = split("postgresql://u@h/d");
        assert_eq!(rest, "postgresql://u@h/d");
        assert_eq!(settings.effective_mode(), SslMode::Prefer);
        assert_eq!(driver_mode("postgresql://u@h/d"), DriverSslMode::Prefer);
        let (rest, settings) = split("postgres://u@h/d?sslrootcert=system");
        assert_eq!(rest, "postgres://u@h/d");
        assert_eq!(settings.effective_mode(), SslMode::VerifyFull);
        assert_eq!(driver_mode("postgres://u@h/d?sslmode=disable"), DriverSslMode::Disable);
    }

    #[test]
    fn the_query_starts_after_the_credentials_as_the_driver_reads_it() {
        // A password may hold `?`: the query is the first `?` after `@`.
        let parsed = parse_url("postgres://u:pa?ss@h/d?sslmode=require").unwrap();
        assert_eq!(parsed.config.get_password(), Some(&b"pa?ss"[..]));
        assert_eq!(parsed.config.get_dbname(), Some("d"));
        assert_eq!(parsed.tls.mode(), SslMode::Require);
        // Nothing in the password is read as a setting.
        let parsed = parse_url("postgres://u:p?sslmode=hunter2@h/d").unwrap();
        assert_eq!(parsed.tls.mode(), SslMode::Prefer);
        assert_eq!(parsed.config.get_password(), Some(&b"p?sslmode=hunter2"[..]));
        // No query, a bare `?`, empty pairs (which the driver alone would
        // refuse).
        for url in [
            "postgres://u@h/d",
            "postgres://u@h/d?",
            "postgres://u@h/d?&&sslmode=require&",
        ] {
            let parsed = parse_url(url).unwrap();
            assert_eq!(parsed.config.get_dbname(), Some("d"), "{url}");
        }
    }

    #[test]
    fn values_are_decoded_leniently_as_the_driver_decodes_them() {
        let parsed = parse_url("postgres://u@h/d?application_name=100%sure").unwrap();
        assert_eq!(parsed.config.get_application_name(), Some("100%sure"));
        assert_eq!(percent_decode("a%2Fb%+1%4").unwrap(), "a/b%+1%4");
        assert_eq!(percent_decode("%C3%A9").unwrap(), "é");
        assert!(percent_decode("%FF").is_err());
    }

    #[test]
    fn sockets_never_use_tls_and_prefer_needs_a_host_name() {
        // libpq: no TLS over a Unix socket, whatever sslmode says.
        for mode in ["prefer", "require", "verify-full&sslrootcert=system"] {
            let url = format!("postgres://u@%2Fvar%2Frun%2Fpostgresql/d?sslmode={mode}");
            assert_eq!(driver_mode(&url), DriverSslMode::Disable, "{mode}");
        }
        assert_eq!(
            driver_mode("host=/var/run/postgresql user=u dbname=d"),
            DriverSslMode::Disable
        );
        // Only an address: nothing to start TLS with under `prefer`.
        assert_eq!(
            driver_mode("postgres://u@/d?hostaddr=127.0.0.1"),
            DriverSslMode::Disable
        );
        assert!(parse_url("postgres://u@/d?hostaddr=127.0.0.1&sslmode=require").is_err());
        assert_eq!(
            driver_mode("postgres://u@localhost/d?hostaddr=127.0.0.1"),
            DriverSslMode::Prefer
        );
        // A socket path beside hostaddr is TCP without a name: prefer goes
        // plain, a mode that needs TLS is refused, never downgraded.
        let beside = "postgres://u@%2Fvar%2Frun%2Fpostgresql/d?hostaddr=127.0.0.1";
        assert_eq!(driver_mode(beside), DriverSslMode::Disable);
        for mode in ["require", "verify-ca&sslrootcert=system", "verify-full"] {
            let message = parse_url(&format!("{beside}&sslmode={mode}")).unwrap_err();
            assert!(
                message.contains("needs a host name for every server"),
                "{mode}: {message}"
            );
        }
        let mixed = "host=db.example,/var/run/postgresql user=u dbname=d sslmode=require";
        assert!(
            parse_url(mixed)
                .unwrap_err()
                .contains("needs a host name for every server")
        );
        assert_eq!(
            driver_mode("host=db.example,/var/run/postgresql user=u dbname=d"),
            DriverSslMode::Prefer
        );
        // A socket in a mixed list under prefer gets no handshake (the
        // driver names no host for it, and the server declines TLS there).
        let mut tls = parse_url("postgres://u@h/d").unwrap().tls;
        let connect: PgTlsConnect = MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(&mut tls, "").unwrap();
        assert!(connect.0.is_none());
    }

    #[test]
    fn the_key_value_form_is_read_with_quotes_and_escapes() {
        let (rest, settings) = split(
            r"host=db.example  user = u password='it\'s a 100% secret' sslmode=verify-full sslrootcert='/etc/my ca.pem'",
        );
        assert_eq!(settings.mode, Some(SslMode::VerifyFull));
        assert_eq!(settings.root_cert.as_deref(), Some("/etc/my ca.pem"));
        let config: Config = rest.parse().unwrap();
        assert_eq!(config.get_user(), Some("u"));
        assert_eq!(config.get_password(), Some(&b"it's a 100% secret"[..]));
        let (_, settings) = split("host=h sslrootcert=/etc/100%25.pem");
        assert_eq!(settings.root_cert.as_deref(), Some("/etc/100%25.pem"));
        assert!(take_tls_settings("host=h sslmode").is_err());
        assert!(take_tls_settings("host='h").is_err());
    }

    #[test]
    fn bad_tls_settings_are_refused_with_a_message_that_never_holds_the_url() {
        let refused = |url: &str| parse_url(url).unwrap_err();
        let message = refused("postgres://u:hunter2@h/d?sslmode=allow");
        assert!(message.contains("invalid sslmode \"allow\""), "{message}");
        let message = refused("postgres://u:hunter2@h/d?sslcert=%2Fno%2Fsuch%2Fc.pem");
        assert!(
            message.contains("client certificate file /no/such/c.pem does not exist"),
            "{message}"
        );
        let message = refused("postgres://u:hunter2@h/d?sslpassword=hunter3");
        assert!(
            message.contains("encrypted private keys are not supported"),
            "{message}"
        );
        assert!(!message.contains("hunter3"), "{message}");
        let message = refused("postgres://u:hunter2@h/d?sslmode=verify-full&sslrootcert=%2Fno%2Fsuch%2Fca.pem");
        assert!(
            message.contains("cannot read the root certificates in /no/such/ca.pem"),
            "{message}"
        );
        let message = refused("postgres://u:hunter2@h/d?sslcrl=%2Fc.crl");
        assert!(
            message.contains("certificate revocation lists are not supported"),
            "{message}"
        );
        let message = refused("postgres://u:hunter2@h/d?sslmode=require&sslrootcert=system");
        assert!(
            message.contains("sslrootcert=system needs sslmode=verify-full"),
            "{message}"
        );
        // The driver's reason comes with its refusal.
        let message = refused("postgres://u:hunter2@h/d?sslmode=require&bogus=1");
        assert!(message.contains("unknown option `bogus`"), "{message}");
        let message = refused("postgres://u:hunter2@h:notaport/d");
        assert!(message.contains("invalid value for option `port`"), "{message}");
        for url in [
            "postgres://u:hunter2@h/d?sslmode=allow",
            "postgres://u:hunter2@h/d?sslmode=require&bogus=1",
            "postgres://u:hunter2@h:notaport/d",
            "user=u password=hunter2 host=h bogus=1",
        ] {
            let message = refused(url);
            assert!(!message.contains("hunter2"), "{message}");
        }
    }

    /// A test file of `tests/data`, copied into `dir` readable by its
    /// owner only (git checks every file out readable by all), its path
    /// as a URL value.
    fn private_copy(dir: &tempfile_dir::Dir, name: &str) -> String {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.0.join(name);
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name),
            &path,
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path.display().to_string().replace('%', "%25").replace('/', "%2F")
    }

    #[test]
    fn a_client_certificate_is_loaded_with_its_key_in_every_mode_that_uses_tls() {
        let dir = tempfile_dir::Dir::new();
        let (cert, key) = (private_copy(&dir, "client.pem"), private_copy(&dir, "client.key"));
        for mode in ["prefer", "require"] {
            let url = parse_url(&format!("postgres://u@h/d?sslmode={mode}&sslcert={cert}&sslkey={key}")).unwrap();
            assert_eq!(
                url.tls.client_certificate(),
                Some(dir.0.join("client.pem").as_path()),
                "{mode}"
            );
        }
        let url = parse_url(&format!(
            "host=h user=u sslcert={} sslkey={}",
            dir.0.join("client.pem").display(),
            dir.0.join("client.key").display()
        ))
        .unwrap();
        assert!(url.tls.client_certificate().is_some());
        // Without TLS the files are not even read, as with libpq.
        let url = parse_url("postgres://u@h/d?sslmode=disable&sslcert=%2Fno%2Fsuch%2Fc.pem").unwrap();
        assert_eq!(url.tls.client_certificate(), None);
        let url = parse_url("postgres://u@h/d?sslmode=require&sslcert=").unwrap();
        assert_eq!(
            url.tls.client_certificate(),
            None,
            "empty: the default file, which is not in this HOME"
        );
    }

    #[test]
    fn client_keys_that_cannot_be_used_or_are_exposed_are_refused_by_name() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile_dir::Dir::new();
        let cert = private_copy(&dir, "client.pem");
        let refused = |key: &str| {
            parse_url(&format!(
                "postgres://u:hunter2@h/d?sslmode=require&sslcert={cert}&sslkey={key}"
            ))
            .unwrap_err()
        };
        let message = refused("%2Fno%2Fsuch%2Fclient.key");
        assert!(
            message.contains("its private key file /no/such/client.key is not"),
            "{message}"
        );
        let message = refused(&private_copy(&dir, "client-encrypted.key"));
        assert!(message.contains("is encrypted, which is not supported"), "{message}");
        // The stand-in server's key: a real key, not this certificate's.
        let message = refused(&private_copy(&dir, "stand-in.key"));
        assert!(message.contains("cannot use the client certificate"), "{message}");
        assert!(message.contains("stand-in.key"), "{message}");
        let message = refused(&private_copy(&dir, "client.pem"));
        assert!(message.contains("no usable private key"), "{message}");
        let exposed = private_copy(&dir, "client.key");
        std::fs::set_permissions(dir.0.join("client.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let message = refused(&exposed);
        assert!(message.contains("can be read by others"), "{message}");
        assert!(message.contains("0600"), "{message}");
        // A certificate file without a certificate.
        let key = private_copy(&dir, "stand-in.key");
        let message = parse_url(&format!("postgres://u@h/d?sslmode=require&sslcert={key}&sslkey={key}")).unwrap_err();
        assert!(
            message.contains("no certificate in the client certificate file"),
            "{message}"
        );
        for message in [refused("%2Fno%2Fsuch"), refused(&exposed)] {
            assert!(!message.contains("hunter2"), "{message}");
        }
    }

    #[test]
    fn a_root_file_without_certificates_is_refused() {
        let (_dir, root) = file_with("empty.pem", "not a certificate\n");
        let message = parse_url(&format!("postgres://u@h/d?sslmode=verify-ca&sslrootcert={root}")).unwrap_err();
        assert!(message.contains("no usable root certificate in"), "{message}");
    }

    #[test]
    fn require_checks_the_chain_once_roots_are_named() {
        let (_dir, root) = file_with("ca.pem", SOME_CA);
        let named = parse_url(&format!("postgres://u@h/d?sslmode=require&sslrootcert={root}")).unwrap();
        assert_eq!(named.tls.verification(), Verification::Chain);
        let full = parse_url(&format!("postgres://u@h/d?sslmode=verify-full&sslrootcert={root}")).unwrap();
        assert_eq!(full.tls.verification(), Verification::Full);
        let unnamed = parse_url("postgres://u@h/d?sslmode=require").unwrap().tls;
        let expected = if home_root_cert().is_some_and(|path| path.exists()) {
            Verification::Chain
        } else {
            Verification::None
        };
        assert_eq!(unnamed.verification(), expected);
        assert_eq!(
            parse_url("postgres://u@h/d?sslmode=disable").unwrap().tls.mode(),
            SslMode::Disable
        );
        // An empty sslrootcert is libpq's default file, not a file named "".
        let (_, settings) = split("postgres://u@h/d?sslmode=require&sslrootcert=");
        assert_eq!(settings.root_cert, None);
    }
}
