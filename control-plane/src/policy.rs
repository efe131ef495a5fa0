//! Tool-call policy: per agent, per tool `allow` / `ask` / `deny`, with
//! argument patterns.
//!
//! ```toml
//! [policy]
//! default = "allow"            # verdict for the agent's tools when no rule matches
//! approval-timeout = "10m"     # an unanswered approval is denied after this; absent: wait
//!
//! [[policy.rule]]              # rules are tried in order; the first match decides
//! tool = "exec"
//! when = { command = "cargo test*" }   # argument → glob; all must match
//! verdict = "allow"
//!
//! [[policy.rule]]
//! tool = "exec"
//! verdict = "ask"
//! reason = "commands other than cargo test need a human"
//! ```
//!
//! A `when` key names a top-level argument (`command`) or, starting with `/`,
//! a JSON pointer (`/options/force`). String arguments are matched as they
//! are, anything else as its JSON text; a missing argument does not match.
//! Globs: `*` any run of characters (including `/`), `?` one character,
//! `[abc]` a class. Tools not listed in the agent's `tools` are always denied
//! (rule `agent.tools`), before any rule is looked at.

use std::collections::BTreeMap;
use std::time::Duration;

use globset::{Glob, GlobMatcher};
use harness_proto::control::v1 as control;
use serde::Deserialize;

/// Rule name of the agent's default verdict.
pub const DEFAULT_RULE: &str = "default";
/// Rule name that denies tools missing from the agent's `tools` list.
pub const AGENT_TOOLS_RULE: &str = "agent.tools";

/// What to do with a tool call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Run it.
    #[default]
    Allow,
    /// Ask a human (`ResolveApproval`) first.
    Ask,
    /// Refuse it; the model is told why.
    Deny,
}

impl Verdict {
    /// The contract's verdict.
    pub fn to_proto(self) -> control::Verdict {
        match self {
            Self::Allow => control::Verdict::Allow,
            Self::Ask => control::Verdict::Ask,
            Self::Deny => control::Verdict::Deny,
        }
    }

    /// The verdict a contract value names; none for `UNSPECIFIED`.
    pub fn from_proto(verdict: control::Verdict) -> Option<Self> {
        match verdict {
            control::Verdict::Allow => Some(Self::Allow),
            control::Verdict::Ask => Some(Self::Ask),
            control::Verdict::Deny => Some(Self::Deny),
            control::Verdict::Unspecified => None,
        }
    }
}

/// One `[[policy.rule]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RuleSettings {
    /// Tool name or glob (`"*"` for every tool).
    pub tool: String,
    /// Argument patterns; every one must match. Empty: any arguments.
    #[serde(default)]
    pub when: BTreeMap<String, String>,
    /// The verdict when the rule matches.
    pub verdict: Verdict,
    /// Why, shown to the model on `deny` and to the approver on `ask`.
    #[serde(default)]
    pub reason: Option<String>,
}

/// The `[policy]` table of an agent file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PolicySettings {
    /// Verdict for the agent's tools when no rule matches. Default: allow.
    #[serde(default)]
    pub default: Verdict,
    /// How long an approval request waits before it is denied, e.g. "10m".
    /// Absent: it waits until someone answers (across restarts).
    #[serde(default, with = "humantime_serde")]
    pub approval_timeout: Option<Duration>,
    /// Rules, tried in order.
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleSettings>,
}

/// A policy setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A glob does not parse.
    #[error("policy.rule[{index}]: bad pattern {pattern:?}")]
    BadPattern {
        /// The rule's position.
        index: usize,
        /// The pattern.
        pattern: String,
        /// Why.
        #[source]
        source: globset::Error,
    },
    /// A `when` key is empty.
    #[error("policy.rule[{index}]: an empty argument name in `when`")]
    EmptyArgument {
        /// The rule's position.
        index: usize,
    },
    /// A recorded policy names no verdict where one is needed.
    #[error("recorded policy: {place} has no verdict")]
    MissingVerdict {
        /// `default` or `policy.rule[N]`.
        place: String,
    },
}

impl PolicySettings {
    /// The settings as recorded in a session's `started` event.
    pub fn to_proto(&self) -> control::ResolvedPolicy {
        control::ResolvedPolicy {
            default_verdict: self.default.to_proto().into(),
            approval_timeout: self.approval_timeout.map(harness_proto::duration_to_proto),
            rules: self
                .rules
                .iter()
                .map(|rule| control::ResolvedPolicyRule {
                    tool: rule.tool.clone(),
                    when: rule.when.clone().into_iter().collect(),
                    verdict: rule.verdict.to_proto().into(),
                    reason: rule.reason.clone(),
                })
                .collect(),
        }
    }

