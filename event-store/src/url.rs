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
