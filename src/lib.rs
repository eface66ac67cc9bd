//! Chitin: a security-hardened policy gateway for AI agents.
//!
//! See `ARCHITECTURE.md` for the code map and the invariants each module keeps.

pub mod accounts;
pub mod agent;
pub mod approvals;
pub mod automation;
pub mod channels;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod gate;
pub mod gateway;
pub mod lifecycle;
pub mod mcp;
pub mod net;
pub mod policy;
pub mod providers;
pub mod secrets;
pub mod security;
pub mod skills_host;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tools;
pub mod vault;
pub mod workflow_runner;
pub mod workflows;
pub mod wsfs;
