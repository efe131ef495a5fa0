//! Policy and approvals: denials, asks resolved by a human or a deadline, across restarts.

use super::*;

fn policy_definition(policy: &str) -> AgentDefinition {
    AgentDefinition {
        policy: toml::from_str(policy).unwrap(),
        ..definition(&["exec"])
    }
}

const EXEC_SCRIPT: &str = r#"
    [[turn]]
    text = "Testing."
    [[turn.tool-calls]]
    tool = "exec"
    arguments = { command = "cargo test --workspace" }
    [[turn.tool-calls]]
    tool = "exec"
    arguments = { command = "rm -rf target" }

    [[turn]]
    text = "Done."
"#;

const EXEC_POLICY: &str = r#"
    approval-timeout = "300ms"
    [[rule]]
    tool = "exec"
    when = { command = "cargo test*" }
    verdict = "allow"
    [[rule]]
    tool = "exec"
    when = { command = "rm *" }
    verdict = "ask"
    reason = "deletes files"
"#;

async fn exec_harness(policy: &str) -> Harness {
    let provider = ScriptedProvider::new(toml::from_str(EXEC_SCRIPT).unwrap(), "exec.script.toml");
    Harness::with(
        Arc::new(provider),
        policy_definition(policy),
        FakeSandbox::new(&["exec"]),
    )
    .await
}

#[tokio::test]
async fn a_denied_call_is_explained_to_the_model_and_never_dispatched() {
    let harness = exec_harness(
        r#"
        [[rule]]
        tool = "exec"
        when = { command = "rm *" }
        verdict = "deny"
        reason = "never delete files"
        "#,
    )
    .await;
    harness.run(5, 2).await;
    let summary = harness.summary().await;
    assert_eq!(
        summary[4..10],
        [
            "5 t1 policy call_1_0 VERDICT_ALLOW default",
            "6 t1 policy call_1_1 VERDICT_DENY policy.rule[0]",
            "7 t1 started s1:call_1_0",
            "8 t1 output call_1_0 stderr",
            "9 t1 finished call_1_0 ok {}",
            "10 t1 finished call_1_1 TOOL_ERROR_KIND_DENIED never delete files",
        ]
    );
    assert_eq!(harness.sandbox.executions(), 1);
}

#[tokio::test]
async fn ask_then_approve_runs_the_call() {
    let harness = exec_harness(&EXEC_POLICY.replace("approval-timeout = \"300ms\"", "")).await;
    let run = harness.run(5, 2);
    let approve = harness.resolve_next_approval(control::ApprovalDecision::Allow, "looks fine");
    let (_, ()) =
        tokio::time::timeout(Duration::from_secs(10), futures::future::join(run, approve))
            .await
            .unwrap();
    let summary = harness.summary().await;
    assert_eq!(
        summary[4..12],
        [
            "5 t1 policy call_1_0 VERDICT_ALLOW policy.rule[0]",
            "6 t1 policy call_1_1 VERDICT_ASK policy.rule[1]",
            "7 t1 approval? call_1_1 deletes files",
            "8 t1 approval call_1_1 APPROVAL_DECISION_ALLOW by alice \"looks fine\"",
            "9 t1 started s1:call_1_0",
            "10 t1 started s1:call_1_1",
            "11 t1 output call_1_0 stderr",
            "12 t1 finished call_1_0 ok {}",
        ]
    );
    assert_eq!(harness.sandbox.executions(), 2);
    assert_eq!(
        summary.last().unwrap(),
        "18 t2 end STOP_REASON_COMPLETED \"Done.\" \"\""
    );
}

