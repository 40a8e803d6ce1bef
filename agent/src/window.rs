//! Maintenance windows on the device: a snapshot that arrives mid-shift is
//! verified and staged at once but switched in only when the window opens
//! (or when someone on site runs `tetherd snapshot apply-now`). The window
//! ([`Window`], parsed by `tether-proto`) is read in the device's time zone
//! (the system's, or `[snapshot] timezone`), daylight saving time
//! included: it is open when the wall clock reads a time inside it. Pure
//! functions of the time they are handed; the caller reads the clock.

use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
pub use tether_proto::snapshot::window::Window;

const MINUTES_PER_DAY: i64 = 24 * 60;

/// True if `window` is open at `now` in `tz`.
pub fn is_open(window: &Window, now: Timestamp, tz: &TimeZone) -> bool {
    let time = now.to_zoned_datetime(tz.clone()).time();
    window.contains(time.hour() as u16 * 60 + time.minute() as u16)
}

/// How long from `now` until `window` next opens in `tz` (zero if it is
/// open): the first whole minute at which [`is_open`] holds, so that
/// daylight saving time's skipped and repeated hours are read exactly as
/// the wall clock reads them. At most two days ahead.
pub fn until_open(window: &Window, now: Timestamp, tz: &TimeZone) -> Duration {
    if is_open(window, now, tz) {
        return Duration::ZERO;
    }
    let secs = now.as_second();
    let first = secs - secs.rem_euclid(60) + 60;
    (0..=2 * MINUTES_PER_DAY)
        .map(|k| first + 60 * k)
        .find(|&t| Timestamp::from_second(t).is_ok_and(|t| is_open(window, t, tz)))
        .map_or(Duration::from_secs(2 * 86_400), |t| {
            Duration::from_secs(t.abs_diff(secs))
        })
}

/// The time zone a window is read in: `name` (an IANA name such as
/// `Europe/Berlin`, from the system's zoneinfo), or the system's own.
pub fn time_zone(name: Option<&str>) -> Result<TimeZone, String> {
    match name {
        Some(name) => TimeZone::get(name).map_err(|e| {
            format!("'{name}' is not a time zone this system knows (an IANA name such as \"Europe/Berlin\"): {e}")
        }),
        None => Ok(TimeZone::system()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Central European time with its daylight saving rule, without
    /// needing the system's zoneinfo.
    fn berlin() -> TimeZone {
        TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap()
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn a_window_across_midnight_is_open_at_night_only() {
        let w = Window::parse("22:00-06:00").unwrap();
        let utc = TimeZone::UTC;
        assert!(is_open(&w, at("2026-12-03T23:30:00Z"), &utc));
        assert!(is_open(&w, at("2026-12-04T05:59:00Z"), &utc));
        assert!(!is_open(&w, at("2026-12-04T06:00:00Z"), &utc));
        assert!(!is_open(&w, at("2026-12-04T13:00:00Z"), &utc));
        assert!(is_open(&w, at("2026-12-04T22:00:00Z"), &utc));
        assert_eq!(
            until_open(&w, at("2026-12-04T13:00:00Z"), &utc),
            Duration::from_secs(9 * 3600)
        );
        assert_eq!(
            until_open(&w, at("2026-12-04T23:00:00Z"), &utc),
            Duration::ZERO
        );
    }

    #[test]
    fn local_time_is_the_devices_including_daylight_saving() {
        let w = Window::parse("22:00-06:00").unwrap();
        // 21:30 UTC in winter is 22:30 in Berlin: open.
        assert!(is_open(&w, at("2026-12-04T21:30:00Z"), &berlin()));
        // 20:30 UTC in summer is 22:30 in Berlin: open; in winter it is not.
        assert!(is_open(&w, at("2026-07-04T20:30:00Z"), &berlin()));
        assert!(!is_open(&w, at("2026-12-04T20:30:00Z"), &berlin()));
        // At 12:00 local (11:00 UTC in winter) the window opens in 10 h.
        assert_eq!(
            until_open(&w, at("2026-12-04T11:00:00Z"), &berlin()),
            Duration::from_secs(10 * 3600)
        );
        // A window opening at 02:30 on the night clocks go forward (no
        // 02:30 that night) opens at the first moment after the gap.
        let w = Window::parse("02:30-04:00").unwrap();
        let before = at("2026-03-29T00:00:00Z"); // 01:00 CET
        let wait = until_open(&w, before, &berlin());
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(3600),
            "{wait:?}"
        );
        // The night clocks go forward is an hour shorter: from 13:00 CET
        // to 12:00 CEST the next day is 22 hours.
        let w = Window::parse("12:00-13:00").unwrap();
        assert_eq!(
            until_open(&w, at("2026-03-28T12:00:00Z"), &berlin()),
            Duration::from_secs(22 * 3600)
        );
    }

    #[test]
    fn the_nearest_of_several_ranges_opens_first() {
        let w = Window::parse("22:00-23:00, 12:00-12:30").unwrap();
        let utc = TimeZone::UTC;
        assert_eq!(
            until_open(&w, at("2026-12-04T11:00:00Z"), &utc),
            Duration::from_secs(3600)
        );
        assert_eq!(
            until_open(&w, at("2026-12-04T12:30:00Z"), &utc),
            Duration::from_secs(9 * 3600 + 1800)
        );
    }

    #[test]
    fn a_time_zone_is_named_or_the_systems() {
        assert!(time_zone(None).is_ok());
        let err = time_zone(Some("Mars/Olympus")).unwrap_err();
        assert!(err.contains("Mars/Olympus"), "{err}");
    }
}
