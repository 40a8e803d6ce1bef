//! Durations as people write them in the config file: `"500ms"`, `"30s"`,
//! `"10m"`, `"1h"`, `"10d"`, or several parts run together (`"1h30m"`).
//!
//! This module owns the syntax and its error messages. It never decides which
//! durations make sense for a setting: `config` does.

use std::fmt;
use std::time::Duration;

/// Why a duration string was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error(
        "'{0}' is not a duration; help: write a number and a unit (ms, s, m, h, d), like '30s' or '10m'"
    )]
    Syntax(String),
    #[error("'{0}' is too long a duration")]
    Overflow(String),
}

/// Parses `"500ms"`, `"30s"`, `"10m"`, `"1h"`, `"10d"` and concatenations of
/// them (`"1h30m"`). Whitespace around the string is ignored.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let syntax = || DurationError::Syntax(text.to_owned());
    let overflow = || DurationError::Overflow(text.to_owned());
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(syntax());
    }
    let mut total_ms: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(syntax());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| overflow())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(syntax()),
        };
        rest = &rest[unit_len..];
        let part = number.checked_mul(unit_ms).ok_or_else(overflow)?;
        total_ms = total_ms.checked_add(part).ok_or_else(overflow)?;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Shows a duration the way [`parse`] reads it, in its largest exact units:
/// `Duration::from_secs(90)` shows as `1m30s`.
#[derive(Clone, Copy, Debug)]
pub struct Human(pub Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
            ("ms", 1),
        ] {
            if ms >= size {
                write!(f, "{}{unit}", ms / size)?;
                ms %= size;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_parses() {
        let cases = [
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("10m", Duration::from_secs(600)),
            ("1h", Duration::from_secs(3600)),
            ("10d", Duration::from_secs(864_000)),
            ("1h30m", Duration::from_secs(5400)),
            (" 0s ", Duration::ZERO),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn malformed_durations_are_refused_with_the_text() {
        for text in ["", "30", "s", "10 s", "1.5s", "10x", "-1s", "1h m"] {
            let err = parse(text).unwrap_err();
            assert_eq!(err, DurationError::Syntax(text.to_owned()), "{text}");
        }
        assert!(matches!(
            parse("99999999999999999999d"),
            Err(DurationError::Overflow(_))
        ));
        assert!(matches!(
            parse("999999999999999999d"),
            Err(DurationError::Overflow(_))
        ));
    }

    #[test]
    fn human_output_parses_back() {
        for secs in [0, 1, 59, 60, 90, 3600, 86_400 * 10 + 5] {
            let d = Duration::from_secs(secs);
            assert_eq!(parse(&Human(d).to_string()), Ok(d));
        }
        assert_eq!(Human(Duration::from_millis(1500)).to_string(), "1s500ms");
    }
}
