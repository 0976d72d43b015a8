//! flannel's `subnet.env` (read by the flannel CNI plugin), written atomically.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::lease::SubnetKey;
use crate::family::{first_host, Family, V4, V6};

#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

/// What flanneld's `WriteSubnetFile` writes: for each enabled family its network and our
/// subnet's first host address, then the MTU and ip-masq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK` (IPv4 enabled).
    pub network: Option<Ipv4Net>,
    /// Our lease; written as its first host address (`FLANNEL_SUBNET=10.244.7.1/24`).
    pub subnet: Option<Ipv4Net>,
    /// `FLANNEL_IPV6_NETWORK` (IPv6 enabled).
    pub ipv6_network: Option<Ipv6Net>,
    /// `FLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64`.
    pub ipv6_subnet: Option<Ipv6Net>,
    pub mtu: u32,
    pub ip_masq: bool,
}

impl SubnetEnv {
    /// flanneld's text, line for line: `FLANNEL_NETWORK`, `FLANNEL_SUBNET` (IPv4),
    /// `FLANNEL_IPV6_NETWORK`, `FLANNEL_IPV6_SUBNET` (IPv6), `FLANNEL_MTU`, `FLANNEL_IPMASQ`.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let (Some(net), Some(sn)) = (self.network, self.subnet) {
            let (first, len) = first_host::<V4>(&sn);
            s += &format!("FLANNEL_NETWORK={net}\nFLANNEL_SUBNET={first}/{len}\n");
        }
        if let (Some(net), Some(sn)) = (self.ipv6_network, self.ipv6_subnet) {
            let (first, len) = first_host::<V6>(&sn);
            s += &format!("FLANNEL_IPV6_NETWORK={net}\nFLANNEL_IPV6_SUBNET={first}/{len}\n");
        }
        s += &format!("FLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n", self.mtu, self.ip_masq);
        s
    }

    /// Writes to a temp file in the same directory, fsyncs, then renames over `path`.
    pub fn write(&self, path: &Path) -> Result<(), SubnetEnvError> {
        let err = |source| SubnetEnvError::Write {
            path: path.to_path_buf(),
            source,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(err)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
        let res = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(self.render().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res.map_err(err)
    }
}

/// The subnets recorded in an existing subnet.env (`FLANNEL_SUBNET`, `FLANNEL_IPV6_SUBNET`,
/// masked to their networks), if any.
pub fn read_previous_subnets(path: &Path) -> Result<SubnetKey, SubnetEnvError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SubnetKey::default()),
        Err(source) => {
            return Err(SubnetEnvError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    Ok(parse_previous_subnets(&text))
}

fn previous<F: Family>(text: &str, var: &str) -> Option<F::Net> {
    let prefix = format!("{var}=");
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .filter_map(|v| v.trim().trim_matches('"').parse::<F::Net>().ok())
        .map(|n| F::net(F::net_addr(&n), F::net_len(&n)))
        .next_back()
}

/// The `FLANNEL_SUBNET` and `FLANNEL_IPV6_SUBNET` of a subnet.env text.
pub fn parse_previous_subnets(text: &str) -> SubnetKey {
    SubnetKey {
        ipv4: previous::<V4>(text, "FLANNEL_SUBNET"),
        ipv6: previous::<V6>(text, "FLANNEL_IPV6_SUBNET"),
    }
}

/// The `FLANNEL_NETWORK` and `FLANNEL_IPV6_NETWORK` of a subnet.env text (the cluster networks
/// it was written for).
pub fn parse_networks(text: &str) -> Vec<IpNet> {
    let v4 = previous::<V4>(text, "FLANNEL_NETWORK").map(IpNet::V4);
    let v6 = previous::<V6>(text, "FLANNEL_IPV6_NETWORK").map(IpNet::V6);
    v4.into_iter().chain(v6).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> SubnetEnv {
        SubnetEnv {
            network: Some("10.244.0.0/16".parse().unwrap()),
            subnet: Some("10.244.7.0/24".parse().unwrap()),
            ipv6_network: None,
            ipv6_subnet: None,
            mtu: 1450,
            ip_masq: false,
        }
    }

    #[test]
    fn the_networks_of_a_subnet_env() {
        let text = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\n\
                    FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\n";
        let want: Vec<IpNet> = vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:10:244::/56".parse().unwrap(),
        ];
        assert_eq!(parse_networks(text), want);
        assert_eq!(
            parse_networks("FLANNEL_SUBNET=10.244.7.1/24\n"),
            Vec::<IpNet>::new()
        );
    }

    #[test]
    fn flannel_format_and_round_trip() {
        let env = env();
        let text = env.render();
        assert_eq!(text, "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n");
        assert_eq!(
            parse_previous_subnets(&text),
            SubnetKey::from("10.244.7.0/24".parse::<Ipv4Net>().unwrap())
        );
        assert_eq!(
            parse_previous_subnets("FLANNEL_NETWORK=10.0.0.0/8\n"),
            SubnetKey::default()
        );
        assert_eq!(
            parse_previous_subnets("FLANNEL_SUBNET=junk\n"),
            SubnetKey::default()
        );

        let dir = std::env::temp_dir().join(format!("subnet-env-test-{}", std::process::id()));
        let path = dir.join("run/flannel/subnet.env");
        env.write(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        assert_eq!(read_previous_subnets(&path).unwrap().ipv4, env.subnet);
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "temp file left behind"
        );
        assert_eq!(
            read_previous_subnets(&dir.join("missing")).unwrap(),
            SubnetKey::default()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// flanneld's `WriteSubnetFile` for dual-stack and IPv6-only (pkg/subnet/subnet.go): the
    /// IPv4 pair, then the IPv6 pair, then MTU and ip-masq; an IPv6-only node writes no IPv4
    /// lines. Both subnets are read back for reuse.
    #[test]
    fn dual_stack_and_ipv6_only() {
        let mut e = env();
        e.ipv6_network = Some("fd00:10:244::/56".parse().unwrap());
        e.ipv6_subnet = Some("fd00:10:244:7::/64".parse().unwrap());
        e.ip_masq = true;
        let dual = e.render();
        assert_eq!(
            dual,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\n\
             FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        let back = parse_previous_subnets(&dual);
        assert_eq!((back.ipv4, back.ipv6), (e.subnet, e.ipv6_subnet));

        e.network = None;
        e.subnet = None;
        let only = e.render();
        assert_eq!(
            only,
            "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        let back = parse_previous_subnets(&only);
        assert_eq!((back.ipv4, back.ipv6), (None, e.ipv6_subnet));
        // Quoted values (godotenv reads them too).
        assert_eq!(
            parse_previous_subnets("FLANNEL_IPV6_SUBNET=\"fd00:10:244:9::1/64\"\n").ipv6,
            Some("fd00:10:244:9::/64".parse().unwrap())
        );
    }
}
