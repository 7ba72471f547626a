//! The request-head scan: the client IO feeds it each read before hyper parses
//! it, so that a head declaring two lengths can be refused ([`HeadScan`]). A
//! head that arrives in one read is scanned where it lies; only one split
//! across reads is copied.

/// Watches the bytes of a request head as they arrive, for the one ambiguity
/// hyper resolves silently: Content-Length together with Transfer-Encoding
/// (RFC 9112 §6.3 lets a server reject it; tether does, as nginx does).
pub(super) struct HeadScan {
    buf: Vec<u8>,
    active: bool,
    limit: usize,
}

impl HeadScan {
    /// A scan of heads up to `limit` bytes (the listener's `max_header_bytes`).
    pub(super) fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            active: true,
            limit,
        }
    }

    /// An exchange ended: the next bytes start a new head.
    pub(super) fn restart(&mut self) {
        self.active = true;
    }

    /// Feeds newly read bytes; returns `Some(ambiguous)` once the head is complete.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Option<bool> {
        if !self.active {
            return None;
        }
        // Usually the whole head arrives in one read: scan it where it lies.
        let scanned = if self.buf.is_empty() {
            scan_head(bytes, self.limit)
        } else {
            let room = self.limit.saturating_sub(self.buf.len());
            self.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
            scan_head(&self.buf, self.limit)
        };
        let Some(result) = scanned else {
            if self.buf.is_empty() {
                self.buf
                    .extend_from_slice(&bytes[..bytes.len().min(self.limit)]);
            }
            return None;
        };
        self.active = false;
        self.buf.clear();
        if self.buf.capacity() > 16 * 1024 {
            self.buf = Vec::new();
        }
        Some(result)
    }
}

/// `Some(ambiguous)` once `bytes` hold a whole head (or `limit` bytes of one).
fn scan_head(bytes: &[u8], limit: usize) -> Option<bool> {
    match head_of(bytes) {
        Some(head) => Some(declares_both_lengths(head)),
        None if bytes.len() >= limit => Some(false),
        None => None,
    }
}

/// The head in `bytes` up to the empty line that ends it, once it is complete.
/// Leading empty lines before a request line are skipped, and bare LF line
/// ends count, as hyper accepts both.
fn head_of(bytes: &[u8]) -> Option<&[u8]> {
    let start = bytes.iter().position(|b| *b != b'\r' && *b != b'\n')?;
    let head = &bytes[start..];
    let mut from = 0;
    while let Some(found) = memchr::memchr(b'\n', &head[from..]) {
        let at = from + found;
        let ends = match head.get(at + 1) {
            Some(b'\n') => true,
            Some(b'\r') => head.get(at + 2) == Some(&b'\n'),
            _ => false,
        };
        if ends {
            return Some(&head[..at]);
        }
        from = at + 1;
    }
    None
}

fn declares_both_lengths(head: &[u8]) -> bool {
    let (mut length, mut encoding) = (false, false);
    for line in head.split(|b| *b == b'\n').skip(1) {
        let name = line.split(|b| *b == b':').next().unwrap_or_default();
        length |= name.eq_ignore_ascii_case(b"content-length");
        encoding |= name.eq_ignore_ascii_case(b"transfer-encoding");
    }
    length && encoding
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_scan_flags_both_lengths_across_reads() {
        let mut scan = HeadScan::new(1024);
        assert_eq!(
            scan.feed(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTrans"),
            None
        );
        assert_eq!(
            scan.feed(b"fer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            Some(true)
        );
        let mut scan = HeadScan::new(1024);
        assert_eq!(
            scan.feed(b"\r\nPOST / HTTP/1.1\nContent-Length: 3\n\nabc"),
            Some(false)
        );
        let mut scan = HeadScan::new(16);
        assert_eq!(scan.feed(b"GET / HTTP/1.1\r\nX: aaaaaaaaaa"), Some(false));
    }
}
