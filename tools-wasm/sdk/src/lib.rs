//! The tool-author kit: write a harness tool as one Rust type and compile it to a
//! `wasm32-wasip2` component that sandboxd can run.
//!
//! Where to look:
//! - [`Tool`] is the trait a tool implements: a name, a description, serde/schemars input and
//!   output types, and a `run` function.
//! - [`export_tool!`] turns a [`Tool`] into the component exports of the WIT world
//!   `harness:tool/tool-component` (`tools-wasm/wit/tool.wit`): `describe` returns the name,
//!   description and JSON Schemas, `invoke` decodes the JSON input, runs the tool and encodes
//!   the output.
//! - [`ToolError`] is the typed failure a tool returns; its [`ErrorKind`] maps one-to-one onto
//!   the WIT `error-kind`.
//! - [`describe`] and [`invoke`] are what the exports do, callable on the host so a tool's
//!   JSON interface can be tested with `cargo test`.
//! - [`workspace`] holds the path rules shared by file tools (the session workspace is
//!   preopened at `/workspace` and nothing else of the host is visible), root-parameterised
//!   variants for testing on the host, and a directory walk that never follows symlinks.
//!
//! A complete tool:
//!
//! ```
//! use harness_tool_sdk::{Tool, ToolError, export_tool};
//! use schemars::JsonSchema;
//! use serde::{Deserialize, Serialize};
//!
//! /// Input of `echo`.
//! #[derive(Deserialize, JsonSchema)]
//! #[serde(deny_unknown_fields)]
//! struct Input {
//!     /// Text to echo back.
//!     text: String,
//! }
//!
//! /// Output of `echo`.
//! #[derive(Serialize, JsonSchema)]
//! struct Output {
//!     /// The same text.
//!     text: String,
//! }
//!
//! struct Echo;
//!
//! impl Tool for Echo {
//!     const NAME: &str = "echo";
//!     const DESCRIPTION: &str = "Returns its input text unchanged.";
//!     type Input = Input;
//!     type Output = Output;
//!     fn run(input: Input) -> Result<Output, ToolError> {
//!         Ok(Output { text: input.text })
//!     }
//! }
//!
//! export_tool!(Echo);
//! ```
//!
//! `tools-wasm/README.md` walks through building such a crate and running it in sandboxd.

use std::fmt;

pub mod workspace;

/// Bindings generated from `tools-wasm/wit`. Only [`export_tool!`] should use them: the
/// guest-side types and the export macro are an implementation detail of the SDK.
#[doc(hidden)]
#[allow(
    // Generated code: the unsafe blocks are wit-bindgen's canonical-ABI glue, and it is
    // wit-bindgen's job, not ours, to document them.
    clippy::undocumented_unsafe_blocks,
    missing_docs
)]
pub mod __bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "tool-component",
        // The tool crate, not this one, owns the exported symbols: the macro must be usable
        // from another crate, and it must find these bindings from there.
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "$crate::__bindings",
    });
}

/// A harness tool: a typed function from JSON input to JSON output.
///
/// The doc comments on `Input` and `Output` (and their fields) become the descriptions in the
/// JSON Schemas a model reads, so write them for a model.
pub trait Tool {
    /// The tool's name as models and sandboxd see it, e.g. `"read_file"`: 1-64 characters of
    /// `[a-z0-9_]` starting with a letter ([`export_tool!`] checks this at compile time).
    const NAME: &str;
    /// One or two sentences telling a model what the tool does and when to use it.
    const DESCRIPTION: &str;
    /// The input, decoded from the JSON the model produced. Derive `Deserialize` with
    /// `#[serde(deny_unknown_fields)]` so typos are reported rather than ignored.
    type Input: serde::de::DeserializeOwned + schemars::JsonSchema;
    /// The output, encoded as JSON and handed back to the model.
    type Output: serde::Serialize + schemars::JsonSchema;

    /// Runs one call. Each call happens in a fresh component instance, so no state survives
    /// between calls.
    fn run(input: Self::Input) -> Result<Self::Output, ToolError>;
}

/// Why a tool call failed; mirrors the WIT `error-kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The input is well-formed JSON but not acceptable to the tool.
    InvalidInput,
    /// The input asks for something outside the tool's scope, such as a path outside
    /// `/workspace`, or the sandbox refused the operation.
    Denied,
    /// A named thing (file, directory) does not exist.
    NotFound,
    /// Anything else.
    Failed,
}

