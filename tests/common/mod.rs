//! Test support: the real `cordon` binary on a temp store, and a lean JSON-RPC
//! client over the agent's real Unix socket.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub use rustix::process::Signal;
use rustix::process::{kill_process, Pid};
use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_cordon");

pub struct Gateway {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub child: Option<Child>,
    pub ready: Value,
    _tmp: Option<tempfile::TempDir>,
}

/// The `[gateway]` section (policy in `policy.toml` beside it) plus `agents`.
pub fn config_text(extra_gateway: &str, agents: &str) -> String {
    format!(
        "[gateway]\nstore = \"state/store\"\nruntime_dir = \"state/run\"\npolicy = \"policy.toml\"\nmap_size = \"256MiB\"\n{extra_gateway}\n{agents}"
    )
}

pub const CODER: &str = "[agents.coder]\nrole = \"coder\"\n";

/// Role `coder` may do anything: the gateway-core tests are not about policy.
pub const ALLOW_ALL: &str =
    "[roles.coder]\ntools = [\"kv_*\"]\nread = [\"/**\"]\nwrite = [\"/**\"]\ndelete = [\"/**\"]\n";

impl Gateway {
    /// Starts a gateway in a fresh temp dir with agent `coder`.
    pub fn start() -> Gateway {
        Gateway::start_with("", CODER)
    }

    pub fn start_with(extra_gateway: &str, agents: &str) -> Gateway {
        Gateway::start_with_policy(extra_gateway, agents, ALLOW_ALL)
    }

    pub fn start_with_policy(extra_gateway: &str, agents: &str, policy: &str) -> Gateway {
        let mut g = Gateway::prepare(extra_gateway, agents, policy);
        g.launch().expect("gateway did not become ready");
        g
    }

    /// Writes the config and policy in a fresh temp dir without starting.
    pub fn prepare(extra_gateway: &str, agents: &str, policy: &str) -> Gateway {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        // Agents running under other uids must be able to traverse to their socket.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let config = dir.join("cordon.toml");
        std::fs::write(&config, config_text(extra_gateway, agents)).unwrap();
        std::fs::write(tmp.path().join("policy.toml"), policy).unwrap();
        Gateway {
            dir,
            config,
            child: None,
            ready: Value::Null,
            _tmp: Some(tmp),
        }
    }

