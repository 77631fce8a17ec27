//! One process per run directory: an OS file lock held for the run's life, so a second
//! `moe train` or `moe ablate` on the same directory is refused at once instead of
//! interleaving its checkpoints and metrics with the first's. The operating system
//! releases the lock when its holder exits, however it exits (kill -9 included), so a
//! lock is never stale.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The lock file in a run directory; it holds the PID of the process that holds it.
pub const LOCK_FILE: &str = ".lock";

/// A run directory held by this process until dropped.
#[derive(Debug)]
pub struct RunLock {
    dir: PathBuf,
    /// Whether this process created the directory (so a run that fails before writing
    /// anything of value may remove it again).
    created: bool,
    /// The open lock file: the lock lives as long as it does.
    file: File,
}

impl RunLock {
    /// Creates `dir` if needed and locks it for this process; refuses, naming the
    /// holder's PID, when another process holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let created = match std::fs::create_dir(dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => false,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        };
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "another process".to_string(),
                    pid => format!("process {pid}"),
                };
                bail!(
                    "{} is in use by {holder} (a `moe train` or `moe ablate` writing there); \
                     wait for it to end, or choose another --out",
                    dir.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            created,
            file,
        })
    }

    /// Removes the run directory if this process created it, for a run that failed to
    /// start: no empty (or config-only) run directory is left behind. Everything in it
    /// was written by this process under the lock, so nothing another run saved is lost.
    pub fn remove_if_created(self) {
        let Self { dir, created, file } = self;
        drop(file);
        if created {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
