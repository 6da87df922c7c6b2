//! `cargo xtask vm-test`: the kernel matrix. Boots Debian cloud kernels (5.10, 6.1, 6.12, 7.2)
//! under qemu with an initramfs holding busybox, iproute2/iptables/nft/conntrack, the kernel
//! modules the tests need, netdrop and the `netdrop-tests` integration tests; reads each guest's
//! result from its serial console and prints a table per kernel.
//!
//! Submodules: `kernel` (packages, cache, modules), `initramfs` (cpio archives and host files),
//! `payload` (cargo builds), `guest` (`/init`, qemu, console markers), `probe` (kernel features).
use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

mod guest;
mod initramfs;
mod kernel;
mod payload;
mod probe;

use guest::Status;
use initramfs::Tree;

#[derive(clap::Args, Debug)]
#[expect(clippy::struct_excessive_bools, reason = "independent clap flags")]
pub struct Args {
    /// Kernels to boot, repeatable or comma-separated: `--kernel 5.10,7.2`, `--kernel all`.
    #[arg(long, value_delimiter = ',', default_value = "all", value_parser = ["5.10", "6.1", "6.12", "7.2", "all"])]
    kernel: Vec<String>,
    /// Kill a guest that has not powered off after this long, e.g. `--timeout 90m`. Under
    /// emulation the whole suite takes tens of minutes per kernel.
    #[arg(long, default_value = "60m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Kill a guest that printed nothing for this long (a hung test or kernel), e.g. `--stall 10m`.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    stall: Duration,
    /// Test binaries to run (`tests/tests/<name>.rs`), repeatable or comma-separated:
    /// `--test drops,vm_smoke`. Default: all.
    #[arg(long, value_delimiter = ',')]
    test: Vec<String>,
    /// Keep the work dir (initramfs, /init, serial console logs) and print its path.
    #[arg(long)]
    keep: bool,
    /// Run only the tests whose name contains one of these (libtest's filters), repeatable or
    /// comma-separated: `--filter veth`, `--filter listen_overflow,timewait`.
    #[arg(long, value_delimiter = ',')]
    filter: Vec<String>,
    /// Run the selected tests this many times in each guest, one round after another (to
    /// hunt flaky tests without a boot per round), e.g. `--repeat 10`. Every round is counted.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Show the tests' own output for passing tests too (libtest's --nocapture).
    #[arg(long)]
    nocapture: bool,
    /// Stream each guest's serial console to the terminal.
    #[arg(long)]
    console: bool,
    /// Build netdrop and the tests with `--release`: a longer build, a much faster run under
    /// emulation (netdrop's start-up dominates each test).
    #[arg(long)]
    release: bool,
    /// Guest memory (qemu `-m`), e.g. `--memory 4G`. The initramfs (a few hundred MB with every
    /// test binary) is held twice while the kernel unpacks it.
    #[arg(long, default_value = "2G")]
    memory: String,
    /// Print which eBPF hooks the running kernel accepts (`tp_btf`, fexit on module functions,
    /// kprobes, TCX, clsact, drop reasons) and exit. The guests run this; it works on a host too.
    #[arg(long)]
    probe_here: bool,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.probe_here {
        return probe::run_here();
    }
    let names: Vec<&str> = if args.kernel.iter().any(|k| k == "all") {
        kernel::MATRIX.iter().map(|s| s.name).collect()
    } else {
        let mut v: Vec<&str> = Vec::new();
        for k in &args.kernel {
            if !v.contains(&k.as_str()) {
                v.push(k);
            }
        }
        v
    };
    // The matrix runs the long variants too (`#[ignore = "full: ..."]`).
    let mut libtest = vec!["--include-ignored".to_owned()];
    if args.nocapture {
        libtest.push("--nocapture".to_owned());
    }
    libtest.extend(args.filter.iter().cloned());
    run_matrix(
        &names,
        &Options {
            timeout: args.timeout,
            stall: args.stall,
            tests: args.test.clone(),
            keep: args.keep,
            libtest_args: libtest,
            repeat: args.repeat,
            console: args.console,
            memory: args.memory.clone(),
            release: args.release,
        },
    )
}

