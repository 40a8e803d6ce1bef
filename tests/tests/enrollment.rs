//! One single-use provisioning token in the configs of two agents started
//! at once: exactly one device enrolls.

mod common;

use common::*;
use tether_agent::enroll::EnrollError;
use tether_agent::identity::StateDir;
use tether_agent::{Agent, AgentError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_with_one_single_use_token_enroll_exactly_one_device() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let token = token(&platform).await;
    let config = |name: &str| {
        let mut config = agent_config(&dir.path().join(name));
        config.platform = Some(platform.url());
        config.provisioning_token = Some(token.clone());
        config.name = Some(name.to_string());
        config
    };
    let (a, b) = tokio::join!(Agent::start(config("a")), Agent::start(config("b")));

    let (agent, winner, error, loser) = match (a, b) {
        (Ok(agent), Err(e)) => (agent, "a", e, "b"),
        (Err(e), Ok(agent)) => (agent, "b", e, "a"),
        (Ok(_), Ok(_)) => panic!("both agents enrolled with one single-use token"),
        (Err(a), Err(b)) => panic!("neither agent enrolled: {a}; {b}"),
    };
    assert!(
        matches!(error, AgentError::Enroll(EnrollError::TokenUsed)),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("already used"), "{message}");
    assert!(message.contains("create a new token"), "{message}");
    assert!(
        !message.contains(token.secret().expose()),
        "the token in the message"
    );
    assert_eq!(error.exit_code(), tether_agent::exit::DATAERR);

    // The winner is the one device the platform knows, and it connects.
    let devices = platform.devices().await.unwrap();
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(devices[0].id, agent.device_id());
    assert_eq!(devices[0].name, winner);
    connected(&agent).await;
    online(&platform, &agent.device_id()).await;
    // The loser kept nothing: no identity, nothing to retry with.
    let loser_state = StateDir::new(dir.path().join(loser));
    assert!(loser_state.load().unwrap().is_none());
    agent.shutdown().await;
    platform.shutdown().await;
}
