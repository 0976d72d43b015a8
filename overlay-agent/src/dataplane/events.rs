//! The kernel side of `overlay-agent monitor`: the pinned ring buffer the programs report drops
//! into (`OVL_EVENTS`), the settings that switch the reports on (`OVL_MONITOR`, see
//! `overlay_common::monitor`) and the counts of what the kernel kept back. Works on the pins,
//! whether the agent runs or not.

use std::{
    fs::File,
    os::fd::{AsRawFd as _, RawFd},
    path::{Path, PathBuf},
};

use aya::maps::{Array, Map, MapData, PerCpuArray, RingBuf};

use super::{
    pinned::{monotonic_ns, open},
    DataplaneError,
};
use overlay_common::{
    maps,
    monitor::{MonitorConfig, LEASE_NS},
    Counter,
};

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// A map is not pinned (the agent never ran, or an older one without the event ring) or
    /// cannot be read.
    #[error(transparent)]
    Pins(#[from] DataplaneError),
    #[error("{name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "another `overlay-agent monitor` is attached to {0} (one at a time: the ring buffer has one \
         reader); stop it first"
    )]
    Busy(PathBuf),
    #[error("opening {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A monitor's hold on the datapath: the reports switched on (renewed with [`EventRing::renew`],
/// switched off when dropped; a holder killed outright stops them when its lease runs out) and
/// the ring they arrive in. One at a time: it holds a lock on the pin root.
pub struct EventRing {
    ring: RingBuf<MapData>,
    config: Array<MapData, MonitorConfig>,
    counters: PerCpuArray<MapData, u64>,
    want: MonitorConfig,
    _lock: File,
}

impl EventRing {
    /// Attaches for the drop reasons whose bits `reasons` has, at most `rate` events a second
    /// per CPU and `burst` at once. What a previous monitor left in the ring is discarded.
    pub fn attach(pin_root: &Path, reasons: u64, rate: u32, burst: u32) -> Result<Self, EventsError> {
        let ring_data = open(pin_root, maps::EVENTS)?;
        // The lock is on the pin root (bpffs refuses to open a ring buffer's pin as a file).
        let lock = File::open(pin_root).map_err(|source| EventsError::Io {
            path: pin_root.to_path_buf(),
            source,
        })?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(EventsError::Busy(pin_root.join(maps::EVENTS)));
        }
        let map_err = |name| move |source| EventsError::Map { name, source };
        let ring = RingBuf::try_from(Map::RingBuf(ring_data)).map_err(map_err(maps::EVENTS))?;
        let config =
            Array::try_from(Map::Array(open(pin_root, maps::MONITOR)?)).map_err(map_err(maps::MONITOR))?;
        let counters = PerCpuArray::try_from(Map::PerCpuArray(open(pin_root, maps::COUNTERS)?))
            .map_err(map_err(maps::COUNTERS))?;
        let mut r = EventRing {
            ring,
            config,
            counters,
            want: MonitorConfig {
                until_ns: 0,
                reasons,
                rate,
                burst,
            },
            _lock: lock,
        };
        while r.ring.next().is_some() {}
        r.renew()?;
        Ok(r)
    }

    /// Moves the reports' lease forward ([`LEASE_NS`] from now).
    pub fn renew(&mut self) -> Result<(), EventsError> {
        self.want.until_ns = monotonic_ns() + LEASE_NS;
        self.config
            .set(0, self.want, 0)
            .map_err(|source| EventsError::Map {
                name: maps::MONITOR,
                source,
            })
    }

    /// The descriptor to poll for events.
    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Hands each event waiting in the ring (its raw bytes) to `f` until `f` says stop (false).
    pub fn drain(&mut self, mut f: impl FnMut(&[u8]) -> bool) {
        while let Some(item) = self.ring.next() {
            if !f(&item) {
                return;
            }
        }
    }

    /// Drops the kernel kept back so far, node-wide: (over the rate limit, lost to a full ring).
    pub fn kept_back(&self) -> (u64, u64) {
        let sum = |k: Counter| {
            self.counters
                .get(&(k as u32), 0)
                .map(|v| v.iter().sum::<u64>())
                .unwrap_or(0)
        };
        (sum(Counter::MonitorSuppressed), sum(Counter::MonitorLost))
    }

    /// Switches the reports off (also done when dropped).
    pub fn detach(&mut self) {
        let _ = self.config.set(0, MonitorConfig::default(), 0);
    }
}

impl Drop for EventRing {
    fn drop(&mut self) {
        self.detach();
    }
}
