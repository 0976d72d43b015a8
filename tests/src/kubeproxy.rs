//! kube-proxy's rules, written into a node namespace the way kube-proxy writes them, for tests of
//! Kubernetes Services across nodes (kube-proxy itself is not packaged in Debian).
//!
//! - **iptables mode** ([`iptables_mode`]): kube-proxy's jump rules (`iptables -I`, its
//!   `EnsureRule(Prepend)`), then one `iptables-restore --noflush --counters` of its filter and
//!   nat chains: `KUBE-SERVICES` → `KUBE-SVC-<hash>` (`KUBE-MARK-MASQ` for sources outside the
//!   cluster CIDR) → `KUBE-SEP-<hash>` (DNAT), `KUBE-NODEPORTS` → `KUBE-EXT-<hash>`,
//!   `KUBE-POSTROUTING` (MASQUERADE of marked packets, the mark cleared with `--xor-mark`), and
//!   the filter table's `KUBE-FORWARD` with its `--ctstate INVALID -j DROP`. Chain names are
//!   kube-proxy's own hashes (`portProtoHash`: SHA-256, base32, 16 characters), so a rule here
//!   reads like one on a real node. The rule text follows kube-proxy 1.3x's
//!   `pkg/proxy/iptables/proxier.go` and the rule sets in its tests (`cleanup_test.go`).
//! - **IPVS mode** ([`ipvs_mode`]): the sysctls kube-proxy's IPVS proxier sets
//!   (`net.ipv4.vs.conntrack=1` and the others of `NewProxier`), the dummy `kube-ipvs0` holding
//!   every ClusterIP, one virtual service per ClusterIP:port with its real servers in
//!   masquerading (NAT) mode through Debian's `ipvsadm`, kube-proxy's ipsets (`ipset`) and the
//!   iptables rules of its `writeIptablesRules`. Needs a kernel with IPVS ([`ipvs_support`]).
//! - [`br_netfilter`]: `net.bridge.bridge-nf-call-iptables` (and `-ip6tables`) per namespace.
//!
//! Nothing here leaves the namespace it is written into; deleting the namespace removes it all.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    process::Stdio,
};

use anyhow::{bail, Context as _, Result};
use ipnet::IpNet;

use crate::netns::Netns;

/// kube-proxy's masquerade mark (`--masquerade-bit` 14, the default).
pub const MASQ_MARK: &str = "0x4000";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// As kube-proxy writes it in rules and hashes (`strings.ToLower(string(protocol))`).
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// ipvsadm's service flag.
    fn ipvsadm_flag(self) -> &'static str {
        match self {
            Proto::Tcp => "-t",
            Proto::Udp => "-u",
        }
    }
}

/// One port of one Service as kube-proxy sees it (type ClusterIP, or NodePort with
/// `externalTrafficPolicy: Cluster`), with its ready endpoints.
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    /// The port's name in the Service (`http`, `dns`); may be empty.
    pub port_name: String,
    pub proto: Proto,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Endpoint address and target port.
    pub endpoints: Vec<SocketAddr>,
}

impl ServicePort {
    /// `namespace/name:port` (kube-proxy's `ServicePortName.String()`).
    pub fn port_name_string(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }

    fn is_ipv6(&self) -> bool {
        self.cluster_ip.is_ipv6()
    }
}

