//! Filters: parsing what the user asked for, and turning it into the kernel programs' settings
//! (every filter here runs in the kernel, so unmatched drops never cross to userspace).

use std::{os::unix::fs::MetadataExt, path::Path};

use ipnet::IpNet;
use netdrop_common::{ABSENT, ANY_PROTO, Config};

use crate::kernel::{benign, reasons::ReasonTable};

/// A filter value that names something this kernel does not know.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("--reason {name}: this kernel has no such drop reason{}", suggest(.suggestions))]
    UnknownReason { name: String, suggestions: Vec<String> },
    #[error("--port/--ip/--proto/--netns need kernel BTF (to read packet headers), which this kernel lacks: {0}")]
    NeedsBtf(String),
}

fn suggest(s: &[String]) -> String {
    if s.is_empty() {
        "; `netdrop reasons` lists them".into()
    } else {
        format!(" (did you mean {}?)", s.join(", "))
    }
}

/// What to trace.
#[derive(Clone, Debug, Default)]
pub struct FilterSpec {
    /// Reason names; empty for all non-benign reasons.
    pub reasons: Vec<String>,
    pub port: Option<u16>,
    pub proto: Option<u8>,
    pub ip: Option<IpNet>,
    pub netns: Option<u32>,
    /// Show benign frees too.
    pub all_reasons: bool,
}

impl FilterSpec {
    pub fn needs_packet(&self) -> bool {
        self.port.is_some() || self.proto.is_some() || self.ip.is_some() || self.netns.is_some()
    }

    /// Writes the filters into the kernel configuration.
    pub fn apply(&self, cfg: &mut Config, reasons: &ReasonTable) -> Result<(), FilterError> {
        if let Some(p) = self.port {
            cfg.port = p;
        }
        cfg.l4_proto = self.proto.map_or(ANY_PROTO, u32::from);
        if let Some(n) = self.netns {
            cfg.netns = n;
        }
        if let Some(net) = self.ip {
            let (addr, mask, family) = match net {
                IpNet::V4(n) => {
                    let mut a = [0; 16];
                    let mut m = [0; 16];
                    a[..4].copy_from_slice(&n.network().octets());
                    m[..4].copy_from_slice(&n.netmask().octets());
                    (a, m, 4)
                }
                IpNet::V6(n) => (n.network().octets(), n.netmask().octets(), 6),
            };
            cfg.ip_addr = addr;
            cfg.ip_mask = mask;
            cfg.ip_family = family;
        }
        // NOT_SPECIFIED is hidden only on skbs without an IP header (netlink, unix); without
        // reasons (before 5.17) every drop is 0, and the same rule holds for all of them.
        let quiet = reasons.not_specified();
        if self.reasons.is_empty() {
            cfg.emit_reasons = [u64::MAX; netdrop_common::REASON_BITMAP_BITS / 64];
            cfg.emit_other_reasons = 1;
            if !self.all_reasons {
                for code in benign::benign_codes(reasons) {
                    cfg.set_emit(code, false);
                }
                cfg.quiet_reason_without_ip = quiet.unwrap_or(ABSENT);
            }
        } else {
            cfg.emit_reasons = [0; netdrop_common::REASON_BITMAP_BITS / 64];
            cfg.emit_other_reasons = 0;
            for code in self.reason_codes(reasons)? {
                cfg.set_emit(code, true);
                if code as usize >= netdrop_common::REASON_BITMAP_BITS {
                    cfg.emit_other_reasons = 1;
                }
            }
            // Asking for NOT_SPECIFIED by name means all of them, IP header or not.
            cfg.quiet_reason_without_ip = ABSENT;
        }
        Ok(())
    }

    /// The reason numbers the user named.
    pub fn reason_codes(&self, reasons: &ReasonTable) -> Result<Vec<u32>, FilterError> {
        self.reasons
            .iter()
            .map(|name| {
                reasons.lookup(name).ok_or_else(|| FilterError::UnknownReason {
                    name: name.clone(),
                    suggestions: reasons.close_matches(name).into_iter().map(String::from).collect(),
                })
            })
            .collect()
    }
}

/// `--proto`: a name or an IP protocol number.
pub fn parse_proto(s: &str) -> Result<u8, String> {
    s.parse::<crate::kernel::proto::IpProto>().map(|p| p.0)
}

/// `--ip`: a CIDR (`10.0.0.0/8`, `fd00::/64`) or a single address.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    if let Some((addr, len)) = s.split_once('/')
        && let (Ok(addr), Ok(len)) = (addr.parse::<std::net::IpAddr>(), len.parse::<u8>())
    {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("prefix length {len} is longer than {max}"));
        }
    }
    s.parse()
        .map_err(|_| format!("{s:?} is not an IP address or CIDR (10.0.0.0/8, fd00::/64)"))
}

