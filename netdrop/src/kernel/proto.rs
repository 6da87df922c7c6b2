//! Protocol numbers as the kernel uses them: IP protocol numbers (IANA's, the IP header's
//! protocol / next header, what `--proto` filters on and Kubernetes port protocols map to) and,
//! for packets without an IP header, the ethertype. One representation, named only for display.

use std::{fmt, str::FromStr};

use serde::Serialize;

/// An IP protocol number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpProto(pub u8);

impl IpProto {
    pub const ICMP: Self = Self(1);
    pub const IGMP: Self = Self(2);
    pub const IPIP: Self = Self(4);
    pub const TCP: Self = Self(6);
    pub const UDP: Self = Self(17);
    pub const IPV6: Self = Self(41);
    pub const GRE: Self = Self(47);
    pub const ESP: Self = Self(50);
    pub const ICMPV6: Self = Self(58);
    pub const SCTP: Self = Self(132);
    pub const UDPLITE: Self = Self(136);

    /// The name a drop tracer's users know it by, for the protocols they meet.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::ICMP => "icmp",
            Self::IGMP => "igmp",
            Self::IPIP => "ipip",
            Self::TCP => "tcp",
            Self::UDP => "udp",
            Self::IPV6 => "ipv6",
            Self::GRE => "gre",
            Self::ESP => "esp",
            Self::ICMPV6 => "icmpv6",
            Self::SCTP => "sctp",
            Self::UDPLITE => "udplite",
            _ => return None,
        })
    }

    /// Whether its header starts with 16-bit source and destination ports.
    pub fn has_ports(self) -> bool {
        matches!(self, Self::TCP | Self::UDP | Self::SCTP | Self::UDPLITE) || self.0 == 33
    }
}

impl fmt::Display for IpProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "{}", self.0),
        }
    }
}

/// `--proto`: a name or a number.
impl FromStr for IpProto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "tcp" => Self::TCP,
            "udp" => Self::UDP,
            "icmp" => Self::ICMP,
            "icmpv6" | "icmp6" => Self::ICMPV6,
            "sctp" => Self::SCTP,
            "gre" => Self::GRE,
            other => {
                Self(other.parse().map_err(|_| {
                    format!("{s:?} is not tcp, udp, icmp, icmpv6, sctp, gre or a protocol number 0-255")
                })?)
            }
        })
    }
}

/// A dropped packet's protocol: the IP protocol when its IP header was decoded, else its
/// ethertype (`arp`, `0x88cc`; `ipv4`/`ipv6` for an IP packet whose header could not be read).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Ip(IpProto),
    /// The skb's `protocol` (an ethertype); 0: unknown.
    Ethertype(u16),
}

impl Protocol {
    /// The IP protocol, when the packet has a decoded IP header.
    pub fn ip(self) -> Option<IpProto> {
        match self {
            Self::Ip(p) => Some(p),
            Self::Ethertype(_) => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Ip(p) => p.fmt(f),
            Self::Ethertype(0x0800) => f.write_str("ipv4"),
            Self::Ethertype(0x86dd) => f.write_str("ipv6"),
            Self::Ethertype(0x0806) => f.write_str("arp"),
            Self::Ethertype(0) => f.write_str("unknown"),
            Self::Ethertype(other) => write!(f, "{other:#06x}"),
        }
    }
}

impl Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!("UDP".parse(), Ok(IpProto::UDP));
        assert_eq!("132".parse(), Ok(IpProto::SCTP));
        assert!("256".parse::<IpProto>().is_err());
        assert_eq!(Protocol::Ip(IpProto(99)).to_string(), "99");
        assert_eq!(Protocol::Ip(IpProto::ICMPV6).to_string(), "icmpv6");
        assert_eq!(Protocol::Ethertype(0x0806).to_string(), "arp");
        assert_eq!(Protocol::Ethertype(0x88cc).to_string(), "0x88cc");
    }
}
