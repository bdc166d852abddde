//! What `/proc/<pid>` tells about the process behind an attempt.
//!
//! The pid is the one the kernel programs recorded: the pid in the initial PID namespace, also
//! for a process in a container. It names the right `/proc/<pid>` whenever synspan reads the
//! host's `/proc`, which it does when it runs in the host PID namespace (on Kubernetes,
//! `hostPID: true`); a process in another PID namespace needs nothing more.
//!
//! Every read races with the process exiting. Once it has, reads fail with `ENOENT` or
//! `ESRCH`, or, on a zombie, succeed with nothing in them; both come back as
//! [`ProcessError::Gone`] rather than as a half-empty [`ProcessInfo`].

use std::{
    ffi::OsStr,
    fs::File,
    io::{self, Read},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use super::process_context::{self, ContextError, ProcessContext};
use opentelemetry_semantic_conventions::attribute::SERVICE_NAME;

const PROC_ROOT: &str = "/proc";
/// A command line longer than this is cut: past it, it is rarely more than a list of files.
pub(crate) const MAX_COMMAND_LINE: usize = 4096;
/// The environment is read only this far: a process may carry megabytes of it.
pub(crate) const MAX_ENVIRON: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProcessError {
    #[error("process {0} has exited")]
    Gone(u32),
    #[error("reading {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {what}", path.display())]
    Malformed { path: PathBuf, what: &'static str },
}

/// What to read beyond the defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ReadOptions {
    /// The command line can carry secrets (passwords and tokens passed as arguments), so it is
    /// read only when asked for.
    pub(crate) command_line: bool,
}

/// The fields of `/proc/<pid>/stat` synspan uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stat {
    pub(crate) comm: String,
    /// `R`, `S`, `D`, `Z`...
    pub(crate) state: char,
    pub(crate) parent_pid: u32,
    /// Clock ticks after boot. With the pid, it names one process even after the pid is reused.
    pub(crate) start_time: u64,
}

impl Stat {
    /// A zombie or dead task: it has exited, only its parent has not collected it yet.
    pub(crate) fn has_exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// The service a process says it is, the way OpenTelemetry SDKs learn it. Nothing else of
/// the environment is kept: it often holds secrets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Service {
    /// `OTEL_SERVICE_NAME`, else `service.name` from `OTEL_RESOURCE_ATTRIBUTES`.
    pub(crate) name: Option<String>,
    /// `OTEL_RESOURCE_ATTRIBUTES` decoded, in order, without `service.name`: the resolved
    /// name is in `name`, so the two can go into one resource without a conflict.
    pub(crate) resource_attributes: Vec<(String, String)>,
}

/// Where a process published its context, and which version of it was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Published {
    pub(crate) addr: u64,
    pub(crate) published_at_ns: u64,
}

