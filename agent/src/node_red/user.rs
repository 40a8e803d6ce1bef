//! Who Node-RED runs as. Flows are code any member of the team can write
//! (an `exec` node runs shell commands), so Node-RED must never run with the
//! agent's rights: with them a flow reads the device's private key and
//! rewrites `identity.json` or the editor key file (and so mints tokens).
//!
//! - The agent can switch users: it holds `CAP_SETUID`, `CAP_SETGID` and
//!   `CAP_KILL` in its effective set ([`Privileges`]), as root or as the
//!   packaged service's `tether` user, which has exactly those as ambient
//!   capabilities. Node-RED runs as `[node_red] user`, started through
//!   `setpriv` (util-linux) with that user's uid and gid, no supplementary
//!   groups, no capabilities (the agent's ambient ones would otherwise pass
//!   on, and a flow could switch to any user), `no_new_privs` and umask
//!   `0007`, the way AWS Greengrass runs components as `ggc_user`. A root
//!   agent without a configured user refuses to launch Node-RED and says
//!   how to create one.
//! - The agent cannot switch users: it runs Node-RED as itself when no user
//!   is configured (and says once that flows can then read what the agent
//!   can), and refuses a configured user other than itself, naming the
//!   capabilities it lacks.
//!
//! Files are shared with Node-RED through its group, not given to it: the
//! user directory ([`prepare_dir`]) is the agent's, group the Node-RED
//! user's, mode `1770`: Node-RED creates and changes its own files there,
//! while the sticky bit keeps it from replacing the agent's settings and
//! key files (`0644`). What Node-RED writes stays readable and removable by
//! its group (umask `0007`). An agent without `CAP_CHOWN` (the packaged
//! service) must be a member of that group (`SupplementaryGroups=`). The
//! agent's state directory (`0700`) is never inside the user directory.
//! This module looks users up in `/etc/passwd` and `/etc/group` only; it
//! never changes a user.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::thread::CapabilitySet;
use tracing::warn;

use super::NodeRedError;

/// What starts a program as Node-RED's user: after `setpriv`, a shell sets
/// the umask and execs the program (the process stays the same).
const WITH_UMASK: &str = "umask 0007 && exec \"$0\" \"$@\"";

/// `program`, started through `setpriv` as `run_as` (its uid and gid, no
/// supplementary groups, `no_new_privs`, umask `0007`; as the agent's own
/// user when `None`), without any of the agent's capabilities, with the
/// parent-death signal KILL set after the change of user: it never
/// outlives the thread that spawned it. Arguments follow.
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
    // A change between non-root users keeps the capabilities, and ambient
    // ones survive exec: clearing the inheritable and ambient sets leaves
    // the program none.
    command.args([
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--pdeathsig",
        "KILL",
        "--",
    ]);
    if run_as.is_some() {
        command.args(["/bin/sh", "-c", WITH_UMASK]);
    }
    command.arg(program);
    command
}

/// The capabilities that let the agent run Node-RED as another user:
/// switch to it (`CAP_SETUID`, `CAP_SETGID`) and signal it (`CAP_KILL`).
pub const SWITCH_CAPS: CapabilitySet = CapabilitySet::SETUID
    .union(CapabilitySet::SETGID)
    .union(CapabilitySet::KILL);

/// What this process may do about other users, as the kernel says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Privileges {
    pub euid: u32,
    /// The effective capability set.
    pub caps: CapabilitySet,
    /// The effective group and the supplementary groups.
    pub groups: Vec<u32>,
}

impl Privileges {
    /// This process's (`capget`, `getgroups`); no capabilities if the
    /// kernel does not say.
    pub fn current() -> Privileges {
        let caps = rustix::thread::capabilities(None)
            .map(|sets| sets.effective)
            .unwrap_or(CapabilitySet::empty());
        let mut groups = vec![rustix::process::getegid().as_raw()];
        groups.extend(
            rustix::process::getgroups()
                .unwrap_or_default()
                .into_iter()
                .map(|g| g.as_raw()),
        );
        Privileges {
            euid: rustix::process::geteuid().as_raw(),
            caps,
            groups,
        }
    }