/// For `cargo xtask test` (CI): boots `kernels` (e.g. `&["6.1"]`) with the defaults, running
/// only the named test binaries (`&["drops", "vm_smoke"]`; empty: all) to keep the run within
/// its budget; errors when any kernel failed, hung or could not be fetched.
pub fn run_kernels_tests(kernels: &[&str], tests: &[&str], full: bool) -> anyhow::Result<()> {
    for k in kernels {
        if kernel::spec(k).is_none() {
            bail!("unknown kernel {k:?}; the matrix has 5.10, 6.1, 6.12, 7.2");
        }
    }
    run_matrix(
        kernels,
        &Options {
            timeout: Duration::from_hours(1),
            stall: Duration::from_mins(5),
            tests: tests.iter().map(|t| (*t).to_owned()).collect(),
            keep: false,
            libtest_args: if full {
                vec!["--include-ignored".to_owned()]
            } else {
                Vec::new()
            },
            repeat: 1,
            console: false,
            memory: "2G".to_owned(),
            release: false,
        },
    )
}

struct Options {
    release: bool,
    timeout: Duration,
    stall: Duration,
    /// Test binaries to run; empty: all.
    tests: Vec<String>,
    keep: bool,
    libtest_args: Vec<String>,
    /// Rounds of the tests per guest.
    repeat: u32,
    console: bool,
    memory: String,
}

/// Modules the tests may need; whatever a kernel has built in or lacks is skipped (the missing
/// ones are listed in the work dir's `modules-<kernel>.txt`).
const MODULES: &[&str] = &[
    "veth",
    "ifb",
    "dummy",
    "bridge",
    "br_netfilter",
    "vxlan",
    "macvlan",
    "ipvlan",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_nat",
    "nf_defrag_ipv4",
    "nf_defrag_ipv6",
    "nf_reject_ipv4",
    "nf_reject_ipv6",
    "nfnetlink",
    "nfnetlink_queue",
    "nf_log_syslog",
    "nf_log_ipv4",
    "nf_log_ipv6",
    "nf_tables",
    "nft_ct",
    "nft_nat",
    "nft_chain_nat",
    "nft_masq",
    "nft_redir",
    "nft_compat",
    "nft_counter",
    "nft_reject",
    "nft_reject_inet",
    "nft_reject_ipv4",
    "nft_fib",
    "nft_fib_inet",
    "nft_fib_ipv4",
    "nft_limit",
    "nft_log",
    "x_tables",
    "ip_tables",
    "ip6_tables",
    "iptable_filter",
    "iptable_nat",
    "iptable_mangle",
    "iptable_raw",
    "ip6table_filter",
    "ip6table_nat",
    "ipt_REJECT",
    "ip6t_REJECT",
    "xt_conntrack",
    "xt_state",
    "xt_comment",
    "xt_mark",
    "xt_multiport",
    "xt_addrtype",
    "xt_MASQUERADE",
    "xt_nat",
    "xt_REDIRECT",
    "xt_tcpudp",
    "xt_limit",
    "xt_statistic",
    "xt_LOG",
    "xt_CT",
    "xt_physdev",
    "sch_ingress",
    "sch_netem",
    "sch_htb",
    "sch_tbf",
    "cls_bpf",
    "act_bpf",
    "act_gact",
    "cls_u32",
    "cls_matchall",
    "act_mirred",
];

