//! The network allowlist matcher, shared by every backend.
//!
//! Rules are `host`, `host:port`, `*.suffix` or `*.suffix:port` (IPv6
//! literals in brackets: `[::1]:443`). `*.example.com` matches
//! `a.example.com` and `a.b.example.com` but not `example.com` nor
//! `evil-example.com`. Deny rules win over allow rules. An empty allowlist
//! denies everything. Resolved addresses in loopback, private, link-local,
//! metadata and other special ranges are refused unless a granted CIDR
//! covers them (see [`special_range`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use harness_proto::sandbox::v1 as pb;
use ipnet::IpNet;

/// A rule that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The rule is malformed.
    #[error("network rule {rule:?} is invalid: {why}")]
    Invalid {
        /// The rule as written.
        rule: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A CIDR could not be parsed.
    #[error("allow_cidrs entry {0:?} is not a CIDR such as 10.0.0.0/8 or fd00::/8")]
    Cidr(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// Stored with its leading dot: `.example.com`.
    Suffix(String),
}

/// One parsed rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    text: String,
    host: HostPattern,
    port: Option<u16>,
}

impl Rule {
    /// Parses one rule.
    pub fn parse(text: &str) -> Result<Self, RuleError> {
        let invalid = |why| RuleError::Invalid {
            rule: text.to_owned(),
            why,
        };
        let (host, port) = split_host_port(text.trim()).map_err(invalid)?;
        let host = normalize_host(host);
        let pattern = match host.strip_prefix("*.") {
            Some(suffix) => {
                if suffix.is_empty() || suffix.contains('*') {
                    return Err(invalid("a wildcard must be `*.` followed by a domain"));
                }
                check_domain(suffix).map_err(invalid)?;
                HostPattern::Suffix(format!(".{suffix}"))
            }
            None => {
                if host.contains('*') {
                    return Err(invalid("`*` is only allowed as a leading `*.`"));
                }
                if host.parse::<IpAddr>().is_err() {
                    check_domain(&host).map_err(invalid)?;
                }
                HostPattern::Exact(host)
            }
        };
        Ok(Self {
            text: text.to_owned(),
            host: pattern,
            port,
        })
    }

    /// Whether the rule covers `host:port`. `ip` is `host` parsed as an IP
    /// literal, if it is one: literals match only a rule naming the same
    /// address (in any spelling), never a wildcard.
    fn matches(&self, host: &str, ip: Option<IpAddr>, port: u16) -> bool {
        let host_matches = match (&self.host, ip) {
            (HostPattern::Exact(_), Some(ip)) => self.literal_ip() == Some(ip),
            (HostPattern::Exact(exact), None) => exact == host,
            (HostPattern::Suffix(_), Some(_)) => false,
            (HostPattern::Suffix(suffix), None) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
        };
        host_matches && self.port.is_none_or(|p| p == port)
    }

    /// The rule as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The IP address this rule names literally, if it does.
    fn literal_ip(&self) -> Option<IpAddr> {
        match &self.host {
            HostPattern::Exact(host) => host.parse().ok().map(canonical),
            HostPattern::Suffix(_) => None,
        }
    }
}

fn split_host_port(text: &str) -> Result<(&str, Option<u16>), &'static str> {
    if text.is_empty() {
        return Err("empty rule");
    }
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed `[`")?;
        return match after.strip_prefix(':') {
            Some(port) => Ok((host, Some(parse_port(port)?))),
            None if after.is_empty() => Ok((host, None)),
            None => Err("unexpected text after `]`"),
        };
    }
    match text.rsplit_once(':') {
        // A bare IPv6 literal has several colons and no port.
        Some(_) if text.matches(':').count() > 1 => Ok((text, None)),
        Some((host, port)) => Ok((host, Some(parse_port(port)?))),
        None => Ok((text, None)),
    }
}

fn parse_port(port: &str) -> Result<u16, &'static str> {
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err("the port must be a number from 1 to 65535"),
        Ok(port) => Ok(port),
    }
}

fn check_domain(domain: &str) -> Result<(), &'static str> {
    let labels_ok = domain.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    });
    if labels_ok && domain.len() <= 253 {
        Ok(())
    } else {
        Err("not a valid host name")
    }
}

