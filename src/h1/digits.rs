//! Numbers as HTTP/1 writes them: a Content-Length in decimal, a chunk size
//! in hexadecimal, each built on the caller's stack.

/// `n` in decimal, written at the end of `out`; returns the digits.
pub fn decimal(n: u64, out: &mut [u8; 20]) -> &[u8] {
    let mut at = out.len();
    let mut rest = n;
    loop {
        at -= 1;
        out[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    &out[at..]
}

/// `n` in lowercase hexadecimal (a chunk size), written at the end of
/// `out`; returns the digits.
pub fn hex(n: u64, out: &mut [u8; 16]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut at = out.len();
    let mut rest = n;
    loop {
        at -= 1;
        out[at] = HEX[(rest & 0xf) as usize];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    &out[at..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_as_their_digits() {
        for n in [0, 7, 10, 1234, u64::MAX] {
            assert_eq!(decimal(n, &mut [0; 20]), n.to_string().as_bytes());
            assert_eq!(hex(n, &mut [0; 16]), format!("{n:x}").as_bytes());
        }
    }
}
