//! Flow control, scheduling and buffer bounds.
//!
//! The harness already asserts on every DATA frame that it fits the credit
//! the receiver granted; these tests check that credit is granted when it
//! should be, no sooner, and that the sender uses all of it.

use super::pair::{Device, LATENCY, MAX_STEPS, Pair, Platform, Side, configs, pattern, tcp};
use crate::codes::ResetCode;
use crate::config::Config;
use crate::connection::{Event, WriteError};
use crate::frame::{Frame, StreamId};

/// Configs whose stream windows are 4 KiB and never grow.
fn small_windows() -> (Config, Config) {
    let (mut device, mut platform) = configs();
    for config in [&mut device, &mut platform] {
        config.settings.initial_stream_window = 4096;
        config.max_stream_window = 4096;
        config.settings.connection_window = 65536;
        config.data_split = 1024;
    }
    (device, platform)
}

/// DATA payload bytes `who` sent on `id`.
fn data_sent(pair: &Pair, who: Side, id: StreamId) -> usize {
    pair.sent(who)
        .iter()
        .map(|f| match f {
            Frame::Data {
                stream, payload, ..
            } if *stream == id => payload.len(),
            _ => 0,
        })
        .sum()
}

/// Increments of the WINDOW_UPDATE frames `who` sent for `id` (stream 0 for
/// the connection).
fn updates(pair: &Pair, who: Side, id: StreamId) -> Vec<u32> {
    pair.sent(who)
        .iter()
        .filter_map(|f| match f {
            Frame::WindowUpdate { stream, increment } if *stream == id => Some(*increment),
            _ => None,
        })
        .collect()
}

/// The receive window of one stream, straight from the books.
fn recv_window(pair: &Pair, who: Side, id: StreamId) -> u32 {
    pair.link.conn(who).streams[&id].recv_window
}

#[test]
fn a_writer_stops_at_the_peers_window_and_resumes_as_the_reader_reads() {
    let (device, platform) = small_windows();
    let mut pair = Pair::connected_with(device, platform);
    let id = pair.open_accepted(Device, tcp());
    let data = pattern(6, 20_000);

    assert_eq!(pair.write_some(Device, id, &data), data.len());
    pair.drive();
    assert_eq!(
        data_sent(&pair, Device, id),
        4096,
        "the writer stops at the initial window"
    );
    assert_eq!(pair.conn(Platform).buffered_bytes(), 4096);
    assert_eq!(pair.conn(Device).buffered_bytes(), data.len() - 4096);
    let no_updates = pair
        .sent(Platform)
        .iter()
        .all(|f| !matches!(f, Frame::WindowUpdate { .. }));
    assert!(no_updates, "receiving alone grants no credit");

    // Reading less than half a window grants nothing yet.
    let mut read = pair.read_exact(Platform, id, 2047);
    pair.drive();
    assert_eq!(updates(&pair, Platform, id), [0u32; 0]);
    assert_eq!(data_sent(&pair, Device, id), 4096);

    // The byte that completes half a window does, and the writer uses it all.
    read.extend(pair.read_exact(Platform, id, 1));
    pair.drive();
    assert_eq!(updates(&pair, Platform, id), [2048]);
    assert_eq!(data_sent(&pair, Device, id), 4096 + 2048);
    assert_eq!(pair.conn(Platform).buffered_bytes(), 4096);

    read.extend(pair.receive(Platform, id, data.len() - read.len()));
    assert_eq!(read, data);
}

#[test]
fn receiving_alone_never_grants_credit() {
    let (device, platform) = small_windows();
    let mut pair = Pair::connected_with(device, platform);
    let id = pair.open_accepted(Device, tcp());
    pair.write_some(Device, id, &pattern(23, 10_000));
    pair.transmit(Device);
    let frames = pair.in_flight(Platform).len();
    assert_eq!(frames, 4, "a 4 KiB window in 1 KiB frames");

    pair.clear_sent();
    for _ in 0..frames {
        assert!(matches!(
            pair.deliver_one(Platform),
            Some(Frame::Data { .. })
        ));
        pair.transmit(Platform);
        assert_eq!(
            pair.sent(Platform),
            [],
            "the platform answered a DATA frame it did not read"
        );
    }
    assert_eq!(pair.conn(Platform).buffered_bytes(), 4096);
}

