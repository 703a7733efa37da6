//! cordon: run AI agents in kernel-enforced sandboxes that share state only
//! through one policy-checked, audited MCP gateway. The binary (`main.rs`) is a
//! thin CLI over these modules; see DESIGN.md for the map.

pub mod audit;
pub mod bridge;
pub mod call;
pub mod config;
pub mod gateway;
pub mod orchestrator;
pub mod policy;
pub mod sandbox;
pub mod store;
pub mod units;
