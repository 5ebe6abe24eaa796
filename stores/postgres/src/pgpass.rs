//! Passwords kept out of the URL, where libpq finds them: `PGPASSWORD`,
//! then the password file (`PGPASSFILE`, else `~/.pgpass`).
//!
//! A password in a `postgres://` URL shows in shell history and, given on
//! the command line, in the process list; `psql` users keep it in
//! `~/.pgpass` instead, and Triage reads the same file by libpq's rules:
//! - a URL's own password wins, then `PGPASSWORD`, then the file;
//! - each line is `hostname:port:database:username:password`, `*` matches
//!   anything, `\` escapes `:` and `\`, lines starting with `#` are
//!   comments, and the first line that matches is used;
//! - the host is the URL's first; `localhost` also matches a Unix socket;
//!   the port defaults to 5432 and the database to the user's name;
//! - a file that others may read or write is ignored, with a warning, as
//!   libpq ignores it.
//!
//! The driver (tokio-postgres) takes one password for all of a URL's
//! hosts, so the first host's line serves them all.

use std::path::{Path, PathBuf};

use tokio_postgres::Config;
use tokio_postgres::config::Host;

/// Gives `config` a password from `PGPASSWORD` or the password file when
/// its URL named none.
pub(crate) fn fill_password(config: &mut Config) {
    if config.get_password().is_some() {
        return;
    }
    if let Some(password) = std::env::var_os("PGPASSWORD").filter(|password| !password.is_empty()) {
        config.password(password.as_encoded_bytes());
        return;
    }
    let Some(file) = password_file() else {
        return;
    };
    let Ok(contents) = std::fs::read_to_string(&file) else {
        return;
    };
    if let Some(exposed) = exposed(&file) {
        tracing::warn!(
            file = %file.display(),
            "the PostgreSQL password file is ignored: {exposed}; permissions should be u=rw (0600) or less"
        );
        return;
    }
    if let Some(password) = find_password(&contents, &Lookup::of(config)) {
        config.password(password);
    }
}

/// `PGPASSFILE`, else `~/.pgpass`.
fn password_file() -> Option<PathBuf> {
    if let Some(file) = std::env::var_os("PGPASSFILE").filter(|file| !file.is_empty()) {
        return Some(PathBuf::from(file));
    }
    let home = std::env::var_os("HOME").filter(|home| !home.is_empty())?;
    Some(Path::new(&home).join(".pgpass"))
}

/// Why others could read or change `file` (libpq's test), if they could.
#[cfg(unix)]
fn exposed(file: &Path) -> Option<&'static str> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = std::fs::metadata(file).ok()?;
    if !metadata.is_file() {
        return Some("it is not a plain file");
    }
    (metadata.mode() & 0o077 != 0).then_some("it has group or world access")
}

#[cfg(not(unix))]
fn exposed(_file: &Path) -> Option<&'static str> {
    None
}

/// What a password file line is matched against.
#[derive(Debug, PartialEq, Eq)]
struct Lookup {
    host: String,
    /// Whether the host is a Unix socket, which `localhost` also matches.
    socket: bool,
    port: String,
    database: String,
    user: String,
}

impl Lookup {
    fn of(config: &Config) -> Lookup {
        let (host, socket) = match config.get_hosts().first() {
            Some(Host::Tcp(name)) => (name.clone(), false),
            Some(Host::Unix(path)) => (path.display().to_string(), true),
            // The driver's default: the local socket.
            None => ("localhost".to_owned(), true),
        };
        let user = config.get_user().unwrap_or_default().to_owned();
        Lookup {
            host,
            socket,
            port: config.get_ports().first().copied().unwrap_or(5432).to_string(),
            database: config.get_dbname().map_or_else(|| user.clone(), str::to_owned),
            user,
        }
    }
}

/// The password of the first line of `contents` that matches `lookup`.
fn find_password(contents: &str, lookup: &Lookup) -> Option<String> {
    contents
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(fields)
        .find(|[host, port, database, user, _]| {
            let host_matches = host == "*" || *host == lookup.host || (lookup.socket && host == "localhost");
            host_matches
                && (port == "*" || *port == lookup.port)
                && (database == "*" || *database == lookup.database)
                && (user == "*" || *user == lookup.user)
        })
        .map(|[.., password]| password)
}

/// The five fields of a line, unescaped; `None` for a line with fewer.
/// The password ends at its first unescaped `:`, as libpq reads it.
fn fields(line: &str) -> Option<[String; 5]> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut fields: Vec<String> = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(escaped) = chars.next() {
                    fields.last_mut()?.push(escaped);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            ':' => break,
            c => fields.last_mut()?.push(c),
        }
    }
    fields.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(url: &str) -> Lookup {
        Lookup::of(&url.parse::<Config>().unwrap())
    }

    #[test]
    fn the_first_matching_line_wins_with_wildcards_and_escapes() {
        let file = "\
# comments and short lines are skipped
db.example.com:5432
db.example.com:5433:*:triage:wrong-port
db.example.com:5432:other:triage:wrong-database
db.example.com:*:triage:triage:p\\:ss\\\\word:ignored
*:*:*:*:fallback
";
        let at = |url| find_password(file, &lookup(url));
        assert_eq!(
            at("postgres://triage@db.example.com/triage").as_deref(),
            Some("p:ss\\word")
        );
        assert_eq!(
            at("postgres://triage@db.example.com:5433/triage").as_deref(),
            Some("wrong-port")
        );
        assert_eq!(
            at("postgres://triage@db.example.com/other").as_deref(),
            Some("wrong-database")
        );
        assert_eq!(at("postgres://someone@elsewhere/x").as_deref(), Some("fallback"));
        // Without a database, the user's name is the database.
        assert_eq!(at("host=db.example.com user=triage").as_deref(), Some("p:ss\\word"));
    }

    #[test]
    fn localhost_also_matches_a_unix_socket_and_nothing_matches_nothing() {
        let file = "localhost:5432:triage:triage:local\n";
        assert_eq!(
            find_password(file, &lookup("postgres://triage@%2Fvar%2Frun%2Fpostgresql/triage")).as_deref(),
            Some("local")
        );
        assert_eq!(
            find_password(file, &lookup("postgres://triage@localhost/triage")).as_deref(),
            Some("local")
        );
        assert_eq!(find_password(file, &lookup("postgres://triage@127.0.0.1/triage")), None);
        assert_eq!(find_password("", &lookup("postgres://triage@localhost/triage")), None);
    }

    #[test]
    fn a_password_in_the_url_is_never_replaced() {
        let mut config: Config = "postgres://triage:from-url@localhost/triage".parse().unwrap();
        fill_password(&mut config);
        assert_eq!(config.get_password(), Some(&b"from-url"[..]));
    }
}
