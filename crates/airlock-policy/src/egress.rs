//! Egress rules: host patterns with ports, host normalisation (case, IDNA,
//! trailing dot, every IPv4 spelling), and address classification.
//!
//! Pure functions; the proxy (airlock-egress) applies them. A name is
//! decided on before it is resolved, and an address is checked after.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// A normalised destination host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Host {
    /// A DNS name: lowercase ASCII (IDNA), no trailing dot.
    Name(String),
    /// An IP literal in any spelling, canonicalised.
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Host::Ip(a) => write!(f, "{a}"),
        }
    }
}

/// What a rule's host part matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostPattern {
    /// Exactly this name.
    Exact(String),
    /// `*.suffix`: any name ending in `.suffix` (never `suffix` itself).
    Suffix(String),
    /// This address only (IP literals are refused unless a rule names them).
    Ip(IpAddr),
}

/// One allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRule {
    /// Host part.
    pub host: HostPattern,
    /// Port (rules are always port-scoped).
    pub port: u16,
    /// Names of this rule may resolve to loopback, private, link-local,
    /// CGNAT or unique-local addresses.
    pub private: bool,
}

/// Why a host string is not a valid destination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// Empty, too long, or a character no host name has.
    #[error("not a valid host name")]
    Invalid,
    /// The last label is numeric but the whole is no IPv4 address.
    #[error("not a valid IP address")]
    BadIp,
}

fn parse_ipv4_part(p: &str) -> Option<u64> {
    if p.is_empty() {
        return None;
    }
    let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
        (h, 16)
    } else if p.len() > 1 && p.starts_with('0') {
        (&p[1..], 8)
    } else {
        (p, 10)
    };
    if digits.is_empty() {
        return Some(0);
    }
    if digits.len() > 16 {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// IPv4 the way URL parsers and `inet_aton` read it: 1 to 4 parts, each
/// decimal, octal (leading 0) or hex (0x), the last filling the remaining
/// bytes. `2130706433`, `0x7f.1`, `127.1` and `0177.0.0.1` are all
/// 127.0.0.1.
pub fn parse_ipv4_loose(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let nums: Vec<u64> = parts
        .iter()
        .map(|p| parse_ipv4_part(p))
        .collect::<Option<_>>()?;
    let (last, head) = nums.split_last()?;
    if head.iter().any(|n| *n > 255) {
        return None;
    }
    let rest_bytes = 4 - head.len();
    if *last >= 1u64 << (8 * rest_bytes) {
        return None;
    }
    let mut v: u64 = 0;
    for (i, n) in head.iter().enumerate() {
        v |= n << (8 * (3 - i));
    }
    v |= last;
    Some(Ipv4Addr::from(v as u32))
}

fn last_label_numeric(s: &str) -> bool {
    let last = s.rsplit('.').next().unwrap_or("");
    !last.is_empty()
        && (last.bytes().all(|b| b.is_ascii_digit())
            || ((last.starts_with("0x") || last.starts_with("0X"))
                && last[2..].bytes().all(|b| b.is_ascii_hexdigit())))
}

/// Normalises a destination host as a client wrote it (CONNECT target or
/// URL authority): strips one trailing dot, reads IP literals in every
/// spelling, lowercases and converts names to ASCII (IDNA, UTS #46), and
/// refuses anything that is not a plain host.
pub fn normalize_host(raw: &str) -> Result<Host, HostError> {
    if raw.is_empty() || raw.len() > 253 + 2 {
        return Err(HostError::Invalid);
    }
    if let Some(inner) = raw.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or(HostError::Invalid)?;
        // Zone ids (fe80::1%eth0) are host-local: never a destination.
        return inner
            .parse::<Ipv6Addr>()
            .map(|a| Host::Ip(IpAddr::V6(a)))
            .map_err(|_| HostError::BadIp);
    }
    let s = raw.strip_suffix('.').unwrap_or(raw);
    if s.is_empty() || s.contains(':') {
        return Err(HostError::Invalid);
    }
    if last_label_numeric(s) {
        return parse_ipv4_loose(s)
            .map(|a| Host::Ip(IpAddr::V4(a)))
            .ok_or(HostError::BadIp);
    }
    let ascii = idna::domain_to_ascii(s).map_err(|_| HostError::Invalid)?;
    let ascii = ascii.strip_suffix('.').unwrap_or(&ascii).to_string();
    let ok = !ascii.is_empty()
        && ascii.len() <= 253
        && ascii.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        });
    if !ok {
        return Err(HostError::Invalid);
    }
    // IDNA may turn full-width digits into a numeric last label.
    if last_label_numeric(&ascii) {
        return parse_ipv4_loose(&ascii)
            .map(|a| Host::Ip(IpAddr::V4(a)))
            .ok_or(HostError::BadIp);
    }
    Ok(Host::Name(ascii))
}

