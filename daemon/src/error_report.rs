//! Error reports for logs, events and gRPC statuses: an error and its
//! sources on one line.

/// `error` and its sources, joined with ": ".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors repeat their source's text; do not print it twice.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer step failed")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle: {0}")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn chain_joins_sources_and_skips_text_already_included() {
        let error = Outer(Middle(std::io::Error::other("disk full")));
        assert_eq!(error_chain(&error), "outer step failed: middle: disk full");
    }

    #[test]
    fn an_error_without_sources_is_its_own_text() {
        assert_eq!(
            error_chain(&std::io::Error::other("disk full")),
            "disk full"
        );
    }
}
