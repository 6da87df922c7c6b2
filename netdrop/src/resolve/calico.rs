//! Calico's host-side interface names for pods.
//!
//! Calico names a pod's host-side veth `<prefix>` + the first 11 hex characters of
//! `sha1("<namespace>.<podname>")`, the prefix being the first entry of `FELIX_INTERFACEPREFIX`
//! (default `cali`). Source: projectcalico/calico, `libcalico-go/lib/backend/k8s/conversion/conversion.go`,
//! `func VethNameForWorkload(namespace, podname string) string` (`h.Write([]byte(fmt.Sprintf("%s.%s",
//! namespace, podname)))` ... `fmt.Sprintf("%s%s", prefix, hex.EncodeToString(h.Sum(nil))[:11])`). The
//! same rule has been in Calico's CNI plugin since 2017; 4 + 11 characters fit IFNAMSIZ (16 with NUL).

use sha1::{Digest, Sha1};

/// Number of hash characters Calico keeps.
const HASH_CHARS: usize = 11;

/// The 11 hex characters that identify a pod's interface, independent of the prefix.
pub(crate) type IfKey = [u8; HASH_CHARS];

fn hex_digit(n: u8) -> u8 {
    b"0123456789abcdef"[usize::from(n & 0xf)]
}

/// The interface-name key for `<namespace>.<pod>`.
pub(crate) fn if_key(namespace: &str, pod: &str) -> IfKey {
    let mut h = Sha1::new();
    h.update(namespace.as_bytes());
    h.update(b".");
    h.update(pod.as_bytes());
    let digest = h.finalize();
    let mut out = [0u8; HASH_CHARS];
    for (i, slot) in out.iter_mut().enumerate() {
        let byte = digest[i / 2];
        *slot = hex_digit(if i % 2 == 0 { byte >> 4 } else { byte });
    }
    out
}

/// Calico's name for the pod's host-side interface with the default `cali` prefix.
pub fn interface_name(namespace: &str, pod: &str) -> String {
    let key = if_key(namespace, pod);
    let mut s = String::with_capacity(4 + HASH_CHARS);
    s.push_str("cali");
    s.extend(key.iter().map(|&b| char::from(b)));
    s
}

/// The key of an interface name of Calico's shape: a 4-character prefix (whatever
/// `FELIX_INTERFACEPREFIX` says) followed by 11 lowercase hex characters.
pub(crate) fn parse_ifname(name: &str) -> Option<IfKey> {
    let b = name.as_bytes();
    if b.len() != 4 + HASH_CHARS {
        return None;
    }
    let tail = &b[4..];
    if !tail.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; HASH_CHARS];
    out.copy_from_slice(tail);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_calico_rule() {
        // Computed independently: `printf default.web-0 | sha1sum`.
        let out = netdrop_tools::filter("sha1sum", &[], b"default.web-0");
        let expected = format!("cali{}", &String::from_utf8_lossy(&out)[..11]);
        assert_eq!(interface_name("default", "web-0"), expected);
        assert_eq!(parse_ifname(&expected), Some(if_key("default", "web-0")));
        assert_eq!(parse_ifname("eth0"), None);
        assert_eq!(parse_ifname("caliZZZZZZZZZZZ"), None);
    }
}
