//! Replays an arbitrary sequence of application and transport operations on
//! two connected `Connection`s joined by a reliable, in-order link: the
//! `testing` harness of tether-proto (`Link` and `World`), driven by the
//! fuzzer's input.
//!
//! Checked throughout: no panic; every frame sent decodes and DATA never
//! exceeds the credit the receiver granted (tracked from the HELLO and
//! WINDOW_UPDATE frames delivered to the sender); buffers stay within the
//! connection window plus `max_send_buffer`; what a reader gets is always a
//! prefix of what the writer wrote. At the end, once everything is read and
//! delivered, each stream not reset carried exactly the bytes written, and an
//! honest pair never closed with an error.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tether_proto::testing::{self, Failure, Link, World};
use tether_proto::{Config, ResetCode, Role};

#[derive(Arbitrary, Debug)]
struct Input {
    device: Knobs,
    platform: Knobs,
    latency_ms: u8,
    ops: Vec<Op>,
}

/// Config values, mapped into valid and small ranges so that flow control
/// and the limits are hit often.
#[derive(Arbitrary, Debug)]
struct Knobs {
    window: u16,
    growth: u8,
    spare: u8,
    split: u16,
    stream_buffer: u16,
    buffer: u16,
    streams: u8,
    backlog: u8,
}

impl Knobs {
    fn config(&self, role: Role) -> Config {
        let window = 1024 + u32::from(self.window % 4096);
        let growth = 1 + u32::from(self.growth % 4);
        let mut config = Config::new(role);
        config.settings.initial_stream_window = window;
        config.max_stream_window = window * growth;
        config.settings.connection_window = window * growth * 2 * (1 + u32::from(self.spare % 3));
        config.data_split = 1 + usize::from(self.split % 4096);
        config.max_stream_send_buffer = 1 + usize::from(self.stream_buffer % 16384);
        config.max_send_buffer = 1 + usize::from(self.buffer % 32768);
        config.settings.max_concurrent_streams = 1 + u32::from(self.streams % 16);
        config.accept_backlog = 1 + usize::from(self.backlog % 8);
        config
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Side {
    Device,
    Platform,
}

impl From<Side> for testing::Side {
    fn from(side: Side) -> testing::Side {
        match side {
            Side::Device => testing::Side::Device,
            Side::Platform => testing::Side::Platform,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Open(Side),
    Accept(Side),
    Write { side: Side, stream: u8, len: u16 },
    Read { side: Side, stream: u8, max: u16 },
    Finish { side: Side, stream: u8 },
    Reset { side: Side, stream: u8, code: u16 },
    Release { side: Side, stream: u8 },
    Transmit(Side),
    Deliver { to: Side, count: u8 },
    Advance { ms: u16 },
    Ping(Side),
    Shutdown(Side),
}

impl Op {
    /// The harness operation this input stands for, its numbers brought into
    /// range.
    fn to_harness(&self) -> testing::Op {
        use testing::Op as H;
        match *self {
            Op::Open(side) => H::Open(side.into()),
            Op::Accept(side) => H::Accept(side.into()),
            Op::Write { side, stream, len } => H::Write {
                side: side.into(),
                stream: stream.into(),
                len: len.into(),
            },
            Op::Read { side, stream, max } => H::Read {
                side: side.into(),
                stream: stream.into(),
                max: max.into(),
            },
            Op::Finish { side, stream } => H::Finish {
                side: side.into(),
                stream: stream.into(),
            },
            Op::Reset { side, stream, code } => H::Reset {
                side: side.into(),
                stream: stream.into(),
                code: ResetCode(code.into()),
            },
            Op::Release { side, stream } => H::Release {
                side: side.into(),
                stream: stream.into(),
            },
            Op::Transmit(side) => H::Transmit(side.into()),
            Op::Deliver { to, count } => H::Deliver {
                to: to.into(),
                count: usize::from(count % 16),
            },
            Op::Advance { ms } => H::Advance(Duration::from_millis(u64::from(ms % 20_000))),
            Op::Ping(side) => H::Ping(side.into()),
            Op::Shutdown(side) => H::Shutdown(side.into()),
        }
    }
}

/// Connects the pair, applies the operations, settles and checks delivery.
fn run(input: &Input) -> Result<(), Failure> {
    let link = Link::new(
        input.device.config(Role::Device),
        input.platform.config(Role::Platform),
        Duration::from_millis(u64::from(input.latency_ms % 50)),
    )
    .map_err(|e| Failure::Model(format!("the knobs made an invalid config: {e}")))?;
    let mut world = World::connect(link)?;
    for op in input.ops.iter().take(2000) {
        world.apply(op.to_harness())?;
    }
    world.settle()?;
    world.check_delivery()
}

fuzz_target!(|input: Input| {
    if let Err(failure) = run(&input) {
        panic!("{failure}");
    }
});
