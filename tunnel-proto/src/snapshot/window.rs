//! Maintenance windows as the platform and the device write them: one or
//! more daily ranges of local wall-clock time, `"22:00-06:00"` or
//! `"12:00-12:30, 22:00-23:00"`; a range may cross midnight. This module
//! only parses and prints them; the device reads them in its time zone.

use std::fmt;

/// Most ranges in one window.
pub const MAX_RANGES: usize = 24;
/// Longest window text, bytes.
pub const MAX_TEXT: usize = 512;
const MINUTES_PER_DAY: u16 = 24 * 60;

/// A daily window: ranges of minutes since local midnight, `[start, end)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    ranges: Vec<(u16, u16)>,
}

impl Window {
    /// Parses `"HH:MM-HH:MM[, HH:MM-HH:MM...]"`; the error says what is
    /// wrong, for a person.
    pub fn parse(text: &str) -> Result<Window, String> {
        if text.len() > MAX_TEXT {
            return Err(format!("a window is never longer than {MAX_TEXT} bytes"));
        }
        let mut ranges = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            let Some((start, end)) = part.split_once('-') else {
                return Err(format!(
                    "'{part}' is not a range like \"22:00-06:00\" (HH:MM-HH:MM, local time)"
                ));
            };
            let (start, end) = (minutes(start.trim())?, minutes(end.trim())?);
            if start == end {
                return Err(format!(
                    "'{part}' is empty: a range must end at another time than it starts"
                ));
            }
            ranges.push((start, end));
        }
        if ranges.len() > MAX_RANGES {
            return Err(format!("{} ranges, more than {MAX_RANGES}", ranges.len()));
        }
        Ok(Window { ranges })
    }

    /// True if the wall clock at `minute` (since local midnight) is inside
    /// a range.
    pub fn contains(&self, minute: u16) -> bool {
        self.ranges.iter().any(|&(start, end)| {
            if start < end {
                (start..end).contains(&minute)
            } else {
                minute >= start || minute < end
            }
        })
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (start, end)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(
                f,
                "{:02}:{:02}-{:02}:{:02}",
                start / 60,
                start % 60,
                end / 60,
                end % 60
            )?;
        }
        Ok(())
    }
}

/// `HH:MM` as minutes since midnight (`24:00` is midnight, as an end).
fn minutes(text: &str) -> Result<u16, String> {
    let bad = || format!("'{text}' is not a time of day like \"06:30\" (HH:MM, 24-hour)");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return Err(bad());
    }
    if !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let h: u16 = h.parse().map_err(|_| bad())?;
    let m: u16 = m.parse().map_err(|_| bad())?;
    match (h, m) {
        (24, 0) => Ok(0),
        (0..=23, 0..=59) => Ok(h * 60 + m),
        _ => Err(bad()),
    }
    .map(|v| v % MINUTES_PER_DAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_print_and_bad_ones_say_why() {
        let w = Window::parse("22:00-06:00").unwrap();
        assert_eq!(w.to_string(), "22:00-06:00");
        assert!(w.contains(23 * 60) && w.contains(0) && w.contains(359));
        assert!(!w.contains(360) && !w.contains(12 * 60));
        let w = Window::parse(" 12:00-12:30 ,22:00-24:00").unwrap();
        assert_eq!(w.to_string(), "12:00-12:30, 22:00-00:00");
        assert!(w.contains(12 * 60 + 29) && !w.contains(12 * 60 + 30));
        for (bad, says) in [
            ("22:00", "not a range"),
            ("22-06", "not a time of day"),
            ("25:00-06:00", "not a time of day"),
            ("22:60-06:00", "not a time of day"),
            ("22:0-06:00", "not a time of day"),
            ("06:00-06:00", "is empty"),
            ("", "not a range"),
            ("a:bc-06:00", "not a time of day"),
            ("+1:00-06:00", "not a time of day"),
        ] {
            let err = Window::parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let many = vec!["01:00-02:00"; MAX_RANGES + 1].join(",");
        assert!(Window::parse(&many).unwrap_err().contains("more than"));
        let long = "1".repeat(MAX_TEXT + 1);
        assert!(Window::parse(&long).unwrap_err().contains("longer than"));
    }
}
