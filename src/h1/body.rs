//! Where a message body ends in the byte stream, found without copying it:
//! each framer is fed the bytes as they arrive and says how many belong to
//! the message and whether it is complete, so the proxy forwards the bytes
//! as they are (chunked framing included) and keeps the rest for the next
//! message.

use super::error::H1Error;
use super::request::{fields_of, Field, Parsed, RequestFraming};
use super::response::ResponseFraming;

/// What one feed found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// How many bytes of the input belong to the message.
    pub used: usize,
    /// Whether the message is complete with them.
    pub done: bool,
}

/// Bounds on chunked framing that is not data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLimits {
    /// The longest chunk-size line, extensions included, without CRLF.
    pub max_line: usize,
    /// The most bytes of trailer fields.
    pub max_trailers: usize,
}

impl Default for ChunkLimits {
    /// 4 KiB of size line (extensions are rare and short), 16 KiB of trailers.
    fn default() -> Self {
        Self {
            max_line: 4096,
            max_trailers: 16 * 1024,
        }
    }
}

/// The framer of one body; by default, of a complete one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BodyFramer {
    /// So many bytes more.
    Length(u64),
    /// Chunked.
    Chunked(ChunkedBody),
    /// Until the stream ends (responses only).
    Close,
    /// Complete.
    #[default]
    Done,
}

impl BodyFramer {
    /// The framer of a request body.
    pub fn for_request(framing: RequestFraming, limits: ChunkLimits) -> Self {
        match framing {
            RequestFraming::None | RequestFraming::Length(0) => Self::Done,
            RequestFraming::Length(n) => Self::Length(n),
            RequestFraming::Chunked => Self::Chunked(ChunkedBody::new(limits)),
        }
    }

    /// The framer of a response body.
    pub fn for_response(framing: ResponseFraming, limits: ChunkLimits) -> Self {
        match framing {
            ResponseFraming::None | ResponseFraming::Length(0) => Self::Done,
            ResponseFraming::Length(n) => Self::Length(n),
            ResponseFraming::Chunked => Self::Chunked(ChunkedBody::new(limits)),
            ResponseFraming::Close => Self::Close,
        }
    }

    /// Feeds the next bytes of the stream.
    pub fn feed(&mut self, input: &[u8]) -> Result<Progress, H1Error> {
        let progress = match self {
            Self::Done => Progress {
                used: 0,
                done: true,
            },
            Self::Close => Progress {
                used: input.len(),
                done: false,
            },
            Self::Length(remaining) => {
                let used = input
                    .len()
                    .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                *remaining -= used as u64;
                Progress {
                    used,
                    done: *remaining == 0,
                }
            }
            Self::Chunked(chunked) => chunked.feed(input)?,
        };
        if progress.done {
            *self = Self::Done;
        }
        Ok(progress)
    }

    /// Whether the body is complete.
    pub fn is_done(&self) -> bool {
        *self == Self::Done
    }

    /// Bytes still to come, when the framing says: the exact size of the
    /// rest of a Content-Length body.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            Self::Length(n) => Some(*n),
            Self::Done => Some(0),
            Self::Chunked(_) | Self::Close => None,
        }
    }

    /// Feeds the next bytes of the stream to a consumer that wants the data
    /// alone: chunk framing is consumed and the data range of `input` (at
    /// most one chunk's) returned, so the caller splits it off without a copy.
    pub fn decode(&mut self, input: &[u8]) -> Result<Decoded, H1Error> {
        let decoded = match self {
            Self::Chunked(chunked) => chunked.decode(input)?,
            _ => {
                let progress = self.feed(input)?;
                Decoded {
                    used: progress.used,
                    data: (progress.used > 0).then_some((0, progress.used)),
                    trailers: false,
                    done: progress.done,
                }
            }
        };
        if decoded.done {
            *self = Self::Done;
        }
        Ok(decoded)
    }

    /// The trailer section [`Decoded::trailers`] announced has been read
    /// (with [`parse_trailers`]): the body is complete.
    pub fn trailers_read(&mut self) {
        *self = Self::Done;
    }

    /// The stream ended: fine for a close-delimited body (now complete) and
    /// a complete one, `Truncated` for any other.
    pub fn finish(&mut self) -> Result<(), H1Error> {
        match self {
            Self::Done | Self::Close => {
                *self = Self::Done;
                Ok(())
            }
            _ => Err(H1Error::Truncated),
        }
    }
}

/// What one [`BodyFramer::decode`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// How many bytes of the input it consumed, data included.
    pub used: usize,
    /// Where the data among them lies, as `(start, end)` offsets of the input.
    pub data: Option<(usize, usize)>,
    /// The input continues with trailer fields, from `used` on: read them
    /// with [`parse_trailers`], then call [`BodyFramer::trailers_read`].
    pub trailers: bool,
    /// Whether the body is complete.
    pub done: bool,
}

/// Parses the trailer section at the start of `input` (fields, then the
/// empty line): how many bytes it takes and its fields, or `Partial` while
/// it is incomplete within `max` bytes.
pub fn parse_trailers(input: &[u8], max: usize) -> Result<Parsed<(usize, Vec<Field>)>, H1Error> {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    match httparse::parse_headers(input, &mut slots) {
        Ok(httparse::Status::Complete((len, headers))) if len <= max => {
            let fields = fields_of(input, headers).map_err(|_| H1Error::BadChunk("trailer"))?;
            Ok(Parsed::Complete((len, fields)))
        }
        Ok(httparse::Status::Partial) if input.len() <= max => Ok(Parsed::Partial),
        Ok(_) => Err(H1Error::BadChunk("trailers too large")),
        Err(_) => Err(H1Error::BadChunk("trailer")),
    }
}