#[test]
fn window_updates_grant_at_least_half_a_window() {
    let (device, platform) = small_windows();
    let window = platform.settings.initial_stream_window;
    let connection = platform.settings.connection_window;
    let mut pair = Pair::connected_with(device, platform);
    let id = pair.open_accepted(Device, tcp());
    let data = pattern(7, 300_000);

    assert_eq!(pair.transfer(Device, id, &data), data);

    let stream = updates(&pair, Platform, id);
    assert!(!stream.is_empty());
    assert!(
        stream.iter().all(|&i| i >= window / 2),
        "stream updates {stream:?}"
    );
    let conn = updates(&pair, Platform, StreamId::CONNECTION);
    assert!(!conn.is_empty());
    assert!(
        conn.iter().all(|&i| i >= connection / 2),
        "connection updates {conn:?}"
    );
}

#[test]
fn one_unread_stream_does_not_stall_the_others() {
    struct Case {
        name: &'static str,
        connection_window: u32,
        stream_window: u32,
        unread: usize,
    }
    let cases = [
        Case {
            name: "stream window a quarter of the connection's",
            connection_window: 16384,
            stream_window: 4096,
            unread: 1,
        },
        Case {
            name: "three unread streams hold three quarters",
            connection_window: 16384,
            stream_window: 4096,
            unread: 3,
        },
        Case {
            name: "stream window half the connection's",
            connection_window: 8192,
            stream_window: 4096,
            unread: 1,
        },
        Case {
            name: "two unread streams hold half",
            connection_window: 16384,
            stream_window: 4096,
            unread: 2,
        },
    ];
    for case in cases {
        let (device, mut platform) = configs();
        platform.settings.connection_window = case.connection_window;
        platform.settings.initial_stream_window = case.stream_window;
        platform.max_stream_window = case.stream_window;
        let mut pair = Pair::connected_with(device, platform);

        let stalled: Vec<StreamId> = (0..case.unread)
            .map(|_| pair.open_accepted(Device, tcp()))
            .collect();
        for &id in &stalled {
            pair.write_some(Device, id, &pattern(8, 2 * case.stream_window as usize));
        }
        pair.drive();
        let held = case.unread * case.stream_window as usize;
        assert_eq!(pair.conn(Platform).buffered_bytes(), held, "{}", case.name);

        let active = pair.open_accepted(Device, tcp());
        let data = pattern(9, 100_000);
        assert_eq!(pair.transfer(Device, active, &data), data, "{}", case.name);
        assert_eq!(
            pair.conn(Platform).buffered_bytes(),
            held,
            "{}: unread streams keep their bytes",
            case.name
        );
        for &id in &stalled {
            assert_eq!(
                data_sent(&pair, Device, id),
                case.stream_window as usize,
                "{}",
                case.name
            );
        }
    }
}

#[test]
fn auto_tuning_grows_the_window_of_a_fast_reader_up_to_max_stream_window() {
    let (mut device, platform) = configs();
    device.settings.initial_stream_window = 4096;
    device.max_stream_window = 65536;
    device.settings.connection_window = 1 << 20;
    let mut pair = Pair::connected_with(device, platform);
    assert_eq!(pair.conn(Device).rtt(), Some(2 * LATENCY));
    let id = pair.open_accepted(Device, tcp());
    let data = pattern(10, 1_000_000);

    let mut windows = vec![recv_window(&pair, Device, id)];
    let (mut written, mut received) = (0, Vec::new());
    for _ in 0..MAX_STEPS {
        written += pair.write_some(Platform, id, &data[written..]);
        received.extend(pair.read_available(Device, id).0);
        if received.len() == data.len() {
            break;
        }
        pair.step();
        let window = recv_window(&pair, Device, id);
        assert!(
            window <= 65536,
            "window grew to {window}, beyond max_stream_window"
        );
        if window != *windows.last().unwrap() {
            windows.push(window);
        }
    }
    assert_eq!(received, data);
    assert_eq!(
        windows,
        [4096, 8192, 16384, 32768, 65536],
        "the window doubles up to the maximum"
    );
}

#[test]
fn auto_tuning_leaves_the_window_of_a_slow_reader_alone() {
    let (mut device, platform) = configs();
    device.settings.initial_stream_window = 4096;
    device.max_stream_window = 65536;
    device.settings.connection_window = 1 << 20;
    let mut pair = Pair::connected_with(device, platform);
    let id = pair.open_accepted(Device, tcp());
    let data = pattern(11, 100_000);

    let (mut written, mut received) = (0, Vec::new());
    while received.len() < data.len() {
        written += pair.write_some(Platform, id, &data[written..]);
        // Five round trips between reads: the window does not limit anything.
        pair.advance(5 * 2 * LATENCY);
        received.extend(pair.read_available(Device, id).0);
        assert_eq!(recv_window(&pair, Device, id), 4096);
    }
    assert_eq!(received, data);
}

