//! `--iptables-forward-rules` (on by default, as in flanneld): ACCEPT rules for the cluster
//! network in the FORWARD chain, so a host whose FORWARD policy is DROP (Docker sets it when it
//! turns forwarding on; ufw and firewalld default to it) still forwards overlay traffic that goes
//! through the stack: decapsulated packets for a pod the datapath does not deliver itself
//! (`--deliver stack`, a pod not learned yet) and bridged pod traffic under `br_netfilter`.
//!
//! The rules are flanneld's, byte for byte, so a node moving from flanneld finds its own rules and
//! adds no second copy: a `FLANNEL-FWD` chain accepting `-s NETWORK` and `-d NETWORK`, jumped to
//! from the end of FORWARD (the operator's own rules before it still decide first). They are
//! written with `iptables-restore --noflush` in one transaction and checked every
//! `--iptables-resync` seconds, so a flush by someone else is undone.
//!
//! flanneld writes the same rules for the IPv6 Network with ip6tables; so does this module,
//! written once for both families ([`IpFamily`], [`NfFamily`](super::netfilter::NfFamily)): a network's family picks the tools
//! (`iptables*` or `ip6tables*`), nothing else differs.
//!
//! An ACCEPT only helps in the same netfilter backend as the DROP it has to beat: with both
//! iptables-nft and iptables-legacy in use on a host, a packet must pass both. The rules go to the
//! backend the family's command (`iptables`, `ip6tables`) uses and also to the other one when it
//! has a filter table of that family.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use ipnet::IpNet;

use super::netfilter::{IpFamily, NfFamily as _};

/// flanneld's chain.
pub const CHAIN: &str = "FLANNEL-FWD";
/// flanneld's comment on every rule (`-m comment --comment`).
const COMMENT: &str = "flanneld forward";

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(
        "running {cmd} (is the iptables package installed? it has ip6tables too; or run with \
         --iptables-forward-rules=false): {err}"
    )]
    Spawn { cmd: &'static str, err: std::io::Error },
    #[error(
        "{cmd} failed ({status}): {stderr}; the kernel needs the family's filter table \
         (nf_tables or ip_tables/ip6_tables), else run with --iptables-forward-rules=false"
    )]
    Failed {
        cmd: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// A netfilter backend of the iptables tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    fn iptables(self, fam: IpFamily) -> &'static str {
        match (fam, self) {
            (IpFamily::V4, Backend::Nft) => "iptables-nft",
            (IpFamily::V4, Backend::Legacy) => "iptables-legacy",
            (IpFamily::V6, Backend::Nft) => "ip6tables-nft",
            (IpFamily::V6, Backend::Legacy) => "ip6tables-legacy",
        }
    }

    fn restore(self, fam: IpFamily) -> &'static str {
        match (fam, self) {
            (IpFamily::V4, Backend::Nft) => "iptables-nft-restore",
            (IpFamily::V4, Backend::Legacy) => "iptables-legacy-restore",
            (IpFamily::V6, Backend::Nft) => "ip6tables-nft-restore",
            (IpFamily::V6, Backend::Legacy) => "ip6tables-legacy-restore",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Backend::Nft => "nf_tables",
            Backend::Legacy => "legacy",
        }
    }

    /// This backend already has a filter table of family `fam` in the current network namespace
    /// (looked up without creating one).
    fn has_filter_table(self, fam: IpFamily) -> bool {
        match self {
            Backend::Legacy => std::fs::read_to_string(fam.legacy_tables())
                .map(|t| t.lines().any(|l| l == "filter"))
                .unwrap_or(false),
            Backend::Nft => Command::new("nft")
                .args(["list", "table", fam.nft(), "filter"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false),
        }
    }
}

/// The backends whose FORWARD chain of family `fam` counts here: the one `iptables` (or
/// `ip6tables`) runs, from its `--version`, and the other one when it has a filter table too.
pub fn backends(fam: IpFamily) -> Result<Vec<Backend>, ForwardError> {
    let cmd = fam.iptables();
    let out = run(cmd, &["--version"])?;
    let default = if out.contains("legacy") {
        Backend::Legacy
    } else {
        Backend::Nft
    };
    let other = match default {
        Backend::Nft => Backend::Legacy,
        Backend::Legacy => Backend::Nft,
    };
    let mut v = vec![default];
    if other.has_filter_table(fam) {
        v.push(other);
    }
    Ok(v)
}

/// The jump from FORWARD, as `iptables -S` prints it.
fn jump_rule() -> String {
    format!("-A FORWARD -m comment --comment \"{COMMENT}\" -j {CHAIN}")
}

