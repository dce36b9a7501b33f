//! A trace collector for `benches/proxy.sh` (`OTLP=1`): takes OTLP/HTTP exports on
//! `POST /v1/traces`, discards them, and answers an empty `ExportTraceServiceResponse`, so
//! that the router's cost of tracing is measured without a real collector's.
//!
//!   cargo run --release --example otlp_sink -- --port 4318
//!
//! On exit (Ctrl-C or SIGTERM) it prints how many exports and bytes it took.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 4318)]
    port: u16,
}

#[derive(Default)]
struct Taken {
    exports: AtomicU64,
    bytes: AtomicU64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    let taken = Arc::new(Taken::default());
    let t = Arc::clone(&taken);
    let serve = async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let t = Arc::clone(&t);
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let t = Arc::clone(&t);
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        t.exports.fetch_add(1, Ordering::Relaxed);
                        t.bytes
                            .fetch_add(body.map_or(0, |b| b.len() as u64), Ordering::Relaxed);
                        let mut r = Response::new(Full::new(Bytes::new()));
                        r.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/x-protobuf"),
                        );
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = serve => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!(
        "otlp_sink: {} exports, {} bytes",
        taken.exports.load(Ordering::Relaxed),
        taken.bytes.load(Ordering::Relaxed)
    );
    Ok(())
}
