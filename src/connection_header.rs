//! The `Connection` header's tokens (RFC 9110 §7.6.1), read one way on both
//! legs: the proxy strips the headers they name and reads a client's
//! `close`/`keep-alive`; the pool reads a backend's `close`.

use http::header::{HeaderMap, CONNECTION};

/// Every token of every `Connection` field, trimmed; fields that are not
/// visible ASCII are skipped.
pub fn tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Whether a `Connection` field carries `token` (case-insensitive).
pub fn has_token(headers: &HeaderMap, token: &str) -> bool {
    tokens(headers).any(|t| t.eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_field_and_every_token() {
        let mut headers = HeaderMap::new();
        headers.append(CONNECTION, "keep-alive, X-Trace".parse().unwrap());
        headers.append(CONNECTION, " Close ".parse().unwrap());
        assert_eq!(
            tokens(&headers).collect::<Vec<_>>(),
            ["keep-alive", "X-Trace", "Close"]
        );
        assert!(has_token(&headers, "close"));
        assert!(!has_token(&headers, "upgrade"));
    }
}