/// The chain's rules, as `iptables -S CHAIN` (`ip6tables -S CHAIN`) prints them (after its `-N`
/// line).
fn chain_rules(network: IpNet) -> [String; 2] {
    [
        format!("-A {CHAIN} -s {network} -m comment --comment \"{COMMENT}\" -j ACCEPT"),
        format!("-A {CHAIN} -d {network} -m comment --comment \"{COMMENT}\" -j ACCEPT"),
    ]
}

/// True when `forward` (`iptables -S FORWARD`, `ip6tables` for an IPv6 network) jumps to the
/// chain exactly once and `chain` (`-S FLANNEL-FWD`, `None` if it does not exist) holds exactly
/// our rules for `network`.
pub fn in_place(forward: &str, chain: Option<&str>, network: IpNet) -> bool {
    let jump = jump_rule();
    let jumps = forward.lines().filter(|l| l.trim() == jump).count();
    let Some(chain) = chain else { return false };
    let rules: Vec<&str> = chain
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("-A "))
        .collect();
    jumps == 1 && rules == chain_rules(network)
}

/// The `iptables-restore --noflush` transaction that (re)writes the rules: declaring the chain
/// creates or empties it, every existing copy of the jump is deleted and one appended.
pub fn render(network: IpNet, existing_jumps: usize) -> String {
    let jump = jump_rule();
    let mut s = format!("*filter\n:{CHAIN} - [0:0]\n");
    for _ in 0..existing_jumps {
        s.push_str(&jump.replacen("-A ", "-D ", 1));
        s.push('\n');
    }
    s.push_str(&jump);
    s.push('\n');
    for r in chain_rules(network) {
        s.push_str(&r);
        s.push('\n');
    }
    s.push_str("COMMIT\n");
    s
}

/// The transaction that removes the jump(s) and the chain.
pub fn render_remove(existing_jumps: usize) -> String {
    let mut s = String::from("*filter\n");
    for _ in 0..existing_jumps {
        s.push_str(&jump_rule().replacen("-A ", "-D ", 1));
        s.push('\n');
    }
    s.push_str(&format!("-F {CHAIN}\n-X {CHAIN}\nCOMMIT\n"));
    s
}

/// What [`ensure`] did on one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    AlreadyThere,
    Written,
}

/// Makes the rules for `network` present on `backend` (in the tables of `network`'s family),
/// rewriting them only when something is missing, duplicated or for another network.
pub fn ensure(backend: Backend, network: IpNet) -> Result<Ensured, ForwardError> {
    let fam = IpFamily::of(&network);
    let (forward, chain) = read(fam, backend)?;
    if in_place(&forward, chain.as_deref(), network) {
        return Ok(Ensured::AlreadyThere);
    }
    restore(fam, backend, &render(network, count_jumps(&forward)))?;
    Ok(Ensured::Written)
}

/// Removes the rules of family `fam` from `backend`; `Ok(false)` when there were none.
pub fn remove(fam: IpFamily, backend: Backend) -> Result<bool, ForwardError> {
    let (forward, chain) = read(fam, backend)?;
    if chain.is_none() {
        return Ok(false);
    }
    restore(fam, backend, &render_remove(count_jumps(&forward)))?;
    Ok(true)
}

/// Removes the rules of both families from every backend that has a filter table of the family
/// (none is created to look).
pub fn remove_everywhere() -> Vec<(IpFamily, Backend, Result<bool, ForwardError>)> {
    IpFamily::ALL
        .into_iter()
        .flat_map(|fam| [(fam, Backend::Nft), (fam, Backend::Legacy)])
        .filter(|(fam, b)| b.has_filter_table(*fam))
        .map(|(fam, b)| (fam, b, remove(fam, b)))
        .collect()
}

fn count_jumps(forward: &str) -> usize {
    let jump = jump_rule();
    forward.lines().filter(|l| l.trim() == jump).count()
}

/// `-S FORWARD` and `-S FLANNEL-FWD` (`None`: no such chain).
fn read(fam: IpFamily, backend: Backend) -> Result<(String, Option<String>), ForwardError> {
    let cmd = backend.iptables(fam);
    let forward = run(cmd, &["-w", "5", "-t", "filter", "-S", "FORWARD"])?;
    let chain = run(cmd, &["-w", "5", "-t", "filter", "-S", CHAIN]).ok();
    Ok((forward, chain))
}

fn run(cmd: &'static str, args: &[&str]) -> Result<String, ForwardError> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| ForwardError::Spawn { cmd, err })?;
    stdout_of(cmd, out)
}

