//! `POST /v1/enroll`: a device trades a provisioning token and a CSR for a
//! device id and a client certificate.
//!
//! This module owns the order of the checks, cheapest first: the per-source
//! rate limit, the body size, the JSON, the token's syntax, the name and
//! facts, then the token itself (a read of its record by hash: known, not
//! revoked, unexpired, uses left), and only then any cryptography: the CSR's
//! signature and the device certificate's. A request without a valid token
//! never costs a signature. The token is checked again and spent, and the
//! device created, in one transaction ([`crate::store::Store::enroll`]), so
//! a token spent by a concurrent request between the two checks still fails
//! cleanly. It never logs the token, and a refused enrollment leaves no
//! trace in the store.

use std::sync::Arc;
use std::time::Instant;

use http::{Response, StatusCode};
use hyper::body::Incoming;
use tether_proto::api::{
    self, EnrollRequest, EnrollResponse, ErrorCode, Facts, MAX_ENROLL_BODY, MAX_FACTS,
};
use tracing::{info, warn};

use crate::ca::{self, CsrError};
use crate::http::{self as reply, Body};
use crate::keys;
use crate::platform::{PlatformEvent, State, unix_now};
use crate::rate_limit::retry_after_secs;
use crate::server::ConnInfo;
use crate::store::{DeviceRecord, StoreError, TokenRefusal};

/// Longest value of any fact, in characters.
const MAX_FACT_LEN: usize = 256;
const CREATE_HINT: &str = "create a new one with `tether-platform token create`";

/// Handles one enrollment request.
pub async fn handle(state: Arc<State>, conn: Arc<ConnInfo>, body: Incoming) -> Response<Body> {
    if let Err(wait) = state.enroll_limiter.take(conn.peer.ip(), Instant::now()) {
        return reply::rate_limited(
            retry_after_secs(wait),
            "too many enrollment attempts from this address; retry after the Retry-After delay",
        );
    }
    let request: EnrollRequest = match reply::read_json(body, MAX_ENROLL_BODY).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    match enroll(&state, request).await {
        Ok(response) => reply::json(StatusCode::OK, &response),
        Err(response) => response,
    }
}

async fn enroll(state: &State, request: EnrollRequest) -> Result<EnrollResponse, Response<Body>> {
    check_request(&request)?;
    let token_hash = keys::sha256_hex(request.token.expose().as_bytes());
    let checked = token_hash.clone();
    let now = unix_now();
    state
        .store
        .blocking(move |s| s.check_token(&checked, now))
        .await
        .map_err(store_refused)?;
    let key = ca::parse_csr(&request.csr).map_err(csr_refused)?;
    let device_id = new_device_id()?;
    let issued = state
        .ca
        .issue_device(&device_id, &key, state.config.cert_validity)
        .map_err(|e| {
            warn!(cause = %e, "cannot issue a device certificate");
            reply::internal()
        })?;
    let device = DeviceRecord {
        id: device_id.clone(),
        name: request.name,
        team: String::new(),
        enrolled_at: now,
        revoked: false,
        cert_not_after: issued.not_after,
        facts: request.facts,
        protected: false,
        certs: Default::default(),
    };
    let fingerprint = issued.fingerprint.clone();
    let device = state
        .store
        .blocking(move |s| s.enroll(&token_hash, now, device, &fingerprint))
        .await
        .map_err(store_refused)?;
    info!(device_id = %device.id, name = %device.name, team = %device.team, "device enrolled");
    state.emit(PlatformEvent::Enrolled {
        device_id: device.id.clone(),
    });
    Ok(EnrollResponse {
        device_id,
        certificate: issued.pem,
        ca: state.ca.cert_pem().to_string(),
        tunnel_url: state.tunnel_url.clone(),
        platform_time: unix_now(),
        keys: state.keys.pinned(),
    })
}

/// The syntax checks that need no store and no cryptography.
fn check_request(request: &EnrollRequest) -> Result<(), Response<Body>> {
    if !api::is_provisioning_token(request.token.expose()) {
        return Err(reply::error(
            StatusCode::BAD_REQUEST,
            ErrorCode::TokenMalformed,
            "this is not a provisioning token's secret (expected 'tpt_' and 64 lowercase hex digits, without the '.<CA hash>' part); copy it again from `tether-platform token create`",
        ));
    }
    if !api::is_device_name(&request.name) {
        return Err(bad_request(format!(
            "the device name must be 1 to {} characters without control characters",
            api::MAX_DEVICE_NAME
        )));
    }
    check_facts(&request.facts).map_err(bad_request)
}

fn check_facts(facts: &Facts) -> Result<(), String> {
    if facts.extra.len() > MAX_FACTS {
        return Err(format!("at most {MAX_FACTS} extra facts are accepted"));
    }
    let fixed = [
        &facts.agent_version,
        &facts.protocol_version,
        &facts.os,
        &facts.arch,
    ];
    let values = fixed
        .into_iter()
        .chain(facts.hostname.as_ref())
        .chain(facts.extra.keys())
        .chain(facts.extra.values());
    for value in values {
        if value.chars().count() > MAX_FACT_LEN {
            return Err(format!(
                "each fact must be at most {MAX_FACT_LEN} characters"
            ));
        }
    }
    Ok(())
}

fn new_device_id() -> Result<String, Response<Body>> {
    let hex = keys::random_hex(api::DEVICE_ID_BYTES).map_err(|_| reply::internal())?;
    Ok(format!("{}{hex}", api::DEVICE_ID_PREFIX))
}

fn bad_request(message: String) -> Response<Body> {
    reply::error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
}

fn csr_refused(error: CsrError) -> Response<Body> {
    reply::error(
        StatusCode::BAD_REQUEST,
        ErrorCode::BadCsr,
        error.to_string(),
    )
}

fn store_refused(error: StoreError) -> Response<Body> {
    let (code, message) = match error {
        StoreError::Token(TokenRefusal::Unknown) => (
            ErrorCode::TokenUnknown,
            format!("this provisioning token was never issued by this platform; {CREATE_HINT}"),
        ),
        StoreError::Token(TokenRefusal::Used) => (
            ErrorCode::TokenUsed,
            format!("this provisioning token has already been used; {CREATE_HINT}"),
        ),
        StoreError::Token(TokenRefusal::Expired) => (
            ErrorCode::TokenExpired,
            format!("this provisioning token has expired; {CREATE_HINT}"),
        ),
        StoreError::Token(TokenRefusal::Revoked) => (
            ErrorCode::TokenRevoked,
            format!("this provisioning token was revoked; {CREATE_HINT}"),
        ),
        other => {
            warn!(cause = %other, "enrollment failed in the store");
            return reply::internal();
        }
    };
    reply::error(StatusCode::FORBIDDEN, code, message)
}
