//! Where this kernel keeps the fields the programs read: tracepoint formats from tracefs,
//! `struct sock` members from BTF. Resolved once at start-up.

use std::{
    fs,
    path::{Path, PathBuf},
};

use synspan_shared::{
    ConnectFields, ExeFields, FdPathFields, KernelLayout, ResetFields, RetransmitFields, SetStateFields,
    SkbFields, SockFields, SockTupleFields, TaskFields, names::program,
};

use crate::btf::{Btf, BtfError, KernelBtf};

#[derive(Debug, thiserror::Error)]
pub(crate) enum LayoutError {
    #[error(
        "tracefs is not mounted (looked in /sys/kernel/tracing and /sys/kernel/debug/tracing); \
         mount it with `mount -t tracefs tracefs /sys/kernel/tracing`"
    )]
    NoTracefs,
    #[error(
        "cannot read tracefs at {}: permission denied (tracefs is mode 0700); run synspan as \
         root, or give it CAP_DAC_READ_SEARCH as well",
        .0.display()
    )]
    TracefsDenied(PathBuf),
    #[error(
        "this kernel has no tracepoint {category}:{name} ({path}: {source}); synspan needs it \
         (Linux 5.x or later with CONFIG_TRACEPOINTS)"
    )]
    MissingTracepoint {
        category: &'static str,
        name: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tracepoint {category}:{name} has no field `{field}` on this kernel")]
    MissingField {
        category: &'static str,
        name: &'static str,
        field: &'static str,
    },
}

/// The tracefs root, if mounted and readable.
pub(crate) fn tracefs_root() -> Result<PathBuf, LayoutError> {
    let mut denied = None;
    for root in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"].map(PathBuf::from) {
        match fs::metadata(root.join("events")) {
            Ok(meta) if meta.is_dir() => return Ok(root),
            Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => denied = Some(root),
            _ => {}
        }
    }
    Err(denied.map_or(LayoutError::NoTracefs, LayoutError::TracefsDenied))
}

/// Field offsets of one tracepoint, parsed from its `format` file.
pub(crate) struct TracepointFormat {
    category: &'static str,
    name: &'static str,
    fields: Vec<(String, u16)>,
}

impl TracepointFormat {
    pub(crate) fn read(
        tracefs: &Path,
        category: &'static str,
        name: &'static str,
    ) -> Result<Self, LayoutError> {
        let path = tracefs.join("events").join(category).join(name).join("format");
        let text = fs::read_to_string(&path).map_err(|source| LayoutError::MissingTracepoint {
            category,
            name,
            path,
            source,
        })?;
        Ok(Self::parse(category, name, &text))
    }

    pub(crate) fn parse(category: &'static str, name: &'static str, text: &str) -> Self {
        let fields = text
            .lines()
            .filter_map(|line| {
                // "\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;"
                let decl = line.trim().strip_prefix("field:")?;
                let (decl, rest) = decl.split_once(';')?;
                let field = decl.rsplit([' ', '*']).next()?;
                let field = field.split('[').next()?.to_string();
                let offset = rest
                    .split(';')
                    .find_map(|part| part.trim().strip_prefix("offset:"))?;
                Some((field, offset.parse().ok()?))
            })
            .collect();
        Self {
            category,
            name,
            fields,
        }
    }

    pub(crate) fn offset(&self, field: &'static str) -> Result<u16, LayoutError> {
        self.fields
            .iter()
            .find(|(name, _)| name == field)
            .map(|(_, offset)| *offset)
            .ok_or(LayoutError::MissingField {
                category: self.category,
                name: self.name,
                field,
            })
    }
}

