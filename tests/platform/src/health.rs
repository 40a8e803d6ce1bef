//! Devices' health over the last hour, from their heartbeats: a bounded
//! series per device (at most [`MAX_POINTS`] points, none older than
//! [`WINDOW_SECS`]), for `device show` and the devices page's chart. Kept
//! in memory across a device's reconnections, lost with the platform.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tether_proto::control::DeviceHealth;

/// How far back a series goes.
pub const WINDOW_SECS: u64 = 3600;
/// Most points per device (one every 5 s for an hour).
pub const MAX_POINTS: usize = 720;
/// Most devices with a series (a platform of this size has fewer).
const MAX_DEVICES: usize = 100_000;

/// One heartbeat's figures, as the chart draws them.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthPoint {
    /// Unix seconds.
    pub at: u64,
    /// Device CPU, percent of all its cores (0 to 100).
    pub cpu: f32,
    /// Device memory in use, percent.
    pub memory: f32,
    /// The agent's resident memory, bytes.
    pub agent_rss: u64,
    /// Node-RED's resident memory, bytes (0 when it does not run).
    pub node_red_rss: u64,
}

impl HealthPoint {
    pub fn from_health(at: u64, h: &DeviceHealth) -> HealthPoint {
        HealthPoint {
            at,
            cpu: h.cpu_percent / h.cpus.max(1) as f32,
            memory: if h.memory_total == 0 {
                0.0
            } else {
                (h.memory_used as f64 * 100.0 / h.memory_total as f64) as f32
            },
            agent_rss: h.agent.rss_bytes,
            node_red_rss: h.node_red.map_or(0, |n| n.rss_bytes),
        }
    }
}

/// The series of every device.
#[derive(Debug, Default)]
pub struct History {
    series: Mutex<HashMap<String, VecDeque<HealthPoint>>>,
}

impl History {
    /// Adds a heartbeat's figures at `now` and forgets what is too old.
    pub fn note(&self, device: &str, now: u64, health: &DeviceHealth) {
        let mut series = self
            .series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !series.contains_key(device) && series.len() >= MAX_DEVICES {
            return;
        }
        let points = series.entry(device.to_owned()).or_default();
        points.push_back(HealthPoint::from_health(now, health));
        while points.len() > MAX_POINTS || points.front().is_some_and(|p| p.at + WINDOW_SECS < now)
        {
            points.pop_front();
        }
    }

    /// A device's points of the last hour before `now`, oldest first.
    pub fn of(&self, device: &str, now: u64) -> Vec<HealthPoint> {
        let series = self
            .series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        series
            .get(device)
            .map(|points| {
                points
                    .iter()
                    .filter(|p| p.at + WINDOW_SECS >= now)
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// An inline SVG chart of a series: device CPU and memory, percent, over
/// the last hour (`now` at the right edge).
pub fn chart(points: &[HealthPoint], now: u64) -> String {
    const W: f64 = 240.0;
    const H: f64 = 40.0;
    let x = |at: u64| W - (now.saturating_sub(at) as f64 / WINDOW_SECS as f64 * W).min(W);
    let y = |v: f32| H - (f64::from(v).clamp(0.0, 100.0) / 100.0 * H);
    let line = |value: fn(&HealthPoint) -> f32| {
        points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.at), y(value(p))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let last = points.last();
    let title = match last {
        Some(p) => format!(
            "last hour: CPU {:.0} %, memory {:.0} % now",
            p.cpu, p.memory
        ),
        None => "no health figures yet".to_owned(),
    };
    format!(
        "<svg class=\"chart\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{title}\">\
<title>{title}</title>\
<rect width=\"{W}\" height=\"{H}\" fill=\"none\" stroke=\"#ccc\"/>\
<polyline fill=\"none\" stroke=\"#c0392b\" stroke-width=\"1.5\" points=\"{}\"/>\
<polyline fill=\"none\" stroke=\"#2c7fb8\" stroke-width=\"1.5\" points=\"{}\"/></svg>",
        line(|p| p.cpu),
        line(|p| p.memory)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::control::ProcessHealth;

    fn health(cpu: f32) -> DeviceHealth {
        DeviceHealth {
            cpu_percent: cpu,
            cpus: 2,
            memory_total: 1000,
            memory_used: 250,
            agent: ProcessHealth {
                cpu_percent: 0.1,
                rss_bytes: 5 << 20,
            },
            ..DeviceHealth::default()
        }
    }

    #[test]
    fn a_series_keeps_the_last_hour_within_its_bound() {
        let history = History::default();
        for i in 0..800u64 {
            history.note("dev_1", 10_000 + i * 5, &health(50.0));
        }
        let now = 10_000 + 799 * 5;
        let points = history.of("dev_1", now);
        assert!(points.len() <= MAX_POINTS);
        assert!(points.iter().all(|p| p.at + WINDOW_SECS >= now));
        assert_eq!(points.last().unwrap().cpu, 25.0, "percent of all cores");
        assert_eq!(points.last().unwrap().memory, 25.0);
        // An hour later with no heartbeat: nothing left to show.
        assert!(history.of("dev_1", now + WINDOW_SECS + 1).is_empty());
        assert!(history.of("dev_2", now).is_empty());
    }

    #[test]
    fn the_chart_draws_both_lines_inside_its_box() {
        let points = vec![
            HealthPoint::from_health(1000, &health(0.0)),
            HealthPoint::from_health(2800, &health(200.0)),
        ];
        let svg = chart(&points, 4600);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{svg}");
        assert_eq!(svg.matches("<polyline").count(), 2);
        // At 4600, 1000 is an hour ago (the left edge), 2800 half way.
        assert!(svg.contains("points=\"0.0,40.0 120.0,0.0\""), "{svg}");
        assert!(svg.contains("CPU 100 %"), "{svg}");
        assert!(chart(&[], 0).contains("no health figures yet"));
    }
}
