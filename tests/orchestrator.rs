//! `cordon up` end to end: the real binary runs a real gateway and real agents
//! in their sandboxes; tests talk to it through its control socket
//! (`cordon status`, `cordon agent`) and read its event logs and the audit log.
// A test or benchmark program: a panic is its failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::BIN;
use rustix::process::{kill_process, test_kill_process_group, Pid, Signal};
use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

struct Deployment {
    dir: PathBuf,
    config: PathBuf,
    _tmp: tempfile::TempDir,
}

/// A sandbox for plain commands (`sh`, `sleep`): no cgroup limits, so it also
/// runs without root.
const SHELL_PROFILE: &str = "exec = [\"/bin\", \"/usr\", \"/lib\", \"/lib64\"]\nread = [\"/etc\"]\nwrite = [\"/dev/null\"]\n";

impl Deployment {
    /// `[gateway]` on a temp dir with `policy` (a policy file's text), plus `agents`.
    /// `@DIR@` in `agents` stands for the deployment's directory.
    fn new(policy: &str, agents: &str) -> Deployment {
        Deployment::with_gateway("", policy, agents)
    }

    /// As `new`, with `gateway` (lines) added to its `[gateway]` table.
    fn with_gateway(gateway: &str, policy: &str, agents: &str) -> Deployment {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let agents = agents.replace("@DIR@", &dir.display().to_string());
        // Agents with their own uid traverse it to their socket and home.
        std::fs::set_permissions(&dir, PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("policy.toml"), policy).unwrap();
        std::fs::write(dir.join("shell.toml"), SHELL_PROFILE).unwrap();
        let config = dir.join("cordon.toml");
        std::fs::write(
            &config,
            format!("[gateway]\nstore = \"state/store\"\nruntime_dir = \"state/run\"\npolicy = \"policy.toml\"\nmap_size = \"64MiB\"\n{gateway}\n{agents}"),
        )
        .unwrap();
        Deployment {
            dir,
            config,
            _tmp: tmp,
        }
    }