/// Everything but the kernel modules and the payload: busybox, host tools and their libraries.
fn base_tree() -> anyhow::Result<Tree> {
    let mut tree = Tree::default();
    initramfs::merged_usr(&mut tree);
    // The host programs the integration tests run (the tool table's `guest` entries).
    for t in netdrop_tools::TOOLS.iter().filter(|t| t.guest) {
        let path = netdrop_tools::path(t.name)?;
        tree.host(&path)
            .with_context(|| format!("adding {} to the initramfs", t.name))?;
    }
    // iptables loads its matches and targets with dlopen(): ldd cannot see them.
    for dir in glob_dirs("/usr/lib", "xtables") {
        tree.host_dir_files(&dir)?;
    }
    for etc in [
        "/etc/protocols",
        "/etc/services",
        "/etc/ethertypes",
        "/etc/iproute2",
        // rustls' platform verifier refuses to build a client without CA certificates, even
        // for the plain-http API stand-in.
        "/etc/ssl/certs/ca-certificates.crt",
    ] {
        if Path::new(etc).is_dir() {
            tree.host_dir_files(Path::new(etc))?;
        } else if Path::new(etc).exists() {
            tree.host(Path::new(etc))?;
        }
    }
    initramfs::busybox(&mut tree)?;
    tree.data(
        "/etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    );
    tree.data("/etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644);
    tree.data("/etc/hosts", "127.0.0.1 localhost\n::1 localhost\n", 0o644);
    tree.data(
        "/etc/nsswitch.conf",
        "passwd: files\ngroup: files\nhosts: files\nprotocols: files\nservices: files\n",
        0o644,
    );
    for d in ["/proc", "/sys", "/dev", "/run", "/tmp", "/root", "/var/tmp"] {
        tree.dir(d);
    }
    tree.symlink("/var/run", "../run");
    // The kernel opens /dev/console for init's stdio before /init can mount devtmpfs.
    tree.char_dev("/dev/console", 5, 1);
    Ok(tree)
}

/// `/usr/lib/<triplet>/<name>` directories.
fn glob_dirs(root: &str, name: &str) -> Vec<PathBuf> {
    fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path().join(name))
        .filter(|p| p.is_dir())
        .collect()
}

/// The payload archive: /init, netdrop, the test binaries and the probe (this xtask binary).
fn payload_tree(payload: &payload::Payload, work: &Path, libtest_args: &[String], repeat: u32) -> anyhow::Result<Tree> {
    let mut tree = Tree::default();
    tree.data("/init", guest::init_script(libtest_args, repeat), 0o755);
    // Tests open their fixtures by absolute host path (`env!("CARGO_MANIFEST_DIR")`).
    let fixtures = payload::workspace_root().join("tests").join("fixtures");
    if fixtures.is_dir() {
        tree.host_tree(&fixtures)?;
    }
    let stripped = work.join("stripped");
    fs::create_dir_all(&stripped)?;
    let xtask = std::env::current_exe().context("finding the xtask binary")?;
    tree.file_as(guest::XTASK_BIN, &strip(&xtask, &stripped.join("xtask")), 0o755)?;
    tree.file_as(
        guest::NETDROP_BIN,
        &strip(&payload.netdrop, &stripped.join("netdrop")),
        0o755,
    )?;
    for (name, exe) in &payload.tests {
        let dst = stripped.join(format!("test-{name}"));
        tree.file_as(&format!("{}/{name}", guest::TESTS_DIR), &strip(exe, &dst), 0o755)?;
    }
    Ok(tree)
}

/// Debug info is most of a debug binary and the guest keeps its initramfs in RAM: drop it
/// (backtraces keep function names). Should `strip` fail, the binary goes as it is.
fn strip(src: &Path, dst: &Path) -> PathBuf {
    let ok = netdrop_tools::tool("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(dst)
        .arg(src)
        .status()
        .is_ok_and(|s| s.success());
    if ok { dst.to_owned() } else { src.to_owned() }
}

fn modules_tree(k: &kernel::Kernel, work: &Path) -> anyhow::Result<Tree> {
    let (order, missing) = k.modules(MODULES)?;
    fs::write(
        work.join(format!("modules-{}.txt", k.spec.name)),
        kernel::Kernel::describe(&order, &missing),
    )?;
    let mut tree = Tree::default();
    tree.dir(guest::MODULES_DIR);
    for (i, (name, ko)) in order.iter().enumerate() {
        tree.file_as(&format!("{}/{i:03}-{name}.ko", guest::MODULES_DIR), ko, 0o644)?;
    }
    Ok(tree)
}

/// The errors here are for people (a package that cannot be fetched, a tool to install):
/// one line each, without the stack trace anyhow adds when `RUST_BACKTRACE` is set.
fn quiet_errors() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: called before this process starts any thread.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
}

/// One row of the result table.
struct Row {
    kernel: &'static str,
    release: String,
    outcome: Result<guest::Outcome, String>,
    log: PathBuf,
}

/// Removes the work dir on drop unless it is to be kept.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("vm-test: work dir kept at {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn run_matrix(names: &[&str], opts: &Options) -> anyhow::Result<()> {
    quiet_errors();
    let specs: Vec<kernel::Spec> = names
        .iter()
        .map(|n| kernel::spec(n).with_context(|| format!("unknown kernel {n:?}")))
        .collect::<anyhow::Result<_>>()?;
    netdrop_tools::path("qemu-system-x86_64")?;
    let cache = kernel::cache_dir()?;
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let mut work = WorkDir {
        path: std::env::temp_dir().join(format!("netdrop-vm-{}", std::process::id())),
        keep: opts.keep,
    };
    let _ = fs::remove_dir_all(&work.path);
    fs::create_dir_all(&work.path)?;

    // Fetch first: a missing package should not cost a build.
    let t = Instant::now();
    let kernels: Vec<(kernel::Spec, Result<kernel::Kernel, String>)> = specs
        .iter()
        .map(|s| (*s, kernel::fetch(*s, &cache).map_err(|e| format!("{e:#}"))))
        .collect();
    let fetch_time = t.elapsed();
    if kernels.iter().all(|(_, k)| k.is_err()) {
        for (spec, k) in &kernels {
            if let Err(e) = k {
                eprintln!("vm-test: {}: {e}", spec.name);
            }
        }
        bail!("vm-test: no kernel could be fetched");
    }

    let t = Instant::now();
    let payload = payload::build(opts.release, &opts.tests)?;
    let build_time = t.elapsed();

    let t = Instant::now();
    let base = work.path.join("base.cpio");
    base_tree()?.write_cpio(fs::File::create(&base)?)?;
    let tests = work.path.join("payload.cpio");
    payload_tree(&payload, &work.path, &opts.libtest_args, opts.repeat)?.write_cpio(fs::File::create(&tests)?)?;
    let archive_time = t.elapsed();
    eprintln!(
        "vm-test: kernels ready in {:.1}s, build {:.1}s, initramfs {:.1}s ({} MB base + {} MB payload)",
        fetch_time.as_secs_f64(),
        build_time.as_secs_f64(),
        archive_time.as_secs_f64(),
        fs::metadata(&base)?.len() >> 20,
        fs::metadata(&tests)?.len() >> 20,
    );

    let mut rows = Vec::new();
    for (spec, k) in kernels {
        let log = work.path.join(format!("console-{}.log", spec.name));
        let k = match k {
            Ok(k) => k,
            Err(e) => {
                eprintln!("vm-test: {}: {e}", spec.name);
                rows.push(Row {
                    kernel: spec.name,
                    release: "-".into(),
                    outcome: Err(e),
                    log,
                });
                continue;
            }
        };
        let outcome = boot_one(&k, &work.path, &base, &tests, &log, opts).map_err(|e| format!("{e:#}"));
        rows.push(Row {
            kernel: spec.name,
            release: k.release.clone(),
            outcome,
            log,
        });
    }
    let ok = print_table(&rows);
    if !ok {
        work.keep = true;
        bail!(
            "vm-test: not every kernel passed (console logs are in {})",
            work.path.display()
        );
    }
    Ok(())
}

