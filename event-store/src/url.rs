//! Store URLs: the small string handling every backend chooser shares.

/// Takes the query parameter `name` out of `url`: the URL without it, and
/// its value. Backends use this for Triage's own parameters (`namespace`,
/// `schema`) before handing the rest to their driver, which would reject or
/// ignore them.
pub fn take_query_parameter(url: &str, name: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut value = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some((key, found)) if key.eq_ignore_ascii_case(name) => {
                value = Some(found.to_owned());
                false
            }
            _ => !pair.is_empty(),
        })
        .collect();
    if kept.is_empty() {
        (base.to_owned(), value)
    } else {
        (format!("{base}?{}", kept.join("&")), value)
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
            (
                "esdb://h:2113?tls=false&discoveryInterval=0".to_owned(),
                Some("prod".to_owned())
            )
        );
        assert_eq!(
            take_query_parameter("postgres://u@h/db?schema=s", "schema"),
            ("postgres://u@h/db".to_owned(), Some("s".to_owned()))
        );
        assert_eq!(
            take_query_parameter("esdb://h:2113", "namespace"),
            ("esdb://h:2113".to_owned(), None)
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
