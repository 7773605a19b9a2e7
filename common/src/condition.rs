//! The condition language of endpoint checks: one comparison per condition,
//! a placeholder on the left, a value on the right.
//!
//! ```text
//! [STATUS] == 200
//! [RESPONSE_TIME] < 300
//! [BODY].status == UP
//! [BODY].items[0].name != "old name"
//! [CERTIFICATE_EXPIRATION] > 72h
//! [CONNECTED] == true
//! [DNS_RCODE] == NOERROR
//! ```
//!
//! Placeholders: `[STATUS]` (HTTP status code), `[RESPONSE_TIME]` (ms, the
//! whole check; for ICMP the average round trip), `[BODY]` (the response
//! body as text, or with a JSON path `.field`, `[index]`, the value there),
//! `[CERTIFICATE_EXPIRATION]` (time left on the first-expiring certificate of
//! the chain), `[CONNECTED]` (whether the target answered at all),
//! `[DNS_RCODE]`, `[PACKET_LOSS]` (percent), `[IP]` (the address checked).
//! Values: numbers, durations (`500ms`, `30s`, `5m`, `72h`, `7d`; compared
//! in milliseconds), `true`/`false`, words (`UP`, `NOERROR`), or quoted
//! strings. `==` and `!=` compare anything; `<`, `<=`, `>`, `>=` compare
//! numbers and durations.
//!
//! [`Condition::parse`] reports the column of what it could not read, so an
//! endpoint with a bad condition is refused where it is created, never later
//! by an agent.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest condition accepted, in bytes.
pub const MAX_LEN: usize = 1024;
/// Deepest JSON path accepted.
const MAX_PATH: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Placeholder {
    Status,
    ResponseTime,
    Body,
    CertificateExpiration,
    Connected,
    DnsRcode,
    PacketLoss,
    Ip,
}

impl Placeholder {
    const ALL: [(&'static str, Placeholder); 8] = [
        ("STATUS", Placeholder::Status),
        ("RESPONSE_TIME", Placeholder::ResponseTime),
        ("BODY", Placeholder::Body),
        ("CERTIFICATE_EXPIRATION", Placeholder::CertificateExpiration),
        ("CONNECTED", Placeholder::Connected),
        ("DNS_RCODE", Placeholder::DnsRcode),
        ("PACKET_LOSS", Placeholder::PacketLoss),
        ("IP", Placeholder::Ip),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, p)| *p == self)
            .map_or("?", |(name, _)| name)
    }

    /// Whether a check of `kind` (`http`, `tcp`, `icmp`, `dns`) measures it.
    pub fn applies_to(self, kind: &str) -> bool {
        match self {
            Placeholder::Connected | Placeholder::ResponseTime | Placeholder::Ip => true,
            Placeholder::Status | Placeholder::Body => kind == "http",
            Placeholder::CertificateExpiration => kind == "http" || kind == "tcp",
            Placeholder::DnsRcode => kind == "dns",
            Placeholder::PacketLoss => kind == "icmp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    fn symbol(self) -> &'static str {
        match self {
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }

    fn orders(self) -> bool {
        !matches!(self, Op::Eq | Op::Ne)
    }
}

/// One step of a JSON path into the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    Field(String),
    Index(usize),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Number(f64),
    /// Milliseconds.
    Duration(f64),
    Bool(bool),
    Text(String),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Number(n) | Value::Duration(n) => write!(f, "{n}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Text(t) => write!(f, "{t:?}"),
        }
    }
}

/// A parsed condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    pub placeholder: Placeholder,
    pub path: Vec<Step>,
    pub op: Op,
    pub value: Value,
}

/// What could not be read, and where (1-based column, in characters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: {message}")]
pub struct ParseError {
    pub column: usize,
    pub message: String,
}

/// What a check measured, for conditions to look at. `None`: not measured
/// (not this kind of check, or the check failed before it got there).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Measured {
    pub status: Option<u16>,
    pub response_time_ms: Option<f64>,
    pub body: Option<String>,
    pub certificate_expiration_ms: Option<f64>,
    pub connected: bool,
    pub dns_rcode: Option<String>,
    pub packet_loss_percent: Option<f64>,
    pub ip: Option<String>,
}

/// Why a condition does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Failed(pub String);

impl Condition {
    pub fn parse(text: &str) -> Result<Condition, ParseError> {
        if text.len() > MAX_LEN {
            return Err(ParseError {
                column: 1,
                message: format!("a condition is at most {MAX_LEN} bytes"),
            });
        }
        Parser::new(text).condition()
    }

