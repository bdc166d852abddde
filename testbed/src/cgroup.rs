//! A cgroup v2 directory that a test creates, puts its clients in, and removes.

use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::Context;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified`
/// on hybrid ones.
pub fn v2_root() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    mounts
        .lines()
        .find(|l| l.contains(" - cgroup2 "))
        .and_then(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .context("no cgroup2 mount")
}

pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let path = v2_root()?.join(format!(
            "synspan-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    /// A cgroup with exactly this name under the v2 root, e.g. the one a container runtime
    /// would make.
    pub fn named(name: &str) -> anyhow::Result<Self> {
        let path = v2_root()?.join(name);
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Wraps `cmd` so that it joins this cgroup before it runs.
    pub fn wrap(&self, cmd: &Command) -> Command {
        let mut wrapped = Command::new("sh");
        wrapped
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&self.path)
            .arg(cmd.get_program())
            .args(cmd.get_args());
        wrapped
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The clients have exited by now; an empty cgroup is removed with rmdir.
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A cgroup with a memory limit, removed on drop once empty. cgroup v2 (`memory.max`) where
/// the v2 tree has the memory controller; else, on hybrid hosts whose memory controller is
/// still mounted as v1, v1 (`memory.limit_in_bytes`), made inside this process's own memory
/// cgroup so that it stays under whatever limits that one has.
pub struct MemoryCgroup {
    path: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    pub fn new(tag: &str, limit_bytes: u64) -> anyhow::Result<Self> {
        let name = format!(
            "synspan-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let v2_root = v2_root()?;
        let v2 = std::fs::read_to_string(v2_root.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let path = if v2 {
            v2_root.join(name)
        } else {
            let own = std::fs::read_to_string("/proc/self/cgroup")?
                .lines()
                .find_map(|l| {
                    let (_, rest) = l.split_once(':')?;
                    let (controllers, path) = rest.split_once(':')?;
                    controllers
                        .split(',')
                        .any(|c| c == "memory")
                        .then(|| path.trim_start_matches('/').to_string())
                })
                .context("no memory controller in /proc/self/cgroup, v2 or v1")?;
            PathBuf::from("/sys/fs/cgroup/memory").join(own).join(name)
        };
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        let cgroup = Self { path, v2 };
        let limit = if v2 { "memory.max" } else { "memory.limit_in_bytes" };
        std::fs::write(cgroup.path.join(limit), limit_bytes.to_string())
            .with_context(|| format!("setting {limit} of {}", cgroup.path.display()))?;
        Ok(cgroup)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `cgroup.procs`: a pid written here moves into the cgroup.
    pub fn procs(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Processes the kernel's OOM killer killed in this cgroup.
    pub fn oom_kills(&self) -> anyhow::Result<u64> {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let text = std::fs::read_to_string(self.path.join(file))?;
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("no oom_kill in {file}: {text}"))
    }

    /// The most memory the cgroup used, in bytes (user memory, kernel memory, BPF maps).
    pub fn peak_bytes(&self) -> anyhow::Result<u64> {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        let text = std::fs::read_to_string(self.path.join(file))?;
        text.trim().parse().with_context(|| format!("{file}: {text}"))
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Makes `cmd` join the cgroup whose `cgroup.procs` is `procs` between fork and exec: the
/// program runs in it from its first instruction, under its own pid (no wrapper shell).
pub fn join_before_exec(cmd: &mut Command, procs: &Path) -> anyhow::Result<()> {
    let procs = CString::new(procs.as_os_str().as_bytes())?;
    // SAFETY: between fork and exec the closure only makes async-signal-safe syscalls (open,
    // write, close) on memory allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0": the writer itself.
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    Ok(())
}
