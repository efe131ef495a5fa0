//! Structured output: an agent with `output-schema` must end with a final
//! answer that is JSON matching it. A mismatch is recorded
//! (`output_rejected`), goes back to the model with what is wrong, and the
//! session goes on — at most `output-retries` times, then it fails.

use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;

use super::resolved::SessionAgent;
use super::{Ending, SessionRun};

/// Longest list of schema violations told to the model.
const MAX_SHOWN_VIOLATIONS: usize = 10;

/// What is wrong with `answer` under `validator`; `Ok` if nothing. A
/// Markdown code fence around the JSON is accepted.
pub fn answer_errors(answer: &str, validator: &jsonschema::Validator) -> Result<(), String> {
    let json = strip_fence(answer.trim());
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|error| format!("the answer is not JSON ({error})"))?;
    let violations: Vec<String> = validator
        .iter_errors(&value)
        .take(MAX_SHOWN_VIOLATIONS)
        .map(|error| {
            let path = error.instance_path().to_string();
            let at = if path.is_empty() {
                "(root)".to_owned()
            } else {
                path
            };
            format!("at {at}: {error}")
        })
        .collect();
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations.join("; "))
    }
}

/// The text inside a ```json … ``` fence, or the text itself.
fn strip_fence(text: &str) -> &str {
    let Some(inner) = text.strip_prefix("```") else {
        return text;
    };
    let inner = inner.strip_prefix("json").unwrap_or(inner);
    inner.strip_suffix("```").unwrap_or(inner).trim()
}

/// The message the model gets after a rejected answer.
pub fn rejection_notice(errors: &str) -> String {
    format!(
        "[harness] Your final answer does not match the required output schema: {errors}. \
         Answer again with only JSON that matches it."
    )
}

impl SessionRun<'_> {
    /// `ending` if the session may end with it: a completed answer must
    /// match the agent's output schema. `None`: the answer went back to the
    /// model (the session goes on).
    pub(super) fn check_structured_answer(
        &mut self,
        ending: Ending,
        agent: &SessionAgent,
    ) -> Option<Ending> {
        let (Ending::Completed(_), Some(output)) = (&ending, &agent.output_schema) else {
            return Some(ending);
        };
        let errors = match answer_errors(&self.state.last_assistant_text, &output.validator) {
            Ok(()) => return Some(ending),
            Err(errors) => errors,
        };
        if self.state.output_rejections >= agent.output_retries {
            return Some(Ending::Error(format!(
                "the final answer does not match the output schema after {} attempts: {errors}",
                self.state.output_rejections + 1
            )));
        }
        let rejected = control::OutputRejected {
            errors,
            attempt: self.state.output_rejections + 1,
        };
        self.stage(self.state.closed_turns, Kind::OutputRejected(rejected));
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn validator() -> jsonschema::Validator {
        jsonschema::validator_for(&serde_json::json!({
            "type": "object",
            "properties": {"severity": {"enum": ["low", "high"]}},
            "required": ["severity"],
        }))
        .unwrap()
    }

    #[test]
    fn a_matching_answer_passes_also_inside_a_fence() {
        assert_eq!(answer_errors(r#"{"severity":"low"}"#, &validator()), Ok(()));
        assert_eq!(
            answer_errors("```json\n{\"severity\":\"high\"}\n```", &validator()),
            Ok(())
        );
    }

    #[test]
    fn mismatches_say_where_and_what() {
        assert_eq!(
            answer_errors(r#"{"severity":"urgent"}"#, &validator()),
            Err(r#"at /severity: "urgent" is not one of "low" or "high""#.to_owned())
        );
        let not_json = answer_errors("It is low.", &validator()).unwrap_err();
        assert!(not_json.starts_with("the answer is not JSON"), "{not_json}");
    }
}
