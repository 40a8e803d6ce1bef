//! Codec throughput for 16 KiB DATA frames (budget: at least 2 GB/s), and
//! the state machine alone moving bytes between two connections in memory
//! (no sockets, no TLS): what the protocol itself costs per byte.
//!
//! `cargo bench -p tether-proto --bench codec`
// A benchmark needs a clock; the ban is for the library.
#![allow(clippy::disallowed_methods)]

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Instant;
use tether_proto::{Config, Connection, Frame, Role, Service, ServiceHeader, StreamId};

const PAYLOAD: usize = 16 * 1024;

fn data_frame() -> Frame {
    Frame::Data {
        stream: StreamId(7),
        fin: false,
        payload: Bytes::from(vec![0xa5; PAYLOAD]),
    }
}

fn codec(c: &mut Criterion) {
    let frame = data_frame();
    let encoded = Bytes::from(frame.to_bytes());
    let mut group = c.benchmark_group("data_16k");
    group.throughput(Throughput::Bytes(encoded.len() as u64));
    group.bench_function("encode", |b| {
        let mut out = Vec::with_capacity(encoded.len());
        b.iter(|| {
            out.clear();
            black_box(&frame).encode(&mut out);
            black_box(&out);
        })
    });
    group.bench_function("decode", |b| {
        b.iter(|| black_box(Frame::decode(black_box(&encoded)).expect("valid frame")))
    });
    group.bench_function("decode_and_copy_out", |b| {
        // Decoding is zero-copy; this adds the copy a reader makes.
        let mut sink = vec![0u8; PAYLOAD];
        b.iter(|| {
            if let Ok(Frame::Data { payload, .. }) = Frame::decode(black_box(&encoded)) {
                sink.copy_from_slice(&payload);
            }
            black_box(&sink);
        })
    });
    group.finish();
}

/// Moves everything one side has to send to the other.
fn exchange(from: &mut Connection, to: &mut Connection, now: Instant) -> usize {
    let mut moved = 0;
    while let Some(msg) = from.poll_transmit(now) {
        moved += msg.len();
        to.handle_message(now, msg);
    }
    moved
}

fn connected_pair(now: Instant) -> (Connection, Connection, StreamId, StreamId) {
    let mut device = Connection::new(Config::new(Role::Device), now).expect("device config");
    let mut platform = Connection::new(Config::new(Role::Platform), now).expect("platform config");
    exchange(&mut device, &mut platform, now);
    exchange(&mut platform, &mut device, now);
    let sent = device
        .open(now, ServiceHeader::new(Service::Tcp("bench".into())))
        .expect("open");
    exchange(&mut device, &mut platform, now);
    let (received, _) = platform.accept().expect("incoming stream");
    exchange(&mut platform, &mut device, now);
    (device, platform, sent, received)
}

fn state_machine(c: &mut Criterion) {
    const BLOCK: usize = 1 << 20;
    let now = Instant::now();
    let (mut device, mut platform, sent, received) = connected_pair(now);
    let block = vec![0x5a; 64 * 1024];
    let mut group = c.benchmark_group("state_machine");
    group.throughput(Throughput::Bytes(BLOCK as u64));
    group.bench_function("transfer_1MiB", |b| {
        b.iter(|| {
            let mut written = 0;
            let mut read = 0;
            while read < BLOCK {
                while written < BLOCK {
                    match device.write(sent, &block[..(BLOCK - written).min(block.len())]) {
                        Ok(n) => written += n,
                        Err(_) => break,
                    }
                }
                exchange(&mut device, &mut platform, now);
                while let Ok(Some(chunk)) = platform.read(received, 64 * 1024) {
                    read += chunk.len();
                    black_box(&chunk);
                }
                exchange(&mut platform, &mut device, now);
            }
        })
    });
    group.finish();
}

criterion_group!(benches, codec, state_machine);
criterion_main!(benches);
