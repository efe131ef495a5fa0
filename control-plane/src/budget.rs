//! Budgets: turns, tool calls, input and output tokens, cost and wall clock.
//!
//! An agent file sets the limits (`max-turns` and the `[budget]` table);
//! `StartSession` may lower them, never raise them. The loop checks them
//! before every model turn and before dispatching tool calls. At 80% of a
//! limit it records a `budget_warning` and tells the model to wrap up; at
//! 100% it stops with `max_turns` (the turn limit) or `budget_exhausted`
//! (everything else), keeping the last assistant text as the partial result.
//!
//! Cost comes from a per-model price table (USD per million tokens, which is
//! conveniently the same number as micro-dollars per token).

use std::time::Duration;

use harness_proto::control::v1 as control;
use serde::Deserialize;

/// Share of a limit at which the model is told to wrap up, in percent.
pub const WARNING_PERCENT: u64 = 80;

/// One kind of budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BudgetKind {
    /// Model turns.
    Turns,
    /// Dispatched tool calls.
    ToolCalls,
    /// Prompt tokens over the session.
    InputTokens,
    /// Generated tokens over the session.
    OutputTokens,
    /// Cost in micro-dollars.
    Cost,
    /// Wall-clock time since the session was created, in milliseconds.
    WallClock,
}

/// Every kind, in the order they are checked and reported.
pub const ALL_KINDS: [BudgetKind; 6] = [
    BudgetKind::Turns,
    BudgetKind::ToolCalls,
    BudgetKind::InputTokens,
    BudgetKind::OutputTokens,
    BudgetKind::Cost,
    BudgetKind::WallClock,
];