    /// Whether the condition holds for what a check measured.
    pub fn check(&self, measured: &Measured) -> Result<(), Failed> {
        let actual = self.actual(measured)?;
        let holds = match (&actual, &self.value) {
            (Value::Number(a) | Value::Duration(a), Value::Number(b) | Value::Duration(b)) => {
                compare(self.op, a.partial_cmp(b))
            }
            (_, _) if self.op.orders() => {
                return Err(Failed(format!(
                    "{} is {actual}, which cannot be ordered against {}",
                    self.left(),
                    self.value
                )));
            }
            (a, b) => {
                let equal = text_of(a) == text_of(b);
                equal == (self.op == Op::Eq)
            }
        };
        if holds {
            Ok(())
        } else {
            Err(Failed(format!(
                "{} is {actual}, not {} {}",
                self.left(),
                self.op.symbol(),
                self.value
            )))
        }
    }

    fn left(&self) -> String {
        let mut left = format!("[{}]", self.placeholder.name());
        for step in &self.path {
            match step {
                Step::Field(name) => {
                    left.push('.');
                    left.push_str(name);
                }
                Step::Index(i) => left.push_str(&format!("[{i}]")),
            }
        }
        left
    }

    fn actual(&self, m: &Measured) -> Result<Value, Failed> {
        let missing = || Failed(format!("{} was not measured", self.left()));
        Ok(match self.placeholder {
            Placeholder::Status => Value::Number(f64::from(m.status.ok_or_else(missing)?)),
            Placeholder::ResponseTime => Value::Duration(m.response_time_ms.ok_or_else(missing)?),
            Placeholder::CertificateExpiration => {
                Value::Duration(m.certificate_expiration_ms.ok_or_else(missing)?)
            }
            Placeholder::Connected => Value::Bool(m.connected),
            Placeholder::DnsRcode => Value::Text(m.dns_rcode.clone().ok_or_else(missing)?),
            Placeholder::PacketLoss => Value::Number(m.packet_loss_percent.ok_or_else(missing)?),
            Placeholder::Ip => Value::Text(m.ip.clone().ok_or_else(missing)?),
            Placeholder::Body => {
                let body = m.body.as_deref().ok_or_else(missing)?;
                if self.path.is_empty() {
                    return Ok(Value::Text(body.to_owned()));
                }
                let json: serde_json::Value = serde_json::from_str(body).map_err(|e| {
                    Failed(format!(
                        "the body is not JSON ({e}), so {} has no value",
                        self.left()
                    ))
                })?;
                let mut at = &json;
                for step in &self.path {
                    let next = match step {
                        Step::Field(name) => at.get(name),
                        Step::Index(i) => at.get(i),
                    };
                    at = next.ok_or_else(|| Failed(format!("the body has no {}", self.left())))?;
                }
                match at {
                    serde_json::Value::Number(n) => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
                    serde_json::Value::Bool(b) => Value::Bool(*b),
                    serde_json::Value::String(s) => Value::Text(s.clone()),
                    serde_json::Value::Null => Value::Text("null".into()),
                    other => Value::Text(other.to_string()),
                }
            }
        })
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.left(), self.op.symbol(), self.value)
    }
}

fn compare(op: Op, ordering: Option<std::cmp::Ordering>) -> bool {
    use std::cmp::Ordering::*;
    match (op, ordering) {
        (_, None) => op == Op::Ne,
        (Op::Eq, Some(o)) => o == Equal,
        (Op::Ne, Some(o)) => o != Equal,
        (Op::Lt, Some(o)) => o == Less,
        (Op::Le, Some(o)) => o != Greater,
        (Op::Gt, Some(o)) => o == Greater,
        (Op::Ge, Some(o)) => o != Less,
    }
}

/// How a value compares for `==`: words and strings by their text, so that
/// `[BODY].status == UP` matches the JSON string "UP" and `== true` the
/// JSON `true`.
fn text_of(value: &Value) -> String {
    match value {
        Value::Text(t) => t.clone(),
        other => other.to_string(),
    }
}

