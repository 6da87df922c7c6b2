//! Kernel struct member offsets, read from the running kernel's BTF.
//!
//! Rust eBPF programs cannot carry CO-RE relocations, so the loader resolves every field the
//! programs read here, once at start-up, and hands the numbers over in `Config`.

use btf_rs::{Btf, BtfType, Type};
use netdrop_common::KernelOffsets;

/// A member the programs need is missing or unreadable in this kernel's BTF.
#[derive(Debug, thiserror::Error)]
pub enum OffsetError {
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {strukt} has no member {path}")]
    NoMember { strukt: String, path: String },
    #[error("kernel BTF: {strukt}.{path} is a bitfield")]
    Bitfield { strukt: String, path: String },
    #[error("reading kernel BTF")]
    Btf(#[source] btf_rs::Error),
}

/// Every offset the drop programs read.
pub fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets, OffsetError> {
    let skb = |path: &[&str]| member_offset(btf, "sk_buff", path);
    let dev = |path: &[&str]| member_offset(btf, "net_device", path);
    Ok(KernelOffsets {
        skb_dev: skb(&["dev"])?,
        skb_sk: skb(&["sk"])?,
        skb_len: skb(&["len"])?,
        skb_iif: skb(&["skb_iif"])?,
        skb_protocol: skb(&["protocol"])?,
        skb_transport_header: skb(&["transport_header"])?,
        skb_network_header: skb(&["network_header"])?,
        skb_tail: skb(&["tail"])?,
        skb_head: skb(&["head"])?,
        dev_ifindex: dev(&["ifindex"])?,
        dev_name: dev(&["name"])?,
        // possible_net_t { struct net *net; }
        dev_nd_net: dev(&["nd_net", "net"])?,
        sk_net: member_offset(btf, "sock", &["__sk_common", "skc_net", "net"])?,
        sk_state: member_offset(btf, "sock", &["__sk_common", "skc_state"])?,
        net_ns_inum: member_offset(btf, "net", &["ns", "inum"])?,
        // Optional: without them a drop TCP freed after clearing `skb->dev` (and with no
        // `rx_sk`) has an unknown namespace, but everything else works. `dst_entry.dev` is a
        // plain member before 6.16, in an anonymous union with `dev_rcu` since.
        skb_refdst: skb(&["_skb_refdst"]).unwrap_or(netdrop_common::ABSENT),
        dst_dev: member_offset(btf, "dst_entry", &["dev"]).unwrap_or(netdrop_common::ABSENT),
        net_cookie: net_cookie_offset(btf),
        ..KernelOffsets::default()
    })
}

/// Where the namespace's cookie sits in `struct net`, or `ABSENT`.
///
/// `net_cookie` is a `u64` set when the namespace is made from 5.12 on; 5.7 to 5.11 have an
/// `atomic64_t` generated only when something asks for it (0 in most namespaces), useless as a
/// key. Since 6.18 it is the generic namespace id `ns.ns_id` (`ns_tree_gen_id`), which later
/// kernels may keep alone: that member is the fallback.
/// <https://github.com/torvalds/linux/blob/v6.18/net/core/net_namespace.c> (`setup_net`)
pub fn net_cookie_offset(btf: &Btf) -> u32 {
    [&["net_cookie"][..], &["ns", "ns_id"][..]]
        .into_iter()
        .find_map(|path| {
            let off = member_offset(btf, "net", path).ok()?;
            is_u64(btf, "net", path).then_some(off)
        })
        .unwrap_or(netdrop_common::ABSENT)
}

/// Whether `strukt.path` is a plain 8-byte integer (not an `atomic64_t` struct).
fn is_u64(btf: &Btf, strukt: &str, path: &[&str]) -> bool {
    let ty = || -> Result<bool, OffsetError> {
        let mut ty = find_struct(btf, strukt)?;
        for name in path {
            let Some((_, member)) = find_member(btf, &ty, name)? else {
                return Ok(false);
            };
            ty = strip_modifiers(btf, btf.resolve_chained_type(&member).map_err(OffsetError::Btf)?)?;
        }
        Ok(matches!(&ty, Type::Int(i) if i.size() == 8))
    };
    ty().unwrap_or(false)
}

/// Offsets of the conntrack fields: `skb->_nfct` and `struct nf_conn`/`nf_conntrack_tuple`.
/// `btf` is vmlinux's, or nf_conntrack's module BTF (split on top of vmlinux) when conntrack
/// is a module. Fails when the kernel has no conntrack (`CONFIG_NF_CONNTRACK=n`) or the module
/// is not loaded.
pub fn conntrack_offsets(vmlinux: &Btf, ct_btf: &Btf, into: &mut KernelOffsets) -> Result<(), OffsetError> {
    let tuple = |path: &[&str]| member_offset(ct_btf, "nf_conntrack_tuple", path);
    into.skb_nfct = member_offset(vmlinux, "sk_buff", &["_nfct"])?;
    into.ct_status = member_offset(ct_btf, "nf_conn", &["status"])?;
    // tuplehash[IP_CT_DIR_ORIGINAL] is element 0: the array's own offset.
    into.ct_orig_tuple = member_offset(ct_btf, "nf_conn", &["tuplehash"])?
        + member_offset(ct_btf, "nf_conntrack_tuple_hash", &["tuple"])?;
    into.tuple_src_u3 = tuple(&["src", "u3"])?;
    into.tuple_src_port = tuple(&["src", "u", "all"])?;
    into.tuple_src_l3num = tuple(&["src", "l3num"])?;
    into.tuple_dst_u3 = tuple(&["dst", "u3"])?;
    into.tuple_dst_port = tuple(&["dst", "u", "all"])?;
    into.tuple_dst_protonum = tuple(&["dst", "protonum"])?;
    Ok(())
}

/// Byte offset of `strukt.path[0].path[1]...`, looking through anonymous structs and unions
/// the way C does (`skb->dev` lives in an anonymous union inside an anonymous struct).
pub fn member_offset(btf: &Btf, strukt: &str, path: &[&str]) -> Result<u32, OffsetError> {
    let mut ty = find_struct(btf, strukt)?;
    let mut bits = 0u32;
    for (i, name) in path.iter().enumerate() {
        let not_found = || OffsetError::NoMember {
            strukt: strukt.into(),
            path: path.join("."),
        };
        let Some((off, member)) = find_member(btf, &ty, name)? else {
            return Err(not_found());
        };
        if member.bitfield_size().is_some_and(|s| s != 0) {
            return Err(OffsetError::Bitfield {
                strukt: strukt.into(),
                path: path.join("."),
            });
        }
        bits += off;
        if i + 1 < path.len() {
            ty = strip_modifiers(btf, btf.resolve_chained_type(&member).map_err(OffsetError::Btf)?)?;
        }
    }
    Ok(bits / 8)
}

fn find_struct(btf: &Btf, name: &str) -> Result<Type, OffsetError> {
    btf.resolve_types_by_name(name)
        .map_err(|_| OffsetError::NoStruct(name.into()))?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(_)))
        .ok_or_else(|| OffsetError::NoStruct(name.into()))
}

