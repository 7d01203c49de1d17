//! Sequential reading of transaction files (`transaction`, `listener`, `listener.priv`) in
//! large blocks, and the line normalisation shared by the daemon and `univention-translog`.
//!
//! UCS read these files one `fgetc` at a time; here a [`LineScanner`] pulls 256 KiB blocks
//! and splits them in memory, keeping at most a bounded prefix of each line so that a file
//! of newline-free garbage cannot exhaust memory.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use proto::line::{LineError, MAX_LINE_LEN, Transaction};
use thiserror::Error;

/// Size of one read from the file.
pub(crate) const BLOCK_SIZE: usize = 256 * 1024;

/// How many bytes of a line a scanner keeps by default: one more than the longest valid line,
/// so an over-long line is still recognisable as such.
pub(crate) const DEFAULT_MAX_KEEP: usize = MAX_LINE_LEN + 1;

/// One line as found in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawLine {
    /// 1-based line number.
    pub line_no: u64,
    /// Byte offset of the line's first byte in the file.
    pub offset: u64,
    /// Length of the line in the file, including its `\n` if it has one.
    pub len: u64,
    /// NUL bytes at the start of the line, which are not stored in `bytes`: a crash with
    /// delayed allocation can leave whole NUL-filled blocks in front of a line, and they
    /// must not push the line's content past the scanner's limit.
    pub nul_prefix: u64,
    /// The line's bytes after `nul_prefix`, including the `\n`, cut short when the line is
    /// longer than the scanner's limit (see [`RawLine::truncated`]).
    pub bytes: Vec<u8>,
    /// The line ends with `\n`; only the last line of a file can lack it.
    pub complete: bool,
}

impl RawLine {
    /// `bytes` holds only a prefix of the line.
    pub fn truncated(&self) -> bool {
        (self.bytes.len() as u64).saturating_add(self.nul_prefix) < self.len
    }

    /// Offset just past the line.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// Metadata of a line read with [`LineScanner::read_line`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineInfo {
    /// 1-based line number.
    pub line_no: u64,
    /// Byte offset of the line's first byte.
    pub offset: u64,
    /// Full length including the `\n`.
    pub len: u64,
    /// Leading NUL bytes, not stored in the buffer.
    pub nul_prefix: u64,
    /// Ends with `\n`.
    pub complete: bool,
}

/// Splits a byte stream into lines, reading [`BLOCK_SIZE`] bytes at a time.
pub struct LineScanner<R> {
    reader: BufReader<R>,
    offset: u64,
    line_no: u64,
    max_keep: usize,
    failed: bool,
}

impl LineScanner<File> {
    /// Scans the file at `path` from its start.
    pub fn open(path: &Path) -> io::Result<LineScanner<File>> {
        Ok(LineScanner::new(File::open(path)?))
    }
}

impl<R: Read> LineScanner<R> {
    /// Scans `reader` from its current position, counting offsets from 0.
    pub fn new(reader: R) -> LineScanner<R> {
        LineScanner::starting_at(reader, 0, 0)
    }

    /// Scans `reader`, whose current position is byte `offset` of the file, after
    /// `lines_before` lines (so the first line reported is `lines_before + 1`).
    pub fn starting_at(reader: R, offset: u64, lines_before: u64) -> LineScanner<R> {
        LineScanner {
            reader: BufReader::with_capacity(BLOCK_SIZE, reader),
            offset,
            line_no: lines_before,
            max_keep: DEFAULT_MAX_KEEP,
            failed: false,
        }
    }

    /// Keeps at most `max_keep` bytes of each line.
    #[must_use]
    pub fn with_max_keep(mut self, max_keep: usize) -> LineScanner<R> {
        self.max_keep = max_keep;
        self
    }

    /// Offset of the next unread byte.
    pub fn position(&self) -> u64 {
        self.offset
    }

