//! Bytes the application wrote on one stream, kept as ready-made DATA frames.
//!
//! Writes are copied once, into chunks that already leave room for the frame
//! header in front. When a whole chunk may be sent, the chunk *is* the frame:
//! the header is filled in and the buffer handed out without another copy.
//! Only when credit allows less than a chunk is a smaller frame copied out.
//!
//! Chunks are carved from the connection's [`SendArena`]
//! ([`crate::arena`]), whose blocks are reused once every frame cut from
//! them has been dropped by the transport: in steady state a frame costs no
//! allocation and no fresh pages.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{HEADER_LEN, StreamId, flags, kind};

/// The memory DATA frames are built in, shared by a connection's streams.
pub(crate) type SendArena = crate::arena::Arena;

#[derive(Debug, Default)]
pub(crate) struct SendBuffer {
    /// Each chunk: `HEADER_LEN` bytes of room, then at most `split` bytes of
    /// data, in a buffer carved with exactly that capacity.
    chunks: VecDeque<BytesMut>,
    /// Data bytes in all chunks.
    len: usize,
}

impl SendBuffer {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `data`, filling the last chunk up to `split` data bytes first.
    pub(crate) fn extend(&mut self, mut data: &[u8], split: usize, arena: &mut SendArena) {
        self.len += data.len();
        while !data.is_empty() {
            let last = match self.chunks.back_mut() {
                Some(chunk) if chunk.len() < chunk.capacity() => chunk,
                _ => {
                    let mut chunk = arena.carve(HEADER_LEN + split);
                    chunk.put_bytes(0, HEADER_LEN);
                    self.chunks.push_back(chunk);
                    self.chunks.back_mut().expect("a chunk was just pushed")
                }
            };
            let n = data.len().min(last.capacity() - last.len());
            last.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
    }

    /// Takes a DATA frame of at most `max` data bytes for stream `id`; `fin`
    /// is set when the frame carries the last buffered byte and
    /// `fin_if_last` asks for it. Returns the frame and its data length.
    pub(crate) fn take_frame(
        &mut self,
        id: StreamId,
        max: usize,
        fin_if_last: bool,
        arena: &mut SendArena,
    ) -> (Bytes, usize) {
        let front_len = self.chunks.front().map_or(0, |c| c.len() - HEADER_LEN);
        let (mut frame, len) = if front_len > 0 && front_len <= max {
            let frame = self.chunks.pop_front().expect("front chunk exists");
            (frame, front_len)
        } else {
            let len = front_len.min(max);
            let mut frame = arena.carve(HEADER_LEN + len);
            frame.put_bytes(0, HEADER_LEN);
            if let Some(front) = self.chunks.front_mut() {
                frame.extend_from_slice(&front[HEADER_LEN..HEADER_LEN + len]);
                // Keep the header room in front of what is left.
                front.copy_within(HEADER_LEN + len.., HEADER_LEN);
                front.truncate(front.len() - len);
            }
            (frame, len)
        };
        self.len -= len;
        let fin = fin_if_last && self.len == 0;
        let mut header = &mut frame[..HEADER_LEN];
        header.put_u8(kind::DATA);
        header.put_u8(if fin { flags::FIN } else { 0 });
        header.put_u32(id.0);
        (frame.freeze(), len)
    }

    /// Drops everything; returns how many data bytes were dropped.
    pub(crate) fn clear(&mut self) -> usize {
        let dropped = self.len;
        self.chunks.clear();
        self.len = 0;
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Frame;

    fn decode(frame: Bytes) -> (bool, Vec<u8>) {
        match Frame::decode(&frame) {
            Ok(Frame::Data { fin, payload, .. }) => (fin, payload.to_vec()),
            other => panic!("not a DATA frame: {other:?}"),
        }
    }

    #[test]
    fn whole_chunks_become_frames_and_partial_takes_keep_order() {
        let mut buf = SendBuffer::default();
        let mut arena = SendArena::default();
        let data: Vec<u8> = (0..100u8).collect();
        buf.extend(&data[..30], 16, &mut arena);
        buf.extend(&data[30..], 16, &mut arena);
        assert_eq!(buf.len(), 100);
        let mut out = Vec::new();
        let mut fins = Vec::new();
        for max in [16, 5, 100, 3, 100, 100, 100, 100, 100] {
            if buf.is_empty() {
                break;
            }
            let (frame, len) = buf.take_frame(StreamId(3), max, true, &mut arena);
            let (fin, payload) = decode(frame);
            assert_eq!(payload.len(), len);
            assert!(len <= max.min(16));
            out.extend(payload);
            fins.push(fin);
        }
        assert_eq!(out, data);
        assert_eq!(fins.iter().filter(|f| **f).count(), 1);
        assert_eq!(fins.last(), Some(&true));
    }

    #[test]
    fn a_frame_from_an_empty_buffer_is_a_bare_fin() {
        let mut buf = SendBuffer::default();
        let (frame, len) = buf.take_frame(StreamId(1), 16, true, &mut SendArena::default());
        assert_eq!(len, 0);
        assert_eq!(decode(frame), (true, vec![]));
    }
}