impl Service {
    /// The service a process published in its process context: its resource wins over the
    /// environment's, which still names the service if the context does not.
    fn published(context: &ProcessContext, environ: Service) -> Self {
        let name = context
            .resource
            .iter()
            .find(|(k, _)| k == SERVICE_NAME)
            .map(|(_, v)| v.clone())
            .or(environ.name);
        let resource_attributes = context
            .resource
            .iter()
            .filter(|(k, _)| k != SERVICE_NAME)
            .cloned()
            .collect();
        Self {
            name,
            resource_attributes,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProcessInfo {
    pub(crate) pid: u32,
    pub(crate) start_time: u64,
    pub(crate) parent_pid: u32,
    /// The task name: at most 15 bytes, and the process can change it.
    pub(crate) comm: String,
    /// As the process sees it, in its own mount namespace. `None` for a kernel thread, or when
    /// synspan may not look (no `CAP_SYS_PTRACE`).
    pub(crate) exe_path: Option<PathBuf>,
    /// The executable was deleted or replaced (an upgrade) since the process started it.
    pub(crate) exe_deleted: bool,
    /// The file name of `exe_path`, else `comm`.
    pub(crate) exe_name: String,
    /// Arguments joined by spaces, cut at [`MAX_COMMAND_LINE`] bytes; only when asked for.
    pub(crate) command_line: Option<String>,
    pub(crate) service: Service,
    /// The process context the service came from, if it came from one.
    pub(crate) published_context: Option<Published>,
    /// The network namespace, as the inode number `ip netns identify` and `lsns` show.
    pub(crate) netns_inode: Option<u64>,
    /// The path of each line of `/proc/<pid>/cgroup`, cgroup v1 and v2, without repeats.
    pub(crate) cgroup_paths: Vec<String>,
    /// The names of thread-context attributes by key index, from the process context's
    /// `threadlocal.attribute_key_map`; empty when it published none.
    pub(crate) thread_attribute_keys: Vec<String>,
}

/// Reads `/proc/<pid>/stat`.
pub(crate) fn read_stat(pid: u32) -> Result<Stat, ProcessError> {
    read_stat_from(Path::new(PROC_ROOT), pid)
}

fn read_stat_from(proc_root: &Path, pid: u32) -> Result<Stat, ProcessError> {
    let path = proc_root.join(pid.to_string()).join("stat");
    let bytes = std::fs::read(&path).map_err(|source| io_error(pid, path.clone(), source))?;
    parse_stat(&bytes).ok_or(ProcessError::Malformed {
        path,
        what: "unexpected format",
    })
}

/// Parses `/proc/<pid>/stat`. The command name sits in parentheses and may itself hold spaces
/// and parentheses, so the fields start after the last `)`.
pub(crate) fn parse_stat(bytes: &[u8]) -> Option<Stat> {
    let open = bytes.iter().position(|&b| b == b'(')?;
    let close = bytes.iter().rposition(|&b| b == b')')?;
    if close < open {
        return None;
    }
    let comm = String::from_utf8_lossy(&bytes[open + 1..close]).into_owned();
    let mut fields = std::str::from_utf8(&bytes[close + 1..])
        .ok()?
        .split_ascii_whitespace();
    // Numbered as in proc(5): the state is field 3.
    let state = fields.next()?.chars().next()?;
    let parent_pid = fields.next()?.parse().ok()?;
    let start_time = fields.nth(22 - 5)?.parse().ok()?;
    Some(Stat {
        comm,
        state,
        parent_pid,
        start_time,
    })
}

fn is_gone(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
}

fn is_denied(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EACCES | libc::EPERM))
}

fn io_error(pid: u32, path: PathBuf, source: io::Error) -> ProcessError {
    if is_gone(&source) {
        ProcessError::Gone(pid)
    } else {
        ProcessError::Io { path, source }
    }
}

/// Reads at most `limit` bytes; true when there was more.
fn read_bounded(path: &Path, limit: usize) -> io::Result<(Vec<u8>, bool)> {
    let mut bytes = Vec::new();
    File::open(path)?.take(limit as u64 + 1).read_to_end(&mut bytes)?;
    let truncated = bytes.len() > limit;
    bytes.truncate(limit);
    Ok((bytes, truncated))
}

/// Reads the parts of one `/proc/<pid>` after its `stat`.
struct Reader<'a> {
    proc_root: &'a Path,
    pid: u32,
    dir: PathBuf,
    start_time: u64,
}