impl BudgetKind {
    /// The name used in `budget_warning` events and messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Turns => "turns",
            Self::ToolCalls => "tool_calls",
            Self::InputTokens => "input_tokens",
            Self::OutputTokens => "output_tokens",
            Self::Cost => "cost",
            Self::WallClock => "wall_clock",
        }
    }

    /// The kind called `name`, as recorded in a `budget_warning`.
    pub fn from_name(name: &str) -> Option<Self> {
        ALL_KINDS.into_iter().find(|kind| kind.name() == name)
    }

    /// The limit in `limits`, in this kind's unit.
    pub fn limit(self, limits: &control::BudgetLimits) -> Option<u64> {
        match self {
            Self::Turns => limits.max_turns.map(u64::from),
            Self::ToolCalls => limits.max_tool_calls.map(u64::from),
            Self::InputTokens => limits.max_input_tokens,
            Self::OutputTokens => limits.max_output_tokens,
            Self::Cost => limits.max_cost_micros,
            Self::WallClock => limits
                .max_wall_clock
                .map(|duration| harness_proto::duration_from_proto(&duration))
                .map(millis),
        }
    }

    /// What has been used, in this kind's unit.
    pub fn used(self, usage: &control::BudgetUsage, elapsed: Duration) -> u64 {
        match self {
            Self::Turns => u64::from(usage.turns),
            Self::ToolCalls => u64::from(usage.tool_calls),
            Self::InputTokens => usage.input_tokens,
            Self::OutputTokens => usage.output_tokens,
            Self::Cost => usage.cost_micros,
            Self::WallClock => millis(elapsed),
        }
    }

    /// The unit, for messages.
    fn unit(self) -> &'static str {
        match self {
            Self::Turns => "turns",
            Self::ToolCalls => "tool calls",
            Self::InputTokens => "input tokens",
            Self::OutputTokens => "output tokens",
            Self::Cost => "micro-dollars",
            Self::WallClock => "ms of wall-clock time",
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The first budget that is used up, if any (turns first).
pub fn exhausted(
    limits: &control::BudgetLimits,
    usage: &control::BudgetUsage,
    elapsed: Duration,
) -> Option<BudgetKind> {
    ALL_KINDS.into_iter().find(|kind| {
        kind.limit(limits)
            .is_some_and(|limit| kind.used(usage, elapsed) >= limit)
    })
}

/// Warnings for budgets at or past 80% that have not been warned about yet.
pub fn new_warnings(
    limits: &control::BudgetLimits,
    usage: &control::BudgetUsage,
    elapsed: Duration,
    already_warned: &[BudgetKind],
) -> Vec<control::BudgetWarning> {
    ALL_KINDS
        .into_iter()
        .filter(|kind| !already_warned.contains(kind))
        .filter_map(|kind| {
            let limit = kind.limit(limits)?;
            let used = kind.used(usage, elapsed);
            (limit > 0 && used.saturating_mul(100) >= limit.saturating_mul(WARNING_PERCENT)).then(
                || control::BudgetWarning {
                    budget: kind.name().to_owned(),
                    used,
                    limit,
                },
            )
        })
        .collect()
}

/// The wrap-up notice the model gets for a warning.
pub fn wrap_up_notice(warning: &control::BudgetWarning) -> String {
    let unit = BudgetKind::from_name(&warning.budget).map_or("", BudgetKind::unit);
    format!(
        "[harness] Budget notice: {used} of {limit} {unit} used ({budget}). \
         Wrap up now: finish the task with what you have, or summarise your progress \
         and what remains. The session stops when the budget runs out.",
        used = warning.used,
        limit = warning.limit,
        budget = warning.budget,
    )
}

/// Why the session stopped for a budget, for the `finished` event.
pub fn exhausted_message(
    kind: BudgetKind,
    limits: &control::BudgetLimits,
    usage: &control::BudgetUsage,
    elapsed: Duration,
) -> String {
    format!(
        "the {} budget is used up ({} of {} {})",
        kind.name(),
        kind.used(usage, elapsed),
        kind.limit(limits).unwrap_or_default(),
        kind.unit()
    )
}

/// The budget a model request estimated at `input_tokens` would overrun,
/// checked before it is sent: the input-token budget, then the cost budget
/// (the estimate priced as uncached input, output not counted). Returns why
/// the request is not sent.
pub fn request_overrun(
    limits: &control::BudgetLimits,
    usage: &control::BudgetUsage,
    input_tokens: u64,
    price: Option<&ModelPrice>,
) -> Option<String> {
    let projected = |kind: BudgetKind, used: u64, more: u64| {
        let limit = kind.limit(limits)?;
        let after = used.saturating_add(more);
        (after > limit).then(|| {
            format!(
                "the next model request was not sent: its estimated {input_tokens} input \
                 tokens would bring the {} budget to {after} of {limit} {}",
                kind.name(),
                kind.unit()
            )
        })
    };
    projected(BudgetKind::InputTokens, usage.input_tokens, input_tokens).or_else(|| {
        let cost = price.map_or(0, |price| price.cost_micros(input_tokens, 0, 0));
        projected(BudgetKind::Cost, usage.cost_micros, cost)
    })
}

/// Prices of one model, in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ModelPrice {
    /// Uncached prompt tokens.
    pub input_usd_per_mtok: f64,
    /// Prompt tokens read from the provider's cache; default: the input price.
    #[serde(default)]
    pub cached_input_usd_per_mtok: Option<f64>,
    /// Generated tokens.
    pub output_usd_per_mtok: f64,
}

impl ModelPrice {
    /// The price as recorded in a session's `started` event.
    pub fn to_proto(&self) -> control::ModelPrice {
        control::ModelPrice {
            input_usd_per_mtok: self.input_usd_per_mtok,
            cached_input_usd_per_mtok: self.cached_input_usd_per_mtok,
            output_usd_per_mtok: self.output_usd_per_mtok,
        }
    }

    /// The price a session recorded.
    pub fn from_proto(recorded: &control::ModelPrice) -> Self {
        Self {
            input_usd_per_mtok: recorded.input_usd_per_mtok,
            cached_input_usd_per_mtok: recorded.cached_input_usd_per_mtok,
            output_usd_per_mtok: recorded.output_usd_per_mtok,
        }
    }

