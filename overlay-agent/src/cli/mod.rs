//! flanneld-compatible command line: the same flag names and `FLANNELD_<FLAG>` environment
//! variables, for the flags that matter to an etcd-backed vxlan node, written either way
//! flanneld's users write them: `--flag=value` or Go's `-flag=value` / `-flag value` (see
//! [`go_style_argv`]).

use std::{
    ffi::OsString,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

mod argv;
pub mod cleanup;
pub mod docker_opts;
pub mod explain;
pub mod monitor;
pub mod status;
pub mod traffic;
pub mod watch;

use clap::{
    builder::{PossibleValuesParser, TypedValueParser},
    ArgAction, CommandFactory as _, Parser,
};

use crate::{
    control::{
        subnet::etcd::{EtcdOptions, EtcdTls},
        ControlOptions, RunOptions,
    },
    daemon,
    node::underlay::Selection,
    ops::OpsOptions,
    reconcile::decap::{DecapChoice, DeliverChoice},
};

pub const DEFAULT_ETCD_PREFIX: &str = "/coreos.com/network";
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
pub use argv::{flag_table, go_style_argv, FlagKind};
pub use overlay_common::DEFAULT_PIN_ROOT;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error("--etcd-keyfile and --etcd-certfile must be given together (client certificate and its key)")]
    KeyWithoutCert,
    #[error("--etcd-username and --etcd-password must be given together")]
    UserWithoutPassword,
    #[error("--etcd-endpoints: {0:?} must start with http:// or https://, e.g. http://127.0.0.1:2379")]
    BadEndpoint(String),
    #[error("--etcd-endpoints: {0:?} is https but no --etcd-cafile was given to verify the server")]
    HttpsWithoutCa(String),
    #[error("--etcd-endpoints is empty; give at least one, e.g. http://127.0.0.1:2379")]
    NoEndpoints,
    #[error("--etcd-prefix {0:?} must start with '/', e.g. /coreos.com/network")]
    BadPrefix(String),
    #[error("--subnet-lease-renew-margin {0} is out of range; it must be between 1 and 1439 minutes (the lease lasts 24 h)")]
    BadRenewMargin(u32),
    #[error("--kube-subnet-mgr is not supported: this agent keeps subnet leases in etcd only")]
    KubeSubnetMgr,
}

