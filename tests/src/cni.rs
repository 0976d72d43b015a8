//! Pods made by the real CNI bridge plugin (`/usr/lib/cni/bridge` with `host-local` IPAM), the
//! way flannel's CNI plugin drives it: the delegate config is rendered from the node's
//! `subnet.env` exactly as `flannel_linux.go` (github.com/flannel-io/cni-plugin) builds it, with
//! the delegate options kube-flannel's `cni-conf.json` adds (`hairpinMode`, `isDefaultGateway`).
//!
//! The plugin runs in the node's network namespace (as the container runtime would on the host)
//! with the pod's namespace in `CNI_NETNS`. Every pod is a [`CniPod`] guard that runs `DEL` and
//! removes its namespace on drop; host-local's `dataDir` is per network and removed once the
//! network and all its pods are gone, never the machine's `/var/lib/cni`.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
};

use anyhow::{bail, Context as _, Result};
use ipnet::Ipv4Net;
use serde_json::{json, Value};

use crate::netns::{unique_name, Netns};

/// Where Debian's `containernetworking-plugins` installs the plugins (`CNI_PATH`).
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The network name kube-flannel's `cni-conf.json` uses.
pub const NETWORK_NAME: &str = "cbr0";
/// The pod bridge flannel's delegate uses by default (the bridge plugin's default too).
pub const BRIDGE: &str = "cni0";
/// The CNI spec version of the configs we render (supported by plugins ≥ 1.0).
pub const CNI_VERSION: &str = "1.0.0";

/// What flannel's CNI plugin reads from `subnet.env` (`loadFlannelSubnetEnv`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlannelEnv {
    /// `FLANNEL_NETWORK`, comma-separated in flannel's format, duplicates dropped.
    pub networks: Vec<Ipv4Net>,
    /// `FLANNEL_SUBNET` as written (`10.244.1.1/24`: the gateway address and the prefix).
    pub subnet: Ipv4Net,
    pub mtu: u32,
    pub ipmasq: bool,
}

impl FlannelEnv {
    /// Parses `subnet.env` text; every one of the four variables must be there, as flannel's
    /// plugin requires (`FLANNEL_IPMASQ` is true only when it says `true`).
    pub fn parse(text: &str) -> Result<Self> {
        let (mut networks, mut subnet, mut mtu, mut ipmasq) = (None, None, None, None);
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "FLANNEL_NETWORK" => {
                    let mut nets: Vec<Ipv4Net> = Vec::new();
                    for cidr in value.split(',') {
                        let net: Ipv4Net =
                            cidr.parse().with_context(|| format!("FLANNEL_NETWORK={value}"))?;
                        if !nets.contains(&net.trunc()) {
                            nets.push(net.trunc());
                        }
                    }
                    networks = Some(nets);
                }
                "FLANNEL_SUBNET" => {
                    subnet = Some(
                        value
                            .parse::<Ipv4Net>()
                            .with_context(|| format!("FLANNEL_SUBNET={value}"))?,
                    )
                }
                "FLANNEL_MTU" => mtu = Some(value.parse().with_context(|| format!("FLANNEL_MTU={value}"))?),
                "FLANNEL_IPMASQ" => ipmasq = Some(value == "true"),
                _ => {}
            }
        }
        let missing: Vec<&str> = [
            ("FLANNEL_NETWORK", networks.is_none()),
            ("FLANNEL_SUBNET", subnet.is_none()),
            ("FLANNEL_MTU", mtu.is_none()),
            ("FLANNEL_IPMASQ", ipmasq.is_none()),
        ]
        .into_iter()
        .filter_map(|(k, absent)| absent.then_some(k))
        .collect();
        if !missing.is_empty() {
            bail!("subnet.env is missing {}:\n{text}", missing.join(", "));
        }
        Ok(FlannelEnv {
            networks: networks.unwrap_or_default(),
            subnet: subnet.context("FLANNEL_SUBNET")?,
            mtu: mtu.context("FLANNEL_MTU")?,
            ipmasq: ipmasq.context("FLANNEL_IPMASQ")?,
        })
    }
}

/// The bridge plugin's config as flannel's CNI plugin delegates it (`doCmdAdd`,
/// `getDelegateIPAM`), for kube-flannel's delegate `{"hairpinMode": true, "isDefaultGateway":
/// true}`: `ipMasq` is the opposite of `FLANNEL_IPMASQ` (when the overlay does not masquerade,
/// the bridge plugin does), `mtu` is `FLANNEL_MTU`, `isGateway` is set, and host-local IPAM gets
/// the lease as its one range (`FLANNEL_SUBNET` masked, as Go's `net.ParseCIDR` returns it) and a
/// route to each `FLANNEL_NETWORK`. `data_dir` is host-local's state directory.
pub fn flannel_delegate(env: &FlannelEnv, data_dir: &Path) -> Value {
    let routes: Vec<Value> = env
        .networks
        .iter()
        .map(|n| json!({ "dst": n.to_string() }))
        .collect();
    json!({
        "cniVersion": CNI_VERSION,
        "name": NETWORK_NAME,
        "type": "bridge",
        "bridge": BRIDGE,
        "hairpinMode": true,
        "isDefaultGateway": true,
        "isGateway": true,
        "ipMasq": !env.ipmasq,
        "mtu": env.mtu,
        "ipam": {
            "type": "host-local",
            "dataDir": data_dir,
            "ranges": [[{ "subnet": env.subnet.trunc().to_string() }]],
            "routes": routes,
        },
    })
}

