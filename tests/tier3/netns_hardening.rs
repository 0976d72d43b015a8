//! Tier 3 (root): the agent's local attack surface, and the agent under exactly the shipped
//! systemd unit's restrictions.
//!
//! - The sandbox: systemd is not PID 1 here, so [`Sandbox`] reads `dist/overlay-agent.service`
//!   and applies what it says the way systemd does, in the agent's process between fork and
//!   exec: its capability bounding set, `NoNewPrivileges`, `UMask`, `LimitNOFILE`/`LimitMEMLOCK`;
//!   a mount namespace (slave propagation) with `ProtectSystem=strict` (every mount read-only but
//!   `/dev`, `/proc`, `/sys`), `ProtectKernelTunables` (`/proc/sys` and `/sys` read-only),
//!   `ReadWritePaths`, `RuntimeDirectory` (a directory of the test's own under /run),
//!   `PrivateTmp`, `ProtectHome`; and a seccomp filter built from `SystemCallFilter` (expanded with
//!   `systemd-analyze syscall-filter`, the same groups systemd uses, `@default` included),
//!   `SystemCallErrorNumber`, `SystemCallArchitectures=native`, `RestrictAddressFamilies`,
//!   `RestrictNamespaces` and `MemoryDenyWriteExecute`. Not emulated: `PrivateDevices`,
//!   `ProtectProc`, `ProtectKernelModules`/`Logs`, `ProtectClock`, `ProtectHostname`,
//!   `LockPersonality`, `RestrictRealtime`, `RestrictSUIDSGID` (none of them is something the
//!   agent uses). `ExecStartPre=+…` lines run unsandboxed first, as systemd runs them.
//! - Under it, on two nodes: one whose bpffs the agent mounts itself (no bpffs in its mount
//!   namespace, as on a host without systemd mounting it: it must come up `mode=0700`), one
//!   using the host's bpffs as systemd mounts it (the pins must land there, through
//!   `ReadWritePaths`); leases, pods ping across, FLANNEL-FWD installed; and on an
//!   iptables-legacy node (FORWARD DROP in the legacy backend), which needs CAP_NET_RAW.
//! - The pin root: refused when someone else owns it, it is group/other-writable or a symlink.
//! - `cleanup` refuses a pin root that is not on a bpffs, or is the bpffs mount itself.
//! - `/healthz`: a flood of idle connections is capped and timed out, and accept errors
//!   (EMFILE) are backed off, not spun on.
//!
//! Run: `cargo build -p overlay-agent && OVERLAY_TEST_SLOWDOWN=2 cargo test -p overlay-tests --test netns_hardening -- --test-threads=1`

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::{fs::PermissionsExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use overlay_tests::{
    cluster::{agent_bin, Cluster, ETCD_IP},
    netns::{require_root, unique_name, Netns},
    slow,
    topology::ping,
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

// ---------------------------------------------------------------------------------------------
// The unit, read as systemd reads it (the [Service] lines the sandbox applies).

/// The `[Service]` section: (key, value) in order, comments and blank lines left out.
fn service_lines(unit: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if !in_service || line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

fn values<'a>(lines: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

fn yes(lines: &[(String, String)], key: &str) -> bool {
    values(lines, key)
        .last()
        .is_some_and(|v| matches!(*v, "yes" | "true" | "1" | "strict"))
}

const CAPS: [&str; 41] = [
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
];

/// The capabilities of every `CapabilityBoundingSet=` line (systemd merges them), as numbers.
fn bounding_set(lines: &[(String, String)]) -> BTreeSet<u32> {
    let mut set = BTreeSet::new();
    for v in values(lines, "CapabilityBoundingSet") {
        assert!(
            !v.starts_with('~'),
            "the sandbox does not read ~ bounding sets: {v}"
        );
        for name in v.split_whitespace() {
            let n = name.trim_start_matches("CAP_").to_ascii_lowercase();
            let i = CAPS
                .iter()
                .position(|c| *c == n)
                .unwrap_or_else(|| panic!("unknown capability {name}"));
            set.insert(i as u32);
        }
    }
    set
}

/// systemd's system call groups (`systemd-analyze syscall-filter`): group → members.
fn syscall_groups() -> BTreeMap<String, Vec<String>> {
    let out = Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager"])
        .output()
        .expect("running systemd-analyze (Debian package `systemd`)");
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut cur = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.starts_with('@') {
            cur = Some(line.trim().to_string());
            groups.entry(line.trim().to_string()).or_default();
        } else if line.starts_with("    ") && !line.trim_start().starts_with('#') {
            if let Some(g) = &cur {
                groups.get_mut(g).unwrap().push(line.trim().to_string());
            }
        } else if line.trim().is_empty() {
            cur = None;
        }
    }
    assert!(
        groups.contains_key("@system-service") && groups.contains_key("@default"),
        "systemd-analyze syscall-filter listed no groups"
    );
    groups
}

fn expand(name: &str, groups: &BTreeMap<String, Vec<String>>, out: &mut BTreeSet<String>) {
    if name.starts_with('@') {
        for m in groups.get(name).unwrap_or_else(|| panic!("unknown group {name}")) {
            expand(m, groups, out);
        }
    } else {
        out.insert(name.to_string());
    }
}

/// x86_64 system call numbers by name, from the kernel headers.
fn syscall_numbers() -> BTreeMap<String, u32> {
    let text = std::fs::read_to_string("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
        .expect("reading asm/unistd_64.h (Debian package linux-libc-dev)");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("#define __NR_")?;
            let (name, nr) = rest.split_once(char::is_whitespace)?;
            Some((name.to_string(), nr.trim().parse().ok()?))
        })
        .collect()
}

/// The allowed system calls of the unit's `SystemCallFilter=` lines, with systemd's rules: the
/// first line decides allow- or deny-list (ours: allow, which adds `@default`), later lines
/// add (`name`) or remove (`~name`) from it.
fn allowed_syscalls(lines: &[(String, String)]) -> BTreeSet<u32> {
    let groups = syscall_groups();
    let numbers = syscall_numbers();
    let mut allowed = BTreeSet::new();
    let filters = values(lines, "SystemCallFilter");
    assert!(
        filters.first().is_some_and(|f| !f.starts_with('~')),
        "the sandbox reads a unit whose first SystemCallFilter= is an allow list: {filters:?}"
    );
    expand("@default", &groups, &mut allowed);
    for f in filters {
        let (remove, list) = match f.strip_prefix('~') {
            Some(l) => (true, l),
            None => (false, f),
        };
        let mut names = BTreeSet::new();
        for n in list.split_whitespace() {
            expand(n, &groups, &mut names);
        }
        if remove {
            allowed.retain(|n| !names.contains(n));
        } else {
            allowed.extend(names);
        }
    }
    // Names of other architectures are not in the x86_64 table, as in systemd.
    allowed.iter().filter_map(|n| numbers.get(n).copied()).collect()
}

// ---------------------------------------------------------------------------------------------
// The seccomp filter (classic BPF), as systemd's libseccomp filter behaves.

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const LD_ABS: u16 = 0x20;
const JEQ: u16 = 0x15;
const JGE: u16 = 0x35;
const JSET: u16 = 0x45;
const AND: u16 = 0x54;
const RET: u16 = 0x06;
const NS_FLAGS: u32 =
    0x0002_0000 | 0x0200_0000 | 0x0400_0000 | 0x0800_0000 | 0x1000_0000 | 0x2000_0000 | 0x4000_0000;

fn ins(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Low 32 bits of argument `i` in `struct seccomp_data`.
fn arg(i: u32) -> u32 {
    16 + 8 * i
}

fn seccomp_filter(lines: &[(String, String)]) -> Vec<libc::sock_filter> {
    let allowed = allowed_syscalls(lines);
    let errno = match values(lines, "SystemCallErrorNumber").last().copied() {
        Some("EPERM") => libc::EPERM as u32,
        None => panic!("the sandbox expects SystemCallErrorNumber= (without it systemd kills)"),
        Some(other) => panic!("SystemCallErrorNumber={other}: the sandbox knows EPERM"),
    };
    let deny = RET_ERRNO | errno;
    let mut p = vec![
        ins(LD_ABS, 0, 0, 4),
        ins(JEQ, 1, 0, AUDIT_ARCH_X86_64),
        ins(RET, 0, 0, RET_KILL_PROCESS),
        ins(LD_ABS, 0, 0, 0),
        // x32 system calls (SystemCallArchitectures=native).
        ins(JGE, 0, 1, 0x4000_0000),
        ins(RET, 0, 0, deny),
    ];
    let reload = ins(LD_ABS, 0, 0, 0);
    if let Some(families) = values(lines, "RestrictAddressFamilies").last() {
        let fams: Vec<u32> = families
            .split_whitespace()
            .map(|f| match f {
                "AF_UNIX" => libc::AF_UNIX as u32,
                "AF_NETLINK" => libc::AF_NETLINK as u32,
                "AF_INET" => libc::AF_INET as u32,
                "AF_INET6" => libc::AF_INET6 as u32,
                "AF_PACKET" => libc::AF_PACKET as u32,
                other => panic!("address family {other} unknown to the sandbox"),
            })
            .collect();
        let block = 2 + 2 * fams.len() as u8;
        p.push(ins(JEQ, 0, block, libc::SYS_socket as u32));
        p.push(ins(LD_ABS, 0, 0, arg(0)));
        for f in fams {
            p.push(ins(JEQ, 0, 1, f));
            p.push(ins(RET, 0, 0, RET_ALLOW));
        }
        p.push(ins(RET, 0, 0, RET_ERRNO | libc::EAFNOSUPPORT as u32));
    }
    if yes(lines, "RestrictNamespaces") {
        // As systemd: clone3 answers ENOSYS (so libc falls back to clone, whose flags can be
        // checked), namespace flags on clone/unshare and setns are refused.
        p.push(ins(JEQ, 0, 1, libc::SYS_clone3 as u32));
        p.push(ins(RET, 0, 0, RET_ERRNO | libc::ENOSYS as u32));
        for nr in [libc::SYS_clone, libc::SYS_unshare] {
            p.push(ins(JEQ, 0, 4, nr as u32));
            p.push(ins(LD_ABS, 0, 0, arg(0)));
            p.push(ins(JSET, 0, 1, NS_FLAGS));
            p.push(ins(RET, 0, 0, deny));
            p.push(reload);
        }
        p.push(ins(JEQ, 0, 1, libc::SYS_setns as u32));
        p.push(ins(RET, 0, 0, deny));
    }
    if yes(lines, "MemoryDenyWriteExecute") {
        let (w, x) = (libc::PROT_WRITE as u32, libc::PROT_EXEC as u32);
        p.push(ins(JEQ, 0, 5, libc::SYS_mmap as u32));
        p.push(ins(LD_ABS, 0, 0, arg(2)));
        p.push(ins(AND, 0, 0, w | x));
        p.push(ins(JEQ, 0, 1, w | x));
        p.push(ins(RET, 0, 0, deny));
        p.push(reload);
        for nr in [libc::SYS_mprotect, libc::SYS_pkey_mprotect] {
            p.push(ins(JEQ, 0, 4, nr as u32));
            p.push(ins(LD_ABS, 0, 0, arg(2)));
            p.push(ins(JSET, 0, 1, x));
            p.push(ins(RET, 0, 0, deny));
            p.push(reload);
        }
    }
    for nr in allowed {
        p.push(ins(JEQ, 0, 1, nr));
        p.push(ins(RET, 0, 0, RET_ALLOW));
    }
    p.push(ins(RET, 0, 0, deny));
    assert!(p.len() < 4096, "seccomp filter too long: {}", p.len());
    p
}

// ---------------------------------------------------------------------------------------------
// The sandbox.

/// One mount of the test's (the host's) mount namespace: point, options, file system type.
struct MountInfo {
    point: String,
    ro: bool,
    flags: libc::c_ulong,
    fstype: String,
}

fn mounts() -> Vec<MountInfo> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-")?;
            let point = f.get(4)?.to_string();
            if point.contains('\\') {
                return None; // an escaped name (a space): not ours, left alone
            }
            let opts: Vec<&str> = f.get(5)?.split(',').collect();
            let mut flags = 0;
            for o in &opts {
                flags |= match *o {
                    "nosuid" => libc::MS_NOSUID,
                    "nodev" => libc::MS_NODEV,
                    "noexec" => libc::MS_NOEXEC,
                    "noatime" => libc::MS_NOATIME,
                    "nodiratime" => libc::MS_NODIRATIME,
                    "relatime" => libc::MS_RELATIME,
                    _ => 0,
                };
            }
            Some(MountInfo {
                point,
                ro: opts.contains(&"ro"),
                flags,
                fstype: f.get(dash + 1)?.to_string(),
            })
        })
        .collect()
}

