//! Bytes the application wrote on one stream, kept as ready-made DATA frames.
//!
//! Writes are copied once, into chunks that already leave room for the frame
//! header in front. When a whole chunk may be sent, the chunk *is* the frame:
//! the header is filled in and the buffer handed out without another copy.
//! Only when credit allows less than a chunk is a smaller frame copied out.

use std::collections::VecDeque;

use bytes::BufMut;

use crate::frame::{HEADER_LEN, StreamId, flags, kind};

#[derive(Debug, Default)]
pub(crate) struct SendBuffer {
    /// Each chunk: `HEADER_LEN` bytes of room, then at most `split` bytes of
    /// data.
    chunks: VecDeque<Vec<u8>>,
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
    pub(crate) fn extend(&mut self, mut data: &[u8], split: usize) {
        self.len += data.len();
        while !data.is_empty() {
            let last = match self.chunks.back_mut() {
                Some(chunk) if chunk.len() < HEADER_LEN + split => chunk,
                _ => {
                    let size = data.len().clamp(64, split.max(64));
                    let mut chunk = Vec::with_capacity(HEADER_LEN + size);
                    chunk.resize(HEADER_LEN, 0);
                    self.chunks.push_back(chunk);
                    self.chunks.back_mut().expect("a chunk was just pushed")
                }
            };
            let n = data.len().min(HEADER_LEN + split - last.len());
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
    ) -> (Vec<u8>, usize) {
        let front_len = self.chunks.front().map_or(0, |c| c.len() - HEADER_LEN);
        let (mut frame, len) = if front_len > 0 && front_len <= max {
            let frame = self.chunks.pop_front().expect("front chunk exists");
            (frame, front_len)
        } else {
            let len = front_len.min(max);
            let mut frame = Vec::with_capacity(HEADER_LEN + len);
            frame.resize(HEADER_LEN, 0);
            if let Some(front) = self.chunks.front_mut() {
                frame.extend_from_slice(&front[HEADER_LEN..HEADER_LEN + len]);
                front.drain(HEADER_LEN..HEADER_LEN + len);
            }
            (frame, len)
        };
        self.len -= len;
        let fin = fin_if_last && self.len == 0;
        let mut header = &mut frame[..HEADER_LEN];
        header.put_u8(kind::DATA);
        header.put_u8(if fin { flags::FIN } else { 0 });
        header.put_u32(id.0);
        (frame, len)
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
    use bytes::Bytes;

    fn decode(frame: Vec<u8>) -> (bool, Vec<u8>) {
        match Frame::decode(&Bytes::from(frame)) {
            Ok(Frame::Data { fin, payload, .. }) => (fin, payload.to_vec()),
            other => panic!("not a DATA frame: {other:?}"),
        }
    }

    #[test]
    fn whole_chunks_become_frames_and_partial_takes_keep_order() {
        let mut buf = SendBuffer::default();
        let data: Vec<u8> = (0..100u8).collect();
        buf.extend(&data[..30], 16);
        buf.extend(&data[30..], 16);
        assert_eq!(buf.len(), 100);
        let mut out = Vec::new();
        let mut fins = Vec::new();
        for max in [16, 5, 100, 3, 100, 100, 100, 100, 100] {
            if buf.is_empty() {
                break;
            }
            let (frame, len) = buf.take_frame(StreamId(3), max, true);
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
        let (frame, len) = buf.take_frame(StreamId(1), 16, true);
        assert_eq!(len, 0);
        assert_eq!(decode(frame), (true, vec![]));
    }
}
