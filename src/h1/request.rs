//! A request head parsed where it lies: `httparse` tokenises it, and one pass
//! over the fields computes what the proxy decides by (framing, `Connection`
//! tokens, Host, `Expect`, names with `_`). At least as strict as hyper's
//! server on every input, so the fast path refuses all that hyper refuses.

use super::error::H1Error;
use super::span::Span;
use super::{list_tokens, spells_framing_header, trim_ows};

/// hyper's limit on a request target (`MAX_URI_LEN`).
const MAX_TARGET_LEN: usize = u16::MAX as usize - 1;
/// Header slots kept on the stack; more are allocated.
const STACK_HEADERS: usize = 100;

/// The HTTP version of a message; `httparse` reads no other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0.
    Http10,
    /// HTTP/1.1.
    Http11,
}

/// Bounds on a head: the listener's `max_header_bytes`, and the field count
/// (hyper's default is 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// The most bytes a head may take, request line to empty line.
    pub max_head_bytes: usize,
    /// The most header fields.
    pub max_headers: usize,
}

/// A parse that may need more bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    /// The head is complete.
    Complete(T),
    /// The buffer ends inside the head: read more and parse again.
    Partial,
}

/// One header field: name and value (`httparse` trims the value's
/// whitespace), and the whole line with its line end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// The name, as sent.
    pub name: Span,
    /// The value, without surrounding whitespace.
    pub value: Span,
    /// The line from the name to its line end included.
    pub line: Span,
    /// Whether the line ends in CRLF (else a bare LF, which hyper accepts).
    pub crlf: bool,
}

/// How the request body is delimited (RFC 9112 §6.3, request rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RequestFraming {
    /// No body.
    #[default]
    None,
    /// Content-Length bytes.
    Length(u64),
    /// `Transfer-Encoding` ending in `chunked`.
    Chunked,
}

/// The tokens of the `Connection` fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// `close` was among them.
    pub close: bool,
    /// `keep-alive` was among them.
    pub keep_alive: bool,
    /// `upgrade` was among them.
    pub upgrade: bool,
    /// The other tokens: names of fields that end at this hop.
    pub named: Vec<Span>,
}

/// What the Host fields say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostInfo {
    /// How many Host fields there are.
    pub count: usize,
    /// The first one's value.
    pub value: Option<Span>,
    /// Whether that value is a valid authority (`host[:port]`).
    pub valid: bool,
}

/// The scheme of an absolute-form target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `http` (any case).
    Http,
    /// `https` (any case).
    Https,
    /// Any other.
    Other,
}

/// An authority in a target: all of it, and the `host[:port]` after any
/// userinfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authority {
    /// The authority as sent, userinfo included.
    pub full: Span,
    /// `host[:port]`, what becomes Host.
    pub host: Span,
}

/// The form of the request target (RFC 9112 §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetForm {
    /// `/path?query`.
    Origin,
    /// `scheme://authority/path?query`; `path` is empty when the target has
    /// none (its origin form is then `/`).
    Absolute {
        /// The scheme.
        scheme: Scheme,
        /// The authority.
        authority: Authority,
        /// Path and query.
        path: Span,
    },
    /// `host:port`, CONNECT's form.
    Authority,
    /// `*`, OPTIONS's form.
    Asterisk,
}

/// A parsed request head: positions in the buffer, and the facts the proxy
/// needs, all from one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of the buffer the head takes, leading empty lines included;
    /// the body starts here.
    pub len: usize,
    /// The method.
    pub method: Span,
    /// The request target, as sent.
    pub target: Span,
    /// The version.
    pub version: Version,
    /// The header fields, in order.
    pub fields: Vec<Field>,
    /// How the body is delimited.
    pub framing: RequestFraming,
    /// The `Connection` tokens.
    pub connection: ConnectionInfo,
    /// `Expect: 100-continue` (the last Expect field decides, as in hyper).
    pub expect_continue: bool,
    /// An `Upgrade` field is present.
    pub upgrade: bool,
    /// The Host fields.
    pub host: HostInfo,
    /// The form of the target.
    pub form: TargetForm,
    /// Indexes in `fields` of the names that contain `_`.
    pub underscored: Vec<usize>,
    /// Whether one of them spells a framing header with `_` for `-`.
    pub underscore_framing: bool,
}

