//! Header rules of a proxy: which headers are hop-by-hop and never cross tether,
//! which requests are too ambiguous to forward, what becomes of names with `_`,
//! and X-Forwarded-For. Every per-name check rides on the one walk the
//! hop-by-hop strip makes over the names.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri, Version};

use crate::config::UnderscoresInHeaders;

const HOP_BY_HOP_COUNT: usize = crate::h1::HOP_BY_HOP.len();

/// Headers that describe one connection, not the message: the names of
/// [`crate::h1::HOP_BY_HOP`], the one table both HTTP/1 paths read.
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = {
    let names = crate::h1::HOP_BY_HOP;
    [
        HeaderName::from_static(names[0]),
        HeaderName::from_static(names[1]),
        HeaderName::from_static(names[2]),
        HeaderName::from_static(names[3]),
        HeaderName::from_static(names[4]),
        HeaderName::from_static(names[5]),
        HeaderName::from_static(names[6]),
    ]
};

/// Removes hop-by-hop headers and every header the `Connection` header names.
/// `Host` and `Content-Length` are kept even if named: removing them would
/// change what the message means, which a client cannot ask of a proxy.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let present = walk_names(headers, None);
    remove_hop_by_hop(headers, present);
}

/// The one pass over a message's names: which hop-by-hop headers are present
/// and, when `underscored` is given, the names that contain `_`. Most
/// messages carry only `Connection`, if that, and no `_` at all: for them the
/// underscore check is a byte scan of each name and allocates nothing.
fn walk_names(
    headers: &HeaderMap,
    mut underscored: Option<&mut Vec<HeaderName>>,
) -> [bool; HOP_BY_HOP_COUNT] {
    let mut present = [false; HOP_BY_HOP_COUNT];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present[i] = true;
        } else if let Some(found) = underscored.as_deref_mut() {
            // No hop-by-hop name has a `_`, so only the others are scanned.
            if memchr::memchr(b'_', name.as_str().as_bytes()).is_some() {
                found.push(name.clone());
            }
        }
    }
    present
}

/// Removes the hop-by-hop headers `present` marks, and those `Connection` names.
fn remove_hop_by_hop(headers: &mut HeaderMap, present: [bool; HOP_BY_HOP_COUNT]) {
    if present[0] {
        let named: Vec<HeaderName> = crate::connection_header::tokens(headers)
            // `keep-alive` goes below anyway; `close` is an option, and a
            // field of that name is reserved (RFC 9110 §7.6.1).
            .filter(|token| {
                !token.eq_ignore_ascii_case("keep-alive") && !token.eq_ignore_ascii_case("close")
            })
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .filter(|name| *name != header::HOST && *name != header::CONTENT_LENGTH)
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
}

/// Whether `name`, with `_` read as `-`, is `Content-Length` or
/// `Transfer-Encoding`: a backend that maps both to one variable (CGI's
/// `HTTP_CONTENT_LENGTH`) could frame the body by it, a smuggling vector.
fn spells_framing_header(name: &HeaderName) -> bool {
    crate::h1::spells_framing_header(name.as_str().as_bytes())
}

/// Applies the listener's `underscores_in_headers` to the names `walk_names`
/// found with a `_`: a spelling of a framing header is refused under every
/// setting; the others are dropped, passed or refused. Returns how many
/// fields were dropped.
fn apply_underscore_rule(
    headers: &mut HeaderMap,
    underscored: Vec<HeaderName>,
    rule: UnderscoresInHeaders,
) -> Result<u64, Rejection> {
    if underscored.iter().any(spells_framing_header) {
        return Err(Rejection::UnderscoreFraming);
    }
    match rule {
        UnderscoresInHeaders::Pass => Ok(0),
        UnderscoresInHeaders::Reject => Err(Rejection::UnderscoreInHeader),
        UnderscoresInHeaders::Drop => {
            let mut dropped = 0;
            for name in underscored {
                // Counted after the hop-by-hop strip, which may have removed
                // it already (named in `Connection`).
                dropped += headers.get_all(&name).iter().count() as u64;
                headers.remove(&name);
            }
            Ok(dropped)
        }
    }
}

/// Why a parsed request is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// More than one Host header: which one the upstream would use is unknown.
    DuplicateHost,
    /// A Host that is not a valid authority.
    InvalidHost,
    /// HTTP/1.1 without Host.
    MissingHost,
    /// CONNECT: tether does not tunnel.
    Connect,
    /// An absolute-form target without a path, or of a scheme other than
    /// `http`.
    InvalidTarget,
    /// An absolute-form `https://` target: the app asked a plain-HTTP proxy
    /// for TLS it would not get end to end, so it is refused rather than
    /// forwarded in the clear or over TLS the app did not choose.
    HttpsTarget,
    /// A header that spells `Content-Length` or `Transfer-Encoding` with `_`
    /// (`Transfer_Encoding`): refused whatever `underscores_in_headers` says.
    UnderscoreFraming,
    /// A header name with `_` under `underscores_in_headers = "reject"`.
    UnderscoreInHeader,
}

