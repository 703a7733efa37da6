//! The gateway's own JSON-RPC error codes, one per meaning.
//!
//! JSON-RPC leaves -32000…-32099 to the implementation, and MCP 2026-07-28
//! keeps -32020…-32099 for the protocol itself. Inside -32000…-32019 the SDKs
//! use a few for their own client-side errors (TypeScript and Python:
//! -32000 "connection closed", -32001 "request timed out"), so a server that
//! answers with those cannot be told apart from a local failure. Cordon's
//! codes start at -32010, which no SDK we tested uses.
//!
//! The table is repeated in README.md ("Error codes"); keep both in step.

use rmcp::model::ErrorCode;

/// The role may not call this tool (or the agent has no role in the policy).
/// Key-level denials are tool errors (`isError: true`, code "denied"), so the
/// agent can read which key and which rule.
pub const DENIED: ErrorCode = ErrorCode(-32010);
/// The call was not run because the connection has too many calls in flight;
/// retry after a reply arrives. (A role's `calls_per_minute` is a tool error,
/// code "rate_limited", so the model reads it.)
pub const RATE_LIMITED: ErrorCode = ErrorCode(-32011);
/// The call's audit record could not be written, so it was refused and no
/// data was returned (fail closed).
pub const AUDIT_UNAVAILABLE: ErrorCode = ErrorCode(-32012);
/// The gateway is shutting down; reconnect to its successor.
pub const SHUTTING_DOWN: ErrorCode = ErrorCode(-32013);
/// The connection was refused before any request was served: the peer's
/// credentials do not match the agent, the peer is not the agent's process,
/// or the agent already has its maximum of connections.
pub const CONNECTION_REFUSED: ErrorCode = ErrorCode(-32014);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_clear_of_sdk_and_protocol_codes() {
        let ours = [
            DENIED,
            RATE_LIMITED,
            AUDIT_UNAVAILABLE,
            SHUTTING_DOWN,
            CONNECTION_REFUSED,
        ];
        for (i, a) in ours.iter().enumerate() {
            assert!((-32019..=-32010).contains(&a.0), "{a:?}");
            for b in &ours[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
