//! How deep a delegation tree may grow and how many children one session
//! may start: checked before a child exists, so a refusal costs no model
//! request.

/// A delegation refused by a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    /// The child would sit deeper than the control plane allows.
    #[error(
        "max-subagent-depth is {max}: this session is at depth {parent_depth}, so its subagents \
         may not delegate further (do the work yourself, or escalate)"
    )]
    Depth {
        /// The delegating session's depth (0 for a top-level session).
        parent_depth: usize,
        /// The control plane's `max-subagent-depth`.
        max: u32,
    },
    /// The session started as many children as its agent allows.
    #[error(
        "max-children is {max} and this session has started {started} subagents; no more \
         delegations (finish with what you have, or escalate)"
    )]
    Children {
        /// Children started so far (this turn's earlier delegations included).
        started: u32,
        /// The agent's `max-children`.
        max: u32,
    },
}

/// Admits one more child of a session at `parent_depth` that has started
/// `started` children, under `max_depth` and `max_children`.
pub fn admit(
    parent_depth: usize,
    max_depth: u32,
    started: u32,
    max_children: u32,
) -> Result<(), LimitExceeded> {
    let child_depth = parent_depth.saturating_add(1);
    if child_depth > usize::try_from(max_depth).unwrap_or(usize::MAX) {
        return Err(LimitExceeded::Depth {
            parent_depth,
            max: max_depth,
        });
    }
    if started >= max_children {
        return Err(LimitExceeded::Children {
            started,
            max: max_children,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delegation_beyond_max_depth_is_refused() {
        assert_eq!(admit(0, 2, 0, 8), Ok(()));
        assert_eq!(admit(1, 2, 0, 8), Ok(()));
        assert_eq!(
            admit(2, 2, 0, 8),
            Err(LimitExceeded::Depth {
                parent_depth: 2,
                max: 2
            })
        );
        // Depth 0 allows no subagents at all.
        assert_eq!(
            admit(0, 0, 0, 8),
            Err(LimitExceeded::Depth {
                parent_depth: 0,
                max: 0
            })
        );
    }

    #[test]
    fn the_child_beyond_max_children_is_refused() {
        assert_eq!(admit(0, 2, 1, 2), Ok(()));
        assert_eq!(
            admit(0, 2, 2, 2),
            Err(LimitExceeded::Children { started: 2, max: 2 })
        );
    }
}