impl Rejection {
    /// The status tether answers with, and the reason for the
    /// `x-tether-error` header.
    pub fn answer(self) -> (StatusCode, &'static str) {
        match self {
            Self::DuplicateHost => (StatusCode::BAD_REQUEST, "duplicate-host"),
            Self::InvalidHost => (StatusCode::BAD_REQUEST, "invalid-host"),
            Self::MissingHost => (StatusCode::BAD_REQUEST, "missing-host"),
            Self::Connect => (StatusCode::METHOD_NOT_ALLOWED, "connect-not-supported"),
            Self::InvalidTarget => (StatusCode::BAD_REQUEST, "invalid-target"),
            Self::HttpsTarget => (StatusCode::BAD_REQUEST, "https-target"),
            Self::UnderscoreFraming => (StatusCode::BAD_REQUEST, "underscore-framing-header"),
            Self::UnderscoreInHeader => (StatusCode::BAD_REQUEST, "underscore-in-header"),
        }
    }

    /// The rejection a codec error of the same meaning stands for.
    pub fn from_h1(error: &crate::h1::H1Error) -> Option<Self> {
        use crate::h1::H1Error;
        Some(match error {
            H1Error::DuplicateHost => Self::DuplicateHost,
            H1Error::InvalidHost => Self::InvalidHost,
            H1Error::MissingHost => Self::MissingHost,
            H1Error::Connect => Self::Connect,
            H1Error::InvalidTarget => Self::InvalidTarget,
            H1Error::HttpsTarget => Self::HttpsTarget,
            H1Error::UnderscoreFraming => Self::UnderscoreFraming,
            H1Error::UnderscoreInHeader => Self::UnderscoreInHeader,
            _ => return None,
        })
    }

    /// What the client is told, after the status and reason: why, and what
    /// to do instead where there is something.
    pub fn detail(self) -> &'static str {
        match self {
            Self::Connect => {
                "tether does not tunnel: an HTTPS tunnel through it cannot be pooled. \
                 Call the backend as http:// through tether (http_proxy); tether originates \
                 TLS to the backend when its upstream is set up for it"
            }
            Self::HttpsTarget => {
                "an https:// target sent to a plain-HTTP proxy: tether will not forward it \
                 in the clear. Call the backend as http:// through tether; tether originates \
                 TLS to the backend when its upstream is set up for it"
            }
            _ => "request rejected before forwarding",
        }
    }
}

