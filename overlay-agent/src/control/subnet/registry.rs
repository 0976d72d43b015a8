//! The storage the subnet manager needs, as a small trait (flannel's `subnet.Registry`), and an
//! in-memory implementation with etcd's semantics (revisions, leases with TTL, compaction) so
//! allocation, renewal and expiry run under a paused tokio clock.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::broadcast, time::Instant};

use crate::control::lease::{subnet_key, SubnetKey};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("subnet key {0} already exists (another node took it first)")]
    AlreadyExists(String),
    #[error("subnet key {0} was changed concurrently")]
    Conflict(String),
    #[error("etcd lease {0:x} not found (expired or revoked)")]
    LeaseNotFound(i64),
    #[error("watch history compacted at revision {0}; the subnet list must be read again")]
    Compacted(i64),
    #[error("watch stream closed")]
    WatchClosed,
    #[error("etcd request timed out after {0:?}")]
    Timeout(Duration),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("{0}")]
    Other(String),
}

/// A raw key/value as etcd stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// etcd lease id; 0 = no lease (a reservation).
    pub lease_id: i64,
    pub mod_revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete { key: String },
}

/// Result of a successful write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// 0 when the key has no etcd lease.
    pub lease_id: i64,
    pub mod_revision: i64,
    pub expiration: Option<Instant>,
}

/// What flannel's subnet manager needs from etcd. Keys are built by the registry from its prefix.
pub trait Registry: Send + Sync + 'static {
    type Watch: RegistryWatch;

    /// `<prefix>/config`, or `None` when the key does not exist (yet).
    fn get_network_config(&self) -> impl Future<Output = Result<Option<String>, RegistryError>> + Send;
    /// Every key under `<prefix>/subnets/` and the store revision they were read at.
    fn list_subnets(&self) -> impl Future<Output = Result<(Vec<KeyValue>, i64), RegistryError>> + Send;
    /// Creates the subnet key only if absent, attached to a fresh lease of `ttl`.
    fn create_subnet(
        &self,
        sn: SubnetKey,
        value: String,
        ttl: Duration,
    ) -> impl Future<Output = Result<Written, RegistryError>> + Send;
    /// Overwrites the key if its mod revision is still `prev_mod_revision`; with `ttl: None`
    /// the key gets no lease (a reservation stays a reservation).
    fn update_subnet(
        &self,
        sn: SubnetKey,
        value: String,
        prev_mod_revision: i64,
        ttl: Option<Duration>,
    ) -> impl Future<Output = Result<Written, RegistryError>> + Send;
    /// Refreshes an etcd lease to its full TTL; returns the new expiration.
    fn renew_lease(&self, lease_id: i64) -> impl Future<Output = Result<Instant, RegistryError>> + Send;
    fn delete_subnet(&self, sn: SubnetKey) -> impl Future<Output = Result<(), RegistryError>> + Send;
    /// Watches `<prefix>/subnets/` starting at `from_revision` (inclusive).
    fn watch_subnets(
        &self,
        from_revision: i64,
    ) -> impl Future<Output = Result<Self::Watch, RegistryError>> + Send;
    /// Key of the network config, for messages.
    fn config_key(&self) -> String;
    /// The etcd prefix (`/coreos.com/network`): the subnet keys are `<prefix>/subnets/…`.
    fn prefix(&self) -> &str;
}

pub trait RegistryWatch: Send {
    /// The next non-empty batch of events; `Err(Compacted)` means list again.
    fn next(&mut self) -> impl Future<Output = Result<Vec<WatchEvent>, RegistryError>> + Send;
    /// The revision of the last event delivered (the start revision − 1 before any): a new
    /// watch from `revision() + 1` misses nothing.
    fn revision(&self) -> i64;
}

// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct MemState {
    config: Option<String>,
    kvs: BTreeMap<String, KeyValue>,
    /// lease id -> (ttl, expiry)
    leases: HashMap<i64, (Duration, Instant)>,
    next_lease: i64,
    revision: i64,
    history: Vec<(i64, WatchEvent)>,
    compacted: i64,
    renewals: Vec<(i64, Instant)>,
    offline: bool,
}

impl MemState {
    fn bump(&mut self) -> i64 {
        self.revision += 1;
        self.revision
    }

    fn emit(&mut self, tx: &broadcast::Sender<(i64, WatchEvent)>, rev: i64, ev: WatchEvent) {
        self.history.push((rev, ev.clone()));
        let _ = tx.send((rev, ev));
    }