/// The first 16 characters of base32(SHA-256(`input`)): kube-proxy's chain-name hash. SHA-256
/// comes from `openssl dgst` (no hashing crate in this workspace), the base32 from coreutils.
pub fn chain_hash(input: &str) -> Result<String> {
    let out = std::process::Command::new("sh")
        .args([
            "-c",
            "printf '%s' \"$1\" | openssl dgst -sha256 -binary | base32 -w0",
            "sh",
            input,
        ])
        .output()
        .context("running openssl dgst | base32")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.len() < 16 {
        bail!(
            "hashing {input:?}: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text[..16].to_string())
}

/// `KUBE-SVC-<hash>` of a service port (`servicePortChainName`).
pub fn svc_chain(s: &ServicePort) -> Result<String> {
    Ok(format!(
        "KUBE-SVC-{}",
        chain_hash(&format!("{}{}", s.port_name_string(), s.proto.name()))?
    ))
}

/// `KUBE-EXT-<hash>` of a service port (`serviceExternalChainName`).
pub fn ext_chain(s: &ServicePort) -> Result<String> {
    Ok(format!(
        "KUBE-EXT-{}",
        chain_hash(&format!("{}{}", s.port_name_string(), s.proto.name()))?
    ))
}

/// `KUBE-SEP-<hash>` of one endpoint (`servicePortEndpointChainName`; the endpoint as
/// `net.JoinHostPort` writes it).
pub fn sep_chain(s: &ServicePort, ep: SocketAddr) -> Result<String> {
    Ok(format!(
        "KUBE-SEP-{}",
        chain_hash(&format!("{}{}{}", s.port_name_string(), s.proto.name(), ep))?
    ))
}

/// One of kube-proxy's jumps from a built-in chain into its own (`iptablesJumpChains`).
struct Jump {
    table: &'static str,
    to: &'static str,
    from: &'static str,
    comment: &'static str,
    new_only: bool,
}

const fn jump(
    table: &'static str,
    to: &'static str,
    from: &'static str,
    comment: &'static str,
    new_only: bool,
) -> Jump {
    Jump {
        table,
        to,
        from,
        comment,
        new_only,
    }
}

/// iptables mode's jumps, in kube-proxy's order (each is prepended, so the last lands first).
const IPTABLES_JUMPS: &[Jump] = &[
    jump(
        "filter",
        "KUBE-EXTERNAL-SERVICES",
        "INPUT",
        "kubernetes externally-visible service portals",
        true,
    ),
    jump(
        "filter",
        "KUBE-EXTERNAL-SERVICES",
        "FORWARD",
        "kubernetes externally-visible service portals",
        true,
    ),
    jump(
        "filter",
        "KUBE-NODEPORTS",
        "INPUT",
        "kubernetes health check service ports",
        false,
    ),
    jump(
        "filter",
        "KUBE-SERVICES",
        "FORWARD",
        "kubernetes service portals",
        true,
    ),
    jump(
        "filter",
        "KUBE-SERVICES",
        "OUTPUT",
        "kubernetes service portals",
        true,
    ),
    jump(
        "filter",
        "KUBE-FORWARD",
        "FORWARD",
        "kubernetes forwarding rules",
        false,
    ),
    jump(
        "filter",
        "KUBE-PROXY-FIREWALL",
        "INPUT",
        "kubernetes load balancer firewall",
        true,
    ),
    jump(
        "filter",
        "KUBE-PROXY-FIREWALL",
        "OUTPUT",
        "kubernetes load balancer firewall",
        true,
    ),
    jump(
        "filter",
        "KUBE-PROXY-FIREWALL",
        "FORWARD",
        "kubernetes load balancer firewall",
        true,
    ),
    jump(
        "nat",
        "KUBE-SERVICES",
        "OUTPUT",
        "kubernetes service portals",
        false,
    ),
    jump(
        "nat",
        "KUBE-SERVICES",
        "PREROUTING",
        "kubernetes service portals",
        false,
    ),
    jump(
        "nat",
        "KUBE-POSTROUTING",
        "POSTROUTING",
        "kubernetes postrouting rules",
        false,
    ),
];

/// IPVS mode's jumps (the IPVS proxier's `iptablesJumpChain`), in its order.
const IPVS_JUMPS: &[Jump] = &[
    jump(
        "nat",
        "KUBE-SERVICES",
        "OUTPUT",
        "kubernetes service portals",
        false,
    ),
    jump(
        "nat",
        "KUBE-SERVICES",
        "PREROUTING",
        "kubernetes service portals",
        false,
    ),
    jump(
        "nat",
        "KUBE-POSTROUTING",
        "POSTROUTING",
        "kubernetes postrouting rules",
        false,
    ),
    jump(
        "filter",
        "KUBE-FORWARD",
        "FORWARD",
        "kubernetes forwarding rules",
        false,
    ),
    jump(
        "filter",
        "KUBE-NODE-PORT",
        "INPUT",
        "kubernetes health check rules",
        false,
    ),
    jump(
        "filter",
        "KUBE-PROXY-FIREWALL",
        "INPUT",
        "kube-proxy firewall rules",
        false,
    ),
    jump(
        "filter",
        "KUBE-PROXY-FIREWALL",
        "FORWARD",
        "kube-proxy firewall rules",
        false,
    ),
    jump(
        "filter",
        "KUBE-IPVS-FILTER",
        "INPUT",
        "kubernetes ipvs access filter",
        false,
    ),
    jump(
        "filter",
        "KUBE-IPVS-OUT-FILTER",
        "OUTPUT",
        "kubernetes ipvs access filter",
        false,
    ),
];

/// The `iptables-restore --noflush` input kube-proxy's iptables mode writes for `services`
/// (one family: every service of `cluster_cidr`'s), cluster CIDR `cluster_cidr` (its
/// `LocalTrafficDetector` by cluster CIDR).
pub fn iptables_rules(cluster_cidr: IpNet, services: &[ServicePort]) -> Result<String> {
    let mut nat_chains = vec![
        "KUBE-SERVICES".to_string(),
        "KUBE-NODEPORTS".into(),
        "KUBE-POSTROUTING".into(),
        "KUBE-MARK-MASQ".into(),
    ];
    let mut services_rules = Vec::new();
    let mut nodeports_rules = Vec::new();
    let mut chain_rules = Vec::new();
    for s in services {
        if s.cluster_ip.is_ipv6() != cluster_cidr.addr().is_ipv6() {
            bail!("{} is not of {cluster_cidr}'s family", s.cluster_ip);
        }
        let name = s.port_name_string();
        let p = s.proto.name();
        let svc = svc_chain(s)?;
        let ip = s.cluster_ip;
        nat_chains.push(svc.clone());
        services_rules.push(format!(
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {p} -p {p} -d {ip} --dport {} -j {svc}",
            s.port
        ));
        if let Some(np) = s.node_port {
            let ext = ext_chain(s)?;
            nat_chains.push(ext.clone());
            nodeports_rules.push(format!(
                "-A KUBE-NODEPORTS -m comment --comment {name} -m {p} -p {p} --dport {np} -j {ext}"
            ));
            chain_rules.push(format!(
                "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
            ));
            chain_rules.push(format!("-A {ext} -j {svc}"));
        }
        chain_rules.push(format!(
            "-A {svc} -m comment --comment \"{name} cluster IP\" -m {p} -p {p} -d {ip} --dport {} ! -s {cluster_cidr} -j KUBE-MARK-MASQ",
            s.port
        ));
        let n = s.endpoints.len();
        for (i, ep) in s.endpoints.iter().enumerate() {
            let sep = sep_chain(s, *ep)?;
            nat_chains.push(sep.clone());
            // Endpoint i of n is chosen with probability 1/(n-i); the last one always.
            let statistic = if i + 1 < n {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            };
            chain_rules.push(format!(
                "-A {svc} -m comment --comment \"{name} -> {ep}\"{statistic} -j {sep}"
            ));
            chain_rules.push(format!(
                "-A {sep} -m comment --comment {name} -s {} -j KUBE-MARK-MASQ",
                ep.ip()
            ));
            chain_rules.push(format!(
                "-A {sep} -m comment --comment {name} -m {p} -p {p} -j DNAT --to-destination {ep}"
            ));
        }
    }
    services_rules.push(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
            .to_string(),
    );

    let mut t = String::new();
    t.push_str("*filter\n");
    for c in [
        "KUBE-NODEPORTS",
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
    ] {
        t.push_str(&format!(":{c} - [0:0]\n"));
    }
    t.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    t.push_str(&format!(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT\n"
    ));
    t.push_str(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
    );
    t.push_str("COMMIT\n*nat\n");
    for c in &nat_chains {
        t.push_str(&format!(":{c} - [0:0]\n"));
    }
    t.push_str(&postrouting_and_mark_rules());
    for r in services_rules.iter().chain(&nodeports_rules).chain(&chain_rules) {
        t.push_str(r);
        t.push('\n');
    }
    t.push_str("COMMIT\n");
    Ok(t)
}

/// `KUBE-POSTROUTING` and `KUBE-MARK-MASQ`, the same in both modes.
fn postrouting_and_mark_rules() -> String {
    format!(
        "-A KUBE-POSTROUTING -m mark ! --mark {m}/{m} -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark {m}\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark {m}\n",
        m = MASQ_MARK
    )
}

/// `iptables` or `ip6tables` (`-restore` appended by the caller where needed).
fn iptables_cmd(v6: bool) -> &'static str {
    if v6 {
        "ip6tables"
    } else {
        "iptables"
    }
}

/// kube-proxy's `EnsureChain` + `EnsureRule(Prepend)` for each jump.
fn write_jumps(ns: &Netns, v6: bool, jumps: &[Jump]) -> Result<()> {
    let ipt = iptables_cmd(v6);
    for j in jumps {
        // -N fails when the chain exists (a second call): that is what EnsureChain tolerates.
        let _ = ns.exec(ipt, &["-w", "-t", j.table, "-N", j.to]);
        let mut args = vec!["-w", "-t", j.table, "-I", j.from];
        if j.new_only {
            args.extend(["-m", "conntrack", "--ctstate", "NEW"]);
        }
        args.extend(["-m", "comment", "--comment", j.comment, "-j", j.to]);
        ns.exec(ipt, &args)
            .with_context(|| format!("{ipt} {} in {}", args.join(" "), ns.name))?;
    }
    Ok(())
}

/// Feeds `text` to `iptables-restore --noflush --counters` (or ip6tables-restore) in `ns`, as
/// kube-proxy's `RestoreAll(NoFlushTables, RestoreCounters)` does.
pub fn restore(ns: &Netns, v6: bool, text: &str) -> Result<()> {
    let cmd = format!("{}-restore", iptables_cmd(v6));
    let mut child = ns
        .command(&cmd)
        .args(["-w", "--noflush", "--counters"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd}"))?;
    child
        .stdin
        .take()
        .context("restore stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let numbered: String = text
            .lines()
            .enumerate()
            .map(|(i, l)| format!("{:3} {l}\n", i + 1))
            .collect();
        bail!(
            "{cmd} --noflush in {} failed ({}): {}\ninput:\n{numbered}",
            ns.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Writes kube-proxy's iptables-mode rules for `services` into `ns` (a node): its sysctls
/// (`route_localnet` for localhost NodePorts, its conntrack timeouts), its jumps, then its
/// chains in one `iptables-restore --noflush`.
pub fn iptables_mode(ns: &Netns, cluster_cidr: IpNet, services: &[ServicePort]) -> Result<()> {
    let v6 = cluster_cidr.addr().is_ipv6();
    if !v6 {
        ns.sysctl("net.ipv4.conf.all.route_localnet=1")?;
    }
    ns.sysctl("net.netfilter.nf_conntrack_tcp_timeout_established=86400")?;
    ns.sysctl("net.netfilter.nf_conntrack_tcp_timeout_close_wait=3600")?;
    write_jumps(ns, v6, IPTABLES_JUMPS)?;
    restore(ns, v6, &iptables_rules(cluster_cidr, services)?)
}

/// Whether IPVS can be used here: `Ok(true)` once `net.ipv4.vs` exists (after `modprobe ip_vs`
/// where it is a module), `Ok(false)` when the running kernel says it was built without it
/// (`# CONFIG_IP_VS is not set` in /proc/config.gz or /boot/config-VERSION), an error when it
/// should be there and is not.
pub fn ipvs_support() -> Result<bool> {
    let present = || std::path::Path::new("/proc/sys/net/ipv4/vs").exists();
    if present() {
        return Ok(true);
    }
    let modprobe = std::process::Command::new("modprobe").arg("ip_vs").output();
    if present() {
        return Ok(true);
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let config = std::process::Command::new("sh")
        .args([
            "-c",
            "zcat /proc/config.gz 2>/dev/null || cat /boot/config-\"$1\" 2>/dev/null",
            "sh",
            release.trim(),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if config.lines().any(|l| l == "# CONFIG_IP_VS is not set") {
        return Ok(false);
    }
    bail!(
        "no IPVS (/proc/sys/net/ipv4/vs) on kernel {}, which is not known to lack it; modprobe ip_vs: {}",
        release.trim(),
        match modprobe {
            Ok(o) => format!("{} {}", o.status, String::from_utf8_lossy(&o.stderr).trim()),
            Err(e) => e.to_string(),
        }
    )
}

/// kube-proxy's IPVS-mode ipsets (`ipsetInfo`): (name, type, comment) for IPv4.
const IPVS_SETS: &[(&str, &str, &str)] = &[
    (
        "KUBE-LOOP-BACK",
        "hash:ip,port,ip",
        "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose",
    ),
    (
        "KUBE-CLUSTER-IP",
        "hash:ip,port",
        "Kubernetes service cluster ip + port for masquerade purpose",
    ),
    (
        "KUBE-EXTERNAL-IP",
        "hash:ip,port",
        "Kubernetes service external ip + port for masquerade and filter purpose",
    ),
    (
        "KUBE-EXTERNAL-IP-LOCAL",
        "hash:ip,port",
        "Kubernetes service external ip + port with externalTrafficPolicy=local",
    ),
    (
        "KUBE-LOAD-BALANCER",
        "hash:ip,port",
        "Kubernetes service lb portal",
    ),
    (
        "KUBE-LOAD-BALANCER-FW",
        "hash:ip,port",
        "Kubernetes service load balancer ip + port for load balancer with sourceRange",
    ),
    (
        "KUBE-LOAD-BALANCER-LOCAL",
        "hash:ip,port",
        "Kubernetes service load balancer ip + port with externalTrafficPolicy=local",
    ),
    (
        "KUBE-LOAD-BALANCER-SOURCE-IP",
        "hash:ip,port,ip",
        "Kubernetes service load balancer ip + port + source IP for packet filter purpose",
    ),
    (
        "KUBE-LOAD-BALANCER-SOURCE-CIDR",
        "hash:ip,port,net",
        "Kubernetes service load balancer ip + port + source cidr for packet filter purpose",
    ),
    (
        "KUBE-NODE-PORT-TCP",
        "bitmap:port",
        "Kubernetes nodeport TCP port for masquerade purpose",
    ),
    (
        "KUBE-NODE-PORT-LOCAL-TCP",
        "bitmap:port",
        "Kubernetes nodeport TCP port with externalTrafficPolicy=local",
    ),
    (
        "KUBE-NODE-PORT-UDP",
        "bitmap:port",
        "Kubernetes nodeport UDP port for masquerade purpose",
    ),
    (
        "KUBE-NODE-PORT-LOCAL-UDP",
        "bitmap:port",
        "Kubernetes nodeport UDP port with externalTrafficPolicy=local",
    ),
    (
        "KUBE-NODE-PORT-SCTP",
        "hash:ip,port",
        "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'",
    ),
    (
        "KUBE-NODE-PORT-LOCAL-SCTP",
        "hash:ip,port",
        "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'",
    ),
    (
        "KUBE-HEALTH-CHECK-NODE-PORT",
        "bitmap:port",
        "Kubernetes health check node port",
    ),
    ("KUBE-IPVS-IPS", "hash:ip", "Kubernetes IPVS addresses"),
];

fn ipvs_set_comment(name: &str) -> &'static str {
    IPVS_SETS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, _, c)| *c)
        .unwrap_or("")
}

/// The iptables-restore input of kube-proxy's IPVS mode (`writeIptablesRules`) for IPv4
/// ClusterIP services: `loopback` says whether `KUBE-LOOP-BACK` has entries (a node with a
/// local endpoint), which adds its MASQUERADE rule.
pub fn ipvs_iptables_rules(cluster_cidr: IpNet, loopback: bool) -> String {
    let mut t = String::from("*nat\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-POSTROUTING",
        "KUBE-NODE-PORT",
        "KUBE-LOAD-BALANCER",
        "KUBE-MARK-MASQ",
    ] {
        t.push_str(&format!(":{c} - [0:0]\n"));
    }
    t.push_str("-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN\n");
    if loopback {
        t.push_str(&format!(
            "-A KUBE-POSTROUTING -m comment --comment \"{}\" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE\n",
            ipvs_set_comment("KUBE-LOOP-BACK")
        ));
    }
    t.push_str(&format!(
        "-A KUBE-SERVICES -m comment --comment \"{}\" -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s {cluster_cidr} -j KUBE-MARK-MASQ\n",
        ipvs_set_comment("KUBE-CLUSTER-IP")
    ));
    t.push_str("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT\n");
    t.push_str("-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ\n");
    t.push_str("-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT\n");
    t.push_str(&postrouting_and_mark_rules());
    t.push_str("COMMIT\n*filter\n");
    for c in [
        "KUBE-FORWARD",
        "KUBE-NODE-PORT",
        "KUBE-PROXY-FIREWALL",
        "KUBE-SOURCE-RANGES-FIREWALL",
        "KUBE-IPVS-FILTER",
        "KUBE-IPVS-OUT-FILTER",
    ] {
        t.push_str(&format!(":{c} - [0:0]\n"));
    }
    t.push_str("-A KUBE-SOURCE-RANGES-FIREWALL -j DROP\n");
    t.push_str(&format!(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT\n"
    ));
    t.push_str(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
    );
    t.push_str(&format!(
        "-A KUBE-NODE-PORT -m comment --comment \"{}\" -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT\n",
        ipvs_set_comment("KUBE-HEALTH-CHECK-NODE-PORT")
    ));
    for (set, m) in [
        ("KUBE-LOAD-BALANCER", "dst,dst"),
        ("KUBE-CLUSTER-IP", "dst,dst"),
        ("KUBE-EXTERNAL-IP", "dst,dst"),
        ("KUBE-EXTERNAL-IP-LOCAL", "dst,dst"),
        ("KUBE-HEALTH-CHECK-NODE-PORT", "dst"),
    ] {
        t.push_str(&format!(
            "-A KUBE-IPVS-FILTER -m set --match-set {set} {m} -j RETURN\n"
        ));
    }
    t.push_str(
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT\n",
    );
    t.push_str("COMMIT\n");
    t
}

/// Writes kube-proxy's IPVS mode for the IPv4 ClusterIP `services` into `ns` (a node whose
/// local pods are `local_pods`, for `KUBE-LOOP-BACK`): its sysctls, `kube-ipvs0`, the virtual
/// services (`ipvsadm`, scheduler `rr`, real servers masqueraded), its ipsets and rules.
/// Call [`ipvs_support`] first.
pub fn ipvs_mode(
    ns: &Netns,
    cluster_cidr: IpNet,
    services: &[ServicePort],
    local_pods: &[IpAddr],
) -> Result<()> {
    if services.iter().any(|s| s.is_ipv6() || s.node_port.is_some()) {
        bail!("ipvs_mode writes IPv4 ClusterIP services only");
    }
    // NewProxier: conntrack for IPVS (so iptables' NAT and filters see its connections), the
    // expiry sysctls; conn_reuse_mode is left as it is on kernels since 5.9.
    for kv in [
        "net.ipv4.vs.conntrack=1",
        "net.ipv4.vs.expire_nodest_conn=1",
        "net.ipv4.vs.expire_quiescent_template=1",
        "net.ipv4.ip_forward=1",
    ] {
        ns.sysctl(kv)?;
    }
    // The scheduler's module, as kube-proxy's CanUseIPVSProxier loads it.
    let _ = std::process::Command::new("modprobe").arg("ip_vs_rr").output();
    // EnsureDummyDevice (left down, as kube-proxy leaves it) and one /32 per ClusterIP.
    ns.ip(&["link", "add", "kube-ipvs0", "type", "dummy"])?;
    let mut bound: Vec<IpAddr> = Vec::new();
    for s in services {
        if !bound.contains(&s.cluster_ip) {
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/32", s.cluster_ip),
                "dev",
                "kube-ipvs0",
            ])?;
            bound.push(s.cluster_ip);
        }
        let vip = format!("{}:{}", s.cluster_ip, s.port);
        let f = s.proto.ipvsadm_flag();
        ns.exec("ipvsadm", &["-A", f, &vip, "-s", "rr"])?;
        for ep in &s.endpoints {
            ns.exec(
                "ipvsadm",
                &["-a", f, &vip, "-r", &ep.to_string(), "-m", "-w", "1"],
            )?;
        }
    }
    // The ipsets, every one created as kube-proxy creates them, and their entries.
    for (name, kind, comment) in IPVS_SETS {
        let mut args = vec!["create", name, kind];
        if *kind == "bitmap:port" {
            args.extend(["range", "0-65535"]);
        } else {
            args.extend(["family", "inet", "hashsize", "1024", "maxelem", "65536"]);
        }
        ns.exec("ipset", &args)
            .with_context(|| format!("ipset create {name} ({comment})"))?;
    }
    let mut loopback = false;
    for s in services {
        let p = s.proto.name();
        ns.exec(
            "ipset",
            &[
                "add",
                "KUBE-CLUSTER-IP",
                &format!("{},{p}:{}", s.cluster_ip, s.port),
                "-exist",
            ],
        )?;
        ns.exec(
            "ipset",
            &["add", "KUBE-IPVS-IPS", &s.cluster_ip.to_string(), "-exist"],
        )?;
        for ep in s.endpoints.iter().filter(|ep| local_pods.contains(&ep.ip())) {
            ns.exec(
                "ipset",
                &[
                    "add",
                    "KUBE-LOOP-BACK",
                    &format!("{},{p}:{},{}", ep.ip(), ep.port(), ep.ip()),
                    "-exist",
                ],
            )?;
            loopback = true;
        }
    }
    write_jumps(ns, false, IPVS_JUMPS)?;
    restore(ns, false, &ipvs_iptables_rules(cluster_cidr, loopback))
}

/// `ipvsadm -Ln --stats` in `ns`, for failure messages.
pub fn ipvs_state(ns: &Netns) -> String {
    ns.exec("ipvsadm", &["-Ln", "--stats"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("(ipvsadm: {e:#})"))
}

/// Turns br_netfilter's `bridge-nf-call-iptables` and `-ip6tables` on or off in `ns`. The module
/// is loaded first where it is one and not loaded yet (`modprobe br_netfilter`, as kube-proxy and
/// Docker do; global), but its sysctls are per namespace and a new namespace starts with them on:
/// "off" is set explicitly.
pub fn br_netfilter(ns: &Netns, on: bool) -> Result<()> {
    let sysctl = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    let exists = |ns: &Netns| ns.exec("test", &["-e", sysctl]).is_ok();
    if !exists(ns) {
        let out = std::process::Command::new("modprobe")
            .arg("br_netfilter")
            .output();
        if !exists(ns) {
            bail!(
                "no {sysctl} in {} after modprobe br_netfilter ({})",
                ns.name,
                match out {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    Err(e) => e.to_string(),
                }
            );
        }
    }
    let v = u8::from(on);
    ns.sysctl(&format!("net.bridge.bridge-nf-call-iptables={v}"))?;
    ns.sysctl(&format!("net.bridge.bridge-nf-call-ip6tables={v}"))
}

/// `conntrack -L` (both families) in `ns`, only the lines that mention one of `addrs` (all lines
/// when `addrs` is empty): for failure messages.
pub fn conntrack_entries(ns: &Netns, addrs: &[IpAddr]) -> String {
    let mut text = String::new();
    for family in ["ipv4", "ipv6"] {
        match ns.command("conntrack").args(["-L", "-f", family]).output() {
            Ok(o) => {
                for line in String::from_utf8_lossy(&o.stdout).lines() {
                    if addrs.is_empty() || addrs.iter().any(|a| line.contains(&format!("={a} "))) {
                        text.push_str(line);
                        text.push('\n');
                    }
                }
            }
            Err(e) => text.push_str(&format!("(conntrack -L: {e})\n")),
        }
    }
    if text.is_empty() {
        text.push_str("(no entries)\n");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, port_name: &str, ip: &str, ep: &str) -> ServicePort {
        ServicePort {
            namespace: ns.into(),
            name: name.into(),
            port_name: port_name.into(),
            proto: Proto::Tcp,
            cluster_ip: ip.parse().unwrap(),
            port: 80,
            node_port: None,
            endpoints: vec![ep.parse().unwrap()],
        }
    }

    /// The chain names and rule lines of kube-proxy's own test data (`cleanup_test.go`: service
    /// ns1/svc1 port p80, ClusterIP 172.30.0.41, endpoint 10.180.0.1:80, cluster CIDR
    /// 10.0.0.0/8; ns2/svc2 for the endpoint hash), so a change here that kube-proxy would not
    /// make shows.
    #[test]
    fn rules_match_kube_proxys_own_test_data() {
        let s1 = svc("ns1", "svc1", "p80", "172.30.0.41", "10.180.0.1:80");
        assert_eq!(svc_chain(&s1).unwrap(), "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(
            sep_chain(&s1, s1.endpoints[0]).unwrap(),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        let s2 = svc("ns2", "svc2", "p80", "172.30.0.42", "10.180.0.2:80");
        assert_eq!(svc_chain(&s2).unwrap(), "KUBE-SVC-GNZBNJ2PO5MGZ6GT");
        assert_eq!(
            sep_chain(&s2, s2.endpoints[0]).unwrap(),
            "KUBE-SEP-RS4RBKLTHTF2IUXJ"
        );
        let text = iptables_rules("10.0.0.0/8".parse().unwrap(), &[s1]).unwrap();
        for want in [
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O",
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -j KUBE-SEP-SXIVWICOYRO3J4NJ",
            "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ",
            "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80",
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
            "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
            "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT",
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want:?} in:\n{text}");
        }
        // The nodeports jump is the last rule of KUBE-SERVICES.
        let last = text
            .lines()
            .rfind(|l| l.starts_with("-A KUBE-SERVICES "))
            .unwrap();
        assert!(
            last.ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"),
            "{last}"
        );
    }
}
