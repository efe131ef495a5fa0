//! Approvals over gRPC: a call policy asks about waits (status
//! AWAITING_APPROVAL) until ResolveApproval allows or denies it.

use harness_proto::control::v1 as control;

use crate::support::{Sockets, TestPlane, describe};

async fn resolve(
    plane: &TestPlane,
    session_id: &str,
    call_id: &str,
    decision: control::ApprovalDecision,
    reason: &str,
) -> Result<control::ResolveApprovalResponse, tonic::Status> {
    plane
        .client
        .clone()
        .resolve_approval(control::ResolveApprovalRequest {
            session_id: session_id.to_owned(),
            call_id: call_id.to_owned(),
            decision: decision.into(),
            reason: reason.to_owned(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn an_approved_call_runs_and_the_session_finishes() {
    let plane = TestPlane::start(Sockets::Tcp).await;
    let session = plane.start_session("asker", "").await.session.unwrap();
    let call_id = plane.pending_approval(&session.session_id).await;
    let waiting = plane.session(&session.session_id).await;
    assert_eq!(waiting.status(), control::SessionStatus::AwaitingApproval);
    let resolved = resolve(
        &plane,
        &session.session_id,
        &call_id,
        control::ApprovalDecision::Allow,
        "fine",
    )
    .await
    .unwrap();
    assert_eq!(resolved.seq, 6);
    let described: Vec<String> = plane
        .events(&session.session_id, 0)
        .await
        .iter()
        .map(describe)
        .collect();
    assert_eq!(
        described[3..9],
        [
            "4 t1 policy call_1_0 VERDICT_ASK policy.rule[0]",
            "5 t1 approval_requested call_1_0 writes need a human",
            r#"6 t1 approval_resolved call_1_0 APPROVAL_DECISION_ALLOW by default "fine""#,
            "7 t1 tool_started call_1_0 write_file sb-1",
            r#"8 t1 tool_finished call_1_0 ok {"bytes_written":2}"#,
            "9 t1 turn_completed 1 tool_use calls=1",
        ]
    );
    let finished = plane.session(&session.session_id).await;
    assert_eq!(
        (finished.status(), finished.stop_reason()),
        (
            control::SessionStatus::Finished,
            control::StopReason::Completed
        )
    );
}

#[tokio::test]
async fn a_denied_call_is_not_run_and_the_model_hears_why() {
    let plane = TestPlane::start(Sockets::Unix).await;
    let session = plane.start_session("asker", "").await.session.unwrap();
    let call_id = plane.pending_approval(&session.session_id).await;
    resolve(
        &plane,
        &session.session_id,
        &call_id,
        control::ApprovalDecision::Deny,
        "not in notes/",
    )
    .await
    .unwrap();
    let described: Vec<String> = plane
        .events(&session.session_id, 0)
        .await
        .iter()
        .map(describe)
        .collect();
    assert_eq!(
        described[5..7],
        [
            r#"6 t1 approval_resolved call_1_0 APPROVAL_DECISION_DENY by default "not in notes/""#,
            "7 t1 tool_finished call_1_0 TOOL_ERROR_KIND_DENIED denied by default: not in notes/",
        ]
    );
    assert!(plane.sandboxd.record.lock().unwrap().invocations.is_empty());
}

#[tokio::test]
async fn resolving_twice_or_without_a_decision_is_refused() {
    let plane = TestPlane::start(Sockets::Tcp).await;
    let session = plane.start_session("asker", "").await.session.unwrap();
    let call_id = plane.pending_approval(&session.session_id).await;
    let undecided = resolve(
        &plane,
        &session.session_id,
        &call_id,
        control::ApprovalDecision::Unspecified,
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(
        (undecided.code(), undecided.message()),
        (
            tonic::Code::InvalidArgument,
            "decision must be APPROVAL_DECISION_ALLOW or APPROVAL_DECISION_DENY"
        )
    );
    let unknown = resolve(
        &plane,
        &session.session_id,
        "call_9_9",
        control::ApprovalDecision::Allow,
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(
        (unknown.code(), unknown.message().to_owned()),
        (
            tonic::Code::FailedPrecondition,
            format!(
                "tool call call_9_9 of session {} is not awaiting approval",
                session.session_id
            )
        )
    );
    resolve(
        &plane,
        &session.session_id,
        &call_id,
        control::ApprovalDecision::Allow,
        "",
    )
    .await
    .unwrap();
    let again = resolve(
        &plane,
        &session.session_id,
        &call_id,
        control::ApprovalDecision::Deny,
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn a_session_awaiting_approval_can_be_cancelled() {
    let plane = TestPlane::start(Sockets::Tcp).await;
    let session = plane.start_session("asker", "").await.session.unwrap();
    plane.pending_approval(&session.session_id).await;
    let cancelled = plane
        .client
        .clone()
        .cancel_session(control::CancelSessionRequest {
            session_id: session.session_id.clone(),
            reason: "no one is around".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(
        (cancelled.status(), cancelled.stop_reason()),
        (
            control::SessionStatus::Finished,
            control::StopReason::Cancelled
        )
    );
}

#[tokio::test]
async fn start_session_may_lower_but_not_raise_the_agent_budget() {
    let plane = TestPlane::start(Sockets::Tcp).await;
    let mut client = plane.client.clone();
    let raised = client
        .start_session(control::StartSessionRequest {
            agent: "asker".to_owned(),
            budget: Some(control::BudgetLimits {
                max_tool_calls: Some(6),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (raised.code(), raised.message()),
        (
            tonic::Code::InvalidArgument,
            "budget.max_tool_calls = 6 is above agent \"asker\"'s limit of 5; budgets can only be lowered"
        )
    );
    let lowered = client
        .start_session(control::StartSessionRequest {
            agent: "asker".to_owned(),
            budget: Some(control::BudgetLimits {
                max_tool_calls: Some(1),
                max_output_tokens: Some(1000),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(
        lowered.budget,
        Some(control::BudgetLimits {
            max_turns: Some(20),
            max_tool_calls: Some(1),
            max_output_tokens: Some(1000),
            ..Default::default()
        })
    );
}