/// One node's CNI network: the delegate config rendered from its `subnet.env` and host-local's
/// data directory (removed when the network and every pod added through it are dropped).
pub struct CniNetwork {
    inner: Arc<NetworkInner>,
}

/// Shared by a network and its pods, so host-local's directory outlives every `DEL`.
struct NetworkInner {
    /// The node's network namespace (by name), where the plugin runs.
    node_ns: String,
    config: Value,
    env: FlannelEnv,
    data_dir: PathBuf,
}

impl Drop for NetworkInner {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

impl CniNetwork {
    /// Renders the delegate config from the `subnet.env` at `subnet_file` for pods on the node
    /// whose namespace is `node`.
    pub fn from_subnet_env(node: &Netns, subnet_file: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(subnet_file)
            .with_context(|| format!("reading {}", subnet_file.display()))?;
        let env = FlannelEnv::parse(&text)?;
        let data_dir = std::env::temp_dir().join(unique_name("ovlcni"));
        Ok(CniNetwork {
            inner: Arc::new(NetworkInner {
                node_ns: node.name.clone(),
                config: flannel_delegate(&env, &data_dir),
                env,
                data_dir,
            }),
        })
    }

    /// The rendered delegate config (what the plugin gets on stdin).
    pub fn config(&self) -> &Value {
        &self.inner.config
    }

    /// What the config was rendered from.
    pub fn env(&self) -> &FlannelEnv {
        &self.inner.env
    }

    /// host-local's state directory for this network.
    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// Creates a pod namespace and runs the bridge plugin's `ADD` for it.
    pub fn add(&self) -> Result<CniPod> {
        self.add_pod(None)
    }

    /// Like [`CniNetwork::add`], asking host-local for `ip` (`CNI_ARGS=IP=…`), as a runtime
    /// does for a fixed address.
    pub fn add_with_ip(&self, ip: Ipv4Addr) -> Result<CniPod> {
        self.add_pod(Some(ip))
    }

    fn add_pod(&self, ip: Option<Ipv4Addr>) -> Result<CniPod> {
        let ns = Netns::new("ovlc")?;
        let cni_args = match ip {
            Some(ip) => format!("IgnoreUnknown=1;IP={ip}"),
            None => String::new(),
        };
        // The guard exists before ADD runs: a failed ADD is followed by DEL, as the spec
        // asks of a runtime, and the namespace goes.
        let mut pod = CniPod {
            container_id: unique_name("ctr"),
            cni_args,
            net: self.inner.clone(),
            result: Value::Null,
            ip: Ipv4Addr::UNSPECIFIED,
            prefix_len: 0,
            gateway: None,
            veth: String::new(),
            mac: String::new(),
            ns,
        };
        let result = pod.invoke("ADD", &self.inner.config)?;
        pod.take_result(result)?;
        Ok(pod)
    }
}

/// A pod made by the bridge plugin: its namespace with `eth0`, a host-side veth on the bridge,
/// an address from host-local, the plugin's `MASQUERADE` rules for it. On drop the plugin's
/// `DEL` undoes all that and the namespace is deleted.
pub struct CniPod {
    /// The pod's network namespace (`CNI_NETNS`).
    pub ns: Netns,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// The address host-local gave it (the plugin's result).
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    /// The gateway the result names (the bridge's address).
    pub gateway: Option<Ipv4Addr>,
    /// The host-side veth's name in the node's namespace.
    pub veth: String,
    /// The MAC of the pod's `eth0`, as the result lists it.
    pub mac: String,
    /// The plugin's whole result, for `CHECK`'s `prevResult` and for failure messages.
    pub result: Value,
    cni_args: String,
    net: Arc<NetworkInner>,
}

impl CniPod {
    /// Runs the bridge plugin's `CHECK` with the `ADD` result as `prevResult`: the plugin
    /// verifies the bridge, veth, address and routes it made are still as it left them.
    ///
    /// Routes in `prevResult` without `gw` get the result's gateway: plugins before 1.3.0
    /// (Debian 12 ships 1.1.1) install them via the gateway but look for them without one and
    /// fail their own fresh result (containernetworking/plugins#886, fixed by #887).
    pub fn check(&self) -> Result<()> {
        let mut prev = self.result.clone();
        if let (Some(gw), Some(routes)) = (self.gateway, prev["routes"].as_array_mut()) {
            for r in routes.iter_mut().filter(|r| r["gw"].is_null()) {
                r["gw"] = json!(gw.to_string());
            }
        }
        let mut config = self.net.config.clone();
        config["prevResult"] = prev;
        self.invoke("CHECK", &config).map(|_| ())
    }