    fn up(&self) -> Child {
        Command::new(BIN)
            .arg("up")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(self.dir.join("up.out")).unwrap())
            .stderr(std::fs::File::create(self.dir.join("up.err")).unwrap())
            .spawn()
            .unwrap()
    }

    fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        let mut agents = String::new();
        for e in std::fs::read_dir(self.dir.join("state/run/up"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.path().is_dir() {
                let name = e.file_name().to_string_lossy().into_owned();
                agents.push_str(&format!(
                    "--- agent {name} stderr\n{}--- agent {name} events\n{}",
                    read(&format!("state/run/up/{name}/stderr.log")),
                    read(&format!("state/run/up/{name}/events.jsonl"))
                ));
            }
        }
        format!(
            "--- stdout\n{}\n--- stderr\n{}\n--- gateway\n{}\n{agents}",
            read("up.out"),
            read("up.err"),
            read("state/run/up/gateway.log")
        )
    }

    fn cordon(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap()
    }

    fn status(&self) -> Option<Value> {
        let out = self.cordon(&["status", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// The orchestrator's own status over its control socket, without the
    /// gateway's part that `cordon status` adds (a frozen gateway would
    /// make each round wait for its timeout).
    fn control_status(&self) -> Value {
        cordon::orchestrator::control::request(
            &self.dir.join("state/run/up.sock"),
            &serde_json::json!({"op": "status"}),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    fn agent(&self, status: &Value, name: &str) -> Value {
        status["agents"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Asks `cordon status` until `cond` holds. A condition poll (each round
    /// is a real request to the orchestrator), bounded so a broken build fails
    /// instead of hanging.
    fn until(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        loop {
            if let Some(s) = self.status() {
                if cond(&s) {
                    return s;
                }
                last = Some(s);
            }
            assert!(
                Instant::now() < deadline && last.as_ref().is_none_or(|s| s["ok"] == true),
                "never saw {what}; last status {last:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn events(&self, agent: &str) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join(format!("state/run/up/{agent}/events.jsonl")))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn audit(&self, args: &[&str]) -> String {
        let mut a = vec!["audit"];
        a.extend_from_slice(args);
        let out = self.cordon(&a);
        assert!(out.status.success(), "cordon audit {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn wait(child: &mut Child) -> std::process::ExitStatus {
    child.wait().unwrap()
}

/// No live process (zombies awaiting their reaper do not count) is in the
/// process group `pgid`, which the sandbox helper made the agent's own.
fn group_gone(pgid: i64) -> bool {
    if test_kill_process_group(Pid::from_raw(pgid as i32).unwrap()).is_err() {
        return true;
    }
    std::fs::read_dir("/proc").unwrap().flatten().all(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            return true;
        };
        let Some(close) = stat.rfind(')') else {
            return true;
        };
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        f.get(2) != Some(&pgid.to_string().as_str()) || f.first() == Some(&"Z")
    })
}

fn gone(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z"))
}

#[test]
fn demo_runs_end_to_end() {
    // The shipped demo, on a temp state dir.
    let text = std::fs::read_to_string(repo().join("configs/demo.toml")).unwrap();
    let agents = &text[text.find("[agents.supervisor]").unwrap()..];
    let agents = agents
        .replace(
            "workdir = \"demo\"",
            &format!("workdir = \"{}\"", repo().join("configs/demo").display()),
        )
        .replace(
            "sandbox = \"profiles/script.toml\"",
            &format!(
                "sandbox = \"{}\"",
                repo().join("configs/profiles/script.toml").display()
            ),
        );
    let policy = std::fs::read_to_string(repo().join("policies/apex.toml")).unwrap();
    let d = Deployment::new(&policy, &agents);
    let mut up = d.up();
    let status = wait(&mut up);
    assert!(status.success(), "cordon up failed: {status}\n{}", d.logs());
    let out = std::fs::read_to_string(d.dir.join("up.out")).unwrap();
    assert!(
        out.contains("supervisor: 4 of 4 tasks completed, 4 reviews"),
        "{out}"
    );
    assert!(out.contains("1 denials; all succeeded"), "{out}");

    // Every task completed, each by one of the two coders, in the store (its
    // commit and its audit record are one transaction).
    let export = d.audit(&["export"]);
    let records: Vec<Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for t in ["t1", "t2", "t3", "t4"] {
        let key = format!("/projects/demo/tasks/completed/{t}");
        let done = records.iter().any(|r| {
            r["tool"] == "kv_txn"
                && r["decision"] == "allow"
                && r["agent"].as_str().is_some_and(|a| a.starts_with("coder-"))
                && r.to_string().contains(&key)
        });
        assert!(done, "no completed {t} in the audit:\n{export}");
    }
    // The adversary's forbidden write: denied, and audited as such.
    let denied: Vec<&Value> = records.iter().filter(|r| r["decision"] == "deny").collect();
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["agent"], "adversary");
    assert!(denied[0].to_string().contains("/projects/demo/code/t1"));
    let verify = d.audit(&["verify"]);
    assert!(verify.starts_with("ok:"), "{verify}");
    // Per-agent event logs.
    let calls = d.events("coder-1").len() + d.events("coder-2").len();
    assert!(calls > 4, "coders' event logs are too short");
    // Logs are cordon's alone; agents traverse their directory, never list it.
    let mode = |p: &str| {
        std::fs::metadata(d.dir.join("state/run/up").join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("gateway.log"), 0o600);
    for a in ["supervisor", "coder-1", "coder-2", "adversary"] {
        assert_eq!(mode(a), 0o711, "{a}");
        assert_eq!(mode(&format!("{a}/events.jsonl")), 0o600, "{a}");
        assert_eq!(mode(&format!("{a}/stderr.log")), 0o600, "{a}");
    }
}

const ALLOW_ALL: &str =
    "[roles.worker]\ntools = [\"kv_*\"]\nread = [\"/**\"]\nwrite = [\"/**\"]\ndelete = [\"/**\"]\n";

#[test]
fn a_crashing_agent_is_restarted_up_to_its_cap_while_others_work_on() {
    // The worker makes 100 calls through the gateway while the crasher dies
    // and is restarted; the worker's script fails on any unexpected outcome.
    let mut script = String::new();
    for i in 0..100 {
        script.push_str(&format!(
            "[[step]]\ntool = \"kv_put\"\nargs = {{ key = \"/work/{i}\", value = {i} }}\n"
        ));
    }
    let d0 = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d0.path(), PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(d0.path().join("worker.toml"), &script).unwrap();
    std::fs::set_permissions(
        d0.path().join("worker.toml"),
        PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let agents = format!(
        "[agents.crasher]\nrole = \"worker\"\ncommand = [\"/bin/sh\", \"-c\", \"echo started; exit 3\"]\nsandbox = \"shell.toml\"\nrestart = \"on-failure\"\nbackoff = \"10ms\"\nmax_restarts = 2\nrestart_window = \"1h\"\n\n\
         [agents.worker]\nrole = \"worker\"\ncommand = \"{{cordon}} script worker.toml\"\nworkdir = \"{}\"\nsandbox = \"{}\"\n",
        d0.path().display(),
        repo().join("configs/profiles/script.toml").display()
    );
    let d = Deployment::new(ALLOW_ALL, &agents);
    let mut up = d.up();
    let status = wait(&mut up);
    // The crasher failed for good, so the deployment did not succeed.
    assert_eq!(status.code(), Some(1), "{}", d.logs());
    let out = std::fs::read_to_string(d.dir.join("up.out")).unwrap();
    let crasher = out.lines().find(|l| l.starts_with("crasher ")).unwrap();
    assert!(crasher.contains("failed (exit 3)"), "{out}");
    // First run plus exactly max_restarts restarts.
    let runs: Vec<Value> = d
        .events("crasher")
        .into_iter()
        .filter(|e| e["kind"] == "output" && e["text"] == "started")
        .collect();
    assert_eq!(runs.len(), 3, "{runs:?}\n{}", d.logs());
    assert!(crasher.split_whitespace().any(|w| w == "2"), "{crasher}");
    let err = std::fs::read_to_string(d.dir.join("up.err")).unwrap();
    assert!(err.contains("restart cap reached"), "{err}");
    // The worker saw no failed call.
    let worker = d.events("worker");
    let result = worker.iter().find(|e| e["kind"] == "result").unwrap();
    assert_eq!(result["is_error"], false, "{result}");
    assert_eq!(
        worker
            .iter()
            .filter(|e| e["kind"] == "call" && e["outcome"] == "allow")
            .count(),
        100
    );
}

#[test]
fn agent_restart_restarts_only_that_agent_and_sigterm_leaves_nothing_behind() {
    let sleeper = "command = [\"/bin/sh\", \"-c\", \"echo up; sleep 1000 & wait\"]\nsandbox = \"shell.toml\"\nrestart = \"always\"\nstop_grace = \"30s\"\n";
    let agents = format!(
        "[agents.a]\nrole = \"worker\"\n{sleeper}\n[agents.b]\nrole = \"worker\"\n{sleeper}"
    );
    let d = Deployment::new(ALLOW_ALL, &agents);
    let mut up = d.up();
    let running = |s: &Value, name: &str| {
        s["agents"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["name"] == name && a["state"] == "running" && a["pid"].is_i64())
    };
    let s = d.until("both agents running", |s| {
        running(s, "a") && running(s, "b")
    });
    let (a1, b1) = (
        d.agent(&s, "a")["pid"].clone(),
        d.agent(&s, "b")["pid"].clone(),
    );
    let gateway = s["gateway"]["pid"].as_i64().unwrap();

    let out = d.cordon(&["agent", "restart", "a"]);
    assert!(out.status.success(), "{out:?}");
    let s = d.until("a restarted", |s| {
        let a = d.agent(s, "a");
        a["restarts"] == 1 && a["state"] == "running" && a["pid"] != a1
    });
    let b = d.agent(&s, "b");
    assert_eq!(b["pid"], b1, "b was touched");
    assert_eq!(b["restarts"], 0);
    // The old a, its shell and its sleep, are all gone (the whole group).
    assert!(group_gone(a1.as_i64().unwrap()));
    let a2 = d.agent(&s, "a")["pid"].as_i64().unwrap();

    // A second `cordon up` of the same deployment refuses, touching nothing.
    let second = Command::new(BIN).arg("up").arg(&d.config).output().unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already running"),
        "{second:?}"
    );
    assert_eq!(d.agent(&d.status().unwrap(), "b")["pid"], b1);

    // An unknown agent is an error that names the agents.
    let out = d.cordon(&["agent", "stop", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("agents: a, b"));

    // Stop and start b alone: stopped is final (no restart despite "always").
    assert!(d.cordon(&["agent", "stop", "b"]).status.success());
    d.until("b stopped", |s| d.agent(s, "b")["state"] == "stopped");
    assert!(group_gone(b1.as_i64().unwrap()));
    assert!(d.cordon(&["agent", "start", "b"]).status.success());
    let s = d.until("b running again", |s| running(s, "b"));
    let b2 = d.agent(&s, "b")["pid"].as_i64().unwrap();
    assert_eq!(d.agent(&s, "a")["pid"], a2);

    kill_process(Pid::from_raw(up.id() as i32).unwrap(), Signal::TERM).unwrap();
    let status = wait(&mut up);
    assert!(status.success(), "{}", d.logs());
    for pid in [a2, b2] {
        assert!(group_gone(pid), "agent group {pid} survived\n{}", d.logs());
    }
    assert!(gone(gateway), "the gateway survived");
    assert!(!d.dir.join("state/run/up.sock").exists());
}

#[test]
fn gateway_refuses_a_process_outside_the_agents_tree_and_is_restarted_when_it_dies() {
    // The agent runs as this test's uid (user = "inherit"), so the uid check
    // alone would let this test in; the root-process check does not. Sharing
    // the uid on this kernel (no Landlock RESOLVE_UNIX before ABI 9) is only
    // allowed best-effort: that is the case this check exists for.
    let agents = "[agents.a]\nrole = \"worker\"\ncommand = [\"/bin/sh\", \"-c\", \"echo up; sleep 1000 & wait\"]\nrestart = \"never\"\n[agents.a.sandbox]\nuser = \"inherit\"\nrequire = \"best-effort\"\nexec = [\"/bin\", \"/usr\", \"/lib\", \"/lib64\"]\nwrite = [\"/dev/null\"]\n";
    let d = Deployment::new(ALLOW_ALL, agents);
    let mut up = d.up();
    d.until("a running", |s| d.agent(s, "a")["state"] == "running");
    let socket = d.dir.join("state/run/agents/a/mcp.sock");
    let mut c =
        common::Client::connect_raw(&socket).unwrap_or_else(|e| panic!("{e}: {}", d.logs()));
    let line = c.refusal();
    assert!(
        line["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not agent a's"),
        "{line}"
    );

    // The gateway dies: cordon up starts a new one and tells it the running
    // agent's root again, so the check still holds (not "not running").
    let s = d.until("the gateway", |s| s["gateway"]["pid"].is_i64());
    let gateway = s["gateway"]["pid"].as_i64().unwrap();
    kill_process(Pid::from_raw(gateway as i32).unwrap(), Signal::KILL).unwrap();
    let s = d.until("a new gateway", |s| {
        s["gateway"]["restarts"] == 1 && s["gateway"]["state"] == "running"
    });
    assert_ne!(s["gateway"]["pid"], gateway);
    assert_eq!(d.agent(&s, "a")["state"], "running");
    let mut c = common::Client::connect_raw(&socket).unwrap();
    let line = c.refusal();
    let msg = line["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("descend"), "{line}");

    kill_process(Pid::from_raw(up.id() as i32).unwrap(), Signal::TERM).unwrap();
    assert!(wait(&mut up).success(), "{}", d.logs());
    // The refusal is in the audit.
    let refused = d.audit(&[
        "query",
        "--event",
        "connection_refused",
        "--format",
        "jsonl",
    ]);
    assert!(refused.contains("descend"), "{refused}");
}

/// A sandbox sharing this test's uid (best-effort, as in the test above):
/// the case in which the uid checks alone let an agent reach the admin and
/// control sockets.
const SHARED_UID: &str = "[agents.a.sandbox]\nuser = \"inherit\"\nrequire = \"best-effort\"\nexec = [\"/bin\", \"/usr\", \"/lib\", \"/lib64\", \"{cordon}\"]\nread = [\"/etc\", \"@DIR@\"]\nwrite = [\"/dev/null\", \"{home}\"]\n";

#[test]
fn agent_root_is_accepted_only_from_the_orchestrator() {
    let agents = format!("[agents.a]\nrole = \"worker\"\ncommand = [\"/bin/sh\", \"-c\", \"echo up; sleep 1000 & wait\"]\nrestart = \"never\"\n{SHARED_UID}");
    let d = Deployment::new(ALLOW_ALL, &agents);
    let mut up = d.up();
    d.until("a running", |s| d.agent(s, "a")["state"] == "running");
    let admin = d.dir.join("state/run/admin.sock");
    // A same-uid process that cordon up did not start (as an agent sharing
    // the uid would be) tries to make this test agent a's root.
    let me = std::process::id();
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\nf=s.makefile('rw')\nfor r in ['{{\"op\":\"status\"}}','{{\"op\":\"agent_root\",\"agent\":\"a\",\"pid\":{me}}}']:\n f.write(r+'\\n'); f.flush(); print(f.readline().strip())\n"
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .arg(&admin)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let answers: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), 2, "{out:?}\n{}", d.logs());
    // Control: the same connection is served (its uid passes), so the
    // refusal below is the orchestrator check, not a failed connection.
    assert_eq!(answers[0]["ok"], true, "{text}");
    assert_eq!(answers[1]["ok"], false, "{text}");
    assert!(
        answers[1]["error"]
            .as_str()
            .unwrap()
            .contains("only the orchestrator"),
        "{text}"
    );
    // The root is unchanged: this test still cannot connect as agent a.
    let socket = d.dir.join("state/run/agents/a/mcp.sock");
    let mut c = common::Client::connect_raw(&socket).unwrap();
    let line = c.refusal();
    assert!(
        line["error"]["message"]
            .as_str()
            .unwrap()
            .contains("descend"),
        "{line}"
    );
    kill_process(Pid::from_raw(up.id() as i32).unwrap(), Signal::TERM).unwrap();
    assert!(wait(&mut up).success(), "{}", d.logs());
}

#[test]
fn the_control_socket_refuses_an_agents_processes() {
    // The agent (same uid as this test) asks cordon up for its status.
    let agents = format!("[agents.a]\nrole = \"worker\"\ncommand = [\"/bin/sh\", \"-c\", \"{{cordon}} status --json --config @DIR@/cordon.toml > {{home}}/status.out 2>&1; echo done >> {{home}}/status.out; sleep 1000 & wait\"]\nrestart = \"never\"\n{SHARED_UID}");
    let d = Deployment::new(ALLOW_ALL, &agents);
    let mut up = d.up();
    let out = d.dir.join("state/run/up/a/home/status.out");
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if text.contains("done") {
            break text;
        }
        assert!(Instant::now() < deadline, "no status.out\n{}", d.logs());
        std::thread::sleep(Duration::from_millis(20));
    };
    let answer: Value = serde_json::from_str(text.lines().next().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {text}\n{}", d.logs()));
    assert_eq!(answer["ok"], false, "{text}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("process of agent a"),
        "{text}"
    );
    // Control: the same request from this test (same uid, no agent's) is served.
    let s = d.until("a running", |s| d.agent(s, "a")["state"] == "running");
    assert_eq!(s["ok"], true);
    kill_process(Pid::from_raw(up.id() as i32).unwrap(), Signal::TERM).unwrap();
    assert!(wait(&mut up).success(), "{}", d.logs());
}

/// A file `bridge.*` and its content.
type Bridge = (PathBuf, String);

/// Files `bridge.*` in `home` and their contents.
fn bridges(home: &Path) -> Vec<Bridge> {
    let mut out: Vec<Bridge> = std::fs::read_dir(home)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("bridge."))
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            (e.path(), text)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_session_left_behind_closes_when_its_agent_restarts() {
    // The agent leaves a process behind in a session of its own (setsid:
    // out of its process group, and the profile has no cgroup), holding an
    // initialised gateway session through `cordon bridge`; then it closes
    // itself and its group once the bridge ends.
    let keep = "home=$1; cordon=$2; id=$$\n( printf '%s\\n' '{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"initialize\",\"params\":{\"protocolVersion\":\"2025-11-25\",\"capabilities\":{},\"clientInfo\":{\"name\":\"t\",\"version\":\"0\"}}}'; exec sleep 1000 ) | { \"$cordon\" bridge --socket \"$CORDON_SOCKET\" > \"$home/bridge.$id\" 2>/dev/null; echo closed >> \"$home/bridge.$id\"; kill 0; }\n";
    let agents = format!("[agents.a]\nrole = \"worker\"\ncommand = [\"/bin/sh\", \"-c\", \"setsid /bin/sh @DIR@/keep.sh {{home}} {{cordon}} </dev/null >/dev/null 2>&1 & echo up; sleep 1000 & wait\"]\nrestart = \"never\"\n{SHARED_UID}");
    let d = Deployment::new(ALLOW_ALL, &agents);
    std::fs::write(d.dir.join("keep.sh"), keep).unwrap();
    let mut up = d.up();
    let home = d.dir.join("state/run/up/a/home");
    let poll = |what: &str, cond: &dyn Fn(&[Bridge]) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let b = bridges(&home);
            if cond(&b) {
                return b;
            }
            assert!(
                Instant::now() < deadline,
                "never saw {what}: {b:?}\n{}",
                d.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let served = |t: &str| t.contains("\"result\"");
    let b = poll("the first session served", &|b| {
        b.len() == 1 && served(&b[0].1)
    });
    let first = b[0].0.clone();
    let s = d.until("a running", |s| d.agent(s, "a")["pid"].is_i64());
    let a1 = d.agent(&s, "a")["pid"].clone();

    let out = d.cordon(&["agent", "restart", "a"]);
    assert!(out.status.success(), "{out:?}");
    d.until("a restarted", |s| {
        let a = d.agent(s, "a");
        a["restarts"] == 1 && a["state"] == "running" && a["pid"] != a1
    });
    // The leftover of the first run survived the stop (it wrote after it),
    // but its session was closed; the new run's session is served and open.
    let b = poll("the old session closed and a new one served", &|b| {
        b.iter().any(|(p, t)| *p == first && t.contains("closed"))
            && b.iter().any(|(p, t)| *p != first && served(t))
    });
    let (_, second) = b.iter().find(|(p, _)| *p != first).unwrap();
    assert!(!second.contains("closed"), "{b:?}");

    kill_process(Pid::from_raw(up.id() as i32).unwrap(), Signal::TERM).unwrap();
    assert!(wait(&mut up).success(), "{}", d.logs());
    // Stopping the agent closes the second run's session as well.
    poll("the second session closed", &|b| {
        b.len() == 2 && b.iter().all(|(_, t)| t.contains("closed"))
    });
}

#[test]
fn an_agent_the_gateway_was_not_told_about_is_not_started() {
    // b keeps cordon up running once a is final.
    let sleeper = "command = [\"/bin/sh\", \"-c\", \"echo up; sleep 1000 & wait\"]\nsandbox = \"shell.toml\"\nrestart = \"never\"\n";
    let agents = format!(
        "[agents.a]\nrole = \"worker\"\n{sleeper}\n[agents.b]\nrole = \"worker\"\n{sleeper}"
    );
    let d = Deployment::new(ALLOW_ALL, &agents);
    let mut up = d.up();
    // Control: registered, the first run starts and prints.
    d.until("a running", |s| d.agent(s, "a")["state"] == "running");
    let printed = |run: u64| {
        d.events("a")
            .iter()
            .any(|e| e["run"] == run && e["text"] == "up")
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !printed(1) {
        assert!(
            Instant::now() < deadline,
            "run 1 never printed\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The gateway can no longer be told (its admin socket is gone): the next
    // run must not start at all.
    std::fs::remove_file(d.dir.join("state/run/admin.sock")).unwrap();
    let out = d.cordon(&["agent", "restart", "a"]);
    assert!(out.status.success(), "{out:?}");
    let s = d.until("a failed", |s| d.agent(s, "a")["state"] == "failed");
    assert_eq!(d.agent(&s, "a")["restarts"], 1, "{s}");
    assert!(!printed(2), "the unregistered run ran\n{}", d.logs());
    kill_process(Pid::from_raw(up.id() as i32).unwrap(), Signal::TERM).unwrap();
    wait(&mut up);
    let err = std::fs::read_to_string(d.dir.join("up.err")).unwrap();
    assert!(
        err.contains("cannot register the agent with the gateway; not starting it"),
        "{err}"
    );
    assert!(
        err.contains("cannot unregister the agent's root process"),
        "{err}"
    );
}

#[test]
fn a_runtime_dir_that_is_sticky_or_a_symlink_is_never_re_moded() {
    let agents = "[agents.a]\nrole = \"worker\"\ncommand = [\"/bin/true\"]\nsandbox = \"shell.toml\"\nrestart = \"never\"\n";
    let d = Deployment::new(ALLOW_ALL, agents);
    let text = std::fs::read_to_string(&d.config).unwrap();
    let sticky = d.dir.join("sticky");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, PermissionsExt::from_mode(0o1777)).unwrap();
    let target = d.dir.join("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, PermissionsExt::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(&target, d.dir.join("link")).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    for (dir, before, what) in [
        ("sticky", &sticky, "not cordon's own"),
        ("link", &target, "symlink"),
    ] {
        let m = mode(before);
        std::fs::write(
            &d.config,
            text.replace(
                "runtime_dir = \"state/run\"",
                &format!("runtime_dir = \"{dir}\""),
            ),
        )
        .unwrap();
        let out = Command::new(BIN).arg("up").arg(&d.config).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{dir}: {err}");
        assert!(err.contains(what), "{dir}: {err}");
        assert_eq!(mode(before), m, "{dir}: mode changed");
    }
    // Control: the same deployment on a directory of its own runs, and that
    // directory gets its mode.
    let own = d.dir.join("own");
    std::fs::create_dir(&own).unwrap();
    std::fs::set_permissions(&own, PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(
        &d.config,
        text.replace("runtime_dir = \"state/run\"", "runtime_dir = \"own\""),
    )
    .unwrap();
    // Twice: the second run takes back the work directory the first handed
    // to the agent.
    for _ in 0..2 {
        let out = Command::new(BIN).arg("up").arg(&d.config).output().unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    assert_eq!(mode(&own), 0o711);
}

#[test]
fn a_gateway_that_hangs_before_ready_is_killed_and_retried() {
    let agents = "[agents.a]\nrole = \"worker\"\ncommand = [\"/bin/sh\", \"-c\", \"echo up; sleep 1000 & wait\"]\nsandbox = \"shell.toml\"\nrestart = \"never\"\n";
    let d = Deployment::new(ALLOW_ALL, agents);
    let mut up = d.up();
    let s = d.until("a running", |s| {
        d.agent(s, "a")["state"] == "running" && s["gateway"]["pid"].is_i64()
    });
    // The next gateway blocks opening its policy (a FIFO nobody writes), so
    // it never prints its ready line.
    let policy = d.dir.join("policy.toml");
    std::fs::rename(&policy, d.dir.join("policy.real")).unwrap();
    let made = Command::new("mkfifo").arg(&policy).status().unwrap();
    assert!(made.success());
    let gateway = s["gateway"]["pid"].as_i64().unwrap();
    kill_process(Pid::from_raw(gateway as i32).unwrap(), Signal::KILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let err = d.dir.join("up.err");
    while !std::fs::read_to_string(&err)
        .unwrap_or_default()
        .contains("was not ready within")
    {
        assert!(Instant::now() < deadline, "no ready timeout\n{}", d.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The supervisor still answers, and the agent runs on.
    let s = d.until("cordon up answering", |s| s["ok"] == true);
    assert_eq!(d.agent(&s, "a")["state"], "running", "{s}");
    // Control: with its policy back, the next attempt succeeds.
    std::fs::rename(d.dir.join("policy.real"), &policy).unwrap();
    d.until("a new gateway", |s| {
        s["gateway"]["state"] == "running" && s["gateway"]["restarts"].as_u64() >= Some(2)
    });
    kill_process(Pid::from_raw(up.id() as i32).unwrap(), Signal::TERM).unwrap();
    assert!(wait(&mut up).success(), "{}", d.logs());
}

#[test]
fn an_overlong_output_line_is_skipped_and_reading_goes_on() {
    let agents = "[agents.a]\nrole = \"worker\"\ncommand = [\"/bin/sh\", \"-c\", \"yes x | head -c 3000000 | tr -d '\\\\n'; echo; echo after; sleep 1000 & wait\"]\nsandbox = \"shell.toml\"\nrestart = \"never\"\n";
    let d = Deployment::new(ALLOW_ALL, agents);
    let mut up = d.up();
    let deadline = Instant::now() + Duration::from_secs(60);
    let events = loop {
        let events = d.events("a");
        if events.iter().any(|e| e["text"] == "after") {
            break events;
        }
        assert!(Instant::now() < deadline, "no line after\n{}", d.logs());
        std::thread::sleep(Duration::from_millis(20));
    };
    let s = d.status().unwrap();
    assert_eq!(d.agent(&s, "a")["errors"], 1, "{s}");
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "error"
                && e["text"].as_str().is_some_and(|t| t.contains("skipped"))),
        "{events:?}"
    );
    // Control: the line after it was read and kept; the long one was not.
    assert!(events.iter().any(|e| e["text"] == "after"), "{events:?}");
    assert!(events.iter().all(|e| e.to_string().len() < 4096));
    kill_process(Pid::from_raw(up.id() as i32).unwrap(), Signal::TERM).unwrap();
    assert!(wait(&mut up).success(), "{}", d.logs());
}

#[test]
fn a_memory_hog_is_killed_alone_in_its_cgroup() {
    if !common::is_root() {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"SKIPPED a_memory_hog_is_killed_alone: cgroup limits need root\n",
        );
        return;
    }
    // `tail -c` keeps the last 256 MiB it read in memory: far over the limit.
    let agents = "[agents.hog]\nrole = \"worker\"\ncommand = [\"/bin/sh\", \"-c\", \"head -c 512M /dev/zero | tail -c 256M > /dev/null\"]\nsandbox = \"hog.toml\"\nrestart = \"never\"\n\n\
                  [agents.quiet]\nrole = \"worker\"\ncommand = [\"/bin/sh\", \"-c\", \"echo up; sleep 1000 & wait\"]\nsandbox = \"shell.toml\"\nrestart = \"never\"\n";
    let d = Deployment::new(ALLOW_ALL, agents);
    std::fs::write(
        d.dir.join("hog.toml"),
        format!(
            "{}[limits]\nmemory = \"32MiB\"\npids = 16\n",
            SHELL_PROFILE.replace("read = [\"/etc\"]", "read = [\"/etc\", \"/dev/zero\"]")
        ),
    )
    .unwrap();
    let mut up = d.up();
    let s = d.until("the hog killed", |s| {
        d.agent(s, "hog")["state"] == "failed" && d.agent(s, "quiet")["state"] == "running"
    });
    let exit = d.agent(&s, "hog")["exit"].as_str().unwrap().to_string();
    assert!(exit.contains("out of memory"), "{exit}\n{}", d.logs());
    // The other agent is untouched and still works.
    assert!(
        d.events("quiet").iter().any(|e| e["text"] == "up"),
        "{}",
        d.logs()
    );
    kill_process(Pid::from_raw(up.id() as i32).unwrap(), Signal::TERM).unwrap();
    wait(&mut up);
}

#[test]
fn script_checks_outcomes_and_fails_on_a_wrong_expectation() {
    let gw = common::Gateway::start_with_policy(
        "",
        common::CODER,
        "[roles.coder]\ntools = [\"kv_get\", \"kv_put\"]\nread = [\"/a/**\"]\nwrite = [\"/a/**\"]\n",
    );
    let script = gw.dir.join("s.toml");
    let run = |text: &str| {
        std::fs::write(&script, text).unwrap();
        Command::new(BIN)
            .arg("script")
            .arg(&script)
            .arg("--socket")
            .arg(gw.socket("coder"))
            .output()
            .unwrap()
    };
    // A put allowed, a put outside the scope denied, a tool the role lacks
    // denied, a missing key's error code, and a saved value used later.
    let ok = run(concat!(
        "[[step]]\ntool = \"kv_put\"\nargs = { key = \"/a/x\", value = 1 }\nsave = { rev = \"revision\" }\n",
        "[[step]]\ntool = \"kv_get\"\nargs = { key = \"/a/x\" }\nresult = { value = 1, revision = \"${rev}\" }\n",
        "[[step]]\ntool = \"kv_put\"\nargs = { key = \"/b\", value = 1 }\nexpect = \"deny\"\ncode = \"denied\"\n",
        "[[step]]\ntool = \"kv_delete\"\nargs = { key = \"/a/x\" }\nexpect = \"deny\"\n",
        "[[step]]\ntool = \"kv_get\"\nargs = { key = \"/a/none\" }\nexpect = \"error\"\ncode = \"not_found\"\n",
    ));
    assert!(ok.status.success(), "{ok:?}");
    let out = String::from_utf8_lossy(&ok.stdout);
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["type"], "result");
    assert_eq!(
        (last["calls"].as_u64(), last["denials"].as_u64()),
        (Some(5), Some(2))
    );

    let bad = run(
        "[[step]]\ntool = \"kv_put\"\nargs = { key = \"/a/y\", value = 1 }\nexpect = \"deny\"\n",
    );
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected Deny"));
}

#[test]
fn ctrl_c_stops_the_agents_first_then_the_gateway() {
    let agents = "[agents.a]\nrole = \"worker\"\ncommand = [\"/bin/sh\", \"-c\", \"echo up; sleep 1000 & wait\"]\nsandbox = \"shell.toml\"\n";
    let d = Deployment::new(ALLOW_ALL, agents);
    // Ctrl-C on a terminal: SIGINT to the foreground process group, which
    // `cordon up` leads here.
    let mut up = {
        use std::os::unix::process::CommandExt;
        Command::new(BIN)
            .arg("up")
            .arg(&d.config)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(d.dir.join("up.out")).unwrap())
            .stderr(std::fs::File::create(d.dir.join("up.err")).unwrap())
            .spawn()
            .unwrap()
    };
    let s = d.until("a running", |s| d.agent(s, "a")["state"] == "running");
    let a = d.agent(&s, "a")["pid"].as_i64().unwrap();
    rustix::process::kill_process_group(Pid::from_raw(up.id() as i32).unwrap(), Signal::INT)
        .unwrap();
    assert!(wait(&mut up).success(), "{}", d.logs());
    assert!(group_gone(a));
    // The gateway heard that the agent stopped before it was told to stop.
    let log = std::fs::read_to_string(d.dir.join("state/run/up/gateway.log")).unwrap();
    let unregistered = log
        .lines()
        .position(|l| l.contains("agent root process registered") && !l.contains("pid="))
        .expect(&log);
    let shutdown = log
        .lines()
        .position(|l| l.contains("shutting down"))
        .expect(&log);
    assert!(unregistered < shutdown, "{log}");
    assert!(
        log.contains("signal=\"SIGTERM\""),
        "the gateway got Ctrl-C itself: {log}"
    );
}

/// Bytes on disk of a log and its rotated files (`x`, `x.1`, … `x.<MAX>`).
fn log_files(path: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    for n in 0..=100 {
        let p = if n == 0 {
            path.to_path_buf()
        } else {
            PathBuf::from(format!("{}.{n}", path.display()))
        };
        if let Ok(m) = std::fs::metadata(&p) {
            out.push((p, m.len()));
        }
    }
    out
}

fn cpu_seconds(pid: u32) -> f64 {
    cpu_seconds_of(&format!("/proc/{pid}/stat"))
}

fn cpu_seconds_of(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return 0.0;
    };
    let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // utime(11) + stime(12), in clock ticks (100 per second on Linux).
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ticks as f64 / 100.0
}

/// CPU seconds of the threads of `pid` whose name starts with `prefix`
/// (the orchestrator names its reader threads `<agent>-stdout|stderr`).
fn thread_cpu_seconds(pid: u32, prefix: &str) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .map(|t| {
            let tid: u32 = t.file_name().to_string_lossy().parse().unwrap_or(0);
            cpu_seconds_of(&format!("/proc/{pid}/task/{tid}/stat"))
        })
        .sum()
}

fn median_max(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (
        v.get(v.len() / 2).copied().unwrap_or_default(),
        v.last().copied().unwrap_or_default(),
    )
}

#[test]
fn a_flooding_agent_is_bounded_and_delays_no_one() {
    // Small bounds so that 10 s of flood rotates many times over.
    const MAX: u64 = 256 << 10;
    const KEEP: u64 = 3;
    let logs = format!(
        "[logs]\nmax_file_bytes = {MAX}\nkeep = {KEEP}\nrate_per_second = \"256KiB\"\nburst = \"512KiB\"\n\n"
    );
    let flood = |name: &str, cmd: &str| {
        format!(
            "[agents.{name}]\nrole = \"worker\"\ncommand = ['/bin/sh', '-c', '''{cmd}''']\nsandbox = \"shell.toml\"\nrestart = \"never\"\n\n"
        )
    };
    let agents = [
        logs,
        flood(
            "errflood",
            "timeout 10 yes 'a line of stderr flood, as fast as it can' >&2; echo flood over",
        ),
        flood(
            "outflood",
            r#"timeout 10 yes '{"type":"call","tool":"kv_get","key":"/x","outcome":"allow"}'; exit 0"#,
        ),
        flood(
            "quiet",
            r#"for i in $(seq 1 200); do printf 'quiet %s: tab\there "dq" é [cordon] end\n' "$i" >&2; done; echo quiet done; sleep 1000 & wait"#,
        ),
        flood("quick", "sleep 2; exit 7"),
    ]
    .concat();
    let d = Deployment::new(ALLOW_ALL, &agents);
    let run = d.dir.join("state/run/up");
    let mut up = d.up();
    let started = Instant::now();
    let cpu_before = cpu_seconds(up.id());
    let cap = KEEP * MAX;
    let under_cap = |what: &str| {
        for agent in ["errflood", "outflood"] {
            for log in ["stderr.log", "events.jsonl"] {
                let files = log_files(&run.join(agent).join(log));
                let total: u64 = files.iter().map(|(_, n)| n).sum();
                assert!(
                    total <= cap && files.len() as u64 <= KEEP,
                    "{what}: {agent}/{log} holds {total} bytes in {files:?}, over {KEEP} x {MAX}"
                );
                assert!(files.iter().all(|(_, n)| *n <= MAX), "{what}: {files:?}");
            }
        }
    };

    // While both flood: `cordon status` answers (timed, never asserted) and
    // the quick agent's exit is seen while the flood goes on.
    let mut during = Vec::new();
    let mut quick_seen = None;
    let mut readers_cpu = 0.0f64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = Instant::now();
        let s = d.status();
        let took = t.elapsed();
        let flooding = s.as_ref().is_some_and(|s| {
            ["errflood", "outflood"]
                .iter()
                .all(|a| d.agent(s, a)["state"] == "running")
        });
        if let Some(s) = &s {
            if flooding {
                during.push(took);
                readers_cpu = readers_cpu.max(
                    thread_cpu_seconds(up.id(), "errflood-")
                        + thread_cpu_seconds(up.id(), "outflood-"),
                );
            }
            let q = d.agent(s, "quick");
            if quick_seen.is_none() && q["state"] == "failed" {
                assert_eq!(q["exit"], "exit 7", "{s}");
                assert!(
                    flooding,
                    "the flood was over before the quick agent's exit was seen: {s}\n{}",
                    d.logs()
                );
                quick_seen = Some(started.elapsed());
            }
            if !flooding && quick_seen.is_some() {
                break;
            }
        }
        under_cap("during the flood");
        assert!(Instant::now() < deadline, "flood never ended\n{}", d.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let cpu_flood = cpu_seconds(up.id()) - cpu_before;
    let flood_secs = started.elapsed().as_secs_f64();
    let s = d.until("both flooders exited", |s| {
        ["errflood", "outflood"]
            .iter()
            .all(|a| d.agent(s, a)["state"] == "exited")
    });
    let mut after = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        assert!(d.status().is_some());
        after.push(t.elapsed());
    }
    under_cap("after the flood");

    // The drops are counted, shown in the table, and marked in the logs.
    let e = d.agent(&s, "errflood");
    let o = d.agent(&s, "outflood");
    let stderr = &e["logs"]["stderr"];
    let events = &o["logs"]["events"];
    for (name, l) in [("errflood stderr", stderr), ("outflood events", events)] {
        let read = l["read_bytes"].as_u64().unwrap();
        let dropped = l["dropped_bytes"].as_u64().unwrap();
        assert!(
            dropped > 0 && l["dropped_lines"].as_u64().unwrap() > 0,
            "{name}: {l}"
        );
        assert!(l["rotations"].as_u64().unwrap() > 0, "{name}: {l}");
        assert!(dropped <= read, "{name}: {l}");
    }
    assert_eq!(e["dropped_bytes"], stderr["dropped_bytes"], "{e}");
    let table = d.cordon(&["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    let row = table.lines().find(|l| l.starts_with("errflood")).unwrap();
    assert!(
        table.contains("DROPPED") && row.contains(" lines)"),
        "{table}"
    );
    let read_all = |p: &Path| -> String {
        log_files(p)
            .iter()
            .map(|(f, _)| String::from_utf8_lossy(&std::fs::read(f).unwrap()).into_owned())
            .collect()
    };
    let err_text = read_all(&run.join("errflood/stderr.log"));
    let marker = err_text
        .lines()
        .find(|l| l.starts_with("[cordon] dropped "))
        .unwrap_or_else(|| panic!("no marker in errflood's stderr"));
    assert!(
        marker.contains("of errflood stderr (rate limit 256KiB/s, burst 512KiB)"),
        "{marker}"
    );
    assert!(
        err_text
            .lines()
            .all(|l| l == "a line of stderr flood, as fast as it can"
                || l.starts_with("[cordon] dropped ")
                || l == "flood over"),
        "a kept line was cut or mixed"
    );
    let ev_text = read_all(&run.join("outflood/events.jsonl"));
    let ev: Vec<Value> = ev_text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        ev.iter().any(|e| e["kind"] == "dropped"
            && e["stream"] == "stdout"
            && e["agent"] == "outflood"
            && e["bytes"].as_u64().is_some_and(|b| b > 0)),
        "no dropped event in outflood's events"
    );
    assert!(ev.iter().any(|e| e["kind"] == "call"));

    // Control: the quiet agent's stderr is whole and verbatim, nothing dropped.
    let quiet = d.agent(&s, "quiet");
    assert_eq!(quiet["state"], "running", "{quiet}");
    assert_eq!(quiet["dropped_bytes"], 0, "{quiet}");
    let expected: String = (1..=200)
        .map(|i| format!("quiet {i}: tab\there \"dq\" é [cordon] end\n"))
        .collect();
    assert_eq!(
        std::fs::read_to_string(run.join("quiet/stderr.log")).unwrap(),
        expected
    );
    assert!(d.events("quiet").iter().any(|e| e["text"] == "quiet done"));

    let (dm, dx) = median_max(during.clone());
    let (am, ax) = median_max(after);
    let num = |l: &Value, f: &str| l[f].as_u64().unwrap_or(0);
    let up_err = std::fs::metadata(d.dir.join("up.err")).map_or(0, |m| m.len());
    eprintln!(
        "FIGURES flood {flood_secs:.1}s; errflood stderr: wrote {} bytes, kept {} on disk ({} written, {} dropped, {} rotations); \
         outflood stdout: wrote {} bytes, events kept {} on disk ({} dropped bytes, {} dropped lines); \
         cordon status during the flood: {} calls, median {dm:?}, max {dx:?}; after: median {am:?}, max {ax:?}; \
         quick agent's exit (at ~2 s) seen at {:?}; cordon up CPU during the flood {cpu_flood:.2}s, of which the flooders' reader threads {readers_cpu:.2}s; up.err {up_err} bytes",
        num(stderr, "read_bytes"),
        log_files(&run.join("errflood/stderr.log")).iter().map(|(_, n)| n).sum::<u64>(),
        num(stderr, "written_bytes"),
        num(stderr, "dropped_bytes"),
        num(stderr, "rotations"),
        num(events, "read_bytes"),
        log_files(&run.join("outflood/events.jsonl")).iter().map(|(_, n)| n).sum::<u64>(),
        num(events, "dropped_bytes"),
        num(events, "dropped_lines"),
        during.len(),
        quick_seen.unwrap(),
    );
    kill_process(Pid::from_raw(up.id() as i32).unwrap(), Signal::TERM).unwrap();
    // The quick agent failed, so the deployment did not succeed.
    assert_eq!(wait(&mut up).code(), Some(1), "{}", d.logs());
}

#[test]
fn the_gateways_log_is_bounded_and_never_stalls_the_gateway() {
    // An agent that exits at once and is restarted every 10 ms makes the
    // gateway log two lines per run (its root registered, then cleared):
    // far past a 1 KiB/s log. Meanwhile another agent's 100 calls all work.
    let mut script = String::new();
    for i in 0..100 {
        script.push_str(&format!(
            "[[step]]\ntool = \"kv_put\"\nargs = {{ key = \"/w/{i}\", value = {i} }}\nexpect = \"allow\"\n"
        ));
    }
    let d0 = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d0.path(), PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(d0.path().join("worker.toml"), &script).unwrap();
    std::fs::set_permissions(
        d0.path().join("worker.toml"),
        PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let agents = format!(
        "[logs]\nmax_file_bytes = 4096\nkeep = 2\nrate_per_second = 1024\nburst = 4096\n\n\
         [agents.churn]\nrole = \"worker\"\ncommand = [\"/bin/sh\", \"-c\", \"exit 1\"]\nsandbox = \"shell.toml\"\nrestart = \"on-failure\"\nbackoff = \"10ms\"\nmax_backoff = \"10ms\"\nmax_restarts = 1000000\nrestart_window = \"1s\"\n\n\
         [agents.worker]\nrole = \"worker\"\ncommand = \"{{cordon}} script worker.toml\"\nworkdir = \"{}\"\nsandbox = \"{}\"\nrestart = \"never\"\n",
        d0.path().display(),
        repo().join("configs/profiles/script.toml").display()
    );
    let d = Deployment::new(ALLOW_ALL, &agents);
    let log = d.dir.join("state/run/up/gateway.log");
    let mut up = d.up();
    let read_all = || -> String {
        log_files(&log)
            .iter()
            .map(|(f, _)| std::fs::read_to_string(f).unwrap_or_default())
            .collect()
    };
    let s = d.until("the gateway's log dropping, rotated and marked", |s| {
        let files = log_files(&log);
        assert!(
            files.len() <= 2 && files.iter().all(|(_, n)| *n <= 4096),
            "{files:?}"
        );
        let g = &s["gateway"];
        g["dropped_bytes"].as_u64().is_some_and(|b| b > 0)
            && g["log"]["rotations"].as_u64().is_some_and(|r| r > 0)
            && d.agent(s, "worker")["state"] == "exited"
            && read_all().contains("[cordon] dropped ")
    });
    let g = &s["gateway"];
    assert_eq!(g["state"], "running", "{s}");
    assert!(g["dropped_lines"].as_u64().unwrap() > 0, "{s}");
    let text = read_all();
    let marker = text
        .lines()
        .find(|l| l.starts_with("[cordon] dropped "))
        .unwrap();
    assert!(
        marker.contains("of gateway stderr (rate limit 1KiB/s, burst 4KiB)"),
        "{marker}"
    );
    let table = d.cordon(&["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("log dropped "), "{table}");
    // Control: the worker's calls all went through meanwhile (its script
    // exits 0 only if every call was allowed; its own events are past this
    // small rate too, so the audit tells).
    assert_eq!(d.agent(&s, "worker")["exit"], "exit 0", "{s}");
    eprintln!(
        "FIGURES gateway.log: {} read, {} written, {} dropped bytes ({} lines), {} rotations; churn restarts {}",
        g["log"]["read_bytes"],
        g["log"]["written_bytes"],
        g["dropped_bytes"],
        g["dropped_lines"],
        g["log"]["rotations"],
        d.agent(&s, "churn")["restarts"]
    );
    kill_process(Pid::from_raw(up.id() as i32).unwrap(), Signal::TERM).unwrap();
    assert!(wait(&mut up).success(), "{}", d.logs());
    let export = d.audit(&["export"]);
    let allowed = export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["agent"] == "worker" && r["tool"] == "kv_put" && r["decision"] == "allow")
        .count();
    assert_eq!(allowed, 100);
}

/// The watchdog's bounds in the tests below: a probe every 200 ms, killed
/// after 4 s without an answer (wide enough that a status poll sees it).
const WATCHDOG: &str = "watchdog_interval_ms = 200\nwatchdog_timeout_ms = 4000\n";

/// An agent that makes one call through the gateway, then waits for
/// `@DIR@/go` (written by the test) and makes another with `cordon script`.
fn two_call_agent(d: &Deployment) {
    std::fs::write(
        d.dir.join("before.toml"),
        "[[step]]\ntool = \"kv_put\"\nargs = { key = \"/before\", value = 1 }\n",
    )
    .unwrap();
    std::fs::write(
        d.dir.join("after.toml"),
        "[[step]]\ntool = \"kv_put\"\nargs = { key = \"/after\", value = 2 }\n[[step]]\ntool = \"kv_get\"\nargs = { key = \"/before\" }\n",
    )
    .unwrap();
}

fn two_call_agents() -> String {
    format!("[agents.a]\nrole = \"worker\"\ncommand = [\"/bin/sh\", \"-c\", \"{{cordon}} script @DIR@/before.toml || exit 1; echo waiting; while [ ! -e @DIR@/go ]; do sleep 0.05; done; exec {{cordon}} script @DIR@/after.toml\"]\nrestart = \"never\"\n{SHARED_UID}")
}

/// The agent made its first call and waits for `go`.
fn first_call_done(d: &Deployment) -> bool {
    d.events("a")
        .iter()
        .any(|e| e["kind"] == "output" && e["text"] == "waiting")
}

/// The agent's one run (never restarted) made both calls of `after.toml`.
fn after_calls_succeeded(d: &Deployment) {
    let events = d.events("a");
    let results: Vec<&Value> = events.iter().filter(|e| e["kind"] == "result").collect();
    assert_eq!(results.len(), 2, "{events:?}");
    assert!(
        results
            .iter()
            .all(|r| r["is_error"] == false && r["run"] == 1),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "call" && e["outcome"] == "allow" && e["key"] == "/after"),
        "{events:?}"
    );
    let out = std::fs::read_to_string(d.dir.join("up.out")).unwrap();
    assert!(out.contains("all succeeded"), "{out}");
}

#[test]
fn a_frozen_gateway_is_killed_by_the_watchdog_and_restarted() {
    let d = Deployment::with_gateway(WATCHDOG, ALLOW_ALL, &two_call_agents());
    two_call_agent(&d);
    let mut up = d.up();
    let s = d.until("the first call done and the gateway answering", |s| {
        first_call_done(&d) && s["gateway"]["watchdog"]["answered"].as_u64() >= Some(1)
    });
    assert_eq!(s["gateway"]["watchdog"]["restarts"], 0, "{s}");
    let old = s["gateway"]["pid"].as_i64().unwrap();
    let old_pid = Pid::from_raw(old as i32).unwrap();
    kill_process(old_pid, Signal::STOP).unwrap();
    let frozen = Instant::now();

    // While frozen, the orchestrator says so, and `cordon status` (which
    // then does not wait on the gateway) shows it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = loop {
        let s = d.control_status();
        if s["gateway"]["state"] == "unresponsive" {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "never unresponsive: {s}\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(s["gateway"]["pid"], old, "{s}");
    assert!(s["gateway"]["unanswered_s"].as_f64().is_some(), "{s}");
    let out = d.cordon(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&format!("gateway: pid {old}, unresponsive (no answer for")),
        "{table}\n{}",
        d.logs()
    );

    // Past the bound: SIGKILLed (a stopped process dies too), reaped, and a
    // new gateway serves.
    let s = d.until("a new gateway", |s| {
        s["gateway"]["state"] == "running"
            && s["gateway"]["pid"].is_i64()
            && s["gateway"]["pid"] != old
    });
    eprintln!(
        "FIGURES watchdog: SIGSTOP to a new gateway serving {:?} (bound 4 s, interval 200 ms, backoff 500 ms)",
        frozen.elapsed()
    );
    assert_eq!(s["gateway"]["watchdog"]["restarts"], 1, "{s}");
    assert_eq!(s["gateway"]["restarts"], 1, "{s}");
    assert!(
        gone(old),
        "the old gateway {old} is still there (or a zombie)"
    );
    let err = std::fs::read_to_string(d.dir.join("up.err")).unwrap();
    assert!(
        err.contains("gateway has not answered its watchdog for"),
        "{err}"
    );

    // The agent, still the same run, calls through the new gateway.
    assert_eq!(d.agent(&s, "a")["state"], "running", "{s}");
    // Its last call ends it, and with it the deployment (successfully).
    std::fs::write(d.dir.join("go"), "").unwrap();
    assert!(wait(&mut up).success(), "{}", d.logs());
    after_calls_succeeded(&d);
    // The new gateway's start record says why it started, and the chain
    // (written by both gateways) verifies.
    let starts: Vec<Value> = d
        .audit(&["query", "--event", "gateway_start", "--format", "jsonl"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert!(starts[0]["detail"].get("restart").is_none(), "{starts:?}");
    let restart = &starts[1]["detail"]["restart"];
    assert_eq!(restart["reason"], "watchdog", "{starts:?}");
    assert_eq!(restart["previous_pid"], old, "{starts:?}");
    assert!(
        restart["unanswered_ms"].as_u64().unwrap() >= 4000,
        "{starts:?}"
    );
    d.audit(&["verify"]);
}

#[test]
fn a_healthy_gateway_is_never_restarted_by_the_watchdog() {
    // Control for the test above: the same bounds, no freeze. Past enough
    // answered probes to span the bound twice, nothing was restarted.
    let d = Deployment::with_gateway(WATCHDOG, ALLOW_ALL, &two_call_agents());
    two_call_agent(&d);
    let mut up = d.up();
    let s = d.until("the first call done", |s| {
        s["gateway"]["pid"].is_i64() && first_call_done(&d)
    });
    let pid = s["gateway"]["pid"].clone();
    let s = d.until("40 answered probes (8 s)", |s| {
        s["gateway"]["watchdog"]["answered"].as_u64() >= Some(40)
    });
    assert_eq!(s["gateway"]["watchdog"]["restarts"], 0, "{s}");
    assert_eq!(s["gateway"]["restarts"], 0, "{s}");
    assert_eq!(s["gateway"]["pid"], pid, "{s}");
    assert_eq!(s["gateway"]["state"], "running", "{s}");
    assert_eq!(s["gateway"]["watchdog"]["enabled"], true, "{s}");
    std::fs::write(d.dir.join("go"), "").unwrap();
    assert!(wait(&mut up).success(), "{}", d.logs());
    after_calls_succeeded(&d);
    let starts = d.audit(&["query", "--event", "gateway_start", "--format", "jsonl"]);
    assert_eq!(starts.lines().count(), 1, "{starts}");
}

#[test]
fn a_gateway_that_exits_is_restarted_with_its_exit_in_the_next_start_record() {
    let d = Deployment::with_gateway(WATCHDOG, ALLOW_ALL, &two_call_agents());
    two_call_agent(&d);
    let mut up = d.up();
    let s = d.until("the first call done", |s| {
        s["gateway"]["pid"].is_i64() && first_call_done(&d)
    });
    let old = s["gateway"]["pid"].as_i64().unwrap();
    kill_process(Pid::from_raw(old as i32).unwrap(), Signal::KILL).unwrap();
    let s = d.until("a new gateway", |s| {
        s["gateway"]["state"] == "running"
            && s["gateway"]["pid"].is_i64()
            && s["gateway"]["pid"] != old
    });
    assert_eq!(s["gateway"]["restarts"], 1, "{s}");
    assert_eq!(s["gateway"]["watchdog"]["restarts"], 0, "{s}");
    std::fs::write(d.dir.join("go"), "").unwrap();
    assert!(wait(&mut up).success(), "{}", d.logs());
    after_calls_succeeded(&d);
    let starts: Vec<Value> = d
        .audit(&["query", "--event", "gateway_start", "--format", "jsonl"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(starts.len(), 2, "{starts:?}");
    let restart = &starts[1]["detail"]["restart"];
    assert_eq!(restart["reason"], "exited", "{starts:?}");
    assert_eq!(restart["previous_pid"], old, "{starts:?}");
    assert_eq!(restart["status"], "signal 9", "{starts:?}");
}
