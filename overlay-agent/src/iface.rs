//! The underlay interface: `--iface` (name or IPv4 address, first match wins) or the interface of
//! the default IPv4 route; and the node's stable VTEP MAC.

use std::{fs, net::Ipv4Addr};

#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error("--iface {0:?}: no interface has that name or IPv4 address")]
    NotFound(String),
    #[error("no default IPv4 route in /proc/net/route; pass --iface NAME or --iface ADDRESS")]
    NoDefaultRoute,
    #[error("interface {0} has no IPv4 address; give it one or pick another with --iface")]
    NoIpv4(String),
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: unexpected content {content:?}")]
    Parse { path: String, content: String },
    #[error("listing interface addresses: {0}")]
    Getifaddrs(#[from] nix::Error),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub name: String,
    pub ifindex: u32,
    pub ipv4: Ipv4Addr,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// Resolves the underlay from `--iface` values (empty = default route).
pub fn resolve(ifaces: &[String]) -> Result<Underlay, IfaceError> {
    let addrs = ipv4_addrs()?;
    if ifaces.is_empty() {
        let name = default_route_iface(&read("/proc/net/route")?).ok_or(IfaceError::NoDefaultRoute)?;
        return underlay(&name, &addrs, None);
    }
    for want in ifaces {
        if let Ok(ip) = want.parse::<Ipv4Addr>() {
            if let Some((name, _)) = addrs.iter().find(|(_, a)| *a == ip) {
                return underlay(name, &addrs, Some(ip));
            }
        } else if nix::net::if_::if_nametoindex(want.as_str()).is_ok() {
            return underlay(want, &addrs, None);
        }
    }
    Err(IfaceError::NotFound(ifaces.join(",")))
}

fn underlay(name: &str, addrs: &[(String, Ipv4Addr)], ip: Option<Ipv4Addr>) -> Result<Underlay, IfaceError> {
    let ipv4 = match ip {
        Some(ip) => ip,
        None => addrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .ok_or_else(|| IfaceError::NoIpv4(name.into()))?,
    };
    // Netlink-backed calls only (no sysfs): they answer for the caller's network namespace
    // even when /sys belongs to another one.
    let ifindex = nix::net::if_::if_nametoindex(name).map_err(|_| IfaceError::NotFound(name.into()))?;
    let mac = nix::ifaddrs::getifaddrs()?
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address?.as_link_addr()?.addr())
        .ok_or_else(|| IfaceError::Parse {
            path: format!("{name} link address"),
            content: String::new(),
        })?;
    let mtu = link_mtu(name)?;
    Ok(Underlay {
        name: name.to_string(),
        ifindex,
        ipv4,
        mac,
        mtu,
    })
}

/// Runs an interface ioctl on `name`: `fill` sets the request's payload, the filled-in request
/// comes back.
fn if_ioctl(
    name: &str,
    request: libc::c_ulong,
    fill: impl FnOnce(&mut libc::ifreq),
) -> Result<libc::ifreq, IfaceError> {
    use std::os::fd::AsRawFd as _;
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain data; the name is NUL-terminated within IFNAMSIZ.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *d = s as libc::c_char;
    }
    fill(&mut req);
    // SAFETY: an interface ioctl on a valid ifreq whose payload `fill` set up.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, &mut req) };
    if rc < 0 {
        return Err(IfaceError::Getifaddrs(nix::Error::last()));
    }
    Ok(req)
}

/// MTU of `name` (SIOCGIFMTU).
fn link_mtu(name: &str) -> Result<u32, IfaceError> {
    let req = if_ioctl(name, libc::SIOCGIFMTU, |_| {})?;
    // SAFETY: the kernel filled the mtu member.
    Ok(unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

fn read(path: &str) -> Result<String, IfaceError> {
    fs::read_to_string(path).map_err(|source| IfaceError::Read {
        path: path.into(),
        source,
    })
}

/// (interface, IPv4) pairs in kernel order.
fn ipv4_addrs() -> Result<Vec<(String, Ipv4Addr)>, IfaceError> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|ifa| {
            let a = ifa.address?.as_sockaddr_in()?.ip();
            Some((ifa.interface_name, a))
        })
        .collect())
}

/// The interface of the lowest-metric default route in `/proc/net/route` text.
pub fn default_route_iface(route_table: &str) -> Option<String> {
    route_table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            if f.len() < 8 || f[1] != "00000000" || f[7] != "00000000" {
                return None;
            }
            let flags = u32::from_str_radix(f[3], 16).ok()?;
            if flags & 0x1 == 0 {
                return None; // RTF_UP
            }
            Some((f[6].parse::<u32>().ok()?, f[0].to_string()))
        })
        .min()
        .map(|(_, n)| n)
}