/// Splits `host:port` / `[v6]:port`.
pub fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (h, p) = if s.starts_with('[') {
        let end = s.find(']')?;
        let (h, rest) = s.split_at(end + 1);
        (h, rest.strip_prefix(':')?)
    } else {
        s.rsplit_once(':')?
    };
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = p.parse().ok()?;
    (port != 0).then_some((h, port))
}

/// Parses a rule: `host:port`, `*.suffix:port`, `1.2.3.4:port`,
/// `[::1]:port`.
pub fn parse_rule(s: &str, private: bool) -> Result<EgressRule, String> {
    let (h, port) = split_host_port(s.trim())
        .ok_or_else(|| format!("egress rule {s:?}: expected host:port with a port in 1..=65535"))?;
    let host = if let Some(suffix) = h.strip_prefix("*.") {
        match normalize_host(suffix) {
            Ok(Host::Name(n)) if n.contains('.') => HostPattern::Suffix(n),
            _ => {
                return Err(format!(
                    "egress rule {s:?}: a wildcard needs a domain with at least two labels after '*.'"
                ));
            }
        }
    } else {
        match normalize_host(h) {
            Ok(Host::Name(n)) => HostPattern::Exact(n),
            Ok(Host::Ip(a)) => HostPattern::Ip(a),
            Err(e) => return Err(format!("egress rule {s:?}: {e}")),
        }
    };
    Ok(EgressRule {
        host,
        port,
        private,
    })
}

impl EgressRule {
    /// Whether this rule admits `host:port`.
    pub fn matches(&self, host: &Host, port: u16) -> bool {
        if port != self.port {
            return false;
        }
        match (&self.host, host) {
            (HostPattern::Exact(r), Host::Name(n)) => r == n,
            (HostPattern::Suffix(r), Host::Name(n)) => {
                n.len() > r.len() + 1
                    && n.ends_with(r.as_str())
                    && n.as_bytes()[n.len() - r.len() - 1] == b'.'
            }
            (HostPattern::Ip(r), Host::Ip(a)) => r == a,
            _ => false,
        }
    }
}

/// Address classes the proxy refuses for names unless a rule allows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AddrClass {
    /// Globally routable.
    Public,
    /// 127/8, ::1.
    Loopback,
    /// RFC 1918.
    Private,
    /// 169.254/16 (cloud metadata lives here), fe80::/10.
    LinkLocal,
    /// 100.64/10.
    Cgnat,
    /// fc00::/7.
    UniqueLocal,
    /// ::ffff:0:0/96 and other IPv6 forms embedding IPv4 (NAT64, 6to4).
    V4Embedded,
    /// Unspecified, broadcast, multicast, documentation, reserved.
    Reserved,
}