fn under(path: &str, dir: &str) -> bool {
    path == dir || path.starts_with(&format!("{dir}/"))
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// One step of the sandbox's set-up, done between fork and exec with prepared arguments only.
enum Step {
    /// mount(2) with these arguments; `tolerant`: a mount point gone since it was listed (a
    /// test elsewhere unmounted it) is skipped.
    Mount {
        tolerant: bool,
        src: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// umount2(target, MNT_DETACH).
    Umount(CString),
}

/// The unit's restrictions, ready to be applied to a child process.
pub struct Sandbox {
    netns: OwnedFd,
    steps: Vec<Step>,
    drop_caps: Vec<u32>,
    no_new_privs: bool,
    umask: Option<libc::mode_t>,
    limits: Vec<(libc::__rlimit_resource_t, libc::rlim_t)>,
    filter: Vec<libc::sock_filter>,
    /// What the unit's capability bounding set is, as /proc/PID/status prints it (CapBnd).
    pub cap_mask: u64,
    /// `ExecStartPre=+…` commands (run unsandboxed before the start).
    pub pre: Vec<Vec<String>>,
}

/// Options of a sandboxed start that are the test's, not the unit's.
pub struct SandboxOpts<'a> {
    /// The node's network namespace.
    pub netns: &'a Netns,
    /// Where `RuntimeDirectory=` goes (the test's own directory under /run).
    pub runtime_dir: &'a Path,
    /// Unmount /sys/fs/bpf in the sandbox first (every mount stacked there): a host where
    /// nothing mounted bpffs, so the agent mounts its own.
    pub no_bpffs: bool,
}

impl Sandbox {
    pub fn from_unit(unit: &str, o: &SandboxOpts) -> Self {
        let lines = service_lines(unit);
        let mut steps = Vec::new();
        let bind_self = |p: &str, rec: bool| Step::Mount {
            tolerant: false,
            src: Some(c(p)),
            target: c(p),
            fstype: None,
            flags: libc::MS_BIND | if rec { libc::MS_REC } else { 0 },
            data: None,
        };
        let remount = |p: &str, flags: libc::c_ulong, ro: bool| Step::Mount {
            tolerant: ro && p != "/",
            src: None,
            target: c(p),
            fstype: None,
            flags: libc::MS_REMOUNT | libc::MS_BIND | flags | if ro { libc::MS_RDONLY } else { 0 },
            data: None,
        };
        // Private mounts, host mounts still propagating in (systemd's slave propagation).
        steps.push(Step::Mount {
            tolerant: false,
            src: None,
            target: c("/"),
            fstype: None,
            flags: libc::MS_REC | libc::MS_SLAVE,
            data: None,
        });
        if o.no_bpffs {
            steps.push(Step::Umount(c("/sys/fs/bpf")));
        }
        let all = mounts();
        let strict = values(&lines, "ProtectSystem").last() == Some(&"strict");
        assert!(
            strict || values(&lines, "ProtectSystem").is_empty(),
            "the sandbox knows ProtectSystem=strict only"
        );
        let tunables = yes(&lines, "ProtectKernelTunables");
        let cgroups = yes(&lines, "ProtectControlGroups");
        for m in &all {
            if m.ro || m.fstype == "nsfs" || (o.no_bpffs && m.point == "/sys/fs/bpf") {
                continue;
            }
            let api = ["/dev", "/proc", "/sys"].iter().any(|d| under(&m.point, d));
            let ro = (strict && !api)
                || (tunables && under(&m.point, "/sys"))
                || (cgroups && under(&m.point, "/sys/fs/cgroup"));
            if ro {
                steps.push(remount(&m.point, m.flags, true));
            }
        }
        if tunables {
            steps.push(bind_self("/proc/sys", true));
            steps.push(remount("/proc/sys", 0, true));
        }
        let mut rw: Vec<String> = values(&lines, "ReadWritePaths")
            .iter()
            .flat_map(|v| v.split_whitespace())
            .map(|p| p.trim_start_matches('-').to_string())
            .collect();
        if !values(&lines, "RuntimeDirectory").is_empty() {
            rw.push(o.runtime_dir.display().to_string());
        }
        for p in &rw {
            steps.push(bind_self(p, false));
            steps.push(remount(p, 0, false));
        }
        if yes(&lines, "PrivateTmp") {
            for p in ["/tmp", "/var/tmp"] {
                steps.push(Step::Mount {
                    tolerant: false,
                    src: Some(c("tmpfs")),
                    target: c(p),
                    fstype: Some(c("tmpfs")),
                    flags: libc::MS_NOSUID | libc::MS_NODEV,
                    data: Some(c("mode=1777")),
                });
            }
        }
        if yes(&lines, "ProtectHome") {
            for p in ["/home", "/root", "/run/user"] {
                if Path::new(p).is_dir() {
                    steps.push(Step::Mount {
                        tolerant: false,
                        src: Some(c("tmpfs")),
                        target: c(p),
                        fstype: Some(c("tmpfs")),
                        flags: libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        data: Some(c("mode=000")),
                    });
                }
            }
        }
        let caps = bounding_set(&lines);
        let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let drop_caps = (0..=last).filter(|c| !caps.contains(c)).collect();
        let cap_mask = caps.iter().fold(0u64, |m, c| m | (1 << c));
        let limit = |key: &str| {
            values(&lines, key).last().map(|v| match *v {
                "infinity" => libc::RLIM_INFINITY,
                n => n.parse().unwrap_or_else(|_| panic!("{key}={n}")),
            })
        };
        // Raising a hard limit needs CAP_SYS_RESOURCE, which systemd (PID 1) has and a test
        // machine's root may not: then a limit above the current hard one is clamped to it
        // (LimitMEMLOCK=infinity; the kernels here account BPF memory to the cgroup anyway).
        let may_raise = u64::from_str_radix(&proc_status(std::process::id(), "CapEff"), 16)
            .is_ok_and(|m| m & (1 << 24) != 0);
        let mut limits = Vec::new();
        for (key, res) in [
            ("LimitNOFILE", libc::RLIMIT_NOFILE),
            ("LimitMEMLOCK", libc::RLIMIT_MEMLOCK),
        ] {
            if let Some(mut n) = limit(key) {
                let mut cur = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                // SAFETY: getrlimit into a struct we own.
                unsafe { libc::getrlimit(res, &mut cur) };
                if !may_raise && n > cur.rlim_max {
                    n = cur.rlim_max;
                }
                limits.push((res, n));
            }
        }
        let umask = values(&lines, "UMask")
            .last()
            .map(|v| libc::mode_t::from_str_radix(v, 8).unwrap());
        let pre = values(&lines, "ExecStartPre")
            .iter()
            .map(|v| {
                assert!(
                    v.trim_start_matches('-').starts_with('+'),
                    "the sandbox runs only unsandboxed (+) ExecStartPre= lines: {v}"
                );
                v.trim_start_matches(['-', '+'])
                    .split_whitespace()
                    .map(str::to_string)
                    .collect()
            })
            .collect();
        let netns = std::fs::File::open(o.netns.path()).unwrap().into();
        Sandbox {
            netns,
            steps,
            drop_caps,
            no_new_privs: yes(&lines, "NoNewPrivileges"),
            umask,
            limits,
            filter: seccomp_filter(&lines),
            cap_mask,
            pre,
        }
    }

    /// Makes `cmd` start inside the sandbox.
    pub fn apply(self, cmd: &mut Command) {
        for p in &self.pre {
            let st = Command::new(&p[0]).args(&p[1..]).status().unwrap();
            assert!(st.success(), "ExecStartPre {p:?}: {st}");
        }
        // SAFETY: the closure makes system calls only, on arguments prepared before the fork.
        unsafe {
            cmd.pre_exec(move || self.enter());
        }
    }

    fn enter(&self) -> std::io::Result<()> {
        // Between fork and exec: no allocation, so the failed step goes to stderr (the agent's
        // log) with write(2); the parent gets the errno.
        let say = |what: &[u8], detail: Option<&CString>| {
            // SAFETY: writes of buffers we own to fd 2.
            unsafe {
                libc::write(2, b"sandbox: ".as_ptr().cast(), 9);
                libc::write(2, what.as_ptr().cast(), what.len());
                if let Some(d) = detail {
                    libc::write(2, b" ".as_ptr().cast(), 1);
                    libc::write(2, d.as_ptr().cast(), d.as_bytes().len());
                }
                libc::write(2, b" failed\n".as_ptr().cast(), 8);
            }
        };
        let checked = |r: libc::c_int, what: &[u8], detail: Option<&CString>| {
            if r < 0 {
                let e = std::io::Error::last_os_error();
                say(what, detail);
                Err(e)
            } else {
                Ok(())
            }
        };
        let check = |r: libc::c_int, what: &str| checked(r, what.as_bytes(), None);
        let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        // SAFETY: plain system calls on valid, NUL-terminated strings and structs we own.
        unsafe {
            check(libc::setns(self.netns.as_raw_fd(), libc::CLONE_NEWNET), "setns")?;
            check(libc::unshare(libc::CLONE_NEWNS), "unshare")?;
            for s in &self.steps {
                match s {
                    Step::Mount {
                        tolerant,
                        src,
                        target,
                        fstype,
                        flags,
                        data,
                    } => {
                        let r = libc::mount(
                            ptr(src),
                            target.as_ptr(),
                            ptr(fstype),
                            *flags,
                            ptr(data) as *const libc::c_void,
                        );
                        let gone = matches!(
                            std::io::Error::last_os_error().raw_os_error(),
                            Some(libc::EINVAL | libc::ENOENT)
                        );
                        if !(r < 0 && *tolerant && gone) {
                            checked(r, b"mount", Some(target))?;
                        }
                    }
                    Step::Umount(t) => {
                        checked(libc::umount2(t.as_ptr(), libc::MNT_DETACH), b"umount", Some(t))?;
                        // And whatever is stacked beneath (a host can have bpffs mounted at
                        // /sys/fs/bpf twice): until nothing is mounted there (EINVAL).
                        while libc::umount2(t.as_ptr(), libc::MNT_DETACH) == 0 {}
                    }
                }
            }
            for (res, n) in &self.limits {
                let l = libc::rlimit {
                    rlim_cur: *n,
                    rlim_max: *n,
                };
                check(libc::setrlimit(*res, &l), "setrlimit")?;
            }
            if let Some(m) = self.umask {
                libc::umask(m);
            }
            for cap in &self.drop_caps {
                check(
                    libc::prctl(libc::PR_CAPBSET_DROP, *cap as libc::c_ulong, 0, 0, 0),
                    "PR_CAPBSET_DROP",
                )?;
            }
            if self.no_new_privs {
                check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")?;
            }
            let prog = libc::sock_fprog {
                len: self.filter.len() as u16,
                filter: self.filter.as_ptr() as *mut libc::sock_filter,
            };
            check(
                libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                    &prog as *const libc::sock_fprog as libc::c_ulong,
                    0,
                    0,
                ),
                "seccomp",
            )?;
        }
        Ok(())
    }
}

