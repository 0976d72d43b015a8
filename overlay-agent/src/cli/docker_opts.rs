//! `overlay-agent docker-opts`: flannel's mk-docker-opts.sh. Reads subnet.env and writes
//! `DOCKER_OPTS="--bip=10.244.7.1/24 --ip-masq=false --mtu=1450"` for docker.service.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

pub const DEFAULT_OUT: &str = "/run/docker_opts.env";
pub const DEFAULT_KEY: &str = "DOCKER_OPTS";

#[derive(Debug, thiserror::Error)]
pub enum DockerOptsError {
    #[error("reading {path}: {source} (is the agent running and holding a lease?)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} has no {var}; it does not look like a subnet.env written by flannel or this agent")]
    Missing { path: PathBuf, var: &'static str },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// `KEY="--bip=… --ip-masq=… --mtu=…"` from the text of subnet.env. Like mk-docker-opts.sh,
/// `--ip-masq` is the opposite of FLANNEL_IPMASQ (when the overlay masquerades, docker must not)
/// and is left out when FLANNEL_IPMASQ is absent.
pub fn render(subnet_env: &str, key: &str, path: &Path) -> Result<String, DockerOptsError> {
    let vars: HashMap<&str, &str> = subnet_env
        .lines()
        .filter_map(|l| l.trim().split_once('='))
        .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
        .collect();
    let get = |var: &'static str| {
        vars.get(var).copied().ok_or(DockerOptsError::Missing {
            path: path.to_path_buf(),
            var,
        })
    };
    let mut opts = vec![format!("--bip={}", get("FLANNEL_SUBNET")?)];
    if let Some(masq) = vars.get("FLANNEL_IPMASQ") {
        opts.push(format!("--ip-masq={}", *masq != "true"));
    }
    opts.push(format!("--mtu={}", get("FLANNEL_MTU")?));
    Ok(format!("{key}=\"{}\"\n", opts.join(" ")))
}

/// Reads `subnet_file` and writes `out` (atomically: temp file + rename).
pub fn write(subnet_file: &Path, out: &Path, key: &str) -> Result<(), DockerOptsError> {
    let text = std::fs::read_to_string(subnet_file).map_err(|source| DockerOptsError::Read {
        path: subnet_file.to_path_buf(),
        source,
    })?;
    let rendered = render(&text, key, subnet_file)?;
    let err = |source| DockerOptsError::Write {
        path: out.to_path_buf(),
        source,
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, rendered).map_err(err)?;
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    #[test]
    fn renders_like_mk_docker_opts() {
        let p = Path::new("/run/flannel/subnet.env");
        assert_eq!(
            render(ENV, DEFAULT_KEY, p).unwrap(),
            "DOCKER_OPTS=\"--bip=10.244.7.1/24 --ip-masq=false --mtu=1450\"\n"
        );
        let no_masq = ENV.replace("FLANNEL_IPMASQ=true", "FLANNEL_IPMASQ=false");
        assert_eq!(
            render(&no_masq, "OPTS", p).unwrap(),
            "OPTS=\"--bip=10.244.7.1/24 --ip-masq=true --mtu=1450\"\n"
        );
        let absent = ENV.replace("FLANNEL_IPMASQ=true\n", "");
        assert_eq!(
            render(&absent, DEFAULT_KEY, p).unwrap(),
            "DOCKER_OPTS=\"--bip=10.244.7.1/24 --mtu=1450\"\n"
        );
        let err = render("FLANNEL_MTU=1450\n", DEFAULT_KEY, p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no FLANNEL_SUBNET"), "{err}");
    }

    #[test]
    fn writes_the_file() {
        let dir = std::env::temp_dir().join(format!("docker-opts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let env = dir.join("subnet.env");
        std::fs::write(&env, ENV).unwrap();
        let out = dir.join("sub/docker_opts.env");
        write(&env, &out, DEFAULT_KEY).unwrap();
        let got = std::fs::read_to_string(&out).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            got,
            "DOCKER_OPTS=\"--bip=10.244.7.1/24 --ip-masq=false --mtu=1450\"\n"
        );
    }
}
