//! Connection URLs as a backend may show them in `Debug` output and error messages: without
//! secrets.

/// What a secret is replaced with.
const REDACTED: &str = "***";

/// `input` with its password, and the value of every query parameter whose name mentions a
/// password, a secret or a token (`?password=`, `?sslpassword=`, `redis+unix:///run/redis.sock?pass=`),
/// replaced by `***`: `postgres://app:***@db.internal:5432/app`. A string that does not parse as
/// a URL is not shown at all (where a password ends in it cannot be told).
///
/// ```
/// use es_core::contract::redact_url;
///
/// assert_eq!(redact_url("redis://:s3cret@cache:6379/0"), "redis://:***@cache:6379/0");
/// assert_eq!(redact_url("host=db password=s3cret"), "<invalid URL, not shown>");
/// ```
pub fn redact_url(input: &str) -> String {
    let Ok(mut parsed) = ::url::Url::parse(input.trim()) else {
        return "<invalid URL, not shown>".to_owned();
    };
    if parsed.password().is_some() {
        // Fails only for URLs that cannot have credentials, which have no password either.
        let _ = parsed.set_password(Some(REDACTED));
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(key, value)| {
                let value = if is_secret(&key) {
                    REDACTED.to_owned()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("pass") || key.contains("secret") || key.contains("token")
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_replaced() {
        for (input, shown) in [
            (
                "postgres://app:s3cret@db.internal:5432/app",
                "postgres://app:***@db.internal:5432/app",
            ),
            (
                "postgresql://app:p%40ss%2Fs3cret@db.internal/app?sslmode=require",
                "postgresql://app:***@db.internal/app?sslmode=require",
            ),
            (
                "postgres://app@db.internal/app?password=s3cret&application_name=x",
                "postgres://app@db.internal/app?password=***&application_name=x",
            ),
            (
                "postgres://app@db.internal/app?sslpassword=s3cret",
                "postgres://app@db.internal/app?sslpassword=***",
            ),
            (
                "postgres://app@db.internal/app",
                "postgres://app@db.internal/app",
            ),
            (
                "redis://:s3cret@cache.internal:6379/0",
                "redis://:***@cache.internal:6379/0",
            ),
            (
                "rediss://relay:s3cret@cache.internal/2",
                "rediss://relay:***@cache.internal/2",
            ),
            (
                "redis+unix:///run/redis.sock?db=1&user=relay&pass=s3cret",
                "redis+unix:///run/redis.sock?db=1&user=relay&pass=***",
            ),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            (
                "postgres://app:s3cret@db:notaport/app",
                "<invalid URL, not shown>",
            ),
            ("host=db password=s3cret", "<invalid URL, not shown>"),
        ] {
            assert_eq!(redact_url(input), shown, "{input}");
        }
    }
}
