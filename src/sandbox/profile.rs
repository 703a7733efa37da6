//! Sandbox profiles (TOML): what one agent may read, write, execute and connect
//! to, its environment, its limits and the uid it runs as.
//!
//! Unknown fields are errors (with line and column): a misspelt `wirte` that
//! silently grants nothing is harmless, but a misspelt limit that silently falls
//! back to "unlimited" is not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::units::ByteSize;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read sandbox profile {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sandbox profile {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("sandbox profile {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// What happens when the kernel cannot enforce part of the profile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Require {
    /// Refuse to run the command, naming the missing right and the kernel ABI it needs.
    #[default]
    Strict,
    /// Run anyway and say on stderr what was dropped.
    BestEffort,
}

/// Which uid the command runs as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum UserSpec {
    /// A dedicated uid per agent from `uid_range` when cordon runs as root;
    /// otherwise the caller's uid.
    #[default]
    Auto,
    /// The caller's uid.
    Inherit,
    /// A user from /etc/passwd (needs root).
    Name(String),
}

impl<'de> Deserialize<'de> for UserSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "auto" => UserSpec::Auto,
            "inherit" => UserSpec::Inherit,
            "" => return Err(serde::de::Error::custom("user must not be empty")),
            _ => UserSpec::Name(s),
        })
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetProfile {
    /// TCP ports the command may connect to; empty: no TCP connections.
    #[serde(default)]
    pub connect_tcp: Vec<u16>,
    /// TCP ports the command may bind; empty: no TCP listening.
    #[serde(default)]
    pub bind_tcp: Vec<u16>,
    /// Pathname Unix sockets the command may connect to (Landlock ABI ≥ 9 only;
    /// before that, the uid and peer-credential checks stand in).
    #[serde(default)]
    pub connect_unix: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvProfile {
    /// Variables copied from cordon's environment (`NAME`, or `PREFIX*`).
    #[serde(default)]
    pub pass: Vec<String>,
    /// Variables set to a value (placeholders allowed); they win over `pass`.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsProfile {
    /// Memory of the agent's cgroup (all its processes), e.g. "2GiB".
    #[serde(default, with = "opt_bytes")]
    pub memory: Option<u64>,
    /// Processes and threads in the agent's cgroup.
    pub pids: Option<u64>,
    /// Open files per process (RLIMIT_NOFILE).
    pub nofile: Option<u64>,
    /// CPU weight, 1..=10000 (cgroup v2 `cpu.weight`; v1 `cpu.shares` scaled).
    pub cpu_weight: Option<u32>,
}

mod opt_bytes {
    use super::ByteSize;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Ok(Option::<ByteSize>::deserialize(d)?.map(|b| b.0))
    }
    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_some(n),
            None => s.serialize_none(),
        }
    }
}

impl LimitsProfile {
    pub fn needs_cgroup(&self) -> bool {
        self.memory.is_some() || self.pids.is_some() || self.cpu_weight.is_some()
    }
}

/// Where deployed agents' `auto` uids come from when the profile sets no
/// `uid_range`: agent number i of a deployment gets `61000 + i`.
pub const DEPLOYMENT_UID_RANGE: [u32; 2] = [61000, 61999];

/// Where `cordon sandbox run` takes `auto` uids when the profile sets no
/// `uid_range` (a hash of `--name`): a range of its own, so an ad-hoc run can
/// never be given a deployed agent's uid (and reach its socket and files).
pub const ADHOC_UID_RANGE: [u32; 2] = [60000, 60999];

/// A sandbox profile as written. Paths may use `{workdir}`, `{home}`, `{tmp}`,
/// `{socket}`, `{cordon}` (the cordon binary, for `cordon bridge`) and
/// `{cmd_dir}` (the directory of the command's resolved executable).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    #[serde(default)]
    pub require: Require,
    #[serde(default)]
    pub user: UserSpec,
    /// Inclusive range the `auto` uids come from; default
    /// [`DEPLOYMENT_UID_RANGE`] in a deployment, [`ADHOC_UID_RANGE`] under
    /// `sandbox run`.
    #[serde(default)]
    pub uid_range: Option<[u32; 2]>,
    /// Read (files and directory listings).
    #[serde(default)]
    pub read: Vec<String>,
    /// Read and write, create, remove, rename, truncate (not execute).
    #[serde(default)]
    pub write: Vec<String>,
    /// Read and execute.
    #[serde(default)]
    pub exec: Vec<String>,
    #[serde(default)]
    pub net: NetProfile,
    #[serde(default)]
    pub env: EnvProfile,
    #[serde(default)]
    pub limits: LimitsProfile,
}

