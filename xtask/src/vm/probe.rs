//! `cargo xtask vm-test --probe-here`: which of the hooks netdrop can use does the running
//! kernel accept? Each guest runs this before the tests; it also runs on the host.
//!
//! The programs are the smallest valid ones (`r0 = 0; exit`) in a BPF ELF object written here,
//! loaded and attached through aya 0.14 exactly as netdrop does, so the answers are about aya on
//! that kernel, not about libbpf. One probe bypasses aya on purpose: fexit on a *module*
//! function through the raw `bpf()` syscall with `attach_btf_obj_fd`, which aya 0.14 never sets.
//!
//! Output: one `NETDROP-VM-FEATURE <name> <yes|no> <detail>` line per feature.
use std::{
    error::Error as StdError,
    ffi::CString,
    fs,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::Context as _;
use aya::{
    Btf, Ebpf,
    programs::{
        BtfTracePoint, FExit, KProbe, LinkOrder, SchedClassifier, TcAttachType, TracePoint,
        tc::{self, NlOptions, TcAttachOptions},
    },
};
use object::{
    Architecture, BinaryFormat, Endianness, SectionKind, SymbolFlags, SymbolKind, SymbolScope,
    write::{Object, Symbol, SymbolSection},
};

/// The conntrack function netdrop wants for conntrack-table drops; lives in the `nf_conntrack` module.
const CT_CONFIRM: &str = "__nf_conntrack_confirm";

fn report(name: &str, result: Result<String, String>) {
    match result {
        Ok(detail) => println!("NETDROP-VM-FEATURE {name} yes {detail}"),
        Err(detail) => println!("NETDROP-VM-FEATURE {name} no {detail}"),
    }
}

/// An error with its sources on one line (aya keeps the errno in the source).
fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s.replace('\n', " ")
}

pub fn run_here() -> anyhow::Result<()> {
    // Attach to the loopback of a namespace of our own, never the host's interfaces; and
    // kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
    // SAFETY: plain syscalls on this thread; the new namespace dies with the process.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            anyhow::bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        let inf = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const inf);
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    report("kernel", Ok(release.trim().to_owned()));

    let btf = Btf::from_sys_fs();
    report(
        "btf_vmlinux",
        btf.as_ref()
            .map(|_| "/sys/kernel/btf/vmlinux".to_owned())
            .map_err(|e| chain(e)),
    );
    report("drop_reason", drop_reason());
    report("ringbuf", ringbuf());

    let object = elf(&[
        ("tracepoint/skb/kfree_skb", "tp"),
        ("tp_btf/kfree_skb", "tpbtf"),
        ("kprobe/__nf_conntrack_confirm", "kp"),
        ("kretprobe/__nf_conntrack_confirm", "krp"),
        ("fexit/kfree_skb", "fexit_vmlinux"),
        ("fexit/__nf_conntrack_confirm", "fexit_vmbtf"),
        ("fexit/__nf_conntrack_confirm", "fexit_modbtf"),
        ("classifier", "tcx"),
        ("classifier", "clsact"),
    ])?;
    let mut bpf = Ebpf::load(&object).context("loading the probe object")?;

    report(
        "tracepoint_kfree_skb",
        attach(&mut bpf, "tp", |p: &mut TracePoint| {
            p.load()?;
            p.attach("skb", "kfree_skb").map(drop)
        }),
    );
    probe_vmlinux(&mut bpf, btf.as_ref().ok());
    probe_conntrack(&mut bpf);
    probe_tc(&mut bpf);
    Ok(())
}

