//! Escape tests: the real `cordon sandbox run` on the real kernel. Each attempt
//! runs as the sandboxed command and must fail with the documented error, and
//! the same attempt without the sandbox (the control) must succeed, so no test
//! passes because the attempt itself was broken.
//!
//! Attempts are small python3 programs that print `OK` or `ERR <errno name>`.
//! Tests that need root say so on stderr and skip when not root (CI runs as root).
// A test or benchmark program: a panic is its failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

use common::{is_root, Gateway, BIN};

/// python3 for the attempts: the system one when there is one (readable by
/// every uid), and the installation prefixes it needs to run.
fn python() -> &'static (PathBuf, Vec<PathBuf>) {
    static PY: OnceLock<(PathBuf, Vec<PathBuf>)> = OnceLock::new();
    PY.get_or_init(|| {
        let exe = ["/usr/bin/python3", "/usr/local/bin/python3"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("python3"));
        let out = Command::new(&exe)
            .args([
                "-c",
                "import sys; print(sys.executable); print(sys.prefix); print(sys.base_prefix)",
            ])
            .output()
            .expect("python3 is needed by the sandbox tests");
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines();
        let exe = PathBuf::from(lines.next().unwrap());
        let prefixes = lines.map(PathBuf::from).collect();
        (exe, prefixes)
    })
}

/// Wraps an attempt: prints OK, or ERR and the errno's name.
fn program(body: &str) -> String {
    let body: String = body.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "import os, sys, errno, socket, ctypes, subprocess, signal\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         def check(r):\n    if r == -1:\n        e = ctypes.get_errno()\n        raise OSError(e, os.strerror(e))\n    return r\n\
         try:\n{body}    print('OK')\n\
         except OSError as e:\n    print('ERR', errno.errorcode.get(e.errno, e.errno))\n"
    )
}

#[derive(Default)]
struct Opts {
    user: &'static str,
    /// Default: "strict" with a dedicated uid, "best-effort" with `inherit`
    /// (strict refuses an agent that shares our uid before Landlock ABI 9).
    require: &'static str,
    uid_range: Option<u32>,
    read: Vec<String>,
    exec: Vec<String>,
    connect_tcp: Vec<u16>,
    limits: &'static str,
    /// Adds `outside/ro` to `read`.
    read_only_dir: bool,
}

struct Sbx {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    work: PathBuf,
    outside: PathBuf,
    profile: PathBuf,
}