fn boot_one(
    k: &kernel::Kernel,
    work: &Path,
    base: &Path,
    tests: &Path,
    log: &Path,
    opts: &Options,
) -> anyhow::Result<guest::Outcome> {
    // Three archives back to back; the kernel unpacks each in turn over the same rootfs.
    let initrd = work.join(format!("initramfs-{}.cpio", k.spec.name));
    {
        let mut out = fs::File::create(&initrd)?;
        std::io::copy(&mut fs::File::open(base)?, &mut out)?;
        modules_tree(k, work)?.write_cpio(&mut out)?;
        std::io::copy(&mut fs::File::open(tests)?, &mut out)?;
    }
    eprintln!(
        "vm-test: {}: booting {} (Debian {})",
        k.spec.name, k.release, k.package_version
    );
    let outcome = guest::boot(&guest::Boot {
        vmlinuz: &k.vmlinuz,
        initrd: &initrd,
        memory: &opts.memory,
        timeout: opts.timeout,
        stall: opts.stall,
        log,
        echo: opts.console,
        label: k.spec.name,
    })?;
    if outcome.status != Status::Passed && !opts.console {
        eprintln!("vm-test: {}: last console lines:", k.spec.name);
        for l in &outcome.tail {
            eprintln!("  | {l}");
        }
    }
    let _ = fs::remove_file(&initrd);
    Ok(outcome)
}

