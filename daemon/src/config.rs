//! Config files: TOML read into a daemon's serde structs, with errors that
//! name the file and the line and column of the mistake
//! (`/etc/harness/sandboxd.toml:3:1: unknown field `listne``).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::de::{IntoDeserializer, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// Why a config file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML, or has unknown or mistyped keys.
    #[error("{}: {message}", location(path, *line_column))]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line and column of the mistake, when TOML knows it.
        line_column: Option<(usize, usize)>,
        /// What is wrong.
        message: String,
    },
}

fn location(path: &Path, line_column: Option<(usize, usize)>) -> String {
    match line_column {
        Some((line, column)) => format!("{}:{line}:{column}", path.display()),
        None => path.display().to_string(),
    }
}

/// Reads and parses the TOML file at `path`.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(&text, path)
}

/// Parses TOML `text`; `path` only names the source in errors.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigFileError> {
    toml::from_str(text).map_err(|error: toml::de::Error| ConfigFileError::Parse {
        path: path.to_owned(),
        line_column: error.span().map(|span| line_column(text, span.start)),
        message: error.message().trim_end().to_owned(),
    })
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// For a field that takes one string or a list of them:
/// `listen = "unix:/a.sock"` or `listen = ["unix:/a.sock", "127.0.0.1:7071"]`.
/// Use with
/// `#[serde(deserialize_with = "harness_daemon::config::string_or_list")]`;
/// each string is deserialized as a `T`, so its own error (with position)
/// is what the user sees.
pub fn string_or_list<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    deserializer.deserialize_any(StringOrList(std::marker::PhantomData))
}

struct StringOrList<T>(std::marker::PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for StringOrList<T> {
    type Value = Vec<T>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a string or a list of strings")
    }

    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Self::Value, E> {
        T::deserialize(value.into_deserializer()).map(|one| vec![one])
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(1));
        while let Some(value) = seq.next_element()? {
            values.push(value);
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::address::ListenAddress;

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(rename_all = "kebab-case", deny_unknown_fields)]
    struct Sample {
        name: String,
        #[serde(default, deserialize_with = "string_or_list")]
        listen: Vec<ListenAddress>,
    }

    #[test]
    fn a_file_is_read_and_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.toml");
        std::fs::write(&path, "name = \"d\"\nlisten = \"127.0.0.1:1\"\n").unwrap();
        let sample: Sample = load_toml(&path).unwrap();
        assert_eq!(
            sample,
            Sample {
                name: "d".to_owned(),
                listen: vec!["127.0.0.1:1".parse().unwrap()],
            }
        );
    }

    #[test]
    fn a_list_of_listeners_is_accepted() {
        let sample: Sample = parse_toml(
            "name = \"d\"\nlisten = [\"unix:/a.sock\", \"[::1]:2\"]\n",
            Path::new("d.toml"),
        )
        .unwrap();
        assert_eq!(
            sample.listen,
            vec![
                "unix:/a.sock".parse::<ListenAddress>().unwrap(),
                "[::1]:2".parse().unwrap()
            ]
        );
    }

    #[test]
    fn an_unknown_key_names_the_file_line_and_column() {
        let error = parse_toml::<Sample>("name = \"d\"\n  listne = 1\n", Path::new("/etc/d.toml"))
            .unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with("/etc/d.toml:2:3: unknown field `listne`"),
            "{text}"
        );
    }

    #[test]
    fn a_bad_value_names_its_line_and_the_accepted_forms() {
        let error = parse_toml::<Sample>(
            "name = \"d\"\nlisten = [\"unix:/a.sock\", \"localhost\"]\n",
            Path::new("d.toml"),
        )
        .unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with(
                "d.toml:2:10: \"localhost\" is not a listen address: use unix:<path> or <ip>:<port>"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_missing_file_is_named() {
        let error = load_toml::<Sample>(Path::new("/nonexistent/d.toml")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "cannot read config file /nonexistent/d.toml"
        );
    }

    #[test]
    fn line_and_column_count_characters() {
        assert_eq!(line_column("ab\ncé\nx", 0), (1, 1));
        assert_eq!(line_column("ab\ncé\nx", 3), (2, 1));
        // After "cé" (c = 1 byte, é = 2 bytes): column 3.
        assert_eq!(line_column("ab\ncé\nx", 6), (2, 3));
        assert_eq!(line_column("ab\ncé\nx", 7), (3, 1));
    }
}
