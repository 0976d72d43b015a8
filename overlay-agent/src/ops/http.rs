//! `/healthz`, `/readyz` and `/metrics` on `--healthz-ip:--healthz-port`, over plain HTTP/1.
//!
//! Anyone who can reach the port can talk to it (flanneld's default `--healthz-ip` is 0.0.0.0),
//! so what a connection may cost is bounded: at most [`MAX_CONNECTIONS`] at a time (the next
//! one waits in the kernel's accept queue, as Go's `netutil.LimitListener` does), request
//! headers within [`HEADER_TIMEOUT`] (which also closes an idle keep-alive connection), each
//! connection closed after [`CONNECTION_LIFETIME`], and a failing `accept` (EMFILE) retried
//! after a growing pause ([`Backoff`]) instead of at once, for ever.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::{debug, info, warn};

use crate::metrics::METRICS;

#[derive(Debug, thiserror::Error)]
#[error("listening on {addr} for /healthz and /metrics (--healthz-ip/--healthz-port): {source}")]
pub struct HttpError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

const METRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request headers, and that a keep-alive connection may idle.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// After this a connection is asked to close (the response in flight is finished, within
/// [`CLOSE_GRACE`]).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Pauses between failed `accept`s: 5 ms doubling to 1 s, back to none after a success (Go's
/// `http.Server` does the same).
#[derive(Debug, Default)]
pub struct Backoff(Duration);

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(5);
    pub const MAX: Duration = Duration::from_secs(1);

    /// The pause after one more failure.
    pub fn failed(&mut self) -> Duration {
        self.0 = if self.0.is_zero() {
            Self::FIRST
        } else {
            (self.0 * 2).min(Self::MAX)
        };
        self.0
    }

    pub fn succeeded(&mut self) {
        self.0 = Duration::ZERO;
    }
}

/// Binds now (so a taken port is a startup error) and serves in the background.
pub async fn spawn(addr: SocketAddr) -> Result<SocketAddr, HttpError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| HttpError { addr, source })?;
    info!(addr = %local, max_connections = MAX_CONNECTIONS, "serving /healthz, /readyz and /metrics");
    tokio::spawn(serve(listener));
    Ok(local)
}

async fn serve(listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Backoff::default();
    loop {
        // A slot first: beyond the cap, connections wait in the accept queue, holding no fd.
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, peer) = match listener.accept().await {
            Ok(c) => {
                backoff.succeeded();
                c
            }
            Err(e) => {
                let pause = backoff.failed();
                warn!(error = %e, retry_in = ?pause, "accepting a /healthz or /metrics connection");
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service_fn(handle));
            tokio::pin!(conn);
            let res = tokio::select! {
                r = conn.as_mut() => r,
                () = tokio::time::sleep(CONNECTION_LIFETIME) => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = res {
                debug!(%peer, error = %e, "health/metrics connection");
            }
        });
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(route(req.uri().path()))
}

/// The response for `path` (pure, for tests).
pub fn route(path: &str) -> Response<Full<Bytes>> {
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let s = METRICS.state();
            if s.ready() {
                text(StatusCode::OK, "ok\n".into())
            } else {
                let why = match (s.subnet.is_some(), s.attached) {
                    (false, false) => "no lease, programs not attached",
                    (false, true) => "no lease yet",
                    _ => "programs not attached",
                };
                text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n"))
            }
        }
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(METRICS.render())));
            r.headers_mut()
                .insert(CONTENT_TYPE, METRICS_TYPE.parse().expect("static header"));
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz or /metrics\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        "text/plain; charset=utf-8".parse().expect("static header"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_second_and_resets() {
        let mut b = Backoff::default();
        let pauses: Vec<u64> = (0..10).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(), Backoff::FIRST);
    }
}