/// The layouts, and the optional hooks this kernel cannot serve.
pub(crate) struct Resolved {
    pub(crate) layout: KernelLayout,
    /// (program name, why) for each optional hook that will not be attached.
    pub(crate) unavailable: Vec<(&'static str, String)>,
}

/// Reads every layout the programs need. Only `sock:inet_sock_set_state` is required: it
/// alone gives each attempt its start, end and tuple. The other hooks add retransmits,
/// resets and errors, and are skipped with a warning where the kernel lacks them.
/// `struct sock` offsets come from the kernel's BTF; without them the errno is inferred, not
/// read.
pub(crate) fn resolve(vmlinux: Result<&KernelBtf, &BtfError>) -> Result<Resolved, LayoutError> {
    let tracefs = tracefs_root()?;
    let set_state = TracepointFormat::read(&tracefs, "sock", "inet_sock_set_state")?;
    let mut unavailable = Vec::new();
    let retransmit = optional(&tracefs, ("tcp", "tcp_retransmit_skb"), &mut unavailable, |f| {
        Ok(RetransmitFields {
            skaddr: f.offset("skaddr")?,
            state: f.offset("state")?,
            sport: f.offset("sport")?,
            // Since the tracepoint also fires for retransmits that failed; the offset is
            // never 0, which the common fields take.
            err: f.offset("err").unwrap_or(0),
        })
    });
    let receive_reset = optional(&tracefs, ("tcp", "tcp_receive_reset"), &mut unavailable, |f| {
        Ok(ResetFields {
            skaddr: f.offset("skaddr")?,
        })
    });
    let send_reset = optional(&tracefs, ("tcp", "tcp_send_reset"), &mut unavailable, |f| {
        Ok(ResetFields {
            skaddr: f.offset("skaddr")?,
        })
    });
    let enter = optional(
        &tracefs,
        ("syscalls", program::SYS_ENTER_CONNECT),
        &mut unavailable,
        |f| Ok((f.offset("fd")?, f.offset("uservaddr")?)),
    );
    let exit = optional(
        &tracefs,
        ("syscalls", program::SYS_EXIT_CONNECT),
        &mut unavailable,
        |f| f.offset("ret"),
    );
    let btf = vmlinux
        .map_err(ToString::to_string)
        .and_then(|vmlinux| vmlinux.types().map_err(|err| err.to_string()))
        .map_err(|err| {
            tracing::warn!("no kernel BTF ({err}): errno of failed attempts is inferred, not read")
        })
        .ok();
    let sock = btf.as_ref().map(sock_fields).unwrap_or_default();
    let tuple = btf.as_ref().and_then(tuple_fields).unwrap_or_default();
    let fd_path = btf.as_ref().map(fd_path_fields).unwrap_or_default();
    let skb = btf.as_ref().and_then(skb_fields).unwrap_or_default();
    let task = btf.as_ref().and_then(task_fields).unwrap_or_default();
    let exe = btf.as_ref().and_then(exe_fields).unwrap_or_default();
    if task.fsbase == 0 {
        tracing::warn!(
            "no task_struct thread pointer offsets in kernel BTF: connect spans cannot join \
             the application's traces"
        );
    }
    if skb.known == 0 {
        unavailable.push((
            "kfree_skb",
            "no struct sk_buff header offsets in kernel BTF".into(),
        ));
    }
    if fd_path.sock_protocol == 0 {
        unavailable.push((
            program::SYS_ENTER_CONNECT,
            "cannot tell TCP sockets from others without kernel BTF".into(),
        ));
    }
    if sock.sk_err == 0 {
        unavailable.push((
            program::INET_SK_ERROR_REPORT,
            "no offset for struct sock::sk_err in kernel BTF".into(),
        ));
    }
    Ok(Resolved {
        layout: KernelLayout {
            set_state: SetStateFields {
                skaddr: set_state.offset("skaddr")?,
                oldstate: set_state.offset("oldstate")?,
                newstate: set_state.offset("newstate")?,
                sport: set_state.offset("sport")?,
                dport: set_state.offset("dport")?,
                family: set_state.offset("family")?,
                protocol: set_state.offset("protocol")?,
                saddr: set_state.offset("saddr")?,
                daddr: set_state.offset("daddr")?,
                saddr_v6: set_state.offset("saddr_v6")?,
                daddr_v6: set_state.offset("daddr_v6")?,
            },
            retransmit,
            receive_reset,
            send_reset,
            sock,
            tuple,
            connect: ConnectFields {
                fd: enter.0,
                uservaddr: enter.1,
                ret: exit,
            },
            fd_path,
            skb,
            task,
            exe,
        },
        unavailable,
    })
}

/// Reads an optional tracepoint's offsets; on failure records why and returns zeros, which
/// the loader takes as "do not attach". The program is named after its tracepoint.
fn optional<T: Default>(
    tracefs: &Path,
    (category, name): (&'static str, &'static str),
    unavailable: &mut Vec<(&'static str, String)>,
    read: impl FnOnce(&TracepointFormat) -> Result<T, LayoutError>,
) -> T {
    match TracepointFormat::read(tracefs, category, name).and_then(|f| read(&f)) {
        Ok(fields) => fields,
        Err(err) => {
            unavailable.push((name, err.to_string()));
            T::default()
        }
    }
}

/// Offsets of `struct sock` members, 0 where unknown.
pub(crate) fn sock_fields(btf: &Btf) -> SockFields {
    let offset = |member: &str| match btf.member_offset("sock", member) {
        Some(offset) => u16::try_from(offset).unwrap_or(0),
        None => {
            tracing::warn!("struct sock has no member {member} in this kernel's BTF");
            0
        }
    };
    SockFields {
        sk_err: offset("sk_err"),
        sk_err_soft: offset("sk_err_soft"),
        // struct sock starts with the named struct sock_common, __sk_common.
        skc_num: match (
            btf.member_offset("sock", "__sk_common"),
            btf.member_offset("sock_common", "skc_num"),
        ) {
            (Some(common), Some(num)) => u16::try_from(common + num).unwrap_or(0),
            _ => {
                tracing::warn!("no sock_common::skc_num in this kernel's BTF");
                0
            }
        },
    }
}

/// Where `struct sock` keeps the tuple; `None` if any member is missing or is a bitfield
/// (`sk_protocol` before 5.6).
pub(crate) fn tuple_fields(btf: &Btf) -> Option<SockTupleFields> {
    // struct sock starts with the named struct sock_common, __sk_common.
    let common = btf.member_offset("sock", "__sk_common")?;
    let offset = |member: &str| u16::try_from(common + btf.member_offset("sock_common", member)?).ok();
    Some(SockTupleFields {
        known: 1,
        family: offset("skc_family")?,
        protocol: u16::try_from(btf.member_offset("sock", "sk_protocol")?).ok()?,
        sport: u16::try_from(btf.member_offset("inet_sock", "inet_sport")?).ok()?,
        dport: offset("skc_dport")?,
        rcv_saddr: offset("skc_rcv_saddr")?,
        daddr: offset("skc_daddr")?,
        v6_rcv_saddr: offset("skc_v6_rcv_saddr")?,
        v6_daddr: offset("skc_v6_daddr")?,
        state: offset("skc_state")?,
    })
}

/// The path from a task to a socket's protocol; all zero if any step is missing, or if the
/// protocol is a bitfield (kernels before 5.6), which a plain read cannot take.
pub(crate) fn fd_path_fields(btf: &Btf) -> FdPathFields {
    let offset = |name: &str, member: &str| {
        btf.member_offset(name, member)
            .and_then(|o| u16::try_from(o).ok())
    };
    let fields = || {
        Some(FdPathFields {
            task_files: offset("task_struct", "files")?,
            files_fdt: offset("files_struct", "fdt")?,
            fdtable_fd: offset("fdtable", "fd")?,
            file_private_data: offset("file", "private_data")?,
            socket_sk: offset("socket", "sk")?,
            sock_protocol: offset("sock", "sk_protocol")?,
            sock_type: offset("sock", "sk_type")?,
        })
    };
    fields().unwrap_or_default()
}

/// Where `struct sk_buff` keeps what a dropped packet's headers are read from; `None` if any
/// member is missing.
fn skb_fields(btf: &Btf) -> Option<SkbFields> {
    let offset = |member: &str| u16::try_from(btf.member_offset("sk_buff", member)?).ok();
    Some(SkbFields {
        known: 1,
        sk: offset("sk")?,
        head: offset("head")?,
        tail: offset("tail")?,
        network_header: offset("network_header")?,
        protocol: offset("protocol")?,
        skb_iif: offset("skb_iif")?,
    })
}

/// Where a task keeps its flags and its user thread pointer (`thread.fsbase`, x86-64).
fn task_fields(btf: &Btf) -> Option<TaskFields> {
    let thread = btf.member_offset("task_struct", "thread")?;
    let fsbase = btf.member_offset("thread_struct", "fsbase")?;
    Some(TaskFields {
        flags: u16::try_from(btf.member_offset("task_struct", "flags")?).ok()?,
        fsbase: u16::try_from(thread.checked_add(fsbase)?).ok()?,
    })
}

/// Where a task's executable keeps its file name: `task->mm->exe_file->f_path.dentry->d_name.name`.
fn exe_fields(btf: &Btf) -> Option<ExeFields> {
    let offset = |name: &str, member: &str| u16::try_from(btf.member_offset(name, member)?).ok();
    Some(ExeFields {
        task_mm: offset("task_struct", "mm")?,
        mm_exe_file: offset("mm_struct", "exe_file")?,
        file_dentry: offset("file", "f_path")?.checked_add(offset("path", "dentry")?)?,
        dentry_name: offset("dentry", "d_name")?.checked_add(offset("qstr", "name")?)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET_STATE: &str = "name: inet_sock_set_state
ID: 1427
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;

print fmt: \"family=%s\"";

    #[test]
    fn parses_tracefs_format() {
        let format = TracepointFormat::parse("sock", "inet_sock_set_state", SET_STATE);
        assert_eq!(format.offset("skaddr").unwrap(), 8);
        assert_eq!(format.offset("oldstate").unwrap(), 16);
        assert_eq!(format.offset("saddr_v6").unwrap(), 40);
        assert_eq!(format.offset("common_type").unwrap(), 0);
        let err = format.offset("newstate").unwrap_err().to_string();
        assert!(
            err.contains("sock:inet_sock_set_state has no field `newstate`"),
            "{err}"
        );
    }
}
