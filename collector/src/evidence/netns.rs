//! Code run in another network namespace: evidence is looked up in the attempt's own namespace,
//! and the agent's threads must stay in theirs.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub(crate) enum NetnsError {
    #[error("opening network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entering network namespace {path} (setns needs CAP_SYS_ADMIN): {source}")]
    Enter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting a thread to enter network namespace {path}: {source}")]
    Thread {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Runs `f` in the network namespace of the namespace file `netns` (`/proc/<pid>/ns/net`,
/// `/run/netns/<name>`), and returns what it returns.
///
/// `f` runs on a thread of its own that enters the namespace and ends with `f`, so the
/// caller's threads never change namespace; when `netns` is the calling thread's own
/// namespace, `f` runs right here and needs no privilege. What depends on the namespace is
/// fixed when it is created or opened: sockets, and files under `/proc/sys/net` (those are
/// resolved against the namespace of the thread that opens them). Blocks until `f` is done.
pub(crate) fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let err = |source| NetnsError::Open {
        path: netns.to_path_buf(),
        source,
    };
    let target = File::open(netns).map_err(err)?;
    let target_meta = target.metadata().map_err(err)?;
    if let Ok(own) = std::fs::metadata("/proc/thread-self/ns/net")
        && (own.dev(), own.ino()) == (target_meta.dev(), target_meta.ino())
    {
        return Ok(f());
    }
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("synspan-netns".into())
            .spawn_scoped(scope, || {
                // SAFETY: setns on a descriptor we hold; it moves this thread only, and the
                // thread ends when `f` returns.
                if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .map_err(|source| NetnsError::Thread {
                path: netns.to_path_buf(),
                source,
            })?;
        match thread.join() {
            Ok(result) => result.map_err(|source| NetnsError::Enter {
                path: netns.to_path_buf(),
                source,
            }),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