/// `tp_btf` and fexit on vmlinux functions, which need vmlinux BTF.
fn probe_vmlinux(bpf: &mut Ebpf, btf: Option<&Btf>) {
    match btf {
        Some(btf) => {
            report(
                "tp_btf_kfree_skb",
                attach(bpf, "tpbtf", |p: &mut BtfTracePoint| {
                    p.load("kfree_skb", btf)?;
                    p.attach().map(drop)
                }),
            );
            // fexit on a vmlinux function: whether fexit works at all on this kernel. The
            // freeing function was renamed twice (5.17 kfree_skb_reason, 6.10 sk_skb_reason_drop).
            let target = vmlinux_func(&["sk_skb_reason_drop", "kfree_skb_reason", "kfree_skb"]);
            report(
                "fexit_vmlinux",
                match target {
                    Some(f) => attach(bpf, "fexit_vmlinux", |p: &mut FExit| {
                        p.load(f, btf)?;
                        p.attach().map(drop)
                    })
                    .map(|d| format!("{d} to {f}"))
                    .map_err(|e| format!("{f}: {e}")),
                    None => Err("no kfree_skb function in BTF".into()),
                },
            );
            report(
                "fexit_aya_vmlinux_btf",
                attach(bpf, "fexit_vmbtf", |p: &mut FExit| {
                    p.load(CT_CONFIRM, btf)?;
                    p.attach().map(drop)
                }),
            );
        }
        None => {
            for f in ["tp_btf_kfree_skb", "fexit_vmlinux", "fexit_aya_vmlinux_btf"] {
                report(f, Err("no vmlinux BTF".into()));
            }
        }
    }
}

/// The conntrack confirmation hook, in the `nf_conntrack` module on Debian kernels.
fn probe_conntrack(bpf: &mut Ebpf) {
    let module_btf = Path::new("/sys/kernel/btf/nf_conntrack");
    report(
        "module_btf_nf_conntrack",
        if module_btf.exists() {
            Ok(module_btf.display().to_string())
        } else {
            Err(format!("no {}", module_btf.display()))
        },
    );
    report("fexit_aya_module_btf", fexit_aya_module_btf(bpf, module_btf));
    report("fexit_raw_module_btf", fexit_raw_module_btf(module_btf));
    report(
        "kprobe_nf_conntrack_confirm",
        attach(bpf, "kp", |p: &mut KProbe| {
            p.load()?;
            p.attach(CT_CONFIRM, 0).map(drop)
        }),
    );
    report(
        "kretprobe_nf_conntrack_confirm",
        attach(bpf, "krp", |p: &mut KProbe| {
            p.load()?;
            p.attach(CT_CONFIRM, 0).map(drop)
        }),
    );
}