/// Rewrites a client request into the form sent upstream: origin-form target,
/// HTTP/1.1 (so the upstream connection stays persistent), hop-by-hop headers
/// removed, names with `_` handled as `underscores` says, Host kept (or
/// filled from the endpoint for HTTP/1.0 clients), and the client's address
/// appended to X-Forwarded-For. Returns how many header fields were dropped
/// for their `_`, or why the request must be refused.
pub fn prepare_upstream(
    parts: &mut http::request::Parts,
    client: Option<&HeaderValue>,
    forwarded_for: bool,
    fallback_host: &str,
    underscores: UnderscoresInHeaders,
) -> Result<u64, Rejection> {
    let mut underscored = Vec::new();
    let present = walk_names(&parts.headers, Some(&mut underscored));
    remove_hop_by_hop(&mut parts.headers, present);
    let dropped = if underscored.is_empty() {
        0
    } else {
        apply_underscore_rule(&mut parts.headers, underscored, underscores)?
    };
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let origin = path_and_query(&parts.uri).to_owned();
        if let Some(authority) = parts.uri.authority() {
            // Userinfo (`user:pass@`) is the proxy's business, never the Host's.
            let host = authority.as_str().rsplit('@').next().unwrap_or_default();
            if let Ok(value) = HeaderValue::from_str(host) {
                // RFC 9112 §3.2.2: the target's authority replaces Host.
                parts.headers.insert(header::HOST, value);
            }
        }
        if let Ok(uri) = origin.parse() {
            parts.uri = uri;
        }
    }
    if !parts.headers.contains_key(header::HOST) {
        if let Ok(value) = HeaderValue::from_str(fallback_host) {
            parts.headers.insert(header::HOST, value);
        }
    }
    parts.version = Version::HTTP_11;
    if forwarded_for {
        if let Some(address) = client {
            append_forwarded_for(&mut parts.headers, address);
        }
    }
    Ok(dropped)
}

/// HTTP/2 carries the target as `:scheme`, `:authority` and `:path`: the
/// request gets an absolute URI built from its Host, and Host itself goes.
pub fn to_http2_form(parts: &mut http::request::Parts) {
    let authority = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    let path = path_and_query(&parts.uri).to_owned();
    if let Some(authority) = authority {
        if let Ok(uri) = format!("http://{authority}{path}").parse() {
            parts.uri = uri;
            parts.headers.remove(header::HOST);
        }
    }
    parts.version = Version::HTTP_2;
}

/// The target as origin-form: its path and query, `/` when it has none.
fn path_and_query(uri: &Uri) -> &str {
    uri.path_and_query().map_or("/", |pq| pq.as_str())
}

/// The longest text of an IP address: an IPv6 one ending in an IPv4 one.
const MAX_ADDRESS_TEXT: usize = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255".len();

/// The text a client address adds to X-Forwarded-For, made once per
/// connection (every request on it appends the same address) and kept
/// inline: a new connection allocates nothing for it.
#[derive(Clone, Copy)]
pub struct AddressText {
    text: [u8; MAX_ADDRESS_TEXT],
    len: usize,
}