struct Parser<'a> {
    text: &'a str,
    /// Byte offset.
    at: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Parser { text, at: 0 }
    }

    fn error<T>(&self, message: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            column: self.text[..self.at].chars().count() + 1,
            message: message.into(),
        })
    }

    fn rest(&self) -> &'a str {
        &self.text[self.at..]
    }

    fn skip_space(&mut self) {
        let trimmed = self.rest().trim_start();
        self.at = self.text.len() - trimmed.len();
    }

    fn eat(&mut self, token: &str) -> bool {
        if self.rest().starts_with(token) {
            self.at += token.len();
            true
        } else {
            false
        }
    }

    fn condition(&mut self) -> Result<Condition, ParseError> {
        self.skip_space();
        let placeholder = self.placeholder()?;
        let path = if placeholder == Placeholder::Body {
            self.path()?
        } else {
            Vec::new()
        };
        self.skip_space();
        let op = self.op()?;
        self.skip_space();
        let value = self.value()?;
        self.skip_space();
        if !self.rest().is_empty() {
            return self.error(format!(
                "unexpected {:?} after the value (one comparison per condition)",
                self.rest().chars().next().unwrap_or(' ')
            ));
        }
        if op.orders() && !matches!(value, Value::Number(_) | Value::Duration(_)) {
            return self.error_at_value(&value, op);
        }
        Ok(Condition {
            placeholder,
            path,
            op,
            value,
        })
    }

    fn error_at_value<T>(&self, value: &Value, op: Op) -> Result<T, ParseError> {
        self.error(format!(
            "{} needs a number or a duration, not {value}",
            op.symbol()
        ))
    }

    fn placeholder(&mut self) -> Result<Placeholder, ParseError> {
        if !self.eat("[") {
            return self.error("expected a placeholder such as [STATUS] or [BODY]");
        }
        let name_len = self
            .rest()
            .find(|c: char| !(c.is_ascii_uppercase() || c == '_'))
            .unwrap_or(self.rest().len());
        let name = &self.rest()[..name_len];
        let Some((_, placeholder)) = Placeholder::ALL.iter().find(|(n, _)| *n == name) else {
            let known: Vec<String> = Placeholder::ALL
                .iter()
                .map(|(n, _)| format!("[{n}]"))
                .collect();
            return self.error(format!(
                "unknown placeholder [{name}]; known: {}",
                known.join(", ")
            ));
        };
        self.at += name_len;
        if !self.eat("]") {
            return self.error(format!("expected ']' to close [{name}"));
        }
        Ok(*placeholder)
    }

    fn path(&mut self) -> Result<Vec<Step>, ParseError> {
        let mut path = Vec::new();
        loop {
            if path.len() > MAX_PATH {
                return self.error(format!("a JSON path has at most {MAX_PATH} steps"));
            }
            if self.eat(".") {
                let len = self
                    .rest()
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
                    .unwrap_or(self.rest().len());
                if len == 0 {
                    return self.error("expected a field name after '.'");
                }
                path.push(Step::Field(self.rest()[..len].to_owned()));
                self.at += len;
            } else if self.eat("[") {
                let len = self
                    .rest()
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(self.rest().len());
                let Ok(index) = self.rest()[..len].parse::<usize>() else {
                    return self.error("expected an array index such as [0]");
                };
                self.at += len;
                if !self.eat("]") {
                    return self.error("expected ']' after the array index");
                }
                path.push(Step::Index(index));
            } else {
                return Ok(path);
            }
        }
    }

    fn op(&mut self) -> Result<Op, ParseError> {
        for (symbol, op) in [
            ("==", Op::Eq),
            ("!=", Op::Ne),
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("<", Op::Lt),
            (">", Op::Gt),
        ] {
            if self.eat(symbol) {
                return Ok(op);
            }
        }
        self.error("expected a comparison: ==, !=, <, <=, > or >=")
    }

    fn value(&mut self) -> Result<Value, ParseError> {
        if self.rest().starts_with('"') {
            let Some(end) = self.rest()[1..].find('"') else {
                return self.error("this string has no closing '\"'");
            };
            self.at += 1;
            let text = self.rest()[..end].to_owned();
            self.at += end + 1;
            return Ok(Value::Text(text));
        }
        let len = self
            .rest()
            .find(char::is_whitespace)
            .unwrap_or(self.rest().len());
        let word = &self.rest()[..len];
        if word.is_empty() {
            return self.error("expected a value after the comparison");
        }
        let value = match word {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => match word.parse::<f64>() {
                Ok(n) if n.is_finite() => Value::Number(n),
                _ => match duration_ms(word) {
                    Some(ms) => Value::Duration(ms),
                    None if word.starts_with(|c: char| c.is_ascii_digit() || c == '-') => {
                        return self.error(format!(
                            "{word:?} is neither a number nor a duration (500ms, 30s, 5m, 72h, 7d)"
                        ));
                    }
                    None => Value::Text(word.to_owned()),
                },
            },
        };
        self.at += len;
        Ok(value)
    }
}