impl RequestHead {
    /// The method's bytes.
    pub fn method<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        self.method.of(buf)
    }

    /// Whether the method is `HEAD`, whose response has no body.
    pub fn is_head(&self, buf: &[u8]) -> bool {
        self.method(buf) == b"HEAD"
    }

    /// The target in origin form: its path and query, `/` when an
    /// absolute-form target has none; the target itself for the other forms.
    pub fn origin<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        match self.form {
            TargetForm::Absolute { path, .. } if path.is_empty() => b"/",
            TargetForm::Absolute { path, .. } => path.of(buf),
            _ => self.target.of(buf),
        }
    }

    /// The host the request is for, as routing reads it: an absolute-form
    /// target's `host[:port]` (RFC 9112 §3.2.2: it wins over Host), else the
    /// Host field; `None` for a request without either (HTTP/1.0).
    pub fn authority<'a>(&self, buf: &'a [u8]) -> Option<&'a [u8]> {
        match self.form {
            TargetForm::Absolute { authority, .. } => Some(authority.host.of(buf)),
            TargetForm::Authority => Some(self.target.of(buf)),
            _ => self.host.value.map(|host| host.of(buf)),
        }
    }

    /// Whether the client asked for this to be the connection's last
    /// exchange: `Connection: close`, or HTTP/1.0 without `keep-alive`.
    pub fn client_ends_connection(&self) -> bool {
        match self.version {
            Version::Http10 => !self.connection.keep_alive,
            Version::Http11 => self.connection.close,
        }
    }

    /// What tether refuses in a head hyper would take, in the order the
    /// hyper path checks it (`http::headers::rejection`): duplicate,
    /// invalid, missing Host; CONNECT; target forms it does not forward.
    /// Names with `_` are the rewrite's business ([`super::upstream_request`]).
    pub fn check(&self, buf: &[u8]) -> Result<(), H1Error> {
        if self.host.count > 1 {
            return Err(H1Error::DuplicateHost);
        }
        let target_has_authority = matches!(
            self.form,
            TargetForm::Absolute { .. } | TargetForm::Authority
        );
        if self.host.count == 1 && !self.host.valid {
            return Err(H1Error::InvalidHost);
        }
        if self.host.count == 0 && self.version == Version::Http11 && !target_has_authority {
            return Err(H1Error::MissingHost);
        }
        if self.method(buf) == b"CONNECT" {
            return Err(H1Error::Connect);
        }
        match self.form {
            TargetForm::Origin => Ok(()),
            TargetForm::Asterisk if self.method(buf) == b"OPTIONS" => Ok(()),
            TargetForm::Absolute {
                scheme: Scheme::Http,
                ..
            } => Ok(()),
            TargetForm::Absolute {
                scheme: Scheme::Https,
                ..
            } => Err(H1Error::HttpsTarget),
            _ => Err(H1Error::InvalidTarget),
        }
    }
}

/// Parses the request head at the start of `buf`. `Partial` until the empty
/// line that ends it has arrived; an error for what hyper's server refuses
/// (and for Content-Length with Transfer-Encoding, which tether refuses).
/// Leading empty lines are skipped, and bare LF line ends taken, as hyper does.
pub fn parse_request(buf: &[u8], limits: HeadLimits) -> Result<Parsed<RequestHead>, H1Error> {
    let mut stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut heap = Vec::new();
    let slots: &mut [httparse::Header<'_>] = if limits.max_headers <= STACK_HEADERS {
        &mut stack[..limits.max_headers]
    } else {
        heap.resize(limits.max_headers, httparse::EMPTY_HEADER);
        &mut heap
    };
    let mut request = httparse::Request::new(slots);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head_bytes => {
            return Err(H1Error::HeadTooLarge {
                limit: limits.max_head_bytes,
            })
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(H1Error::TooManyHeaders {
                limit: limits.max_headers,
            })
        }
        Err(error) => return Err(H1Error::from_httparse(error)),
    };
    if len > limits.max_head_bytes {
        return Err(H1Error::HeadTooLarge {
            limit: limits.max_head_bytes,
        });
    }
    let method = request.method.and_then(|m| Span::within(buf, m.as_bytes()));
    let target = request.path.and_then(|p| Span::within(buf, p.as_bytes()));
    let (Some(method), Some(target)) = (method, target) else {
        return Err(H1Error::Syntax("request line"));
    };
    let version = match request.version {
        Some(0) => Version::Http10,
        Some(1) => Version::Http11,
        _ => return Err(H1Error::Syntax("version")),
    };
    if target.len() > MAX_TARGET_LEN {
        return Err(H1Error::TargetTooLong);
    }
    let form = classify_target(buf, target)?;
    let fields = fields_of(buf, request.headers)?;
    let facts = scan_fields(buf, &fields, version)?;
    Ok(Parsed::Complete(RequestHead {
        len,
        method,
        target,
        version,
        fields,
        framing: facts.framing,
        connection: facts.connection,
        expect_continue: facts.expect_continue,
        upgrade: facts.upgrade,
        host: facts.host,
        form,
        underscored: facts.underscored,
        underscore_framing: facts.underscore_framing,
    }))
}

