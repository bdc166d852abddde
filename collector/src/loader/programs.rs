//! Loading the programs into the kernel and attaching them to their hooks, then detaching
//! them.

use aya::{
    Btf,
    programs::{BtfTracePoint, Program, ProgramError, TracePoint},
};
use synspan_shared::names::program;

use super::{KernelObject, LoadError};
use crate::{btf::BtfError, kernel_layout::Resolved};

/// Optional hooks that were not attached, each with why: spans lack what it shows.
pub(crate) type Unattached = Vec<(&'static str, String)>;

/// Every optional hook, by program name, with what the spans lack on a kernel without it.
pub(crate) const OPTIONAL_HOOKS: [(&str, &str); 7] = [
    (
        program::TCP_RETRANSMIT_SKB,
        "syn_retransmit events and synspan.syn_retransmits",
    ),
    (program::TCP_RECEIVE_RESET, "rst_received events"),
    (
        program::TCP_SEND_RESET,
        "rst_sent and collision events and synspan.collision.*",
    ),
    (
        program::SYS_ENTER_CONNECT,
        "the spans of connect() calls that fail before SYN_SENT (synspan.never_started)",
    ),
    (
        program::SYS_EXIT_CONNECT,
        "the spans of connect() calls that fail before SYN_SENT, and the ICMP errors that \
         arrive while connect() holds the socket",
    ),
    (
        program::INET_SK_ERROR_REPORT,
        "icmp_error events and the errno of errors reported before the socket closed",
    ),
    (
        program::KFREE_SKB,
        "packet_dropped events and synspan.packet_drop.*",
    ),
];

/// What spans lack without optional hook `name`.
pub(crate) fn lacking(name: &str) -> &'static str {
    OPTIONAL_HOOKS
        .iter()
        .find(|(hook, _)| *hook == name)
        .map_or("what it shows", |(_, lacks)| lacks)
}

/// The tcp tracepoints that run in softirqs, as (BTF program, classic program); the BTF one
/// is named after its tracepoint, and preferred for the reason `ATTEMPT_BTF` is. Each is
/// optional: a kernel without one loses what it shows, not the attempts.
pub(super) const SOFTIRQ_TCP: [(&str, &str); 3] = [
    (program::TCP_RETRANSMIT_SKB, program::TCP_RETRANSMIT_SKB_CLASSIC),
    (program::TCP_RECEIVE_RESET, program::TCP_RECEIVE_RESET_CLASSIC),
    (program::TCP_SEND_RESET, program::TCP_SEND_RESET_CLASSIC),
];
/// Classic tracepoint programs, each named after its tracepoint: (name, category). They run
/// in the calling thread, where no other program can be running on the CPU. Each is
/// optional. The return of `connect()` before its entry, as the attempt's end before its
/// start: a call whose entry was seen must have its return seen too, or its attempt waits
/// for stacks that never come.
pub(super) const CLASSIC: [(&str, &str); 2] = [
    (program::SYS_EXIT_CONNECT, "syscalls"),
    (program::SYS_ENTER_CONNECT, "syscalls"),
];
/// Where attempts end and start, as BTF tracepoints, and as classic ones for kernels without
/// BTF (see `collector-ebpf/src/attempt.rs` for why the former are preferred). Attached in
/// this order: an attempt that started once the start was attached, and ended before the end
/// was, would stay in flight until its socket's address came back (`replaced`), as the
/// reliability tests saw once while other agents started on the host; the other way round,
/// such an attempt is not tracked at all and its end counts as `untracked_finish`.
const ATTEMPT_HOOK: &str = "inet_sock_set_state";
pub(super) const ATTEMPT_BTF: [&str; 2] = [program::ATTEMPT_END, program::ATTEMPT_START];
pub(super) const ATTEMPT_CLASSIC: [&str; 2] = [program::ATTEMPT_END_CLASSIC, program::ATTEMPT_START_CLASSIC];
/// BTF tracepoints, named after their hooks.
pub(super) const ERROR_REPORT: &str = program::INET_SK_ERROR_REPORT;
pub(super) const PACKET_DROP: &str = program::KFREE_SKB;

fn program_error(program: &'static str) -> impl Fn(ProgramError) -> LoadError {
    move |source| LoadError::Program { program, source }
}