impl Reader<'_> {
    /// Still the process whose `stat` was read first, and not exited.
    fn same_process_alive(&self) -> Result<bool, ProcessError> {
        match read_stat_from(self.proc_root, self.pid) {
            Ok(stat) => Ok(stat.start_time == self.start_time && !stat.has_exited()),
            Err(ProcessError::Gone(_)) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// A part that some live processes lack (a kernel thread has no executable) or that we
    /// may not be allowed to read; a missing part of an exited process means it is gone.
    fn optional<T>(
        &self,
        name: &str,
        read: impl FnOnce(PathBuf) -> io::Result<T>,
    ) -> Result<Option<T>, ProcessError> {
        let path = self.dir.join(name);
        match read(path.clone()) {
            Ok(value) => Ok(Some(value)),
            Err(err) if is_gone(&err) => {
                if self.same_process_alive()? {
                    Ok(None)
                } else {
                    Err(ProcessError::Gone(self.pid))
                }
            }
            Err(err) if is_denied(&err) => {
                tracing::debug!("not allowed to read {}: {err}", path.display());
                Ok(None)
            }
            Err(source) => Err(ProcessError::Io { path, source }),
        }
    }
}

impl ProcessInfo {
    /// Reads `/proc/<pid>`.
    pub(crate) fn read(pid: u32, options: &ReadOptions) -> Result<Self, ProcessError> {
        Self::read_from(Path::new(PROC_ROOT), pid, options)
    }

    /// Whether the process rewrote the context this was read with, or (`look_for_new`)
    /// published one since: then it is read again.
    pub(crate) fn context_changed(&self, look_for_new: bool) -> bool {
        let root = Path::new(PROC_ROOT);
        match self.published_context {
            Some(p) => !process_context::unchanged(root, self.pid, p.addr, p.published_at_ns),
            None => look_for_new && process_context::locate(root, self.pid).is_ok(),
        }
    }

    /// Reads `<proc_root>/<pid>`: tests build a `/proc` in a directory for what no real
    /// process they can start would show.
    fn read_from(proc_root: &Path, pid: u32, options: &ReadOptions) -> Result<Self, ProcessError> {
        let stat = read_stat_from(proc_root, pid)?;
        if stat.has_exited() {
            return Err(ProcessError::Gone(pid));
        }
        let reader = Reader {
            proc_root,
            pid,
            dir: proc_root.join(pid.to_string()),
            start_time: stat.start_time,
        };

        let (exe_path, exe_deleted) = match reader.optional("exe", std::fs::read_link)? {
            Some(link) => {
                let (path, deleted) = strip_deleted(link);
                (Some(path), deleted)
            }
            None => (None, false),
        };
        let exe_name = exe_path
            .as_deref()
            .and_then(Path::file_name)
            .map_or_else(|| stat.comm.clone(), |name| name.to_string_lossy().into_owned());
        let command_line = if options.command_line {
            reader
                .optional("cmdline", |path| read_bounded(&path, MAX_COMMAND_LINE))?
                .and_then(|(bytes, truncated)| command_line(&bytes, truncated))
        } else {
            None
        };
        let environ = reader
            .optional("environ", |path| read_bounded(&path, MAX_ENVIRON))?
            .map(|(bytes, truncated)| service_from_environ(&bytes, truncated))
            .unwrap_or_default();
        let context = process_context::locate(proc_root, pid)
            .and_then(|addr| Ok((addr, process_context::read_process(proc_root, pid, addr)?)));
        let mut thread_attribute_keys = Vec::new();
        let (service, published_context) = match context {
            Ok((addr, context)) => {
                thread_attribute_keys = context.thread_attribute_keys.clone();
                (
                    Service::published(&context, environ),
                    Some(Published {
                        addr,
                        published_at_ns: context.published_at_ns,
                    }),
                )
            }
            Err(ContextError::NotPublished) => (environ, None),
            Err(err) => {
                tracing::debug!(
                    "process {pid}: its process context is unusable ({err}); using its environment"
                );
                (environ, None)
            }
        };
        let netns_inode = reader
            .optional("ns/net", std::fs::read_link)?
            .and_then(|link| netns_inode(link.as_os_str()));
        let cgroup_paths = reader
            .optional("cgroup", std::fs::read)?
            .map(|bytes| cgroup_paths(&String::from_utf8_lossy(&bytes)))
            .unwrap_or_default();

        // An exiting process loses its memory before it becomes a zombie: an empty environment
        // read in that window would be taken for a process without one.
        if !reader.same_process_alive()? {
            return Err(ProcessError::Gone(pid));
        }
        Ok(Self {
            pid,
            start_time: stat.start_time,
            parent_pid: stat.parent_pid,
            comm: stat.comm,
            exe_path,
            exe_deleted,
            exe_name,
            command_line,
            service,
            published_context,
            netns_inode,
            cgroup_paths,
            thread_attribute_keys,
        })
    }
}

/// The kernel appends " (deleted)" to the link of an unlinked file.
fn strip_deleted(link: PathBuf) -> (PathBuf, bool) {
    match link.as_os_str().as_bytes().strip_suffix(b" (deleted)") {
        Some(path) => (PathBuf::from(OsStr::from_bytes(path)), true),
        None => (link, false),
    }
}

/// `net:[4026531840]` → 4026531840.
fn netns_inode(link: &OsStr) -> Option<u64> {
    link.to_str()?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Each line is `hierarchy:controllers:path`: `0::/path` on cgroup v2,
/// `4:memory:/path` or `1:name=systemd:/path` on v1.
pub(crate) fn cgroup_paths(text: &str) -> Vec<String> {
    let mut paths: Vec<String> = Vec::new();
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(_), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if !path.is_empty() && !paths.iter().any(|p| p == path) {
            paths.push(path.to_owned());
        }
    }
    paths
}

/// Arguments are NUL-terminated; a process that rewrote its title may use spaces instead.
fn command_line(bytes: &[u8], truncated: bool) -> Option<String> {
    // A process that shortened its title leaves NULs where the rest was.
    let end = bytes.iter().rposition(|&b| b != 0)? + 1;
    let bytes = &bytes[..end];
    let joined: Vec<u8> = bytes.iter().map(|&b| if b == 0 { b' ' } else { b }).collect();
    let mut line = String::from_utf8_lossy(&joined).into_owned();
    if truncated {
        line.push('…');
    }
    Some(line)
}

/// The service from a process's environment (`/proc/<pid>/environ`, NUL-separated
/// `NAME=value` entries). `truncated`: the bytes stop at the read bound, so the last entry may
/// be cut and is not used.
pub(crate) fn service_from_environ(environ: &[u8], truncated: bool) -> Service {
    let mut entries: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
    if truncated {
        entries.pop();
    }
    // getenv() returns the first of repeated variables; so do we.
    let var = |name: &[u8]| {
        entries.iter().find_map(|entry| {
            let value = entry.strip_prefix(name)?.strip_prefix(b"=")?;
            std::str::from_utf8(value).ok()
        })
    };
    let mut resource_attributes = var(b"OTEL_RESOURCE_ATTRIBUTES")
        .map(parse_resource_attributes)
        .unwrap_or_default();
    let from_attributes = resource_attributes
        .iter()
        .position(|(key, _)| key == SERVICE_NAME)
        .map(|i| resource_attributes.remove(i).1);
    // The specification: OTEL_SERVICE_NAME takes precedence over service.name in the attributes.
    let name = var(b"OTEL_SERVICE_NAME")
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .or(from_attributes.filter(|name| !name.is_empty()));
    Service {
        name,
        resource_attributes,
    }
}

/// `key1=value1,key2=value2`, W3C-baggage style: values (and keys) percent-encoded, spaces
/// around them trimmed. An entry without `=`, with an empty key or with a bad encoding is
/// skipped; of repeated keys the last wins.
pub(crate) fn parse_resource_attributes(value: &str) -> Vec<(String, String)> {
    let mut attributes: Vec<(String, String)> = Vec::new();
    for entry in value.split(',') {
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        let (Some(key), Some(value)) = (percent_decode(key.trim()), percent_decode(value.trim())) else {
            continue;
        };
        if key.is_empty() {
            continue;
        }
        match attributes.iter_mut().find(|(k, _)| *k == key) {
            Some(existing) => existing.1 = value,
            None => attributes.push((key, value)),
        }
    }
    attributes
}

/// Undoes the percent-encoding of OTEL_RESOURCE_ATTRIBUTES and OTEL_EXPORTER_OTLP_HEADERS
/// values; `None` for a malformed escape or bytes that are not UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    // percent-encoding passes a malformed escape through as text; such a value is refused, as
    // one that decodes to bytes that are not UTF-8 is.
    let well_formed = s.split('%').skip(1).all(|after| {
        after
            .as_bytes()
            .get(..2)
            .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

#[cfg(test)]
mod tests {
    use std::os::unix::{fs::MetadataExt, process::parent_id};

    use super::*;
    use crate::enrich::tests::{TempDir, running_cat};

    /// A `stat` line with every field, as the kernel writes it.
    fn stat_line(pid: u32, comm: &str, state: char, ppid: u32, start_time: u64) -> String {
        let mut fields = vec![state.to_string(), ppid.to_string()];
        // Fields 5 to 21, then 22, then the rest up to 52.
        fields.extend((5..=21).map(|n| n.to_string()));
        fields.push(start_time.to_string());
        fields.extend((23..=52).map(|n| n.to_string()));
        format!("{pid} ({comm}) {}\n", fields.join(" "))
    }

    #[test]
    fn stat_with_spaces_and_parentheses_in_comm() {
        let line = stat_line(4242, "my (odd) ) prog", 'S', 17, 987654);
        let stat = parse_stat(line.as_bytes()).unwrap();
        assert_eq!(stat.comm, "my (odd) ) prog");
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.parent_pid, 17);
        assert_eq!(stat.start_time, 987654);
        assert!(!stat.has_exited());

        let zombie = parse_stat(stat_line(1, "x", 'Z', 0, 5).as_bytes()).unwrap();
        assert!(zombie.has_exited());
    }

    #[test]
    fn malformed_stat_is_none() {
        assert_eq!(parse_stat(b""), None);
        assert_eq!(parse_stat(b"12 (no close S 1 2"), None);
        assert_eq!(parse_stat(b"12 ) backwards ( S 1"), None);
        assert_eq!(parse_stat(b"12 (short) S 1 2 3"), None);
        assert_eq!(parse_stat(b"12 (bad) S notapid 2"), None);
    }

    #[test]
    fn own_stat_matches_the_process() {
        let stat = read_stat(std::process::id()).unwrap();
        assert_eq!(stat.parent_pid, parent_id());
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(stat.comm, comm.trim_end());
        assert!(stat.start_time > 0);
    }

    #[test]
    fn reads_own_process() {
        let info = ProcessInfo::read(std::process::id(), &ReadOptions { command_line: true }).unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(info.exe_path.as_deref(), Some(exe.as_path()));
        assert!(!info.exe_deleted);
        assert_eq!(info.exe_name, exe.file_name().unwrap().to_string_lossy());
        assert_eq!(info.parent_pid, parent_id());
        let netns = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert_eq!(info.netns_inode, Some(netns));
        assert!(!info.cgroup_paths.is_empty());
        let args: Vec<String> = std::env::args().collect();
        assert_eq!(info.command_line.as_deref(), Some(args.join(" ").as_str()));
    }

    #[test]
    fn reads_a_child_and_its_service_then_sees_it_gone() {
        let mut child = running_cat(
            &["-"],
            &[
                ("OTEL_SERVICE_NAME", " checkout "),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "service.name=ignored, deployment.environment = prod%2Ceu ,team=a%3Db,bad,=x,k=%zz",
                ),
            ],
        );
        let pid = child.id();

        let info = ProcessInfo::read(pid, &ReadOptions::default()).unwrap();
        assert_eq!(info.parent_pid, std::process::id());
        assert_eq!(info.exe_name, "cat");
        assert_eq!(info.comm, "cat");
        assert_eq!(info.command_line, None, "only when asked for");
        assert_eq!(info.service.name.as_deref(), Some("checkout"));
        assert_eq!(
            info.service.resource_attributes,
            [
                ("deployment.environment".to_owned(), "prod,eu".to_owned()),
                ("team".to_owned(), "a=b".to_owned()),
            ]
        );
        let with_args = ProcessInfo::read(pid, &ReadOptions { command_line: true }).unwrap();
        assert_eq!(with_args.command_line.as_deref(), Some("cat -"));

        child.kill().unwrap();
        // Killed but not yet collected: a zombie.
        while !read_stat(pid).unwrap().has_exited() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(matches!(
            ProcessInfo::read(pid, &ReadOptions::default()),
            Err(ProcessError::Gone(p)) if p == pid
        ));
        child.wait().unwrap();
        assert!(matches!(
            ProcessInfo::read(pid, &ReadOptions::default()),
            Err(ProcessError::Gone(p)) if p == pid
        ));
        assert!(matches!(read_stat(pid), Err(ProcessError::Gone(_))));
    }

    /// A `/proc/<pid>` built in a directory: the links and files exactly as the kernel shows
    /// them, for cases a test cannot make a real process show.
    fn fake_process(root: &Path, pid: u32, comm: &str, state: char) -> PathBuf {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(dir.join("ns")).unwrap();
        std::fs::write(dir.join("stat"), stat_line(pid, comm, state, 1, 777)).unwrap();
        dir
    }

    #[test]
    fn deleted_executable_cgroups_and_namespace_from_a_fake_proc() {
        let root = TempDir::new();
        let dir = fake_process(root.path(), 99, "server (v2)", 'S');
        std::os::unix::fs::symlink("/opt/app/server (deleted)", dir.join("exe")).unwrap();
        std::os::unix::fs::symlink("net:[4026532001]", dir.join("ns/net")).unwrap();
        std::fs::write(
            dir.join("cgroup"),
            "12:pids:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n0::/docker/abc\n",
        )
        .unwrap();
        std::fs::write(dir.join("environ"), b"PATH=/bin\0OTEL_SERVICE_NAME=api\0").unwrap();
        let long: Vec<u8> = b"server\0--token\0".iter().copied().chain([b'x'; 5000]).collect();
        std::fs::write(dir.join("cmdline"), long).unwrap();

        let info = ProcessInfo::read_from(root.path(), 99, &ReadOptions { command_line: true }).unwrap();
        assert_eq!(info.comm, "server (v2)");
        assert_eq!(info.exe_path.as_deref(), Some(Path::new("/opt/app/server")));
        assert!(info.exe_deleted);
        assert_eq!(info.exe_name, "server");
        assert_eq!(info.netns_inode, Some(4026532001));
        assert_eq!(info.cgroup_paths, ["/docker/abc"]);
        assert_eq!(info.service.name.as_deref(), Some("api"));
        assert_eq!(info.start_time, 777);
        let command_line = info.command_line.unwrap();
        assert!(command_line.starts_with("server --token xxx"));
        assert!(command_line.ends_with('…'));
        assert_eq!(command_line.len(), MAX_COMMAND_LINE + '…'.len_utf8());
    }

    #[test]
    fn kernel_thread_has_no_executable() {
        let root = TempDir::new();
        fake_process(root.path(), 2, "kthreadd", 'S');
        let info = ProcessInfo::read_from(root.path(), 2, &ReadOptions { command_line: true }).unwrap();
        assert_eq!(info.exe_path, None);
        assert_eq!(info.exe_name, "kthreadd");
        assert_eq!(info.command_line, None);
        assert_eq!(info.service, Service::default());
        assert_eq!(info.netns_inode, None);
        assert!(info.cgroup_paths.is_empty());
    }

    #[test]
    fn missing_zombie_and_malformed() {
        let root = TempDir::new();
        let options = ReadOptions::default();
        assert!(matches!(
            ProcessInfo::read_from(root.path(), 5, &options),
            Err(ProcessError::Gone(5))
        ));
        fake_process(root.path(), 6, "defunct", 'Z');
        assert!(matches!(
            ProcessInfo::read_from(root.path(), 6, &options),
            Err(ProcessError::Gone(6))
        ));
        let dir = root.path().join("7");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("stat"), "7 (x").unwrap();
        let err = ProcessInfo::read_from(root.path(), 7, &options).unwrap_err();
        assert!(matches!(err, ProcessError::Malformed { .. }), "{err}");
        // A directory where a file should be: an I/O error that is not the process exiting.
        std::fs::create_dir_all(root.path().join("8/stat")).unwrap();
        let err = ProcessInfo::read_from(root.path(), 8, &options).unwrap_err();
        assert!(matches!(err, ProcessError::Io { .. }), "{err}");
    }

    #[test]
    fn cgroup_v1_and_v2_lines() {
        let v1 = "12:pids:/kubepods/pod1/abc\n11:cpu,cpuacct:/kubepods/pod1/abc\n\
                  1:name=systemd:/kubepods/pod1/abc\n0::/\n";
        assert_eq!(cgroup_paths(v1), ["/kubepods/pod1/abc", "/"]);
        assert_eq!(
            cgroup_paths("0::/system.slice/a:b.service\n"),
            ["/system.slice/a:b.service"]
        );
        assert_eq!(cgroup_paths("garbage\n\n0::\n"), Vec::<String>::new());
    }

    #[test]
    fn command_line_joins_arguments() {
        let joined = |bytes: &[u8]| command_line(bytes, false);
        assert_eq!(
            joined(b"curl\0-v\0http://x\0").as_deref(),
            Some("curl -v http://x")
        );
        // Rewritten by setproctitle().
        assert_eq!(
            joined(b"nginx: worker process\0\0\0\0").as_deref(),
            Some("nginx: worker process")
        );
        assert_eq!(joined(b""), None);
        assert_eq!(joined(b"\0\0"), None);
        assert_eq!(command_line(b"a\0b", true).as_deref(), Some("a b…"));
    }

    #[test]
    fn service_name_precedence_and_bounds() {
        let both = b"OTEL_RESOURCE_ATTRIBUTES=service.name=from-attrs,a=1\0OTEL_SERVICE_NAME=from-var\0";
        let service = service_from_environ(both, false);
        assert_eq!(service.name.as_deref(), Some("from-var"));
        assert_eq!(service.resource_attributes, [("a".to_owned(), "1".to_owned())]);

        let attrs_only = b"OTEL_RESOURCE_ATTRIBUTES=service.name=cart%20svc\0OTEL_SERVICE_NAME=\0";
        assert_eq!(
            service_from_environ(attrs_only, false).name.as_deref(),
            Some("cart svc")
        );

        let first_wins = b"OTEL_SERVICE_NAME=one\0OTEL_SERVICE_NAME=two\0";
        assert_eq!(
            service_from_environ(first_wins, false).name.as_deref(),
            Some("one")
        );

        // Cut at the read bound: the last entry is incomplete and not trusted.
        let cut = b"A=1\0OTEL_SERVICE_NAME=paym";
        assert_eq!(service_from_environ(cut, true).name, None);
        assert_eq!(service_from_environ(cut, false).name.as_deref(), Some("paym"));

        assert_eq!(service_from_environ(b"", false), Service::default());
        assert_eq!(
            service_from_environ(b"OTEL_SERVICE_NAME=\xff\0", false).name,
            None
        );
    }

    #[test]
    fn resource_attribute_parsing() {
        let parsed = |s| parse_resource_attributes(s);
        assert_eq!(
            parsed("k8s.namespace.name=shop,service.version=1.2%2C3"),
            [
                ("k8s.namespace.name".to_owned(), "shop".to_owned()),
                ("service.version".to_owned(), "1.2,3".to_owned()),
            ]
        );
        assert_eq!(parsed("a=1,a=2"), [("a".to_owned(), "2".to_owned())]);
        assert_eq!(parsed("a=x=y"), [("a".to_owned(), "x=y".to_owned())]);
        assert_eq!(
            parsed("a=,b=2"),
            [("a".to_owned(), String::new()), ("b".to_owned(), "2".to_owned())]
        );
        assert!(parsed("").is_empty());
        assert!(parsed("novalue,=empty, = ,bad=%4,bad2=%g0,bad3=%ff,bad4=%+1").is_empty());
        assert_eq!(
            parsed("  x  =  %C3%A9t%C3%A9  "),
            [("x".to_owned(), "été".to_owned())]
        );
    }
}
