//! Any byte string decodes to a frame or an error, never a panic; a decoded
//! frame encodes to bytes that decode to the same frame.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tether_proto::Frame;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = Frame::decode(&Bytes::copy_from_slice(data)) else {
        return;
    };
    let encoded = frame.to_bytes();
    assert_eq!(
        encoded.len(),
        frame.encoded_len(),
        "encoded_len of {frame:?}"
    );
    assert_eq!(Frame::decode(&Bytes::from(encoded)), Ok(frame));
});
