//! TLS to PostgreSQL, with libpq's `sslmode` and `sslrootcert`.
//!
//! A URL's `sslmode` means what it means to `psql` (libpq):
//! - `disable`: no TLS.
//! - `prefer` (without `sslmode`): TLS when the server offers it, plain
//!   otherwise; the server's certificate is not checked.
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
//! verifiers. Client certificates (`sslcert`, `sslkey`) are not supported:
//! a URL naming one is refused, rather than connecting without it.
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

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::Config;
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
    fn for_driver(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "require",
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
pub fn parse_url(url: &str) -> Result<PgUrl, String> {
    let (rest, settings) = take_tls_settings(url)?;
    let config = rest.parse::<Config>().map_err(|error| {
        // The driver's message names the bad part, never the URL.
        format!("invalid PostgreSQL URL (expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE): {error}")
    })?;
    let tls = PgTls::new(settings)?;
    Ok(PgUrl { config, tls })
}

/// The TLS parameters of a URL, as written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct TlsSettings {
    mode: Option<SslMode>,
    root_cert: Option<String>,
}

/// Client certificate parameters, which are refused (see the module docs).
const CLIENT_CERTIFICATE_KEYS: [&str; 3] = ["sslcert", "sslkey", "sslpassword"];

/// Splits the TLS settings off `url`: the URL for the driver (with its
/// `sslmode` in the driver's terms), and the settings.
fn take_tls_settings(url: &str) -> Result<(String, TlsSettings), String> {
    let mut settings = TlsSettings::default();
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => settings.mode = Some(SslMode::parse(value)?),
            "sslrootcert" => settings.root_cert = Some(value.to_owned()),
            key if CLIENT_CERTIFICATE_KEYS.contains(&key) => {
                return Err(format!(
                    "{key} in the PostgreSQL URL: client certificates are not supported; authenticate with a \
                     password (TLS still protects it)"
                ));
            }
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let (key, value) = (percent_decode(key)?, percent_decode(value)?);
            if !take(&key, &value)? {
                kept.push(pair);
            }
        }
        let mode = settings.effective_mode().for_driver();
        let query = kept.join("&");
        if query.is_empty() {
            format!("{base}?sslmode={mode}")
        } else {
            format!("{base}?{query}&sslmode={mode}")
        }
    } else {
        let mut kept = Vec::new();
        for (key, value) in key_value_pairs(url)? {
            if !take(&key, &value)? {
                kept.push(format!("{key}={}", quote(&value)));
            }
        }
        kept.push(format!("sslmode={}", settings.effective_mode().for_driver()));
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

/// `%XX` decoded, as the driver decodes URL parts.
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let byte = text
                .get(index + 1..index + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| "invalid percent-encoding in the PostgreSQL URL's parameters".to_owned())?;
            decoded.push(byte);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
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
}

impl fmt::Debug for PgTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTls")
            .field("mode", &self.mode)
            .field("verification", &self.verification)
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
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match verification {
            Verification::None => Arc::new(AnyCertificate(Arc::clone(&provider))),
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
                    Arc::new(ChainOnly {
                        roots,
                        provider: Arc::clone(&provider),
                    })
                }
            }
        };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| format!("cannot set TLS up: {error}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        // What libpq 17 sends; servers that do not know ALPN ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(PgTls {
            mode,
            verification,
            config: Some(Arc::new(config)),
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
}