/// The fields `httparse` found, as spans of `buf` with their whole lines.
pub(crate) fn fields_of(
    buf: &[u8],
    headers: &[httparse::Header<'_>],
) -> Result<Vec<Field>, H1Error> {
    let mut fields = Vec::with_capacity(headers.len());
    for header in headers {
        let name =
            Span::within(buf, header.name.as_bytes()).ok_or(H1Error::Syntax("header name"))?;
        let value = Span::within(buf, header.value)
            .filter(|v| !header.value.is_empty() && v.start >= name.end)
            .unwrap_or(Span::new(name.end, name.end));
        // The line ends after the value: only its trailing space and line
        // end are searched, a byte or three, which a plain scan does faster
        // than memchr's setup.
        let line_end = buf[value.end..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|at| value.end + at + 1)
            .ok_or(H1Error::Syntax("line end"))?;
        let crlf = line_end >= 2 && buf[line_end - 2] == b'\r';
        fields.push(Field {
            name,
            value,
            line: Span::new(name.start, line_end),
            crlf,
        });
    }
    Ok(fields)
}

/// What the one pass over the fields learns.
#[derive(Default)]
struct Facts {
    framing: RequestFraming,
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked: bool,
    connection: ConnectionInfo,
    expect_continue: bool,
    upgrade: bool,
    host: HostInfo,
    underscored: Vec<usize>,
    underscore_framing: bool,
}

fn scan_fields(buf: &[u8], fields: &[Field], version: Version) -> Result<Facts, H1Error> {
    let mut facts = Facts::default();
    for (index, field) in fields.iter().enumerate() {
        let name = field.name.of(buf);
        let value = field.value.of(buf);
        if name.eq_ignore_ascii_case(b"content-length") {
            facts.content_length(value)?;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if version == Version::Http10 {
                return Err(H1Error::TransferEncodingInHttp10);
            }
            facts.transfer_encoding(value)?;
        } else if name.eq_ignore_ascii_case(b"connection") {
            facts.connection_tokens(buf, value);
        } else if name.eq_ignore_ascii_case(b"host") {
            facts.host.count += 1;
            if facts.host.count == 1 {
                facts.host.value = Some(field.value);
                facts.host.valid = valid_host(value);
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            facts.expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            facts.upgrade = true;
        } else if memchr::memchr(b'_', name).is_some() {
            // No name above has a `_`: only the others are scanned.
            facts.underscored.push(index);
            facts.underscore_framing |= spells_framing_header(name);
        }
    }
    facts.framing = match (facts.transfer_encoding, facts.content_length) {
        (true, _) if !facts.chunked => return Err(H1Error::NotChunked),
        (true, Some(_)) => return Err(H1Error::AmbiguousFraming),
        (true, None) => RequestFraming::Chunked,
        (false, Some(length)) => RequestFraming::Length(length),
        (false, None) => RequestFraming::None,
    };
    Ok(facts)
}

impl Facts {
    fn content_length(&mut self, value: &[u8]) -> Result<(), H1Error> {
        let length = content_length(value).ok_or(H1Error::InvalidContentLength)?;
        match self.content_length {
            Some(prior) if prior != length => Err(H1Error::DifferingContentLengths),
            _ => {
                self.content_length = Some(length);
                Ok(())
            }
        }
    }

    /// hyper's reading: the field's last comma-separated piece decides
    /// whether the body is chunked (`chunked,` is not); a `chunked` before
    /// the final coding of any field is `chunked` applied twice.
    fn transfer_encoding(&mut self, value: &[u8]) -> Result<(), H1Error> {
        if self.chunked {
            return Err(H1Error::ChunkedTwice);
        }
        self.transfer_encoding = true;
        let readable = value
            .iter()
            .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
        let mut pieces = value.split(|&b| b == b',').map(trim_ows).peekable();
        let mut last_chunked = false;
        while let Some(piece) = pieces.next() {
            let chunked = piece.eq_ignore_ascii_case(b"chunked");
            if chunked && pieces.peek().is_some() {
                return Err(H1Error::ChunkedTwice);
            }
            last_chunked = chunked;
        }
        self.chunked = readable && last_chunked;
        Ok(())
    }

    fn connection_tokens(&mut self, buf: &[u8], value: &[u8]) {
        for token in list_tokens(value) {
            if token.eq_ignore_ascii_case(b"close") {
                self.connection.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.connection.keep_alive = true;
            } else {
                self.connection.upgrade |= token.eq_ignore_ascii_case(b"upgrade");
                if let Some(span) = Span::within(buf, token) {
                    self.connection.named.push(span);
                }
            }
        }
    }
}

/// A Content-Length value: decimal digits only (no sign, no list), as hyper
/// reads it, and below the u64 values hyper keeps for itself.
pub(crate) fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    let mut length = 0u64;
    for &b in value {
        if !b.is_ascii_digit() {
            return None;
        }
        length = length.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    (length < u64::MAX - 1).then_some(length)
}

/// The form of `target`, or `BadTarget` for what `http::Uri` would refuse
/// (and, stricter, fragments, `%` in a host, absolute targets whose path
/// does not start with `/`).
fn classify_target(buf: &[u8], target: Span) -> Result<TargetForm, H1Error> {
    let bytes = target.of(buf);
    if bytes == b"*" {
        return Ok(TargetForm::Asterisk);
    }
    if bytes.first() == Some(&b'/') {
        return valid_path(bytes)
            .then_some(TargetForm::Origin)
            .ok_or(H1Error::BadTarget);
    }
    if let Some(scheme_len) = scheme_len(bytes) {
        let scheme = match &bytes[..scheme_len] {
            s if s.eq_ignore_ascii_case(b"http") => Scheme::Http,
            s if s.eq_ignore_ascii_case(b"https") => Scheme::Https,
            _ => Scheme::Other,
        };
        let rest = target.skip(scheme_len + 3);
        let rest_bytes = rest.of(buf);
        let end = rest_bytes
            .iter()
            .position(|&b| matches!(b, b'/' | b'?' | b'#'))
            .unwrap_or(rest_bytes.len());
        let full = Span::new(rest.start, rest.start + end);
        let host_at = authority_host(full.of(buf), true).ok_or(H1Error::BadTarget)?;
        let path = rest.skip(end);
        if !path.is_empty() && (path.of(buf)[0] != b'/' || !valid_path(path.of(buf))) {
            return Err(H1Error::BadTarget);
        }
        let host = full.skip(host_at);
        let authority = Authority { full, host };
        return Ok(TargetForm::Absolute {
            scheme,
            authority,
            path,
        });
    }
    match authority_host(bytes, false) {
        Some(_) => Ok(TargetForm::Authority),
        None => Err(H1Error::BadTarget),
    }
}

/// The length of the scheme of `scheme://…`: a letter, then letters,
/// digits, `+`, `-`, `.`, at most 64 in all.
fn scheme_len(bytes: &[u8]) -> Option<usize> {
    let len = bytes.iter().position(|&b| b == b':')?;
    let scheme = &bytes[..len];
    let well_formed = (1..=64).contains(&len)
        && scheme[0].is_ascii_alphabetic()
        && scheme
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    (well_formed && bytes[len..].starts_with(b"://")).then_some(len)
}

/// Path and query bytes as `http::Uri` takes them, but no fragment, and
/// bytes above ASCII only as valid UTF-8.
fn valid_path(bytes: &[u8]) -> bool {
    let mut in_query = false;
    let mut high = false;
    for &b in bytes {
        let valid = if in_query {
            matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x7E | 0x80..=0xFF)
        } else {
            in_query = b == b'?';
            matches!(
                b,
                0x21 | 0x22 | 0x24..=0x3B | 0x3D | 0x3F..=0x5F | 0x61..=0x7E | 0x80..=0xFF
            )
        };
        high |= b >= 0x80;
        if !valid {
            return false;
        }
    }
    !high || std::str::from_utf8(bytes).is_ok()
}

/// Whether a Host value is `host[:port]`.
fn valid_host(value: &[u8]) -> bool {
    authority_host(value, false) == Some(0)
}

/// Where `host[:port]` starts in an authority, after any `userinfo@` (taken
/// only when `userinfo` is allowed); `None` when it is not an authority.
/// Stricter than `http::uri::Authority`: registered names of unreserved and
/// sub-delimiter characters, bracketed IPv6 of hex digits, `:` and `.`, and
/// a port of one to five digits.
fn authority_host(bytes: &[u8], userinfo: bool) -> Option<usize> {
    let at = memchr::memrchr(b'@', bytes);
    let host_at = match at {
        Some(_) if !userinfo => return None,
        Some(at) => {
            let info = &bytes[..at];
            if !info
                .iter()
                .all(|&b| reg_name_byte(b) || b == b':' || b == b'%')
            {
                return None;
            }
            at + 1
        }
        None => 0,
    };
    let host_port = &bytes[host_at..];
    let (host_ok, port) = if host_port.first() == Some(&b'[') {
        let close = memchr::memchr(b']', host_port)?;
        let inside = &host_port[1..close];
        let ok = inside.len() >= 2
            && inside
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        (ok, &host_port[close + 1..])
    } else {
        let end = memchr::memchr(b':', host_port).unwrap_or(host_port.len());
        let host = &host_port[..end];
        (
            !host.is_empty() && host.iter().all(|&b| reg_name_byte(b)),
            &host_port[end..],
        )
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => {
            (1..=5).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit)
        }
        Some(_) => false,
    };
    (host_ok && port_ok).then_some(host_at)
}

/// Unreserved and sub-delimiter characters (RFC 3986 §3.2.2, reg-name
/// without percent-encoding).
fn reg_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
        )
}
