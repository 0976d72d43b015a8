//! Subnet leases in flannel's order (pkg/subnet/etcd/local_manager.go `tryAcquireLease`), on top
//! of a [`Registry`], for each enabled family with the same code: reuse the lease that carries
//! our public address, else the subnets from an existing subnet.env if free, else a random free
//! subnet in [SubnetMin, SubnetMax] (and [IPv6SubnetMin, IPv6SubnetMax]).
//!
//! Where flanneld's etcd manager is broken for IPv6-only nodes this one is not: flanneld finds
//! "our" lease by `PublicIP`, which is `0.0.0.0` on every IPv6-only node (so a second node takes
//! over the first one's lease), and allocates the IPv4 part of an IPv6-only lease as `0.0.0.0/0`,
//! which overlaps every other lease. Here an IPv6-only node is known by its `PublicIPv6`, and the
//! families are allocated and reused independently (a cluster that turns IPv6 on keeps each
//! node's IPv4 subnet).

pub mod etcd;
pub mod registry;

use std::{collections::HashSet, net::Ipv4Addr, net::Ipv6Addr, time::Duration};

use rand::seq::SliceRandom as _;
use tokio::time::Instant;

pub use registry::{KeyValue, MemRegistry, Registry, RegistryError, RegistryWatch, WatchEvent, Written};

use super::{
    config::NetworkConfig,
    lease::{parse_subnet_key, Lease, LeaseAttrs, SubnetKey},
};
use crate::family::{Family, SubnetPool, V4, V6};

/// flannel's `subnetTTL`.
pub const SUBNET_TTL: Duration = Duration::from_secs(24 * 3600);
/// How many times a lost create/update race is retried before giving up for this round.
const MAX_RACE_RETRIES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SubnetError {
    #[error(
        "pool exhausted: all {total} /{len} {kind}subnets from {min} to {max} in {network} are leased; \
         widen {fields} in the network config, or delete stale leases"
    )]
    Exhausted {
        /// "" for IPv4, "IPv6 " for IPv6.
        kind: &'static str,
        total: u128,
        len: u8,
        min: String,
        max: String,
        network: String,
        /// The config fields that size the pool.
        fields: &'static str,
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

/// `PublicIP` and `PublicIPv6` of any lease value, whatever its backend.
pub fn probe_public_addrs(value: &[u8]) -> Option<(Ipv4Addr, Option<Ipv6Addr>)> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "PublicIP", default)]
        public_ip: Option<Ipv4Addr>,
        #[serde(rename = "PublicIPv6", default)]
        public_ipv6: Option<Ipv6Addr>,
    }
    serde_json::from_slice::<Probe>(value)
        .ok()
        .map(|p| (p.public_ip.unwrap_or(Ipv4Addr::UNSPECIFIED), p.public_ipv6))
}

/// The per-family part of acquisition, written once for both families.
struct Choice<'a, F: Family> {
    pool: Option<&'a SubnetPool<F>>,
    /// The subnet we held last (subnet.env, or our last lease).
    previous: Option<F::Net>,
    taken: HashSet<F::Net>,
    fields: &'static str,
    kind: &'static str,
}

impl<F: Family> Choice<'_, F> {
    fn compatible(&self, sn: Option<F::Net>) -> bool {
        match (self.pool, sn) {
            (None, None) => true,
            (Some(p), Some(sn)) => p.is_compatible(sn),
            _ => false,
        }
    }

    /// The previous subnet when it is free and fits, else a random one of the first 100 free
    /// subnets (as flannel's `allocateSubnet`); `None` when this family is off.
    fn choose(&self) -> Result<Option<F::Net>, SubnetError> {
        let Some(pool) = self.pool else { return Ok(None) };
        if let Some(prev) = self.previous {
            if self.taken.contains(&prev) {
                tracing::info!(subnet = %prev, "previously leased subnet is in use by another host, ignoring it");
            } else if !pool.is_compatible(prev) {
                tracing::warn!(subnet = %prev, "previously leased subnet does not fit the network config, ignoring it");
            } else {
                tracing::info!(subnet = %prev, "reusing previously leased subnet");
                return Ok(Some(prev));
            }
        }
        let free: Vec<F::Net> = pool
            .subnets()
            .filter(|s| !self.taken.contains(s))
            .take(100)
            .collect();
        match free.choose(&mut rand::thread_rng()) {
            Some(sn) => Ok(Some(*sn)),
            None => Err(SubnetError::Exhausted {
                kind: self.kind,
                total: pool.count(),
                len: pool.subnet_len,
                min: pool.subnet_min.to_string(),
                max: pool.subnet_max.to_string(),
                network: pool.network.to_string(),
                fields: self.fields,
            }),
        }
    }
}

