//! Runs the agent on an enrolled state directory and records numbered
//! audit events through it, one at a time, each durably: after each
//! recording returns it prints `N SEQ` (the event's number and the
//! sequence number it got) on its own line. The chaos test kills it with
//! SIGKILL and starts it again; what it printed is what the platform must
//! end up holding, exactly once.
//!
//! `tether-audit-producer STATE_DIR RUN FROM COUNT`: events `FROM` to
//! `FROM + COUNT - 1`, with subject `run-RUN/event-N`. After the last it
//! prints `done` and keeps the agent running (shipping) until killed.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use tether_agent::audit::AuditEvent;
use tether_agent::config::Config;
use tether_agent::{Agent, AgentOptions};
use tether_proto::audit::{Actor, ActorKind};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [state, run, from, count] = args.as_slice() else {
        eprintln!("usage: tether-audit-producer STATE_DIR RUN FROM COUNT");
        return ExitCode::from(64);
    };
    let (Ok(from), Ok(count)) = (from.parse::<u64>(), count.parse::<u64>()) else {
        eprintln!("FROM and COUNT are numbers");
        return ExitCode::from(64);
    };
    let mut config = Config::for_state_dir(state);
    config.heartbeat_interval = Duration::from_secs(1);
    config.reconnect.min_delay = Duration::from_millis(20);
    config.reconnect.max_delay = Duration::from_millis(200);
    let agent = match Agent::start_with(config, AgentOptions::default()).await {
        Ok(agent) => agent,
        Err(e) => {
            eprintln!("the agent does not start: {e}");
            return ExitCode::from(1);
        }
    };
    let audit = agent.audit();
    let mut out = std::io::stdout().lock();
    for n in from..from + count {
        let event = AuditEvent::Other {
            kind: "x_chaos".into(),
            actor: Actor {
                kind: ActorKind::Agent,
                name: None,
            },
            subject: format!("run-{run}/event-{n}"),
            details: serde_json::json!({ "n": n }),
        };
        match audit.record_durable(event).await {
            Ok(seq) => {
                let _ = writeln!(out, "{n} {seq}");
                let _ = out.flush();
            }
            Err(e) => {
                eprintln!("recording event {n} failed: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let _ = writeln!(out, "done");
    let _ = out.flush();
    drop(out);
    std::future::pending::<()>().await;
    ExitCode::SUCCESS
}