/// The output of a finished command, or its failure with its stderr.
fn stdout_of(cmd: &'static str, out: std::process::Output) -> Result<String, ForwardError> {
    if !out.status.success() {
        return Err(ForwardError::Failed {
            cmd,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn restore(fam: IpFamily, backend: Backend, script: &str) -> Result<(), ForwardError> {
    let cmd = backend.restore(fam);
    let mut child = Command::new(cmd)
        .args(["--noflush", "-w", "5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| ForwardError::Spawn { cmd, err })?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .map_err(|err| ForwardError::Spawn { cmd, err })?;
    let out = child
        .wait_with_output()
        .map_err(|err| ForwardError::Spawn { cmd, err })?;
    stdout_of(cmd, out).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET: &str = "10.244.0.0/16";

    fn net() -> IpNet {
        NET.parse().unwrap()
    }

    const NET6: &str = "fd00:10:244::/56";

    fn net6() -> IpNet {
        NET6.parse().unwrap()
    }

    #[test]
    fn rules_are_flanneld_s() {
        assert_eq!(
            render(net(), 0),
            "*filter\n\
             :FLANNEL-FWD - [0:0]\n\
             -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             -A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             -A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             COMMIT\n"
        );
        // Duplicated jumps are all deleted before the one is appended.
        let two = render(net(), 2);
        assert_eq!(two.matches("-D FORWARD").count(), 2, "{two}");
        assert!(two.find("-D FORWARD").unwrap() < two.find("-A FORWARD").unwrap());
        assert_eq!(
            render_remove(1),
            "*filter\n\
             -D FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             -F FLANNEL-FWD\n-X FLANNEL-FWD\nCOMMIT\n"
        );
    }

    #[test]
    fn in_place_reads_iptables_s_output() {
        let forward = "-P FORWARD DROP\n\
                       -A FORWARD -j DOCKER-USER\n\
                       -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n";
        let chain = "-N FLANNEL-FWD\n\
                     -A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
                     -A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n";
        assert!(in_place(forward, Some(chain), net()));
        // No chain, a flushed chain, a chain for another network, no jump, two jumps.
        assert!(!in_place(forward, None, net()));
        assert!(!in_place(forward, Some("-N FLANNEL-FWD\n"), net()));
        assert!(!in_place(forward, Some(chain), "10.245.0.0/16".parse().unwrap()));
        assert!(!in_place("-P FORWARD DROP\n", Some(chain), net()));
        let twice = format!("{forward}-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n");
        assert!(!in_place(&twice, Some(chain), net()));
        assert_eq!(count_jumps(&twice), 2);
    }

    /// flanneld's `forwardRules(flannelIPv6Network)`, written with ip6tables: the same chain,
    /// comment and jump, `-s`/`-d` the IPv6 Network.
    #[test]
    fn ipv6_rules_are_flanneld_s() {
        assert_eq!(
            render(net6(), 0),
            "*filter\n\
             :FLANNEL-FWD - [0:0]\n\
             -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             -A FLANNEL-FWD -s fd00:10:244::/56 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             -A FLANNEL-FWD -d fd00:10:244::/56 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             COMMIT\n"
        );
        // The family picks the tools, and nothing else.
        let tools = |fam| [Backend::Nft, Backend::Legacy].map(|b| (b.iptables(fam), b.restore(fam)));
        assert_eq!(
            tools(IpFamily::of(&net6())),
            [
                ("ip6tables-nft", "ip6tables-nft-restore"),
                ("ip6tables-legacy", "ip6tables-legacy-restore")
            ]
        );
        assert_eq!(
            tools(IpFamily::of(&net())),
            [
                ("iptables-nft", "iptables-nft-restore"),
                ("iptables-legacy", "iptables-legacy-restore")
            ]
        );
        assert_eq!(IpFamily::V6.iptables(), "ip6tables");
        assert_eq!(IpFamily::V6.legacy_tables(), "/proc/net/ip6_tables_names");
        assert_eq!(IpFamily::V6.nft(), "ip6");
    }

    /// `ip6tables -S` as iptables-nft 1.8.9 prints it (addresses compressed as ipnet prints them).
    #[test]
    fn in_place_reads_ip6tables_s_output() {
        let forward = "-P FORWARD DROP\n\
                       -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n";
        let chain = "-N FLANNEL-FWD\n\
                     -A FLANNEL-FWD -s fd00:10:244::/56 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
                     -A FLANNEL-FWD -d fd00:10:244::/56 -m comment --comment \"flanneld forward\" -j ACCEPT\n";
        assert!(in_place(forward, Some(chain), net6()));
        assert!(!in_place(forward, None, net6()));
        assert!(!in_place(forward, Some("-N FLANNEL-FWD\n"), net6()));
        // Another IPv6 network, and the IPv4 network against the IPv6 chain.
        assert!(!in_place(
            forward,
            Some(chain),
            "fd00:10:245::/56".parse().unwrap()
        ));
        assert!(!in_place(forward, Some(chain), net()));
        // Only the -s rule left.
        let half = chain.lines().take(2).collect::<Vec<_>>().join("\n");
        assert!(!in_place(forward, Some(&half), net6()));
        assert!(!in_place("-P FORWARD DROP\n", Some(chain), net6()));
    }
}
