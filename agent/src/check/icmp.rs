//! The ICMP check: N echo requests to a host, one at a time, each waiting
//! its share of the timeout for the reply; loss and min/avg/max round trip.
//!
//! Each check opens its own socket. First an unprivileged ping socket
//! (`socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)`, or its ICMPv6 twin): the
//! kernel allows it to the groups in the sysctl `net.ipv4.ping_group_range`
//! (it covers IPv6 too), sets the echo identifier itself and hands this
//! socket only the replies meant for it. Where that sysctl forbids it, a raw
//! socket (which needs `CAP_NET_RAW`, e.g. root) is the fallback; a raw
//! socket sees every ICMP packet, so replies are matched on identifier,
//! sequence and a random token in the payload. When neither is allowed the
//! error names the sysctl and its value.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use super::{ms, resolve, Checker, Outcome, Prepared};

const PING_GROUP_RANGE: &str = "/proc/sys/net/ipv4/ping_group_range";
const MAX_COUNT: u32 = 100;
const PAYLOAD_MARK: &[u8; 8] = b"muster-a";

/// How the ICMP check may open its sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpSockets {
    /// A ping socket, else a raw socket (the agent's way).
    UnprivilegedThenRaw,
    /// Only a ping socket: for tests of the error a host without them gives.
    UnprivilegedOnly,
}

/// Which kind of socket a check used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    Ping,
    Raw,
}

pub async fn check(
    checker: &Checker,
    endpoint: &Prepared,
    out: &mut Outcome,
) -> Result<(), String> {
    let target = endpoint.spec.target.trim();
    let host = target.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("the target is empty".into());
    }
    let addrs = resolve(host, 0, out).await?;
    let ip = addrs.iter().find(|a| a.is_ipv4()).unwrap_or(&addrs[0]).ip();
    out.measured.ip = Some(ip.to_string());
    let count = endpoint.spec.icmp.count.clamp(1, MAX_COUNT);
    // A tenth of the timeout is left for the rest of the check, so a host
    // that answers nothing still gets its loss reported, not a timeout.
    let per_packet = endpoint.timeout().mul_f64(0.9) / count;
    let (socket, kind) = open(ip, checker.icmp)?;
    let stats = ping(&socket, kind, ip, count, per_packet, out).await?;
    out.measured.packet_loss_percent =
        Some(f64::from(count - stats.received) * 100.0 / f64::from(count));
    if stats.received == 0 {
        return Err(format!(
            "no echo reply from {ip} to {count} request{}",
            if count == 1 { "" } else { "s" }
        ));
    }
    out.measured.connected = true;
    out.measured.response_time_ms = stats.avg_ms;
    out.timings.rtt_min_ms = stats.min_ms;
    out.timings.rtt_avg_ms = stats.avg_ms;
    out.timings.rtt_max_ms = stats.max_ms;
    Ok(())
}

#[derive(Debug, Default)]
struct Stats {
    received: u32,
    min_ms: Option<f64>,
    avg_ms: Option<f64>,
    max_ms: Option<f64>,
}

async fn ping(
    socket: &UdpSocket,
    kind: SocketKind,
    ip: IpAddr,
    count: u32,
    per_packet: Duration,
    out: &mut Outcome,
) -> Result<Stats, String> {
    let v6 = ip.is_ipv6();
    let ident = random_u16();
    let mut token = [0u8; 8];
    getrandom::fill(&mut token).map_err(|e| format!("no random source: {e}"))?;
    let destination = SocketAddr::new(ip, 0);
    let mut rtts = Vec::with_capacity(count as usize);
    let mut buf = [0u8; 1500];
    out.phase = "waiting for echo replies";
    for seq in 0..count {
        let seq = seq as u16;
        let request = echo_request(v6, ident, seq, &token);
        let sent = Instant::now();
        socket
            .send_to(&request, destination)
            .await
            .map_err(|e| format!("cannot send an echo request to {ip}: {e}"))?;
        let deadline = tokio::time::Instant::from_std(sent + per_packet);
        loop {
            let received = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await;
            let (n, from) = match received {
                Err(_) => break,
                // An ICMP error queued for the socket: this one is lost.
                Ok(Err(_)) => break,
                Ok(Ok(got)) => got,
            };
            if from.ip() != ip {
                continue;
            }
            let Some(reply) = parse_reply(&buf[..n], kind == SocketKind::Raw && !v6, v6) else {
                continue;
            };
            // A ping socket's identifier is the kernel's, not ours.
            let ours = (kind == SocketKind::Ping || reply.ident == ident)
                && reply.seq == seq
                && reply.payload.starts_with(&token);
            if ours {
                rtts.push(ms(sent.elapsed()));
                break;
            }
        }
    }
    let mut stats = Stats {
        received: rtts.len() as u32,
        ..Stats::default()
    };
    if !rtts.is_empty() {
        stats.min_ms = rtts.iter().copied().reduce(f64::min);
        stats.max_ms = rtts.iter().copied().reduce(f64::max);
        stats.avg_ms = Some(rtts.iter().sum::<f64>() / rtts.len() as f64);
    }
    Ok(stats)
}

