//! Subnet leases in flannel's order (pkg/subnet/etcd/local_manager.go `tryAcquireLease`), on top
//! of a [`Registry`]: reuse the lease that carries our PublicIP, else the subnet from an existing
//! subnet.env if free, else a random free subnet in [SubnetMin, SubnetMax].

pub mod etcd;
pub mod registry;

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    time::Duration,
};

use ipnet::Ipv4Net;
use rand::seq::SliceRandom as _;
use tokio::time::Instant;

pub use registry::{KeyValue, MemRegistry, Registry, RegistryError, RegistryWatch, WatchEvent, Written};

use crate::{
    config::NetworkConfig,
    lease::{parse_subnet_key, parse_vxlan_lease, Lease, LeaseAttrs, LeaseError},
};

/// flannel's `subnetTTL`.
pub const SUBNET_TTL: Duration = Duration::from_secs(24 * 3600);
/// How many times a lost create/update race is retried before giving up for this round.
const MAX_RACE_RETRIES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SubnetError {
    #[error(
        "pool exhausted: all {total} /{len} subnets from {min} to {max} in {network} are leased; \
         widen Network or SubnetMin/SubnetMax in the network config, or delete stale leases"
    )]
    Exhausted {
        total: u64,
        len: u8,
        min: Ipv4Addr,
        max: Ipv4Addr,
        network: Ipv4Net,
    },
    #[error("lost the race for a subnet {0} times in a row; giving up this round")]
    TooManyRaces(usize),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// The lease this node holds, with the etcd bookkeeping needed to renew it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnLease {
    pub lease: Lease,
    /// 0 for a reservation (never renewed, never expires).
    pub lease_id: i64,
    pub mod_revision: i64,
}

impl OwnLease {
    pub fn is_reservation(&self) -> bool {
        self.lease_id == 0
    }
}

/// Acquires, renews and interprets subnet leases for one node.
pub struct SubnetManager<R> {
    pub registry: R,
    pub config: NetworkConfig,
    attrs: LeaseAttrs,
    /// The subnet we held last (subnet.env at start, then our own lease): tried first when free.
    previous: Option<Ipv4Net>,
    renew_margin: Duration,
    warned: HashSet<String>,
}

impl<R: Registry> SubnetManager<R> {
    pub fn new(
        registry: R,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        previous: Option<Ipv4Net>,
        renew_margin: Duration,
    ) -> Self {
        SubnetManager {
            registry,
            config,
            attrs,
            previous,
            renew_margin,
            warned: HashSet::new(),
        }
    }

    pub fn public_ip(&self) -> Ipv4Addr {
        self.attrs.public_ip
    }

    pub fn set_previous(&mut self, sn: Ipv4Net) {
        self.previous = Some(sn);
    }