/// A directory of the test's own under /run (RuntimeDirectory=), removed on drop.
struct RunDir(PathBuf);
impl RunDir {
    fn new() -> Self {
        let p = PathBuf::from("/run").join(unique_name("ovlhard"));
        std::fs::create_dir(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        RunDir(p)
    }
}
impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A copy of the agent binary in a directory of the test's own under /var/lib (exec allowed,
/// neither private nor hidden under the unit), removed on drop.
struct BinCopy(PathBuf);
impl BinCopy {
    fn new() -> Self {
        let dir = PathBuf::from("/var/lib").join(unique_name("ovlhard-bin"));
        std::fs::create_dir(&dir).unwrap();
        let bin = dir.join("overlay-agent");
        std::fs::copy(agent_bin(), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        BinCopy(bin)
    }
}
impl Drop for BinCopy {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Starts node `i`'s agent as [`Cluster::start_agent`] does, but inside the unit's sandbox.
fn start_sandboxed(c: &mut Cluster, i: usize, run: &RunDir, no_bpffs: bool) -> u64 {
    let unit = std::fs::read_to_string(repo_file("dist/overlay-agent.service")).unwrap();
    let n = &mut c.nodes[i];
    n.subnet_file = run.0.join("subnet.env");
    let sandbox = Sandbox::from_unit(
        &unit,
        &SandboxOpts {
            netns: &n.node.ns,
            runtime_dir: &run.0,
            no_bpffs,
        },
    );
    let mask = sandbox.cap_mask;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&n.log_file)
        .unwrap();
    // The unit's PrivateTmp and ProtectHome hide /tmp, /var/tmp and /root: a build there (a
    // fresh clone in /tmp) would not be found inside the sandbox. The agent runs from a copy on
    // the root file system, as an installed one does; the copy goes once exec has happened.
    let bin = BinCopy::new();
    let mut cmd = Command::new(&bin.0);
    cmd.args(["--etcd-endpoints", &format!("http://{ETCD_IP}:2379")])
        .args(["--iface", "eth0", "--subnet-file"])
        .arg(&n.subnet_file)
        .args(["--pin-root", &n.pin_root, "-v", "1"])
        .args(&n.extra_args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    sandbox.apply(&mut cmd);
    match n.node.ns.spawn(cmd) {
        Ok(pid) => n.agent_pid = Some(pid),
        Err(e) => panic!(
            "starting the sandboxed agent: {e:#}; log:\n{}",
            std::fs::read_to_string(&n.log_file).unwrap_or_default()
        ),
    }
    mask
}

/// `Key:` of /proc/PID/status.
fn proc_status(pid: u32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// What the sandbox must have done to the process, read back from the kernel.
fn assert_confined(c: &Cluster, i: usize, mask: u64) {
    let pid = c.nodes[i].agent_pid.expect("agent running");
    let hex = |k: &str| u64::from_str_radix(&proc_status(pid, k), 16).unwrap_or(u64::MAX);
    assert_eq!(
        (hex("CapBnd"), hex("CapEff")),
        (mask, mask),
        "node {}: capabilities of the sandboxed agent",
        i + 1
    );
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1", "node {}", i + 1);
    assert_eq!(
        proc_status(pid, "Seccomp"),
        "2",
        "node {}: no seccomp filter",
        i + 1
    );
    assert_eq!(proc_status(pid, "Umask"), "0077", "node {}", i + 1);
}

/// The bpf mount at /sys/fs/bpf in `pid`'s mount namespace: its super options.
fn bpffs_options(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
    text.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let dash = f.iter().position(|x| *x == "-")?;
        (f.get(4) == Some(&"/sys/fs/bpf") && f.get(dash + 1) == Some(&"bpf"))
            .then(|| f.get(dash + 3).unwrap_or(&"").to_string())
    })
}

fn both_ways(c: &Cluster, pods: &[Ipv4Addr]) {
    assert!(
        ping(&c.nodes[0].node.pods[0].ns, pods[1], 3, None),
        "pod {} → pod {}: no reply under the unit's sandbox; logs:\n{}\n---\n{}",
        pods[0],
        pods[1],
        c.agent_log(0),
        c.agent_log(1)
    );
    assert!(
        ping(&c.nodes[1].node.pods[0].ns, pods[0], 3, None),
        "pod {} → pod {}: no reply under the unit's sandbox",
        pods[1],
        pods[0]
    );
}

fn learn_peers(c: &Cluster) {
    for i in 0..2 {
        let learned = Cluster::wait_for(Duration::from_secs(10), || {
            c.agent_peers(i).map(|p| p.len() == 1).unwrap_or(false)
        });
        assert!(
            learned.is_some(),
            "node {} did not learn its peer under the sandbox; log:\n{}",
            i + 1,
            c.agent_log(i)
        );
        c.wait_encap_attached(i);
    }
}

fn iptables_chain(ns: &Netns, cmd: &str, chain: &str) -> Option<String> {
    let out = ns.exec(cmd, &["-w", "-S", chain]).ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The agent under exactly the unit's restrictions: node 1 mounts its own bpffs (none in its
/// namespace), node 2 pins into the host's (as systemd mounts it at boot); both take a lease,
/// write subnet.env (0644) in the runtime directory, install the FLANNEL-FWD rules, and their
/// pods ping each other.
#[test]
fn agent_runs_under_the_units_sandbox() {
    require_root();
    let mut c = Cluster::new(2, CONFIG).expect("building the cluster");
    // A host with forwarding off, as a fresh one: the agent must turn it on through
    // ReadWritePaths=/proc/sys/net (ProtectKernelTunables makes the rest of /proc/sys read-only).
    c.nodes[0].node.ns.sysctl("net.ipv4.ip_forward=0").unwrap();
    let runs = [RunDir::new(), RunDir::new()];
    let masks = [
        start_sandboxed(&mut c, 0, &runs[0], true),
        start_sandboxed(&mut c, 1, &runs[1], false),
    ];
    for (i, mask) in masks.into_iter().enumerate() {
        c.wait_lease(i, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("node {} under the sandbox: {e}", i + 1));
        assert_confined(&c, i, mask);
        let mode = std::fs::metadata(&c.nodes[i].subnet_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "subnet.env of node {}", i + 1);
    }
    let fwd = c.nodes[0]
        .node
        .ns
        .exec("cat", &["/proc/sys/net/ipv4/ip_forward"])
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&fwd.stdout).trim(),
        "1",
        "node 1's agent did not enable ip_forward under the sandbox; log:\n{}",
        c.agent_log(0)
    );
    let pods = vec![c.add_pods(0, 1).unwrap()[0], c.add_pods(1, 1).unwrap()[0]];
    learn_peers(&c);
    both_ways(&c, &pods);