impl AddressText {
    /// The text of `ip`, as `Display` writes it.
    pub fn of(ip: IpAddr) -> Self {
        let mut address = Self {
            text: [0; MAX_ADDRESS_TEXT],
            len: 0,
        };
        match ip {
            // Every new client connection pays for this; the formatting
            // machinery behind `Display` costs several times more than
            // writing four numbers.
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        address.push(b'.');
                    }
                    if octet >= 100 {
                        address.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        address.push(b'0' + octet / 10 % 10);
                    }
                    address.push(b'0' + octet % 10);
                }
            }
            IpAddr::V6(v6) => {
                use std::io::Write;
                let mut room = &mut address.text[..];
                // `Display` never writes more than the room holds.
                if write!(room, "{v6}").is_ok() {
                    address.len = MAX_ADDRESS_TEXT - room.len();
                }
            }
        }
        address
    }

    fn push(&mut self, byte: u8) {
        self.text[self.len] = byte;
        self.len += 1;
    }

    /// The text.
    pub fn as_bytes(&self) -> &[u8] {
        &self.text[..self.len]
    }

    /// The text as a header value, for a request built as a map.
    pub fn to_header_value(&self) -> Option<HeaderValue> {
        HeaderValue::from_bytes(self.as_bytes()).ok()
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, address: &HeaderValue) {
    let name = HeaderName::from_static("x-forwarded-for");
    let prior: Vec<&str> = headers
        .get_all(&name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if prior.is_empty() {
        headers.insert(name, address.clone());
        return;
    }
    let chain = format!(
        "{}, {}",
        prior.join(", "),
        address.to_str().unwrap_or_default()
    );
    if let Ok(value) = HeaderValue::from_str(&chain) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_stripped_but_host_survives() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, x-secret, host".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert(header::HOST, "example".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-end-to-end", "yes".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get(header::HOST).unwrap(), "example");
        assert_eq!(h.get("x-end-to-end").unwrap(), "yes");
    }

    fn request_with(names: &[&str]) -> http::request::Parts {
        let mut request = http::Request::builder().header(header::HOST, "t");
        for name in names {
            request = request.header(*name, "1");
        }
        request.body(()).unwrap().into_parts().0
    }

    fn prepare(
        parts: &mut http::request::Parts,
        rule: UnderscoresInHeaders,
    ) -> Result<u64, Rejection> {
        prepare_upstream(parts, None, false, "fallback", rule)
    }

    #[test]
    fn framing_headers_spelt_with_underscores_are_refused_under_every_rule() {
        for name in ["transfer_encoding", "Content_Length", "content_length"] {
            let parts = request_with(&[name]);
            assert!(parts.headers.keys().any(spells_framing_header), "{name}");
        }
        for rule in [
            UnderscoresInHeaders::Drop,
            UnderscoresInHeaders::Pass,
            UnderscoresInHeaders::Reject,
        ] {
            let mut parts = request_with(&["x-ok", "Transfer_Encoding"]);
            assert_eq!(
                prepare(&mut parts, rule),
                Err(Rejection::UnderscoreFraming),
                "{rule:?}"
            );
        }
        assert!(!spells_framing_header(&HeaderName::from_static(
            "content_lengths"
        )));
        assert!(!spells_framing_header(&HeaderName::from_static(
            "x_content_length"
        )));
    }

    #[test]
    fn other_underscored_names_are_dropped_passed_or_refused() {
        let names = ["x_custom", "x-kept", "x_custom"];
        let mut parts = request_with(&names);
        assert_eq!(prepare(&mut parts, UnderscoresInHeaders::Drop), Ok(2));
        assert!(parts.headers.get("x_custom").is_none());
        assert_eq!(parts.headers["x-kept"], "1");

        let mut parts = request_with(&names);
        assert_eq!(prepare(&mut parts, UnderscoresInHeaders::Pass), Ok(0));
        assert_eq!(parts.headers.get_all("x_custom").iter().count(), 2);

        let mut parts = request_with(&names);
        assert_eq!(
            prepare(&mut parts, UnderscoresInHeaders::Reject),
            Err(Rejection::UnderscoreInHeader)
        );

        let mut parts = request_with(&["x-kept"]);
        assert_eq!(prepare(&mut parts, UnderscoresInHeaders::Reject), Ok(0));
    }

    #[test]
    fn forwarded_for_appends_to_an_existing_chain() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "10.0.0.1".parse().unwrap());
        h.append("x-forwarded-for", "10.0.0.2".parse().unwrap());
        let address = AddressText::of("127.0.0.1".parse().unwrap())
            .to_header_value()
            .unwrap();
        append_forwarded_for(&mut h, &address);
        assert_eq!(
            h.get("x-forwarded-for").unwrap(),
            "10.0.0.1, 10.0.0.2, 127.0.0.1"
        );
    }

    #[test]
    fn forwarded_for_value_matches_display() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.100.255",
            "192.168.9.99",
            "::1",
            "fe80::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let text = AddressText::of(ip);
            assert_eq!(text.as_bytes(), ip.to_string().as_bytes());
            assert_eq!(text.to_header_value().unwrap(), ip.to_string().as_str());
        }
    }
}