/// A profile in a deployment config: `sandbox = "profiles/x.toml"` (relative to
/// the config) or an inline `[agents.<name>.sandbox]` table. After
/// `Config::load` every source is `Inline` (files are read and checked at load).
#[derive(Debug, Clone)]
pub enum ProfileSource {
    File(PathBuf),
    Inline(Box<Profile>),
}

impl<'de> Deserialize<'de> for ProfileSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ProfileSource;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a profile file path or an inline profile table")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ProfileSource, E> {
                Ok(ProfileSource::File(PathBuf::from(v)))
            }
            // Not untagged: an inline table keeps the profile's own errors
            // (unknown field, line and column) instead of "no variant matched".
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ProfileSource, A::Error> {
                let profile =
                    Profile::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(ProfileSource::Inline(Box::new(profile)))
            }
        }
        d.deserialize_any(V)
    }
}

impl ProfileSource {
    /// Reads a file source (relative to `base`) and checks either kind.
    pub fn resolve(&mut self, base: &Path) -> Result<(), ProfileError> {
        if let ProfileSource::File(path) = self {
            let path = base.join(&*path);
            *self = ProfileSource::Inline(Box::new(Profile::load(&path)?));
        } else if let ProfileSource::Inline(profile) = self {
            profile
                .validate()
                .map_err(|message| ProfileError::Invalid {
                    path: PathBuf::from("(inline)"),
                    message,
                })?;
        }
        Ok(())
    }

    /// The profile, once resolved (`Config::load` resolves every source).
    pub fn profile(&self) -> Option<&Profile> {
        match self {
            ProfileSource::Inline(p) => Some(p),
            ProfileSource::File(_) => None,
        }
    }
}

pub const PLACEHOLDERS: &[&str] = &[
    "{workdir}",
    "{home}",
    "{tmp}",
    "{socket}",
    "{cordon}",
    "{cmd_dir}",
];

impl Profile {
    pub fn load(path: &Path) -> Result<Profile, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Profile::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Profile, ProfileError> {
        let profile: Profile = toml::from_str(text).map_err(|e| ProfileError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        profile
            .validate()
            .map_err(|message| ProfileError::Invalid {
                path: path.to_path_buf(),
                message,
            })?;
        Ok(profile)
    }

    /// Checks that can only be made after parsing.
    pub fn validate(&self) -> Result<(), String> {
        for (list, entries) in [
            ("read", &self.read),
            ("write", &self.write),
            ("exec", &self.exec),
            ("net.connect_unix", &self.net.connect_unix),
        ] {
            for entry in entries {
                check_path_template(entry).map_err(|m| format!("{list}: {m}"))?;
            }
        }
        for (name, value) in &self.env.set {
            check_env_name(name)?;
            check_placeholders(value).map_err(|m| format!("env.set.{name}: {m}"))?;
        }
        for name in &self.env.pass {
            check_env_name(name.strip_suffix('*').unwrap_or(name))
                .map_err(|m| format!("env.pass: {m}"))?;
        }
        if let Some([lo, hi]) = self.uid_range {
            if lo == 0 || hi < lo {
                return Err(format!(
                    "uid_range [{lo}, {hi}] must be a non-empty range that excludes root (0)"
                ));
            }
        }
        if let Some(w) = self.limits.cpu_weight {
            if !(1..=10000).contains(&w) {
                return Err(format!("limits.cpu_weight is {w}; it must be 1..=10000"));
            }
        }
        if self.limits.pids == Some(0) || self.limits.nofile == Some(0) {
            return Err("limits.pids and limits.nofile must be at least 1".into());
        }
        if let Some(m) = self.limits.memory {
            if m < (4 << 20) {
                return Err("limits.memory must be at least 4MiB".into());
            }
        }
        Ok(())
    }
}

fn check_env_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid environment variable name"))
    }
}

fn check_placeholders(s: &str) -> Result<(), String> {
    let mut rest = s;
    while let Some(start) = rest.find('{') {
        let tail = &rest[start..];
        let end = tail
            .find('}')
            .ok_or_else(|| format!("{s:?}: unclosed '{{'"))?;
        let ph = &tail[..=end];
        if !PLACEHOLDERS.contains(&ph) {
            return Err(format!(
                "{s:?}: unknown placeholder {ph} (known: {})",
                PLACEHOLDERS.join(", ")
            ));
        }
        rest = &tail[end + 1..];
    }
    Ok(())
}