    /// Runs the bridge plugin with `command` and `config` on stdin, in the node's namespace;
    /// returns its stdout. A failure carries the plugin's error (JSON on stdout) and stderr.
    fn invoke(&self, command: &str, config: &Value) -> Result<Vec<u8>> {
        let plugin = Path::new(CNI_BIN_DIR).join("bridge");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.net.node_ns])
            .arg(&plugin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", self.ns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_BIN_DIR)
            .env("CNI_ARGS", &self.cni_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {} in {}", plugin.display(), self.net.node_ns))?;
        child
            .stdin
            .take()
            .context("plugin stdin")?
            .write_all(config.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "CNI {command} of {} in node {} failed ({}): {}{}\nconfig: {config}",
                self.container_id,
                self.net.node_ns,
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out.stdout)
    }

    /// Reads the pod's address, gateway, host veth and MAC from an `ADD` result.
    fn take_result(&mut self, stdout: Vec<u8>) -> Result<()> {
        let v: Value = serde_json::from_slice(&stdout)
            .with_context(|| format!("CNI result: {}", String::from_utf8_lossy(&stdout)))?;
        let ifaces = v["interfaces"].as_array().context("result without interfaces")?;
        let ip = v["ips"]
            .as_array()
            .and_then(|ips| ips.first())
            .with_context(|| format!("result without ips: {v}"))?;
        let addr: Ipv4Net = ip["address"].as_str().context("ips[0].address")?.parse()?;
        let pod_if = ip["interface"]
            .as_u64()
            .and_then(|i| ifaces.get(i as usize))
            .with_context(|| format!("ips[0].interface names no interface: {v}"))?;
        // The host side: no sandbox, not the bridge.
        let veth = ifaces
            .iter()
            .find(|i| i["sandbox"].is_null() && i["name"] != BRIDGE)
            .and_then(|i| i["name"].as_str())
            .with_context(|| format!("result lists no host-side veth: {v}"))?;
        self.ip = addr.addr();
        self.prefix_len = addr.prefix_len();
        self.gateway = ip["gateway"].as_str().and_then(|g| g.parse().ok());
        self.veth = veth.to_string();
        self.mac = pod_if["mac"].as_str().unwrap_or_default().to_string();
        self.result = v;
        Ok(())
    }
}

impl Drop for CniPod {
    fn drop(&mut self) {
        // DEL while the namespace still exists (the plugin deletes the veth from inside it,
        // host-local releases the address, the MASQUERADE rules go); then the namespace field
        // drops and is deleted.
        if let Err(e) = self.invoke("DEL", &self.net.config) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";

    #[test]
    fn delegate_matches_flannels_for_a_node_without_ip_masq() {
        let env = FlannelEnv::parse(ENV).unwrap();
        let v = flannel_delegate(&env, Path::new("/tmp/x"));
        // Written out as flannel's plugin would produce it for kube-flannel's delegate.
        let want = json!({
            "cniVersion": "1.0.0",
            "name": "cbr0",
            "type": "bridge",
            "bridge": "cni0",
            "hairpinMode": true,
            "isDefaultGateway": true,
            "isGateway": true,
            "ipMasq": true,
            "mtu": 1450,
            "ipam": {
                "type": "host-local",
                "dataDir": "/tmp/x",
                "ranges": [[{ "subnet": "10.244.7.0/24" }]],
                "routes": [{ "dst": "10.244.0.0/16" }],
            },
        });
        assert_eq!(v, want);
        let masq = FlannelEnv::parse(&ENV.replace("IPMASQ=false", "IPMASQ=true")).unwrap();
        assert_eq!(flannel_delegate(&masq, Path::new("/tmp/x"))["ipMasq"], false);
    }

    #[test]
    fn several_networks_become_one_route_each_and_missing_variables_are_named() {
        let env = FlannelEnv::parse(&ENV.replace(
            "FLANNEL_NETWORK=10.244.0.0/16",
            "FLANNEL_NETWORK=10.244.0.0/16,10.96.0.0/12,10.244.0.0/16",
        ))
        .unwrap();
        assert_eq!(
            flannel_delegate(&env, Path::new("/d"))["ipam"]["routes"],
            json!([{ "dst": "10.244.0.0/16" }, { "dst": "10.96.0.0/12" }])
        );
        let err = FlannelEnv::parse("FLANNEL_SUBNET=10.244.7.1/24\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("FLANNEL_NETWORK, FLANNEL_MTU, FLANNEL_IPMASQ"),
            "{err}"
        );
    }
}
