//! `overlay-agent docker-opts`: flannel's mk-docker-opts.sh, its flags (`-f`, `-d`, `-i`, `-c`,
//! `-m`, `-k`) and its output. Reads subnet.env and writes `DOCKER_OPT_BIP="--bip=10.244.7.1/24"`
//! … and `DOCKER_OPTS=" --bip=10.244.7.1/24 --ip-masq=false --mtu=1450"` for docker.service.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use crate::control::subnet_env::replace_file;

pub const DEFAULT_OUT: &str = "/run/docker_opts.env";
pub const DEFAULT_KEY: &str = "DOCKER_OPTS";

#[derive(Debug, thiserror::Error)]
pub enum DockerOptsError {
    #[error("reading {path}: {source} (is the agent running and holding a lease?)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} has no {var}; it does not look like a subnet.env written by flannel or this agent")]
    Missing { path: PathBuf, var: &'static str },
    #[error("{path}: invalid value of FLANNEL_IPMASQ: {value:?} (true or false)")]
    IpMasq { path: PathBuf, value: String },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// What to write, as mk-docker-opts.sh's flags say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// `-k`: the combined variable's name.
    pub key: String,
    /// `-i`: each option as its own variable (`DOCKER_OPT_BIP`, `DOCKER_OPT_IPMASQ`,
    /// `DOCKER_OPT_MTU`).
    pub individual: bool,
    /// `-c`: the combined variable. Neither `-i` nor `-c`: both, as the script does.
    pub combined: bool,
    /// `-m`: leave `--ip-masq` out (older Docker versions).
    pub no_ip_masq: bool,
    /// What the combined variable starts with: the script begins with the value the variable
    /// already has in its environment.
    pub prefix: Option<String>,
}

impl Shape {
    pub fn new(key: &str, individual: bool, combined: bool, no_ip_masq: bool) -> Self {
        let both = !individual && !combined;
        Shape {
            key: key.to_string(),
            individual: individual || both,
            combined: combined || both,
            no_ip_masq,
            prefix: std::env::var(key).ok().filter(|v| !v.is_empty()),
        }
    }
}

/// The file mk-docker-opts.sh writes from the text of subnet.env: the individual variables in
/// the order the script's `set | grep` lists them, then `KEY=" --bip=… --ip-masq=… --mtu=…"`
/// (the script's leading space included). `--ip-masq` is the opposite of FLANNEL_IPMASQ (when
/// the overlay masquerades, docker must not) and is left out when FLANNEL_IPMASQ is absent.
pub fn render(subnet_env: &str, shape: &Shape, path: &Path) -> Result<String, DockerOptsError> {
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
    let mut opts = vec![("DOCKER_OPT_BIP", format!("--bip={}", get("FLANNEL_SUBNET")?))];
    match vars.get("FLANNEL_IPMASQ") {
        _ if shape.no_ip_masq => {}
        None => {}
        Some(&"true") => opts.push(("DOCKER_OPT_IPMASQ", "--ip-masq=false".into())),
        Some(&"false") => opts.push(("DOCKER_OPT_IPMASQ", "--ip-masq=true".into())),
        Some(other) => {
            return Err(DockerOptsError::IpMasq {
                path: path.to_path_buf(),
                value: other.to_string(),
            })
        }
    }
    opts.push(("DOCKER_OPT_MTU", format!("--mtu={}", get("FLANNEL_MTU")?)));
    let mut out = String::new();
    let mut combined = shape.prefix.as_ref().map(|p| format!("{p} ")).unwrap_or_default();
    for (name, value) in &opts {
        if shape.individual {
            out.push_str(&format!("{name}=\"{value}\"\n"));
        }
        combined.push(' ');
        combined.push_str(value);
    }
    if shape.combined {
        out.push_str(&format!("{}=\"{combined}\"\n", shape.key));
    }
    Ok(out)
}

/// Reads `subnet_file` and writes `out` (atomically, mode 0644, never through a symlink:
/// [`replace_file`]).
pub fn write(subnet_file: &Path, out: &Path, shape: &Shape) -> Result<(), DockerOptsError> {
    let text = std::fs::read_to_string(subnet_file).map_err(|source| DockerOptsError::Read {
        path: subnet_file.to_path_buf(),
        source,
    })?;
    let rendered = render(&text, shape, subnet_file)?;
    replace_file(out, rendered.as_bytes()).map_err(|source| DockerOptsError::Write {
        path: out.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    fn shape(key: &str, i: bool, c: bool, m: bool) -> Shape {
        Shape {
            key: key.into(),
            prefix: None,
            ..Shape::new(key, i, c, m)
        }
    }

    /// The files mk-docker-opts.sh writes for each of its flags (run by hand against the
    /// same subnet.env: `sh mk-docker-opts.sh -f subnet.env -d out [-i] [-c] [-m] [-k OPTS]`).
    #[test]
    fn renders_like_mk_docker_opts() {
        let p = Path::new("/run/flannel/subnet.env");
        let all = "DOCKER_OPT_BIP=\"--bip=10.244.7.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\nDOCKER_OPTS=\" --bip=10.244.7.1/24 --ip-masq=false --mtu=1450\"\n";
        assert_eq!(
            render(ENV, &shape(DEFAULT_KEY, false, false, false), p).unwrap(),
            all
        );
        assert_eq!(
            render(ENV, &shape(DEFAULT_KEY, true, true, false), p).unwrap(),
            all
        );
        assert_eq!(
            render(ENV, &shape(DEFAULT_KEY, false, true, false), p).unwrap(),
            "DOCKER_OPTS=\" --bip=10.244.7.1/24 --ip-masq=false --mtu=1450\"\n"
        );
        assert_eq!(
            render(ENV, &shape(DEFAULT_KEY, true, false, true), p).unwrap(),
            "DOCKER_OPT_BIP=\"--bip=10.244.7.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\n"
        );
        let no_masq = ENV.replace("FLANNEL_IPMASQ=true", "FLANNEL_IPMASQ=false");
        assert_eq!(
            render(&no_masq, &shape("OPTS", false, true, false), p).unwrap(),
            "OPTS=\" --bip=10.244.7.1/24 --ip-masq=true --mtu=1450\"\n"
        );
        let absent = ENV.replace("FLANNEL_IPMASQ=true\n", "");
        assert_eq!(
            render(&absent, &shape(DEFAULT_KEY, false, true, false), p).unwrap(),
            "DOCKER_OPTS=\" --bip=10.244.7.1/24 --mtu=1450\"\n"
        );
        let with_prefix = Shape {
            prefix: Some("--debug".into()),
            ..shape(DEFAULT_KEY, false, true, true)
        };
        assert_eq!(
            render(&absent, &with_prefix, p).unwrap(),
            "DOCKER_OPTS=\"--debug  --bip=10.244.7.1/24 --mtu=1450\"\n"
        );
        let err = render("FLANNEL_MTU=1450\n", &shape(DEFAULT_KEY, false, false, false), p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no FLANNEL_SUBNET"), "{err}");
        let bad = ENV.replace("FLANNEL_IPMASQ=true", "FLANNEL_IPMASQ=yes");
        assert_eq!(
            render(&bad, &shape(DEFAULT_KEY, false, false, false), p)
                .unwrap_err()
                .to_string(),
            "/run/flannel/subnet.env: invalid value of FLANNEL_IPMASQ: \"yes\" (true or false)"
        );
    }

    #[test]
    fn writes_the_file() {
        let dir = std::env::temp_dir().join(format!("docker-opts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let env = dir.join("subnet.env");
        std::fs::write(&env, ENV).unwrap();
        let out = dir.join("sub/docker_opts.env");
        write(&env, &out, &shape(DEFAULT_KEY, false, true, false)).unwrap();
        let got = std::fs::read_to_string(&out).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            got,
            "DOCKER_OPTS=\" --bip=10.244.7.1/24 --ip-masq=false --mtu=1450\"\n"
        );
    }

    /// The output is never written through a symlink: not one at the output path (replaced by
    /// the file), not one at the temp name earlier releases used (`<out>.tmp<pid>`, which
    /// anyone able to write the directory could plant); and it is 0644 whatever the umask.
    #[test]
    fn never_writes_through_a_symlink() {
        use std::os::unix::fs::{symlink, PermissionsExt as _};
        let dir = std::env::temp_dir().join(format!("docker-opts-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let env = dir.join("subnet.env");
        std::fs::write(&env, ENV).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let out = dir.join("docker_opts.env");
        symlink(&victim, &out).unwrap();
        symlink(&victim, out.with_extension(format!("tmp{}", std::process::id()))).unwrap();
        let res = write(&env, &out, &shape(DEFAULT_KEY, false, true, false));
        let victim_now = std::fs::read_to_string(&victim).unwrap();
        let out_md = std::fs::symlink_metadata(&out).unwrap();
        let got = std::fs::read_to_string(&out).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        res.unwrap();
        assert_eq!(victim_now, "precious\n", "written through a symlink");
        assert!(
            out_md.file_type().is_file(),
            "the output should be a file of its own now"
        );
        assert_eq!(out_md.permissions().mode() & 0o777, 0o644);
        assert!(got.starts_with("DOCKER_OPTS="), "{got}");
    }
}
