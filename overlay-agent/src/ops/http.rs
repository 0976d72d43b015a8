//! `/healthz`, `/readyz` and `/metrics` on `--healthz-ip:--healthz-port`, over plain HTTP/1.

use std::{convert::Infallible, net::SocketAddr};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::metrics::METRICS;

#[derive(Debug, thiserror::Error)]
#[error("listening on {addr} for /healthz and /metrics (--healthz-ip/--healthz-port): {source}")]
pub struct HttpError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

const METRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds now (so a taken port is a startup error) and serves in the background.
pub async fn spawn(addr: SocketAddr) -> Result<SocketAddr, HttpError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| HttpError { addr, source })?;
    info!(addr = %local, "serving /healthz, /readyz and /metrics");
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(handle));
                if let Err(e) = conn.await {
                    debug!(%peer, error = %e, "health/metrics connection");
                }
            });
        }
    });
    Ok(local)
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