    /// Reads the next line into `buf` (cleared first): its bytes after any leading NULs, at
    /// most `max_keep` of them. `None` at end of file.
    pub fn read_line(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<LineInfo>> {
        buf.clear();
        let start = self.offset;
        let mut len: u64 = 0;
        let mut nul_prefix: u64 = 0;
        let mut in_prefix = true;
        let mut complete = false;
        loop {
            let block = match self.reader.fill_buf() {
                Ok(block) => block,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if block.is_empty() {
                break;
            }
            let (take, found) = match block.iter().position(|&b| b == b'\n') {
                Some(pos) => (pos.saturating_add(1), true),
                None => (block.len(), false),
            };
            let mut chunk = block.get(..take).unwrap_or_default();
            if in_prefix {
                let nuls = chunk.iter().take_while(|&&b| b == 0).count();
                nul_prefix = nul_prefix.saturating_add(nuls as u64);
                chunk = chunk.get(nuls..).unwrap_or_default();
                in_prefix = chunk.is_empty();
            }
            let room = self.max_keep.saturating_sub(buf.len());
            buf.extend_from_slice(chunk.get(..chunk.len().min(room)).unwrap_or_default());
            self.reader.consume(take);
            len = len.saturating_add(take as u64);
            if found {
                complete = true;
                break;
            }
        }
        if len == 0 {
            return Ok(None);
        }
        self.offset = start.saturating_add(len);
        self.line_no = self.line_no.saturating_add(1);
        Ok(Some(LineInfo {
            line_no: self.line_no,
            offset: start,
            len,
            nul_prefix,
            complete,
        }))
    }
}

impl<R: Read> Iterator for LineScanner<R> {
    type Item = io::Result<RawLine>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let mut bytes = Vec::new();
        match self.read_line(&mut bytes) {
            Ok(Some(info)) => Some(Ok(RawLine {
                line_no: info.line_no,
                offset: info.offset,
                len: info.len,
                nul_prefix: info.nul_prefix,
                bytes,
                complete: info.complete,
            })),
            Ok(None) => None,
            Err(e) => {
                // A read error is not retried: the position in the file is no longer known.
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Reads `file` from `pos` with positioned reads, leaving the descriptor's offset alone
/// (descriptors of one open file share it).
pub struct PosReader<'a> {
    file: &'a File,
    pos: u64,
}

impl<'a> PosReader<'a> {
    pub fn new(file: &'a File, pos: u64) -> PosReader<'a> {
        PosReader { file, pos }
    }
}

impl Read for PosReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.pos)?;
        self.pos = self.pos.saturating_add(n as u64);
        Ok(n)
    }
}

/// Bytes that surround a line's content without being part of it: whitespace and the NUL
/// blocks a crash with delayed allocation leaves behind.
pub(crate) fn is_padding(b: u8) -> bool {
    b == 0 || b.is_ascii_whitespace()
}

/// The content of a raw line: without its `\n` and without NUL bytes or whitespace at
/// either end. The DN inside keeps its spaces.
pub fn trim_line(raw: &[u8]) -> &[u8] {
    let start = content_start(raw);
    let rest = raw.get(start..).unwrap_or_default();
    let end = rest
        .iter()
        .rposition(|&b| !is_padding(b))
        .map_or(0, |p| p.saturating_add(1));
    rest.get(..end).unwrap_or_default()
}

/// Number of padding bytes (NUL, whitespace) before the line's content. An index entry points
/// past them, so that the C notifier and the Python tool, which do not skip NULs, can read
/// the line.
pub(crate) fn content_start(raw: &[u8]) -> usize {
    raw.iter()
        .position(|&b| !is_padding(b))
        .unwrap_or(raw.len())
}

/// The line holds nothing but padding.
pub fn is_blank(raw: &[u8]) -> bool {
    raw.iter().all(|&b| is_padding(b))
}

/// Parses a raw line after [`trim_line`].
pub fn parse_line(raw: &[u8]) -> Result<Transaction, LineError> {
    Transaction::parse(trim_line(raw))
}

/// Only the transaction ID of a trimmed line, without validating the rest; `None` if the
/// text before the first space is not a plain decimal number.
pub fn line_id(trimmed: &[u8]) -> Option<u64> {
    let digits = trimmed.split(|&b| b == b' ').next().unwrap_or_default();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Why a complete line breaks the rules of a transaction log. The wording is the journal's
/// start-up scan's; callers add the file and line number.
#[derive(Debug, Error)]
pub(crate) enum LineFault {
    #[error("line is {len} bytes long (maximum {MAX_LINE_LEN})")]
    TooLong { len: u64 },
    #[error("{0}")]
    Parse(#[from] LineError),
    #[error("transaction {id} follows transaction {last} (repeated or out of order)")]
    OutOfOrder { id: u64, last: u64 },
    #[error(
        "transaction {id} follows transaction {last} (transactions {}..{} are missing)",
        last.saturating_add(1),
        id.saturating_sub(1)
    )]
    Gap { id: u64, last: u64 },
}

/// The rules every complete line of a log must follow, in one place so that the journal's
/// start-up scan and the backup accept exactly the same logs: bounded length, blank lines
/// allowed, parseable, ids consecutive. Records each transaction's content offset for the
/// index.
#[derive(Debug, Default)]
pub(crate) struct LineChecker {
    first_id: Option<u64>,
    last_id: u64,
    offsets: Vec<u64>,
}

impl LineChecker {
    /// Checks one complete line read by a [`LineScanner`] into `buf`; `None` for a blank
    /// line.
    pub(crate) fn check(
        &mut self,
        info: &LineInfo,
        buf: &[u8],
    ) -> Result<Option<Transaction>, LineFault> {
        if (buf.len() as u64).saturating_add(info.nul_prefix) < info.len {
            return Err(LineFault::TooLong {
                len: info.len.saturating_sub(info.nul_prefix),
            });
        }
        if is_blank(buf) {
            return Ok(None);
        }
        let tx = parse_line(buf)?;
        let id = tx.id.get();
        let last = self.last_id;
        if self.first_id.is_some() && Some(id) != last.checked_add(1) {
            return Err(if id <= last {
                LineFault::OutOfOrder { id, last }
            } else {
                LineFault::Gap { id, last }
            });
        }
        self.first_id.get_or_insert(id);
        self.last_id = id;
        self.offsets.push(
            info.offset
                .saturating_add(info.nul_prefix)
                .saturating_add(content_start(buf) as u64),
        );
        Ok(Some(tx))
    }

    /// The first transaction's id; `None` while no line held one.
    pub(crate) fn first_id(&self) -> Option<u64> {
        self.first_id
    }

    /// The last transaction's id; 0 while no line held one.
    pub(crate) fn last_id(&self) -> u64 {
        self.last_id
    }

    /// Offset of each transaction's content, in id order from [`LineChecker::first_id`].
    pub(crate) fn offsets(&self) -> &[u64] {
        &self.offsets
    }

    /// `(first_id, last_id, offsets)`.
    pub(crate) fn into_parts(self) -> (Option<u64>, u64, Vec<u64>) {
        (self.first_id, self.last_id, self.offsets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(data: &[u8]) -> Vec<RawLine> {
        LineScanner::new(data).map(|l| l.unwrap()).collect()
    }

    #[test]
    fn splits_lines_with_offsets() {
        let got = lines(b"1 a m\n22 b a\nlast");
        assert_eq!(got.len(), 3);
        assert_eq!((got[0].line_no, got[0].offset, got[0].len), (1, 0, 6));
        assert_eq!(got[0].bytes, b"1 a m\n");
        assert!(got[0].complete);
        assert_eq!((got[1].line_no, got[1].offset, got[1].len), (2, 6, 7));
        assert_eq!((got[2].line_no, got[2].offset, got[2].len), (3, 13, 4));
        assert!(!got[2].complete);
        assert_eq!(got[2].end(), 17);
    }

    #[test]
    fn empty_input() {
        assert!(lines(b"").is_empty());
        assert_eq!(lines(b"\n").len(), 1);
    }

    #[test]
    fn long_lines_are_cut_but_measured() {
        let mut data = vec![b'x'; BLOCK_SIZE * 2 + 17];
        data.push(b'\n');
        data.extend_from_slice(b"2 cn=x m\n");
        let mut scanner = LineScanner::new(&data[..]).with_max_keep(10);
        let first = scanner.next().unwrap().unwrap();
        assert_eq!(first.bytes.len(), 10);
        assert_eq!(first.len, (BLOCK_SIZE * 2 + 18) as u64);
        assert!(first.truncated() && first.complete);
        let second = scanner.next().unwrap().unwrap();
        assert_eq!(second.offset, first.len);
        assert_eq!(second.bytes.len(), 9);
        assert!(!second.truncated());
        assert!(scanner.next().is_none());
    }

    #[test]
    fn lines_across_block_boundaries() {
        let mut data = Vec::new();
        let mut n = 0u64;
        while data.len() < BLOCK_SIZE * 3 {
            n += 1;
            data.extend_from_slice(format!("{n} cn=user{n},dc=example,dc=com m\n").as_bytes());
        }
        let mut offset = 0;
        for (i, line) in LineScanner::new(&data[..]).enumerate() {
            let line = line.unwrap();
            let tx = parse_line(&line.bytes).unwrap();
            assert_eq!(tx.id.get(), i as u64 + 1);
            assert_eq!(line.offset, offset);
            offset += line.len;
        }
        assert_eq!(offset, data.len() as u64);
    }

    #[test]
    fn leading_nuls_are_counted_not_kept() {
        let mut data = vec![0u8; BLOCK_SIZE + 10];
        data.extend_from_slice(b"1 dc=example,dc=com a\n\0\0\n");
        let mut s = LineScanner::new(&data[..]).with_max_keep(100);
        let l = s.next().unwrap().unwrap();
        assert_eq!(l.nul_prefix, (BLOCK_SIZE + 10) as u64);
        assert_eq!(l.bytes, b"1 dc=example,dc=com a\n");
        assert_eq!(l.len, (BLOCK_SIZE + 32) as u64);
        assert!(!l.truncated());
        let blank = s.next().unwrap().unwrap();
        assert_eq!((blank.nul_prefix, blank.bytes.as_slice()), (2, &b"\n"[..]));
        assert!(is_blank(&blank.bytes));
    }

    #[test]
    fn starting_at_continues_numbering() {
        let mut s = LineScanner::starting_at(&b"5 x m\n"[..], 100, 4);
        let l = s.next().unwrap().unwrap();
        assert_eq!((l.line_no, l.offset), (5, 100));
        assert_eq!(s.position(), 106);
    }

    #[test]
    fn trimming() {
        assert_eq!(trim_line(b"\0\x001 dc=x a\n"), b"1 dc=x a");
        assert_eq!(trim_line(b" 1 dc=x a \r\n"), b"1 dc=x a");
        assert_eq!(trim_line(b"1 dc=x a\0\0"), b"1 dc=x a");
        assert_eq!(trim_line(b"3  cn=x  r\n"), b"3  cn=x  r");
        assert_eq!(trim_line(b"\0\0\0"), b"");
        assert_eq!(trim_line(b""), b"");
        assert_eq!(content_start(b"\0\x001 x m"), 2);
        assert_eq!(content_start(b"\0\0"), 2);
        assert!(is_blank(b"\0 \n"));
        assert!(!is_blank(b"\x001"));
        assert_eq!(
            parse_line(b"\x001 dc=example,dc=com a\n").unwrap().id.get(),
            1
        );
    }

    fn check_all(data: &[u8]) -> Result<LineChecker, (u64, String)> {
        let mut checker = LineChecker::default();
        let mut scanner = LineScanner::new(data).with_max_keep(40);
        let mut buf = Vec::new();
        while let Some(info) = scanner.read_line(&mut buf).unwrap() {
            checker
                .check(&info, &buf)
                .map_err(|e| (info.line_no, e.to_string()))?;
        }
        Ok(checker)
    }

    #[test]
    fn line_checker_rules() {
        let ok = check_all(b"3 cn=a m\n\n\0\x004 cn=b a\n").unwrap();
        assert_eq!((ok.first_id(), ok.last_id()), (Some(3), 4));
        assert_eq!(ok.offsets(), &[0, 12]);
        let (line, reason) = check_all(b"1 cn=a m\n1 cn=a m\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(reason.contains("repeated or out of order"), "{reason}");
        let (_, reason) = check_all(b"1 cn=a m\n4 cn=a m\n").unwrap_err();
        assert!(reason.contains("transactions 2..3 are missing"), "{reason}");
        let (_, reason) = check_all(&[b'x'; 50]).unwrap_err();
        assert!(reason.contains("50 bytes long"), "{reason}");
        assert!(check_all(b"x cn=a m\n").is_err());
        let empty = check_all(b"").unwrap();
        assert_eq!((empty.first_id(), empty.last_id()), (None, 0));
    }

    #[test]
    fn ids() {
        assert_eq!(line_id(b"12 x m"), Some(12));
        assert_eq!(line_id(b"12"), Some(12));
        assert_eq!(line_id(b"<TransID> x m"), None);
        assert_eq!(line_id(b"-1 x m"), None);
        assert_eq!(line_id(b""), None);
        assert_eq!(line_id(b"99999999999999999999999 x m"), None);
    }
}