/// `--netns`: an inode number, or a path to a namespace file (`/run/netns/NAME`,
/// `/proc/PID/ns/net`), or a name under /run/netns.
pub fn parse_netns(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    let path = if s.contains('/') {
        Path::new(s).to_path_buf()
    } else {
        Path::new("/run/netns").join(s)
    };
    std::fs::metadata(&path).map(|m| m.ino() as u32).map_err(|e| {
        format!(
            "{}: {e} (give an inode number, a /proc/PID/ns/net path or a name in /run/netns)",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ReasonTable {
        ReasonTable::from_print_fmt(
            r#"__print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 4, "SOCKET_CLOSE" }, { 12, "NETFILTER_DROP" })"#,
        )
        .expect("table")
    }

    #[test]
    fn cidr_errors_are_specific() {
        assert_eq!(
            parse_cidr("10.0.0.0/33").unwrap_err(),
            "prefix length 33 is longer than 32"
        );
        assert!(parse_cidr("fd00::/129").unwrap_err().contains("128"));
        assert!(parse_cidr("nonsense").is_err());
        assert_eq!(parse_cidr("10.1.2.3").expect("ip").prefix_len(), 32);
    }

    #[test]
    fn proto_names_and_numbers() {
        assert_eq!(parse_proto("UDP"), Ok(17));
        assert_eq!(parse_proto("132"), Ok(132));
        assert!(parse_proto("256").is_err());
    }

    #[test]
    fn netns_by_number() {
        assert_eq!(parse_netns("4026531840"), Ok(4_026_531_840));
        assert!(parse_netns("/nonexistent/ns").is_err());
    }

    #[test]
    fn default_hides_benign_and_quiets_unspecified_without_ip() {
        let mut cfg = Config::DEFAULT;
        FilterSpec::default().apply(&mut cfg, &table()).expect("apply");
        assert!(cfg.emits(3));
        assert!(!cfg.emits(4), "SOCKET_CLOSE is benign");
        assert!(cfg.emits(2), "NOT_SPECIFIED with an IP header is shown");
        assert_eq!(cfg.quiet_reason_without_ip, 2);
    }

    #[test]
    fn without_reasons_drops_without_ip_are_quiet_too() {
        let mut cfg = Config::DEFAULT;
        FilterSpec::default()
            .apply(&mut cfg, &ReasonTable::without_reasons())
            .expect("apply");
        assert!(cfg.emits(0), "every drop is reason 0 there");
        assert_eq!(cfg.quiet_reason_without_ip, 0);
    }

    #[test]
    fn all_reasons_shows_everything() {
        let mut cfg = Config::DEFAULT;
        FilterSpec {
            all_reasons: true,
            ..FilterSpec::default()
        }
        .apply(&mut cfg, &table())
        .expect("apply");
        assert!(cfg.emits(4));
        assert_eq!(cfg.quiet_reason_without_ip, ABSENT);
    }

    #[test]
    fn reason_filter_selects_exactly() {
        let mut cfg = Config::DEFAULT;
        let spec = FilterSpec {
            reasons: vec!["no_socket".into()],
            ..FilterSpec::default()
        };
        spec.apply(&mut cfg, &table()).expect("apply");
        assert!(cfg.emits(3));
        assert!(!cfg.emits(12));
        assert!(!cfg.emits(0x3_0001));
    }

    #[test]
    fn unknown_reason_suggests() {
        let spec = FilterSpec {
            reasons: vec!["NO_SOCKT".into()],
            ..FilterSpec::default()
        };
        let mut config = Config::DEFAULT;
        let err = spec.apply(&mut config, &table()).unwrap_err().to_string();
        assert_eq!(
            err,
            "--reason NO_SOCKT: this kernel has no such drop reason (did you mean NO_SOCKET?)"
        );
    }

    #[test]
    fn ip_filter_fills_mask() {
        let mut cfg = Config::DEFAULT;
        let spec = FilterSpec {
            ip: Some("10.1.0.0/16".parse().expect("net")),
            ..FilterSpec::default()
        };
        spec.apply(&mut cfg, &table()).expect("apply");
        assert_eq!(cfg.ip_family, 4);
        assert_eq!(&cfg.ip_addr[..4], &[10, 1, 0, 0]);
        assert_eq!(&cfg.ip_mask[..4], &[255, 255, 0, 0]);
        assert_eq!(&cfg.ip_mask[4..], &[0; 12]);
    }
}