/// Typedefs, const and volatile do not change layout: look through them.
fn strip_modifiers(btf: &Btf, mut ty: Type) -> Result<Type, OffsetError> {
    loop {
        ty = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t),
            Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => btf.resolve_chained_type(t),
            Type::TypeTag(t) => btf.resolve_chained_type(t),
            _ => return Ok(ty),
        }
        .map_err(OffsetError::Btf)?;
    }
}

/// Finds `name` among the members of a struct/union, descending into anonymous members.
/// Returns its bit offset relative to `ty`.
fn find_member(btf: &Btf, ty: &Type, name: &str) -> Result<Option<(u32, btf_rs::Member)>, OffsetError> {
    let members = match ty {
        Type::Struct(s) | Type::Union(s) => &s.members,
        _ => return Ok(None),
    };
    for m in members {
        let mname = match m.get_name_offset() {
            Some(0) | None => String::new(),
            Some(_) => btf.resolve_name(m).map_err(OffsetError::Btf)?,
        };
        if mname == name {
            return Ok(Some((m.bit_offset(), m.clone())));
        }
        if mname.is_empty() {
            let inner = strip_modifiers(btf, btf.resolve_chained_type(m).map_err(OffsetError::Btf)?)?;
            if let Some((off, found)) = find_member(btf, &inner, name)? {
                return Ok(Some((m.bit_offset() + off, found)));
            }
        }
    }
    Ok(None)
}
#[cfg(test)]
mod tests {
    use super::*;

