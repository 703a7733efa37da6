//! Reading the audit log for people and SIEMs: filters, tables, export, stats.
