//! The sysctls the datapath needs: forwarding on (decapsulated packets are routed to the bridge
//! when they go through the stack).

use tracing::info;

#[derive(Debug, thiserror::Error)]
#[error("enabling {name}: {source}")]
pub struct SysctlError {
    name: &'static str,
    source: std::io::Error,
}

/// The datapath needs forwarding on (decapsulated packets are routed to the bridge).
pub fn enable_ip_forward() -> Result<(), SysctlError> {
    enable_sysctl("net.ipv4.ip_forward", "/proc/sys/net/ipv4/ip_forward")
}

/// IPv6 pod traffic is routed between the underlay and the bridge like IPv4's.
pub fn enable_ipv6_forwarding() -> Result<(), SysctlError> {
    enable_sysctl(
        "net.ipv6.conf.all.forwarding",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    )
}

/// Sets a boolean sysctl to 1 unless it is already.
fn enable_sysctl(name: &'static str, path: &str) -> Result<(), SysctlError> {
    let now = std::fs::read_to_string(path).unwrap_or_default();
    if now.trim() != "1" {
        std::fs::write(path, "1").map_err(|source| SysctlError { name, source })?;
        info!("enabled {name}");
    }
    Ok(())
}
