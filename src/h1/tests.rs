//! Table-driven tests of the codec: the malformed heads tether refuses today
//! (each with the error, hence the answer, it gets), the facts of valid
//! heads, the request's rewrite byte for byte, and the body framers over every split.

use super::*;
use crate::config::UnderscoresInHeaders;

const LIMITS: HeadLimits = HeadLimits {
    max_head_bytes: 64 * 1024,
    max_headers: 100,
};

fn parse(raw: &[u8]) -> Result<RequestHead, H1Error> {
    match parse_request(raw, LIMITS)? {
        Parsed::Complete(head) => Ok(head),
        Parsed::Partial => panic!("partial: {:?}", String::from_utf8_lossy(raw)),
    }
}

/// Parse, then the proxy's own checks, as the serving path will apply them.
fn admit(raw: &[u8]) -> Result<RequestHead, H1Error> {
    let head = parse(raw)?;
    head.check(raw)?;
    Ok(head)
}

fn repeated(prefix: &[u8], line: impl Fn(usize) -> String, n: usize) -> Vec<u8> {
    let mut raw = prefix.to_vec();
    for i in 0..n {
        raw.extend_from_slice(line(i).as_bytes());
    }
    raw.extend_from_slice(b"\r\n");
    raw
}

#[test]
fn malformed_and_refused_heads_get_the_answer_tether_gives_today() {
    use H1Error::*;
    let cases: &[(&str, &[u8], H1Error)] = &[
        ("garbage request line", b"HELLO\r\n\r\n", Syntax("method or target")),
        ("bad method token", b"GE(T / HTTP/1.1\r\nHost: t\r\n\r\n", Syntax("method or target")),
        ("unknown version", b"GET / HTTP/1.7\r\nHost: t\r\n\r\n", Syntax("version")),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Syntax("version")),
        ("space before colon", b"GET / HTTP/1.1\r\nHost : t\r\n\r\n", Syntax("header name")),
        ("header without colon", b"GET / HTTP/1.1\r\nHost: t\r\nNoColon\r\n\r\n", Syntax("header name")),
        ("control byte in value", b"GET / HTTP/1.1\r\nHost: t\r\nX: a\x01b\r\n\r\n", Syntax("header value")),
        ("NUL in target", b"GET /a\x00b HTTP/1.1\r\nHost: t\r\n\r\n", Syntax("method or target")),
        ("obsolete line folding", b"GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n b\r\n\r\n", Syntax("header name")),
        ("TE: chunked by obs-fold", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\r\n chunked\r\n\r\n", Syntax("header name")),
        ("bare CR", b"GET / HTTP/1.1\r\nHost: t\rX: y\r\n\r\n", Syntax("header value")),
        ("differing Content-Length", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", DifferingContentLengths),
        ("non-numeric Content-Length", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n", InvalidContentLength),
        ("negative Content-Length", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n", InvalidContentLength),
        ("Content-Length list", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3, 3\r\n\r\n", InvalidContentLength),
        ("Content-Length overflow", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999999999999\r\n\r\n", InvalidContentLength),
        ("TE not ending in chunked", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", NotChunked),
        ("TE xchunked", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n", NotChunked),
        ("TE chunked then gzip", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n", ChunkedTwice),
        ("TE trailing comma", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked,\r\n\r\n", ChunkedTwice),
        ("chunked twice", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", ChunkedTwice),
        ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", TransferEncodingInHttp10),
        ("CL with TE", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", AmbiguousFraming),
        ("TE with CL", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n", AmbiguousFraming),
        ("missing Host", b"GET / HTTP/1.1\r\nUser-Agent: t\r\n\r\n", MissingHost),
        ("two Host headers", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", DuplicateHost),
        ("invalid Host", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", InvalidHost),
        ("Host with userinfo", b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", InvalidHost),
        ("CONNECT", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", Connect),
        ("https target", b"GET https://a/ HTTP/1.1\r\nHost: a\r\n\r\n", HttpsTarget),
        ("other scheme", b"GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n", InvalidTarget),
        ("authority form outside CONNECT", b"GET a:80 HTTP/1.1\r\nHost: a\r\n\r\n", InvalidTarget),
        ("asterisk outside OPTIONS", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", InvalidTarget),
        ("fragment", b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", BadTarget),
        ("quote in query", b"GET /\"a\"?\"b\" HTTP/1.1\r\nHost: a\r\n\r\n", BadTarget),
        ("target not UTF-8", b"GET /\xc3\x28 HTTP/1.1\r\nHost: a\r\n\r\n", Syntax("method or target")),
        ("empty authority", b"GET http:///a HTTP/1.1\r\nHost: a\r\n\r\n", BadTarget),
        ("relative target", b"GET a/b HTTP/1.1\r\nHost: a\r\n\r\n", BadTarget),
    ];
    for (name, raw, error) in cases {
        assert_eq!(admit(raw).err(), Some(*error), "{name}");
    }
    let oversized = repeated(
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: ",
        |_| "a".repeat(70 * 1024),
        1,
    );
    assert_eq!(
        parse(&oversized).err(),
        Some(HeadTooLarge { limit: 64 * 1024 })
    );
    let too_many = repeated(
        b"GET / HTTP/1.1\r\nHost: t\r\n",
        |i| format!("X-{i}: v\r\n"),
        200,
    );
    assert_eq!(parse(&too_many).err(), Some(TooManyHeaders { limit: 100 }));
    let unfinished_but_too_big = vec![b'a'; 64 * 1024];
    let prefix = [&b"GET /"[..], &unfinished_but_too_big].concat();
    assert_eq!(
        parse_request(&prefix, LIMITS),
        Err(HeadTooLarge { limit: 64 * 1024 })
    );
}

#[test]
fn a_head_is_partial_until_its_empty_line() {
    let raw = b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc";
    let end = raw.len() - 3;
    for cut in 0..end {
        assert_eq!(
            parse_request(&raw[..cut], LIMITS),
            Ok(Parsed::Partial),
            "{cut}"
        );
    }
    let head = parse(raw).unwrap();
    assert_eq!(head.len, end);
    assert_eq!(head.framing, RequestFraming::Length(3));
}

#[test]
fn a_valid_head_yields_its_facts_in_one_pass() {
    let raw: &[u8] = b"\r\nPOST http://user:pw@Example.com:8080 HTTP/1.1\r\n\
        Host: other\r\nConnection: Keep-Alive, X-Trace, upgrade\r\nUpgrade: h2c\r\n\
        Expect: 100-Continue\r\nTransfer-Encoding: gzip, chunked\r\nX_User: 1\r\n\
        content_length: 2\r\nX-Empty:\r\n\r\n";
    let head = parse(raw).unwrap();
    assert_eq!(head.method(raw), b"POST");
    assert_eq!(head.version, Version::Http11);
    assert_eq!(head.framing, RequestFraming::Chunked);
    assert!(head.expect_continue && head.upgrade);
    let c = &head.connection;
    assert!(c.keep_alive && c.upgrade && !c.close);
    let named: Vec<_> = c.named.iter().map(|s| s.of(raw)).collect();
    assert_eq!(named, [&b"X-Trace"[..], b"upgrade"]);
    assert_eq!((head.host.count, head.host.valid), (1, true));
    assert_eq!(head.host.value.unwrap().of(raw), b"other");
    let TargetForm::Absolute {
        scheme,
        authority,
        path,
    } = head.form
    else {
        panic!("{:?}", head.form);
    };
    assert_eq!(scheme, Scheme::Http);
    assert_eq!(authority.full.of(raw), b"user:pw@Example.com:8080");
    assert_eq!(authority.host.of(raw), b"Example.com:8080");
    assert!(path.is_empty());
    assert_eq!(head.origin(raw), b"/");
    assert_eq!(head.underscored, [5, 6]);
    assert!(head.underscore_framing);
    assert_eq!(head.fields[7].value.of(raw), b"");
    assert!(!head.client_ends_connection());
    // The target's authority, less its userinfo, wins over Host.
    assert_eq!(head.authority(raw), Some(&b"Example.com:8080"[..]));

    let lf: &[u8] = b"GET /\"a\"?b={c}&d=\xc3\xa9 HTTP/1.0\nConnection: close\n\n";
    let head = admit(lf).unwrap();
    assert!(!head.fields[0].crlf);
    assert_eq!(head.form, TargetForm::Origin);
    assert!(head.client_ends_connection());
    assert_eq!(head.authority(lf), None);
    let options: &[u8] = b"OPTIONS * HTTP/1.1\r\nHost: [::1]:80\r\n\r\n";
    let head = admit(options).unwrap();
    assert_eq!(head.form, TargetForm::Asterisk);
    assert_eq!(head.authority(options), Some(&b"[::1]:80"[..]));
}

/// Response heads, whether they answer HEAD, their framing, and whether the
/// connection is reusable after them.
#[rustfmt::skip]
const RESPONSE_FRAMING: &[(&[u8], bool, ResponseFraming, bool)] = &[
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false, ResponseFraming::Length(5), true),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true, ResponseFraming::None, true),
    (b"HTTP/1.1 204 No Content\r\n\r\n", false, ResponseFraming::None, true),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", false, ResponseFraming::None, true),
    (b"HTTP/1.1 101 Switching\r\n\r\n", false, ResponseFraming::None, true),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false, ResponseFraming::Chunked, true),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false, ResponseFraming::Close, false),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", false, ResponseFraming::Chunked, false),
    (b"HTTP/1.1 200 OK\r\n\r\n", false, ResponseFraming::Close, false),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n", false, ResponseFraming::Length(1), false),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false, ResponseFraming::Length(1), false),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n", false, ResponseFraming::Length(1), true),
];

#[test]
fn response_framing_follows_rfc_9112_section_6_3() {
    let cases = RESPONSE_FRAMING;
    for (raw, head_request, framing, reusable) in cases {
        let Ok(Parsed::Complete(head)) = parse_response(raw, LIMITS, *head_request) else {
            panic!("{}", String::from_utf8_lossy(raw));
        };
        let text = String::from_utf8_lossy(raw);
        assert_eq!(head.framing, *framing, "{text}");
        assert_eq!(head.reusable(), *reusable, "{text}");
    }
}

#[test]
fn a_response_head_yields_keep_alive_parameters_and_refuses_bad_framing() {
    let raw = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=100\r\n\r\n";
    let Ok(Parsed::Complete(head)) = parse_response(raw, LIMITS, false) else {
        panic!()
    };
    assert_eq!(
        head.keep_alive.timeout,
        Some(std::time::Duration::from_secs(5))
    );
    assert_eq!(head.keep_alive.max, Some(100));
    assert_eq!(head.reason.of(raw), b"OK");
    for bad in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
    ] {
        assert!(parse_response(bad, LIMITS, false).is_err(), "{bad:?}");
    }
    assert_eq!(
        parse_response(b"HTTP/1.1 200 OK\r\n", LIMITS, false),
        Ok(Parsed::Partial)
    );
}

fn rewrite(raw: &[u8], underscores: UnderscoresInHeaders) -> Result<(String, u64), H1Error> {
    let head = admit(raw).unwrap();
    let options = RewriteOptions {
        underscores,
        fallback_host: b"10.0.0.9:80",
        forwarded_for: Some(b"127.0.0.1"),
    };
    let mut out = Vec::new();
    let rewritten = upstream_request(&mut out, raw, &head, &options)?;
    assert_eq!(
        rewritten.has_length,
        matches!(head.framing, RequestFraming::Length(_))
    );
    Ok((
        String::from_utf8(out).unwrap(),
        rewritten.dropped_underscored,
    ))
}

#[test]
fn the_upstream_request_keeps_lines_as_they_came_and_drops_hop_by_hop_and_framing() {
    let drop = UnderscoresInHeaders::Drop;
    let cases: &[(&[u8], &str)] = &[
        (
            b"GET /headers?x=1 HTTP/1.1\r\nHost: legacy.example:8080\r\nConnection: close, X-Drop-Me\r\n\
              X-Drop-Me: secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n\
              Upgrade: websocket\r\nX-Forwarded-For: 10.1.2.3\r\nX-End-To-End: kept\r\n\r\n",
            "GET /headers?x=1 HTTP/1.1\r\nHost: legacy.example:8080\r\nX-End-To-End: kept\r\n\
             X-Forwarded-For: 10.1.2.3, 127.0.0.1\r\n",
        ),
        (
            b"GET http://u:p@a.example:81 HTTP/1.0\r\nHost: other\r\nX-A: 1\nConnection: host, content-length\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.example:81\r\nX-A: 1\r\nContent-Length: 0\r\nX-Forwarded-For: 127.0.0.1\r\n",
        ),
        (
            b"GET /x HTTP/1.0\r\nX-Forwarded-For: a\r\nX-Forwarded-For: b\r\n\r\n",
            "GET /x HTTP/1.1\r\nHost: 10.0.0.9:80\r\nX-Forwarded-For: a, b, 127.0.0.1\r\n",
        ),
        (
            b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: transfer-encoding\r\nTrailer: x\r\n\r\n",
            "POST /c HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 127.0.0.1\r\n",
        ),
        (
            b"POST /l HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\n",
            "POST /l HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nX-Forwarded-For: 127.0.0.1\r\n",
        ),
    ];
    for (raw, expected) in cases {
        assert_eq!(rewrite(raw, drop).unwrap().0, *expected);
    }
}

#[test]
fn underscored_names_are_dropped_passed_or_refused_and_framing_spellings_always_refused() {
    let raw: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\nX_Custom: 1\r\nX-Plain: 2\r\nx_custom: 3\r\nConnection: close\r\n\r\n";
    let (text, dropped) = rewrite(raw, UnderscoresInHeaders::Drop).unwrap();
    assert_eq!(dropped, 2);
    assert!(!text.contains("_") && text.contains("X-Plain: 2"), "{text}");
    let (text, dropped) = rewrite(raw, UnderscoresInHeaders::Pass).unwrap();
    assert_eq!(dropped, 0);
    assert!(
        text.contains("X_Custom: 1\r\nX-Plain: 2\r\nx_custom: 3\r\n"),
        "{text}"
    );
    assert_eq!(
        rewrite(raw, UnderscoresInHeaders::Reject),
        Err(H1Error::UnderscoreInHeader)
    );
    let named: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: x_a\r\nX_A: 1\r\n\r\n";
    assert_eq!(rewrite(named, UnderscoresInHeaders::Drop).unwrap().1, 0);
    let plain: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    assert!(rewrite(plain, UnderscoresInHeaders::Reject).is_ok());
    for framing in [
        &b"POST / HTTP/1.1\r\nHost: t\r\nTransfer_Encoding: chunked\r\nContent-Length: 10\r\n\r\n"
            [..],
        b"POST / HTTP/1.1\r\nHost: t\r\ncontent_length: 5\r\n\r\n",
    ] {
        for rule in [
            UnderscoresInHeaders::Drop,
            UnderscoresInHeaders::Pass,
            UnderscoresInHeaders::Reject,
        ] {
            assert_eq!(
                rewrite(framing, rule),
                Err(H1Error::UnderscoreFraming),
                "{rule:?}"
            );
        }
    }
}

#[test]
fn a_response_keeps_its_end_to_end_lines_as_they_came() {
    let raw: &[u8] =
        b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=3\r\n\
        X-Kept: yes\nContent-Length: 2\r\n\r\nok";
    let Ok(Parsed::Complete(head)) = parse_response(raw, LIMITS, false) else {
        panic!()
    };
    let kept: Vec<_> = head.end_to_end(raw).collect();
    let names: Vec<_> = kept.iter().map(|field| field.name).collect();
    assert_eq!(names, [&b"X-Kept"[..], b"Content-Length"]);
    assert_eq!(kept[0].value, b"yes");
    // A line that ended in a bare LF is not passed on as it came.
    assert_eq!(kept[0].line, None);
    assert_eq!(kept[1].line, Some(&b"Content-Length: 2\r\n"[..]));
    let both: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n";
    let Ok(Parsed::Complete(head)) = parse_response(both, LIMITS, false) else {
        panic!()
    };
    let names: Vec<_> = head.end_to_end(both).map(|field| field.name).collect();
    assert_eq!(names, [&b"X-A"[..]]);
}

/// Feeds `stream` in pieces of `step` bytes; returns the bytes the body
/// took, or the error.
fn frame(framer: &mut BodyFramer, stream: &[u8], step: usize) -> Result<usize, H1Error> {
    let mut used = 0;
    for piece in stream.chunks(step.max(1)) {
        let progress = framer.feed(piece)?;
        used += progress.used;
        if progress.done {
            return Ok(used);
        }
        assert_eq!(progress.used, piece.len());
    }
    Ok(used)
}

#[test]
fn body_framers_find_the_end_across_every_split() {
    let chunked = ChunkLimits::default();
    let cases: &[(BodyFramer, &[u8], usize)] = &[
        (
            BodyFramer::for_request(RequestFraming::Length(5), chunked),
            b"helloGET",
            5,
        ),
        (
            BodyFramer::for_request(RequestFraming::None, chunked),
            b"GET",
            0,
        ),
        (
            BodyFramer::for_request(RequestFraming::Chunked, chunked),
            b"3\r\nabc\r\n0\r\n\r\nGET",
            13,
        ),
        (
            BodyFramer::for_request(RequestFraming::Chunked, chunked),
            b"A;name=\"v\"\r\n0123456789\r\n1 ; x\r\nz\r\n0\r\nTrailer-A: 1\r\nB: \t2\r\n\r\nNEXT",
            60,
        ),
    ];
    for (framer, stream, body) in cases {
        for step in 1..=stream.len() {
            let mut framer = framer.clone();
            assert_eq!(
                frame(&mut framer, stream, step),
                Ok(*body),
                "{stream:?} by {step}"
            );
            assert!(framer.is_done());
        }
    }
    let mut close = BodyFramer::for_response(ResponseFraming::Close, chunked);
    assert_eq!(
        close.feed(b"anything"),
        Ok(Progress {
            used: 8,
            done: false
        })
    );
    assert_eq!(close.finish(), Ok(()));
    let mut short = BodyFramer::for_response(ResponseFraming::Length(9), chunked);
    assert_eq!(short.feed(b"abc").map(|p| p.done), Ok(false));
    assert_eq!(short.finish(), Err(H1Error::Truncated));
}

#[test]
fn malformed_chunked_framing_is_refused() {
    let tight = ChunkLimits {
        max_line: 8,
        max_trailers: 8,
    };
    let cases: &[(&str, &[u8])] = &[
        ("bad chunk size", b"zz\r\nabc\r\n0\r\n\r\n"),
        ("chunk longer than its size", b"2\r\nabcdef\r\n0\r\n\r\n"),
        ("bare LF after size", b"3\nabc\r\n0\r\n\r\n"),
        ("bare LF after data", b"3\r\nabc\n0\r\n\r\n"),
        ("no digits", b";ext\r\n"),
        ("negative size", b"-1\r\n"),
        ("size overflow", b"10000000000000000\r\n"),
        ("size line too long", b"1;aaaaaaaaaa\r\n"),
        ("control byte in extension", b"1;\x01\r\n"),
        ("trailers too large", b"0\r\nX: 123456789\r\n\r\n"),
        ("folded trailer", b"0\r\n folded\r\n\r\n"),
        ("bare LF in trailers", b"0\r\nX: 1\n\r\n"),
        ("bare LF at end", b"0\r\n\n"),
    ];
    for (name, stream) in cases {
        let mut framer = BodyFramer::for_request(RequestFraming::Chunked, tight);
        assert!(
            matches!(framer.feed(stream), Err(H1Error::BadChunk(_))),
            "{name}"
        );
    }
    let mut cut = BodyFramer::for_request(RequestFraming::Chunked, tight);
    assert_eq!(cut.feed(b"3\r\nab").map(|p| p.done), Ok(false));
    assert_eq!(cut.finish(), Err(H1Error::Truncated));
}

/// What a decoded body gave: its data, its trailer fields (name, value),
/// and the bytes after it.
type DecodedBody = (Vec<u8>, Vec<(String, String)>, Vec<u8>);

/// Decodes `stream` arriving in pieces of `step` bytes as the pool's body
/// reader does: a buffer the pieces are appended to, data split off its
/// front, trailers parsed when whole. Returns the data, the trailer fields
/// and the bytes left after the body.
fn decode_by(framer: &mut BodyFramer, stream: &[u8], step: usize) -> Result<DecodedBody, H1Error> {
    let (mut buf, mut data, mut trailers) = (Vec::new(), Vec::new(), Vec::new());
    let mut pieces = stream.chunks(step.max(1));
    while !framer.is_done() {
        let decoded = framer.decode(&buf)?;
        if decoded.trailers {
            buf.drain(..decoded.used);
            if let Parsed::Complete((len, fields)) = parse_trailers(&buf, 1024)? {
                for field in fields {
                    let text = |span: Span| String::from_utf8_lossy(span.of(&buf)).into_owned();
                    trailers.push((text(field.name), text(field.value)));
                }
                buf.drain(..len);
                framer.trailers_read();
                continue;
            }
        } else {
            if let Some((start, end)) = decoded.data {
                data.extend_from_slice(&buf[start..end]);
            }
            buf.drain(..decoded.used);
            if decoded.done || !buf.is_empty() {
                continue;
            }
        }
        match pieces.next() {
            Some(piece) => buf.extend_from_slice(piece),
            None => framer.finish()?,
        }
    }
    buf.extend(pieces.flatten());
    Ok((data, trailers, buf))
}

#[test]
fn chunked_bodies_decode_to_their_data_and_trailers_across_every_split() {
    let stream: &[u8] =
        b"A;name=\"v\"\r\n0123456789\r\n1 ; x\r\nz\r\n0\r\nTrailer-A: 1\r\nB: \t2\r\n\r\nNEXT";
    for step in 1..=stream.len() {
        let mut framer = BodyFramer::for_response(ResponseFraming::Chunked, ChunkLimits::default());
        let (data, trailers, rest) = decode_by(&mut framer, stream, step).unwrap();
        assert_eq!(data, b"0123456789z", "by {step}");
        assert_eq!(
            trailers,
            [("Trailer-A".into(), "1".into()), ("B".into(), "2".into())],
            "by {step}"
        );
        assert_eq!(rest, b"NEXT", "by {step}");
    }
    let plain: &[u8] = b"3\r\nabc\r\n0\r\n\r\n";
    let mut framer = BodyFramer::for_response(ResponseFraming::Chunked, ChunkLimits::default());
    assert_eq!(
        decode_by(&mut framer, plain, 2),
        Ok((b"abc".to_vec(), vec![], vec![]))
    );
    let mut length = BodyFramer::for_response(ResponseFraming::Length(5), ChunkLimits::default());
    assert_eq!(length.remaining(), Some(5));
    assert_eq!(
        decode_by(&mut length, b"helloHTTP", 3),
        Ok((b"hello".to_vec(), vec![], b"HTTP".to_vec()))
    );
    let mut close = BodyFramer::for_response(ResponseFraming::Close, ChunkLimits::default());
    assert_eq!(
        decode_by(&mut close, b"to the end", 4),
        Ok((b"to the end".to_vec(), vec![], vec![]))
    );
    let mut cut = BodyFramer::for_response(ResponseFraming::Chunked, ChunkLimits::default());
    assert_eq!(decode_by(&mut cut, b"5\r\nab", 1), Err(H1Error::Truncated));
    assert!(matches!(
        parse_trailers(&[b'x'; 40], 16),
        Err(H1Error::BadChunk(_))
    ));
    let mut long = BodyFramer::for_response(ResponseFraming::Chunked, ChunkLimits::default());
    assert_eq!(
        decode_by(&mut long, b"2\r\nabc\r\n0\r\n\r\n", 3),
        Err(H1Error::BadChunk("chunk data longer than its size"))
    );
}
