//! The model turn: the request from the session's conversation and its
//! recorded agent, the streamed reply recorded as it arrives (text already
//! recorded before a crash is filtered out), then its tool calls and the
//! model step.

use std::sync::Arc;

use futures::FutureExt;
use futures::StreamExt;
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use prost::Message as _;

use super::resolved::SessionAgent;
use super::state::{self, model_step};
use super::{LoopError, MAX_CALL_ID_LEN, SessionRun};
use crate::provider::{DeltaFilter, ModelRequest, ModelStreamEvent, ProviderError, ToolCall};
use crate::store::StepRecord;
use crate::{budget, crash_hook, prompt};

impl SessionRun<'_> {
    /// Asks the model for turn `turn`; records its text as it streams and,
    /// once complete, its tool calls and the model step.
    pub(super) async fn model_call(
        &mut self,
        turn: u32,
        agent: &SessionAgent,
    ) -> Result<(), LoopError> {
        self.flush().await?;
        let recorded = self
            .state
            .open
            .as_ref()
            .map(|open| open.recorded_text.clone())
            .unwrap_or_default();
        self.prompt_history
            .update(self.state.history_generation, &self.state.messages);
        let assembled = prompt::assemble(
            &agent.prompt_prefix,
            &agent.model,
            &self.prompt_history,
            &self.state.messages,
            self.state.last_request.as_ref(),
            self.state.calibration,
        );
        if let Some(reason) = budget::request_overrun(
            &self.session.budget,
            &self.state.usage,
            assembled.record.estimated_input_tokens,
            agent.price.as_ref(),
        ) {
            return Err(LoopError::RequestOverBudget(reason));
        }
        let request = ModelRequest {
            cache: assembled.cache,
            model: agent.model.clone(),
            messages: Arc::clone(&self.state.messages),
            tools: Arc::clone(&agent.tools),
            max_output_tokens: agent.max_output_tokens,
            output_schema: agent
                .output_schema
                .as_ref()
                .map(|output| Arc::clone(&output.schema)),
        };
        let mut filter = DeltaFilter::new(recorded);
        let mut stream = agent.provider.stream_turn(request);
        let mut first = true;
        let completed = loop {
            let item = self.until_stopped(stream.next()).await?;
            if first {
                crash_hook::model_response_started();
                first = false;
            }
            // Take whatever else is ready, to write it in one go.
            let mut items = vec![item];
            while matches!(items.last(), Some(Some(Ok(ModelStreamEvent::TextDelta(_))))) {
                match stream.next().now_or_never() {
                    Some(next) => items.push(next),
                    None => break,
                }
            }
            let mut done = None;
            for item in items {
                match item {
                    Some(Ok(ModelStreamEvent::TextDelta(text))) => {
                        if let Some(new) = filter.feed(&text) {
                            self.stage(
                                turn,
                                Kind::TextDelta(control::ModelTextDelta { text: new }),
                            );
                        }
                    }
                    Some(Ok(ModelStreamEvent::Completed(completed))) => done = Some(completed),
                    Some(Err(error)) => {
                        self.flush().await?;
                        return Err(LoopError::Provider(error));
                    }
                    None => {
                        self.flush().await?;
                        return Err(LoopError::Provider(ProviderError::Incomplete));
                    }
                }
            }
            if let Some(completed) = done {
                break completed;
            }
            self.flush().await?;
        };
        let calls = self.unique_call_ids(turn, completed.tool_calls);
        let cost_micros = agent.price.map_or(0, |price| {
            price.cost_micros(
                completed.usage.input_tokens,
                completed.usage.cached_input_tokens,
                completed.usage.output_tokens,
            )
        });
        let record = control::TurnCompleted {
            turn,
            assistant_text: completed.text,
            tool_calls: u32::try_from(calls.len()).unwrap_or(u32::MAX),
            usage: Some(control::TurnUsage {
                input_tokens: completed.usage.input_tokens,
                output_tokens: completed.usage.output_tokens,
                cached_input_tokens: completed.usage.cached_input_tokens,
                cost_micros,
                cache_write_tokens: completed.usage.cache_write_tokens,
            }),
            model_stop_reason: completed.stop_reason,
            request: Some(assembled.record),
        };
        // A turn with tool calls is replayed from this record after a crash;
        // a final answer is recorded by its `turn_completed`, written with the
        // next batch.
        if !calls.is_empty() {
            self.staged_steps.push(StepRecord {
                step: model_step(turn),
                payload: record.encode_to_vec(),
            });
        }
        self.state.open_turn(turn).model = Some(state::ModelStep { record });
        for call in calls {
            self.stage(
                turn,
                Kind::ToolCallRequested(control::ToolCallRequested {
                    call_id: call.call_id,
                    tool: call.tool,
                    arguments_json: call.arguments_json,
                }),
            );
        }
        Ok(())
    }

    /// Call ids the model gave, made unique in the session (they key the
    /// invocation ids sandboxd de-duplicates by, and the model's own
    /// references): a missing, odd or repeated id becomes `call_<turn>_<n>`.
    pub(super) fn unique_call_ids(&self, turn: u32, calls: Vec<ToolCall>) -> Vec<ToolCall> {
        // A turn has few calls: a list beats hashing.
        let mut this_turn: Vec<String> = Vec::with_capacity(calls.len());
        calls
            .into_iter()
            .enumerate()
            .map(|(index, mut call)| {
                let used = |id: &str| {
                    self.state.call_ids.contains(id) || this_turn.iter().any(|used| used == id)
                };
                let usable = !call.call_id.is_empty()
                    && call.call_id.len() <= MAX_CALL_ID_LEN
                    && !call.call_id.chars().any(char::is_control);
                if !usable || used(&call.call_id) {
                    let mut id = format!("call_{turn}_{index}");
                    let mut n = 1;
                    while used(&id) {
                        id = format!("call_{turn}_{index}_{n}");
                        n += 1;
                    }
                    call.call_id = id;
                }
                this_turn.push(call.call_id.clone());
                call
            })
            .collect()
    }
}