/// A stable, locally administered unicast MAC for this node's VTEP: FNV-1a over
/// `/etc/machine-id` and the public IP, so it survives restarts and differs between nodes.
pub fn derive_vtep_mac(machine_id: &str, public_ip: Ipv4Addr) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in machine_id.trim().bytes().chain(public_ip.octets()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    let mut mac = [b[0], b[1], b[2], b[3], b[4], b[5]];
    mac[0] = (mac[0] | 0x02) & !0x01;
    mac
}

/// [`derive_vtep_mac`] with this machine's `/etc/machine-id` (empty when missing).
pub fn default_vtep_mac(public_ip: Ipv4Addr) -> [u8; 6] {
    let id = fs::read_to_string("/etc/machine-id").unwrap_or_default();
    derive_vtep_mac(&id, public_ip)
}

/// Turns GRO on for `name` if it is off (ETHTOOL_SGRO). XDP decap hands inner frames to the
/// stack one by one; GRO merges them back into large TCP segments before routing. Real NICs
/// have it on already; veth has it off by default. Returns true when it changed the setting.
pub fn ensure_gro(name: &str) -> Result<bool, IfaceError> {
    const ETHTOOL_GGRO: u32 = 0x2b;
    const ETHTOOL_SGRO: u32 = 0x2c;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let call = |cmd: u32, data: u32| -> Result<u32, IfaceError> {
        let mut v = EthtoolValue { cmd, data };
        if_ioctl(name, libc::SIOCETHTOOL, |req| {
            req.ifr_ifru.ifru_data = (&mut v as *mut EthtoolValue).cast()
        })?;
        Ok(v.data)
    };
    if call(ETHTOOL_GGRO, 0)? != 0 {
        return Ok(false);
    }
    call(ETHTOOL_SGRO, 1)?;
    Ok(true)
}

/// What ethtool says about a device's driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverInfo {
    /// e.g. `veth`, `mlx5_core`, `virtio_net`.
    pub driver: String,
    /// The bus address of the device (`0000:03:00.0`); empty for virtual devices.
    pub bus_info: String,
}

/// The driver of `name` (ETHTOOL_GDRVINFO).
pub fn driver_info(name: &str) -> Result<DriverInfo, IfaceError> {
    const ETHTOOL_GDRVINFO: u32 = 0x03;
    // struct ethtool_drvinfo: cmd, driver[32], version[32], fw_version[32], bus_info[32],
    // erom_version[32], reserved2[12], five u32 counts.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        rest: [u8; 32 + 12 + 20],
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        rest: [0; 64],
    };
    if_ioctl(name, libc::SIOCETHTOOL, |req| {
        req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast()
    })?;
    let text = |b: &[u8]| {
        let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    Ok(DriverInfo {
        driver: text(&info.driver),
        bus_info: text(&info.bus_info),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route() {
        let t = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth0\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                 eth1\t00000000\t0101A8C0\t0003\t0\t0\t50\t00000000\t0\t0\t0\n\
                 eth2\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_route_iface(t).as_deref(), Some("eth1"));
        assert_eq!(default_route_iface("Iface\tDestination\n"), None);
    }

    #[test]
    fn vtep_mac_is_stable_local_unicast() {
        let a = derive_vtep_mac(
            "3d1219c7c4c5404aaa1f6d2a48adfda4\n",
            Ipv4Addr::new(198, 18, 0, 11),
        );
        assert_eq!(
            a,
            derive_vtep_mac("3d1219c7c4c5404aaa1f6d2a48adfda4", Ipv4Addr::new(198, 18, 0, 11))
        );
        assert_ne!(
            a,
            derive_vtep_mac("3d1219c7c4c5404aaa1f6d2a48adfda4", Ipv4Addr::new(198, 18, 0, 12))
        );
        for ip in 0..=255u8 {
            let m = derive_vtep_mac("x", Ipv4Addr::new(10, 0, 0, ip));
            assert_eq!(m[0] & 0x03, 0x02, "{m:02x?} not locally administered unicast");
        }
    }

    #[test]
    fn loopback_by_name_and_address() {
        let lo = resolve(&["lo".into()]).unwrap();
        assert_eq!(lo.ipv4, Ipv4Addr::LOCALHOST);
        assert_eq!(lo.mac, [0; 6]);
        assert!(lo.ifindex > 0 && lo.mtu > 0);
        let by_ip = resolve(&["no-such-if0".into(), "127.0.0.1".into()]).unwrap();
        assert_eq!(by_ip.name, "lo");
        assert!(matches!(
            resolve(&["no-such-if0".into()]),
            Err(IfaceError::NotFound(_))
        ));
    }
}
