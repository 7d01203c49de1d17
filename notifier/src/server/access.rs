//! Who may talk to the notifier: the address allow-list, and the record of refused clients
//! that keeps one log line per client and reason.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::metrics::{Metrics, Refusal};

/// An address block `ADDR/PREFIX` (a bare address is a block of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d.
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_matches(
                u128::from(u32::from(net)),
                u128::from(u32::from(ip)),
                self.prefix,
                32,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_matches(u128::from(net), u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

fn prefix_matches(net: u128, ip: u128, prefix: u8, bits: u32) -> bool {
    let host_bits = bits.saturating_sub(u32::from(prefix));
    if host_bits >= bits {
        return true;
    }
    (net ^ ip) >> host_bits == 0
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let network = addr
            .parse::<IpAddr>()
            .map_err(|_| format!("{text:?} is not an address or ADDR/PREFIX block"))?
            .to_canonical();
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix must be 0 to {max}"))?,
        };
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Parses a list of blocks separated by commas or whitespace (UCR style).
pub fn parse_list(text: &str) -> Result<Vec<Cidr>, String> {
    text.split(|c: char| c == ',' || c.is_ascii_whitespace())
        .filter(|t| !t.is_empty())
        .map(str::parse)
        .collect()
}

/// After this long a client refused for the same reason is logged again.
const LOG_AGAIN_AFTER: Duration = Duration::from_secs(600);
/// Bounds the memory one scanning host can make the record use.
const MAX_REMEMBERED: usize = 4096;

/// Refused clients: every refusal is counted; a client retrying every few seconds is logged
/// once (per reason, and again after ten minutes), not once per attempt.
#[derive(Debug, Default)]
pub struct Refusals {
    logged: Mutex<HashMap<(IpAddr, Refusal), Instant>>,
}

impl Refusals {
    pub fn refuse(&self, metrics: &Metrics, ip: IpAddr, kind: Refusal, reason: &str) {
        metrics.client_refused(kind);
        let now = Instant::now();
        let first = {
            let mut logged = self.logged.lock().unwrap_or_else(PoisonError::into_inner);
            if logged.len() >= MAX_REMEMBERED {
                logged.retain(|_, at| now.duration_since(*at) < LOG_AGAIN_AFTER);
                if logged.len() >= MAX_REMEMBERED {
                    logged.clear();
                }
            }
            match logged.get(&(ip, kind)) {
                Some(at) if now.duration_since(*at) < LOG_AGAIN_AFTER => false,
                _ => {
                    logged.insert((ip, kind), now);
                    true
                }
            }
        };
        let ip = ip.to_canonical();
        if first {
            tracing::warn!("refusing client {ip}: {reason}");
        } else {
            tracing::debug!("refusing client {ip} again: {reason}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_match_their_addresses() {
        let list = parse_list("10.0.0.0/8, 192.0.2.7 2001:db8::/32").unwrap();
        assert!(list[0].contains(ip("10.200.1.1")));
        assert!(!list[0].contains(ip("11.0.0.1")));
        assert!(
            list[0].contains(ip("::ffff:10.1.2.3")),
            "IPv4 through a dual-stack socket"
        );
        assert!(list[1].contains(ip("192.0.2.7")));
        assert!(!list[1].contains(ip("192.0.2.8")));
        assert!(list[2].contains(ip("2001:db8:1::5")));
        assert!(!list[2].contains(ip("2001:db9::1")));
        assert!(!list[2].contains(ip("10.0.0.1")));
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .unwrap()
                .contains(ip("203.0.113.9"))
        );
        assert!("::/0".parse::<Cidr>().unwrap().contains(ip("2001:db8::1")));
        assert_eq!(list[1].to_string(), "192.0.2.7/32");
    }

    #[test]
    fn bad_blocks_are_named() {
        assert!(parse_list("10.0.0.0/33").unwrap_err().contains("0 to 32"));
        assert!(
            parse_list("host.example")
                .unwrap_err()
                .contains("host.example")
        );
        assert!(parse_list("10.0.0.0/x").is_err());
        assert!(parse_list("").unwrap().is_empty());
    }

    #[test]
    fn a_retrying_client_is_logged_once_and_counted_every_time() {
        let metrics = Metrics::default();
        let refusals = Refusals::default();
        for _ in 0..3 {
            refusals.refuse(&metrics, ip("192.0.2.1"), Refusal::NotAllowed, "x");
        }
        refusals.refuse(&metrics, ip("192.0.2.1"), Refusal::PlainText, "y");
        let logged = refusals.logged.lock().unwrap();
        assert_eq!(logged.len(), 2);
        let text = metrics.render();
        assert!(
            text.contains("udn_clients_refused_total{reason=\"not_allowed\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("udn_clients_refused_total{reason=\"plain_text\"} 1\n"),
            "{text}"
        );
    }
}
