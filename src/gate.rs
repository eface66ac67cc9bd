//! The gate: the only place that turns a policy decision into permission to act.
//!
//! Invariant: only this module constructs [`Authorized`]. Tools, secret release and sandbox
//! launches take an `&Authorized`, so nothing can run without a recorded `allow`.

/// Proof that the policy engine allowed one specific request (and that the decision was
/// audited). It cannot be built outside `gate`.
#[derive(Debug)]
pub struct Authorized {
    principal: String,
    action: String,
    resource: String,
    policies: Vec<String>,
}

impl Authorized {
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "constructed by the gate once it lands")
    )]
    fn new(principal: String, action: String, resource: String, policies: Vec<String>) -> Self {
        Self {
            principal,
            action,
            resource,
            policies,
        }
    }

    /// Only for unit tests inside this crate.
    #[cfg(test)]
    #[allow(
        dead_code,
        reason = "used by unit tests of modules that take an Authorized"
    )]
    pub(crate) fn for_test(principal: &str, action: &str, resource: &str) -> Self {
        Self::new(
            principal.into(),
            action.into(),
            resource.into(),
            vec!["test".into()],
        )
    }

    /// The Cedar principal, e.g. `Chitin::User::"alice"`.
    pub fn principal(&self) -> &str {
        &self.principal
    }
    /// The Cedar action id, e.g. `exec`.
    pub fn action(&self) -> &str {
        &self.action
    }
    /// The Cedar resource, e.g. `Chitin::Tool::"exec"`.
    pub fn resource(&self) -> &str {
        &self.resource
    }
    /// The ids of the policies that allowed it.
    pub fn policies(&self) -> &[String] {
        &self.policies
    }
}