    /// Acquires a lease, retrying lost races. `Exhausted` when no subnet is free.
    pub async fn acquire(&mut self) -> Result<OwnLease, SubnetError> {
        for _ in 0..MAX_RACE_RETRIES {
            match self.try_acquire().await {
                Ok(l) => {
                    self.previous = Some(l.lease.subnet);
                    return Ok(l);
                }
                Err(SubnetError::Registry(RegistryError::AlreadyExists(k) | RegistryError::Conflict(k))) => {
                    tracing::debug!(key = %k, "lost a race for a subnet, trying again");
                    // Spread retries of many simultaneous acquirers a little.
                    let jitter = rand::random::<u64>() % 20;
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(SubnetError::TooManyRaces(MAX_RACE_RETRIES))
    }

    async fn try_acquire(&mut self) -> Result<OwnLease, SubnetError> {
        let (kvs, _rev) = self.registry.list_subnets().await?;
        let mut taken = HashSet::new();
        let mut mine: Vec<(Ipv4Net, &KeyValue)> = Vec::new();
        for kv in &kvs {
            let Ok(sn) = parse_subnet_key(&kv.key) else {
                continue;
            };
            taken.insert(sn);
            if probe_public_ip(&kv.value) == Some(self.attrs.public_ip) {
                mine.push((sn, kv));
            }
        }
        // Reservations first, then the rest, as found.
        mine.sort_by_key(|(_, kv)| kv.lease_id != 0);
        let value = self.attrs.to_json();
        for (sn, kv) in mine {
            if self.config.is_compatible(sn) {
                let reservation = kv.lease_id == 0;
                tracing::info!(subnet = %sn, reservation, public_ip = %self.attrs.public_ip,
                    "found a lease for our public IP, reusing it");
                let ttl = (!reservation).then_some(SUBNET_TTL);
                let w = self
                    .registry
                    .update_subnet(sn, value.clone(), kv.mod_revision, ttl)
                    .await?;
                return Ok(self.own(sn, w));
            }
            tracing::info!(subnet = %sn, public_ip = %self.attrs.public_ip,
                "found a lease for our public IP that does not fit the network config, deleting it");
            self.registry.delete_subnet(sn).await?;
            taken.remove(&sn);
        }

        let mut chosen = None;
        if let Some(prev) = self.previous {
            if taken.contains(&prev) {
                tracing::info!(subnet = %prev, "previously leased subnet is in use by another host, ignoring it");
            } else if !self.config.is_compatible(prev) {
                tracing::warn!(subnet = %prev, "previously leased subnet does not fit the network config, ignoring it");
            } else {
                tracing::info!(subnet = %prev, "reusing previously leased subnet");
                chosen = Some(prev);
            }
        }
        let sn = match chosen {
            Some(sn) => sn,
            None => self.pick_free(&taken)?,
        };
        let w = self.registry.create_subnet(sn, value, SUBNET_TTL).await?;
        tracing::info!(subnet = %sn, "acquired a new subnet lease");
        Ok(self.own(sn, w))
    }

    fn pick_free(&self, taken: &HashSet<Ipv4Net>) -> Result<Ipv4Net, SubnetError> {
        // As flannel: up to 100 candidates, one of them at random.
        let free: Vec<Ipv4Net> = self
            .config
            .subnets()
            .filter(|s| !taken.contains(s))
            .take(100)
            .collect();
        free.choose(&mut rand::thread_rng()).copied().ok_or_else(|| {
            let c = &self.config;
            SubnetError::Exhausted {
                total: c.subnets().count() as u64,
                len: c.subnet_len,
                min: c.subnet_min,
                max: c.subnet_max,
                network: c.network,
            }
        })
    }

    fn own(&self, sn: Ipv4Net, w: Written) -> OwnLease {
        OwnLease {
            lease: Lease {
                subnet: sn,
                attrs: self.attrs.clone(),
                expiration: w.expiration,
            },
            lease_id: w.lease_id,
            mod_revision: w.mod_revision,
        }
    }

    /// When the lease must be renewed: `renew_margin` before it expires (never for reservations).
    pub fn renew_at(&self, own: &OwnLease) -> Option<Instant> {
        if own.is_reservation() {
            return None;
        }
        own.lease
            .expiration
            .map(|e| e.checked_sub(self.renew_margin).unwrap_or(e))
    }

    /// Refreshes our etcd lease. `Err(LeaseNotFound)` means the lease is gone: acquire again.
    pub async fn renew(&self, own: &mut OwnLease) -> Result<(), SubnetError> {
        if own.is_reservation() {
            return Ok(());
        }
        let exp = self.registry.renew_lease(own.lease_id).await?;
        own.lease.expiration = Some(exp);
        tracing::info!(subnet = %own.lease.subnet, "renewed subnet lease");
        Ok(())
    }

    /// Interprets one subnet key/value: `Some(lease)` for a peer's vxlan lease; `None` for keys
    /// that are skipped (foreign backend, malformed; each warned about once).
    pub fn peer_from(&mut self, kv: &KeyValue) -> Option<Lease> {
        match parse_vxlan_lease(&kv.key, &kv.value) {
            Ok(l) => {
                if l.attrs.public_ip == self.attrs.public_ip {
                    self.warn_once(
                        &kv.key,
                        "lease carries our own PublicIP but is not our lease; skipping it",
                    );
                    return None;
                }
                self.warned.remove(&kv.key);
                Some(l)
            }
            Err(e @ LeaseError::NotVxlan { .. }) => {
                self.warn_once(
                    &kv.key,
                    &format!("{e}; skipping it (this agent only connects vxlan nodes)"),
                );
                None
            }
            Err(e) => {
                if self.warn_once(&kv.key, &format!("{e}; skipping it")) {
                    crate::ops::metrics::malformed_lease();
                }
                None
            }
        }
    }

    /// A key was deleted: warn about it again if it comes back malformed.
    pub fn forget(&mut self, key: &str) {
        self.warned.remove(key);
    }

    /// Logs `msg` unless `key` was already warned about; true when it logged.
    fn warn_once(&mut self, key: &str, msg: &str) -> bool {
        let first = self.warned.insert(key.to_string());
        if first {
            tracing::warn!(key, "{msg}");
        }
        first
    }

    /// All peers in a listing, excluding `own`.
    pub fn peers_from(&mut self, kvs: &[KeyValue], own: Ipv4Net) -> HashMap<Ipv4Net, Lease> {
        kvs.iter()
            .filter(|kv| parse_subnet_key(&kv.key).ok() != Some(own))
            .filter_map(|kv| self.peer_from(kv))
            .map(|l| (l.subnet, l))
            .collect()
    }

    /// Whether a listing still holds our lease under our PublicIP.
    pub fn still_ours(&self, kvs: &[KeyValue], own: Ipv4Net) -> bool {
        kvs.iter().any(|kv| {
            parse_subnet_key(&kv.key).ok() == Some(own)
                && probe_public_ip(&kv.value) == Some(self.attrs.public_ip)
        })
    }
}

/// `PublicIP` of any lease value, whatever its backend.
pub fn probe_public_ip(value: &[u8]) -> Option<Ipv4Addr> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "PublicIP")]
        public_ip: Ipv4Addr,
    }
    serde_json::from_slice::<Probe>(value).ok().map(|p| p.public_ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json).unwrap()
    }

    fn attrs(last: u8) -> LeaseAttrs {
        LeaseAttrs::vxlan(Ipv4Addr::new(198, 18, 0, last), 1, [2, 0, 0, 0, 0, last])
    }

    fn mgr(reg: &MemRegistry, c: &NetworkConfig, last: u8) -> SubnetManager<MemRegistry> {
        SubnetManager::new(
            reg.clone(),
            c.clone(),
            attrs(last),
            None,
            Duration::from_secs(3600),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn allocation_never_returns_a_taken_subnet() {
        // 15 leasable /28s (the first subnet is skipped).
        let c = cfg(r#"{"Network":"10.9.0.0/24","SubnetLen":28,"Backend":{"Type":"vxlan"}}"#);
        let reg = MemRegistry::default();
        // Pre-taken: a reservation of another node, a foreign-backend lease, a malformed value.
        let taken: Vec<Ipv4Net> = ["10.9.0.16/28", "10.9.0.32/28", "10.9.0.48/28"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        reg.put_raw(taken[0], &attrs(200).to_json(), None);
        reg.put_raw(
            taken[1],
            r#"{"PublicIP":"198.18.0.201","BackendType":"host-gw"}"#,
            Some(SUBNET_TTL),
        );
        reg.put_raw(taken[2], "garbage", Some(SUBNET_TTL));
        let mut got = HashSet::new();
        for i in 0..12u8 {
            let l = mgr(&reg, &c, i + 1).acquire().await.unwrap();
            assert!(
                c.is_compatible(l.lease.subnet),
                "{} outside the pool",
                l.lease.subnet
            );
            assert!(
                !taken.contains(&l.lease.subnet),
                "got pre-taken {}",
                l.lease.subnet
            );
            assert!(got.insert(l.lease.subnet), "duplicate {}", l.lease.subnet);
            assert!(l.lease.expiration.is_some() && l.lease_id != 0);
        }
        let err = mgr(&reg, &c, 99).acquire().await.unwrap_err();
        assert!(matches!(err, SubnetError::Exhausted { total: 15, .. }), "{err}");
        assert!(
            err.to_string().starts_with(
                "pool exhausted: all 15 /28 subnets from 10.9.0.16 to 10.9.0.240 in 10.9.0.0/24"
            ),
            "{err}"
        );
        // A node that already holds a lease gets it back even when the pool is full.
        let again = mgr(&reg, &c, 5).acquire().await.unwrap();
        assert!(got.contains(&again.lease.subnet));
    }

    #[tokio::test(start_paused = true)]
    async fn acquisition_order() {
        let c = cfg(r#"{"Network":"10.9.0.0/16","Backend":{"Type":"vxlan"}}"#);
        let reg = MemRegistry::default();
        let prev: Ipv4Net = "10.9.77.0/24".parse().unwrap();
        // subnet.env's subnet is used when free...
        let mut m = SubnetManager::new(
            reg.clone(),
            c.clone(),
            attrs(1),
            Some(prev),
            Duration::from_secs(3600),
        );
        let l = m.acquire().await.unwrap();
        assert_eq!(l.lease.subnet, prev);
        // ...and ignored when another node holds it.
        let mut other = SubnetManager::new(
            reg.clone(),
            c.clone(),
            attrs(2),
            Some(prev),
            Duration::from_secs(3600),
        );
        assert_ne!(other.acquire().await.unwrap().lease.subnet, prev);
        // Our PublicIP's lease wins over subnet.env.
        let mut m2 = SubnetManager::new(
            reg.clone(),
            c.clone(),
            attrs(1),
            Some("10.9.5.0/24".parse().unwrap()),
            Duration::from_secs(3600),
        );
        assert_eq!(m2.acquire().await.unwrap().lease.subnet, prev);
        // A reservation is used as it is and stays without a lease.
        let resv: Ipv4Net = "10.9.200.0/24".parse().unwrap();
        reg.put_raw(resv, r#"{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:09"}}"#, None);
        let mut r = mgr(&reg, &c, 3);
        let l = r.acquire().await.unwrap();
        assert_eq!(l.lease.subnet, resv);
        assert!(l.is_reservation() && l.lease.expiration.is_none());
        let kv = reg.get_raw(resv).unwrap();
        assert_eq!(kv.lease_id, 0, "reservation turned into an expiring lease");
        assert_eq!(String::from_utf8(kv.value).unwrap(), attrs(3).to_json());
        assert_eq!(r.renew_at(&l), None);
        // A lease for our IP outside the config is deleted and replaced.
        let out: Ipv4Net = "10.10.0.0/24".parse().unwrap();
        reg.put_raw(out, &attrs(4).to_json(), Some(SUBNET_TTL));
        let l = mgr(&reg, &c, 4).acquire().await.unwrap();
        assert_ne!(l.lease.subnet, out);
        assert!(reg.get_raw(out).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_timing() {
        let c = cfg(r#"{"Network":"10.9.0.0/16","Backend":{"Type":"vxlan"}}"#);
        let reg = MemRegistry::default();
        let m = &mut mgr(&reg, &c, 1);
        let t0 = Instant::now();
        let mut l = m.acquire().await.unwrap();
        assert_eq!(l.lease.expiration, Some(t0 + SUBNET_TTL));
        let at = m.renew_at(&l).unwrap();
        assert_eq!(
            at,
            t0 + SUBNET_TTL - Duration::from_secs(3600),
            "renew 60 min before expiry"
        );
        tokio::time::sleep_until(at).await;
        m.renew(&mut l).await.unwrap();
        assert_eq!(reg.renewals().len(), 1);
        assert_eq!(l.lease.expiration, Some(at + SUBNET_TTL));
        assert_eq!(reg.expiry_of(l.lease.subnet), Some(at + SUBNET_TTL));
    }

    #[test]
    fn peers_skip_foreign_and_malformed() {
        let c = cfg(r#"{"Network":"10.9.0.0/16","Backend":{"Type":"vxlan"}}"#);
        let reg = MemRegistry::default();
        let mut m = mgr(&reg, &c, 1);
        let kv = |k: &str, v: &str| KeyValue {
            key: format!("/coreos.com/network/subnets/{k}"),
            value: v.into(),
            lease_id: 0,
            mod_revision: 1,
        };
        let kvs = vec![
            kv("10.9.1.0-24", &attrs(1).to_json()), // own
            kv("10.9.2.0-24", &attrs(2).to_json()),
            kv(
                "10.9.3.0-24",
                r#"{"PublicIP":"198.18.0.3","BackendType":"host-gw","BackendData":null}"#,
            ),
            kv("10.9.4.0-24", "{"),
            kv("bogus", &attrs(5).to_json()),
        ];
        let peers = m.peers_from(&kvs, "10.9.1.0/24".parse().unwrap());
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[&"10.9.2.0/24".parse().unwrap()].attrs, attrs(2));
        assert_eq!(m.warned.len(), 3, "{:?}", m.warned);
        assert!(m.still_ours(&kvs, "10.9.1.0/24".parse().unwrap()));
        assert!(!m.still_ours(&kvs, "10.9.2.0/24".parse().unwrap()));
    }
}
