//! One agent per instance: an exclusive `flock` on
//! `/run/lb/<instance>.lock`, held for the agent's lifetime and naming the
//! holder's pid in the file.

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use crate::rundir;

/// Where the lock of `instance` lives.
pub fn lock_path(instance: &str) -> PathBuf {
    Path::new(rundir::RUN_DIR).join(format!("{instance}.lock"))
}

/// The instance lock; released (and its file removed) on drop.
#[derive(Debug)]
pub struct InstanceLock {
    path: PathBuf,
    file: File,
}

impl InstanceLock {
    /// Takes the lock of `instance`, or fails naming the agent holding it.
    pub fn acquire(instance: &str) -> anyhow::Result<InstanceLock> {
        Self::acquire_at(&lock_path(instance), instance)
    }

    /// [`InstanceLock::acquire`] at an explicit path.
    pub fn acquire_at(path: &Path, instance: &str) -> anyhow::Result<InstanceLock> {
        if let Some(dir) = path.parent() {
            rundir::create(dir)?;
        }
        // A holder removes the file before it unlocks: a lock taken on a
        // file that is no longer at `path` is worthless, so try again.
        for _ in 0..16 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(path)
                .with_context(|| format!("opening the instance lock {}", path.display()))?;
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return Err(e)
                        .with_context(|| format!("locking the instance lock {}", path.display()));
                }
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("pid {pid}"),
                    Err(_) => "another process".to_string(),
                };
                bail!(
                    "instance {instance:?} is already run by another lb agent ({holder}, holding {}); stop it first or run this one with another `instance`",
                    path.display()
                );
            }
            let ours = file.metadata()?;
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => {}
                _ => continue,
            }
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            writeln!(file, "{}", std::process::id())
                .with_context(|| format!("writing {}", path.display()))?;
            return Ok(InstanceLock {
                path: path.to_path_buf(),
                file,
            });
        }
        bail!(
            "{} keeps being replaced while lb takes it; is another agent starting?",
            path.display()
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        // Remove the file while still holding the lock; closing the fd
        // (dropping `file` after this) releases it.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lb-lock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_second_lock_fails_naming_the_holder_and_the_file_goes_with_the_first() {
        let dir = temp_dir("second");
        let path = dir.join("x.lock");
        let first = InstanceLock::acquire_at(&path, "x").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        let e = InstanceLock::acquire_at(&path, "x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("pid {}", std::process::id())) && e.contains("\"x\""),
            "{e}"
        );
        drop(first);
        assert!(!path.exists(), "the lock file outlived its holder");
        let again = InstanceLock::acquire_at(&path, "x").unwrap();
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_stale_file_without_a_holder_is_taken() {
        let dir = temp_dir("stale");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("y.lock");
        std::fs::write(&path, "999999999\n").unwrap();
        let lock = InstanceLock::acquire_at(&path, "y").unwrap();
        assert_eq!(
            std::fs::read_to_string(lock.path()).unwrap().trim(),
            std::process::id().to_string()
        );
        drop(lock);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