impl Sbx {
    fn new(opts: Opts) -> Sbx {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        // Other uids (the `auto` agents) must reach their workdir and binaries.
        std::fs::set_permissions(&root, PermissionsExt::from_mode(0o755)).unwrap();
        let work = root.join("work");
        let outside = root.join("outside");
        std::fs::create_dir(&work).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::set_permissions(&work, PermissionsExt::from_mode(0o777)).unwrap();
        let (_, prefixes) = python();
        let q = |v: &[String]| {
            v.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut exec: Vec<String> = ["/usr", "/bin", "/lib", "/lib64"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        exec.extend(prefixes.iter().map(|p| p.display().to_string()));
        exec.extend(opts.exec);
        let mut read = vec!["/etc".to_string(), "/proc".to_string()];
        read.extend(opts.read);
        if opts.read_only_dir {
            std::fs::create_dir(outside.join("ro")).unwrap();
            read.push(outside.join("ro").display().to_string());
        }
        let user = if opts.user.is_empty() {
            "inherit"
        } else {
            opts.user
        };
        let require = match (opts.require, user) {
            ("", "inherit") => "best-effort",
            ("", _) => "strict",
            (r, _) => r,
        };
        let range = opts
            .uid_range
            .map(|u| format!("uid_range = [{u}, {u}]\n"))
            .unwrap_or_default();
        let text = format!(
            "require = \"{require}\"\nuser = \"{user}\"\n{range}read = [{}]\nexec = [{}]\nwrite = [\"{{workdir}}\", \"{{tmp}}\", \"/dev/null\"]\n\
             [net]\nconnect_tcp = [{}]\n[env]\npass = [\"PATH\"]\nset = {{ HOME = \"{{home}}\" }}\n[limits]\n{}\n",
            q(&read),
            q(&exec),
            opts.connect_tcp
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            opts.limits,
        );
        let profile = root.join("profile.toml");
        std::fs::write(&profile, text).unwrap();
        Sbx {
            _tmp: tmp,
            root,
            work,
            outside,
            profile,
        }
    }

    fn run(&self, argv: &[&str]) -> Output {
        Command::new(BIN)
            .args(["sandbox", "run", "--profile"])
            .arg(&self.profile)
            .arg("--workdir")
            .arg(&self.work)
            .arg("--")
            .args(argv)
            .current_dir(&self.work)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `run` with extra `sandbox run` options (before `--`).
    fn run_with(&self, opts: &[&str], argv: &[&str]) -> Output {
        Command::new(BIN)
            .args(["sandbox", "run", "--profile"])
            .arg(&self.profile)
            .arg("--workdir")
            .arg(&self.work)
            .args(opts)
            .arg("--")
            .args(argv)
            .current_dir(&self.work)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn run_py(&self, body: &str) -> String {
        let py = python().0.display().to_string();
        last_line(&self.run(&[&py, "-c", &program(body)]))
    }

    /// The same attempt without the sandbox.
    fn control_py(&self, body: &str) -> String {
        let out = Command::new(&python().0)
            .args(["-c", &program(body)])
            .current_dir(&self.work)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        last_line(&out)
    }

    /// Without the sandbox, but as `uid` (root only).
    fn control_py_as(&self, uid: u32, body: &str) -> String {
        let prelude = format!("os.setgroups([]); os.setgid({uid}); os.setuid({uid})\n");
        self.control_py(&format!("{prelude}{body}"))
    }
}

fn last_line(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().last() {
        Some(l) => l.trim().to_string(),
        None => format!(
            "(no output; status {}; stderr: {})",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    skipped(&format!("{test}: needs root (CI runs as root)"));
    true
}

/// Straight to fd 2: the test harness captures `eprintln!`, and a skip must be
/// visible in the run's output.
fn skipped(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {what}");
}

/// Asserts the sandboxed attempt fails with `err` and the control succeeds.
fn assert_blocked(sbx: &Sbx, body: &str, err: &str) {
    assert_eq!(sbx.control_py(body), "OK", "control run failed: {body}");
    assert_eq!(sbx.run_py(body), format!("ERR {err}"), "sandboxed: {body}");
}

/// A process outside the sandbox, killed on drop.
struct Outsider(Child);

impl Outsider {
    fn start() -> Outsider {
        // Blocks on its stdin pipe until we drop it: no sleeping.
        Outsider(
            Command::new("/bin/cat")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Outsider {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

#[test]
fn a_plain_command_runs_and_its_status_comes_back() {
    let sbx = Sbx::new(Opts::default());
    let out = sbx.run(&["/bin/sh", "-c", "echo hello; exit 3"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert_eq!(out.status.code(), Some(3));
    let out = sbx.run(&["no-such-command-here"]);
    assert_eq!(out.status.code(), Some(127), "{out:?}");
}

#[test]
fn sandbox_blocks_reading_outside_read() {
    let sbx = Sbx::new(Opts::default());
    let secret = sbx.outside.join("secret");
    std::fs::write(&secret, "s3cret").unwrap();
    assert_blocked(&sbx, &format!("open({:?}).read()", p(&secret)), "EACCES");
    assert_blocked(
        &sbx,
        &format!("os.listdir({:?})", p(&sbx.outside)),
        "EACCES",
    );
}

#[test]
fn sandbox_blocks_writing_outside_write() {
    let sbx = Sbx::new(Opts::default());
    let target = sbx.outside.join("new");
    assert_blocked(
        &sbx,
        &format!("open({:?}, 'w').write('x')", p(&target)),
        "EACCES",
    );
    // Writing inside the workdir works.
    assert_eq!(sbx.run_py("open('inside', 'w').write('x')"), "OK");
}

#[test]
fn sandbox_blocks_writing_through_a_symlink_planted_in_the_workdir() {
    let sbx = Sbx::new(Opts::default());
    let target = sbx.outside.join("target");
    std::fs::write(&target, "original").unwrap();
    std::os::unix::fs::symlink(&target, sbx.work.join("link")).unwrap();
    // The agent plants the link itself too.
    let planted = format!(
        "os.symlink({:?}, 'mine')\nopen('mine', 'w').write('x')",
        p(&target)
    );
    assert_eq!(sbx.run_py(&planted), "ERR EACCES");
    assert_blocked(&sbx, "open('link', 'a').write('x')", "EACCES");
}

#[test]
fn a_symlink_planted_in_a_persistent_home_is_refused_on_the_next_run() {
    let sbx = Sbx::new(Opts::default());
    // HOME writable, as in the shipped profile, and a rule inside it.
    let text = std::fs::read_to_string(&sbx.profile).unwrap().replace(
        "write = [\"{workdir}\"",
        "write = [\"{home}\", \"{home}/cache\", \"{workdir}\"",
    );
    std::fs::write(&sbx.profile, text).unwrap();
    let home = sbx.root.join("home");
    let victim = sbx.outside.join("victim");
    std::fs::create_dir(&victim).unwrap();
    let home_opt = ["--home", &p(&home)];
    let py = python().0.display().to_string();
    // Run 1: the agent swaps {tmp} for a link to the victim, and plants {home}/cache.
    let plant = format!(
        "h = os.environ['HOME']\nos.rmdir(h + '/tmp')\nos.symlink({v:?}, h + '/tmp')\nos.symlink({v:?}, h + '/cache')",
        v = p(&victim)
    );
    let out = sbx.run_with(&home_opt, &[&py, "-c", &program(&plant)]);
    assert_eq!(last_line(&out), "OK", "{out:?}");
    // Control: through either link, the victim is writable unsandboxed.
    for link in ["tmp", "cache"] {
        let write = format!("open({:?}, 'w').write('x')", p(&home.join(link).join("f")));
        assert_eq!(sbx.control_py(&write), "OK");
        std::fs::remove_file(victim.join("f")).unwrap();
    }
    // Run 2: {tmp} is a symlink, so cordon refuses before anything runs.
    let write = format!("open({:?}, 'w').write('x')", p(&home.join("tmp/f")));
    let out = sbx.run_with(&home_opt, &[&py, "-c", &program(&write)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(
        stderr.contains("{tmp}") && stderr.contains("symlink"),
        "{stderr}"
    );
    // With {tmp} a real directory again, the helper refuses the rule {home}/cache.
    std::fs::remove_file(home.join("tmp")).unwrap();
    std::fs::create_dir(home.join("tmp")).unwrap();
    let write = format!("open({:?}, 'w').write('x')", p(&home.join("cache/f")));
    let out = sbx.run_with(&home_opt, &[&py, "-c", &program(&write)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(
        stderr.contains("cache") && stderr.contains("is a symlink inside"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
    // Without the planted link the same profile and home run (and system
    // symlinks such as /lib -> usr/lib in `exec` keep working).
    std::fs::remove_file(home.join("cache")).unwrap();
    let out = sbx.run_with(
        &home_opt,
        &[
            &py,
            "-c",
            &program("open(os.environ['HOME'] + '/tmp/f', 'w').write('x')"),
        ],
    );
    assert_eq!(last_line(&out), "OK", "{out:?}");
}

#[test]
fn a_workdir_of_root_or_the_callers_home_is_refused() {
    let sbx = Sbx::new(Opts::default());
    let py = python().0.display().to_string();
    // `sandbox run` without --workdir takes the current directory as {workdir}.
    let run_in = |dir: &Path, home: &Path, body: &str| {
        Command::new(BIN)
            .args(["sandbox", "run", "--profile"])
            .arg(&sbx.profile)
            .args(["--", &py, "-c", &program(body)])
            .current_dir(dir)
            .env("HOME", home)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // The caller's HOME (a stand-in, via $HOME): its dotfiles would be the agent's.
    let home = sbx.root.join("operator");
    std::fs::create_dir(&home).unwrap();
    let rc = format!("open({:?}, 'a').write('evil')", p(&home.join(".bashrc")));
    assert_eq!(sbx.control_py(&rc), "OK");
    std::fs::remove_file(home.join(".bashrc")).unwrap();
    let out = run_in(&home, &home, &rc);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(stderr.contains("your HOME"), "{stderr}");
    assert!(!home.join(".bashrc").exists());
    // "/": the whole machine.
    let file = format!("/cordon-broad-test-{}", std::process::id());
    let root_write = format!("open({file:?}, 'w').write('x')");
    if is_root() {
        assert_eq!(sbx.control_py(&root_write), "OK");
        std::fs::remove_file(&file).unwrap();
    } else {
        skipped("control of the / attempt: only root can write /");
    }
    let out = run_in(Path::new("/"), &home, &root_write);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(
        stderr.contains("root directory") && stderr.contains("--workdir"),
        "{stderr}"
    );
    assert!(!Path::new(&file).exists());
}

#[test]
fn sandbox_blocks_renaming_or_linking_a_file_out_of_the_workdir() {
    let sbx = Sbx::new(Opts::default());
    std::fs::write(sbx.work.join("f"), "x").unwrap();
    let dest = p(&sbx.outside.join("f"));
    // Sandboxed first here: the control's link would make the destination exist.
    let link = format!("os.link('f', {dest:?})");
    assert_eq!(sbx.run_py(&link), "ERR EACCES");
    let rename = format!("os.rename('f', {dest:?})");
    assert_eq!(sbx.run_py(&rename), "ERR EACCES");
    assert!(sbx.work.join("f").exists());
    assert_eq!(sbx.control_py(&link), "OK");
    std::fs::remove_file(&dest).unwrap();
    assert_eq!(sbx.control_py(&rename), "OK");
}

#[test]
fn sandbox_blocks_truncating_a_read_only_file() {
    let sbx = Sbx::new(Opts {
        read_only_dir: true,
        ..Default::default()
    });
    let file = sbx.outside.join("ro/data");
    std::fs::write(&file, "keep me").unwrap();
    // Readable (so a rule applies to it), but neither writable nor truncatable.
    assert_eq!(sbx.run_py(&format!("open({:?}).read()", p(&file))), "OK");
    let trunc = format!("os.truncate({:?}, 0)", p(&file));
    let otrunc = format!(
        "os.close(os.open({:?}, os.O_RDONLY | os.O_TRUNC))",
        p(&file)
    );
    let write = format!("open({:?}, 'r+').write('x')", p(&file));
    assert_eq!(sbx.run_py(&trunc), "ERR EACCES");
    assert_eq!(sbx.run_py(&otrunc), "ERR EACCES");
    assert_eq!(sbx.run_py(&write), "ERR EACCES");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    assert_eq!(sbx.control_py(&trunc), "OK");
}

#[test]
fn sandbox_blocks_executing_outside_exec() {
    let sbx = Sbx::new(Opts::default());
    // In the workdir: writable, but not executable.
    std::fs::copy("/bin/true", sbx.work.join("mytrue")).unwrap();
    let run = format!("subprocess.run([{:?}])", p(&sbx.work.join("mytrue")));
    assert_blocked(&sbx, &run, "EACCES");
    // And the agent cannot make its own executable either.
    let own = "import shutil\nshutil.copy('/bin/true', 'copied')\nos.chmod('copied', 0o755)\nsubprocess.run(['./copied'])";
    assert_eq!(sbx.run_py(own), "ERR EACCES");
}

#[test]
fn sandbox_blocks_tcp_to_unlisted_ports_and_any_bind() {
    let listed = TcpListener::bind("127.0.0.1:0").unwrap();
    let unlisted = TcpListener::bind("127.0.0.1:0").unwrap();
    let listed_port = listed.local_addr().unwrap().port();
    let unlisted_port = unlisted.local_addr().unwrap().port();
    let sbx = Sbx::new(Opts {
        connect_tcp: vec![listed_port],
        ..Default::default()
    });
    let connect = |port: u16| format!("socket.create_connection(('127.0.0.1', {port}))");
    assert_blocked(&sbx, &connect(unlisted_port), "EACCES");
    assert_eq!(sbx.run_py(&connect(listed_port)), "OK");
    let bind = "s = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()";
    assert_blocked(&sbx, bind, "EACCES");
    let bind6 = "s = socket.socket(socket.AF_INET6)\ns.bind(('::1', 0))";
    if sbx.control_py(bind6) == "OK" {
        assert_eq!(sbx.run_py(bind6), "ERR EACCES");
    }
}

#[test]
fn sandbox_blocks_tcp_that_bypasses_the_connect_hook() {
    let unlisted = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = unlisted.local_addr().unwrap().port();
    let sbx = Sbx::new(Opts::default());
    let addr = format!("('127.0.0.1', {port})");
    // MPTCP: a SOCK_STREAM Landlock's TCP port rules do not see.
    let mptcp =
        format!("s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)\ns.connect({addr})");
    if sbx.control_py(&mptcp) == "OK" {
        assert_eq!(sbx.run_py(&mptcp), "ERR EPERM");
    } else {
        skipped("control of the MPTCP attempt: this kernel has no MPTCP");
        assert_eq!(sbx.run_py(&mptcp), "ERR EPERM");
    }
    // TCP Fast Open: sendto/sendmsg with MSG_FASTOPEN connects without connect().
    let tfo_sendto = format!("s = socket.socket()\ns.sendto(b'x', 0x20000000, {addr})");
    let tfo_sendmsg = format!("s = socket.socket()\ns.sendmsg([b'x'], [], 0x20000000, {addr})");
    // TCP_FASTOPEN_CONNECT (30): connect() only records the address.
    let tfo_connect =
        format!("s = socket.socket()\ns.setsockopt(6, 30, 1)\ns.connect({addr})\ns.send(b'x')");
    for attempt in [&tfo_sendto, &tfo_sendmsg, &tfo_connect] {
        assert_blocked(&sbx, attempt, "EPERM");
    }
    // SCTP (and any protocol other than TCP/UDP): refused at socket().
    let sctp = "socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132)";
    if sbx.control_py(sctp) != "OK" {
        skipped("control of the SCTP attempt: this kernel has no SCTP");
    }
    assert_eq!(sbx.run_py(sctp), "ERR EPERM");
    let seqpacket = "socket.socket(socket.AF_INET6, socket.SOCK_SEQPACKET, 0)";
    assert_eq!(sbx.run_py(seqpacket), "ERR EPERM");
    // What stays allowed: TCP and UDP, with the type flags, and default protocols.
    let fine = "socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, 6)\n\
                socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, 17)\n\
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                s = socket.socket()\ns.setsockopt(6, 1, 1)";
    assert_eq!(sbx.run_py(fine), "OK");
}

#[test]
fn sandbox_blocks_abstract_unix_sockets_outside() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("cordon-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _listener = UnixListener::bind_addr(&addr).unwrap();
    let sbx = Sbx::new(Opts::default());
    let connect = format!("s = socket.socket(socket.AF_UNIX)\ns.connect('\\0{name}')");
    assert_blocked(&sbx, &connect, "EPERM");
}

#[test]
fn sandbox_blocks_connecting_to_another_agents_socket() {
    if skip_unless_root("sandbox_blocks_connecting_to_another_agents_socket") {
        return;
    }
    let gw = Gateway::start_with("", "[agents.other]\nrole = \"coder\"\nuid = 62001\n");
    let sock = gw.socket("other");
    let sbx = Sbx::new(Opts {
        user: "auto",
        uid_range: Some(62002),
        read: vec![p(&gw.dir)],
        ..Default::default()
    });
    let connect = format!(
        "s = socket.socket(socket.AF_UNIX)\ns.connect({:?})",
        p(&sock)
    );
    assert_blocked(&sbx, &connect, "EACCES");
    // The right uid, unsandboxed, reaches it: the directory is what stops others.
    assert_eq!(sbx.control_py_as(62001, &connect), "OK");
}

/// The kernel's Landlock ABI, as `cordon sandbox probe` reports it.
fn landlock_abi() -> i32 {
    let out = Command::new(BIN)
        .args(["sandbox", "probe"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Landlock: ABI "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no ABI in {text}"))
}

#[test]
fn strict_refuses_an_agent_sharing_our_uid_without_resolve_unix() {
    if landlock_abi() >= 9 {
        skipped("strict_refuses_an_agent_sharing_our_uid_without_resolve_unix: the kernel has RESOLVE_UNIX");
        return;
    }
    // A pathname socket of our own uid, outside every rule (the user bus, docker.sock…).
    let sbx = Sbx::new(Opts::default());
    let sock = sbx.outside.join("bus.sock");
    let _listener = UnixListener::bind(&sock).unwrap();
    let connect = format!(
        "s = socket.socket(socket.AF_UNIX)\ns.connect({:?})",
        p(&sock)
    );
    // Control: best-effort with the shared uid reaches it — the hole strict refuses.
    assert_eq!(sbx.control_py(&connect), "OK");
    assert_eq!(sbx.run_py(&connect), "OK");
    let strict = Sbx::new(Opts {
        require: "strict",
        ..Default::default()
    });
    let py = python().0.display().to_string();
    let out = strict.run(&[&py, "-c", &program(&connect)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        stderr.contains("RESOLVE_UNIX")
            && stderr.contains("ABI 9")
            && stderr.contains("user = \"auto\""),
        "{stderr}"
    );
    // The probe says the same about that profile.
    let out = Command::new(BIN)
        .args(["sandbox", "probe", "--profile"])
        .arg(&strict.profile)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("would refuse") && text.contains("RESOLVE_UNIX"),
        "{text}"
    );
}

#[test]
fn an_adhoc_run_never_takes_a_deployed_agents_uid() {
    if skip_unless_root("an_adhoc_run_never_takes_a_deployed_agents_uid") {
        return;
    }
    // The uid `sandbox run --name run` used to hash to: 61000 + FNV-1a("run")
    // % 1000, inside the deployments' default range. Give it to a deployed agent.
    let mut h: u32 = 0x811c_9dc5;
    for b in "run".bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let deployed = 61000 + h % 1000;
    let gw = Gateway::start_with(
        "",
        &format!("[agents.other]\nrole = \"coder\"\nuid = {deployed}\n"),
    );
    let sock = gw.socket("other");
    let sbx = Sbx::new(Opts {
        user: "auto",
        read: vec![p(&gw.dir)],
        ..Default::default()
    });
    let connect = format!(
        "s = socket.socket(socket.AF_UNIX)\ns.connect({:?})",
        p(&sock)
    );
    // Control: that uid, unsandboxed, reaches the deployed agent's socket.
    assert_eq!(sbx.control_py_as(deployed, &connect), "OK");
    assert_eq!(sbx.run_py(&connect), "ERR EACCES");
    let out = sbx.run(&["/usr/bin/id", "-u"]);
    let uid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!((60000..=60999).contains(&uid), "ad-hoc uid {uid}");
}

#[test]
fn sandbox_blocks_signals_to_processes_outside() {
    let target = Outsider::start();
    let sbx = Sbx::new(Opts::default());
    assert_blocked(
        &sbx,
        &format!("os.kill({}, signal.SIGCONT)", target.pid()),
        "EPERM",
    );
}

/// The uid for "same uid" attempts: the target and the sandboxed process
/// share it and it is not root, so only the sandbox (not missing capabilities,
/// not DAC) can stop them. As root: a dedicated test uid, which the sandbox
/// gets as its `auto` uid; otherwise our own uid, inherited.
const SAME_UID: u32 = 62004;

fn same_uid_sandbox() -> (Sbx, Option<u32>) {
    if is_root() {
        let sbx = Sbx::new(Opts {
            user: "auto",
            uid_range: Some(SAME_UID),
            ..Default::default()
        });
        (sbx, Some(SAME_UID))
    } else {
        (Sbx::new(Opts::default()), None)
    }
}

/// A process outside the sandbox running as `uid` (None: ours), with a secret
/// in its environment.
fn same_uid_target(uid: Option<u32>) -> Outsider {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("/bin/cat");
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .env("CORDON_TEST_SECRET", "s3cret");
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    Outsider(cmd.spawn().unwrap())
}

/// The attempt fails sandboxed and succeeds unsandboxed as the same uid.
fn assert_blocked_same_uid(sbx: &Sbx, uid: Option<u32>, body: &str, err: &str) {
    let control = match uid {
        Some(uid) => sbx.control_py_as(uid, body),
        None => sbx.control_py(body),
    };
    assert_eq!(
        control, "OK",
        "control run (same uid, unsandboxed) failed: {body}"
    );
    assert_eq!(sbx.run_py(body), format!("ERR {err}"), "sandboxed: {body}");
}

#[test]
fn sandbox_blocks_ptrace_of_processes_outside() {
    let (sbx, uid) = same_uid_sandbox();
    let target = same_uid_target(uid);
    // PTRACE_SEIZE attaches without stopping the target; the tracer's exit detaches.
    let seize = format!(
        "libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]\ncheck(libc.ptrace(0x4206, {}, None, None))",
        target.pid()
    );
    assert_blocked_same_uid(&sbx, uid, &seize, "EPERM");
    let vm_read = format!(
        "buf = ctypes.create_string_buffer(8)\n\
         class iov(ctypes.Structure):\n    _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]\n\
         local = iov(ctypes.cast(buf, ctypes.c_void_p), 8)\nremote = iov(0x400000, 8)\n\
         r = libc.process_vm_readv({}, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)\n\
         if r == -1 and ctypes.get_errno() != errno.EFAULT:\n    check(r)",
        target.pid()
    );
    assert_blocked_same_uid(&sbx, uid, &vm_read, "EPERM");
}

#[test]
fn sandbox_blocks_reading_a_same_uid_processes_environ_and_the_gateways_store() {
    let (sbx, uid) = same_uid_sandbox();
    let target = same_uid_target(uid);
    let environ = format!(
        "assert b'CORDON_TEST_SECRET=s3cret' in open('/proc/{}/environ', 'rb').read()",
        target.pid()
    );
    assert_blocked_same_uid(&sbx, uid, &environ, "EACCES");
    let gw = Gateway::start();
    let sbx = Sbx::new(Opts::default());
    let store = gw.dir.join("state/store");
    assert_blocked(&sbx, &format!("os.listdir({:?})", p(&store)), "EACCES");
    assert_blocked(
        &sbx,
        &format!("open({:?}, 'rb').read(16)", p(&store.join("data.mdb"))),
        "EACCES",
    );
}

#[test]
fn sandbox_blocks_new_user_namespaces() {
    let sbx = Sbx::new(Opts::default());
    let unshare = "check(libc.unshare(0x10000000))"; // CLONE_NEWUSER
    if sbx.control_py(unshare) != "OK" {
        skipped("control of sandbox_blocks_new_user_namespaces: this machine forbids unprivileged user namespaces");
        assert_eq!(sbx.run_py(unshare), "ERR EPERM");
        return;
    }
    assert_blocked(&sbx, unshare, "EPERM");
    // clone(CLONE_NEWUSER) is the same thing by another name (56: x86_64's clone).
    if cfg!(target_arch = "x86_64") {
        let clone = "r = check(libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0))\nif r == 0:\n    os._exit(0)\nos.waitpid(r, 0)";
        assert_blocked(&sbx, clone, "EPERM");
    }
}

#[test]
fn sandbox_blocks_mount() {
    if skip_unless_root("sandbox_blocks_mount") {
        return;
    }
    let sbx = Sbx::new(Opts::default());
    let target = sbx.work.join("mnt");
    std::fs::create_dir(&target).unwrap();
    let mount = format!(
        "t = {:?}.encode()\ncheck(libc.mount(b'none', t, b'tmpfs', 0, None))\ncheck(libc.umount2(t, 0))",
        p(&target)
    );
    assert_blocked(&sbx, &mount, "EPERM");
}

#[test]
fn sandbox_blocks_io_uring() {
    let sbx = Sbx::new(Opts::default());
    let setup = "params = ctypes.create_string_buffer(120)\nfd = check(libc.syscall(425, 4, params))\nos.close(fd)";
    if sbx.control_py(setup) != "OK" {
        skipped("control of sandbox_blocks_io_uring: io_uring is disabled on this machine");
    } else {
        assert_blocked(&sbx, setup, "EPERM");
    }
    assert_eq!(sbx.run_py(setup), "ERR EPERM");
}

#[test]
fn sandbox_blocks_socket_families_other_than_unix_and_inet() {
    let sbx = Sbx::new(Opts::default());
    // AF_NETLINK: the route socket any process may open.
    let netlink = "socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)";
    assert_blocked(&sbx, netlink, "EPERM");
    assert_eq!(sbx.run_py("socket.socket(socket.AF_UNIX)"), "OK");
}

#[test]
fn x32_system_calls_kill_the_process() {
    if !cfg!(target_arch = "x86_64") {
        skipped("x32_system_calls_kill_the_process: not x86_64");
        return;
    }
    let sbx = Sbx::new(Opts::default());
    // getpid (39) with the x32 bit: no filter rule matches that number.
    let x32 = "libc.syscall(0x40000000 | 39)";
    // Control: the call returns (a pid, or ENOSYS where x32 is disabled).
    assert_eq!(sbx.control_py(x32), "OK");
    let py = python().0.display().to_string();
    let out = sbx.run(&[&py, "-c", &program(x32)]);
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_eq!(out.status.code(), Some(128 + libc::SIGSYS), "{out:?}");
}

#[test]
fn setuid_root_binary_gains_nothing() {
    if skip_unless_root("setuid_root_binary_gains_nothing") {
        return;
    }
    let sbx = Sbx::new(Opts {
        user: "auto",
        uid_range: Some(62003),
        ..Default::default()
    });
    let dir = sbx.root.join("suid");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, PermissionsExt::from_mode(0o755)).unwrap();
    let id = dir.join("id");
    std::fs::copy("/usr/bin/id", &id).unwrap();
    std::fs::set_permissions(&id, PermissionsExt::from_mode(0o4755)).unwrap();
    let sbx = Sbx::new(Opts {
        user: "auto",
        uid_range: Some(62003),
        exec: vec![p(&dir)],
        ..Default::default()
    });
    // Control: the same uid without the sandbox gets euid 0 from the binary.
    let control = sbx.control_py_as(
        62003,
        &format!("out = subprocess.run([{:?}], capture_output=True, text=True).stdout\nassert 'euid=0' in out, out", p(&id)),
    );
    assert_eq!(control, "OK");
    let out = sbx.run(&[&p(&id)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("uid=62003"), "{text} {out:?}");
    assert!(
        !text.contains("euid="),
        "the setuid bit took effect: {text}"
    );
}

#[test]
fn status_shows_no_new_privs_no_capabilities_and_seccomp() {
    let sbx = Sbx::new(Opts::default());
    let out = sbx.run(&["/bin/cat", "/proc/self/status"]);
    let status = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .trim()
            .to_string()
    };
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2");
    for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(field(set), "0000000000000000", "{set}");
    }
    if is_root() {
        assert_eq!(field("CapBnd"), "0000000000000000");
    } else {
        skipped("CapBnd check: only root can empty the bounding set");
    }
    // Control: cordon itself runs without any of that.
    let control = std::fs::read_to_string("/proc/self/status").unwrap();
    assert!(control.contains("NoNewPrivs:\t0"), "{control}");
}

#[test]
fn root_without_cap_setpcap_refuses_instead_of_keeping_the_bounding_set() {
    if skip_unless_root("root_without_cap_setpcap_refuses_instead_of_keeping_the_bounding_set") {
        return;
    }
    if !Path::new("/usr/bin/setpriv").exists() {
        skipped("root_without_cap_setpcap_refuses_…: no setpriv");
        return;
    }
    let sbx = Sbx::new(Opts::default());
    // Root whose bounding set (and so, after execve, permitted set) lacks CAP_SETPCAP.
    let setpriv = |argv: &[&str]| {
        Command::new("/usr/bin/setpriv")
            .args(["--bounding-set", "-setpcap", "--"])
            .args(argv)
            .current_dir(&sbx.work)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let status = "/proc/self/status";
    // Control: a process started that way keeps a non-empty bounding set.
    let out = setpriv(&["/bin/grep", "CapBnd", status]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("CapBnd") && !text.contains("0000000000000000"),
        "{out:?}"
    );
    let profile = p(&sbx.profile);
    let work = p(&sbx.work);
    let args = [
        "sandbox",
        "run",
        "--profile",
        &profile,
        "--workdir",
        &work,
        "--",
    ];
    let out = setpriv(&[&[BIN][..], &args, &["/bin/grep", "CapBnd", status]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        stderr.contains("CAP_SETPCAP") && stderr.contains("bounding"),
        "{stderr}"
    );
}

#[test]
fn environment_is_the_allowlist_and_inherited_fds_are_closed() {
    let sbx = Sbx::new(Opts::default());
    let secret = sbx.root.join("fdsecret");
    std::fs::write(&secret, "s3cret").unwrap();
    // A wrapper opens a file without O_CLOEXEC, then execs cordon (or, for the
    // control, the attempt itself) with the fd inherited.
    let attempt = "os.read(9, 6)";
    let py = python().0.display().to_string();
    let wrapper = |inner: Vec<String>| {
        format!(
            "import os\nfd = os.open({:?}, os.O_RDONLY)\nos.dup2(fd, 9)\nos.execv({:?}, {:?})",
            p(&secret),
            inner[0],
            inner
        )
    };
    let direct = vec![py.clone(), "-c".into(), program(attempt)];
    let sandboxed = vec![
        BIN.to_string(),
        "sandbox".into(),
        "run".into(),
        "--profile".into(),
        p(&sbx.profile),
        "--workdir".into(),
        p(&sbx.work),
        "--".into(),
        py.clone(),
        "-c".into(),
        program(attempt),
    ];
    let run = |inner| {
        let out = Command::new(&py)
            .args(["-c", &wrapper(inner)])
            .env("CORDON_TEST_SECRET", "s3cret")
            .output()
            .unwrap();
        last_line(&out)
    };
    assert_eq!(run(direct), "OK");
    assert_eq!(run(sandboxed), "ERR EBADF");

    let out = Command::new(BIN)
        .args(["sandbox", "run", "--profile"])
        .arg(&sbx.profile)
        .args(["--workdir"])
        .arg(&sbx.work)
        .args(["--", "/usr/bin/env"])
        .env("CORDON_TEST_SECRET", "s3cret")
        .output()
        .unwrap();
    let env = String::from_utf8_lossy(&out.stdout);
    let mut names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
    names.sort();
    assert_eq!(names, ["HOME", "PATH"], "{env}");
}

#[test]
fn a_fork_bomb_stops_at_the_pids_limit() {
    if skip_unless_root("a_fork_bomb_stops_at_the_pids_limit") {
        return;
    }
    let sbx = Sbx::new(Opts {
        limits: "pids = 20",
        ..Default::default()
    });
    // Children wait on a pipe the parent closes once forking fails: no sleeps.
    let bomb = "r, w = os.pipe()\nn = 0\ntry:\n    while n < 40:\n        pid = os.fork()\n        if pid == 0:\n            os.close(w); os.read(r, 1); os._exit(0)\n        n += 1\nfinally:\n    os.close(w)\n    while True:\n        try: os.wait()\n        except ChildProcessError: break\n    print('forked', n)";
    let control = Command::new(&python().0)
        .args(["-c", &program(bomb)])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&control.stdout).contains("forked 40\nOK"),
        "{control:?}"
    );
    let py = python().0.display().to_string();
    let out = sbx.run(&[&py, "-c", &program(bomb)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("ERR EAGAIN\n"), "{text} {out:?}");
    let n: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("forked "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(n < 20, "forked {n} under pids = 20");
}

#[test]
fn a_memory_hog_is_killed_inside_its_cgroup_and_the_parent_survives() {
    if skip_unless_root("a_memory_hog_is_killed_inside_its_cgroup_and_the_parent_survives") {
        return;
    }
    let sbx = Sbx::new(Opts {
        limits: "memory = \"64MiB\"",
        ..Default::default()
    });
    let py = python().0.display().to_string();
    // 256 MiB of non-zero bytes: every page is touched.
    let hog = format!("{py} -c 'b = b\"x\" * (256 << 20); print(len(b))'");
    let control = Command::new("/bin/sh").args(["-c", &hog]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&control.stdout), "268435456\n");
    let out = sbx.run(&["/bin/sh", "-c", &format!("{hog}; echo hog exited $?")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text, "hog exited 137\n", "{out:?}");
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("memory limit"), "{stderr}");
}

#[test]
fn an_unknown_user_or_a_bad_profile_refuses_to_run() {
    let sbx = Sbx::new(Opts::default());
    std::fs::write(&sbx.profile, "user = \"no-such-user-here\"\n").unwrap();
    let out = sbx.run(&["/bin/true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-user-here"));
    std::fs::write(&sbx.profile, "read = []\n[net]\nconect_tcp = [1]\n").unwrap();
    let out = sbx.run(&["/bin/true"]);
    assert_eq!(out.status.code(), Some(125));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("conect_tcp") && stderr.contains("line 3"),
        "{stderr}"
    );
}

#[test]
fn probe_reports_the_kernel_and_the_profile() {
    let profile = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/profiles/claude-code.toml");
    let out = Command::new(BIN)
        .args(["sandbox", "probe", "--profile"])
        .arg(&profile)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Landlock: ABI"), "{text}");
    assert!(text.contains("seccomp: filter mode available"), "{text}");
    if is_root() {
        assert!(out.status.success(), "{out:?}");
        assert!(text.contains("tcp connect: 443; tcp bind: none"), "{text}");
        assert!(text.contains("verdict: would run"), "{text}");
    } else {
        // Its cgroup limits need root: strict refuses, and the probe says so.
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            text.contains("would refuse") && text.contains("root"),
            "{text}"
        );
    }
}

#[test]
fn sandbox_exec_takes_its_plan_from_a_file_or_an_inherited_fd() {
    // What the orchestrator runs: `cordon sandbox-exec --plan-fd N -- cmd`.
    let sbx = Sbx::new(Opts::default());
    let plan = serde_json::json!({
        "name": "t", "require": "best-effort", "workdir": sbx.work,
        "read": ["/etc", "/proc"], "write": ["/dev/null"], "exec": ["/usr", "/bin", "/lib", "/lib64"],
        "connect_tcp": [], "bind_tcp": [], "connect_unix": [],
        "env_pass": [], "env_set": {"X": "1"},
        "limits": {"memory": null, "pids": null, "nofile": null, "cpu_weight": null},
        "cgroup": null, "user": null
    });
    let file = sbx.root.join("plan.json");
    std::fs::write(&file, plan.to_string()).unwrap();
    let script = "grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status; echo $X; cat /proc/self/environ >/dev/null; ls /root 2>&1 >/dev/null | wc -l";
    let me = std::process::id().to_string();
    let out = Command::new(BIN)
        .args(["sandbox-exec", "--parent-pid", &me, "--plan"])
        .arg(&file)
        .args(["--", "/bin/sh", "-c", script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text, "NoNewPrivs:\t1\nSeccomp:\t2\n1\n1\n", "{out:?}");
    // On an inherited fd (placed by a wrapper, as Plan::helper_command does).
    let wrapper = format!(
        "import os\nfd = os.open({:?}, os.O_RDONLY)\nif fd != 3:\n    os.dup2(fd, 3)\nos.set_inheritable(3, True)\nos.execv({BIN:?}, [{BIN:?}, 'sandbox-exec', '--parent-pid', {me:?}, '--plan-fd', '3', '--', '/bin/sh', '-c', {script:?}])",
        p(&file)
    );
    let out = Command::new(&python().0)
        .args(["-c", &wrapper])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), text, "{out:?}");
    // A plan with an unknown field is refused before anything runs.
    std::fs::write(&file, plan.to_string().replace("\"cgroup\"", "\"cgroupz\"")).unwrap();
    let out = Command::new(BIN)
        .args(["sandbox-exec", "--parent-pid", &me, "--plan"])
        .arg(&file)
        .args(["--", "/bin/true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
}

#[test]
fn sandbox_exec_exits_at_once_when_its_supervisor_is_already_gone() {
    let sbx = Sbx::new(Opts::default());
    let plan = serde_json::json!({
        "name": "t", "require": "best-effort", "workdir": sbx.work,
        "read": ["/etc"], "write": [], "exec": ["/usr", "/bin", "/lib", "/lib64"],
        "connect_tcp": [], "bind_tcp": [], "connect_unix": [],
        "env_pass": [], "env_set": {},
        "limits": {"memory": null, "pids": null, "nofile": null, "cpu_weight": null},
        "cgroup": null, "user": null
    });
    let file = sbx.root.join("plan.json");
    std::fs::write(&file, plan.to_string()).unwrap();
    // The supervisor forks, captures its pid, and exits; its child waits for
    // that (EOF on a pipe: no sleeping), then execs what it was given, now an
    // orphan re-parented to a reaper.
    let orphan = |argv: Vec<String>| {
        let wrapper = format!(
            "import os\nr, w = os.pipe()\nsupervisor = str(os.getpid())\nif os.fork() == 0:\n    os.close(w)\n    os.read(r, 1)\n    argv = [a.replace('SUPERVISOR', supervisor) for a in {argv:?}]\n    os.execv(argv[0], argv)\nos._exit(0)"
        );
        let out = Command::new(&python().0)
            .args(["-c", &wrapper])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Control: unsupervised, the orphan runs its command.
    let (stdout, _) = orphan(vec!["/bin/echo".into(), "ran".into()]);
    assert_eq!(stdout, "ran\n");
    let (stdout, stderr) = orphan(vec![
        BIN.into(),
        "sandbox-exec".into(),
        "--parent-pid".into(),
        "SUPERVISOR".into(),
        "--plan".into(),
        p(&file),
        "--".into(),
        "/bin/echo".into(),
        "ran".into(),
    ]);
    assert_eq!(stdout, "", "{stderr}");
    assert!(
        stderr.contains("exited before the sandbox was set up"),
        "{stderr}"
    );
}

#[test]
fn the_shipped_claude_code_profile_blocks_the_basics() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/profiles/claude-code.toml");
    let mut text = std::fs::read_to_string(&shipped).unwrap();
    if !is_root() {
        // Its cgroup limits need root; every other right is still enforced.
        text = text.replace("require = \"strict\"", "require = \"best-effort\"");
    }
    let sbx = Sbx::new(Opts::default());
    std::fs::write(&sbx.profile, text).unwrap();
    let secret = sbx.outside.join("secret");
    std::fs::write(&secret, "s3cret").unwrap();
    // World-writable and readable: only the sandbox can stop the attempts.
    std::fs::set_permissions(&sbx.outside, PermissionsExt::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&secret, PermissionsExt::from_mode(0o644)).unwrap();
    let local = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = local.local_addr().unwrap().port();
    // Readable by every uid, so only the sandbox can stop it.
    assert_blocked(&sbx, &format!("open({:?}).read()", p(&secret)), "EACCES");
    assert_blocked(
        &sbx,
        &format!("socket.create_connection(('127.0.0.1', {port}))"),
        "EACCES",
    );
    assert_blocked(
        &sbx,
        &format!("open({:?}, 'w')", p(&sbx.outside.join("new"))),
        "EACCES",
    );
    // What it needs works: its workdir, its HOME, /dev/null.
    assert_eq!(
        sbx.run_py("open('note', 'w').write('x')\nopen(os.environ['HOME'] + '/.claude.json', 'w').write('{}')\nopen('/dev/null', 'w').write('x')"),
        "OK"
    );
}
