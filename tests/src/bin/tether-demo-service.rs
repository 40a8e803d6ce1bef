//! A stand-in for a device's local service in the README demo: a tiny HTTP
//! server on 127.0.0.1 that answers every request with one line of text, so
//! that `curl` through the tunnel shows where the answer came from.
//!
//! It reads at most 16 KiB of request head per connection, answers, and
//! closes. It is not a web server; it is something to reach.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_HEAD: usize = 16 * 1024;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let addr: SocketAddr = match listen.parse() {
        Ok(addr) => addr,
        Err(_) => {
            eprintln!("tether-demo-service: {listen:?} is not an address like 127.0.0.1:8080");
            return ExitCode::from(64);
        }
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("tether-demo-service: cannot listen on {addr}: {err}");
            return ExitCode::from(69);
        }
    };
    let local = listener
        .local_addr()
        .expect("a bound listener has an address");
    // The demo script reads this line to learn the port.
    println!("listening on {local}");
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(tcp, local)).await;
        });
    }
}

async fn answer(mut tcp: TcpStream, local: SocketAddr) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let body = format!(
        "Hello from the device's local service on {local}, reached through the Tether tunnel.\n"
    );
    let reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(reply.as_bytes()).await?;
    tcp.shutdown().await
}
