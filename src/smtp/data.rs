//! The DATA decoder (RFC 5321 §4.1.1.4, §4.5.2): turns the untrusted byte stream after `354`
//! into CRLF-clean, dot-unstuffed message content, and finds the end of data.
//!
//! Only `<CR><LF>.<CR><LF>` ends the data (unless the client is on an explicit LF-only
//! network, see [`DataDecoder::accept_lf_end`]). Every other form (`<LF>.<LF>`, `<CR>.<CR>`,
//! `<LF>.<CR><LF>`, ...) is content: a bare LF becomes CRLF, a bare CR becomes a space, so the
//! spool never holds a lone CR or LF and nothing can be smuggled to the upstream as a second
//! message (the "SMTP smuggling" family, CVE-2023-51764/51765/51766). Sans-IO: feed it bytes.

/// What the decoder noticed about the content; the session turns these into a reply.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DataFlags {
    pub bare_lf: bool,
    pub bare_cr: bool,
    pub nul: bool,
    /// A content line longer than 998 octets (RFC 5322 §2.1.1).
    pub long_line: bool,
    /// More content than `max_size`; output stopped at that point.
    pub oversize: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line. `crlf` says whether the line before ended with a real CRLF
    /// (or this is the first line): only then can a lone `.` end the data.
    LineStart {
        crlf: bool,
    },
    Mid,
    Cr,
    Dot {
        crlf: bool,
    },
    DotCr,
}

/// Longest content line RFC 5322 allows, excluding CRLF.
pub const MAX_LINE: usize = 998;

#[derive(Debug)]
pub struct DataDecoder {
    state: State,
    line_len: usize,
    emitted: u64,
    max_size: u64,
    /// For clients that only send LF: `<LF>.<LF>` (and `<CRLF>.<LF>`) also end the data.
    lf_ends: bool,
    pub flags: DataFlags,
}

impl DataDecoder {
    pub fn new(max_size: u64) -> DataDecoder {
        DataDecoder {
            state: State::LineStart { crlf: true },
            line_len: 0,
            emitted: 0,
            max_size,
            lf_ends: false,
            flags: DataFlags::default(),
        }
    }

    /// Lets a bare LF end lines for the end-of-data marker too. Only for clients known to
    /// send nothing but LF (`access.lf_only_networks`): for them the smuggling defence is
    /// off, which is why it is an explicit per-network choice (behaviour.md B18).
    pub fn accept_lf_end(&mut self) {
        self.lf_ends = true;
    }

    /// Content octets produced so far (what the spool stores, before our own headers).
    pub fn size(&self) -> u64 {
        self.emitted
    }

