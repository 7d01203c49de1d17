//! The transaction line `ID DN CMD`.
//!
//! This is the record format of the notifier's `listener`, `listener.priv` and `transaction`
//! files, and the body of a protocol-2 `GET_DN` answer. Every UCS parser splits it at the
//! first and at the last space, because the DN itself may contain spaces.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Longest accepted transaction line in bytes, including its terminating `\n`.
///
/// UCS formats lines into a 2048-byte buffer; we accept more so that long DNs written by other
/// tools are not rejected, while still bounding memory per line.
pub const MAX_LINE_LEN: usize = 8192;

/// A transaction ID. IDs start at 1; the value 0 means "none yet" where a last ID is reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TransactionId(pub u64);

impl TransactionId {
    /// The numeric value.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The following ID. Saturates at `u64::MAX` instead of overflowing, because overflow
    /// checks are enabled in release builds and this crate must never panic.
    #[must_use]
    pub const fn next(self) -> TransactionId {
        TransactionId(self.0.saturating_add(1))
    }

    /// The following ID, or `None` at `u64::MAX`.
    pub const fn checked_next(self) -> Option<TransactionId> {
        match self.0.checked_add(1) {
            Some(v) => Some(TransactionId(v)),
            None => None,
        }
    }
}

impl fmt::Display for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<u64> for TransactionId {
    fn from(v: u64) -> Self {
        TransactionId(v)
    }
}

impl From<TransactionId> for u64 {
    fn from(id: TransactionId) -> Self {
        id.0
    }
}

/// Parses plain decimal digits (no sign, no whitespace); 0 is accepted.
impl FromStr for TransactionId {
    type Err = LineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_u64(s)
            .map(TransactionId)
            .ok_or_else(|| LineError::BadId(s.to_owned()))
    }
}

/// Parses a non-empty run of ASCII decimal digits that fits a `u64`.
///
/// `str::parse` alone would also accept a leading `+`, which no UCS writer produces.
pub(crate) fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Like [`parse_u64`] for `u32`.
pub(crate) fn parse_u32(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The one-character change type at the end of a transaction line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Command {
    /// `a`: object added.
    Add,
    /// `m`: object modified.
    Modify,
    /// `d`: object deleted.
    Delete,
    /// `r`: old DN of a rename (followed by an `a` for the new DN).
    ModRdn,
    /// `n`: initialisation marker; never valid in the notifier's intake queue.
    Init,
}

impl Command {
    /// The wire character.
    pub const fn as_char(self) -> char {
        match self {
            Command::Add => 'a',
            Command::Modify => 'm',
            Command::Delete => 'd',
            Command::ModRdn => 'r',
            Command::Init => 'n',
        }
    }

    /// The command for a wire character, if it is one of `a m d r n`.
    pub const fn from_char(c: char) -> Option<Command> {
        match c {
            'a' => Some(Command::Add),
            'm' => Some(Command::Modify),
            'd' => Some(Command::Delete),
            'r' => Some(Command::ModRdn),
            'n' => Some(Command::Init),
            _ => None,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_char())
    }
}

/// Why a transaction line was rejected.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum LineError {
    /// Nothing but the line terminator.
    #[error("empty transaction line")]
    Empty,
    /// Longer than [`MAX_LINE_LEN`].
    #[error("transaction line too long: {len} bytes including the newline (maximum {max})")]
    TooLong {
        /// Length including the newline.
        len: usize,
        /// The limit that was exceeded.
        max: usize,
    },
    /// Contains a NUL byte, which the C tools would silently truncate at.
    #[error("transaction line contains a NUL byte")]
    NulByte,
    /// Contains a `\n` before its end; writing it back would produce two lines.
    #[error("transaction line contains an embedded newline")]
    EmbeddedNewline,
    /// Fewer than two distinct spaces, so ID, DN and command cannot be told apart.
    #[error("transaction line must have the form \"<id> <dn> <command>\"")]
    MissingParts,
    /// The ID is not plain decimal digits or does not fit 64 bits.
    #[error("invalid transaction ID {0:?}: expected an unsigned decimal number")]
    BadId(String),
    /// The ID is 0, which is never a valid transaction.
    #[error("transaction ID 0 is not valid (IDs start at 1)")]
    ZeroId,
    /// The DN is empty.
    #[error("transaction line has an empty DN")]
    EmptyDn,
    /// The command is not one of the accepted characters.
    #[error(
        "invalid transaction command {0:?}: expected a single a, m, d or r (n only where allowed)"
    )]
    BadCommand(String),
    /// The line is not valid UTF-8.
    #[error("transaction line is not valid UTF-8")]
    InvalidUtf8,
}