/// Flags of the agent (flanneld names; every one can be set as `FLANNELD_<FLAG>` too).
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// Comma-separated list of etcd endpoints.
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// etcd prefix under which the network config and subnet leases live.
    #[arg(long, env = "FLANNELD_ETCD_PREFIX", default_value = DEFAULT_ETCD_PREFIX)]
    pub etcd_prefix: String,
    /// TLS client key file for etcd.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<String>,
    /// TLS client certificate file for etcd.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<String>,
    /// CA file used to verify etcd's server certificate.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<String>,
    #[arg(long, env = "FLANNELD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
    /// How the underlay interface is chosen: `--iface`, `--iface-regex`, `--iface-can-reach`.
    #[command(flatten)]
    pub iface: IfaceArgs,
    /// IPv4 address other nodes use to reach this one (default: the interface's address).
    #[arg(long, env = "FLANNELD_PUBLIC_IP", value_parser = parse_ipv4)]
    pub public_ip: Option<Ipv4Addr>,
    /// IPv6 address other nodes use to reach this one when the network config enables IPv6
    /// (default: the interface's preferred IPv6 address, as flanneld picks it).
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6", value_parser = parse_ipv6)]
    pub public_ipv6: Option<Ipv6Addr>,
    /// Where the CNI plugin reads this node's subnet.
    #[arg(long, env = "FLANNELD_SUBNET_FILE", default_value = DEFAULT_SUBNET_FILE)]
    pub subnet_file: PathBuf,
    /// Renew the lease this many minutes before it expires.
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60)]
    pub subnet_lease_renew_margin: u32,
    /// Masquerade traffic leaving the overlay (recorded in subnet.env as FLANNEL_IPMASQ).
    #[arg(long, env = "FLANNELD_IP_MASQ", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", require_equals = true, action = ArgAction::Set,
          value_parser = parse_go_bool)]
    pub ip_masq: bool,
    /// Accept forwarded traffic to and from the cluster network in the FORWARD chain (flanneld's
    /// `FLANNEL-FWD` rules), so a FORWARD policy of DROP (Docker, ufw, firewalld) does not drop
    /// overlay traffic that goes through the stack.
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", num_args = 0..=1, default_value_t = true,
          default_missing_value = "true", require_equals = true, action = ArgAction::Set,
          value_parser = parse_go_bool)]
    pub iptables_forward_rules: bool,
    /// How often (seconds) the FORWARD rules are checked and put back if removed.
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub iptables_resync: u32,
    /// Address the health endpoint listens on.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: std::net::IpAddr,
    /// Port of the health endpoint (0 disables it).
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,
    /// Log verbosity (flanneld's -v): 0 info, 1 debug, 2+ trace.
    #[arg(short = 'v', long = "v", env = "FLANNELD_V", default_value_t = 0)]
    pub verbosity: u8,
    /// Rejected with a clear message (this agent does not use the Kubernetes API for leases).
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", require_equals = true, action = ArgAction::Set,
          value_parser = parse_go_bool, hide = true)]
    pub kube_subnet_mgr: bool,
    /// Pod bridge the agent attaches to.
    #[arg(long, env = "FLANNELD_BRIDGE", default_value = "cni0")]
    pub bridge: String,
    /// bpffs directory for pinned programs and maps.
    #[arg(long, env = "FLANNELD_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
    /// Where VXLAN is stripped on the underlay NIC: `xdp` (before GRO; the choice for a NIC
    /// with a native XDP driver), `tc` (keeps GSO super-packets whole; the choice for veth and
    /// other virtual devices), or `auto` (picks from the device's driver and logs why).
    #[arg(long, env = "FLANNELD_DECAP", default_value = "auto", value_parser = one_of(&DecapChoice::NAMES))]
    pub decap: DecapChoice,
    /// How decapsulated packets for a pod on this node reach it: `peer` (bpf_redirect_peer into
    /// the pod's namespace), `veth` (bpf_redirect through its host-side veth) or `stack` (the
    /// node's routing and the bridge, as flannel.1 does).
    #[arg(long, env = "FLANNELD_DELIVER", default_value = "peer", value_parser = one_of(&DeliverChoice::NAMES))]
    pub deliver: DeliverChoice,
    /// With TC decap: a collect-metadata VXLAN device on the VXLAN port (`overlay-gro`) whose
    /// only job is to register the kernel's UDP-tunnel GRO for it, so the NIC's GRO merges our
    /// frames before decap strips them (the kernel's `flannel.1` gets this from its own socket).
    /// Nothing is delivered through it: a TC program drops whatever reaches it
    /// (`drop_gro_device`). `--receive-gro=false` leaves it out.
    #[arg(long, env = "FLANNELD_RECEIVE_GRO", num_args = 0..=1, default_value_t = true,
          default_missing_value = "true", require_equals = true, action = ArgAction::Set,
          value_parser = parse_go_bool)]
    pub receive_gro: bool,
}

/// Which interface carries inter-host traffic, in flanneld's order of precedence: each `--iface`
/// in turn, then each `--iface-regex`, then `--iface-can-reach`; with none of them, the interface
/// of the default route. The first that yields an interface with an IPv4 address wins.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct IfaceArgs {
    /// Interface (name or IPv4 address) for inter-host traffic; may be repeated, first match wins.
    /// Default: the interface of the default route.
    #[arg(long, env = "FLANNELD_IFACE", value_delimiter = ',', action = ArgAction::Append)]
    pub iface: Vec<String>,
    /// Regular expression matched against every interface's IPv4 addresses, then (if no address
    /// matches) against interface names; the first match wins. May be repeated; tried in order
    /// after the --iface values.
    #[arg(long, env = "FLANNELD_IFACE_REGEX", action = ArgAction::Append, value_parser = parse_regex)]
    pub iface_regex: Vec<String>,
    /// Use the interface (and source address) of the route to this IPv4 address, as
    /// `ip route get ADDRESS` shows it; tried after --iface and --iface-regex.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH", value_parser = parse_ipv4)]
    pub iface_can_reach: Option<Ipv4Addr>,
}