    // Node 1's own bpffs: mounted mode=0700 in its namespace, the pin root 0700 in it.
    let pid0 = c.nodes[0].agent_pid.unwrap();
    let opts = bpffs_options(pid0).expect("no bpffs at /sys/fs/bpf in node 1's sandbox");
    assert!(opts.contains("mode=700"), "node 1's own bpffs: {opts}");
    assert!(
        c.agent_log(0).contains("mounted bpffs"),
        "node 1 did not say it mounted bpffs:\n{}",
        c.agent_log(0)
    );
    let st = Command::new("nsenter")
        .args(["--target", &pid0.to_string(), "--mount", "stat", "-c", "%a %u"])
        .arg(&c.nodes[0].pin_root)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&st.stdout).trim(),
        "700 0",
        "node 1's pin root"
    );
    // Node 2's pins are in the host's bpffs (ReadWritePaths=/sys/fs/bpf), so they outlive it.
    let peers2 = Path::new(&c.nodes[1].pin_root).join("OVL_PEERS");
    assert!(peers2.exists(), "node 2 did not pin into the host's bpffs");
    for i in 0..2 {
        let fwd = iptables_chain(&c.nodes[i].node.ns, "iptables-nft", "FLANNEL-FWD").unwrap_or_default();
        assert!(
            fwd.contains("10.244.0.0/16"),
            "node {}: no FLANNEL-FWD rules under the sandbox: {fwd}\n{}",
            i + 1,
            c.agent_log(i)
        );
    }
    c.stop_agent(1, Signal::SIGTERM);
    assert!(peers2.exists(), "node 2's pins should outlive the agent");
}