/// Where a chunked decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In the chunk size's hex digits.
    Size,
    /// In the extensions after them.
    Extension,
    /// After the size line's CR.
    SizeLf,
    /// In chunk data, so many bytes left.
    Data(u64),
    /// After chunk data: CR.
    DataCr,
    /// After chunk data: LF.
    DataLf,
    /// At the start of a trailer line, or of the final empty line.
    TrailerStart,
    /// In a trailer line.
    Trailer,
    /// After a trailer line's CR.
    TrailerLf,
    /// After the final empty line's CR.
    EndLf,
    /// Complete.
    Done,
}

/// A chunked body's decoder (RFC 9112 §7.1): chunk-size lines of hex digits
/// with optional extensions, bounded; chunk data of exactly that size, then
/// CRLF; a zero-size chunk; trailer fields, bounded; the empty line. Every
/// line ends in CRLF: a bare LF in framing is refused, as it is where
/// request smuggling starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkedBody {
    state: State,
    size: u64,
    digits: usize,
    line: usize,
    trailers: usize,
    limits: ChunkLimits,
}

impl ChunkedBody {
    /// A decoder at the start of a body.
    pub fn new(limits: ChunkLimits) -> Self {
        Self {
            state: State::Size,
            size: 0,
            digits: 0,
            line: 0,
            trailers: 0,
            limits,
        }
    }

    /// Feeds the next bytes; stops after the body's last byte.
    pub fn feed(&mut self, input: &[u8]) -> Result<Progress, H1Error> {
        let mut at = 0;
        while at < input.len() && self.state != State::Done {
            if let State::Data(left) = self.state {
                let take = (input.len() - at).min(usize::try_from(left).unwrap_or(usize::MAX));
                at += take;
                let left = left - take as u64;
                self.state = if left == 0 {
                    State::DataCr
                } else {
                    State::Data(left)
                };
                continue;
            }
            self.state = self.step(input[at])?;
            at += 1;
        }
        Ok(Progress {
            used: at,
            done: self.state == State::Done,
        })
    }

    /// Like [`Self::feed`], but stops after the first run of chunk data, or
    /// at the start of trailer fields, and says where that data lies.
    fn decode(&mut self, input: &[u8]) -> Result<Decoded, H1Error> {
        let mut at = 0;
        while at < input.len() && self.state != State::Done {
            match self.state {
                State::Data(left) => {
                    let take = (input.len() - at).min(usize::try_from(left).unwrap_or(usize::MAX));
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data(left)
                    };
                    return Ok(Decoded {
                        used: at + take,
                        data: Some((at, at + take)),
                        trailers: false,
                        done: false,
                    });
                }
                State::TrailerStart if input[at] != b'\r' => {
                    return Ok(Decoded {
                        used: at,
                        data: None,
                        trailers: true,
                        done: false,
                    });
                }
                _ => {
                    self.state = self.step(input[at])?;
                    at += 1;
                }
            }
        }
        Ok(Decoded {
            used: at,
            data: None,
            trailers: false,
            done: self.state == State::Done,
        })
    }

    /// The state after one framing byte.
    fn step(&mut self, b: u8) -> Result<State, H1Error> {
        let next = match (self.state, b) {
            (State::Size, _) if b.is_ascii_hexdigit() => {
                self.digits += 1;
                if self.digits > 16 {
                    return Err(H1Error::BadChunk("chunk size too large"));
                }
                let digit = (b as char).to_digit(16).unwrap_or(0);
                self.size = self.size << 4 | u64::from(digit);
                self.line_byte()?;
                State::Size
            }
            (State::Size, b';' | b' ' | b'\t') if self.digits > 0 => {
                self.line_byte()?;
                State::Extension
            }
            (State::Size | State::Extension, b'\r') if self.digits > 0 => State::SizeLf,
            (State::Size, _) => return Err(H1Error::BadChunk("chunk size")),
            (State::Extension, _) if b == b'\t' || (b >= 0x20 && b != 0x7f) => {
                self.line_byte()?;
                State::Extension
            }
            (State::Extension, _) => return Err(H1Error::BadChunk("chunk extension")),
            (State::SizeLf, b'\n') if self.size == 0 => State::TrailerStart,
            (State::SizeLf, b'\n') => State::Data(self.size),
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataCr, _) => return Err(H1Error::BadChunk("chunk data longer than its size")),
            (State::DataLf, b'\n') => {
                (self.size, self.digits, self.line) = (0, 0, 0);
                State::Size
            }
            (State::TrailerStart, b'\r') => State::EndLf,
            // A trailer line starts with its name: whitespace there is an
            // obsolete line folding.
            (State::TrailerStart, _) if b.is_ascii_graphic() => self.trailer_byte()?,
            (State::Trailer, _) if b == b'\t' || (b >= 0x20 && b != 0x7f) => self.trailer_byte()?,
            (State::Trailer, b'\r') => State::TrailerLf,
            (State::TrailerLf, b'\n') => State::TrailerStart,
            (State::EndLf, b'\n') => State::Done,
            _ => return Err(H1Error::BadChunk("line end")),
        };
        Ok(next)
    }

    fn trailer_byte(&mut self) -> Result<State, H1Error> {
        self.trailers += 1;
        if self.trailers > self.limits.max_trailers {
            return Err(H1Error::BadChunk("trailers too large"));
        }
        Ok(State::Trailer)
    }

    fn line_byte(&mut self) -> Result<(), H1Error> {
        self.line += 1;
        if self.line > self.limits.max_line {
            return Err(H1Error::BadChunk("chunk size line too long"));
        }
        Ok(())
    }
}
