//! The agent's runtime directory (`/run/lb`): control sockets and
//! instance locks. Created `0755` whatever the umask, so that no other user
//! can replace what the agent puts there.

use std::{
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::Path,
};

use anyhow::{Context as _, bail};
use log::warn;

/// The default directory of control sockets and instance locks.
pub const RUN_DIR: &str = "/run/lb";

/// Creates `dir` (and its parents) `0755` if missing. An existing
/// directory is used as it is, with a warning when any user may replace
/// files in it.
pub fn create(dir: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => bail!("{} exists and is not a directory", dir.display()),
        Ok(m) => {
            let mode = m.permissions().mode();
            if mode & 0o002 != 0 && mode & 0o1000 == 0 {
                warn!(
                    "{} is writable by every user (mode {:o}): another user could replace lb's socket or lock there",
                    dir.display(),
                    mode & 0o7777
                );
            }
            Ok(())
        }
        Err(_) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display())),
    }
}