/// An iptables-legacy host (FORWARD policy DROP in the legacy backend): the agent under the
/// unit's restrictions must write its FLANNEL-FWD rules there (iptables-legacy needs
/// CAP_NET_RAW and /run/xtables.lock), or the first pod packets are dropped.
#[test]
fn iptables_legacy_host_under_the_units_sandbox() {
    require_root();
    let mut c = Cluster::new(2, CONFIG).expect("building the cluster");
    for i in 0..2 {
        c.nodes[i]
            .node
            .ns
            .exec("iptables-legacy", &["-w", "-P", "FORWARD", "DROP"])
            .expect("iptables-legacy in the node");
    }
    let runs = [RunDir::new(), RunDir::new()];
    for (i, run) in runs.iter().enumerate() {
        let mask = start_sandboxed(&mut c, i, run, false);
        c.wait_lease(i, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("node {} under the sandbox: {e}", i + 1));
        assert_confined(&c, i, mask);
    }
    let pods = vec![c.add_pods(0, 1).unwrap()[0], c.add_pods(1, 1).unwrap()[0]];
    learn_peers(&c);
    for i in 0..2 {
        let ok = Cluster::wait_for(Duration::from_secs(10), || {
            iptables_chain(&c.nodes[i].node.ns, "iptables-legacy", "FLANNEL-FWD")
                .is_some_and(|r| r.contains("10.244.0.0/16"))
        });
        assert!(
            ok.is_some(),
            "node {}: no FLANNEL-FWD rules in the legacy backend under the sandbox; log:\n{}",
            i + 1,
            c.agent_log(i)
        );
    }
    both_ways(&c, &pods);
}