/// Prints the per-kernel table, the skips with their reasons and the feature matrix; returns
/// whether every kernel passed.
fn print_table(rows: &[Row]) -> bool {
    let mut all_ok = true;
    println!();
    println!(
        "{:<6} {:<28} {:<9} {:>6} {:>6} {:>7} {:>8}",
        "kernel", "release", "result", "passed", "failed", "skipped", "time"
    );
    for r in rows {
        match &r.outcome {
            Err(e) => {
                all_ok = false;
                println!("{:<6} {:<28} {:<9} {e}", r.kernel, r.release, "ERROR");
            }
            Ok(o) => {
                let result = match o.status {
                    Status::Passed => "ok",
                    Status::Failed => "FAILED",
                    Status::Hung => "HUNG",
                    Status::NoResult => "NO RESULT",
                };
                all_ok &= o.status == Status::Passed;
                let release = o.release.clone().unwrap_or_else(|| r.release.clone());
                println!(
                    "{:<6} {:<28} {:<9} {:>6} {:>6} {:>7} {:>7.1}s",
                    r.kernel,
                    release,
                    result,
                    o.passed,
                    o.failed,
                    o.skips.len(),
                    o.duration.as_secs_f64()
                );
                if matches!(o.status, Status::Hung | Status::NoResult) {
                    println!("       console log: {}", r.log.display());
                }
            }
        }
    }
    let skips: Vec<String> = rows
        .iter()
        .filter_map(|r| Some((r.kernel, r.outcome.as_ref().ok()?)))
        .flat_map(|(k, o)| o.skips.iter().map(move |(t, why)| format!("  {k:<6} {t}: {why}")))
        .collect();
    if !skips.is_empty() {
        println!("\nskipped (not counted as passed):");
        for s in skips {
            println!("{s}");
        }
    }
    let probed: Vec<(&str, &guest::Outcome)> = rows
        .iter()
        .filter_map(|r| Some((r.kernel, r.outcome.as_ref().ok()?)))
        .filter(|(_, o)| !o.features.is_empty())
        .collect();
    if let Some((_, first)) = probed.first() {
        println!("\nkernel features (cargo xtask vm-test --probe-here):");
        print!("  {:<32}", "");
        for (k, _) in &probed {
            print!(" {k:<6}");
        }
        println!();
        for (name, _, _) in first.features.iter().filter(|(n, _, _)| n != "kernel") {
            print!("  {name:<32}");
            for (_, o) in &probed {
                let v = o
                    .features
                    .iter()
                    .find(|(n, _, _)| n == name)
                    .map_or("?", |(_, v, _)| v.as_str());
                print!(" {v:<6}");
            }
            println!();
        }
    }
    for r in rows {
        if let Ok(o) = &r.outcome
            && !o.modules_failed.is_empty()
        {
            println!("\n{}: modules that did not load: {}", r.kernel, o.modules_failed);
        }
    }
    all_ok
}