impl IfaceArgs {
    pub fn selection(&self) -> Selection {
        Selection {
            iface: self.iface.clone(),
            iface_regex: self.iface_regex.clone(),
            iface_can_reach: self.iface_can_reach,
        }
    }
}

/// One of `table`'s names, parsed into its value (clap lists the names in `--help` and in its
/// errors).
fn one_of<T: Copy + Send + Sync + 'static>(
    table: &'static [(&'static str, T)],
) -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(table.iter().map(|(name, _)| *name)).map(|s| {
        table
            .iter()
            .find_map(|(name, v)| (*name == s).then_some(*v))
            .expect("a listed name")
    })
}

fn parse_ipv4(s: &str) -> Result<Ipv4Addr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 address, e.g. 192.0.2.10 (IPv6: --public-ipv6)"))
}

/// A unicast IPv6 address other nodes can send to (not IPv4-mapped: that is IPv4).
fn parse_ipv6(s: &str) -> Result<Ipv6Addr, String> {
    let ip: Ipv6Addr = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv6 address, e.g. 2001:db8::10"))?;
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.to_ipv4_mapped().is_some() {
        return Err(format!(
            "{s:?} is not a unicast IPv6 address other nodes can reach, e.g. 2001:db8::10"
        ));
    }
    Ok(ip)
}

/// A regular expression as flanneld (Go's RE2 syntax, unanchored) takes it; kept as text.
fn parse_regex(s: &str) -> Result<String, String> {
    regex::Regex::new(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("{s:?} is not a valid regular expression: {e}"))
}

/// A boolean as Go's `strconv.ParseBool` reads it (what flanneld accepts for `-ip-masq=…` and
/// `FLANNELD_IP_MASQ`).
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean; use true or false")),
    }
}

#[derive(Parser)]
#[command(name = "overlay-agent", args_override_self = true)]
struct Standalone {
    #[command(flatten)]
    args: AgentArgs,
}

impl AgentArgs {
    /// Parses flags (argv[0] first), flanneld's Go-style spellings included; for tests and
    /// embedding. [`AgentArgs::validate`] checks them.
    pub fn try_parse_from<I, T>(argv: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let argv = go_style_argv(argv, &flag_table(&Standalone::command()));
        Ok(Standalone::try_parse_from(argv)?.args)
    }

    /// Rejects contradictory or out-of-range combinations clap cannot see.
    pub fn validate(&self) -> Result<(), CliError> {
        if self.kube_subnet_mgr {
            return Err(CliError::KubeSubnetMgr);
        }
        if self.etcd_endpoints.iter().all(|e| e.trim().is_empty()) {
            return Err(CliError::NoEndpoints);
        }
        for e in self.endpoints() {
            if e.starts_with("https://") {
                if self.etcd_cafile.is_none() {
                    return Err(CliError::HttpsWithoutCa(e));
                }
            } else if !e.starts_with("http://") {
                return Err(CliError::BadEndpoint(e));
            }
        }
        if self.etcd_keyfile.is_some() != self.etcd_certfile.is_some() {
            return Err(CliError::KeyWithoutCert);
        }
        if self.etcd_username.is_some() != self.etcd_password.is_some() {
            return Err(CliError::UserWithoutPassword);
        }
        if !self.etcd_prefix.starts_with('/') {
            return Err(CliError::BadPrefix(self.etcd_prefix.clone()));
        }
        if !(1..24 * 60).contains(&self.subnet_lease_renew_margin) {
            return Err(CliError::BadRenewMargin(self.subnet_lease_renew_margin));
        }
        Ok(())
    }

    fn endpoints(&self) -> Vec<String> {
        self.etcd_endpoints
            .iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect()
    }

    pub fn renew_margin(&self) -> Duration {
        Duration::from_secs(u64::from(self.subnet_lease_renew_margin) * 60)
    }

