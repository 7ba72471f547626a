//! Byte ranges into the buffer a head was read into: the codec hands out
//! positions, not copies, so a parsed head borrows nothing and can be kept
//! next to the buffer it describes.

/// A range `start..end` of a head's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    /// The first byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

impl Span {
    /// The range `start..end`.
    pub const fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    /// The bytes of `buf` this span covers; empty when it lies outside `buf`.
    pub fn of<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        buf.get(self.start..self.end).unwrap_or_default()
    }

    /// How many bytes it covers.
    pub const fn len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }

    /// Whether it covers nothing.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where `part`, a subslice of `buf`, lies in it; `None` when it is not
    /// inside `buf` (an empty slice `httparse` made up, for one).
    pub(crate) fn within(buf: &[u8], part: &[u8]) -> Option<Self> {
        let base = buf.as_ptr() as usize;
        let at = (part.as_ptr() as usize).checked_sub(base)?;
        let end = at.checked_add(part.len())?;
        (end <= buf.len()).then_some(Self::new(at, end))
    }

    /// The part of this span from `offset` bytes in.
    pub(crate) fn skip(self, offset: usize) -> Self {
        Self::new((self.start + offset).min(self.end), self.end)
    }
}
