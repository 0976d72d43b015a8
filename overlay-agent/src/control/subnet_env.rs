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

    /// Writes `path` atomically ([`replace_file`]), mode 0644 as flanneld's.
    pub fn write(&self, path: &Path) -> Result<(), SubnetEnvError> {
        replace_file(path, self.render().as_bytes()).map_err(|source| SubnetEnvError::Write {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Mode of the files others read (subnet.env, docker-opts' output), as flanneld and
/// mk-docker-opts.sh leave them (the agent's umask is 077).
pub const PUBLIC_FILE_MODE: u32 = 0o644;

/// Replaces `path` with `contents` atomically and never through a symlink: a new file with a
/// random name is created in `path`'s directory (`O_CREAT|O_EXCL`, so nothing planted there is
/// followed or reused), written, set to [`PUBLIC_FILE_MODE`], fsynced, and renamed over `path`
/// (a symlink at `path` is replaced, not followed). Missing directories are created 0755.
pub fn replace_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        let mut b = std::fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o755);
        b.recursive(true).create(dir)?;
        // The umask (077) narrowed it; readers of subnet.env need to enter it.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(contents)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(PUBLIC_FILE_MODE))?;
    tmp.as_file().sync_all()?;
    // On failure the temp file is removed when `tmp` drops.
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
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

    /// subnet.env is never written through a symlink: not one at its path (replaced by the
    /// file), not one at the temp name earlier releases used (`.subnet.env.tmp.<pid>`, which
    /// anyone able to write the directory could plant); it is 0644 (flanneld's) whatever the
    /// umask, and no temp file is left behind.
    #[test]
    fn never_writes_through_a_symlink() {
        use std::os::unix::fs::{symlink, PermissionsExt as _};
        let dir = std::env::temp_dir().join(format!("subnet-env-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let path = dir.join("subnet.env");
        symlink(&victim, &path).unwrap();
        let planted = dir.join(format!(".subnet.env.tmp.{}", std::process::id()));
        symlink(&victim, &planted).unwrap();
        let res = env().write(&path);
        let victim_now = std::fs::read_to_string(&victim).unwrap();
        let md = std::fs::symlink_metadata(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let _ = std::fs::remove_dir_all(&dir);
        res.unwrap();
        assert_eq!(victim_now, "precious\n", "written through a symlink");
        assert!(
            md.file_type().is_file(),
            "subnet.env should be a file of its own now"
        );
        assert_eq!(md.permissions().mode() & 0o777, 0o644);
        assert_eq!(text, env().render());
        let planted_name = planted.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(names, [planted_name, "subnet.env".into(), "victim".into()]);
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
