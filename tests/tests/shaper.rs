//! The shaping proxy of the benchmarks (`tether_e2e::shaper`) really
//! shapes: latency each way, one rate shared by both directions, a cut that
//! drops every connection, bytes counted. Tolerances are wide: these check
//! the shape, not the machine's timer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use tether_e2e::shaper::{Crossed, Shape, Shaper};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An echo server on 127.0.0.1.
async fn echo() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = socket.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// Sends `len` bytes through `socket` and reads them back; the time taken.
async fn echo_through(socket: &mut TcpStream, len: usize) -> Result<Duration> {
    let started = Instant::now();
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = socket.split();
    let send = async {
        w.write_all(&data).await?;
        anyhow::Ok(())
    };
    let receive = async {
        let mut back = vec![0; len];
        r.read_exact(&mut back).await?;
        anyhow::ensure!(back == data, "the echo came back different");
        anyhow::Ok(())
    };
    tokio::try_join!(send, receive)?;
    Ok(started.elapsed())
}

#[tokio::test]
async fn a_round_trip_takes_the_latency_twice() -> Result<()> {
    let shaper = Shaper::start(echo().await?, Shape::new(100, 100.0)).await?;
    let mut socket = TcpStream::connect(shaper.addr()).await?;
    echo_through(&mut socket, 1).await?; // connection set up
    let took = echo_through(&mut socket, 1).await?;
    assert!(
        took >= Duration::from_millis(195) && took < Duration::from_millis(800),
        "one byte there and back took {took:?}, want about 200 ms"
    );
    assert_eq!(shaper.bytes(), Crossed { up: 2, down: 2 });
    Ok(())
}

#[tokio::test]
async fn both_directions_share_one_rate() -> Result<()> {
    // 1 Mbit/s = 125,000 B/s; 100,000 bytes echoed is 200,000 bytes on the
    // link: 1.6 s, whichever way they go.
    let shaper = Shaper::start(echo().await?, Shape::new(5, 1.0)).await?;
    let mut socket = TcpStream::connect(shaper.addr()).await?;
    let took = echo_through(&mut socket, 100_000).await?;
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "200,000 bytes at 125,000 B/s took {took:?}, want about 1.6 s"
    );
    assert_eq!(
        shaper.bytes(),
        Crossed {
            up: 100_000,
            down: 100_000
        }
    );
    // A second connection shares the same link: two echoes at once take
    // about twice as long as one.
    let mut a = TcpStream::connect(shaper.addr()).await?;
    let mut b = TcpStream::connect(shaper.addr()).await?;
    let started = Instant::now();
    let (x, y) = tokio::join!(echo_through(&mut a, 50_000), echo_through(&mut b, 50_000));
    x?;
    y?;
    let both = started.elapsed();
    assert!(
        both >= Duration::from_millis(1500),
        "two echoes of 50,000 bytes at once took {both:?}, want about 1.6 s"
    );
    Ok(())
}

#[tokio::test]
async fn a_cut_drops_every_connection_and_later_ones_work() -> Result<()> {
    let shaper = Shaper::start(echo().await?, Shape::new(10, 100.0)).await?;
    let mut first = TcpStream::connect(shaper.addr()).await?;
    let mut second = TcpStream::connect(shaper.addr()).await?;
    echo_through(&mut first, 10).await?;
    echo_through(&mut second, 10).await?;
    shaper.cut();
    for socket in [&mut first, &mut second] {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf)).await?;
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "a connection outlived the cut: {read:?}"
        );
    }
    let mut again = TcpStream::connect(shaper.addr()).await?;
    echo_through(&mut again, 10).await?;
    Ok(())
}
