//! [`Registry`] on etcd's v3 API, with flannel's key layout.

use std::{future::Future, time::Duration};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
    WatchStream,
};
use tokio::time::Instant;

use super::registry::{KeyValue, Registry, RegistryError, RegistryWatch, WatchEvent, Written};
use crate::control::lease::{subnet_key, SubnetKey};

/// Bound on every unary etcd request (watches are unbounded).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS material for etcd, as flanneld's `--etcd-cafile/--etcd-certfile/--etcd-keyfile`.
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: EtcdTls,
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdConnectError {
    #[error("reading {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("connecting to etcd at {endpoints}: {detail}{hint}")]
    Connect {
        endpoints: String,
        /// The error with its whole source chain (tonic hides the cause behind "transport error").
        detail: String,
        hint: &'static str,
        source: etcd_client::Error,
    },
    /// The TLS handshake failed: a configuration error that retrying cannot fix.
    #[error("TLS handshake with etcd at {endpoints} failed: {detail}; check that --etcd-cafile {ca_file} is the CA that signed etcd's server certificate (and that etcd accepts the client certificate --etcd-certfile {cert_file})")]
    Tls {
        endpoints: String,
        ca_file: String,
        cert_file: String,
        detail: String,
    },
}

/// `e: cause: cause…`, skipping causes already contained in the text so far.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = c.source();
    }
    out
}

fn is_tls_failure(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    ["certificate", "unknownissuer", "handshake", "tls", "bad ca"]
        .iter()
        .any(|w| d.contains(w))
}

#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    prefix: String,
}

async fn timed<T>(fut: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, RegistryError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(r) => r.map_err(RegistryError::from),
        Err(_) => Err(RegistryError::Timeout(REQUEST_TIMEOUT)),
    }
}

fn kv_of(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        lease_id: kv.lease(),
        mod_revision: kv.mod_revision(),
    }
}

impl EtcdRegistry {
    /// Builds a client for all endpoints (etcd-client balances and fails over between them).
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, EtcdConnectError> {
        let mut co = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some(user) = &opts.username {
            co = co.with_user(user.clone(), opts.password.clone().unwrap_or_default());
        }
        let tls = &opts.tls;
        let tls_on = tls.ca_file.is_some()
            || tls.cert_file.is_some()
            || opts.endpoints.iter().any(|e| e.starts_with("https://"));
        if tls_on {
            let read = |what: &'static str, path: &String| {
                std::fs::read(path).map_err(|source| EtcdConnectError::ReadFile {
                    what,
                    path: path.clone(),
                    source,
                })
            };
            let mut t = etcd_client::TlsOptions::new();
            if let Some(ca) = &tls.ca_file {
                t = t.ca_certificate(etcd_client::Certificate::from_pem(read("--etcd-cafile", ca)?));
            }
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                t = t.identity(etcd_client::Identity::from_pem(
                    read("--etcd-certfile", cert)?,
                    read("--etcd-keyfile", key)?,
                ));
            }
            co = co.with_tls(t);
        }
        let endpoints = opts.endpoints.join(",");
        let hint = if opts.username.is_some() {
            " (check --etcd-username and --etcd-password)"
        } else {
            ""
        };
        let connect_err = |source: etcd_client::Error| {
            let detail = chain(&source);
            if tls_on && is_tls_failure(&detail) {
                EtcdConnectError::Tls {
                    endpoints: endpoints.clone(),
                    ca_file: tls.ca_file.clone().unwrap_or_else(|| "(none)".into()),
                    cert_file: tls.cert_file.clone().unwrap_or_else(|| "(none)".into()),
                    detail,
                }
            } else {
                EtcdConnectError::Connect {
                    endpoints: endpoints.clone(),
                    detail,
                    hint,
                    source,
                }
            }
        };
        let client = Client::connect(&opts.endpoints, Some(co))
            .await
            .map_err(connect_err)?;
        let reg = EtcdRegistry {
            client,
            prefix: opts.prefix.trim_end_matches('/').to_string(),
        };
        if tls_on {
            // The client connects lazily: one request now, so a certificate problem is reported
            // as one (naming the files) instead of as endless retries.
            let mut c = reg.client.clone();
            if let Ok(Err(e)) = tokio::time::timeout(REQUEST_TIMEOUT, c.get(reg.config_key(), None)).await {
                return Err(connect_err(e));
            }
        }
        Ok(reg)
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    async fn grant(&self, ttl: Duration) -> Result<(i64, Instant), RegistryError> {
        let mut c = self.client.clone();
        let start = Instant::now();
        let g = timed(c.lease_grant(ttl.as_secs() as i64, None)).await?;
        Ok((g.id(), start + Duration::from_secs(g.ttl().max(0) as u64)))
    }

    async fn revoke_quietly(&self, id: i64) {
        let mut c = self.client.clone();
        let _ = timed(c.lease_revoke(id)).await;
    }
}