/// TCX (6.6+) and the older clsact qdisc with a netlink filter, on this namespace's loopback.
fn probe_tc(bpf: &mut Ebpf) {
    report(
        "tcx",
        attach(bpf, "tcx", |p: &mut SchedClassifier| {
            p.load()?;
            p.attach_with_options(
                "lo",
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map(drop)
        }),
    );
    report(
        "clsact",
        attach(bpf, "clsact", |p: &mut SchedClassifier| {
            // The qdisc may exist already (EEXIST); attaching tells whether it is usable.
            let _ = tc::qdisc_add_clsact("lo");
            p.load()?;
            p.attach_with_options(
                "lo",
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .map(drop)
        }),
    );
}

/// Loads and attaches program `name` with `f`; the link lives until `bpf` is dropped.
fn attach<P>(
    bpf: &mut Ebpf,
    name: &str,
    f: impl FnOnce(&mut P) -> Result<(), aya::programs::ProgramError>,
) -> Result<String, String>
where
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = bpf
        .program_mut(name)
        .ok_or_else(|| format!("probe object has no program {name}"))?;
    let program: &mut P = program.try_into().map_err(|e: aya::programs::ProgramError| chain(&e))?;
    f(program).map(|()| "attached".to_owned()).map_err(|e| chain(&e))
}

/// The first of `names` that is a function in vmlinux's BTF.
fn vmlinux_func(names: &[&'static str]) -> Option<&'static str> {
    let btf = btf_rs::Btf::from_file("/sys/kernel/btf/vmlinux").ok()?;
    names.iter().copied().find(|n| {
        btf.resolve_types_by_name(n)
            .unwrap_or_default()
            .iter()
            .any(|t| matches!(t, btf_rs::Type::Func(_)))
    })
}

/// Drop reasons: the `reason` field of the `skb:kfree_skb` tracepoint and the BTF enum naming
/// them (both arrived in 5.17).
fn drop_reason() -> Result<String, String> {
    let format = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .find_map(|d| fs::read_to_string(format!("{d}/events/skb/kfree_skb/format")).ok())
        .ok_or("cannot read the skb/kfree_skb tracepoint format (tracefs not mounted?)")?;
    if !format.contains("reason") {
        return Err("skb/kfree_skb has no reason field".into());
    }
    let btf = btf_rs::Btf::from_file("/sys/kernel/btf/vmlinux").map_err(|e| e.to_string())?;
    let count = btf
        .resolve_types_by_name("skb_drop_reason")
        .unwrap_or_default()
        .into_iter()
        .find_map(|t| match t {
            btf_rs::Type::Enum(e) => Some(e.members.len()),
            _ => None,
        });
    Ok(match count {
        Some(n) => format!("reason field; enum skb_drop_reason has {n} values"),
        None => "reason field; no enum skb_drop_reason in BTF".to_owned(),
    })
}

/// aya 0.14's `FExit` with a `Btf` parsed from the module's split BTF file.
fn fexit_aya_module_btf(bpf: &mut Ebpf, module_btf: &Path) -> Result<String, String> {
    if !module_btf.exists() {
        return Err("no module BTF".into());
    }
    let btf =
        Btf::parse_file(module_btf, Endianness::default()).map_err(|e| format!("Btf::parse_file: {}", chain(&e)))?;
    let aya_id = btf
        .id_by_type_name_kind(CT_CONFIRM, aya_obj::btf::BtfKind::Func)
        .map_err(|e| chain(&e))?;
    let real_id = module_func_id(module_btf).map_err(|e| format!("{e:#}"))?;
    let attached = attach(bpf, "fexit_modbtf", |p: &mut FExit| {
        p.load(CT_CONFIRM, &btf)?;
        p.attach().map(drop)
    });
    // aya passes no attach_btf_obj_fd, so the kernel reads the id against vmlinux's BTF.
    let ids = format!("aya resolved id {aya_id}, the function's split-BTF id is {real_id}");
    match attached {
        Ok(_) if aya_id == real_id => Ok(format!("attached ({ids})")),
        Ok(_) => Err(format!("loaded and attached to the WRONG function ({ids})")),
        Err(e) => Err(format!("{e} ({ids})")),
    }
}

/// The split-BTF type id (numbered after vmlinux's ids) of `__nf_conntrack_confirm`.
fn module_func_id(module_btf: &Path) -> anyhow::Result<u32> {
    let base = btf_rs::Btf::from_file("/sys/kernel/btf/vmlinux")?;
    let split = btf_rs::Btf::from_split_file(module_btf, &base)?;
    split
        .resolve_ids_by_name(CT_CONFIRM)?
        .into_iter()
        .find(|id| matches!(split.resolve_type_by_id(*id), Ok(btf_rs::Type::Func(_))))
        .with_context(|| format!("no function {CT_CONFIRM} in {}", module_btf.display()))
}

// The bpf(2) commands and attribute layouts used below, from include/uapi/linux/bpf.h.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;
const BPF_BTF_GET_NEXT_ID: libc::c_long = 23;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_FEXIT: u32 = 25;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    // SAFETY: attr is a live, fully initialised bpf_attr prefix of the size passed.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: commands used with this helper return a new file descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

fn bpf_plain<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<()> {
    // SAFETY: as above; these commands return 0, not a descriptor.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Ring buffer maps (5.8); netdrop sends per-drop events through one.
fn ringbuf() -> Result<String, String> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }
    let mut attr = MapCreate {
        map_type: BPF_MAP_TYPE_RINGBUF,
        key_size: 0,
        value_size: 0,
        max_entries: 4096,
    };
    bpf(BPF_MAP_CREATE, &mut attr)
        .map(|_| "BPF_MAP_TYPE_RINGBUF".to_owned())
        .map_err(|e| e.to_string())
}

/// fexit on the module function the way libbpf does it: the module's BTF object fd in
/// `attach_btf_obj_fd` (5.11+) and the function's split-BTF id.
fn fexit_raw_module_btf(module_btf: &Path) -> Result<String, String> {
    #[repr(C)]
    #[derive(Default)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
        prog_btf_fd: u32,
        func_info_rec_size: u32,
        func_info: u64,
        func_info_cnt: u32,
        line_info_rec_size: u32,
        line_info: u64,
        line_info_cnt: u32,
        attach_btf_id: u32,
        attach_btf_obj_fd: u32,
    }
    #[repr(C)]
    struct RawTpOpen {
        name: u64,
        prog_fd: u32,
        _pad: u32,
    }
    if !module_btf.exists() {
        return Err("no module BTF".into());
    }
    let id = module_func_id(module_btf).map_err(|e| format!("{e:#}"))?;
    let btf_fd = module_btf_fd("nf_conntrack").map_err(|e| format!("{e:#}"))?;
    let insns = INSNS;
    let license = CString::new("GPL").expect("no NUL");
    let mut log = vec![0u8; 1 << 16];
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_TRACING,
        insn_cnt: (insns.len() / 8) as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        expected_attach_type: BPF_TRACE_FEXIT,
        attach_btf_id: id,
        attach_btf_obj_fd: btf_fd.as_raw_fd() as u32,
        ..ProgLoad::default()
    };
    let prog = bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let log = String::from_utf8_lossy(&log);
        format!(
            "BPF_PROG_LOAD: {e}; verifier: {}",
            log.trim_matches('\0').trim().replace('\n', " | ")
        )
    })?;
    let mut open = RawTpOpen {
        name: 0,
        prog_fd: prog.as_raw_fd() as u32,
        _pad: 0,
    };
    let _link = bpf(BPF_RAW_TRACEPOINT_OPEN, &mut open).map_err(|e| format!("attach: {e}"))?;
    Ok(format!("attached (split-BTF id {id} in the nf_conntrack BTF object)"))
}

