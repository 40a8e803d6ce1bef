//! Carrying a TCP-like connection to a device's service: the bytes of one
//! connection copied both ways to another until both directions end.
//!
//! Every path to a service ends here: the platform-side listener
//! (`listen`), the admin API's connect endpoint (`admin`) and the
//! engineer-side proxy (`connect`). This module owns the buffer size and the
//! log line with the byte counts; it never opens or refuses anything.

use std::io;

use tether_proto::tokio_io::{TunnelStream, copy_bidirectional};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::info;

/// Buffer per direction of a connection that is not a tunnel stream. 64
/// KiB keeps system calls large without holding much memory per connection.
const COPY_BUFFER: usize = 64 * 1024;

/// Copies between `client` (the engineer's side) and `stream`, a tunnel
/// stream to the device's service, passing half-closes on, and logs what
/// was carried. The stream's received chunks are written to the client as
/// they are (`tether_proto::tokio_io::copy`).
pub(crate) async fn bridge<C>(client: &mut C, stream: &mut TunnelStream)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    info!("connection open");
    report(
        copy_bidirectional(stream, client)
            .await
            .map(|(down, up)| (up, down)),
    );
}

/// As [`bridge`], between `client` and any other connection that leads to
/// the device's service.
pub(crate) async fn bridge_io<C, D>(client: &mut C, device: &mut D)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    D: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    info!("connection open");
    report(
        tokio::io::copy_bidirectional_with_sizes(client, device, COPY_BUFFER, COPY_BUFFER).await,
    );
}

fn report(result: io::Result<(u64, u64)>) {
    match result {
        Ok((up, down)) => info!(to_device = up, from_device = down, "connection closed"),
        Err(e) => info!(cause = %e, "connection ended with an error"),
    }
}
