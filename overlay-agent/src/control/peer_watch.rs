//! The peer watch: the subnet keys in etcd → `Resync`/`PeerUpsert`/`PeerRemove` events for the
//! maps. Lists once, then follows a watch; a broken watch resumes from the next revision, a
//! compacted history is listed again. Noticing that our own lease was deleted or taken over is
//! reported to the caller, which has the [`LeaseKeeper`] take it again.

use std::collections::{HashMap, HashSet};

use tokio::sync::mpsc;

use super::{
    lease::{parse_lease, parse_subnet_key, Lease, LeaseError, SubnetKey},
    subnet::{KeyValue, Registry, RegistryError, SubnetManager, WatchEvent},
};
use super::{lease_keeper::LeaseKeeper, send, Backoff, Event, Stop};

/// The outcome of opening the watch.
pub enum Opened<W> {
    Watching(W),
    /// etcd failed (after a backoff pause) or the history is gone: open again.
    Retry,
    /// The listing no longer holds our lease.
    Lost,
}

/// What to do after a batch of watch events.
pub enum Next {
    Continue,
    /// The watch broke: open it again.
    Reopen,
    /// Our lease was deleted or taken over.
    Lost,
}

/// The peers as etcd has them, and where the watch stands.
pub struct PeerWatch {
    peers: HashMap<SubnetKey, Lease>,
    /// Keys already warned about (foreign backend, malformed, our address on another key).
    warned: HashSet<String>,
    /// After a broken watch: the revision to watch from again instead of listing everything.
    resume: Option<i64>,
    backoff: Backoff,
}

impl Default for PeerWatch {
    fn default() -> Self {
        Self::new()
    }
}

impl PeerWatch {
    pub fn new() -> Self {
        PeerWatch {
            peers: HashMap::new(),
            warned: HashSet::new(),
            resume: None,
            backoff: Backoff::new(),
        }
    }

    /// After our lease was lost: list everything again once it is back.
    pub fn forget_position(&mut self) {
        self.resume = None;
    }

    async fn pause(&mut self, events: &mpsc::Sender<Event>) -> Result<(), Stop> {
        crate::metrics::etcd_reconnect();
        tokio::select! {
            _ = self.backoff.wait() => Ok(()),
            _ = events.closed() => Err(Stop::Closed),
        }
    }