    /// Deletes keys whose lease ran out; returns the next expiry, if any.
    fn expire(&mut self, tx: &broadcast::Sender<(i64, WatchEvent)>) -> Option<Instant> {
        let now = Instant::now();
        let dead: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, (_, e))| *e <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.leases.remove(&id);
            let keys: Vec<String> = self
                .kvs
                .values()
                .filter(|kv| kv.lease_id == id)
                .map(|kv| kv.key.clone())
                .collect();
            for key in keys {
                self.kvs.remove(&key);
                let rev = self.bump();
                self.emit(tx, rev, WatchEvent::Delete { key });
            }
        }
        self.leases.values().map(|(_, e)| *e).min()
    }

    fn put(
        &mut self,
        tx: &broadcast::Sender<(i64, WatchEvent)>,
        key: String,
        value: Vec<u8>,
        lease_id: i64,
    ) -> i64 {
        let rev = self.bump();
        let kv = KeyValue {
            key: key.clone(),
            value,
            lease_id,
            mod_revision: rev,
        };
        self.kvs.insert(key, kv.clone());
        self.emit(tx, rev, WatchEvent::Put(kv));
        rev
    }

    fn grant(&mut self, ttl: Duration) -> (i64, Instant) {
        self.next_lease += 1;
        let exp = Instant::now() + ttl;
        self.leases.insert(self.next_lease, (ttl, exp));
        (self.next_lease, exp)
    }
}

/// An in-memory etcd stand-in. Cloning shares the store (several "nodes" on one store).
#[derive(Clone)]
pub struct MemRegistry {
    prefix: String,
    state: Arc<Mutex<MemState>>,
    tx: broadcast::Sender<(i64, WatchEvent)>,
}

impl Default for MemRegistry {
    fn default() -> Self {
        Self::new("/coreos.com/network")
    }
}

impl MemRegistry {
    pub fn new(prefix: &str) -> Self {
        let (tx, _) = broadcast::channel(1024);
        MemRegistry {
            prefix: prefix.trim_end_matches('/').to_string(),
            state: Default::default(),
            tx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        let mut st = self.state.lock().expect("registry lock");
        st.expire(&self.tx);
        st
    }

    fn check_online(st: &MemState) -> Result<(), RegistryError> {
        if st.offline {
            Err(RegistryError::Other("in-memory registry is offline".into()))
        } else {
            Ok(())
        }
    }

    pub fn set_network_config(&self, json: &str) {
        self.lock().config = Some(json.to_string());
    }

    /// Writes a raw subnet key; `ttl: None` makes a reservation.
    pub fn put_raw(&self, sn: impl Into<SubnetKey>, value: &str, ttl: Option<Duration>) {
        let mut st = self.lock();
        let lease = ttl.map(|t| st.grant(t).0).unwrap_or(0);
        st.put(
            &self.tx,
            subnet_key(&self.prefix, sn),
            value.as_bytes().to_vec(),
            lease,
        );
    }

    /// Writes any key under `<prefix>/subnets/` (for malformed-key tests).
    pub fn put_raw_key(&self, suffix: &str, value: &str) {
        let mut st = self.lock();
        st.put(
            &self.tx,
            format!("{}/subnets/{suffix}", self.prefix),
            value.as_bytes().to_vec(),
            0,
        );
    }

    pub fn delete_raw(&self, sn: impl Into<SubnetKey>) {
        let mut st = self.lock();
        let key = subnet_key(&self.prefix, sn);
        if st.kvs.remove(&key).is_some() {
            let rev = st.bump();
            st.emit(&self.tx, rev, WatchEvent::Delete { key });
        }
    }

    pub fn get_raw(&self, sn: impl Into<SubnetKey>) -> Option<KeyValue> {
        self.lock().kvs.get(&subnet_key(&self.prefix, sn)).cloned()
    }

    /// When the etcd lease behind `sn` expires (`None` = no key or no lease).
    pub fn expiry_of(&self, sn: impl Into<SubnetKey>) -> Option<Instant> {
        let st = self.lock();
        let kv = st.kvs.get(&subnet_key(&self.prefix, sn))?;
        st.leases.get(&kv.lease_id).map(|(_, e)| *e)
    }

    /// Every successful `renew_lease`: (lease id, when).
    pub fn renewals(&self) -> Vec<(i64, Instant)> {
        self.lock().renewals.clone()
    }

    /// Drops the watch history (new watches from old revisions fail with `Compacted`).
    pub fn compact(&self) {
        let mut st = self.lock();
        st.compacted = st.revision;
        st.history.clear();
    }

    /// Makes every request fail until set back (simulated etcd outage).
    pub fn set_offline(&self, offline: bool) {
        self.lock().offline = offline;
    }
}

impl Registry for MemRegistry {
    type Watch = MemWatch;

    async fn get_network_config(&self) -> Result<Option<String>, RegistryError> {
        let st = self.lock();
        Self::check_online(&st)?;
        Ok(st.config.clone())
    }

