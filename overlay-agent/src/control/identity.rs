//! Who this node is in the leases it publishes: its public addresses, its VTEP MAC, the MTU
//! subnet.env derives from.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::{backend::BackendKind, config::NetworkConfig, lease::LeaseAttrs, ControlError};

/// Who this node is on the underlay, in each family it has an address in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// `PublicIP` (needed when the network config enables IPv4).
    pub public_ip: Option<Ipv4Addr>,
    /// `PublicIPv6` (needed when the network config enables IPv6).
    pub public_ipv6: Option<Ipv6Addr>,
    /// The VTEP MAC published for both families (`BackendData` and `BackendV6Data`).
    pub vtep_mac: [u8; 6],
    pub iface_mtu: u32,
    /// The underlay interface's own addresses (host-gw needs the PublicIP among them).
    pub iface_addrs: Vec<IpAddr>,
}

impl NodeIdentity {
    /// Identity with the VTEP MAC derived from /etc/machine-id and the public IP (the IPv4
    /// one when there is one, so an IPv4 node keeps its MAC when IPv6 is turned on).
    pub fn new(
        public_ip: Option<Ipv4Addr>,
        public_ipv6: Option<Ipv6Addr>,
        iface_mtu: u32,
        iface_addrs: Vec<IpAddr>,
    ) -> Self {
        let basis = match (public_ip, public_ipv6) {
            (Some(ip), _) => IpAddr::V4(ip),
            (None, Some(ip)) => IpAddr::V6(ip),
            (None, None) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        NodeIdentity {
            public_ip,
            public_ipv6,
            vtep_mac: default_vtep_mac(basis),
            iface_mtu,
            iface_addrs,
        }
    }

    /// What we publish under the config's families; an enabled family without a public
    /// address of ours is an error.
    pub fn lease_attrs(&self, config: &NetworkConfig) -> Result<LeaseAttrs, ControlError> {
        let ip = match (config.ipv4.is_some(), self.public_ip) {
            (false, _) => None,
            (true, Some(ip)) => Some(ip),
            (true, None) => {
                return Err(ControlError::NoPublicAddress {
                    family: "IPv4",
                    flag: "--public-ip",
                })
            }
        };
        let ip6 = match (config.ipv6.is_some(), self.public_ipv6) {
            (false, _) => None,
            (true, Some(ip)) => Some(ip),
            (true, None) => {
                return Err(ControlError::NoPublicAddress {
                    family: "IPv6",
                    flag: "--public-ipv6",
                })
            }
        };
        Ok(match config.backend.kind {
            BackendKind::Vxlan => LeaseAttrs::vxlan_dual(ip, ip6, config.backend.vni, self.vtep_mac),
            BackendKind::HostGw => {
                self.on_the_interface(ip, ip6)?;
                LeaseAttrs::host_gw(ip, ip6)
            }
        })
    }

    /// host-gw routes peers' subnets via their PublicIP, so it must be the interface's own
    /// address: flanneld's host-gw refuses to start otherwise (a node behind NAT).
    fn on_the_interface(&self, ip: Option<Ipv4Addr>, ip6: Option<Ipv6Addr>) -> Result<(), ControlError> {
        let v4 = ip.filter(|ip| !self.iface_addrs.contains(&IpAddr::V4(*ip)));
        let v6 = ip6.filter(|ip| !self.iface_addrs.contains(&IpAddr::V6(*ip)));
        match v4.map(IpAddr::V4).or(v6.map(IpAddr::V6)) {
            None => Ok(()),
            Some(public) => Err(ControlError::PublicIpNotOnInterface { public }),
        }
    }
}

/// A stable, locally administered unicast MAC for this node's VTEP: FNV-1a over
/// `/etc/machine-id` and the public IP (4 or 16 bytes), so it survives restarts and differs
/// between nodes. One MAC serves both families: flanneld's two VTEP devices (`flannel.1`,
/// `flannel-v6.1`) get two random MACs, but peers key their FDB and neighbour entries per
/// device, so nothing requires them to differ.
pub fn derive_vtep_mac(machine_id: &str, public_ip: IpAddr) -> [u8; 6] {
    let octets = match public_ip {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in machine_id.trim().bytes().chain(octets) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    let mut mac = [b[0], b[1], b[2], b[3], b[4], b[5]];
    mac[0] = (mac[0] | 0x02) & !0x01;
    mac
}

/// [`derive_vtep_mac`] with this machine's `/etc/machine-id` (empty when missing).
pub fn default_vtep_mac(public_ip: IpAddr) -> [u8; 6] {
    let id = fs::read_to_string("/etc/machine-id").unwrap_or_default();
    derive_vtep_mac(&id, public_ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_mac_is_stable_local_unicast() {
        let a = derive_vtep_mac(
            "3d1219c7c4c5404aaa1f6d2a48adfda4\n",
            Ipv4Addr::new(198, 18, 0, 11).into(),
        );
        assert_eq!(
            a,
            derive_vtep_mac(
                "3d1219c7c4c5404aaa1f6d2a48adfda4",
                Ipv4Addr::new(198, 18, 0, 11).into()
            )
        );
        assert_ne!(
            a,
            derive_vtep_mac(
                "3d1219c7c4c5404aaa1f6d2a48adfda4",
                Ipv4Addr::new(198, 18, 0, 12).into()
            )
        );
        for ip in 0..=255u8 {
            let m = derive_vtep_mac("x", Ipv4Addr::new(10, 0, 0, ip).into());
            assert_eq!(m[0] & 0x03, 0x02, "{m:02x?} not locally administered unicast");
        }
        // IPv6-only nodes derive theirs from PublicIPv6.
        let v6 = derive_vtep_mac("x", "fd00::11".parse::<Ipv6Addr>().unwrap().into());
        assert_eq!(v6[0] & 0x03, 0x02);
        assert_ne!(
            v6,
            derive_vtep_mac("x", "fd00::12".parse::<Ipv6Addr>().unwrap().into())
        );
    }
}