    /// The settings a session recorded (the inverse of [`Self::to_proto`]).
    pub fn from_proto(recorded: &control::ResolvedPolicy) -> Result<Self, PolicyError> {
        let verdict = |verdict, place: String| {
            Verdict::from_proto(verdict).ok_or(PolicyError::MissingVerdict { place })
        };
        let rules = recorded
            .rules
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                Ok(RuleSettings {
                    tool: rule.tool.clone(),
                    when: rule.when.clone().into_iter().collect(),
                    verdict: verdict(rule.verdict(), format!("policy.rule[{index}]"))?,
                    reason: rule.reason.clone(),
                })
            })
            .collect::<Result<_, PolicyError>>()?;
        Ok(Self {
            default: verdict(recorded.default_verdict(), DEFAULT_RULE.to_owned())?,
            approval_timeout: recorded
                .approval_timeout
                .as_ref()
                .map(harness_proto::duration_from_proto),
            rules,
        })
    }
}

#[derive(Debug, Clone)]
struct Rule {
    name: String,
    tool: GlobMatcher,
    when: Vec<(String, GlobMatcher)>,
    verdict: Verdict,
    reason: Option<String>,
}

/// A compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    default: Verdict,
    rules: Vec<Rule>,
    /// See [`PolicySettings::approval_timeout`].
    pub approval_timeout: Option<Duration>,
}

/// The outcome of [`Policy::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The verdict.
    pub verdict: Verdict,
    /// The rule that decided: `policy.rule[N]`, `default` or `agent.tools`.
    pub rule: String,
    /// Why (empty for a plain allow).
    pub reason: String,
}

fn glob(index: usize, pattern: &str) -> Result<GlobMatcher, PolicyError> {
    Glob::new(pattern)
        .map(|glob| glob.compile_matcher())
        .map_err(|source| PolicyError::BadPattern {
            index,
            pattern: pattern.to_owned(),
            source,
        })
}