/// One transaction: ID, DN and change type.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Transaction {
    /// Transaction ID, > 0.
    pub id: TransactionId,
    /// The DN of the changed object, exactly as logged.
    pub dn: String,
    /// The change type.
    pub command: Command,
}

impl Transaction {
    /// Plain constructor; see [`Transaction::validate`] to check the result can be written.
    pub fn new(id: TransactionId, dn: impl Into<String>, command: Command) -> Transaction {
        Transaction {
            id,
            dn: dn.into(),
            command,
        }
    }

    /// Parses one line, with or without its trailing `\n` (and one `\r` before it).
    ///
    /// Accepts every command including `n`; see [`Transaction::parse_queue_line`].
    pub fn parse(line: &[u8]) -> Result<Transaction, LineError> {
        let had_newline = line.last() == Some(&b'\n');
        let len_with_newline = if had_newline {
            line.len()
        } else {
            line.len().saturating_add(1)
        };
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        if body.is_empty() {
            return Err(LineError::Empty);
        }
        if len_with_newline > MAX_LINE_LEN {
            return Err(LineError::TooLong {
                len: len_with_newline,
                max: MAX_LINE_LEN,
            });
        }
        if body.contains(&0) {
            return Err(LineError::NulByte);
        }
        if body.contains(&b'\n') {
            return Err(LineError::EmbeddedNewline);
        }
        let text = std::str::from_utf8(body).map_err(|_| LineError::InvalidUtf8)?;
        let (Some(first), Some(last)) = (text.find(' '), text.rfind(' ')) else {
            return Err(LineError::MissingParts);
        };
        if first == last {
            return Err(LineError::MissingParts);
        }
        // Both indices point at an ASCII space, so these slices are on char boundaries.
        let id_text = text.get(..first).unwrap_or_default();
        let dn = text.get(first + 1..last).unwrap_or_default();
        let cmd_text = text.get(last + 1..).unwrap_or_default();

        let id = parse_id(id_text)?;
        let command = parse_command(cmd_text)?;
        if dn.is_empty() {
            return Err(LineError::EmptyDn);
        }
        Ok(Transaction {
            id,
            dn: dn.to_owned(),
            command,
        })
    }

    /// Like [`Transaction::parse`], but also rejects the `n` command, which must never enter
    /// the notifier's intake queue.
    pub fn parse_queue_line(line: &[u8]) -> Result<Transaction, LineError> {
        let t = Transaction::parse(line)?;
        if t.command == Command::Init {
            return Err(LineError::BadCommand(Command::Init.as_char().to_string()));
        }
        Ok(t)
    }

    /// Checks that [`Transaction::to_line`] yields a line that [`Transaction::parse`] reads
    /// back unchanged.
    pub fn validate(&self) -> Result<(), LineError> {
        if self.id.0 == 0 {
            return Err(LineError::ZeroId);
        }
        if self.dn.is_empty() {
            return Err(LineError::EmptyDn);
        }
        if self.dn.contains('\0') {
            return Err(LineError::NulByte);
        }
        if self.dn.contains('\n') {
            return Err(LineError::EmbeddedNewline);
        }
        let len = self.line_len();
        if len > MAX_LINE_LEN {
            return Err(LineError::TooLong {
                len,
                max: MAX_LINE_LEN,
            });
        }
        Ok(())
    }

