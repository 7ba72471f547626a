//! Where a message body ends in the byte stream, found without copying it:
//! each framer is fed the bytes as they arrive and says how many belong to
//! the message and whether it is complete, so the proxy forwards the bytes
//! as they are (chunked framing included) and keeps the rest for the next
//! message.

use super::error::H1Error;
use super::request::RequestFraming;
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

/// The framer of one body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFramer {
    /// So many bytes more.
    Length(u64),
    /// Chunked.
    Chunked(ChunkedBody),
    /// Until the stream ends (responses only).
    Close,
    /// Complete.
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

/// What one [`ChunkedBody::decode`] found: the framing it consumed, and how
/// much chunk data follows it in the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Framing bytes consumed from the start of the input.
    pub used: usize,
    /// Chunk data available right after them (not consumed: the caller
    /// takes it with [`ChunkedBody::consume_data`]).
    pub data: usize,
    /// Whether the body is complete.
    pub done: bool,
}

impl ChunkedBody {
    /// Decodes rather than forwards: consumes framing (size lines,
    /// extensions, CRLFs, trailers) up to the next chunk data or the body's
    /// end, and says how much data follows, so a caller can hand the data on
    /// without its framing. The bytes of the trailer fields, line ends
    /// included, are appended to `trailers`.
    pub fn decode(&mut self, input: &[u8], trailers: &mut Vec<u8>) -> Result<Decoded, H1Error> {
        let mut at = 0;
        loop {
            match self.state {
                State::Done => break,
                State::Data(left) => {
                    let data = (input.len() - at).min(usize::try_from(left).unwrap_or(usize::MAX));
                    return Ok(Decoded {
                        used: at,
                        data,
                        done: false,
                    });
                }
                _ if at == input.len() => break,
                before => {
                    let b = input[at];
                    self.state = self.step(b)?;
                    let in_trailers =
                        |s| matches!(s, State::TrailerStart | State::Trailer | State::TrailerLf);
                    if in_trailers(before) && in_trailers(self.state) {
                        trailers.push(b);
                    }
                    at += 1;
                }
            }
        }
        Ok(Decoded {
            used: at,
            data: 0,
            done: self.state == State::Done,
        })
    }

    /// Takes `n` bytes of the chunk data [`decode`](Self::decode) found.
    pub fn consume_data(&mut self, n: usize) {
        if let State::Data(left) = self.state {
            let left = left.saturating_sub(n as u64);
            self.state = if left == 0 {
                State::DataCr
            } else {
                State::Data(left)
            };
        }
    }
}
