//! The certificate life of one device: which of its certificates the tunnel
//! endpoint accepts, when it may renew, and what is pruned.
//!
//! A device has **one current certificate**, plus, after a renewal, the
//! **previous** one for a grace period: until the device first connects
//! with the new one (proof that it switched) or until [`CertPolicy::grace`]
//! has passed, whichever comes first. Every other certificate ever issued to
//! it is *superseded*: its record stays until it expires, so that a tunnel
//! attempt with it is recognised and reported (a copy of the device's
//! state directory, a second holder of its identity) instead of being
//! answered as an unknown certificate; then it is pruned. A single
//! certificate can also be revoked on its own, without revoking the device.
//!
//! Renewal is accepted only inside the renewal window (the current
//! certificate has at most [`CertPolicy::window`] left) or when the platform
//! asked the device to renew, and at most [`CertPolicy::max_per_hour`] times
//! per hour per device.
//!
//! This module is pure: it decides from records and `now` (Unix seconds),
//! and the store applies its decisions in one transaction. It never signs,
//! reads the clock or logs.

use serde::{Deserialize, Serialize};

/// What the platform allows; from [`crate::PlatformConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertPolicy {
    /// Renewal is accepted when the current certificate has at most this
    /// many seconds left.
    pub window: u64,
    /// Renewals per device in any hour.
    pub max_per_hour: usize,
    /// How long the previous certificate stays accepted after a renewal, at
    /// most.
    pub grace: u64,
}

/// A device's certificates, as stored in its record. Records written
/// before it existed load as `CertState::default()`: their one certificate
/// becomes current on its next connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertState {
    /// Fingerprint of the certificate the device uses now.
    #[serde(default)]
    pub current: Option<String>,
    /// The certificate before the last renewal, while in its grace period.
    #[serde(default)]
    pub previous: Option<String>,
    /// Unix seconds: the previous certificate is refused from then on.
    #[serde(default)]
    pub previous_until: u64,
    /// When the last renewals were accepted (Unix seconds, the last hour's).
    #[serde(default)]
    pub renewals: Vec<u64>,
    /// The platform asked the device to renew (outside the window).
    #[serde(default)]
    pub renew_requested: bool,
    /// Every fingerprint on record for the device, pruned as they expire.
    #[serde(default)]
    pub issued: Vec<String>,
    /// The last time a certificate that is no longer the device's was
    /// presented, and which: a copy of the identity is about.
    #[serde(default)]
    pub superseded_seen: Option<(u64, String)>,
}

impl CertState {
    /// The state of a device just enrolled with `fingerprint`.
    pub fn enrolled(fingerprint: &str) -> CertState {
        CertState {
            current: Some(fingerprint.to_string()),
            issued: vec![fingerprint.to_string()],
            ..CertState::default()
        }
    }
}

/// What the tunnel endpoint does with a certificate of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Accepted; `Some` when the record must be written back (a legacy
    /// device's certificate made current, a previous one retired).
    Accept(Option<CertState>),
    /// Refused: this certificate was revoked on its own.
    Revoked,
    /// Refused: the device has renewed since; this is an older copy. The
    /// new state (with `superseded_seen`) is to be stored.
    Superseded(CertState),
}

/// Decides on a tunnel with `fingerprint`, issued to a device whose
/// certificates are `state` (the certificate's own `revoked` flag given).
pub fn admit(state: &CertState, fingerprint: &str, cert_revoked: bool, now: u64) -> Admission {
    if cert_revoked {
        return Admission::Revoked;
    }
    match &state.current {
        None => {
            let mut next = state.clone();
            next.current = Some(fingerprint.to_string());
            if !next.issued.iter().any(|f| f == fingerprint) {
                next.issued.push(fingerprint.to_string());
            }
            Admission::Accept(Some(next))
        }
        Some(current) if current == fingerprint => {
            if state.previous.is_some() {
                // The device holds the new certificate: the old one is done.
                let mut next = state.clone();
                next.previous = None;
                next.previous_until = 0;
                Admission::Accept(Some(next))
            } else {
                Admission::Accept(None)
            }
        }
        Some(_) if state.previous.as_deref() == Some(fingerprint) && now < state.previous_until => {
            Admission::Accept(None)
        }
        Some(_) => {
            let mut next = state.clone();
            next.superseded_seen = Some((now, fingerprint.to_string()));
            Admission::Superseded(next)
        }
    }
}

/// Why a renewal is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenewRefusal {
    #[error(
        "the certificate has {left_secs} s left, more than the renewal window of {window_secs} s; renew later, or ask the platform's operator to request a renewal"
    )]
    TooEarly { left_secs: u64, window_secs: u64 },
    #[error(
        "this device renewed {count} times in the last hour, the most allowed; try again later"
    )]
    TooOften { count: usize },
    #[error(
        "the renewal request came over a tunnel whose certificate is neither this device's current one nor the previous one in its grace period"
    )]
    NotCurrent,
}