    /// Cost of one turn in micro-dollars, rounded up.
    pub fn cost_micros(
        &self,
        input_tokens: u64,
        cached_input_tokens: u64,
        output_tokens: u64,
    ) -> u64 {
        let cached = cached_input_tokens.min(input_tokens);
        let uncached = input_tokens - cached;
        let cached_price = self
            .cached_input_usd_per_mtok
            .unwrap_or(self.input_usd_per_mtok);
        // USD per million tokens == micro-dollars per token.
        let micros = uncached as f64 * self.input_usd_per_mtok
            + cached as f64 * cached_price
            + output_tokens as f64 * self.output_usd_per_mtok;
        if micros.is_finite() && micros > 0.0 {
            micros.ceil() as u64
        } else {
            0
        }
    }
}

/// A `StartSession` budget override above the agent's limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "budget.{field} = {requested} is above the agent's limit of {limit}; budgets can only be lowered"
)]
pub struct RaisedBudget {
    /// The budget field.
    pub field: &'static str,
    /// The value asked for.
    pub requested: u64,
    /// The agent's limit.
    pub limit: u64,
}

/// The agent's limits, lowered by `requested` where it sets a field. A field
/// the agent leaves unlimited may be set to anything.
pub fn lowered(
    agent: &control::BudgetLimits,
    requested: Option<&control::BudgetLimits>,
) -> Result<control::BudgetLimits, RaisedBudget> {
    let Some(requested) = requested else {
        return Ok(*agent);
    };
    fn pick<T: Copy + Ord + Into<u64>>(
        field: &'static str,
        agent: Option<T>,
        requested: Option<T>,
    ) -> Result<Option<T>, RaisedBudget> {
        match (agent, requested) {
            (Some(limit), Some(asked)) if asked > limit => Err(RaisedBudget {
                field,
                requested: asked.into(),
                limit: limit.into(),
            }),
            (_, Some(asked)) => Ok(Some(asked)),
            (limit, None) => Ok(limit),
        }
    }
    let wall = |limits: &control::BudgetLimits| {
        limits
            .max_wall_clock
            .map(|duration| harness_proto::duration_from_proto(&duration))
            .map(millis)
    };
    let max_wall_clock_ms = pick("max_wall_clock_ms", wall(agent), wall(requested))?;
    Ok(control::BudgetLimits {
        max_turns: pick("max_turns", agent.max_turns, requested.max_turns)?,
        max_tool_calls: pick(
            "max_tool_calls",
            agent.max_tool_calls,
            requested.max_tool_calls,
        )?,
        max_input_tokens: pick(
            "max_input_tokens",
            agent.max_input_tokens,
            requested.max_input_tokens,
        )?,
        max_output_tokens: pick(
            "max_output_tokens",
            agent.max_output_tokens,
            requested.max_output_tokens,
        )?,
        max_cost_micros: pick(
            "max_cost_micros",
            agent.max_cost_micros,
            requested.max_cost_micros,
        )?,
        max_wall_clock: max_wall_clock_ms
            .map(|ms| harness_proto::duration_to_proto(Duration::from_millis(ms))),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_request_is_not_sent_when_its_estimate_would_overrun_a_budget() {
        let limits = control::BudgetLimits {
            max_input_tokens: Some(1_000),
            max_cost_micros: Some(500),
            ..Default::default()
        };
        let usage = control::BudgetUsage {
            input_tokens: 900,
            cost_micros: 400,
            ..Default::default()
        };
        let price = ModelPrice {
            input_usd_per_mtok: 1.0,
            cached_input_usd_per_mtok: None,
            output_usd_per_mtok: 4.0,
        };
        assert_eq!(request_overrun(&limits, &usage, 100, Some(&price)), None);
        assert_eq!(
            request_overrun(&limits, &usage, 101, Some(&price)).as_deref(),
            Some(
                "the next model request was not sent: its estimated 101 input tokens would \
                 bring the input_tokens budget to 1001 of 1000 input tokens"
            )
        );
        let cheap_tokens = control::BudgetLimits {
            max_input_tokens: None,
            ..limits
        };
        assert_eq!(
            request_overrun(&cheap_tokens, &usage, 150, Some(&price)).as_deref(),
            Some(
                "the next model request was not sent: its estimated 150 input tokens would \
                 bring the cost budget to 550 of 500 micro-dollars"
            )
        );
        assert_eq!(request_overrun(&cheap_tokens, &usage, 150, None), None);
    }

    fn limits() -> control::BudgetLimits {
        control::BudgetLimits {
            max_turns: Some(10),
            max_tool_calls: Some(5),
            max_input_tokens: None,
            max_output_tokens: Some(1000),
            max_cost_micros: Some(50_000),
            max_wall_clock: Some(harness_proto::duration_to_proto(Duration::from_secs(60))),
        }
    }

    #[test]
    fn the_first_used_up_budget_is_reported() {
        let usage = control::BudgetUsage {
            turns: 3,
            tool_calls: 5,
            output_tokens: 2000,
            ..Default::default()
        };
        assert_eq!(
            exhausted(&limits(), &usage, Duration::ZERO),
            Some(BudgetKind::ToolCalls)
        );
        assert_eq!(
            exhausted(
                &limits(),
                &control::BudgetUsage::default(),
                Duration::from_secs(61)
            ),
            Some(BudgetKind::WallClock)
        );
        assert_eq!(
            exhausted(&limits(), &control::BudgetUsage::default(), Duration::ZERO),
            None
        );
    }

    #[test]
    fn warnings_fire_once_at_eighty_percent() {
        let usage = control::BudgetUsage {
            turns: 8,
            tool_calls: 3,
            cost_micros: 40_000,
            ..Default::default()
        };
        let warnings = new_warnings(&limits(), &usage, Duration::from_secs(10), &[]);
        assert_eq!(
            warnings,
            [
                control::BudgetWarning {
                    budget: "turns".to_owned(),
                    used: 8,
                    limit: 10
                },
                control::BudgetWarning {
                    budget: "cost".to_owned(),
                    used: 40_000,
                    limit: 50_000
                },
            ]
        );
        let again = new_warnings(
            &limits(),
            &usage,
            Duration::from_secs(10),
            &[BudgetKind::Turns, BudgetKind::Cost],
        );
        assert_eq!(again, []);
        assert_eq!(
            wrap_up_notice(&warnings[0]),
            "[harness] Budget notice: 8 of 10 turns used (turns). Wrap up now: finish the task \
             with what you have, or summarise your progress and what remains. The session stops \
             when the budget runs out."
        );
    }

    #[test]
    fn cost_uses_the_cached_price_for_cache_reads_and_rounds_up() {
        let price = ModelPrice {
            input_usd_per_mtok: 3.0,
            cached_input_usd_per_mtok: Some(0.3),
            output_usd_per_mtok: 15.0,
        };
        // 900 uncached * 3 + 100 cached * 0.3 + 10 * 15 = 2700 + 30 + 150
        assert_eq!(price.cost_micros(1000, 100, 10), 2880);
        let no_cache_price = ModelPrice {
            cached_input_usd_per_mtok: None,
            ..price
        };
        assert_eq!(no_cache_price.cost_micros(1, 1, 0), 3);
        let cheap = ModelPrice {
            input_usd_per_mtok: 0.15,
            cached_input_usd_per_mtok: None,
            output_usd_per_mtok: 0.6,
        };
        assert_eq!(cheap.cost_micros(1, 0, 0), 1);
    }

    #[test]
    fn overrides_lower_but_never_raise() {
        let lowered_limits = lowered(
            &limits(),
            Some(&control::BudgetLimits {
                max_turns: Some(3),
                max_input_tokens: Some(99),
                max_wall_clock: Some(harness_proto::duration_to_proto(Duration::from_secs(5))),
                ..Default::default()
            }),
        )
        .unwrap();
        assert_eq!(
            lowered_limits,
            control::BudgetLimits {
                max_turns: Some(3),
                max_input_tokens: Some(99),
                max_wall_clock: Some(harness_proto::duration_to_proto(Duration::from_secs(5))),
                ..limits()
            }
        );
        let raised = lowered(
            &limits(),
            Some(&control::BudgetLimits {
                max_cost_micros: Some(50_001),
                ..Default::default()
            }),
        )
        .unwrap_err();
        assert_eq!(
            raised.to_string(),
            "budget.max_cost_micros = 50001 is above the agent's limit of 50000; budgets can only be lowered"
        );
        assert_eq!(lowered(&limits(), None).unwrap(), limits());
    }
}
