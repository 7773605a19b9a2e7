//! DNS messages (RFC 1035) as the DNS check sends and reads them: a small
//! encoder and a decoder for what comes back over UDP.
//!
//! The decoder reads outside input, so it trusts nothing: every read is
//! bounds-checked, a compressed name may only point backwards (which rules
//! out loops), names are limited to 255 bytes, and record counts never
//! size an allocation. A malformed message is a [`WireError`], never a panic
//! (a property test feeds it arbitrary bytes).
//!
//! Names are dotted text without the trailing dot. A decoded label byte that
//! is not a letter, digit, `-` or `_` is written `\DDD`, so no label can
//! smuggle a dot.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Longest name on the wire, in bytes (RFC 1035 §2.3.4).
const MAX_NAME: usize = 255;
const MAX_LABEL: usize = 63;
/// Largest message the check reads: a UDP answer without EDNS is at most 512
/// bytes; some servers send more.
pub const MAX_MESSAGE: usize = 4096;

pub const CLASS_IN: u16 = 1;

/// Record types the check knows by name.
pub const TYPES: [(&str, u16); 8] = [
    ("A", 1),
    ("NS", 2),
    ("CNAME", 5),
    ("SOA", 6),
    ("PTR", 12),
    ("MX", 15),
    ("TXT", 16),
    ("AAAA", 28),
];

/// The number of a record type name (`A`, `MX`, …), case-insensitive.
pub fn type_code(name: &str) -> Option<u16> {
    TYPES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, code)| *code)
}

