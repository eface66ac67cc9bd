//! The agent's `workflow` tool over the runner.