/// Lower-cases a host and drops a trailing dot and IPv6 brackets, so that
/// `Example.COM.` and `example.com` are the same destination.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// The verdict on a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed by this rule.
    Allow(String),
    /// Refused, with the reason.
    Deny(String),
}

/// A session's network policy, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
    allow_cidrs: Vec<IpNet>,
}

impl Allowlist {
    /// Parses the policy's rules and CIDRs.
    pub fn from_policy(policy: &pb::NetworkPolicy) -> Result<Self, RuleError> {
        Ok(Self {
            allow: policy
                .allow
                .iter()
                .map(|r| Rule::parse(r))
                .collect::<Result<_, _>>()?,
            deny: policy
                .deny
                .iter()
                .map(|r| Rule::parse(r))
                .collect::<Result<_, _>>()?,
            allow_cidrs: policy
                .allow_cidrs
                .iter()
                .map(|c| c.parse::<IpNet>().map_err(|_| RuleError::Cidr(c.clone())))
                .collect::<Result<_, _>>()?,
        })
    }

    /// True when nothing is allowed at all.
    pub fn denies_everything(&self) -> bool {
        self.allow.is_empty()
    }

    /// Decides on `host:port` by name (before resolution). An IP literal is
    /// allowed only by a rule naming that address; a name that a resolver
    /// would read as a numeric IPv4 address (`127.1`, `0x7f.1`, `2130706433`)
    /// is refused outright, since no rule could have meant it.
    pub fn check_destination(&self, host: &str, port: u16) -> Verdict {
        let host = normalize_host(host);
        let ip = host.parse::<IpAddr>().ok().map(canonical);
        if ip.is_none() && numeric_lookalike(&host) {
            return Verdict::Deny(format!(
                "host {host} looks like a numeric IP address; write IP literals in dotted-quad or IPv6 form"
            ));
        }
        if let Some(rule) = self.deny.iter().find(|r| r.matches(&host, ip, port)) {
            return Verdict::Deny(format!(
                "host {host} port {port} matches deny rule {:?}",
                rule.text
            ));
        }
        match self.allow.iter().find(|r| r.matches(&host, ip, port)) {
            Some(rule) => Verdict::Allow(rule.text.clone()),
            None if self.allow.is_empty() => {
                Verdict::Deny("the session has no network access".to_owned())
            }
            None if ip.is_some() => Verdict::Deny(format!(
                "IP address {host} port {port} is not on the allowlist (IP literals need a rule naming them)"
            )),
            None => Verdict::Deny(format!("host {host} port {port} is not on the allowlist")),
        }
    }

    /// The special range `ip` lies in when no granted CIDR covers it: the
    /// reason to refuse a connection to `ip`, or `None` when it may be used.
    pub fn uncovered_special_range(&self, ip: IpAddr) -> Option<&'static str> {
        let ip = canonical(ip);
        special_range(ip).filter(|_| !self.allow_cidrs.iter().any(|cidr| cidr.contains(&ip)))
    }

    /// Decides on a resolved address: refused if it lies in a special range
    /// that no granted CIDR covers.
    pub fn check_address(&self, ip: IpAddr) -> Verdict {
        match self.uncovered_special_range(ip) {
            Some(range) => Verdict::Deny(format!(
                "{ip} is a {range} address and no granted CIDR covers it"
            )),
            None => Verdict::Allow(String::new()),
        }
    }

    /// Decides on a raw socket connection, which carries no name: the address
    /// must be named literally by an allow rule, pass the deny rules and the
    /// special-range check.
    pub fn check_socket(&self, ip: IpAddr, port: u16) -> Verdict {
        let ip = canonical(ip);
        let literal = ip.to_string();
        if let Verdict::Deny(reason) = self.check_destination(&literal, port) {
            return Verdict::Deny(reason);
        }
        if !self.allow.iter().any(|rule| rule.literal_ip() == Some(ip)) {
            return Verdict::Deny(format!(
                "raw connections need an allow rule naming {ip} literally"
            ));
        }
        self.check_address(ip)
    }
}