    /// Resumes a broken watch where it stopped (every change since arrives as events), or lists
    /// every lease (sending `Resync`) and watches from right after the listing.
    pub async fn open<R: Registry>(
        &mut self,
        keeper: &LeaseKeeper<R>,
        events: &mpsc::Sender<Event>,
    ) -> Result<Opened<R::Watch>, Stop> {
        let reg = &keeper.mgr.registry;
        if let Some(from) = self.resume {
            // A compacted history shows up as `Compacted` (here or as the watch's first answer).
            return match reg.watch_subnets(from).await {
                Ok(w) => {
                    tracing::info!(revision = from, "subnet watch resumed");
                    self.resume = None;
                    self.backoff.reset();
                    Ok(Opened::Watching(w))
                }
                Err(RegistryError::Compacted(r)) => {
                    tracing::info!(
                        revision = r,
                        "watch history compacted while disconnected; listing leases again"
                    );
                    self.resume = None;
                    Ok(Opened::Retry)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "resuming the subnet watch failed; retrying");
                    self.pause(events).await?;
                    Ok(Opened::Retry)
                }
            };
        }
        let (kvs, rev) = match reg.list_subnets().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "listing subnet leases failed; retrying");
                self.pause(events).await?;
                return Ok(Opened::Retry);
            }
        };
        let own = keeper.own().lease.key();
        if !keeper.still_ours(&kvs) {
            tracing::warn!(subnet = %own, "our subnet lease is gone from etcd; acquiring a lease again");
            return Ok(Opened::Lost);
        }
        self.peers = self.peers_from(&keeper.mgr, &kvs, own);
        let mut all: Vec<Lease> = self.peers.values().cloned().collect();
        all.sort_by_key(Lease::key);
        send(events, Event::Resync(all)).await?;

        match reg.watch_subnets(rev + 1).await {
            Ok(w) => {
                self.backoff.reset();
                Ok(Opened::Watching(w))
            }
            Err(e) => {
                tracing::warn!(error = %e, "watching subnet leases failed; retrying");
                // Nothing was missed yet: watch from right after the listing.
                if !matches!(e, RegistryError::Compacted(_)) {
                    self.resume = Some(rev + 1);
                }
                self.pause(events).await?;
                Ok(Opened::Retry)
            }
        }
    }

    /// Applies what the watch delivered (`watch_revision`: where the watch stands, to resume
    /// from after an error).
    pub async fn on_batch<R: Registry>(
        &mut self,
        keeper: &LeaseKeeper<R>,
        batch: Result<Vec<WatchEvent>, RegistryError>,
        watch_revision: i64,
        events: &mpsc::Sender<Event>,
    ) -> Result<Next, Stop> {
        match batch {
            Ok(evs) => {
                let mut lost = false;
                for ev in evs {
                    lost |= self.apply(keeper, ev, events).await?;
                }
                if lost {
                    tracing::warn!(subnet = %keeper.own().lease.key(), "our subnet lease was deleted or taken over; acquiring a lease again");
                    return Ok(Next::Lost);
                }
                Ok(Next::Continue)
            }
            Err(RegistryError::Compacted(r)) => {
                tracing::info!(revision = r, "watch history compacted; listing leases again");
                Ok(Next::Reopen)
            }
            Err(e) => {
                tracing::warn!(error = %e, "subnet watch failed; reconnecting");
                self.resume = Some(watch_revision + 1);
                self.pause(events).await?;
                Ok(Next::Reopen)
            }
        }
    }

    /// Applies one watch event; returns `true` when it means our own lease is lost.
    async fn apply<R: Registry>(
        &mut self,
        keeper: &LeaseKeeper<R>,
        ev: WatchEvent,
        events: &mpsc::Sender<Event>,
    ) -> Result<bool, Stop> {
        let own = keeper.own().lease.key();
        match ev {
            WatchEvent::Put(kv) => {
                let key = parse_subnet_key(&kv.key).ok();
                if key == Some(own) {
                    // Our own renewals/updates echo back; anything else on our key is a takeover.
                    return Ok(!keeper.mgr.is_ours(&kv.value));
                }
                match self.peer_from(&keeper.mgr, &kv) {
                    Some(l) => {
                        if self.peers.get(&l.key()).map(|p| &p.attrs) != Some(&l.attrs) {
                            self.peers.insert(l.key(), l.clone());
                            tracing::info!(subnet = %l.key(), public_ip = %l.public_addr(), "peer lease added or changed");
                            send(events, Event::PeerUpsert(l)).await?;
                        }
                    }
                    None => {
                        // Became foreign/malformed: whatever we had for it is gone.
                        if let Some(old) = key.and_then(|k| self.peers.remove(&k)) {
                            send(events, Event::PeerRemove(old)).await?;
                        }
                    }
                }
            }
            WatchEvent::Delete { key } => {
                // Warn about it again if it comes back malformed.
                self.warned.remove(&key);
                let Ok(k) = parse_subnet_key(&key) else {
                    return Ok(false);
                };
                if k == own {
                    return Ok(true);
                }
                if let Some(old) = self.peers.remove(&k) {
                    tracing::info!(subnet = %k, public_ip = %old.public_addr(), "peer lease removed");
                    send(events, Event::PeerRemove(old)).await?;
                }
            }
        }
        Ok(false)
    }

    /// Interprets one subnet key/value: `Some(lease)` for a peer's lease of our backend; `None` for keys
    /// that are skipped (foreign backend, malformed, our own address; each warned about once).
    fn peer_from<R: Registry>(&mut self, mgr: &SubnetManager<R>, kv: &KeyValue) -> Option<Lease> {
        match parse_lease(&kv.key, &kv.value, mgr.config.backend.kind) {
            Ok(l) => {
                if mgr.is_our_attrs(&l.attrs) {
                    self.warn_once(
                        &kv.key,
                        "lease carries our own public address but is not our lease; skipping it",
                    );
                    return None;
                }
                self.warned.remove(&kv.key);
                Some(l)
            }
            Err(e @ LeaseError::OtherBackend { ours, .. }) => {
                self.warn_once(
                    &kv.key,
                    &format!("{e}; skipping it (this node runs the {ours} backend and connects only {ours} nodes, as flanneld)"),
                );
                None
            }
            Err(e) => {
                if self.warn_once(&kv.key, &format!("{e}; skipping it")) {
                    crate::metrics::malformed_lease();
                }
                None
            }
        }
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
    fn peers_from<R: Registry>(
        &mut self,
        mgr: &SubnetManager<R>,
        kvs: &[KeyValue],
        own: SubnetKey,
    ) -> HashMap<SubnetKey, Lease> {
        kvs.iter()
            .filter(|kv| parse_subnet_key(&kv.key).ok() != Some(own))
            .filter_map(|kv| self.peer_from(mgr, kv))
            .map(|l| (l.key(), l))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Duration};

    use super::*;
    use crate::control::{config::NetworkConfig, lease::LeaseAttrs, subnet::MemRegistry};

    fn attrs(last: u8) -> LeaseAttrs {
        LeaseAttrs::vxlan(Ipv4Addr::new(198, 18, 0, last), 1, [2, 0, 0, 0, 0, last])
    }

    #[test]
    fn peers_skip_foreign_and_malformed() {
        let c = NetworkConfig::parse(r#"{"Network":"10.9.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        let m = SubnetManager::new(
            MemRegistry::default(),
            c,
            attrs(1),
            SubnetKey::default(),
            Duration::from_secs(3600),
        );
        let kv = |k: &str, v: &str| KeyValue {
            key: format!("/coreos.com/network/subnets/{k}"),
            value: v.into(),
            lease_id: 0,
            mod_revision: 1,
        };
        let dual = r#"{"PublicIP":"198.18.0.6","PublicIPv6":"fd00::6","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:06"},"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:01:06"}}"#;
        let kvs = vec![
            kv("10.9.1.0-24", &attrs(1).to_json()), // own
            kv("10.9.2.0-24", &attrs(2).to_json()),
            kv(
                "10.9.3.0-24",
                r#"{"PublicIP":"198.18.0.3","BackendType":"host-gw","BackendData":null}"#,
            ),
            kv("10.9.4.0-24", "{"),
            kv("bogus", &attrs(5).to_json()),
            kv("10.9.6.0-24&fd00:9:0:6::-64", dual),
            kv("10.9.7.0-24", &attrs(1).to_json()), // our address, not our lease
        ];
        let mut w = PeerWatch::new();
        let own: SubnetKey = "10.9.1.0/24".parse::<ipnet::Ipv4Net>().unwrap().into();
        let peers = w.peers_from(&m, &kvs, own);
        assert_eq!(peers.len(), 2, "{peers:?}");
        assert_eq!(
            peers[&"10.9.2.0/24".parse::<ipnet::Ipv4Net>().unwrap().into()].attrs,
            attrs(2)
        );
        let d = &peers[&parse_subnet_key("10.9.6.0-24&fd00:9:0:6::-64").unwrap()];
        assert_eq!(
            d.v6().unwrap().vtep.unwrap().vtep_mac.to_string(),
            "02:00:00:00:01:06"
        );
        assert_eq!(w.warned.len(), 4, "{:?}", w.warned);
        assert!(m.still_ours(&kvs, own));
        assert!(!m.still_ours(&kvs, "10.9.2.0/24".parse::<ipnet::Ipv4Net>().unwrap().into()));
    }
}
