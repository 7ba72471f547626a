//! A client's request as the proxy service takes it: the head the client
//! leg parsed, beside the bytes it was parsed from, and the body. An HTTP/1.1
//! upstream gets the head rewritten from those bytes; only an HTTP/2
//! upstream needs an `http::Request`, built by [`to_request`] with its
//! target and header values as slices of one copy of those bytes (`Bytes`),
//! as hyper's server builds them. Repeated Content-Length fields (the parser
//! has made sure they agree) become one, as in hyper.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH};
use http::{Method, Request, Uri};

use crate::h1::{H1Error, RequestHead, Version};

/// A request from the client leg. Its head and bytes are borrowed from the
/// client connection, which keeps them while the request is served: only
/// two pointers move with the request from one await point to the next.
pub struct ClientRequest<'a, B> {
    /// The head, as spans of `bytes`.
    pub head: &'a RequestHead,
    /// The bytes the head was parsed from, and no more.
    pub bytes: &'a [u8],
    /// The body.
    pub body: B,
}

impl<B> ClientRequest<'_, B> {
    /// The method's bytes.
    pub fn method(&self) -> &[u8] {
        self.head.method(self.bytes)
    }

    /// The version as `http` names it.
    pub fn version(&self) -> http::Version {
        match self.head.version {
            Version::Http10 => http::Version::HTTP_10,
            Version::Http11 => http::Version::HTTP_11,
        }
    }
}

/// `head`, parsed from `bytes`, as a request with `body`: the head's bytes
/// are copied once, and the target and values are slices of the copy.
pub(super) fn to_request<B>(
    head: &RequestHead,
    bytes: &[u8],
    body: B,
) -> Result<Request<B>, H1Error> {
    let bytes = &Bytes::copy_from_slice(bytes);
    let method = Method::from_bytes(head.method(bytes)).map_err(|_| H1Error::Syntax("method"))?;
    let uri = Uri::from_maybe_shared(bytes.slice(head.target.start..head.target.end))
        .map_err(|_| H1Error::BadTarget)?;
    // Room for what the proxy adds (X-Forwarded-For, a Host), so that its
    // insert does not grow the map.
    let mut headers = HeaderMap::with_capacity(head.fields.len() + 2);
    let mut length_seen = false;
    for field in &head.fields {
        let name = HeaderName::from_bytes(field.name.of(bytes))
            .map_err(|_| H1Error::Syntax("header name"))?;
        if name == CONTENT_LENGTH && std::mem::replace(&mut length_seen, true) {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(bytes.slice(field.value.start..field.value.end))
            .map_err(|_| H1Error::Syntax("header value"))?;
        headers.append(name, value);
    }
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = match head.version {
        Version::Http10 => http::Version::HTTP_10,
        Version::Http11 => http::Version::HTTP_11,
    };
    *request.headers_mut() = headers;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h1::{parse_request, HeadLimits, Parsed};

    #[test]
    fn a_head_becomes_the_request_hyper_would_build() {
        let raw = Bytes::from_static(
            b"POST http://h.example/p?q HTTP/1.0\r\nHost: h.example\r\nContent-Length: 3\r\n\
              content-length: 3\r\nX-Empty:\r\nX-A: 1\r\nx-a: 2\r\n\r\nabc",
        );
        let limits = HeadLimits {
            max_head_bytes: 1024,
            max_headers: 100,
        };
        let Ok(Parsed::Complete(head)) = parse_request(&raw, limits) else {
            panic!("not parsed");
        };
        let request = to_request(&head, &raw.slice(..head.len), ()).unwrap();
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri(), "http://h.example/p?q");
        assert_eq!(request.version(), http::Version::HTTP_10);
        let headers = request.headers();
        assert_eq!(headers.get_all(CONTENT_LENGTH).iter().count(), 1);
        assert_eq!(headers["x-empty"], "");
        let values: Vec<_> = headers.get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
    }
}