#[tokio::test]
async fn ask_then_deny_tells_the_model_who_denied_and_why() {
    let harness = exec_harness(EXEC_POLICY).await;
    let run = harness.run(5, 2);
    let deny = harness.resolve_next_approval(control::ApprovalDecision::Deny, "not today");
    tokio::time::timeout(Duration::from_secs(10), futures::future::join(run, deny))
        .await
        .unwrap();
    let summary = harness.summary().await;
    assert_eq!(
        summary[7..12],
        [
            "8 t1 approval call_1_1 APPROVAL_DECISION_DENY by alice \"not today\"",
            "9 t1 started s1:call_1_0",
            "10 t1 output call_1_0 stderr",
            "11 t1 finished call_1_0 ok {}",
            "12 t1 finished call_1_1 TOOL_ERROR_KIND_DENIED denied by alice: not today",
        ]
    );
    assert_eq!(harness.sandbox.executions(), 1);
}

#[tokio::test]
async fn an_unanswered_approval_is_denied_at_its_deadline() {
    let harness = exec_harness(EXEC_POLICY).await;
    harness.run(5, 2).await;
    let summary = harness.summary().await;
    assert_eq!(
        summary[6..12],
        [
            "7 t1 approval? call_1_1 deletes files",
            "8 t1 approval call_1_1 APPROVAL_DECISION_DENY by timeout \"no decision within 300ms\"",
            "9 t1 started s1:call_1_0",
            "10 t1 output call_1_0 stderr",
            "11 t1 finished call_1_0 ok {}",
            "12 t1 finished call_1_1 TOOL_ERROR_KIND_DENIED denied by timeout: no decision within 300ms",
        ]
    );
    let session = harness.session().await;
    assert_eq!(session.status, control::SessionStatus::Finished);
}

#[tokio::test]
async fn a_session_awaiting_approval_survives_a_restart() {
    let harness = exec_harness(&EXEC_POLICY.replace("approval-timeout = \"300ms\"", "")).await;
    harness.create_session(5).await;
    // Crash while waiting: after approval_requested (event 7) was written.
    harness.run_and_crash_after(7).await;
    let session = harness.session().await;
    assert_eq!(session.status, control::SessionStatus::AwaitingApproval);
    assert_eq!(
        harness
            .store
            .pending_approvals(SessionId::new("s1"))
            .await
            .unwrap(),
        [PendingApproval {
            call_id: "call_1_1".to_owned(),
            turn: 1
        }]
    );
    let resume = harness.resume();
    let approve = harness.resolve_next_approval(control::ApprovalDecision::Allow, "");
    tokio::time::timeout(
        Duration::from_secs(10),
        futures::future::join(resume, approve),
    )
    .await
    .unwrap();
    let summary = harness.summary().await;
    assert_eq!(
        summary[7],
        "8 t1 approval call_1_1 APPROVAL_DECISION_ALLOW by alice \"\""
    );
    assert_eq!(harness.sandbox.executions(), 2);
    assert_eq!(
        summary.last().unwrap(),
        "18 t2 end STOP_REASON_COMPLETED \"Done.\" \"\""
    );
}

#[tokio::test]
async fn a_second_resolution_of_one_approval_is_refused() {
    let harness = exec_harness(&EXEC_POLICY.replace("approval-timeout = \"300ms\"", "")).await;
    let run = harness.run(5, 2);
    let answer_twice = async {
        harness
            .resolve_next_approval(control::ApprovalDecision::Allow, "")
            .await;
        let again = control::ApprovalResolved {
            call_id: "call_1_1".to_owned(),
            decision: control::ApprovalDecision::Deny.into(),
            reason: "too late".to_owned(),
            resolved_by: "bob".to_owned(),
        };
        harness
            .log
            .append(&SessionId::new("s1"), 1, Kind::ApprovalResolved(again))
            .await
    };
    let (_, second) = tokio::time::timeout(
        Duration::from_secs(10),
        futures::future::join(run, answer_twice),
    )
    .await
    .unwrap();
    assert!(
        matches!(second, Err(StoreError::ApprovalNotPending { ref call_id, .. }) if call_id == "call_1_1"),
        "{second:?}"
    );
}