// ---------------------------------------------------------------------------------------------
// The pin root and cleanup.

/// A fresh bpffs instance on a temp directory (mode 1777, the kernel's default), unmounted on
/// drop.
struct Bpffs(PathBuf);
impl Bpffs {
    fn new() -> Self {
        let d = std::env::temp_dir().join(unique_name("ovlhbpf"));
        std::fs::create_dir_all(&d).unwrap();
        nix::mount::mount(
            Some("bpf"),
            &d,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mounting a bpffs for the test");
        Bpffs(d)
    }
}
impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The agent refuses a pin root someone else could change (another owner, group/other
/// writable, a symlink), names it and the fix, exits non-zero and leaves it as it was; the
/// same directory made safe is used.
#[test]
fn pin_root_refused_unless_only_root_can_change_it() {
    require_root();
    let fs = Bpffs::new();
    let mut c = Cluster::new(1, CONFIG).expect("building the cluster");
    let pin = fs.0.join("overlay");
    let real = fs.0.join("real");
    c.nodes[0].pin_root = pin.display().to_string();
    type Setup = fn(&Path, &Path);
    let cases: [(&str, Setup, &str); 3] = [
        (
            "owned by uid 65534",
            |pin, _| {
                std::fs::create_dir(pin).unwrap();
                std::fs::create_dir(pin.join("planted")).unwrap();
                nix::unistd::chown(pin, Some(65534.into()), Some(65534.into())).unwrap();
                std::fs::set_permissions(pin, std::fs::Permissions::from_mode(0o755)).unwrap();
            },
            "rm -r",
        ),
        (
            "writable by group or others (mode 0777)",
            |pin, _| {
                std::fs::create_dir(pin).unwrap();
                std::fs::create_dir(pin.join("planted")).unwrap();
                std::fs::set_permissions(pin, std::fs::Permissions::from_mode(0o777)).unwrap();
            },
            "chmod go-w",
        ),
        (
            "is a symlink",
            |pin, real| {
                std::fs::create_dir(real).unwrap();
                std::fs::create_dir(real.join("planted")).unwrap();
                std::os::unix::fs::symlink(real, pin).unwrap();
            },
            "give --pin-root a real directory",
        ),
    ];
    for (why, setup, fix) in cases {
        let _ = std::fs::remove_file(&pin);
        let _ = std::fs::remove_dir_all(&pin);
        let _ = std::fs::remove_dir_all(&real);
        setup(&pin, &real);
        let mark = c.log_mark(0);
        c.start_agent(0).unwrap();
        let st = c.wait_agent_exit(0, Duration::from_secs(15));
        let log = c.agent_log(0)[mark..].to_string();
        assert!(
            st.is_some_and(|s| !s.success()),
            "pin root {why}: the agent should refuse to start ({st:?}); log:\n{log}"
        );
        assert!(
            log.contains(&format!("refusing pin root {}", pin.display()))
                && log.contains(why)
                && log.contains(fix),
            "pin root {why}: the error should name the path, the reason and the fix ({fix}):\n{log}"
        );
        let dir = if why == "is a symlink" { &real } else { &pin };
        let left: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["planted"], "pin root {why}: it was used anyway");
    }
    // Made safe (root's, 0755 as an earlier release left it), the same directory is used.
    let _ = std::fs::remove_file(&pin);
    std::fs::create_dir_all(&pin).unwrap();
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o755)).unwrap();
    c.start_agent(0).unwrap();
    c.wait_lease(0, Duration::from_secs(20)).unwrap();
    assert!(pin.join("OVL_PEERS").exists(), "no pins in the reused pin root");
    c.stop_agent(0, Signal::SIGTERM);
}