impl ErrorKind {
    /// The WIT spelling of the kind, e.g. `"invalid-input"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidInput => "invalid-input",
            Self::Denied => "denied",
            Self::NotFound => "not-found",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed tool failure. The message is shown to a model, so it should say what went wrong
/// and, where it can, what to do instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolError {
    /// What kind of failure this is.
    pub kind: ErrorKind,
    /// A human- and model-readable explanation.
    pub message: String,
}

impl ToolError {
    /// A failure of the given kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The input is well-formed but not acceptable.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    /// The request is outside what the tool may do.
    pub fn denied(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Denied, message)
    }

    /// A named thing does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// Any other failure.
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Failed, message)
    }
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for ToolError {}

/// Maps the kind and keeps the io message. The io message does not name the path, so file
/// tools should prefer [`workspace::io_error`], which does.
impl From<std::io::Error> for ToolError {
    fn from(err: std::io::Error) -> Self {
        let kind = match err.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorKind::Denied,
            _ => ErrorKind::Failed,
        };
        Self::new(kind, err.to_string())
    }
}

/// Exports a [`Tool`] as the component's `harness:tool/tool` interface.
///
/// Use it exactly once per tool crate (a `cdylib` built for `wasm32-wasip2`):
///
/// ```ignore
/// harness_tool_sdk::export_tool!(MyTool);
/// ```
///
/// A name sandboxd would refuse fails the build:
///
/// ```compile_fail,E0080
/// # use harness_tool_sdk::{Tool, ToolError, export_tool};
/// struct Bad;
/// impl Tool for Bad {
///     const NAME: &str = "Bad-Name";
///     const DESCRIPTION: &str = "Never loads.";
///     type Input = ();
///     type Output = ();
///     fn run(_: ()) -> Result<(), ToolError> {
///         Ok(())
///     }
/// }
/// export_tool!(Bad);
/// ```
#[macro_export]
macro_rules! export_tool {
    ($tool:ty) => {
        const _: () = {
            // sandboxd refuses a component whose name breaks this rule; failing the build is
            // kinder than a load error on the host.
            const _: () = ::core::assert!(
                $crate::__private::valid_name(<$tool as $crate::Tool>::NAME),
                "Tool::NAME must be 1-64 characters of [a-z0-9_] starting with a letter"
            );

            // wit-bindgen's export macro wants a plain type name, and the tool type may be a
            // path, so a local adapter type carries the `Guest` impl.
            struct HarnessToolComponent;

            impl $crate::__bindings::exports::harness::tool::tool::Guest for HarnessToolComponent {
                fn describe() -> ::std::string::String {
                    $crate::describe::<$tool>()
                }

                fn invoke(
                    input: ::std::string::String,
                ) -> ::std::result::Result<
                    ::std::string::String,
                    $crate::__bindings::exports::harness::tool::tool::ToolError,
                > {
                    $crate::invoke::<$tool>(&input).map_err($crate::__private::to_wit_error)
                }
            }

            // The export symbols are named like `harness:tool/tool@0.1.0#invoke`, which a
            // native linker's version script cannot express, so a host build (clippy, `cargo
            // test --workspace`) type-checks the glue above but exports nothing. The
            // `default_bindings_module` given to `generate!` is how the expansion, which lands
            // in the tool crate, finds the bindings in this one.
            #[cfg(target_arch = "wasm32")]
            $crate::__bindings::export!(HarnessToolComponent);
        };
    };
}

/// The text a tool's `describe` export returns: `{"name", "description", "input_schema",
/// "output_schema"}` with JSON Schemas generated from `T::Input` and `T::Output`.
///
/// [`export_tool!`] calls this; it is public so tests can check a tool's schemas on the host.
pub fn describe<T: Tool>() -> String {
    serde_json::json!({
        "name": T::NAME,
        "description": T::DESCRIPTION,
        "input_schema": schemars::schema_for!(T::Input),
        "output_schema": schemars::schema_for!(T::Output),
    })
    .to_string()
}

/// What a tool's `invoke` export does: decodes `input` as `T::Input` (a mismatch is
/// [`ErrorKind::InvalidInput`] naming the problem), runs the tool and encodes its output.
///
/// [`export_tool!`] calls this; it is public so tests can drive a tool through its JSON
/// interface on the host.
pub fn invoke<T: Tool>(input: &str) -> Result<String, ToolError> {
    let input: T::Input = serde_json::from_str(input).map_err(|err| {
        ToolError::invalid_input(format!(
            "input for `{}` does not match its input schema: {err}",
            T::NAME
        ))
    })?;
    let output = T::run(input)?;
    serde_json::to_string(&output).map_err(|err| {
        ToolError::failed(format!("`{}` could not encode its output: {err}", T::NAME))
    })
}