/// Classifies an address.
pub fn classify(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            if a.is_loopback() {
                AddrClass::Loopback
            } else if a.is_private() {
                AddrClass::Private
            } else if a.is_link_local() {
                AddrClass::LinkLocal
            } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
                AddrClass::Cgnat
            } else if o[0] == 0
                || a.is_broadcast()
                || a.is_multicast()
                || o[0] >= 240
                || a.is_documentation()
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
            {
                AddrClass::Reserved
            } else {
                AddrClass::Public
            }
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            if a.is_loopback() {
                AddrClass::Loopback
            } else if a.is_unspecified()
                || a.is_multicast()
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x2001 && s[1] == 0x0002 && s[2] == 0)
                || (s[0] == 0x0100 && s[1..4] == [0, 0, 0])
                || s[0] == 0x5f00
            {
                AddrClass::Reserved
            } else if a.to_ipv4_mapped().is_some()
                || (s[0] == 0x64 && s[1] == 0xff9b)
                || s[0] == 0x2002
                || (s[0] == 0x2001 && s[1] == 0)
                || (s[..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0)
                || (s[..6] == [0, 0, 0, 0, 0, 0])
            {
                AddrClass::V4Embedded
            } else if (s[0] & 0xffc0) == 0xfe80 {
                AddrClass::LinkLocal
            } else if (s[0] & 0xffc0) == 0xfec0 {
                AddrClass::Private
            } else if (s[0] & 0xfe00) == 0xfc00 {
                AddrClass::UniqueLocal
            } else {
                AddrClass::Public
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_spellings() {
        let lo = Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        for s in [
            "127.0.0.1",
            "2130706433",
            "0x7f000001",
            "0x7f.1",
            "127.1",
            "0177.0.0.1",
            "127.0.0.1.",
            "0x7F.0.0.1",
        ] {
            assert_eq!(normalize_host(s), Ok(lo.clone()), "{s}");
        }
        assert_eq!(
            normalize_host("[::ffff:127.0.0.1]"),
            Ok(Host::Ip("::ffff:127.0.0.1".parse().unwrap()))
        );
        assert_eq!(
            normalize_host("0x"),
            Ok(Host::Ip(IpAddr::V4(Ipv4Addr::UNSPECIFIED)))
        );
        for bad in ["256.0.0.1", "1.2.3.4.5", "1.2.3.999999999", "08.0.0.1"] {
            assert!(normalize_host(bad).is_err(), "{bad}");
        }
        // Full-width digits become a numeric label after IDNA: still an IP.
        assert_eq!(normalize_host("１２７.０.０.１"), Ok(lo));
    }

    #[test]
    fn names_normalise() {
        assert_eq!(
            normalize_host("PyPI.org."),
            Ok(Host::Name("pypi.org".into()))
        );
        assert_eq!(
            normalize_host("bücher.example"),
            Ok(Host::Name("xn--bcher-kva.example".into()))
        );
        for bad in [
            "",
            "a b",
            "a/b",
            "a@b",
            "a..b",
            "-a.b",
            "evil.com%00.x",
            "a:b",
        ] {
            assert!(normalize_host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wildcards_and_ports() {
        let r = parse_rule("*.githubusercontent.com:443", false).unwrap();
        let m = |h: &str, p| r.matches(&normalize_host(h).unwrap(), p);
        assert!(m("raw.githubusercontent.com", 443));
        assert!(m("a.b.githubusercontent.com", 443));
        assert!(m("RAW.GitHubUserContent.com.", 443));
        assert!(!m("githubusercontent.com", 443), "not the bare suffix");
        assert!(!m("evilgithubusercontent.com", 443));
        assert!(!m("githubusercontent.com.evil.com", 443));
        assert!(!m("raw.githubusercontent.com", 80));
        let e = parse_rule("pypi.org:443", false).unwrap();
        assert!(e.matches(&Host::Name("pypi.org".into()), 443));
        assert!(!e.matches(&Host::Name("files.pypi.org".into()), 443));
        assert!(parse_rule("*.com:443", false).is_err());
        assert!(parse_rule("pypi.org", false).is_err());
        assert!(parse_rule("pypi.org:0", false).is_err());
        assert!(parse_rule("pypi.org:65536", false).is_err());
        let ip = parse_rule("10.0.0.5:8080", false).unwrap();
        assert!(ip.matches(&normalize_host("0x0a.0.0.5").unwrap(), 8080));
    }

    #[test]
    fn classes() {
        let c = |s: &str| classify(s.parse().unwrap());
        assert_eq!(c("8.8.8.8"), AddrClass::Public);
        assert_eq!(c("127.0.0.2"), AddrClass::Loopback);
        assert_eq!(c("10.1.2.3"), AddrClass::Private);
        assert_eq!(c("172.31.0.1"), AddrClass::Private);
        assert_eq!(c("192.168.1.1"), AddrClass::Private);
        assert_eq!(c("169.254.169.254"), AddrClass::LinkLocal);
        assert_eq!(c("100.64.0.1"), AddrClass::Cgnat);
        assert_eq!(c("0.0.0.0"), AddrClass::Reserved);
        assert_eq!(c("255.255.255.255"), AddrClass::Reserved);
        assert_eq!(c("::1"), AddrClass::Loopback);
        assert_eq!(c("fe80::1"), AddrClass::LinkLocal);
        assert_eq!(c("fd00::1"), AddrClass::UniqueLocal);
        assert_eq!(c("::ffff:169.254.169.254"), AddrClass::V4Embedded);
        assert_eq!(c("64:ff9b::a9fe:a9fe"), AddrClass::V4Embedded);
        assert_eq!(c("2002:a9fe:a9fe::1"), AddrClass::V4Embedded);
        assert_eq!(c("2606:4700::1111"), AddrClass::Public);
        assert_eq!(c("fec0::1"), AddrClass::Private);
        assert_eq!(c("::ffff:0:7f00:1"), AddrClass::V4Embedded);
        assert_eq!(c("2001:0:4136:e378::1"), AddrClass::V4Embedded);
        assert_eq!(c("100::1"), AddrClass::Reserved);
        assert_eq!(c("5f00::1"), AddrClass::Reserved);
        assert_eq!(c("2001:2::1"), AddrClass::Reserved);
    }
}