impl KernelObject {
    /// Attaches every hook this kernel has. Returns the optional hooks it could not attach.
    /// `prefer_btf`: attach the attempt programs as BTF tracepoints where the kernel can.
    /// `drop_reasons`: attach the packet drop program.
    /// `btf`: aya's parse of the kernel's BTF, whose type ids the BTF tracepoints attach by.
    /// `pretend_missing`: optional hooks to leave out as if attaching them had failed.
    pub(crate) fn attach(
        &mut self,
        resolved: &Resolved,
        prefer_btf: bool,
        drop_reasons: bool,
        btf: Result<&Btf, &BtfError>,
        pretend_missing: &[String],
    ) -> Result<Unattached, LoadError> {
        let mut unattached = resolved.unavailable.clone();
        for (name, _) in OPTIONAL_HOOKS {
            if pretend_missing.iter().any(|n| n == name) && !unattached.iter().any(|(n, _)| *n == name) {
                unattached.push((name, "--pretend-missing".into()));
            }
        }
        let usable_btf = match &btf {
            _ if !prefer_btf => Err("--classic-tracepoints".to_string()),
            Ok(btf) if resolved.layout.tuple.known != 0 => Ok(*btf),
            Ok(_) => Err("struct sock's tuple members are not in the kernel's BTF".into()),
            Err(err) => Err(format!("no kernel BTF: {err}")),
        };
        let btf_attach = usable_btf.clone().and_then(|btf| {
            ATTEMPT_BTF
                .into_iter()
                .try_for_each(|name| self.attach_btf(name, ATTEMPT_HOOK, btf))
                .map_err(|err| err.to_string())
        });
        if let Err(why) = btf_attach {
            tracing::warn!(
                "attempts are traced with classic tracepoints ({why}): under load the kernel may \
                 skip some of them, counted as kernel_skipped_runs"
            );
            for name in ATTEMPT_BTF {
                self.unload(name);
            }
            for name in ATTEMPT_CLASSIC {
                self.attach_tracepoint(name, "sock", ATTEMPT_HOOK)?;
            }
        }
        for (name, classic) in SOFTIRQ_TCP {
            if unattached.iter().any(|(n, _)| *n == name) {
                continue;
            }
            // Where the classic event has no `err`, neither has the BTF tracepoint.
            let program = if name == program::TCP_RETRANSMIT_SKB && resolved.layout.retransmit.err == 0 {
                program::TCP_RETRANSMIT_SKB_WITHOUT_ERR
            } else {
                name
            };
            let attached = usable_btf.clone().and_then(|btf| {
                self.attach_btf(program, name, btf).map_err(|err| {
                    self.unload(program);
                    err.to_string()
                })
            });
            if let Err(why) = attached {
                // Without BTF that is the plan; with it, a program the kernel refused.
                if usable_btf.is_ok() {
                    tracing::warn!(
                        "{name} as a classic tracepoint ({why}): under load the kernel may skip \
                         it, counted as kernel_skipped_runs"
                    );
                } else {
                    tracing::debug!("{name} as a classic tracepoint: {why}");
                }
                if let Err(err) = self.attach_tracepoint(classic, "tcp", name) {
                    self.unload(classic);
                    unattached.push((name, format!("{err} (as a BTF tracepoint: {why})")));
                }
            }
        }
        for (name, category) in CLASSIC {
            if unattached.iter().any(|(n, _)| *n == name) {
                continue;
            }
            // An attempt that starts inside a `connect()` the entry saw waits for the call's
            // return to take its user stack (see `handoff` in synspan_shared): without the
            // return, the entry must not be seen either.
            if name == program::SYS_ENTER_CONNECT
                && unattached.iter().any(|(n, _)| *n == program::SYS_EXIT_CONNECT)
            {
                unattached.push((name, "sys_exit_connect is not attached".into()));
                continue;
            }
            if let Err(err) = self.attach_tracepoint(name, category, name) {
                unattached.push((name, err.to_string()));
            }
        }
        let btf_hooks = [(ERROR_REPORT, true), (PACKET_DROP, drop_reasons)];
        for (name, wanted) in btf_hooks {
            if !wanted || unattached.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let attached = btf
                .as_ref()
                .map_err(|err| format!("no kernel BTF: {err}"))
                .and_then(|btf| self.attach_btf(name, name, btf).map_err(|err| err.to_string()));
            if let Err(why) = attached {
                unattached.push((name, why));
            }
        }
        Ok(unattached)
    }

    fn attach_tracepoint(
        &mut self,
        name: &'static str,
        category: &str,
        tracepoint: &str,
    ) -> Result<(), LoadError> {
        let program: &mut TracePoint = self.program(name)?;
        program
            .load()
            .and_then(|()| program.attach(category, tracepoint).map(drop))
            .map_err(program_error(name))
    }

    fn attach_btf(&mut self, name: &'static str, function: &str, btf: &Btf) -> Result<(), LoadError> {
        let program: &mut BtfTracePoint = self.program(name)?;
        program
            .load(function, btf)
            .and_then(|()| program.attach().map(drop))
            .map_err(program_error(name))
    }

    /// Program `name` of the object, as its kind.
    fn program<'a, P>(&'a mut self, name: &'static str) -> Result<P, LoadError>
    where
        P: TryFrom<&'a mut Program, Error = ProgramError>,
    {
        self.ebpf
            .program_mut(name)
            .ok_or(LoadError::NoProgram(name))?
            .try_into()
            .map_err(program_error(name))
    }

    fn unload(&mut self, name: &str) {
        let result = match self.ebpf.program_mut(name) {
            Some(Program::TracePoint(p)) => p.unload(),
            Some(Program::BtfTracePoint(p)) => p.unload(),
            _ => Ok(()),
        };
        if let Err(err) = result {
            tracing::debug!("unloading {name}: {err}");
        }
    }

    /// Detaches every program so that no new attempt is recorded. Maps stay readable.
    ///
    /// The starts first, the return of `connect()` last (attaching had the opposite worry:
    /// ends before starts, the return before the entry). An attempt that ends inside
    /// `connect()` is counted in its series at its end and waits in flight for the call's
    /// return to take its stack; with the return detached before it (the object's programs
    /// come in no set order), it stayed in flight after being counted, and a socket that came
    /// back at that address counted it once more as `replaced`: the connect metrics then had
    /// one attempt more than the books (the metrics tests saw it, with other agents' attempts
    /// on the host).
    pub(crate) fn detach(&mut self) {
        self.recursion_misses_at_detach = Some(self.recursion_misses());
        const FIRST: [&str; 3] = [
            program::SYS_ENTER_CONNECT,
            program::ATTEMPT_START,
            program::ATTEMPT_START_CLASSIC,
        ];
        let mut names: Vec<String> = self.ebpf.programs().map(|(name, _)| name.to_string()).collect();
        names.sort_by_key(|name| match name.as_str() {
            n if FIRST.contains(&n) => 0,
            program::SYS_EXIT_CONNECT => 2,
            _ => 1,
        });
        for name in names {
            self.unload(&name);
        }
    }
}