/// Acquires and renews the subnet lease of one node.
pub struct SubnetManager<R> {
    pub registry: R,
    pub config: NetworkConfig,
    attrs: LeaseAttrs,
    /// The subnets we held last (subnet.env at start, then our own lease): tried first when free.
    previous: SubnetKey,
    renew_margin: Duration,
}

impl<R: Registry> SubnetManager<R> {
    pub fn new(
        registry: R,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        previous: SubnetKey,
        renew_margin: Duration,
    ) -> Self {
        SubnetManager {
            registry,
            config,
            attrs,
            previous,
            renew_margin,
        }
    }

    /// What we publish.
    pub fn attrs(&self) -> &LeaseAttrs {
        &self.attrs
    }

    /// Whether a lease value was written by this node: same `PublicIP` when IPv4 is on, same
    /// `PublicIPv6` on an IPv6-only node (whose `PublicIP` is flanneld's `0.0.0.0`).
    pub fn is_ours(&self, value: &[u8]) -> bool {
        self.same_node(probe_public_addrs(value))
    }

    /// [`Self::is_ours`] for parsed attributes.
    pub fn is_our_attrs(&self, a: &LeaseAttrs) -> bool {
        self.same_node(Some((a.public_ip, a.public_ipv6)))
    }

    fn same_node(&self, addrs: Option<(Ipv4Addr, Option<Ipv6Addr>)>) -> bool {
        let Some((ip, ip6)) = addrs else { return false };
        if self.config.ipv4.is_some() {
            ip == self.attrs.public_ip
        } else {
            ip6.is_some() && ip6 == self.attrs.public_ipv6
        }
    }

    pub fn set_previous(&mut self, key: SubnetKey) {
        self.previous = key;
    }