impl Registry for EtcdRegistry {
    type Watch = EtcdWatch;

    async fn get_network_config(&self) -> Result<Option<String>, RegistryError> {
        let mut c = self.client.clone();
        let r = timed(c.get(self.config_key(), None)).await?;
        Ok(r.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    async fn list_subnets(&self) -> Result<(Vec<KeyValue>, i64), RegistryError> {
        let mut c = self.client.clone();
        let r = timed(c.get(self.subnets_prefix(), Some(GetOptions::new().with_prefix()))).await?;
        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
        Ok((r.kvs().iter().map(kv_of).collect(), rev))
    }

    async fn create_subnet(
        &self,
        sn: SubnetKey,
        value: String,
        ttl: Duration,
    ) -> Result<Written, RegistryError> {
        let key = subnet_key(&self.prefix, sn);
        let (id, exp) = self.grant(ttl).await?;
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                value,
                Some(PutOptions::new().with_lease(id)),
            )]);
        let mut c = self.client.clone();
        let r = match timed(c.txn(txn)).await {
            Ok(r) => r,
            Err(e) => {
                self.revoke_quietly(id).await;
                return Err(e);
            }
        };
        if !r.succeeded() {
            self.revoke_quietly(id).await;
            return Err(RegistryError::AlreadyExists(key));
        }
        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
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
        let key = subnet_key(&self.prefix, sn);
        let (id, exp) = match ttl {
            Some(t) => {
                let (id, e) = self.grant(t).await?;
                (id, Some(e))
            }
            None => (0, None),
        };
        let put_opts = (id != 0).then(|| PutOptions::new().with_lease(id));
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                prev_mod_revision,
            )])
            .and_then([TxnOp::put(key.clone(), value, put_opts)]);
        let mut c = self.client.clone();
        let r = match timed(c.txn(txn)).await {
            Ok(r) => r,
            Err(e) => {
                if id != 0 {
                    self.revoke_quietly(id).await;
                }
                return Err(e);
            }
        };
        if !r.succeeded() {
            if id != 0 {
                self.revoke_quietly(id).await;
            }
            return Err(RegistryError::Conflict(key));
        }
        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
        Ok(Written {
            lease_id: id,
            mod_revision: rev,
            expiration: exp,
        })
    }

    async fn renew_lease(&self, lease_id: i64) -> Result<Instant, RegistryError> {
        let mut c = self.client.clone();
        let start = Instant::now();
        let (mut keeper, mut stream) = timed(c.lease_keep_alive(lease_id)).await?;
        timed(keeper.keep_alive()).await?;
        let resp = timed(stream.message())
            .await?
            .ok_or_else(|| RegistryError::Other("lease keep-alive stream closed".into()))?;
        if resp.ttl() <= 0 {
            return Err(RegistryError::LeaseNotFound(lease_id));
        }
        Ok(start + Duration::from_secs(resp.ttl() as u64))
    }

    async fn delete_subnet(&self, sn: SubnetKey) -> Result<(), RegistryError> {
        let mut c = self.client.clone();
        timed(c.delete(subnet_key(&self.prefix, sn), None)).await?;
        Ok(())
    }

    async fn watch_subnets(&self, from_revision: i64) -> Result<EtcdWatch, RegistryError> {
        let mut c = self.client.clone();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from_revision);
        let stream = timed(c.watch(self.subnets_prefix(), Some(opts))).await?;
        Ok(EtcdWatch {
            stream,
            revision: from_revision - 1,
        })
    }

    fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    fn prefix(&self) -> &str {
        &self.prefix
    }
}

pub struct EtcdWatch {
    stream: WatchStream,
    /// mod revision of the last event delivered.
    revision: i64,
}

impl RegistryWatch for EtcdWatch {
    fn revision(&self) -> i64 {
        self.revision
    }

    async fn next(&mut self) -> Result<Vec<WatchEvent>, RegistryError> {
        loop {
            let Some(resp) = self.stream.message().await? else {
                return Err(RegistryError::WatchClosed);
            };
            if resp.compact_revision() > 0 {
                return Err(RegistryError::Compacted(resp.compact_revision()));
            }
            if resp.canceled() {
                return Err(RegistryError::Other(format!(
                    "watch canceled by etcd: {}",
                    resp.cancel_reason()
                )));
            }
            let evs: Vec<WatchEvent> = resp
                .events()
                .iter()
                .filter_map(|ev| {
                    let kv = ev.kv()?;
                    self.revision = self.revision.max(kv.mod_revision());
                    Some(match ev.event_type() {
                        EventType::Put => WatchEvent::Put(kv_of(kv)),
                        EventType::Delete => WatchEvent::Delete {
                            key: String::from_utf8_lossy(kv.key()).into_owned(),
                        },
                    })
                })
                .collect();
            if !evs.is_empty() {
                return Ok(evs);
            }
        }
    }
}
