//! The gateway's tools as one enum: every place that names a tool matches on
//! it, so a new tool cannot be forgotten in the policy, the catalog or the
//! request parser.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tool {
    Get,
    Put,
    Delete,
    List,
    Scan,
    Txn,
    Watch,
}

impl Tool {
    /// In the order `tools/list` shows them.
    pub const ALL: [Tool; 7] = [
        Tool::Get,
        Tool::Put,
        Tool::Delete,
        Tool::List,
        Tool::Scan,
        Tool::Txn,
        Tool::Watch,
    ];

    /// Their MCP names, in `ALL`'s order.
    pub const NAMES: [&'static str; 7] = [
        "kv_get",
        "kv_put",
        "kv_delete",
        "kv_list",
        "kv_scan",
        "kv_txn",
        "kv_watch",
    ];

    pub fn name(self) -> &'static str {
        Tool::NAMES[self.index()]
    }

    /// The tool an MCP name calls, if it is one of ours.
    pub fn from_name(name: &str) -> Option<Tool> {
        Tool::NAMES
            .iter()
            .position(|n| *n == name)
            .map(|i| Tool::ALL[i])
    }

    /// Its position in `ALL` (and in every per-tool table).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Reads only: never changes the store.
    pub fn read_only(self) -> bool {
        matches!(self, Tool::Get | Tool::List | Tool::Scan | Tool::Watch)
    }
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::Tool;

    #[test]
    fn names_and_indices_agree() {
        for (i, t) in Tool::ALL.iter().enumerate() {
            assert_eq!(t.index(), i);
            assert_eq!(Tool::from_name(t.name()), Some(*t));
        }
        assert_eq!(Tool::from_name("kv_gets"), None);
        assert_eq!(Tool::from_name(""), None);
    }
}
