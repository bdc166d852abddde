//! A cgroup v2 directory that a test creates, puts its clients in, and removes.

use std::{
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