/// Checks whether the device may renew now, over a tunnel authenticated by
/// `tunnel_fingerprint`, its current certificate expiring at `not_after`.
pub fn may_renew(
    state: &CertState,
    tunnel_fingerprint: &str,
    not_after: u64,
    policy: &CertPolicy,
    now: u64,
) -> Result<(), RenewRefusal> {
    // Over the current certificate, or over the previous one in its grace
    // period: a device whose last renewal answer was lost still has only
    // that one, and must be able to try again.
    let current = state
        .current
        .as_deref()
        .is_none_or(|c| c == tunnel_fingerprint);
    let previous =
        state.previous.as_deref() == Some(tunnel_fingerprint) && now < state.previous_until;
    if !current && !previous {
        return Err(RenewRefusal::NotCurrent);
    }
    let recent = state
        .renewals
        .iter()
        .filter(|at| now.saturating_sub(**at) < 3600)
        .count();
    if recent >= policy.max_per_hour {
        return Err(RenewRefusal::TooOften { count: recent });
    }
    let left = not_after.saturating_sub(now);
    if left > policy.window && !state.renew_requested {
        return Err(RenewRefusal::TooEarly {
            left_secs: left,
            window_secs: policy.window,
        });
    }
    Ok(())
}

/// The state after a renewal to `fingerprint` at `now`, requested over a
/// tunnel authenticated with `tunnel_fingerprint`: that one, which the
/// device holds, becomes the previous certificate. (If it was already the
/// previous one, the certificate issued in between never reached the device
/// and is superseded.)
pub fn renewed(
    state: &CertState,
    tunnel_fingerprint: &str,
    fingerprint: &str,
    policy: &CertPolicy,
    now: u64,
) -> CertState {
    let mut next = state.clone();
    next.previous = Some(tunnel_fingerprint.to_string());
    next.previous_until = now.saturating_add(policy.grace);
    next.current = Some(fingerprint.to_string());
    next.renew_requested = false;
    next.renewals.retain(|at| now.saturating_sub(*at) < 3600);
    next.renewals.push(now);
    next.issued.push(fingerprint.to_string());
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: CertPolicy = CertPolicy {
        window: 1000,
        max_per_hour: 3,
        grace: 600,
    };

    #[test]
    fn a_renewal_makes_the_old_certificate_previous_until_the_new_one_is_used() {
        let state = CertState::enrolled("a");
        assert_eq!(admit(&state, "a", false, 0), Admission::Accept(None));
        let state = renewed(&state, "a", "b", &POLICY, 100);
        assert_eq!(state.current.as_deref(), Some("b"));
        // The old one still works in its grace period ...
        assert_eq!(admit(&state, "a", false, 200), Admission::Accept(None));
        // ... and not after it.
        assert!(matches!(
            admit(&state, "a", false, 700),
            Admission::Superseded(_)
        ));
        // Using the new one retires the old one at once.
        let Admission::Accept(Some(state)) = admit(&state, "b", false, 200) else {
            panic!("the new certificate is accepted and the record updated");
        };
        assert_eq!(state.previous, None);
        let Admission::Superseded(seen) = admit(&state, "a", false, 201) else {
            panic!("the old certificate is refused once the new one is used");
        };
        assert_eq!(seen.superseded_seen, Some((201, "a".to_string())));
        // A revoked certificate is refused whatever its place.
        assert_eq!(admit(&state, "b", true, 202), Admission::Revoked);
    }

    #[test]
    fn a_legacy_record_makes_its_certificate_current_on_first_use() {
        let Admission::Accept(Some(state)) = admit(&CertState::default(), "x", false, 5) else {
            panic!("accepted and recorded");
        };
        assert_eq!(state.current.as_deref(), Some("x"));
        assert_eq!(state.issued, ["x"]);
    }

    #[test]
    fn renewal_only_in_the_window_or_on_request_and_a_few_times_an_hour() {
        let state = CertState::enrolled("a");
        let early = may_renew(&state, "a", 10_000, &POLICY, 0);
        assert!(
            matches!(early, Err(RenewRefusal::TooEarly { .. })),
            "{early:?}"
        );
        assert_eq!(may_renew(&state, "a", 900, &POLICY, 0), Ok(()));
        let requested = CertState {
            renew_requested: true,
            ..state.clone()
        };
        assert_eq!(may_renew(&requested, "a", 10_000, &POLICY, 0), Ok(()));
        // Three renewals in an hour, then no more until an hour has passed.
        let mut state = state;
        let mut fp = "a".to_string();
        for i in 0..3u64 {
            assert_eq!(may_renew(&state, &fp, 900 + i, &POLICY, i), Ok(()));
            let next = format!("n{i}");
            state = renewed(&state, &fp, &next, &POLICY, i);
            fp = next;
        }
        assert_eq!(
            may_renew(&state, &fp, 900, &POLICY, 10),
            Err(RenewRefusal::TooOften { count: 3 })
        );
        assert_eq!(may_renew(&state, &fp, 4000, &POLICY, 3600), Ok(()));
        // Over the previous certificate while in its grace (a renewal
        // answer that was lost), not over an older one.
        assert_eq!(
            may_renew(&state, "n1", 4000, &POLICY, 3600),
            Err(RenewRefusal::NotCurrent)
        );
        let lost = renewed(&state, "n2", "n3", &POLICY, 4000);
        assert_eq!(may_renew(&lost, "n2", 4500, &POLICY, 4100), Ok(()));
        let again = renewed(&lost, "n2", "n4", &POLICY, 4100);
        assert_eq!(again.previous.as_deref(), Some("n2"));
        assert_eq!(again.current.as_deref(), Some("n4"));
        assert!(matches!(
            admit(&again, "n3", false, 4101),
            Admission::Superseded(_)
        ));
        assert_eq!(
            may_renew(&again, "n1", 4500, &POLICY, 4200),
            Err(RenewRefusal::NotCurrent)
        );
    }
}
