//! Paths, environment and process helpers shared by the xtask commands.

use std::{
    env,
    ffi::{OsStr, OsString},
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// How this process can run the steps that need root (apt-get, mount, the
/// agent itself).
#[derive(Debug, Clone)]
pub enum Privilege {
    /// Effective uid is 0: run privileged commands directly.
    Root,
    /// Not root, but sudo exists: prefix privileged commands with `sudo -E`.
    Sudo { euid: u32, sudo: PathBuf },
    /// Not root and no sudo: privileged steps fail.
    Unprivileged { euid: u32 },
}

impl Privilege {
    fn detect(path: &OsStr) -> Self {
        let euid = effective_uid();
        if euid == Some(0) {
            return Privilege::Root;
        }
        let euid = euid.unwrap_or(u32::MAX);
        match find_in_path("sudo", path) {
            Some(sudo) => Privilege::Sudo { euid, sudo },
            None => Privilege::Unprivileged { euid },
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Privilege::Root => "running as root (euid 0)".to_string(),
            Privilege::Sudo { euid, sudo } => format!(
                "euid {euid}, privileged steps run through `{} -E`",
                sudo.display()
            ),
            Privilege::Unprivileged { euid } => {
                format!("euid {euid} and no sudo: steps that need root will fail")
            }
        }
    }

    pub fn can_escalate(&self) -> bool {
        !matches!(self, Privilege::Unprivileged { .. })
    }
}

/// Effective uid from /proc/self/status ("Uid: real effective saved fs"),
/// falling back to `id -u`.
fn effective_uid() -> Option<u32> {
    let from_proc = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1)?.parse().ok())
        });
    if from_proc.is_some() {
        return from_proc;
    }
    let out = Command::new("id").arg("-u").output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Everything the commands need to know about this machine and workspace.
pub struct Ctx {
    /// Workspace root (parent of xtask/).
    pub root: PathBuf,
    /// Cargo to run (`$CARGO`, else `cargo`).
    pub cargo: OsString,
    /// PATH given to every child: the caller's PATH with the cargo bin
    /// directories (where bpf-linker is installed) in front.
    pub path: OsString,
    /// `$HOME`.
    pub home: PathBuf,
    /// `$CARGO_HOME`, else `~/.cargo`.
    pub cargo_home: PathBuf,
    pub privilege: Privilege,
}

impl Ctx {
    pub fn new() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask's manifest directory has no parent")?
            .to_path_buf();
        let cargo = env::var_os("CARGO")
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "cargo".into());
        let home = env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .context("HOME is not set")?;
        let default_cargo_home = home.join(".cargo");
        let cargo_home = env::var_os("CARGO_HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| default_cargo_home.clone());

        // Cargo bin directories first, then the caller's PATH (without
        // duplicates of those directories).
        let mut dirs = vec![cargo_home.join("bin")];
        if default_cargo_home != cargo_home {
            dirs.push(default_cargo_home.join("bin"));
        }
        let old = env::var_os("PATH").unwrap_or_default();
        for dir in env::split_paths(&old) {
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        for sbin in ["/usr/local/sbin", "/usr/sbin", "/sbin"] {
            let sbin = PathBuf::from(sbin);
            if !dirs.contains(&sbin) {
                dirs.push(sbin);
            }
        }
        let path = env::join_paths(dirs).context("cannot build PATH")?;
        let privilege = Privilege::detect(&path);
        Ok(Ctx {
            root,
            cargo,
            path,
            home,
            cargo_home,
            privilege,
        })
    }

    /// A command for `program`, found in (and given) the children's PATH.
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let program = program.as_ref();
        let resolved = if Path::new(program).components().count() == 1 {
            find_in_path(program, &self.path).map(PathBuf::into_os_string)
        } else {
            None
        };
        let mut cmd = Command::new(resolved.as_deref().unwrap_or(program));
        cmd.env("PATH", &self.path);
        cmd
    }

    /// `cargo` run from the workspace root.
    pub fn cargo(&self) -> Command {
        let mut cmd = self.cmd(&self.cargo);
        cmd.current_dir(&self.root);
        cmd
    }

    /// A command that runs `program` as root: directly when root, through
    /// `sudo -E` when not root and sudo exists, else an error naming `why`.
    pub fn privileged(&self, program: impl AsRef<OsStr>, why: &str) -> Result<Command> {
        match &self.privilege {
            Privilege::Root => Ok(self.cmd(program)),
            Privilege::Sudo { sudo, .. } => {
                // sudo resets PATH (secure_path), so resolve the program here.
                let program = program.as_ref();
                let resolved = find_in_path(program, &self.path)
                    .map(PathBuf::into_os_string)
                    .unwrap_or_else(|| program.to_os_string());
                let mut cmd = self.cmd(sudo);
                cmd.arg("-E").arg(resolved);
                Ok(cmd)
            }
            Privilege::Unprivileged { euid } => bail!(
                "{why} needs root, but this process runs as uid {euid} and `sudo` is not \
                 installed: run it as root"
            ),
        }
    }

    /// Directory cargo builds into (`$CARGO_TARGET_DIR`, else `<root>/target`).
    pub fn target_dir(&self) -> PathBuf {
        match env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
            Some(dir) => self.root.join(dir),
            None => self.root.join("target"),
        }
    }
}

/// First executable file named `name` in the directories of `path`.
pub fn find_in_path(name: impl AsRef<OsStr>, path: &OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let name = name.as_ref();
    env::split_paths(path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs::metadata(candidate)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// `prog arg arg` for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` with inherited stdio; an error unless it exits with 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; an error unless it exits with 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
