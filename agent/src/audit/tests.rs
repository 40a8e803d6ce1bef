use std::sync::Arc;

use super::*;
use tether_proto::audit as wire;

fn event(n: u64) -> AuditEvent {
    AuditEvent::Deploy {
        user: format!("user-{n}"),
        rev: Some(format!("rev-{n}")),
    }
}

fn records(queue: &AuditQueue) -> Vec<(u64, bytes::Bytes)> {
    queue
        .reader()
        .unwrap()
        .read_from(0, usize::MAX, usize::MAX)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_share_commits_and_every_event_is_recorded_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let queue =
        Arc::new(AuditQueue::open(dir.path(), store::DEFAULT_MAX_BYTES, Clock::system()).unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..16u64 {
        let queue = queue.clone();
        tasks.spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..100 {
                seqs.push(queue.record_durable(event(p * 1000 + i)).await.unwrap());
            }
            seqs
        });
    }
    let mut all = Vec::new();
    while let Some(seqs) = tasks.join_next().await {
        let seqs = seqs.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one producer's events keep their order"
        );
        all.extend(seqs);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=1600).collect::<Vec<_>>());
    let stored = records(&queue);
    assert_eq!(stored.len(), 1600);
    let report = wire::verify_chain(stored.iter().map(|(s, b)| (*s, b.as_ref())));
    assert!(report.intact(), "{:?}", report.problems);
    assert_eq!(queue.stats().last_seq, 1600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_over_events_are_written_before_close_returns() {
    let dir = tempfile::tempdir().unwrap();
    let queue = AuditQueue::open(dir.path(), store::DEFAULT_MAX_BYTES, Clock::system()).unwrap();
    for n in 0..500 {
        queue.record(event(n));
    }
    queue.close();
    drop(queue);
    let queue = AuditQueue::open(dir.path(), store::DEFAULT_MAX_BYTES, Clock::system()).unwrap();
    assert_eq!(queue.stats().last_seq, 500);
    assert_eq!(records(&queue).len(), 500);
    // After close, recording says so.
    queue.close();
    assert_eq!(
        queue.record_durable(event(1)).await,
        Err(AuditError::Closed)
    );
}

/// A full disk: a small tmpfs mounted for the test (as root, where mounts
/// are allowed; CI runs so). Where no tmpfs can be mounted, the test says
/// so and checks a store opened with the smallest bound instead: it stays
/// within it, and the overflow is marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_nothing_crashes_and_writing_resumes_when_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("small");
    std::fs::create_dir(&mount).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&mount)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        println!(
            "full disk: cannot mount a tmpfs at {} here; checking a store opened with the smallest bound instead",
            mount.display()
        );
        let queue = AuditQueue::open(&mount, store::MIN_MAX_BYTES, Clock::system()).unwrap();
        for chunk in 0..40 {
            for n in 0..1000 {
                queue.record(event(chunk * 1000 + n));
            }
            queue.record_durable(event(0)).await.unwrap();
        }
        let stats = queue.stats();
        assert!(stats.dropped > 0 && stats.error.is_none(), "{stats:?}");
        assert!(stats.file_bytes <= store::MIN_MAX_BYTES, "{stats:?}");
        let stored = records(&queue);
        let report = wire::verify_chain(stored.iter().map(|(s, b)| (*s, b.as_ref())));
        assert_eq!(report.dropped, stats.dropped);
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    println!("full disk: a 3 MiB tmpfs at {}", mount.display());
    let queue = AuditQueue::open(&mount, store::DEFAULT_MAX_BYTES, Clock::system()).unwrap();
    // Fill the file system with something else, then record until the
    // store cannot grow.
    std::fs::write(mount.join("filler"), vec![0u8; 1024 * 1024]).unwrap();
    let mut recorded = Vec::new();
    let mut failure = None;
    for n in 0..20_000 {
        match queue.record_durable(event(n)).await {
            Ok(seq) => recorded.push((n, seq)),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("the disk fills up");
    assert!(failure.to_string().contains("full"), "{failure}");
    let stats = queue.stats();
    assert!(
        stats.error.as_deref().is_some_and(|e| e.contains("full")),
        "{stats:?}"
    );
    // Handed-over events wait in memory meanwhile.
    for n in 0..10 {
        queue.record(event(100_000 + n));
    }
    // Room again: the writer opens the store again and goes on.
    std::fs::remove_file(mount.join("filler")).unwrap();
    let after = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match queue.record_durable(event(200_000)).await {
                Ok(seq) => break seq,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            }
        }
    })
    .await
    .expect("the store writes again once there is room");
    assert!(queue.stats().error.is_none());
    // Everything that was recorded is there, in one chain that holds.
    let stored = records(&queue);
    let report = wire::verify_chain(stored.iter().map(|(s, b)| (*s, b.as_ref())));
    assert!(report.intact(), "{:?}", report.problems);
    let seqs: std::collections::HashSet<u64> = stored.iter().map(|r| r.0).collect();
    for (_, seq) in &recorded {
        assert!(seqs.contains(seq), "recorded event {seq} is missing");
    }
    assert!(seqs.contains(&after));
    let users: Vec<String> = stored
        .iter()
        .filter_map(|(_, b)| wire::Record::parse(b).ok()?.actor.name)
        .collect();
    for n in 0..10 {
        assert!(
            users.contains(&format!("user-{}", 100_000 + n)),
            "handed-over event {n} was kept"
        );
    }
    queue.close();
}