    /// The line `"{id} {dn} {c}\n"`.
    pub fn to_line(&self) -> String {
        format!("{self}\n")
    }

    /// Appends [`Transaction::to_line`] to `buf` without an intermediate allocation.
    pub fn write_line(&self, buf: &mut Vec<u8>) {
        buf.reserve(self.line_len());
        buf.extend_from_slice(self.id.to_string().as_bytes());
        buf.push(b' ');
        buf.extend_from_slice(self.dn.as_bytes());
        buf.push(b' ');
        // Every command character is ASCII.
        let mut c = [0u8; 4];
        buf.extend_from_slice(self.command.as_char().encode_utf8(&mut c).as_bytes());
        buf.push(b'\n');
    }

    /// Length of [`Transaction::to_line`] in bytes.
    fn line_len(&self) -> usize {
        let digits = self.id.to_string().len();
        // id, space, dn, space, command, newline
        digits.saturating_add(self.dn.len()).saturating_add(4)
    }
}

impl fmt::Display for Transaction {
    /// The line without its newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.id, self.dn, self.command)
    }
}

fn parse_id(text: &str) -> Result<TransactionId, LineError> {
    match parse_u64(text) {
        Some(0) => Err(LineError::ZeroId),
        Some(v) => Ok(TransactionId(v)),
        None => Err(LineError::BadId(text.to_owned())),
    }
}

fn parse_command(text: &str) -> Result<Command, LineError> {
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => Command::from_char(c).ok_or_else(|| LineError::BadCommand(text.into())),
        _ => Err(LineError::BadCommand(text.to_owned())),
    }
}