static FELL_BACK: AtomicBool = AtomicBool::new(false);

/// An ICMP socket for `ip`'s family: a ping socket, else (when allowed) a
/// raw one.
pub fn open(ip: IpAddr, allowed: IcmpSockets) -> Result<(UdpSocket, SocketKind), String> {
    let (domain, protocol) = match ip {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    let (socket, kind) = match Socket::new(domain, Type::DGRAM, Some(protocol)) {
        Ok(socket) => (socket, SocketKind::Ping),
        Err(ping) if ping.kind() == std::io::ErrorKind::PermissionDenied => {
            let range = std::fs::read_to_string(PING_GROUP_RANGE)
                .map(|r| r.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|_| "unreadable".into());
            let forbidden = format!(
                "unprivileged ICMP sockets are not permitted for this process's groups \
                 (sysctl net.ipv4.ping_group_range is \"{range}\"; include the agent's group, \
                 e.g. sysctl -w net.ipv4.ping_group_range=\"0 2147483647\")"
            );
            if allowed == IcmpSockets::UnprivilegedOnly {
                return Err(forbidden);
            }
            match Socket::new(domain, Type::RAW, Some(protocol)) {
                Ok(socket) => {
                    if !FELL_BACK.swap(true, Ordering::Relaxed) {
                        tracing::info!(
                            ping_group_range = %range,
                            "unprivileged ICMP sockets are not permitted; using raw sockets"
                        );
                    }
                    (socket, SocketKind::Raw)
                }
                Err(raw) => {
                    return Err(format!(
                        "{forbidden}, and the fallback, a raw socket, needs CAP_NET_RAW: {raw}"
                    ))
                }
            }
        }
        Err(e) => return Err(format!("cannot open an ICMP socket: {e}")),
    };
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("cannot set up the ICMP socket: {e}"))?;
    let socket = UdpSocket::from_std(std::net::UdpSocket::from(socket))
        .map_err(|e| format!("cannot set up the ICMP socket: {e}"))?;
    Ok((socket, kind))
}

fn random_u16() -> u16 {
    let mut b = [0u8; 2];
    // Without randomness the identifier is fixed; replies still match on
    // the sequence and the payload.
    let _ = getrandom::fill(&mut b);
    u16::from_be_bytes(b)
}

/// An echo request: type, code, checksum, identifier, sequence, then the
/// token and a mark.
fn echo_request(v6: bool, ident: u16, seq: u16, token: &[u8; 8]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(24);
    packet.push(if v6 { 128 } else { 8 });
    packet.push(0);
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(&ident.to_be_bytes());
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend_from_slice(token);
    packet.extend_from_slice(PAYLOAD_MARK);
    // The kernel computes ICMPv6 checksums (they cover a pseudo-header).
    if !v6 {
        let sum = checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    packet
}

/// The Internet checksum (RFC 1071).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

struct Reply<'a> {
    ident: u16,
    seq: u16,
    payload: &'a [u8],
}

/// An echo reply in what a socket received: after the IPv4 header on a raw
/// IPv4 socket, at the start otherwise.
fn parse_reply(packet: &[u8], has_ip_header: bool, v6: bool) -> Option<Reply<'_>> {
    let icmp = if has_ip_header {
        let header = usize::from(packet.first()? & 0x0f) * 4;
        packet.get(header..)?
    } else {
        packet
    };
    let reply_type = if v6 { 129 } else { 0 };
    if icmp.len() < 8 || icmp[0] != reply_type || icmp[1] != 0 {
        return None;
    }
    Some(Reply {
        ident: u16::from_be_bytes([icmp[4], icmp[5]]),
        seq: u16::from_be_bytes([icmp[6], icmp[7]]),
        payload: &icmp[8..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_requests_carry_a_valid_checksum() {
        let packet = echo_request(false, 0x1234, 7, b"abcdefgh");
        assert_eq!(packet[0], 8);
        // Summing a packet with its checksum in place gives zero.
        assert_eq!(checksum(&packet), 0);
        assert_eq!(checksum(&[0x45, 0x00, 0x00]), !0x4500);
    }

    #[test]
    fn replies_are_read_after_an_ip_header_only_on_raw_v4_sockets() {
        let mut reply = echo_request(false, 9, 3, b"tokentok");
        reply[0] = 0;
        let parsed = parse_reply(&reply, false, false).unwrap();
        assert_eq!((parsed.ident, parsed.seq), (9, 3));
        assert!(parsed.payload.starts_with(b"tokentok"));
        let mut with_header = vec![0x45; 20];
        with_header.extend_from_slice(&reply);
        assert_eq!(parse_reply(&with_header, true, false).unwrap().seq, 3);
        // A request is not a reply; short or empty packets are nothing.
        assert!(parse_reply(&echo_request(false, 9, 3, b"tokentok"), false, false).is_none());
        assert!(parse_reply(&[0x4f], true, false).is_none());
        assert!(parse_reply(&[], true, false).is_none());
    }
}