/// The memory bound while the store cannot be written: handed-over events
/// beyond MAX_PENDING are counted lost (a durable recording is told
/// instead), and the next commit records how many in an `events_lost`
/// record. A queue with no writer yet, so that nothing drains it meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_beyond_the_memory_bound_are_counted_and_the_loss_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let inner = Arc::new(Inner {
        pending: Mutex::new(Pending::default()),
        wake: Condvar::new(),
        clock: Clock::system(),
        stats: Mutex::new(QueueStats::default()),
        reader: Mutex::new(None),
        committed: watch::channel(0).0,
    });
    let item = |n: u64, done| Item {
        record: NewRecord {
            time: 0,
            parts: event(n).parts(),
        },
        done,
    };
    {
        let mut pending = lock(&inner.pending);
        for n in 0..MAX_PENDING as u64 {
            pending.items.push_back(item(n, None));
        }
    }
    // A failed commit gives its batch back to a queue that is full.
    let (tx, rx) = oneshot::channel();
    let batch = vec![item(1, None), item(2, Some(tx)), item(3, None)];
    give_back(&inner, batch, None, 0, "the disk is full");
    assert_eq!(
        rx.await.unwrap(),
        Err(AuditError::Store("the disk is full".into()))
    );
    assert_eq!(
        lock(&inner.stats).lost,
        2,
        "the two handed-over events did not fit"
    );
    assert_eq!(
        lock(&inner.stats).error.as_deref(),
        Some("the disk is full")
    );
    // Recording meanwhile: a durable one is refused at once, a handed-over
    // one is counted lost.
    let queue = AuditQueue {
        inner: inner.clone(),
        writer: Mutex::new(None),
    };
    assert_eq!(queue.record_durable(event(4)).await, Err(AuditError::Busy));
    queue.record(event(5));
    drop(queue);
    // The store writes again: everything waiting goes in, with the count.
    let store = Store::open(dir.path(), store::DEFAULT_MAX_BYTES, 0)
        .unwrap()
        .store;
    let reader = store.reader();
    lock(&inner.pending).stop = true;
    let writer_inner = inner.clone();
    let path = dir.path().to_owned();
    std::thread::spawn(move || {
        write_loop(&writer_inner, Some(store), &path, store::DEFAULT_MAX_BYTES)
    })
    .join()
    .unwrap();
    let stored = reader.read_from(0, usize::MAX, usize::MAX).unwrap();
    assert_eq!(
        stored.len(),
        MAX_PENDING + 1,
        "every waiting event and the loss"
    );
    let lost: Vec<wire::Record> = stored
        .iter()
        .filter_map(|(_, b)| wire::Record::parse(b).ok())
        .filter(|r| r.kind == "events_lost")
        .collect();
    assert_eq!(lost.len(), 1, "one record of the loss");
    assert_eq!(lost[0].details["count"], 3);
    assert!(lock(&inner.stats).error.is_none());
}