    /// Decodes `input`, appending content to `out`. Returns `Some(n)` when the end-of-data
    /// marker was found after consuming `n` bytes (the rest belongs to the next command), or
    /// `None` when all of `input` was consumed and more is needed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Mid => {
                    // Fast path: copy a run of ordinary bytes at once.
                    let run = input[i..]
                        .iter()
                        .position(|&c| c == b'\r' || c == b'\n' || c == 0)
                        .unwrap_or(input.len() - i);
                    if run > 0 {
                        self.line_len += run;
                        if self.line_len > MAX_LINE {
                            self.flags.long_line = true;
                        }
                        self.emit(out, &input[i..i + run]);
                        i += run;
                        continue;
                    }
                    match b {
                        b'\r' => self.state = State::Cr,
                        b'\n' => self.bare_lf(out),
                        _ => self.flags.nul = true, // NUL: the message will be refused
                    }
                    i += 1;
                }
                State::LineStart { crlf } => {
                    if b == b'.' {
                        self.state = State::Dot { crlf };
                        i += 1;
                    } else {
                        self.state = State::Mid;
                    }
                }
                State::Cr => {
                    if b == b'\n' {
                        self.emit(out, b"\r\n");
                        self.line_len = 0;
                        self.state = State::LineStart { crlf: true };
                        i += 1;
                    } else {
                        self.bare_cr(out);
                        // reprocess b in the middle of the line
                    }
                }
                State::Dot { crlf } => match b {
                    b'\r' if crlf => {
                        self.state = State::DotCr;
                        i += 1;
                    }
                    b'\r' => {
                        self.emit_dot(out);
                        self.state = State::Cr;
                        i += 1;
                    }
                    b'\n' if crlf && self.lf_ends => {
                        self.flags.bare_lf = true;
                        self.state = State::LineStart { crlf: true };
                        return Some(i + 1);
                    }
                    b'\n' => {
                        // "." then a bare LF: content, never the end of data.
                        self.emit_dot(out);
                        self.bare_lf(out);
                        i += 1;
                    }
                    b'.' => {
                        // Transparency (§4.5.2): the first dot of a line is removed.
                        self.emit_dot(out);
                        self.state = State::Mid;
                        i += 1;
                    }
                    _ => self.state = State::Mid,
                },
                State::DotCr => {
                    if b == b'\n' {
                        self.state = State::LineStart { crlf: true };
                        return Some(i + 1);
                    }
                    // ".\r" followed by something else: a "." and a bare CR.
                    self.emit_dot(out);
                    self.state = State::Cr;
                }
            }
        }
        None
    }

    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        let new = self.emitted + bytes.len() as u64;
        if new > self.max_size {
            self.flags.oversize = true;
        } else {
            out.extend_from_slice(bytes);
        }
        self.emitted = new;
    }

    fn emit_dot(&mut self, out: &mut Vec<u8>) {
        self.line_len += 1;
        self.emit(out, b".");
        self.state = State::Mid;
    }

    fn bare_lf(&mut self, out: &mut Vec<u8>) {
        self.flags.bare_lf = true;
        self.emit(out, b"\r\n");
        self.line_len = 0;
        self.state = State::LineStart { crlf: self.lf_ends };
    }

    fn bare_cr(&mut self, out: &mut Vec<u8>) {
        self.flags.bare_cr = true;
        self.line_len += 1;
        self.emit(out, b" ");
        self.state = State::Mid;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> (Vec<u8>, Option<usize>, DataFlags) {
        let mut d = DataDecoder::new(u64::MAX);
        let mut out = Vec::new();
        let end = d.feed(input, &mut out);
        (out, end, d.flags)
    }

    /// Feeding byte by byte must give the same result as feeding at once.
    fn decode_bytewise(input: &[u8]) -> (Vec<u8>, Option<usize>) {
        let mut d = DataDecoder::new(u64::MAX);
        let mut out = Vec::new();
        for (i, b) in input.iter().enumerate() {
            if d.feed(std::slice::from_ref(b), &mut out).is_some() {
                return (out, Some(i + 1));
            }
        }
        (out, None)
    }

    #[test]
    fn plain_message_ends_at_crlf_dot_crlf() {
        let input = b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n";
        let (out, end, flags) = decode_all(input);
        assert_eq!(out, b"Subject: x\r\n\r\nhello\r\n");
        assert_eq!(end, Some(input.len() - 6));
        assert_eq!(flags, DataFlags::default());
        assert_eq!(decode_bytewise(input), (out, end));
    }

    #[test]
    fn empty_message() {
        let (out, end, _) = decode_all(b".\r\n");
        assert!(out.is_empty());
        assert_eq!(end, Some(3));
    }

    #[test]
    fn dot_unstuffing_b16() {
        // Client-stuffed lines ".", "..", ".x", "x." arrive as "..", "...", "..x", "x.".
        let input = b"..\r\n...\r\n..x\r\nx.\r\n.\r\n";
        let (out, end, _) = decode_all(input);
        assert_eq!(out, b".\r\n..\r\n.x\r\nx.\r\n");
        assert_eq!(end, Some(input.len()));
    }

    #[test]
    fn smuggling_matrix_b17_never_ends_early() {
        let endings: [&[u8]; 7] = [
            b"\n.\n",
            b"\n.\r\n",
            b"\r.\r",
            b"\r\n.\r",
            b"\r\n.\n",
            b"\r.\r\n",
            b"\r\n\0.\r\n",
        ];
        for ending in endings {
            let mut input = b"Subject: a\r\n\r\nbody".to_vec();
            input.extend_from_slice(ending);
            input.extend_from_slice(b"MAIL FROM:<spoof@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nevil\r\n");
            let real_end = input.len();
            input.extend_from_slice(b".\r\n");
            let (out, end, flags) = decode_all(&input);
            assert_eq!(end, Some(input.len()), "ending {ending:?} ended data early");
            assert_eq!(decode_bytewise(&input).1, Some(input.len()));
            // The spooled content is CRLF-clean: no lone CR or LF anywhere.
            for (i, &c) in out.iter().enumerate() {
                if c == b'\r' {
                    assert_eq!(out.get(i + 1), Some(&b'\n'), "lone CR for {ending:?}");
                }
                if c == b'\n' {
                    assert_eq!(out[i - 1], b'\r', "lone LF for {ending:?}");
                }
            }
            assert!(flags.bare_lf || flags.bare_cr || flags.nul, "{ending:?}");
            assert!(real_end > 0);
        }
    }

    #[test]
    fn bare_lf_normalised_and_bare_cr_becomes_space() {
        let (out, end, flags) = decode_all(b"a\nb\rc\r\n.\r\n");
        assert_eq!(out, b"a\r\nb c\r\n");
        assert!(end.is_some());
        assert!(flags.bare_lf && flags.bare_cr);
    }

    #[test]
    fn lf_dot_lf_is_content_that_upstream_restuffs() {
        let (out, _, _) = decode_all(b"a\n.\nb\r\n.\r\n");
        assert_eq!(out, b"a\r\n.\r\nb\r\n");
    }

    #[test]
    fn lf_only_client_may_end_with_lf_dot_lf_when_allowed() {
        let mut d = DataDecoder::new(u64::MAX);
        d.accept_lf_end();
        let mut out = Vec::new();
        let input = b"Subject: x\n\nline\n..dot\n.\nQUIT\n";
        assert_eq!(d.feed(input, &mut out), Some(input.len() - 5));
        assert_eq!(out, b"Subject: x\r\n\r\nline\r\n.dot\r\n");
        // Without the exception the same bytes do not end the data.
        let (_, end, _) = decode_all(input);
        assert_eq!(end, None);
    }

    #[test]
    fn nul_and_long_line_flagged() {
        let (_, _, flags) = decode_all(b"a\0b\r\n.\r\n");
        assert!(flags.nul);
        let mut long = vec![b'x'; 999];
        long.extend_from_slice(b"\r\n.\r\n");
        let (_, _, flags) = decode_all(&long);
        assert!(flags.long_line);
        let mut ok = vec![b'x'; 998];
        ok.extend_from_slice(b"\r\n.\r\n");
        let (_, _, flags) = decode_all(&ok);
        assert!(!flags.long_line);
    }

    #[test]
    fn oversize_stops_output_but_finds_end() {
        let mut d = DataDecoder::new(10);
        let mut out = Vec::new();
        let input = b"0123456789abcdef\r\n.\r\n";
        assert_eq!(d.feed(input, &mut out), Some(input.len()));
        assert!(d.flags.oversize);
        assert!(out.len() <= 10);
    }

    #[test]
    fn split_across_feeds_at_every_point() {
        let input = b"x\r\n..y\r\n.\r\nNEXT";
        let (want, _, _) = decode_all(input);
        for cut in 0..input.len() {
            let mut d = DataDecoder::new(u64::MAX);
            let mut out = Vec::new();
            let first = d.feed(&input[..cut], &mut out);
            let end = match first {
                Some(n) => n,
                None => cut + d.feed(&input[cut..], &mut out).unwrap(),
            };
            assert_eq!(out, want, "cut at {cut}");
            assert_eq!(&input[end..], b"NEXT");
        }
    }
}
