//! The policy checks of the security audit.
//!
//! SWITCH-OVER POINT: [`lint`] is the single function the audit calls. It implements the two
//! checks the audit needs today (a missing `@reason`; permits with an unconstrained
//! principal or action, and the permit-everything policy). When `chitin policy lint`
//! (`policy::lint`) lands, replace the body of [`lint`] with a mapping of its results onto
//! [`LintIssue`] (keeping these ids, which are a contract of `chitin security audit`).

use cedar_policy::{ActionConstraint, Effect, PolicySet, PrincipalConstraint, ResourceConstraint};

use crate::policy::PolicyInput;

/// One lint result. `id` is the finding id in the security audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LintIssue {
    /// `policy.missing_reason`, `policy.unconstrained_permit` or `policy.permit_all`.
    pub id: &'static str,
    /// The policy's `@id`.
    pub policy: String,
    /// `file:line` of the policy.
    pub location: String,
    /// What is wrong with it.
    pub message: String,
}

/// Lints a policy set that compiled (a set that does not compile is reported as
/// `policy.invalid` before this runs).
pub fn lint(input: &PolicyInput) -> Vec<LintIssue> {
    let mut out = Vec::new();
    for src in &input.policies {
        let Ok(set) = src.text.parse::<PolicySet>() else {
            continue;
        };
        for p in set.policies() {
            let id = p
                .annotation("id")
                .map_or_else(|| p.id().to_string(), str::to_string);
            let location = format!("{}:{}", src.name, line_of(&src.text, &id));
            if p.annotation("reason").is_none_or(|r| r.trim().is_empty()) {
                out.push(LintIssue {
                    id: "policy.missing_reason",
                    policy: id.clone(),
                    location: location.clone(),
                    message: "has no @reason (decisions and approvals show the reason of the policy that decided)".into(),
                });
            }
            if p.effect() != Effect::Permit || p.has_non_scope_constraint() {
                continue;
            }
            let principal_any = matches!(p.principal_constraint(), PrincipalConstraint::Any);
            let action_any = matches!(p.action_constraint(), ActionConstraint::Any);
            let resource_any = matches!(p.resource_constraint(), ResourceConstraint::Any);
            if principal_any && action_any && resource_any {
                out.push(LintIssue {
                    id: "policy.permit_all",
                    policy: id.clone(),
                    location,
                    message: "permits every principal every action on every resource, without a condition".into(),
                });
            } else if principal_any || action_any {
                let what = match (principal_any, action_any) {
                    (true, true) => "any principal to take any action",
                    (true, false) => {
                        "any principal (anyone, including unpaired identities and tools)"
                    }
                    _ => "any action (including admin actions and ones added later)",
                };
                out.push(LintIssue {
                    id: "policy.unconstrained_permit",
                    policy: id,
                    location,
                    message: format!("permits {what} without a condition"),
                });
            }
        }
    }
    out
}

/// The 1-based line of `@id("<id>")` in `text` (1 when it is not found).
fn line_of(text: &str, id: &str) -> usize {
    let needle = format!("@id({})", serde_json::Value::String(id.to_string()));
    text.find(&needle).map_or(1, |at| {
        text.get(..at).map_or(1, |b| b.matches('\n').count() + 1)
    })
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]
    use super::*;
    use crate::policy::Source;

    fn input(text: &str) -> PolicyInput {
        let mut i = PolicyInput::embedded();
        i.policies = vec![Source {
            name: "p.cedar".into(),
            text: text.into(),
        }];
        i
    }

    #[test]
    fn the_default_policies_have_no_lint_issues() {
        assert_eq!(lint(&PolicyInput::embedded()), Vec::new());
    }

    #[test]
    fn a_permit_all_and_a_missing_reason_are_reported_with_their_line() {
        let issues = lint(&input(
            "@id(\"ok\")\n@reason(\"r\")\npermit (principal in Chitin::Group::\"owners\", action == Chitin::Action::\"exec\", resource);\n\n@id(\"wide\")\npermit (principal, action, resource);\n",
        ));
        let got: Vec<_> = issues
            .iter()
            .map(|i| (i.id, i.policy.as_str(), i.location.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("policy.missing_reason", "wide", "p.cedar:5"),
                ("policy.permit_all", "wide", "p.cedar:5"),
            ]
        );
    }

    #[test]
    fn an_unconstrained_principal_is_reported_unless_a_condition_limits_it() {
        let issues = lint(&input(
            "@id(\"a\")\n@reason(\"r\")\npermit (principal, action == Chitin::Action::\"exec\", resource);\n@id(\"b\")\n@reason(\"r\")\npermit (principal, action == Chitin::Action::\"exec\", resource) when { context.approved };\n",
        ));
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].id, "policy.unconstrained_permit");
        assert_eq!(issues[0].policy, "a");
    }
}
