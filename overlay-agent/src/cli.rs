//! flanneld-compatible command line: the same flag names and `FLANNELD_<FLAG>` environment
//! variables, for the flags that matter to an etcd-backed vxlan node.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use clap::{ArgAction, Parser};

use crate::subnet::etcd::{EtcdOptions, EtcdTls};

pub const DEFAULT_ETCD_PREFIX: &str = "/coreos.com/network";
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/overlay";

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
    /// Interface (name or IPv4 address) for inter-host traffic; may be repeated, first match wins.
    /// Default: the interface of the default route.
    #[arg(long, env = "FLANNELD_IFACE", value_delimiter = ',', action = ArgAction::Append)]
    pub iface: Vec<String>,
    /// IPv4 address other nodes use to reach this one (default: the interface's address).
    #[arg(long, env = "FLANNELD_PUBLIC_IP", value_parser = parse_public_ip)]
    pub public_ip: Option<Ipv4Addr>,
    /// Where the CNI plugin reads this node's subnet.
    #[arg(long, env = "FLANNELD_SUBNET_FILE", default_value = DEFAULT_SUBNET_FILE)]
    pub subnet_file: PathBuf,
    /// Renew the lease this many minutes before it expires.
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60)]
    pub subnet_lease_renew_margin: u32,
    /// Masquerade traffic leaving the overlay (recorded in subnet.env as FLANNEL_IPMASQ).
    #[arg(long, env = "FLANNELD_IP_MASQ", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = ArgAction::Set)]
    pub ip_masq: bool,
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
          default_missing_value = "true", action = ArgAction::Set, hide = true)]
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
    #[arg(long, env = "FLANNELD_DECAP", default_value = "auto")]
    pub decap: DecapChoice,
    /// How decapsulated packets for a pod on this node reach it: `peer` (bpf_redirect_peer into
    /// the pod's namespace), `veth` (bpf_redirect through its host-side veth) or `stack` (the
    /// node's routing and the bridge, as flannel.1 does).
    #[arg(long, env = "FLANNELD_DELIVER", default_value = "peer")]
    pub deliver: DeliverChoice,
}

/// `--decap`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapChoice {
    Auto,
    Xdp,
    Tc,
}

/// `--deliver`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliverChoice {
    Peer,
    Veth,
    Stack,
}

fn parse_public_ip(s: &str) -> Result<Ipv4Addr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 address (this agent is IPv4-only), e.g. 192.0.2.10"))
}

#[derive(Parser)]
#[command(name = "overlay-agent")]
struct Standalone {
    #[command(flatten)]
    args: AgentArgs,
}

impl AgentArgs {
    /// Parses flags (argv[0] first) and validates them; for tests and embedding.
    pub fn try_parse_from<I, T>(argv: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
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
    fn flanneld_flags() {
        let a = parse(&[
            "--etcd-endpoints=http://10.0.0.1:2379,http://10.0.0.2:2379",
            "--etcd-prefix",
            "/x/network",
            "--iface=eth1",
            "--iface",
            "192.0.2.1",
            "--public-ip=192.0.2.9",
            "--ip-masq",
            "--subnet-lease-renew-margin=30",
            "--v=2",
        ])
        .unwrap();
        assert_eq!(a.etcd_endpoints, ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]);
        assert_eq!(a.etcd_prefix, "/x/network");
        assert_eq!(a.iface, ["eth1", "192.0.2.1"]);
        assert_eq!(a.public_ip, Some(Ipv4Addr::new(192, 0, 2, 9)));
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
            err.contains("\"fd00::1\" is not an IPv4 address (this agent is IPv4-only)"),
            "{err}"
        );
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
}