/// Support code for [`export_tool!`]; not a stable API.
#[doc(hidden)]
pub mod __private {
    use crate::__bindings::exports::harness::tool::tool as wit;
    use crate::{ErrorKind, ToolError};

    /// Whether `name` is a valid tool name: 1-64 characters of `[a-z0-9_]`, starting with a
    /// letter. `const` so [`export_tool!`](crate::export_tool) can check it at compile time.
    pub const fn valid_name(name: &str) -> bool {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() > 64 || !bytes[0].is_ascii_lowercase() {
            return false;
        }
        let mut i = 1;
        while i < bytes.len() {
            let b = bytes[i];
            if !(b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
                return false;
            }
            i += 1;
        }
        true
    }

    /// Converts to the WIT record.
    pub fn to_wit_error(err: ToolError) -> wit::ToolError {
        let kind = match err.kind {
            ErrorKind::InvalidInput => wit::ErrorKind::InvalidInput,
            ErrorKind::Denied => wit::ErrorKind::Denied,
            ErrorKind::NotFound => wit::ErrorKind::NotFound,
            ErrorKind::Failed => wit::ErrorKind::Failed,
        };
        wit::ToolError {
            kind,
            message: err.message,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};

    /// Input of the test tool.
    #[derive(Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct AddInput {
        /// First operand.
        a: u32,
        /// Second operand.
        b: u32,
    }

    /// Output of the test tool.
    #[derive(Serialize, JsonSchema)]
    struct AddOutput {
        /// The sum.
        sum: u32,
    }

    struct Add;

    impl Tool for Add {
        const NAME: &str = "add";
        const DESCRIPTION: &str = "Adds two numbers.";
        type Input = AddInput;
        type Output = AddOutput;
        fn run(input: AddInput) -> Result<AddOutput, ToolError> {
            input
                .a
                .checked_add(input.b)
                .map(|sum| AddOutput { sum })
                .ok_or_else(|| ToolError::invalid_input("sum overflows u32"))
        }
    }

    // Exercises the macro expansion on the host, so a broken macro fails `cargo test`.
    export_tool!(Add);

    #[test]
    fn describe_has_name_description_and_schemas() {
        let text = describe::<Add>();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["name"], "add");
        assert_eq!(json["description"], "Adds two numbers.");
        assert_eq!(json["input_schema"]["type"], "object");
        assert_eq!(json["input_schema"]["additionalProperties"], false);
        assert_eq!(
            json["input_schema"]["properties"]["a"]["description"],
            "First operand."
        );
        assert_eq!(
            json["output_schema"]["properties"]["sum"]["type"],
            "integer"
        );
    }

    #[test]
    fn invoke_round_trips_json() {
        assert_eq!(
            invoke::<Add>(r#"{"a": 2, "b": 3}"#).unwrap(),
            r#"{"sum":5}"#
        );
    }

    #[test]
    fn invoke_reports_bad_input_as_invalid_input() {
        let err = invoke::<Add>(r#"{"a": 2, "c": 3}"#).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidInput);
        assert!(err.message.contains("add"), "{}", err.message);
        assert!(err.message.contains("unknown field `c`"), "{}", err.message);

        let err = invoke::<Add>("not json").unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidInput);
    }

    #[test]
    fn invoke_passes_tool_errors_through() {
        let err = invoke::<Add>(r#"{"a": 4294967295, "b": 1}"#).unwrap_err();
        assert_eq!(err, ToolError::invalid_input("sum overflows u32"));
        let wit = __private::to_wit_error(err);
        assert!(matches!(
            wit.kind,
            __bindings::exports::harness::tool::tool::ErrorKind::InvalidInput
        ));
    }

    #[test]
    fn tool_names_follow_sandboxd_rules() {
        for name in ["a", "read_file", "x86_64", &"a".repeat(64)] {
            assert!(__private::valid_name(name), "{name}");
        }
        for name in [
            "",
            "Read",
            "1st",
            "_x",
            "read-file",
            "r\u{e9}ad",
            &"a".repeat(65),
        ] {
            assert!(!__private::valid_name(name), "{name}");
        }
    }

    #[test]
    fn io_errors_map_to_kinds() {
        use std::io::{Error, ErrorKind as Io};
        let err = ToolError::from(Error::new(Io::NotFound, "gone"));
        assert_eq!(err, ToolError::not_found("gone"));
        let err = ToolError::from(Error::new(Io::PermissionDenied, "nope"));
        assert_eq!(err, ToolError::denied("nope"));
        let err = ToolError::from(Error::other("boom"));
        assert_eq!(err, ToolError::failed("boom"));
    }
}
