//! Connection URLs as they may appear in `Debug` output and error messages: without secrets.

/// What a secret is replaced with.
const REDACTED: &str = "***";

/// `input` with its password, and the value of every query parameter whose name mentions a
/// password or a secret (`redis+unix:///run/redis.sock?pass=`), replaced by `***`:
/// `redis://app:***@cache.internal:6379/0`. A string that does not parse as a URL is not
/// shown at all (where a password ends in it cannot be told).
pub(crate) fn url(input: &str) -> String {
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
    use super::url;

    #[test]
    fn passwords_are_replaced() {
        for (input, shown) in [
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
            ("redis://:s3cret@cache:notaport", "<invalid URL, not shown>"),
        ] {
            assert_eq!(url(input), shown, "{input}");
        }
    }
}
