//! Snapshots on the device (`docs/snapshots.md`): verified with
//! `tether_proto::snapshot`, staged into a folder of their own and switched
//! in atomically, the previous one kept to switch back to.
//!
//! [`Folder`] owns the snapshot folder and its journal: what is staged,
//! which version is current, and where an apply stood when the agent
//! stopped. It writes a component only after checking it against the
//! manifest, never changes a version's folder once it exists, and never
//! points `current` at anything but a whole, synced version. It does not
//! fetch snapshots, start Node-RED or judge its health: it is told to
//! stage, switch, commit and roll back, and says where things stand.

mod folder;

pub use folder::{Folder, FolderError, Journal, MAX_ATTEMPTS, Phase, Recovered, SNAPSHOT_MANIFEST};
