//! Codec throughput for 16 KiB DATA frames (budget: at least 2 GB/s).
//!
//! `cargo bench -p tether-proto --bench codec`

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use tether_proto::{Frame, StreamId};

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

criterion_group!(benches, codec);
criterion_main!(benches);
