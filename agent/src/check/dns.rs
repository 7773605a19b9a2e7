//! The DNS check: one query over UDP to the target server (`host:port`,
//! port 53 by default), sent again once if half the timeout passes without
//! an answer. `[DNS_RCODE]` is the answer's response code; `expected`, when
//! set, must be among the answers of the queried type (names compare
//! without case or trailing dot; an MX answer matches by its exchange
//! alone too). A truncated answer is read as it is (no retry over TCP).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use tokio::net::UdpSocket;

use super::{ms, resolve, split_host_port, Outcome, Prepared};
use crate::dns::{rcode_name, type_code, Message, RData, MAX_MESSAGE, TYPES};

pub async fn check(endpoint: &Prepared, out: &mut Outcome) -> Result<(), String> {
    let options = &endpoint.spec.dns;
    let (host, port) = split_host_port(&endpoint.spec.target, Some(53))?;
    let name = options.name.trim();
    if name.is_empty() {
        return Err("dns.name is empty: there is nothing to query".into());
    }
    let type_name = match options.query_type.trim() {
        "" => "A",
        t => t,
    };
    let qtype = type_code(type_name).ok_or_else(|| {
        let known: Vec<&str> = TYPES.iter().map(|(n, _)| *n).collect();
        format!(
            "dns.query_type {type_name:?} is not one of {}",
            known.join(", ")
        )
    })?;
    let mut id = [0u8; 2];
    getrandom::fill(&mut id).map_err(|e| format!("no random source: {e}"))?;
    let id = u16::from_be_bytes(id);
    let query = Message::query(id, name, qtype)
        .encode()
        .map_err(|e| format!("cannot query {name:?}: {e}"))?;

    let server = resolve(&host, port, out).await?[0];
    out.measured.ip = Some(server.ip().to_string());
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    socket
        .connect(server)
        .await
        .map_err(|e| format!("cannot reach {server}: {e}"))?;

    out.phase = "waiting for the DNS answer";
    let started = Instant::now();
    send(&socket, &query, server).await?;
    let resend_at = tokio::time::Instant::from_std(started + endpoint.timeout() / 2);
    let mut resent = false;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let answer = loop {
        let received = if resent {
            socket.recv(&mut buf).await
        } else {
            match tokio::time::timeout_at(resend_at, socket.recv(&mut buf)).await {
                Ok(received) => received,
                Err(_) => {
                    send(&socket, &query, server).await?;
                    resent = true;
                    continue;
                }
            }
        };
        let n = received.map_err(|e| format!("no answer from {server}: {e}"))?;
        let bytes = &buf[..n];
        match Message::decode(bytes) {
            Ok(message) if message.id == id && message.is_response() => break message,
            Ok(_) => continue,
            // Ours (by its id), but unreadable.
            Err(e) if bytes.get(..2) == Some(&id.to_be_bytes()[..]) => {
                return Err(format!("the answer from {server} is malformed: {e}"));
            }
            Err(_) => continue,
        }
    };
    out.measured.connected = true;
    out.measured.response_time_ms = Some(ms(started.elapsed()));
    out.timings.first_byte_ms = out.measured.response_time_ms;
    out.measured.dns_rcode = Some(rcode_name(answer.rcode()));

    if let Some(expected) = options.expected.as_deref().filter(|e| !e.trim().is_empty()) {
        let found: Vec<&RData> = answer
            .answers
            .iter()
            .filter(|r| r.rtype == qtype)
            .map(|r| &r.data)
            .collect();
        if !found.iter().any(|data| matches(data, expected)) {
            let texts: Vec<String> = found.iter().map(|d| d.to_string()).collect();
            return Err(format!(
                "the {type_name} answers for {name} ({}) do not include {expected:?}",
                if texts.is_empty() {
                    format!("none, rcode {}", rcode_name(answer.rcode()))
                } else {
                    texts.join(", ")
                }
            ));
        }
    }
    Ok(())
}

async fn send(socket: &UdpSocket, query: &[u8], server: SocketAddr) -> Result<(), String> {
    socket
        .send(query)
        .await
        .map(|_| ())
        .map_err(|e| format!("cannot send the query to {server}: {e}"))
}

/// Whether an answer is the expected one.
fn matches(data: &RData, expected: &str) -> bool {
    let norm = |s: &str| s.trim().trim_end_matches('.').to_ascii_lowercase();
    let expected = norm(expected);
    match data {
        RData::A(a) => expected.parse::<Ipv4Addr>().is_ok_and(|e| e == *a),
        RData::Aaaa(a) => expected.parse::<Ipv6Addr>().is_ok_and(|e| e == *a),
        RData::Mx { exchange, .. } => {
            norm(exchange) == expected || norm(&data.to_string()) == expected
        }
        other => norm(&other.to_string()) == expected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_answers_compare_loosely() {
        assert!(matches(&RData::A(Ipv4Addr::new(10, 0, 0, 1)), " 10.0.0.1 "));
        assert!(!matches(&RData::A(Ipv4Addr::new(10, 0, 0, 1)), "10.0.0.2"));
        assert!(matches(&RData::Aaaa(Ipv6Addr::LOCALHOST), "0:0::1"));
        let mx = RData::Mx {
            preference: 10,
            exchange: "Mail.Example.test".into(),
        };
        assert!(matches(&mx, "mail.example.test."));
        assert!(matches(&mx, "10 mail.example.test"));
        assert!(matches(&RData::Name("a.test".into()), "A.TEST."));
        assert!(matches(&RData::Txt(vec![b"hello".to_vec()]), "hello"));
    }
}