/// `cleanup` with a pin root that is not on a bpffs (a mistyped `--pin-root`) or that is the
/// bpffs mount itself removes nothing and says why; a real pin root is removed.
#[test]
fn cleanup_refuses_a_pin_root_not_on_a_bpffs() {
    require_root();
    let ns = Netns::new("ovlhc").unwrap();
    let dir = std::env::temp_dir().join(unique_name("ovlhclean"));
    std::fs::create_dir_all(dir.join("keep")).unwrap();
    std::fs::write(dir.join("keep/file"), "precious").unwrap();
    let fs = Bpffs::new();
    std::fs::create_dir(fs.0.join("other-program")).unwrap();
    let cleanup = |pin: &Path| {
        let out = ns
            .command(agent_bin().to_str().unwrap())
            .args(["cleanup", "--pin-root"])
            .arg(pin)
            .args(["--iface", "lo", "--bridge", "lo"])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = cleanup(&dir);
    let kept = dir.join("keep/file").exists();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !ok && text.contains(&dir.display().to_string()) && text.contains("not on a bpffs"),
        "cleanup of a pin root outside bpffs should fail naming it (ok={ok}):\n{text}"
    );
    assert!(
        kept,
        "cleanup removed a directory that is not on a bpffs:\n{text}"
    );

    let (ok, text) = cleanup(&fs.0);
    assert!(
        !ok && text.contains("the bpffs mount itself"),
        "cleanup of the bpffs mount should be refused (ok={ok}):\n{text}"
    );
    assert!(
        fs.0.join("other-program").exists(),
        "cleanup removed another program's pins:\n{text}"
    );

    // A pin root inside the bpffs is removed (the guard does not stop real work).
    let (ok, text) = cleanup(&fs.0.join("other-program"));
    assert!(ok && text.contains("removed pins"), "(ok={ok}):\n{text}");
    assert!(!fs.0.join("other-program").exists());
}

