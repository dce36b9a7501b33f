//! The floor for `benches/proxy.sh`: a bare hyper forwarder, no parsing, no routing, no
//! limits. Every request goes to one upstream through a pooled hyper client (TCP_NODELAY on
//! both sides) and its response body is relayed frame by frame as hyper hands it over. It is
//! what any hyper-based proxy costs before it does anything of its own; Switchyard's figures
//! are read as ratios to it.
//!
//!   cargo run --release --example bare_forwarder -- --port 8200 --upstream http://127.0.0.1:8100

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// The upstream's base URL, e.g. `http://127.0.0.1:8100`.
    #[arg(long)]
    upstream: String,
}

type Body = Either<Incoming, Full<Bytes>>;

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    // The same runtime as the router: multi-threaded, one worker per core it may run on.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> std::io::Result<()> {
    let upstream: &'static str = Box::leak(args.upstream.trim_end_matches('/').into());
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(30)));
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        .pool_timer(TokioTimer::new())
        .build(connector);
    let listener = TcpListener::bind(("127.0.0.1", args.port)).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let client = client.clone();
                async move { Ok::<_, Infallible>(forward(&client, upstream, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn forward(
    client: &Client<HttpConnector, Incoming>,
    upstream: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    match format!("{upstream}{path}").parse() {
        Ok(uri) => parts.uri = uri,
        Err(_) => return bad_gateway(),
    }
    parts.headers.remove(http::header::HOST);
    match client.request(Request::from_parts(parts, body)).await {
        Ok(resp) => resp.map(Either::Left),
        Err(_) => bad_gateway(),
    }
}

fn bad_gateway() -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(b"bad gateway"))));
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}