    async fn list_subnets(&self) -> Result<(Vec<KeyValue>, i64), RegistryError> {
        let st = self.lock();
        Self::check_online(&st)?;
        Ok((st.kvs.values().cloned().collect(), st.revision))
    }

    async fn create_subnet(
        &self,
        sn: SubnetKey,
        value: String,
        ttl: Duration,
    ) -> Result<Written, RegistryError> {
        let mut st = self.lock();
        Self::check_online(&st)?;
        let key = subnet_key(&self.prefix, sn);
        if st.kvs.contains_key(&key) {
            return Err(RegistryError::AlreadyExists(key));
        }
        let (id, exp) = st.grant(ttl);
        let rev = st.put(&self.tx, key, value.into_bytes(), id);
        Ok(Written {
            lease_id: id,
            mod_revision: rev,
            expiration: Some(exp),
        })
    }

    async fn update_subnet(
        &self,
        sn: SubnetKey,
        value: String,
        prev_mod_revision: i64,
        ttl: Option<Duration>,
    ) -> Result<Written, RegistryError> {
        let mut st = self.lock();
        Self::check_online(&st)?;
        let key = subnet_key(&self.prefix, sn);
        if st.kvs.get(&key).map(|kv| kv.mod_revision) != Some(prev_mod_revision) {
            return Err(RegistryError::Conflict(key));
        }
        let (id, exp) = match ttl {
            Some(t) => {
                let (id, e) = st.grant(t);
                (id, Some(e))
            }
            None => (0, None),
        };
        let rev = st.put(&self.tx, key, value.into_bytes(), id);
        Ok(Written {
            lease_id: id,
            mod_revision: rev,
            expiration: exp,
        })
    }

    async fn renew_lease(&self, lease_id: i64) -> Result<Instant, RegistryError> {
        let mut st = self.lock();
        Self::check_online(&st)?;
        let now = Instant::now();
        let Some((ttl, exp)) = st.leases.get_mut(&lease_id) else {
            return Err(RegistryError::LeaseNotFound(lease_id));
        };
        *exp = now + *ttl;
        let exp = *exp;
        st.renewals.push((lease_id, now));
        Ok(exp)
    }

    async fn delete_subnet(&self, sn: SubnetKey) -> Result<(), RegistryError> {
        Self::check_online(&self.lock())?;
        self.delete_raw(sn);
        Ok(())
    }

    async fn watch_subnets(&self, from_revision: i64) -> Result<MemWatch, RegistryError> {
        let st = self.lock();
        Self::check_online(&st)?;
        if from_revision <= st.compacted {
            return Err(RegistryError::Compacted(st.compacted));
        }
        let backlog = st
            .history
            .iter()
            .filter(|(r, _)| *r >= from_revision)
            .cloned()
            .collect();
        let rx = self.tx.subscribe();
        drop(st);
        Ok(MemWatch {
            reg: self.clone(),
            rx,
            backlog,
            from_revision,
        })
    }

    fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    fn prefix(&self) -> &str {
        &self.prefix
    }
}

pub struct MemWatch {
    reg: MemRegistry,
    rx: broadcast::Receiver<(i64, WatchEvent)>,
    backlog: Vec<(i64, WatchEvent)>,
    from_revision: i64,
}

impl RegistryWatch for MemWatch {
    fn revision(&self) -> i64 {
        self.from_revision - 1
    }

    async fn next(&mut self) -> Result<Vec<WatchEvent>, RegistryError> {
        if !self.backlog.is_empty() {
            let evs: Vec<_> = self
                .backlog
                .drain(..)
                .map(|(r, e)| {
                    self.from_revision = r + 1;
                    e
                })
                .collect();
            return Ok(evs);
        }
        loop {
            let next_expiry = {
                let mut st = self.reg.state.lock().expect("registry lock");
                if st.offline {
                    return Err(RegistryError::WatchClosed);
                }
                st.expire(&self.reg.tx)
            };
            let sleep = async {
                match next_expiry {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = self.rx.recv() => match r {
                    // An outage breaks the stream; a new watch replays from the history.
                    Ok(_) if self.reg.state.lock().expect("registry lock").offline => {
                        return Err(RegistryError::WatchClosed)
                    }
                    Ok((rev, ev)) if rev >= self.from_revision => {
                        self.from_revision = rev + 1;
                        let mut evs = vec![ev];
                        while let Ok((rev, ev)) = self.rx.try_recv() {
                            if rev >= self.from_revision {
                                self.from_revision = rev + 1;
                                evs.push(ev);
                            }
                        }
                        return Ok(evs);
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => return Err(RegistryError::Compacted(self.from_revision)),
                    Err(broadcast::error::RecvError::Closed) => return Err(RegistryError::WatchClosed),
                },
                _ = sleep => continue,
            }
        }
    }
}