/// Whether `host` (not a valid IP literal) is something `getaddrinfo` or a
/// URL parser could read as an IPv4 address: its last label is all digits or
/// a `0x` hex number. No real top-level domain looks like that.
fn numeric_lookalike(host: &str) -> bool {
    let last = host.rsplit('.').next().unwrap_or(host);
    let hex = last
        .strip_prefix("0x")
        .is_some_and(|digits| digits.chars().all(|c| c.is_ascii_hexdigit()));
    hex || (!last.is_empty() && last.chars().all(|c| c.is_ascii_digit()))
}

/// IPv4-mapped and NAT64 IPv6 addresses are judged as the IPv4 address they
/// carry, so `::ffff:127.0.0.1` is loopback.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let segments = v6.segments();
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = segments[6].to_be_bytes();
                let [c, d] = segments[7].to_be_bytes();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

/// Names the special range `ip` falls in, if any: these are never reachable
/// by default because they lead to the host itself, the local network or
/// cloud metadata services.
pub fn special_range(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    let range = match (a, b, c) {
        (0, _, _) => "\"this network\" (0.0.0.0/8)",
        (10, _, _) => "private (10.0.0.0/8)",
        (100, 64..=127, _) => "carrier-grade NAT (100.64.0.0/10)",
        (127, _, _) => "loopback (127.0.0.0/8)",
        (169, 254, _) => "link-local / cloud metadata (169.254.0.0/16)",
        (172, 16..=31, _) => "private (172.16.0.0/12)",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24)",
        (192, 168, _) => "private (192.168.0.0/16)",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, _, _) => "multicast (224.0.0.0/4)",
        (240..=255, _, _) => "reserved or broadcast (240.0.0.0/4)",
        _ => return None,
    };
    Some(range)
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    if ip.is_unspecified() {
        Some("unspecified (::)")
    } else if ip.is_loopback() {
        Some("loopback (::1)")
    } else if first & 0xfe00 == 0xfc00 {
        Some("unique local / metadata (fc00::/7)")
    } else if first & 0xffc0 == 0xfe80 {
        Some("link-local (fe80::/10)")
    } else if first & 0xff00 == 0xff00 {
        Some("multicast (ff00::/8)")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn allowlist(allow: &[&str], deny: &[&str], cidrs: &[&str]) -> Allowlist {
        Allowlist::from_policy(&pb::NetworkPolicy {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
            allow_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
        })
        .unwrap()
    }

    fn allowed(list: &Allowlist, host: &str, port: u16) -> bool {
        matches!(list.check_destination(host, port), Verdict::Allow(_))
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        let list = allowlist(&["*.allowed.test"], &[], &[]);
        assert!(allowed(&list, "api.allowed.test", 443));
        assert!(allowed(&list, "a.b.allowed.test", 80));
        assert!(allowed(&list, "API.Allowed.Test.", 80));
        assert!(!allowed(&list, "allowed.test", 443));
        assert!(!allowed(&list, "evil-allowed.test", 443));
        assert!(!allowed(&list, "allowed.test.evil", 443));
        assert!(!allowed(&list, "127.0.0.1", 443));
    }

    #[test]
    fn ports_restrict_when_given() {
        let list = allowlist(&["api.example.com:443", "[::1]:8080", "10.0.0.1"], &[], &[]);
        assert!(allowed(&list, "api.example.com", 443));
        assert!(!allowed(&list, "api.example.com", 80));
        assert!(allowed(&list, "::1", 8080));
        assert!(!allowed(&list, "::1", 8081));
        assert!(allowed(&list, "10.0.0.1", 1));
    }

    #[test]
    fn ip_literals_match_only_rules_naming_them() {
        let list = allowlist(&["*.0.0.1", "[0:0::1]:8080", "10.0.0.1:443"], &[], &[]);
        assert!(!allowed(&list, "127.0.0.1", 80));
        assert!(allowed(&list, "::1", 8080));
        assert!(allowed(&list, "[0000::0001]", 8080));
        assert!(allowed(&list, "10.0.0.1", 443));
        assert!(allowed(&list, "::ffff:10.0.0.1", 443));
        assert!(!allowed(&list, "10.0.0.1", 80));
        assert_eq!(
            list.check_destination("127.0.0.1", 80),
            Verdict::Deny(
                "IP address 127.0.0.1 port 80 is not on the allowlist (IP literals need a rule naming them)"
                    .to_owned()
            )
        );
    }

    #[test]
    fn numeric_host_names_are_refused() {
        let list = allowlist(&["*.1", "*.allowed.test"], &[], &["127.0.0.0/8"]);
        for host in ["127.1", "0.0.1", "2130706433", "a.0x7f", "0x7f.0.0.1"] {
            assert!(!allowed(&list, host, 80), "{host} was allowed");
        }
        assert!(allowed(&list, "v1.allowed.test", 80));
        assert!(allowed(&list, "0x7g.allowed.test", 80));
    }

    #[test]
    fn refusals_name_the_host_and_port() {
        let list = allowlist(&["*.example.com"], &["secret.example.com"], &[]);
        assert_eq!(
            list.check_destination("evil.test", 443),
            Verdict::Deny("host evil.test port 443 is not on the allowlist".to_owned())
        );
        assert_eq!(
            list.check_destination("Secret.Example.com.", 443),
            Verdict::Deny(
                "host secret.example.com port 443 matches deny rule \"secret.example.com\""
                    .to_owned()
            )
        );
        assert_eq!(
            list.uncovered_special_range("169.254.169.254".parse().unwrap()),
            Some("link-local / cloud metadata (169.254.0.0/16)")
        );
        assert_eq!(
            list.uncovered_special_range("93.184.216.34".parse().unwrap()),
            None
        );
    }

    #[test]
    fn deny_rules_win_and_empty_denies_all() {
        let list = allowlist(&["*.example.com"], &["secret.example.com"], &[]);
        assert!(allowed(&list, "docs.example.com", 443));
        assert!(!allowed(&list, "secret.example.com", 443));
        let empty = allowlist(&[], &[], &[]);
        assert!(empty.denies_everything());
        assert_eq!(
            empty.check_destination("example.com", 443),
            Verdict::Deny("the session has no network access".to_owned())
        );
    }

    #[test]
    fn malformed_rules_are_rejected() {
        for bad in [
            "",
            "*",
            "*.",
            "a.*.b",
            "host:0",
            "host:99999",
            "bad host",
            "[::1",
            "*.exa mple.com",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let err = Allowlist::from_policy(&pb::NetworkPolicy {
            allow_cidrs: vec!["not-a-cidr".to_owned()],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err, RuleError::Cidr("not-a-cidr".to_owned()));
    }

    #[test]
    fn special_addresses_are_refused_unless_a_cidr_is_granted() {
        let list = allowlist(&["*.allowed.test"], &[], &[]);
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(
                matches!(list.check_address(ip), Verdict::Deny(_)),
                "{ip} was allowed"
            );
        }
        assert!(matches!(
            list.check_address("93.184.216.34".parse().unwrap()),
            Verdict::Allow(_)
        ));
        assert!(matches!(
            list.check_address("2606:2800::1".parse().unwrap()),
            Verdict::Allow(_)
        ));
        let granted = allowlist(&["*.allowed.test"], &[], &["127.0.0.0/8"]);
        assert!(matches!(
            granted.check_address("127.0.0.1".parse().unwrap()),
            Verdict::Allow(_)
        ));
        assert!(matches!(
            granted.check_address("169.254.169.254".parse().unwrap()),
            Verdict::Deny(_)
        ));
    }

    #[test]
    fn raw_sockets_need_a_literal_rule() {
        let list = allowlist(
            &["*.allowed.test", "93.184.216.34:443", "127.0.0.1:9"],
            &[],
            &[],
        );
        assert!(matches!(
            list.check_socket("93.184.216.34".parse().unwrap(), 443),
            Verdict::Allow(_)
        ));
        assert!(matches!(
            list.check_socket("93.184.216.34".parse().unwrap(), 80),
            Verdict::Deny(_)
        ));
        assert!(matches!(
            list.check_socket("1.1.1.1".parse().unwrap(), 443),
            Verdict::Deny(_)
        ));
        // Named literally but loopback, and no CIDR granted.
        assert!(matches!(
            list.check_socket("127.0.0.1".parse().unwrap(), 9),
            Verdict::Deny(_)
        ));
    }
}
