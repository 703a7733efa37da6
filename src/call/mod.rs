//! A tool call without the protocol: which tool, and its arguments parsed
//! once into the typed request that the policy decides on and the store
//! executes. The gateway (over MCP), `cordon policy explain` and the policy's
//! own tests all start here, so what is decided is what is run.
//!
//! Below `policy` and `gateway`, above `store`: it names keys and values in the
//! store's types and knows nothing of roles or JSON-RPC.

mod request;
mod tool;

pub use request::{Access, Request, RequestError};
pub use tool::Tool;
