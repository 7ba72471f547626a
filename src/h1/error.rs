//! Why a head or a body is refused, with the answer tether gives for it: the
//! same status and reason the client leg gave when hyper's server parsed for
//! it, so moving to this codec changed nothing a client sees.

use http::StatusCode;

/// What the codec refuses. Request-side errors carry the answer the client
/// gets ([`H1Error::answer`]); a response-side error is the upstream's fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum H1Error {
    /// The head is not HTTP/1 syntax (`httparse` names the part: method,
    /// target, version, header name or value, line end).
    #[error("malformed head: invalid {0}")]
    Syntax(&'static str),
    /// The head did not end within the listener's `max_header_bytes`.
    #[error("head larger than {limit} bytes")]
    HeadTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// More header fields than the limit.
    #[error("more than {limit} header fields")]
    TooManyHeaders {
        /// The limit, in fields.
        limit: usize,
    },
    /// A request target longer than hyper takes (65,534 bytes).
    #[error("request target too long")]
    TargetTooLong,
    /// A target that is none of the four forms of RFC 9112 §3.2, or holds
    /// bytes a URI cannot (a fragment, invalid UTF-8, a `%` in a host).
    #[error("malformed request target")]
    BadTarget,
    /// A Content-Length that is not a plain decimal number that fits in u64.
    #[error("Content-Length is not a number")]
    InvalidContentLength,
    /// Two Content-Length fields that disagree.
    #[error("Content-Length fields disagree")]
    DifferingContentLengths,
    /// Transfer-Encoding in an HTTP/1.0 request, which cannot carry it.
    #[error("Transfer-Encoding in an HTTP/1.0 request")]
    TransferEncodingInHttp10,
    /// A request Transfer-Encoding whose final coding is not `chunked`
    /// (RFC 9112 §6.3: its length cannot be known).
    #[error("Transfer-Encoding does not end in chunked")]
    NotChunked,
    /// `chunked` applied more than once (RFC 9112 §7).
    #[error("chunked applied more than once")]
    ChunkedTwice,
    /// Content-Length together with Transfer-Encoding.
    #[error("Content-Length together with Transfer-Encoding")]
    AmbiguousFraming,
    /// More than one Host header.
    #[error("more than one Host header")]
    DuplicateHost,
    /// A Host that is not a valid authority.
    #[error("Host is not a valid authority")]
    InvalidHost,
    /// HTTP/1.1 without Host or an absolute-form target.
    #[error("HTTP/1.1 request without Host")]
    MissingHost,
    /// CONNECT: tether does not tunnel.
    #[error("CONNECT is not supported")]
    Connect,
    /// A target form tether does not forward: authority-form outside
    /// CONNECT, `*` outside OPTIONS, a scheme other than http(s).
    #[error("request target tether does not forward")]
    InvalidTarget,
    /// An absolute-form `https://` target sent to a plain-HTTP proxy.
    #[error("https:// target sent to a plain-HTTP proxy")]
    HttpsTarget,
    /// A name that spells Content-Length or Transfer-Encoding with `_`.
    #[error("header name spells a framing header with _")]
    UnderscoreFraming,
    /// A name with `_` under `underscores_in_headers = "reject"`.
    #[error("header name with _")]
    UnderscoreInHeader,
    /// Chunked body framing broken: the part named is what was wrong.
    #[error("malformed chunked body: {0}")]
    BadChunk(&'static str),
    /// The stream ended before the body its framing announced.
    #[error("body ended before its framing said it would")]
    Truncated,
    /// A response head the codec cannot frame or read.
    #[error("malformed response head: {0}")]
    BadResponse(&'static str),
}

impl H1Error {
    /// The status the client gets and the reason tether records (and puts
    /// in `x-tether-error` where it answers itself). Parse failures are
    /// `malformed-request`, as hyper's are recorded today: 431 for size, 414
    /// for a long target, 400 otherwise.
    pub fn answer(self) -> (StatusCode, &'static str) {
        use H1Error::*;
        match self {
            HeadTooLarge { .. } | TooManyHeaders { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "malformed-request",
            ),
            TargetTooLong => (StatusCode::URI_TOO_LONG, "malformed-request"),
            Syntax(_)
            | BadTarget
            | InvalidContentLength
            | DifferingContentLengths
            | TransferEncodingInHttp10
            | NotChunked
            | ChunkedTwice => (StatusCode::BAD_REQUEST, "malformed-request"),
            AmbiguousFraming => (StatusCode::BAD_REQUEST, "ambiguous-framing"),
            DuplicateHost => (StatusCode::BAD_REQUEST, "duplicate-host"),
            InvalidHost => (StatusCode::BAD_REQUEST, "invalid-host"),
            MissingHost => (StatusCode::BAD_REQUEST, "missing-host"),
            Connect => (StatusCode::METHOD_NOT_ALLOWED, "connect-not-supported"),
            InvalidTarget => (StatusCode::BAD_REQUEST, "invalid-target"),
            HttpsTarget => (StatusCode::BAD_REQUEST, "https-target"),
            UnderscoreFraming => (StatusCode::BAD_REQUEST, "underscore-framing-header"),
            UnderscoreInHeader => (StatusCode::BAD_REQUEST, "underscore-in-header"),
            BadChunk(_) | Truncated => (StatusCode::BAD_REQUEST, "bad-request-body"),
            BadResponse(_) => (StatusCode::BAD_GATEWAY, "upstream-failed"),
        }
    }

    /// Whether hyper's HTTP/1 server refuses the same input (as opposed to
    /// the rules tether adds on top of a head hyper takes).
    pub fn is_parse_error(self) -> bool {
        self.answer().1 == "malformed-request"
    }

    pub(crate) fn from_httparse(error: httparse::Error) -> Self {
        Self::Syntax(match error {
            httparse::Error::HeaderName => "header name",
            httparse::Error::HeaderValue => "header value",
            httparse::Error::NewLine => "line end",
            httparse::Error::Status => "status",
            httparse::Error::Token => "method or target",
            httparse::Error::Version => "version",
            httparse::Error::TooManyHeaders => "header count",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_match_what_the_hyper_path_gives() {
        let cases = [
            (H1Error::Syntax("version"), 400, "malformed-request"),
            (H1Error::HeadTooLarge { limit: 1 }, 431, "malformed-request"),
            (
                H1Error::TooManyHeaders { limit: 1 },
                431,
                "malformed-request",
            ),
            (H1Error::TargetTooLong, 414, "malformed-request"),
            (H1Error::AmbiguousFraming, 400, "ambiguous-framing"),
            (H1Error::Connect, 405, "connect-not-supported"),
            (H1Error::UnderscoreFraming, 400, "underscore-framing-header"),
            (H1Error::BadChunk("size"), 400, "bad-request-body"),
            (H1Error::BadResponse("status"), 502, "upstream-failed"),
        ];
        for (error, status, reason) in cases {
            assert_eq!(
                error.answer(),
                (StatusCode::from_u16(status).unwrap(), reason)
            );
        }
        assert!(H1Error::NotChunked.is_parse_error());
        assert!(!H1Error::MissingHost.is_parse_error());
    }
}