    /// Starts (again) on the same dir; returns the gateway's stderr on failure.
    pub fn launch(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("gateway.log"))
            .unwrap();
        let mut child = Command::new(BIN)
            .args(["gateway", "--config"])
            .arg(&self.config)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        // The gateway prints one JSON line on stdout once every socket accepts;
        // EOF instead means it exited.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.is_empty() {
            let status = child.wait().unwrap();
            return Err(format!("gateway exited ({status}): {}", self.log()));
        }
        self.ready = serde_json::from_str(&line).unwrap();
        self.child = Some(child);
        Ok(())
    }

    /// A `cordon` subcommand against this gateway's config.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap()
    }

    /// Every audit record, as `cordon audit export` prints them.
    pub fn audit_export(&self) -> Vec<Value> {
        let out = self.cli(&["audit", "export"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// `cordon audit verify` must pass.
    pub fn assert_audit_verifies(&self) {
        let out = self.cli(&["audit", "verify"]);
        assert!(
            out.status.success(),
            "audit verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }

    /// The admin socket's `status` reply.
    pub fn status(&self) -> Value {
        let mut s = UnixStream::connect(self.dir.join("state/run/admin.sock")).unwrap();
        s.write_all(b"{\"op\":\"status\"}\n").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    pub fn socket(&self, agent: &str) -> PathBuf {
        self.dir
            .join("state/run/agents")
            .join(agent)
            .join("mcp.sock")
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket("coder"))
    }

    pub fn signal(&self, sig: Signal) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        kill_process(Pid::from_raw(pid).unwrap(), sig).unwrap();
    }

    /// SIGTERM, and the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(Signal::TERM);
        self.child.take().unwrap().wait().unwrap()
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        self.signal(Signal::KILL);
        self.child.take().unwrap().wait().unwrap();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A minimal MCP client: newline-delimited JSON-RPC, requests answered in order
/// unless pipelined on purpose.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let mut c = Client::connect_raw(path).unwrap();
        let r = c.request(
            "initialize",
            json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "cordon-tests", "version": "0"}}),
        );
        assert_eq!(r["result"]["protocolVersion"], "2025-11-25", "{r}");
        c.notify("notifications/initialized", json!({}));
        c
    }

    pub fn connect_raw(path: &Path) -> std::io::Result<Client> {
        let s = UnixStream::connect(path)?;
        Ok(Client {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            next_id: 1,
        })
    }

    pub fn send_line(&mut self, line: &[u8]) {
        self.writer.write_all(line).unwrap();
        self.writer.write_all(b"\n").unwrap();
    }

    /// Closes the sending half: the peer reads EOF.
    pub fn close_write(&mut self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Write);
    }

    /// Sends, ignoring a peer that already closed.
    pub fn try_send(&mut self, msg: &Value) {
        let _ = self.writer.write_all(format!("{msg}\n").as_bytes());
    }

    pub fn send(&mut self, msg: &Value) {
        self.send_line(msg.to_string().as_bytes());
    }

    /// The next line, or None at EOF.
    pub fn recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        Some(serde_json::from_str(&line).unwrap())
    }

    /// The next line exactly as it came, or None at EOF.
    pub fn recv_line(&mut self) -> Option<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        Some(line)
    }

    pub fn notify(&mut self, method: &str, params: Value) {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params}));
    }

    /// Sends a request and returns its id without waiting.
    pub fn start(&mut self, method: &str, params: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        id
    }

    pub fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.start(method, params);
        let r = self.recv().expect("connection closed");
        assert_eq!(r["id"], id, "out-of-order reply {r}");
        r
    }

    /// On a connection the gateway refused: sends a first request and returns
    /// the refusal that answers it (with that request's id).
    pub fn refusal(&mut self) -> Value {
        self.try_send(&json!({"jsonrpc": "2.0", "id": "probe", "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "cordon-tests", "version": "0"}}}));
        let r = self.recv().expect("a refusal line");
        assert_eq!(
            r["id"], "probe",
            "the refusal answers the first request: {r}"
        );
        r
    }

    /// `tools/call`: the whole result object (structuredContent, isError, content).
    pub fn call(&mut self, tool: &str, args: Value) -> Value {
        let r = self.request("tools/call", json!({"name": tool, "arguments": args}));
        assert!(r.get("error").is_none(), "protocol error from {tool}: {r}");
        r["result"].clone()
    }

    /// A call that must succeed: its structured content.
    pub fn ok(&mut self, tool: &str, args: Value) -> Value {
        let r = self.call(tool, args);
        assert_eq!(r["isError"], false, "{tool} failed: {r}");
        r["structuredContent"].clone()
    }

    /// A call that must fail as a tool error: its error code.
    pub fn err(&mut self, tool: &str, args: Value) -> String {
        let r = self.call(tool, args);
        assert_eq!(r["isError"], true, "{tool} should have failed: {r}");
        r["structuredContent"]["error"]["code"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Kills and reaps a child when dropped, so a failing test leaves nothing running.
pub struct Kill(pub std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The directory holding the pinned Claude Code (`tests/node`), or None with a
/// visible SKIPPED line. Under scripts/test (CORDON_REQUIRE_CLAUDE set) a
/// missing install fails the test instead.
pub fn claude_node_bin(test: &str) -> Option<PathBuf> {
    let node_bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node/node_modules/.bin");
    if node_bin.join("claude").exists() {
        return Some(node_bin);
    }
    assert!(
        std::env::var_os("CORDON_REQUIRE_CLAUDE").is_none(),
        "Claude Code is not installed in tests/node (npm ci --prefix tests/node)"
    );
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: run `npm ci --prefix tests/node` (scripts/test does)"
    );
    None
}

/// Starts the mock of the Anthropic Messages API (tests/anthropic_api_mock.py;
/// the one mock allowed here) scripted to have the model call `tool` with
/// `input` (one JSON input, or a JSON list of inputs), logging requests to
/// `log`. Returns it (killed on drop) and the port it listens on.
pub fn start_api_mock(tool: &str, input: &str, log: &Path) -> (Kill, u16) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut mock = Kill(
        Command::new("python3")
            .arg(repo.join("tests/anthropic_api_mock.py"))
            .arg(tool)
            .arg(input)
            .arg(log)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut port = String::new();
    BufReader::new(mock.0.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let port: u16 = port.trim().parse().expect("the mock prints its port");
    (mock, port)
}