/// Parses the body of a protocol-2 `GET_DN` answer on the client side.
///
/// Lenient like the UCS C listener: the ID is the text before the first space; if the text
/// after the last space is exactly one character it is the command, otherwise the command
/// defaults to [`Command::Modify`] and everything after the first space is the DN. Only the
/// first line of the body is used (a server that forgot a terminating blank line may have
/// glued further text to it), and a trailing `\r` is ignored.
pub fn parse_get_dn_body(body: &str) -> Result<Transaction, LineError> {
    let line = body.split('\n').next().unwrap_or_default();
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.is_empty() {
        return Err(LineError::Empty);
    }
    if line.contains('\0') {
        return Err(LineError::NulByte);
    }
    let Some((id_text, rest)) = line.split_once(' ') else {
        return Err(LineError::MissingParts);
    };
    let id = parse_id(id_text)?;
    // With a single space the first and last space coincide: the last token is then the
    // whole rest and the DN in front of it is empty, exactly as in the C listener.
    let (before_last, last) = rest.rsplit_once(' ').unwrap_or(("", rest));
    let (dn, command) = if last.chars().count() == 1 {
        (before_last, parse_command(last)?)
    } else {
        (rest, Command::Modify)
    };
    if dn.is_empty() {
        return Err(LineError::EmptyDn);
    }
    Ok(Transaction {
        id,
        dn: dn.to_owned(),
        command,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: u64, dn: &str, command: Command) -> Transaction {
        Transaction::new(TransactionId(id), dn, command)
    }

    #[test]
    fn parses_plain_line() {
        let got = Transaction::parse(b"4711 uid=alice,cn=users,dc=example,dc=com m\n").unwrap();
        assert_eq!(
            got,
            t(
                4711,
                "uid=alice,cn=users,dc=example,dc=com",
                Command::Modify
            )
        );
    }

    #[test]
    fn newline_and_cr_are_optional() {
        let want = t(1, "cn=x", Command::Add);
        assert_eq!(Transaction::parse(b"1 cn=x a").unwrap(), want);
        assert_eq!(Transaction::parse(b"1 cn=x a\n").unwrap(), want);
        assert_eq!(Transaction::parse(b"1 cn=x a\r\n").unwrap(), want);
        assert_eq!(Transaction::parse(b"1 cn=x a\r").unwrap(), want);
    }

    #[test]
    fn dn_with_spaces_splits_at_first_and_last_space() {
        let got = Transaction::parse(b"12 cn=John Smith,ou=Sales Team,dc=x d\n").unwrap();
        assert_eq!(
            got,
            t(12, "cn=John Smith,ou=Sales Team,dc=x", Command::Delete)
        );
        // Leading and trailing spaces inside the DN are kept.
        let got = Transaction::parse(b"3  cn=x  r").unwrap();
        assert_eq!(got, t(3, " cn=x ", Command::ModRdn));
    }

    #[test]
    fn every_command_char() {
        for (c, cmd) in [
            ('a', Command::Add),
            ('m', Command::Modify),
            ('d', Command::Delete),
            ('r', Command::ModRdn),
            ('n', Command::Init),
        ] {
            assert_eq!(cmd.as_char(), c);
            assert_eq!(Command::from_char(c), Some(cmd));
            assert_eq!(cmd.to_string(), c.to_string());
            let line = format!("5 cn=x {c}\n");
            assert_eq!(Transaction::parse(line.as_bytes()).unwrap().command, cmd);
        }
        assert_eq!(Command::from_char('x'), None);
        assert_eq!(Command::from_char('M'), None);
    }

    #[test]
    fn leading_zeros_accepted() {
        assert_eq!(
            Transaction::parse(b"007 cn=x m").unwrap().id,
            TransactionId(7)
        );
    }

    #[test]
    fn max_id() {
        let line = format!("{} cn=x m\n", u64::MAX);
        assert_eq!(
            Transaction::parse(line.as_bytes()).unwrap().id,
            TransactionId(u64::MAX)
        );
    }

    #[test]
    fn error_empty() {
        assert_eq!(Transaction::parse(b""), Err(LineError::Empty));
        assert_eq!(Transaction::parse(b"\n"), Err(LineError::Empty));
        assert_eq!(Transaction::parse(b"\r\n"), Err(LineError::Empty));
    }

    #[test]
    fn error_too_long_boundary() {
        // Exactly MAX_LINE_LEN including the newline is accepted.
        let dn = "x".repeat(MAX_LINE_LEN - "1  m\n".len());
        let ok = format!("1 {dn} m\n");
        assert_eq!(ok.len(), MAX_LINE_LEN);
        assert!(Transaction::parse(ok.as_bytes()).is_ok());
        // Without the newline it counts as if the newline were there.
        assert!(Transaction::parse(ok.trim_end().as_bytes()).is_ok());
        let long = format!("1 {dn}x m\n");
        assert_eq!(
            Transaction::parse(long.as_bytes()),
            Err(LineError::TooLong {
                len: MAX_LINE_LEN + 1,
                max: MAX_LINE_LEN
            })
        );
        assert_eq!(
            Transaction::parse(long.trim_end().as_bytes()),
            Err(LineError::TooLong {
                len: MAX_LINE_LEN + 1,
                max: MAX_LINE_LEN
            })
        );
    }

    #[test]
    fn error_nul() {
        assert_eq!(Transaction::parse(b"1 cn=\0x m\n"), Err(LineError::NulByte));
    }

    #[test]
    fn error_embedded_newline() {
        assert_eq!(
            Transaction::parse(b"1 cn=x m\n2 cn=y a\n"),
            Err(LineError::EmbeddedNewline)
        );
    }

    #[test]
    fn error_missing_parts() {
        assert_eq!(Transaction::parse(b"1"), Err(LineError::MissingParts));
        assert_eq!(Transaction::parse(b"1 cn=x"), Err(LineError::MissingParts));
        assert_eq!(Transaction::parse(b"cn=x\n"), Err(LineError::MissingParts));
    }

    #[test]
    fn error_bad_id() {
        assert_eq!(
            Transaction::parse(b"x1 cn=x m"),
            Err(LineError::BadId("x1".into()))
        );
        assert_eq!(
            Transaction::parse(b"+1 cn=x m"),
            Err(LineError::BadId("+1".into()))
        );
        assert_eq!(
            Transaction::parse(b" cn=x m"),
            Err(LineError::BadId(String::new()))
        );
        assert_eq!(
            Transaction::parse(b"18446744073709551616 cn=x m"),
            Err(LineError::BadId("18446744073709551616".into()))
        );
    }

    #[test]
    fn error_zero_id() {
        assert_eq!(Transaction::parse(b"0 cn=x m"), Err(LineError::ZeroId));
        assert_eq!(Transaction::parse(b"000 cn=x m"), Err(LineError::ZeroId));
    }

    #[test]
    fn error_empty_dn() {
        assert_eq!(Transaction::parse(b"1  m"), Err(LineError::EmptyDn));
    }

    #[test]
    fn error_bad_command() {
        assert_eq!(
            Transaction::parse(b"1 cn=x mm"),
            Err(LineError::BadCommand("mm".into()))
        );
        assert_eq!(
            Transaction::parse(b"1 cn=x x"),
            Err(LineError::BadCommand("x".into()))
        );
        assert_eq!(
            Transaction::parse(b"1 cn=x "),
            Err(LineError::BadCommand(String::new()))
        );
    }

    #[test]
    fn error_invalid_utf8() {
        assert_eq!(
            Transaction::parse(b"1 cn=\xff m"),
            Err(LineError::InvalidUtf8)
        );
    }

    #[test]
    fn queue_line_rejects_init() {
        assert_eq!(
            Transaction::parse_queue_line(b"1 cn=x n\n"),
            Err(LineError::BadCommand("n".into()))
        );
        assert_eq!(
            Transaction::parse_queue_line(b"1 cn=x a\n").unwrap(),
            t(1, "cn=x", Command::Add)
        );
        assert_eq!(Transaction::parse_queue_line(b""), Err(LineError::Empty));
    }

    #[test]
    fn non_ascii_dn() {
        let got = Transaction::parse("9 cn=Jürgen Müller,dc=x m\n".as_bytes()).unwrap();
        assert_eq!(got.dn, "cn=Jürgen Müller,dc=x");
    }

    #[test]
    fn round_trip_and_display() {
        let tr = t(40, "uid=alice,cn=users,dc=example,dc=com", Command::Modify);
        assert_eq!(tr.to_string(), "40 uid=alice,cn=users,dc=example,dc=com m");
        assert_eq!(tr.to_line(), "40 uid=alice,cn=users,dc=example,dc=com m\n");
        let mut buf = b"prefix:".to_vec();
        tr.write_line(&mut buf);
        assert_eq!(buf, b"prefix:40 uid=alice,cn=users,dc=example,dc=com m\n");
        assert_eq!(Transaction::parse(tr.to_line().as_bytes()).unwrap(), tr);
        assert_eq!(tr.validate(), Ok(()));
    }

    #[test]
    fn validate_rejects_unwritable() {
        assert_eq!(
            t(0, "cn=x", Command::Add).validate(),
            Err(LineError::ZeroId)
        );
        assert_eq!(t(1, "", Command::Add).validate(), Err(LineError::EmptyDn));
        assert_eq!(
            t(1, "a\0", Command::Add).validate(),
            Err(LineError::NulByte)
        );
        assert_eq!(
            t(1, "a\nb", Command::Add).validate(),
            Err(LineError::EmbeddedNewline)
        );
        let long = t(1, &"x".repeat(MAX_LINE_LEN), Command::Add);
        assert!(matches!(long.validate(), Err(LineError::TooLong { .. })));
        let fits = t(1, &"x".repeat(MAX_LINE_LEN - 5), Command::Add);
        assert_eq!(fits.to_line().len(), MAX_LINE_LEN);
        assert_eq!(fits.validate(), Ok(()));
    }

    #[test]
    fn transaction_id_basics() {
        let id = TransactionId(41);
        assert_eq!(id.next(), TransactionId(42));
        assert_eq!(id.get(), 41);
        assert_eq!(id.to_string(), "41");
        assert_eq!(TransactionId(u64::MAX).next(), TransactionId(u64::MAX));
        assert_eq!(TransactionId(u64::MAX).checked_next(), None);
        assert_eq!(TransactionId(1).checked_next(), Some(TransactionId(2)));
        assert!(TransactionId(1) < TransactionId(2));
        assert_eq!(TransactionId(0), TransactionId::default());
        assert_eq!("0".parse::<TransactionId>(), Ok(TransactionId(0)));
        assert_eq!(
            "-1".parse::<TransactionId>(),
            Err(LineError::BadId("-1".into()))
        );
        assert_eq!(u64::from(TransactionId::from(5)), 5);
    }

    #[test]
    fn get_dn_body_strict_form() {
        assert_eq!(
            parse_get_dn_body("40 uid=alice,cn=users,dc=example,dc=com m").unwrap(),
            t(40, "uid=alice,cn=users,dc=example,dc=com", Command::Modify)
        );
        assert_eq!(
            parse_get_dn_body("44 cn=x,dc=example,dc=com a").unwrap(),
            t(44, "cn=x,dc=example,dc=com", Command::Add)
        );
        assert_eq!(
            parse_get_dn_body("7 cn=a b,dc=x d\r\n").unwrap(),
            t(7, "cn=a b,dc=x", Command::Delete)
        );
    }

    #[test]
    fn get_dn_body_lenient_defaults_to_modify() {
        assert_eq!(
            parse_get_dn_body("5 cn=a b,dc=x xy").unwrap(),
            t(5, "cn=a b,dc=x xy", Command::Modify)
        );
        assert_eq!(
            parse_get_dn_body("1 foo").unwrap(),
            t(1, "foo", Command::Modify)
        );
        // Only the first line counts.
        assert_eq!(
            parse_get_dn_body("2 cn=x a\nMSGID: 3").unwrap(),
            t(2, "cn=x", Command::Add)
        );
    }

    #[test]
    fn get_dn_body_errors() {
        assert_eq!(parse_get_dn_body(""), Err(LineError::Empty));
        assert_eq!(parse_get_dn_body("42"), Err(LineError::MissingParts));
        assert_eq!(
            parse_get_dn_body("x cn=y m"),
            Err(LineError::BadId("x".into()))
        );
        assert_eq!(parse_get_dn_body("0 cn=y m"), Err(LineError::ZeroId));
        assert_eq!(parse_get_dn_body("1 "), Err(LineError::EmptyDn));
        assert_eq!(parse_get_dn_body("1 m"), Err(LineError::EmptyDn));
        assert_eq!(parse_get_dn_body("1  m"), Err(LineError::EmptyDn));
        assert_eq!(
            parse_get_dn_body("1 cn=y q"),
            Err(LineError::BadCommand("q".into()))
        );
        assert_eq!(parse_get_dn_body("1 cn\0 m"), Err(LineError::NulByte));
    }

    #[test]
    fn error_messages_are_descriptive() {
        assert_eq!(
            LineError::TooLong {
                len: 9000,
                max: 8192
            }
            .to_string(),
            "transaction line too long: 9000 bytes including the newline (maximum 8192)"
        );
        assert_eq!(
            LineError::BadId("x".into()).to_string(),
            "invalid transaction ID \"x\": expected an unsigned decimal number"
        );
    }
}
