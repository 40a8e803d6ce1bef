//! Who Node-RED runs as. Flows are code any member of the team can write
//! (an `exec` node runs shell commands), so Node-RED must never run with the
//! agent's rights: with them a flow reads the device's private key and
//! rewrites `identity.json` or the editor key file (and so mints tokens).
//!
//! - The agent runs as root: Node-RED runs as `[node_red] user`, started
//!   through `setpriv` (util-linux) with that user's uid and gid, no
//!   supplementary groups and `no_new_privs`, the way AWS Greengrass runs
//!   components as `ggc_user`. Without a configured user the agent refuses
//!   to launch Node-RED and says how to create one.
//! - The agent runs as another user: it cannot switch users. It runs
//!   Node-RED as itself when no user is configured (and says once that flows
//!   can then read what the agent can), and refuses a configured user other
//!   than itself.
//!
//! The user directory ([`prepare_dir`]) is owned by root, group the
//! Node-RED user's, mode `1770`: Node-RED creates and changes its own files
//! there, while the sticky bit keeps it from replacing the agent's settings
//! and key files (root's, `0644`). The agent's state directory (`0700`) is
//! never inside it. This module looks users up in `/etc/passwd` only; it
//! never changes a user.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tracing::warn;

use super::NodeRedError;

/// `program`, started through `setpriv` as `run_as` (its uid and gid, no
/// supplementary groups, `no_new_privs`; as the agent's own user when
/// `None`), with the parent-death signal KILL set after the change of
/// user: it never outlives the thread that spawned it. Arguments follow.
pub fn command_as(run_as: Option<&RunAs>, program: &std::ffi::OsStr) -> std::process::Command {
    let mut command = std::process::Command::new("setpriv");
    if let Some(run_as) = run_as {
        command
            .arg(format!("--reuid={}", run_as.uid))
            .arg(format!("--regid={}", run_as.gid))
            .arg("--clear-groups")
            .arg("--no-new-privs")
            .env("USER", &run_as.name)
            .env("LOGNAME", &run_as.name);
    }
    command.args(["--pdeathsig", "KILL", "--"]).arg(program);
    command
}

/// The system user Node-RED runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// True if `name` can be a user name: 1 to 32 of `A-Za-z0-9_.-`, not
/// starting with `-`.
pub fn is_user_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The effective user id of this process, from `/proc/self/status`.
pub fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// The name of user `uid` in the `passwd` file at `path`.
pub fn name_of(path: &Path, uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string(path).ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let (name, _, id) = (fields.next()?, fields.next()?, fields.next()?);
        (id.parse() == Ok(uid) && is_user_name(name)).then(|| name.to_owned())
    })
}

/// Looks `name` up in the `passwd` file at `path`.
pub fn lookup_in(path: &Path, name: &str) -> Option<RunAs> {
    let passwd = std::fs::read_to_string(path).ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let (user, _, uid, gid) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        (user == name).then_some(())?;
        Some(RunAs {
            name: name.to_string(),
            uid: uid.parse().ok()?,
            gid: gid.parse().ok()?,
        })
    })
}

/// Decides who a launched Node-RED runs as, for an agent with effective uid
/// `euid` and the configured `user`.
pub fn plan(user: Option<&str>, euid: u32) -> Result<Option<RunAs>, NodeRedError> {
    match (user, euid) {
        (Some(name), _) => {
            let run_as = lookup_in(Path::new("/etc/passwd"), name)
                .ok_or_else(|| NodeRedError::NoSuchUser(name.to_string()))?;
            if run_as.uid == 0 {
                return Err(NodeRedError::RootUser(name.to_string()));
            }
            if euid != 0 && euid != run_as.uid {
                return Err(NodeRedError::CannotSwitch {
                    user: name.to_string(),
                    euid,
                });
            }
            Ok((euid == 0).then_some(run_as))
        }
        (None, 0) => Err(NodeRedError::NoUser),
        (None, _) => {
            warn!(
                "Node-RED runs as the agent's own user: flows (an exec node) can read what the agent can, its device key included; run tetherd as root with [node_red] user, or as the packaged service"
            );
            Ok(None)
        }
    }
}

/// Makes `dir` Node-RED's user directory for `run_as`: owned by root, group
/// `run_as.gid`, mode `1770`; and everything in it but the agent's own
/// `keep` files owned by `run_as` (so a directory an earlier configuration
/// left to root is usable).
pub fn prepare_dir(dir: &Path, run_as: &RunAs, keep: &[&str]) -> Result<(), std::io::Error> {
    std::fs::create_dir_all(dir)?;
    std::os::unix::fs::chown(dir, Some(0), Some(run_as.gid))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1770))?;
    let mut pending: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| !keep.iter().any(|k| e.file_name() == *k))
        .map(|e| e.path())
        .collect();
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        std::os::unix::fs::lchown(&path, Some(run_as.uid), Some(run_as.gid))?;
        if meta.is_dir() {
            pending.extend(
                std::fs::read_dir(&path)?
                    .filter_map(|e| e.ok())
                    .map(|e| e.path()),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_found_in_a_passwd_file() {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        std::fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/bash\nnodered:x:998:997::/var/lib/nr:/usr/sbin/nologin\n",
        )
        .unwrap();
        assert_eq!(
            lookup_in(&passwd, "nodered"),
            Some(RunAs {
                name: "nodered".into(),
                uid: 998,
                gid: 997
            })
        );
        assert_eq!(lookup_in(&passwd, "node"), None);
        assert_eq!(lookup_in(&passwd, "nobody"), None);
    }

    #[test]
    fn a_root_agent_needs_a_user_and_a_plain_one_runs_node_red_as_itself() {
        assert!(matches!(plan(None, 0), Err(NodeRedError::NoUser)));
        assert!(matches!(
            plan(Some("root"), 0),
            Err(NodeRedError::RootUser(_))
        ));
        assert!(matches!(
            plan(Some("no-such-user-here"), 0),
            Err(NodeRedError::NoSuchUser(_))
        ));
        assert_eq!(plan(None, 1000).unwrap(), None);
        assert!(is_user_name("tether-nodered") && !is_user_name("-x") && !is_user_name("a b"));
    }
}
