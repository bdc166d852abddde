//! End to end: the user stack names the function that called libc's `connect()`, though
//! Debian's glibc has no frame pointers and its wrapper makes the syscall without a frame of
//! its own. A C client (`testbed/c/connect_caller.c`) is built here with the system's gcc,
//! run inside a network namespace, refused on its loopback; its span is read as the real
//! OTLP receiver got it. Needs root.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use synspan_testbed::{agent::Agent, netns::Netns, receiver::Receiver, repo_root};

const WAIT: Duration = Duration::from_secs(20);

/// The function the client calls `connect()` from.
const CALLER: &str = "synspan_c_connect_caller";

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("synspan-cstack-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds the client into `dir` as `name` with gcc and `flags`. Each name is a build of its
/// own, with its own build id: the agents of tests running at once see each other's clients.
fn build(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
    let binary = dir.join(name);
    let status = Command::new("gcc")
        .args(flags)
        .arg(format!("-DSYNSPAN_VARIANT=\"{name}\""))
        .arg("-o")
        .arg(&binary)
        .arg(repo_root().join("testbed/c/connect_caller.c"))
        .arg("-lpthread")
        .status()
        .expect("gcc is installed");
    assert!(status.success(), "gcc {flags:?}");
    binary
}

/// Runs the client to a refused port of a fresh namespace's loopback and waits for it to
/// exit; returns its pid.
fn run(ns: &Netns, binary: &Path, args: &[&str]) -> u32 {
    let child = ns
        .command(binary)
        .args(["127.0.0.1", "1"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    // ECONNREFUSED, as the client saw it.
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "111");
    pid
}

/// The span of `pid`'s attempt as the receiver got it, and its user stack, one frame a line.
fn received(receiver: &Receiver, agent: &Agent, pid: u32) -> (Value, Vec<String>) {
    let spans = receiver.wait_spans(1, WAIT, |s| s["attributes"]["process.pid"] == pid);
    assert_eq!(spans.len(), 1, "pid {pid}\nstderr:\n{}", agent.stderr());
    let span = spans.into_iter().next().unwrap();
    assert_eq!(
        span["attributes"]["synspan.outcome"], "connection_refused",
        "{span:#}"
    );
    let stack = span["attributes"]["synspan.user_stack"]
        .as_str()
        .unwrap_or_else(|| panic!("no user stack on {span:#}"))
        .lines()
        .map(str::to_owned)
        .collect();
    (span, stack)
}

/// The frame under libc's `connect` is the client's own function, in the client's file.
fn assert_caller_under_connect(stack: &[String], binary: &Path, span: &Value) {
    assert!(
        stack[0].contains("connect+0x"),
        "innermost frame is libc's connect:\n{}\n{span:#}",
        stack.join("\n")
    );
    let caller = &stack[1];
    assert!(
        caller.starts_with(&format!("{CALLER}+0x")),
        "the caller right under connect:\n{}",
        stack.join("\n")
    );
    assert!(
        caller.contains(&*binary.to_string_lossy()),
        "named in its file:\n{}",
        stack.join("\n")
    );
    assert_eq!(
        stack.iter().filter(|f| f.starts_with(CALLER)).count(),
        1,
        "no frame twice:\n{}",
        stack.join("\n")
    );
}

fn start() -> (Receiver, Agent) {
    Agent::start_exporting(&[]).expect("start synspan and its receiver")
}

/// Builds the client with `flags`, runs it single- and multi-threaded, checks that its
/// caller is right under connect in both spans, then hands each stack to `deeper`.
fn single_and_multi_threaded(tag: &str, flags: &[&str], deeper: impl Fn(bool, &[String])) {
    let (receiver, agent) = start();
    let dir = TempDir::new(tag);
    let name = format!("client-{tag}");
    let binary = build(&dir.0, &name, flags);
    let ns = Netns::new(tag).unwrap();
    for threaded in [false, true] {
        let args: &[&str] = if threaded {
            &["threaded", "hold"]
        } else {
            &["hold"]
        };
        let pid = run(&ns, &binary, args);
        let (span, stack) = received(&receiver, &agent, pid);
        assert_caller_under_connect(&stack, &binary, &span);
        assert_eq!(span["attributes"]["process.executable.name"], name.as_str());
        deeper(threaded, &stack);
    }
}

#[test]
fn the_caller_of_connect_single_and_multi_threaded() {
    // Frame pointers in the client, none in the system's libc.
    single_and_multi_threaded("fp", &["-O1", "-fno-omit-frame-pointer"], |threaded, stack| {
        // Past the caller the frame-pointer walk goes on: the thread's start or main.
        let deeper = if threaded { "attempt+0x" } else { "main+0x" };
        assert!(
            stack
                .iter()
                .skip(2)
                .any(|f| f.starts_with(deeper) || f.contains("start_thread")),
            "threaded={threaded}:\n{}",
            stack.join("\n")
        );
    });
}

/// Built without frame pointers, `-O2`: the caller is found from `.eh_frame`, and so is the
/// caller's caller, as far as the copied bytes reach.
#[test]
fn the_caller_of_connect_without_frame_pointers() {
    single_and_multi_threaded("nofp", &["-O2", "-fomit-frame-pointer"], |threaded, stack| {
        // `attempt` is inlined into main at -O2, or called from start_thread.
        let deeper = if threaded { "start_thread" } else { "main+0x" };
        assert!(
            stack[2].contains(deeper) || stack[2].starts_with("attempt+0x"),
            "threaded={threaded}: the caller's caller, from CFI too:\n{}",
            stack.join("\n")
        );
    });
}

/// Stripped of `.symtab` but keeping `.eh_frame`: the caller is still there, as an offset in
/// the binary, inside the function's range in the unstripped build.
#[test]
fn a_stripped_binary_shows_file_offsets() {
    let (receiver, agent) = start();
    let dir = TempDir::new("strip");
    let flags = ["-O2", "-fomit-frame-pointer"];
    let unstripped = build(&dir.0, "client-symbols", &flags);
    let binary = build(&dir.0, "client-stripped", &flags);
    let status = Command::new("strip")
        .arg("--strip-all")
        .arg(&binary)
        .status()
        .unwrap();
    assert!(status.success());
    let nm = Command::new("nm").arg("-S").arg(&unstripped).output().unwrap();
    let nm = String::from_utf8_lossy(&nm.stdout);
    let line = nm
        .lines()
        .find(|l| l.ends_with(CALLER))
        .expect("the caller in nm");
    let mut fields = line.split_whitespace();
    let start = u64::from_str_radix(fields.next().unwrap(), 16).unwrap();
    let size = u64::from_str_radix(fields.next().unwrap(), 16).unwrap();

    let ns = Netns::new("cstrip").unwrap();
    let pid = run(&ns, &binary, &["hold"]);
    let (span, stack) = received(&receiver, &agent, pid);
    assert!(stack[0].contains("connect+0x"), "{}\n{span:#}", stack.join("\n"));
    let place = format!("({}+0x", binary.display());
    let caller = &stack[1];
    let offset = caller
        .split_once(&place)
        .and_then(|(_, rest)| u64::from_str_radix(rest.trim_end_matches(')'), 16).ok())
        .unwrap_or_else(|| panic!("binary+0xoffset right under connect:\n{}", stack.join("\n")));
    // The linker puts this binary's code at the same offset in the file as in memory.
    assert!(
        (start..=start + size).contains(&offset),
        "{offset:#x} not in {CALLER} at {start:#x}+{size:#x}:\n{}",
        stack.join("\n")
    );
}

/// Exits at once after its refused attempt, while the agent is stopped: by the time the agent
/// reads the kernel's note of the process's first attempt, `/proc/<pid>` is gone, always. The
/// note itself carries the executable's name and the walked frames as build id and file
/// offset, which the agent resolves through the files it indexed from an earlier run of the
/// same binary (`hold`, so that it is read). The stack is named as for a process that stays.
/// Built with frame pointers in the client (not in libc): the walk then reaches the client's
/// own file, which places it in memory for the frame unwound under `connect`.
#[test]
fn a_client_that_exits_at_once() {
    let (receiver, agent) =
        Agent::start_exporting_with_env(&[], &[("SYNSPAN_LOG", "info,synspan::enrich=debug")])
            .expect("start synspan and its receiver");
    let dir = TempDir::new("exit");
    let binary = build(&dir.0, "client-exits", &["-O2", "-fno-omit-frame-pointer"]);
    let ns = Netns::new("cexit").unwrap();
    let first = run(&ns, &binary, &["hold"]);
    received(&receiver, &agent, first);
    let pid = agent.while_stopped(|| run(&ns, &binary, &[]));
    let (span, stack) = received(&receiver, &agent, pid);
    println!(
        "the exited client's attempt, as the receiver got it:\n{}",
        serde_json::to_string_pretty(&span).unwrap()
    );
    assert!(
        agent
            .stderr()
            .contains(&format!("user stack of {pid}: placed from the build ids")),
        "named from the note's build ids, not from /proc:\n{}",
        agent.stderr()
    );
    assert_eq!(span["attributes"]["process.command"], "client-exits", "{span:#}");
    assert_eq!(
        span["attributes"]["process.executable.name"], "client-exits",
        "{span:#}"
    );
    assert_caller_under_connect(&stack, &binary, &span);
}
