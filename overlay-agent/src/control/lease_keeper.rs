//! Lease keeping: our subnet lease (both families) from the first acquisition on — retried
//! until granted, renewed before it expires, re-acquired (the same subnets when still free) when
//! it is lost — and subnet.env kept in step with it.

use std::time::Duration;

use tokio::{sync::mpsc, time::Instant};

use super::{send, Backoff, ControlError, Event, RunOptions, Stop};
use super::{
    subnet::{KeyValue, OwnLease, Registry, RegistryError, SubnetError, SubnetManager},
    subnet_env::SubnetEnv,
};

/// How long an agent waits before trying again when every subnet of the pool is leased.
pub const EXHAUSTED_RETRY: Duration = Duration::from_secs(10);

/// What became of a renewal.
pub enum Renewal {
    Renewed,
    /// The etcd lease is gone: acquire again.
    Lost,
    /// etcd did not answer; tried again later.
    Retry,
}

/// Holds our lease and subnet.env.
pub struct LeaseKeeper<R> {
    pub mgr: SubnetManager<R>,
    own: OwnLease,
    opts: RunOptions,
    /// The underlay MTU (subnet.env's FLANNEL_MTU follows from it).
    iface_mtu: u32,
    renew_at: Option<Instant>,
    /// Consecutive failed renewals: the retry waits 1, 2, 4, 8, then 10 s.
    renew_failures: u32,
}

impl<R: Registry> LeaseKeeper<R> {
    /// Acquires our lease (waiting as long as it takes), writes subnet.env and announces the
    /// lease with `Event::OwnLease`.
    pub async fn start(
        mut mgr: SubnetManager<R>,
        opts: &RunOptions,
        iface_mtu: u32,
        events: &mpsc::Sender<Event>,
    ) -> Result<Self, Stop> {
        let own = acquire(&mut mgr, events).await?;
        let keeper = LeaseKeeper {
            mgr,
            own,
            opts: opts.clone(),
            iface_mtu,
            renew_at: None,
            renew_failures: 0,
        };
        keeper.write_env()?;
        send(events, Event::OwnLease(keeper.own.lease.clone())).await?;
        Ok(keeper)
    }

    pub fn own(&self) -> &OwnLease {
        &self.own
    }

    /// Our lease was lost: takes one again (the same subnets when free), rewrites subnet.env
    /// when they changed, and announces it.
    pub async fn reacquire(&mut self, events: &mpsc::Sender<Event>) -> Result<(), Stop> {
        let old = self.own.lease.key();
        self.mgr.set_previous(old);
        self.own = acquire(&mut self.mgr, events).await?;
        let new = self.own.lease.key();
        if new != old {
            tracing::warn!(old = %old, new = %new, "re-acquired a DIFFERENT subnet; pods on the old one lose connectivity");
            self.write_env()?;
        } else {
            tracing::warn!(subnet = %old, "re-acquired our subnet lease");
        }
        send(events, Event::OwnLease(self.own.lease.clone())).await
    }

    /// Whether a listing still holds our lease under our public address.
    pub fn still_ours(&self, kvs: &[KeyValue]) -> bool {
        self.mgr.still_ours(kvs, self.own.lease.key())
    }

    /// Plans the next renewal from the lease's expiry (after every (re)connect).
    pub fn schedule_renewal(&mut self) {
        self.renew_at = self.mgr.renew_at(&self.own);
        self.renew_failures = 0;
    }

    /// Resolves when the lease is due for renewal (never for a reservation).
    pub async fn renewal_due(&self) {
        match self.renew_at {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    }

    pub async fn renew(&mut self) -> Renewal {
        match self.mgr.renew(&mut self.own).await {
            Ok(()) => {
                crate::metrics::lease_renewed(self.own.lease.expiration);
                self.schedule_renewal();
                Renewal::Renewed
            }
            Err(SubnetError::Registry(RegistryError::LeaseNotFound(_))) => {
                tracing::warn!(subnet = %self.own.lease.key(), "our etcd lease expired before renewal; acquiring a lease again");
                Renewal::Lost
            }
            Err(e) => {
                // Quick at first: the next attempt usually reaches a live member.
                let retry = Duration::from_secs(1 << self.renew_failures.min(3)).min(Duration::from_secs(10));
                self.renew_failures += 1;
                tracing::warn!(error = %e, ?retry, "renewing the subnet lease failed; retrying");
                self.renew_at = Some(Instant::now() + retry);
                Renewal::Retry
            }
        }
    }

    fn write_env(&self) -> Result<(), ControlError> {
        let config = &self.mgr.config;
        let lease = &self.own.lease;
        SubnetEnv {
            network: config.network(),
            subnet: lease.subnet,
            ipv6_network: config.ipv6_network(),
            ipv6_subnet: lease.ipv6_subnet,
            mtu: config.mtu(self.iface_mtu),
            ip_masq: self.opts.ip_masq,
        }
        .write(&self.opts.subnet_file)?;
        Ok(())
    }
}

/// Acquires a lease, retrying until one is granted: lost races and etcd errors with backoff,
/// an exhausted pool every [`EXHAUSTED_RETRY`] (a lease may be freed by another node).
async fn acquire<R: Registry>(
    mgr: &mut SubnetManager<R>,
    events: &mpsc::Sender<Event>,
) -> Result<OwnLease, Stop> {
    let mut backoff = Backoff::new();
    loop {
        let wait = match mgr.acquire().await {
            Ok(l) => return Ok(l),
            Err(e @ SubnetError::Exhausted { .. }) => {
                crate::metrics::pool_exhausted();
                tracing::error!(error = %e, retry_in = ?EXHAUSTED_RETRY,
                    "cannot lease a subnet: the pool is exhausted; waiting for a lease to be freed");
                // A little jitter so many waiting nodes do not all retry in the same instant.
                EXHAUSTED_RETRY + Duration::from_millis(rand::random::<u64>() % 500)
            }
            Err(e) => {
                tracing::warn!(error = %e, "failed to acquire a subnet lease; retrying");
                backoff.next_delay()
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = events.closed() => return Err(Stop::Closed),
        }
    }
}
