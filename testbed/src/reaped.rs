//! Children reaped with wait4, for what std's `Child::wait` does not give: their rusage.

use std::{
    os::unix::process::ExitStatusExt,
    process::{Child, ExitStatus},
    time::Duration,
};

use crate::wait_until;

/// What a child used over its whole life, from wait4.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// User + system CPU time, in seconds.
    pub cpu_s: f64,
    /// Peak resident set (ru_maxrss), in MiB.
    pub max_rss_mib: f64,
}

pub struct Exit {
    pub status: ExitStatus,
    pub usage: Usage,
}

/// `exit 0`, `signal 9`.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => "?".into(),
    }
}

/// A child whose pid we reap ourselves; killed (SIGKILL) and reaped on drop if still there.
pub struct Reaped {
    pid: i32,
    done: bool,
}

impl Reaped {
    /// Takes over the pid; take the child's pipes before.
    pub fn new(child: Child) -> Self {
        let pid = child.id() as i32;
        // std's Child neither kills nor waits on drop: from here on the pid is ours to reap.
        drop(child);
        Self { pid, done: false }
    }

    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// The exit, if the child has ended and was not reaped before.
    pub fn try_wait(&mut self) -> Option<Exit> {
        if self.done {
            return None;
        }
        let mut status = 0;
        // SAFETY: rusage is plain old data; all zeroes is a valid value of it.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: plain syscall on our own child, writing into locals.
        if unsafe { libc::wait4(self.pid, &mut status, libc::WNOHANG, &mut usage) } != self.pid {
            return None;
        }
        self.done = true;
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Some(Exit {
            status: ExitStatus::from_raw(status),
            usage: Usage {
                cpu_s: seconds(usage.ru_utime) + seconds(usage.ru_stime),
                max_rss_mib: usage.ru_maxrss as f64 / 1024.0,
            },
        })
    }

    pub fn wait(&mut self, limit: Duration) -> Option<Exit> {
        wait_until(limit, || self.try_wait())
    }

    pub fn signal(&self, sig: libc::c_int) {
        if !self.done {
            // SAFETY: plain syscall on our own, not yet reaped, child.
            unsafe { libc::kill(self.pid, sig) };
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if !self.done {
            // SAFETY: plain syscalls on our own, not yet reaped, child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }
}
