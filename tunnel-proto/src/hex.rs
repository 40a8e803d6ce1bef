//! Lowercase hex, as keys and hashes are written in grants, audit records
//! and snapshot manifests: one encoder and one strict 32-byte decoder, for
//! this crate and the agent and platform that speak it.

/// `bytes` as lowercase hex.
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Exactly 64 lowercase hex digits, as 32 bytes.
pub fn decode32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip_and_strictness() {
        let bytes: Vec<u8> = (0..32).map(|i| i * 7).collect();
        let text = super::encode(&bytes);
        assert_eq!(super::decode32(&text).unwrap().to_vec(), bytes);
        assert!(super::decode32(&text.to_uppercase()).is_none());
        assert!(super::decode32(&text[..62]).is_none());
        assert!(super::decode32(&format!("{}g", &text[..63])).is_none());
    }
}
