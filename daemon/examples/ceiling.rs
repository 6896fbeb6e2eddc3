//! The benchmark's baseline: the smallest axum service that reads a POSTed body and answers 200. Whatever
//! hookbridge does on top of this (verify, classify, route, spool with fsync) is measured against it.
//!
//! `cargo run --release -p hookbridge --example ceiling -- 127.0.0.1:8091`

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8091".into());
    let app = Router::new().fallback(|body: Bytes| async move {
        std::hint::black_box(body);
        StatusCode::OK
    });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}
