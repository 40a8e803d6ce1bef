//! `tether-platform`: runs the reference platform (`serve`) or talks to a
//! running one (`token`, `device`, `user`, `connect`). Thin: parse the arguments,
//! set up logging, run, map errors to exit codes (64 for usage and
//! configuration errors, 1 otherwise).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tether_platform::cli::{
    Cli, Command, ConnectArgs, DeviceCommand, KeysCommand, ServeArgs, SnapshotCommand,
    TokenCommand, UserAddArgs, UserCommand,
};
use tether_platform::client::AdminClient;
use tether_platform::connect::Proxy;
use tether_platform::{Platform, PlatformConfig, PlatformError, RateLimit};
use tracing_subscriber::EnvFilter;

/// Environment variable with the log filter (`EnvFilter` syntax).
const LOG_ENV: &str = "TETHER_PLATFORM_LOG";

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let usage = e
                .downcast_ref::<PlatformError>()
                .is_some_and(|e| matches!(e, PlatformError::Config(_)));
            ExitCode::from(if usage { 64 } else { 1 })
        }
    }
}

fn init_logging() {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_env(LOG_ENV)
        // rumqttd (the embedded broker) logs every connection at info and
        // every disconnection as an error; the platform logs what matters
        // about it itself (TETHER_PLATFORM_LOG=info,rumqttd=info shows it).
        .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Token(TokenCommand::Create(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let request = tether_platform::admin::CreateTokenRequest {
                ttl_secs: args.ttl.map(|ttl| ttl.as_secs()),
                uses: args.uses,
                team: args.team,
            };
            let created = client.create_token(&request).await?;
            println!("{}", created.token.expose());
            eprintln!(
                "provisioning token {} for team '{}': {} use(s), expires at {} (Unix time)",
                created.id, request.team, created.uses, created.expires_at
            );
            Ok(())
        }
        Command::Token(TokenCommand::List(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let tokens = client.tokens().await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
            } else {
                print!("{}", tether_platform::cli::token_table(&tokens, unix_now()));
            }
            Ok(())
        }
        Command::Token(TokenCommand::Revoke(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let revoked = client.revoke_token(&args.id).await?;
            println!(
                "revoked provisioning token {} (team '{}', {} use(s) were left)",
                revoked.id, revoked.team, revoked.uses_left
            );
            Ok(())
        }
        Command::Device(DeviceCommand::List(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let devices = client.devices().await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
            } else {
                print!(
                    "{}",
                    tether_platform::cli::device_table(&devices, unix_now())
                );
            }
            Ok(())
        }
        Command::Device(DeviceCommand::Show(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let device = client.device(&args.id).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&device)?);
            } else {
                print!("{}", tether_platform::cli::device_text(&device, unix_now()));
            }
            Ok(())
        }
        Command::Device(DeviceCommand::Window(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let set = client.set_window(&args.id, args.window.as_deref()).await?;
            let when = if set.pushed {
                "the device was told"
            } else {
                "the device is told when it connects"
            };
            match &set.window {
                Some(w) => println!("maintenance window of {} set to {w}; {when}", set.device_id),
                None => println!("maintenance window of {} cleared; {when}", set.device_id),
            }
            Ok(())
        }
        Command::Device(DeviceCommand::NodeRed(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let sent = client.node_red(&args.id, &args.action).await?;
            let when = if sent.pushed {
                "the device was told"
            } else {
                "the device is told when it connects"
            };
            println!(
                "node-red {} requested for {}; {when}",
                sent.action, sent.device_id
            );
            Ok(())
        }
        Command::Snapshot(SnapshotCommand::Create(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let expires = Some(args.expires_in.as_secs());
            let created = match &args.dir {
                None => client.snapshot_from_device(&args.device, expires).await?,
                Some(dir) => {
                    let files = tether_platform::cli::read_snapshot_dir(
                        dir,
                        tether_platform::snapshots::MAX_CREATE_BODY as u64 / 4 * 3,
                    )
                    .map_err(anyhow::Error::msg)?;
                    use base64::Engine;
                    let request = tether_platform::snapshots::CreateRequest {
                        files: files
                            .into_iter()
                            .map(|(path, bytes)| tether_platform::snapshots::FileEntry {
                                path,
                                data: base64::engine::general_purpose::STANDARD.encode(bytes),
                            })
                            .collect(),
                        expires_in_secs: expires,
                    };
                    client.create_snapshot(&args.device, &request).await?
                }
            };
            println!(
                "snapshot {} for {}: {} files, {} bytes, signed, expires {}",
                created.version,
                created.device,
                created.components,
                created.bytes,
                tether_platform::cli::rfc3339(created.expires_at)
            );
            if args.push {
                print_push(&client.push_snapshot(&args.device, created.version).await?);
            }
            Ok(())
        }
        Command::Snapshot(SnapshotCommand::List(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let list = client.snapshots(args.device.as_deref()).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", tether_platform::cli::snapshot_table(&list));
            }
            Ok(())
        }
        Command::Snapshot(SnapshotCommand::Push(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            print_push(&client.push_snapshot(&args.device, args.version).await?);
            Ok(())
        }
        Command::Snapshot(SnapshotCommand::Rollback(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            print_push(&client.rollback_snapshot(&args.device).await?);
            Ok(())
        }
        Command::Audit(args) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let query = tether_platform::audit::AuditQuery {
                device: args.device,
                team: args.team,
                since: args.since,
                kind: args.kind,
                user: args.user,
                limit: Some(args.limit),
            };
            let report = client.audit(&query).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", tether_platform::cli::audit_text(&report));
            }
            Ok(())
        }
        Command::Device(DeviceCommand::Revoke(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let revoked = client.revoke(&args.id).await?;
            let live = if revoked.disconnected {
                "; its live tunnel was closed"
            } else {
                ""
            };
            println!("revoked {}{live}", revoked.device_id);
            Ok(())
        }
        Command::Keys(KeysCommand::RotateGrant(data)) => {
            let client = AdminClient::from_data_dir(&data.data_dir)?;
            let rotated = client.rotate_grant_key().await?;
            println!(
                "grant key rotated; new key {} ({} rotations on record, sent to every device on its control stream)",
                rotated.grant_key, rotated.rotations
            );
            Ok(())
        }
        Command::Keys(KeysCommand::RotateSnapshot(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let rotated = client.rotate_snapshot_keys(args.revoke_old).await?;
            println!(
                "snapshot keys rotated: root version {}, snapshot key {}, root key {}, expires {}",
                rotated.root_version,
                rotated.snapshot_key,
                rotated.root_key,
                tether_platform::cli::rfc3339(rotated.expires_at)
            );
            if rotated.revoked.is_empty() {
                println!("nothing revoked; devices walk the new root at their next snapshot pull");
            } else {
                println!(
                    "revoked {}; devices refuse what those keys sign once they walk the new root (at their next snapshot pull: push a new snapshot version to make it now)",
                    rotated.revoked.join(", ")
                );
            }
            Ok(())
        }
        Command::Device(DeviceCommand::Renew(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let renew = client.request_renewal(&args.id).await?;
            let pushed = if renew.pushed {
                "; the device was told"
            } else {
                "; the device is offline and is told when it connects"
            };
            println!("renewal requested for {}{pushed}", renew.device_id);
            Ok(())
        }
        Command::Device(DeviceCommand::RevokeCert(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let revoked = client
                .revoke_certificate(&args.id, &args.fingerprint)
                .await?;
            let live = if revoked.disconnected {
                "; the tunnel using it was closed"
            } else {
                ""
            };
            println!(
                "revoked certificate {} of {}{live}",
                revoked.fingerprint, revoked.device_id
            );
            Ok(())
        }
        Command::Device(DeviceCommand::Protect(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let set = client.set_protection(&args.id, args.on).await?;
            let state = if set.protected { "on" } else { "off" };
            let pushed = if set.pushed {
                "; the device was told"
            } else {
                "; the device is offline and is told when it connects"
            };
            println!("protection mode {state} for {}{pushed}", set.device_id);
            Ok(())
        }
        Command::User(UserCommand::Add(args)) => add_user(args).await,
        Command::User(UserCommand::List(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let users = client.users().await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&users)?);
            } else {
                print!("{}", tether_platform::cli::user_table(&users));
            }
            Ok(())
        }
        Command::User(UserCommand::Remove(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let removed = client.remove_user(&args.name).await?;
            println!(
                "removed user {}; {} session(s) ended",
                removed.name, removed.sessions_ended
            );
            Ok(())
        }
        Command::User(UserCommand::Passwd(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let password = read_password(&args.name)?;
            let changed = client.set_password(&args.name, password).await?;
            println!(
                "password of {} changed; {} session(s) ended",
                changed.name, changed.sessions_ended
            );
            Ok(())
        }
        Command::User(UserCommand::Role(args)) => {
            let client = AdminClient::from_data_dir(&args.data.data_dir)?;
            let changed = client.set_role(&args.name, args.role).await?;
            println!(
                "{} is now {}; {} session(s) ended",
                changed.name, args.role, changed.sessions_ended
            );
            Ok(())
        }
        Command::Connect(args) => connect(args).await,
    }
}

/// A password from standard input: one line; from a terminal, without echo.
fn print_push(pushed: &tether_platform::admin::PushResponse) {
    let s = &pushed.snapshot;
    let copied = pushed
        .copied_from
        .map_or(String::new(), |v| format!(" (a copy of version {v})"));
    let when = if pushed.pushed {
        "the device was told and pulls it now"
    } else {
        "the device pulls it when it connects"
    };
    println!(
        "pushed snapshot {}{copied} to {}; {when}; 'tether-platform device show {}' shows the outcome",
        s.version, s.device, s.device
    );
}

fn read_password(name: &str) -> anyhow::Result<tether_proto::api::Secret> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        let prompt = format!("password for {name}: ");
        let line = rpassword::prompt_password(prompt).context("cannot read the password")?;
        tether_platform::cli::check_password_line(line.into_bytes())
    } else {
        tether_platform::cli::read_password(std::io::stdin().lock())
    }
    .map_err(anyhow::Error::msg)
}

async fn add_user(args: UserAddArgs) -> anyhow::Result<()> {
    let client = AdminClient::from_data_dir(&args.data.data_dir)?;
    let password = read_password(&args.name)?;
    let request = tether_platform::admin::CreateUserRequest {
        name: args.name,
        team: args.team,
        role: args.role,
        password,
    };
    let created = client.create_user(&request).await?;
    println!(
        "created user {} ({} of team {})",
        created.name, created.role, created.team
    );
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = PlatformConfig::new(&args.data.data_dir, args.listen);
    config.mqtt = args.mqtt_config();
    if !args.names.is_empty() {
        config.names = args.names;
    }
    config.cert_validity = args.cert_validity;
    config.enroll_rate = RateLimit {
        burst: args.enroll_burst,
        refill: args.enroll_refill,
    };
    config.max_connections = args.max_connections;
    config.ws_read_buffer = args.ws_read_buffer;
    config.ws_write_buffer = args.ws_write_buffer;
    config.allow_remote_listen = args.allow_remote_listen;
    config.max_listeners = args.max_listeners;
    config.max_listener_connections = args.max_listener_connections;
    config.editor_timeout = args.editor_timeout;
    config.editor_cache_bytes = args.editor_cache_mib.saturating_mul(1024 * 1024);
    config.editor_domain = args.editor_domain;
    let platform = Platform::start(config).await?;
    eprintln!("listening on {}", platform.url());
    match (platform.mqtt_broker_url(), platform.mqtt_v311_addr()) {
        (Some(url), Some(v311)) => eprintln!("MQTT broker {url} (MQTT 3.1.1 on {v311})"),
        (Some(url), None) => eprintln!("MQTT broker {url}"),
        (None, _) => eprintln!("MQTT off"),
    }
    wait_for_signal().await;
    platform.shutdown().await;
    Ok(())
}

async fn connect(args: ConnectArgs) -> anyhow::Result<()> {
    let client = AdminClient::from_data_dir(&args.data.data_dir)?;
    if !args.remote {
        let session = client
            .listen(&args.device, &args.service, args.listen)
            .await?;
        println!(
            "listening on {} (served by the platform at {}); Ctrl-C to stop",
            session.local_addr(),
            client.url()
        );
        session.run(wait_for_signal()).await?;
        return Ok(());
    }
    let proxy = Proxy::bind(client, args.listen, &args.device, &args.service)
        .await
        .with_context(|| format!("cannot listen on {}; help: pick a free port", args.listen))?;
    let addr = proxy.local_addr()?;
    println!("listening on {addr}");
    tokio::select! {
        result = proxy.run() => result.context("the local listener failed")?,
        () = wait_for_signal() => {}
    }
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