#[test]
fn data_frames_are_cut_at_data_split() {
    let (mut device, platform) = configs();
    device.data_split = 1000;
    let mut pair = Pair::connected_with(device, platform);
    let id = pair.open_accepted(Device, tcp());
    pair.write_some(Device, id, &pattern(12, 10_500));
    pair.clear_sent();
    pair.transmit(Device);

    let sizes: Vec<usize> = pair
        .sent(Device)
        .iter()
        .map(|f| match f {
            Frame::Data { payload, .. } => payload.len(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let mut expected = vec![1000; 10];
    expected.push(500);
    assert_eq!(sizes, expected);
}

#[test]
fn control_frames_and_window_updates_go_ahead_of_queued_data() {
    let (mut device, platform) = small_windows();
    device.data_split = 1000;
    let mut pair = Pair::connected_with(device, platform);
    let id = pair.open_accepted(Device, tcp());
    pair.write_some(Platform, id, &pattern(13, 4096));
    pair.drive();

    // Bulk data is queued, then a ping arrives and a read makes a window
    // update due: both must leave before the data.
    pair.write_some(Device, id, &pattern(14, 4000));
    pair.inject(
        Device,
        Frame::Ping {
            ack: false,
            opaque: 77,
        }
        .to_bytes(),
    );
    assert_eq!(pair.read_available(Device, id).0.len(), 4096);
    pair.clear_sent();
    pair.transmit(Device);

    let sent = pair.sent(Device);
    assert_eq!(
        sent[0],
        Frame::Ping {
            ack: true,
            opaque: 77
        }
    );
    assert_eq!(
        sent[1],
        Frame::WindowUpdate {
            stream: id,
            increment: 4096
        }
    );
    assert_eq!(sent.len(), 2 + 4, "then four DATA frames: {sent:?}");
    assert!(sent[2..].iter().all(|f| matches!(f, Frame::Data { .. })));
}

#[test]
fn two_bulk_streams_take_turns() {
    let (mut device, platform) = configs();
    device.data_split = 1000;
    let mut pair = Pair::connected_with(device, platform);
    let a = pair.open_accepted(Device, tcp());
    let b = pair.open_accepted(Device, tcp());
    pair.write_some(Device, a, &pattern(15, 20_000));
    pair.write_some(Device, b, &pattern(16, 20_000));
    pair.clear_sent();
    pair.transmit(Device);

    let order: Vec<StreamId> = pair.sent(Device).iter().map(Frame::stream).collect();
    let expected: Vec<StreamId> = (0..40).map(|i| if i % 2 == 0 { a } else { b }).collect();
    assert_eq!(order, expected);
}

fn editor() -> crate::ServiceHeader {
    crate::ServiceHeader::new(crate::Service::Editor)
}

#[test]
fn an_editor_stream_goes_before_a_bulk_stream_written_earlier() {
    let (mut device, platform) = configs();
    device.data_split = 1000;
    let mut pair = Pair::connected_with(device, platform);
    let bulk = pair.open_accepted(Device, tcp());
    let interactive = pair.open_accepted(Device, editor());
    pair.write_some(Device, bulk, &pattern(21, 20_000));
    pair.write_some(Device, interactive, &pattern(22, 5_000));
    pair.clear_sent();
    pair.transmit(Device);

    let order: Vec<StreamId> = pair.sent(Device).iter().map(Frame::stream).collect();
    let mut expected = vec![interactive; 5];
    expected.extend(std::iter::repeat_n(bulk, 20));
    assert_eq!(order, expected);
}

#[test]
fn a_bulk_stream_still_moves_under_a_steady_interactive_load() {
    use crate::connection::transmit::INTERACTIVE_BURST;
    let (mut device, platform) = configs();
    device.data_split = 1000;
    let mut pair = Pair::connected_with(device, platform);
    let bulk = pair.open_accepted(Device, tcp());
    let interactive = pair.open_accepted(Device, editor());
    pair.write_some(Device, bulk, &pattern(23, 10_000));
    pair.write_some(Device, interactive, &pattern(24, 40_000));
    pair.clear_sent();
    pair.transmit(Device);

    let order: Vec<StreamId> = pair.sent(Device).iter().map(Frame::stream).collect();
    let burst = INTERACTIVE_BURST as usize;
    // One bulk frame after every burst of interactive ones, while both have
    // data; then the rest of the bulk stream.
    let rounds = 40 / burst;
    let mut expected = Vec::new();
    for _ in 0..rounds {
        expected.extend(std::iter::repeat_n(interactive, burst));
        expected.push(bulk);
    }
    expected.extend(std::iter::repeat_n(bulk, 10 - rounds));
    assert_eq!(order, expected);
}

#[test]
fn a_bulk_stream_takes_the_whole_link_when_nothing_interactive_waits() {
    let (mut device, platform) = configs();
    device.data_split = 1000;
    let mut pair = Pair::connected_with(device, platform);
    let bulk = pair.open_accepted(Device, tcp());
    let _idle = pair.open_accepted(Device, editor());
    let data = pattern(25, 30_000);
    assert_eq!(pair.transfer(Device, bulk, &data), data);
}

#[test]
fn two_bulk_streams_share_a_small_connection_window_fairly() {
    let (device, mut platform) = small_windows();
    platform.settings.connection_window = 8192;
    platform.settings.initial_stream_window = 4096;
    platform.max_stream_window = 4096;
    let mut pair = Pair::connected_with(device, platform);
    let a = pair.open_accepted(Device, tcp());
    let b = pair.open_accepted(Device, tcp());
    let (data_a, data_b) = (pattern(17, 60_000), pattern(18, 60_000));
    let (mut wa, mut wb) = (0, 0);
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    for _ in 0..MAX_STEPS {
        wa += pair.write_some(Device, a, &data_a[wa..]);
        wb += pair.write_some(Device, b, &data_b[wb..]);
        ra.extend(pair.read_available(Platform, a).0);
        rb.extend(pair.read_available(Platform, b).0);
        if ra.len() == data_a.len() && rb.len() == data_b.len() {
            break;
        }
        let gap = ra.len().abs_diff(rb.len());
        assert!(gap <= 8192, "one stream ran {gap} bytes ahead of the other");
        pair.step();
    }
    assert_eq!((ra, rb), (data_a, data_b));
}

#[test]
fn buffered_bytes_stay_within_the_connection_window_plus_the_send_buffer() {
    let (mut device, mut platform) = configs();
    device.settings.connection_window = 65536;
    device.settings.initial_stream_window = 16384;
    device.max_stream_window = 32768;
    device.max_send_buffer = 32768;
    device.max_stream_send_buffer = 16384;
    platform.settings.connection_window = 65536;
    platform.settings.initial_stream_window = 4096;
    platform.max_stream_window = 4096;
    let bound = 65536 + 32768;
    let mut pair = Pair::connected_with(device, platform);

    // The platform floods ten streams; the device's application never reads
    // and keeps writing to all of them.
    let ids: Vec<StreamId> = (0..10)
        .map(|_| pair.open(Platform, tcp()).unwrap())
        .collect();
    pair.drive();
    while pair.conn(Device).accept().is_some() {}
    let junk = pattern(19, 100_000);
    for _ in 0..200 {
        for &id in &ids {
            pair.write_some(Platform, id, &junk);
            pair.write_some(Device, id, &junk);
        }
        pair.step();
        assert!(
            pair.conn(Device).buffered_bytes() <= bound,
            "{} buffered",
            pair.conn(Device).buffered_bytes()
        );
    }
    pair.drive();
    assert_eq!(
        pair.conn(Device).buffered_bytes(),
        bound,
        "both limits are reached"
    );
    assert!(pair.conn(Device).is_connected());
}

#[test]
fn bytes_for_a_stream_reset_meanwhile_still_return_connection_credit() {
    let (device, mut platform) = configs();
    platform.settings.connection_window = 65536;
    platform.settings.initial_stream_window = 16384;
    platform.max_stream_window = 16384;
    let mut pair = Pair::connected_with(device, platform);

    // Each round strands a whole stream window in flight toward a stream the
    // platform already reset: ten rounds are well over the connection window.
    for round in 0..10 {
        let id = pair.open_accepted(Device, tcp());
        pair.write_some(Device, id, &pattern(round, 16384));
        pair.transmit(Device);
        pair.conn(Platform).reset(id, ResetCode::CANCEL, "");
        pair.drive();
        assert!(
            matches!(pair.events(Device)[..], [Event::Reset { .. }]),
            "round {round}"
        );
        pair.conn(Device).release(id);
    }
    let id = pair.open_accepted(Device, tcp());
    let data = pattern(20, 100_000);
    assert_eq!(pair.transfer(Device, id, &data), data);
    assert_eq!(pair.conn(Platform).stream_count(), 1);
}

#[test]
fn frames_for_closed_streams_are_ignored() {
    let mut pair = Pair::connected();
    let ours = pair.open_accepted(Platform, tcp());
    let theirs = pair.open_accepted(Device, tcp());
    for id in [ours, theirs] {
        pair.conn(Platform).reset(id, ResetCode::CANCEL, "");
    }
    pair.drive();
    for id in [ours, theirs] {
        pair.inject(
            Platform,
            Frame::WindowUpdate {
                stream: id,
                increment: 100,
            }
            .to_bytes(),
        );
        pair.inject(
            Platform,
            Frame::Reset {
                stream: id,
                code: ResetCode::CANCEL,
                reason: String::new(),
            }
            .to_bytes(),
        );
        pair.inject(
            Platform,
            Frame::Data {
                stream: id,
                fin: true,
                payload: vec![1; 100].into(),
            }
            .to_bytes(),
        );
    }
    pair.inject(Platform, Frame::Accept { stream: ours }.to_bytes());
    assert!(pair.conn(Platform).is_connected());
    assert!(pair.events(Platform).is_empty());
    assert_eq!(pair.conn(Platform).stream_count(), 0);
    assert_eq!(pair.conn(Platform).buffered_bytes(), 0);
}

#[test]
fn a_writer_blocked_by_the_tunnel_wide_buffer_wakes_when_another_stream_is_reset() {
    for resetter in [Device, Platform] {
        let (mut device, mut platform) = configs();
        device.max_send_buffer = 8192;
        device.max_stream_send_buffer = 8192;
        platform.settings.initial_stream_window = 1024;
        platform.max_stream_window = 1024;
        let mut pair = Pair::connected_with(device, platform);
        let full = pair.open_accepted(Device, tcp());
        let waiting = pair.open_accepted(Device, tcp());

        // `full` takes the whole tunnel-wide buffer and cannot drain: the
        // platform does not read.
        let junk = pattern(21, 20_000);
        for _ in 0..3 {
            pair.write_some(Device, full, &junk);
            pair.drive();
        }
        assert_eq!(pair.conn(Device).buffered_bytes(), 8192);
        assert_eq!(pair.write_some(Device, waiting, b"blocked"), 0);

        pair.conn(resetter).reset(full, ResetCode::CANCEL, "");
        pair.drive();
        let events = pair.events(Device);
        assert!(
            events.contains(&Event::Writable(waiting)),
            "{resetter:?} reset; events {events:?}"
        );
        assert_eq!(pair.write_some(Device, waiting, b"unblocked"), 9);
    }
}

#[test]
fn a_writer_blocked_by_its_own_buffer_wakes_as_it_drains() {
    let (mut device, mut platform) = configs();
    device.max_stream_send_buffer = 8192;
    platform.settings.initial_stream_window = 4096;
    platform.max_stream_window = 4096;
    let mut pair = Pair::connected_with(device, platform);
    let id = pair.open_accepted(Device, tcp());
    let data = pattern(22, 8192 + 4096);
    assert_eq!(pair.write_some(Device, id, &data), 8192);
    assert_eq!(pair.write_some(Device, id, &data[8192..]), 0);
    pair.drive();
    assert_eq!(pair.events(Device), [Event::Writable(id)]);
    assert_eq!(pair.write_some(Device, id, &data[8192..]), 4096);
    assert_eq!(pair.receive(Platform, id, data.len()), data);
}

#[test]
fn a_writer_waiting_for_tunnel_room_is_queued_once_however_often_it_blocks() {
    let (mut device, mut platform) = configs();
    device.max_send_buffer = 64 * 1024;
    device.max_stream_send_buffer = 48 * 1024;
    platform.settings.initial_stream_window = 16 * 1024;
    let mut pair = Pair::connected_with(device, platform);
    let a = pair.open_accepted(Device, tcp());
    let b = pair.open_accepted(Device, tcp());
    // B uses up its credit (the platform never reads), then parks 48 KiB.
    assert_eq!(pair.conn(Device).write(b, &[1; 16 * 1024]), Ok(16 * 1024));
    pair.drive();
    assert_eq!(pair.conn(Device).write(b, &[1; 48 * 1024]), Ok(48 * 1024));
    for _ in 0..3 {
        // A finds the tunnel full, gets its own bytes out, and is woken by
        // its own buffer draining while the tunnel stays over half full.
        let blocked = loop {
            match pair.conn(Device).write(a, &[2; 16 * 1024]) {
                Ok(_) => continue,
                other => break other,
            }
        };
        assert_eq!(blocked, Err(WriteError::Blocked));
        assert_eq!(pair.conn(Device).blocked_writers.len(), 1);
        pair.drive();
    }
}
