//! Interface ioctls: ethtool settings (GRO, TSO, device features, the driver) and the MTU.

#[derive(Debug, thiserror::Error)]
pub enum EthtoolError {
    #[error("opening a socket for interface ioctls: {0}")]
    Socket(nix::Error),
    #[error("{iface}: interface ioctl {request:#x}: {source}")]
    Ioctl {
        iface: String,
        request: libc::c_ulong,
        source: nix::Error,
    },
    #[error("{iface}: feature {feature}: {why}")]
    Feature {
        iface: String,
        feature: String,
        why: &'static str,
    },
}

/// Runs an interface ioctl on `name`: `fill` sets the request's payload, the filled-in request
/// comes back.
fn if_ioctl(
    name: &str,
    request: libc::c_ulong,
    fill: impl FnOnce(&mut libc::ifreq),
) -> Result<libc::ifreq, EthtoolError> {
    use std::os::fd::AsRawFd as _;
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(EthtoolError::Socket)?;
    // SAFETY: ifreq is plain data; the name is NUL-terminated within IFNAMSIZ.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *d = s as libc::c_char;
    }
    fill(&mut req);
    // SAFETY: an interface ioctl on a valid ifreq whose payload `fill` set up.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, &mut req) };
    if rc < 0 {
        return Err(EthtoolError::Ioctl {
            iface: name.to_string(),
            request,
            source: nix::Error::last(),
        });
    }
    Ok(req)
}

/// MTU of `name` (SIOCGIFMTU).
pub fn link_mtu(name: &str) -> Result<u32, EthtoolError> {
    let req = if_ioctl(name, libc::SIOCGIFMTU, |_| {})?;
    // SAFETY: the kernel filled the mtu member.
    Ok(unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

/// Turns GRO on for `name` if it is off (ETHTOOL_SGRO). XDP decap hands inner frames to the
/// stack one by one; GRO merges them back into large TCP segments before routing. Real NICs
/// have it on already; veth has it off by default. Returns true when it changed the setting.
pub fn ensure_gro(name: &str) -> Result<bool, EthtoolError> {
    const ETHTOOL_GGRO: u32 = 0x2b;
    const ETHTOOL_SGRO: u32 = 0x2c;
    ethtool_flag(name, ETHTOOL_GGRO, ETHTOOL_SGRO, true)
}

/// Turns TCP segmentation offload off for `name` if it is on (ETHTOOL_STSO): the device's
/// transmit then segments TCP GSO packets in software. Returns true when it changed the setting.
pub fn disable_tso(name: &str) -> Result<bool, EthtoolError> {
    const ETHTOOL_GTSO: u32 = 0x1e;
    const ETHTOOL_STSO: u32 = 0x1f;
    ethtool_flag(name, ETHTOOL_GTSO, ETHTOOL_STSO, false)
}

/// Turns the device feature `feature` (as `ethtool -k` names it, e.g. `tx-udp-segmentation`) off
/// for `name`: its bit from the kernel's feature names (ETHTOOL_GSTRINGS), cleared with
/// ETHTOOL_SFEATURES and read back (ETHTOOL_GFEATURES). Err when the kernel has no such feature
/// or it stays on.
pub fn disable_feature(name: &str, feature: &str) -> Result<(), EthtoolError> {
    const ETHTOOL_GSTRINGS: u32 = 0x1b;
    const ETHTOOL_GSSET_INFO: u32 = 0x37;
    const ETHTOOL_GFEATURES: u32 = 0x3a;
    const ETHTOOL_SFEATURES: u32 = 0x3b;
    const ETH_SS_FEATURES: u32 = 4;
    const ETH_GSTRING_LEN: usize = 32;
    let call = |buf: &mut [u32]| -> Result<(), EthtoolError> {
        if_ioctl(name, libc::SIOCETHTOOL, |req| {
            req.ifr_ifru.ifru_data = buf.as_mut_ptr().cast()
        })
        .map(drop)
    };
    let missing = |why: &'static str| EthtoolError::Feature {
        iface: name.to_string(),
        feature: feature.to_string(),
        why,
    };
    // struct ethtool_sset_info: cmd, reserved, u64 sset_mask, then one u32 per set in the mask.
    let mut info = [ETHTOOL_GSSET_INFO, 0, 1 << ETH_SS_FEATURES, 0, 0];
    call(&mut info)?;
    let count = info[4] as usize;
    // struct ethtool_gstrings: cmd, string_set, len, then len names of 32 bytes.
    let mut strings = vec![0u32; 3 + count * ETH_GSTRING_LEN / 4];
    strings[..3].copy_from_slice(&[ETHTOOL_GSTRINGS, ETH_SS_FEATURES, count as u32]);
    call(&mut strings)?;
    let names: Vec<u8> = strings[3..].iter().flat_map(|w| w.to_ne_bytes()).collect();
    let bit = names
        .chunks(ETH_GSTRING_LEN)
        .position(|n| n.split(|b| *b == 0).next() == Some(feature.as_bytes()))
        .ok_or_else(|| missing("the kernel has no such feature"))?;
    let blocks = count.div_ceil(32);
    let (block, mask) = (bit / 32, 1u32 << (bit % 32));
    // struct ethtool_sfeatures: cmd, size, then per block {valid, requested}.
    let mut set = vec![0u32; 2 + 2 * blocks];
    set[..2].copy_from_slice(&[ETHTOOL_SFEATURES, blocks as u32]);
    set[2 + 2 * block] = mask;
    call(&mut set)?;
    // struct ethtool_gfeatures: cmd, size, then per block {available, requested, active,
    // never_changed}.
    let mut get = vec![0u32; 2 + 4 * blocks];
    get[..2].copy_from_slice(&[ETHTOOL_GFEATURES, blocks as u32]);
    call(&mut get)?;
    if get[2 + 4 * block + 2] & mask != 0 {
        return Err(missing("still on after turning it off (a fixed feature)"));
    }
    Ok(())
}

/// Sets an on/off ethtool setting (`get`/`set` commands, struct ethtool_value) to `on` unless it
/// is already; true when it changed it.
fn ethtool_flag(name: &str, get: u32, set: u32, on: bool) -> Result<bool, EthtoolError> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let call = |cmd: u32, data: u32| -> Result<u32, EthtoolError> {
        let mut v = EthtoolValue { cmd, data };
        if_ioctl(name, libc::SIOCETHTOOL, |req| {
            req.ifr_ifru.ifru_data = (&mut v as *mut EthtoolValue).cast()
        })?;
        Ok(v.data)
    };
    if (call(get, 0)? != 0) == on {
        return Ok(false);
    }
    call(set, u32::from(on))?;
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
pub fn driver_info(name: &str) -> Result<DriverInfo, EthtoolError> {
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
