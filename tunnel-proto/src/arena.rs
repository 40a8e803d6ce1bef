//! Blocks of memory that frames are built and kept in, reused once every
//! buffer cut from them has been dropped.
//!
//! Both directions of a tunnel cut one buffer per frame: the send side
//! builds DATA frames in place ([`crate::connection`]), the tokio shell keeps
//! each received message until the application reads it. Allocating each
//! buffer on its own, or a fresh block whenever the last one is used up,
//! touches new pages all the time: in a profile of `tetherd` receiving a
//! bulk transfer, page faults on fresh arena blocks were about a tenth of
//! its CPU (`docs/benchmarks.md`). A block cannot be reused while a frame cut
//! from it is still held (in a stream's receive buffer, say), so the arena
//! keeps the last few blocks it used up and takes back the first of them
//! that nothing refers to any more.
//!
//! It owns only memory: it never copies, holds or inspects what is written
//! into the buffers it hands out, and it keeps at most [`SPARES`] blocks
//! beyond the current one.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

/// Size of each block buffers are cut from.
pub(crate) const BLOCK: usize = 256 * 1024;
/// Used-up blocks kept for reuse. With the default stream window (256 KiB)
/// one bulk stream holds up to about two blocks of unread data, so two
/// spares let the arena cycle through three blocks without allocating.
pub(crate) const SPARES: usize = 2;

#[derive(Debug, Default)]
pub(crate) struct Arena {
    /// The free tail of the current block.
    block: BytesMut,
    /// Whether `block` came from this arena (an empty default does not).
    started: bool,
    /// The tails of used-up blocks, oldest first.
    spares: VecDeque<BytesMut>,
}

impl Arena {
    /// An empty buffer with room for exactly `size` bytes.
    pub(crate) fn carve(&mut self, size: usize) -> BytesMut {
        if self.block.capacity() < size {
            self.refill(size);
        }
        let rest = self.block.split_off(size);
        std::mem::replace(&mut self.block, rest)
    }

    /// A copy of `data` in arena memory.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn keep(&mut self, data: &[u8]) -> Bytes {
        let mut buf = self.carve(data.len());
        buf.extend_from_slice(data);
        buf.freeze()
    }

    /// Makes the current block hold at least `size` free bytes: the same
    /// block again if nothing cut from it is alive, else the oldest spare
    /// that nothing refers to, else a new block.
    fn refill(&mut self, size: usize) {
        let want = BLOCK.max(size);
        if self.started && self.block.try_reclaim(want) {
            return;
        }
        let next = match self.spares.iter_mut().position(|s| s.try_reclaim(want)) {
            Some(i) => self.spares.remove(i).expect("position is in range"),
            None => BytesMut::with_capacity(want),
        };
        let used = std::mem::replace(&mut self.block, next);
        if std::mem::replace(&mut self.started, true) {
            if self.spares.len() == SPARES {
                // Its memory goes back when its last frame is dropped.
                self.spares.pop_front();
            }
            self.spares.push_back(used);
        }
    }

    /// Blocks this arena refers to (the current one and its spares).
    #[cfg(test)]
    fn blocks(&self) -> usize {
        usize::from(self.started) + self.spares.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_block_is_reused_without_a_new_allocation() {
        let mut arena = Arena::default();
        let first = arena.keep(&[1; 1000]);
        let base = first.as_ptr();
        drop(first);
        // Fill the rest of the block; nothing from it is alive afterwards.
        drop(arena.carve(BLOCK - 1000));
        let again = arena.keep(&[2; 10]);
        assert_eq!(again.as_ptr(), base, "the block was taken back in place");
        assert_eq!(arena.blocks(), 1);
    }

    #[test]
    fn blocks_still_held_are_skipped_and_the_oldest_free_one_comes_back() {
        let mut arena = Arena::default();
        // Three blocks, each used up while one frame cut from it is held.
        let mut held = Vec::new();
        let mut bases = Vec::new();
        for _ in 0..3 {
            let frame = arena.keep(&[7; 64]);
            bases.push(frame.as_ptr());
            held.push(frame);
            drop(arena.carve(BLOCK - 64));
        }
        assert_eq!(arena.blocks(), 3, "one current block and two spares");
        // The reader drops the first block's frame: the next block needed
        // is that one, not a new allocation.
        held.remove(0);
        let next = arena.keep(&[9; 64]);
        assert_eq!(next.as_ptr(), bases[0]);
        assert_eq!(arena.blocks(), 3);
        assert_eq!(&held[0][..], &[7; 64][..], "frames still held are intact");
    }

    #[test]
    fn spares_are_bounded_and_large_buffers_get_their_own_block() {
        let mut arena = Arena::default();
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(arena.keep(&[1; 16]));
            drop(arena.carve(BLOCK - 16));
        }
        assert_eq!(arena.blocks(), 1 + SPARES);
        let big = arena.keep(&vec![3; BLOCK * 2]);
        assert_eq!(big.len(), BLOCK * 2);
        assert!(big.iter().all(|b| *b == 3));
        assert!(held.iter().all(|f| f.iter().all(|b| *b == 1)));
    }
}
