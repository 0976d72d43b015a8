//! Which decap hook the underlay gets and how decapsulated packets reach a local pod: the
//! choice from `--decap`, `--deliver` and the underlay's driver.

use overlay_common::maps;

use tracing::{info, warn};

use crate::{
    dataplane::{Dataplane, DataplaneError, DecapMode},
    node::ethtool,
};

/// `--decap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapChoice {
    Auto,
    Xdp,
    Tc,
}

impl DecapChoice {
    /// `--decap`'s values.
    pub const NAMES: [(&'static str, DecapChoice); 3] = [
        ("auto", DecapChoice::Auto),
        ("xdp", DecapChoice::Xdp),
        ("tc", DecapChoice::Tc),
    ];
}

/// `--deliver`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliverChoice {
    Peer,
    Veth,
    Stack,
}

impl DeliverChoice {
    /// `--deliver`'s values.
    pub const NAMES: [(&'static str, DeliverChoice); 3] = [
        ("peer", DeliverChoice::Peer),
        ("veth", DeliverChoice::Veth),
        ("stack", DeliverChoice::Stack),
    ];
}

/// The decap hook for the underlay and why.
#[derive(Debug)]
pub struct DecapChoiceMade {
    pub mode: DecapMode,
    /// XDP must run in the driver (auto on a hardware NIC: generic XDP would be slower than TC).
    pub native_only: bool,
    /// The underlay is a hardware (or paravirtual) NIC, not a veth or other virtual device.
    pub hardware: bool,
    pub why: String,
}

/// `--decap` (`OVERLAY_DECAP`, the variable of earlier releases, still counts when the flag is
/// left at auto). Auto: XDP on a NIC with a bus address (a hardware or virtio NIC: its driver
/// runs XDP before GRO and builds no skb for dropped frames); TC on veth and other virtual
/// devices, where XDP would turn GSO off on the peer and copy every frame, while TC keeps GSO
/// super-packets whole.
pub fn choose_decap(flag: DecapChoice, iface: &str) -> DecapChoiceMade {
    let info = ethtool::driver_info(iface).ok();
    let hardware = info.as_ref().is_some_and(|i| !i.bus_info.is_empty());
    let driver = info.as_ref().map_or("unknown", |i| i.driver.as_str()).to_string();
    let flag = match (flag, std::env::var("OVERLAY_DECAP").as_deref()) {
        (DecapChoice::Auto, Ok("tc")) => DecapChoice::Tc,
        (DecapChoice::Auto, Ok("xdp")) => DecapChoice::Xdp,
        (f, _) => f,
    };
    let (mode, native_only, why) = match flag {
        DecapChoice::Xdp => (DecapMode::Xdp, false, "--decap xdp".to_string()),
        DecapChoice::Tc => (DecapMode::Tc, false, "--decap tc".to_string()),
        DecapChoice::Auto if hardware => (
            DecapMode::Xdp,
            true,
            format!("auto: {iface} is a NIC (driver {driver}): XDP in the driver, before GRO"),
        ),
        DecapChoice::Auto => (
            DecapMode::Tc,
            false,
            format!("auto: {iface} is a virtual device (driver {driver}): TC keeps GSO packets whole"),
        ),
    };
    DecapChoiceMade {
        mode,
        native_only,
        hardware,
        why,
    }
}

/// The `DataplaneConfig::flags` bits that come from flags and the underlay.
pub fn datapath_flags(deliver: DeliverChoice, hardware: bool) -> u16 {
    let mut flags = 0;
    match deliver {
        DeliverChoice::Peer => {}
        DeliverChoice::Veth => flags |= maps::CONFIG_DELIVER_VIA_VETH,
        DeliverChoice::Stack => flags |= maps::CONFIG_NO_DELIVER,
    }
    if hardware {
        // The NIC verified the checksums; stripping the outer headers must not forget that.
        flags |= maps::CONFIG_KEEP_CSUM;
    }
    flags
}

/// Attaches decap to the underlay as `flag` and the underlay's driver say: auto's native XDP
/// falls back to TC where the driver runs none; with XDP, GRO is turned on (XDP-stripped frames
/// are merged before routing).
pub fn attach(dp: &mut Dataplane, iface: &str, flag: DecapChoice) -> Result<DecapChoiceMade, DataplaneError> {
    let mut choice = choose_decap(flag, iface);
    info!(iface, mode = ?choice.mode, why = %choice.why, "decap mode");
    if let Err(e) = dp.attach_decap(iface, choice.mode, choice.native_only) {
        if !choice.native_only {
            return Err(e);
        }
        warn!(iface, error = %e, "the driver runs no XDP; using TC decap");
        choice.mode = DecapMode::Tc;
        dp.attach_decap(iface, DecapMode::Tc, false)?;
    }
    if choice.mode == DecapMode::Xdp {
        match ethtool::ensure_gro(iface) {
            Ok(true) => info!(
                iface,
                "turned GRO on: XDP-decapsulated frames are merged before routing"
            ),
            Ok(false) => {}
            Err(e) => warn!(iface, error = %e, "could not turn GRO on"),
        }
    }
    Ok(choice)
}

impl DecapChoiceMade {
    /// Whether the receive-GRO device is kept (`--receive-gro`): XDP strips before GRO, so GRO
    /// merges the inner frames without help; TC decap runs after GRO and needs the device for
    /// it (see `node::grodev`).
    pub fn receive_gro(&self, flag: bool) -> bool {
        flag && self.mode == DecapMode::Tc
    }
}