    /// Acquires a lease, retrying lost races. `Exhausted` when no subnet is free.
    pub async fn acquire(&mut self) -> Result<OwnLease, SubnetError> {
        for _ in 0..MAX_RACE_RETRIES {
            match self.try_acquire().await {
                Ok(l) => {
                    self.previous = l.lease.key();
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

    fn choices(&self) -> (Choice<'_, V4>, Choice<'_, V6>) {
        (
            Choice {
                pool: self.config.ipv4.as_ref(),
                previous: self.previous.ipv4,
                taken: HashSet::new(),
                fields: "Network or SubnetMin/SubnetMax",
                kind: "",
            },
            Choice {
                pool: self.config.ipv6.as_ref(),
                previous: self.previous.ipv6,
                taken: HashSet::new(),
                fields: "IPv6Network or IPv6SubnetMin/IPv6SubnetMax",
                kind: "IPv6 ",
            },
        )
    }

    async fn try_acquire(&mut self) -> Result<OwnLease, SubnetError> {
        let (kvs, _rev) = self.registry.list_subnets().await?;
        let (mut c4, mut c6) = self.choices();
        let mut mine: Vec<(SubnetKey, &KeyValue)> = Vec::new();
        for kv in &kvs {
            let Ok(sk) = parse_subnet_key(&kv.key) else {
                continue;
            };
            c4.taken.extend(sk.ipv4);
            c6.taken.extend(sk.ipv6);
            if self.is_ours(&kv.value) {
                mine.push((sk, kv));
            }
        }
        // Reservations first, then the rest, as found.
        mine.sort_by_key(|(_, kv)| kv.lease_id != 0);
        let value = self.attrs.to_json();
        let mut stale = Vec::new();
        for (sk, kv) in mine {
            if c4.compatible(sk.ipv4) && c6.compatible(sk.ipv6) {
                let reservation = kv.lease_id == 0;
                tracing::info!(subnet = %sk, reservation, public_ip = %self.attrs.public_ip,
                    public_ipv6 = ?self.attrs.public_ipv6, "found a lease for our public IP, reusing it");
                let ttl = (!reservation).then_some(SUBNET_TTL);
                let w = self
                    .registry
                    .update_subnet(sk, value.clone(), kv.mod_revision, ttl)
                    .await?;
                return Ok(self.own(sk, w));
            }
            stale.push(sk);
        }
        for sk in stale {
            tracing::info!(subnet = %sk, public_ip = %self.attrs.public_ip,
                "found a lease for our public IP that does not fit the network config, deleting it");
            self.registry.delete_subnet(sk).await?;
            // Its subnets are ours again: reuse what still fits (a cluster turning IPv6 on keeps
            // the node's IPv4 subnet) unless subnet.env names others.
            if let Some(sn) = sk.ipv4 {
                c4.taken.remove(&sn);
                c4.previous = c4.previous.or(Some(sn));
            }
            if let Some(sn) = sk.ipv6 {
                c6.taken.remove(&sn);
                c6.previous = c6.previous.or(Some(sn));
            }
        }

        let sk = SubnetKey {
            ipv4: c4.choose()?,
            ipv6: c6.choose()?,
        };
        let w = self.registry.create_subnet(sk, value, SUBNET_TTL).await?;
        tracing::info!(subnet = %sk, "acquired a new subnet lease");
        Ok(self.own(sk, w))
    }

    fn own(&self, sk: SubnetKey, w: Written) -> OwnLease {
        OwnLease {
            lease: Lease {
                subnet: sk.ipv4,
                ipv6_subnet: sk.ipv6,
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
        tracing::info!(subnet = %own.lease.key(), "renewed subnet lease");
        Ok(())
    }

    /// Whether a listing still holds our lease under our public address.
    pub fn still_ours(&self, kvs: &[KeyValue], own: SubnetKey) -> bool {
        kvs.iter()
            .any(|kv| parse_subnet_key(&kv.key).ok() == Some(own) && self.is_ours(&kv.value))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ipnet::{Ipv4Net, Ipv6Net};

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
            SubnetKey::default(),
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
                c.ipv4.unwrap().is_compatible(l.lease.subnet.unwrap()),
                "{} outside the pool",
                l.lease.subnet.unwrap()
            );
            assert!(
                !taken.contains(&l.lease.subnet.unwrap()),
                "got pre-taken {}",
                l.lease.subnet.unwrap()
            );
            assert!(
                got.insert(l.lease.subnet.unwrap()),
                "duplicate {}",
                l.lease.subnet.unwrap()
            );
            assert!(l.lease.expiration.is_some() && l.lease_id != 0);
        }
        let err = mgr(&reg, &c, 99).acquire().await.unwrap_err();
        assert!(
            matches!(
                err,
                SubnetError::Exhausted {
                    total: 15,
                    kind: "",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().starts_with(
                "pool exhausted: all 15 /28 subnets from 10.9.0.16 to 10.9.0.240 in 10.9.0.0/24"
            ),
            "{err}"
        );
        // A node that already holds a lease gets it back even when the pool is full.
        let again = mgr(&reg, &c, 5).acquire().await.unwrap();
        assert!(got.contains(&again.lease.subnet.unwrap()));
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
            prev.into(),
            Duration::from_secs(3600),
        );
        let l = m.acquire().await.unwrap();
        assert_eq!(l.lease.subnet.unwrap(), prev);
        // ...and ignored when another node holds it.
        let mut other = SubnetManager::new(
            reg.clone(),
            c.clone(),
            attrs(2),
            prev.into(),
            Duration::from_secs(3600),
        );
        assert_ne!(other.acquire().await.unwrap().lease.subnet.unwrap(), prev);
        // Our PublicIP's lease wins over subnet.env.
        let mut m2 = SubnetManager::new(
            reg.clone(),
            c.clone(),
            attrs(1),
            "10.9.5.0/24".parse::<Ipv4Net>().unwrap().into(),
            Duration::from_secs(3600),
        );
        assert_eq!(m2.acquire().await.unwrap().lease.subnet.unwrap(), prev);
        // A reservation is used as it is and stays without a lease.
        let resv: Ipv4Net = "10.9.200.0/24".parse().unwrap();
        reg.put_raw(resv, r#"{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:09"}}"#, None);
        let mut r = mgr(&reg, &c, 3);
        let l = r.acquire().await.unwrap();
        assert_eq!(l.lease.subnet.unwrap(), resv);
        assert!(l.is_reservation() && l.lease.expiration.is_none());
        let kv = reg.get_raw(resv).unwrap();
        assert_eq!(kv.lease_id, 0, "reservation turned into an expiring lease");
        assert_eq!(String::from_utf8(kv.value).unwrap(), attrs(3).to_json());
        assert_eq!(r.renew_at(&l), None);
        // A lease for our IP outside the config is deleted and replaced.
        let out: Ipv4Net = "10.10.0.0/24".parse().unwrap();
        reg.put_raw(out, &attrs(4).to_json(), Some(SUBNET_TTL));
        let l = mgr(&reg, &c, 4).acquire().await.unwrap();
        assert_ne!(l.lease.subnet.unwrap(), out);
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
        assert_eq!(reg.expiry_of(l.lease.subnet.unwrap()), Some(at + SUBNET_TTL));
    }

    const DUAL: &str = r#"{"Network":"10.9.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:9::/48","IPv6SubnetMin":"fd00:9:0:10::","IPv6SubnetMax":"fd00:9:0:13::","Backend":{"Type":"vxlan"}}"#;
    const V6_ONLY: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:9::/48","IPv6SubnetMin":"fd00:9:0:10::","IPv6SubnetMax":"fd00:9:0:13::","Backend":{"Type":"vxlan"}}"#;

    fn v6(last: u8) -> Ipv6Addr {
        format!("fd00:198:18::{last:x}").parse().unwrap()
    }

    fn dual_attrs(last: u8) -> LeaseAttrs {
        LeaseAttrs::vxlan_dual(
            Some(Ipv4Addr::new(198, 18, 0, last)),
            Some(v6(last)),
            1,
            [2, 0, 0, 0, 0, last],
        )
    }

    fn v6_attrs(last: u8) -> LeaseAttrs {
        LeaseAttrs::vxlan_dual(None, Some(v6(last)), 1, [2, 0, 0, 0, 0, last])
    }

    fn mgr_with(
        reg: &MemRegistry,
        c: &NetworkConfig,
        a: LeaseAttrs,
        prev: SubnetKey,
    ) -> SubnetManager<MemRegistry> {
        SubnetManager::new(reg.clone(), c.clone(), a, prev, Duration::from_secs(3600))
    }

    /// Dual-stack and IPv6-only nodes take IPv6 subnets inside [IPv6SubnetMin, IPv6SubnetMax],
    /// never one another's, under flannel's keys; the pool runs out with an error naming the
    /// IPv6 fields; a restarted node gets its lease back by its public address.
    #[tokio::test(start_paused = true)]
    async fn ipv6_allocation_within_min_max() {
        for (json, attrs, key_start) in [
            (DUAL, dual_attrs as fn(u8) -> LeaseAttrs, "10.9."),
            (V6_ONLY, v6_attrs as fn(u8) -> LeaseAttrs, "0.0.0.0-0&"),
        ] {
            let c = cfg(json);
            let pool = c.ipv6.unwrap();
            let reg = MemRegistry::default();
            let mut got: HashMap<Ipv6Net, u8> = HashMap::new();
            for i in 1..=4u8 {
                let l = mgr_with(&reg, &c, attrs(i), SubnetKey::default())
                    .acquire()
                    .await
                    .unwrap();
                let sn6 = l.lease.ipv6_subnet.expect("an IPv6 subnet");
                assert!(
                    pool.is_compatible(sn6),
                    "{json}: {sn6} outside [fd00:9:0:10::, fd00:9:0:13::]"
                );
                assert_eq!(got.insert(sn6, i), None, "{json}: {sn6} handed out twice");
                assert_eq!(l.lease.subnet.is_some(), c.ipv4.is_some(), "{json}");
                let key = reg.get_raw(l.lease.key()).expect("written under its key").key;
                let last = key.rsplit('/').next().unwrap();
                assert!(
                    last.starts_with(key_start) && last.ends_with(&format!("&{}-64", sn6.network())),
                    "{key}"
                );
                assert_eq!(
                    String::from_utf8(reg.get_raw(l.lease.key()).unwrap().value).unwrap(),
                    attrs(i).to_json()
                );
            }
            let err = mgr_with(&reg, &c, attrs(99), SubnetKey::default())
                .acquire()
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    SubnetError::Exhausted {
                        total: 4,
                        kind: "IPv6 ",
                        ..
                    }
                ),
                "{err}"
            );
            assert!(
                err.to_string().starts_with(
                    "pool exhausted: all 4 /64 IPv6 subnets from fd00:9:0:10:: to fd00:9:0:13:: in fd00:9::/48 are leased; widen IPv6Network or IPv6SubnetMin/IPv6SubnetMax"
                ),
                "{err}"
            );
            // Node 3 restarts (same public address): the same lease, even with the pool full.
            let again = mgr_with(&reg, &c, attrs(3), SubnetKey::default())
                .acquire()
                .await
                .unwrap();
            assert_eq!(got.get(&again.lease.ipv6_subnet.unwrap()), Some(&3), "{json}");
        }
    }

    /// subnet.env's subnets are reused per family when free; a node whose IPv4-only lease no
    /// longer fits (IPv6 turned on) keeps its IPv4 subnet and gains an IPv6 one.
    #[tokio::test(start_paused = true)]
    async fn previous_subnets_per_family() {
        let c = cfg(DUAL);
        let reg = MemRegistry::default();
        let prev = SubnetKey {
            ipv4: Some("10.9.77.0/24".parse().unwrap()),
            ipv6: Some("fd00:9:0:12::/64".parse().unwrap()),
        };
        let l = mgr_with(&reg, &c, dual_attrs(1), prev).acquire().await.unwrap();
        assert_eq!(l.lease.key(), prev);
        // Only the IPv6 subnet of a previous key is free: it is reused, the IPv4 one is not.
        let half = SubnetKey {
            ipv4: prev.ipv4,
            ipv6: Some("fd00:9:0:13::/64".parse().unwrap()),
        };
        let l3 = mgr_with(&reg, &c, dual_attrs(3), half).acquire().await.unwrap();
        assert_eq!(l3.lease.ipv6_subnet, half.ipv6);
        assert_ne!(l3.lease.subnet, prev.ipv4);
        // Another node with the same subnet.env: both taken, fresh ones instead.
        let l2 = mgr_with(&reg, &c, dual_attrs(2), prev).acquire().await.unwrap();
        assert_ne!(l2.lease.subnet, prev.ipv4);
        assert_ne!(l2.lease.ipv6_subnet, prev.ipv6);

        // IPv6 turned on: node 4's IPv4-only lease is replaced by a dual-stack one with the
        // same IPv4 subnet (no subnet.env).
        let old: Ipv4Net = "10.9.44.0/24".parse().unwrap();
        reg.put_raw(old, &attrs(4).to_json(), Some(SUBNET_TTL));
        let l4 = mgr_with(&reg, &c, dual_attrs(4), SubnetKey::default())
            .acquire()
            .await
            .unwrap();
        assert_eq!(l4.lease.subnet, Some(old));
        assert!(l4.lease.ipv6_subnet.is_some());
        assert!(reg.get_raw(old).is_none(), "the IPv4-only key must be gone");
        // And back to IPv4-only: the dual-stack key is replaced by an IPv4-only one, same subnet.
        let c4 = cfg(r#"{"Network":"10.9.0.0/16","Backend":{"Type":"vxlan"}}"#);
        let l5 = mgr_with(&reg, &c4, attrs(4), SubnetKey::default())
            .acquire()
            .await
            .unwrap();
        assert_eq!(l5.lease.key(), SubnetKey::from(old));
        assert!(reg.get_raw(l4.lease.key()).is_none());
    }

    /// An IPv6-only node is known by its PublicIPv6: two of them (both with flanneld's
    /// PublicIP 0.0.0.0) never take each other's lease, and one's restart finds its own.
    #[tokio::test(start_paused = true)]
    async fn ipv6_only_identity_is_public_ipv6() {
        let c = cfg(V6_ONLY);
        let reg = MemRegistry::default();
        let a = mgr_with(&reg, &c, v6_attrs(1), SubnetKey::default())
            .acquire()
            .await
            .unwrap();
        let b = mgr_with(&reg, &c, v6_attrs(2), SubnetKey::default())
            .acquire()
            .await
            .unwrap();
        assert_ne!(a.lease.key(), b.lease.key());
        let a_value = String::from_utf8(reg.get_raw(a.lease.key()).unwrap().value).unwrap();
        assert!(a_value.contains("fd00:198:18::1\""), "{a_value}");
        let a2 = mgr_with(&reg, &c, v6_attrs(1), SubnetKey::default())
            .acquire()
            .await
            .unwrap();
        assert_eq!(a2.lease.key(), a.lease.key());
        let m = mgr_with(&reg, &c, v6_attrs(1), SubnetKey::default());
        assert!(m.is_ours(a_value.as_bytes()));
        assert!(!m.is_ours(v6_attrs(2).to_json().as_bytes()));
    }
}