/// Paths must be absolute once expanded: a relative rule would depend on
/// whichever directory the helper happens to start in.
fn check_path_template(s: &str) -> Result<(), String> {
    check_placeholders(s)?;
    if !(s.starts_with('/') || s.starts_with('{')) {
        return Err(format!(
            "{s:?} must be absolute or start with a placeholder"
        ));
    }
    if Path::new(s)
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(format!("{s:?} must not contain '..'"));
    }
    Ok(())
}

/// Values for the placeholders of one run.
#[derive(Debug, Clone, Default)]
pub struct Placeholders {
    pub workdir: PathBuf,
    pub home: PathBuf,
    pub tmp: PathBuf,
    pub socket: Option<PathBuf>,
    pub cordon: PathBuf,
    pub cmd_dir: Option<PathBuf>,
}

impl Placeholders {
    /// Expands every placeholder; `None` when the template uses one with no value
    /// here (`{socket}` outside a deployment, `{cmd_dir}` for a missing command).
    pub fn expand(&self, template: &str) -> Option<String> {
        let mut out = template.to_string();
        let pairs: [(&str, Option<&Path>); 6] = [
            ("{workdir}", Some(&self.workdir)),
            ("{home}", Some(&self.home)),
            ("{tmp}", Some(&self.tmp)),
            ("{socket}", self.socket.as_deref()),
            ("{cordon}", Some(&self.cordon)),
            ("{cmd_dir}", self.cmd_dir.as_deref()),
        ];
        for (ph, value) in pairs {
            if out.contains(ph) {
                let v = value?;
                out = out.replace(ph, &v.to_string_lossy());
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Profile, String> {
        Profile::parse(text, Path::new("p.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_a_full_profile() {
        let p = parse(
            r#"
require = "best-effort"
user = "inherit"
read = ["/etc"]
write = ["{workdir}", "{home}/x"]
exec = ["/usr", "{cmd_dir}"]
[net]
connect_tcp = [443]
connect_unix = ["{socket}"]
[env]
pass = ["PATH", "LC_*"]
set = { HOME = "{home}" }
[limits]
memory = "512MiB"
pids = 64
nofile = 1024
cpu_weight = 100
"#,
        )
        .unwrap();
        assert_eq!(p.require, Require::BestEffort);
        assert_eq!(p.user, UserSpec::Inherit);
        assert_eq!(p.limits.memory, Some(512 << 20));
        assert_eq!(p.net.connect_tcp, vec![443]);
        assert!(p.net.bind_tcp.is_empty());
        assert_eq!(p.user, UserSpec::Inherit);
    }

    #[test]
    fn unknown_fields_are_errors_with_position() {
        let err = parse("read = []\nwirte = [\"/tmp\"]\n").unwrap_err();
        assert!(err.contains("wirte") && err.contains("line 2"), "{err}");
        let err = parse("[limits]\nmemroy = \"1GiB\"\n").unwrap_err();
        assert!(err.contains("memroy"), "{err}");
    }

    #[test]
    fn rejects_bad_paths_placeholders_and_limits() {
        assert!(parse("read = [\"etc\"]").unwrap_err().contains("absolute"));
        assert!(parse("read = [\"/a/../b\"]").unwrap_err().contains(".."));
        assert!(parse("read = [\"{hmoe}/x\"]")
            .unwrap_err()
            .contains("unknown placeholder"));
        assert!(parse("[limits]\ncpu_weight = 0").is_err());
        assert!(parse("uid_range = [0, 10]").is_err());
        assert!(parse("[env]\npass = [\"A-B\"]").is_err());
        assert!(parse("require = \"maybe\"").is_err());
    }

    #[test]
    fn expands_placeholders() {
        let ph = Placeholders {
            workdir: "/w".into(),
            home: "/h".into(),
            tmp: "/h/tmp".into(),
            socket: None,
            cordon: "/bin/cordon".into(),
            cmd_dir: Some("/opt/x".into()),
        };
        assert_eq!(ph.expand("{home}/.cache").unwrap(), "/h/.cache");
        assert_eq!(ph.expand("{cmd_dir}").unwrap(), "/opt/x");
        assert_eq!(ph.expand("{socket}"), None);
    }

    #[test]
    fn shipped_profiles_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/profiles");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            Profile::load(&path).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
