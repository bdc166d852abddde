//! The identity of one attempt: the process, its service and container, and its stacks as
//! text.

use std::{fs::File, os::fd::AsRawFd, path::PathBuf, sync::Arc};

use super::process::ProcessInfo;

/// Who made an attempt and from where. Every part may be missing: the process can be gone
/// before synspan ever saw it, and stacks can be off.
#[derive(Clone, Debug, Default)]
pub(crate) struct Identity {
    pub(crate) process: Option<Arc<Process>>,
    /// One frame per line, innermost first.
    pub(crate) user_stack: Option<Arc<str>>,
    pub(crate) kernel_stack: Option<Arc<str>>,
    pub(crate) end_kernel_stack: Option<Arc<str>>,
    /// The executable's file name as the kernel recorded it, for a process gone before
    /// `/proc/<pid>` was read.
    pub(crate) exe_name: Option<Arc<str>>,
}

/// A process with what is derived from it once.
#[derive(Debug)]
pub(crate) struct Process {
    pub(crate) info: ProcessInfo,
    pub(crate) container_id: Option<String>,
    pub(crate) k8s_pod_uid: Option<String>,
    /// Its network namespace, held open: evidence is looked up there after the attempt
    /// ends, when the process (and its `/proc/<pid>/ns/net`) may be gone.
    pub(crate) netns: Option<Arc<File>>,
}

impl Process {
    /// A path that opens the process's network namespace, while synspan holds it.
    pub(crate) fn netns_path(&self) -> PathBuf {
        match &self.netns {
            Some(file) => PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())),
            None => PathBuf::from(format!("/proc/{}/ns/net", self.info.pid)),
        }
    }
}
