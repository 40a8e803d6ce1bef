//! Verifying a 10 MiB snapshot (budget: under 50 ms): the manifest's
//! signature and rules, then every component's length and SHA-256, against
//! the floor of hashing the same 10 MiB with nothing else, in the same run.
//!
//! `cargo bench -p tether-proto --bench snapshot`
// A benchmark needs a clock; the ban is for the library.
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use ring::signature::{Ed25519KeyPair, KeyPair};
use tether_proto::snapshot::{
    self, Component, ComponentCheck, MANIFEST_CONTEXT, Manifest, Trust, seal,
};

const DEVICE: &str = "dev_0123456789abcdef0123456789abcdef";
const NOW: u64 = 1_800_000_000;
const BUDGET: Duration = Duration::from_millis(50);
const ROUNDS: usize = 30;

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let rng = ring::rand::SystemRandom::new();
    let key =
        Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref()).unwrap();
    // 10 MiB: flows of 2 MiB, eight module tarballs of 1 MiB, small files.
    let mut parts: Vec<(String, Vec<u8>)> = vec![
        ("flows.json".into(), vec![b'['; 2 << 20]),
        ("credentials.json".into(), vec![b'c'; 4096]),
        ("settings.json".into(), vec![b's'; 1024]),
    ];
    for i in 0..8 {
        parts.push((format!("modules/m{i}-1.0.0.tgz"), vec![i as u8; 1 << 20]));
    }
    let total: usize = parts.iter().map(|(_, b)| b.len()).sum();
    let manifest = Manifest {
        format: 1,
        device: DEVICE.into(),
        version: 2,
        created_at: NOW,
        expires_at: NOW + 3600,
        components: parts
            .iter()
            .map(|(path, bytes)| Component::describe(path, bytes))
            .collect(),
    };
    let envelope = seal(
        MANIFEST_CONTEXT,
        &serde_json::to_vec(&manifest).unwrap(),
        &[&key],
    );
    let wire = serde_json::to_vec(&envelope).unwrap();
    let trust = Trust::pinned(&tether_proto::hex::encode(key.public_key().as_ref()));

    let mut floor = Vec::new();
    let mut verify = Vec::new();
    for _ in 0..ROUNDS {
        let started = Instant::now();
        for (_, bytes) in &parts {
            black_box(ring::digest::digest(&ring::digest::SHA256, bytes));
        }
        floor.push(started.elapsed());
        let started = Instant::now();
        let envelope = snapshot::Envelope::parse(&wire).unwrap();
        let m = trust.verify_manifest(&envelope, DEVICE, 1, NOW).unwrap();
        for (entry, (_, bytes)) in m.components.iter().zip(&parts) {
            // As a reader would: 64 KiB at a time.
            let mut check = ComponentCheck::new(entry);
            for chunk in bytes.chunks(64 * 1024) {
                check.update(chunk).unwrap();
            }
            check.finish().unwrap();
        }
        verify.push(started.elapsed());
    }
    let (floor, verify) = (median(floor), median(verify));
    println!(
        "snapshot of {:.1} MiB, {} components, median of {ROUNDS} rounds",
        total as f64 / (1 << 20) as f64,
        parts.len()
    );
    println!("| what | time | / SHA-256 alone |");
    println!("|---|---:|---:|");
    println!(
        "| SHA-256 of every component (floor) | {:.2} ms | 1.00 |",
        floor.as_secs_f64() * 1e3
    );
    println!(
        "| verify: envelope, signature, manifest rules, every component streamed | {:.2} ms | {:.2} |",
        verify.as_secs_f64() * 1e3,
        verify.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "{} verification of a 10 MiB snapshot {:.2} ms (budget < {} ms)",
        if verify < BUDGET { "PASS" } else { "MISS" },
        verify.as_secs_f64() * 1e3,
        BUDGET.as_millis()
    );
}