    /// Holds everything in [`SWITCH_CAPS`].
    pub fn can_switch(&self) -> bool {
        self.caps.contains(SWITCH_CAPS)
    }

    /// May give files to another user and change files it does not own
    /// (`CAP_CHOWN` and `CAP_FOWNER`: root).
    pub fn can_chown(&self) -> bool {
        self.caps
            .contains(CapabilitySet::CHOWN.union(CapabilitySet::FOWNER))
    }

    /// May change the group and mode of a file with this metadata: its
    /// owner, or with [`Privileges::can_chown`].
    pub fn may_change(&self, meta: &std::fs::Metadata) -> bool {
        meta.uid() == self.euid || self.can_chown()
    }

    /// `gid` is one of its groups.
    pub fn in_group(&self, gid: u32) -> bool {
        self.groups.contains(&gid)
    }

    /// The capabilities of [`SWITCH_CAPS`] it lacks, by name.
    pub fn missing(&self) -> String {
        [
            (CapabilitySet::SETUID, "CAP_SETUID"),
            (CapabilitySet::SETGID, "CAP_SETGID"),
            (CapabilitySet::KILL, "CAP_KILL"),
        ]
        .iter()
        .filter(|(cap, _)| !self.caps.contains(*cap))
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(", ")
    }
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

/// The name of group `gid` in the `group` file at `path`.
pub fn group_name_in(path: &Path, gid: u32) -> Option<String> {
    let groups = std::fs::read_to_string(path).ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        let (name, _, id) = (fields.next()?, fields.next()?, fields.next()?);
        (id.parse() == Ok(gid) && is_user_name(name)).then(|| name.to_owned())
    })
}

/// Decides who a launched Node-RED runs as, for an agent with privileges
/// `me` and the configured `user`.
pub fn plan(user: Option<&str>, me: &Privileges) -> Result<Option<RunAs>, NodeRedError> {
    plan_in(Path::new("/etc/passwd"), Path::new("/etc/group"), user, me)
}

/// [`plan`], with users and groups from the files at `passwd` and `group`.
pub fn plan_in(
    passwd: &Path,
    group: &Path,
    user: Option<&str>,
    me: &Privileges,
) -> Result<Option<RunAs>, NodeRedError> {
    let Some(name) = user else {
        if me.euid == 0 {
            return Err(NodeRedError::NoUser);
        }
        warn!(
            "Node-RED runs as the agent's own user: flows (an exec node) can read what the agent can, its device key included; set [node_red] user and run tetherd as the packaged service (or as root)"
        );
        return Ok(None);
    };
    let run_as =
        lookup_in(passwd, name).ok_or_else(|| NodeRedError::NoSuchUser(name.to_string()))?;
    if run_as.uid == 0 {
        return Err(NodeRedError::RootUser(name.to_string()));
    }
    if me.euid == run_as.uid {
        return Ok(None);
    }
    if !me.can_switch() {
        return Err(NodeRedError::CannotSwitch {
            user: name.to_string(),
            euid: me.euid,
            missing: me.missing(),
        });
    }
    if !me.can_chown() && !me.in_group(run_as.gid) {
        return Err(NodeRedError::NotInGroup {
            user: name.to_string(),
            group: group_name_in(group, run_as.gid).unwrap_or_else(|| run_as.gid.to_string()),
            gid: run_as.gid,
        });
    }
    Ok(Some(run_as))
}

