//! Logging set-up of a daemon: one line per event on stderr, human-readable
//! (`pretty`) or JSON (`json`), filtered by `RUST_LOG` (default `info`).

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The variable holding the log filter, e.g. `info,harness_sandboxd=debug`.
pub const FILTER_VARIABLE: &str = "RUST_LOG";

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// For people: level, target, message, fields.
    #[default]
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// `RUST_LOG` does not parse.
    #[error(
        "{FILTER_VARIABLE}={value:?} is not a valid log filter (e.g. \"info,harness_sandboxd=debug\")"
    )]
    BadFilter {
        /// The value.
        value: String,
        /// Why.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber is already installed.
    #[error("logging is already set up in this process")]
    AlreadySet(#[source] tracing::subscriber::SetGlobalDefaultError),
}

/// The filter for a `RUST_LOG` value: unset or empty means `info`.
pub fn filter(value: Option<&str>) -> Result<EnvFilter, LoggingError> {
    let builder = EnvFilter::builder().with_default_directive(LevelFilter::INFO.into());
    match value.filter(|value| !value.trim().is_empty()) {
        None => Ok(builder.parse_lossy("")),
        Some(value) => builder
            .parse(value)
            .map_err(|source| LoggingError::BadFilter {
                value: value.to_owned(),
                source,
            }),
    }
}

/// A subscriber writing `format` lines that pass `filter` to `writer`,
/// coloured (pretty only) if `ansi`.
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    ansi: bool,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync + 'static>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi && format == LogFormat::Pretty)
        .with_writer(writer);
    match format {
        LogFormat::Pretty => Box::new(builder.finish()),
        LogFormat::Json => Box::new(builder.json().finish()),
    }
}

/// Installs the process-wide subscriber: `format` lines on stderr, filtered
/// by `RUST_LOG`, coloured only when stderr is a terminal.
pub fn init(format: LogFormat) -> Result<(), LoggingError> {
    let value = std::env::var(FILTER_VARIABLE).ok();
    let filter = filter(value.as_deref())?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing::subscriber::set_global_default(subscriber(format, filter, ansi, std::io::stderr))
        .map_err(LoggingError::AlreadySet)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn log_with(format: LogFormat, filter_value: Option<&str>) -> String {
        let buffer = Buffer::default();
        let subscriber = subscriber(format, filter(filter_value).unwrap(), false, buffer.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!("hidden at info");
            tracing::info!(port = 7071, "listening");
        });
        buffer.text()
    }

    #[test]
    fn json_is_one_object_per_line() {
        let text = log_with(LogFormat::Json, None);
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(lines[0]["fields"]["message"], "listening");
        assert_eq!(lines[0]["fields"]["port"], 7071);
    }

    #[test]
    fn pretty_is_for_people() {
        let text = log_with(LogFormat::Pretty, None);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("INFO"), "{text}");
        assert!(text.contains("listening port=7071"), "{text}");
    }

    #[test]
    fn the_filter_decides_what_is_written() {
        let text = log_with(LogFormat::Pretty, Some("debug"));
        assert_eq!(text.lines().count(), 2, "{text}");
        assert_eq!(log_with(LogFormat::Pretty, Some("warn")), "");
    }

    #[test]
    fn a_bad_filter_is_an_error_not_silence() {
        let error = filter(Some("info,=[")).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("RUST_LOG=\"info,=[\" is not a valid log filter"),
            "{error}"
        );
    }
}