/// The refusal of a server's certificate behind a failed connection, if
/// that is what failed: a setup problem (roots, host name, `sslmode`) that
/// retrying does not fix. Found by type in the error's sources (the
/// driver's TLS error wraps the I/O error that carries rustls's).
pub fn refused_certificate<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(error);
    while let Some(error) = current {
        let tls = error.downcast_ref::<rustls::Error>().or_else(|| {
            error
                .downcast_ref::<io::Error>()
                .and_then(io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(tls @ rustls::Error::InvalidCertificate(_)) = tls {
            return Some(tls);
        }
        current = error.source();
    }
    None
}

/// libpq's default root certificate file, `~/.postgresql/root.crt`.
fn home_root_cert() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").filter(|home| !home.is_empty())?;
    Some(Path::new(&home).join(".postgresql").join("root.crt"))
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

/// `prefer` and `require`: any certificate, as libpq. The handshake's
/// signatures are still checked, so the server holds the key of the
/// certificate it shows.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain to a trusted root, not the name.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let certificate = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &certificate,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
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
        let Some(config) = self.config.clone() else {
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

    fn split(url: &str) -> (String, TlsSettings) {
        take_tls_settings(url).unwrap()
    }

    #[test]
    fn the_driver_is_told_require_for_the_verifying_modes_and_never_sees_the_root_file() {
        let (rest, settings) = split(
            "postgres://u:p@db.example:5433/triage?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(
            rest,
            "postgres://u:p@db.example:5433/triage?application_name=x&sslmode=require"
        );
        assert_eq!(settings.mode, Some(SslMode::VerifyFull));
        assert_eq!(settings.root_cert.as_deref(), Some("/etc/ca.pem"));
        let config: Config = rest.parse().unwrap();
        assert_eq!(config.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert_eq!(config.get_application_name(), Some("x"));

        let (rest, settings) = split("postgres://u@h/d?sslmode=verify-ca");
        assert_eq!(rest, "postgres://u@h/d?sslmode=require");
        assert_eq!(settings.mode, Some(SslMode::VerifyCa));
    }

    #[test]
    fn without_sslmode_the_mode_is_prefer_as_with_libpq_or_verify_full_for_the_system_roots() {
        let (rest, settings) = split("postgresql://u@h/d");
        assert_eq!(rest, "postgresql://u@h/d?sslmode=prefer");
        assert_eq!(settings.effective_mode(), SslMode::Prefer);
        let (rest, settings) = split("postgres://u@h/d?sslrootcert=system");
        assert_eq!(rest, "postgres://u@h/d?sslmode=require");
        assert_eq!(settings.effective_mode(), SslMode::VerifyFull);
        let (rest, _) = split("postgres://u@h/d?sslmode=disable");
        assert_eq!(rest, "postgres://u@h/d?sslmode=disable");
    }

    #[test]
    fn the_key_value_form_is_read_with_quotes_and_escapes() {
        let (rest, settings) = split(
            r"host=db.example  user = u password='it\'s a secret' sslmode=verify-full sslrootcert='/etc/my ca.pem'",
        );
        assert_eq!(settings.mode, Some(SslMode::VerifyFull));
        assert_eq!(settings.root_cert.as_deref(), Some("/etc/my ca.pem"));
        let config: Config = rest.parse().unwrap();
        assert_eq!(config.get_user(), Some("u"));
        assert_eq!(config.get_password(), Some(&b"it's a secret"[..]));
        assert_eq!(config.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert!(take_tls_settings("host=h sslmode").is_err());
        assert!(take_tls_settings("host='h").is_err());
    }

    #[test]
    fn bad_tls_settings_are_refused_with_a_message_that_never_holds_the_url() {
        let refused = |url: &str| parse_url(url).unwrap_err();
        let message = refused("postgres://u:hunter2@h/d?sslmode=allow");
        assert!(message.contains("invalid sslmode \"allow\""), "{message}");
        let message = refused("postgres://u:hunter2@h/d?sslcert=%2Fc.pem");
        assert!(message.contains("client certificates are not supported"), "{message}");
        let message = refused("postgres://u:hunter2@h/d?sslmode=verify-full&sslrootcert=%2Fno%2Fsuch%2Fca.pem");
        assert!(
            message.contains("cannot read the root certificates in /no/such/ca.pem"),
            "{message}"
        );
        let message = refused("postgres://u:hunter2@h/d?sslmode=require&sslrootcert=system");
        assert!(
            message.contains("sslrootcert=system needs sslmode=verify-full"),
            "{message}"
        );
        let message = refused("postgres://u:hunter2@h/d?sslrootcert=%ZZ");
        assert!(message.contains("invalid percent-encoding"), "{message}");
        let message = refused("postgres://u:hunter2@h/d?sslmode=require&bogus=1");
        assert!(message.contains("invalid PostgreSQL URL"), "{message}");
        for message in [
            refused("postgres://u:hunter2@h/d?sslmode=allow"),
            refused("postgres://u:hunter2@h/d?sslmode=require&bogus=1"),
        ] {
            assert!(!message.contains("hunter2"), "{message}");
        }
    }

    #[test]
    fn a_root_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("triage-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("empty.pem");
        std::fs::write(&file, "not a certificate\n").unwrap();
        let url = format!(
            "postgres://u@h/d?sslmode=verify-ca&sslrootcert={}",
            file.display().to_string().replace('/', "%2F")
        );
        let message = parse_url(&url).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(message.contains("no usable root certificate in"), "{message}");
    }

    #[test]
    fn require_checks_the_chain_once_roots_are_named() {
        let home_file = home_root_cert().filter(|path| path.exists());
        let tls = parse_url("postgres://u@h/d?sslmode=require").unwrap().tls;
        let expected = if home_file.is_some() {
            Verification::Chain
        } else {
            Verification::None
        };
        assert_eq!(tls.verification(), expected);
        assert_eq!(
            parse_url("postgres://u@h/d?sslmode=disable").unwrap().tls.mode(),
            SslMode::Disable
        );
    }
}
