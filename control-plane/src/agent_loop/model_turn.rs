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
use crate::provider::{
    CompletedTurn, DeltaFilter, ModelRequest, ModelStreamEvent, ProviderError, ToolCall,
};

/// Attempts at a summary before the session stops.
const SUMMARY_ATTEMPTS: u32 = 3;
/// Most tokens a summary may take.
const SUMMARY_MAX_TOKENS: u32 = 2_048;

/// A provider's refusal of a request longer than the model's context.
fn is_context_too_long(error: &ProviderError) -> bool {
    let ProviderError::Status {
        status, message, ..
    } = error
    else {
        return false;
    };
    let message = message.to_ascii_lowercase();
    matches!(status, 400 | 413)
        && [
            "context length",
            "context_length",
            "context window",
            "maximum context",
            "prompt is too long",
            "too many tokens",
            "too long",
        ]
        .iter()
        .any(|needle| message.contains(needle))
}
use crate::store::StepRecord;
use crate::{budget, compaction, crash_hook, prompt};

impl SessionRun<'_> {
    /// Asks the model for turn `turn`; records its text as it streams and,
    /// once complete, its tool calls and the model step.
    pub(super) async fn model_call(
        &mut self,
        turn: u32,
        agent: &SessionAgent,
    ) -> Result<(), LoopError> {
        self.flush().await?;
        self.compact_if_needed(turn, agent, false).await?;
        match self.request_turn(turn, agent).await {
            Err(LoopError::Provider(error))
                if is_context_too_long(&error) && self.state.compacted_turn != Some(turn) =>
            {
                tracing::info!(
                    session_id = self.session.session_id.as_str(),
                    turn,
                    error = %error,
                    "the provider says the context is too long; compacting once and retrying"
                );
                if self.compact_if_needed(turn, agent, true).await? {
                    self.request_turn(turn, agent).await
                } else {
                    Err(LoopError::Provider(error))
                }
            }
            other => other,
        }
    }

    /// Compacts the history before turn `turn`'s request when its estimate
    /// reaches the threshold (or `force`d), at most once per turn; returns
    /// whether it did. The compaction is committed before the request goes
    /// out, so a resumed session replays it instead of summarising again.
    async fn compact_if_needed(
        &mut self,
        turn: u32,
        agent: &SessionAgent,
        force: bool,
    ) -> Result<bool, LoopError> {
        let Some(window) = agent.context_window else {
            return Ok(false);
        };
        if self.state.compacted_turn == Some(turn) {
            return Ok(false);
        }
        let estimate = self.assemble(agent).record.estimated_input_tokens;
        let settings = &self.agent_loop.settings.context;
        let Some(decision) =
            compaction::decide(&self.state.messages, estimate, window, settings, force)
        else {
            return Ok(false);
        };
        let record = match decision {
            compaction::Decision::Clear {
                call_ids,
                tokens_after,
            } => control::Compaction {
                step: control::CompactionStep::ClearToolResults.into(),
                cleared_call_ids: call_ids,
                tokens_before: estimate,
                tokens_after,
                through_seq: self.last_seq,
                ..Default::default()
            },
            compaction::Decision::Summarise {
                assistant_messages,
                tokens_after,
            } => {
                let keep_turns = settings.keep_turns;
                let (model, summary) = self.summarise(agent, assistant_messages).await?;
                let cost_micros = agent
                    .price
                    .filter(|_| model == agent.model)
                    .map_or(0, |price| {
                        price.cost_micros(
                            summary.usage.input_tokens,
                            summary.usage.cached_input_tokens,
                            summary.usage.output_tokens,
                        )
                    });
                let first_turn = self.state.summarised_assistants + 1;
                let summarised = u32::try_from(assistant_messages).unwrap_or(u32::MAX);
                let summary_chars = u64::try_from(summary.text.chars().count()).unwrap_or(u64::MAX);
                control::Compaction {
                    step: control::CompactionStep::Summarise.into(),
                    turns_summarised: summarised,
                    turns_kept: u32::try_from(keep_turns).unwrap_or(u32::MAX),
                    tokens_before: estimate,
                    tokens_after: tokens_after + prompt::estimate_tokens(summary_chars),
                    summary: summary.text,
                    first_turn,
                    last_turn: first_turn + summarised.saturating_sub(1),
                    through_seq: self.last_seq,
                    usage: Some(control::TurnUsage {
                        input_tokens: summary.usage.input_tokens,
                        output_tokens: summary.usage.output_tokens,
                        cached_input_tokens: summary.usage.cached_input_tokens,
                        cost_micros,
                        cache_write_tokens: summary.usage.cache_write_tokens,
                    }),
                    summarised_assistant_messages: summarised,
                    model,
                    ..Default::default()
                }
            }
        };
        tracing::info!(
            session_id = self.session.session_id.as_str(),
            turn,
            step = record.step().as_str_name(),
            tokens_before = record.tokens_before,
            tokens_after = record.tokens_after,
            "compacted the session's history"
        );
        self.stage(turn, Kind::Compaction(record));
        self.flush().await?;
        Ok(true)
    }

    /// Asks the compaction model for a summary of the history before the
    /// last kept turns; three failed attempts stop the session.
    async fn summarise(
        &mut self,
        agent: &SessionAgent,
        assistant_messages: usize,
    ) -> Result<(String, CompletedTurn), LoopError> {
        let model = self
            .agent_loop
            .settings
            .context
            .compaction_model
            .clone()
            .unwrap_or_else(|| agent.model.clone());
        let messages = Arc::new(compaction::summary_request(
            &self.state.messages,
            assistant_messages,
        ));
        let mut last_error = String::new();
        for attempt in 1..=SUMMARY_ATTEMPTS {
            let request = ModelRequest {
                model: model.clone(),
                messages: Arc::clone(&messages),
                tools: Arc::new(Vec::new()),
                max_output_tokens: Some(SUMMARY_MAX_TOKENS),
                output_schema: None,
                cache: prompt::CacheLayout::default(),
                summarised_turns: 0,
            };
            let mut stream = agent.provider.stream_turn(request);
            let outcome = loop {
                match self.until_stopped(stream.next()).await? {
                    Some(Ok(ModelStreamEvent::TextDelta(_))) => {}
                    Some(Ok(ModelStreamEvent::Completed(completed))) => break Ok(completed),
                    Some(Err(error)) => break Err(error),
                    None => break Err(ProviderError::Incomplete),
                }
            };
            match outcome {
                Ok(completed) if !completed.text.trim().is_empty() => {
                    return Ok((model, completed));
                }
                Ok(_) => last_error = "the summary came back empty".to_owned(),
                Err(error) => last_error = crate::error_report::error_chain(&error),
            }
            tracing::warn!(
                session_id = self.session.session_id.as_str(),
                attempt,
                error = last_error,
                "summarising the history failed"
            );
        }
        Err(LoopError::CompactionFailed {
            attempts: SUMMARY_ATTEMPTS,
            error: last_error,
        })
    }

    /// The session's next request laid out by the prompt assembly, the
    /// history index brought up to date first.
    fn assemble(&mut self, agent: &SessionAgent) -> prompt::Assembled {
        self.prompt_history
            .update(self.state.history_generation, &self.state.messages);
        prompt::assemble(
            &agent.prompt_prefix,
            &agent.model,
            &self.prompt_history,
            &self.state.messages,
            self.state.last_request.as_ref(),
            self.state.calibration,
        )
    }

    /// Sends turn `turn`'s request and records its reply.
    async fn request_turn(&mut self, turn: u32, agent: &SessionAgent) -> Result<(), LoopError> {
        let recorded = self
            .state
            .open
            .as_ref()
            .map(|open| open.recorded_text.clone())
            .unwrap_or_default();
        let assembled = self.assemble(agent);
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
            summarised_turns: self.state.summarised_assistants,
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