/// `500ms`, `30s`, `5m`, `72h`, `7d` in milliseconds.
fn duration_ms(word: &str) -> Option<f64> {
    let split = word.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = word.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match unit {
        "ms" => 1.0,
        "s" => 1_000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return None,
    };
    let ms = number * scale;
    ms.is_finite().then_some(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holds(condition: &str, measured: &Measured) -> Result<(), Failed> {
        Condition::parse(condition).unwrap().check(measured)
    }

    fn http(status: u16, ms: f64, body: &str) -> Measured {
        Measured {
            status: Some(status),
            response_time_ms: Some(ms),
            body: Some(body.to_owned()),
            connected: true,
            ..Measured::default()
        }
    }

    #[test]
    fn the_issue_examples_parse_and_hold() {
        let m = Measured {
            certificate_expiration_ms: Some(100.0 * 3_600_000.0),
            dns_rcode: Some("NOERROR".into()),
            ..http(
                200,
                120.0,
                r#"{"status": "UP", "items": [{"n": 3}], "ok": true}"#,
            )
        };
        for condition in [
            "[STATUS] == 200",
            "[RESPONSE_TIME] < 300",
            "[BODY].status == UP",
            "[BODY].items[0].n >= 3",
            "[BODY].ok == true",
            "[CERTIFICATE_EXPIRATION] > 72h",
            "[CONNECTED] == true",
            "[DNS_RCODE] == NOERROR",
            "  [STATUS]!=500  ",
            "[BODY].status != \"DOWN now\"",
        ] {
            assert_eq!(holds(condition, &m), Ok(()), "{condition}");
        }
    }

    #[test]
    fn failures_say_what_was_seen() {
        let m = http(503, 900.0, r#"{"status": "DOWN"}"#);
        let failed = holds("[STATUS] == 200", &m).unwrap_err();
        assert_eq!(failed.0, "[STATUS] is 503, not == 200");
        let failed = holds("[BODY].status == UP", &m).unwrap_err();
        assert_eq!(failed.0, "[BODY].status is \"DOWN\", not == \"UP\"");
        let failed = holds("[BODY].missing == 1", &m).unwrap_err();
        assert!(failed.0.contains("has no [BODY].missing"), "{failed}");
        let failed = holds("[CERTIFICATE_EXPIRATION] > 72h", &m).unwrap_err();
        assert!(failed.0.contains("not measured"), "{failed}");
        assert!(holds("[BODY].status == UP", &http(200, 1.0, "not json")).is_err());
    }

    #[test]
    fn bad_conditions_name_the_column() {
        for (text, column, words) in [
            ("STATUS == 200", 1, "placeholder"),
            ("[STATUSES] == 200", 2, "unknown placeholder"),
            ("[STATUS] = 200", 10, "comparison"),
            ("[STATUS] == ", 13, "expected a value"),
            ("[STATUS] == 200 extra", 17, "unexpected"),
            ("[RESPONSE_TIME] < fast", 23, "needs a number"),
            (
                "[RESPONSE_TIME] < 30x",
                19,
                "neither a number nor a duration",
            ),
            ("[BODY]. == 1", 8, "field name"),
            ("[BODY][x] == 1", 8, "array index"),
            ("[BODY].a == \"open", 13, "closing"),
        ] {
            let error = Condition::parse(text).unwrap_err();
            assert_eq!(error.column, column, "{text}: {error}");
            assert!(error.message.contains(words), "{text}: {error}");
        }
    }

    #[test]
    fn durations_compare_in_milliseconds() {
        let m = Measured {
            certificate_expiration_ms: Some(2.0 * 86_400_000.0),
            ..Measured::default()
        };
        assert!(holds("[CERTIFICATE_EXPIRATION] > 24h", &m).is_ok());
        assert!(holds("[CERTIFICATE_EXPIRATION] > 3d", &m).is_err());
        assert!(holds("[CERTIFICATE_EXPIRATION] >= 2880m", &m).is_ok());
    }

    #[test]
    fn placeholders_know_their_check_kinds() {
        assert!(Placeholder::Status.applies_to("http"));
        assert!(!Placeholder::Status.applies_to("tcp"));
        assert!(Placeholder::DnsRcode.applies_to("dns"));
        assert!(Placeholder::PacketLoss.applies_to("icmp"));
        assert!(Placeholder::Connected.applies_to("icmp"));
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_or_names_a_column_within_it(text in ".{0,64}") {
            if let Err(error) = Condition::parse(&text) {
                proptest::prop_assert!(error.column >= 1);
                proptest::prop_assert!(error.column <= text.chars().count() + 1);
            }
        }

        #[test]
        fn printed_conditions_parse_back(
            field in "[a-z][a-z0-9_]{0,8}",
            number in -1.0e6f64..1.0e6,
            op in 0usize..6,
        ) {
            let ops = ["==", "!=", "<", "<=", ">", ">="];
            let text = format!("[BODY].{field} {} {number}", ops[op]);
            let parsed = Condition::parse(&text).unwrap();
            proptest::prop_assert_eq!(Condition::parse(&parsed.to_string()).unwrap(), parsed);
        }

        #[test]
        fn checking_never_panics_on_any_body(body in ".{0,128}", path in "[a-z.\\[\\]0-9]{0,12}") {
            if let Ok(condition) = Condition::parse(&format!("[BODY]{path} == 1")) {
                let _ = condition.check(&http(200, 1.0, &body));
            }
        }
    }
}
