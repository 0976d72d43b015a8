//! The peer watch: the subnet keys in etcd → `Resync`/`PeerUpsert`/`PeerRemove` events for the
//! maps. Lists once, then follows a watch; a broken watch resumes from the next revision, a
//! compacted history is listed again. Noticing that our own lease was deleted or taken over is
//! reported to the caller, which has the [`LeaseKeeper`] take it again. Every lease passes
//! [`peer_check`](super::peer_check) on the way: only what it admits becomes a peer, and a lease
//! it held back is looked at again whenever a lease of the same subnet changes.

use std::collections::{BTreeSet, HashMap, HashSet};

use tokio::sync::mpsc;

use super::{
    backend::BackendKind,
    lease::{parse_lease, Lease, LeaseError, SubnetKey},
    peer_check::{canonical_key, check_peer, Claims, Rejection, Rules},
    subnet::{KeyValue, Registry, RegistryError, WatchEvent},
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

/// A lease that passed the checks of its own ([`check_peer`]): whether it is programmed also
/// depends on the other leases of its subnets ([`Claims`]).
struct Candidate {
    /// Its etcd key.
    key: String,
    /// The lease, without the sides the checks refused.
    lease: Lease,
    rejected: Vec<Rejection>,
}

/// The peers as etcd has them, and where the watch stands.
pub struct PeerWatch {
    /// The peers as the maps were told (each lease without the sides it may not program).
    peers: HashMap<SubnetKey, Lease>,
    /// Every lease that passed its own checks, by its (canonical) key.
    candidates: HashMap<SubnetKey, Candidate>,
    /// Which candidate holds each subnet.
    claims: Claims,
    /// Keys already warned about (foreign backend, malformed, rejected): once per key, until the
    /// key is deleted or admitted whole.
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
            candidates: HashMap::new(),
            claims: Claims::default(),
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
        self.relist(&rules(keeper), keeper.mgr.config.backend.kind, &kvs);
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
        let kind = keeper.mgr.config.backend.kind;
        let (lost, out) = self.on_event(&rules(keeper), kind, ev, |v| keeper.mgr.is_ours(v));
        for ev in out {
            send(events, ev).await?;
        }
        Ok(lost)
    }

    /// One watch event → the events for the maps; `true` when it means our own lease is lost
    /// (`is_ours`: whether a value on our key is our own lease).
    fn on_event(
        &mut self,
        rules: &Rules,
        kind: BackendKind,
        ev: WatchEvent,
        is_ours: impl Fn(&[u8]) -> bool,
    ) -> (bool, Vec<Event>) {
        let affected = match ev {
            WatchEvent::Put(kv) => {
                if canonical_key(rules.prefix, &kv.key) == Some(rules.own) {
                    // Our own renewals/updates echo back; anything else on our key is a takeover.
                    return (!is_ours(&kv.value), Vec::new());
                }
                self.admit(rules, kind, &kv)
            }
            WatchEvent::Delete { key } => {
                // Warn about it again if it comes back malformed.
                self.warned.remove(&key);
                // Another spelling of a subnet is not its lease: nothing of ours or a peer's went.
                let Some(k) = canonical_key(rules.prefix, &key) else {
                    return (false, Vec::new());
                };
                if k == rules.own {
                    return (true, Vec::new());
                }
                self.withdraw(k)
            }
        };
        let mut out = Vec::new();
        for k in affected {
            let was = self.peers.remove(&k);
            match (self.standing(k), was) {
                (Some(l), was) => {
                    let changed = was.as_ref().map(|p| &p.attrs) != Some(&l.attrs);
                    self.peers.insert(k, l.clone());
                    if changed {
                        tracing::info!(subnet = %k, public_ip = %l.public_addr(), "peer lease added or changed");
                        out.push(Event::PeerUpsert(l));
                    }
                }
                (None, Some(old)) => {
                    tracing::info!(subnet = %k, public_ip = %old.public_addr(), "peer lease removed");
                    out.push(Event::PeerRemove(old));
                }
                (None, None) => {}
            }
        }
        (false, out)
    }

    /// Takes one key/value of a peer into the candidates; the keys whose standing may have
    /// changed (its own and those of the leases that claim the same subnets), lowest first. A key
    /// that is not canonical changes nothing: it never stands for the lease it spells.
    fn admit(&mut self, rules: &Rules, kind: BackendKind, kv: &KeyValue) -> BTreeSet<SubnetKey> {
        let canonical = canonical_key(rules.prefix, &kv.key);
        let candidate = self.parse(kind, kv).map(|l| check_peer(rules, &kv.key, l));
        let admitted = match candidate {
            Some((Some(lease), rejected)) => Some(Candidate {
                key: kv.key.clone(),
                lease,
                rejected,
            }),
            Some((None, rejected)) => {
                self.warn_rejected(&kv.key, &rejected);
                None
            }
            None => None,
        };
        let Some(k) = canonical else {
            return BTreeSet::new();
        };
        let mut affected = self.withdraw(k);
        if let Some(c) = admitted {
            self.claims.insert(&c.lease);
            affected.extend(self.claims.rivals(&c.lease));
            self.candidates.insert(k, c);
        }
        affected
    }

    /// Drops the candidate of `k`; the keys whose standing may have changed.
    fn withdraw(&mut self, k: SubnetKey) -> BTreeSet<SubnetKey> {
        let mut affected = BTreeSet::from([k]);
        if let Some(old) = self.candidates.remove(&k) {
            affected.extend(self.claims.rivals(&old.lease));
            self.claims.remove(&old.lease);
        }
        affected
    }

    /// What `k`'s lease programs now: the candidate without the sides a lower key holds (`None`:
    /// nothing). Its rejections are logged and counted once.
    fn standing(&mut self, k: SubnetKey) -> Option<Lease> {
        let c = self.candidates.get(&k)?;
        let (lease, lost) = self.claims.winning(&c.lease);
        let rejected: Vec<Rejection> = c.rejected.iter().cloned().chain(lost).collect();
        let key = c.key.clone();
        if rejected.is_empty() {
            self.warned.remove(&key);
        } else {
            self.warn_rejected(&key, &rejected);
        }
        lease
    }

    /// Logs and counts the rejected sides of a lease, once per key.
    fn warn_rejected(&mut self, key: &str, rejected: &[Rejection]) {
        if rejected.is_empty() || !self.warned.insert(key.to_string()) {
            return;
        }
        for r in rejected {
            crate::metrics::lease_rejected(r.reason.label());
            tracing::warn!(
                key,
                field = r.field,
                reason = r.reason.label(),
                "{}; not programming it",
                r.why
            );
        }
    }

    /// Parses one subnet key/value: `Some(lease)` for a lease of our backend; `None` for keys
    /// that are skipped (foreign backend, malformed; each warned about once).
    fn parse(&mut self, kind: BackendKind, kv: &KeyValue) -> Option<Lease> {
        match parse_lease(&kv.key, &kv.value, kind) {
            Ok(l) => Some(l),
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

    /// The peers of a whole listing (our own key left out), from scratch.
    fn relist(&mut self, rules: &Rules, kind: BackendKind, kvs: &[KeyValue]) {
        let own = rules.own;
        self.candidates.clear();
        self.claims = Claims::default();
        let listed: HashSet<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
        self.warned.retain(|k| listed.contains(k.as_str()));
        for kv in kvs {
            if canonical_key(rules.prefix, &kv.key) != Some(own) {
                self.admit(rules, kind, kv);
            }
        }
        let mut keys: Vec<SubnetKey> = self.candidates.keys().copied().collect();
        keys.sort();
        self.peers = keys
            .into_iter()
            .filter_map(|k| Some((k, self.standing(k)?)))
            .collect();
    }
}

/// What a peer's lease is checked against: the prefix, the config and our own lease.
fn rules<R: Registry>(keeper: &LeaseKeeper<R>) -> Rules<'_> {
    let own = &keeper.own().lease;
    Rules {
        prefix: keeper.mgr.registry.prefix(),
        config: &keeper.mgr.config,
        own: own.key(),
        own_attrs: &own.attrs,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::control::{
        lease::{parse_subnet_key, LeaseAttrs},
        peer_check::{tests::Fixture, Reason},
    };

    const PREFIX: &str = "/coreos.com/network";

    fn attrs(last: u8) -> LeaseAttrs {
        LeaseAttrs::vxlan(Ipv4Addr::new(198, 18, 0, last), 1, [2, 0, 0, 0, 0, last])
    }

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: format!("{PREFIX}/subnets/{k}"),
            value: v.into(),
            lease_id: 0,
            mod_revision: 1,
        }
    }

    fn key(k: &str) -> SubnetKey {
        parse_subnet_key(k).unwrap()
    }

    fn fixture(config: &str) -> Fixture {
        Fixture::with_own(config, "10.9.1.0-24", attrs(1))
    }

    const CONFIG: &str = r#"{"Network":"10.9.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:9::/56","Backend":{"Type":"vxlan"}}"#;

    #[test]
    fn peers_skip_foreign_malformed_and_rejected() {
        let fx = fixture(CONFIG);
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
            kv("10.9.8.0-024", &attrs(8).to_json()), // another spelling of 10.9.8.0-24
            kv("10.8.0.0-24", &attrs(9).to_json()), // outside the Network
        ];
        let mut w = PeerWatch::new();
        let before = crate::metrics::leases_rejected(Reason::Key.label());
        w.relist(&fx.rules(), BackendKind::Vxlan, &kvs);
        assert_eq!(w.peers.len(), 2, "{:?}", w.peers);
        assert_eq!(w.peers[&key("10.9.2.0-24")].attrs, attrs(2));
        let d = &w.peers[&key("10.9.6.0-24&fd00:9:0:6::-64")];
        assert_eq!(
            d.v6().unwrap().vtep.unwrap().vtep_mac.to_string(),
            "02:00:00:00:01:06"
        );
        assert_eq!(w.warned.len(), 6, "{:?}", w.warned);
        assert!(crate::metrics::leases_rejected(Reason::Key.label()) > before);
        // Listed again: nothing is warned about (or counted) twice.
        let warned = w.warned.clone();
        w.relist(&fx.rules(), BackendKind::Vxlan, &kvs);
        assert_eq!(w.warned, warned);
    }

    /// Sends one event through the watch's logic; the events for the maps as (kind, key).
    fn event(w: &mut PeerWatch, fx: &Fixture, ev: WatchEvent) -> Vec<(&'static str, String)> {
        let (lost, out) = w.on_event(&fx.rules(), BackendKind::Vxlan, ev, |_| true);
        assert!(!lost);
        out.into_iter()
            .map(|e| match e {
                Event::PeerUpsert(l) => ("upsert", describe(&l)),
                Event::PeerRemove(l) => ("remove", describe(&l)),
                e => panic!("unexpected {e:?}"),
            })
            .collect()
    }

    /// A lease's key and the families it programs.
    fn describe(l: &Lease) -> String {
        format!(
            "{}{}{}",
            l.key(),
            if l.v4().is_some() { " v4" } else { "" },
            if l.v6().is_some() { " v6" } else { "" }
        )
    }

    fn put(k: &str, v: &str) -> WatchEvent {
        WatchEvent::Put(kv(k, v))
    }

    fn del(k: &str) -> WatchEvent {
        WatchEvent::Delete { key: kv(k, "").key }
    }

    #[test]
    fn an_overlapping_lease_waits_for_the_subnet_and_aliases_touch_nothing() {
        let fx = fixture(CONFIG);
        let mut w = PeerWatch::new();
        let dual = |last: u8| {
            LeaseAttrs::vxlan_dual(
                Some(Ipv4Addr::new(198, 18, 0, last)),
                Some(format!("fd00:198:18::{last}").parse().unwrap()),
                1,
                [2, 0, 0, 0, 0, last],
            )
            .to_json()
        };
        let a = "10.9.7.0-24&fd00:9:0:7::-64";
        assert_eq!(
            event(&mut w, &fx, put(a, &dual(7))),
            [("upsert", format!("{a} v4 v6"))]
        );
        // A lease of the same IPv4 subnet under a lower key takes that side; the other keeps
        // its IPv6 side.
        assert_eq!(
            event(&mut w, &fx, put("10.9.7.0-24", &attrs(8).to_json())),
            [
                ("upsert", "10.9.7.0-24 v4".to_string()),
                ("upsert", format!("{a} v6"))
            ]
        );
        // One with a higher key gets nothing (the IPv6 subnet is held too).
        let b = "10.9.9.0-24&fd00:9:0:7::-64";
        assert_eq!(
            event(&mut w, &fx, put(b, &dual(9))),
            [("upsert", format!("{b} v4"))]
        );
        // Another spelling of a held key, put and deleted: nothing changes.
        assert_eq!(event(&mut w, &fx, put("10.9.7.0-024", &attrs(10).to_json())), []);
        assert_eq!(event(&mut w, &fx, del("10.9.7.0-024")), []);
        // The holder goes: the held-back side is programmed at once.
        assert_eq!(
            event(&mut w, &fx, del("10.9.7.0-24")),
            [
                ("remove", "10.9.7.0-24 v4".to_string()),
                ("upsert", format!("{a} v4 v6"))
            ]
        );
        assert_eq!(
            event(&mut w, &fx, del(a)),
            [("remove", format!("{a} v4 v6")), ("upsert", format!("{b} v4 v6"))]
        );
        // A lease that becomes unusable is removed; one that is fixed comes back.
        assert_eq!(
            event(
                &mut w,
                &fx,
                put("10.9.9.0-24&fd00:9:0:7::-64", &attrs(1).to_json())
            ),
            [("remove", format!("{b} v4 v6"))]
        );
        assert_eq!(
            event(&mut w, &fx, put(b, &dual(9))),
            [("upsert", format!("{b} v4 v6"))]
        );
        // Our own key echoed back is no peer.
        assert_eq!(event(&mut w, &fx, put("10.9.1.0-24", &attrs(1).to_json())), []);
    }
}
