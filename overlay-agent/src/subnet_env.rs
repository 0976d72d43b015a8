//! flannel's `subnet.env` (read by the flannel CNI plugin), written atomically.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;

#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Ipv4Net,
    /// Our lease; written as its first host address (`10.244.7.1/24`).
    pub subnet: Ipv4Net,
    pub mtu: u32,
    pub ip_masq: bool,
}

impl SubnetEnv {
    pub fn render(&self) -> String {
        let first = Ipv4Addr::from(u32::from(self.subnet.network()).wrapping_add(1));
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network,
            first,
            self.subnet.prefix_len(),
            self.mtu,
            self.ip_masq
        )
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

/// The subnet recorded in an existing subnet.env (FLANNEL_SUBNET, masked to its network), if any.
pub fn read_previous_subnet(path: &Path) -> Result<Option<Ipv4Net>, SubnetEnvError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SubnetEnvError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    Ok(parse_previous_subnet(&text))
}

pub fn parse_previous_subnet(text: &str) -> Option<Ipv4Net> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("FLANNEL_SUBNET="))
        .filter_map(|v| v.trim().trim_matches('"').parse::<Ipv4Net>().ok())
        .map(|n| n.trunc())
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_format_and_round_trip() {
        let env = SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.7.0/24".parse().unwrap(),
            mtu: 1450,
            ip_masq: false,
        };
        let text = env.render();
        assert_eq!(text, "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n");
        assert_eq!(
            parse_previous_subnet(&text),
            Some("10.244.7.0/24".parse().unwrap())
        );
        assert_eq!(parse_previous_subnet("FLANNEL_NETWORK=10.0.0.0/8\n"), None);
        assert_eq!(parse_previous_subnet("FLANNEL_SUBNET=junk\n"), None);

        let dir = std::env::temp_dir().join(format!("subnet-env-test-{}", std::process::id()));
        let path = dir.join("run/flannel/subnet.env");
        env.write(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        assert_eq!(read_previous_subnet(&path).unwrap(), Some(env.subnet));
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "temp file left behind"
        );
        assert_eq!(read_previous_subnet(&dir.join("missing")).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