    /// A raw BTF blob with the types the cookie lookup reads, `struct net` with `ns` and
    /// `net_cookie` as the kernels of the matrix declare them. `cookie`: `"u64"`, `"atomic64_t"`
    /// or `""` (no member); `ns_id`: whether `ns_common` has a `u64 ns_id`.
    fn btf(cookie: &str, ns_id: bool) -> Btf {
        let mut strings = vec![0u8];
        let mut name = |s: &str| -> u32 {
            let off = strings.len() as u32;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            off
        };
        let mut types: Vec<u32> = Vec::new();
        let int = |types: &mut Vec<u32>, n: u32, size: u32, signed: bool| {
            types.extend([n, 1 << 24, size, (u32::from(signed) << 24) | (size * 8)]);
        };
        let member = |types: &mut Vec<u32>, n: u32, ty: u32, bit_offset: u32| types.extend([n, ty, bit_offset]);
        // [1] long long, [2] struct { counter }, [3] atomic64_t, [4] unsigned long long, [5] u64,
        // [6] unsigned int.
        int(&mut types, name("long long"), 8, true);
        types.extend([0, (4 << 24) | 1, 8]);
        member(&mut types, name("counter"), 1, 0);
        types.extend([name("atomic64_t"), 8 << 24, 2]);
        int(&mut types, name("unsigned long long"), 8, false);
        types.extend([name("u64"), 8 << 24, 4]);
        int(&mut types, name("unsigned int"), 4, false);
        // [7] struct ns_common { unsigned int inum; u64 ns_id; }
        types.extend([name("ns_common"), (4 << 24) | (1 + u32::from(ns_id)), 16]);
        member(&mut types, name("inum"), 6, 0);
        if ns_id {
            member(&mut types, name("ns_id"), 5, 64);
        }
        // [8] struct net { struct ns_common ns; ... net_cookie; }
        let with_cookie = !cookie.is_empty();
        types.extend([name("net"), (4 << 24) | (1 + u32::from(with_cookie)), 64]);
        member(&mut types, name("ns"), 7, 128);
        if with_cookie {
            let ty = if cookie == "u64" { 5 } else { 3 };
            member(&mut types, name("net_cookie"), ty, 256);
        }
        let types: Vec<u8> = types.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut blob = Vec::new();
        blob.extend(0xeb9f_u16.to_le_bytes());
        blob.extend([1, 0]);
        for w in [24, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            blob.extend(w.to_le_bytes());
        }
        blob.extend(types);
        blob.extend(strings);
        Btf::from_bytes(&blob).expect("synthetic BTF parses")
    }

    #[test]
    fn net_cookie_is_a_plain_u64_or_absent() {
        // 5.12 to 6.17: `u64 net_cookie`.
        assert_eq!(net_cookie_offset(&btf("u64", false)), 32);
        // 6.18: both, the same value; `net_cookie` first.
        assert_eq!(net_cookie_offset(&btf("u64", true)), 32);
        // 5.7 to 5.11: an `atomic64_t` made on demand: unusable.
        assert_eq!(net_cookie_offset(&btf("atomic64_t", false)), netdrop_common::ABSENT);
        // A kernel that keeps only the namespace id.
        assert_eq!(net_cookie_offset(&btf("", true)), 16 + 8);
        assert_eq!(net_cookie_offset(&btf("", false)), netdrop_common::ABSENT);
        assert_eq!(member_offset(&btf("u64", false), "net", &["ns", "inum"]).ok(), Some(16));
    }
}
