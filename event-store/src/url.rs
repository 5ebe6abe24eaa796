//! Store URLs: the small string handling every backend chooser shares.

/// A Triage parameter given twice in one URL (`?schema=a&schema=b`): which
/// one was meant cannot be told, so neither is taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the URL gives {name}= more than once; give it once")]
pub struct RepeatedParameter {
    /// The parameter.
    pub name: String,
}

/// Takes the query parameter `name` out of `url`: the URL without it, and
/// its value. Backends use this for Triage's own parameters (`namespace`,
/// `schema`) before handing the rest to their driver, which would reject or
/// ignore them.
pub fn take_query_parameter(url: &str, name: &str) -> Result<(String, Option<String>), RepeatedParameter> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), None));
    };
    let mut value = None;
    let mut repeated = false;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some((key, found)) if key.eq_ignore_ascii_case(name) => {
                repeated |= value.replace(found.to_owned()).is_some();
                false
            }
            _ => !pair.is_empty(),
        })
        .collect();
    if repeated {
        return Err(RepeatedParameter { name: name.to_owned() });
    }
    if kept.is_empty() {
        Ok((base.to_owned(), value))
    } else {
        Ok((format!("{base}?{}", kept.join("&")), value))
    }
}

/// `url` with the password of its `user:password@` part replaced by `***`,
/// for messages and logs.
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((credentials, host)) if credentials.contains(':') => {
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_come_out_and_the_rest_stays() {
        assert_eq!(
            take_query_parameter(
                "esdb://h:2113?tls=false&namespace=prod&discoveryInterval=0",
                "namespace"
            ),
            Ok((
                "esdb://h:2113?tls=false&discoveryInterval=0".to_owned(),
                Some("prod".to_owned())
            ))
        );
        assert_eq!(
            take_query_parameter("postgres://u@h/db?schema=s", "schema"),
            Ok(("postgres://u@h/db".to_owned(), Some("s".to_owned())))
        );
        assert_eq!(
            take_query_parameter("esdb://h:2113", "namespace"),
            Ok(("esdb://h:2113".to_owned(), None))
        );
        assert_eq!(
            take_query_parameter("postgres://u@h/db?schema=public&schema=other", "schema"),
            Err(RepeatedParameter {
                name: "schema".to_owned()
            })
        );
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact_password("esdb://admin:changeit@h:2113?tls=true"),
            "esdb://admin:***@h:2113?tls=true"
        );
        assert_eq!(redact_password("postgres://bob@h/db"), "postgres://bob@h/db");
        assert_eq!(redact_password("./triage.db"), "./triage.db");
    }
}

/// The slip in `value` if it looks like a URL of one of `schemes` but is
/// not one (`postgres:db`, `postgres//host/db`): the scheme it names, and
/// what to say. A caller that takes plain paths too would otherwise make
/// a file of that name, in silence.
pub fn url_slip(value: &str, schemes: &[&str]) -> Option<String> {
    if value.contains("://") {
        return None;
    }
    let lower = value.to_ascii_lowercase();
    let scheme = schemes.iter().find(|scheme| {
        lower
            .strip_prefix(**scheme)
            .is_some_and(|rest| rest.starts_with(':') || rest.starts_with("//"))
    })?;
    Some(format!(
        "{value:?} looks like a {scheme} URL but is not one: write {scheme}://…; a file of that name is written \
         ./{value}"
    ))
}

/// Whether `schema` may name a PostgreSQL schema of Triage's: 1 to
/// `max_bytes` lowercase ASCII letters, digits and `_`, not starting with a
/// digit, and not one of PostgreSQL's own (`pg_…`, `information_schema`).
/// Such a name never needs quoting or escaping in SQL or in a channel
/// name. `Err` says the rule.
pub fn check_pg_schema_name(schema: &str, max_bytes: usize) -> Result<(), String> {
    let valid_start = schema
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let valid_rest = schema
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    let system = schema.starts_with("pg_") || schema == "information_schema";
    if !valid_start || !valid_rest || schema.len() > max_bytes || system {
        return Err(format!(
            "invalid PostgreSQL schema name {schema:?}: use 1 to {max_bytes} lowercase ASCII letters, digits or \
             '_', not starting with a digit, and not a schema of PostgreSQL's own ('pg_…', information_schema)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod schema_name_tests {
    use super::check_pg_schema_name;

    #[test]
    fn plain_names_pass_and_system_or_odd_ones_do_not() {
        for good in ["triage", "triage_read", "_x", "t2"] {
            assert!(check_pg_schema_name(good, 48).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Triage",
            "2t",
            "a-b",
            "pg_triage",
            "information_schema",
            "a\"b",
            &"x".repeat(49),
        ] {
            assert!(check_pg_schema_name(bad, 48).is_err(), "{bad}");
        }
    }
}
