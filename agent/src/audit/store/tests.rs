use super::*;
use crate::audit::event::{AuditEvent, Parts};

fn new(n: u64) -> NewRecord {
    NewRecord {
        time: 1_700_000_000_000 + n,
        parts: parts(n, 150),
    }
}

fn parts(n: u64, pad: usize) -> Parts {
    AuditEvent::Deploy {
        user: format!("user-{n}"),
        rev: Some("r".repeat(pad)),
    }
    .parts()
}

/// Reads every record stored now.
fn all(store: &Store) -> Vec<(u64, Bytes)> {
    store.reader().read_from(0, usize::MAX, usize::MAX).unwrap()
}

/// A platform in miniature: keeps every record it was sent (by sequence
/// number, first copy wins) and acknowledges up to the last one.
#[derive(Default)]
struct Receiver {
    kept: std::collections::BTreeMap<u64, Bytes>,
}

impl Receiver {
    fn ship(&mut self, store: &mut Store) {
        let records = all(store);
        let Some(&(last, _)) = records.last() else {
            return;
        };
        for (seq, body) in records {
            self.kept.entry(seq).or_insert(body);
        }
        store.append(&[], Some(last)).unwrap();
    }

    fn verify(&self) -> audit::ChainReport {
        audit::verify_chain(self.kept.iter().map(|(s, b)| (*s, b.as_ref())))
    }
}

#[test]
fn sequence_numbers_continue_across_reopening_and_the_chain_holds() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), DEFAULT_MAX_BYTES, 0).unwrap().store;
    assert_eq!(store.append(&[new(1), new(2)], None).unwrap(), [1, 2]);
    drop(store);
    let opened = Store::open(dir.path(), DEFAULT_MAX_BYTES, 0).unwrap();
    assert!(opened.recovered.is_none());
    let mut store = opened.store;
    assert_eq!(store.append(&[new(3)], None).unwrap(), [3]);
    let records = all(&store);
    assert_eq!(records.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3]);
    let report = audit::verify_chain(records.iter().map(|(s, b)| (*s, b.as_ref())));
    assert!(report.intact(), "{:?}", report.problems);
    // Acknowledged records are deleted; numbering goes on.
    store.append(&[], Some(2)).unwrap();
    assert_eq!(all(&store).len(), 1);
    assert_eq!(store.head().acked, 2);
    drop(store);
    let mut store = Store::open(dir.path(), DEFAULT_MAX_BYTES, 0).unwrap().store;
    assert_eq!(store.append(&[new(4)], None).unwrap(), [4]);
}

#[test]
fn a_full_queue_replaces_its_oldest_unshipped_events_with_one_marker() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), MIN_MAX_BYTES, 0).unwrap().store;
    let mut platform = Receiver::default();
    // Some are shipped before the outage.
    store
        .append(&(1..=10).map(new).collect::<Vec<_>>(), None)
        .unwrap();
    platform.ship(&mut store);
    // A long outage: far more than fits in the bound.
    let total = 60_000u64;
    for chunk in (11..=total).collect::<Vec<_>>().chunks(500) {
        store
            .append(&chunk.iter().map(|n| new(*n)).collect::<Vec<_>>(), None)
            .unwrap();
        assert!(store.head().bytes <= MIN_MAX_BYTES / 5 * 2 + 500 * 300);
    }
    let records = all(&store);
    let markers: Vec<Dropped> = records
        .iter()
        .filter_map(|(_, b)| Record::parse(b).unwrap().dropped().map(Result::unwrap))
        .collect();
    assert_eq!(markers.len(), 1, "one marker, grown, not one per overflow");
    let marker = &markers[0];
    assert_eq!(
        marker.first_seq, 11,
        "the oldest unshipped events went first"
    );
    assert_eq!(marker.reason, "queue_full");
    let kept = records.len() as u64 - 1;
    assert_eq!(marker.count, Some(total - 10 - kept));
    assert_eq!(store.head().dropped, total - 10 - kept);
    // The newest events are all there.
    assert_eq!(records.last().unwrap().0, total);
    // The platform gets a chain that holds across the gap.
    platform.ship(&mut store);
    let report = platform.verify();
    assert!(report.intact(), "{:?}", report.problems);
    assert_eq!(report.dropped, marker.count.unwrap());
    // And the file stays within its bound.
    assert!(
        store.file_size() <= MIN_MAX_BYTES,
        "{} bytes on disk",
        store.file_size()
    );
}

