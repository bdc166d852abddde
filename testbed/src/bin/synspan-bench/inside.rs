//! The benchmark's network namespace: this thread enters it, and leaves it before the
//! namespace is removed.

use std::{
    fs,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, bail};
use synspan_testbed::netns::Netns;

/// While it lives, this thread (and every child it starts) is inside the namespace.
pub(crate) struct Inside {
    home: OwnedFd,
}

impl Inside {
    pub(crate) fn enter(ns: &Netns) -> anyhow::Result<Self> {
        let home: OwnedFd = fs::File::open("/proc/thread-self/ns/net")
            .context("opening this thread's network namespace")?
            .into();
        let target = fs::File::open(Path::new("/run/netns").join(ns.name()))
            .with_context(|| format!("opening /run/netns/{}", ns.name()))?;
        // SAFETY: plain syscall on fds we own.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("entering {}: {}", ns.name(), std::io::Error::last_os_error());
        }
        Ok(Self { home })
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        // SAFETY: plain syscall; back to where this thread started. Netns::drop kills every
        // process inside the namespace, which must not include this one.
        if unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "synspan-bench: could not leave the namespace: {}; exiting",
                std::io::Error::last_os_error()
            );
            std::process::exit(1);
        }
    }
}