impl Policy {
    /// Compiles the settings.
    pub fn new(settings: &PolicySettings) -> Result<Self, PolicyError> {
        let rules = settings
            .rules
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                let when = rule
                    .when
                    .iter()
                    .map(|(argument, pattern)| {
                        if argument.is_empty() {
                            return Err(PolicyError::EmptyArgument { index });
                        }
                        Ok((argument.clone(), glob(index, pattern)?))
                    })
                    .collect::<Result<_, _>>()?;
                Ok(Rule {
                    name: format!("policy.rule[{index}]"),
                    tool: glob(index, &rule.tool)?,
                    when,
                    verdict: rule.verdict,
                    reason: rule.reason.clone(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            default: settings.default,
            rules,
            approval_timeout: settings.approval_timeout,
        })
    }

    /// Decides on a call of `tool` with `arguments` by an agent named `agent`
    /// whose tools are `agent_tools`.
    pub fn decide(
        &self,
        agent: &str,
        agent_tools: &[String],
        tool: &str,
        arguments: &serde_json::Value,
    ) -> Decision {
        if !agent_tools.iter().any(|listed| listed == tool) {
            return Decision {
                verdict: Verdict::Deny,
                rule: AGENT_TOOLS_RULE.to_owned(),
                reason: format!(
                    "tool \"{tool}\" is not available to agent \"{agent}\"; its tools are: {}",
                    agent_tools.join(", ")
                ),
            };
        }
        let matched = self
            .rules
            .iter()
            .find(|rule| rule.tool.is_match(tool) && rule.matches_arguments(arguments));
        let Some(rule) = matched else {
            return Decision {
                verdict: self.default,
                rule: DEFAULT_RULE.to_owned(),
                reason: match self.default {
                    Verdict::Allow => String::new(),
                    Verdict::Ask => format!("agent \"{agent}\" asks before every \"{tool}\" call"),
                    Verdict::Deny => {
                        format!("agent \"{agent}\" denies \"{tool}\" calls that no rule allows")
                    }
                },
            };
        };
        let reason = match (&rule.reason, rule.verdict) {
            (Some(reason), _) => reason.clone(),
            (None, Verdict::Allow) => String::new(),
            (None, Verdict::Ask) => {
                format!("{} asks for approval of this \"{tool}\" call", rule.name)
            }
            (None, Verdict::Deny) => format!("{} denies this \"{tool}\" call", rule.name),
        };
        Decision {
            verdict: rule.verdict,
            rule: rule.name.clone(),
            reason,
        }
    }
}

impl Rule {
    fn matches_arguments(&self, arguments: &serde_json::Value) -> bool {
        self.when.iter().all(|(argument, pattern)| {
            let value = if argument.starts_with('/') {
                arguments.pointer(argument)
            } else {
                arguments.get(argument)
            };
            match value {
                Some(serde_json::Value::String(text)) => pattern.is_match(text),
                Some(other) => pattern.is_match(other.to_string()),
                None => false,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::json;

    use super::*;

    const POLICY: &str = r#"
        default = "allow"
        approval-timeout = "2m"

        [[rule]]
        tool = "exec"
        when = { command = "cargo test*" }
        verdict = "allow"

        [[rule]]
        tool = "exec"
        when = { "/env/PROD" = "true" }
        verdict = "deny"
        reason = "never against production"

        [[rule]]
        tool = "exec"
        verdict = "ask"

        [[rule]]
        tool = "write_*"
        when = { path = "secrets/*" }
        verdict = "deny"
    "#;

    fn policy() -> Policy {
        Policy::new(&toml::from_str::<PolicySettings>(POLICY).unwrap()).unwrap()
    }

    fn decide(tool: &str, arguments: serde_json::Value) -> (Verdict, String, String) {
        let tools = ["exec", "write_file", "read_file"].map(str::to_owned);
        let decision = policy().decide("builder", &tools, tool, &arguments);
        (decision.verdict, decision.rule, decision.reason)
    }

    #[test]
    fn first_matching_rule_decides_with_argument_patterns() {
        assert_eq!(
            decide("exec", json!({"command": "cargo test --workspace"})),
            (Verdict::Allow, "policy.rule[0]".to_owned(), String::new())
        );
        assert_eq!(
            decide(
                "exec",
                json!({"command": "rm -rf /", "env": {"PROD": true}})
            ),
            (
                Verdict::Deny,
                "policy.rule[1]".to_owned(),
                "never against production".to_owned()
            )
        );
        assert_eq!(
            decide("exec", json!({"command": "cargo build"})),
            (
                Verdict::Ask,
                "policy.rule[2]".to_owned(),
                "policy.rule[2] asks for approval of this \"exec\" call".to_owned()
            )
        );
        assert_eq!(
            decide("write_file", json!({"path": "secrets/key.pem"})).0,
            Verdict::Deny
        );
        assert_eq!(
            decide("write_file", json!({"path": "notes/a.txt"})),
            (Verdict::Allow, DEFAULT_RULE.to_owned(), String::new())
        );
    }

    #[test]
    fn a_missing_argument_does_not_match_a_pattern() {
        assert_eq!(decide("exec", json!({})).1, "policy.rule[2]");
    }

    #[test]
    fn tools_the_agent_does_not_list_are_denied_first() {
        assert_eq!(
            decide("delete_everything", json!({})),
            (
                Verdict::Deny,
                AGENT_TOOLS_RULE.to_owned(),
                "tool \"delete_everything\" is not available to agent \"builder\"; its tools are: exec, write_file, read_file".to_owned()
            )
        );
    }

    #[test]
    fn settings_parse_with_defaults_and_the_timeout() {
        let settings: PolicySettings = toml::from_str(POLICY).unwrap();
        assert_eq!(settings.approval_timeout, Some(Duration::from_secs(120)));
        assert_eq!(settings.rules.len(), 4);
        assert_eq!(PolicySettings::default().default, Verdict::Allow);
    }

    #[test]
    fn bad_globs_are_rejected_naming_the_rule() {
        let settings = PolicySettings {
            rules: vec![RuleSettings {
                tool: "exec".to_owned(),
                when: BTreeMap::from([("command".to_owned(), "[unclosed".to_owned())]),
                verdict: Verdict::Allow,
                reason: None,
            }],
            ..Default::default()
        };
        let error = Policy::new(&settings).unwrap_err();
        assert_eq!(
            error.to_string(),
            "policy.rule[0]: bad pattern \"[unclosed\""
        );
    }
}