/// Makes `dir` Node-RED's user directory for `run_as`: owned by the agent,
/// group `run_as.gid`, mode `1770`. An agent that may give files away
/// (`me.can_chown()`, root) also gives `run_as` everything in it but its
/// own `keep` files (so a directory an earlier configuration left to the
/// agent is usable); otherwise what is there stays as it is.
pub fn prepare_dir(
    dir: &Path,
    run_as: &RunAs,
    keep: &[&str],
    me: &Privileges,
) -> Result<(), std::io::Error> {
    std::fs::create_dir_all(dir)?;
    std::os::unix::fs::chown(dir, Some(me.euid), Some(run_as.gid))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1770))?;
    if !me.can_chown() {
        return Ok(());
    }
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

    fn privileges(euid: u32, caps: CapabilitySet, groups: &[u32]) -> Privileges {
        Privileges {
            euid,
            caps,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn a_root_agent_needs_a_user_and_a_plain_one_runs_node_red_as_itself() {
        let root = privileges(0, CapabilitySet::all(), &[0]);
        assert!(matches!(plan(None, &root), Err(NodeRedError::NoUser)));
        assert!(matches!(
            plan(Some("root"), &root),
            Err(NodeRedError::RootUser(_))
        ));
        assert!(matches!(
            plan(Some("no-such-user-here"), &root),
            Err(NodeRedError::NoSuchUser(_))
        ));
        let plain = privileges(1000, CapabilitySet::empty(), &[1000]);
        assert_eq!(plan(None, &plain).unwrap(), None);
        assert!(is_user_name("tether-nodered") && !is_user_name("-x") && !is_user_name("a b"));
    }

    #[test]
    fn the_switch_is_decided_by_capabilities_and_group_not_by_uid() {
        let dir = tempfile::tempdir().unwrap();
        let (passwd, group) = (dir.path().join("passwd"), dir.path().join("group"));
        std::fs::write(
            &passwd,
            "root:x:0:0::/root:/bin/sh\ntether:x:990:990::/nonexistent:/usr/sbin/nologin\nnodered:x:998:997::/nonexistent:/usr/sbin/nologin\n",
        )
        .unwrap();
        std::fs::write(&group, "root:x:0:\ntether:x:990:\nnodered:x:997:tether\n").unwrap();
        let plan = |me: &Privileges| plan_in(&passwd, &group, Some("nodered"), me);
        let nodered = RunAs {
            name: "nodered".into(),
            uid: 998,
            gid: 997,
        };
        // Root: everything, no group needed.
        let root = privileges(0, CapabilitySet::all(), &[0]);
        assert_eq!(plan(&root).unwrap(), Some(nodered.clone()));
        // The packaged service: a plain user with the three capabilities,
        // in Node-RED's group.
        let service = privileges(990, SWITCH_CAPS, &[990, 997]);
        assert_eq!(plan(&service).unwrap(), Some(nodered.clone()));
        // Without one of them: refused, naming what is missing.
        let no_kill = privileges(
            990,
            SWITCH_CAPS.difference(CapabilitySet::KILL),
            &[990, 997],
        );
        match plan(&no_kill) {
            Err(e @ NodeRedError::CannotSwitch { .. }) => {
                let text = e.to_string();
                assert!(text.contains("without CAP_KILL"), "{text}");
                assert!(text.contains("AmbientCapabilities="), "{text}");
            }
            other => panic!("{other:?}"),
        }
        let none = privileges(990, CapabilitySet::empty(), &[990, 997]);
        match plan(&none) {
            Err(e) => assert!(
                e.to_string()
                    .contains("without CAP_SETUID, CAP_SETGID, CAP_KILL"),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
        // The capabilities, but not in Node-RED's group: refused, naming it.
        let outside = privileges(990, SWITCH_CAPS, &[990]);
        match plan(&outside) {
            Err(e @ NodeRedError::NotInGroup { .. }) => {
                assert!(e.to_string().contains("SupplementaryGroups=nodered"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        // The agent is that user: it runs Node-RED as itself.
        let itself = privileges(998, CapabilitySet::empty(), &[997]);
        assert_eq!(plan(&itself).unwrap(), None);
        assert_eq!(group_name_in(&group, 997).as_deref(), Some("nodered"));
        assert!(!service.can_chown() && root.can_chown());
        assert_eq!(service.missing(), "");
    }

    #[test]
    fn a_program_started_as_another_user_gets_no_capabilities() {
        let run_as = RunAs {
            name: "nodered".into(),
            uid: 998,
            gid: 997,
        };
        for run_as in [Some(&run_as), None] {
            let command = command_as(run_as, std::ffi::OsStr::new("node-red"));
            let args: Vec<_> = command
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            assert!(args.contains(&"--inh-caps=-all".to_string()), "{args:?}");
            assert!(
                args.contains(&"--ambient-caps=-all".to_string()),
                "{args:?}"
            );
            assert_eq!(args.last().map(String::as_str), Some("node-red"));
        }
    }
}