/// The name of a response code, as conditions compare it (`NOERROR`, …).
pub fn rcode_name(rcode: u8) -> String {
    match rcode {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        6 => "YXDOMAIN".into(),
        7 => "YXRRSET".into(),
        8 => "NXRRSET".into(),
        9 => "NOTAUTH".into(),
        10 => "NOTZONE".into(),
        other => format!("RCODE{other}"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the message ends at byte {0}, inside {1}")]
    Truncated(usize, &'static str),
    #[error("a compressed name at byte {0} points forward or at itself")]
    BadPointer(usize),
    #[error("a name is longer than {MAX_NAME} bytes")]
    NameTooLong,
    #[error("label {0:?} is longer than {MAX_LABEL} bytes")]
    LabelTooLong(String),
    #[error("name {0:?} has an empty label")]
    EmptyLabel(String),
    #[error("label type {0:#04x} at byte {1} is not supported")]
    LabelType(u8, usize),
    #[error("a {0} record has {1} bytes of data, expected {2}")]
    BadLength(&'static str, usize, usize),
    #[error("the message would be longer than 65535 bytes")]
    TooLong,
}

/// Header flags the check looks at.
pub mod flags {
    pub const QR: u16 = 0x8000;
    pub const AA: u16 = 0x0400;
    pub const TC: u16 = 0x0200;
    pub const RD: u16 = 0x0100;
    pub const RA: u16 = 0x0080;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// CNAME, NS, PTR: one name.
    Name(String),
    Mx {
        preference: u16,
        exchange: String,
    },
    /// Character strings, as sent.
    Txt(Vec<Vec<u8>>),
    /// Any other type, kept as bytes (names inside are not expanded).
    Other(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub rtype: u16,
    pub class: u16,
    pub ttl: u32,
    pub data: RData,
}

impl fmt::Display for RData {
    /// The answer as the check compares it with `expected`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RData::A(a) => write!(f, "{a}"),
            RData::Aaaa(a) => write!(f, "{a}"),
            RData::Name(n) => f.write_str(n),
            RData::Mx {
                preference,
                exchange,
            } => write!(f, "{preference} {exchange}"),
            RData::Txt(parts) => {
                for part in parts {
                    f.write_str(&String::from_utf8_lossy(part))?;
                }
                Ok(())
            }
            RData::Other(bytes) => {
                for b in bytes {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub id: u16,
    /// QR, opcode, AA, TC, RD, RA, Z and RCODE, as on the wire.
    pub flags: u16,
    pub questions: Vec<Question>,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

impl Message {
    /// A recursive query for one name and type.
    pub fn query(id: u16, name: &str, qtype: u16) -> Message {
        Message {
            id,
            flags: flags::RD,
            questions: vec![Question {
                name: name.to_owned(),
                qtype,
                qclass: CLASS_IN,
            }],
            ..Message::default()
        }
    }

    pub fn rcode(&self) -> u8 {
        (self.flags & 0x000f) as u8
    }

    pub fn is_response(&self) -> bool {
        self.flags & flags::QR != 0
    }

    pub fn truncated(&self) -> bool {
        self.flags & flags::TC != 0
    }

    /// The wire form. Names are written whole (no compression).
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        for count in [
            self.questions.len(),
            self.answers.len(),
            self.authorities.len(),
            self.additionals.len(),
        ] {
            let count = u16::try_from(count).map_err(|_| WireError::TooLong)?;
            out.extend_from_slice(&count.to_be_bytes());
        }
        for q in &self.questions {
            encode_name(&mut out, &q.name)?;
            out.extend_from_slice(&q.qtype.to_be_bytes());
            out.extend_from_slice(&q.qclass.to_be_bytes());
        }
        for record in self
            .answers
            .iter()
            .chain(&self.authorities)
            .chain(&self.additionals)
        {
            encode_name(&mut out, &record.name)?;
            out.extend_from_slice(&record.rtype.to_be_bytes());
            out.extend_from_slice(&record.class.to_be_bytes());
            out.extend_from_slice(&record.ttl.to_be_bytes());
            let length_at = out.len();
            out.extend_from_slice(&[0, 0]);
            match &record.data {
                RData::A(a) => out.extend_from_slice(&a.octets()),
                RData::Aaaa(a) => out.extend_from_slice(&a.octets()),
                RData::Name(name) => encode_name(&mut out, name)?,
                RData::Mx {
                    preference,
                    exchange,
                } => {
                    out.extend_from_slice(&preference.to_be_bytes());
                    encode_name(&mut out, exchange)?;
                }
                RData::Txt(parts) => {
                    for part in parts {
                        let len = u8::try_from(part.len()).map_err(|_| WireError::TooLong)?;
                        out.push(len);
                        out.extend_from_slice(part);
                    }
                }
                RData::Other(bytes) => out.extend_from_slice(bytes),
            }
            let data_len =
                u16::try_from(out.len() - length_at - 2).map_err(|_| WireError::TooLong)?;
            out[length_at..length_at + 2].copy_from_slice(&data_len.to_be_bytes());
        }
        if out.len() > usize::from(u16::MAX) {
            return Err(WireError::TooLong);
        }
        Ok(out)
    }

    /// Reads a message; anything malformed is an error.
    pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
        let mut r = Reader { bytes, at: 0 };
        let id = r.u16("the header")?;
        let flags = r.u16("the header")?;
        let qd = r.u16("the header")?;
        let an = r.u16("the header")?;
        let ns = r.u16("the header")?;
        let ar = r.u16("the header")?;
        let mut message = Message {
            id,
            flags,
            ..Message::default()
        };
        for _ in 0..qd {
            let name = r.name()?;
            let qtype = r.u16("a question")?;
            let qclass = r.u16("a question")?;
            message.questions.push(Question {
                name,
                qtype,
                qclass,
            });
        }
        for (count, section) in [
            (an, &mut message.answers),
            (ns, &mut message.authorities),
            (ar, &mut message.additionals),
        ] {
            for _ in 0..count {
                section.push(r.record()?);
            }
        }
        Ok(message)
    }
}

fn encode_name(out: &mut Vec<u8>, name: &str) -> Result<(), WireError> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    let mut total = 1;
    if !trimmed.is_empty() {
        for label in trimmed.split('.') {
            if label.is_empty() {
                return Err(WireError::EmptyLabel(name.to_owned()));
            }
            if label.len() > MAX_LABEL {
                return Err(WireError::LabelTooLong(label.to_owned()));
            }
            total += 1 + label.len();
            if total > MAX_NAME {
                return Err(WireError::NameTooLong);
            }
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
    }
    out.push(0);
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(WireError::Truncated(self.bytes.len(), what))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A possibly compressed name at the reader's position; the reader ends
    /// up after it (after the first pointer, when there is one).
    fn name(&mut self) -> Result<String, WireError> {
        let mut text = String::new();
        let mut wire_len = 1;
        // Where reading continues once the name is done.
        let mut resume = None;
        let mut at = self.at;
        // Pointers must go strictly backwards, below every earlier jump.
        let mut limit = self.at;
        loop {
            let len = *self
                .bytes
                .get(at)
                .ok_or(WireError::Truncated(self.bytes.len(), "a name"))?;
            match len & 0xc0 {
                0x00 => {
                    at += 1;
                    if len == 0 {
                        break;
                    }
                    let len = usize::from(len);
                    wire_len += 1 + len;
                    if wire_len > MAX_NAME {
                        return Err(WireError::NameTooLong);
                    }
                    let label = self
                        .bytes
                        .get(at..at + len)
                        .ok_or(WireError::Truncated(self.bytes.len(), "a name"))?;
                    if !text.is_empty() {
                        text.push('.');
                    }
                    push_label(&mut text, label);
                    at += len;
                }
                0xc0 => {
                    let low = *self
                        .bytes
                        .get(at + 1)
                        .ok_or(WireError::Truncated(self.bytes.len(), "a name"))?;
                    let target = usize::from(u16::from_be_bytes([len & 0x3f, low]));
                    if target >= limit {
                        return Err(WireError::BadPointer(at));
                    }
                    resume.get_or_insert(at + 2);
                    limit = target;
                    at = target;
                }
                _ => return Err(WireError::LabelType(len, at)),
            }
        }
        self.at = resume.unwrap_or(at);
        Ok(text)
    }

    fn record(&mut self) -> Result<Record, WireError> {
        let name = self.name()?;
        let rtype = self.u16("a record")?;
        let class = self.u16("a record")?;
        let ttl = self.u32("a record")?;
        let len = usize::from(self.u16("a record")?);
        let start = self.at;
        let data = self.take(len, "record data")?;
        let data = match rtype {
            1 => RData::A(Ipv4Addr::from(
                <[u8; 4]>::try_from(data).map_err(|_| WireError::BadLength("A", len, 4))?,
            )),
            28 => RData::Aaaa(Ipv6Addr::from(
                <[u8; 16]>::try_from(data).map_err(|_| WireError::BadLength("AAAA", len, 16))?,
            )),
            2 | 5 | 12 => {
                let mut inner = Reader {
                    bytes: self.bytes,
                    at: start,
                };
                let name = inner.name()?;
                if inner.at != start + len {
                    return Err(WireError::BadLength("name", len, inner.at - start));
                }
                RData::Name(name)
            }
            15 => {
                let mut inner = Reader {
                    bytes: self.bytes,
                    at: start,
                };
                let preference = inner.u16("an MX record")?;
                let exchange = inner.name()?;
                if inner.at != start + len {
                    return Err(WireError::BadLength("MX", len, inner.at - start));
                }
                RData::Mx {
                    preference,
                    exchange,
                }
            }
            16 => {
                let mut inner = Reader { bytes: data, at: 0 };
                let mut parts = Vec::new();
                while inner.at < data.len() {
                    let n = usize::from(inner.u8("a TXT record")?);
                    parts.push(inner.take(n, "a TXT record")?.to_vec());
                }
                RData::Txt(parts)
            }
            _ => RData::Other(data.to_vec()),
        };
        Ok(Record {
            name,
            rtype,
            class,
            ttl,
            data,
        })
    }
}

fn push_label(text: &mut String, label: &[u8]) {
    for &b in label {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            text.push(char::from(b));
        } else {
            text.push_str(&format!("\\{b:03}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(name: &str, data: RData, rtype: u16) -> Record {
        Record {
            name: name.into(),
            rtype,
            class: CLASS_IN,
            ttl: 300,
            data,
        }
    }

    #[test]
    fn a_response_round_trips() {
        let mut m = Message::query(0xbeef, "example.test", 1);
        m.flags |= flags::QR | flags::RA;
        m.answers = vec![
            answer("example.test", RData::A(Ipv4Addr::new(192, 0, 2, 7)), 1),
            answer(
                "example.test",
                RData::Mx {
                    preference: 10,
                    exchange: "mail.example.test".into(),
                },
                15,
            ),
            answer(
                "example.test",
                RData::Txt(vec![b"v=spf1 ".to_vec(), b"-all".to_vec()]),
                16,
            ),
            answer("www.example.test", RData::Name("example.test".into()), 5),
            answer("example.test", RData::Aaaa(Ipv6Addr::LOCALHOST), 28),
        ];
        let bytes = m.encode().unwrap();
        let back = Message::decode(&bytes).unwrap();
        assert_eq!(back, m);
        assert!(back.is_response());
        assert_eq!(back.rcode(), 0);
        let texts: Vec<String> = back.answers.iter().map(|a| a.data.to_string()).collect();
        assert_eq!(
            texts,
            [
                "192.0.2.7",
                "10 mail.example.test",
                "v=spf1 -all",
                "example.test",
                "::1"
            ]
        );
    }

    #[test]
    fn compressed_names_are_followed() {
        // Header, question "a.b" at 12, answer name = pointer to 12, CNAME
        // data = "c" + pointer to 14 ("b").
        let mut bytes = vec![0, 1, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        bytes.extend_from_slice(&[1, b'a', 1, b'b', 0, 0, 5, 0, 1]);
        bytes.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 4]);
        bytes.extend_from_slice(&[1, b'c', 0xc0, 14]);
        let m = Message::decode(&bytes).unwrap();
        assert_eq!(m.questions[0].name, "a.b");
        assert_eq!(m.answers[0].name, "a.b");
        assert_eq!(m.answers[0].data, RData::Name("c.b".into()));
    }

    #[test]
    fn pointer_loops_and_bad_lengths_are_errors() {
        // A name that points at itself.
        let mut bytes = vec![0, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
        bytes.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(Message::decode(&bytes), Err(WireError::BadPointer(12)));
        // An A record with 3 bytes of data.
        let mut bytes = vec![0, 1, 0x81, 0x80, 0, 0, 0, 1, 0, 0, 0, 0];
        bytes.extend_from_slice(&[0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 3, 1, 2, 3]);
        assert_eq!(
            Message::decode(&bytes),
            Err(WireError::BadLength("A", 3, 4))
        );
        // Counts that promise more than the message holds.
        let bytes = [0, 1, 0x81, 0x80, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        assert!(matches!(
            Message::decode(&bytes),
            Err(WireError::Truncated(..))
        ));
    }

    #[test]
    fn names_that_cannot_be_sent_are_refused() {
        let long_label = "a".repeat(64);
        assert!(matches!(
            Message::query(1, &long_label, 1).encode(),
            Err(WireError::LabelTooLong(_))
        ));
        let long_name = vec!["abcdefgh"; 40].join(".");
        assert_eq!(
            Message::query(1, &long_name, 1).encode(),
            Err(WireError::NameTooLong)
        );
        assert!(matches!(
            Message::query(1, "a..b", 1).encode(),
            Err(WireError::EmptyLabel(_))
        ));
        // The root and a trailing dot are fine.
        assert!(Message::query(1, ".", 2).encode().is_ok());
        assert_eq!(
            Message::decode(&Message::query(1, "x.test.", 1).encode().unwrap())
                .unwrap()
                .questions[0]
                .name,
            "x.test"
        );
    }

    #[test]
    fn odd_label_bytes_are_escaped() {
        let mut bytes = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        bytes.extend_from_slice(&[3, b'a', b'.', 0xff, 0, 0, 1, 0, 1]);
        let m = Message::decode(&bytes).unwrap();
        assert_eq!(m.questions[0].name, "a\\046\\255");
    }

    #[test]
    fn type_and_rcode_names() {
        assert_eq!(type_code("aaaa"), Some(28));
        assert_eq!(type_code("SRV"), None);
        assert_eq!(rcode_name(3), "NXDOMAIN");
        assert_eq!(rcode_name(15), "RCODE15");
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn decoding_mutated_responses_never_panics(
            flips in proptest::collection::vec((0usize..200, proptest::num::u8::ANY), 1..8),
            cut in 0usize..200,
        ) {
            let mut m = Message::query(7, "www.example.test", 15);
            m.answers.push(answer("www.example.test", RData::Mx { preference: 5, exchange: "mx.example.test".into() }, 15));
            m.answers.push(answer("www.example.test", RData::A(Ipv4Addr::new(10, 0, 0, 1)), 1));
            let mut bytes = m.encode().unwrap();
            for (at, value) in flips {
                if let Some(b) = bytes.get_mut(at) {
                    *b = value;
                }
            }
            bytes.truncate(cut.max(1));
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn encoded_queries_decode_to_themselves(
            labels in proptest::collection::vec("[a-z0-9][a-z0-9-]{0,20}", 1..6),
            qtype in proptest::num::u16::ANY,
            id in proptest::num::u16::ANY,
        ) {
            let name = labels.join(".");
            let m = Message::query(id, &name, qtype);
            let back = Message::decode(&m.encode().unwrap()).unwrap();
            proptest::prop_assert_eq!(back, m);
        }
    }
}
