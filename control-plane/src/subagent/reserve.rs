//! Hierarchical budgets: what a child may use is reserved from what its
//! parent has left before the child starts, so the children of a session
//! together never get more than it had.
//!
//! Per limit the parent has (tool calls, input and output tokens, cost):
//! what is left after its own usage and the reservations of children still
//! running is split evenly among the delegations being started together,
//! and a child gets the smaller of its share and its own agent's limit.
//! Wall clock is not split (children run at the same time): a child gets
//! at most the time the parent has left. Turns are the child's own: they
//! count model calls of one session and do not add up across sessions.

use std::time::Duration;

use harness_proto::control::v1 as control;

use crate::budget::BudgetKind;

/// What the parent has, for one reservation.
#[derive(Debug, Clone, Copy)]
pub struct ParentBudget<'a> {
    /// The parent's limits.
    pub limits: &'a control::BudgetLimits,
    /// Its usage so far (children that finished included).
    pub used: &'a control::BudgetUsage,
    /// Reservations of its children still running.
    pub outstanding: &'a [control::BudgetLimits],
    /// Time until its wall-clock limit; `None`: it has none.
    pub time_left: Option<Duration>,
}

/// The budget of one child among `sharing` being started together (this
/// one and those after it), its agent's own limits being `own`. A limit
/// with nothing left refuses the child, naming it.
pub fn reserve(
    parent: ParentBudget<'_>,
    sharing: u32,
    own: &control::BudgetLimits,
) -> Result<control::BudgetLimits, BudgetKind> {
    let sharing = u64::from(sharing.max(1));
    let share = |kind: BudgetKind,
                 limit: Option<u64>,
                 used: u64,
                 reserved: fn(&control::BudgetLimits) -> Option<u64>,
                 not_yet_counted: u64|
     -> Result<Option<u64>, BudgetKind> {
        let Some(limit) = limit else {
            return Ok(None);
        };
        let outstanding: u64 = parent
            .outstanding
            .iter()
            .filter_map(reserved)
            .fold(0, u64::saturating_add);
        let left = limit
            .saturating_sub(used)
            .saturating_sub(outstanding)
            .saturating_sub(not_yet_counted);
        match left / sharing {
            0 => Err(kind),
            share => Ok(Some(share)),
        }
    };
    let smaller = |share: Option<u64>, own: Option<u64>| match (share, own) {
        (Some(share), Some(own)) => Some(share.min(own)),
        (share, own) => share.or(own),
    };
    let limits = parent.limits;
    let used = parent.used;
    // The delegation calls of this batch not yet started count as tool
    // calls of the parent once they are.
    let tool_calls = share(
        BudgetKind::ToolCalls,
        limits.max_tool_calls.map(u64::from),
        u64::from(used.tool_calls),
        |limits| limits.max_tool_calls.map(u64::from),
        sharing,
    )?;
    let input_tokens = share(
        BudgetKind::InputTokens,
        limits.max_input_tokens,
        used.input_tokens,
        |limits| limits.max_input_tokens,
        0,
    )?;
    let output_tokens = share(
        BudgetKind::OutputTokens,
        limits.max_output_tokens,
        used.output_tokens,
        |limits| limits.max_output_tokens,
        0,
    )?;
    let cost = share(
        BudgetKind::Cost,
        limits.max_cost_micros,
        used.cost_micros,
        |limits| limits.max_cost_micros,
        0,
    )?;
    let own_wall = own
        .max_wall_clock
        .as_ref()
        .map(harness_proto::duration_from_proto);
    let wall_clock = match parent.time_left {
        Some(left) if left.is_zero() => return Err(BudgetKind::WallClock),
        Some(left) => Some(own_wall.map_or(left, |own| own.min(left))),
        None => own_wall,
    };
    Ok(control::BudgetLimits {
        max_turns: own.max_turns,
        max_tool_calls: smaller(tool_calls, own.max_tool_calls.map(u64::from))
            .map(|calls| u32::try_from(calls).unwrap_or(u32::MAX)),
        max_input_tokens: smaller(input_tokens, own.max_input_tokens),
        max_output_tokens: smaller(output_tokens, own.max_output_tokens),
        max_cost_micros: smaller(cost, own.max_cost_micros),
        max_wall_clock: wall_clock.map(harness_proto::duration_to_proto),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    fn parent<'a>(
        limits: &'a control::BudgetLimits,
        used: &'a control::BudgetUsage,
        outstanding: &'a [control::BudgetLimits],
    ) -> ParentBudget<'a> {
        ParentBudget {
            limits,
            used,
            outstanding,
            time_left: None,
        }
    }

    #[test]
    fn siblings_split_what_is_left_and_keep_their_own_smaller_limits() {
        let limits = control::BudgetLimits {
            max_turns: Some(10),
            max_tool_calls: Some(12),
            max_input_tokens: Some(10_000),
            ..Default::default()
        };
        let used = control::BudgetUsage {
            tool_calls: 2,
            input_tokens: 4_000,
            ..Default::default()
        };
        let own = control::BudgetLimits {
            max_turns: Some(4),
            max_input_tokens: Some(2_500),
            max_output_tokens: Some(900),
            ..Default::default()
        };
        // Two delegations: (12 - 2 - 2 not yet started) / 2 = 4 calls each;
        // (10000 - 4000) / 2 = 3000 tokens, above the child's own 2500.
        assert_eq!(
            reserve(parent(&limits, &used, &[]), 2, &own),
            Ok(control::BudgetLimits {
                max_turns: Some(4),
                max_tool_calls: Some(4),
                max_input_tokens: Some(2_500),
                max_output_tokens: Some(900),
                max_cost_micros: None,
                max_wall_clock: None,
            })
        );
    }

    #[test]
    fn running_siblings_hold_their_reservation_and_nothing_left_refuses() {
        let limits = control::BudgetLimits {
            max_output_tokens: Some(1_000),
            ..Default::default()
        };
        let used = control::BudgetUsage {
            output_tokens: 400,
            ..Default::default()
        };
        let running = control::BudgetLimits {
            max_output_tokens: Some(600),
            ..Default::default()
        };
        assert_eq!(
            reserve(
                parent(&limits, &used, &[running]),
                1,
                &control::BudgetLimits::default()
            ),
            Err(BudgetKind::OutputTokens)
        );
    }

    #[test]
    fn a_child_gets_at_most_the_time_its_parent_has_left() {
        let limits = control::BudgetLimits::default();
        let used = control::BudgetUsage::default();
        let own = control::BudgetLimits {
            max_wall_clock: Some(harness_proto::duration_to_proto(Duration::from_secs(600))),
            ..Default::default()
        };
        let mut budget = parent(&limits, &used, &[]);
        budget.time_left = Some(Duration::from_secs(90));
        assert_eq!(
            reserve(budget, 3, &own).unwrap().max_wall_clock,
            Some(harness_proto::duration_to_proto(Duration::from_secs(90)))
        );
        budget.time_left = Some(Duration::ZERO);
        assert_eq!(reserve(budget, 1, &own), Err(BudgetKind::WallClock));
    }

    proptest! {
        /// However many children start in however many batches, the parent's
        /// usage plus every reservation stays within each of its limits.
        #[test]
        fn reservations_never_exceed_the_parents_remaining(
            limit in 1_u64..100_000,
            used in 0_u64..100_000,
            batches in proptest::collection::vec(1_u32..6, 1..6),
        ) {
            let limits = control::BudgetLimits {
                max_input_tokens: Some(limit),
                max_cost_micros: Some(limit),
                ..Default::default()
            };
            let used = control::BudgetUsage {
                input_tokens: used,
                cost_micros: used,
                ..Default::default()
            };
            let mut outstanding: Vec<control::BudgetLimits> = Vec::new();
            for size in batches {
                for position in 0..size {
                    let budget = ParentBudget {
                        limits: &limits,
                        used: &used,
                        outstanding: &outstanding,
                        time_left: None,
                    };
                    if let Ok(reserved) =
                        reserve(budget, size - position, &control::BudgetLimits::default())
                    {
                        outstanding.push(reserved);
                    }
                }
            }
            let reserved: u64 = outstanding.iter().filter_map(|r| r.max_input_tokens).sum();
            let cost: u64 = outstanding.iter().filter_map(|r| r.max_cost_micros).sum();
            prop_assert!(reserved <= limit.saturating_sub(used.input_tokens));
            prop_assert!(cost <= limit.saturating_sub(used.cost_micros));
        }
    }
}