    /// What the agent runs with, once the flags are checked ([`AgentArgs::validate`]).
    pub fn daemon_options(&self) -> Result<daemon::Options, CliError> {
        self.validate()?;
        Ok(daemon::Options {
            underlay: self.iface.selection(),
            public_ip: self.public_ip,
            public_ipv6: self.public_ipv6,
            pin_root: self.pin_root.clone(),
            bridge: self.bridge.clone(),
            decap: self.decap,
            deliver: self.deliver,
            receive_gro: self.receive_gro,
            resync: Duration::from_secs(self.iptables_resync.into()),
            control: self.control_options(),
            ops: OpsOptions {
                pin_root: self.pin_root.clone(),
                healthz: (self.healthz_port != 0)
                    .then(|| SocketAddr::new(self.healthz_ip, self.healthz_port)),
                ip_masq: self.ip_masq,
                forward_rules: self.iptables_forward_rules,
            },
        })
    }

    /// What the control plane needs from the command line.
    pub fn control_options(&self) -> ControlOptions {
        ControlOptions {
            etcd: self.etcd_options(),
            run: RunOptions {
                subnet_file: self.subnet_file.clone(),
                ip_masq: self.ip_masq,
                renew_margin: self.renew_margin(),
            },
        }
    }

    pub fn etcd_options(&self) -> EtcdOptions {
        EtcdOptions {
            endpoints: self.endpoints(),
            prefix: self.etcd_prefix.clone(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone(),
            tls: EtcdTls {
                ca_file: self.etcd_cafile.clone(),
                cert_file: self.etcd_certfile.clone(),
                key_file: self.etcd_keyfile.clone(),
            },
        }
    }

    /// `tracing` filter directive for `-v`.
    pub fn log_level(&self) -> &'static str {
        match self.verbosity {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<AgentArgs, String> {
        let mut v = vec!["overlay-agent"];
        v.extend_from_slice(args);
        AgentArgs::try_parse_from(v).map_err(|e| e.to_string())
    }

    #[test]
    fn decap_and_deliver_take_each_listed_value() {
        let d = parse(&[]).unwrap();
        assert_eq!((d.decap, d.deliver), (DecapChoice::Auto, DeliverChoice::Peer));
        for (name, want) in [
            ("auto", DecapChoice::Auto),
            ("xdp", DecapChoice::Xdp),
            ("tc", DecapChoice::Tc),
        ] {
            assert_eq!(parse(&["--decap", name]).unwrap().decap, want, "--decap {name}");
        }
        for (name, want) in [
            ("peer", DeliverChoice::Peer),
            ("veth", DeliverChoice::Veth),
            ("stack", DeliverChoice::Stack),
        ] {
            assert_eq!(
                parse(&["-deliver", name]).unwrap().deliver,
                want,
                "-deliver {name}"
            );
        }
        let e = parse(&["--deliver=bridge"]).unwrap_err();
        assert!(e.contains("possible values: peer, veth, stack"), "{e}");
    }

    #[test]
    fn iptables_forward_rules_as_flanneld_takes_them() {
        let d = parse(&[]).unwrap();
        assert!(d.iptables_forward_rules, "on by default, as in flanneld");
        assert_eq!(d.iptables_resync, 5);
        let a = parse(&["--iptables-forward-rules=false", "--iptables-resync=1"]).unwrap();
        assert!(!a.iptables_forward_rules);
        assert_eq!(a.iptables_resync, 1);
        // Go's spelling and booleans (try_parse_from reads flanneld's command line).
        assert!(
            !parse(&["-iptables-forward-rules=0"])
                .unwrap()
                .iptables_forward_rules
        );
        let err = parse(&["--iptables-resync=0"]).unwrap_err();
        assert!(err.contains("iptables-resync"), "{err}");
    }

    #[test]
    fn flanneld_flags() {
        let a = parse(&[
            "--etcd-endpoints=http://10.0.0.1:2379,http://10.0.0.2:2379",
            "--etcd-prefix",
            "/x/network",
            "--iface=eth1",
            "--iface",
            "192.0.2.1",
            "--public-ip=192.0.2.9",
            "--public-ipv6=2001:db8::9",
            "--ip-masq",
            "--subnet-lease-renew-margin=30",
            "--v=2",
        ])
        .unwrap();
        assert_eq!(a.etcd_endpoints, ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]);
        assert_eq!(a.etcd_prefix, "/x/network");
        assert_eq!(a.iface.iface, ["eth1", "192.0.2.1"]);
        assert_eq!(a.public_ip, Some(Ipv4Addr::new(192, 0, 2, 9)));
        assert_eq!(a.public_ipv6, Some("2001:db8::9".parse().unwrap()));
        let c = a.control_options();
        assert_eq!(c.etcd.prefix, "/x/network");
        assert_eq!(c.run.renew_margin, Duration::from_secs(1800));
        assert!(c.run.ip_masq);
        assert!(a.ip_masq);
        assert_eq!(a.renew_margin(), Duration::from_secs(1800));
        assert_eq!(a.log_level(), "trace");
        assert_eq!(a.validate(), Ok(()));

        let d = parse(&[]).unwrap();
        assert_eq!(d.etcd_endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(d.etcd_prefix, DEFAULT_ETCD_PREFIX);
        assert_eq!(d.subnet_file, PathBuf::from(DEFAULT_SUBNET_FILE));
        assert_eq!(d.subnet_lease_renew_margin, 60);
        assert!(!d.ip_masq);
        assert_eq!(d.bridge, "cni0");
        assert_eq!(d.pin_root, PathBuf::from(DEFAULT_PIN_ROOT));
        assert!(!parse(&["--ip-masq=false"]).unwrap().ip_masq);
    }

    #[test]
    fn contradictions() {
        let err = parse(&["--public-ip=fd00::1"]).unwrap_err();
        assert!(
            err.contains("\"fd00::1\" is not an IPv4 address, e.g. 192.0.2.10 (IPv6: --public-ipv6)"),
            "{err}"
        );
        for bad in ["192.0.2.9", "::ffff:192.0.2.9", "::", "::1", "ff02::1"] {
            let err = parse(&[&format!("--public-ipv6={bad}")]).unwrap_err();
            assert!(err.contains(&format!("\"{bad}\" is not")), "{bad}: {err}");
        }
        let cases: [(&[&str], CliError); 7] = [
            (&["--etcd-keyfile=/k"], CliError::KeyWithoutCert),
            (&["--etcd-certfile=/c"], CliError::KeyWithoutCert),
            (&["--etcd-username=u"], CliError::UserWithoutPassword),
            (
                &["--etcd-endpoints=127.0.0.1:2379"],
                CliError::BadEndpoint("127.0.0.1:2379".into()),
            ),
            (
                &["--etcd-endpoints=https://e:2379"],
                CliError::HttpsWithoutCa("https://e:2379".into()),
            ),
            (
                &["--subnet-lease-renew-margin=1440"],
                CliError::BadRenewMargin(1440),
            ),
            (
                &["--etcd-prefix=coreos.com/network"],
                CliError::BadPrefix("coreos.com/network".into()),
            ),
        ];
        for (args, want) in cases {
            assert_eq!(parse(args).unwrap().validate(), Err(want), "{args:?}");
        }
        assert_eq!(
            parse(&["--kube-subnet-mgr"]).unwrap().validate(),
            Err(CliError::KubeSubnetMgr)
        );
    }

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn go_style_argv_rewrites_single_dash_flags() {
        let table: Vec<(String, FlagKind)> = [
            ("etcd-endpoints", FlagKind::Value),
            ("iface", FlagKind::Value),
            ("etcd-password", FlagKind::Value),
            ("v", FlagKind::Value),
            ("ip-masq", FlagKind::Bool),
            ("help", FlagKind::Bool),
        ]
        .iter()
        .map(|(n, k)| (n.to_string(), *k))
        .collect();
        let cases: &[(&[&str], &[&str])] = &[
            // (argv after argv[0], what clap gets)
            (
                &[
                    "-etcd-endpoints=http://e:2379",
                    "-iface",
                    "eth0",
                    "-ip-masq",
                    "-v=1",
                ],
                &[
                    "--etcd-endpoints=http://e:2379",
                    "--iface=eth0",
                    "--ip-masq",
                    "--v=1",
                ],
            ),
            (
                &["--iface", "eth0", "--iface=eth1", "-v", "2", "-ip-masq=false"],
                &["--iface=eth0", "--iface=eth1", "--v=2", "--ip-masq=false"],
            ),
            // A value is taken whole, even when it looks like a flag (Go does the same).
            (&["-etcd-password", "-secret=x"], &["--etcd-password=-secret=x"]),
            // A boolean never takes the next argument.
            (&["-ip-masq", "-iface", "eth0"], &["--ip-masq", "--iface=eth0"]),
            (&["-ip-masq", "false"], &["--ip-masq", "false"]),
            // Unknown names become --name, so clap's error names them; shorts stay.
            (
                &["-no-such-flag=1", "-x", "-h", "-help"],
                &["--no-such-flag=1", "-x", "-h", "--help"],
            ),
            // Missing value: left for clap to report.
            (&["-iface"], &["--iface"]),
            // Flag parsing stops at `--` and at the first non-flag (a subcommand).
            (
                &["-iface", "eth0", "--", "-ip-masq"],
                &["--iface=eth0", "--", "-ip-masq"],
            ),
            (&["status", "-iface", "eth0"], &["status", "-iface", "eth0"]),
            (&["-", "-iface"], &["-", "-iface"]),
            // Bad syntax stays for clap to reject; `eth0` after it is then a stray argument.
            (&["---iface", "eth0"], &["---iface", "eth0"]),
        ];
        for (argv, want) in cases {
            let mut full = vec!["overlay-agent"];
            full.extend_from_slice(argv);
            let mut expect = vec!["overlay-agent"];
            expect.extend_from_slice(want);
            assert_eq!(go_style_argv(os(&full), &table), os(&expect), "{argv:?}");
        }
        // Not UTF-8: passed through untouched.
        use std::os::unix::ffi::OsStringExt as _;
        let odd = OsString::from_vec(vec![b'-', 0xff]);
        let out = go_style_argv(vec![OsString::from("a"), odd.clone()], &table);
        assert_eq!(out, vec![OsString::from("a"), odd]);
    }

    #[test]
    fn flag_table_follows_the_agent_flags() {
        let t = flag_table(&Standalone::command());
        let kind = |n: &str| t.iter().find(|(f, _)| f == n).map(|(_, k)| *k);
        assert_eq!(kind("etcd-endpoints"), Some(FlagKind::Value));
        assert_eq!(kind("iface"), Some(FlagKind::Value));
        assert_eq!(kind("iface-regex"), Some(FlagKind::Value));
        assert_eq!(kind("iface-can-reach"), Some(FlagKind::Value));
        assert_eq!(kind("v"), Some(FlagKind::Value));
        assert_eq!(kind("ip-masq"), Some(FlagKind::Bool));
        assert_eq!(kind("kube-subnet-mgr"), Some(FlagKind::Bool));
        assert_eq!(kind("help"), Some(FlagKind::Bool));
    }

    /// A valid value for every flag that takes one.
    fn sample(flag: &str) -> &'static str {
        match flag {
            "etcd-endpoints" => "http://10.0.0.1:2379,http://10.0.0.2:2379",
            "etcd-prefix" => "/x/network",
            "etcd-keyfile" => "/k.pem",
            "etcd-certfile" => "/c.pem",
            "etcd-cafile" => "/ca.pem",
            "etcd-username" => "u",
            "etcd-password" => "p",
            "iface" => "eth1",
            "iface-regex" => "^10\\.",
            "iface-can-reach" => "192.0.2.1",
            "public-ip" => "192.0.2.9",
            "public-ipv6" => "2001:db8::9",
            "subnet-file" => "/run/x.env",
            "subnet-lease-renew-margin" => "30",
            "ip-masq" | "kube-subnet-mgr" => "true",
            // On by default: only `=false` changes anything.
            "iptables-forward-rules" | "receive-gro" => "false",
            "iptables-resync" => "9",
            "healthz-ip" => "127.0.0.1",
            "healthz-port" => "8471",
            "v" => "2",
            "bridge" => "br9",
            "pin-root" => "/sys/fs/bpf/x",
            "decap" => "tc",
            "deliver" => "stack",
            other => panic!("no sample value for --{other}: add one so its Go spellings are tested"),
        }
    }

    #[test]
    fn every_flag_in_every_go_spelling() {
        let debug = |argv: &[String]| -> String {
            let mut full = vec!["overlay-agent".to_string()];
            full.extend_from_slice(argv);
            match AgentArgs::try_parse_from(&full) {
                Ok(a) => format!("{a:?}"),
                Err(e) => panic!("{full:?}: {e}"),
            }
        };
        let defaults = debug(&[]);
        for (name, kind) in flag_table(&Standalone::command()) {
            if name == "help" {
                continue;
            }
            let v = sample(&name);
            let want = debug(&[format!("--{name}={v}")]);
            assert_ne!(want, defaults, "--{name}={v} changed nothing");
            let mut spellings = vec![vec![format!("-{name}={v}")]];
            match kind {
                FlagKind::Value => {
                    spellings.push(vec![format!("-{name}"), v.to_string()]);
                    spellings.push(vec![format!("--{name}"), v.to_string()]);
                }
                // The bare flag means true.
                FlagKind::Bool if v == "true" => spellings.push(vec![format!("-{name}")]),
                FlagKind::Bool => {}
            }
            for argv in spellings {
                assert_eq!(debug(&argv), want, "{argv:?} differs from --{name}={v}");
            }
        }
    }

    #[test]
    fn go_booleans_and_last_value_wins() {
        for (arg, want) in [
            ("-ip-masq", true),
            ("--ip-masq", true),
            ("-ip-masq=true", true),
            ("-ip-masq=1", true),
            ("-ip-masq=T", true),
            ("-ip-masq=false", false),
            ("-ip-masq=0", false),
            ("-ip-masq=F", false),
            ("--ip-masq=False", false),
        ] {
            assert_eq!(parse(&[arg]).map(|a| a.ip_masq), Ok(want), "{arg}");
        }
        // Go reads `-ip-masq false` as the flag and then a stray argument.
        let err = parse(&["-ip-masq", "false"]).unwrap_err();
        assert!(err.contains("unexpected argument 'false'"), "{err}");
        let err = parse(&["-ip-masq=yes"]).unwrap_err();
        assert!(err.contains("\"yes\" is not a boolean"), "{err}");
        // Go's flag package: a repeated flag keeps its last value.
        let a = parse(&["-subnet-file=/a", "-subnet-file", "/b", "-v=1", "-v=0"]).unwrap();
        assert_eq!(a.subnet_file, PathBuf::from("/b"));
        assert_eq!(a.verbosity, 0);
        // Repeatable ones accumulate, in order.
        let a = parse(&[
            "-iface=eth1",
            "-iface",
            "eth2",
            "-iface-regex=^10\\.",
            "-iface-regex",
            "eth",
        ])
        .unwrap();
        assert_eq!(a.iface.iface, ["eth1", "eth2"]);
        assert_eq!(a.iface.iface_regex, ["^10\\.", "eth"]);
    }

    #[test]
    fn unknown_and_bad_flags_are_named() {
        for (argv, want) in [
            (&["-no-such-flag"][..], "unexpected argument '--no-such-flag'"),
            // flanneld has it; we do not.
            (
                &["-ip-masq-fully-random-disable"],
                "unexpected argument '--ip-masq-fully-random-disable'",
            ),
            (
                &["-iface-regex=eth("],
                "\"eth(\" is not a valid regular expression",
            ),
            // flanneld v0.28 has no --auto-detect-ipv6 (the family comes from EnableIPv6).
            (&["-auto-detect-ipv6"], "unexpected argument '--auto-detect-ipv6'"),
            (
                &["-iface-can-reach", "fd00::1"],
                "\"fd00::1\" is not an IPv4 address",
            ),
            (&["-iface"], "a value is required for '--iface <IFACE>'"),
        ] {
            let err = parse(argv).unwrap_err();
            assert!(err.contains(want), "{argv:?}: want {want:?} in:\n{err}");
        }
    }
}