/// The kernel's BTF object for `module` (5.11+ exposes module BTF objects with their names).
fn module_btf_fd(module: &str) -> anyhow::Result<OwnedFd> {
    #[repr(C)]
    struct GetId {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    #[repr(C)]
    struct GetInfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct BtfInfo {
        btf: u64,
        btf_size: u32,
        id: u32,
        name: u64,
        name_len: u32,
        kernel_btf: u32,
    }
    let mut id = 0;
    loop {
        let mut next = GetId {
            id,
            next_id: 0,
            open_flags: 0,
        };
        bpf_plain(BPF_BTF_GET_NEXT_ID, &mut next).with_context(|| format!("no BTF object named {module}"))?;
        id = next.next_id;
        let mut get = GetId {
            id,
            next_id: 0,
            open_flags: 0,
        };
        let Ok(fd) = bpf(BPF_BTF_GET_FD_BY_ID, &mut get) else {
            continue;
        };
        let mut name = [0u8; 64];
        let mut info = BtfInfo {
            name: name.as_mut_ptr() as u64,
            name_len: name.len() as u32,
            ..BtfInfo::default()
        };
        let mut attr = GetInfoAttr {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: size_of::<BtfInfo>() as u32,
            info: std::ptr::from_mut(&mut info) as u64,
        };
        if bpf_plain(BPF_OBJ_GET_INFO_BY_FD, &mut attr).is_ok() {
            let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
            if &name[..end] == module.as_bytes() {
                return Ok(fd);
            }
        }
    }
}

/// `r0 = 0; exit`: valid for every program type probed (0 is `TC_ACT_OK` for classifiers).
const INSNS: [u8; 16] = [0xb7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];

/// A BPF ELF object with one program per (section, name), as aya-obj reads them.
fn elf(programs: &[(&str, &str)]) -> anyhow::Result<Vec<u8>> {
    let mut obj = Object::new(BinaryFormat::Elf, Architecture::Bpf, Endianness::Little);
    for (section, name) in programs {
        // Programs sharing a section name get separate sections (aya keys them by symbol).
        let id = obj.add_section(Vec::new(), section.as_bytes().to_vec(), SectionKind::Text);
        let offset = obj.append_section_data(id, &INSNS, 8);
        obj.add_symbol(Symbol {
            name: name.as_bytes().to_vec(),
            value: offset,
            size: INSNS.len() as u64,
            kind: SymbolKind::Text,
            scope: SymbolScope::Linkage,
            weak: false,
            section: SymbolSection::Section(id),
            flags: SymbolFlags::None,
        });
    }
    // fexit and tp_btf programs must be GPL-compatible.
    let license = obj.add_section(Vec::new(), b"license".to_vec(), SectionKind::Data);
    obj.append_section_data(license, b"GPL\0", 1);
    Ok(obj.write()?)
}
