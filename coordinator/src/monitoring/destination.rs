//! Where webhooks may be posted. A webhook's URL is given by a workspace
//! admin, but it is the coordinator that connects: left open, a webhook
//! could reach what only the coordinator's host can, such as services on
//! its loopback or a cloud's metadata service at 169.254.169.254. So by
//! default webhooks may not reach loopback, link-local, unspecified,
//! multicast or broadcast addresses, whatever name leads there. Private
//! networks stay open, because internal chat and incident tools live there.
//! An operator opens chosen ranges with `--webhook-allow-network`.
//!
//! The rule is applied twice: when a notifier is created (to a URL whose
//! host is an address) and when each message is posted, by the resolver of
//! the webhook client, so a name that resolves somewhere else later
//! (DNS rebinding) is still held to it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

/// An address range: `10.0.0.0/8`, `::1/128`; a bare address is itself
/// alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Network, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!("{s:?} is not an IP address or a network such as 127.0.0.0/8 or ::1/128")
        })?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Network { addr, prefix })
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Why webhooks may not reach `ip` unless allowed, if they may not.
fn restricted(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(ip) => restricted_v4(ip),
        IpAddr::V6(ip) => restricted_v6(ip),
    }
}

fn restricted_v4(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_link_local() {
        Some("a link-local address (where cloud metadata services answer)")
    } else if ip.octets()[0] == 0 {
        Some("an unspecified address")
    } else if ip.is_broadcast() {
        Some("the broadcast address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else {
        None
    }
}

fn restricted_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_unspecified() {
        Some("an unspecified address")
    } else if ip.segments()[0] & 0xffc0 == 0xfe80 {
        Some("a link-local address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else {
        None
    }
}

/// The addresses webhooks may reach: all but the restricted ones, and of
/// those the networks the operator allowed.
#[derive(Debug, Clone, Default)]
pub struct Destinations {
    allowed: Arc<[Network]>,
}

impl Destinations {
    pub fn new(allowed: &[Network]) -> Destinations {
        Destinations {
            allowed: allowed.into(),
        }
    }

    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        match restricted(ip) {
            Some(why) if !self.allowed.iter().any(|n| n.contains(ip)) => Err(format!(
                "{ip} is {why}, which webhooks may not reach unless the coordinator allows it \
                 (--webhook-allow-network)"
            )),
            _ => Ok(()),
        }
    }

    /// Checks a URL whose host is an address; a name is checked when it is
    /// resolved, at each post.
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
        let host = url.host_str().ok_or("the URL has no host")?;
        match host.trim_start_matches('[').trim_end_matches(']').parse() {
            Ok(ip) => self.check(ip),
            Err(_) => Ok(()),
        }
    }
}

impl reqwest::dns::Resolve for Destinations {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let destinations = self.clone();
        Box::pin(async move {
            let host = name.as_str();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|addr| match destinations.check(addr.ip()) {
                    Ok(()) => true,
                    Err(why) => {
                        refused = Some(why);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let why = refused.unwrap_or_else(|| "it has no address".to_owned());
                return Err(format!("{host} is not a webhook destination: {why}").into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> Network {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_contain_what_they_say() {
        assert!(net("127.0.0.0/8").contains("127.1.2.3".parse().unwrap()));
        assert!(!net("127.0.0.0/8").contains("128.0.0.1".parse().unwrap()));
        assert!(net("127.0.0.2").contains("127.0.0.2".parse().unwrap()));
        assert!(!net("127.0.0.2").contains("127.0.0.1".parse().unwrap()));
        assert!(net("0.0.0.0/0").contains("8.8.8.8".parse().unwrap()));
        assert!(net("::1/128").contains("::1".parse().unwrap()));
        assert!(net("fd00::/8").contains("fd12::1".parse().unwrap()));
        // An IPv4-mapped IPv6 address is the IPv4 address.
        assert!(net("127.0.0.0/8").contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!net("::/0").contains("10.0.0.1".parse().unwrap()));
        assert_eq!(net(" 10.0.0.0/8 ").to_string(), "10.0.0.0/8");
    }

    #[test]
    fn bad_networks_say_what_is_wrong() {
        for (input, expected) in [
            ("", "is not an IP address"),
            ("localhost", "is not an IP address"),
            ("10.0.0.0/33", "the prefix length must be 0 to 32"),
            ("::1/129", "the prefix length must be 0 to 128"),
            ("10.0.0.0/", "the prefix length"),
            ("10.0.0.0/x", "the prefix length"),
        ] {
            let error = input.parse::<Network>().unwrap_err();
            assert!(error.contains(expected), "{input:?}: {error}");
        }
    }

    #[test]
    fn the_host_and_the_metadata_service_are_out_of_reach_by_default() {
        let d = Destinations::default();
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "169.254.169.254",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            let error = d.check(ip.parse().unwrap()).unwrap_err();
            assert!(error.contains("--webhook-allow-network"), "{ip}: {error}");
        }
        for ip in [
            "10.1.2.3",
            "192.168.1.1",
            "172.16.0.1",
            "fd00::1",
            "93.184.216.34",
        ] {
            assert_eq!(d.check(ip.parse().unwrap()), Ok(()), "{ip}");
        }
    }

    #[test]
    fn an_allowed_network_opens_only_itself() {
        let d = Destinations::new(&[net("127.0.0.2/32")]);
        assert_eq!(d.check("127.0.0.2".parse().unwrap()), Ok(()));
        assert!(d.check("127.0.0.1".parse().unwrap()).is_err());
        assert_eq!(d.check_url("http://127.0.0.2:9000/hook"), Ok(()));
        let error = d.check_url("http://127.0.0.1:9000/hook").unwrap_err();
        assert!(
            error.starts_with("127.0.0.1 is a loopback address"),
            "{error}"
        );
        let error = d.check_url("http://[::ffff:a9fe:a9fe]/").unwrap_err();
        assert!(error.contains("link-local"), "{error}");
        // Names are checked when they are resolved.
        assert_eq!(d.check_url("http://localhost/"), Ok(()));
    }

    #[tokio::test]
    async fn a_name_that_resolves_only_out_of_reach_is_refused() {
        use reqwest::dns::Resolve;
        let d = Destinations::default();
        let error = match d.resolve("localhost".parse().unwrap()).await {
            Ok(addrs) => panic!("localhost resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(error) => error.to_string(),
        };
        assert!(
            error.starts_with("localhost is not a webhook destination: "),
            "{error}"
        );
        let allowed = Destinations::new(&[net("127.0.0.0/8"), net("::1")]);
        let addrs: Vec<SocketAddr> = allowed
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }

    proptest! {
        #[test]
        fn any_text_parses_or_is_refused_with_a_reason(s in "\\PC{0,40}") {
            if let Err(error) = s.parse::<Network>() {
                prop_assert!(!error.is_empty());
            }
        }

        #[test]
        fn a_network_contains_its_own_address(a in any::<u32>(), prefix in 0u8..=32) {
            let n = Network { addr: IpAddr::V4(a.into()), prefix };
            prop_assert!(n.contains(IpAddr::V4(a.into())));
            let parsed: Network = n.to_string().parse().unwrap();
            prop_assert!(parsed.contains(IpAddr::V4(a.into())));
        }
    }
}