// ---------------------------------------------------------------------------------------------
// /healthz under a flood.

const HEALTHZ_PORT: u16 = 9473;

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &text[text.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

fn healthz_ok(ns: &Netns) -> bool {
    ns.exec(
        "curl",
        &[
            "-sf",
            "--max-time",
            "3",
            &format!("http://127.0.0.1:{HEALTHZ_PORT}/healthz"),
        ],
    )
    .is_ok()
}

/// Opens `n` idle connections to the health port from inside `ns` (nothing is sent on them).
fn idle_connections(ns: &Netns, n: usize) -> Vec<TcpStream> {
    let _in = ns.enter().unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], HEALTHZ_PORT).into();
    (0..n)
        .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connecting"))
        .collect()
}

/// 150 idle connections hold at most 64 of the agent's file descriptors and are closed by the
/// agent after the header timeout; with no file descriptors left (EMFILE) the accept loop
/// backs off instead of spinning; /healthz answers again afterwards. The agent's umask is 077
/// without any unit.
#[test]
fn healthz_survives_idle_connections_and_emfile() {
    require_root();
    let mut c = Cluster::new(1, CONFIG).expect("building the cluster");
    c.nodes[0].extra_args.extend([
        "--healthz-ip".into(),
        "127.0.0.1".into(),
        "--healthz-port".into(),
        HEALTHZ_PORT.to_string(),
    ]);
    c.start_agent(0).unwrap();
    c.wait_lease(0, Duration::from_secs(20)).unwrap();
    let ns = &c.nodes[0].node.ns;
    assert!(
        Cluster::wait_for(Duration::from_secs(10), || healthz_ok(ns)).is_some(),
        "/healthz never answered; log:\n{}",
        c.agent_log(0)
    );
    let pid = c.nodes[0].agent_pid.unwrap();
    assert_eq!(proc_status(pid, "Umask"), "0077", "the agent's own umask");

    // The cap.
    let base = fd_count(pid);
    let mut flood = idle_connections(ns, 150);
    std::thread::sleep(Duration::from_millis(500));
    let during = fd_count(pid);
    assert!(
        during <= base + overlay_agent::ops::http::MAX_CONNECTIONS + 4,
        "150 idle connections took {} file descriptors of the agent (cap {})",
        during.saturating_sub(base),
        overlay_agent::ops::http::MAX_CONNECTIONS
    );
    // The header timeout: an accepted connection that sends nothing is closed by the agent.
    let first = &mut flood[0];
    first
        .set_read_timeout(Some(slow(
            overlay_agent::ops::http::HEADER_TIMEOUT + Duration::from_secs(5),
        )))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let closed = matches!(first.read(&mut buf), Ok(0));
    assert!(
        closed,
        "an idle connection was not closed by the agent within {:?} (waited {:?})",
        slow(overlay_agent::ops::http::HEADER_TIMEOUT + Duration::from_secs(5)),
        start.elapsed()
    );
    drop(flood);
    assert!(
        Cluster::wait_for(Duration::from_secs(10), || healthz_ok(ns)).is_some(),
        "/healthz did not answer after the flood"
    );

    // EMFILE: leave the agent 4 spare file descriptors, then connect 40 times.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    // The soft limit only (raising a hard limit back needs CAP_SYS_RESOURCE).
    let (soft, hard) = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| {
            let v: Vec<&str> = l.split_whitespace().skip(3).take(2).collect();
            (v[0].to_string(), v[1].to_string())
        })
        .unwrap();
    let tight = fd_count(pid) + 4;
    let prlimit = |v: &str| {
        let st = Command::new("prlimit")
            .args(["--pid", &pid.to_string(), &format!("--nofile={v}")])
            .status()
            .unwrap();
        assert!(st.success(), "prlimit --nofile={v}");
    };
    prlimit(&format!("{tight}:{hard}"));
    let flood = idle_connections(ns, 40);
    std::thread::sleep(Duration::from_millis(300));
    let cpu0 = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(3));
    let spent = cpu_seconds(pid) - cpu0;
    let log = c.agent_log(0);
    prlimit(&format!("{soft}:{hard}"));
    drop(flood);
    assert!(
        log.contains("accepting a /healthz or /metrics connection"),
        "the agent never hit an accept error with {tight} file descriptors; log:\n{log}"
    );
    assert!(
        spent < 0.5,
        "the agent used {spent:.2} s of CPU in 3 s while accept failed (EMFILE): a busy loop"
    );
    assert!(
        Cluster::wait_for(Duration::from_secs(10), || healthz_ok(ns)).is_some(),
        "/healthz did not answer after EMFILE ended"
    );
}
