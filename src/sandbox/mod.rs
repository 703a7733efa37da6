//! The sandbox: kernel-enforced confinement of one agent (Landlock, seccomp,
//! uid and capabilities, rlimits and cgroups). The only module that makes
//! privilege syscalls.
//!
//! - [`profile`]: the TOML profile format; [`plan`]: a profile resolved for one run.
//! - [`exec`]: `cordon sandbox-exec`, the privilege sequence in one function.
//! - [`cli`]: `cordon sandbox run` (the public front) and `cordon sandbox probe`.

pub mod cli;
pub mod exec;
pub mod landlock;
pub mod limits;
pub mod plan;
pub mod privileges;
pub mod probe;
pub mod profile;
pub mod seccomp;

pub use cli::{ExecArgs, SandboxCommand};