#[test]
fn a_corrupt_store_is_moved_aside_and_a_new_chain_links_to_the_last_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut platform = Receiver::default();
    let mut store = Store::open(dir.path(), DEFAULT_MAX_BYTES, 0).unwrap().store;
    store
        .append(&(1..=5).map(new).collect::<Vec<_>>(), None)
        .unwrap();
    platform.ship(&mut store);
    // Written, never shipped: lost with the store.
    store
        .append(&(6..=8).map(new).collect::<Vec<_>>(), None)
        .unwrap();
    drop(store);
    // The lease is written when sequence numbers run out, not on every
    // acknowledgement; here it still names the state at creation.
    let path = dir.path().join(STORE_FILE);
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    std::fs::write(&path, vec![0xa5; len]).unwrap();
    let opened = Store::open(dir.path(), DEFAULT_MAX_BYTES, 1_800_000_000_000).unwrap();
    let report = opened.recovered.expect("the corruption is reported");
    assert!(report.contains("moved to"), "{report}");
    assert!(
        dir.path()
            .join(format!("{STORE_FILE}.corrupt-1800000000"))
            .exists()
    );
    let mut store = opened.store;
    let records = all(&store);
    assert_eq!(records.len(), 1);
    let marker = Record::parse(&records[0].1).unwrap();
    let dropped = marker.dropped().unwrap().unwrap();
    assert_eq!(dropped.reason, "store_corrupt");
    assert_eq!(dropped.count, None);
    assert!(
        dropped.last_seq >= 8,
        "covers every number the old store may have used"
    );
    // New records continue after it, never reusing a number.
    let seqs = store.append(&[new(9)], None).unwrap();
    assert_eq!(seqs, [dropped.last_seq + 1]);
    platform.ship(&mut store);
    let report = platform.verify();
    assert!(report.intact(), "{:?}", report.problems);
    assert_eq!(report.unknown_drops, 1);
    // Opening again is quiet: no crash loop, no second marker.
    drop(store);
    let again = Store::open(dir.path(), DEFAULT_MAX_BYTES, 1_800_000_001_000).unwrap();
    assert!(again.recovered.is_none());
}

#[test]
fn a_store_without_its_lease_still_never_reuses_a_number_after_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), DEFAULT_MAX_BYTES, 0).unwrap().store;
    store
        .append(&(1..=3).map(new).collect::<Vec<_>>(), None)
        .unwrap();
    drop(store);
    std::fs::remove_file(dir.path().join(LEASE_FILE)).unwrap();
    std::fs::write(dir.path().join(STORE_FILE), b"not a database").unwrap();
    let now_ms = 1_800_000_000_000;
    let opened = Store::open(dir.path(), DEFAULT_MAX_BYTES, now_ms).unwrap();
    assert!(opened.recovered.is_some());
    let records = all(&opened.store);
    let dropped = Record::parse(&records[0].1)
        .unwrap()
        .dropped()
        .unwrap()
        .unwrap();
    assert_eq!((dropped.first_seq, dropped.last_seq), (1, now_ms));
}

#[test]
fn a_failed_append_leaves_the_head_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), DEFAULT_MAX_BYTES, 0).unwrap().store;
    store.append(&[new(1)], None).unwrap();
    let head = store.head().clone();
    // The lease cannot be renewed: the directory is gone.
    store.reserved_until = store.head().next_seq;
    store.lease_path = dir.path().join("missing").join(LEASE_FILE);
    assert!(store.append(&[new(2)], None).is_err());
    assert_eq!(store.head(), &head);
}
