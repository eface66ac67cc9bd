//! Lobster-compatible workflows: the file format, conditions, injection-free templating,
//! graphs and dry-run plans.
//!
//! This module is pure: text in, typed values and strings out. It reads no file, runs no
//! process and asks no clock; the command line reads the file and the executor (gate, sandbox,
//! state) runs the steps. Pieces:
//!
//! - [`format`]: [`Workflow`] and its steps as typed values, loaded from YAML or JSON with
//!   `file:line:col` errors ([`LoadError`]).
//! - [`condition`]: `when:` expressions, Lobster's grammar and JavaScript semantics.
//! - [`template`]: `${arg}` and `$step.path` substituted as single quoted words.
//! - [`results`]: step results and the references that read them.
//! - [`plan`]: arguments, the commands a step runs, and the dry-run plan.
//! - [`graph`]: Mermaid, Graphviz and text renderings.
//! - [`envelope`]: Lobster's tool envelope (`--json` output).

pub mod condition;
pub mod envelope;
pub mod format;
pub mod graph;
pub mod plan;
pub mod results;
pub mod source;
pub mod template;

pub use condition::{Condition, ConditionSyntaxError};
pub use format::{
    Action, Approval, ArgSpec, ArgValue, Backoff, Branch, CostAction, CostLimit, EnvVar,
    FileFormat, ForEach, InputRequest, LoadError, OnError, Parallel, Retry, Stdin, Step, StepKind,
    SubStep, SubWorkflow, Wait, Workflow,
};
pub use graph::GraphFormat;
pub use plan::{Args, ArgsError, Command, Plan};
pub use results::{MissingResult, Results, StepRef, StepResult};
pub use source::Pos;
pub use template::{Dialect, RenderError, Template};
